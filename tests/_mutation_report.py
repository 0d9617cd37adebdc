"""`make mutate-report`: the score table and the survivor list of the last `make mutate` run.

Reads mutmut's results in `mutants/` (run from the repository root, after `make mutate`) and
prints, in Markdown, one row per mutated module (mutants, killed, survived, timeouts, not
covered, score = killed / the mutants some test covers), then every surviving mutant as
`function: original -> mutant` lines (what `docs/mutation_survivors.md` holds). Timeouts count
as killed in the score, as mutmut counts them.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "caught by type check")


def module_results(root: Path) -> dict[str, dict[str, int | None]]:
    """module path -> {mutant name: exit code} from the `.meta` files under `root/mutants`."""
    out = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(root / "mutants"))[: -len(".meta")]
        out[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def counts(codes: dict[str, int | None]) -> Counter:
    return Counter(status_by_exit_code[code] for code in codes.values())


def score_row(name: str, tally: Counter) -> str:
    total = sum(tally.values())
    killed = sum(tally[k] for k in KILLED)
    tested = total - tally["no tests"] - tally["not checked"]
    score = f"{100 * killed / tested:.1f}%" if tested else "-"
    return (
        f"| {name} | {total} | {killed} | {tally['survived']} | {tally['timeout']} | "
        f"{tally['no tests']} | {score} |"
    )


def change(mutant: str, path: str) -> str:
    """`function: original -> mutant` of one mutant (its changed lines, joined)."""
    diff = get_diff_for_mutant(mutant, path=path).splitlines()
    old = " ".join(line[1:].strip() for line in diff[2:] if line.startswith("-"))
    new = " ".join(line[1:].strip() for line in diff[2:] if line.startswith("+"))
    function = mutant.split(".")[-1].rsplit("__mutmut_", 1)[0]  # x_f, or xǁClassǁmethod
    function = function[2:].replace("ǁ", ".")
    return f"- {function}: `{old}` -> `{new}`"


def main(root: Path) -> int:
    results = module_results(root)
    print("| module | mutants | killed | survived | timeout | not covered | score |")
    print("|---|---|---|---|---|---|---|")
    total: Counter = Counter()
    for module, codes in results.items():
        tally = counts(codes)
        total += tally
        print(score_row(f"`{module.removeprefix('pgd_deploy/')}`", tally))
    print(score_row("**all**", total))
    for module, codes in results.items():
        survivors = [m for m, code in codes.items() if status_by_exit_code[code] == "survived"]
        if survivors:
            print(f"\n`{module.removeprefix('pgd_deploy/')}` ({len(survivors)}):\n")
            for mutant in survivors:
                print(change(mutant, module))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
