"""The Q/DQ graph rules of `export/qdq.py` on hand-built ONNX graphs (fast: no model, no export).

Numerics run in ONNX Runtime on the CPU with graph optimisations off, so a graph computes its
Q/DQ nodes as written. This file is also the test selection for mutation testing of qdq.py.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pgd_deploy.export import qdq  # noqa: E402

F32, ZERO = np.float32, np.int8(0)
CONV1 = "/detector/backbone/conv1/Conv"
S_IN, S_OUT = F32(2.54) / F32(127), F32(6.35) / F32(127)
W_AMAX = [0.5, 1.27, 0.0]  # the last channel's range is 0: scale 1
S_W = np.array([F32(0.5) / F32(127), F32(1.27) / F32(127), 1], F32)
# per output channel: w / scale = 50.8, -177.8 | ~30, 150 | 2.5, -3.5 (ties round to even)
W = np.array([[0.2, -0.7], [0.3, 1.5], [2.5, -3.5]], F32).reshape(3, 2, 1, 1)
W_INT8 = np.array([[51, -128], [30, 127], [2, -4]], np.int8).reshape(3, 2, 1, 1)
Z_W, BIAS = np.zeros(3, np.int8), np.array([0.1, -0.2, 0.3], F32)
X = (np.random.default_rng(0).standard_normal((1, 2, 3, 3)) * 2).astype(F32)  # some saturate
ACT, WEIGHT = ("b_q_in", "b_dq_in", "b_q_out", "b_dq_out"), ("b_q_w", "b_dq_w")
LEARNED = {"input": 2.54, "weight": W_AMAX, "output": 6.35}
PLACEMENT = {"backbone.conv1": LEARNED}


def _node(op, inputs, outputs, name, **attrs):
    return helper.make_node(op, inputs, outputs, name=name, **attrs)


def _inits(values: dict, tag: str = "") -> list:
    return [numpy_helper.from_array(np.asarray(v), f"{tag}{k}") for k, v in values.items()]


def _block(tag, src, name, act_zero=ZERO, out_q=True, out_scale=S_OUT):
    """src -> Q/DQ -> Conv (float weight -> Q/DQ per output channel) -> Q/DQ -> `{tag}_y`."""
    t = lambda s: f"{tag}_{s}"
    conv_out = t("c") if out_q else t("y")
    nodes = [
        _node("QuantizeLinear", [src, t("s_in"), t("z_in")], [t("xq")], t("q_in")),
        _node("DequantizeLinear", [t("xq"), t("s_in"), t("z_in")], [t("xd")], t("dq_in")),
        _node("QuantizeLinear", [t("w"), t("s_w"), t("z_w")], [t("wq")], t("q_w"), axis=0),
        _node("DequantizeLinear", [t("wq"), t("s_w"), t("z_w")], [t("wd")], t("dq_w"), axis=0),
        _node("Conv", [t("xd"), t("wd"), t("b")], [conv_out], name),
    ]
    values = {"s_in": S_IN, "z_in": act_zero, "w": W, "s_w": S_W, "z_w": Z_W, "b": BIAS}
    if out_q:
        nodes += [
            _node("QuantizeLinear", [conv_out, t("s_out"), t("z_out")], [t("cq")], t("q_out")),
            _node("DequantizeLinear", [t("cq"), t("s_out"), t("z_out")], [t("y")], t("dq_out")),
        ]
        values |= {"s_out": out_scale, "z_out": ZERO}
    return nodes, _inits(values, f"{tag}_")


def _model(nodes, inits, outputs=("b_y",), x_shape=(1, 2, 3, 3), value_info=(), y_shape=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    ys = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape) for o in outputs]
    graph = helper.make_graph(nodes, "qdq", [x], ys, inits, value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _conv_model(**kwargs):
    return _model(*_block("b", "x", CONV1, **kwargs))


def _run(model, x=X):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _by_name(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _initializer(model, name):
    found = [i for i in model.graph.initializer if i.name == name]
    return numpy_helper.to_array(found[0]) if found else None


def test_graph_constant_resolves_initializers_constants_identity_and_cast():
    nodes = [
        _node("Constant", [], ["k"], "const", value=numpy_helper.from_array(np.array([4.0], F32))),
        _node("Identity", ["w"], ["w_id"], "id"),
        _node("Cast", ["w"], ["w_half"], "cast", to=TensorProto.FLOAT16, saturate=1),
        _node("Identity", ["x"], ["x_id"], "id_x"),
        _node("Cast", ["x"], ["x_half"], "cast_x", to=TensorProto.FLOAT16),
        _node("Relu", ["w"], ["w_relu"], "relu"),
    ]
    graph = qdq._Graph(_model(nodes, _inits({"w": np.array([1.5, -2.0], F32)}), ["w_relu"]))
    assert graph.constant("w").tolist() == [1.5, -2.0] and graph.constant("k").tolist() == [4.0]
    assert graph.constant("w_id").dtype == np.float32 and graph.constant("w_id").tolist() == [
        1.5,
        -2,
    ]
    half = graph.constant("w_half")
    assert half.dtype == np.float16 and half.tolist() == [1.5, -2.0]
    for computed in ("x", "x_id", "x_half", "w_relu", "missing"):
        assert graph.constant(computed) is None, computed


def test_graph_is_weight_follows_a_dequantize_back_to_a_quantized_constant():
    """A weight: a Q/DQ of a constant, or a DQ of a QuantizeLinear of one; only through a Q."""
    nodes, inits = _block("b", "x", CONV1)
    nodes += [
        _node("Relu", ["b_w"], ["w_relu"], "relu"),
        _node("DequantizeLinear", ["w_relu", "b_s_in", "b_z_in"], ["r"], "dq_relu"),
        _node("DequantizeLinear", ["b_z_w", "b_s_w", "b_z_w"], ["i8"], "dq_int8", axis=0),
    ]
    model = _model(nodes, inits, ["b_y", "r", "i8"])
    graph = qdq._Graph(model)
    weights = {n.name for n in graph.nodes if n.op_type in qdq._QDQ and graph.is_weight(n)}
    assert weights == {"b_q_w", "b_dq_w", "dq_int8"}
    assert graph.qdq_before("b_xd") is _by_name(model, "b_dq_in")
    assert graph.qdq_before("b_wd") is _by_name(model, "b_dq_w")
    for name in ("b_xq", "x", "b_c"):  # a Q output, a graph input, a Conv output
        assert graph.qdq_before(name) is None, name


def test_zero_points_maps_each_qdq_node_to_its_zero_point_and_skips_those_without_one():
    nodes, inits = _block("b", "x", CONV1)
    nodes += [
        _node("QuantizeLinear", ["b_y", "b_s_out", "b_z_out"], ["unnamed_q"], ""),
        _node("QuantizeLinear", ["b_y", "b_s_out"], ["default_zero"], "no_zero"),
    ]
    zeros = qdq.zero_points(_model(nodes, inits, ["unnamed_q", "default_zero"]))
    assert set(zeros) == {*ACT, *WEIGHT, "unnamed_q"}
    assert zeros["b_q_w"].shape == (3,) and zeros["b_q_in"].shape == ()
    assert all(z.dtype == np.int8 and not z.any() for z in zeros.values())


def test_quantized_convs_reads_the_input_weight_and_output_scales():
    model = _conv_model()
    model.graph.node.insert(5, _node("Relu", ["b_c"], ["side"], "relu"))  # read before the Q
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    convs = qdq.quantized_convs(model)
    assert convs == {CONV1: {"input": float(S_IN), "weight": S_W.tolist(), "output": float(S_OUT)}}
    assert isinstance(convs[CONV1]["input"], float) and isinstance(convs[CONV1]["weight"], list)


def test_quantized_convs_skips_convs_without_dequantized_input_or_weight():
    nodes, inits = _block("b", "x", CONV1, out_q=False)
    nodes[2].attribute.pop()  # per-tensor weight scale: a scalar in a list
    nodes[3].attribute.pop()
    inits = [i for i in inits if i.name not in ("b_s_w", "b_z_w")]
    inits += _inits({"b_s_w": F32(0.5), "b_z_w": np.int8(0)})
    nodes += [
        _node("Conv", ["x", "b_wd"], ["float_in"], "/detector/float_input/Conv"),
        _node("Conv", ["b_xd", "b_w"], ["float_w"], "/detector/float_weight/Conv"),
        _node("Add", ["b_xd", "b_xd"], ["add"], "/detector/add/Add"),
    ]
    convs = qdq.quantized_convs(_model(nodes, inits, ["b_y", "float_in", "float_w", "add"]))
    assert convs == {CONV1: {"input": float(S_IN), "weight": [0.5], "output": None}}


@pytest.mark.parametrize(
    ("node", "module"),
    [
        ("/detector/backbone/body/layer1/layer1.0/conv1/Conv", "backbone.body.layer1.0.conv1"),
        ("/detector/head/towers/cls_tower.0/cls_tower.0.0_2/Conv", "head.towers.cls_tower.0.0"),
        ("/detector/head/towers/cls_tower.0_1/cls_tower.0.0_12/Conv", "head.towers.cls_tower.0.0"),
        ("/detector/head/cls_logits/Conv_3", "head.cls_logits"),
        ("/detector/body/layer1/layer10/Conv", "body.layer1.layer10"),  # not a child: no "."
        ("/detector/backbone/conv_1x1/Conv", "backbone.conv_1x1"),  # "_1x1" is not a call number
        ("/detector/Conv", ""),
    ],
)
def test_module_name_turns_a_legacy_node_name_into_the_module_path(node, module):
    assert qdq.module_name(node) == module


def test_module_name_strips_the_given_prefix_and_defaults_to_the_detector():
    assert qdq.module_name("/student/backbone/conv1/Conv", prefix="/student/") == "backbone.conv1"
    assert qdq.module_name("/detector/backbone/conv1/Conv", prefix="/") == "detector.backbone.conv1"


def test_scale_is_amax_over_127_in_float32_and_1_for_a_zero_range():
    assert qdq._scale(None) is None
    assert qdq._scale(2.54) == float(S_IN) != 2.54 / 127  # float32 arithmetic, not float64
    assert qdq._scale(1.0) == float(F32(1) / F32(127))
    assert qdq._scale(0.0) == 1.0
    assert qdq._scale(W_AMAX) == S_W.tolist()


def _two_calls(out_scale=S_OUT):
    """One conv module called twice (a head tower on two levels), plus backbone.conv1."""
    tower = "/detector/head/towers/cls_tower.0/cls_tower.0.0"
    parts = [
        _block("b", "x", CONV1),
        _block("t0", "x", f"{tower}/Conv"),
        _block("t1", "x", f"{tower}_1/Conv", out_scale=out_scale),
    ]
    nodes = [n for p in parts for n in p[0]]
    return _model(nodes, [i for p in parts for i in p[1]], ["b_y", "t0_y", "t1_y"])


TWO_CALLS = PLACEMENT | {"head.towers.cls_tower.0.0": LEARNED}


def test_check_placement_accepts_the_learned_scales_on_every_call():
    qdq.check_placement(_two_calls(), TWO_CALLS)
    qdq.check_placement(_conv_model(out_q=False), {"backbone.conv1": LEARNED | {"output": None}})


def test_check_placement_names_the_convolutions_missing_and_extra():
    message = "(not exported: ['backbone.conv2']; not fake-quantized: ['backbone.conv1'])"
    with pytest.raises(ValueError, match=re.escape(message)):
        qdq.check_placement(_conv_model(), {"backbone.conv2": LEARNED})


def test_check_placement_names_a_call_whose_scale_differs():
    """The second call of the tower has another output scale: every call is checked."""
    with pytest.raises(ValueError, match=r"QAT export: head\.towers\.cls_tower\.0\.0 has scales"):
        qdq.check_placement(_two_calls(out_scale=F32(1.0)), TWO_CALLS)


@pytest.mark.parametrize(
    ("kind", "amax"), [("input", 2.55), ("weight", [0.5, 1.27, 1.0]), ("output", None)]
)
def test_check_placement_rejects_a_scale_the_training_did_not_learn(kind, amax):
    with pytest.raises(ValueError, match=r"backbone\.conv1 has scales .*, learned "):
        qdq.check_placement(_conv_model(), {"backbone.conv1": LEARNED | {kind: amax}})


def test_fold_stores_int8_weights_rounded_half_to_even_and_saturated():
    model, before = _conv_model(), _run(_conv_model())
    assert qdq.fold_weight_quantization(model) is model
    names = [n.name for n in model.graph.node]
    assert names == ["b_q_in", "b_dq_in", "b_dq_w", CONV1, "b_q_out", "b_dq_out"]
    assert _by_name(model, "b_dq_w").input == ["b_w_quantized_0", "b_s_w", "b_z_w"]
    folded = _initializer(model, "b_w_quantized_0")
    assert folded.dtype == np.int8 and folded.tolist() == W_INT8.tolist()
    assert _initializer(model, "b_w") is None  # the float weight is gone
    np.testing.assert_allclose(_run(model)[0], before[0], rtol=0, atol=1e-6)


def test_fold_stores_a_shared_weight_once_and_reads_weights_through_identity():
    """Two calls quantize `w` with the same inputs; `w2` arrives through an Identity."""
    nodes, inits = _block("b", "x", CONV1)
    nodes += [
        _node("QuantizeLinear", ["b_w", "b_s_w", "b_z_w"], ["wq2"], "q_w2", axis=0),
        _node("DequantizeLinear", ["wq2", "b_s_w", "b_z_w"], ["wd2"], "dq_w2", axis=0),
        _node("Conv", ["b_xd", "wd2"], ["y2"], "/detector/conv2/Conv"),
        _node("Identity", ["w2"], ["w2_id"], "identity"),
        _node("QuantizeLinear", ["w2_id", "b_s_w", "b_z_w"], ["wq3"], "q_w3", axis=0),
        _node("DequantizeLinear", ["wq3", "b_s_w", "b_z_w"], ["wd3"], "dq_w3", axis=0),
        _node("Conv", ["b_xd", "wd3"], ["y3"], "/detector/conv3/Conv"),
    ]
    model = _model(nodes, inits + _inits({"w2": -W}), ["b_y", "y2", "y3"])
    before = _run(model)
    qdq.fold_weight_quantization(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and "Identity" not in ops  # the activations' Qs
    assert _by_name(model, "dq_w2").input[0] == _by_name(model, "b_dq_w").input[0]
    assert _by_name(model, "dq_w3").input[0] == "w2_id_quantized_1"
    names = {i.name for i in model.graph.initializer}
    assert {"b_w_quantized_0", "w2_id_quantized_1"} <= names and not {"b_w", "w2"} & names
    assert _initializer(model, "w2_id_quantized_1")[:, 1, 0, 0].tolist() == [127, -128, 4]
    for got, expected in zip(_run(model), before):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_fold_uses_the_default_axis_and_the_zero_point_and_leaves_1d_constants():
    """A MatMul weight (2-D) with no axis attribute is per column (ONNX default axis 1) on a
    uint8 grid with zero point 128; a 1-D constant (a bias) keeps its QuantizeLinear."""
    scale = np.array([0.01, 0.02, 0.05, 0.1], F32)
    weight = np.array([[0.5, 0.5, 0.5, 0.5], [-2.0, 1.0, -9.0, 30.0], [0.0, 0.0, 0.0, 0.0]], F32)
    nodes = [
        _node("QuantizeLinear", ["w", "s", "z"], ["wq"], "q_w"),
        _node("DequantizeLinear", ["wq", "s", "z"], ["wd"], "dq_w"),
        _node("MatMul", ["x", "wd"], ["m"], "matmul"),
        _node("QuantizeLinear", ["bias", "sb", "zb"], ["bq"], "q_b"),
        _node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], "dq_b"),
        _node("Add", ["m", "bd"], ["y"], "add"),
    ]
    values = {"w": weight, "s": scale, "z": np.full(4, 128, np.uint8)}
    values |= {"bias": np.array([0.1, -0.2, 0.3, 0.4], F32), "sb": F32(0.01), "zb": np.uint8(128)}
    model = _model(nodes, _inits(values), ["y"], x_shape=(2, 3))
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(F32)
    before = _run(model, x)
    qdq.fold_weight_quantization(model)
    assert [n.name for n in model.graph.node] == ["dq_w", "matmul", "q_b", "dq_b", "add"]
    folded = _initializer(model, "w_quantized_0")
    assert folded.dtype == np.uint8
    np.testing.assert_array_equal(folded, [[178, 153, 138, 133], [0, 178, 0, 255], [128] * 4])
    np.testing.assert_allclose(_run(model, x)[0], before[0], rtol=0, atol=1e-6)


def test_symmetric_to_uint8_moves_activations_to_zero_point_128_and_keeps_the_output():
    info = [("b_xq", TensorProto.INT8), ("b_xd", TensorProto.FLOAT), ("b_cq", TensorProto.INT8)]
    info = [helper.make_tensor_value_info(n, t, None) for n, t in info]
    model = _model(*_block("b", "x", CONV1), value_info=info)
    before = _run(model)
    assert qdq.symmetric_to_uint8(model) is model
    name = "uint8_zero_point_128"
    zero = _initializer(model, name)
    assert zero.dtype == np.uint8 and zero.shape == () and int(zero) == 128
    for node in ACT:  # activations: same scales
        assert _by_name(model, node).input[2] == name, node
    assert _by_name(model, "b_q_in").input[1] == "b_s_in"
    for node in WEIGHT:  # the weight stays int8 with zero point 0
        assert _by_name(model, node).input[2] == "b_z_w", node
    names = {i.name for i in model.graph.initializer}
    assert "b_z_w" in names and not {"b_z_in", "b_z_out"} & names  # pruned
    assert [v.name for v in model.graph.value_info] == ["b_xd"]  # the uint8 tensors: recomputed
    np.testing.assert_allclose(_run(model)[0], before[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero", [np.int8(3), np.int8(-1), np.uint8(0), np.uint8(128)])
def test_symmetric_to_uint8_rejects_an_activation_that_is_not_symmetric_int8(zero):
    message = "b_q_in: expected a symmetric int8 activation (zero point 0), got "
    with pytest.raises(ValueError, match=re.escape(message)):
        qdq.symmetric_to_uint8(_conv_model(act_zero=zero))


def test_the_qat_pipeline_folds_checks_and_converts_a_graph_to_each_target():
    """What `qat_export.learned_int8` does: fold, check the placement, (cpu) convert, check."""
    model = qdq.fold_weight_quantization(_model(*_block("b", "x", CONV1), y_shape=[1, 3, 3, 3]))
    qdq.check_placement(model, PLACEMENT)
    qdq.check_int8_target(model, "tensorrt")
    trt = copy.deepcopy(model)
    cpu = qdq.symmetric_to_uint8(model)
    qdq.check_int8_target(cpu, "cpu")
    onnx.checker.check_model(cpu)
    zeros = qdq.zero_points(cpu)
    assert {k for k, z in zeros.items() if z.dtype == np.uint8 and int(z) == 128} == set(ACT)
    assert zeros["b_dq_w"].dtype == np.int8 and not zeros["b_dq_w"].any()
    np.testing.assert_allclose(_run(cpu)[0], _run(trt)[0], rtol=0, atol=1e-6)


def test_check_int8_target_rejects_an_unknown_target():
    message = "export.int8_target: expected one of ('cpu', 'tensorrt'), got 'gpu'"
    with pytest.raises(ValueError, match=re.escape(message)):
        qdq.check_int8_target(_conv_model(), "gpu")


def _set(model, name, value):
    """`model` with initializer `name` replaced by `value`."""
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(np.asarray(value), name))
    return model


def _cpu_model():
    return qdq.symmetric_to_uint8(qdq.fold_weight_quantization(_conv_model()))


TRT, CPU = "the tensorrt int8 target needs", "the cpu int8 target needs"


@pytest.mark.parametrize(
    ("target", "build", "message"),
    [
        ("tensorrt", _cpu_model, f"b_q_in: {TRT} int8 zero point 0, got array(128, dtype=uint8)"),
        ("cpu", _conv_model, f"b_q_in: {CPU} uint8 activations, got array(0, dtype=int8)"),
        ("tensorrt", lambda: _conv_model(act_zero=np.int8(2)), f"b_q_in: {TRT} int8 zero point"),
        ("tensorrt", lambda: _set(_conv_model(), "b_z_out", np.int8(-1)), f"b_q_out: {TRT} int8"),
        ("cpu", lambda: _set(_cpu_model(), "b_z_w", np.int8([0, 1, 0])), f"b_dq_w: {CPU} int8"),
        ("cpu", lambda: _set(_cpu_model(), "b_z_w", np.zeros(3, np.uint8)), f"b_dq_w: {CPU} int8"),
    ],
)
def test_check_int8_target_names_the_first_node_that_breaks_the_rule(target, build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        qdq.check_int8_target(build(), target)


def test_check_int8_target_accepts_any_uint8_activation_zero_point_on_cpu():
    qdq.check_int8_target(_set(_cpu_model(), "uint8_zero_point_128", np.uint8(0)), "cpu")


def test_prune_drops_dead_chains_and_unused_initializers_and_keeps_the_rest():
    """`dead2` only feeds `dead1`, which nobody reads: both go (it takes two passes)."""
    nodes = [
        _node("Add", ["x", "a"], ["dead2_out"], "dead2"),
        _node("Mul", ["dead2_out", "b"], ["dead1_out"], "dead1"),
        _node("Split", ["x"], ["half0", "half1"], "split", axis=1),
        _node("Add", ["half1", "c"], ["y"], "keep"),
    ]
    values = {k: np.ones((1, 1, 3, 3), F32) for k in ("a", "b", "c", "unused")}
    model = _model(nodes, _inits(values), ["y"])
    assert qdq.prune(model) is model
    assert [n.name for n in model.graph.node] == ["split", "keep"]
    assert [i.name for i in model.graph.initializer] == ["c"]
    assert _run(model)[0].shape == (1, 1, 3, 3)
