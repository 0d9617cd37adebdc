"""The training data of one run: datasets, the grouped batch sampler and the DataLoader."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from pgd_deploy import distributed as dist
from pgd_deploy.config import TrainJob
from pgd_deploy.data.dataset import DetectionDataset, GroupedBatchSampler, build_dataset, collate
from pgd_deploy.devices import seed_worker


@dataclass
class TrainData:
    """What `build_train_data` sets up. `cfg` carries the dataset's class count."""

    cfg: TrainJob
    train_set: DetectionDataset
    val_set: DetectionDataset
    sampler: GroupedBatchSampler
    loader: DataLoader


def build_train_data(cfg: TrainJob, device: torch.device) -> TrainData:
    """Datasets, batch sampler and loader of a training run on this process.

    Raises:
        ValueError: `model.num_classes` disagrees with the training annotations.
    """
    if dist.is_main():  # rank 0 generates synthetic data first; the others then find it
        build_dataset(cfg.data, "train", train=True)
    dist.barrier()
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False)
    classes = train_set.coco.num_classes
    if cfg.model.num_classes and cfg.model.num_classes != classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but {train_set.coco.path} has "
            f"{classes} categories"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes))
    sampler = GroupedBatchSampler(
        train_set.aspect_ratios(),
        cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=dist.rank(),
        world_size=dist.world_size(),
    )
    divisible = cfg.data.size_divisible
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=lambda items: collate(items, divisible),
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=seed_worker,
        persistent_workers=False,
        # Creating an iterator draws a seed from this generator: with the global one, a
        # resumed run (a new iterator mid-epoch) would shift the global stream.
        generator=torch.Generator().manual_seed(cfg.train.seed + dist.rank()),
    )
    return TrainData(cfg, train_set, val_set, sampler, loader)
