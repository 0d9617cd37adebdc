"""Tensor parity between a reference and a candidate runtime (gate 1), Polygraphy style.

`compare` is the one function the tests and `pgd-export` both call, so the gate and the tests can
never drift apart. It streams batches through both runtimes and accumulates, per output, the max,
mean and 99th-percentile absolute error and the normalised mean error
mean|candidate - reference| / mean|reference|. A check is either elementwise (`stat="max"`:
max abs error <= atol) or statistical (`stat="mean"`: mean abs error <= atol, or normalised mean
error <= rtol), and any non-finite value in the candidate fails it. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Outputs = Mapping[str, np.ndarray]
_P99_SAMPLE = 200_000  # absolute errors kept per output for the p99 estimate


@dataclass
class OutputParity:
    """Error statistics of one output over every compared element."""

    name: str
    shape: list[int]
    elements: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    mean_rel: float = 0.0
    nonfinite: int = 0
    atol: float | None = None
    rtol: float | None = None
    stat: str = "max"
    passed: bool | None = None  # None: reported only (no tolerance)


@dataclass
class ParityReport:
    """The result of `compare`: per-output statistics and the overall verdict."""

    images: int
    outputs: dict[str, OutputParity] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        verdicts = [o.passed for o in self.outputs.values() if o.passed is not None]
        return None if not verdicts else all(verdicts)

    def summary(self) -> str:
        parts = []
        for o in self.outputs.values():
            tol = "" if o.atol is None else f" (atol {o.atol:g}, {o.stat})"
            parts.append(
                f"{o.name}: max {o.max_abs:.3g} mean {o.mean_abs:.3g} p99 {o.p99_abs:.3g}{tol}"
            )
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "passed": self.passed,
            "outputs": {k: asdict(v) for k, v in self.outputs.items()},
        }


class _Accumulator:
    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.shape: list[int] = []
        self.count = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_ref = 0.0
        self.nonfinite = 0
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        cand = np.asarray(cand, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ValueError(
                f"output '{self.name}': reference shape {list(ref.shape)} != "
                f"candidate shape {list(cand.shape)}"
            )
        self.shape = [-1, *ref.shape[1:]]
        finite = np.isfinite(cand)
        self.nonfinite += int((~finite & np.isfinite(ref)).sum())
        diff = np.abs(np.where(finite, cand, 0.0) - ref).reshape(-1)
        self.count += diff.size
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.sum_ref += float(np.abs(ref).sum())
        keep = min(diff.size, _P99_SAMPLE)
        self.samples.append(diff if keep == diff.size else self.rng.choice(diff, keep))

    def result(self) -> OutputParity:
        sample = np.concatenate(self.samples) if self.samples else np.zeros(1)
        mean_abs = self.sum_abs / max(self.count, 1)
        return OutputParity(
            name=self.name,
            shape=self.shape,
            elements=self.count,
            max_abs=self.max_abs,
            mean_abs=mean_abs,
            p99_abs=float(np.percentile(sample, 99)),
            mean_rel=self.sum_abs / max(self.sum_ref, 1e-12),
            nonfinite=self.nonfinite,
        )


def _infer(model: Any, batch: np.ndarray) -> Outputs:
    return model.infer(batch) if hasattr(model, "infer") else model(batch)


def _judge(out: OutputParity, atol: float | None, rtol: float | None, stat: str) -> None:
    out.atol, out.rtol, out.stat = atol, rtol, stat
    if atol is None:
        return
    if out.nonfinite:
        out.passed = False
    elif stat == "max":
        out.passed = out.max_abs <= atol
    else:
        out.passed = out.mean_abs <= atol or (rtol is not None and out.mean_rel <= rtol)


def compare(
    reference: Any,
    candidate: Any,
    batches: Iterable[np.ndarray],
    *,
    outputs: Iterable[str] = ("boxes", "scores"),
    atol: Mapping[str, float] | float | None = None,
    rtol: Mapping[str, float] | float | None = None,
    stat: str = "max",
    on_batch: Callable[[int, np.ndarray, Outputs, Outputs], None] | None = None,
) -> ParityReport:
    """Run both models on the same batches and compare their outputs.

    Args:
        reference: the trusted model (e.g. the PyTorch backend): `.infer(batch) -> {name: array}`
            or a callable with that signature.
        candidate: the exported model, same interface.
        batches: float32 [B, 3, H, W] letterboxed, normalised images.
        outputs: output names to compare.
        atol: absolute tolerance per output (or one for all); None = report only.
        rtol: normalised-mean tolerance per output for `stat="mean"` (ignored for "max").
        stat: "max" (elementwise) or "mean" (statistical, Polygraphy `check_error_stat`).
        on_batch: called as `on_batch(index, batch, reference_outputs, candidate_outputs)` after
            each batch (the gates post-process detections there, in the same pass).

    Returns:
        a `ParityReport` (`passed` is None when no tolerance was given).

    Raises:
        ValueError: an unknown `stat`, a missing output or mismatched output shapes.
    """
    if stat not in ("max", "mean"):
        raise ValueError(f"compare: stat must be 'max' or 'mean', got {stat!r}")
    names = list(outputs)
    acc = {name: _Accumulator(name, seed=i) for i, name in enumerate(names)}
    images = 0
    for index, batch in enumerate(batches):
        ref_out, cand_out = _infer(reference, batch), _infer(candidate, batch)
        for name in names:
            if name not in ref_out or name not in cand_out:
                raise ValueError(
                    f"compare: output '{name}' missing (reference has {sorted(ref_out)}, "
                    f"candidate has {sorted(cand_out)})"
                )
            acc[name].update(ref_out[name], cand_out[name])
        images += len(batch)
        if on_batch is not None:
            on_batch(index, batch, ref_out, cand_out)
    report = ParityReport(images=images)
    for name in names:
        result = acc[name].result()
        a = atol.get(name) if isinstance(atol, Mapping) else atol
        r = rtol.get(name) if isinstance(rtol, Mapping) else rtol
        _judge(result, a, r, stat)
        report.outputs[name] = result
    return report
