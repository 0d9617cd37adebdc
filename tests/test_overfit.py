"""The detector can learn: a small FCOS, ATSS and GFL each overfit four synthetic images."""

from __future__ import annotations

import pytest
import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.data.coco import load_coco
from pgd_deploy.data.dataset import DetectionDataset, collate
from pgd_deploy.metrics import detections_to_coco, evaluate_coco
from pgd_deploy.models import build_detector


@pytest.mark.slow
@pytest.mark.trained
@pytest.mark.parametrize("head", ["fcos", "atss", "gfl"])
def test_r18_overfits_four_images(shapes_root, head):
    torch.manual_seed(0)
    coco = load_coco(shapes_root / "annotations" / "train.json").subset(4)
    ds = DetectionDataset(coco, shapes_root / "train", train=False, min_size=64, max_size=64)
    batch = collate([ds[i] for i in range(4)])
    cfg = ModelConfig(head=head, depth=18, fpn_channels=128)
    model = build_detector(cfg, num_classes=coco.num_classes)
    weights = dict(model.head.loss_weights)  # as the trainer applies them (GIoU x 2, ...)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(150):
        for group in opt.param_groups:
            group["lr"] = 0.01 * min(1.0, (step + 1) / 20)
        losses = model.loss(model(batch.images), batch.targets)
        opt.zero_grad()
        sum(v * weights.get(k, 1.0) for k, v in losses.items()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    model.eval()  # BatchNorm statistics of 4 images: the model is evaluated on the same images
    dets = model.predict(batch.images, batch.transforms)
    results = [
        r
        for i, d in zip(batch.image_ids, dets)
        for r in detections_to_coco(i, d, coco.category_ids)
    ]
    metrics = evaluate_coco(coco.raw, results, image_ids=batch.image_ids)
    assert metrics["AP50"] > 0.5, metrics
