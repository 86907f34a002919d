"""Model configurations: ``nano`` for CPUs and ``tiny`` / ``small`` / ``base`` after BEVFormer.

The three official presets copy the numbers of fundamentalvision/BEVFormer's
``projects/configs/bevformer/bevformer_{tiny,small,base}.py``: backbone depth and FPN inputs,
BEV query grid, encoder depth, input size, embedding / FFN width, attention points and levels,
frozen stages and norm_eval. What differs, and why:

- The BEV range is not the detector's 102.4 m square: the query grid covers the label grid's
  metric extent (``BevGrid``), so a 200 x 200 query grid over a 60 m x 30 m label grid has
  0.3 m x 0.15 m cells.
- Pillar anchors: the official 4 heights, ``linspace(0.5, 7.5, 4) / 8`` of the lidar-frame
  z range [-5, 3] m, are moved into our ego frame (origin on the ground, lidar about 1.84 m up).
- small / base use torchvision's ResNet-101 (pytorch style, stride in the 3x3 conv) with DCNv2
  in stages 3-4 built from ``torchvision.ops.deform_conv2d``; the official backbone is mmdet's
  caffe-style R101-DCN initialised from an FCOS3D checkpoint we cannot download.
- No detection decoder, CAN-bus MLP or grid-mask augmentation: the head is a BEV segmentation
  head, and ego motion enters only through the history alignment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Official pillar heights moved from the lidar frame (z in [-5, 3] m, 4 points at bin centres)
# to the ego frame: + 1.84 m, the nuScenes lidar mounting height.
_LIDAR_HEIGHT_M = 1.84
# The networks ``model.training.train.build_model`` knows (``ModelConfig.architecture``).
ARCHITECTURES = ("bevformer",)

OFFICIAL_Z_ANCHORS_M: tuple[float, ...] = tuple(
    round(-5.0 + 8.0 * (0.5 + i * 7.0 / 3.0) / 8.0 + _LIDAR_HEIGHT_M, 3) for i in range(4)
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a ``BEVFormerSeg``; plain values, hashable, JSON-able."""

    name: str = "custom"
    # Which network ``model.training.train.build_model`` builds
    # (``model.network.interface.BevModel``).
    architecture: str = "bevformer"
    # --- image backbone (torchvision ResNet) + FPN ---
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    # ResNet stages (1..4) whose outputs feed the FPN; the network is truncated after the last.
    backbone_out_stages: tuple[int, ...] = (4,)
    pretrained_backbone_path: str | None = None  # local torchvision-style .pth; random init if None
    frozen_stages: int = 1  # -1: none; 0: stem; k: stem + layer1..layerk (mmdet semantics)
    norm_eval: bool = True  # backbone BatchNorm in eval mode with frozen affine parameters
    dcn_stages: tuple[int, ...] = ()  # stages whose 3x3 convs are DCNv2 (modulated deform conv)
    backbone_checkpointing: bool = False  # gradient checkpointing per stage (official with_cp)
    # Feature levels fed to attention: the FPN outputs of backbone_out_stages, plus
    # (num_levels - len(backbone_out_stages)) stride-2 convs on the last one (add_extra_convs).
    num_levels: int = 1
    image_size: tuple[int, int] = (450, 800)  # (H, W) the data loader resizes to
    pad_size_divisor: int = 32  # images are zero-padded bottom/right to a multiple of this
    # --- BEV encoder ---
    bev_h: int = 50  # query rows, along ego x (same metric extent as the label grid)
    bev_w: int = 50  # query columns, along ego y
    embed_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 512
    num_layers: int = 3
    dropout: float = 0.1
    num_points: int = 8  # spatial cross-attention sampling points per head and level
    tsa_num_points: int = 4  # temporal self-attention sampling points per head
    z_anchors_m: tuple[float, ...] = field(default=OFFICIAL_Z_ANCHORS_M)  # pillar heights, ego z
    attention_impl: str = "auto"  # auto | pytorch | mmcv | triton
    # --- segmentation head ---
    head_channels: int = 64

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; allowed: {ARCHITECTURES}"
            )
        if self.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"unknown backbone {self.backbone!r}")
        stages = tuple(self.backbone_out_stages)
        if not stages or list(stages) != sorted(set(stages)) or not set(stages) <= {1, 2, 3, 4}:
            raise ValueError(f"backbone_out_stages must be increasing in 1..4, got {stages}")
        if self.num_levels < len(stages):
            raise ValueError("num_levels must be >= len(backbone_out_stages)")
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise ValueError("embed_dim must be even and divisible by num_heads")
        if self.num_points % len(self.z_anchors_m):
            # Each pillar anchor owns num_points / num_anchors offsets (MSDeformableAttention3D).
            raise ValueError("num_points must be a multiple of len(z_anchors_m)")
        if self.attention_impl not in ("auto", "pytorch", "mmcv", "triton"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}")
        if any(s < 1 or s > max(stages) for s in self.dcn_stages):
            raise ValueError("dcn_stages must lie within the kept stages")
        # Normalise sequences so configs built from JSON (lists) compare and hash equal.
        for name in ("backbone_out_stages", "image_size", "z_anchors_m", "dcn_stages"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def num_z_anchors(self) -> int:
        return len(self.z_anchors_m)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # Learns on a 2-core CPU in minutes: ResNet-18 cut after layer2 (stride 8), one encoder
    # layer, a 30 x 15 query grid, two pillar heights near the road surface.
    "nano": ModelConfig(
        name="nano",
        backbone="resnet18",
        backbone_out_stages=(2,),
        frozen_stages=-1,
        norm_eval=False,
        num_levels=1,
        image_size=(96, 160),
        bev_h=30,
        bev_w=15,
        embed_dim=64,
        num_heads=4,
        ffn_dim=128,
        num_layers=1,
        dropout=0.0,
        num_points=4,
        tsa_num_points=4,
        z_anchors_m=(0.0, 1.0),
        head_channels=32,
    ),
    "tiny": ModelConfig(
        name="tiny",
        backbone="resnet50",
        backbone_out_stages=(4,),
        frozen_stages=1,
        norm_eval=True,
        num_levels=1,
        image_size=(450, 800),
        bev_h=50,
        bev_w=50,
        num_layers=3,
    ),
    "small": ModelConfig(
        name="small",
        backbone="resnet101",
        backbone_out_stages=(4,),
        frozen_stages=1,
        norm_eval=True,
        dcn_stages=(3, 4),
        backbone_checkpointing=True,
        num_levels=1,
        image_size=(720, 1280),
        bev_h=150,
        bev_w=150,
        num_layers=3,
    ),
    "base": ModelConfig(
        name="base",
        backbone="resnet101",
        backbone_out_stages=(2, 3, 4),
        frozen_stages=1,
        norm_eval=True,
        dcn_stages=(3, 4),
        num_levels=4,
        image_size=(900, 1600),
        bev_h=200,
        bev_w=200,
        num_layers=6,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset with ``overrides`` applied (unknown field names raise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[name].to_dict()
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    base.update(overrides)
    return ModelConfig(**base)
