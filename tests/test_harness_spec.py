"""The study spec: what a valid spec expands to, and what a bad one says (docs/harness.md).

Every bad spec must exit with status 2, name the file and the key path, say what is allowed,
and leave nothing behind: no study folder, no MLflow store.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from harness.spec import load_spec
from harness.sweep import main
from harness.trials import Trial, expand_trials, pretrain_shares, wsd_trunks

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

# (spec body, fragments the message must contain). `{file}` is the spec's path.
BAD_SPECS = {
    "typo_section": (
        "pretrian: {w_reproj: 1}",
        ["{file}: pretrian: unknown key 'pretrian'", "did you mean 'pretrain'?"],
    ),
    "typo_nested_key": (
        "finetune: {budgett: {value: 1}}",
        ["{file}: finetune.budgett: unknown key", "did you mean 'budget'?"],
    ),
    "typo_deeper_key": (
        "pretrain: {optim: {lrr: 0.1}}",
        ["{file}: pretrain.optim.lrr: unknown key", "did you mean 'lr'?"],
    ),
    "wrong_type": (
        "finetune: {batch_size: two}",
        ["{file}: finetune.batch_size: input should be a valid integer", "got 'two'"],
    ),
    "fraction_zero": (
        "search: {finetune.label_fraction: [0.5, 0]}",
        ["{file}: search.finetune.label_fraction[1]: 0 is not valid here", "must be > 0"],
    ),
    "fraction_above_one": (
        "search: {finetune.label_fraction: [1.5]}",
        ["{file}: search.finetune.label_fraction[0]: 1.5 is not valid here", "must be <= 1"],
    ),
    "duplicate_grid_values": (
        "search: {finetune.label_fraction: [0.5, 0.5]}",
        ["{file}: search.finetune.label_fraction[1]: duplicate value 0.5"],
    ),
    "search_axis_outside_the_sections": (
        "search: {seeds: [1, 2]}",
        ["{file}: search.seeds: a search axis is a dotted path into data, model, pretrain"],
    ),
    "search_axis_typo": (
        "search: {finetune.label_fractoin: [0.5]}",
        ["{file}: search.finetune.label_fractoin[0]: 0.5 is not valid here", "unknown key"],
    ),
    "infinite_lr": (
        "finetune: {optim: {lr: .inf}}",
        ["{file}: finetune.optim.lr: input should be a finite number"],
    ),
    "huge_budget": (
        "pretrain: {budget: {value: 1.0e+20}}",
        ["{file}: pretrain.budget.value: ", "got 1e+20"],
    ),
    "budget_too_long": (
        "pretrain: {budget: {unit: steps, value: 100000000}}",
        ["{file}: pretrain.budget.value: must be <= 10000000, got 100000000"],
    ),
    "budget_unknown_unit": (
        "finetune: {budget: {unit: hours, value: 2}}",
        ["{file}: finetune.budget.unit: unknown value 'hours'; allowed: epochs, steps, samples"],
    ),
    "budget_not_positive": (
        "finetune: {budget: {unit: steps, value: 0}}",
        ["{file}: finetune.budget.value: must be >= 1, got 0"],
    ),
    "early_stopping_without_validation": (
        "finetune: {early_stopping: {patience: 2}, val_every: null}",
        ["{file}: finetune: finetune.early_stopping needs validation"],
    ),
    "no_pretraining_loss": (
        "pretrain: {w_reproj: 0, w_temporal: 0}",
        ["{file}: pretrain: pretraining needs pretrain.w_reproj > 0 or pretrain.w_temporal > 0"],
    ),
    "unknown_preset": (
        "model: {preset: nanoo}",
        ["{file}: model.preset: unknown preset 'nanoo'; allowed: base, nano, small, tiny"],
    ),
    "unknown_model_override": (
        "model: {preset: nano, overrides: {embed_dims: 32}}",
        ["{file}: model: model.overrides: unknown key 'embed_dims'"],
    ),
    "invalid_model_override": (
        "model: {preset: nano, overrides: {embed_dim: 30, num_heads: 4}}",
        ["{file}: model: model.overrides: not a valid model", "divisible by num_heads"],
    ),
    "nuscenes_without_dataroot": (
        "data: {source: nuscenes}",
        ["{file}: data: data.dataroot is required when data.source is 'nuscenes'"],
    ),
    "nuscenes_with_synthetic_pseudo_labels": (
        "data: {source: nuscenes, dataroot: /data/nuscenes, pseudo_labels: synthetic}",
        ["{file}: data: data.pseudo_labels: 'synthetic' pseudo-labels exist only for synthetic"],
    ),
    "unknown_source": (
        "data: {source: nuscene}",
        [
            "{file}: data.source: unknown value 'nuscene'; allowed: synthetic, nuscenes",
            "did you mean 'nuscenes'?",
        ],
    ),
    # BEV labels (docs/data.md): protocol, source, band width, grid.
    "unknown_protocol": (
        "data: {protocol: hdmap}",
        ["{file}: data.protocol: unknown value 'hdmap'", "did you mean 'hdmapnet'?"],
    ),
    "unknown_label_source": (
        "data: {bev_label_source: paints}",
        ["{file}: data.bev_label_source: unknown value 'paints'; allowed: map, paint"],
    ),
    "paint_labels_on_nuscenes": (
        "data: {source: nuscenes, dataroot: /data/nuscenes, bev_label_source: paint}",
        ["{file}: data: data.bev_label_source: 'paint' labels exist only for synthetic data"],
    ),
    "line_width_zero": (
        "data: {line_width_m: 0}",
        ["{file}: data.line_width_m: must be > 0.0, got 0"],
    ),
    "clear_margin_negative": (
        "data: {clear_margin_m: -0.1}",
        ["{file}: data.clear_margin_m: must be >= 0.0, got -0.1"],
    ),
    "grid_resolution_makes_it_empty": (
        "data: {grid: {resolution_m: 200}}",
        ["{file}: data: data.grid.resolution_m: 200.0 m makes the grid empty (0 x 0 cells"],
    ),
    "grid_resolution_zero": (
        "data: {grid: {resolution_m: 0}}",
        ["{file}: data: data.grid.resolution_m: must be > 0, got 0.0"],
    ),
    "grid_resolution_not_dividing": (
        "data: {grid: {resolution_m: 0.7}}",
        ["{file}: data: data.grid.resolution_m: 0.7 m does not divide the grid's 60 m along x"],
    ),
    "unknown_method": (
        "methods: [supervised, pretrain]",
        ["{file}: methods[1]: unknown value 'pretrain'", "did you mean 'pretrained'?"],
    ),
    "duplicate_seeds": ("seeds: [0, 1, 0]", ["{file}: seeds: duplicate entries [0]"]),
    "empty_methods": ("methods: []", ["{file}: methods: list should have at least 1 item"]),
    "unknown_scheduler": (
        "scheduler: {type: hyperband}",
        ["{file}: scheduler.type: unknown value 'hyperband'; allowed: none, asha"],
    ),
    "optuna_param_typo": (
        "methods: [pretrained]\n"
        "optuna: {params: {pretrain.w_reprj: {type: uniform, low: 0, high: 1}}}",
        ["{file}: optuna.params.pretrain.w_reprj: 0.0 is not valid here", "unknown key"],
    ),
    "optuna_incomplete_distribution": (
        "methods: [pretrained]\n"
        "optuna: {params: {pretrain.w_reproj: {type: loguniform, low: 0.1}}}",
        ["{file}: optuna.params.pretrain.w_reproj.high: required for type 'loguniform'"],
    ),
    "optuna_with_baseline": (
        "optuna: {params: {pretrain.w_reproj: {type: uniform, low: 0, high: 1}}}",
        ["{file}: methods: an Optuna search needs methods: [pretrained]"],
    ),
    # ASHA's time unit is the reporting period: 240 steps validated every 40 are 6 of them.
    "asha_grace_beyond_the_periods": (
        "finetune: {budget: {unit: steps, value: 240, every: 40}}\n"
        "scheduler: {type: asha, grace_period: 7}",
        ["{file}: scheduler.grace_period: must be <= the 6 reporting periods of finetune.budget"],
    ),
    "negative_gpu": ("resources: {gpu: -1}", ["{file}: resources.gpu: must be >= 0"]),
    "not_yaml": ("finetune: {batch_size: [1, 2}", ["{file}: not valid YAML (line 2, column 29)"]),
    "not_a_mapping": ("- a\n- b", ["{file}: the spec must be a mapping of sections, got list"]),
    # Old-style specs (before the core's configs became the sections): named, never migrated.
    "old_training_section": (
        "training: {finetune_epochs: 1}",
        ["{file}: training.finetune_epochs: renamed; use finetune.budget"],
    ),
    "old_training_lr": (
        "training: {lr: 0.001}",
        ["{file}: training.lr: renamed; use pretrain.optim.lr and finetune.optim.lr"],
    ),
    "old_training_options": (
        "training: {options: {reproj_stride: 1}}",
        ["{file}: training.options.reproj_stride: renamed; use pretrain.reprojection.stride"],
    ),
    "old_search_axis": (
        "search: {label_fraction: [0.5]}",
        ["{file}: search.label_fraction: renamed; use search.finetune.label_fraction"],
    ),
    "wsd_lengths_not_increasing": (
        "pretrain: {optim: {schedule: wsd, warmup_iters: 0}}\n"
        "search: {pretrain.budget.value: [4, 2]}",
        ["{file}: search.pretrain.budget.value[1]: wsd lengths must increase: 2 after 4"],
    ),
    "wsd_length_not_an_integer": (
        "pretrain: {optim: {schedule: wsd, warmup_iters: 0}}\n"
        "search: {pretrain.budget.value: [2, 2.5]}",
        ["{file}: search.pretrain.budget.value[1]: 2.5: wsd lengths are integers"],
    ),
    "wsd_decay_fraction_zero": (
        "pretrain: {optim: {schedule: wsd, decay_fraction: 0}}",
        ["{file}: pretrain.optim.decay_fraction: must be > 0"],
    ),
    "wsd_decay_fraction_above_half": (
        "pretrain: {optim: {schedule: wsd, decay_fraction: 0.6}}",
        ["{file}: pretrain.optim.decay_fraction: must be <= 0.5, got 0.6"],
    ),
    "wsd_samples_budget_not_a_multiple_of_the_batch": (
        "pretrain: {batch_size: 4, budget: {unit: samples, value: 10},"
        " optim: {schedule: wsd, warmup_iters: 0}}",
        [
            "{file}: pretrain: budget.value: a wsd budget in samples must be a multiple of"
            " batch_size (4), got 10"
        ],
    ),  # fmt: skip
    "wsd_warmup_past_the_decay_start": (
        "pretrain: {budget: {unit: steps, value: 10}, optim: {schedule: wsd}}",
        ["{file}: pretrain: optim.warmup_iters: 500 warmup steps run past the wsd decay start"],
    ),
    "old_optuna_place": (
        "methods: [pretrained]\nsearch: {optuna: {params: {}}}",
        ["{file}: search.optuna: renamed; use optuna"],
    ),
}


def write_spec(folder: Path, body: str, name: str = "study.yaml") -> Path:
    path = folder / name
    storage = folder / "studies" / "bad"
    header = "" if body.startswith("- ") else f"storage_path: {storage}\n"  # a list stays a list
    path.write_text(f"{header}{textwrap.dedent(body)}\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_with_a_precise_message_and_creates_nothing(
    case, tmp_path, capsys, monkeypatch
):
    body, fragments = BAD_SPECS[case]
    spec_path = write_spec(tmp_path, body)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)

    assert main([str(spec_path)]) == 2

    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment.format(file=spec_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_set_override_with_a_typo_is_reported_like_a_spec_error(tmp_path, capsys):
    spec_path = write_spec(tmp_path, "finetune: {budget: {value: 1}}")
    assert main([str(spec_path), "--set", "finetune.budget.vale=2", "--dry-run"]) == 2
    assert "finetune.budget.vale: unknown key" in capsys.readouterr().err


def test_an_empty_spec_is_an_error_not_a_default_study(tmp_path, capsys):
    spec_path = tmp_path / "empty.yaml"
    spec_path.write_text("# nothing here\n")
    assert main([str(spec_path), "--dry-run"]) == 2
    assert f"{spec_path}: the spec is empty" in capsys.readouterr().err


def test_missing_spec_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the spec" in capsys.readouterr().err


def test_nuscenes_dataroot_that_does_not_exist_exits_2_before_creating_anything(tmp_path, capsys):
    spec_path = write_spec(tmp_path, f"data: {{source: nuscenes, dataroot: {tmp_path}/nuscenes}}")
    assert main([str(spec_path)]) == 2
    assert f"data.dataroot: directory {tmp_path}/nuscenes does not exist" in capsys.readouterr().err
    assert not (tmp_path / "studies").exists()


def test_dry_run_counts_what_a_data_parallel_trial_holds(tmp_path, capsys):
    text = "resources: {cpu: 2, gpu: 1, workers: 8}\nruntime: {device: cuda}"
    spec_path = write_spec(tmp_path, text)
    assert main([str(spec_path), "--dry-run"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("resources: 8 workers x (cpu 2, gpu 1) per trial: 16 CPUs, 8 GPUs")
    assert last.endswith(": 0")  # this machine has no 8 GPUs
    assert not (tmp_path / "studies").exists()


def test_console_entry_point_reports_a_bad_spec_with_exit_status_2(tmp_path):
    spec_path = write_spec(tmp_path, "model: {preset: huge}")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.sweep", str(spec_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert f"{spec_path}: model.preset: unknown preset 'huge'" in proc.stderr
    assert not (tmp_path / "studies").exists()


# --- valid specs ---------------------------------------------------------------------------------


def trials_of(tmp_path, body: str) -> list:
    spec = load_spec(write_spec(tmp_path, body))
    return [t.resolve(spec) for t in expand_trials(spec)]


def test_grid_crosses_fractions_methods_and_seeds_and_shares_pretraining_per_seed(tmp_path):
    trials = trials_of(
        tmp_path,
        "search: {finetune.label_fraction: [0.1, 0.25, 0.5, 1.0]}\nseeds: [0, 1, 2]\n"
        "methods: [supervised, pretrained]",
    )
    assert len(trials) == 4 * 2 * 3
    shares = pretrain_shares(trials, "fingerprint")
    assert len(shares) == 3  # one pretraining per seed, shared by its 4 label fractions
    assert set(shares.values()) == {4}
    supervised = [t for t in trials if t.trial.method == "supervised"]
    assert all(t.pretrain is None and t.pretrain_key("x") is None for t in supervised)


def test_supervised_baseline_is_not_repeated_for_every_pretraining_variant(tmp_path):
    trials = trials_of(
        tmp_path, "search: {finetune.label_fraction: [0.5], pretrain.w_reproj: [0.5, 1.0, 2.0]}"
    )
    assert [t.trial.method for t in trials].count("supervised") == 1
    pretrained = [t for t in trials if t.trial.method == "pretrained"]
    assert sorted(t.pretrain.w_reproj for t in pretrained) == [0.5, 1.0, 2.0]
    assert len(pretrain_shares(trials, "fingerprint")) == 3


def test_a_trial_is_its_overrides_resolved_with_the_spec_model(tmp_path):
    body = "pretrain: {w_temporal: 0.3}\nfinetune: {budget: {value: 3}}"
    spec = load_spec(write_spec(tmp_path, body))
    trial = Trial("pretrained", 1, (("pretrain.w_reproj", 2.0), ("finetune.label_fraction", 0.5)))
    resolved = trial.resolve(spec)
    assert (resolved.pretrain.w_reproj, resolved.pretrain.w_temporal) == (2.0, 0.3)
    assert (resolved.finetune.label_fraction, resolved.finetune.budget.value) == (0.5, 3)
    assert resolved.variant == "pretrained@0.5" and resolved.name == "pretrained@0.5-w_reproj=2-s1"
    # The cell the study view groups by: one row per axis value, not all lengths in one.
    assert resolved.cell == "pretrained@0.5 w_reproj=2"
    lengths = Trial("pretrained", 0, (("pretrain.budget.value", 4),)).resolve(spec)
    assert (lengths.cell, lengths.name) == ("pretrained@1.0 budget=4", "pretrained@1.0-budget=4-s0")
    assert Trial.from_dict(trial.to_dict()) == trial


def test_the_pretraining_key_depends_on_pretraining_data_model_and_seed_only(tmp_path):
    spec = load_spec(write_spec(tmp_path, "seeds: [0]"))

    def key(*overrides, seed=0):
        return Trial("pretrained", seed, tuple(overrides)).resolve(spec).pretrain_key("fp")

    base = key()
    assert key(("finetune.label_fraction", 0.5), ("finetune.w_bev", 2.0)) == base
    assert key(("finetune.optim.lr", 0.1)) == base
    assert key(("pretrain.optim.lr", 0.1)) != base
    assert key(("pretrain.reprojection.stride", 1)) != base
    assert key(("data.max_val_samples", 4)) != base
    assert key(("model.overrides", {"embed_dim": 32, "num_heads": 4})) != base
    assert key(seed=1) != base


def test_set_overrides_parse_values_as_yaml(tmp_path):
    spec = load_spec(
        write_spec(tmp_path, "seeds: [0]"),
        [
            "seeds=[3, 4]",
            "finetune.optim.lr=0.01",
            "search.finetune.label_fraction=[0.5]",
            "resources.cpu=2",
        ],
    )
    assert spec.seeds == [3, 4]
    assert spec.finetune.optim.lr == 0.01 and spec.pretrain.optim.lr == 2e-4
    assert spec.search == {"finetune.label_fraction": [0.5]}
    assert spec.resources.cpu == 2


def test_study_name_defaults_to_the_file_name_and_storage_to_the_study_folder(tmp_path):
    path = tmp_path / "my_study.yaml"
    path.write_text("seeds: [0]\n")
    spec = load_spec(path)
    assert spec.study == "my_study"
    assert spec.experiment == "my_study"
    assert spec.storage_dir() == (Path.cwd() / "studies" / "my_study").resolve()


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_are_valid_and_dry_run(path, capsys):
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pretraining run" in out
    assert yaml.safe_load(path.read_text())["study"] == path.stem


def test_label_fraction_study_is_the_headline_protocol():
    spec = load_spec(EXPERIMENTS / "label_fraction.yaml")
    trials = [t.resolve(spec) for t in expand_trials(spec)]
    assert sorted({t.finetune.label_fraction for t in trials}) == [0.5, 1.0]
    arms = {"supervised", "supervised_matched", "pretrained", "pct"}
    assert {t.trial.method for t in trials} == arms
    assert sorted({t.trial.seed for t in trials}) == list(range(10))  # issue #19: at least 10
    assert spec.model.preset == "nano" and spec.data.source == "synthetic"
    assert spec.data.protocol == "hdmapnet" and spec.runtime.threads == 1
    # Equal step budgets: every fraction fine-tunes for the same optimiser steps.
    assert {(t.finetune.budget.unit, t.finetune.budget.value) for t in trials} == {("steps", 240)}
    assert spec.compute_matched == "amortised"
    assert len(trials) == 80
    assert len(pretrain_shares(trials, "fingerprint")) == 10


def test_a_wsd_length_grid_shares_one_trunk_per_seed_and_the_dry_run_says_what_it_saves(
    tmp_path, capsys
):
    body = (
        "pretrain: {optim: {schedule: wsd, decay_fraction: 0.1, warmup_iters: 0}}\n"
        "search: {pretrain.budget.value: [2, 4, 8, 16], finetune.label_fraction: [0.5, 1.0]}\n"
        "methods: [pretrained]\nseeds: [0, 1]"
    )
    spec_path = write_spec(tmp_path, body)
    trials = [t.resolve(load_spec(spec_path)) for t in expand_trials(load_spec(spec_path))]
    trunks = wsd_trunks(trials, "fingerprint")
    assert sorted(trunks.values()) == [[2, 4, 8, 16]] * 2  # one trunk per seed
    assert len(pretrain_shares(trials, "fingerprint")) == 8  # each length its own entry

    assert main([str(spec_path), "--dry-run"]) == 0
    # Per seed: a trunk to 16 x 0.9 = 14.4 epochs and decays of 0.1 x 30 = 3, against 30.
    assert capsys.readouterr().out.splitlines()[-1] == (
        "pretraining plan: 0 runs from scratch, 2 wsd trunks with 8 branches; "
        "34.8 epochs of pretraining instead of 60 (25.2 epochs saved)"
    )


def test_dry_run_prints_one_row_per_trial_and_the_pretraining_count(tmp_path, capsys):
    spec_path = write_spec(tmp_path, "search: {finetune.label_fraction: [0.5, 1.0]}\nseeds: [0, 1]")
    assert main([str(spec_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[1].split()
    assert header == ["#", "method", "finetune.label_fraction", "seed", "pretraining"]
    rows = [line.split() for line in out[2:-2]]
    assert len(rows) == 8
    assert {r[1] for r in rows} == {"supervised", "pretrained"}
    assert out[-2] == (
        "8 trials; 2 pretraining runs, shared by 4 pretrained trials; "
        "pretrain.budget 2 epochs, finetune.budget 2 epochs"
    )
    assert out[-1].startswith("resources: one process per trial (cpu 1, gpu 0): 1 CPUs, 0 GPUs")
    assert not (tmp_path / "studies").exists()
