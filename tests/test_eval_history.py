"""Evaluation takes each keyframe's history from the keyframe before it, which the pass has
already seen, instead of running the backbone on the previous images again."""

from __future__ import annotations

import contextlib

import pytest
import torch

from model.data.batching import make_loader
from model.data.dataset import NuScenesBevDataset
from model.data.labels import LabelConfig
from model.evaluation.forward import EvalForward, evaluate, forward, history_pass
from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.presets import get_preset

NANO = get_preset("nano", image_size=(48, 80))
GRID = BevGrid(resolution_m=0.5)
AMP = contextlib.nullcontext()


@pytest.fixture(scope="module")
def val_set(synthetic_root, tmp_path_factory):
    """2 val scenes x 6 keyframes, in split order."""
    cache = tmp_path_factory.mktemp("labels")
    return NuScenesBevDataset(synthetic_root, "v1.0-mini", "val", NANO.image_size,
                              LabelConfig("hdmapnet", GRID), cache_dir=cache,
                              progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return BEVFormerSeg(NANO, 4, GRID).eval()


def _recomputed(net, batch):
    """The training step's way: the history pass on the previous keyframe's images."""
    return forward(net, batch, history_pass(net, batch, AMP), True, AMP)


def _backbone_images(net, fn) -> int:
    """Images the backbone saw while ``fn`` ran."""
    seen = []
    hook = net.backbone.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    try:
        fn()
    finally:
        hook.remove()
    return sum(seen)


@torch.no_grad()
def test_in_order_every_history_is_reused_and_equals_the_history_pass(net, val_set):
    # Batches of 4 over scenes of 6 keyframes: a scene's keyframes straddle batches, so some
    # histories come from the batch before.
    batches = list(make_loader(val_set, 4, shuffle=False))
    forward = EvalForward(net, AMP, use_history=True)
    reused = []
    images = _backbone_images(net, lambda: reused.extend(forward(b) for b in batches))
    assert (forward.reused, forward.recomputed) == (len(batches), 0)
    assert images == 6 * len(val_set)  # each keyframe's 6 cameras once, not twice
    for batch, out in zip(batches, reused, strict=True):
        expected = _recomputed(net, batch)
        for key in ("bev_logits", "bev_features"):
            torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_out_of_order_batches_fall_back_to_the_history_pass(net, val_set):
    batches = list(make_loader(val_set, 4, shuffle=True, seed=3))
    forward = EvalForward(net, AMP, use_history=True)
    outs = [forward(b) for b in batches]
    assert forward.recomputed > 0
    for batch, out in zip(batches, outs, strict=True):
        expected = _recomputed(net, batch)
        torch.testing.assert_close(out["bev_logits"], expected["bev_logits"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_evaluate_reuses_histories_and_scores_as_with_the_history_pass(net, val_set):
    loader = make_loader(val_set, 4, shuffle=False)
    metrics = {}
    images = _backbone_images(
        net, lambda: metrics.update(evaluate(net, loader, "hdmapnet", "cpu", bf16=False))
    )
    assert images == 6 * len(val_set)
    from model.evaluation.metrics import make_metric

    metric = make_metric("hdmapnet")
    for batch in loader:
        metric.update(_recomputed(net, batch)["bev_logits"].float(), batch["bev_label"])
    assert metrics == pytest.approx(metric.compute(), abs=1e-6)
