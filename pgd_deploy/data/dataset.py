"""Torch datasets, transforms, the aspect-ratio grouped batch sampler and batch collation.

Randomness is explicit: the batch sampler yields (index, seed) pairs and every augmentation of a
sample draws from a generator seeded by that pair. The data stream is therefore a pure function
of (config seed, epoch, position), independent of worker count, which makes resuming exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pgd_deploy.config import DataConfig
from pgd_deploy.data.coco import CocoAnnotations, ImageRecord, load_coco
from pgd_deploy.runtime.preprocess import (
    ImageDecodeError,
    ImageTransform,
    load_image,
    normalize,
    pad_batch,
    resize,
    resize_scale,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetPaths:
    images: Path
    annotations: Path


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pgd_deploy"


def resolve_split(cfg: DataConfig, split: str) -> DatasetPaths:
    """Image folder and annotation file of `split` ("train" or "val").

    With `data.root` empty, the built-in synthetic shapes dataset (or with `data.shapes_crowd`
    the synthetic crowd) is generated on first use (into `data.cache_dir`) and used regardless
    of the path fields.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not cfg.root and cfg.shapes_crowd:
        from pgd_deploy.data.crowd_shapes import ensure_crowd

        root = ensure_crowd(
            cfg.cache_dir or default_cache_dir(),
            train=cfg.shapes_train,
            val=cfg.shapes_val,
            seed=cfg.shapes_seed,
            size=cfg.shapes_size,
        )
        return DatasetPaths(root / split, root / "annotations" / f"{split}.json")
    if not cfg.root:
        from pgd_deploy.data.shapes import ShapesSpec, ensure_shapes

        root = ensure_shapes(
            cfg.cache_dir or default_cache_dir(),
            train=cfg.shapes_train,
            val=cfg.shapes_val,
            seed=cfg.shapes_seed,
            spec=ShapesSpec(size=cfg.shapes_size),
        )
        return DatasetPaths(root / split, root / "annotations" / f"{split}.json")
    root = Path(cfg.root)
    images = cfg.train_images if split == "train" else cfg.val_images
    ann = cfg.train_ann if split == "train" else cfg.val_ann
    return DatasetPaths(root / images, root / ann)


@dataclass
class Sample:
    """One decoded, transformed image.

    image: float32 [3, h, w] normalised; boxes: float32 [G, 4] xyxy in network-input pixels;
    labels: int64 [G]; transform: maps network pixels back to the original image.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    transform: ImageTransform


@dataclass
class Failure:
    """An image that could not be loaded (reported and skipped, never fatal)."""

    image_id: int
    file_name: str
    reason: str


class DetectionDataset(Dataset):
    """COCO-format detection dataset with train/eval transforms.

    Indexing takes an int (eval: no augmentation) or an (index, seed) pair (train: the seed drives
    the multi-scale choice and the flip). Returns a `Sample`, or a `Failure` when unreadable.
    """

    def __init__(
        self,
        coco: CocoAnnotations,
        image_dir: str | Path,
        *,
        train: bool,
        min_size: int = 800,
        max_size: int = 1333,
        multiscale: Sequence[int] = (),
        hflip: float = 0.5,
    ) -> None:
        if multiscale and (len(multiscale) != 2 or multiscale[0] > multiscale[1]):
            raise ValueError(f"data.multiscale must be [lo, hi] with lo <= hi, got {multiscale}")
        self.coco = coco
        self.image_dir = Path(image_dir)
        self.train = train
        self.min_size, self.max_size = min_size, max_size
        self.multiscale = tuple(multiscale)
        self.hflip = hflip if train else 0.0

    def __len__(self) -> int:
        return len(self.coco.images)

    def aspect_ratios(self) -> list[float]:
        return [r.width / max(r.height, 1) for r in self.coco.images]

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Failure:
        index, seed = (key, None) if isinstance(key, int) else key
        record = self.coco.images[index]
        path = self.image_dir / record.file_name
        try:
            image = load_image(path)
        except ImageDecodeError as err:
            # Reported by the caller (once per file in training, with a count in evaluation).
            logger.debug("skipping image %d: %s", record.image_id, err)
            return Failure(record.image_id, record.file_name, str(err))
        rng = np.random.default_rng(seed) if seed is not None else None
        return self._transform(image, record, rng)

    def _transform(
        self, image: np.ndarray, record: ImageRecord, rng: np.random.Generator | None
    ) -> Sample:
        h, w = image.shape[:2]
        min_size = self.min_size
        if self.train and self.multiscale and rng is not None:
            min_size = int(rng.integers(self.multiscale[0], self.multiscale[1] + 1))
        resized, tf = resize(image, resize_scale(h, w, min_size, self.max_size))
        # Annotation sizes may disagree with the file (EXIF rotation); scale by the real image.
        boxes = record.boxes * np.array([tf.scale_x, tf.scale_y] * 2, dtype=np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, tf.resized_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, tf.resized_h)
        labels = record.labels
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
        if rng is not None and self.hflip > 0 and rng.random() < self.hflip:
            resized = resized[:, ::-1]
            boxes = np.stack(
                [tf.resized_w - boxes[:, 2], boxes[:, 1], tf.resized_w - boxes[:, 0], boxes[:, 3]],
                axis=1,
            ).reshape(-1, 4)
        return Sample(normalize(resized), boxes.astype(np.float32), labels, record.image_id, tf)


@dataclass
class Batch:
    """A padded batch.

    images: float32 [B, 3, H, W]; targets: per image {"boxes": [G, 4], "labels": [G]};
    failures: images of this batch that could not be loaded (already excluded).
    """

    images: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    image_ids: list[int]
    transforms: list[ImageTransform]
    failures: list[Failure]

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            self.images.to(device, non_blocking=nb),
            [{k: v.to(device, non_blocking=nb) for k, v in t.items()} for t in self.targets],
            self.image_ids,
            self.transforms,
            self.failures,
        )

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        return self


def collate(items: Sequence[Sample | Failure], size_divisible: int = 32) -> Batch:
    """Pad the loaded samples into one batch; failures are carried along for reporting."""
    samples = [s for s in items if isinstance(s, Sample)]
    failures = [s for s in items if isinstance(s, Failure)]
    if not samples:
        empty = torch.zeros(0, 3, size_divisible, size_divisible)
        return Batch(empty, [], [], [], failures)
    images = torch.from_numpy(pad_batch([s.image for s in samples], size_divisible))
    targets = [
        {"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels)} for s in samples
    ]
    return Batch(
        images, targets, [s.image_id for s in samples], [s.transform for s in samples], failures
    )


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled, sharded batches of images with similar aspect ratio (wide vs tall).

    Every rank gets exactly `len(self)` batches per epoch (the shard is padded by wrapping, as
    DistributedSampler does, and incomplete batches are dropped). Items are (index, seed) pairs;
    `set_epoch` reshuffles, `skip` resumes inside an epoch.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
        self.groups = [int(a >= 1.0) for a in aspect_ratios]
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = math.ceil(len(self.groups) / world_size)
        if self.per_rank < batch_size:
            raise ValueError(
                f"{len(self.groups)} images cannot fill one batch of {batch_size} on each of "
                f"{world_size} process(es)"
            )
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, batches: int) -> None:
        """Skip the first `batches` batches of the current epoch (resume)."""
        self.start = batches

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def _batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=gen).tolist()
        order += order[: self.per_rank * self.world_size - len(order)]  # pad to divide evenly
        shard = order[self.rank :: self.world_size]
        buckets: dict[int, list[int]] = {0: [], 1: []}
        batches: list[list[int]] = []
        for idx in shard:
            bucket = buckets[self.groups[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(list(bucket))
                bucket.clear()
        rest = buckets[0] + buckets[1]
        batches += [rest[i : i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
        return [b for b in batches if len(b) == self.batch_size][: len(self)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, batch in enumerate(self._batches()):
            if b < self.start:
                continue
            base = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + b * self.batch_size
            yield [(idx, (base + j) % (2**63)) for j, idx in enumerate(batch)]


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> DetectionDataset:
    """Validated dataset of a split (synthetic data generated on first use when root is unset)."""
    paths = resolve_split(cfg, split)
    # MMDetection's training filters (data.min_box_size, data.filter_empty); evaluation reads
    # the ground truth from the JSON itself, so they would change nothing there.
    min_box = cfg.min_box_size if train else 0.0
    coco = load_coco(paths.annotations, image_dir=paths.images, min_box_size=min_box)
    if cfg.metric == "crowd" and coco.num_classes != 1:
        raise ValueError(
            f"{paths.annotations}: field 'categories' has {coco.num_classes} classes "
            f"{coco.class_names[:5]}, but data.metric = 'crowd' evaluates one class"
        )
    if train and cfg.filter_empty:
        before = len(coco.images)
        coco = coco.annotated()
        logger.info(
            "%s: data.filter_empty dropped %d images without annotations",
            paths.annotations,
            before - len(coco.images),
        )
        if not coco.images:
            raise ValueError(f"{paths.annotations}: data.filter_empty left no training image")
    if not train:
        coco = coco.subset(cfg.val_max_images)
    return DetectionDataset(
        coco,
        paths.images,
        train=train,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        multiscale=cfg.multiscale if train else (),
        hflip=cfg.hflip,
    )
