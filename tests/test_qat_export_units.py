"""Fast unit tests of `pgd_deploy.export.qat_export` (with `test_qat_units.py`, the mutation-testing
selection of the QAT modules): the tiny fake-quant network of `test_qat_units`, exported once by
the legacy torch.onnx exporter under a `detector` scope (as `DeployModel` does), and checked in
ONNX Runtime. `test_qat.py` runs the real export pipeline on a trained detector."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_qat_units import QUANTIZED, calib_batches, tiny_detector

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pgd_deploy import qat  # noqa: E402
from pgd_deploy.config import GatesConfig, TrainJob  # noqa: E402
from pgd_deploy.export import qdq  # noqa: E402
from pgd_deploy.export.gates import GateReport, GateResult  # noqa: E402
from pgd_deploy.export.qat_export import (  # noqa: E402
    _probes,
    check_qat_export,
    fp32_reference_path,
    gate_layerwise,
    is_qat,
    layerwise_parity,
    learned_int8,
)
from pgd_deploy.export.source import SourceModel  # noqa: E402

CONV2 = "/detector/conv2/Conv"
# output values per quantized conv of the [2, 3, 16, 16] batch: conv1, conv2, downsample.0, head
SIZES = {"conv1": 2048, "conv2": 1024, "downsample.0": 1024, "head.tower.0": 1024}
FAITHFUL = {"layers": 4, "values": 5120, "mismatched": 0, "worst_layer": "", "worst_fraction": 0.0}


class Scope(torch.nn.Module):
    """The export's naming: node names start with "/detector/" (`qdq.module_name`)."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector(images)


def to_onnx(model: torch.nn.Module):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Scope(model).eval(),
            (calib_batches()[0],),
            buffer,
            input_names=["images"],
            output_names=["out"],
            opset_version=17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def qat_model() -> torch.nn.Module:
    return qat.insert_fake_quant(tiny_detector(), calib_batches())


@pytest.fixture(scope="module")
def exported(qat_model):
    """The Q/DQ graph of `qat_model` (read-only: tests that alter it copy it first)."""
    return to_onnx(qat_model)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return calib_batches()[0].numpy()


def source(state: dict, detector=None) -> SourceModel:
    return SourceModel(
        detector, Path("runs/qat/last.pt"), "ab" * 32, TrainJob(), state, ["a", "b"], [1, 2]
    )


def shifted(model, conv: str = CONV2, by: int = 1):
    """A copy of `model` whose `conv` output DequantizeLinear has zero point `by`: every value
    of that layer is `by` int8 steps off."""
    model = copy.deepcopy(model)
    graph = qdq._Graph(model)
    node = next(n for n in graph.nodes if n.name == conv)
    quant = next(c for c in graph.consumers[node.output[0]] if c.op_type == "QuantizeLinear")
    dequant = graph.consumers[quant.output[0]][0]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(by, np.int8), "zp"))
    dequant.input[2] = "zp"
    return model


def test_is_qat_only_for_a_checkpoint_with_a_qat_entry():
    assert is_qat(source({"qat": {"version": 1, "init": "s.pt"}}))
    assert not is_qat(source({})) and not is_qat(source({"qat": {}}))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_qat_checkpoint_exported_at_another_precision_is_refused(precision):
    message = (
        "runs/qat/last.pt is a quantization-aware (QAT) checkpoint: export it with --precision "
        "int8 (for fp32/fp16, export the student it was fine-tuned from: {})"
    )
    with pytest.raises(ValueError) as err:
        check_qat_export(source({"qat": {"init": "runs/student.pt"}}), precision)
    assert str(err.value) == message.format("runs/student.pt")
    with pytest.raises(ValueError) as err:
        check_qat_export(source({"qat": {"version": 1}}), precision)
    assert str(err.value) == message.format("its qat.init")
    check_qat_export(source({}), precision)  # not QAT: any precision
    check_qat_export(source({"qat": {"init": "s.pt"}}), "int8")


def test_fp32_reference_is_the_recorded_init_unless_overridden(tmp_path):
    student, other = tmp_path / "student.pt", tmp_path / "other.pt"
    student.write_bytes(b"x")
    other.write_bytes(b"x")
    src = source({"qat": {"init": str(student)}})
    assert fp32_reference_path(src) == student
    assert fp32_reference_path(src, str(other)) == other
    missing = tmp_path / "gone.pt"
    for bad, override in ((src, str(missing)), (source({"qat": {"init": str(missing)}}), "")):
        with pytest.raises(ValueError) as err:
            fp32_reference_path(bad, override)
        assert str(err.value) == (
            "runs/qat/last.pt: the agreement and mAP gates of a QAT export compare with the fp32 "
            f"student it was fine-tuned from, {missing}, which is not there; "
            "pass --set export.fp32_reference=PATH"
        )
    with pytest.raises(ValueError, match="export.fp32_reference=PATH$"):
        fp32_reference_path(source({"qat": {"version": 1}}))  # no init recorded


def test_probes_pair_each_quantized_conv_with_its_input_and_dequantized_output(exported):
    def out(scope: str) -> str:
        return f"/detector/{scope}/output_quantizer/DequantizeLinear_output_0"

    assert _probes(exported) == [
        ("/detector/conv1/Conv", "conv1", "images", out("conv1")),
        (CONV2, "conv2", "/detector/relu/Relu_output_0", out("conv2")),
        (
            "/detector/downsample/downsample.0/Conv",
            "downsample.0",
            "/detector/conv2/input_quantizer/Cast_output_0",  # the same ReLU output
            out("downsample/downsample.0"),
        ),
        (
            "/detector/head/tower/tower.0/Conv",
            "head.tower.0",
            "/detector/relu_1/Relu_output_0",
            out("head/tower/tower.0"),
        ),
    ]


def test_layerwise_parity_of_the_faithful_export_finds_no_value_off(qat_model, exported, batch):
    check = layerwise_parity(qat_model, exported, batch, 1e-2)
    assert check == {"passed": True, **FAITHFUL, "max_fraction": 1e-2}
    assert layerwise_parity(qat_model, exported, batch, 0.0)["passed"]


def test_layerwise_parity_reports_a_layer_on_a_shifted_grid_as_entirely_off(
    qat_model, exported, batch
):
    check = layerwise_parity(qat_model, shifted(exported), batch, 0.5)
    assert check == {
        "passed": False,
        "layers": 4,
        "values": 5120,
        "mismatched": SIZES["conv2"],
        "worst_layer": CONV2,
        "worst_fraction": 1.0,
        "max_fraction": 0.5,
    }
    assert layerwise_parity(qat_model, shifted(exported), batch, 1.0)["passed"]


def test_layerwise_parity_catches_a_doubled_output_scale(qat_model, exported, batch):
    bad = copy.deepcopy(exported)
    graph = qdq._Graph(bad)
    conv = next(n for n in graph.nodes if n.name == "/detector/conv1/Conv")
    quant = next(c for c in graph.consumers[conv.output[0]] if c.op_type == "QuantizeLinear")
    doubled = graph.constant(quant.input[1]) * np.float32(2)
    bad.graph.initializer.append(onnx.numpy_helper.from_array(doubled, "doubled"))
    quant.input[1] = graph.consumers[quant.output[0]][0].input[1] = "doubled"
    limit = GatesConfig().qat_layer_mismatch
    check = layerwise_parity(qat_model, bad, batch, limit)
    assert check["worst_layer"] == "/detector/conv1/Conv" and not check["passed"]
    assert check["worst_fraction"] == check["mismatched"] / SIZES["conv1"] > 2 * limit


def test_layerwise_parity_counts_every_value_of_a_conv_without_output_quantizer(
    qat_model, exported, batch
):
    bad = copy.deepcopy(exported)
    graph = qdq._Graph(bad)
    conv = next(n for n in graph.nodes if n.name == CONV2)
    quant = next(c for c in graph.consumers[conv.output[0]] if c.op_type == "QuantizeLinear")
    dequant = graph.consumers[quant.output[0]][0]
    for user in graph.consumers[dequant.output[0]]:
        user.input[:] = [conv.output[0] if i == dequant.output[0] else i for i in user.input]
    qdq.prune(bad)
    assert _probes(bad)[1] == (CONV2, "conv2", "/detector/relu/Relu_output_0", "")
    check = layerwise_parity(qat_model, bad, batch, 0.9)
    assert (check["mismatched"], check["worst_layer"], check["worst_fraction"]) == (
        1024,
        CONV2,
        1.0,
    )


def test_layerwise_parity_without_quantized_convs_does_not_pass(batch):
    model = tiny_detector()
    check = layerwise_parity(model, to_onnx(model), batch, 1e-2)
    assert check == {"passed": False, **FAITHFUL, "values": 0, "layers": 0, "max_fraction": 1e-2}


def gate_report(passed: bool) -> GateReport:
    results = [
        GateResult("parity", passed, "box error 0.2 px", "<= 1 px", {"box": 0.2}),
        GateResult("agreement", True, "0.95", ">= 0.9"),
    ]
    return GateReport("qat.onnx", "int8", 2, "val", results)


def test_gate_layerwise_makes_the_parity_gate_the_layer_by_layer_check(
    qat_model, exported, batch, tmp_path
):
    path = tmp_path / "dense.onnx"
    onnx.save(exported, str(path))
    report = gate_report(False)  # end to end alone would fail: the layers decide
    gate_layerwise(report, qat_model, path, batch, GatesConfig())
    parity, agreement = report.results
    assert parity.passed is True
    assert parity.value == (
        "layer by layer: 0 of 5120 int8 outputs more than half a step off (worst layer 0.0e+00); "
        "end to end: box error 0.2 px"
    )
    assert parity.threshold == "<= 0.01 of each layer (end to end reported)"
    expected = {"passed": True, **FAITHFUL, "max_fraction": 0.01}
    assert parity.detail == {"box": 0.2, "layerwise": expected}
    assert (agreement.passed, agreement.value, agreement.detail) == (True, "0.95", {})


def test_gate_layerwise_fails_an_export_with_wrong_int8_arithmetic(
    qat_model, exported, batch, tmp_path
):
    path = tmp_path / "shifted.onnx"
    onnx.save(shifted(exported), str(path))
    report = gate_report(True)
    gate_layerwise(report, qat_model, path, batch, GatesConfig(qat_layer_mismatch=0.5))
    assert report.results[0].passed is False and not report.passed
    assert report.results[0].value.startswith(
        "layer by layer: 1024 of 5120 int8 outputs more than half a step off (worst layer 1.0e+00)"
    )
    assert report.results[0].threshold == "<= 0.5 of each layer (end to end reported)"
    report = gate_report(True)
    gate_layerwise(report, qat_model, path, batch, GatesConfig(qat_layer_mismatch=1.0))
    assert report.results[0].passed is True


def recipe(target: str, activations: str) -> dict:
    return {
        "precision": "int8",
        "tool": "modelopt fake quantization exported by torch.onnx (QDQ), weights stored as int8",
        "int8_target": target,
        "scales": "learned (quantization-aware training, no recalibration)",
        "qat_checkpoint": "runs/qat/last.pt",
        "qat_checkpoint_sha256": "ab" * 32,
        "qat_init": "runs/student.pt",
        "fp32_reference": "ref/student.pt",
        "activations": activations,
        "weights": "int8 symmetric per-channel",
        "bias": "float32",
        "op_types": ["Conv"],
        "quantized_convs": sorted(QUANTIZED),
        "fp32_reason": "decode tail and head predictor convolutions (never fake-quantized)",
    }


@pytest.mark.parametrize(
    ("target", "activation_zero_point", "activations"),
    [
        ("cpu", np.uint8(128), "uint8 per-tensor, zero point 128 (the learned symmetric grid)"),
        ("tensorrt", np.int8(0), "int8 symmetric per-tensor (zero point 0)"),
    ],
)
def test_learned_int8_keeps_the_learned_scales_with_the_targets_zero_points(
    qat_model, exported, target, activation_zero_point, activations
):
    src = source({"qat": {"init": "runs/student.pt"}}, qat_model)
    model, got = learned_int8(copy.deepcopy(exported), src, target, Path("ref/student.pt"))
    assert got == recipe(target, activations)
    graph = qdq._Graph(model)
    weights = [n for n in graph.nodes if n.op_type == "DequantizeLinear" and graph.is_weight(n)]
    assert len(weights) == 4 and not any(
        n.op_type == "QuantizeLinear" and graph.is_weight(n) for n in graph.nodes
    )
    for node in weights:
        assert graph.constant(node.input[0]).dtype == np.int8  # stored as int8
    activation = [n for n in graph.nodes if n.op_type in qdq._QDQ and not graph.is_weight(n)]
    assert len(activation) == 16  # input and output Q/DQ pairs of 4 convs
    for node in activation:
        zero = graph.constant(node.input[2])
        assert zero.dtype == activation_zero_point.dtype and zero == activation_zero_point
    assert {qdq.module_name(n) for n in qdq.quantized_convs(model)} == set(QUANTIZED)


def test_learned_int8_refuses_an_export_that_quantizes_other_convs(qat_model, exported):
    detector = copy.deepcopy(qat_model)
    for kind in qat.QUANTIZERS:
        getattr(detector.head.tower[0], f"{kind}_quantizer").disable()
    src = source({"qat": {"init": "s.pt"}}, detector)
    with pytest.raises(ValueError, match=r"not fake-quantized: \['head.tower.0'\]"):
        learned_int8(copy.deepcopy(exported), src, "cpu", Path("s.pt"))
    src = source({"qat": {"init": "s.pt"}}, qat_model)
    with pytest.raises(ValueError, match="export.int8_target: expected one of"):
        learned_int8(copy.deepcopy(exported), src, "gpu", Path("s.pt"))
