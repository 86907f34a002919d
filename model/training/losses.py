"""Training losses: reprojection against pseudo-labels, temporal consistency, supervised BEV.

- ``reprojection_loss``: per-pixel cross-entropy (or focal loss) between the BEV logits seen from
  each camera (``model.network.reprojection``) and the perspective pseudo-labels, averaged over the
  valid pixels (ground hit inside the grid, label not ignored). For multi-label protocols
  ``reprojection_bce_loss`` compares groups of BEV channels with the coarser perspective classes.
- ``temporal_consistency_loss``: KL(q || p) between the previous keyframe's prediction warped
  into the current ego frame (q, a fixed target: the loops compute it under ``no_grad``, as
  BEVFormer computes its history) and the current prediction p, averaged over the cells whose
  source lies inside the previous grid, for samples that have a previous keyframe. KL rather
  than MSE on probabilities: with a fixed target its gradient w.r.t. the logits is p - q, the
  same well-scaled form as the cross-entropy terms beside it, whereas the MSE gradient vanishes
  where the softmax saturates. ``kind="mse"`` is there to compare.
- ``bev_loss``: cross-entropy on class ids (hdmapnet) or binary cross-entropy on multi-hot
  labels (fine), over the label grid.

All losses are computed in float32 whatever the autocast dtype, and return a scalar that stays
attached to the graph (zero, not NaN) when nothing is valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from model.geometry import BevGrid
from model.network.reprojection import IGNORE, Reprojection, subsample_labels
from model.network.warp import warp_prev_to_current

REPROJECTION_KINDS = ("ce", "focal")
TEMPORAL_KINDS = ("kl", "mse")
_EPS = 1e-6


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the gradient) became NaN or infinite; the message names it."""


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().sum() * 0.0


def _labels_of(reprojection: Reprojection, pseudo_labels: torch.Tensor | None) -> torch.Tensor:
    labels = reprojection.labels if pseudo_labels is None else pseudo_labels
    if labels is None:
        raise ValueError("reprojection_loss needs pseudo-labels (in the Reprojection or given)")
    h, w = reprojection.logits.shape[-2:]
    if tuple(labels.shape[-2:]) != (h, w):
        labels = subsample_labels(labels, reprojection.stride)
    return labels.to(reprojection.logits.device, torch.int64)


def reprojection_loss(
    reprojection: Reprojection,
    pseudo_labels: torch.Tensor | None = None,
    kind: str = "ce",
    class_weights: Sequence[float] | torch.Tensor | None = None,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """Mean per-pixel loss of reprojected logits (B, 6, C, h, w) against class-id pseudo-labels.

    ``pseudo_labels`` (B, 6, H, W) or strided (B, 6, h, w); default: ``reprojection.labels``.
    IGNORE (255) pixels and pixels whose ray misses the grid do not count. With
    ``class_weights`` the mean is weighted as ``F.cross_entropy(weight=...)`` weights it.
    ``kind="focal"``: ``-(1 - p_t) ** gamma * log p_t`` (Lin et al.), same weighting.
    """
    if kind not in REPROJECTION_KINDS:
        raise ValueError(
            f"unknown reprojection loss {kind!r}; expected one of {REPROJECTION_KINDS}"
        )
    logits = reprojection.logits.float()
    labels = _labels_of(reprojection, pseudo_labels)
    valid = reprojection.valid.to(logits.device) & (labels != IGNORE)
    if not valid.any():
        return _zero_like_graph(logits)
    channels = logits.shape[2]
    # (B, 6, C, h, w) -> (N, C) over the valid pixels only: cheaper than masking a full map.
    picked = logits.permute(0, 1, 3, 4, 2)[valid]
    target = labels[valid]
    if (target >= channels).any() or (target < 0).any():
        raise ValueError(f"pseudo-labels hold class ids outside [0, {channels}) other than 255")
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    if kind == "ce":
        return F.cross_entropy(picked, target, weight=weight)
    log_p = F.log_softmax(picked, dim=1).gather(1, target[:, None])[:, 0]
    loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** focal_gamma) * log_p
    if weight is None:
        return loss.mean()
    w = weight[target]
    return (w * loss).sum() / w.sum().clamp_min(_EPS)


def reprojection_bce_loss(
    reprojection: Reprojection,
    channel_groups: Sequence[Sequence[int]],
    pseudo_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-label protocols: perspective class k stands for the BEV channels
    ``channel_groups[k]`` (empty for background; see ``model.data.pseudo_classes.PSEUDO_TO_BEV``).

    For every non-empty group, P(group) = 1 - prod(1 - sigmoid(channel)) (noisy-OR: a lane
    marking pixel is some divider or a stop line, we do not know which) is trained with binary
    cross-entropy: target 1 on pixels of that class, 0 on background pixels. Pixels of another
    foreground class say nothing about the group (a drivable area lies under every marking),
    so they are left out of that group's term. Mean over the counted (pixel, group) pairs.
    """
    logits = reprojection.logits.float()
    labels = _labels_of(reprojection, pseudo_labels)
    valid = reprojection.valid.to(logits.device) & (labels != IGNORE)
    background = [k for k, group in enumerate(channel_groups) if not group]
    is_background = torch.zeros_like(valid)
    for k in background:
        is_background |= labels == k
    total = _zero_like_graph(logits)
    count = 0
    for k, group in enumerate(channel_groups):
        if not group:
            continue
        positive = valid & (labels == k)
        counted = positive | (valid & is_background)
        if not counted.any():
            continue
        # log(1 - P(group)) = sum log(1 - sigmoid(x)) = sum logsigmoid(-x): stable for any x.
        log_not = F.logsigmoid(-logits[:, :, list(group)]).sum(2)  # (B, 6, h, w)
        log_yes = torch.log(-torch.expm1(log_not).clamp_max(-_EPS))  # log(1 - exp(log_not))
        pos = positive[counted]
        term = torch.where(pos, -log_yes[counted], -log_not[counted])
        total = total + term.sum()
        count += int(counted.sum())
    return total / max(count, 1)


def temporal_consistency_loss(
    logits: torch.Tensor,
    prev_logits: torch.Tensor,
    prev_ego_from_ego: torch.Tensor,
    grid: BevGrid,
    has_prev: torch.Tensor | None = None,
    kind: str = "kl",
    multilabel: bool = False,
) -> torch.Tensor:
    """Current (B, C, H, W) logits vs the previous keyframe's, warped by ego motion.

    ``prev_ego_from_ego`` (B, 4, 4) maps the current ego frame into the previous one; the
    previous prediction's probabilities are warped (``model.network.warp.warp_prev_to_current``) and
    used as a fixed target where the warp is valid and ``has_prev`` (B,) is true.
    Softmax over classes (``multilabel=False``) or per-channel sigmoids (``multilabel=True``,
    each channel a Bernoulli KL). ``kind``: ``"kl"`` (default, see the module docstring) or
    ``"mse"`` on probabilities.
    """
    if kind not in TEMPORAL_KINDS:
        raise ValueError(f"unknown temporal loss {kind!r}; expected one of {TEMPORAL_KINDS}")
    logits = logits.float()
    with torch.no_grad():
        prev = prev_logits.detach().float()
        prev_prob = torch.sigmoid(prev) if multilabel else torch.softmax(prev, dim=1)
        target, valid = warp_prev_to_current(prev_prob, prev_ego_from_ego.float(), grid)
        if not multilabel:
            # Near the grid edge bilinear weights reach the zero padding: renormalise.
            target = target / target.sum(1, keepdim=True).clamp_min(_EPS)
        target = target.clamp(_EPS, 1.0 - _EPS)
        if has_prev is not None:
            valid = valid & has_prev.to(valid.device, torch.bool).reshape(-1, 1, 1)
    if not valid.any():
        return _zero_like_graph(logits)
    if kind == "mse":
        prob = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
        per_cell = (prob - target).square().sum(1)
    elif multilabel:
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        per_cell = (
            target * (target.log() - log_p) + (1 - target) * ((1 - target).log() - log_not_p)
        ).sum(1)
    else:
        per_cell = (target * (target.log() - F.log_softmax(logits, dim=1))).sum(1)
    return per_cell[valid].mean()


def bev_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    pos_weight: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised BEV loss on the label grid.

    Class ids ``target`` (B, H, W) int64: cross-entropy (optional ``class_weights``).
    Multi-hot ``target`` (B, C, H, W) float: binary cross-entropy with logits, mean over cells
    and channels (optional per-channel ``pos_weight``, as HDMapNet's 2.13).
    """
    logits = logits.float()
    if target.dim() == logits.dim():
        pw = None
        if pos_weight is not None:
            pw = torch.as_tensor(pos_weight, dtype=torch.float32, device=logits.device)
            pw = pw.reshape(-1, 1, 1) if pw.dim() == 1 else pw
        return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=pw)
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=IGNORE)


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_k weights[k] * terms[k] over the terms present (a missing weight is an error)."""
    total = None
    for name, value in terms.items():
        part = float(weights[name]) * value
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no loss terms to sum: every weight of this phase is zero")
    return total


def check_finite(terms: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Raise ``NonFiniteLossError`` naming every NaN/inf loss term (one host sync for all)."""
    if not terms:
        return
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = [
        f"{name}={value:.4g}"
        for name, value, ok in zip(terms, values.tolist(), finite.tolist(), strict=True)
        if not ok
    ]
    place = f" at {where}" if where else ""
    raise NonFiniteLossError(
        f"non-finite loss term {', '.join(bad)}{place}; lower the learning rate, check the "
        "inputs of that term, or resume from the last checkpoint"
    )


def perspective_loss(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of perspective logits (B, 6, C, H, W) against class-id pseudo-labels
    (B, 6, H, W) of the same size; IGNORE pixels do not count, nor samples where ``mask``
    (B,) is False. ``class_weights`` as ``F.cross_entropy(weight=...)``."""
    if mask is not None:
        logits, pseudo_labels = logits[mask], pseudo_labels[mask]
    labels = pseudo_labels.to(logits.device, torch.int64)
    if not (labels != IGNORE).any():
        return _zero_like_graph(logits)
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(0, 1), weight=weight, ignore_index=IGNORE
    )
