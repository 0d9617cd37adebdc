"""Allowed ranges of numeric config values, checked when a section is built (stdlib only).

Each numeric field of `schema` declares its range once, where the field is declared:
`depth: int = bounded(50, one_of(18, 34, 50, 101, 152))`. Every section checks its fields in
`__post_init__` through `check_section`: a value out of range raises `ValueError` with the key,
the value and the range, whether the section comes from a recipe, a `--set` override, a
command-line flag or Python code. A numeric field without a declared range must still be finite:
NaN is never valid, and neither is an infinite value unless the range says so. Numbers inside a
list (`lr_steps`) or a table (`loss_weights`) are checked one by one against the key's range.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Bound",
    "at_least",
    "between",
    "bounded",
    "check_section",
    "flag",
    "flag_of",
    "greater_than",
    "one_of",
]


@dataclass(frozen=True)
class Bound:
    """A closed or open interval, or a set of allowed values, for one numeric key.

    Attributes:
        low, high: the interval's ends (None = unbounded on that side).
        low_open, high_open: exclude that end.
        values: when set, the allowed values themselves (the interval is then ignored).
        allow_inf: an infinite value passes when the interval contains it.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    values: tuple[Any, ...] = ()
    allow_inf: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.values:
            return value in self.values
        if isinstance(value, float) and math.isinf(value) and not self.allow_inf:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        if self.values:
            return "one of " + ", ".join(repr(v) for v in self.values)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


def at_least(low: float) -> Bound:
    """value >= low."""
    return Bound(low=low)


def greater_than(low: float) -> Bound:
    """value > low."""
    return Bound(low=low, low_open=True)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bound:
    """low <= value <= high (either end open on request)."""
    return Bound(low=low, high=high, low_open=low_open, high_open=high_open)


def one_of(*values: Any) -> Bound:
    """One of the listed values."""
    return Bound(values=tuple(values))


FINITE = Bound()  # any finite number (what a field without a declared range must still be)
NON_NEGATIVE = at_least(0)  # counts where 0 means none or off
POSITIVE = at_least(1)  # counts of at least one
FRACTION = between(0.0, 1.0)  # probabilities and score thresholds
IOU = between(0.0, 1.0, low_open=True)  # IoU thresholds: 0 would match or suppress anything


def bounded(default: Any = dataclasses.MISSING, bound: Bound = FINITE, **kwargs: Any) -> Any:
    """A dataclass field with its allowed range: `field(default=..., metadata={"bound": ...})`
    (`default_factory=` and other `field` arguments pass through)."""
    return dataclasses.field(default=default, metadata={"bound": bound}, **kwargs)


def bound_of(section: Any, key: str) -> Bound:
    """The range declared for `key` of a section class or instance (`FINITE` when none)."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    return fields[key].metadata.get("bound", FINITE)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_section(section: Any, name: str) -> None:
    """Check every numeric value of `section` against its field's range (`bounded`); NaN and
    infinities are refused anywhere a range does not allow them.

    Args:
        section: a config dataclass instance.
        name: its key prefix in messages ("model" -> 'model.depth'; "" for a root config).

    Raises:
        ValueError: "config key 'model.depth': must be one of 18, 34, ..., got 7".
    """
    prefix = f"{name}." if name else ""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        bound = f.metadata.get("bound", FINITE)
        if isinstance(value, Mapping):
            items = [(f"{prefix}{f.name}.{k}", v) for k, v in value.items()]
        elif isinstance(value, (tuple, list)):
            items = [(f"{prefix}{f.name}", v) for v in value]
        else:
            items = [(f"{prefix}{f.name}", value)]
        for key, item in items:
            if _is_number(item) and not bound.contains(item):
                raise ValueError(f"config key '{key}': must be {bound.describe()}, got {item!r}")


def require(ok: bool, key: str, message: str) -> None:
    """A check across fields: `ValueError("config key 'KEY': MESSAGE")` unless `ok`."""
    if not ok:
        raise ValueError(f"config key '{key}': {message}")


def flag(bound: Bound, kind: type = int) -> Callable[[str], Any]:
    """An argparse `type=` that parses a number and checks it against `bound`: a bad value
    stops the command before any work with "argument --iters: must be >= 1, got 0" (exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not bound.contains(value):
            raise argparse.ArgumentTypeError(f"must be {bound.describe()}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def flag_of(section: Any, key: str) -> Callable[[str], Any]:
    """`flag` with the range and the number type (int, or float where the annotation says so)
    that the config field `key` of `section` declares: one declaration for the key and its
    command-line flag."""
    annotation = str(typing.get_type_hints(section)[key])
    return flag(bound_of(section, key), float if "float" in annotation else int)
