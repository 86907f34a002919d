"""Training loops on synthetic nuScenes-format data: overfitting, pretrain -> finetune, resume,
checkpoints, the NaN guard, the schedule, the ego-frame augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.config import (
    DataConfig,
    EpochReport,
    FinetuneConfig,
    OptimConfig,
    PretrainConfig,
    RuntimeConfig,
)
from model.data.alignment_stats import chance_miou as alignment_chance_miou
from model.data.batching import make_loader
from model.data.dataset import NuScenesBevDataset
from model.data.keyframes import split_scenes
from model.data.labels import HDMAPNET_CLASSES, LabelConfig
from model.data.subsets import label_subset
from model.evaluation.forward import evaluate
from model.names import IGNORE
from model.network.reprojection import reproject
from model.network.warp import rotate_ego_frame
from model.presets import get_preset
from model.training.checkpoint import load_checkpoint, save_checkpoint
from model.training.class_weights import pseudo_label_class_weights
from model.training.loop import lr_factor
from model.training.losses import NonFiniteLossError
from model.training.train import evaluate_checkpoint, finetune, load_model, pretrain

# Small images keep a nano step around 0.2 s on one core.
NANO = get_preset("nano", image_size=(48, 80))
FAST = dict(batch_size=2, optim=OptimConfig(lr=2e-3))
CPU = RuntimeConfig(device="cpu", progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two cores are shared by many jobs: one thread is faster than oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_root(tmp_path_factory, name: str, scenes: int, samples_per_scene: int):
    from model.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp(name) / "dataroot"
    generate_dataset(out, progress=False, scenes=scenes, samples_per_scene=samples_per_scene,
                     image_size=(54, 96))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """3 scenes x 2 keyframes: train scenes 0 and 1, val scene 2."""
    return make_root(tmp_path_factory, "tiny", 3, 2)


@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
    """12 scenes x 3 keyframes: every road kind is in train and val (every third scene is
    val), which a val split has to be for generalisation to be measurable at all."""
    return make_root(tmp_path_factory, "study", 12, 3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bev_label_cache")


def data_config(root, cache_dir, **kw) -> DataConfig:
    return DataConfig(dataroot=str(root), cache_dir=str(cache_dir), **kw)


@pytest.fixture(scope="module")
def pretrained(study_root, cache_dir, tmp_path_factory):
    """Two epochs of pretraining on the study dataroot: (checkpoint, epoch reports)."""
    reports: list[EpochReport] = []
    cfg = PretrainConfig(budget={"value": 2}, **FAST)
    out = tmp_path_factory.mktemp("pretrain")
    data = data_config(study_root, cache_dir)
    checkpoint = pretrain(data, NANO, cfg, out, runtime=CPU, on_epoch=reports.append)
    return checkpoint, reports


def bev_dataset(root, cache_dir, split: str, scenes=None, protocol="hdmapnet"):
    grid = data_config(root, cache_dir).label_grid(NANO)
    return NuScenesBevDataset(root, "v1.0-mini", split, NANO.image_size,
                              LabelConfig(protocol, grid), scenes=scenes,
                              cache_dir=cache_dir, progress=False)  # fmt: skip


def chance_miou(dataset) -> float:
    """Foreground mIoU expected of a uniformly random prediction on these labels
    (model.data.alignment.chance_miou over the dataset's class counts)."""
    names = list(HDMAPNET_CLASSES)
    counts = torch.zeros(len(names), dtype=torch.int64)
    for i in range(len(dataset)):
        counts += torch.bincount(dataset[i]["bev_label"].flatten(), minlength=len(names))
    return alignment_chance_miou(counts.tolist(), names)


# --- learning ------------------------------------------------------------------------------------


def test_nano_overfits_a_few_synthetic_samples(tiny_root, cache_dir, tmp_path):
    # Plain cross-entropy: class weights trade train-set precision for recall on unseen scenes.
    cfg = FinetuneConfig(budget={"value": 72}, val_every=0, bev_class_weights=None,
                         label_fraction=0.5, batch_size=2,
                         optim=OptimConfig(lr=3e-3, warmup_iters=5))  # fmt: skip
    # Capacity, not label style: filled crossings give 48 x 80 images something to fit (the
    # HDMapNet-exact 0.75 m lines on a 0.5 m grid are one or two cells wide).
    data = data_config(tiny_root, cache_dir, protocol="hdmapnet_filled")
    result = finetune(data, NANO, cfg, tmp_path, seed=0, runtime=CPU)
    assert result.labelled_samples == 2  # one scene of two keyframes: one step per epoch
    first = result.history[0].losses["train/loss"]
    last = result.history[-1].losses["train/loss"]
    assert first / last > 5.0

    labelled = bev_dataset(tiny_root, cache_dir, "train", result.labelled_scenes, "hdmapnet_filled")
    net = load_model(result.checkpoint)
    loader = make_loader(labelled, 2, shuffle=False)
    metrics = evaluate(net, loader, "hdmapnet_filled", "cpu", bf16=CPU.bf16)
    assert metrics["mIoU"] > 0.8


def test_pretraining_learns_from_pseudo_labels_alone(pretrained):
    checkpoint, reports = pretrained
    assert [(r.phase, r.epoch) for r in reports] == [("pretrain", 1), ("pretrain", 2)]
    losses = {"pretrain/loss", "pretrain/loss_reproj", "pretrain/loss_temporal"}
    assert set(reports[0].losses) == losses  # no BEV term
    # Class-weighted CE (reprojection.class_weights="auto") starts higher and falls more
    # slowly than plain CE, which would drop fast by predicting road everywhere.
    first, second = (r.losses["pretrain/loss_reproj"] for r in reports)
    assert second < 0.9 * first
    assert all(r.labelled_samples == 0 for r in reports)
    # The pretrained head alone, on val: by default scored once, after the last epoch.
    assert reports[0].val == {} and "pretrain/val_mIoU" in reports[-1].val
    assert reports[-1].checkpoint == str(checkpoint)


def test_auto_reprojection_weights_balance_the_pseudo_label_pixels(study_root, cache_dir):
    grid = data_config(study_root, cache_dir).label_grid(NANO)
    dataset = NuScenesBevDataset(study_root, "v1.0-mini", "train", NANO.image_size,
                                 LabelConfig("hdmapnet", grid), pseudo_labels="synthetic",
                                 cache_dir=cache_dir, progress=False)  # fmt: skip
    counts = np.zeros(4)
    for i in range(len(dataset)):
        labels = dataset[i]["pseudo_labels"].numpy()
        counts += np.bincount(labels[labels != IGNORE], minlength=4)[:4]
    expected = np.clip(np.sqrt(counts[0] / counts), 1.0, 10.0)
    expected[0] = 1.0
    weights = pseudo_label_class_weights(dataset)
    np.testing.assert_allclose(weights, expected, rtol=1e-9)
    assert all(w > 1.0 for w in weights[1:])  # markings are rarer than road in every view


def test_a_pretraining_checkpoint_records_the_reprojection_weights_it_used(pretrained):
    checkpoint, _ = pretrained
    state = load_checkpoint(checkpoint)
    assert len(state["reproj_class_weights"]) == 4 and state["reproj_class_weights"][0] == 1.0
    assert state["phase_cfg"]["reprojection"]["class_weights"] == "auto"


def test_pretrain_then_finetune_beats_chance_on_val(study_root, cache_dir, pretrained, tmp_path):
    checkpoint, _ = pretrained
    data = data_config(study_root, cache_dir)
    # 12 epochs: at 6 even float32 cleared chance by only 0.006, and the default bf16 run
    # (a different rounding path) fell below it.
    cfg = FinetuneConfig(budget={"value": 12}, val_every=0, **FAST)
    result = finetune(data, NANO, cfg, tmp_path, seed=0, init_checkpoint=checkpoint, runtime=CPU)
    assert set(result.history[-1].losses) == {"train/loss", "train/loss_bev"}
    classes = {"val/IoU_divider", "val/IoU_ped_crossing", "val/IoU_boundary"}
    assert set(result.val) >= {"val/mIoU", *classes}
    chance = chance_miou(bev_dataset(study_root, cache_dir, "val"))
    assert result.val["val/mIoU"] > chance


def test_the_pretrained_head_is_evaluated_without_finetuning(study_root, cache_dir, pretrained):
    checkpoint, reports = pretrained
    data = data_config(study_root, cache_dir)
    direct = evaluate_checkpoint(data, checkpoint, runtime=CPU)
    # The same numbers as the pretraining's own last validation, under the trial's names.
    assert direct == {
        key.replace("pretrain/val_", "val/"): value for key, value in reports[-1].val.items()
    }
    assert 0.0 <= direct["val/mIoU"] <= 1.0


# --- bookkeeping ---------------------------------------------------------------------------------


def test_epoch_reports_carry_clocks_labelled_samples_and_a_loadable_checkpoint(
    study_root, cache_dir, tmp_path
):
    data = data_config(study_root, cache_dir, max_val_samples=2)
    reports: list[EpochReport] = []
    cfg = FinetuneConfig(budget={"value": 2}, label_fraction=0.25, **FAST)
    result = finetune(data, NANO, cfg, tmp_path, seed=3, runtime=CPU, on_epoch=reports.append)

    subset = label_subset(split_scenes(study_root, "v1.0-mini", "train"), 0.25, 3)
    assert result.labelled_scenes == subset.scenes
    assert [r.labelled_samples for r in reports] == [3 * len(subset.scenes)] * 2
    assert [r.epoch for r in reports] == [1, 2] and all("val/mIoU" in r.val for r in reports)
    assert 0 < reports[0].cum_wall_s < reports[1].cum_wall_s
    assert [r.cum_gpu_s for r in reports] == [0.0, 0.0]  # CPU: no GPU time
    state = load_checkpoint(reports[-1].checkpoint)  # weights_only=True
    assert (state["phase"], state["epoch"]) == ("finetune", 2)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


class Killed(Exception):
    """Stands in for the process dying right after an epoch's checkpoint was written."""


def kill_after(epoch: int):
    def on_epoch(report: EpochReport) -> None:
        if report.epoch >= epoch:
            raise Killed

    return on_epoch


def straight_and_resumed(data, cfg, tmp_path, runs=("straight",)):
    """Pretrain uninterrupted (once per name in `runs`), then killed after the first period
    and resumed in `tmp_path / "resumed"`: the reports of the first run and of the resume."""
    reports: dict[str, list[EpochReport]] = {name: [] for name in (*runs, "resumed")}
    for name in runs:
        pretrain(data, NANO, cfg, tmp_path / name, runtime=CPU, on_epoch=reports[name].append)
    with pytest.raises(Killed):
        pretrain(data, NANO, cfg, tmp_path / "resumed", runtime=CPU, on_epoch=kill_after(1))
    pretrain(data, NANO, cfg, tmp_path / "resumed", runtime=CPU, on_epoch=reports["resumed"].append)
    return reports[runs[0]], reports["resumed"]


def test_a_resumed_pretraining_matches_an_uninterrupted_one(tiny_root, cache_dir, tmp_path):
    data = data_config(tiny_root, cache_dir)
    cfg = PretrainConfig(budget={"value": 2}, val_every=None, **FAST)
    straight, resumed = straight_and_resumed(data, cfg, tmp_path)

    assert [r.epoch for r in resumed] == [2]
    assert resumed[0].losses == straight[1].losses
    a = load_checkpoint(tmp_path / "straight" / "pretrain.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "pretrain.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    again: list[EpochReport] = []
    pretrain(data, NANO, cfg, tmp_path / "resumed", runtime=CPU, on_epoch=again.append)
    assert again == []  # a finished pretraining is not redone


def test_a_checkpoint_of_another_label_subset_is_not_resumed(tiny_root, cache_dir, tmp_path):
    data = data_config(tiny_root, cache_dir, max_val_samples=1)
    cfg = FinetuneConfig(budget={"value": 1}, label_fraction=0.5, **FAST)
    finetune(data, NANO, cfg, tmp_path, seed=0, runtime=CPU)
    scenes = split_scenes(tiny_root, "v1.0-mini", "train")
    first = label_subset(scenes, 0.5, 0).scenes
    other_seed = next(s for s in range(1, 20) if label_subset(scenes, 0.5, s).scenes != first)
    with pytest.raises(ValueError, match="belongs to another run"):
        finetune(data, NANO, cfg, tmp_path, seed=other_seed, runtime=CPU)


def test_checkpoints_refuse_objects_that_need_unpickling(tmp_path):
    with pytest.raises(TypeError, match="plain values"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}, "grid": NANO})
    assert not list(tmp_path.iterdir())


def test_a_diverging_run_stops_with_an_error_naming_the_loss_term(tiny_root, cache_dir, tmp_path):
    data = data_config(tiny_root, cache_dir, max_val_samples=1)
    cfg = FinetuneConfig(budget={"value": 1}, **FAST)
    # A checkpoint whose head has blown up (an inf weight): the first loss is not finite.
    result = finetune(data, NANO, cfg, tmp_path / "ok", seed=0, runtime=CPU)
    state = load_checkpoint(result.checkpoint)
    name = next(k for k in state["model"] if k.startswith("head") and k.endswith("weight"))
    state["model"][name] = torch.full_like(state["model"][name], float("inf"))
    save_checkpoint(tmp_path / "blown.pt", state)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss term .*bev=.* at finetune"):
        finetune(data, NANO, cfg, tmp_path / "x", seed=0, init_checkpoint=tmp_path / "blown.pt",
                 runtime=CPU)  # fmt: skip


def test_schedule_warms_up_linearly_then_anneals_to_the_minimum():
    cfg = OptimConfig(warmup_iters=500, warmup_max_fraction=0.1)
    total = 1000  # the warmup is capped at 100 iterations
    assert math.isclose(lr_factor(0, total, cfg), 1.0 / 3.0)
    assert lr_factor(50, total, cfg) < lr_factor(99, total, cfg) < lr_factor(100, total, cfg)
    assert math.isclose(lr_factor(100, total, cfg), 0.5 * (1 + math.cos(math.pi * 0.1)),
                        rel_tol=1e-2)  # fmt: skip
    assert math.isclose(lr_factor(total, total, cfg), cfg.min_lr_ratio)
    factors = np.array([lr_factor(s, total, cfg) for s in range(100, total)])
    assert (np.diff(factors) <= 0).all()


def test_wsd_is_the_same_up_to_each_lengths_decay_start_then_decays_to_the_minimum():
    cfg = OptimConfig(schedule="wsd", decay_fraction=0.2, warmup_iters=10)
    short, long = 100, 300  # decay starts at 80 and 240
    assert math.isclose(lr_factor(0, short, cfg), 1.0 / 3.0)
    prefix = [lr_factor(s, short, cfg) for s in range(80)]
    assert prefix == [lr_factor(s, long, cfg) for s in range(80)]
    assert prefix[10:] == [1.0] * 70
    decay = np.array([lr_factor(s, short, cfg) for s in range(80, short)])
    assert (np.diff(decay) < 0).all() and math.isclose(decay[-1], cfg.min_lr_ratio)


def test_a_wsd_branch_off_a_longer_runs_trunk_equals_its_length_from_scratch(
    tiny_root, cache_dir, tmp_path
):
    data = data_config(tiny_root, cache_dir)
    optim = OptimConfig(lr=2e-3, schedule="wsd", decay_fraction=0.2, warmup_iters=2)

    def length(steps: int) -> PretrainConfig:
        budget = {"unit": "steps", "value": steps, "every": 4}
        return PretrainConfig(budget=budget, batch_size=2, optim=optim, val_every=None)

    short, long = length(10), length(20)  # decay starts: 8 and 16
    trunk = pretrain(data, NANO, long, tmp_path / "trunk", runtime=CPU, stop_step=8)
    assert load_checkpoint(trunk)["step"] == 8
    branch = pretrain(data, NANO, short, tmp_path / "branch", runtime=CPU, init_from=trunk)
    scratch = pretrain(data, NANO, short, tmp_path / "scratch", runtime=CPU)

    a, b = (load_checkpoint(path) for path in (branch, scratch))
    assert a["step"] == b["step"] == 10
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])
    assert a["cum_wall_s"] < b["cum_wall_s"]  # the branch's clock counts its 2 steps only
    with pytest.raises(ValueError, match="not a trunk of this run"):
        other = short.model_copy(update={"w_temporal": 0.5})
        pretrain(data, NANO, other, tmp_path / "other", runtime=CPU, init_from=trunk)


def test_rotating_the_ego_frame_moves_cameras_and_labels_together(tiny_root, cache_dir):
    dataset = bev_dataset(tiny_root, cache_dir, "train")
    batch = next(iter(make_loader(dataset, 2, shuffle=False)))
    grid = data_config(tiny_root, cache_dir).label_grid(NANO)
    turned = rotate_ego_frame(batch, grid, 180.0, yaw_rad=torch.tensor([math.pi, math.pi]))
    assert torch.equal(turned["bev_label"], batch["bev_label"].flip(-1).flip(-2))

    # What each camera sees of the labels is unchanged by the turn.
    def seen(b):
        logits = torch.nn.functional.one_hot(b["bev_label"], 4).permute(0, 3, 1, 2).float()
        rep = reproject(logits, b["intrinsics"], b["ego_from_cam"], NANO.image_size, grid, 4)
        return rep.logits.argmax(2), rep.valid

    (before, valid_before), (after, valid_after) = seen(batch), seen(turned)
    both = valid_before & valid_after
    assert both.float().mean() > 0.1
    assert (before[both] == after[both]).float().mean() > 0.98


# --- budgets and early stopping ------------------------------------------------------------------


def test_a_step_budget_gives_every_label_fraction_the_same_optimiser_steps(
    study_root, cache_dir, tmp_path
):
    data = data_config(study_root, cache_dir, max_val_samples=1)
    budget = {"unit": "steps", "value": 5, "every": 2}
    steps = {}
    for fraction in (0.25, 1.0):
        cfg = FinetuneConfig(budget=budget, label_fraction=fraction, val_every=0, **FAST)
        reports: list[EpochReport] = []
        finetune(data, NANO, cfg, tmp_path / f"{fraction}", runtime=CPU, on_epoch=reports.append)
        steps[fraction] = [r.steps for r in reports]
    # 3 labelled scenes of 3 keyframes (2 batches a pass) against 9 scenes (14 batches): the
    # same 5 steps in periods of 2, 2 and 1.
    assert steps == {0.25: [2, 4, 5], 1.0: [2, 4, 5]}


def test_an_epoch_budget_with_extra_steps_runs_them_all(tiny_root, cache_dir, tmp_path):
    data = data_config(tiny_root, cache_dir, max_val_samples=1)
    cfg = FinetuneConfig(budget={"value": 2}, extra_steps=3, val_every=0, **FAST)
    result = finetune(data, NANO, cfg, tmp_path, runtime=CPU)
    # 4 train keyframes, batch 2: 2 steps an epoch, 4 for the budget, 3 more.
    assert result.history[-1].steps == 7 and len(result.history) == 4


def test_early_stopping_stops_and_reports_its_best_epoch(tiny_root, cache_dir, tmp_path):
    data = data_config(tiny_root, cache_dir, max_val_samples=1)
    # No later epoch can beat the first by a whole mIoU point: it stops after `patience` = 1.
    stopping = {"patience": 1, "min_delta": 1.0}
    cfg = FinetuneConfig(budget={"value": 5}, early_stopping=stopping, **FAST)
    reports: list[EpochReport] = []
    result = finetune(data, NANO, cfg, tmp_path, runtime=CPU, on_epoch=reports.append)
    assert [r.epoch for r in reports] == [1, 2] and reports[-1].stopped_early
    assert result.epochs == 2 and reports[-1].epochs == 5
    assert reports[-1].best["best/epoch"] == 1.0
    assert reports[-1].best["best/val_mIoU"] == reports[0].val["val/mIoU"]
    # The final metrics stay the last epoch's: best/* is a name of its own.
    assert result.val == reports[-1].val


def test_a_step_budget_resumed_inside_a_pass_matches_an_uninterrupted_run(
    study_root, cache_dir, tmp_path
):
    data = data_config(study_root, cache_dir)
    # 14 batches a pass, periods of 3 steps: the resume lands inside the first pass.
    cfg = PretrainConfig(budget={"unit": "steps", "value": 6, "every": 3}, val_every=None, **FAST)
    straight, resumed = straight_and_resumed(data, cfg, tmp_path, runs=("straight", "again"))

    assert [r.steps for r in straight] == [3, 6] and [r.steps for r in resumed] == [6]
    weights = [load_checkpoint(tmp_path / d / "pretrain.pt")["model"] for d in
               ("straight", "again", "resumed")]  # fmt: skip
    # Deterministic at the pinned thread count: twice the same, and the same after a resume,
    # with the default speed switches (bf16 autocast where the CPU has it, channels_last,
    # fused AdamW): oneDNN's bf16 kernels repeat bit for bit at a fixed thread count.
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
