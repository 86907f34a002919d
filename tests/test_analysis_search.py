"""analysis.search: the best setting of an Optuna study, its importance, and the confirmation
spec, read from a real SQLite MLflow store in the harness's layout."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from test_analysis_store import Trial, build_store

from analysis.search import main
from harness.spec import load_spec
from harness.trials import expand_trials

SPEC = """\
study: toy
data: {source: synthetic}
finetune: {label_fraction: 0.5}
optuna:
  num_samples: 10
  params:
    pretrain.w_reproj: {type: loguniform, low: 0.1, high: 10.0}
    pretrain.w_temporal: {type: loguniform, low: 0.01, high: 1.0}
methods: [pretrained]
seeds: [0]
scheduler: {type: asha, grace_period: 1}
"""
# The score follows w_reproj alone; w_temporal is noise-free but irrelevant.
W_REPROJ = [0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0]
W_TEMPORAL = [0.5, 0.02, 0.3, 0.05, 0.9, 0.01, 0.2, 0.25]


def score(w_reproj: float) -> float:
    return 0.10 + 0.05 * math.log10(w_reproj)


@pytest.fixture()
def store(tmp_path) -> str:
    trials = [
        Trial(
            "pretrained",
            0.5,
            0,
            score(r),
            params={"pretrain.w_reproj": str(r), "pretrain.w_temporal": str(t)},
        )
        for r, t in zip(W_REPROJ, W_TEMPORAL, strict=True)
    ]
    # ASHA stopped this one after its first validation, at a value above every finished trial:
    # its early value is not a final score, so it is not the best.
    trials.append(
        Trial(
            "pretrained",
            0.5,
            0,
            0.9,
            epochs_logged=1,
            params={"pretrain.w_reproj": "0.3", "pretrain.w_temporal": "0.4"},
        )
    )
    return build_store(tmp_path / "store", trials, spec_yaml=SPEC)


def test_best_importance_and_a_confirmation_spec_that_the_harness_runs(store, tmp_path, capsys):
    out, confirm = tmp_path / "out", tmp_path / "confirm.yaml"
    argv = ["--experiment", "toy", "--tracking-uri", store, "--out", str(out)]
    assert main([*argv, "--confirm", str(confirm), "--seeds", "1", "2", "3"]) == 0
    printed = capsys.readouterr().out
    assert "pretrain.w_reproj 8" in printed  # the best that ran every validation

    table = pd.read_csv(out / "search.csv")
    assert len(table) == 9 and table["ran_to_the_end"].sum() == 8
    assert table.loc[0, "pretrain.w_reproj"] == 8.0
    assert table.loc[0, "val_mIoU"] == pytest.approx(score(8.0), abs=1e-9)
    # At the last validation every trial reached (the stopped one's first): all 9, one budget.
    assert "over all 9 trials at validation 1" in printed
    importance = pd.read_csv(out / "importance.csv", index_col="param")["importance"]
    assert importance["pretrain.w_reproj"] > 0.6 > importance["pretrain.w_temporal"]

    spec = load_spec(confirm)  # what the confirmation is: a spec the harness accepts
    assert spec.optuna is None and spec.scheduler.type == "none"
    trials = [t.resolve(spec) for t in expand_trials(spec)]
    pretrained = {
        (t.pretrain.w_reproj, t.pretrain.w_temporal)
        for t in trials
        if t.trial.method != "supervised"
    }
    assert pretrained == {(8.0, 0.25), (1.0, 0.1)}  # best vs the core's defaults (1.0, 0.1)
    assert {t.trial.seed for t in trials} == {1, 2, 3}
    assert {t.finetune.label_fraction for t in trials} == {0.5}
    assert sum(t.trial.method == "supervised" for t in trials) == 3  # the reference, per seed


def test_confirming_on_the_searchs_own_seed_exits_2_and_writes_nothing(store, tmp_path, capsys):
    confirm = tmp_path / "confirm.yaml"
    argv = ["--experiment", "toy", "--tracking-uri", store, "--confirm", str(confirm)]
    assert main([*argv, "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seeds [0]: the search's own seed(s); confirm on fresh ones"]
    assert not confirm.exists()


def test_a_grid_study_is_not_an_optuna_study(tmp_path, capsys):
    store = build_store(tmp_path / "grid", [Trial("supervised", 1.0, 0, 0.5)])
    assert main(["--experiment", "toy", "--tracking-uri", store]) == 2
    assert "not an Optuna study" in capsys.readouterr().err


def test_the_written_spec_is_plain_yaml(store, tmp_path):
    confirm = tmp_path / "c.yaml"
    argv = ["--experiment", "toy", "--tracking-uri", store, "--confirm", str(confirm)]
    assert main([*argv, "--seeds", "4"]) == 0
    assert yaml.safe_load(confirm.read_text())["study"] == "toy_confirm"
