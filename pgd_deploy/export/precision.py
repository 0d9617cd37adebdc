"""Strongly typed precision as ONNX-to-ONNX steps that run on the CPU (docs/deployment.md §3).

TensorRT 11 only builds strongly typed networks, so precision lives in the ONNX itself:
- fp16: `onnxconverter_common.float16.convert_float_to_float16` with `keep_io_types=True`
  (float32 in and out) and the "fp32 islands" blocked: the decode tail (box decoding, the final
  sigmoids and the score product; mmdetection#6564, ultralytics#24668) stays in float32.
- int8 (post-training): `onnxruntime.quantization.quantize_static` in QDQ format, per-channel
  symmetric int8 weights, float bias, calibrated on training images, with the rules of the int8
  target (`qdq.py`): `tensorrt` = symmetric int8 activations (zero point 0), the inputs of
  convolutions and of additions of two activations (residual and FPN adds) quantized, nothing
  inside normalisation (`constant_operand_adds`, NVIDIA's Q/DQ placement guidance); `cpu` =
  uint8 activations, Conv quantized
  (inputs and outputs), the U8S8 form ONNX Runtime's x86 kernels run. The decode tail and the
  head's final predictor convolutions (which feed probabilities and box distances) stay float32.
  A quantization-aware checkpoint is not calibrated here: `pipeline` exports its learned scales.
The same strongly typed ONNX goes to TensorRT 10 and 11, and is gated here with ONNX Runtime.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.export.deploy_model import INPUT_NAME
from pgd_deploy.progress import Progress

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT8_OP_TYPES = {  # quantized ops per int8 target (export/README.md has the measurements)
    "tensorrt": ("Conv", "Add"),  # conv inputs and residual/FPN adds (not normalisation shifts)
    "cpu": ("Conv",),  # as fast as Conv+Add in ONNX Runtime, and what QAT can match exactly
}
CALIB_METHODS = ("minmax", "entropy", "percentile")
FP16_FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"precision conversion needs {module.split('.')[0]}: pip install 'pgd-deploy[export]'"
        ) from None


@dataclass(frozen=True)
class Fp32Islands:
    """Nodes kept in float32 by the precision conversions.

    Attributes:
        tail: nodes downstream of the last weighted layers (decode, sigmoid, score product).
        predictors: the last weighted layers themselves (head predictor convolutions).
    """

    tail: tuple[str, ...]
    predictors: tuple[str, ...]


def name_nodes(model: Any) -> Any:
    """Give every unnamed node a unique name (the converters address nodes by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


def find_fp32_islands(model: Any) -> Fp32Islands:
    """The decode tail and the predictor layers of a dense-contract graph.

    The tail is every node from which no weighted layer (Conv, Gemm, MatMul) can be reached, i.e.
    what follows the head's last convolutions; the predictors are the weighted layers that feed
    only the tail. Found from the graph structure, so it holds for any head design.
    """
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    reaches = [False] * len(nodes)  # node i feeds a weighted layer somewhere downstream
    for i in reversed(range(len(nodes))):  # exporters emit nodes in topological order
        reaches[i] = any(
            nodes[k].op_type in WEIGHTED_OPS or reaches[k]
            for out in nodes[i].output
            for k in consumers.get(out, [])
        )
    weighted = [n.op_type in WEIGHTED_OPS for n in nodes]
    tail = [n.name for i, n in enumerate(nodes) if not reaches[i] and not weighted[i]]
    predictors = [n.name for i, n in enumerate(nodes) if not reaches[i] and weighted[i]]
    return Fp32Islands(tuple(tail), tuple(predictors))


def constant_operand_adds(model: Any) -> list[str]:
    """The Add nodes with a constant operand: the shift of a normalisation (GroupNorm's
    `* gamma + beta`, a frozen BatchNorm's affine), not a residual or FPN addition of two
    activations. NVIDIA's Q/DQ placement guidance keeps quantization out of normalisation
    layers, where it blocks their fusion into the convolution before them; the tensorrt target
    quantizes only convolution inputs and additions of two activations."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Add" and any(name in constants for name in node.input)
    ]


def convert_fp16(model: Any) -> tuple[Any, dict[str, Any]]:
    """Mixed fp16 with float32 I/O and the decode tail in float32.

    Returns:
        (the converted ModelProto, the precision recipe for the manifest).
    """
    float16 = _require("onnxconverter_common.float16")
    model = name_nodes(model)
    islands = find_fp32_islands(model)
    # Nearest-neighbour Resize (FPN upsampling) is exact in fp16; blocking it, as the default
    # list does, makes the converter emit a mistyped Cast around it. Normalisation statistics
    # (GroupNorm exports as InstanceNormalization) stay float32, as under PyTorch autocast.
    op_block_list = [
        *(op for op in float16.DEFAULT_OP_BLOCK_LIST if op not in ("Resize", "Upsample")),
        *FP16_FP32_OPS,
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=op_block_list,
            node_block_list=list(islands.tail),
        )
    if caught:
        logger.info("fp16: %d weights clamped to the fp16 range (tiny or huge values)", len(caught))
    converted = repair_fp16_casts(converted)
    recipe = {
        "precision": "fp16",
        "tool": "onnxconverter_common.float16.convert_float_to_float16",
        "keep_io_types": True,
        "fp32_nodes": list(islands.tail),
        "fp32_ops": list(FP16_FP32_OPS),
        "fp32_reason": "decode tail (box decoding, final sigmoids, score product) and "
        "normalisation statistics",
    }
    return converted, recipe


def repair_fp16_casts(model: Any) -> Any:
    """Undo two converter artefacts so the fp32 islands really are float32 end to end.

    onnxconverter-common (1.16) casts the float32 outputs of blocked nodes to fp16 even when the
    next node is blocked too (fp32 -> fp16 -> fp32 round trips inside the decode tail, a 0.25 px
    rounding at 300 px) or is a graph output (despite keep_io_types). Both are removed here.
    """
    onnx = _require("onnx")
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    graph = model.graph
    nodes = list(graph.node)

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for node in nodes:
        if cast_to(node) != fp16 or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if users and all(cast_to(u) == fp32 for u in users):
            dropped.add(id(node))
            for user in users:
                dropped.add(id(user))
                rename[user.output[0]] = node.input[0]
    kept = [n for n in nodes if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
        if cast_to(node) == fp16 and node.output[0] in outputs:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = fp32  # keep float32 outputs (a float32 -> float32 Cast is a no-op)
    for out in graph.output:
        if out.type.tensor_type.elem_type == fp16:
            out.type.tensor_type.elem_type = fp32
    del graph.node[:]
    graph.node.extend(kept)
    onnx.checker.check_model(model)
    return model


def _quantize_static(
    quant: Any,
    onnx: Any,
    model: Any,
    reader: _Reader,
    method: str,
    per_channel: bool,
    excluded: list[str],
    target: str,
) -> Any:
    """ONNX Runtime's static QDQ quantizer with the rules of the int8 `target`."""
    calib_method = {
        "minmax": quant.CalibrationMethod.MinMax,
        "entropy": quant.CalibrationMethod.Entropy,
        "percentile": quant.CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(prefix="pgd_int8_") as tmp:
        out = Path(tmp) / "int8.onnx"
        quant.quantize_static(
            model,
            out,
            calibration_data_reader=reader,
            quant_format=quant.QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OP_TYPES[target]),
            per_channel=per_channel,
            reduce_range=False,
            activation_type=_ACTIVATIONS[target](quant),
            weight_type=quant.QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=calib_method,
            calibration_providers=_calibration_providers(),
            extra_options={
                # TensorRT: zero point 0. cpu: the calibrated uint8 range (same speed as
                # zero point 128, and twice the resolution for the non-negative ReLU outputs)
                "ActivationSymmetric": target == "tensorrt",
                "WeightSymmetric": True,
                "QuantizeBias": False,  # TensorRT keeps bias in float
                # tensorrt: Q/DQ on convolution inputs only, never on their outputs (which
                # feed GroupNorm in the head; NVIDIA's Q/DQ placement guidance)
                "OpTypesToExcludeOutputQuantization": ["Conv"] if target == "tensorrt" else [],
                # No CalibMaxIntermediateOutputs: in onnxruntime 1.32 the MinMax calibrator
                # *drops* the batches collected so far whenever that limit is reached, so a
                # batch count that is a multiple of it fails ("No data is collected") and any
                # other count calibrates on the last few batches only. MinMax keeps only
                # per-batch ReduceMin/ReduceMax scalars, so memory stays small without it.
            },
        )
        return onnx.load(str(out))


_ACTIVATIONS = {
    "tensorrt": lambda quant: quant.QuantType.QInt8,
    "cpu": lambda quant: quant.QuantType.QUInt8,
}
_ACTIVATION_TEXT = {"tensorrt": "int8 symmetric per-tensor", "cpu": "uint8 per-tensor"}


def _calibration_providers() -> list[str]:
    """Calibrate on the GPU when onnxruntime-gpu is installed (512 large images are slow on CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class _Reader:
    """`CalibrationDataReader` over float32 batches [b, 3, H, W] (duck-typed, see quantize)."""

    def __init__(self, batches: Iterable[np.ndarray], progress: Any = None) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self.images = 0
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        self.images += len(batch)
        if self._progress is not None:
            self._progress.update(len(batch))
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_int8(
    model: Any,
    calib_batches: Iterable[np.ndarray],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    calib_source: str = "",
    target: str = "tensorrt",
    calib_total: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Static (post-training) int8 Q/DQ quantization with the rules of an int8 target.

    Args:
        model: the float32 dense-contract ModelProto (left unchanged: `quantize_static` gets a
            fresh copy, as it fails on a ModelProto it has seen before in the same process).
        calib_batches: float32 [b, 3, H, W] letterboxed training images.
        method: "minmax", "entropy" or "percentile" (ORT calibrators).
        per_channel: per-output-channel weight scales (TensorRT supports them on Conv weights).
        calib_source: where the calibration images came from (recorded).
        target: "tensorrt" (symmetric int8, zero point 0) or "cpu" (U8S8), see `qdq.py`.
        calib_total: how many calibration images there are (the progress bar's total).

    Returns:
        (the quantized ModelProto, the precision recipe for the manifest).

    Raises:
        ValueError: an unknown calibration method or target, or no calibration data.
    """
    onnx = _require("onnx")
    quant = _require("onnxruntime.quantization")
    if method not in CALIB_METHODS:
        raise ValueError(f"export.calib_method: expected one of {CALIB_METHODS}, got {method!r}")
    if target not in INT8_OP_TYPES:
        raise ValueError(
            f"export.int8_target: expected one of {tuple(INT8_OP_TYPES)}, got {target!r}"
        )
    model = name_nodes(onnx.shape_inference.infer_shapes(model))
    islands = find_fp32_islands(model)
    excluded = [*islands.tail, *islands.predictors]
    affine = constant_operand_adds(model) if "Add" in INT8_OP_TYPES[target] else []
    excluded += affine  # normalisation shifts (GroupNorm's + beta): no Q/DQ inside them
    batches = iter(calib_batches)
    first = next(batches, None)
    if first is None:  # onnxruntime would fail later with "No data is collected."
        raise ValueError("int8 calibration: no calibration images were given")
    desc = f"int8 calibration ({method}, {target} target)"
    with Progress(calib_total, desc, unit="img") as bar:
        reader = _Reader(itertools.chain([first], batches), bar)
        quantized = _quantize_static(
            quant, onnx, model, reader, method, per_channel, excluded, target
        )
    recipe = {
        "precision": "int8",
        "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "int8_target": target,
        "scales": "calibrated (post-training)",
        "activations": _ACTIVATION_TEXT[target],
        "weights": "int8 symmetric " + ("per-channel" if per_channel else "per-tensor"),
        "bias": "float32",
        "op_types": list(INT8_OP_TYPES[target]),
        "calib_method": method,
        "calib_images": reader.images,
        "calib_source": calib_source,
        "fp32_nodes": excluded,
        "fp32_reason": "decode tail and head predictor convolutions"
        + (", and the Adds of a constant (normalisation shifts)" if affine else ""),
    }
    return quantized, recipe
