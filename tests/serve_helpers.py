"""Shared artifacts of the serving tests: small R18 checkpoints and their ONNX exports.

Built once per pytest session under the session's base temp folder (reused by every test module
that asks), with 128x128 inputs and a narrow head so that the tests stay fast on two CPU cores.
Random weights with a raised classification bias give real, plentiful detections.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CLASSES = ["circle", "square", "triangle"]
IMGSZ = 128


def make_checkpoint(
    path: Path, *, seed: int = 0, cls_bias: float = -1.0, box_bias: float = 1.0, head_convs: int = 1
) -> Path:
    """An R18 FCOS checkpoint (3 classes, 128x128) with random weights.

    `cls_bias` -1 gives scores around 0.27 (many candidates); `box_bias` 1 gives boxes of a few
    strides instead of near-empty ones.
    """
    import torch

    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import DataConfig, ModelConfig, TrainJob, to_dict
    from pgd_deploy.models import build_detector

    model_cfg = ModelConfig(depth=18, num_classes=3, fpn_channels=64, head_convs=head_convs)
    torch.manual_seed(seed)
    model = build_detector(model_cfg)
    model.head.cls_logits.bias.data.fill_(cls_bias)
    model.head.bbox_pred.bias.data.fill_(box_bias)
    job = TrainJob(model=model_cfg, data=DataConfig(min_size=IMGSZ, max_size=IMGSZ))
    state = {
        "model": model.state_dict(),
        "config": to_dict(job),
        "classes": CLASSES,
        "category_ids": [1, 2, 3],
    }
    save_checkpoint(state, path)
    return path


def _artifacts_dir(factory: pytest.TempPathFactory) -> Path:
    root = factory.getbasetemp() / "serve_artifacts"
    root.mkdir(exist_ok=True)
    return root


def teacher_checkpoint(factory: pytest.TempPathFactory) -> Path:
    path = _artifacts_dir(factory) / "teacher.pt"
    if not path.exists():
        make_checkpoint(path, seed=0, cls_bias=-1.0, head_convs=2)
    return path


def student_checkpoint(factory: pytest.TempPathFactory) -> Path:
    path = _artifacts_dir(factory) / "student.pt"
    if not path.exists():
        make_checkpoint(path, seed=1, cls_bias=-1.0, head_convs=1)
    return path


def export_onnx(
    checkpoint: Path, out: Path, *, imgsz: int = IMGSZ, batch: tuple[int, int] = (4, 8)
) -> Path:
    """`out`, the fp32 ONNX export of `checkpoint` by a real `pgd-export` run (gated on 2 images):
    its manifest says `passed` and records its sha256, as `pgd-serve` requires
    (`runtime.verify`). `batch`: (opt, max)."""
    pytest.importorskip("onnx")
    from pgd_deploy.export.command import main as export_main

    argv = ["--checkpoint", str(checkpoint), "--out", str(out.parent), "--name", out.stem]
    argv += ["--imgsz", f"{imgsz}x{imgsz}", "--batch-opt", str(batch[0])]
    argv += ["--batch-max", str(batch[1]), "--gate-images", "2"]
    assert export_main(argv) == 0, f"pgd-export of {checkpoint} failed"
    return out


def onnx_model(factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """The gated fp32 ONNX export of `checkpoint` (`export_onnx`), 128x128, batch up to 8."""
    out = checkpoint.with_suffix(".onnx")
    return out if out.exists() else export_onnx(checkpoint, out)


def coco128_images(coco128: Path, count: int) -> list[Path]:
    """The first `count` coco128 val images (`coco128`: the conftest fixture's folder)."""
    images = sorted((coco128 / "images" / "val2017").glob("*.jpg"))[:count]
    if len(images) < count:
        pytest.skip(f"coco128 has only {len(images)} val images, need {count}")
    return images


def default_sigint() -> None:
    """`preexec_fn` for a child that the test interrupts with SIGINT, as Ctrl-C in a terminal
    would: a shell that runs the test suite in the background (`make test &`, nohup, some CI
    runners) passes SIGINT on as ignored, and Python then installs no KeyboardInterrupt
    handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
