"""Reading and writing configurations: TOML recipes, `--set` overrides, strict type checks.

Values come from, in order: the dataclass defaults, the defaults the root class derives from
what was written (`TrainJob.head_defaults`: the head's PGD values), a base (a checkpoint's
config), a TOML recipe, then command-line overrides `--set section.key=value`. Unknown keys,
values of the wrong type and numbers out of their range (`config.bounds`: each field declares
its own; NaN never passes) raise `ValueError` naming the key and where it was set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
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


_KEY_IN_MESSAGE = re.compile(r"config key '([^']+)'")


def _coerced(cls: type, values: Mapping[str, Any], prefix: str, source: str) -> dict[str, Any]:
    """`values` checked and converted for `cls` (sections stay dicts): unknown keys and wrong
    types raise `ValueError` naming `source`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(
                f"{source}: unknown config key '{full}' (known: {', '.join(sorted(names))})"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: config key '{full}' must be a table/section")
            kwargs[key] = _coerced(hints[key], value, f"{full}.", source)
        else:
            try:
                kwargs[key] = _coerce(value, hints[key], full)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
    return kwargs


def _construct(cls: type[C], kwargs: Mapping[str, Any], where: Callable[[str], str]) -> C:
    """`cls` from `_coerced` values; a value out of its range (each section's `__post_init__`,
    `config.bounds`) raises `ValueError` prefixed by `where(key)`, where it was set."""
    hints = typing.get_type_hints(cls)
    built = {
        key: _construct(hints[key], value, where)
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key])
        else value
        for key, value in kwargs.items()
    }
    try:
        return cls(**built)
    except ValueError as err:
        named = _KEY_IN_MESSAGE.search(str(err))
        if named is None:
            raise
        raise ValueError(f"{where(named[1])}: {err}") from None


def _build(cls: type[C], values: Mapping[str, Any], prefix: str, source: str) -> C:
    return _construct(cls, _coerced(cls, values, prefix, source), lambda _: source)


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys of the values in `tree` (table entries too: `train.loss_weights.x`)."""
    keys = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


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
    flags: Mapping[str, str] | None = None,
) -> C:
    """Load `cls` from defaults, an optional base dict, a TOML file and `--set` overrides.

    A root class with a `head_defaults(values)` classmethod adds the defaults it returns for the
    merged values beneath them (what the base, the recipe or `--set` wrote always wins).

    Args:
        cls: root dataclass, e.g. `TrainJob`.
        path: TOML recipe, or None for the defaults.
        overrides: `section.key=value` strings, applied last.
        base: values applied before the recipe (e.g. a checkpoint's training config).
        flags: config key -> the command-line flag that set it through `overrides`
            ("export.batch_opt" -> "--batch-opt"), named in the message of its bad value.

    Raises:
        FileNotFoundError: the recipe does not exist.
        ValueError: an unknown key, a wrong type, a value out of its range (NaN and infinities
            included) or malformed TOML; the message names the key, the value, the allowed
            range and where it was set (the recipe, --set or the flag).
    """
    values: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        try:
            values = _merge(values, tomllib.loads(path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: a recipe must be UTF-8 TOML text; byte {err.start} is not UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
    overrides = list(overrides)
    overridden: set[str] = set()
    if overrides:
        tree = parse_overrides(overrides)
        _coerced(cls, tree, "", "--set")  # names the offending key with the right source
        values = _merge(values, tree)
        overridden = _flat_keys(tree)
    head_defaults = getattr(cls, "head_defaults", None)
    if head_defaults is not None:  # beneath everything written above: base, recipe, --set
        values = _merge(head_defaults(values), values)
    flags = dict(flags or {})

    def where(key: str) -> str:
        """Who set `key`: its command-line flag, --set, or the recipe (else "config")."""
        if key in flags and key in overridden:
            return flags[key]
        return "--set" if key in overridden else source

    return _construct(cls, _coerced(cls, values, "", source), where)


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


def toml_literal(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {value!r} to TOML")


def dumps_toml(cfg: Any) -> str:
    """TOML text of a root config (one table per section)."""
    lines: list[str] = []
    top = to_dict(cfg)
    for key, value in top.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {toml_literal(value)}")
    for key, value in top.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {toml_literal(v)}" for k, v in value.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as TOML (atomically), loadable with `load_config`."""
    return atomic_write_text(path, dumps_toml(cfg))
