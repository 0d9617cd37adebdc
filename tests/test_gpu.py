"""CUDA paths: PGD math on the GPU against the CPU, a distillation step under bf16, training with
bf16 and fp16 (grad scaler) plus resume, and the PyTorch serving backend on the GPU.

Marked `gpu` and skipped without CUDA (CI has none): `bench/gpu_check.sh` runs these on a GPU
machine together with the GPU benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainer import Interrupt, tiny_cfg

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import ModelConfig
from pgd_deploy.distill import (
    Distiller,
    background_mask,
    cls_distill_loss,
    kd_term_names,
    pgw_mask,
    quality_score,
    reg_distill_loss,
)
from pgd_deploy.engine import weighted_sum
from pgd_deploy.models import build_detector
from pgd_deploy.runtime.torch_backend import TorchBackend
from pgd_deploy.trainer import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
KD_KEYS = kd_term_names(5)


def _case(dtype: torch.dtype, seed: int, points: int = 400, gts: int = 5, classes: int = 4):
    """Random teacher predictions around random large GTs on a 128 px image: every location
    overlaps some GT, so the top-K has no ties at zero quality (which devices break differently)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(points, 2, generator=g, dtype=dtype) * 128
    half = 15 + torch.rand(points, 2, generator=g, dtype=dtype) * 30
    pred = torch.cat([centers - half, centers + half], dim=1)
    lo = torch.rand(gts, 2, generator=g, dtype=dtype) * 40
    gt = torch.cat([lo, lo + 50 + torch.rand(gts, 2, generator=g, dtype=dtype) * 40], dim=1)
    logits = torch.randn(points, classes, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (gts,), generator=g)
    return logits, pred, gt, labels, centers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masks_on_cuda_match_the_cpu(dtype: torch.dtype) -> None:
    logits, pred, gt, labels, centers = _case(dtype, seed=3)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 0}
    q_cpu = quality_score(logits, pred, gt, labels, 0.8)
    q_gpu = quality_score(logits.to(CUDA), pred.to(CUDA), gt.to(CUDA), labels.to(CUDA), 0.8)
    assert q_gpu.device.type == "cuda" and q_gpu.dtype == dtype
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, **tol)

    m_cpu = pgw_mask(q_cpu, centers, gt, k=30, jitter=0.0)
    m_gpu = pgw_mask(q_gpu, centers.to(CUDA), gt.to(CUDA), k=30, jitter=0.0)
    assert m_gpu.device.type == "cuda" and m_gpu.dtype == dtype
    assert torch.equal(m_gpu.cpu() > 0, m_cpu > 0)  # the same selected locations
    torch.testing.assert_close(m_gpu.cpu(), m_cpu, **tol)

    bg_cpu = background_mask(centers, gt)
    bg_gpu = background_mask(centers.to(CUDA), gt.to(CUDA))
    assert torch.equal(bg_gpu.cpu(), bg_cpu)

    # Jitter drawn from a CUDA generator: a valid sparse mask on the GPU.
    jittered = pgw_mask(
        q_gpu, centers.to(CUDA), gt.to(CUDA), k=30, generator=torch.Generator(CUDA).manual_seed(0)
    )
    assert jittered.device.type == "cuda"
    assert bool(((jittered >= 0) & (jittered <= 1)).all())
    assert 0 < int((jittered > 0).sum()) <= 30 * gt.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_and_gradients_on_cuda_match_the_cpu(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    student = torch.randn(4, 16, 10, 12, generator=g, dtype=dtype)
    teacher = torch.randn(4, 16, 10, 12, generator=g, dtype=dtype)
    fg = torch.rand(4, 10, 12, generator=g, dtype=dtype) * (
        torch.rand(4, 10, 12, generator=g) > 0.8
    )
    bg = (torch.rand(4, 10, 12, generator=g) > 0.5).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 0}
    kwargs = {"temperature": 0.8, "alpha": 0.04, "beta": 0.02, "delta": 0.0008}

    def both(device: torch.device):
        s = student.to(device, copy=True).requires_grad_(True)  # a fresh leaf per device
        cls = cls_distill_loss(
            s,
            teacher.to(device),
            fg.to(device),
            bg.to(device),
            level_weight=1.5,
            mask_group=2,
            **kwargs,
        )
        reg = reg_distill_loss(
            s, teacher.to(device), fg.to(device), temperature=0.8, gamma=0.064, delta=0.0008
        )
        (cls + reg).backward()
        return cls.detach().cpu(), reg.detach().cpu(), s.grad.cpu()

    for a, b in zip(both(torch.device("cpu")), both(CUDA), strict=True):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a, **tol)


def test_distillation_step_on_cuda_under_bf16() -> None:
    torch.manual_seed(1)
    teacher = build_detector(ModelConfig(depth=18), num_classes=3).to(CUDA)
    student = build_detector(ModelConfig(depth=18), num_classes=3).to(CUDA).train()
    distiller = Distiller(teacher=teacher, generator=torch.Generator(CUDA).manual_seed(0))
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
    images = torch.randn(4, 3, 128, 160, device=CUDA)
    boxes = torch.tensor([[8.0, 10, 70, 90], [40, 30, 120, 110]], device=CUDA)
    targets = [
        {"boxes": boxes, "labels": torch.tensor([0, 2], device=CUDA)},
        {"boxes": boxes[:1], "labels": torch.tensor([1], device=CUDA)},
        {"boxes": boxes.new_zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long, device=CUDA)},
        {"boxes": boxes[1:], "labels": torch.tensor([2], device=CUDA)},
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = student(images)
        kd = distiller(images, outputs, targets)
        losses = {**student.loss(outputs, targets), **kd}
    total = weighted_sum(losses, distiller.loss_weights)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert list(kd) == KD_KEYS
    assert all(v.device.type == "cuda" and bool(torch.isfinite(v)) for v in kd.values())
    assert kd["kd_reg_feat_p3"].item() > 0
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_cuda_with_mixed_precision_and_resume(tmp_path, amp: str) -> None:
    cfg = tiny_cfg(
        tmp_path / "cache",
        "train.device='cuda'",
        f"train.amp='{amp}'",
        "train.max_iters=6",
        "train.checkpoint_every=3",
    )
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=tmp_path / "run", make_loss_provider=lambda m, d: Interrupt(at=4))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 3
    assert bool(state["scaler"]) == (amp == "fp16")  # the grad scaler's state is checkpointed
    assert all(v.device.type == "cpu" for v in state["model"].values())  # loadable without a GPU
    result = fit(cfg, work_dir=tmp_path / "run", resume=True)
    assert result.completed and result.iterations == 6
    assert set(result.metrics) >= {"AP", "AP50"}
    final = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(
        bool(torch.isfinite(v).all()) for v in final["model"].values() if v.is_floating_point()
    )


def test_torch_backend_on_cuda_matches_the_cpu(tmp_path) -> None:
    cfg = tiny_cfg(tmp_path / "cache", "train.device='cuda'", "train.max_iters=2")
    fit(cfg, work_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "last.pt"
    cpu = TorchBackend(ckpt, device="cpu")
    gpu = TorchBackend(ckpt, device="cuda")
    assert gpu.device.type == "cuda" and gpu.input_size == cpu.input_size
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(2, 3, *cpu.input_size)).astype(np.float32)
    a, b = cpu.infer(batch), gpu.infer(batch)
    # cuDNN may run the convolutions in TF32: close, not identical
    np.testing.assert_allclose(b["scores"], a["scores"], atol=2e-3)
    np.testing.assert_allclose(b["boxes"], a["boxes"], atol=0.5)
    images = [rng.integers(0, 255, size=(50, 70, 3), dtype=np.uint8) for _ in range(3)]
    assert len(gpu.predict(images)) == 3


def test_pgd_training_on_cuda_channels_last(tmp_path) -> None:
    teacher = fit(
        tiny_cfg(tmp_path / "cache", "train.device='cuda'", "train.max_iters=2"),
        work_dir=tmp_path / "teacher",
    )
    assert teacher.completed
    cfg = tiny_cfg(
        tmp_path / "cache",
        "train.device='cuda'",
        "train.channels_last='on'",
        "train.max_iters=3",
        f"distill.teacher='{tmp_path / 'teacher' / 'last.pt'}'",
    )
    result = fit(cfg, work_dir=tmp_path / "pgd")
    assert result.completed and set(result.metrics) >= {"AP", "AP50"}
    history = load_checkpoint(tmp_path / "pgd" / "last.pt")["history"]
    logged = {key for row in history for key in row}
    assert set(KD_KEYS) <= logged  # the KD terms were trained and logged


def test_quantization_aware_pgd_on_cuda(tmp_path) -> None:
    """QAT-PGD on the GPU (channels-last, as `auto` picks on CUDA), then the checkpoint's fake
    quantization on the GPU against the CPU. modelopt may build its CUDA extension on first use."""
    pytest.importorskip("modelopt.torch.quantization")
    student = fit(
        tiny_cfg(tmp_path / "cache", "train.device='cuda'", "train.max_iters=2"),
        work_dir=tmp_path / "fp32",
    )
    assert student.completed
    init = tmp_path / "fp32" / "last.pt"
    cfg = tiny_cfg(
        tmp_path / "cache",
        "train.device='cuda'",
        "train.amp='off'",
        "train.max_iters=3",
        f"distill.teacher='{init}'",
        "distill.init_student=false",
        f"qat.init='{init}'",
        "qat.calib_images=4",
    )
    result = fit(cfg, work_dir=tmp_path / "qat")
    assert result.completed, result.message
    state = load_checkpoint(tmp_path / "qat" / "last.pt")
    assert state["qat"]["init"] == str(init)
    assert any(k.endswith("output_quantizer._amax") for k in state["model"])
    cpu = TorchBackend(tmp_path / "qat" / "last.pt", device="cpu")
    gpu = TorchBackend(tmp_path / "qat" / "last.pt", device="cuda")
    assert cpu.precision == gpu.precision == "int8 fake quant"
    batch = np.random.default_rng(0).normal(size=(2, 3, *cpu.input_size)).astype(np.float32)
    a, b = cpu.infer(batch), gpu.infer(batch)
    # Quantized networks amplify float differences (export/README.md): close on average only.
    assert np.abs(b["scores"] - a["scores"]).mean() < 1e-2
    assert np.abs(b["boxes"] - a["boxes"]).mean() < 2.0


@pytest.mark.parametrize(
    "precision, compile", [("fp16", False), ("bf16", False), ("fp16", True), ("fp32", True)]
)
def test_torch_backend_precisions_on_cuda_pass_the_export_gates(
    trained_run, precision: str, compile: bool
) -> None:
    """fp16/bf16 autocast with channels-last (auto on CUDA), and torch.compile, gated against
    fp32 eager on CUDA like an export (fp16 ONNX tolerances for 16 bits), mAP included."""
    from pgd_deploy.config import DataConfig, ExportConfig
    from pgd_deploy.export.gates import gate_torch_backend
    from pgd_deploy.export.images import gate_images

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    backend = TorchBackend(
        trained_run["checkpoint"], device="cuda", precision=precision, compile=compile
    )
    assert backend.channels_last == (precision != "fp32")
    cfg = ExportConfig(val=str(trained_run["val_json"]), val_images=str(trained_run["val_images"]))
    report = gate_torch_backend(backend, gate_images(cfg, DataConfig(), 16))
    assert {r.name: r.passed for r in report.results}["map"] is True
    assert report.passed, report.to_markdown()
    out = backend.infer(np.zeros((2, 3, *backend.input_size), np.float32))
    assert out["boxes"].dtype == out["scores"].dtype == np.float32
