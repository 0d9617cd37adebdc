"""PyTorch -> ONNX for the deploy contract (`DeployModel`), plus simplification and metadata.

The legacy TorchScript exporter (`dynamo=False`) is the default (docs/deployment.md §2): the dynamo
exporter is available behind `exporter="dynamo"` (it needs onnxscript) and, like every export, is
verified numerically by the gates. Opset 17 is pinned, only the batch axis is dynamic, onnxslim
runs when asked (its failure is logged, never fatal) and `onnx.checker` always runs.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgd_deploy.export.deploy_model import (
    BATCH_AXIS,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAMES,
    DeployModel,
    check_imgsz,
    probe_level_sizes,
)
from pgd_deploy.export.manifest import STATUS_UNCHECKED, build_manifest, describe_io, source_info
from pgd_deploy.io_utils import atomic_write_bytes
from pgd_deploy.progress import timed_step
from pgd_deploy.runtime.backends import ONNX_METADATA_KEY
from pgd_deploy.runtime.contract import ONNX_METADATA_FIELDS
from pgd_deploy.runtime.manifest import write_manifest

logger = logging.getLogger(__name__)

MAX_IR_VERSION = 10  # older ONNX Runtime builds (Triton containers) refuse newer IR versions


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'pgd-deploy[export]'") from None
    return onnx


def _export_legacy(wrapper: Any, example: Any, opset: int) -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about constant shapes are by design
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: BATCH_AXIS} for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _export_dynamo(wrapper: Any, example: Any, opset: int) -> bytes:
    import torch

    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError(
            "--exporter dynamo needs onnxscript: pip install onnxscript "
            "(or use the default --exporter legacy)"
        ) from None
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"images": {0: batch}},
        opset_version=opset,
        optimize=True,
    )
    return program.model_proto.SerializeToString()


def export_onnx(
    detector: Any,
    *,
    imgsz: Sequence[int],
    opset: int = OPSET,
    exporter: str = "legacy",
    simplify: bool = True,
    example_batch: int = 1,
) -> Any:
    """Export `DeployModel(detector)` at a fixed (H, W) with a dynamic batch axis.

    Args:
        detector: a `DenseDetector` (its device is kept; the export runs on it).
        imgsz: (H, W) network input, multiples of 32.
        opset: ONNX opset (17 by default; see docs/deployment.md §2).
        exporter: "legacy" (TorchScript, default) or "dynamo".
        simplify: run onnxslim afterwards.
        example_batch: batch of the tracing example (the batch axis stays dynamic).

    Returns:
        the checked `onnx.ModelProto` (float32 in, float32 out).

    Raises:
        ValueError: an invalid size or exporter name.
    """
    import torch

    onnx = _require_onnx()
    h, w = check_imgsz(tuple(imgsz))
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"--exporter: expected 'legacy' or 'dynamo', got {exporter!r}")
    wrapper = DeployModel(detector).eval()
    device = next(detector.parameters()).device
    example = torch.zeros(example_batch, 3, h, w, device=device)
    what = f"exporting the network to ONNX ({exporter} exporter, opset {opset}, {h}x{w})"
    with torch.no_grad(), timed_step(what, logger):
        raw = (_export_legacy if exporter == "legacy" else _export_dynamo)(wrapper, example, opset)
    model = onnx.load_from_string(raw)
    if simplify:
        model = simplify_onnx(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    locations = sum(probe_level_sizes(detector, (h, w)))
    return fix_output_dims(model, num_locations=locations, num_classes=detector.num_classes)


def fix_output_dims(model: Any, *, num_locations: int, num_classes: int) -> Any:
    """Write N (locations) and C (classes) into the outputs: boxes [batch, N, 4], scores
    [batch, N, C], so that only the batch axis is dynamic and a consumer that declares other
    dims (a Triton config) fails at load time. Strict shape inference then checks the graph
    agrees, and `onnx.checker` runs.

    Raises:
        ValueError: the outputs are not the dense contract, or the graph computes other dims.
    """
    import onnx

    names = [o.name for o in model.graph.output]
    if names != list(OUTPUT_NAMES):
        raise ValueError(f"fix_output_dims: expected outputs {list(OUTPUT_NAMES)}, got {names}")
    for output, last in zip(model.graph.output, (4, num_classes)):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = BATCH_AXIS
        for value in (num_locations, last):
            dims.add().dim_value = int(value)
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as err:  # InferenceError / ValidationError: the graph disagrees
        raise ValueError(
            f"the exported graph does not produce boxes [batch, {num_locations}, 4] and scores "
            f"[batch, {num_locations}, {num_classes}]: {err}"
        ) from None
    onnx.checker.check_model(model, full_check=True)
    return model


def simplify_onnx(model: Any) -> Any:
    """onnxslim the model; on any failure log a warning and return the model unchanged."""
    try:
        import onnxslim

        with timed_step("simplifying the graph (onnxslim)", logger):
            slimmed = onnxslim.slim(model)
    except Exception as err:  # onnxslim raises many kinds of errors; never fatal by design
        logger.warning("onnxslim failed, keeping the unsimplified model: %s", err)
        return model
    if slimmed is None:
        logger.warning("onnxslim returned nothing, keeping the unsimplified model")
        return model
    return slimmed


def set_metadata(model: Any, metadata: dict[str, Any]) -> Any:
    """Store the manifest essentials as JSON in `metadata_props[ONNX_METADATA_KEY]`."""
    keep = [p for p in model.metadata_props if p.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key = ONNX_METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True)
    return model


METADATA_KEYS = ONNX_METADATA_FIELDS


def save_onnx(model: Any, path: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write the model atomically (with the manifest essentials in its metadata when given)."""
    if manifest is not None:
        set_metadata(model, {k: manifest[k] for k in METADATA_KEYS if k in manifest})
    return atomic_write_bytes(path, model.SerializeToString())


def export_checkpoint_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    imgsz: Sequence[int] | None = None,
    batch: Sequence[int] = (1, 1, 8),
    simplify: bool = True,
) -> Path:
    """Quick fp32 ONNX export of a checkpoint with its manifest, without running the gates.

    `load_backend(out)` works on the result (the manifest status is "unchecked"). `pgd-export`
    is the gated path; this is for fixtures and quick experiments.

    Args:
        checkpoint: a checkpoint of this project.
        out: the `.onnx` file to write (its manifest goes beside it).
        imgsz: (H, W) fixed input size, multiples of 32 (None: the size the checkpoint was
            trained and evaluated at).
        batch: (min, opt, max) batch range recorded in the manifest.

    Raises:
        CheckpointError: an unreadable checkpoint or weights that do not match its config.
    """
    from pgd_deploy.export.source import load_source

    src = load_source(checkpoint)
    out = Path(out)
    imgsz = check_imgsz(tuple(imgsz or src.config.data.input_size()))
    model = export_onnx(src.detector, imgsz=imgsz, simplify=simplify)
    manifest = onnx_manifest(src, model, imgsz=imgsz, batch=batch, status=STATUS_UNCHECKED)
    save_onnx(model, out, manifest)
    write_manifest(out, manifest)
    return out


def onnx_manifest(
    src: Any,
    model: Any,
    *,
    imgsz: Sequence[int],
    batch: Sequence[int],
    precision: str = "fp32",
    nms: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    status: str = STATUS_UNCHECKED,
    level_sizes: Sequence[int] | None = None,
    postprocess: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of an ONNX model exported from the `SourceModel` `src` (`postprocess`:
    None = the detector's; `extra`: `build_manifest`'s optional keys)."""
    inputs, outputs = describe_io(model)
    if level_sizes is None:
        level_sizes = probe_level_sizes(src.detector, tuple(imgsz))
    return build_manifest(
        fmt="onnx",
        precision=precision,
        imgsz=imgsz,
        batch=batch,
        level_sizes=level_sizes,
        class_names=src.class_names,
        category_ids=src.category_ids,
        postprocess=src.postprocess_kwargs if postprocess is None else postprocess,
        nms=nms or {"mode": "none"},
        inputs=inputs,
        outputs=outputs,
        source=source_info(src.path, src.sha256, src.state),
        recipe=recipe,
        status=status,
        **extra,
    )
