"""What a BEV model must offer the training core: the interface ``BEVFormerSeg`` implements.

The loop, the evaluation and the objectives call these and nothing else, so another BEV model
(a LSS-style lifter, a simple_bev) plugs in by implementing them and adding one branch to
``model.training.train.build_model`` (which dispatches on ``ModelConfig.architecture``).

    features = net.extract_features(images)            # images (B, 6, 3, H, W)
    bev = net.encode(features, intrinsics, ego_from_cam,  # (B, N, D); with the previous
                     prev_bev, prev_ego_from_ego, has_prev)  # keyframe's bev (or None)
    logits = net.decode(bev)                            # (B, num_classes, Hg, Wg) label grid
    net(images, intrinsics, ego_from_cam, ...)          # {"bev_logits", "bev_features"}
    net.param_groups(lr, backbone_lr_mult)              # AdamW groups
    net.aux                                             # nn.ModuleDict: objectives' heads

``aux`` holds the modules an objective adds for training only (the perspective head of
``model.objectives``); it is part of the checkpoint while training and dropped when a
finished model is loaded for inference (``model.training.train.load_model``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from model.geometry import BevGrid


@runtime_checkable
class BevModel(Protocol):
    num_classes: int
    label_grid: BevGrid
    cfg: Any  # the model's config (model.presets.ModelConfig)
    aux: nn.ModuleDict
    training: bool

    # Tensors: images (B, 6, 3, H, W), intrinsics (B, 6, 3, 3), ego_from_cam (B, 6, 4, 4);
    # history: prev_bev (B, N, D), prev_ego_from_ego (B, 4, 4), has_prev (B,), or None.
    def __call__(self, images, intrinsics, ego_from_cam, prev_bev=None, prev_ego_from_ego=None,
                 has_prev=None) -> dict[str, torch.Tensor]: ...  # fmt: skip

    def extract_features(self, images: torch.Tensor) -> Any:
        """Per-camera image features; whatever ``encode`` takes. An objective that reads them
        (the perspective head) expects ``.value`` (B, cams, S, D) and ``.spatial_shapes``."""

    def encode(self, features: Any, intrinsics, ego_from_cam, prev_bev=None,
               prev_ego_from_ego=None, has_prev=None) -> torch.Tensor: ...  # fmt: skip

    def decode(self, bev: torch.Tensor) -> torch.Tensor: ...

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]: ...

    def parameters(self): ...

    def train(self, mode: bool = True): ...

    def eval(self): ...
