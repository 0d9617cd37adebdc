"""`build_detector(cfg)`: the one place a model config becomes detector constructor kwargs, and
`HEADS`, the one registry of dense heads (`model.head` -> head class; `models.heads` is the
protocol a head implements)."""

from __future__ import annotations

from collections.abc import Callable

from pgd_deploy.config import ModelConfig
from pgd_deploy.models.atss import ATSSHead
from pgd_deploy.models.backbone import build_backbone
from pgd_deploy.models.detector import DenseDetector
from pgd_deploy.models.fcos import FCOSHead
from pgd_deploy.models.gfl import GFLHead
from pgd_deploy.models.heads import DenseHead

__all__ = ["HEADS", "build_detector", "register_head"]

# model.head -> head class, built as cls(num_classes=, **cls.config_kwargs(model config))
HEADS: dict[str, type[DenseHead]] = {"fcos": FCOSHead, "atss": ATSSHead, "gfl": GFLHead}


def register_head(name: str) -> Callable[[type[DenseHead]], type[DenseHead]]:
    """Register a head class under `name` (`model.head`): `@register_head("atss")`.

    Raises:
        TypeError: the class does not implement the protocol (`models.heads.DenseHead`).
        ValueError: `name` is already taken by another class.
    """

    def add(cls: type[DenseHead]) -> type[DenseHead]:
        if not (isinstance(cls, type) and issubclass(cls, DenseHead)):
            raise TypeError(
                f"model.head {name!r}: {cls!r} is not a DenseHead (pgd_deploy.models.heads)"
            )
        if HEADS.get(name, cls) is not cls:
            raise ValueError(f"model.head {name!r} is already registered to {HEADS[name]}")
        HEADS[name] = cls
        return cls

    return add


def head_class(name: str) -> type[DenseHead]:
    """The registered head class of `model.head`.

    Raises:
        ValueError: an unknown name; the message lists the registered ones.
    """
    if name not in HEADS:
        raise ValueError(
            f"model.head {name!r}: not a registered head; expected one of {sorted(HEADS)}"
        )
    return HEADS[name]


def build_detector(cfg: ModelConfig, num_classes: int | None = None) -> DenseDetector:
    """Build the detector described by `cfg` (the one place config becomes constructor kwargs).

    Args:
        cfg: model section of the config.
        num_classes: overrides `cfg.num_classes` (e.g. taken from the dataset).

    Raises:
        ValueError: unknown head, unsupported depth or no class count.
    """
    classes = num_classes or cfg.num_classes
    if classes <= 0:
        raise ValueError("model.num_classes must be > 0 (or given by the dataset)")
    head_cls = head_class(cfg.head)  # before the backbone: an unknown name fails fast
    head_kwargs = head_cls.config_kwargs(cfg)
    backbone = build_backbone(depth=cfg.depth, weights=cfg.weights, channels=cfg.fpn_channels)
    head = head_cls(num_classes=classes, **head_kwargs)
    return DenseDetector(
        backbone=backbone,
        head=head,
        num_classes=classes,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        score_before_quality=cfg.score_before_centerness,
        topk_candidates=cfg.topk_candidates,
        max_detections=cfg.max_detections,
    )
