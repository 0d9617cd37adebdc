"""Quantization-aware training: int8 fake quantization that is exactly what the export writes.

NVIDIA Model Optimizer (`modelopt.torch.quantization`) inserts the fake quantizers; nothing here
does quantization arithmetic. The placement is the cpu int8 target's rule set (`export/qdq.py`),
which ONNX Runtime's x86 kernels fuse into int8 convolutions:
- every `nn.Conv2d` except the head's predictors: a per-tensor input, a per-output-channel
  (axis 0) weight and a per-tensor output quantizer, symmetric int8, ranges from "max" calibration
  on training images (static during fine-tuning, as in modelopt's QAT);
- the head's predictors (its `float_predictors`) and the decode tail (box decoding, sigmoids,
  score product) stay float, as in the post-training export (docs/deployment.md §3).
BatchNorm is folded into the preceding convolution first (the ONNX export folds it as well), so the
fake-quantized weight is the exported weight and per-channel scales mean the same on both sides.

A QAT checkpoint stores the quantizer ranges in its state dict (`*_quantizer._amax` tensors) and
`"qat": checkpoint_entry(...)`: modelopt's own state (`mto.modelopt_state`, plain dicts, lists and
strings, so `torch.load(weights_only=True)` reads it) plus the `qat.init` it started from.
`restore_fake_quant` rebuilds the same modules before the weights are loaded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

QUANTIZERS = ("input", "weight", "output")  # per quantized convolution
INT8_MAX = 127  # symmetric int8: scale = amax / 127
ENTRY_VERSION = 1


def require_modelopt() -> tuple[Any, Any]:
    """(modelopt.torch.quantization, modelopt.torch.opt), or an ImportError naming the extra."""
    try:
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise ImportError(
            f"quantization-aware training needs NVIDIA Model Optimizer ({err}): "
            "pip install 'pgd-deploy[qat]'"
        ) from None
    return mtq, mto


@contextlib.contextmanager
def _quiet_modelopt() -> Iterator[None]:
    """modelopt prints ("Inserted N quantizers") and warns that the parameter-free max pool's
    (disabled) quantizers have no device; keep both out of the CLI's output, in the debug log."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not identify the device")
        yield
    if out.getvalue().strip():
        logger.debug("modelopt: %s", out.getvalue().strip())


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm into the convolution before it (eval statistics) and replace it by
    Identity; returns how many were folded.

    The pairs are found by torchvision's ResNet naming: `bnK` follows `convK`, and in a
    `downsample` Sequential index 1 follows index 0.

    Raises:
        ValueError: a BatchNorm without its convolution (an architecture this does not know).
    """
    folded = 0
    for parent_name, parent in list(model.named_modules()):
        children = dict(parent.named_children())
        for name, bn in children.items():
            if not isinstance(bn, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                continue
            if name.startswith("bn"):
                conv_name = "conv" + name[2:]
            else:
                conv_name = str(int(name) - 1) if name.isdigit() else ""
            conv = children.get(conv_name)
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"{parent_name}.{name}: no convolution to fold this norm into")
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            bias.requires_grad_(weight.requires_grad)  # BatchNorm's shift trains with its conv
            conv.weight, conv.bias = weight, bias
            setattr(parent, name, nn.Identity())
            folded += 1
    return folded


def float_predictors(model: nn.Module) -> tuple[str, ...]:
    """Module names of the head's final prediction convs, which stay float (`DenseHead`'s
    `float_predictors`, relative to the detector)."""
    return tuple(f"head.{name}" for name in model.head.float_predictors)


def quant_config(float_modules: Iterable[str] = ()) -> dict[str, Any]:
    """The modelopt quantization config of the placement described in the module docstring;
    `float_modules` (the head's predictors) keep no quantizer."""
    int8 = {"num_bits": 8}
    cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for kind, axis in (("input", None), ("weight", 0), ("output", None)):
        cfg.append(
            {
                "quantizer_name": f"*{kind}_quantizer",
                "parent_class": "nn.Conv2d",
                "cfg": {**int8, "axis": axis},
            }
        )
    cfg += [{"quantizer_name": f"{name}.*", "enable": False} for name in float_modules]
    return {"quant_cfg": cfg, "algorithm": "max"}


def insert_fake_quant(model: nn.Module, calib_batches: Iterable[Tensor]) -> nn.Module:
    """Fold BatchNorm, insert the quantizers and calibrate their ranges, in place.

    Args:
        model: a `DenseDetector` with trained weights.
        calib_batches: float32 image batches [B, 3, H, W] on the model's device (training images,
            no augmentation).

    Raises:
        ValueError: no calibration batch was given.
    """
    mtq, _ = require_modelopt()
    fold_batchnorm(model)
    seen = 0

    def forward_loop(module: nn.Module) -> None:
        nonlocal seen
        with torch.no_grad():
            for images in calib_batches:
                module(images)
                seen += len(images)

    was_training = model.training
    model.eval()
    with _quiet_modelopt():
        mtq.quantize(model, quant_config(float_predictors(model)), forward_loop)
    model.train(was_training)
    if seen == 0:
        raise ValueError("qat: no calibration batch was given")
    count = len(placement(model))
    logger.info("qat: %d quantized convolutions calibrated on %d images", count, seen)
    return model


def placement(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The fake quantization of a QAT model: conv module name -> {"input", "weight", "output"}
    ranges (amax: a float per tensor, a list per output channel for the weight)."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        quantizers = [getattr(module, f"{kind}_quantizer", None) for kind in QUANTIZERS]
        if not any(q is not None and q.is_enabled for q in quantizers):
            continue
        out[name] = {
            kind: (q.amax.detach().float().cpu().reshape(-1).tolist() if q.is_enabled else None)
            for kind, q in zip(QUANTIZERS, quantizers)
        }
        for kind in ("input", "output"):
            if out[name][kind] is not None:
                out[name][kind] = out[name][kind][0]
    return out


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` carries modelopt fake quantizers."""
    return any(type(m).__name__ == "TensorQuantizer" for m in model.modules())


def checkpoint_entry(model: nn.Module, init: str) -> dict[str, Any]:
    """The checkpoint's "qat" entry (plain data: loads with `weights_only=True`)."""
    _, mto = require_modelopt()
    return {
        "version": ENTRY_VERSION,
        "init": str(init),
        "batchnorm_folded": True,
        "modelopt_state": copy.deepcopy(mto.modelopt_state(model)),
    }


def restore_fake_quant(model: nn.Module, entry: dict[str, Any], source: str = "checkpoint") -> None:
    """Rebuild the modules of a QAT checkpoint (folded BatchNorm, quantizers) on a freshly built
    detector, before its state dict is loaded.

    Raises:
        ValueError: an entry this version cannot restore (the message names `source`).
    """
    _, mto = require_modelopt()
    if entry.get("version") != ENTRY_VERSION or "modelopt_state" not in entry:
        raise ValueError(
            f"{source}: unknown 'qat' entry (expected version {ENTRY_VERSION} with a "
            "modelopt_state); re-run the QAT fine-tune with this version"
        )
    if entry.get("batchnorm_folded"):
        fold_batchnorm(model)
    with _quiet_modelopt():
        mto.restore_from_modelopt_state(model, entry["modelopt_state"])


def calibration_indices(cfg: Any, dataset: Any) -> list[int]:
    """The first `qat.calib_images` training images that decode (each decoded once here); the
    unreadable ones are skipped and reported (the count, the first few files and reasons), and
    the next images take their place.

    Raises:
        ValueError: fewer readable images than `min(qat.calib_images, MIN_CALIB_IMAGES)`: the
            folder, the reasons and how many were needed.
    """
    from pgd_deploy.data.dataset import Failure
    from pgd_deploy.export.images import MIN_CALIB_IMAGES  # the int8 export's rule, shared

    wanted = min(cfg.qat.calib_images, len(dataset))
    keep: list[int] = []
    skipped: list[Any] = []
    for index in range(len(dataset)):
        if len(keep) >= wanted:
            break
        item = dataset[index]
        if isinstance(item, Failure):
            skipped.append(item)
        else:
            keep.append(index)
    folder = Path(cfg.data.root) / cfg.data.train_images if cfg.data.root else "synthetic shapes"
    first = "; ".join(f"{f.file_name}: {f.reason}" for f in skipped[:3])
    needed = min(cfg.qat.calib_images, MIN_CALIB_IMAGES)
    if len(keep) < needed:
        raise ValueError(
            f"qat calibration ({folder}, data.train_images): only {len(keep)} readable training "
            f"image(s) of {len(dataset)}, {needed} needed (qat.calib_images = "
            f"{cfg.qat.calib_images}); {len(skipped)} unreadable"
            + (f", e.g. {first}" if first else "")
        )
    if skipped:
        logger.warning(
            "qat calibration: skipped %d unreadable training image(s) in %s, e.g. %s",
            len(skipped),
            folder,
            first,
        )
    return keep


def calibration_batches(cfg: Any, device: torch.device) -> Iterator[Tensor]:
    """The first `qat.calib_images` readable training images (`calibration_indices`), without
    augmentation, in batches of `train.batch_size` on `device` (deterministic: every DDP
    process calibrates alike)."""
    from pgd_deploy.data.dataset import build_dataset, collate

    dataset = build_dataset(cfg.data, "train", train=False)
    indices = calibration_indices(cfg, dataset)  # now: a refusal comes before modelopt starts

    def batches() -> Iterator[Tensor]:
        step = max(1, cfg.train.batch_size)
        for start in range(0, len(indices), step):
            items = [dataset[i] for i in indices[start : start + step]]
            batch = collate(items, cfg.data.size_divisible)
            if len(batch):
                yield batch.images.to(device)

    return batches()


def prepare_student(
    model: nn.Module, cfg: Any, device: torch.device, resume: dict[str, Any] | None = None
) -> None:
    """`pgd-train fit` with `qat.init`: load the trained student, then `insert_fake_quant`.

    With `resume`, the "qat" entry of the checkpoint a run resumes from, only the fake
    quantizers are rebuilt from it (`restore_fake_quant`): `qat.init` is not read (it may have
    moved since) nor calibrated on again, since the checkpoint's weights and ranges are loaded
    over the model next.

    Raises:
        ValueError: PGD's student initialisation is on (it would overwrite the trained neck and
            head with the teacher's), or the checkpoint does not fit `model.*` of the recipe.
        CheckpointError: an unreadable `qat.init` (`models.load_detector`).
    """
    from pgd_deploy.models import load_detector

    if resume:
        restore_fake_quant(model, resume, source="the checkpoint resumed from")
        return
    if cfg.distill.teacher and cfg.distill.init_student:
        raise ValueError(
            "qat.init with distill.init_student=true: the QAT student starts from qat.init, "
            "copying the teacher's neck and head would overwrite it; set distill.init_student=false"
        )
    path = Path(cfg.qat.init)
    loaded = load_detector(path, device=device)
    if loaded.checkpoint.get("qat"):
        raise ValueError(f"qat.init {path}: already a QAT checkpoint; start from an fp32 student")
    try:
        model.load_state_dict(loaded.detector.state_dict())
    except RuntimeError as err:
        first = " ".join(str(err).strip().splitlines()[:2])
        raise ValueError(
            f"qat.init {path}: its weights do not fit model.* of this recipe (depth "
            f"{cfg.model.depth}, fpn_channels {cfg.model.fpn_channels}): {first}"
        ) from None
    insert_fake_quant(model, calibration_batches(cfg, device))
