"""Official BEVFormer checkpoints (fundamentalvision/BEVFormer, mmdet3d 0.17 era) into our model.

The official detector is ``img_backbone`` (mmdet ResNet) + ``img_neck`` (mmdet FPN) +
``pts_bbox_head`` (BEV queries, positional encoding, ``PerceptionTransformer`` with the BEVFormer
encoder and a detection decoder, classification and box branches). We keep the image side and
the encoder and replace the detection part by a BEV segmentation head, so:

- loaded: backbone, neck, BEV queries, positional embedding, level/camera embeddings, every
  encoder layer (temporal self-attention = ``attentions.0``, spatial cross-attention =
  ``attentions.1``, ``ffns.0``, ``norms``);
- new: the segmentation head (``head.*``), which has no counterpart;
- ignored: the detection decoder, ``reference_points``, ``can_bus_mlp``, ``query_embedding``,
  ``cls_branches``, ``reg_branches``, ``code_weights``, and backbone stages our config cuts off.

Names are mapped by the explicit rules in ``official_name_map``; layouts that differ are
converted, never guessed:

- BEV rows: the official query grid runs its rows along +lidar-y (forward), so row 0 is the rear
  edge; ours has row 0 at the front (``model.geometry``). ``bev_embedding`` and ``row_embed`` are
  flipped along the rows; columns agree (official column 0 is lidar x min, the left edge).
- Cameras: official ``cams_embeds`` rows follow the info files' camera order
  (``OFFICIAL_CAMERAS``); ours follow ``model.geometry.CAMERAS``.
- Levels: ``PerceptionTransformer`` always allocates 4 ``level_embeds`` rows; the first
  ``num_levels`` are the ones it uses.

Anything that does not fit (a tensor of another shape, an encoder layer or FPN level the config
lacks, DCN offsets for a plain conv) raises ``CheckpointMismatchError`` listing every problem, so
a checkpoint is never half-loaded into the wrong configuration.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from model.geometry import CAMERAS

log = logging.getLogger(__name__)

# Camera order of the official info files (nuscenes_converter ``camera_types``): the order of
# the images the official model saw, hence of the rows of its ``cams_embeds``.
OFFICIAL_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)

_HEAD = "pts_bbox_head."
_ENCODER = "pts_bbox_head.transformer.encoder.layers."

# Official tensors with no place in a segmentation model, by prefix, with the reason reported.
IGNORED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pts_bbox_head.transformer.decoder.", "detection decoder"),
    ("pts_bbox_head.transformer.reference_points.", "detection decoder"),
    ("pts_bbox_head.query_embedding.", "detection decoder"),
    ("pts_bbox_head.cls_branches.", "detection branches"),
    ("pts_bbox_head.reg_branches.", "detection branches"),
    ("pts_bbox_head.code_weights", "detection loss weights"),
    ("pts_bbox_head.transformer.can_bus_mlp.", "CAN-bus MLP (not used: ego motion warps history)"),
)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model's configuration; the message lists every problem."""


@dataclass(frozen=True)
class Mapped:
    """One tensor of ours, where it comes from in the official checkpoint, and how."""

    ours: str
    official: str
    convert: Callable[[torch.Tensor, torch.Size], torch.Tensor] | None = None
    note: str = ""


@dataclass
class LoadReport:
    """What ``load_official_checkpoint`` did, tensor by tensor."""

    loaded: dict[str, str] = field(default_factory=dict)  # ours -> official
    new: list[str] = field(default_factory=list)  # ours with no official counterpart
    ignored: dict[str, str] = field(default_factory=dict)  # official -> reason
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        loaded = Counter(_group(k) for k in self.loaded)
        new = Counter(_group(k) for k in self.new)
        ignored = Counter(self.ignored.values())
        lines = [
            f"loaded {len(self.loaded)} tensors ({_fmt(loaded)})",
            f"new {len(self.new)} tensors ({_fmt(new) or 'none'})",
            f"ignored {len(self.ignored)} official tensors ({_fmt(ignored) or 'none'})",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _group(name: str) -> str:
    if name.startswith("backbone.fpn."):
        return "neck"
    if name.startswith("backbone."):
        return "backbone"
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("head."):
        return "seg head"
    return "embeddings"


def _fmt(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


# --- layout conversions -------------------------------------------------------------------


def _flip_rows(bev_h: int) -> Callable[[torch.Tensor, torch.Size], torch.Tensor]:
    """Official BEV row r is our row bev_h - 1 - r (tensors: grid rows or row-major cells)."""

    def convert(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if t.shape != shape:
            raise _Mismatch
        return t.reshape(bev_h, -1, t.shape[-1]).flip(0).reshape(shape)

    return convert


def _camera_rows(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if t.shape != shape or shape[0] != len(CAMERAS):
        raise _Mismatch
    return t[[OFFICIAL_CAMERAS.index(cam) for cam in CAMERAS]]


def _first_rows(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if t.dim() != len(shape) or t.shape[1:] != shape[1:] or t.shape[0] < shape[0]:
        raise _Mismatch
    return t[: shape[0]]


class _Mismatch(Exception):
    pass


# --- the name map -------------------------------------------------------------------------

_ENCODER_RULES: tuple[tuple[str, str], ...] = (
    # (our suffix after encoder.layers.N., official suffix after ...encoder.layers.N.)
    (r"temporal\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     r"attentions.0.\1.\2"),
    (r"spatial\.deformable_attention\.(sampling_offsets|attention_weights|value_proj)\.(weight|bias)",
     r"attentions.1.deformable_attention.\1.\2"),
    (r"spatial\.output_proj\.(weight|bias)", r"attentions.1.output_proj.\1"),
    # mmcv FFN: layers = Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout)
    (r"ffn\.layers\.0\.(weight|bias)", r"ffns.0.layers.0.0.\1"),
    (r"ffn\.layers\.3\.(weight|bias)", r"ffns.0.layers.1.\1"),
    (r"norms\.([0-2])\.(weight|bias)", r"norms.\1.\2"),
)  # fmt: skip


def official_name_map(model: nn.Module) -> tuple[dict[str, Mapped], list[str]]:
    """Every tensor of ``model`` (a ``BEVFormerSeg``): its official source, or listed as new.

    Returns ``(mapped by our name, new names)``. A tensor that no rule covers raises: the map
    must be updated together with the model, never fall through silently.
    """
    cfg = model.cfg
    num_inputs = len(cfg.backbone_out_stages)
    mapped: dict[str, Mapped] = {}
    new: list[str] = []
    for ours in model.state_dict():
        official = None
        convert = None
        if ours.startswith("head."):
            new.append(ours)
            continue
        if ours.startswith("backbone.body."):
            official = "img_backbone." + ours[len("backbone.body.") :]
        elif m := re.fullmatch(r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)", ours):
            official = f"img_neck.lateral_convs.{m[1]}.conv.{m[2]}"
        elif m := re.fullmatch(r"backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)", ours):
            official = f"img_neck.fpn_convs.{m[1]}.conv.{m[2]}"
        elif m := re.fullmatch(r"backbone\.fpn\.extra_blocks\.convs\.(\d+)\.(weight|bias)", ours):
            # mmdet FPN keeps extra convs in fpn_convs after the per-input ones.
            official = f"img_neck.fpn_convs.{num_inputs + int(m[1])}.conv.{m[2]}"
        elif ours == "bev_queries.weight":
            official, convert = _HEAD + "bev_embedding.weight", _flip_rows(cfg.bev_h)
        elif ours == "row_embed.weight":
            official = _HEAD + "positional_encoding.row_embed.weight"
            convert = _flip_rows(cfg.bev_h)
        elif ours == "col_embed.weight":
            official = _HEAD + "positional_encoding.col_embed.weight"
        elif ours == "level_embeds":
            official, convert = _HEAD + "transformer.level_embeds", _first_rows
        elif ours == "cams_embeds":
            official, convert = _HEAD + "transformer.cams_embeds", _camera_rows
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", ours):
            for pattern, replacement in _ENCODER_RULES:
                if re.fullmatch(pattern, m[2]):
                    official = _ENCODER + m[1] + "." + re.sub(pattern, replacement, m[2])
                    break
        if official is None:
            raise KeyError(f"no official counterpart rule for model tensor {ours!r}")
        mapped[ours] = Mapped(ours, official, convert)
    return mapped, new


# --- loading ------------------------------------------------------------------------------


def read_official_state_dict(path: Path | str, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an official checkpoint file (also accepts a bare state dict).

    Loads with ``weights_only=True``; mmcv checkpoints whose ``meta`` holds other objects need
    ``trusted=True`` (full unpickling: only for files you trust).
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # pickle.UnpicklingError with a long explanation
        if trusted:
            raise
        raise ValueError(
            f"{path} is not loadable with weights_only=True ({type(err).__name__}); "
            "if you trust the file, pass trusted=True"
        ) from err
    return state_dict_of(ckpt)


def state_dict_of(ckpt: Mapping) -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError("checkpoint holds no state dict")
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every name.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _ignore_reason(name: str, cfg) -> str | None:
    for prefix, reason in IGNORED_PREFIXES:
        if name.startswith(prefix):
            return reason
    m = re.match(r"img_backbone\.layer(\d)\.", name)
    if m and int(m[1]) > max(cfg.backbone_out_stages):
        return "backbone stage cut off by backbone_out_stages"
    if name.startswith("img_backbone.fc."):
        return "backbone classifier"
    return None


def convert_official_state_dict(
    model: nn.Module, official: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Our state dict entries from an official one, and the report; raises on any mismatch."""
    mapped, new = official_name_map(model)
    own = model.state_dict()
    report = LoadReport(new=list(new))
    converted: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    used: set[str] = set()
    for ours, entry in mapped.items():
        if entry.official not in official:
            if ours.endswith("num_batches_tracked"):
                continue  # a BatchNorm counter: absent from some checkpoints, meaningless here
            report.new.append(ours)
            continue
        used.add(entry.official)
        source = official[entry.official]
        target_shape = own[ours].shape
        try:
            if entry.convert is not None:
                value = entry.convert(source, target_shape)
            elif source.shape != target_shape:
                raise _Mismatch
            else:
                value = source
        except _Mismatch:
            problems.append(
                f"  {entry.official} {tuple(source.shape)} -> {ours} needs {tuple(target_shape)}"
            )
            continue
        converted[ours] = value.to(own[ours].dtype)
        report.loaded[ours] = entry.official

    unexpected = []
    for name in official:
        if name in used:
            continue
        reason = _ignore_reason(name, model.cfg)
        if reason is None:
            unexpected.append(name)
        else:
            report.ignored[name] = reason
    missing = [n for n in report.new if not n.startswith("head.")]
    if problems:
        problems.insert(0, f"{len(problems)} tensors differ in shape:")
    if unexpected:
        problems.append(
            f"{len(unexpected)} official tensors have no place in this configuration "
            f"(more encoder layers, FPN levels or DCN offsets than the config has?): "
            f"{_short(unexpected)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} model tensors outside the seg head are not in the checkpoint "
            f"(fewer encoder layers, FPN levels or DCN stages than the config has?): "
            f"{_short(missing)}"
        )
    if problems:
        raise CheckpointMismatchError(
            f"the official checkpoint does not fit ModelConfig {model.cfg.name!r} "
            f"(backbone={model.cfg.backbone}, dcn_stages={model.cfg.dcn_stages}, "
            f"num_levels={model.cfg.num_levels}, bev={model.cfg.bev_h}x{model.cfg.bev_w}, "
            f"embed_dim={model.cfg.embed_dim}, num_layers={model.cfg.num_layers}):\n"
            + "\n".join(problems)
            + "\nPick the preset that matches the checkpoint (tiny: bevformer_tiny, small: "
            "bevformer_small, base: bevformer_base) with bev_h/bev_w as trained."
        )
    report.notes.extend(_notes(model.cfg, official))
    return converted, report


def _short(names: list[str], limit: int = 6) -> str:
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _notes(cfg, official: Mapping[str, torch.Tensor]) -> list[str]:
    notes = [
        "BEV queries and positional embeddings are per cell: they carry their trained meaning "
        "only where the query grid covers the official extent (102.4 m square around the lidar)",
    ]
    if any(".conv2.conv_offset." in k for k in official):
        notes.append(
            "the official R101-DCN backbones (small/base) are caffe-style (stride in conv1, BGR "
            "0-255 input, mean subtraction only); ours is pytorch-style with ImageNet "
            "normalisation: the weights load, image features differ until fine-tuned"
        )
    return notes


def load_official_checkpoint(
    model: nn.Module, checkpoint: Path | str | Mapping, trusted: bool = False
) -> LoadReport:
    """Load an official BEVFormer checkpoint (file or state dict) into ``model`` in place.

    Raises ``CheckpointMismatchError`` before touching the model when anything does not fit.
    """
    if isinstance(checkpoint, Mapping):
        official = state_dict_of(checkpoint)
    else:
        official = read_official_state_dict(checkpoint, trusted=trusted)
    converted, report = convert_official_state_dict(model, official)
    result = model.load_state_dict(converted, strict=False)
    left = [k for k in result.missing_keys if k not in report.new]
    left = [k for k in left if not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # the map and the model disagree: a bug, not user error
        raise RuntimeError(f"name map out of date: {left[:5]} {result.unexpected_keys[:5]}")
    log.info("official checkpoint:\n%s", report.summary())
    return report
