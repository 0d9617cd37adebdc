"""The three accuracy gates every export runs, and the gate report (docs/deployment.md §5).

1. parity: tensor parity against PyTorch on real letterboxed images (`parity.compare`): fp32
   elementwise (boxes atol 1e-3 px, scores 1e-4), fp16 mean error (<= 1e-2 absolute or
   normalised), int8 reported only. A quantization-aware (QAT) int8 export is compared with its
   own fake-quant model in PyTorch, end to end (reported) and layer by layer (gated,
   `qat_export.layerwise_parity`).
2. agreement: label-free detection agreement after NMS with the model the artifact reproduces
   (its source: the fp32 checkpoint for fp32, fp16 and post-training int8; the fake-quant model
   for a QAT checkpoint): the fraction of its detections above the score threshold matched by
   the export with the same class and IoU >= 0.9 (fp32, fp16) or 0.5 (int8, whose grid moves a
   box edge by a step or two), at least 0.99 (fp32), 0.95 (fp16) or 0.9 (int8). For an in-graph NMS
   artifact the PyTorch side selects its NMS candidates as the graph does (the same pre-NMS top-k,
   `same_candidates`); tensor parity then runs on its dense twin.
3. map: with `--val` annotations, COCO AP of the export >= PyTorch AP - tolerance (AP points),
   one-sided as in mmdeploy, same evaluator, same images.
For a QAT export the mAP gate compares with the fp32 student it was fine-tuned from
(`fp32_reference`): what int8 costs against the model one would deploy otherwise. The agreement
of every int8 export with the fp32 model is also measured and reported (`agreement_with_fp32`
in the gate's detail), not gated.
Each gate has its own exit code (`EXIT_CODES`); the first failing gate decides the exit status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pgd_deploy.config import GatesConfig
from pgd_deploy.export.images import ImageSet
from pgd_deploy.export.parity import ParityReport, compare
from pgd_deploy.progress import Progress
from pgd_deploy.runtime.agreement import detection_agreement
from pgd_deploy.structures import Detections

EXIT_CODES = {"parity": 3, "agreement": 4, "map": 5}  # 2 is bad input, 1 an unexpected error


@dataclass
class GateResult:
    """One gate's verdict. `passed` is None when the gate is reported only (or skipped)."""

    name: str
    passed: bool | None
    value: str
    threshold: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateReport:
    """All gate results of one artifact."""

    artifact: str
    precision: str
    images: int
    image_source: str
    results: list[GateResult] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)  # gate(s) -> what they compare with

    @property
    def passed(self) -> bool:
        return all(r.passed is not False for r in self.results)

    @property
    def exit_code(self) -> int:
        for r in self.results:
            if r.passed is False:
                return EXIT_CODES[r.name]
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "images": self.images,
            "image_source": self.image_source,
            "results": [asdict(r) for r in self.results],
            "references": dict(self.references),
        }

    def to_markdown(self) -> str:
        mark = {True: "pass", False: "FAIL", None: "report"}
        lines = [
            f"### Gates: {self.artifact} ({self.precision})",
            "",
            f"{self.images} images from {self.image_source}",
            *(f"- {gate}: against {what}" for gate, what in self.references.items()),
            "",
            "| gate | result | measured | required |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.name} | {mark[r.passed]} | {r.value} | {r.threshold} |" for r in self.results
        ]
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join([*lines, "", f"Overall: **{verdict}**", ""])


def tolerance_class(precision: str) -> str:
    """The tolerances a precision is judged by: bf16 (PyTorch autocast) as fp16."""
    return "fp16" if precision == "bf16" else precision


def parity_tolerances(precision: str, gates: GatesConfig) -> dict[str, Any]:
    """`compare` keyword arguments for the parity gate at this precision."""
    precision = tolerance_class(precision)
    if precision == "fp32":
        return {"atol": {"boxes": gates.fp32_box_atol, "scores": gates.fp32_score_atol}}
    if precision == "fp16":
        return {"atol": gates.fp16_mean_abs, "rtol": gates.fp16_mean_rel, "stat": "mean"}
    return {"atol": None}  # int8: reported only; detections and mAP decide


def _parity_result(report: ParityReport) -> GateResult:
    outs = report.outputs.values()
    value = ", ".join(f"{o.name} max {o.max_abs:.2e} mean {o.mean_abs:.2e}" for o in outs)
    first = next(iter(outs))
    if first.atol is None:
        threshold = "reported only"
    elif first.stat == "max":
        threshold = ", ".join(f"{o.name} max <= {o.atol:g}" for o in outs)
    elif first.rtol is None:
        threshold = ", ".join(f"{o.name} mean <= {o.atol:g}" for o in outs)
    else:
        threshold = f"mean abs <= {first.atol:g} or normalised mean <= {first.rtol:g}"
    return GateResult("parity", report.passed, value, threshold, report.to_dict())


def agreement_min(precision: str, gates: GatesConfig) -> float:
    return {
        "fp32": gates.agreement_min_fp32,
        "fp16": gates.agreement_min_fp16,
        "int8": gates.agreement_min_int8,
    }[tolerance_class(precision)]


def agreement_iou(precision: str, gates: GatesConfig) -> float:
    return gates.agreement_iou_int8 if tolerance_class(precision) == "int8" else gates.agreement_iou


def map_tolerance(precision: str, gates: GatesConfig) -> float:
    return {
        "fp32": gates.map_tolerance_fp32,
        "fp16": gates.map_tolerance_fp16,
        "int8": gates.map_tolerance_int8,
    }[tolerance_class(precision)]


def _agreement_result(
    ref: Sequence[Detections],
    cand: Sequence[Detections],
    *,
    precision: str,
    gates: GatesConfig,
    score_thresh: float,
) -> GateResult:
    iou = agreement_iou(precision, gates)
    kw = {"iou_thresh": iou, "score_thresh": score_thresh}
    forward = detection_agreement(ref, cand, **kw)
    backward = detection_agreement(cand, ref, **kw)
    n_ref = sum(len(d.filter(score_thresh)) for d in ref)
    n_cand = sum(len(d.filter(score_thresh)) for d in cand)
    minimum = agreement_min(precision, gates)
    passed: bool | None = forward >= minimum if minimum > 0 else None
    value = f"{forward:.4f} of {n_ref} reference detections ({n_cand} exported)"
    threshold = f">= {minimum:g} at IoU {iou:g}" if minimum > 0 else "reported"
    if n_ref == 0:  # nothing to match: say so instead of passing vacuously
        passed = None if n_cand == 0 else False
        value = f"no reference detections above {score_thresh:g} ({n_cand} exported)"
    detail = {
        "agreement": forward,
        "reverse_agreement": backward,
        "reference_detections": n_ref,
        "exported_detections": n_cand,
        "score_thresh": score_thresh,
        "iou": iou,
        "minimum": minimum,
    }
    return GateResult("agreement", passed, value, threshold, detail)


def _map_result(
    images: ImageSet,
    ref: Sequence[Detections],
    cand: Sequence[Detections],
    category_ids: Sequence[int],
    tolerance: float,
    metric: str = "coco",
) -> GateResult:
    """The mAP gate; skipped (not counted) without annotations. With the crowd metrics
    (`metric="crowd"`) MR^-2 may rise by at most the same tolerance (points; lower is better)
    and AP drop by at most it."""
    if images.annotations is None:
        return GateResult("map", None, "skipped", "needs --val annotations", {"skipped": True})
    from pgd_deploy.metrics import detections_to_coco, evaluate

    def score(dets: Sequence[Detections]) -> dict[str, float]:
        results = [
            entry
            for image_id, d in zip(images.image_ids, dets)
            for entry in detections_to_coco(image_id, d, category_ids)
        ]
        return evaluate(images.annotations, results, image_ids=images.image_ids, metric=metric)

    ref_m, cand_m = score(ref), score(cand)
    ref_ap, cand_ap = 100 * ref_m["AP"], 100 * cand_m["AP"]
    passed = cand_ap >= ref_ap - tolerance - 1e-9
    value = f"AP {cand_ap:.2f} vs PyTorch {ref_ap:.2f} (delta {cand_ap - ref_ap:+.2f})"
    detail = {"reference": ref_m, "exported": cand_m, "tolerance_ap_points": tolerance}
    threshold = f"drop <= {tolerance:g} AP"
    if metric == "crowd":
        ref_mr, cand_mr = 100 * ref_m["MR2"], 100 * cand_m["MR2"]
        passed = passed and cand_mr <= ref_mr + tolerance + 1e-9
        value = (
            f"MR^-2 {cand_mr:.2f} vs PyTorch {ref_mr:.2f} (delta {cand_mr - ref_mr:+.2f}, lower "
            f"is better); {value}"
        )
        threshold = f"MR^-2 rise <= {tolerance:g}, AP {threshold}"
        detail["metric"] = "crowd"
    return GateResult("map", passed, value, threshold, detail)


def same_candidates(candidate: Any) -> dict[str, Any]:
    """Reference post-processing overrides that select the NMS candidates as the candidate does.

    An in-graph NMS artifact takes the top `pre_nms_topk` (location, class) pairs over all
    levels (`export/nms.py`); the host default takes a top-k per level. The reference must make
    the same cut, or the gates would measure the cut instead of the export.
    """
    if not getattr(candidate, "in_graph_nms", False):
        return {}
    topk = (getattr(candidate, "meta", None) or {}).get("nms", {}).get("pre_nms_topk")
    return {} if topk is None else {"topk_candidates": int(topk), "level_sizes": None}


def _dense(candidate: Any, dense_candidate: Any | None, artifact: str) -> Any:
    """The model whose dense outputs the parity gate compares."""
    if dense_candidate is not None:
        return dense_candidate
    if getattr(candidate, "in_graph_nms", False):
        raise ValueError(
            f"{artifact or 'candidate'}: in-graph NMS outputs have no dense tensors to compare; "
            "pass its dense twin as dense_candidate"
        )
    return candidate


def run_gates(
    reference: Any,
    candidate: Any,
    images: ImageSet,
    *,
    precision: str,
    gates: GatesConfig,
    imgsz: Sequence[int],
    batch_size: int,
    dense_candidate: Any | None = None,
    artifact: str = "",
    fp32_reference: Any | None = None,
) -> GateReport:
    """Run the three gates in one pass over the images.

    Args:
        reference: the PyTorch backend of the model the artifact reproduces (tensor parity and
            agreement; also mAP unless `fp32_reference` is given).
        candidate: the exported artifact's backend (its own post-processing or in-graph NMS).
        images: gate images (with annotations for the mAP gate).
        precision: "fp32", "fp16" or "int8" (selects the tolerances).
        gates: the tolerances.
        imgsz: (H, W) letterbox size.
        batch_size: images per inference call.
        dense_candidate: for in-graph NMS artifacts, the same model before NMS (tensor parity
            needs the dense outputs); None when `candidate` itself is dense.
        artifact: the artifact name for the report.
        fp32_reference: a QAT export's fp32 student: mAP compares with it (and the reported
            agreement with fp32), while `reference` is the fake-quant model (tensor parity,
            reported end to end, and the agreement gate).
    """
    dense = _dense(candidate, dense_candidate, artifact)
    items = list(images.batches(imgsz, batch_size))
    ref_dets: list[Detections] = []  # the source's (the model the artifact reproduces)
    fp32_dets: list[Detections] = []  # a QAT export's fp32 student's
    cand_dets: list[Detections] = []
    post = reference.postprocess_kwargs
    ref_post = same_candidates(candidate)

    def collect(i: int, batch: np.ndarray, ref_out: Any, dense_out: Any) -> None:
        transforms = items[i][1]
        ref_dets.extend(reference.postprocess(ref_out, transforms, **ref_post))
        if fp32_reference is not None:
            fp32_out = fp32_reference.infer(batch)
            fp32_dets.extend(fp32_reference.postprocess(fp32_out, transforms, **ref_post))
        out = dense_out if candidate is dense else candidate.infer(batch)
        cand_dets.extend(candidate.postprocess(out, transforms, **post))
        bar.update(len(transforms))

    what = f"gates of {artifact}" if artifact else "gates"
    with Progress(len(images), f"{what} (parity, agreement, mAP)", unit="img") as bar:
        parity = compare(
            reference,
            dense,
            (b for b, _ in items),
            on_batch=collect,
            **parity_tolerances(precision, gates),
        )
    report = GateReport(artifact, precision, parity.images, images.source)
    report.results.append(_parity_result(parity))
    agreement = _agreement_result(
        ref_dets, cand_dets, precision=precision, gates=gates, score_thresh=post["score_thresh"]
    )
    agreement.detail["reference_postprocess"] = {**post, **ref_post}
    fp32_side = fp32_dets if fp32_reference is not None else ref_dets
    if tolerance_class(precision) == "int8":  # reported, never gated: mAP judges int8 vs fp32
        iou = agreement_iou(precision, gates)
        agreement.detail["agreement_with_fp32"] = detection_agreement(
            fp32_side, cand_dets, iou_thresh=iou, score_thresh=post["score_thresh"]
        )
        agreement.detail["agreement_with_fp32_iou"] = iou
        with_fp32 = agreement.detail["agreement_with_fp32"]
        agreement.value += f"; with the fp32 model {with_fp32:.4f} (reported)"
    report.results.append(agreement)
    if fp32_reference is not None:
        fp32_name = f"the fp32 model {getattr(fp32_reference, 'path', None) or ''}".strip()
        report.references = {
            "parity, agreement": "the fake-quant model in PyTorch (the model QAT trained)",
            "map, agreement with fp32 (reported)": fp32_name,
        }
    metric = getattr(fp32_reference or reference, "metric", "coco")
    tolerance = map_tolerance(precision, gates)
    report.results.append(
        _map_result(images, fp32_side, cand_dets, reference.category_ids, tolerance, metric)
    )
    return report


def gate_torch_backend(
    candidate: Any, images: ImageSet, *, gates: GatesConfig | None = None, batch_size: int = 8
) -> GateReport:
    """Gate a checkpoint that runs at fp16/bf16 and/or compiled (`TorchBackend`) like an export:
    against the same checkpoint in fp32 eager on `images`, with the export tolerances of its
    precision (bf16 as fp16; compiled fp32 as fp32).

    Raises:
        ValueError: the candidate has no checkpoint file to load the fp32 reference from.
    """
    from pgd_deploy.runtime.torch_backend import TorchBackend

    if getattr(candidate, "path", None) is None:
        raise ValueError("gate_torch_backend: the candidate needs its checkpoint path")
    reference = TorchBackend(
        candidate.path, device=str(candidate.device), input_size=candidate.input_size
    )
    report = run_gates(
        reference,
        candidate,
        images,
        precision=candidate.precision,
        gates=gates or GatesConfig(),
        imgsz=candidate.input_size,
        batch_size=batch_size,
        artifact=candidate.describe(),
    )
    report.references = {"parity, agreement, map": "the same checkpoint in fp32 eager PyTorch"}
    return report
