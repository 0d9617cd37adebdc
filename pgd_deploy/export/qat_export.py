"""Export of a quantization-aware (QAT) checkpoint: its learned scales, no recalibration.

The checkpoint's detector carries modelopt fake quantizers (`pgd_deploy.qat`), which the legacy
`torch.onnx` exporter writes as QuantizeLinear/DequantizeLinear pairs with zero point 0 and scale
amax / 127: the tensorrt target as is. This module then stores the weights as int8, checks that
the quantized convolutions and their scales are exactly the fake quantization's
(`qdq.check_placement`), and for the cpu target moves the activations to uint8 with zero point
128, which dequantizes to the same values (`qdq.symmetric_to_uint8`).

The gates compare the artifact with the fake-quant model (tensor parity) and with the fp32
student the fine-tune started from (`qat.init`, or `export.fp32_reference`): agreement and mAP.

Tensor parity is checked layer by layer (`layerwise_parity`). End to end, the int8 artifact and
the fake-quant model cannot be compared elementwise: ONNX Runtime and PyTorch sum a convolution in
different orders, so a value within ~1e-6 of a rounding boundary lands one int8 step apart (a few
per million), and every later quantized layer turns that step into more steps. Measured on the
trained R18 test model (64 px): mean box error 0.18 px end to end, as large as the quantization
error itself (0.38 px against fp32), while a planted uint8 zero point of 127 instead of 128 moves
it only to 0.18 px. Layer by layer, on the artifact's own input to each quantized convolution, the
fake quant and the graph agree on all but 1e-5 of the int8 outputs (ties), while that zero point,
a doubled scale or a missing output quantizer puts a large part of a layer a step or more away.
Ties concentrate in layers whose sums cancel: on the demo's QAT student (128 px) one 1x1 conv of
1024 inputs had 6.6e-4 to 2.0e-3 of its outputs a step off, depending on the gate images, while a
zero point of 0 put 88% of a layer off and a doubled scale 50%. So the gate requires at most
`gates.qat_layer_mismatch` (1e-2) of each layer's outputs to differ by more than half a step, and
reports the end-to-end error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pgd_deploy.export import qdq

logger = logging.getLogger(__name__)


def is_qat(src: Any) -> bool:
    """Whether the export source is a QAT checkpoint."""
    return bool(src.state.get("qat"))


def check_qat_export(src: Any, precision: str) -> None:
    """Raises ValueError unless a QAT checkpoint is exported as int8."""
    if is_qat(src) and precision != "int8":
        raise ValueError(
            f"{src.path} is a quantization-aware (QAT) checkpoint: export it with --precision int8 "
            f"(for fp32/fp16, export the student it was fine-tuned from: "
            f"{src.state['qat'].get('init') or 'its qat.init'})"
        )


def fp32_reference_path(src: Any, override: str = "") -> Path:
    """The fp32 student the gates compare a QAT export with.

    Raises:
        ValueError: the file is missing (the message names `export.fp32_reference`).
    """
    recorded = override or src.state["qat"].get("init") or ""
    path = Path(recorded)
    if not recorded or not path.is_file():
        raise ValueError(
            f"{src.path}: the agreement and mAP gates of a QAT export compare with the fp32 "
            f"student it was fine-tuned from, {recorded or '(not recorded)'}, which is not "
            "there; pass --set export.fp32_reference=PATH"
        )
    return path


def fp32_reference(
    src: Any, override: str, device: Any, imgsz: tuple[int, int], postprocess: dict[str, Any]
) -> Any:
    """The fp32 student as a `TorchBackend` (same classes as the QAT checkpoint), with the
    artifact's post-processing.

    Raises:
        ValueError: missing, or trained on other categories.
    """
    from pgd_deploy.runtime.torch_backend import TorchBackend

    path = fp32_reference_path(src, override)
    backend = TorchBackend(path, device=str(device), input_size=imgsz, postprocess=postprocess)
    if list(backend.category_ids) != list(src.category_ids):
        raise ValueError(
            f"export.fp32_reference {path}: categories {backend.category_ids} differ from the QAT "
            f"checkpoint's {src.category_ids}"
        )
    return backend


def learned_int8(dense: Any, src: Any, target: str, reference: Path) -> tuple[Any, dict[str, Any]]:
    """The int8 artifact of a QAT checkpoint for `target` ("cpu" or "tensorrt").

    Args:
        dense: the dense-contract ONNX exported from the fake-quant detector.
        src: the `SourceModel` of the QAT checkpoint.
        target: the int8 target.
        reference: the fp32 student the gates compare with (recorded).

    Returns:
        (the Q/DQ ModelProto, the precision recipe for the manifest).

    Raises:
        ValueError: the export does not quantize what the fake quantization did.
    """
    import onnx

    from pgd_deploy.qat import placement

    learned = placement(src.detector)
    model = qdq.fold_weight_quantization(dense)
    qdq.check_placement(model, learned)
    if target == "cpu":
        model = qdq.symmetric_to_uint8(model)
    qdq.check_int8_target(model, target)
    onnx.checker.check_model(model)
    activations = {
        "cpu": "uint8 per-tensor, zero point 128 (the learned symmetric grid)",
        "tensorrt": "int8 symmetric per-tensor (zero point 0)",
    }[target]
    recipe = {
        "precision": "int8",
        "tool": "modelopt fake quantization exported by torch.onnx (QDQ), weights stored as int8",
        "int8_target": target,
        "scales": "learned (quantization-aware training, no recalibration)",
        "qat_checkpoint": str(src.path),
        "qat_checkpoint_sha256": src.sha256,
        "qat_init": src.state["qat"].get("init"),
        "fp32_reference": str(reference),
        "activations": activations,
        "weights": "int8 symmetric per-channel",
        "bias": "float32",
        "op_types": ["Conv"],
        "quantized_convs": sorted(learned),
        "fp32_reason": "decode tail and head predictor convolutions (never fake-quantized)",
    }
    logger.info("QAT export: %d convolutions with learned scales (%s target)", len(learned), target)
    return model, recipe


def _probes(model: Any) -> list[tuple[str, str, str, str]]:
    """(conv node, its module, the tensor its input quantizer reads, its output after Q/DQ) of
    every quantized convolution of a QAT export."""
    graph = qdq._Graph(model)
    probes = []
    for node in graph.nodes:
        dequant = graph.qdq_before(node.input[0]) if node.op_type == "Conv" else None
        quant = graph.producer.get(dequant.input[0]) if dequant is not None else None
        if quant is None or quant.op_type != "QuantizeLinear":
            continue
        after = [
            c for c in graph.consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"
        ]
        out = graph.consumers.get(after[0].output[0], []) if after else []
        out_name = out[0].output[0] if out and out[0].op_type == "DequantizeLinear" else ""
        probes.append((node.name, qdq.module_name(node.name), quant.input[0], out_name))
    return probes


def layerwise_parity(detector: Any, model: Any, batch: Any, max_fraction: float) -> dict[str, Any]:
    """Run every quantized convolution of the fake-quant `detector` on the exact input the ONNX
    graph gave it, and count the int8 outputs more than half a step apart (module docstring).

    The graph runs in ONNX Runtime without graph optimisations, with its intermediate tensors as
    extra outputs: this checks what the Q/DQ graph computes; the optimised artifact is what the
    end-to-end parity, agreement and mAP gates run.

    Returns:
        {"passed", "values", "mismatched", "worst_layer", "worst_fraction", "max_fraction"}.
    """
    import copy

    import onnx
    import onnxruntime as ort
    import torch

    probes = _probes(model)
    probe_model = copy.deepcopy(model)
    names = sorted({n for _, _, a, b in probes for n in (a, b) if n} - {"images"})
    probe_model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    values = dict(zip(names, session.run(names, {"images": batch})))
    values["images"] = batch
    device = next(detector.parameters()).device
    total, mismatched, worst = 0, 0, ("", 0.0)
    for node, module_name, source, output in probes:
        conv = detector.get_submodule(module_name)
        with torch.no_grad():
            expected = conv(torch.from_numpy(values[source]).to(device)).cpu().numpy()
        step = float(conv.output_quantizer.amax) / 127
        off = (
            expected.size if not output else int((abs(expected - values[output]) > step / 2).sum())
        )
        total += expected.size
        mismatched += off
        if off / expected.size > worst[1]:
            worst = (node, off / expected.size)
    return {
        "passed": bool(probes) and worst[1] <= max_fraction,
        "layers": len(probes),
        "values": total,
        "mismatched": mismatched,
        "worst_layer": worst[0],
        "worst_fraction": worst[1],
        "max_fraction": max_fraction,
    }


def gate_layerwise(report: Any, detector: Any, onnx_path: Path, batch: Any, gates: Any) -> None:
    """Make the parity gate of a QAT export's report the layer-by-layer check (in place); the
    end-to-end errors `run_gates` measured against the fake-quant model stay in its text."""
    import onnx

    result = report.results[0]
    check = layerwise_parity(detector, onnx.load(str(onnx_path)), batch, gates.qat_layer_mismatch)
    result.passed = check["passed"]
    result.value = (
        f"layer by layer: {check['mismatched']} of {check['values']} int8 outputs more than half "
        f"a step off (worst layer {check['worst_fraction']:.1e}); end to end: {result.value}"
    )
    result.threshold = f"<= {check['max_fraction']:g} of each layer (end to end reported)"
    result.detail["layerwise"] = check
