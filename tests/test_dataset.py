"""Torch data pipeline: transforms, corrupt images, collation and the batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgd_deploy.data.coco import load_coco
from pgd_deploy.data.dataset import (
    DetectionDataset,
    Failure,
    GroupedBatchSampler,
    Sample,
    collate,
)


def _dataset(root, **kwargs) -> DetectionDataset:
    coco = load_coco(root / "annotations" / "train.json", image_dir=root / "train")
    return DetectionDataset(coco, root / "train", **kwargs)


def test_eval_transform_resizes_boxes(shapes_root):
    ds = _dataset(shapes_root, train=False, min_size=96, max_size=200)
    sample = ds[0]
    assert isinstance(sample, Sample) and sample.image.shape == (3, 96, 96)
    assert np.allclose(sample.boxes, ds.coco.images[0].boxes * 1.5, atol=1e-4)


def test_flip_and_multiscale_follow_the_seed(shapes_root):
    ds = _dataset(
        shapes_root, train=True, min_size=64, max_size=1000, hflip=1.0, multiscale=(70, 90)
    )
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert 70 <= a.image.shape[1] <= 90
    w = a.transform.resized_w
    original = ds.coco.images[0].boxes * a.transform.scale_x
    assert np.allclose(a.boxes[:, 0], w - original[:, 2], atol=1e-3)  # flipped horizontally
    sizes = {ds[(0, s)].image.shape[1] for s in range(20)}
    assert len(sizes) > 3


def test_corrupt_image_is_reported_not_fatal(shapes_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shapes_root, root)
    victim = root / "train" / "000001.jpg"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    ds = _dataset(root, train=True, min_size=64, max_size=64)
    item = ds[(1, 0)]
    assert isinstance(item, Failure) and "000001.jpg" in item.reason
    batch = collate([ds[(0, 0)], item, ds[(2, 0)]])
    assert len(batch) == 2 and batch.images.shape == (2, 3, 64, 64)
    assert [f.file_name for f in batch.failures] == ["000001.jpg"]  # reported by the trainer


def test_collate_pads_to_multiple_of_32(shapes_root):
    ds = _dataset(shapes_root, train=False, min_size=40, max_size=1000)
    batch = collate([ds[0], ds[1]], size_divisible=32)
    assert batch.images.shape[-2:] == (64, 64)
    assert batch.images[:, :, 40:].abs().sum() == 0  # zero (mean colour) padding
    assert batch.targets[0]["boxes"].dtype == torch.float32


def test_sampler_shards_evenly_and_is_deterministic():
    ratios = [1.5] * 7 + [0.7] * 6
    s0 = GroupedBatchSampler(ratios, 2, seed=3, rank=0, world_size=2)
    s1 = GroupedBatchSampler(ratios, 2, seed=3, rank=1, world_size=2)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == len(s0) == 3
    assert all(len(batch) == 2 for batch in b0 + b1)
    # aspect-ratio grouping: only a final batch of leftovers may mix wide and tall images
    for batches in (b0, b1):
        mixed = [len({ratios[i] >= 1 for i, _ in batch}) > 1 for batch in batches]
        assert sum(mixed) <= 1 and not any(mixed[:-1])
    assert list(s0) == b0  # same epoch, same batches and seeds
    s0.set_epoch(1)
    assert list(s0) != b0
    s0.set_epoch(0)
    s0.skip(2)
    assert list(s0) == b0[2:]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        GroupedBatchSampler([1.0] * 3, 4)
