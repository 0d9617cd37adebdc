"""Tests of pgd_deploy.models.loading: the one way a file becomes a detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import NARROW, narrow_fcos

from pgd_deploy.checkpoint import CheckpointError, save_checkpoint
from pgd_deploy.config import DataConfig, ModelConfig, TrainJob, to_dict
from pgd_deploy.models import load_detector


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_project_checkpoint_round_trip_with_its_labels(tmp_path: Path) -> None:
    model = narrow_fcos(seed=1)
    job = TrainJob(model=NARROW, data=DataConfig(min_size=96, max_size=160))  # num_classes 0
    state = {"model": model.state_dict(), "config": to_dict(job), "classes": ["a", "b", "c"]}
    path = save_checkpoint({**state, "category_ids": [3, 7, 9], "iteration": 5}, tmp_path / "c.pt")
    loaded = load_detector(path, device="cpu")
    assert _same_weights(loaded.detector, model) and not loaded.detector.training
    assert loaded.detector.num_classes == 3  # from the class names: the config says 0
    assert loaded.config == job and loaded.checkpoint["iteration"] == 5
    assert loaded.class_names == ["a", "b", "c"] and loaded.category_ids == [3, 7, 9]


def test_labels_default_from_the_class_count(tmp_path: Path) -> None:
    job = TrainJob(model=ModelConfig(depth=18, fpn_channels=64, head_convs=2, num_classes=4))
    path = save_checkpoint(
        {"model": narrow_fcos(num_classes=4).state_dict(), "config": to_dict(job)},
        tmp_path / "c.pt",
    )
    loaded = load_detector(path, device="cpu")
    assert loaded.class_names == ["0", "1", "2", "3"] and loaded.category_ids == [1, 2, 3, 4]


def test_plain_state_dicts_only_with_a_default_depth(tmp_path: Path) -> None:
    model = narrow_fcos(num_classes=5, seed=2)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="plain.pt: not a pgd-deploy checkpoint"):
        load_detector(path, device="cpu")  # export and serving need the training config
    loaded = load_detector(path, device="cpu", default_depth=18)
    assert _same_weights(loaded.detector, model) and loaded.checkpoint == {}
    # head width, tower depth and class count come from the weights, the depth as given
    assert loaded.config.model == ModelConfig(depth=18, fpn_channels=64, head_convs=2)
    assert loaded.class_names == ["0", "1", "2", "3", "4"]
    with pytest.raises(CheckpointError, match="plain.pt.*given for a file without a config"):
        load_detector(path, device="cpu", default_depth=34)


def test_untagged_dict_without_a_config_is_read_like_a_plain_state_dict(tmp_path: Path) -> None:
    model = narrow_fcos(seed=3)
    path = tmp_path / "untagged.pt"
    torch.save({"model": model.state_dict(), "classes": ["x", "y", "z"]}, path)
    loaded = load_detector(path, device="cpu", default_depth=18)
    assert _same_weights(loaded.detector, model) and loaded.class_names == ["x", "y", "z"]


def test_architecture_mismatch_names_the_file_and_the_config(tmp_path: Path) -> None:
    job = TrainJob(model=ModelConfig(depth=50, fpn_channels=64, head_convs=2, num_classes=3))
    path = save_checkpoint(
        {"model": narrow_fcos().state_dict(), "config": to_dict(job)}, tmp_path / "r18_says_r50.pt"
    )
    with pytest.raises(CheckpointError, match=r"r18_says_r50.pt: .*in its config \(depth 50"):
        load_detector(path, device="cpu")


def test_missing_batch_counters_are_tolerated_other_missing_weights_are_not(
    tmp_path: Path,
) -> None:
    """Frozen-BN files carry no `num_batches_tracked`; anything else missing is an error."""
    weights = narrow_fcos().state_dict()
    counters = [k for k in weights if k.endswith("num_batches_tracked")]
    job = TrainJob(model=ModelConfig(depth=18, fpn_channels=64, head_convs=2, num_classes=3))
    trimmed = {k: v for k, v in weights.items() if k not in counters}
    path = save_checkpoint({"model": trimmed, "config": to_dict(job)}, tmp_path / "frozen.pt")
    load_detector(path, device="cpu")
    del trimmed["head.cls_logits.bias"]
    path = save_checkpoint({"model": trimmed, "config": to_dict(job)}, tmp_path / "holed.pt")
    with pytest.raises(CheckpointError, match=r"holed.pt.*missing \['head.cls_logits.bias'\]"):
        load_detector(path, device="cpu")


def test_unreadable_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint not found"):
        load_detector(tmp_path / "nope.pt", device="cpu", default_depth=18)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="garbage.pt: cannot read checkpoint"):
        load_detector(garbage, device="cpu", default_depth=18)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(CheckpointError, match="list.pt: not a detector checkpoint.*a list"):
        load_detector(listed, device="cpu", default_depth=18)
    no_head = tmp_path / "no_head.pt"
    torch.save({"backbone.x": torch.zeros(1)}, no_head)
    with pytest.raises(CheckpointError, match="not a detector checkpoint of this project.s layout"):
        load_detector(no_head, device="cpu", default_depth=18)


def test_imagenet_weights_offline_say_what_to_do(tmp_path, monkeypatch, capsys) -> None:
    """Training offline with model.weights='imagenet' failed with a bare urlopen error."""
    import urllib.error

    from pgd_deploy.cli import train_main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: it downloads

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    recipe = Path(__file__).resolve().parents[1] / "train" / "quickstart_student.toml"
    argv = ["fit", "--recipe", str(recipe), "--work-dir", str(tmp_path / "w")]
    rc = train_main([*argv, "--set", "model.weights='imagenet'", "--set", "train.max_iters=1"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "the ImageNet weights of resnet" in err and "could not be downloaded" in err
    assert "Temporary failure in name resolution" in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert "--set model.weights=none" in err and "Traceback" not in err
