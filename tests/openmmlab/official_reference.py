"""The official BEVFormer detector's parameter names and shapes, and two of its layers' forward
passes, transcribed from fundamentalvision/BEVFormer (projects/mmdet3d_plugin/bevformer) and
built from mmcv / mmdet modules where those exist (ResNet, FPN, FFN, the deformable attention,
the learned positional encoding). Test support for the openmmlab tier."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import FFN, MultiheadAttention
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch as mmcv_msda
from mmdet.models.backbones import ResNet
from mmdet.models.layers import LearnedPositionalEncoding
from mmdet.models.necks import FPN

from model.presets import ModelConfig

# nuscenes_converter's camera_types: the order of the official model's images (and cams_embeds).
OFFICIAL_ORDER = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
_CHANNELS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512)}


def official_backbone(cfg: ModelConfig) -> ResNet:
    """mmdet ResNet as the official configs build it (all four stages, out_indices 0-based)."""
    depth = _DEPTHS[cfg.backbone]
    dcn = dict(type="DCNv2", deform_groups=1, fallback_on_stride=False) if cfg.dcn_stages else None
    backbone = ResNet(
        depth=depth,
        num_stages=4,
        out_indices=tuple(s - 1 for s in cfg.backbone_out_stages),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=False),
        norm_eval=True,
        style="pytorch",
        dcn=dcn,
        stage_with_dcn=tuple(s in cfg.dcn_stages for s in (1, 2, 3, 4)),
    )
    backbone.eval()  # mmdet's ResNet.train() returns None: no chaining
    return backbone


def official_neck(cfg: ModelConfig) -> FPN:
    depth = _DEPTHS[cfg.backbone]
    channels = _CHANNELS.get(depth, (256, 512, 1024, 2048))
    return FPN(
        in_channels=[channels[s - 1] for s in cfg.backbone_out_stages],
        out_channels=cfg.embed_dim,
        start_level=0,
        add_extra_convs="on_output",
        num_outs=cfg.num_levels,
        relu_before_extra_convs=True,
    ).eval()


class OfficialTemporalSelfAttention(nn.Module):
    """TemporalSelfAttention's parameters (num_bev_queue = 2, num_levels = 1)."""

    def __init__(self, dim: int, heads: int, points: int, levels: int = 1, queue: int = 2):
        super().__init__()
        self.sampling_offsets = nn.Linear(dim * queue, queue * heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim * queue, queue * heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)


class OfficialSpatialCrossAttention(nn.Module):
    """SpatialCrossAttention: MSDeformableAttention3D (mmcv's MSDA without output_proj) and an
    output projection of its own."""

    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        self.deformable_attention = MultiScaleDeformableAttention(
            embed_dims=dim, num_heads=heads, num_levels=levels, num_points=points,
            batch_first=True,
        )  # fmt: skip
        self.deformable_attention.output_proj = None  # MSDeformableAttention3D has none
        self.output_proj = nn.Linear(dim, dim)


class OfficialEncoderLayer(nn.Module):
    """BEVFormerLayer: attentions [TSA, SCA], ffns [FFN], norms [LN] * 3."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.attentions = nn.ModuleList([
            OfficialTemporalSelfAttention(dim, cfg.num_heads, cfg.tsa_num_points),
            OfficialSpatialCrossAttention(dim, cfg.num_heads, cfg.num_levels, cfg.num_points),
        ])  # fmt: skip
        self.ffns = nn.ModuleList([FFN(embed_dims=dim, feedforward_channels=cfg.ffn_dim)])
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))


class OfficialDecoderLayer(nn.Module):
    """DetrTransformerDecoderLayer with CustomMSDeformableAttention (same parameters as mmcv's
    MultiScaleDeformableAttention with one level)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.attentions = nn.ModuleList([
            MultiheadAttention(embed_dims=dim, num_heads=cfg.num_heads),
            MultiScaleDeformableAttention(embed_dims=dim, num_heads=cfg.num_heads, num_levels=1),
        ])  # fmt: skip
        self.ffns = nn.ModuleList([FFN(embed_dims=dim, feedforward_channels=cfg.ffn_dim)])
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))


class OfficialTransformer(nn.Module):
    """PerceptionTransformer (num_feature_levels defaults to 4 whatever the config uses)."""

    def __init__(self, cfg: ModelConfig, decoder_layers: int = 2):
        super().__init__()
        dim = cfg.embed_dim
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            OfficialEncoderLayer(cfg) for _ in range(cfg.num_layers)
        )
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(
            OfficialDecoderLayer(cfg) for _ in range(decoder_layers)
        )
        self.level_embeds = nn.Parameter(torch.randn(4, dim))
        self.cams_embeds = nn.Parameter(torch.randn(6, dim))
        self.reference_points = nn.Linear(dim, 3)
        self.can_bus_mlp = nn.Sequential(
            nn.Linear(18, dim // 2), nn.ReLU(inplace=True), nn.Linear(dim // 2, dim),
            nn.ReLU(inplace=True),
        )  # fmt: skip
        self.can_bus_mlp.add_module("norm", nn.LayerNorm(dim))


class OfficialHead(nn.Module):
    """BEVFormerHead (with_box_refine=True: one cls/reg branch per decoder layer)."""

    def __init__(self, cfg: ModelConfig, decoder_layers: int = 2, num_query: int = 9):
        super().__init__()
        dim = cfg.embed_dim
        self.transformer = OfficialTransformer(cfg, decoder_layers)
        self.positional_encoding = LearnedPositionalEncoding(
            num_feats=dim // 2, row_num_embed=cfg.bev_h, col_num_embed=cfg.bev_w
        )
        self.bev_embedding = nn.Embedding(cfg.bev_h * cfg.bev_w, dim)
        self.query_embedding = nn.Embedding(num_query, dim * 2)
        cls = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, 10))
        reg = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 10))
        self.cls_branches = nn.ModuleList(cls for _ in range(decoder_layers))
        self.reg_branches = nn.ModuleList(reg for _ in range(decoder_layers))
        self.code_weights = nn.Parameter(torch.ones(10), requires_grad=False)


def official_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the official names and shapes for ``cfg``, random values throughout
    (BatchNorm statistics included, so a wrong mapping cannot hide behind an init)."""
    torch.manual_seed(seed)
    parts = {
        "img_backbone.": official_backbone(cfg),
        "img_neck.": official_neck(cfg),
        "pts_bbox_head.": OfficialHead(cfg),
    }
    state = {}
    for prefix, module in parts.items():
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                value = (
                    torch.rand_like(value) + 0.5
                    if "running_var" in name
                    else torch.randn_like(value) * 0.1
                )
            state[prefix + name] = value
    return state


def official_msda3d(p: dict, query, value, ref, shapes, heads, levels, points):
    """BEVFormer's ``MSDeformableAttention3D.forward`` (batch_first, 2-d reference points),
    transcribed: ``p`` holds its parameters under their official names."""
    bs, num_query, _ = query.shape
    num_value = value.shape[1]
    value = F.linear(value, p["value_proj.weight"], p["value_proj.bias"])
    value = value.view(bs, num_value, heads, -1)
    offsets = F.linear(query, p["sampling_offsets.weight"], p["sampling_offsets.bias"])
    offsets = offsets.view(bs, num_query, heads, levels, points, 2)
    weights = F.linear(query, p["attention_weights.weight"], p["attention_weights.bias"])
    weights = weights.view(bs, num_query, heads, levels * points).softmax(-1)
    weights = weights.view(bs, num_query, heads, levels, points)
    normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
    num_z = ref.shape[2]
    ref = ref[:, :, None, None, None, :, :]
    offsets = offsets / normalizer[None, None, None, :, None, :]
    offsets = offsets.view(bs, num_query, heads, levels, points // num_z, num_z, 2)
    locations = (ref + offsets).view(bs, num_query, heads, levels, points, 2)
    return mmcv_msda(value, shapes, locations, weights)


def official_tsa(p: dict, query, query_pos, ref_2d, bev_hw, heads, points, prev_bev=None,
                 initial_query=None):  # fmt: skip
    """BEVFormer's ``TemporalSelfAttention.forward`` for one sample (the official code is only
    right for batch 1: it concatenates ``value[0:1]``), with the encoder's value pairing:
    [prev_bev, initial queries] with a history, [query, query] without."""
    identity = query
    if prev_bev is None:
        value = torch.cat([query, query], 0)
    else:
        value = torch.cat([prev_bev, initial_query], 0)
    query = query + query_pos
    bs, num_query, _ = query.shape
    queue, levels = 2, 1
    query = torch.cat([value[0:1], query], -1)
    value = F.linear(value, p["value_proj.weight"], p["value_proj.bias"])
    value = value.reshape(queue, num_query, heads, -1)
    offsets = F.linear(query, p["sampling_offsets.weight"], p["sampling_offsets.bias"])
    offsets = offsets.view(bs, num_query, heads, queue, levels, points, 2)
    weights = F.linear(query, p["attention_weights.weight"], p["attention_weights.bias"])
    weights = weights.view(bs, num_query, heads, queue, levels * points).softmax(-1)
    weights = weights.view(bs, num_query, heads, queue, levels, points)
    weights = weights.permute(3, 0, 1, 2, 4, 5).reshape(
        bs * queue, num_query, heads, levels, points
    )
    offsets = offsets.permute(3, 0, 1, 2, 4, 5, 6)
    offsets = offsets.reshape(bs * queue, num_query, heads, levels, points, 2)
    shapes = torch.tensor([list(bev_hw)])
    normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
    ref = ref_2d[None, :, None, :].expand(bs * queue, -1, levels, -1)
    locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    out = mmcv_msda(value, shapes, locations, weights).permute(1, 2, 0)
    out = ((out[..., :bs] + out[..., bs:]) / queue).permute(2, 0, 1)
    return F.linear(out, p["output_proj.weight"], p["output_proj.bias"]) + identity
