"""The perspective segmentation head of Perspective Cue Training (PCT, arXiv 2403.12530).

    features (B, 6, S, D) of the BEV model's image branch, finest level (h, w)
    --conv3x3-BN-ReLU-conv1x1--> (B*6, C, h, w) --bilinear--> padded image size --crop-->
    (B, 6, C, H, W): one logit map per camera on the pseudo-labels' own pixel grid

It reads the same per-camera features the BEV encoder attends to, so its gradient trains the
shared image backbone and FPN; it is used while training only (``net.aux["perspective"]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerspectiveHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, channels: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(embed_dim, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, features) -> torch.Tensor:
        """``features``: ``model.network.bevformer.ImageFeatures`` (value (B, cams, S, D) with every
        level flattened row-major, ``spatial_shapes``, ``image_hw``, ``padded_hw``)."""
        batch, cams, _, dim = features.value.shape
        h, w = features.spatial_shapes[0]
        finest = features.value[:, :, : h * w].reshape(batch * cams, h, w, dim)
        logits = self.layers(finest.permute(0, 3, 1, 2))
        # The padded image spans the feature map exactly (zero padding bottom/right).
        logits = F.interpolate(
            logits, size=features.padded_hw, mode="bilinear", align_corners=False
        )
        height, width = features.image_hw
        logits = logits[..., :height, :width]
        return logits.reshape(batch, cams, -1, height, width)
