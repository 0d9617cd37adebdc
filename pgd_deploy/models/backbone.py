"""ResNet + FPN (P3-P7) feature extractor built from torchvision parts."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from pgd_deploy.checkpoint import torch_load_weights

logger = logging.getLogger(__name__)

RESNET_DEPTHS = (18, 34, 50, 101, 152)
STRIDES = (8, 16, 32, 64, 128)  # P3..P7


class FrozenBN(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same state dict), computed in the input's
    dtype as one fused multiply-add.

    The stock module multiplies by fp32 buffers, so under bf16/fp16 autocast every frozen BN
    returns fp32: activations double in size and are cast back before the next convolution.
    Here the output keeps the input's dtype, as trainable BatchNorm does under autocast
    (bench/pgd_gpu.py measures the difference).
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))


class ExtraLevels(LastLevelP6P7):
    """P6 = conv(P5), P7 = conv(ReLU(P6)), both 3x3 stride 2 (torchvision's LastLevelP6P7).

    On the CPU these two convolutions always run in fp32: under bf16 autocast, oneDNN's
    backward of a stride-2 3x3 convolution on a feature map one pixel wide returns garbage
    weight gradients (seen with torch 2.14 / oneDNN 3.12), and P6/P7 are that small for small
    inputs. The maps are tiny, so fp32 costs nothing measurable.
    """

    def forward(self, p, c, names):
        if p[-1].device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(p, c, names)
        with torch.autocast("cpu", enabled=False):
            return super().forward([t.float() for t in p], [t.float() for t in c], names)


class ResNetFPN(nn.Module):
    """ResNet C3-C5 -> FPN P3-P5 -> P6, P7 (from P5, ReLU before P7), `channels` wide.

    Forward: images [B, 3, H, W] -> list of 5 tensors [B, channels, H / s, W / s], s in STRIDES.
    """

    def __init__(self, *, body: nn.Module, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=in_channels,
            out_channels=channels,
            extra_blocks=ExtraLevels(channels, channels),
        )
        self.out_channels = channels
        self.strides = STRIDES

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.fpn(self.body(images)).values())


def _download_failed(name: str, url: str, err: BaseException) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    reason = getattr(err, "reason", None) or err
    return (
        f"model.weights='imagenet': the ImageNet weights of {name} could not be downloaded from "
        f"{url} ({reason}). Without internet: copy that file to {cache} (where torchvision "
        f"looks first), or give its path with --set model.weights=/path/{Path(url).name}, or "
        "train from scratch with --set model.weights=none (slower to converge)"
    )


def _resnet(depth: int, weights: str) -> tuple[nn.Module, bool]:
    """torchvision ResNet of `depth`; returns (model, pretrained)."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"model.depth must be one of {RESNET_DEPTHS}, got {depth}")
    name = f"resnet{depth}"
    if weights in ("", "none"):
        return torchvision.models.get_model(name, weights=None, norm_layer=nn.BatchNorm2d), False
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name)
        # IMAGENET1K_V1 is the checkpoint MMDetection and the PGD paper start from.
        try:
            model = torchvision.models.get_model(
                name, weights=enum.IMAGENET1K_V1, norm_layer=FrozenBN
            )
        except (urllib.error.URLError, OSError) as err:  # offline, a proxy, a full disk
            raise RuntimeError(_download_failed(name, enum.IMAGENET1K_V1.url, err)) from None
        return model, True
    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            f"model.weights: expected 'none', 'imagenet' or an existing file, got {weights!r}"
        )
    model = torchvision.models.get_model(name, weights=None, norm_layer=FrozenBN)
    state = torch_load_weights(path)  # weights_only=True; a file holding code is refused
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ValueError(f"{path}: not a {name} state dict; missing {missing[:5]}...")
    if unexpected:
        logger.warning(
            "%s: ignored %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3]
        )
    return model, True


def build_backbone(*, depth: int, weights: str = "none", channels: int = 256) -> ResNetFPN:
    """ResNet-FPN feature extractor.

    With pretrained weights (`imagenet` or a file), BatchNorm is frozen and the stem and layer1
    are frozen (MMDetection `frozen_stages=1`). Without them, BatchNorm and all stages train:
    frozen statistics of a random init mean nothing.
    """
    if channels % 32:
        raise ValueError(f"model.fpn_channels must be a multiple of 32 (GroupNorm), got {channels}")
    resnet, pretrained = _resnet(depth, weights)
    if pretrained:
        for module in (resnet.conv1, resnet.bn1, resnet.layer1):
            for p in module.parameters():
                p.requires_grad_(False)
    body = IntermediateLayerGetter(resnet, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    c5 = resnet.fc.in_features  # 512 (BasicBlock) or 2048 (Bottleneck)
    return ResNetFPN(body=body, in_channels=[c5 // 4, c5 // 2, c5], channels=channels)
