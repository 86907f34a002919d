"""Image backbone: a torchvision ResNet (optionally with DCNv2) and torchvision's FPN.

Mirrors mmdet's ``ResNet`` + ``FPN`` as BEVFormer configures them: ``out_indices`` pick the
stages that feed the FPN, ``frozen_stages`` freezes the stem and the first stages,
``norm_eval`` keeps BatchNorm in eval mode with frozen affine parameters
(``norm_cfg=dict(requires_grad=False)``), and ``add_extra_convs='on_output'`` adds stride-2
convs on the last FPN output when more levels than stages are asked for.
"""

from __future__ import annotations

import functools
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


def has_frozen_norms(cfg: ModelConfig) -> bool:
    """Whether ``ResNetFPN(cfg)`` has norms ``conv_bn`` folds: ``norm_eval``, or a frozen stem
    (``frozen_stages >= 0``), as ``ResNetFPN._freeze`` and ``train`` set them."""
    return cfg.norm_eval or cfg.frozen_stages >= 0


def _frozen(bn: nn.BatchNorm2d) -> bool:
    """A norm that is a fixed affine map here: running statistics (eval mode) and no trainable
    parameters (``norm_eval`` or a frozen stage)."""
    return not bn.training and not bn.weight.requires_grad


def conv_bn(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """``bn(conv(x))``. With ``fold``, a frozen ``bn`` after a plain convolution is folded into
    it: weight * s and bias + (beta - mean * s), s = gamma / sqrt(var + eps), computed from the
    current weight at every call (the weight may train; the gradient reaches it through the
    scaling)."""
    if not (fold and type(conv) is nn.Conv2d and _frozen(bn)):
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)  # keeps the weight's memory format
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _run_block(block: nn.Module, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """torchvision's ``BasicBlock`` / ``Bottleneck`` forward, its conv + norm pairs through
    ``conv_bn``."""
    convs = [n for n in ("1", "2", "3") if hasattr(block, f"conv{n}")]
    out = x
    for i, n in enumerate(convs):
        out = conv_bn(getattr(block, f"conv{n}"), getattr(block, f"bn{n}"), out, fold)
        if i < len(convs) - 1:
            out = block.relu(out)
    down = block.downsample
    out += x if down is None else conv_bn(down[0], down[1], x, fold)
    return block.relu(out)


def _run_layer(layer: nn.Sequential, x: torch.Tensor, fold: bool) -> torch.Tensor:
    for block in layer:
        x = _run_block(block, x, fold)
    return x


class ResNetFPN(nn.Module):
    """(N, 3, H, W) images -> list of (N, D, h_l, w_l) features, finest level first.

    With ``channels_last`` (set by ``model.training.precision.to_channels_last``, which also
    converts the weights) the images enter in NHWC memory order and the features leave in it;
    shapes and values are those of the NCHW network.

    With ``fold_frozen_norms`` (``model.training.precision.fold_frozen_norms``) every frozen
    BatchNorm (``norm_eval``, frozen stages) is folded into the convolution before it at each
    forward (``conv_bn``): one convolution with scaled weights and a bias instead of a
    convolution and a norm pass, forward and backward. The values are those of the unfolded
    network to rounding; a norm that trains is left as it is.
    """

    channels_last: bool = False
    fold_frozen_norms: bool = False

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
        fold = self.fold_frozen_norms
        x = body.maxpool(body.relu(conv_bn(body.conv1, body.bn1, images, fold)))
        feats = OrderedDict()
        for stage in range(1, max(self.out_stages) + 1):
            layer = getattr(body, f"layer{stage}")
            run = functools.partial(_run_layer, layer, fold=True) if fold else layer
            if self.cfg.backbone_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(run, x, use_reentrant=False)
            else:
                x = run(x)
            if stage in self.out_stages:
                feats[f"c{stage}"] = x
        return list(self.fpn(feats).values())
