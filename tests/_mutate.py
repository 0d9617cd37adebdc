"""`make mutate`: mutmut's command line, with functions decorated by `@torch.no_grad()` mutated.

mutmut 3 leaves every decorated function alone (a decorator may have side effects when its
function is copied for the trampoline), which here would skip most of the mask code:
`pgw_masks`, `background_mask`, `batch_masks`, `Distiller.masks` are all `@torch.no_grad()`.
That decorator has no side effect, and mutmut keeps it on the trampoline and on every mutated
copy, so this script lets mutmut mutate such functions and then runs its CLI unchanged
(`python tests/_mutate.py run`, `... results`). Properties stay unmutated: mutmut's trampolines
cannot wrap them. The configuration is `[tool.mutmut]` in pyproject.toml.
"""

from __future__ import annotations

import libcst as cst
from libcst.metadata import PositionProvider
from mutmut.mutation import file_mutation


def _only_no_grad(node: cst.CSTNode) -> bool:
    """A function whose decorators are all `@torch.no_grad()`."""
    if not isinstance(node, cst.FunctionDef) or not node.decorators:
        return False
    for decorator in node.decorators:
        call = decorator.decorator
        if not (
            isinstance(call, cst.Call)
            and isinstance(call.func, cst.Attribute)
            and isinstance(call.func.value, cst.Name)
            and (call.func.value.value, call.func.attr.value) == ("torch", "no_grad")
        ):
            return False
    return True


_original_skip = file_mutation.MutationVisitor._skip_node_and_children


def _skip_node_and_children(self, node: cst.CSTNode) -> bool:
    skip = _original_skip(self, node)
    if skip and _only_no_grad(node):
        # mutmut's other reasons to skip a function: a `# pragma: no mutate` line, a name that
        # must never be mutated
        position = self.get_metadata(PositionProvider, node, None)
        ignored = position is not None and position.start.line in self._ignored_node_lines
        return ignored or node.name.value in file_mutation.NEVER_MUTATE_FUNCTION_NAMES
    return skip


file_mutation.MutationVisitor._skip_node_and_children = _skip_node_and_children

if __name__ == "__main__":
    from mutmut.__main__ import cli

    cli()
