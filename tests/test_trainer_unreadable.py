"""Training on unreadable images: unreadable training images are skipped and named, never end a
run early, and do not break exact resume; an epoch without a readable image fails the run;
unreadable validation images are counted by eval, and a run whose validation cannot be read
stops and is finished by a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _trainer_helpers import ROOT, Interrupt, assert_same_weights, tiny_cfg, tiny_overrides

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.data.shapes import ShapesSpec, generate_shapes
from pgd_deploy.trainer import fit

# these tests run the training kernels: `make test-isa` runs them all
pytestmark = pytest.mark.trained


def shapes_with_unreadable(
    folder: Path, *, train: int = 8, bad_train: tuple[str, ...] = (), bad_val: tuple[str, ...] = ()
) -> tuple[Path, list[str]]:
    """A synthetic dataset (64 px, 4 val images) with some images truncated; returns its root
    and the `--set` overrides that train on it."""
    root = generate_shapes(folder, train=train, val=4, seed=0, spec=ShapesSpec(size=64))
    for split, names in (("train", bad_train), ("val", bad_val)):
        for name in names:
            truncate(root / split / name)
    overrides = [
        f"data.root='{root}'",
        "data.train_images='train'",
        "data.train_ann='annotations/train.json'",
        "data.val_images='val'",
        "data.val_ann='annotations/val.json'",
    ]
    return root, overrides


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: min(200, len(data) // 3)])


BAD_TRAIN = ("000002.jpg", "000005.jpg")


@pytest.fixture(scope="module")
def run_with_unreadable(tmp_path_factory) -> dict:
    """12 iterations at batch size 1 on 8 training images of which 2 are unreadable: 6 steps
    per epoch, so the run needs two epochs."""
    import logging

    base = tmp_path_factory.mktemp("unreadable")
    root, data = shapes_with_unreadable(base / "shapes", bad_train=BAD_TRAIN)
    extra = [*data, "train.batch_size=1", "train.max_iters=12", "train.checkpoint_every=4"]
    cfg = tiny_cfg(base / "cache", *extra, "train.eval_every=0")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("pgd_deploy").addHandler(handler)
    try:
        result = fit(cfg, work_dir=base / "run")
    finally:
        logging.getLogger("pgd_deploy").removeHandler(handler)
    return {"cfg": cfg, "root": root, "base": base, "result": result, "records": records}


def test_unreadable_training_images_never_end_training_early(run_with_unreadable):
    result = run_with_unreadable["result"]
    work = run_with_unreadable["base"] / "run"
    # It used to stop after the first epoch (6 of 12 iterations) with no best.pt and
    # metrics.json == {}, and exit 0.
    assert result.completed and result.iterations == 12, result
    assert load_checkpoint(work / "last.pt")["iteration"] == 12
    assert (work / "best.pt").is_file()
    assert set(json.loads((work / "metrics.json").read_text())) >= {"AP", "AP50"}
    assert [u.split(":")[0].rsplit("/", 1)[-1] for u in result.unreadable] == list(BAD_TRAIN)
    messages = [r.getMessage() for r in run_with_unreadable["records"]]
    for name in BAD_TRAIN:  # named once, although they fail in both epochs
        named = [m for m in messages if "unreadable training image" in m and name in m]
        assert len(named) == 1, messages
    assert "2 unreadable training image(s) were skipped" in " ".join(messages)


def test_resume_after_skipped_batches_is_exact(run_with_unreadable):
    """The resume offset counts skipped batches: an interrupted run resumed from its
    mid-epoch checkpoint ends with the weights of the uninterrupted one."""
    cfg, base = run_with_unreadable["cfg"], run_with_unreadable["base"]
    # `Interrupt` also adds a term drawn from the global random streams, so the random state
    # restored on resume is checked along with the data position.
    straight = fit(cfg, work_dir=base / "a", make_loss_provider=lambda m, d: Interrupt())
    assert straight.completed and straight.iterations == 12
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=base / "b", make_loss_provider=lambda m, d: Interrupt(at=9))
    assert load_checkpoint(base / "b" / "last.pt")["iteration"] == 8  # mid second epoch
    resumed = fit(
        cfg, work_dir=base / "b", resume=True, make_loss_provider=lambda m, d: Interrupt()
    )
    assert resumed.completed and resumed.iterations == 12
    assert_same_weights(base / "a" / "last.pt", base / "b" / "last.pt")


def test_eval_counts_unreadable_validation_images(run_with_unreadable, tmp_path, capsys):
    import shutil

    from pgd_deploy.cli import train_main

    root = shutil.copytree(run_with_unreadable["root"], tmp_path / "copy")
    checkpoint = run_with_unreadable["base"] / "run" / "best.pt"
    argv = ["eval", "--checkpoint", str(checkpoint), "--set", f"data.root='{root}'"]
    val = sorted((root / "val").glob("*.jpg"))
    truncate(val[0])
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "AP50" in out and "1 of 4 images could not be read" in out and val[0].name in out
    for path in val[1:]:
        truncate(path)
    # It used to print AP 0.0 and exit 0.
    assert train_main(argv) == 1
    captured = capsys.readouterr()
    assert "AP50" not in captured.out
    assert "no metrics: validation none of the 4 images could be read" in captured.err


def test_an_epoch_without_a_readable_image_fails_the_run(tmp_path):
    from pgd_deploy.cli import train_main

    names = tuple(f"{i:06d}.jpg" for i in range(4))
    _, data = shapes_with_unreadable(tmp_path / "shapes", train=4, bad_train=names)
    overrides = tiny_overrides(tmp_path / "cache", *data, "train.max_iters=4")
    result = fit(load_config(TrainJob, None, overrides), work_dir=tmp_path / "run")
    assert not result.completed and result.iterations == 0
    assert "epoch 1: all 2 batches were skipped because none of their images" in result.message
    assert "cannot reach 4 iterations" in result.message and len(result.unreadable) == 4
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "best.pt").exists()
    recipe = ROOT / "train" / "quickstart_student.toml"
    argv = ["fit", "--recipe", str(recipe), "--work-dir", str(tmp_path / "cli")]
    assert train_main([*argv, *(f"--set={o}" for o in overrides)]) == 1


def test_unreadable_validation_stops_the_run_and_resume_finishes_it(tmp_path):
    bad_val = tuple(f"{i:06d}.jpg" for i in range(4))
    root, data = shapes_with_unreadable(tmp_path / "shapes", bad_val=bad_val)
    cfg = tiny_cfg(tmp_path / "cache", *data, "train.max_iters=2")
    kept = {name: (tmp_path / "keep" / name) for name in bad_val}
    first = fit(cfg, work_dir=tmp_path / "run")
    assert not first.completed and "none of the 4 images could be read" in first.message
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2  # training kept
    assert not (tmp_path / "run" / "metrics.json").exists()
    generate_shapes(tmp_path / "keep", train=8, val=4, seed=0, spec=ShapesSpec(size=64))
    for name in kept:  # the user repairs the validation images and resumes
        (root / "val" / name).write_bytes((tmp_path / "keep" / "val" / name).read_bytes())
    again = fit(cfg, work_dir=tmp_path / "run", resume=True)
    assert again.completed and again.iterations == 2 and set(again.metrics) >= {"AP"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == again.metrics
    assert (tmp_path / "run" / "best.pt").is_file()
