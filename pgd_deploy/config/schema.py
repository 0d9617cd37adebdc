"""The configuration sections: frozen dataclasses with every default in one place.

A stage's configuration is a root dataclass (`TrainJob` here; `ExportJob` and `ServeConfig` in
`config.deploy_schema`) whose fields are sections (`model`, `data`, ...); each numeric field
declares its allowed range beside its default (`config.bounds.bounded`), checked whenever a
section is built. `pgd_deploy.config.loading` reads and writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    one_of,
    require,
)
from pgd_deploy.runtime import defaults as post

DEPTHS = one_of(18, 34, 50, 101, 152)  # the ResNet depths torchvision builds

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The detector: ResNet backbone, FPN P3-P7 and a dense head."""

    # dense head: a name registered in pgd_deploy.models.build.HEADS ("fcos", "atss", "gfl")
    head: str = "fcos"
    depth: int = bounded(50, DEPTHS)  # ResNet depth: 18, 34, 50, 101 or 152
    weights: str = "none"  # backbone init: "none", "imagenet" (torchvision download) or a path
    num_classes: int = bounded(0, NON_NEGATIVE)  # 0: taken from the training dataset
    # FPN and head width (GroupNorm uses 32 groups, so a multiple of 32)
    fpn_channels: int = bounded(256, at_least(32))
    head_convs: int = bounded(4, POSITIVE)  # conv+GN+ReLU blocks per tower
    # FCOS centre sampling, in strides
    center_sampling_radius: float = bounded(1.5, greater_than(0.0))
    # FCOS level boundaries, px
    regress_ranges: tuple[float, ...] = bounded((64.0, 128.0, 256.0, 512.0), greater_than(0.0))
    focal_alpha: float = bounded(0.25, FRACTION)  # focal loss alpha
    focal_gamma: float = bounded(2.0, at_least(0.0))  # focal loss gamma
    box_loss: Literal["giou", "iou"] = "giou"  # 1 - GIoU, or -log IoU (the official IoULoss)
    # GFL: each box side is a distribution over reg_max + 1 bins
    reg_max: int = bounded(16, POSITIVE)
    # inference: minimum class score kept (0.05)
    score_thresh: float = bounded(post.SCORE_THRESH, FRACTION)
    # inference: class-aware NMS IoU (0.6; official FCOS 0.5)
    nms_thresh: float = bounded(post.NMS_THRESH, IOU)
    score_before_centerness: bool = False  # eval: threshold cls, then x centerness (mmdet order)
    # inference: candidates per level before NMS (1000)
    topk_candidates: int = bounded(post.TOPK_CANDIDATES, POSITIVE)
    # inference: detections kept per image (100)
    max_detections: int = bounded(post.MAX_DETECTIONS, POSITIVE)

    def __post_init__(self) -> None:
        check_section(self, "model")
        require(
            self.fpn_channels % 32 == 0,
            "model.fpn_channels",
            f"must be a multiple of 32 (GroupNorm's 32 groups), got {self.fpn_channels}",
        )
        ranges = self.regress_ranges
        require(
            len(ranges) == 4 and all(a < b for a, b in zip(ranges, ranges[1:])),
            "model.regress_ranges",
            f"must be 4 increasing boundaries (P3|P4|P5|P6|P7), got {list(ranges)}",
        )


@dataclass(frozen=True)
class DataConfig:
    """A COCO-format dataset and the training/evaluation transforms."""

    root: str = ""  # dataset root; "" = the built-in synthetic shapes, generated on first use
    train_images: str = "train2017"  # image folder, relative to root
    train_ann: str = "annotations/instances_train2017.json"  # COCO JSON, relative to root
    val_images: str = "val2017"  # image folder, relative to root
    val_ann: str = "annotations/instances_val2017.json"  # COCO JSON, relative to root
    min_size: int = bounded(800, POSITIVE)  # shorter side after resizing
    max_size: int = bounded(1333, POSITIVE)  # longer side at most
    # (lo, hi): training shorter side uniform in [lo, hi]
    multiscale: tuple[int, ...] = bounded((), POSITIVE)
    hflip: float = bounded(0.5, FRACTION)  # horizontal flip probability (training only)
    size_divisible: int = bounded(32, POSITIVE)  # batch padding multiple
    # data loader worker processes (0 = load in the main process)
    workers: int = bounded(4, NON_NEGATIVE)
    cache_dir: str = ""  # where synthetic data is generated; "" = ~/.cache/pgd_deploy
    shapes_train: int = bounded(400, POSITIVE)  # synthetic: training images
    shapes_val: int = bounded(100, POSITIVE)  # synthetic: validation images
    shapes_size: int = bounded(128, at_least(32))  # synthetic: image side, px
    shapes_seed: int = bounded(0, NON_NEGATIVE)  # synthetic: generator seed
    # synthetic: the crowd set instead (one class, overlapping figures, ignore regions; odgt
    # converted to COCO as `pgd-train data crowdhuman` does), scored with data.metric = "crowd"
    shapes_crowd: bool = False
    # evaluate on the first N validation images only (0 = all)
    val_max_images: int = bounded(0, NON_NEGATIVE)
    filter_empty: bool = False  # training: drop images with no annotation at all (mmdet)
    # training: drop boxes narrower or shorter than this, px (mmdet: 1)
    min_box_size: float = bounded(0.0, at_least(0.0))
    # evaluation: "coco" (pycocotools AP) or "crowd" (CrowdHuman's MR^-2, AP and JI; one class,
    # iscrowd boxes as ignore regions, e.g. from `pgd-train data crowdhuman`)
    metric: Literal["coco", "crowd"] = "coco"

    def __post_init__(self) -> None:
        check_section(self, "data")
        require(
            self.max_size >= self.min_size,
            "data.max_size",
            f"must be >= data.min_size ({self.min_size}), got {self.max_size}",
        )
        scales = self.multiscale
        require(
            len(scales) in (0, 2) and (not scales or scales[0] <= scales[1]),
            "data.multiscale",
            f"must be [] or [lo, hi] with lo <= hi, got {list(scales)}",
        )

    def input_size(self) -> tuple[int, int]:
        """The (H, W) letterbox a model trained on this data is evaluated and served at:
        min_size x max_size, each rounded up to a multiple of 32 (800x1333 -> 800x1344)."""
        return (-(-self.min_size // 32) * 32, -(-self.max_size // 32) * 32)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule, devices and checkpointing."""

    epochs: int = bounded(12, NON_NEGATIVE)  # length of the schedule in epochs
    # > 0 overrides the epoch schedule; LR steps scale with it
    max_iters: int = bounded(0, NON_NEGATIVE)
    batch_size: int = bounded(4, POSITIVE)  # images per process
    # learning rate for `base_batch` images per step (linear scaling rule)
    base_lr: float = bounded(0.02, greater_than(0.0))
    base_batch: int = bounded(32, POSITIVE)  # global batch that `base_lr` is quoted for
    optimizer: Literal["sgd", "adamw"] = "sgd"  # SGD (the paper); AdamW for short from-scratch runs
    momentum: float = bounded(0.9, between(0.0, 1.0, high_open=True))  # SGD momentum (AdamW: beta1)
    weight_decay: float = bounded(1e-4, at_least(0.0))  # SGD weight decay
    warmup_iters: int = bounded(500, NON_NEGATIVE)  # linear warm-up length, iterations
    # warm-up starting factor
    warmup_ratio: float = bounded(0.001, between(0.0, 1.0, low_open=True))
    # epochs where the LR is multiplied by lr_gamma
    lr_steps: tuple[float, ...] = bounded((8.0, 11.0), at_least(0.0))
    lr_gamma: float = bounded(0.1, between(0.0, 1.0, low_open=True))  # LR step factor
    grad_clip: float = bounded(0.0, at_least(0.0))  # max gradient L2 norm; 0 = no clipping
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA and bf16 CPUs
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC memory format; auto: on CUDA
    # also checkpoint every N iterations (0 = at epoch ends only)
    checkpoint_every: int = bounded(0, NON_NEGATIVE)
    eval_every: int = bounded(1, NON_NEGATIVE)  # evaluate every N epochs (0 = only at the end)
    # global seed (per-rank and per-worker seeds derive from it)
    seed: int = bounded(0, NON_NEGATIVE)
    deterministic: bool = False  # deterministic algorithms (CPU resume is then bit-exact)
    log_every: int = bounded(20, POSITIVE)  # progress-bar / TensorBoard update interval, iterations
    work_dir: str = "runs/train"  # output folder (overridden by --work-dir)
    # e.g. {loss_box = 2.0}; 1.0 else
    loss_weights: dict[str, float] = bounded(bound=at_least(0.0), default_factory=dict)

    def __post_init__(self) -> None:
        check_section(self, "train")
        require(
            self.epochs > 0 or self.max_iters > 0,
            "train.epochs",
            "must be >= 1 when train.max_iters is 0 (one of them sets the schedule's length)",
        )
        steps = self.lr_steps
        require(
            all(a < b for a, b in zip(steps, steps[1:])),
            "train.lr_steps",
            f"must increase, got {list(steps)}",
        )


@dataclass(frozen=True)
class DistillConfig:
    """Prediction-Guided Distillation (docs/method.md §4-5).

    The defaults are FCOS's; a head's `pgd_defaults` replace some for it (ATSS: topk 9, alpha
    0.08, beta 0.04, gamma 0.128, teacher_score "detection") unless the recipe sets them.
    """

    teacher: str = ""  # teacher checkpoint; "" = no distillation
    # teacher ResNet depth when the checkpoint carries no config
    teacher_depth: int = bounded(101, DEPTHS)
    alpha: float = bounded(0.04, at_least(0.0))  # cls foreground weight
    beta: float = bounded(0.02, at_least(0.0))  # cls background weight (alpha / 2)
    gamma: float = bounded(0.064, at_least(0.0))  # reg foreground weight (1.6 alpha)
    delta: float = bounded(0.0008, at_least(0.0))  # attention-transfer weight
    temperature: float = bounded(0.8, greater_than(0.0))  # attention softmax temperature T
    topk: int = bounded(30, POSITIVE)  # key predictive locations per GT K (ATSS: 9)
    xi_cls: float = bounded(0.8, FRACTION)  # IoU exponent of the quality for the cls mask
    xi_reg: float = bounded(0.6, FRACTION)  # IoU exponent of the quality for the reg mask
    # cls fg/bg weight, P3..P7
    level_weights: tuple[float, ...] = bounded((1.0, 1.25, 1.5, 1.75, 2.0), at_least(0.0))
    # official cross-image mask broadcast group; None = per image
    mask_group: int | None = bounded(4, POSITIVE)
    # uniform jitter (px) added to centres for the Gaussian fit only
    jitter: float = bounded(0.05, at_least(0.0))
    swap_xy: bool = False  # reproduce the official FCOS/AutoAssign x/y swap in the inside test
    # reproduce the official GFL stride bug (D4): the teacher boxes of the i-th image of each group
    # of mask_group decoded with level i's stride on every level
    index_stride: bool = False
    # the teacher score s of the quality q = s^(1-xi) IoU^xi: "class" (the official code), or
    # "detection": class x the head's quality branch (ATSS IoU, FCOS centerness) as at test time
    teacher_score: Literal["class", "detection"] = "class"
    init_student: bool = True  # copy shape-compatible FPN and head tensors from the teacher
    masks: Literal["pgd", "gt_box"] = "pgd"  # fg masks: PGW, or 1 inside any GT box (ablation)

    def __post_init__(self) -> None:
        check_section(self, "distill")  # (one level weight per level: kd_loss_weights)


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware fine-tuning of a trained student with int8 fake quantization (qat.py)."""

    init: str = ""  # trained fp32 student checkpoint to fine-tune; "" = no QAT
    # training images (no augmentation) that calibrate the int8 ranges
    calib_images: int = bounded(64, POSITIVE)

    def __post_init__(self) -> None:
        check_section(self, "qat")


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
