"""Where int8 loses detection agreement with the fp32 student; what calibration or QAT wins back.

    python bench/int8_agreement.py --fp32 runs/demo/pgd/best.pt --teacher runs/demo/teacher/best.pt
    python bench/int8_agreement.py --fp32 ... --teacher ... --no-qat     # calibration rows only

Every row is the fp32 student (`--fp32`) changed one way and run in PyTorch on the validation
split of its data; the columns are its COCO AP and its detection agreement with the unchanged
student (the export gate's measure: the fraction of the fp32 detections with score >= s matched
one to one by a detection of the same class at IoU >= `--iou`, 0.5 by default, the int8 gate's)
at the gate's threshold s = 0.05 and at 0.1 and 0.2; then the same at IoU 0.9 and s = 0.05 (the
fp32 and fp16 gates' IoU, the int8 definition before 2026-12-06); and the row's noise floor: its
agreement with itself when 1e-4 (normalised units) of Gaussian noise is added to its input. A
post-training int8 export's gate is the first column (fp32 is its source); a QAT export's gate
compares with its own fake-quant model, which the noise floor bounds from above: ONNX Runtime's
integer arithmetic moves a quantized model about as much as that noise. The int8 rows are modelopt
fake quantization with the QAT placement (`pgd_deploy.qat`), which the int8 export reproduces
layer by layer.

Rows:
- bf16 autocast: the reference for a precision loss that is not int8;
- calibration only (no training), with the QAT placement: max ranges on 64 training images (the
  start of every QAT run), on 256, MSE-searched weight ranges, percentile activation ranges, and
  the placement without the conv-output quantizers (not what ONNX Runtime's int8 kernels run:
  they need a quantized output; shows what those quantizers cost);
- QAT fine-tunes from the 64-image start (`--qat-steps` steps of `train/quickstart_qat.toml`): the
  recipe's objective (detection + PGD against `--teacher`), that plus an output distillation from
  the fp32 student (the QAD idea: the fake-quant student matches the fp32 student's class
  probabilities, centerness and box distances at the locations it scores >= 0.01), and the
  output distillation alone at three learning rates.
Then, for the 64-image calibration row, where the unmatched fp32 detections lie by score.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

THRESHOLDS = (0.05, 0.1, 0.2)
NOISE = 1e-4  # std of the input noise of the noise-floor column (normalised input units)
RECIPE = Path(__file__).resolve().parents[1] / "train" / "quickstart_qat.toml"


def _val_predictions(
    model: Any, cfg: Any, noise: float = 0.0
) -> tuple[list[Any], dict[str, float]]:
    """Detections on the validation split, and their COCO AP / AP50 (points); with `noise`, of
    inputs with that much Gaussian noise added (seeded)."""
    import torch

    from pgd_deploy.data.dataset import build_dataset, collate
    from pgd_deploy.metrics import detections_to_coco, evaluate_coco

    dataset = build_dataset(cfg.data, "val", train=False)
    dets: list[Any] = []
    results: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            batch = collate([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            images = batch.images
            if noise:
                images = images + noise * torch.randn(images.shape, generator=gen)
            out = model.predict(images, batch.transforms)
            for image_id, det in zip(batch.image_ids, out):
                results.extend(detections_to_coco(image_id, det, dataset.coco.category_ids))
            dets.extend(out)
    image_ids = [r.image_id for r in dataset.coco.images]
    metrics = evaluate_coco(dataset.coco.raw, results, image_ids=image_ids)
    return dets, {"AP": 100 * metrics["AP"], "AP50": 100 * metrics["AP50"]}


def _fake_quant(
    fp32: Any,
    cfg: Any,
    *,
    images: int,
    act: str = "max",
    weights: str = "max",
    outputs: bool = True,
) -> Any:
    """A calibrated fake-quant copy of `fp32` with the QAT placement, calibrated on the first
    `images` training images of `cfg.data`."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.model_calib import enable_stats_collection

    from pgd_deploy import qat

    model = copy.deepcopy(fp32)
    qat.fold_batchnorm(model)
    calib_cfg = dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat, calib_images=images))
    batches = list(qat.calibration_batches(calib_cfg, torch.device("cpu")))

    def loop(module: Any) -> None:
        with torch.no_grad():
            for b in batches:
                module(b)

    quant = qat.quant_config()
    quant["algorithm"] = "mse" if weights == "mse" else "max"
    with qat._quiet_modelopt():
        if act == "max":
            mtq.quantize(model, quant, loop)
        else:  # histogram calibrators on the activations, max on the weights
            for entry in quant["quant_cfg"]:
                if entry.get("quantizer_name") in ("*input_quantizer", "*output_quantizer"):
                    entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
            quant["algorithm"] = None
            mtq.quantize(model, quant, None)
            enable_stats_collection(model)
            loop(model)
            for name, module in model.named_modules():
                if type(module).__name__ != "TensorQuantizer" or module._disabled:
                    continue
                if name.endswith("weight_quantizer"):
                    module.load_calib_amax()
                else:
                    module.load_calib_amax("percentile", percentile=float(act.split(":")[1]))
                module.enable_quant()
                module.disable_calib()
    if not outputs:
        for name, module in model.named_modules():
            if name.endswith("output_quantizer"):
                module.disable()
    return model.eval()


class _Bf16:
    """`model.predict` under CPU bf16 autocast."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict(self, images: Any, transforms: Any) -> Any:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model.predict(images, transforms)


class OutputDistillation:
    """Loss provider: the PGD distiller's terms (optional) plus the fake-quant student matching the
    frozen fp32 student's outputs at the locations the fp32 student scores >= 0.01."""

    def __init__(self, fp32: Any, inner: Any, weight: float, keep_inner: bool) -> None:
        self.fp32, self.inner = fp32, inner
        self.teacher = getattr(inner, "teacher", None)
        self.loss_weights = dict(getattr(inner, "loss_weights", {}))
        if not keep_inner:  # output distillation alone: the detection and PGD terms weigh 0
            for name in [*self.loss_weights, "loss_cls", "loss_box", "loss_ctr"]:
                self.loss_weights[name] = 0.0
        self.loss_weights.update({"out_cls": weight, "out_box": weight, "out_ctr": weight})

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def __call__(self, images: Any, outputs: Any, targets: Any) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from pgd_deploy.models.heads import flatten_levels

        terms = self.inner(images, outputs, targets)
        with torch.no_grad():
            ref = self.fp32(images)
            prob = flatten_levels(ref.cls_logits).float().sigmoid()
            ctr = flatten_levels(ref.quality).float().sigmoid()[..., 0]
            box = flatten_levels(ref.box_regression).float()
            where = ((prob.max(-1).values * ctr) >= 0.01).float()
            norm = where.sum().clamp(min=1.0)
        cls = flatten_levels(outputs.cls_logits).float()
        terms["out_cls"] = (
            where[..., None] * F.binary_cross_entropy_with_logits(cls, prob, reduction="none")
        ).sum() / norm
        own_ctr = flatten_levels(outputs.quality).float()[..., 0]
        terms["out_ctr"] = (
            where * F.binary_cross_entropy_with_logits(own_ctr, ctr, reduction="none")
        ).sum() / norm
        own_box = flatten_levels(outputs.box_regression).float()
        terms["out_box"] = (where * (own_box - box).abs().sum(-1)).sum() / norm
        return terms


def _qat(
    cfg: Any, work: Path, *, lr: float, steps: int, out_weight: float, keep_inner: bool
) -> Any:
    """Fine-tune a QAT student from `cfg` and return it (fake quant, eval mode)."""
    from pgd_deploy.distill import build_distiller
    from pgd_deploy.models import load_detector
    from pgd_deploy.trainer import fit

    train = dataclasses.replace(cfg.train, base_lr=lr, max_iters=steps, log_every=10_000)
    run_cfg = dataclasses.replace(cfg, train=train)

    def provider(student: Any, device: Any) -> Any:
        inner = build_distiller(run_cfg.distill, student, device=device, seed=train.seed)
        if out_weight <= 0:
            return inner
        fp32 = load_detector(cfg.qat.init, device="cpu").detector.eval()
        fp32.requires_grad_(False)
        return OutputDistillation(fp32, inner, out_weight, keep_inner)

    shutil.rmtree(work, ignore_errors=True)
    fit(run_cfg, work_dir=work, make_loss_provider=provider)
    return load_detector(work / "last.pt", device="cpu").detector.eval()


def _unmatched_by_score(
    ref: list[Any], cand: list[Any], iou_thresh: float
) -> list[tuple[str, int, int, int]]:
    """(score band, fp32 detections, unmatched, unmatched with a same-class box at IoU >= 0.5)."""
    import numpy as np

    from pgd_deploy.runtime.agreement import match_detections
    from pgd_deploy.runtime.postprocess import box_iou

    bands = ((0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 1.01))
    rows = {b: [0, 0, 0] for b in bands}
    for r, c in zip(ref, cand):
        m = match_detections(r, c, iou_thresh=iou_thresh, score_thresh=THRESHOLDS[0])
        rr, cc = r.filter(THRESHOLDS[0]), c.filter(THRESHOLDS[0])
        for i, score in enumerate(rr.scores):
            band = next(b for b in bands if b[0] <= score < b[1])
            rows[band][0] += 1
            if m.matched_ref[i]:
                continue
            rows[band][1] += 1
            if len(cc):
                iou = box_iou(rr.boxes[i : i + 1], cc.boxes)[0]
                rows[band][2] += int(np.any((iou >= 0.5) & (cc.labels == rr.labels[i])))
    return [(f"[{lo:g}, {min(hi, 1):g})", *v) for (lo, hi), v in rows.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp32", required=True, type=Path, help="fp32 student checkpoint")
    p.add_argument("--teacher", type=Path, help="PGD teacher of the QAT rows")
    p.add_argument("--qat-steps", type=int, default=40, help="steps of each QAT row")
    p.add_argument("--no-qat", action="store_true", help="calibration rows only")
    p.add_argument("--iou", type=float, default=0.5, help="agreement IoU (the int8 gate's)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args()
    if not args.no_qat and not args.teacher:
        p.error("--teacher is needed for the QAT rows (or pass --no-qat)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from pgd_deploy.config import TrainJob, load_config
    from pgd_deploy.models import load_detector
    from pgd_deploy.runtime.agreement import detection_agreement

    torch.manual_seed(0)
    overrides = [f"qat.init='{args.fp32}'"]
    if args.teacher:
        overrides.append(f"distill.teacher='{args.teacher}'")
    cfg = load_config(TrainJob, RECIPE, overrides)
    fp32 = load_detector(args.fp32, device="cpu").detector.eval()
    ref, ref_ap = _val_predictions(fp32, cfg)

    from pgd_deploy.devices import cpu_bf16_isa

    rows: list[tuple[str, Any]] = []
    if cpu_bf16_isa():  # emulated bf16 takes tens of minutes per row and says nothing new
        rows.append(("bf16 autocast (no int8)", lambda: _Bf16(fp32)))
    else:
        print("bf16 row skipped: this CPU has no bf16 instructions", file=sys.stderr)
    rows += [
        ("int8, max ranges, 64 images (QAT start)", lambda: _fake_quant(fp32, cfg, images=64)),
        ("int8, max ranges, 256 images", lambda: _fake_quant(fp32, cfg, images=256)),
        ("int8, MSE weight ranges", lambda: _fake_quant(fp32, cfg, images=64, weights="mse")),
        (
            "int8, activations percentile 99.99",
            lambda: _fake_quant(fp32, cfg, images=64, act="percentile:99.99"),
        ),
        (
            "int8, activations percentile 99.999",
            lambda: _fake_quant(fp32, cfg, images=64, act="percentile:99.999"),
        ),
        (
            "int8, no conv-output quantizers (not exportable)",
            lambda: _fake_quant(fp32, cfg, images=64, outputs=False),
        ),
    ]
    lr0 = cfg.train.base_lr
    qat_rows = (  # name, lr, output-distillation weight, keep detection + PGD terms
        (f"QAT: detection + PGD (recipe), lr {lr0:g}", lr0, 0.0, True),
        (f"QAT: detection + PGD + output distillation, lr {lr0:g}", lr0, 1.0, True),
        (f"QAT: output distillation only, lr {lr0:g}", lr0, 1.0, False),
        (f"QAT: output distillation only, lr {4 * lr0:g}", 4 * lr0, 1.0, False),
        (f"QAT: output distillation only, lr {20 * lr0:g}", 20 * lr0, 1.0, False),
    )
    tmp = Path(tempfile.mkdtemp(prefix="int8_agreement_"))
    if not args.no_qat:
        for i, (name, lr, weight, keep) in enumerate(qat_rows):
            rows.append(
                (
                    f"{name}, {args.qat_steps} steps",
                    lambda i=i, lr=lr, w=weight, k=keep: _qat(
                        cfg,
                        tmp / f"qat{i}",
                        lr=lr,
                        steps=args.qat_steps,
                        out_weight=w,
                        keep_inner=k,
                    ),
                )
            )
    from tqdm import tqdm

    table: list[dict[str, Any]] = []
    breakdown = None
    try:  # the QAT rows leave two checkpoints each in tmp
        for name, build in tqdm(rows, desc="rows", file=sys.stderr):
            with contextlib.redirect_stdout(sys.stderr):
                model = build()
                dets, ap = _val_predictions(model, cfg)
                noisy, _ = _val_predictions(model, cfg, noise=NOISE)
            agree = {
                t: detection_agreement(ref, dets, iou_thresh=args.iou, score_thresh=t)
                for t in THRESHOLDS
            }
            s0 = THRESHOLDS[0]
            table.append(
                {
                    "row": name,
                    **ap,
                    **{f"agreement@{t:g}": a for t, a in agree.items()},
                    "agreement_iou0.9": detection_agreement(
                        ref, dets, iou_thresh=0.9, score_thresh=s0
                    ),
                    "noise_floor": detection_agreement(
                        dets, noisy, iou_thresh=args.iou, score_thresh=s0
                    ),
                }
            )
            if breakdown is None and name.startswith("int8, max ranges, 64"):
                breakdown = _unmatched_by_score(ref, dets, args.iou)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nfp32 student {args.fp32}: AP {ref_ap['AP']:.2f}, AP50 {ref_ap['AP50']:.2f}, "
        f"{sum(len(d.filter(THRESHOLDS[0])) for d in ref)} detections >= {THRESHOLDS[0]:g}\n"
    )
    heads = " | ".join(f"IoU {args.iou:g}, s>={t:g}" for t in THRESHOLDS)
    print(f"| row | AP | {heads} | IoU 0.9, s>=0.05 | itself, {NOISE:g} input noise |")
    print("|---|---|" + "---|" * (len(THRESHOLDS) + 2))
    for r in table:
        cells = [f"{100 * r[f'agreement@{t:g}']:.1f}%" for t in THRESHOLDS]
        cells += [f"{100 * r['agreement_iou0.9']:.1f}%", f"{100 * r['noise_floor']:.1f}%"]
        print(f"| {r['row']} | {r['AP']:.2f} | {' | '.join(cells)} |")
    if breakdown:
        print("\nint8 (max ranges, 64 images): the fp32 detections it does not reproduce, by score")
        print(
            f"| fp32 score | fp32 detections | unmatched at IoU {args.iou:g} "
            "| of which a same-class box at IoU >= 0.5 |"
        )
        print("|---|---|---|---|")
        for band, n, unmatched, near in breakdown:
            print(f"| {band} | {n} | {unmatched} | {near} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"fp32": ref_ap, "rows": table, "unmatched_by_score": breakdown}, indent=2)
        )


if __name__ == "__main__":
    main()
