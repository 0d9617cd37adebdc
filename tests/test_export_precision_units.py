"""Fast unit tests of `export/precision.py` on tiny ONNX graphs built with `onnx.helper`, run in
real ONNX Runtime CPU sessions: the mutation-testing selection of precision.py (the end-to-end
exports of a detector are in test_export_precision.py)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

from pgd_deploy.export import precision  # noqa: E402

oh, nh, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
TAIL = ("Sigmoid_9", "Exp_10", "Mul_11")  # the head's decode tail, named by `name_nodes`
PREDICTORS = ("Conv_7", "Conv_8")
OUTLIER = 20.0  # the largest calibration value, in the first batch only
X = np.array([1.0001, -2.0003, 0.1234567], np.float32)  # none exact in fp16
BAD_METHOD = "export.calib_method: expected one of ('minmax', 'entropy', 'percentile'), got 'kl'"
BAD_TARGET = "export.int8_target: expected one of ('tensorrt', 'cpu'), got 'gpu'"
_Count = type("_Count", (list,), {"update": list.append})  # a progress bar that lists updates


def _model(nodes, inputs, outputs, inits=()):
    """A ModelProto (opset 17); inputs and outputs are (name, elem type, shape)."""
    io = [[oh.make_tensor_value_info(*v) for v in vs] for vs in (inputs, outputs)]
    graph = oh.make_graph(nodes, "g", *io, list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def _head(tiny_weight: bool = False):
    """A dense-contract head, nodes unnamed: stem conv, instance norm `+ beta`, residual add,
    nearest 2x Resize, cls/box predictor convs, decode tail (Sigmoid; Exp `* stride`)."""
    rng = np.random.default_rng(0)
    shapes = [(4, 3, 3, 3), (4,), (1, 4, 1, 1), (4, 4, 1, 1), (2, 4, 1, 1), (4, 4, 1, 1)]
    names = ["w_stem", "b_stem", "beta", "w_mid", "w_cls", "w_box"]
    w = {k: rng.normal(0, 0.3, shape) for k, shape in zip(names, shapes)}
    w |= {"gamma": np.ones(4), "beta0": np.zeros(4), "stride": np.array(8.0)}
    if tiny_weight:
        w["w_mid"][0, 0, 0, 0] = 1e-9  # below fp16's smallest value: clamped by the converter
    inits = [nh.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits.append(nh.from_array(np.array([1, 4, 16, 16], np.int64), "sizes"))
    nodes = [
        oh.make_node("Conv", ["images", "w_stem", "b_stem"], ["c0"], pads=[1, 1, 1, 1]),
        oh.make_node("InstanceNormalization", ["c0", "gamma", "beta0"], ["n0"]),
        oh.make_node("Add", ["n0", "beta"], ["s0"]),
        oh.make_node("Relu", ["s0"], ["a0"]),
        oh.make_node("Conv", ["a0", "w_mid"], ["m0"]),
        oh.make_node("Add", ["a0", "m0"], ["r0"]),
        oh.make_node("Resize", ["r0", "", "", "sizes"], ["u0"], mode="nearest"),
        oh.make_node("Conv", ["u0", "w_cls"], ["k0"]),
        oh.make_node("Conv", ["u0", "w_box"], ["b0"]),
        oh.make_node("Sigmoid", ["k0"], ["scores"]),
        oh.make_node("Exp", ["b0"], ["e0"]),
        oh.make_node("Mul", ["e0", "stride"], ["boxes"]),
    ]
    outputs = [("scores", F32, [1, 2, 16, 16]), ("boxes", F32, [1, 4, 16, 16])]
    return _model(nodes, [("images", F32, [1, 3, 8, 8])], outputs, inits)


def _batches(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(1, 3, 8, 8)).astype(np.float32) for _ in range(n)]
    batches[0][0, 0, 0, 0] = OUTLIER
    return batches


def _run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def _cast_to(node) -> int | None:
    return next(a.i for a in node.attribute if a.name == "to") if node.op_type == "Cast" else None


def _inits(model) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def fp16():
    return precision.convert_fp16(_head())


@pytest.fixture(scope="module")
def int8():
    """(quantized model, recipe) per target: tensorrt per-channel, cpu per-tensor."""
    trt = precision.quantize_int8(_head(), _batches(4), calib_source="coco/train")
    cpu = precision.quantize_int8(_head(), _batches(3), target="cpu", per_channel=False)
    return {"tensorrt": trt, "cpu": cpu}


def test_require_imports_a_module_or_names_the_package_and_extra_to_install():
    assert precision._require("onnx.helper") is oh
    with pytest.raises(ImportError) as err:
        precision._require("pgd_no_such_pkg.float16")
    assert str(err.value) == (
        "precision conversion needs pgd_no_such_pkg: pip install 'pgd-deploy[export]'"
    )
    assert err.value.__suppress_context__  # `from None`: no chained ModuleNotFoundError


def test_name_nodes_names_unnamed_nodes_by_op_and_index_without_clashes():
    nodes = [
        oh.make_node("Relu", ["x"], ["a"]),
        oh.make_node("Relu", ["a"], ["b"]),
        oh.make_node("Neg", ["b"], ["c"], name="Relu_1"),
        oh.make_node("Neg", ["c"], ["y"], name="Relu_1_"),
    ]
    model = _model(nodes, [("x", F32, [2])], [("y", F32, [2])])
    assert precision.name_nodes(model) is model
    assert [n.name for n in model.graph.node] == ["Relu_0", "Relu_1__", "Relu_1", "Relu_1_"]


def test_find_fp32_islands_knows_every_weighted_op_and_follows_every_output():
    """Each weighted op type is a predictor; a Split reaching a weighted layer through its
    second output only, and a Relu reaching one through the Split, are not tail."""
    heads = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    preds = [oh.make_node(op, ["s1", "w"], [f"p{i}"], name=op) for i, op in enumerate(heads)]
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["a"], name="stem"),
        oh.make_node("Relu", ["a"], ["r"], name="act"),
        oh.make_node("Split", ["r"], ["s0", "s1"], name="split", axis=1),
        oh.make_node("Neg", ["s0"], ["aux"], name="side"),
        *preds,
        *(oh.make_node("Sigmoid", [f"p{i}"], [f"y{i}"], name=f"sig{i}") for i in range(4)),
    ]
    outputs = [(n, F32, None) for n in ["aux", "y0", "y1", "y2", "y3"]]
    model = _model(nodes, [("x", F32, None), ("w", F32, None)], outputs)
    tail = ("side", "sig0", "sig1", "sig2", "sig3")
    assert precision.find_fp32_islands(model) == precision.Fp32Islands(tail, tuple(heads))
    islands = precision.find_fp32_islands(precision.name_nodes(_head()))
    assert islands == precision.Fp32Islands(tail=TAIL, predictors=PREDICTORS)


def test_constant_operand_adds_lists_adds_of_an_initializer_or_a_constant_node():
    k = nh.from_array(np.ones(2, np.float32), "k")
    nodes = [
        oh.make_node("Constant", [], ["kc"], name="const", value=k),
        oh.make_node("Add", ["x", "beta"], ["a"], name="plus_beta"),
        oh.make_node("Add", ["a", "x"], ["b"], name="residual"),
        oh.make_node("Add", ["kc", "b"], ["c"], name="plus_const"),
        oh.make_node("Mul", ["c", "beta"], ["y"], name="times_beta"),
    ]
    beta = nh.from_array(np.ones(2, np.float32), "beta")
    model = _model(nodes, [("x", F32, [2])], [("y", F32, [2])], [beta])
    assert precision.constant_operand_adds(model) == ["plus_beta", "plus_const"]
    assert precision.constant_operand_adds(precision.name_nodes(_head())) == ["Add_2"]


def test_convert_fp16_keeps_float32_io_and_halves_weights_but_not_norm_or_tail_constants(fp16):
    """Weights in fp16 but the norm's and the tail's; outputs within fp16 tolerance."""
    model, _ = fp16
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io == dict.fromkeys(["images", "scores", "boxes"], F32)
    assert {i.name: i.data_type for i in model.graph.initializer} == {
        **dict.fromkeys(["w_stem", "b_stem", "beta", "w_mid", "w_cls", "w_box"], F16),
        **dict.fromkeys(["gamma", "beta0", "stride"], F32),  # InstanceNorm, decode tail
        "sizes": TensorProto.INT64,
    }
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    for r, g in zip(_run(_head(), {"images": x}), _run(model, {"images": x})):
        np.testing.assert_allclose(g, r, rtol=1e-2, atol=1e-3)


def test_convert_fp16_records_the_tail_and_casts_to_float32_only_for_norm_tail_and_outputs(fp16):
    """Nearest Resize is off the converter's block list (no Cast around it); the normalisation
    statistics and the decode tail the recipe lists read float32 casts, never an fp16 one."""
    assert fp16[1] == {
        "precision": "fp16",
        "tool": "onnxconverter_common.float16.convert_float_to_float16",
        "keep_io_types": True,
        "fp32_nodes": list(TAIL),
        "fp32_ops": ["InstanceNormalization", "LayerNormalization", "GroupNormalization"],
        "fp32_reason": "decode tail (box decoding, final sigmoids, score product) and "
        "normalisation statistics",
    }
    model, _ = fp16
    producers = _producers(model)
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert producers[resize.input[0]].op_type == "Add"
    assert not [n for n in model.graph.node if resize.output[0] in n.input and _cast_to(n)]
    norm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    assert _cast_to(producers[norm.input[0]]) == F32
    tail = [n for n in model.graph.node if n.name in TAIL]
    assert [n.name for n in tail] == list(TAIL)
    reads = [producers[i] for n in tail for i in n.input if i in producers]
    assert reads and F16 not in [_cast_to(p) for p in reads]  # no fp32 -> fp16 -> fp32 trip
    assert [_cast_to(producers[o]) for o in ("scores", "boxes")] == [F32, F32]


def test_convert_fp16_logs_how_many_weights_were_clamped(caplog):
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        precision.convert_fp16(_head())
        assert caplog.messages == []
        precision.convert_fp16(_head(tiny_weight=True))
    assert caplog.messages == ["fp16: 1 weights clamped to the fp16 range (tiny or huge values)"]


def _cast(src, dst, to, name):
    return oh.make_node("Cast", [src], [dst], to=to, name=name)


def _repaired(nodes, outputs, out_type=F32):
    model = _model(nodes, [("x", F32, [3])], [(o, out_type, [3]) for o in outputs])
    return precision.repair_fp16_casts(model)


def test_repair_follows_chained_round_trips_read_by_several_casts_to_the_source():
    nodes = [
        _cast("x", "h1", F16, "a16"),
        _cast("h1", "f1", F32, "a32"),
        _cast("f1", "h2", F16, "b16"),
        _cast("h2", "f2", F32, "b32"),
        _cast("h2", "f3", F32, "c32"),
        oh.make_node("Neg", ["f2"], ["y1"], name="neg"),
        oh.make_node("Abs", ["f3"], ["y2"], name="abs"),
    ]
    model = _repaired(nodes, ["y1", "y2"])
    assert [(n.name, list(n.input)) for n in model.graph.node] == [("neg", ["x"]), ("abs", ["x"])]
    y1, y2 = _run(model, {"x": X})
    np.testing.assert_array_equal(y1, -X)
    np.testing.assert_array_equal(y2, np.abs(X))


def test_repair_keeps_fp16_casts_whose_value_is_used_in_fp16_or_unread():
    nodes = [
        _cast("x", "h", F16, "to16"),
        oh.make_node("Relu", ["h"], ["r"], name="relu16"),  # an fp16 reader: the cast stays
        _cast("h", "f", F32, "back"),
        _cast("r", "rf", F32, "relu_back"),
        oh.make_node("Add", ["f", "rf"], ["y"], name="add"),
        _cast("x", "unread", F16, "dangling"),
    ]
    before = [(n.name, list(n.input), _cast_to(n)) for n in nodes]
    model = _repaired(nodes, ["y"])
    assert [(n.name, list(n.input), _cast_to(n)) for n in model.graph.node] == before


def test_repair_makes_fp16_casts_to_graph_outputs_float32():
    """keep_io_types: an output cast to fp16 becomes a float32 (no-op) cast and the output is
    declared float32 again; such a cast is kept even when a float32 cast also reads it."""
    nodes = [
        oh.make_node("Sigmoid", ["x"], ["s"], name="sig"),
        _cast("s", "y", F16, "out16"),
        _cast("y", "f", F32, "back"),
        oh.make_node("Neg", ["f"], ["z"], name="neg"),
    ]
    model = _repaired(nodes, ["y", "z"], out_type=F16)
    casts = [("sig", None), ("out16", F32), ("back", F32), ("neg", None)]
    assert [(n.name, _cast_to(n)) for n in model.graph.node] == casts
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [F32, F32]
    y, z = _run(model, {"x": X})
    assert y.dtype == z.dtype == np.float32
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-X.astype(float))), rtol=1e-6)


def test_calibration_providers_prefer_cuda_then_cpu_among_those_installed():
    cuda = [p for p in ["CUDAExecutionProvider"] if p in ort.get_available_providers()]
    assert precision._calibration_providers() == [*cuda, "CPUExecutionProvider"]


def test_reader_yields_each_batch_once_as_contiguous_float32_then_none():
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(3, 8, 8, b)).transpose(3, 0, 1, 2) for b in (2, 1, 3)]
    bar = _Count()
    reader = precision._Reader(iter(batches), bar)
    for batch in batches:
        feed = reader.get_next()
        assert list(feed) == ["images"]
        assert feed["images"].dtype == np.float32 and feed["images"].flags.c_contiguous
        np.testing.assert_array_equal(feed["images"], batch.astype(np.float32))
    assert reader.get_next() is None and reader.get_next() is None
    assert reader.images == 6 and bar == [2, 1, 3]


def test_quantize_int8_refuses_an_unknown_method_or_target_naming_the_field():
    for kwargs, message in [({"method": "kl"}, BAD_METHOD), ({"target": "gpu"}, BAD_TARGET)]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            precision.quantize_int8(None, _batches(1), **kwargs)


def test_quantize_int8_recipes_record_target_weights_and_fp32_nodes(int8):
    trt = int8["tensorrt"][1]
    assert trt == {
        "precision": "int8",
        "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "int8_target": "tensorrt",
        "scales": "calibrated (post-training)",
        "activations": "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel",
        "bias": "float32",
        "op_types": ["Conv", "Add"],
        "calib_method": "minmax",
        "calib_images": 4,
        "calib_source": "coco/train",
        "fp32_nodes": [*TAIL, *PREDICTORS, "Add_2"],
        "fp32_reason": "decode tail and head predictor convolutions, and the Adds of a "
        "constant (normalisation shifts)",
    }
    assert int8["cpu"][1] == {
        **trt,
        "int8_target": "cpu",
        "activations": "uint8 per-tensor",
        "weights": "int8 symmetric per-tensor",
        "op_types": ["Conv"],
        "calib_images": 3,
        "calib_source": "",
        "fp32_nodes": [*TAIL, *PREDICTORS],
        "fp32_reason": "decode tail and head predictor convolutions",
    }


def _qdq(model) -> tuple[set[str], set[str], dict[str, set]]:
    """(quantized activations, dequantized weights, zero-point dtype -> values)."""
    inits = _inits(model)
    acts = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = {n.input[0].removesuffix("_quantized") for n in dq if n.input[0] in inits}
    zps: dict[str, set] = {}
    for n in dq:
        zp, kind = inits[n.input[2]], "w" if n.input[0] in inits else "a"
        zps.setdefault(f"{kind}:{zp.dtype}", set()).update(zp.ravel())
    return acts, weights, zps


@pytest.mark.parametrize(
    "target, activations, dtype, scale_shape",
    [
        ("tensorrt", {"images", "a0", "m0", "r0"}, "int8", (4,)),  # per-channel
        ("cpu", {"images", "c0", "a0", "m0"}, "uint8", ()),  # per-tensor
    ],
)
def test_quantize_int8_places_qdq_by_the_rules_of_its_target(
    int8, target, activations, dtype, scale_shape
):
    """tensorrt: symmetric int8, Q/DQ on conv inputs and on the residual Add of two activations,
    none on conv outputs (they feed the norm) nor on `+ beta`; cpu: uint8 activations with
    calibrated zero points, convs quantized in and out. Predictors and tail stay float, so does
    the bias; weights are symmetric full-range int8. The model runs close to float32."""
    model = int8[target][0]
    acts, weights, zps = _qdq(model)
    inits = _inits(model)
    assert acts == activations and weights == {"w_stem", "w_mid"}
    assert set(zps) == {"w:int8", f"a:{dtype}"} and zps["w:int8"] == {0}
    lo = min(0.0, *(b.min() for b in _batches(3)))  # the cpu model's calibration range
    zero = 0 if target == "tensorrt" else round(255 * -lo / (OUTLIER - lo))  # not 128: asymmetric
    assert int(inits["images_zero_point"]) == zero
    assert inits["w_stem_scale"].shape == scale_shape
    assert np.abs(inits["w_stem_quantized"]).max() == 127  # no reduce_range
    assert next(n for n in model.graph.node if n.name == "Conv_0").input[2] == "b_stem"
    x = _batches(1)[0]
    for r, q in zip(_run(_head(), {"images": x}), _run(model, {"images": x})):
        np.testing.assert_allclose(q, r, atol=0.05 * np.abs(r).max())


@pytest.mark.parametrize("num_batches", [1, 5])
def test_quantize_int8_calibrates_on_every_batch(num_batches):
    """The input's range comes from the first batch's outlier: every batch is read."""
    model, recipe = precision.quantize_int8(_head(), _batches(num_batches))
    assert recipe["calib_images"] == num_batches
    assert float(_inits(model)["images_scale"]) == pytest.approx(OUTLIER / 127, rel=1e-6)


def test_quantize_int8_leaves_its_input_unchanged_so_it_can_be_quantized_again():
    model = _head()
    before = model.SerializeToString()
    precision.quantize_int8(model, _batches(1))
    assert model.SerializeToString() == before
    precision.quantize_int8(model, _batches(1), target="cpu")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_quantize_int8_calibrates_with_the_chosen_onnxruntime_calibrator(method, capfd):
    """(ONNX Runtime's histogram calibrators print the algorithm they run; MinMax prints none.)"""
    _, recipe = precision.quantize_int8(_head(), _batches(2), method=method)
    assert recipe["calib_method"] == method
    assert f"using '{method}' algorithm" in capfd.readouterr().out
    precision.quantize_int8(_head(), _batches(2))
    assert "algorithm" not in capfd.readouterr().out


def test_quantize_int8_without_calibration_images_raises():
    """ONNX Runtime itself refuses ("No data is collected") before precision's own check."""
    with pytest.raises(ValueError):
        precision.quantize_int8(_head(), [])
