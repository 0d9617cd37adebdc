"""`pgd-serve`: batch inference (`predict`) and the teacher-vs-student web demo (`demo`).

Settings come from `ServeConfig` defaults, then an optional TOML file (`--config`), then
`--set key=value`, then the explicit flags below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Sequence
from typing import Any

from pgd_deploy.cli_support import add_verbose, choices, run_command, setup_logging
from pgd_deploy.config import ServeConfig, add_override_argument, load_config
from pgd_deploy.config.bounds import POSITIVE, at_least, flag, flag_of, greater_than

logger = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file of ServeConfig keys (e.g. serve/configs/*.toml)")
    add_override_argument(p, "override a ServeConfig key, e.g. --set max_det=50 (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument(
        "--score-thresh",
        type=flag_of(ServeConfig, "score_thresh"),
        help="minimum score (predict default: the artifact's; demo: where the slider starts, "
        "default from the models' own scores on the examples)",
    )
    p.add_argument(
        "--nms-thresh",
        type=flag_of(ServeConfig, "nms_thresh"),
        help="class-aware NMS IoU (default: the artifact's)",
    )
    p.add_argument(
        "--allow-failed",
        action="store_true",
        help="serve an export whose manifest says it failed its accuracy gates (with a warning)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="serve an export its manifest does not vouch for (no manifest, gates unfinished, "
        "sha256 or fields differing from the file) with a warning in the log and summary.json",
    )
    p.add_argument(
        "--precision",
        choices=choices(ServeConfig, "precision"),
        help="checkpoints (.pt): autocast precision (fp16 needs CUDA; bf16 a CUDA GPU or a CPU "
        "with bf16 kernels); gated against fp32 eager on the first --gate-images inputs",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="checkpoints: torch.compile the network (first call per batch size compiles)",
    )
    p.add_argument(
        "--compile-mode",
        choices=choices(ServeConfig, "compile_mode"),
        help="torch.compile",
    )
    p.add_argument(
        "--channels-last",
        choices=choices(ServeConfig, "channels_last"),
        help="checkpoints: NHWC (auto: CUDA 16-bit)",
    )
    p.add_argument(
        "--gate-images",
        type=flag_of(ServeConfig, "gate_images"),
        help="inputs gating fp16/bf16/compiled against fp32 (16; 0 off)",
    )
    add_verbose(p)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgd-serve",
        description="Run exported detectors: batch inference and the teacher-vs-student demo.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pr = sub.add_parser(
        "predict",
        help="detect objects in many images; write COCO results JSON",
        description="Artifacts: a checkpoint (.pt), an ONNX model (.onnx) or a TensorRT plan "
        "(.plan/.engine) with its manifest.",
    )
    pr.add_argument("--model", required=True, help="artifact to run (.pt, .onnx, .plan)")
    pr.add_argument(
        "--source",
        required=True,
        help="image folder, glob pattern, list .txt (paths or URIs), COCO .json, or a URI of an "
        "object or folder (s3://bucket/prefix/, gs://..., file://...; needs the [ray] extra)",
    )
    pr.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    for name, what in (
        ("batch", "images per inference call (default: 8)"),
        ("workers", "decode/preprocess threads (default: 2)"),
        ("queue_size", "images decoded ahead of the model (32)"),
        ("max_det", "detections per image (default: the artifact's)"),
    ):
        pr.add_argument("--" + name.replace("_", "-"), type=flag_of(ServeConfig, name), help=what)
    pr.add_argument("--save-images", action="store_true", help="also write annotated images")
    pr.add_argument("--eval", action="store_true", help="metrics (COCO .json source)")
    pr.add_argument(
        "--metric",
        choices=("coco", "crowd"),
        default=None,
        help="with --eval: COCO AP or CrowdHuman's MR^-2/AP/JI (default: the model's data.metric)",
    )
    pr.add_argument("--image-root", help="image folder for a list or COCO source")
    pr.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )
    pr.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (decode threads + one model); ray: Ray Data, decoding in Ray "
        "tasks and the model in a pool of actors (pip install 'pgd-deploy[ray]')",
    )
    pr.add_argument(
        "--actors", type=flag(POSITIVE), default=1, help="ray: inference actors (default: 1)"
    )
    pr.add_argument(
        "--cpus-per-actor",
        type=flag(greater_than(0.0), float),
        default=1.0,
        help="ray: CPUs per actor (default: 1)",
    )
    pr.add_argument(
        "--gpus-per-actor",
        type=flag(at_least(0.0), float),
        default=0.0,
        help="ray: GPUs per actor (default: 0)",
    )
    pr.add_argument(
        "--address",
        help="ray: join this cluster (default: RAY_ADDRESS, else a local Ray with this "
        "machine's cores, stopped at the end)",
    )
    _common(pr)
    demo = sub.add_parser("demo", help="web demo: teacher and student side by side")
    demo.add_argument("--teacher", required=True, help="teacher artifact (.pt, .onnx, .plan)")
    demo.add_argument("--student", required=True, help="student artifact (.pt, .onnx, .plan)")
    demo.add_argument("--host", help="bind address (default: 127.0.0.1, this machine only)")
    demo.add_argument("--port", type=flag_of(ServeConfig, "port"), help="port (default: 7860)")
    demo.add_argument("--examples", help="folder of extra example images")
    for role in ("teacher", "student"):
        demo.add_argument(
            f"--{role}-precision", choices=choices(ServeConfig, "precision"), help=f"{role} only"
        )
        demo.add_argument(
            f"--{role}-compile", action=argparse.BooleanOptionalAction, default=None, help=role
        )
    _common(demo)
    return p


def _config(args: argparse.Namespace) -> ServeConfig:
    cfg = load_config(ServeConfig, args.config, args.overrides)
    flags: dict[str, Any] = {
        "batch": getattr(args, "batch", None),
        "workers": getattr(args, "workers", None),
        "queue_size": getattr(args, "queue_size", None),
        "max_det": getattr(args, "max_det", None),
        # the demo's --score-thresh is where its score slider starts
        "score_thresh" if args.command == "predict" else "demo_score": args.score_thresh,
        "nms_thresh": args.nms_thresh,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "precision": args.precision,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "channels_last": args.channels_last,
        "gate_images": args.gate_images,
        **{
            f"{role}_{key}": getattr(args, f"{role}_{key}", None)
            for role in ("teacher", "student")
            for key in ("precision", "compile")
        },
    }
    return dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """`kill` / `docker stop` end a run like Ctrl-C (predict: valid outputs and a summary)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_options(args: argparse.Namespace, cfg: ServeConfig) -> dict[str, Any]:
    """`run_predict` keyword arguments from the resolved config and the flags."""
    return {
        "batch_size": cfg.batch,
        "workers": cfg.workers,
        "queue_size": cfg.queue_size,
        "score_thresh": cfg.score_thresh,
        "nms_thresh": cfg.nms_thresh,
        "max_det": cfg.max_det,
        "max_pixels": cfg.max_pixels,
        "decode_timeout": cfg.decode_timeout,
        "save_images": args.save_images,
        "draw_score": cfg.draw_score,
        "evaluate": args.eval,
        "metric": args.metric,
        "progress": args.progress,
    }


def _predict(args: argparse.Namespace, cfg: ServeConfig) -> int:
    from pgd_deploy.runtime.verify import verify_artifact
    from pgd_deploy.serve.artifacts import open_gated
    from pgd_deploy.serve.predictor import format_summary, run_predict
    from pgd_deploy.serve.sources import first_images, resolve_source

    source = resolve_source(args.source, image_root=args.image_root)
    trust = {"allow_failed": args.allow_failed, "allow_unverified": args.allow_unverified}
    verify_artifact(args.model, **trust)  # before the source's images are read for the gates
    options = cfg.torch_options()
    gated = options["precision"] != "fp32" or options["compile"]
    images = first_images(source, cfg.gate_images, cfg.max_pixels) if gated else []
    backend = open_gated(
        args.model,
        images,
        device=args.device,
        options=options,
        **trust,
        source=f"the first {len(images)} readable inputs of {args.source}",
    )
    with _sigterm_as_ctrl_c():
        if args.engine == "ray":
            summary = _predict_ray(args, cfg, backend, source)
        else:
            summary = run_predict(backend, source, args.out, **_run_options(args, cfg))
    print(format_summary(summary))
    if summary.metrics is not None:
        from pgd_deploy.metrics import format_metrics

        print(format_metrics(summary.metrics, title=f"COCO bbox ({summary.processed} images)"))
    return summary.exit_code


def _predict_ray(args: argparse.Namespace, cfg: ServeConfig, backend: Any, source: Any) -> Any:
    from pgd_deploy.serve.ray_engine import ray_session, run_predict_ray

    options = _run_options(args, cfg)
    for local_only in ("workers", "queue_size", "decode_timeout"):
        options.pop(local_only)
    pool = {"actors": args.actors, "cpus_per_actor": args.cpus_per_actor}
    with ray_session(args.address, **pool) as reached:
        logger.info("ray: %s, %d actor(s)", reached, args.actors)
        return run_predict_ray(
            backend,
            args.model,
            source,
            args.out,
            **pool,
            gpus_per_actor=args.gpus_per_actor,
            device=args.device,
            allow_unverified=args.allow_unverified,
            **options,
        )


def _demo(args: argparse.Namespace, cfg: ServeConfig) -> int:
    from pgd_deploy.serve.gradio_app import launch_demo

    with _sigterm_as_ctrl_c():  # `kill` stops the server like Ctrl-C: the examples are removed
        launch_demo(
            args.teacher,
            args.student,
            cfg=cfg,
            examples_dir=args.examples,
            device=args.device,
            allow_failed=args.allow_failed,
            allow_unverified=args.allow_unverified,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pgd-serve`; returns the exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)

    def command() -> int:
        cfg = _config(args)
        return (_predict if args.command == "predict" else _demo)(args, cfg)

    return run_command("pgd-serve", command)  # OSError (e.g. the port is in use) exits 2
