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

from harness.spec import expand_trials, load_spec, pretrain_groups
from harness.sweep import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

# (spec body, fragments the message must contain). `{file}` is the spec's path.
BAD_SPECS = {
    "typo_section": (
        "trainig: {finetune_epochs: 1}",
        ["{file}: trainig: unknown key 'trainig'", "did you mean 'training'?"],
    ),
    "typo_nested_key": (
        "training: {finetune_epoch: 1}",
        ["{file}: training.finetune_epoch: unknown key", "did you mean 'finetune_epochs'?"],
    ),
    "wrong_type": (
        "training: {batch_size: two}",
        ["{file}: training.batch_size: input should be a valid integer", "got 'two'"],
    ),
    "fraction_zero": (
        "search: {label_fraction: [0.5, 0]}",
        ["{file}: search.label_fraction[1]: must be > 0", "got 0"],
    ),
    "fraction_above_one": (
        "search: {label_fraction: [1.5]}",
        ["{file}: search.label_fraction[0]: must be <= 1", "got 1.5"],
    ),
    "unknown_preset": (
        "model: {preset: nanoo}",
        [
            "{file}: model.preset: unknown value 'nanoo'; allowed: base, nano, small, tiny",
            "did you mean 'nano'?",
        ],
    ),
    "unknown_model_override": (
        "model: {preset: nano, overrides: {embed_dims: 32}}",
        ["{file}: model.overrides.embed_dims: unknown key", "did you mean 'embed_dim'?"],
    ),
    "invalid_model_override": (
        "model: {preset: nano, overrides: {embed_dim: 30, num_heads: 4}}",
        ["{file}: model.overrides: not a valid model", "divisible by num_heads"],
    ),
    "nuscenes_without_dataroot": (
        "data: {source: nuscenes}",
        ["{file}: data.dataroot: required when data.source is 'nuscenes'"],
    ),
    "nuscenes_with_synthetic_pseudo_labels": (
        "data: {source: nuscenes, dataroot: /data/nuscenes, pseudo_labels: synthetic}",
        ["{file}: data.pseudo_labels: 'synthetic' pseudo-labels exist only for synthetic data"],
    ),
    "unknown_source": (
        "data: {source: nuscene}",
        [
            "{file}: data.source: unknown value 'nuscene'; allowed: synthetic, nuscenes",
            "did you mean 'nuscenes'?",
        ],
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
        "search: {optuna: {params: {w_reprj: {type: uniform, low: 0, high: 1}}}}",
        ["{file}: search.optuna.params.w_reprj: unknown key 'w_reprj'", "did you mean 'w_reproj'?"],
    ),
    "optuna_incomplete_distribution": (
        "methods: [pretrained]\n"
        "search: {optuna: {params: {w_reproj: {type: loguniform, low: 0.1}}}}",
        ["{file}: search.optuna.params.w_reproj.high: required for type 'loguniform'"],
    ),
    "optuna_with_baseline": (
        "search: {optuna: {params: {w_reproj: {type: uniform, low: 0, high: 1}}}}",
        ["{file}: methods: an Optuna search over loss weights needs methods: [pretrained]"],
    ),
    "negative_gpu": ("resources: {gpu: -1}", ["{file}: resources.gpu: must be >= 0"]),
    "not_yaml": ("training: {batch_size: [1, 2}", ["{file}: not valid YAML (line 2, column 29)"]),
    "not_a_mapping": ("- a\n- b", ["{file}: the spec must be a mapping of sections, got list"]),
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
    spec_path = write_spec(tmp_path, "training: {finetune_epochs: 1}")
    assert main([str(spec_path), "--set", "training.finetune_epoch=2", "--dry-run"]) == 2
    assert "training.finetune_epoch: unknown key" in capsys.readouterr().err


def test_missing_spec_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the spec" in capsys.readouterr().err


def test_nuscenes_dataroot_that_does_not_exist_exits_2_before_creating_anything(tmp_path, capsys):
    spec_path = write_spec(tmp_path, f"data: {{source: nuscenes, dataroot: {tmp_path}/nuscenes}}")
    assert main([str(spec_path)]) == 2
    assert f"data.dataroot: directory {tmp_path}/nuscenes does not exist" in capsys.readouterr().err
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
    assert f"{spec_path}: model.preset: unknown value 'huge'" in proc.stderr
    assert not (tmp_path / "studies").exists()


# --- valid specs ---------------------------------------------------------------------------------


def test_grid_crosses_fractions_methods_and_seeds_and_shares_pretraining_per_seed(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            "search: {label_fraction: [0.1, 0.25, 0.5, 1.0]}\nseeds: [0, 1, 2]\n"
            "methods: [supervised, pretrained]",
        )
    )
    trials = expand_trials(spec)
    assert len(trials) == 4 * 2 * 3
    groups = pretrain_groups(trials)
    assert len(groups) == 3  # one pretraining per seed, shared by its 4 label fractions
    assert set(groups.values()) == {4}
    supervised = [t for t in trials if t.method == "supervised"]
    assert all(t.pretrain_epochs == 0 and t.pretrain_group is None for t in supervised)


def test_supervised_baseline_is_not_repeated_for_every_pretraining_variant(tmp_path):
    spec = load_spec(
        write_spec(tmp_path, "search: {label_fraction: [0.5], w_reproj: [0.5, 1.0, 2.0]}")
    )
    trials = expand_trials(spec)
    assert [t.method for t in trials].count("supervised") == 1
    assert sorted(t.w_reproj for t in trials if t.method == "pretrained") == [0.5, 1.0, 2.0]


def test_set_overrides_parse_values_as_yaml(tmp_path):
    spec = load_spec(
        write_spec(tmp_path, ""),
        ["seeds=[3, 4]", "training.lr=0.01", "search.label_fraction=[0.5]", "resources.cpu=2"],
    )
    assert spec.seeds == [3, 4]
    assert spec.training.lr == 0.01
    assert spec.search.label_fraction == [0.5]
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


def test_label_fraction_study_runs_24_trials_on_3_shared_pretrainings():
    spec = load_spec(EXPERIMENTS / "label_fraction.yaml")
    trials = expand_trials(spec)
    assert sorted({t.label_fraction for t in trials}) == [0.1, 0.25, 0.5, 1.0]
    assert {t.method for t in trials} == {"supervised", "pretrained"}
    assert sorted({t.seed for t in trials}) == [0, 1, 2]
    assert spec.model.preset == "nano" and spec.data.source == "synthetic"
    assert len(trials) == 24
    assert len(pretrain_groups(trials)) == 3


def test_dry_run_prints_one_row_per_trial_and_the_pretraining_count(tmp_path, capsys):
    spec_path = write_spec(tmp_path, "search: {label_fraction: [0.5, 1.0]}\nseeds: [0, 1]")
    assert main([str(spec_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[1].split()
    assert header == [
        "#", "method", "label_fraction", "pretrain_epochs", "finetune_epochs",
        "w_bev", "w_reproj", "w_temporal", "seed", "pretraining",
    ]  # fmt: skip
    rows = [line.split() for line in out[2:-1]]
    assert len(rows) == 8
    assert {r[1] for r in rows} == {"supervised", "pretrained"}
    assert out[-1] == "8 trials; 2 pretraining runs, shared by 4 pretrained trials"
    assert not (tmp_path / "studies").exists()
