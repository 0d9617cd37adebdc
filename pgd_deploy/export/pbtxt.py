"""A strict parser for Triton's config.pbtxt (the protobuf text-format subset model configs use).

`parse_pbtxt` turns the text into {field: [values]} with line-numbered syntax errors; the schema
below lists the fields of the messages `pgd-export` writes, so an unknown field, a repeated
singular field or a wrongly typed value is an error, not a silent default; `validate_config`
checks the tensors, names and batch size against the artifact's manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgd_deploy.runtime.manifest import manifest_path

PLATFORMS = {
    "onnx": ("onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "model.plan"),
}
DATA_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
MANIFEST_PARAMETER = "pgd_deploy_manifest"

# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r'\s+|#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)'
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[{}\[\]:,;])"
)


class PbtxtError(ValueError):
    """A config.pbtxt that does not parse, or does not match the artifact."""


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise PbtxtError(f"config.pbtxt line {line}: unexpected character {text[pos]!r}")
        line = text.count("\n", 0, pos) + 1
        if m.group("str") is not None:
            raw = m.group("str")[1:-1]
            value = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e[1], e[1]), raw)
            out.append(("str", value, line))
        elif m.group("num") is not None:
            num = m.group("num")
            out.append(("num", float(num) if any(c in num for c in ".eE") else int(num), line))
        elif m.group("ident") is not None:
            out.append(("ident", m.group("ident"), line))
        elif m.group("punct") is not None:
            out.append(("punct", m.group("punct"), line))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, Any, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, value: Any = None) -> tuple[str, Any, int]:
        tok = self.peek()
        if tok is None:
            raise PbtxtError("config.pbtxt: unexpected end of file")
        if (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            want = value if value is not None else kind
            raise PbtxtError(f"config.pbtxt line {tok[2]}: expected {want!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def message(self, closing: str | None) -> dict[str, list[Any]]:
        fields: dict[str, list[Any]] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if closing:
                    raise PbtxtError(f"config.pbtxt: missing {closing!r} at end of file")
                return fields
            if tok[0] == "punct" and tok[1] == closing:
                self.i += 1
                return fields
            key = self.take("ident")[1]
            colon = self.peek() is not None and self.peek()[1] == ":"
            if colon:
                self.i += 1
            fields.setdefault(key, []).extend(self.value(colon))
            if self.peek() is not None and self.peek()[1] in (",", ";"):
                self.i += 1

    def value(self, after_colon: bool) -> list[Any]:
        tok = self.take()
        if tok[1] == "{":
            return [self.message("}")]
        if tok[1] == "[":
            items = []
            while self.peek() is not None and self.peek()[1] != "]":
                items.extend(self.value(True))
                if self.peek() is not None and self.peek()[1] == ",":
                    self.i += 1
            self.take("punct", "]")
            return items
        if not after_colon:
            raise PbtxtError(f"config.pbtxt line {tok[2]}: expected ':' or '{{' before {tok[1]!r}")
        if tok[0] == "punct":
            raise PbtxtError(f"config.pbtxt line {tok[2]}: unexpected {tok[1]!r}")
        return [tok[1]]


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Parse protobuf text format into {field: [values...]} (messages become nested dicts).

    Raises:
        PbtxtError: a syntax error, with its line number.
    """
    return _Parser(text).message(None)


# Known fields of the messages we write (and their nested messages), for strict checking.
_SCHEMA: dict[str, dict[str, str]] = {
    "ModelConfig": {
        "name": "str",
        "platform": "str",
        "backend": "str",
        "max_batch_size": "int",
        "input": "ModelTensor*",
        "output": "ModelTensor*",
        "instance_group": "InstanceGroup*",
        "dynamic_batching": "DynamicBatching",
        "version_policy": "any",
        "parameters": "Parameter*",
        "default_model_filename": "str",
        "optimization": "any",
    },
    "ModelTensor": {
        "name": "str",
        "data_type": "enum:TYPE_",
        "dims": "int*",
        "reshape": "any",
        "optional": "bool",
        "label_filename": "str",
        "format": "enum:FORMAT_",
    },
    "InstanceGroup": {"name": "str", "count": "int", "kind": "enum:KIND_", "gpus": "int*"},
    "DynamicBatching": {
        "max_queue_delay_microseconds": "int",
        "preferred_batch_size": "int*",
        "preserve_ordering": "bool",
    },
    "Parameter": {"key": "str", "value": "ParameterValue"},
    "ParameterValue": {"string_value": "str"},
}


def _check(fields: Mapping[str, list[Any]], message: str, where: str) -> dict[str, Any]:
    schema = _SCHEMA[message]
    out: dict[str, Any] = {}
    for key, values in fields.items():
        if key not in schema:
            raise PbtxtError(f"config.pbtxt {where}: unknown field '{key}' in {message}")
        kind = schema[key]
        repeated = kind.endswith("*")
        kind = kind.rstrip("*")
        if not repeated and len(values) != 1:
            raise PbtxtError(f"config.pbtxt {where}: field '{key}' given {len(values)} times")
        checked = [_check_value(v, kind, f"{where}.{key}") for v in values]
        out[key] = checked if repeated else checked[0]
    return out


def _check_value(value: Any, kind: str, where: str) -> Any:
    if kind == "any":
        return value
    if kind in _SCHEMA:
        if not isinstance(value, dict):
            raise PbtxtError(f"config.pbtxt {where}: expected a {kind} message")
        return _check(value, kind, where)
    ok = {
        "str": isinstance(value, str) and not kind.startswith("enum"),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": value in ("true", "false"),
    }.get(kind)
    if kind.startswith("enum:"):
        ok = isinstance(value, str) and value.startswith(kind[5:])
    if not ok:
        raise PbtxtError(f"config.pbtxt {where}: expected {kind}, got {value!r}")
    return value


def validate_config(
    parsed: Mapping[str, list[Any]],
    manifest: Mapping[str, Any],
    *,
    name: str,
    max_batch_size: int,
) -> dict[str, Any]:
    """Check a parsed config against the artifact's manifest; returns the typed config.

    Raises:
        PbtxtError: unknown fields, wrong types, or tensors/names/batch that differ from the
            manifest (the message names the field and the expected value).
    """
    cfg = _check(parsed, "ModelConfig", "")
    platform, _ = PLATFORMS[manifest["format"]]
    for key, want in (("name", name), ("platform", platform), ("max_batch_size", max_batch_size)):
        if cfg.get(key) != want:
            raise PbtxtError(f"config.pbtxt: field '{key}' is {cfg.get(key)!r}, expected {want!r}")
    for field, entries in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
        got = {t["name"]: t for t in cfg.get(field, [])}
        want = {t["name"]: t for t in entries}
        if set(got) != set(want):
            raise PbtxtError(
                f"config.pbtxt: {field} tensors {sorted(got)}, expected {sorted(want)}"
            )
        for tname, spec in want.items():
            dims, dtype = list(spec["shape"][1:]), DATA_TYPES[spec["dtype"]]
            if got[tname].get("dims") != dims or got[tname].get("data_type") != dtype:
                raise PbtxtError(
                    f"config.pbtxt: {field} '{tname}' is {got[tname].get('data_type')} "
                    f"{got[tname].get('dims')}, expected {dtype} {dims}"
                )
    params = {p["key"]: p["value"].get("string_value") for p in cfg.get("parameters", [])}
    if MANIFEST_PARAMETER in params:
        json.loads(params[MANIFEST_PARAMETER])  # must be valid JSON
    return cfg


def read_repository_config(model_dir: str | Path) -> dict[str, Any]:
    """Parse and validate `<model_dir>/config.pbtxt` against the manifest in its version folder."""
    model_dir = Path(model_dir)
    parsed = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    models = sorted(p for p in (model_dir / "1").iterdir() if p.suffix in (".onnx", ".plan"))
    if not models:
        raise PbtxtError(f"{model_dir}/1: no model.onnx or model.plan")
    manifest = json.loads(manifest_path(models[0]).read_text())
    max_batch = parsed.get("max_batch_size", [0])[0]
    return validate_config(parsed, manifest, name=model_dir.name, max_batch_size=max_batch)
