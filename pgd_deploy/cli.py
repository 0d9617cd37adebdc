"""Console scripts `pgd-train`, `pgd-export`, `pgd-serve`.

Each command parses its arguments, loads the configuration and calls one library function; stage
modules are imported lazily so `--help` is instant and torch is loaded only when needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pgd_deploy.cli_support import add_verbose, fail, run_command, setup_logging
from pgd_deploy.config import DataConfig, add_override_argument
from pgd_deploy.config.bounds import flag_of


def _fail(message: str) -> int:
    return fail("pgd-train", message)


# --------------------------------------------------------------------------------------------
# pgd-train
# --------------------------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgd-train",
        description="Train teachers, students and PGD-distilled students; evaluate; prepare data.",
    )
    add_verbose(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="train a detector from a recipe")
    fit.add_argument(
        "--recipe", required=True, help="TOML recipe, e.g. train/fcos_r50_1x_coco.toml"
    )
    add_override_argument(fit, "override a config key, e.g. --set train.max_iters=100 (repeatable)")
    fit.add_argument("--work-dir", help="output folder (default: train.work_dir)")
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in WORK_DIR from its last.pt (a finished run is left as it is)",
    )
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run WORK_DIR holds (without it, such a folder is refused)",
    )

    ev = sub.add_parser("eval", help="COCO or crowd metrics of a checkpoint or of a results file")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint to evaluate on its validation data")
    src.add_argument("--predictions", help="COCO results JSON to evaluate")
    ev.add_argument("--annotations", help="COCO annotation JSON (with --predictions)")
    ev.add_argument(
        "--metric",
        choices=("coco", "crowd"),
        default="coco",
        help="with --predictions: COCO AP, or CrowdHuman's MR^-2/AP/JI (a checkpoint uses its "
        "data.metric)",
    )
    add_override_argument(
        ev, "override data/model keys of the checkpoint's config (with --checkpoint)"
    )
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda (with --checkpoint)")

    data = sub.add_parser("data", help="dataset converters").add_subparsers(
        dest="data_command", required=True, metavar="CONVERTER"
    )
    yolo = data.add_parser("from-yolo", help="YOLO folders -> COCO JSON")
    yolo.add_argument("--images", required=True, help="folder of images")
    yolo.add_argument("--labels", required=True, help="folder of YOLO .txt labels")
    yolo.add_argument("--names", required=True, help="YAML with 'names:' or one name per line")
    yolo.add_argument("--out", required=True, help="COCO JSON to write")
    crowd = data.add_parser(
        "crowdhuman", help="CrowdHuman odgt -> COCO JSON (one class; ignore regions as iscrowd)"
    )
    crowd.add_argument("--odgt", required=True, help="annotation file, e.g. annotation_train.odgt")
    crowd.add_argument("--images", required=True, help="folder holding <ID>.jpg of every record")
    crowd.add_argument("--out", required=True, help="COCO JSON to write")
    crowd.add_argument(
        "--box", choices=("fbox", "vbox"), default="fbox", help="full body (fbox) or visible part"
    )
    shapes = data.add_parser(
        "shapes", help="write the built-in synthetic shapes dataset (or, with --crowd, crowd)"
    )
    shapes.add_argument(
        "--crowd",
        action="store_true",
        help="the synthetic crowd instead: one class, overlapping figures, ignore regions, odgt",
    )
    shapes.add_argument("--out", required=True, help="output folder")
    for name, key, what in (
        ("train", "shapes_train", "training images (400)"),
        ("val", "shapes_val", "validation images (100)"),
        ("size", "shapes_size", "image side, px (128)"),
        ("seed", "shapes_seed", "generator seed (0)"),
    ):
        default = getattr(DataConfig, key)
        shapes.add_argument(f"--{name}", type=flag_of(DataConfig, key), default=default, help=what)

    demo = sub.add_parser(
        "demo", help="the quickstart: teacher, student, PGD student, int8 PGD student, scoreboard"
    )
    demo.add_argument(
        "--work-dir", default=None, help="output folder (runs/demo, with --crowd runs/demo-crowd)"
    )
    demo.add_argument(
        "--crowd",
        action="store_true",
        help="the crowd quickstart: teacher, student and PGD on the synthetic crowd, scored with "
        "MR^-2, AP and JI, and the PGD student's ONNX gated in MR^-2",
    )
    add_override_argument(demo, "override keys of all four quickstart recipes")
    demo.add_argument(
        "--recipes", default=None, help="folder holding the quickstart_*.toml recipes"
    )
    return p


def _cmd_fit(args: argparse.Namespace) -> int:
    from pgd_deploy.config import TrainJob, load_config
    from pgd_deploy.trainer import fit

    cfg = load_config(TrainJob, args.recipe, args.overrides)
    result = fit(cfg, work_dir=args.work_dir, resume=args.resume, overwrite=args.overwrite)
    return 0 if result.completed else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from pgd_deploy.io_utils import write_json
    from pgd_deploy.metrics import evaluate, format_metrics

    unreadable = ""
    if args.predictions:
        if not args.annotations:
            return _fail("--predictions needs --annotations")
        metrics = evaluate(args.annotations, args.predictions, metric=args.metric)
    else:
        from pgd_deploy.engine import evaluate_checkpoint

        evaluation = evaluate_checkpoint(args.checkpoint, args.overrides, device=args.device)
        unreadable = evaluation.describe_unreadable()
        if not evaluation.read:
            return fail("pgd-train", f"{args.checkpoint}: no metrics: validation {unreadable}", 1)
        metrics = evaluation.metrics
    print(format_metrics(metrics))
    if unreadable:
        print(f"note: validation {unreadable}")
    if args.json:
        write_json(args.json, metrics)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "from-yolo":
        from pgd_deploy.data.yolo import yolo_to_coco

        summary = yolo_to_coco(args.images, args.labels, args.names, args.out)
        print(json.dumps(summary))
        return 0
    if args.data_command == "crowdhuman":
        from pgd_deploy.data.odgt import odgt_to_coco

        summary = odgt_to_coco(args.odgt, args.images, args.out, box_key=args.box)
        print(json.dumps(summary))
        return 0
    if args.crowd:
        from pgd_deploy.data.crowd_shapes import generate_crowd

        out = generate_crowd(
            args.out, train=args.train, val=args.val, seed=args.seed, size=args.size
        )
        print(f"wrote {args.train} train + {args.val} val crowd images to {out}")
        return 0
    from pgd_deploy.data.shapes import ShapesSpec, generate_shapes

    out = generate_shapes(
        args.out, train=args.train, val=args.val, seed=args.seed, spec=ShapesSpec(size=args.size)
    )
    print(f"wrote {args.train} train + {args.val} val images to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.crowd:
        from pgd_deploy.crowd_quickstart import run_crowd_quickstart

        work_dir = args.work_dir or "runs/demo-crowd"
        run_crowd_quickstart(work_dir, overrides=args.overrides, recipes=args.recipes)
        return 0
    from pgd_deploy.quickstart import run_quickstart

    run_quickstart(args.work_dir or "runs/demo", overrides=args.overrides, recipes=args.recipes)
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pgd-train`."""
    args = _train_parser().parse_args(argv)
    setup_logging(args.verbose)
    handlers = {"fit": _cmd_fit, "eval": _cmd_eval, "data": _cmd_data, "demo": _cmd_demo}
    return run_command("pgd-train", lambda: handlers[args.command](args))


# --------------------------------------------------------------------------------------------
# pgd-export and pgd-serve: their parsers live with their stages
# --------------------------------------------------------------------------------------------


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pgd-export`."""
    from pgd_deploy.export.command import main

    return main(argv)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pgd-serve`."""
    from pgd_deploy.serve.command import main

    return main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
