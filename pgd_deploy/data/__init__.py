"""Datasets: COCO-format loading and validation, the synthetic shapes set, YOLO conversion.

Nothing is imported here: `shapes`, `yolo` and `coco` need only numpy/PIL, while `dataset` (the
torch Dataset, transforms, sampler and collate) needs torch.
"""
