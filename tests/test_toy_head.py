"""The head protocol is the only door (issue 34): a toy head, registered in this file and nowhere
else, trains, distils a step from itself and exports to a gated ONNX with no change to the
engine, trainer, distiller, teacher loader, checkpoint loading or export.

The toy is deliberately unlike FCOS: no quality branch, its own assignment (each GT is given to
the one location containing its centre on the level matching its size), plain L1 box loss,
points at cell centres (j + 0.5) * s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
import torch.nn.functional as F
from test_trainer import tiny_overrides
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.models import build, load_detector
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors, flatten_levels
from pgd_deploy.models.towers import Towers
from pgd_deploy.trainer import fit

pytestmark = pytest.mark.slow


class ToyHead(DenseHead):
    name = "toy"
    float_predictors = ("cls_out", "box_out")
    loss_weights = MappingProxyType({"loss_box": 3.0})  # the trainer applies a head's weights

    def __init__(self, *, num_classes: int, channels: int, num_convs: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.towers = Towers(channels=channels, num_convs=num_convs)
        self.cls_out = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(channels, 4, 3, padding=1)
        nn.init.constant_(self.cls_out.bias, -math.log(99.0))

    def forward(self, feats: list[Tensor]) -> DenseOutputs:
        t = self.towers(feats)
        boxes = [F.relu(self.box_out(x)) for x in t.reg_feats]
        return DenseOutputs(
            [self.cls_out(x) for x in t.cls_feats], boxes, None, t.cls_taps, t.reg_taps
        )

    def priors(
        self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
    ) -> Priors:
        centers, per_point = [], []
        for (h, w), s in zip(feature_sizes, strides, strict=True):
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=device) + 0.5) * s,
                (torch.arange(w, device=device) + 0.5) * s,
                indexing="ij",
            )
            centers.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1))
            per_point.append(torch.full((h * w,), float(s), device=device))
        sizes = tuple(h * w for h, w in feature_sizes)
        return Priors(torch.cat(centers), torch.cat(per_point), None, sizes)

    def assign(self, priors: Priors, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Labels [A] (num_classes = background) and (l, t, r, b) / stride targets [A, 4]."""
        num = priors.centers.shape[0]
        out_labels = torch.full((num,), self.num_classes, dtype=torch.long, device=boxes.device)
        out_boxes = torch.zeros(num, 4, device=boxes.device)
        if boxes.numel() == 0:
            return out_labels, out_boxes
        starts = torch.tensor([0, *priors.level_sizes]).cumsum(0)[:-1].tolist()
        level_strides = [float(priors.strides[s]) for s in starts]
        side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
        level = (side / (4 * level_strides[0])).clamp(min=1).log2().floor().long()
        level = level.clamp(max=len(starts) - 1)
        for g in range(len(boxes)):  # a toy: a few GTs per image
            lvl = int(level[g])
            s, start = level_strides[lvl], starts[lvl]
            width = round(math.sqrt(priors.level_sizes[lvl]))  # square inputs in this test
            cx, cy = (boxes[g, 0] + boxes[g, 2]) / 2, (boxes[g, 1] + boxes[g, 3]) / 2
            j = min(int(cx // s), width - 1)
            i = min(int(cy // s), width - 1)
            a = start + i * width + j
            c = priors.centers[a]
            out_labels[a] = labels[g]
            ltrb = torch.stack([c[0] - boxes[g, 0], c[1] - boxes[g, 1], boxes[g, 2] - c[0]])
            ltrb = torch.cat([ltrb, (boxes[g, 3] - c[1]).reshape(1)])
            out_boxes[a] = ltrb.clamp(min=0) / s
        return out_labels, out_boxes

    def loss(
        self, outputs: DenseOutputs, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        assigned = [self.assign(priors, t["boxes"].float(), t["labels"]) for t in targets]
        labels = torch.stack([a[0] for a in assigned]).reshape(-1)
        box_targets = torch.stack([a[1] for a in assigned]).reshape(-1, 4)
        cls = flatten_levels(outputs.cls_logits).float().reshape(-1, self.num_classes)
        reg = flatten_levels(outputs.box_regression).float().reshape(-1, 4)
        pos = labels < self.num_classes
        onehot = torch.zeros_like(cls)
        onehot[pos, labels[pos]] = 1.0
        num_pos = max(int(pos.sum()), 1)
        loss_cls = sigmoid_focal_loss(cls, onehot, reduction="sum") / num_pos
        loss_box = (reg[pos] - box_targets[pos]).abs().sum() / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def _boxes(self, outputs: DenseOutputs, priors: Priors) -> Tensor:
        dist = flatten_levels(outputs.box_regression).float() * priors.strides[None, :, None]
        c = priors.centers[None]
        return torch.cat([c - dist[..., :2], c + dist[..., 2:]], dim=-1)

    def decode(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        return self._boxes(outputs, priors), flatten_levels(outputs.cls_logits).float().sigmoid()

    def guidance(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        return flatten_levels(outputs.cls_logits).float(), self._boxes(outputs, priors)


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "HEADS", dict(build.HEADS))  # the registration ends with the test
    build.register_head("toy")(ToyHead)


def _cfg(cache: Path, *extra: str) -> TrainJob:
    return load_config(
        TrainJob, None, tiny_overrides(cache, "model.head='toy'", "model.head_convs=1", *extra)
    )


def _logged(work_dir: Path) -> set[str]:
    history = load_checkpoint(work_dir / "last.pt")["history"]
    return {key for entry in history for key in entry}


def test_a_head_registered_only_here_trains_distils_and_exports(toy_registered, tmp_path):
    pytest.importorskip("onnxruntime")
    from pgd_deploy.export.command import main as export_main

    teacher = fit(_cfg(tmp_path / "cache", "train.max_iters=3"), work_dir=tmp_path / "toy")
    assert teacher.completed and {"loss_cls", "loss_box"} <= _logged(tmp_path / "toy")
    first = load_checkpoint(tmp_path / "toy" / "last.pt")["history"][0]
    assert first["loss"] == pytest.approx(first["loss_cls"] + 3.0 * first["loss_box"], rel=1e-5)
    loaded = load_detector(tmp_path / "toy" / "last.pt", device="cpu")
    assert isinstance(loaded.detector.head, ToyHead) and loaded.config.model.head == "toy"

    # PGD from itself: the head's guidance feeds the masks, its taps the KD losses
    distil = _cfg(
        tmp_path / "cache", "train.max_iters=1", f"distill.teacher='{tmp_path / 'toy' / 'last.pt'}'"
    )
    assert fit(distil, work_dir=tmp_path / "pgd").completed
    logged = _logged(tmp_path / "pgd")
    assert {"loss_cls", "loss_box", "kd_cls_fg_p3", "kd_reg_feat_p7"} <= logged, logged

    argv = ["--checkpoint", str(tmp_path / "pgd" / "last.pt"), "--out", str(tmp_path / "exp")]
    argv += ["--name", "toy", "--imgsz", "64x64", "--gate-images", "2"]
    assert export_main(argv) == 0
    manifest = json.loads((tmp_path / "exp" / "toy.manifest.json").read_text())
    assert manifest["status"] == "passed", manifest["gates"]
    assert manifest["num_locations"] == 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1  # 64 px, P3..P7
