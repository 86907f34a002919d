"""Perspective Cue Training (the ``pct`` arm): its head, its loss, and the masked BEV term of
the batches that mix labelled and unlabelled samples."""

from __future__ import annotations

import pytest
import torch

from model import objectives
from model.config import FinetuneConfig
from model.evaluation.forward import forward
from model.geometry import BevGrid
from model.names import IGNORE
from model.network.bevformer import BEVFormerSeg
from model.network.interface import BevModel
from model.presets import get_preset
from model.training.precision import autocast

NANO = get_preset("nano", image_size=(48, 80))
GRID = BevGrid(-30.0, 30.0, -15.0, 15.0, 1.0)
CLASSES = 4
AMP = autocast(torch.device("cpu"), False)


def _net() -> BEVFormerSeg:
    torch.manual_seed(0)
    net = BEVFormerSeg(NANO, num_classes=CLASSES, label_grid=GRID)
    objectives.add_heads(net, {"perspective": 1.0}, "hdmapnet")
    return net


def _batch(batch: int = 2) -> dict:
    from model.tools.bench_step import synthetic_rig

    gen = torch.Generator().manual_seed(1)
    h, w = NANO.image_size
    intrinsics, ego_from_cam = synthetic_rig(batch, (h, w), "cpu")
    return {
        "images": torch.randn(batch, 6, 3, h, w, generator=gen),
        "intrinsics": intrinsics,
        "ego_from_cam": ego_from_cam,
        "prev_ego_from_ego": torch.eye(4).repeat(batch, 1, 1),
        "has_prev": torch.zeros(batch, dtype=torch.bool),
        "bev_label": torch.randint(0, CLASSES, (batch, *GRID.shape), generator=gen),
        "pseudo_labels": torch.randint(0, CLASSES, (batch, 6, h, w), generator=gen),
    }


def _inputs(net, batch, objective, **kwargs) -> objectives.LossInputs:
    out = forward(net, batch, None, False, AMP)
    labelled = batch.get("labelled")
    return objectives.LossInputs(
        cfg=FinetuneConfig(w_perspective=1.0),
        grid=GRID,
        protocol="hdmapnet",
        net=net,
        batch=batch,
        out=out,
        logits=out["bev_logits"].float(),
        history=None,
        mask=labelled if objective.samples == "labelled" else None,
        **kwargs,
    )


def test_the_bevformer_meets_the_model_interface():
    assert isinstance(_net(), BevModel)


def test_the_perspective_head_predicts_on_the_pseudo_label_grid():
    net, batch = _net(), _batch()
    out = forward(net, batch, None, False, AMP)
    logits = net.aux["perspective"](out["image_features"])
    assert logits.shape == (2, 6, CLASSES, *batch["pseudo_labels"].shape[-2:])


def test_the_perspective_loss_trains_the_image_backbone():
    net, batch = _net(), _batch()
    perspective = objectives.get("perspective")
    perspective.loss(_inputs(net, batch, perspective)).backward()
    grads = [p.grad for p in net.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in net.head.parameters())  # the BEV head is not involved


def test_ignore_pixels_do_not_count_in_the_perspective_loss():
    net, batch = _net(), _batch()
    perspective = objectives.get("perspective")
    batch["pseudo_labels"][:, :, :10] = IGNORE  # the top 10 rows of every image
    loss = perspective.loss(_inputs(net, batch, perspective))
    with torch.no_grad():
        logits = net.aux["perspective"](forward(net, batch, None, False, AMP)["image_features"])
    kept = torch.nn.functional.cross_entropy(
        logits[:, :, :, 10:].flatten(0, 1), batch["pseudo_labels"][:, :, 10:].flatten(0, 1)
    )
    assert float(loss) == pytest.approx(float(kept), rel=1e-5)
    batch["pseudo_labels"][:] = IGNORE
    assert float(perspective.loss(_inputs(net, batch, perspective))) == 0.0


def test_unlabelled_samples_of_a_mixed_batch_carry_no_bev_loss():
    net, batch = _net(), _batch()
    batch["labelled"] = torch.tensor([True, False])
    bev = objectives.get("bev")
    loss = float(bev.loss(_inputs(net, batch, bev)))
    batch["bev_label"][1] = (batch["bev_label"][1] + 1) % CLASSES  # the unlabelled sample's
    assert float(bev.loss(_inputs(net, batch, bev))) == pytest.approx(loss, abs=0)
    batch["labelled"] = torch.tensor([False, False])
    assert float(bev.loss(_inputs(net, batch, bev))) == 0.0
    # The perspective term still sees every sample.
    perspective = objectives.get("perspective")
    assert _inputs(net, batch, perspective).mask is None


def test_loading_a_trained_model_drops_the_training_only_heads(tmp_path):
    from model.training.checkpoint import save_checkpoint
    from model.training.train import load_model

    net = _net()
    path = tmp_path / "finetune.pt"
    save_checkpoint(
        path,
        {
            "model": net.state_dict(),
            "model_cfg": NANO.to_dict(),
            "num_classes": CLASSES,
            "grid": GRID.__dict__ if hasattr(GRID, "__dict__") else GRID._asdict(),
        },
    )
    loaded = load_model(path)
    assert len(loaded.aux) == 0
    torch.testing.assert_close(loaded.head.classifier.weight, net.head.classifier.weight)
