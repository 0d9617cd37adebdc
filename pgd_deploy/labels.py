"""Class names and dataset category ids of a detector's contiguous labels (stdlib only).

A detector predicts labels 0..C-1. A checkpoint or an exported artifact may carry the names of
those classes and the dataset category id of each (COCO ids are not contiguous); when it does
not, the defaults below apply everywhere: in the model loader, the export and every backend.
The runtime imports this module, so it must stay free of torch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["class_labels"]


def class_labels(
    num_classes: int,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
) -> tuple[list[str], list[int]]:
    """(class names, category ids), one per label, with the defaults filled in.

    Args:
        num_classes: C, the labels of the model; used only when `class_names` is empty.
        class_names: the stored names; None or empty = "0", "1", ..., str(C - 1).
        category_ids: the stored dataset ids; None or empty = label + 1 (the COCO-style
            convention: 1, 2, ..., one per class name).

    Returns:
        (names, ids) as fresh lists.
    """
    names = list(class_names or []) or [str(label) for label in range(num_classes)]
    ids = [int(c) for c in category_ids or []] or list(range(1, len(names) + 1))
    return names, ids
