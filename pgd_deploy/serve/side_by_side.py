"""Teacher-vs-student comparison behind the web demo (numpy and PIL only, no gradio).

A request runs each model once (`DemoModel.run`: letterbox + inference, timed with
`runtime.timing.StageTimer` after warm-up) and keeps the raw network outputs. Changing the score
threshold or the NMS IoU only re-runs post-processing on those cached outputs
(`compare_sides`), so the sliders never re-run the models. `DemoApp` holds the two models, the
latency history and the formatting that the gradio layer (`gradio_app`) displays.
"""

from __future__ import annotations

import base64
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pgd_deploy.config import ServeConfig
from pgd_deploy.runtime.agreement import match_detections
from pgd_deploy.runtime.backends import Backend
from pgd_deploy.runtime.preprocess import ImageDecodeError, ImageTransform, load_image
from pgd_deploy.runtime.timing import StageTimer
from pgd_deploy.serve.draw import draw_detections, fit_for_display
from pgd_deploy.structures import Detections

AGREEMENT_IOU = 0.5  # teacher and student boxes match: same class and IoU >= this
DISPLAY_MIN_SIDE = 512  # small images are enlarged for display so labels stay readable
DISPLAY_MAX_SIDE = 1280  # large images are shrunk for display (and for the session cache)


@dataclass
class ModelRun:
    """One model's cached result on one image.

    Attributes:
        outputs: raw network outputs for a batch of one (e.g. boxes [1, N, 4], scores [1, N, C]).
        transforms: the letterbox transform, one entry.
        pre_ms, infer_ms: stage latencies of this run.
    """

    outputs: dict[str, np.ndarray]
    transforms: list[ImageTransform]
    pre_ms: float
    infer_ms: float


class DemoModel:
    """A backend in the demo, with its role ("teacher" / "student") and a display label."""

    def __init__(self, role: str, path: str | Path, backend: Backend) -> None:
        self.role = role
        self.path = Path(path)
        self.backend = backend
        self.label = f"{role.capitalize()} · {self.path.parent.name}/{self.path.name}"

    def warmup(self, image: np.ndarray, runs: int) -> None:
        """Run the full pipeline `runs` times so that timed requests exclude one-off costs."""
        for _ in range(max(0, runs)):
            self.backend.predict([image])
        self.backend.sync()

    def run(self, image: np.ndarray) -> ModelRun:
        """Letterbox and infer one uint8 RGB image, timing each stage."""
        timer = StageTimer(sync=self.backend.sync)
        with timer.stage("pre"):
            batch, transforms = self.backend.preprocess([image])
        with timer.stage("infer"):
            outputs = self.backend.infer(batch)
        return ModelRun(outputs, transforms, 1e3 * timer.last["pre"], 1e3 * timer.last["infer"])

    def postprocess(
        self, run: ModelRun, score: float, nms: float, max_det: int | None = None
    ) -> tuple[Detections, float]:
        """Detections at the given thresholds from cached outputs, and the time it took (ms)."""
        extra = {} if max_det is None else {"max_det": max_det}
        timer = StageTimer()
        with timer.stage("post"):
            dets = self.backend.postprocess(
                run.outputs, run.transforms, score_thresh=score, nms_thresh=nms, **extra
            )[0]
        return dets, 1e3 * timer.last["post"]

    def describe(self) -> str:
        """Backend and classes, and "NOT VERIFIED" when it is served despite a failed check
        (`runtime.verify`; the log says which)."""
        text = f"{self.backend.describe()} · {len(self.backend.class_names)} classes"
        return text + (" · NOT VERIFIED (see the log)" if self.backend.warnings else "")


@dataclass
class CachedRequest:
    """What a session keeps between a model run and slider changes.

    Attributes:
        display: the input resized for display (`draw.fit_for_display`).
        box_scale: display pixels per original pixel.
        runs: (teacher, student) raw outputs.
    """

    display: Image.Image
    box_scale: float
    runs: tuple[ModelRun, ModelRun]


def run_models(image: np.ndarray, models: Sequence[DemoModel]) -> CachedRequest:
    """Run teacher then student on one uint8 RGB image (sequentially, so that neither's
    latency includes the other's work)."""
    runs = tuple(model.run(image) for model in models)
    display, scale = fit_for_display(image, min_side=DISPLAY_MIN_SIDE, max_side=DISPLAY_MAX_SIDE)
    return CachedRequest(display, scale, runs)  # type: ignore[arg-type]


@dataclass
class Side:
    """One model's half of a comparison."""

    model: DemoModel
    run: ModelRun
    detections: Detections
    matched: np.ndarray  # bool [N]: also found by the other model
    post_ms: float
    image: Image.Image  # annotated

    @property
    def total_ms(self) -> float:
        return self.run.pre_ms + self.run.infer_ms + self.post_ms

    def latency(self) -> dict[str, float]:
        return {
            "pre_ms": self.run.pre_ms,
            "infer_ms": self.run.infer_ms,
            "post_ms": self.post_ms,
            "total_ms": self.total_ms,
        }


@dataclass
class Comparison:
    """Teacher and student on one image at one pair of thresholds."""

    teacher: Side
    student: Side
    score_thresh: float
    nms_thresh: float

    @property
    def matched(self) -> int:
        return int(self.teacher.matched.sum())

    @property
    def agreement(self) -> float | None:
        """Share of all boxes that have a partner: 2 * matched / (teacher + student); None when
        neither model has a box (nothing to compare: it used to read 100 %)."""
        total = len(self.teacher.detections) + len(self.student.detections)
        return None if total == 0 else 2.0 * self.matched / total

    @property
    def speedup(self) -> float:
        return self.teacher.total_ms / max(self.student.total_ms, 1e-9)

    @property
    def infer_speedup(self) -> float:
        return self.teacher.run.infer_ms / max(self.student.run.infer_ms, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready details (the demo's API output)."""
        out: dict[str, Any] = {
            "score_thresh": self.score_thresh,
            "nms_thresh": self.nms_thresh,
            "agreement_iou": AGREEMENT_IOU,
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "matched": self.matched,
            "speedup": round(self.speedup, 3),
            "infer_speedup": round(self.infer_speedup, 3),
        }
        for side in (self.teacher, self.student):
            names = side.model.backend.class_names
            out[side.model.role] = {
                "artifact": str(side.model.path),
                "backend": side.model.backend.describe(),
                "count": len(side.detections),
                "only_this_model": int((~side.matched).sum()),
                "latency_ms": {k: round(v, 3) for k, v in side.latency().items()},
                "detections": [
                    {
                        "label": names[int(lab)] if int(lab) < len(names) else str(int(lab)),
                        "score": round(float(s), 4),
                        "box": [round(float(v), 1) for v in box],
                        "matched": bool(m),
                    }
                    for box, s, lab, m in zip(
                        side.detections.boxes,
                        side.detections.scores,
                        side.detections.labels,
                        side.matched,
                    )
                ],
            }
        return out


def compare_sides(
    request: CachedRequest,
    models: Sequence[DemoModel],
    *,
    score_thresh: float,
    nms_thresh: float,
    max_det: int | None = None,
) -> Comparison:
    """Post-process both cached runs, match them and draw both annotated images.

    Args:
        request: the cached runs and display image (`run_models`).
        models: (teacher, student), as given to `run_models`.
        score_thresh, nms_thresh: post-processing thresholds.
        max_det: detections kept per model (None = the artifact's own limit).
    """
    (t_model, s_model), (t_run, s_run) = models, request.runs
    t_dets, t_post = t_model.postprocess(t_run, score_thresh, nms_thresh, max_det)
    s_dets, s_post = s_model.postprocess(s_run, score_thresh, nms_thresh, max_det)
    m = match_detections(t_dets, s_dets, iou_thresh=AGREEMENT_IOU, score_thresh=0.0)
    sides = []
    for model, run, dets, post, matched in (
        (t_model, t_run, t_dets, t_post, m.matched_ref),
        (s_model, s_run, s_dets, s_post, m.matched_other),
    ):
        drawn = draw_detections(
            request.display,
            dets,
            model.backend.class_names,
            highlight=~matched,
            box_scale=request.box_scale,
        )
        sides.append(Side(model, run, dets, matched, post, drawn))
    return Comparison(sides[0], sides[1], score_thresh, nms_thresh)


@dataclass
class LatencyHistory:
    """The last `size` requests' latencies per model (thread-safe; shared by all sessions)."""

    size: int = 50
    rows: deque = field(default_factory=deque)
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, comparison: Comparison) -> int:
        """Record one request; returns its number (1-based)."""
        with self._lock:
            self.requests += 1
            for side in (comparison.teacher, comparison.student):
                self.rows.append(
                    {"request": self.requests, "model": side.model.role, **side.latency()}
                )
            while len(self.rows) > 2 * self.size:
                self.rows.popleft()
            return self.requests

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.rows)

    def median_total_ms(self, role: str) -> float:
        totals = [r["total_ms"] for r in self.snapshot() if r["model"] == role]
        return float(np.median(totals)) if totals else float("nan")


LATENCY_HEADERS = ["model", "backend", "pre", "infer", "post", "total", "FPS", "median", "dets"]


class DemoApp:
    """The demo's logic, independent of gradio: decode, run, compare, format."""

    def __init__(self, teacher: DemoModel, student: DemoModel, cfg: ServeConfig) -> None:
        if teacher.backend.class_names != student.backend.class_names:
            raise ValueError(
                f"teacher ({teacher.path}) and student ({student.path}) predict different "
                f"classes: {teacher.backend.class_names[:5]}... vs "
                f"{student.backend.class_names[:5]}...; the comparison needs one label set"
            )
        self.models = (teacher, student)
        self.cfg = cfg
        self.history = LatencyHistory(cfg.history)
        # where the score slider starts (`start_score`, set when the demo is served)
        self.score_start = cfg.demo_score if cfg.demo_score is not None else 0.3

    def warmup(self, image: np.ndarray) -> None:
        for model in self.models:
            model.warmup(image, self.cfg.warmup)

    START_BOXES = 3  # boxes per example image each model should show where the slider starts
    START_MAX = 0.5

    def start_score(self, images: Sequence[np.ndarray]) -> float:
        """Where the score slider starts: `cfg.demo_score` when set, else the highest threshold
        (a multiple of 0.05, 0.05 to `START_MAX`) at which each model still shows, over
        `images`, `START_BOXES` boxes per image on average (or every box it has above 0.05).
        A fixed 0.3 showed 0 to 2 boxes on the demo models' examples."""
        if self.cfg.demo_score is not None:
            return float(self.cfg.demo_score)
        nms = self.cfg.nms_thresh
        lowest = []
        for model in self.models:
            threshold = nms if nms is not None else model.backend.postprocess_kwargs["nms_thresh"]
            scores = sorted(
                (
                    float(s)
                    for image in images
                    for s in model.postprocess(model.run(image), 0.05, threshold)[0].scores
                ),
                reverse=True,
            )
            if scores:
                lowest.append(scores[min(self.START_BOXES * len(images), len(scores)) - 1])
        start = min(lowest) if lowest else 0.05
        return round(min(self.START_MAX, max(0.05, np.floor(start / 0.05 + 1e-6) * 0.05)), 2)

    def decode(self, payload: Any) -> np.ndarray:
        """The uploaded image (a gradio FileData dict, a path or a data URL) as uint8 RGB.

        Raises:
            ValueError: no image, or one that is refused (the message says why).
        """
        if isinstance(payload, dict):
            path, url = payload.get("path"), payload.get("url") or ""
            name = payload.get("orig_name") or "upload"
            if path:
                return load_image(path, name=name, max_pixels=self.cfg.max_pixels)
            if url.startswith("data:"):
                limit = self.cfg.max_upload_mb * 1024 * 1024
                if len(url) * 3 / 4 > limit:
                    raise ImageDecodeError(
                        f"{name}: larger than the {self.cfg.max_upload_mb:g} MB upload limit"
                    )
                data = base64.b64decode(url.split(",", 1)[-1])
                return load_image(data, name=name, max_pixels=self.cfg.max_pixels)
        elif isinstance(payload, (str, Path)):
            return load_image(payload, name=Path(payload).name, max_pixels=self.cfg.max_pixels)
        raise ImageDecodeError("no image given")

    def detect(
        self, image: np.ndarray, score: float, nms: float
    ) -> tuple[Comparison, CachedRequest]:
        request = run_models(image, self.models)
        comparison = self.rerender(request, score, nms)
        self.history.add(comparison)
        return comparison, request

    def rerender(self, request: CachedRequest, score: float, nms: float) -> Comparison:
        return compare_sides(
            request, self.models, score_thresh=score, nms_thresh=nms, max_det=self.cfg.max_det
        )

    def side_markdown(self, comparison: Comparison, role: str) -> str:
        side = getattr(comparison, role)
        lat = side.latency()
        only = int((~side.matched).sum())
        return (
            f"**{len(side.detections)} detections** ({only} not found by the other model) · "
            f"**{lat['total_ms']:.1f} ms** = pre {lat['pre_ms']:.1f} + infer "
            f"{lat['infer_ms']:.1f} + post {lat['post_ms']:.1f}"
        )

    def latency_rows(self, comparison: Comparison) -> list[list[Any]]:
        rows = []
        for side in (comparison.teacher, comparison.student):
            lat = side.latency()
            rows.append(
                [
                    side.model.role,
                    side.model.backend.describe(),
                    round(lat["pre_ms"], 2),
                    round(lat["infer_ms"], 2),
                    round(lat["post_ms"], 2),
                    round(lat["total_ms"], 2),
                    round(1000.0 / max(lat["total_ms"], 1e-9), 1),
                    round(self.history.median_total_ms(side.model.role), 2),
                    len(side.detections),
                ]
            )
        return rows
