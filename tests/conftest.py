"""Shared fixtures (synthetic datasets, a random R18 checkpoint, trained checkpoints, the coco128
location) and the end-of-run report of skipped tests (`_skip_report`). Helpers that tests import
live in `tests/_*.py` (the model builders in `_models`)."""

from __future__ import annotations

from pathlib import Path

import _skip_report
import pytest
from _data_paths import SKIP_REASON, find_coco128

COCO128 = find_coco128()
pytest_plugins = ("pytester",)  # tests of the skip report run small pytest sessions


def pytest_configure(config: pytest.Config) -> None:
    _skip_report.register(config)  # the end-of-run list of skipped tests; PGD_TEST_STRICT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of the trained checkpoint is `trained` (`make test-isa` runs them under other
    kernel paths); tests that train a model themselves carry the marker in their module."""
    for item in items:
        if {"trained_run", "atss_trained_run", "gfl_trained_run"} & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.trained)


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The coco128 folder (128 train + 128 val COCO images, YOLO labels); skip when absent."""
    if COCO128 is None:
        pytest.skip(SKIP_REASON)
    return COCO128


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small synthetic shapes dataset (64 px, 16 train / 8 val images)."""
    from pgd_deploy.data.shapes import ShapesSpec, generate_shapes

    out = tmp_path_factory.mktemp("shapes")
    return generate_shapes(out, train=16, val=8, seed=0, spec=ShapesSpec(size=64))


@pytest.fixture(scope="session")
def r18_checkpoint(tmp_path_factory) -> Path:
    """A project checkpoint (pgd_deploy.checkpoint format) of a random R18 FCOS, 3 classes:
    `_models.r18_fcos(seed=1)`. Read-only: tests that alter a checkpoint copy it first."""
    from _models import r18_fcos

    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import ModelConfig, TrainJob, to_dict

    job = TrainJob(model=ModelConfig(depth=18, num_classes=3))
    path = tmp_path_factory.mktemp("r18_checkpoint") / "teacher.pt"
    return save_checkpoint({"model": r18_fcos(seed=1).state_dict(), "config": to_dict(job)}, path)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint that really detects: FCOS R18 (narrow head) trained for 150 iterations on
    64 synthetic 64 px images (~30 s on 2 CPU cores; AP about 0.10, AP50 about 0.27 on the
    16 validation images). For tests whose gates and metrics must see real detections.

    Returns:
        {"checkpoint": best.pt, "root": dataset root, "val_json": COCO JSON of the validation
        split, "val_images": its image folder, "work_dir": the run folder, "overrides": the data
        and model `--set` overrides of the run}.
    """
    return _train_run(tmp_path_factory, "fcos")


@pytest.fixture(scope="session")
def atss_trained_run(tmp_path_factory) -> dict[str, Path]:
    """`trained_run` with the ATSS head (`model.head = "atss"`), the same data and schedule."""
    return _train_run(tmp_path_factory, "atss")


@pytest.fixture(scope="session")
def gfl_trained_run(tmp_path_factory) -> dict[str, Path]:
    """`trained_run` with the GFL head (`model.head = "gfl"`), the same data and schedule."""
    return _train_run(tmp_path_factory, "gfl")


def _train_run(tmp_path_factory, head: str) -> dict[str, Path]:
    from pgd_deploy.config import TrainJob, load_config
    from pgd_deploy.data.shapes import ShapesSpec, generate_shapes
    from pgd_deploy.trainer import fit

    base = tmp_path_factory.mktemp(f"trained_{head}")
    root = generate_shapes(base / "shapes", train=64, val=16, seed=0, spec=ShapesSpec(size=64))
    cfg = load_config(
        TrainJob,
        None,
        [
            *_trained_run_overrides(root),
            f"model.head={head!r}",
            "train.max_iters=150",
            "train.batch_size=8",
            "train.optimizer='adamw'",
            "train.base_lr=0.002",
            "train.base_batch=8",
            "train.weight_decay=0.05",
            "train.warmup_iters=20",
            "train.lr_steps=[10.0, 11.5]",
            "train.grad_clip=35.0",
            "train.eval_every=0",
            "train.amp='off'",
            "train.log_every=50",
        ],
    )
    result = fit(cfg, work_dir=base / "run")
    assert result.completed and result.metrics["AP50"] > 0.1, result
    return {
        "checkpoint": base / "run" / "best.pt",
        "root": root,
        "val_json": root / "annotations" / "val.json",
        "val_images": root / "val",
        "work_dir": base / "run",
        "overrides": [*_trained_run_overrides(root), f"model.head={head!r}"],
    }


def _trained_run_overrides(root: Path) -> list[str]:
    """The data and model `--set` overrides of `trained_run`: its dataset and architecture
    (a teacher loaded from it needs the same head)."""
    return [
        f"data.root={str(root)!r}",
        "data.train_images='train'",
        "data.train_ann='annotations/train.json'",
        "data.val_images='val'",
        "data.val_ann='annotations/val.json'",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "model.depth=18",
        "model.fpn_channels=64",
        "model.head_convs=2",
    ]
