"""The export contract: a fixed-input deploy wrapper around a trained detector.

`DeployModel` maps `images` float32 [B, 3, H, W] (letterboxed and normalised by
`pgd_deploy.runtime.preprocess`) to decoded `boxes` float32 [B, N, 4] (xyxy pixels of the network
input) and `scores` float32 [B, N, C] in [0, 1], as the head's `decode` defines them
(`pgd_deploy.models.heads`). N is the number of locations over all FPN levels (P3 first). Only
the batch axis is dynamic; the location grid is baked in for the export size, and box decoding
runs in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgd_deploy.runtime import contract

# The tensor names live in the torch-free contract, which checks them when an artifact loads.
INPUT_NAME = contract.INPUT  # float32 [B, 3, H, W]
OUTPUT_NAMES = contract.DENSE  # float32 [B, N, 4] xyxy px, float32 [B, N, C]
NMS_OUTPUT_NAMES = contract.NMS  # with --nms onnx
OPSET = 17  # pinned: ORT's CUDA EP lacks some opset 19/20 kernels; ORT static int8 refuses >= 21
BATCH_AXIS = "batch"  # name of the only dynamic axis


class DeployModel(nn.Module):
    """images [B, 3, H, W] -> (boxes [B, N, 4], scores [B, N, C]); built only at export time.

    Args:
        detector: a `DenseDetector` in eval mode (its `decode` is the contract).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.detector(images)
        boxes, scores = self.detector.decode(outputs)  # [B, N, 4], [B, N, C], fp32
        return boxes.float(), scores.float()


@torch.no_grad()
def probe_level_sizes(detector: nn.Module, imgsz: tuple[int, int]) -> list[int]:
    """Locations per FPN level at the export size (for per-level top-k in post-processing)."""
    device = next(detector.parameters()).device
    outputs = detector(torch.zeros(1, 3, *imgsz, device=device))
    return [int(n) for n in detector.level_sizes(outputs)]


def check_imgsz(imgsz: tuple[int, ...], stride: int = 32) -> tuple[int, int]:
    """Validate the export size: two positive multiples of the largest backbone stride (32).

    Raises:
        ValueError: naming `--imgsz` and the expected value.
    """
    if len(imgsz) != 2 or any(int(v) <= 0 for v in imgsz):
        raise ValueError(f"--imgsz / export.imgsz: expected HxW (e.g. 800x1344), got {imgsz}")
    h, w = int(imgsz[0]), int(imgsz[1])
    if h % stride or w % stride:
        raise ValueError(
            f"--imgsz / export.imgsz: {h}x{w} must be multiples of {stride} "
            f"(e.g. {-(-h // stride) * stride}x{-(-w // stride) * stride})"
        )
    return h, w
