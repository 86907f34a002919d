"""A pretraining's target alignment (model.evaluation.diagnostics): the label-only statistics
equal the dataroot command's (model.data.alignment.diagnose), and the head's are measured on the
cells and pixels the loss reaches."""

from __future__ import annotations

import pytest
import torch

from model.config import DataConfig, PretrainConfig, RuntimeConfig
from model.data.alignment import diagnose
from model.evaluation.diagnostics import PREFIX, checkpoint_alignment
from model.presets import get_preset
from model.training.checkpoint import load_checkpoint
from model.training.loaders import label_config
from model.training.train import pretrain

NANO = get_preset("nano")
CPU = RuntimeConfig(device="cpu", progress=False)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    from model.data.synthetic import generate_dataset

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("diag")
    root = generate_dataset(base / "root", scenes=3, samples_per_scene=2, image_size=(54, 96),
                            progress=False)  # fmt: skip
    data = DataConfig(dataroot=str(root), cache_dir=str(base / "labels"))
    cfg = PretrainConfig(budget={"value": 1}, batch_size=2, reprojection={"stride": 2})
    checkpoint = pretrain(data, NANO, cfg, base / "out", runtime=CPU)
    return data, cfg, checkpoint


def test_label_only_values_equal_the_dataroot_command(pretraining):
    data, cfg, checkpoint = pretraining
    logged = checkpoint_alignment(data, checkpoint, cfg, CPU)
    direct = diagnose(
        data.root, data.resolved_version, data.val_split, label_config(data, NANO),
        NANO.image_size, cfg.reprojection.stride, cache_dir=data.cache_dir, progress=False,
    )  # fmt: skip
    label_only = {k: v for k, v in direct.items() if k != "samples"}
    assert "perspective_mIoU" in label_only and "reach_divider" in label_only
    for key, value in label_only.items():
        assert logged[PREFIX + key] == pytest.approx(value, nan_ok=True), key


def test_head_values_are_iou_on_what_the_loss_reaches(pretraining):
    data, cfg, checkpoint = pretraining
    logged = checkpoint_alignment(data, checkpoint, cfg, CPU)
    for name in ("head_reached_mIoU", "head_perspective_mIoU"):
        assert 0.0 <= logged[PREFIX + name] <= 1.0
    classes = label_config(data, NANO).class_names
    assert {f"{PREFIX}head_reached_IoU_{c}" for c in classes[1:]} <= set(logged)


def test_a_multilabel_protocol_has_no_alignment(pretraining):
    data, cfg, checkpoint = pretraining
    assert checkpoint_alignment(data.model_copy(update={"protocol": "fine"}), checkpoint, cfg,
                                CPU) == {}  # fmt: skip


def test_the_dataroot_command_scores_a_checkpoints_head_under_either_label_source(
    pretraining, capsys, tmp_path
):
    import json

    from model.data.alignment import main
    from model.training.train import evaluate_checkpoint

    data, cfg, trained = pretraining
    # A head that predicts divider everywhere scores the share of divider cells, which the map
    # and the paint labels do not share (the pretrained fixture's head predicts background).
    state = load_checkpoint(trained)
    state["model"]["head.classifier.bias"] = torch.tensor([0.0, 1e4, 0.0, 0.0])
    checkpoint = tmp_path / "divider.pt"
    torch.save(state, checkpoint)
    scored = {}
    for source in ("map", "paint"):
        argv = ["--dataroot", str(data.root), "--cache-dir", data.cache_dir, "--source", source,
                "--stride", "2", "--checkpoint", str(checkpoint), "--quiet"]  # fmt: skip
        assert main([*argv, "--json"]) == 0
        head = json.loads(capsys.readouterr().out)["checkpoints"][str(checkpoint)]
        labels = data.model_copy(update={"bev_label_source": source})
        direct = checkpoint_alignment(labels, checkpoint, cfg, CPU)
        assert head["head_mIoU"] == evaluate_checkpoint(labels, checkpoint, runtime=CPU)["val/mIoU"]
        scored[source] = head["head_mIoU"]
        for key in ("head_reached_mIoU", "head_perspective_mIoU"):
            assert head[key] == pytest.approx(direct[PREFIX + key]), (source, key)
        assert main(argv) == 0
        assert f"head mIoU {head['head_mIoU']:.3f}, on reached cells" in capsys.readouterr().out
    assert scored["map"] != scored["paint"]
