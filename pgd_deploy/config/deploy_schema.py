"""The configuration sections of `pgd-export` (`ExportJob`) and `pgd-serve` (`ServeConfig`):
frozen dataclasses, each numeric field with its allowed range (`config.bounds`). The training
sections are in `config.schema`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pgd_deploy.config.bounds import (
    FRACTION,
    IOU,
    NON_NEGATIVE,
    POSITIVE,
    at_least,
    between,
    bounded,
    check_section,
    greater_than,
    require,
)
from pgd_deploy.runtime import defaults as post


@dataclass(frozen=True)
class ExportConfig:
    """`pgd-export`: artifact format, input size, batch profile and precision."""

    format: Literal["onnx", "tensorrt", "triton"] = "onnx"  # artifact to produce
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # numeric precision of the artifact
    # int8 Q/DQ rules: "cpu" = uint8 activations for ONNX Runtime's x86 kernels, "tensorrt" =
    # symmetric int8 (zero point 0; the only choice for a plan); "auto" = tensorrt when a plan is
    # built, else cpu
    int8_target: Literal["auto", "cpu", "tensorrt"] = "auto"
    # (H, W) fixed letterbox input size; () = the size the checkpoint was trained and evaluated
    # at (its data config: `DataConfig.input_size`, e.g. 800x1344 for COCO, 128x128 for the demo)
    imgsz: tuple[int, ...] = bounded((), at_least(32))
    batch_min: int = bounded(1, POSITIVE)  # optimisation profile: smallest batch
    batch_opt: int = bounded(8, POSITIVE)  # optimisation profile: batch tuned for
    batch_max: int = bounded(16, POSITIVE)  # optimisation profile: largest batch
    nms: Literal["none", "onnx"] = "none"  # "onnx": append the standard NonMaxSuppression op
    # detections per image with in-graph NMS (100)
    max_det: int = bounded(post.MAX_DETECTIONS, POSITIVE)
    # in-graph NMS score threshold (0.05; in the manifest)
    conf: float = bounded(post.SCORE_THRESH, FRACTION)
    iou: float = bounded(post.NMS_THRESH, IOU)  # in-graph NMS IoU threshold (0.6; in the manifest)
    # in-graph NMS: (location, class) candidates per image (1000; TensorRT < 3840)
    nms_topk: int = bounded(post.TOPK_CANDIDATES, POSITIVE)
    opset: int = bounded(17, between(13, 23))  # ONNX opset
    exporter: Literal["legacy", "dynamo"] = "legacy"  # torch.onnx exporter
    simplify: bool = True  # run onnxslim (failure is logged, never fatal)
    gate_images: int = bounded(64, POSITIVE)  # images used by the parity and agreement gates
    calib_images: int = bounded(512, POSITIVE)  # int8 calibration images from the training split
    calib_method: Literal["entropy", "minmax", "percentile"] = "minmax"  # int8 calibration
    workspace_gb: float = bounded(4.0, greater_than(0.0))  # TensorRT builder workspace
    builder_opt_level: int = bounded(3, between(0, 5))  # TensorRT builder optimisation level (0-5)
    timing_cache: str = ""  # TensorRT timing cache file ("" = none)
    hw_compat: Literal["none", "ampere+"] = "none"  # TensorRT hardware compatibility level
    triton_source: Literal["onnx", "tensorrt"] = "onnx"  # what the Triton repository serves
    triton_instances: int = bounded(1, POSITIVE)  # Triton instance_group count
    out: str = "exports"  # output folder
    name: str = ""  # artifact base name ("" = derived from the checkpoint)
    val: str = ""  # gate images: COCO JSON or dataset root (+ mAP gate), or a plain image folder
    val_images: str = ""  # image folder of a --val JSON ("" = beside the JSON or ../images)
    # without --val: gate on the checkpoint's own annotated validation split (its data config's
    # val_ann, or the synthetic shapes' labels), which turns the mAP gate on; false: its images
    # without labels (no mAP gate)
    own_val_labels: bool = True
    calib_data: str = ""  # int8 calibration image folder ("" = the checkpoint's training images)
    fp32_reference: str = ""  # QAT checkpoint: fp32 model of agreement/mAP ("" = its qat.init)
    trt_version_compatible: bool = False  # TensorRT VERSION_COMPATIBLE (lean runtime in the plan)
    device: str = "auto"  # device for the PyTorch reference ("auto", "cpu", "cuda")

    def __post_init__(self) -> None:
        check_section(self, "export")
        require(
            not self.imgsz or (len(self.imgsz) == 2 and all(v % 32 == 0 for v in self.imgsz)),
            "export.imgsz",
            f"must be [] or [H, W], each a multiple of 32, got {list(self.imgsz)}",
        )
        profile = (
            "the profile needs batch_min <= batch_opt <= batch_max, got "
            f"{self.batch_min}, {self.batch_opt}, {self.batch_max}"
        )
        require(self.batch_min <= self.batch_opt, "export.batch_opt", profile)
        require(self.batch_opt <= self.batch_max, "export.batch_max", profile)


@dataclass(frozen=True)
class GatesConfig:
    """Accuracy gates run by every export. AP tolerances are in AP points (0.1 = 0.001 AP)."""

    fp32_box_atol: float = bounded(1e-3, at_least(0.0))  # max |boxes - reference|, px
    fp32_score_atol: float = bounded(1e-4, at_least(0.0))  # max |scores - reference|
    # mean |out - reference| over boxes (px) and scores
    fp16_mean_abs: float = bounded(1e-2, at_least(0.0))
    # or mean |out - reference| / mean |reference| (Polygraphy-style)
    fp16_mean_rel: float = bounded(1e-2, at_least(0.0))
    # detection agreement with the model the artifact reproduces (its source: the fp32 checkpoint,
    # or a QAT checkpoint's fake-quant model); a reference detection counts as reproduced by a
    # same-class detection at IoU >= agreement_iou (fp32, fp16) or agreement_iou_int8
    agreement_iou: float = bounded(0.9, IOU)
    agreement_iou_int8: float = bounded(0.5, IOU)  # int8 moves boxes by a grid step or two
    agreement_min_fp32: float = bounded(0.99, FRACTION)  # detection agreement required, fp32
    agreement_min_fp16: float = bounded(0.95, FRACTION)  # detection agreement required, fp16
    # detection agreement required, int8: a quantized model is a step function, so detections
    # near the score threshold flip under any perturbation (a QAT model against itself with
    # 1e-4 input noise: 0.965; export/README.md, "Detection agreement of int8")
    agreement_min_int8: float = bounded(0.9, FRACTION)
    # allowed AP drop (points) vs PyTorch, fp32; with data.metric = "crowd" also the allowed
    # MR^-2 rise (points, lower is better), and so for fp16 and int8
    map_tolerance_fp32: float = bounded(0.1, at_least(0.0))
    # allowed AP drop (points) vs PyTorch, fp16
    map_tolerance_fp16: float = bounded(0.3, at_least(0.0))
    # allowed AP drop (points) vs PyTorch, int8
    map_tolerance_int8: float = bounded(1.0, at_least(0.0))
    # QAT int8 parity, layer by layer (export/README.md): the fraction of a quantized conv's int8
    # outputs that land more than half a step from the fake quant's on the same input (float ties)
    # ties reach 2e-3 of a layer; real faults 0.5 and more
    qat_layer_mismatch: float = bounded(1e-2, FRACTION)

    def __post_init__(self) -> None:
        check_section(self, "gates")


@dataclass(frozen=True)
class ExportJob:
    """Everything `pgd-export` needs."""

    export: ExportConfig = field(default_factory=ExportConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass(frozen=True)
class ServeConfig:
    """`pgd-serve`: batch inference and the Gradio demo."""

    batch: int = bounded(8, POSITIVE)  # images per inference call
    workers: int = bounded(2, POSITIVE)  # decode/preprocess threads
    queue_size: int = bounded(32, POSITIVE)  # bounded queue between decoding and inference, images
    # post-processing; none (the default): what the artifact records (its manifest's postprocess
    # block, or a checkpoint's model settings)
    score_thresh: float | None = bounded(None, FRACTION)  # minimum score kept
    nms_thresh: float | None = bounded(None, IOU)  # class-aware NMS IoU
    max_det: int | None = bounded(None, POSITIVE)  # detections per image
    host: str = "127.0.0.1"  # demo bind address
    port: int = bounded(7860, between(0, 65535))  # demo port
    max_upload_mb: float = bounded(20.0, greater_than(0.0))  # demo upload size limit
    # decode limit (decompression bombs are refused)
    max_pixels: int = bounded(40_000_000, POSITIVE)
    history: int = bounded(50, POSITIVE)  # requests kept in the latency chart
    warmup: int = bounded(3, NON_NEGATIVE)  # warm-up runs before timing
    # minimum score drawn on annotated images (predict --save-images)
    draw_score: float = bounded(0.3, FRACTION)
    # where the demo's score slider starts; unset: from the models' own scores on the examples
    # (the highest threshold at which both still show their boxes: `DemoApp.start_score`)
    demo_score: float | None = bounded(None, FRACTION)
    # seconds one image may take to decode before it is a failure
    decode_timeout: float = bounded(60.0, greater_than(0.0))
    # checkpoints (.pt) only: autocast precision (fp16: CUDA; outputs stay fp32), torch.compile,
    # NHWC (auto: CUDA at fp16/bf16); anything but fp32 eager is gated against fp32 eager on the
    # first `gate_images` inputs (0 = ungated). The demo's teacher_*/student_* override per side.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    channels_last: Literal["auto", "on", "off"] = "auto"
    gate_images: int = bounded(16, NON_NEGATIVE)
    teacher_precision: Literal["", "fp32", "fp16", "bf16"] = ""  # "" = precision
    student_precision: Literal["", "fp32", "fp16", "bf16"] = ""
    teacher_compile: bool | None = None  # None = compile
    student_compile: bool | None = None

    def __post_init__(self) -> None:
        check_section(self, "")

    def torch_options(self, role: str = "") -> dict[str, Any]:
        """`load_backend` settings of a checkpoint; role "teacher"/"student": a demo side."""
        precision = getattr(self, f"{role}_precision") if role else ""
        compile = getattr(self, f"{role}_compile") if role else None
        return {
            "precision": precision or self.precision,
            "compile": self.compile if compile is None else compile,
            "compile_mode": self.compile_mode,
            "channels_last": self.channels_last,
        }
