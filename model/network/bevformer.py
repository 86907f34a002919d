"""BEVFormer with a BEV segmentation head: six camera images -> BEV logits on the label grid.

    images (B, 6, 3, H, W) --ResNet+FPN--> per-camera multi-level features
    learnable BEV queries (bev_h * bev_w, D) + learned row/column positional embedding
    encoder layers: temporal self-attention over [history BEV warped by ego motion, queries]
                    spatial cross-attention into the cameras that see each query's pillar
                    FFN
    seg head: convs on the query grid, bilinear upsample to the label grid, convs, classifier

The query grid spans the label grid's metric extent, so its cells may be non-square; row r of
the queries runs along ego x exactly like row r of the label raster (``model.geometry``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.geometry import CAMERAS, BevGrid
from model.network.backbone import ResNetFPN
from model.network.deform_attn import autocast_off
from model.network.encoder import BEVFormerEncoder, flatten_features, interpolate_to
from model.network.warp import warp_prev_to_current
from model.presets import ModelConfig


class ImageFeatures(NamedTuple):
    value: torch.Tensor  # (B, cameras, S, D): all levels flattened, with camera/level embeddings
    spatial_shapes: list[tuple[int, int]]  # (h, w) per level
    image_hw: tuple[int, int]  # the real image size
    padded_hw: tuple[int, int]  # the size the backbone saw


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BevSegHead(nn.Module):
    """(B, D, bev_h, bev_w) features -> (B, num_classes, Hg, Wg) logits on the label grid."""

    def __init__(self, embed_dim: int, channels: int, num_classes: int, out_hw: tuple[int, int]):
        super().__init__()
        self.out_hw = out_hw
        self.on_queries = nn.Sequential(
            _conv_bn_relu(embed_dim, embed_dim), _conv_bn_relu(embed_dim, channels)
        )
        self.on_labels = _conv_bn_relu(channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        x = interpolate_to(self.on_queries(bev), self.out_hw)
        return self.classifier(self.on_labels(x))


class BEVFormerSeg(nn.Module):
    """See the module docstring; implements ``model.network.interface.BevModel``."""

    def __init__(self, cfg: ModelConfig, num_classes: int, label_grid: BevGrid):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.label_grid = label_grid
        dim = cfg.embed_dim
        self.backbone = ResNetFPN(cfg)
        self.bev_queries = nn.Embedding(cfg.bev_h * cfg.bev_w, dim)
        # mmdet's LearnedPositionalEncoding: D/2 column features then D/2 row features.
        self.row_embed = nn.Embedding(cfg.bev_h, dim // 2)
        self.col_embed = nn.Embedding(cfg.bev_w, dim // 2)
        self.level_embeds = nn.Parameter(torch.empty(cfg.num_levels, dim))
        self.cams_embeds = nn.Parameter(torch.empty(len(CAMERAS), dim))
        self.encoder = BEVFormerEncoder(cfg, label_grid)
        self.head = BevSegHead(dim, cfg.head_channels, num_classes, label_grid.shape)
        self.aux = nn.ModuleDict()  # training-only heads of objectives (model.network.interface)
        self._init_weights()

    def _init_weights(self) -> None:
        # PerceptionTransformer.init_weights: xavier on every matrix, then each deformable
        # attention's own init, normal level/camera embeddings; uniform positional embeddings.
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.encoder.modules():
            if module is not self.encoder and hasattr(module, "reset_parameters"):
                if not isinstance(module, (nn.Linear, nn.LayerNorm)):
                    module.reset_parameters()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.cams_embeds)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def bev_pos(self) -> torch.Tensor:
        """(bev_h * bev_w, D) learned positional embedding, row-major."""
        h, w = self.cfg.bev_h, self.cfg.bev_w
        col = self.col_embed.weight[None, :, :].expand(h, w, -1)
        row = self.row_embed.weight[:, None, :].expand(h, w, -1)
        return torch.cat([col, row], dim=-1).reshape(h * w, -1)

    def align_history(
        self, prev_bev: torch.Tensor, prev_ego_from_ego: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) BEV of the previous frame -> the same in the current ego frame, and (B, N)
        validity (cells whose source lay inside the previous grid; zeros elsewhere)."""
        batch, _, dim = prev_bev.shape
        h, w = self.cfg.bev_h, self.cfg.bev_w
        prev_map = prev_bev.transpose(1, 2).reshape(batch, dim, h, w)
        # Sampling coordinates in float32 even under autocast: bf16 would misplace cells.
        with autocast_off(prev_bev.device):
            warped, valid = warp_prev_to_current(
                prev_map.float(), prev_ego_from_ego.float(), self.label_grid
            )
        return warped.to(prev_bev.dtype).flatten(2).transpose(1, 2), valid.flatten(1)

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        ego_from_cam: torch.Tensor,
        prev_bev: torch.Tensor | None = None,
        prev_ego_from_ego: torch.Tensor | None = None,
        has_prev: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """images (B, 6, 3, H, W), intrinsics (B, 6, 3, 3) for those images, ego_from_cam
        (B, 6, 4, 4); optional prev_bev (B, bev_h*bev_w, D) (the previous frame's
        ``bev_features``, detached as the official history BEV is), prev_ego_from_ego (B, 4, 4),
        has_prev (B,) bool (samples without history use the no-history path).

        Returns ``bev_logits`` (B, num_classes, Hg, Wg) and ``bev_features`` (B, N, D).
        """
        image_features = self.extract_features(images)
        bev = self.encode(
            image_features, intrinsics, ego_from_cam, prev_bev, prev_ego_from_ego, has_prev
        )
        return {"bev_logits": self.decode(bev), "bev_features": bev}

    # The three stages of ``forward``, public so that ``model.tools.bench`` can time them.

    def extract_features(self, images: torch.Tensor) -> ImageFeatures:
        """Backbone + FPN on the zero-padded images, flattened for deformable attention."""
        batch, cams, _, img_h, img_w = images.shape
        div = self.cfg.pad_size_divisor
        pad_h, pad_w = -(-img_h // div) * div, -(-img_w // div) * div
        x = images.flatten(0, 1)
        if (pad_h, pad_w) != (img_h, img_w):
            x = F.pad(x, (0, pad_w - img_w, 0, pad_h - img_h))
        value, spatial_shapes = flatten_features(
            self.backbone(x), batch, cams, self.level_embeds, self.cams_embeds
        )
        return ImageFeatures(value, spatial_shapes, (img_h, img_w), (pad_h, pad_w))

    def encode(
        self,
        features: ImageFeatures,
        intrinsics: torch.Tensor,
        ego_from_cam: torch.Tensor,
        prev_bev: torch.Tensor | None = None,
        prev_ego_from_ego: torch.Tensor | None = None,
        has_prev: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BEV queries through the encoder layers -> (B, bev_h * bev_w, D)."""
        value = features.value
        batch = value.shape[0]
        bev_query = self.bev_queries.weight[None].expand(batch, -1, -1).to(value.dtype)
        history = None
        if prev_bev is not None:
            if prev_ego_from_ego is None:
                raise ValueError("prev_bev needs prev_ego_from_ego to align it")
            history, _ = self.align_history(prev_bev.to(value.dtype), prev_ego_from_ego)
        return self.encoder(
            bev_query,
            self.bev_pos().to(value.dtype)[None],
            value,
            features.spatial_shapes,
            intrinsics,
            ego_from_cam,
            image_hw=features.image_hw,
            padded_hw=features.padded_hw,
            history=history,
            has_history=has_prev,
        )

    def decode(self, bev: torch.Tensor) -> torch.Tensor:
        """(B, bev_h * bev_w, D) -> (B, num_classes, Hg, Wg) logits on the label grid."""
        bev_map = bev.transpose(1, 2).reshape(bev.shape[0], -1, self.cfg.bev_h, self.cfg.bev_w)
        return self.head(bev_map)

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]:
        """AdamW groups as the official configs: the image backbone at ``lr * 0.1``."""
        backbone = [p for p in self.backbone.body.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": backbone, "lr": lr * backbone_lr_mult, "name": "img_backbone"},
            {"params": rest, "lr": lr, "name": "rest"},
        ]
