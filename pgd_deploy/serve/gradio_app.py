"""`pgd-serve demo`: the teacher-vs-student web demo (gradio is imported inside the builder).

Layout: the input (upload or example) with the score and NMS sliders, then teacher and student
side by side (annotated image, detection count, latency), a comparison panel (speed-up,
agreement, boxes found by one model only), a latency table and a latency chart over the last
requests. A JSON panel carries everything machine-readable; it is also the API output.

Events: changing the image runs both models (`/detect`); moving a slider re-post-processes the
cached outputs without running the models (`/rerender`). Model runs are serialised (concurrency
limit 1, see `MODEL_CONCURRENCY`); re-rendering is cheap numpy work and runs in parallel.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from pgd_deploy.config import ServeConfig
from pgd_deploy.runtime.preprocess import load_image
from pgd_deploy.runtime.verify import verify_artifact
from pgd_deploy.serve.artifacts import open_gated
from pgd_deploy.serve.draw import HIGHLIGHT
from pgd_deploy.serve.examples import DemoExamples
from pgd_deploy.serve.side_by_side import (
    AGREEMENT_IOU,
    LATENCY_HEADERS,
    CachedRequest,
    Comparison,
    DemoApp,
    DemoModel,
)

logger = logging.getLogger(__name__)

# One model run at a time: a TensorRT engine has one execution context (and the GPU one stream
# here); on CPU, ONNX Runtime and PyTorch already use every core for one request. Parallel runs
# would only queue inside the backend and inflate the latency the demo reports.
MODEL_CONCURRENCY = 1
MAX_WAITING = 16  # requests queued beyond this are refused ("queue full")
START_EXAMPLES = 6  # examples the slider's starting score is chosen on (`DemoApp.start_score`)
RERENDER_CONCURRENCY = 4  # slider re-renders: numpy post-processing only
COLOR_MAP = {"teacher": "#1f77b4", "student": "#ff7f0e"}
CSS = """
.pgd-cards {display: flex; gap: 12px; flex-wrap: wrap;}
.pgd-card {flex: 1 1 150px; border: 1px solid var(--border-color-primary); border-radius: 10px;
  padding: 10px 14px; background: var(--background-fill-secondary);}
.pgd-value {font-size: 1.7em; font-weight: 700; line-height: 1.2;}
.pgd-label {font-size: 0.85em; color: var(--body-text-color-subdued);}
.pgd-warn .pgd-value {color: #c0008f;}
.pgd-note {font-size: 0.85em; color: var(--body-text-color-subdued); margin-top: 8px;}
"""


def _import_gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the web demo needs gradio: pip install 'pgd-deploy[serve]'") from None
    return gr


def comparison_html(comparison: Comparison) -> str:
    """The comparison panel: speed-up, agreement and one-model-only counts."""
    t_only = int((~comparison.teacher.matched).sum())
    s_only = int((~comparison.student.matched).sum())
    cards = [
        (
            "",
            f"{comparison.speedup:.2f}×",
            f"student speed-up, end to end<br>inference {comparison.infer_speedup:.2f}×",
        ),
        (
            "",
            "–" if comparison.agreement is None else f"{100 * comparison.agreement:.0f}%",
            "agreement · nothing to compare: neither model has a box at this score"
            if comparison.agreement is None
            else f"agreement · {comparison.matched} matched pairs",
        ),
        ("pgd-warn" if t_only else "", str(t_only), "teacher only (missed by the student)"),
        ("pgd-warn" if s_only else "", str(s_only), "student only (not in the teacher)"),
    ]
    body = "".join(
        f'<div class="pgd-card {cls}"><div class="pgd-value">{html.escape(value)}</div>'
        f'<div class="pgd-label">{label}</div></div>'
        for cls, value, label in cards
    )
    note = (
        f"Boxes match when they have the same class and IoU ≥ {AGREEMENT_IOU:g}, at score ≥ "
        f"{comparison.score_thresh:.2f} and NMS IoU {comparison.nms_thresh:.2f}. "
        f'<b style="color:{HIGHLIGHT}">Dashed magenta</b> boxes were found by one model only.'
    )
    return f'<div class="pgd-cards">{body}</div><p class="pgd-note">{note}</p>'


def _layout(gr: Any, app: DemoApp, examples: Sequence[str | Path]) -> SimpleNamespace:
    """Place the components (inside an open gr.Blocks); returns them by name."""
    teacher, student = app.models
    cfg = app.cfg
    ui = SimpleNamespace()
    gr.Markdown(
        "## Prediction-Guided Distillation: teacher vs student\n"
        "Upload an image or pick an example: both models run on it, one after the other. "
        "Latency = pre (letterbox + normalise) + infer + post (threshold + NMS), measured "
        "after warm-up with the benchmark's timing code; decoding is excluded. The sliders "
        "only re-run the post-processing."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            ui.image = gr.Image(
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard", "webcam"],
                label=f"Input (≤ {cfg.max_upload_mb:g} MB, ≤ {cfg.max_pixels / 1e6:g} MP)",
                height=320,
            )
            ui.score = gr.Slider(
                0.0, 1.0, value=app.score_start, step=0.01, label="Score threshold"
            )
            nms = cfg.nms_thresh  # none: the student artifact's own
            if nms is None:
                nms = student.backend.postprocess_kwargs["nms_thresh"]
            ui.nms = gr.Slider(0.05, 1.0, value=nms, step=0.05, label="NMS IoU")
            if examples:
                gr.Examples(
                    examples=[str(p) for p in examples],
                    inputs=ui.image,
                    label="Examples",
                    examples_per_page=12,
                )
        with gr.Column(scale=3):
            with gr.Row():
                for role, model in (("teacher", teacher), ("student", student)):
                    with gr.Column():
                        gr.Markdown(f"### {model.label}\n{model.describe()}")
                        setattr(
                            ui,
                            f"{role}_image",
                            gr.Image(label=role.capitalize(), format="png", interactive=False),
                        )
                        setattr(ui, f"{role}_info", gr.Markdown(label=f"{role} summary"))
            ui.panel = gr.HTML(label="Comparison")
            ui.table = gr.Dataframe(
                headers=LATENCY_HEADERS,
                label=f"Latency in ms: this request, and the median of the last {cfg.history}",
                interactive=False,
            )
    ui.chart = gr.Plot(
        label="Latency chart", show_label=False, format="png", elem_id="pgd-latency-chart"
    )
    with gr.Accordion("Details (JSON, also the API output)", open=False):
        ui.details = gr.JSON(label="Details")
    ui.cache = gr.State(None)
    ui.outputs = [
        ui.teacher_image,
        ui.student_image,
        ui.teacher_info,
        ui.student_info,
        ui.panel,
        ui.table,
        ui.details,
    ]
    return ui


def _views(app: DemoApp, comp: Comparison) -> list[Any]:
    """Values of `ui.outputs` for one comparison."""
    return [
        comp.teacher.image,
        comp.student.image,
        app.side_markdown(comp, "teacher"),
        app.side_markdown(comp, "student"),
        comparison_html(comp),
        {"headers": LATENCY_HEADERS, "data": app.latency_rows(comp)},
        comp.to_dict(),
    ]


def _wire(gr: Any, app: DemoApp, ui: SimpleNamespace) -> None:
    """The events: a new image runs the models; a slider re-post-processes the cached outputs."""

    def on_detect(payload: Any, score: float, nms: float) -> list[Any]:
        if payload is None:  # the image was cleared
            return [*([None] * len(ui.outputs)), gr.skip(), None]
        try:
            decoded = app.decode(payload)
        except ValueError as err:
            raise gr.Error(f"Image refused: {err}") from None
        comp, request = app.detect(decoded, score, nms)
        return [
            *_views(app, comp),
            latency_figure(app.history.snapshot(), app.cfg.history),
            request,
        ]

    def on_rerender(request: CachedRequest | None, score: float, nms: float) -> list[Any]:
        if request is None:
            return [gr.skip()] * len(ui.outputs)
        return _views(app, app.rerender(request, score, nms))

    ui.image.change(
        on_detect,
        [ui.image, ui.score, ui.nms],
        [*ui.outputs, ui.chart, ui.cache],
        api_name="detect",
        preprocess=False,  # decoded by `DemoApp.decode` with the pixel cap and clear errors
        concurrency_limit=MODEL_CONCURRENCY,
        concurrency_id="models",
    )
    for slider in (ui.score, ui.nms):
        slider.change(
            on_rerender,
            [ui.cache, ui.score, ui.nms],
            ui.outputs,
            api_name="rerender" if slider is ui.score else None,
            api_visibility="public" if slider is ui.score else "private",
            trigger_mode="always_last",
            show_progress="hidden",
            concurrency_limit=RERENDER_CONCURRENCY,
            concurrency_id="rerender",
        )


def build_demo(app: DemoApp, examples: Sequence[str | Path] = ()) -> Any:
    """The gr.Blocks of the demo (not launched)."""
    gr = _import_gradio()
    with gr.Blocks(title="PGD: teacher vs student", analytics_enabled=False) as demo:
        _wire(gr, app, _layout(gr, app, examples))
    demo.queue(max_size=MAX_WAITING, default_concurrency_limit=MODEL_CONCURRENCY)
    return demo


def latency_figure(rows: Sequence[dict[str, Any]], history: int) -> Any:
    """Matplotlib figure of the latency history: total (solid) and inference (dashed) per model.

    Built with `matplotlib.figure.Figure` (no pyplot state), so concurrent sessions are safe.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError(
            "the latency chart needs matplotlib: pip install 'pgd-deploy[serve]'"
        ) from None
    fig = Figure(figsize=(11, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for role, colour in COLOR_MAP.items():
        mine = [r for r in rows if r["model"] == role]
        if not mine:
            continue
        x = [r["request"] for r in mine]
        ax.plot(x, [r["total_ms"] for r in mine], "o-", color=colour, ms=4, label=f"{role} total")
        infer = [r["infer_ms"] for r in mine]
        ax.plot(x, infer, ".--", color=colour, alpha=0.6, label=f"{role} infer")
    ax.set_title(f"Latency of the last {history} requests", loc="left", fontsize=10)
    ax.set_xlabel("request #")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(0, 1.1 * max((r["total_ms"] for r in rows), default=1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if rows:
        requests = [r["request"] for r in rows]
        ax.set_xlim(min(requests) - 0.5, max(requests) + 0.5)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncols=4, frameon=False)
    return fig


def open_app(
    teacher: str | Path,
    student: str | Path,
    *,
    cfg: ServeConfig | None = None,
    device: str = "auto",
    allow_failed: bool = False,
    allow_unverified: bool = False,
    gate_images: Sequence[np.ndarray] = (),
    gate_source: str = "",
) -> DemoApp:
    """Load both artifacts (any of .pt, .onnx, .plan) into a `DemoApp`.

    A checkpoint side runs at `cfg.torch_options(role)`; anything but fp32 eager is gated
    against fp32 eager on `gate_images` first (`serve.artifacts.open_gated`).

    Raises:
        ValueError: unreadable artifacts, an export its manifest does not vouch for (unless
            `allow_unverified`; `runtime.verify`), an export whose manifest says it failed its
            gates or a checkpoint setting that fails them (unless `allow_failed`), or teacher
            and student with different class lists.
    """
    _import_gradio()  # fail before loading models when gradio is missing
    cfg = cfg or ServeConfig()
    trust = {"allow_failed": allow_failed, "allow_unverified": allow_unverified}
    for path in (teacher, student):  # both, before either loads (the hash is computed once)
        verify_artifact(path, **trust)
    models = [
        DemoModel(
            role,
            path,
            open_gated(
                path,
                gate_images,
                device=device,
                options=cfg.torch_options(role),
                **trust,
                source=gate_source,
            ),
        )
        for role, path in (("teacher", teacher), ("student", student))
    ]
    return DemoApp(*models, cfg)


def serve(app: DemoApp, examples: DemoExamples | None, *, block: bool = True) -> Any:
    """Warm the models up, build the demo and serve it on `app.cfg.host:app.cfg.port`.

    Args:
        examples: the example images; their folder is the only one the server may serve files
            from (the caller closes it after the server stopped).
        block: serve until interrupted; False returns the running gr.Blocks (tests; call its
            `close()` to stop).
    """
    gr = _import_gradio()
    cfg = app.cfg
    images = examples.images if examples is not None else []
    app.warmup(load_image(images[0]) if images else np.zeros((64, 64, 3), np.uint8))
    logger.info("warmed up: %s; %s", *(m.describe() for m in app.models))
    app.score_start = app.start_score([load_image(p) for p in images[:START_EXAMPLES]])
    logger.info(
        "the score slider starts at %.2f (%s)",
        app.score_start,
        "--score-thresh" if cfg.demo_score is not None else "where both models show their boxes",
    )
    demo = build_demo(app, images)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the demo is reachable from other machines", cfg.host)
    demo.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=False,
        max_file_size=int(cfg.max_upload_mb * 1024 * 1024),
        allowed_paths=[str(examples.folder)] if examples is not None else [],
        prevent_thread_lock=not block,
        ssr_mode=False,
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api", "gradio"],
    )
    return demo


def launch_demo(
    teacher: str | Path,
    student: str | Path,
    *,
    cfg: ServeConfig | None = None,
    examples_dir: str | Path | None = None,
    device: str = "auto",
    block: bool = True,
    allow_failed: bool = False,
    allow_unverified: bool = False,
) -> Any:
    """`pgd-serve demo`: open both artifacts and serve the demo (127.0.0.1:7860 by default).

    The example images (built-in ones plus decoded copies of `examples_dir`'s) live in a
    temporary folder that is deleted when the server stops; with `block=False` it lives as long
    as the returned gr.Blocks (its `pgd_examples`), and at most until the interpreter exits.

    Raises:
        ValueError: unreadable artifacts, mismatched class lists or a bad examples folder.
    """
    cfg = cfg or ServeConfig()
    examples = DemoExamples(examples_dir, max_pixels=cfg.max_pixels)
    try:
        shown = examples.images[: cfg.gate_images]
        app = open_app(
            teacher,
            student,
            cfg=cfg,
            device=device,
            allow_failed=allow_failed,
            allow_unverified=allow_unverified,
            gate_images=[load_image(p) for p in shown],
            gate_source=f"{len(shown)} demo examples",
        )
        demo = serve(app, examples, block=block)
    except BaseException:
        examples.close()
        raise
    if block:
        examples.close()  # the server has stopped
    else:
        demo.pgd_examples = examples
    return demo
