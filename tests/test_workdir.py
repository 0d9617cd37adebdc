"""Starting a run in a work folder (workdir.check_start): nothing of a previous run is replaced
without --resume or --overwrite, even when it left a single file."""

from __future__ import annotations

import pytest

from pgd_deploy.workdir import RUN_FILES, check_start


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_folder_holding_one_run_file_is_refused(tmp_path, name):
    """Only the last.pt of an interrupted run, or only its metrics: refused like a full run."""
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=f"already holds a training run \\({name}\\)"):
        check_start(tmp_path, resume=False, overwrite=False)
    check_start(tmp_path, resume=False, overwrite=True)  # replacing it was asked for


def test_an_empty_or_foreign_folder_starts_and_resume_needs_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    check_start(tmp_path, resume=False, overwrite=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check_start(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="choose one"):
        check_start(tmp_path, resume=True, overwrite=True)


def _state(**sections):
    """A checkpoint state holding the resolved config of `TrainJob` with `sections` changed."""
    from pgd_deploy.config import TrainJob, load_config, to_dict

    overrides = [f"{key}={value!r}" for key, value in sections.items()]
    return {"config": to_dict(load_config(TrainJob, None, overrides))}


def _job(*overrides):
    from pgd_deploy.config import TrainJob, load_config

    return load_config(TrainJob, None, list(overrides))


def test_a_resume_with_the_same_architecture_and_optimiser_passes():
    from pgd_deploy.workdir import check_resumable

    check_resumable(_job(), _state(), "last.pt")
    # num_classes 0 now means "from the data": compared with the category ids instead
    check_resumable(_job(), _state(**{"model.num_classes": 5}), "last.pt")
    check_resumable(_job("train.base_lr=0.5"), _state(), "last.pt")  # not a structural field


@pytest.mark.parametrize(
    ("now", "saved", "message"),
    [
        ("model.depth=101", {}, "model.depth is 50 in the checkpoint but 101 now"),
        ("model.head='atss'", {}, "model.head is 'fcos' in the checkpoint but 'atss' now"),
        ("model.fpn_channels=64", {}, "model.fpn_channels is 256 in the checkpoint but 64 now"),
        ("model.head_convs=2", {}, "model.head_convs is 4 in the checkpoint but 2 now"),
        ("model.num_classes=3", {"model.num_classes": 5}, "num_classes is 5 in the checkpoint"),
        ("train.optimizer='adamw'", {}, "train.optimizer is 'sgd' in the checkpoint but 'adamw'"),
        ("qat.init='student.pt'", {}, "the checkpoint is not a quantization-aware run but"),
    ],
)
def test_a_resume_that_would_rebuild_another_model_is_refused(now, saved, message):
    from pgd_deploy.checkpoint import CheckpointError
    from pgd_deploy.workdir import check_resumable

    with pytest.raises(CheckpointError, match=f"^runs/x/last.pt: cannot resume .*{message}"):
        check_resumable(_job(now), _state(**saved), "runs/x/last.pt")


def test_a_qat_checkpoint_resumes_only_as_qat_and_every_difference_is_named():
    from pgd_deploy.checkpoint import CheckpointError
    from pgd_deploy.workdir import check_resumable

    qat_state = {**_state(**{"qat.init": "student.pt"}), "qat": {"version": 1}}
    check_resumable(_job("qat.init='student.pt'"), qat_state, "last.pt")
    with pytest.raises(CheckpointError, match="the checkpoint is a quantization-aware run but"):
        check_resumable(_job(), qat_state, "last.pt")
    with pytest.raises(CheckpointError) as err:
        check_resumable(_job("model.depth=18", "model.head_convs=1"), _state(), "last.pt")
    assert "model.depth is 50" in str(err.value) and "; model.head_convs is 4" in str(err.value)
    assert str(err.value).endswith(
        "Drop those overrides to continue the run, or train into a new --work-dir"
    )


def test_a_resume_on_other_categories_is_refused():
    from pgd_deploy.checkpoint import CheckpointError
    from pgd_deploy.workdir import check_same_classes

    check_same_classes({"category_ids": [1, 3]}, [1, 3], "ann.json", "last.pt")
    check_same_classes({}, [1, 3], "ann.json", "last.pt")  # an old checkpoint: nothing to compare
    with pytest.raises(CheckpointError, match=r"^last.pt: cannot resume: trained on categories "
                       r"\[1, 3\] but ann.json has \[1, 2, 3\]$"):  # fmt: skip
        check_same_classes({"category_ids": [1, 3]}, [1, 2, 3], "ann.json", "last.pt")


def test_clear_run_removes_the_runs_files_and_keeps_the_others(tmp_path, caplog):
    from pgd_deploy.workdir import clear_run

    for name in ("last.pt", "metrics.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("x")
    with caplog.at_level("INFO", logger="pgd_deploy.workdir"):
        assert clear_run(tmp_path) == ["last.pt", "metrics.json", "tensorboard/"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "removed the previous run's last.pt, metrics.json, tensorboard/ from" in caplog.text
    caplog.clear()
    assert clear_run(tmp_path) == [] and "removed" not in caplog.text


def test_a_resume_finds_last_pt_and_the_refusal_names_every_run_file(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"x")
    check_start(tmp_path, resume=True, overwrite=False)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError) as err:
        check_start(tmp_path, resume=False, overwrite=False)
    assert str(err.value) == (
        f"{tmp_path} already holds a training run (last.pt, metrics.json): continue it with "
        "--resume, train into a new --work-dir, or replace it with --overwrite"
    )
    (tmp_path / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match=f"^--resume: no checkpoint at {tmp_path}/last.pt$"):
        check_start(tmp_path, resume=True, overwrite=False)
