"""Reading and writing configurations: TOML recipes, `--set` overrides, strict type checks.

Values come from, in order: the dataclass defaults, the defaults the root class derives from
what was written (`TrainJob.head_defaults`: the head's PGD values), a base (a checkpoint's
config), a TOML recipe, then command-line overrides `--set section.key=value`. Unknown keys and
values of the wrong type raise `ValueError` naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomllib

from pgd_deploy.io_utils import atomic_write_text

C = TypeVar("C")

# --------------------------------------------------------------------------------------------
# Loading, overriding, saving
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_type_name(typing.get_args(tp)[1])}"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form or raise."""
    origin = typing.get_origin(tp)
    bad = ValueError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args and not (isinstance(value, str) and str in args):
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        try:
            return tuple(_coerce(v, typing.get_args(tp)[0], key) for v in value)
        except ValueError:
            raise bad from None
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def _build(cls: type[C], values: Mapping[str, Any], prefix: str, source: str) -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(
                f"{source}: unknown config key '{full}' (known: {', '.join(sorted(names))})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: config key '{full}' must be a table/section")
            kwargs[key] = _build(tp, value, f"{full}.", source)
        else:
            try:
                kwargs[key] = _coerce(value, tp, full)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of `--set key=value` as a TOML value, else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set KEY=VALUE` flag every command shares (parsed by `load_config`)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn `["model.depth=50", "train.lr_steps=[8, 11]"]` into a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        _set_path(tree, key.strip(), _parse_value(text.strip()))
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
    """Build the dataclass `cls` from a nested dict (defaults fill what is missing)."""
    return _build(cls, values, "", source)


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> C:
    """Load `cls` from defaults, an optional base dict, a TOML file and `--set` overrides.

    A root class with a `head_defaults(values)` classmethod adds the defaults it returns for the
    merged values beneath them (what the base, the recipe or `--set` wrote always wins).

    Args:
        cls: root dataclass, e.g. `TrainJob`.
        path: TOML recipe, or None for the defaults.
        overrides: `section.key=value` strings, applied last.
        base: values applied before the recipe (e.g. a checkpoint's training config).

    Raises:
        FileNotFoundError: the recipe does not exist.
        ValueError: an unknown key, a wrong type or malformed TOML (the message names it).
    """
    values: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        try:
            values = _merge(values, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
    overrides = list(overrides)
    if overrides:
        tree = parse_overrides(overrides)
        _build(cls, tree, "", "--set")  # names the offending key with the right source
        values = _merge(values, tree)
    head_defaults = getattr(cls, "head_defaults", None)
    if head_defaults is not None:  # beneath everything written above: base, recipe, --set
        values = _merge(head_defaults(values), values)
    return _build(cls, values, "", source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {value!r} to TOML")


def dumps_toml(cfg: Any) -> str:
    """TOML text of a root config (one table per section)."""
    lines: list[str] = []
    top = to_dict(cfg)
    for key, value in top.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in top.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as TOML (atomically), loadable with `load_config`."""
    return atomic_write_text(path, dumps_toml(cfg))
