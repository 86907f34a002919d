"""Image backbone: a torchvision ResNet (optionally with DCNv2) and torchvision's FPN.

Mirrors mmdet's ``ResNet`` + ``FPN`` as BEVFormer configures them: ``out_indices`` pick the
stages that feed the FPN, ``frozen_stages`` freezes the stem and the first stages,
``norm_eval`` keeps BatchNorm in eval mode with frozen affine parameters
(``norm_cfg=dict(requires_grad=False)``), and ``add_extra_convs='on_output'`` adds stride-2
convs on the last FPN output when more levels than stages are asked for.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FeaturePyramidNetwork, deform_conv2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from model.presets import ModelConfig

log = logging.getLogger(__name__)

_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 (mmcv's ``ModulatedDeformConv2dPack``) on ``torchvision.ops.deform_conv2d``.

    ``conv_offset`` predicts 2 offsets and 1 mask logit per kernel tap and starts at zero: zero
    offsets and a mask of sigmoid(0) = 0.5, as mmcv's layer starts.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        kh, kw = conv.kernel_size
        self.conv_offset = nn.Conv2d(
            conv.in_channels,
            3 * kh * kw,
            (kh, kw),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1, o2, mask = self.conv_offset(x).chunk(3, dim=1)
        offset = torch.cat([o1, o2], dim=1)
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask.sigmoid(),
        )


class ExtraOutputConvs(ExtraFPNBlock):
    """mmdet FPN ``add_extra_convs='on_output'`` with ``relu_before_extra_convs=True``."""

    def __init__(self, channels: int, num_extra: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_extra)
        )
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, results, x, names):
        for i, conv in enumerate(self.convs):
            # mmdet applies the ReLU before every extra conv but the first.
            source = results[-1] if i == 0 else F.relu(results[-1])
            results.append(conv(source))
            names.append(f"extra{i}")
        return results, names


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a local torchvision-style ResNet state dict (``weights_only=True``) into ``body``.

    Accepts a bare state dict or one under ``state_dict`` / ``model``, and strips the usual
    ``module.`` / ``backbone.`` / ``img_backbone.`` prefixes. Keys for stages we cut off (and
    ``fc``) are ignored; a file that matches no key at all is an error.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "img_backbone.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    own = body.state_dict()
    usable = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no parameter matches the {type(body).__name__} backbone")
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    body.load_state_dict(usable, strict=False)
    log.info("loaded %d backbone tensors from %s (%d missing)", len(usable), path, len(missing))
    if missing:
        log.warning("backbone tensors not in %s: %s", path, missing[:8])


class ResNetFPN(nn.Module):
    """(N, 3, H, W) images -> list of (N, D, h_l, w_l) features, finest level first.

    With ``channels_last`` (set by ``model.training.precision.to_channels_last``, which also
    converts the weights) the images enter in NHWC memory order and the features leave in it;
    shapes and values are those of the NCHW network.
    """

    channels_last: bool = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.out_stages = tuple(cfg.backbone_out_stages)
        last = max(self.out_stages)
        body = getattr(torchvision.models, cfg.backbone)(weights=None)
        # Truncate: keep torchvision's attribute names so its checkpoints load as they are.
        del body.fc, body.avgpool
        for stage in range(last + 1, 5):
            delattr(body, f"layer{stage}")
        if cfg.pretrained_backbone_path:
            load_backbone_weights(body, cfg.pretrained_backbone_path)
        for stage in cfg.dcn_stages:
            for block in getattr(body, f"layer{stage}"):
                conv = block.conv2  # the 3x3 conv in both BasicBlock and Bottleneck
                block.conv2 = ModulatedDeformConv2d(conv)
        self.body = body
        self._freeze()

        channels = _STAGE_CHANNELS[cfg.backbone]
        self.fpn = FeaturePyramidNetwork(
            [channels[s - 1] for s in self.out_stages],
            cfg.embed_dim,
            extra_blocks=ExtraOutputConvs(cfg.embed_dim, cfg.num_levels - len(self.out_stages))
            if cfg.num_levels > len(self.out_stages)
            else None,
        )

    def _frozen_modules(self) -> list[nn.Module]:
        body = self.body
        modules: list[nn.Module] = []
        if self.cfg.frozen_stages >= 0:
            modules += [body.conv1, body.bn1]
        for stage in range(1, min(self.cfg.frozen_stages, max(self.out_stages)) + 1):
            modules.append(getattr(body, f"layer{stage}"))
        return modules

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        if self.cfg.norm_eval:
            for m in self.body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetFPN:
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.cfg.norm_eval:
                for m in self.body.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        body = self.body
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
        feats = OrderedDict()
        for stage in range(1, max(self.out_stages) + 1):
            layer = getattr(body, f"layer{stage}")
            if self.cfg.backbone_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if stage in self.out_stages:
                feats[f"c{stage}"] = x
        return list(self.fpn(feats).values())
