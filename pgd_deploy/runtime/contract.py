"""The export contract, checked when an artifact is loaded (torch-free).

Serving runs any `.onnx` or `.plan` a user points it at; one not made by `pgd-export` used to
crash deep inside pre- or post-processing (IndexError, KeyError, "invalid literal for int()").
These checks refuse it up front, with the file and what differs:

- metadata: the manifest beside the artifact (or, for ONNX, the "pgd_deploy" metadata entry)
  gives `imgsz` [H, W] and non-empty `class_names` (and, when present, matching `category_ids`
  and positive `level_sizes`);
- input: exactly one, `images` [B, 3, H, W], H and W fixed to `imgsz` (or symbolic);
- outputs: the dense contract `boxes` [B, N, 4] + `scores` [B, N, C] (C = number of class names,
  N = sum of level sizes, where the model fixes them), or the in-graph NMS contract `num_dets`
  [B, 1], `det_boxes` [B, K, 4], `det_scores` [B, K], `det_classes` [B, K].
Dims are given as ints (-1 or None for dynamic) or strings (symbolic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

INPUT = "images"
DENSE = ("boxes", "scores")
NMS = ("num_dets", "det_boxes", "det_scores", "det_classes")
EXPORT_HINT = "export the checkpoint with pgd-export, which writes the contract and its manifest"

Tensors = Sequence[tuple[str, Sequence[Any]]]


def fixed(dim: Any) -> int | None:
    """The dim as an int when it is a fixed size, else None (dynamic or symbolic)."""
    return int(dim) if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 else None


def _fmt(dims: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if fixed(d) is not None else "?" for d in dims) + "]"


def check_metadata(path: str | Path, meta: Mapping[str, Any] | None) -> None:
    """Refuse an artifact whose metadata cannot drive pre/post-processing.

    Raises:
        ValueError: naming the file, the field and what was expected.
    """
    if not meta:
        raise ValueError(
            f"{path}: no pgd-export metadata (no {Path(path).stem}.manifest.json beside it, no "
            "'pgd_deploy' entry in its ONNX metadata): its input size, preprocessing and class "
            f"names are unknown; {EXPORT_HINT}"
        )
    imgsz = meta.get("imgsz")
    if not (isinstance(imgsz, (list, tuple)) and len(imgsz) == 2 and all(fixed(v) for v in imgsz)):
        raise ValueError(f"{path}: metadata 'imgsz' is {imgsz!r}, expected [H, W] in pixels")
    names = meta.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(
            f"{path}: metadata 'class_names' is {names!r}, expected a non-empty list of names"
        )
    ids = meta.get("category_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(names)):
        raise ValueError(
            f"{path}: metadata 'category_ids' has {len(ids) if isinstance(ids, list) else ids!r}"
            f" entries, expected one per class name ({len(names)})"
        )
    sizes = meta.get("level_sizes")
    if sizes is not None and not (isinstance(sizes, list) and sizes and all(map(fixed, sizes))):
        raise ValueError(
            f"{path}: metadata 'level_sizes' is {sizes!r}, expected positive location counts"
        )


def _check_input(path: str | Path, inputs: Tensors, meta: Mapping[str, Any]) -> None:
    if [name for name, _ in inputs] != [INPUT]:
        shown = ", ".join(f"'{n}' {_fmt(d)}" for n, d in inputs)
        raise ValueError(
            f"{path}: expected one input '{INPUT}' [B, 3, H, W], the model has {shown}"
        )
    dims = list(inputs[0][1])
    if len(dims) != 4 or fixed(dims[1]) != 3:
        raise ValueError(f"{path}: input '{INPUT}' is {_fmt(dims)}, expected [B, 3, H, W]")
    h, w = (int(v) for v in meta["imgsz"])
    for axis, got, want in (("H", dims[2], h), ("W", dims[3], w)):
        if fixed(got) is not None and fixed(got) != want:
            raise ValueError(
                f"{path}: input '{INPUT}' is {_fmt(dims)} but the metadata says imgsz {h}x{w} "
                f"({axis} differs)"
            )


def _rank(path: str | Path, name: str, dims: Sequence[Any], rank: int, spec: str) -> None:
    if len(dims) != rank or (spec.endswith(", 4]") and fixed(dims[-1]) not in (None, 4)):
        raise ValueError(f"{path}: output '{name}' is {_fmt(dims)}, expected {spec}")


def _check_dense(
    path: str | Path, out: Mapping[str, Sequence[Any]], meta: Mapping[str, Any]
) -> None:
    boxes, scores = out["boxes"], out["scores"]
    _rank(path, "boxes", boxes, 3, "[B, N, 4]")
    _rank(path, "scores", scores, 3, "[B, N, C]")
    n_boxes, n_scores = fixed(boxes[1]), fixed(scores[1])
    if None not in (n_boxes, n_scores) and n_boxes != n_scores:
        raise ValueError(f"{path}: 'boxes' has {n_boxes} locations but 'scores' has {n_scores}")
    n = n_boxes if n_boxes is not None else n_scores
    sizes = meta.get("level_sizes")
    if n is not None and sizes and sum(sizes) != n:
        raise ValueError(
            f"{path}: the model has {n} locations but the metadata's level_sizes sum to "
            f"{sum(sizes)} (exported at another size?)"
        )
    classes = fixed(scores[2])
    if classes is not None and classes != len(meta["class_names"]):
        raise ValueError(
            f"{path}: 'scores' has {classes} classes but the metadata names "
            f"{len(meta['class_names'])}"
        )


def _check_nms(path: str | Path, out: Mapping[str, Sequence[Any]]) -> None:
    _rank(path, "det_boxes", out["det_boxes"], 3, "[B, max_det, 4]")
    _rank(path, "det_scores", out["det_scores"], 2, "[B, max_det]")
    _rank(path, "det_classes", out["det_classes"], 2, "[B, max_det]")
    if len(out["num_dets"]) not in (1, 2):
        raise ValueError(f"{path}: output 'num_dets' is {_fmt(out['num_dets'])}, expected [B, 1]")
    lengths = {fixed(out[n][1]) for n in NMS[1:]} - {None}
    if len(lengths) > 1:
        raise ValueError(f"{path}: det_boxes/det_scores/det_classes disagree on max_det {lengths}")


def check_io_contract(
    path: str | Path, inputs: Tensors, outputs: Tensors, meta: Mapping[str, Any]
) -> None:
    """Refuse a model whose inputs/outputs are not the export contract (module docstring).

    Args:
        path: the artifact (named in the messages).
        inputs, outputs: [(name, dims)] as the runtime reports them.
        meta: its metadata, already checked by `check_metadata`.

    Raises:
        ValueError: naming the file, the tensor and what differs.
    """
    _check_input(path, inputs, meta)
    out = {name: list(dims) for name, dims in outputs}
    if set(DENSE) <= set(out):
        _check_dense(path, out, meta)
    elif set(NMS) <= set(out):
        _check_nms(path, out)
    else:
        raise ValueError(
            f"{path}: outputs {list(out)} are neither the dense contract {list(DENSE)} "
            f"(boxes [B, N, 4], scores [B, N, C]) nor the in-graph NMS contract {list(NMS)}; "
            f"{EXPORT_HINT}"
        )


def check_output_shapes(
    path: str | Path, declared: Mapping[str, Sequence[Any]], produced: Mapping[str, Any]
) -> None:
    """Refuse outputs whose shapes differ from the fixed dims the model declares.

    Raises:
        ValueError: naming the file, the output and both shapes.
    """
    for name, dims in declared.items():
        if name not in produced:
            continue
        shape = tuple(produced[name].shape)
        bad = len(shape) != len(dims) or any(
            fixed(d) is not None and fixed(d) != s for d, s in zip(dims, shape)
        )
        if bad:
            raise ValueError(
                f"{path}: output '{name}' came out {list(shape)} but the model declares "
                f"{_fmt(dims)}; {EXPORT_HINT}"
            )


# What pgd-export also stores inside an ONNX model (metadata_props["pgd_deploy"], as JSON): the
# manifest's fields that pre- and post-processing rely on.
ONNX_METADATA_FIELDS = (
    "format",
    "precision",
    "imgsz",
    "batch",
    "level_sizes",
    "class_names",
    "category_ids",
    "preprocess",
    "postprocess",
    "nms",
    "int8_target",
)
# ONNX Runtime's type strings -> the manifest's numpy dtype names
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
}


def _tensors_differ(
    kind: str, listed: Any, declared: Sequence[tuple[str, Sequence[Any], str | None]]
) -> list[str]:
    """How the manifest's `inputs`/`outputs` entries differ from the artifact's tensors."""
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        return [f"its manifest's '{kind}' is {listed!r}, expected a list of tensors"]
    names = [t.get("name") for t in listed]
    if names != [name for name, _, _ in declared]:
        return [
            f"its manifest lists {kind} {names} but the model has {[n for n, _, _ in declared]}"
        ]
    problems = []
    for entry, (name, dims, dtype) in zip(listed, declared):
        shape = entry.get("shape")
        same = isinstance(shape, list) and len(shape) == len(dims)
        if not same or any(fixed(a) != fixed(b) for a, b in zip(shape, dims)):
            problems.append(
                f"its manifest gives {kind[:-1]} '{name}' the shape {shape} but the model "
                f"declares {_fmt(dims)}"
            )
        if dtype is not None and entry.get("dtype") not in (None, dtype):
            problems.append(
                f"its manifest gives {kind[:-1]} '{name}' dtype {entry.get('dtype')} but the "
                f"model's is {dtype}"
            )
    return problems


def manifest_disagreements(
    manifest: Mapping[str, Any],
    inputs: Sequence[tuple[str, Sequence[Any], str | None]],
    outputs: Sequence[tuple[str, Sequence[Any], str | None]],
    embedded: Mapping[str, Any] | None = None,
) -> list[str]:
    """How a manifest disagrees with the artifact it sits beside (empty: it agrees).

    Args:
        manifest: the manifest the runtime will use.
        inputs, outputs: [(name, dims, numpy dtype name or None)] as the opened model declares
            them (a dtype of None is not compared: a plan may run other I/O types).
        embedded: the metadata stored inside the model (ONNX), compared field by field
            (`ONNX_METADATA_FIELDS`) where both have the field.
    """
    problems = []
    for kind, declared in (("inputs", inputs), ("outputs", outputs)):
        if kind in manifest:
            problems += _tensors_differ(kind, manifest[kind], declared)
    for key in ONNX_METADATA_FIELDS:
        if embedded and key in embedded and key in manifest and embedded[key] != manifest[key]:
            problems.append(
                f"its manifest says {key} {manifest[key]!r} but the model itself records "
                f"{embedded[key]!r}"
            )
    return problems
