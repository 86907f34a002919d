"""The forward pass that training and evaluation share, and the evaluation pass itself.

One forward, as BEVFormer runs it with its history queue of length 2: the previous keyframe's
outputs are computed without gradients with the model in eval mode (``history_pass``:
``obtain_history_bev`` in the official code), then the current keyframe runs with that history
(``forward``). ``EvalForward`` is the same for a whole evaluation pass, reusing the history it
already computed; ``evaluate`` turns a loader's batches into the metrics of
``model.evaluation.metrics``. The model is any ``model.network.interface.BevModel``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import names
from model.evaluation.metrics import make_metric
from model.network.interface import BevModel
from model.training import distributed
from model.training.precision import autocast


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module):
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = to_device(value, device)
        else:
            out[key] = value
    return out


# --- the forward pass shared by training and evaluation ----------------------------------------


def history_pass(net: BevModel, batch: dict, amp) -> dict | None:
    """The previous keyframe's outputs without gradients in eval mode (BEVFormer's history
    BEV). Under ``inference_mode`` (measured 1.09x over ``no_grad`` for this pass on nano, CPU);
    its tensors are cloned out of it, since the training step saves them for backward."""
    prev = batch.get("prev")
    if prev is None:
        return None
    with torch.inference_mode(), eval_mode(net), amp:
        out = net(prev["images"], prev["intrinsics"], prev["ego_from_cam"])
    return {key: value.clone() for key, value in out.items()}


def forward(
    net: BevModel, batch: dict, history: dict | None, use_history: bool, amp
) -> dict[str, torch.Tensor]:
    """The current keyframe with ``history``'s BEV (if ``use_history``): ``bev_logits``,
    ``bev_features`` and the ``image_features`` the BEV was encoded from (for objectives with
    a perspective head). The three stages of ``net.forward``, called as it calls them."""
    prev_bev = history["bev_features"] if (history is not None and use_history) else None
    with amp:
        features = net.extract_features(batch["images"])
        bev = net.encode(
            features,
            batch["intrinsics"],
            batch["ego_from_cam"],
            prev_bev=prev_bev,
            prev_ego_from_ego=batch["prev_ego_from_ego"] if prev_bev is not None else None,
            has_prev=batch["has_prev"] if prev_bev is not None else None,
        )
        return {"bev_logits": net.decode(bev), "bev_features": bev, "image_features": features}


class EvalForward:
    """The forward of an evaluation pass (eval mode, no gradients), batch after batch, reusing
    what the pass already computed for the history.

    With the weights fixed, the history BEV of keyframe t (``history_pass``: backbone, encoder and
    head on keyframe t-1's images, with no history of its own) is ``net.encode`` of the image
    features of t-1 without a history, and the pass extracts those features anyway when it
    reaches t-1. So each batch runs the backbone once, on its own images, encodes them twice
    (without a history, kept for the keyframes that follow; with one, for the output), and
    takes the history of each sample from this batch or the one before, by ``prev_token``. A
    batch whose previous keyframes were not seen (a loader out of order, a subset, a batch
    without tokens) gets its history from ``history_pass`` as in training. The values are the same
    up to the convolutions' summation order for another batch composition (bit-identical on the
    CPUs measured); the backbone runs half as often, 1.8x per nano batch on a CPU
    (``python -m model.tools.bench --compare``).
    """

    def __init__(self, net: BevModel, amp, use_history: bool):
        self.net, self.amp, self.use_history = net, amp, use_history
        self.seen: dict[str, torch.Tensor] = {}  # sample token -> BEV without a history
        self.reused = self.recomputed = 0  # batches whose history came from each path

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        prev_tokens = batch.get("prev_token")
        if not (self.use_history and "prev" in batch and prev_tokens is not None):
            history = history_pass(self.net, batch, self.amp) if self.use_history else None
            return forward(self.net, batch, history, self.use_history, self.amp)
        net = self.net
        with self.amp:
            features = net.extract_features(batch["images"])
            own = net.encode(features, batch["intrinsics"], batch["ego_from_cam"])
        seen = {**self.seen, **dict(zip(batch["sample_token"], own, strict=True))}
        pairs = list(zip(prev_tokens, batch["has_prev"].tolist(), strict=True))
        if all(token in seen for token, has in pairs if has):
            # Samples without a previous keyframe take their own BEV: the encoder ignores it.
            prev_bev = torch.stack([seen[t] if has else own[i] for i, (t, has) in enumerate(pairs)])
            self.reused += 1
        else:
            prev_bev = history_pass(net, batch, self.amp)["bev_features"]
            self.recomputed += 1
        self.seen = dict(zip(batch["sample_token"], own, strict=True))
        with self.amp:
            bev = net.encode(
                features,
                batch["intrinsics"],
                batch["ego_from_cam"],
                prev_bev=prev_bev,
                prev_ego_from_ego=batch["prev_ego_from_ego"],
                has_prev=batch["has_prev"],
            )
            return {"bev_logits": net.decode(bev), "bev_features": bev}


@torch.no_grad()
def evaluate(
    net: BevModel,
    loader: DataLoader,
    protocol: str,
    device: torch.device | str,
    bf16: bool,
    use_history: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of ``net`` over every batch of ``loader`` (``model.evaluation.metrics``: HDMapNet
    argmax IoU for hdmapnet, best-threshold IoU for fine): ``{"mIoU", "IoU_<class>", ...}``. With
    ``use_history`` and batches that carry ``prev``, the history BEV is the previous
    keyframe's, as in training (``EvalForward``). ``bf16``: ``RuntimeConfig.bf16``. With
    several processes, each scores its share of the split and the counts are summed."""
    device = torch.device(device)
    amp = autocast(device, bf16)
    metric = make_metric(protocol)
    run = EvalForward(net, amp, use_history)
    with eval_mode(net):
        for batch in tqdm(loader, desc="val", leave=False, disable=None if progress else True):
            out = run(to_device(batch, device))
            metric.update(out["bev_logits"].float(), batch["bev_label"])
    distributed.sum_counts(metric.counts())  # each process scored its own val samples
    return metric.compute()


# Class colours of the preview image (RGB), background first.
_PALETTE = np.array(
    [[40, 40, 40], [255, 200, 0], [0, 170, 255], [255, 60, 60], [90, 220, 90], [200, 120, 255]],
    np.uint8,
)


@torch.no_grad()
def preview(
    net: BevModel, loader: DataLoader, protocol: str, device, bf16: bool, use_history: bool
) -> np.ndarray:
    """The first val sample's BEV label beside its prediction (argmax), ego forward up,
    captioned "label | prediction" above a legend of the protocol's class colours
    (``model.evaluation.legend``): (H, W, 3) uint8. Multi-label protocols show the
    highest-scoring channel above 0.5 ("none" where no channel is on)."""
    from model.data.labels import class_names, is_multilabel
    from model.evaluation.legend import with_legend

    batch = to_device(next(iter(loader)), torch.device(device))
    amp = autocast(torch.device(device), bf16)
    with eval_mode(net):
        history = history_pass(net, batch, amp) if use_history else None
        logits = forward(net, batch, history, use_history, amp)["bev_logits"][0].float()
    label = batch["bev_label"][0]
    classes = class_names(protocol)
    if label.dim() == 3:  # multi-hot (C, H, W): channel index + 1, 0 where none is on
        pred = torch.where(logits.sigmoid().amax(0) > 0.5, logits.argmax(0) + 1, 0)
        label = torch.where(label.amax(0) > 0, label.float().argmax(0) + 1, 0)
    else:
        pred = logits.argmax(0)
    if is_multilabel(protocol):
        classes = ["none", *classes]
    palette = _PALETTE[np.arange(256) % len(_PALETTE)]
    palette[names.IGNORE] = (0, 0, 0)
    label_rgb, pred_rgb = (palette[t.cpu().numpy().astype(np.int64)] for t in (label, pred))
    return with_legend(label_rgb, pred_rgb, classes, palette)
