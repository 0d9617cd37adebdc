"""Shared fixtures: small synthetic datasets, tiny checkpoints and the coco128 location."""

from __future__ import annotations

from pathlib import Path

import pytest
from _data_paths import find_coco128

COCO128 = find_coco128()


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The coco128 folder (128 train + 128 val COCO images, YOLO labels); skip when absent."""
    if COCO128 is None:
        pytest.skip("coco128 not found (set PGD_COCO128 to its folder)")
    return COCO128


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small synthetic shapes dataset (64 px, 16 train / 8 val images)."""
    from pgd_deploy.data.shapes import ShapesSpec, generate_shapes

    out = tmp_path_factory.mktemp("shapes")
    return generate_shapes(out, train=16, val=8, seed=0, spec=ShapesSpec(size=64))
