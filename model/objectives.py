"""The training objectives, one row each: a loss term, the inputs it needs and its loss.

    OBJECTIVES = (Objective("bev", ...), Objective("reproj", ...), ...)

An objective's weight is the field ``w_<name>`` of the phase config that offers it
(``model.config``: ``pretrain.w_reproj``, ``finetune.w_perspective``); a phase optimises
``sum_k w_k * loss_k`` over its objectives with a weight above 0, in the order of its fields.
The row says what the data loader must load for it (``needs``: the previous keyframe,
pseudo-labels, BEV labels), which fine-tuning samples it may use (``samples``: the labelled
subset only, or every training sample, whose pseudo-labels are free), an optional
training-only head it adds to the model (``net.aux[name]``), and its loss, a function of
``LossInputs``. The loop, the loaders and the pretraining cache key read this table.

Adding an objective: a row here, its loss, a ``w_<name>`` field in the phase config(s) that
offer it, a test (docs/architecture.md, "Adding an arm, an objective, a model").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from model.config import PhaseConfig
from model.data.labels import PSEUDO_LABEL_PROTOCOL, is_multilabel
from model.data.pseudo_classes import PSEUDO_CLASSES, pseudo_channel_groups
from model.geometry import BevGrid
from model.network.interface import BevModel
from model.network.perspective_head import PerspectiveHead
from model.network.reprojection import reproject
from model.training.losses import (
    bev_loss,
    perspective_loss,
    reprojection_bce_loss,
    reprojection_loss,
    temporal_consistency_loss,
)

Input = Literal["prev", "pseudo_labels", "bev_label"]


@dataclass(frozen=True)
class LossInputs:
    """What an objective's loss sees of one training step."""

    cfg: PhaseConfig
    grid: BevGrid
    protocol: str
    net: BevModel
    batch: dict
    out: dict  # model.evaluation.forward.forward: bev_logits, bev_features, image_features
    # out["bev_logits"] in float32, cast once per step: every objective's gradient meets in
    # float32 before the one cast back (one cast per objective would round each separately).
    logits: torch.Tensor
    history: dict | None  # the previous keyframe's outputs (model.evaluation.forward.history_pass)
    mask: torch.Tensor | None  # (B,) bool: the samples this objective may use (None: all)
    bev_class_weights: tuple[float, ...] | None = None
    bev_pos_weight: tuple[float, ...] | None = None
    pseudo_class_weights: tuple[float, ...] | None = None  # over the pseudo-labels' pixels


@dataclass(frozen=True)
class Objective:
    name: str  # the loss term (``train/loss_<name>``); weight field ``w_<name>``
    needs: frozenset[Input]
    samples: Literal["labelled", "all"]  # in fine-tuning: the labelled subset, or every sample
    loss: Callable[[LossInputs], torch.Tensor]
    # A training-only module the objective adds to the model, as net.aux[name].
    head: Callable[[BevModel, str], nn.Module] | None = None

    @property
    def weight_field(self) -> str:
        return f"w_{self.name}"


def _bev(x: LossInputs) -> torch.Tensor:
    logits, label = x.logits, x.batch["bev_label"]
    if x.mask is not None:  # unlabelled samples of a mixed batch carry no BEV loss
        logits, label = logits[x.mask], label[x.mask]
        if not len(label):
            return logits.sum() * 0.0
    return bev_loss(logits, label, x.bev_class_weights, x.bev_pos_weight)


def _reproj(x: LossInputs) -> torch.Tensor:
    cfg, batch = x.cfg, x.batch
    rep = reproject(
        x.logits,
        batch["intrinsics"],
        batch["ego_from_cam"],
        tuple(batch["images"].shape[-2:]),
        x.grid,
        cfg.reprojection.stride,
        batch["pseudo_labels"],
    )
    if x.mask is not None:
        rep = dataclasses.replace(rep, valid=rep.valid & x.mask.reshape(-1, 1, 1, 1))
    if is_multilabel(x.protocol):
        return reprojection_bce_loss(rep, pseudo_channel_groups(x.protocol))
    return reprojection_loss(
        rep,
        kind=cfg.reprojection.loss,
        class_weights=x.pseudo_class_weights,
        focal_gamma=cfg.reprojection.focal_gamma,
    )


def _temporal(x: LossInputs) -> torch.Tensor:
    if x.history is None:
        raise ValueError("the temporal loss needs the previous keyframe (load_prev)")
    has_prev = x.batch["has_prev"]
    if x.mask is not None:
        has_prev = has_prev & x.mask
    return temporal_consistency_loss(
        x.logits,
        x.history["bev_logits"],
        x.batch["prev_ego_from_ego"],
        x.grid,
        has_prev=has_prev,
        kind=x.cfg.temporal_loss,
        multilabel=is_multilabel(x.protocol),
    )


def _perspective(x: LossInputs) -> torch.Tensor:
    logits = x.net.aux["perspective"](x.out["image_features"])
    return perspective_loss(logits, x.batch["pseudo_labels"], x.pseudo_class_weights, x.mask)


def _perspective_head(net: BevModel, protocol: str) -> nn.Module:
    classes = PSEUDO_CLASSES[PSEUDO_LABEL_PROTOCOL[protocol]]  # the pseudo-labels' own classes
    return PerspectiveHead(net.cfg.embed_dim, len(classes))


OBJECTIVES: tuple[Objective, ...] = (
    # Supervised BEV segmentation on the label grid (the labelled subset only).
    Objective("bev", frozenset({"bev_label"}), "labelled", _bev),
    # BEV logits reprojected into the cameras against the pseudo-labels (arXiv 2602.18066).
    Objective("reproj", frozenset({"pseudo_labels"}), "labelled", _reproj),
    # The prediction at t against the one at t-1 warped by ego motion.
    Objective("temporal", frozenset({"prev"}), "labelled", _temporal),
    # Perspective Cue Training (arXiv 2403.12530): a perspective head on the image features
    # learns the pseudo-labels of every training sample, labelled or not.
    Objective("perspective", frozenset({"pseudo_labels"}), "all", _perspective, _perspective_head),
)


def get(name: str) -> Objective:
    for objective in OBJECTIVES:
        if objective.name == name:
            return objective
    raise KeyError(f"unknown objective {name!r}; known: {[o.name for o in OBJECTIVES]}")


def active(weights: Mapping[str, float]) -> list[Objective]:
    """The objectives of a phase's ``weights`` (``PhaseConfig.weights``), in their order."""
    return [get(name) for name in weights]


def needs(weights: Mapping[str, float]) -> set[str]:
    """Every input the active objectives need."""
    return {need for objective in active(weights) for need in objective.needs}


def uses_every_sample(weights: Mapping[str, float]) -> bool:
    """Whether fine-tuning must load every training sample, not only the labelled subset."""
    return any(objective.samples == "all" for objective in active(weights))


def identity(weights: Mapping[str, float]) -> dict[str, dict]:
    """What defines the active objectives beyond their weights, for cache keys: a changed
    input, sample rule or loss function changes the key with no manual version bump."""
    return {
        o.name: {
            "needs": sorted(o.needs),
            "samples": o.samples,
            "loss": f"{o.loss.__module__}.{o.loss.__qualname__}",
        }
        for o in active(weights)
    }


def add_heads(net: BevModel, weights: Mapping[str, float], protocol: str) -> None:
    """Add the training-only heads of the active objectives to ``net.aux``."""
    for objective in active(weights):
        if objective.head is not None and objective.name not in net.aux:
            net.aux[objective.name] = objective.head(net, protocol)


def loss_terms(x_for: Callable[[Objective], LossInputs], weights: Mapping[str, float]):
    """Each active objective's loss, ``{name: scalar}`` in the order of ``weights``."""
    return {o.name: o.loss(x_for(o)) for o in active(weights)}
