"""The anchor-based heads (ATSS, GFL) end to end: a short run whose logged loss is the head's
weighted terms, its reload and a gated ONNX export, and a bit-exact resume of PGD between two
models of the head with its PGD defaults (masks at the anchor centres)."""

from __future__ import annotations

import pytest
import torch
from test_trainer import InterruptAt, tiny_overrides

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.models import ATSSHead, GFLHead, load_detector
from pgd_deploy.trainer import fit

pytestmark = pytest.mark.slow

# head -> (class, its weights of the loss terms as the trainer applies them)
HEADS = {
    "atss": (ATSSHead, {"loss_cls": 1.0, "loss_box": 2.0, "loss_iou": 1.0}),
    "gfl": (GFLHead, {"loss_cls": 1.0, "loss_box": 2.0, "loss_dfl": 0.25}),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_a_short_run_trains_reloads_and_exports_a_gated_onnx(tmp_path, head):
    cls, weights = HEADS[head]
    overrides = tiny_overrides(
        tmp_path / "cache", f"model.head='{head}'", "model.head_convs=1", "train.max_iters=2"
    )
    assert fit(load_config(TrainJob, None, overrides), work_dir=tmp_path / "run").completed
    first = load_checkpoint(tmp_path / "run" / "last.pt")["history"][0]
    weighted = sum(w * first[k] for k, w in weights.items())
    assert first["loss"] == pytest.approx(weighted, rel=1e-5)
    loaded = load_detector(tmp_path / "run" / "last.pt", device="cpu")
    assert isinstance(loaded.detector.head, cls) and loaded.config.model.head == head

    pytest.importorskip("onnxruntime")
    from pgd_deploy.export.command import main as export_main
    from pgd_deploy.runtime.manifest import read_manifest

    argv = ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "exp")]
    assert export_main([*argv, "--name", head, "--imgsz", "64x64", "--gate-images", "4"]) == 0
    manifest = read_manifest(tmp_path / "exp" / f"{head}.onnx")
    parity = manifest["gates"]["results"][0]
    assert manifest["status"] == "passed" and parity["passed"], parity


@pytest.mark.parametrize("head", list(HEADS))
def test_pgd_resume_is_bit_exact(tmp_path, head):
    """PGD from a teacher of the head with its PGD defaults (ATSS: K = 9 and the class x IoU
    teacher score; GFL: K = 30), interrupted at its 4th step and resumed, ends with the weights
    of the uninterrupted run, bit for bit."""
    from pgd_deploy.distill import build_distiller

    base = tiny_overrides(tmp_path / "cache", f"model.head='{head}'", "model.head_convs=1")
    assert fit(load_config(TrainJob, None, [*base, "train.max_iters=2"]), work_dir=tmp_path / "t")
    teacher = tmp_path / "t" / "last.pt"
    pgd = [*base, "train.max_iters=6", "train.checkpoint_every=3", f"distill.teacher='{teacher}'"]
    cfg = load_config(TrainJob, None, pgd)
    assert cfg.distill.topk == HEADS[head][0].pgd_defaults["topk"]
    assert fit(cfg, work_dir=tmp_path / "a").completed

    def interrupted(student, device):
        distiller = build_distiller(cfg.distill, student, device=device, seed=cfg.train.seed)
        return InterruptAt(distiller, at=4)

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=tmp_path / "b", make_loss_provider=interrupted)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3
    assert fit(cfg, work_dir=tmp_path / "b", resume=True).completed
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    logged = {k for entry in a["history"] for k in entry}
    assert {"kd_cls_fg_p3", *HEADS[head][1]} <= logged, logged
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, differ[:5]
