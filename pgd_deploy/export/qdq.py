"""The two int8 targets as Q/DQ graph rules, applied to ONNX graphs (CPU only, onnx + numpy).

- `tensorrt`: symmetric int8 activations and weights, zero point 0 everywhere: what TensorRT's
  explicit quantization requires (docs/deployment.md §3).
- `cpu`: uint8 activations and int8 per-channel symmetric weights (U8S8), the combination ONNX
  Runtime's x86 int8 kernels run fast (export/README.md has the measurements).

A symmetric int8 grid maps exactly onto uint8 with zero point 128: clamp(round(x / s), -128, 127)
+ 128 covers [0, 255] and dequantizes to the same values. So a quantization-aware checkpoint,
whose learned scales are symmetric, is exported once (`torch.onnx` writes modelopt's fake quant as
int8 Q/DQ with zero point 0, the tensorrt target) and `symmetric_to_uint8` turns it into the cpu
target without changing any scale or any dequantized value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

INT8_TARGETS = ("cpu", "tensorrt")
UINT8_ZERO_POINT = 128  # the symmetric grid on uint8
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("int8 export needs onnx: pip install 'pgd-deploy[export]'") from None
    return onnx


class _Graph:
    """Producers, consumers and constant values of a graph (read-only views)."""

    def __init__(self, model: Any) -> None:
        onnx = _onnx()
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {i.name: i for i in model.graph.initializer}
        self._np = onnx.numpy_helper
        self._dtype = onnx.helper.tensor_dtype_to_np_dtype

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is a constant: an initializer, a Constant node, or an
        Identity/Cast of one (the unsimplified legacy export routes shared weights through
        Identity nodes); None for computed tensors."""
        if name in self.initializers:
            return self._np.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return self._np.to_array(node.attribute[0].t)
        if node.op_type in ("Identity", "Cast"):
            value = self.constant(node.input[0])
            if value is None or node.op_type == "Identity":
                return value
            to = next(a.i for a in node.attribute if a.name == "to")
            return value.astype(self._dtype(to))
        return None

    def is_weight(self, node: Any) -> bool:
        """Whether a Q or DQ node quantizes a constant (a weight) rather than an activation."""
        if self.constant(node.input[0]) is not None:
            return True
        source = self.producer.get(node.input[0])
        return source is not None and source.op_type == _QDQ[0] and self.is_weight(source)

    def qdq_before(self, name: str) -> Any | None:
        """The DequantizeLinear that produces `name`, if any."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None


def zero_points(model: Any) -> dict[str, np.ndarray]:
    """Zero point of every QuantizeLinear/DequantizeLinear node (name -> array)."""
    graph = _Graph(model)
    out = {}
    for node in graph.nodes:
        if node.op_type in _QDQ and len(node.input) > 2:
            out[node.name or node.output[0]] = graph.constant(node.input[2])
    return out


def quantized_convs(model: Any) -> dict[str, dict[str, Any]]:
    """Every Conv whose activation and weight arrive through DequantizeLinear.

    Returns:
        conv node name -> {"input": activation scale (float), "weight": per-output-channel scales
        (list), "output": scale of the QuantizeLinear reading its output, or None}.
    """
    graph = _Graph(model)
    out: dict[str, dict[str, Any]] = {}
    for node in graph.nodes:
        if node.op_type != "Conv":
            continue
        act, weight = graph.qdq_before(node.input[0]), graph.qdq_before(node.input[1])
        if act is None or weight is None:
            continue
        after = [c for c in graph.consumers.get(node.output[0], []) if c.op_type == _QDQ[0]]
        out[node.name] = {
            "input": float(graph.constant(act.input[1])),
            "weight": np.atleast_1d(graph.constant(weight.input[1])).astype(float).tolist(),
            "output": float(graph.constant(after[0].input[1])) if after else None,
        }
    return out


def module_name(node_name: str, prefix: str = "/detector/") -> str:
    """The PyTorch module path of a node of the legacy exporter, e.g.
    "/detector/backbone/body/layer1/layer1.0/conv1/Conv" -> "backbone.body.layer1.0.conv1" and
    "/detector/head/towers/cls_tower.0/cls_tower.0.0_2/Conv" -> "head.towers.cls_tower.0.0"
    (a scope repeats its parent's name for container children; "_N" numbers repeated calls)."""
    scopes = node_name.removeprefix(prefix).split("/")[:-1]
    parts: list[str] = []
    previous = ""
    for scope in scopes:
        scope = scope.rsplit("_", 1)[0] if scope.rsplit("_", 1)[-1].isdigit() else scope
        parts.append(scope[len(previous) + 1 :] if scope.startswith(previous + ".") else scope)
        previous = scope
    return ".".join(parts)


def check_placement(model: Any, placement: dict[str, dict[str, Any]]) -> None:
    """Check that a QAT export quantizes exactly the convolutions the fake quantization did, with
    the learned scales (`_scale`) on their input, weight and output.

    Args:
        model: the exported Q/DQ graph (tensorrt target, before any zero-point change).
        placement: `pgd_deploy.qat.placement(detector)`: module -> amax per quantizer.

    Raises:
        ValueError: naming the convolutions that differ.
    """
    exported: dict[str, list[dict[str, Any]]] = {}
    for node, scales in quantized_convs(model).items():
        exported.setdefault(module_name(node), []).append(scales)
    if set(exported) != set(placement):
        missing, extra = set(placement) - set(exported), set(exported) - set(placement)
        raise ValueError(
            f"QAT export: quantized convolutions differ from the fake quantization "
            f"(not exported: {sorted(missing)}; not fake-quantized: {sorted(extra)})"
        )
    for name, calls in exported.items():
        expected = {kind: _scale(amax) for kind, amax in placement[name].items()}
        for scales in calls:
            got = {k: None if v is None else np.float32(v).tolist() for k, v in scales.items()}
            if got != expected:
                raise ValueError(f"QAT export: {name} has scales {got}, learned {expected}")


def _scale(amax: Any) -> Any:
    """The Q/DQ scale modelopt writes for a range: amax / 127 in float32 (1 where amax is 0)."""
    if amax is None:
        return None
    amax = np.float32(amax)
    return np.where(amax == 0, np.float32(1), amax / np.float32(127)).tolist()


def fold_weight_quantization(model: Any) -> Any:
    """QuantizeLinear(float weight) -> DequantizeLinear becomes int8 weight -> DequantizeLinear.

    The int8 values are what the QuantizeLinear computes at run time (ONNX: saturate(round half
    to even of w / scale)), so nothing changes numerically; the file stores int8 weights (4x
    smaller) as `quantize_static` does. A weight shared by several calls (the head's towers run on
    five levels) is stored once.
    """
    onnx = _onnx()
    graph = _Graph(model)
    folded: dict[tuple[str, ...], str] = {}
    dropped: set[int] = set()
    for node in graph.nodes:
        if node.op_type != "QuantizeLinear":
            continue
        weight = graph.constant(node.input[0])
        if weight is None or weight.ndim < 2:  # activations (and scalars) stay dynamic
            continue
        key = tuple(node.input)
        if key not in folded:
            scale = graph.constant(node.input[1]).astype(np.float32)
            zero = graph.constant(node.input[2])
            shape = [1] * weight.ndim
            shape[_axis(node)] = -1
            q = np.rint(weight.astype(np.float32) / scale.reshape(shape)) + zero.reshape(shape)
            info = np.iinfo(zero.dtype)
            values = np.clip(q, info.min, info.max).astype(zero.dtype)
            folded[key] = f"{node.input[0]}_quantized_{len(folded)}"
            model.graph.initializer.append(onnx.numpy_helper.from_array(values, folded[key]))
        for user in graph.consumers.get(node.output[0], []):
            user.input[0] = folded[key]
        dropped.add(id(node))
    _replace_nodes(model, [n for n in graph.nodes if id(n) not in dropped])
    return prune(model)


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def symmetric_to_uint8(model: Any) -> Any:
    """The cpu target of a symmetric int8 Q/DQ graph: activation Q/DQ pairs get uint8 zero point
    128 (same scales, same dequantized values); int8 weights keep zero point 0.

    Raises:
        ValueError: an activation zero point is not 0 (not a symmetric graph).
    """
    onnx = _onnx()
    graph = _Graph(model)
    name = "uint8_zero_point_128"
    changed: set[str] = set()
    for node in graph.nodes:
        if node.op_type not in _QDQ or graph.is_weight(node):
            continue
        zero = graph.constant(node.input[2])
        if zero is None or zero.dtype != np.int8 or zero.any():
            raise ValueError(
                f"{node.name}: expected a symmetric int8 activation (zero point 0), got {zero!r}"
            )
        node.input[2] = name
        if node.op_type == "QuantizeLinear":
            changed.add(node.output[0])
    zero_point = np.array(UINT8_ZERO_POINT, dtype=np.uint8)
    model.graph.initializer.append(onnx.numpy_helper.from_array(zero_point, name))
    # Shape inference recorded the int8 type of the quantized tensors; let it recompute them.
    keep = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return prune(model)


def check_int8_target(model: Any, target: str) -> None:
    """Check the zero points of a Q/DQ graph against its target.

    tensorrt: every zero point is int8 0. cpu: activation zero points are uint8, weight zero
    points int8 0 (ONNX Runtime's U8S8 kernels).

    Raises:
        ValueError: naming the first node that breaks the rule.
    """
    if target not in INT8_TARGETS:
        raise ValueError(f"export.int8_target: expected one of {INT8_TARGETS}, got {target!r}")
    graph = _Graph(model)
    for node in graph.nodes:
        if node.op_type not in _QDQ:
            continue
        if len(node.input) < 3 or not node.input[2]:  # ONNX then reads uint8 0
            raise ValueError(
                f"{node.name}: the {target} int8 target needs an explicit zero point, got none"
            )
        zero = graph.constant(node.input[2])
        if target == "tensorrt" or graph.is_weight(node):
            ok = zero is not None and zero.dtype == np.int8 and not zero.any()
            rule = "int8 zero point 0"
        else:
            ok = zero is not None and zero.dtype == np.uint8
            rule = "uint8 activations"
        if not ok:
            raise ValueError(f"{node.name}: the {target} int8 target needs {rule}, got {zero!r}")


def _replace_nodes(model: Any, nodes: Iterable[Any]) -> None:
    nodes = list(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def prune(model: Any) -> Any:
    """Drop nodes whose outputs nobody reads and initializers nobody uses."""
    graph_outputs = {o.name for o in model.graph.output}
    nodes = list(model.graph.node)
    while True:
        used = {name for n in nodes for name in n.input} | graph_outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    _replace_nodes(model, nodes)
    used = {name for n in nodes for name in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model
