"""The configuration sections: frozen dataclasses with every default in one place.

A stage's configuration is a root dataclass (`TrainJob`, `ExportJob`, `ServeConfig`) whose fields
are sections (`model`, `data`, ...); `pgd_deploy.config.loading` reads and writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pgd_deploy.runtime import defaults as post

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The detector: ResNet backbone, FPN P3-P7 and a dense head."""

    # dense head: a name registered in pgd_deploy.models.build.HEADS ("fcos", "atss", "gfl")
    head: str = "fcos"
    depth: int = 50  # ResNet depth: 18, 34, 50, 101 or 152
    weights: str = "none"  # backbone init: "none", "imagenet" (torchvision download) or a path
    num_classes: int = 0  # 0: taken from the training dataset
    fpn_channels: int = 256  # FPN and head width (GroupNorm uses 32 groups, so a multiple of 32)
    head_convs: int = 4  # conv+GN+ReLU blocks per tower
    center_sampling_radius: float = 1.5  # FCOS centre sampling, in strides
    regress_ranges: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)  # FCOS level boundaries, px
    focal_alpha: float = 0.25  # focal loss alpha
    focal_gamma: float = 2.0  # focal loss gamma
    box_loss: Literal["giou", "iou"] = "giou"  # 1 - GIoU, or -log IoU (the official IoULoss)
    reg_max: int = 16  # GFL: each box side is a distribution over reg_max + 1 bins
    score_thresh: float = post.SCORE_THRESH  # inference: minimum class score kept (0.05)
    nms_thresh: float = post.NMS_THRESH  # inference: class-aware NMS IoU (0.6; official FCOS 0.5)
    score_before_centerness: bool = False  # eval: threshold cls, then x centerness (mmdet order)
    topk_candidates: int = post.TOPK_CANDIDATES  # inference: candidates per level before NMS (1000)
    max_detections: int = post.MAX_DETECTIONS  # inference: detections kept per image (100)


@dataclass(frozen=True)
class DataConfig:
    """A COCO-format dataset and the training/evaluation transforms."""

    root: str = ""  # dataset root; "" = the built-in synthetic shapes, generated on first use
    train_images: str = "train2017"  # image folder, relative to root
    train_ann: str = "annotations/instances_train2017.json"  # COCO JSON, relative to root
    val_images: str = "val2017"  # image folder, relative to root
    val_ann: str = "annotations/instances_val2017.json"  # COCO JSON, relative to root
    min_size: int = 800  # shorter side after resizing
    max_size: int = 1333  # longer side at most
    multiscale: tuple[int, ...] = ()  # (lo, hi): training shorter side uniform in [lo, hi]
    hflip: float = 0.5  # horizontal flip probability (training only)
    size_divisible: int = 32  # batch padding multiple
    workers: int = 4  # data loader worker processes (0 = load in the main process)
    cache_dir: str = ""  # where synthetic data is generated; "" = ~/.cache/pgd_deploy
    shapes_train: int = 400  # synthetic: training images
    shapes_val: int = 100  # synthetic: validation images
    shapes_size: int = 128  # synthetic: image side, px
    shapes_seed: int = 0  # synthetic: generator seed
    val_max_images: int = 0  # evaluate on the first N validation images only (0 = all)
    filter_empty: bool = False  # training: drop images with no annotation at all (mmdet)
    min_box_size: float = 0.0  # training: drop boxes narrower or shorter than this, px (mmdet: 1)

    def input_size(self) -> tuple[int, int]:
        """The (H, W) letterbox a model trained on this data is evaluated and served at:
        min_size x max_size, each rounded up to a multiple of 32 (800x1333 -> 800x1344)."""
        return (-(-self.min_size // 32) * 32, -(-self.max_size // 32) * 32)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule, devices and checkpointing."""

    epochs: int = 12  # length of the schedule in epochs
    max_iters: int = 0  # > 0 overrides the epoch schedule; LR steps scale with it
    batch_size: int = 4  # images per process
    base_lr: float = 0.02  # learning rate for `base_batch` images per step (linear scaling rule)
    base_batch: int = 32  # global batch that `base_lr` is quoted for
    optimizer: Literal["sgd", "adamw"] = "sgd"  # SGD (the paper); AdamW for short from-scratch runs
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 1e-4  # SGD weight decay
    warmup_iters: int = 500  # linear warm-up length, iterations
    warmup_ratio: float = 0.001  # warm-up starting factor
    lr_steps: tuple[float, ...] = (8.0, 11.0)  # epochs where the LR is multiplied by lr_gamma
    lr_gamma: float = 0.1  # LR step factor
    grad_clip: float = 0.0  # max gradient L2 norm; 0 = no clipping
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA and bf16 CPUs
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC memory format; auto: on CUDA
    checkpoint_every: int = 0  # also checkpoint every N iterations (0 = at epoch ends only)
    eval_every: int = 1  # evaluate every N epochs (0 = only at the end)
    seed: int = 0  # global seed (per-rank and per-worker seeds derive from it)
    deterministic: bool = False  # deterministic algorithms (CPU resume is then bit-exact)
    log_every: int = 20  # progress-bar / TensorBoard update interval, iterations
    work_dir: str = "runs/train"  # output folder (overridden by --work-dir)
    loss_weights: dict[str, float] = field(default_factory=dict)  # e.g. {loss_box = 2.0}; 1.0 else


@dataclass(frozen=True)
class DistillConfig:
    """Prediction-Guided Distillation (docs/method.md §4-5).

    The defaults are FCOS's; a head's `pgd_defaults` replace some for it (ATSS: topk 9, alpha
    0.08, beta 0.04, gamma 0.128, teacher_score "detection") unless the recipe sets them.
    """

    teacher: str = ""  # teacher checkpoint; "" = no distillation
    teacher_depth: int = 101  # teacher ResNet depth when the checkpoint carries no config
    alpha: float = 0.04  # cls foreground weight
    beta: float = 0.02  # cls background weight (alpha / 2)
    gamma: float = 0.064  # reg foreground weight (1.6 alpha)
    delta: float = 0.0008  # attention-transfer weight
    temperature: float = 0.8  # attention softmax temperature T
    topk: int = 30  # key predictive locations per GT K (ATSS: 9)
    xi_cls: float = 0.8  # IoU exponent of the quality for the cls mask
    xi_reg: float = 0.6  # IoU exponent of the quality for the reg mask
    level_weights: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0)  # cls fg/bg weight, P3..P7
    mask_group: int | None = 4  # official cross-image mask broadcast group; None = per image
    jitter: float = 0.05  # uniform jitter (px) added to centres for the Gaussian fit only
    swap_xy: bool = False  # reproduce the official FCOS/AutoAssign x/y swap in the inside test
    # reproduce the official GFL stride bug (D4): the teacher boxes of the i-th image of each group
    # of mask_group decoded with level i's stride on every level
    index_stride: bool = False
    # the teacher score s of the quality q = s^(1-xi) IoU^xi: "class" (the official code), or
    # "detection": class x the head's quality branch (ATSS IoU, FCOS centerness) as at test time
    teacher_score: Literal["class", "detection"] = "class"
    init_student: bool = True  # copy shape-compatible FPN and head tensors from the teacher
    masks: Literal["pgd", "gt_box"] = "pgd"  # fg masks: PGW, or 1 inside any GT box (ablation)


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware fine-tuning of a trained student with int8 fake quantization (qat.py)."""

    init: str = ""  # trained fp32 student checkpoint to fine-tune; "" = no QAT
    calib_images: int = 64  # training images (no augmentation) that calibrate the int8 ranges


@dataclass(frozen=True)
class TrainJob:
    """Everything `pgd-train fit` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qat: QatConfig = field(default_factory=QatConfig)

    @classmethod
    def head_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The `distill` defaults of the head `values` name (`DenseHead.pgd_defaults`: ATSS's
        K = 9, alpha 0.08, ...), which `load_config` puts beneath the recipe and `--set`.

        {} when the head is not a string (the type check then names the key).

        Raises:
            ValueError: `model.head` is not a registered head (the message lists them).
        """
        model = values.get("model", {})
        head = model.get("head", ModelConfig.head) if isinstance(model, Mapping) else None
        if not isinstance(head, str):
            return {}
        from pgd_deploy.models.build import head_class  # torch: only when a TrainJob is read

        return {"distill": dict(head_class(head).pgd_defaults)}


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
    imgsz: tuple[int, ...] = ()
    batch_min: int = 1  # optimisation profile: smallest batch
    batch_opt: int = 8  # optimisation profile: batch tuned for
    batch_max: int = 16  # optimisation profile: largest batch
    nms: Literal["none", "onnx"] = "none"  # "onnx": append the standard NonMaxSuppression op
    max_det: int = post.MAX_DETECTIONS  # detections per image with in-graph NMS (100)
    conf: float = post.SCORE_THRESH  # in-graph NMS score threshold (0.05; in the manifest)
    iou: float = post.NMS_THRESH  # in-graph NMS IoU threshold (0.6; in the manifest)
    # in-graph NMS: (location, class) candidates per image (1000; TensorRT < 3840)
    nms_topk: int = post.TOPK_CANDIDATES
    opset: int = 17  # ONNX opset
    exporter: Literal["legacy", "dynamo"] = "legacy"  # torch.onnx exporter
    simplify: bool = True  # run onnxslim (failure is logged, never fatal)
    gate_images: int = 64  # images used by the parity and agreement gates
    calib_images: int = 512  # int8 calibration images from the training split
    calib_method: Literal["entropy", "minmax", "percentile"] = "minmax"  # int8 calibration
    workspace_gb: float = 4.0  # TensorRT builder workspace
    builder_opt_level: int = 3  # TensorRT builder optimisation level (0-5)
    timing_cache: str = ""  # TensorRT timing cache file ("" = none)
    hw_compat: Literal["none", "ampere+"] = "none"  # TensorRT hardware compatibility level
    triton_source: Literal["onnx", "tensorrt"] = "onnx"  # what the Triton repository serves
    triton_instances: int = 1  # Triton instance_group count
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


@dataclass(frozen=True)
class GatesConfig:
    """Accuracy gates run by every export. AP tolerances are in AP points (0.1 = 0.001 AP)."""

    fp32_box_atol: float = 1e-3  # max |boxes - reference|, px
    fp32_score_atol: float = 1e-4  # max |scores - reference|
    fp16_mean_abs: float = 1e-2  # mean |out - reference| over boxes (px) and scores
    fp16_mean_rel: float = 1e-2  # or mean |out - reference| / mean |reference| (Polygraphy-style)
    agreement_iou: float = 0.9  # IoU for a detection to count as matched
    agreement_min_fp32: float = 0.99  # detection agreement required, fp32
    agreement_min_fp16: float = 0.9  # detection agreement required, fp16
    agreement_min_int8: float = 0.0  # detection agreement required, int8 (reported only)
    map_tolerance_fp32: float = 0.1  # allowed AP drop (points) vs PyTorch, fp32
    map_tolerance_fp16: float = 0.3  # allowed AP drop (points) vs PyTorch, fp16
    map_tolerance_int8: float = 1.0  # allowed AP drop (points) vs PyTorch, int8
    # QAT int8 parity, layer by layer (export/README.md): the fraction of a quantized conv's int8
    # outputs that land more than half a step from the fake quant's on the same input (float ties)
    qat_layer_mismatch: float = 1e-2  # ties reach 2e-3 of a layer; real faults 0.5 and more


@dataclass(frozen=True)
class ExportJob:
    """Everything `pgd-export` needs."""

    export: ExportConfig = field(default_factory=ExportConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass(frozen=True)
class ServeConfig:
    """`pgd-serve`: batch inference and the Gradio demo."""

    batch: int = 8  # images per inference call
    workers: int = 2  # decode/preprocess threads
    queue_size: int = 32  # bounded queue between decoding and inference, images
    # post-processing; none (the default): what the artifact records (its manifest's postprocess
    # block, or a checkpoint's model settings)
    score_thresh: float | None = None  # minimum score kept
    nms_thresh: float | None = None  # class-aware NMS IoU
    max_det: int | None = None  # detections per image
    host: str = "127.0.0.1"  # demo bind address
    port: int = 7860  # demo port
    max_upload_mb: float = 20.0  # demo upload size limit
    max_pixels: int = 40_000_000  # decode limit (decompression bombs are refused)
    history: int = 50  # requests kept in the latency chart
    warmup: int = 3  # warm-up runs before timing
    draw_score: float = 0.3  # minimum score drawn on annotated images (predict --save-images)
    # where the demo's score slider starts; unset: from the models' own scores on the examples
    # (the highest threshold at which both still show their boxes: `DemoApp.start_score`)
    demo_score: float | None = None
    decode_timeout: float = 60.0  # seconds one image may take to decode before it is a failure
    # checkpoints (.pt) only: autocast precision (fp16: CUDA; outputs stay fp32), torch.compile,
    # NHWC (auto: CUDA at fp16/bf16); anything but fp32 eager is gated against fp32 eager on the
    # first `gate_images` inputs (0 = ungated). The demo's teacher_*/student_* override per side.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    channels_last: Literal["auto", "on", "off"] = "auto"
    gate_images: int = 16
    teacher_precision: Literal["", "fp32", "fp16", "bf16"] = ""  # "" = precision
    student_precision: Literal["", "fp32", "fp16", "bf16"] = ""
    teacher_compile: bool | None = None  # None = compile
    student_compile: bool | None = None

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
