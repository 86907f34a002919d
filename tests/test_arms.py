"""A method is one row: an arm defined here, in this test file alone, runs through a real sweep
(Ray Tune, the training core, SQLite MLflow) and gets its own runs and verdict row.

This file is also the arm module the sweep loads (``BEVLABELS_ARMS=<this file>``), in the
driver and in every Ray worker: keep its top level free of test-only imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from model.arms import Arm

# Supervised fine-tuning plus the temporal-consistency objective: an arm built only from
# objectives that exist, defined nowhere but here.
ARMS = (Arm("supervised_temporal", "supervised + temporal term", weights=(("temporal", 0.1),)),)

THIS_FILE = str(Path(__file__).resolve())


def test_the_registry_is_consistent():
    from model import arms, objectives
    from model.config import WEIGHT_PREFIX, FinetuneConfig, PretrainConfig

    table = arms.all_arms()
    assert len({a.name for a in table}) == len(table)
    assert [a.name for a in table if a.reference] == [arms.reference().name]
    assert set(arms.DEFAULT_METHODS) <= {a.name for a in table}
    known = {o.name for o in objectives.OBJECTIVES}
    for arm in table:
        assert set(arm.finetune) <= known, arm
        assert {name for name, _ in arm.weights} <= set(arm.finetune), arm
        if arm.matched_to is not None:
            assert arms.get(arm.matched_to).pretrains, arm
    # Every weight field of a phase is an objective's, and every objective has one somewhere.
    fields = {
        name[len(WEIGHT_PREFIX) :]
        for config in (PretrainConfig, FinetuneConfig)
        for name in config.model_fields
        if name.startswith(WEIGHT_PREFIX)
    }
    assert fields == known


def test_an_arm_keeps_only_its_own_finetuning_objectives_and_turns_on_its_own(tmp_path):
    from harness.spec import load_spec
    from harness.trials import Trial

    path = tmp_path / "s.yaml"
    path.write_text("study: s\nmethods: [supervised, pct]\nfinetune: {w_perspective: 0.5}\n")
    spec = load_spec(path)
    assert Trial("supervised", 0).resolve(spec).finetune.weights == {"bev": 1.0}
    pct = Trial("pct", 0).resolve(spec)
    assert pct.finetune.weights == {"bev": 1.0, "perspective": 0.5}  # the spec's weight wins
    assert pct.pretrain is None and pct.needs_pseudo_labels
    path.write_text("study: s\nmethods: [pct]\n")
    assert Trial("pct", 0).resolve(load_spec(path)).finetune.w_perspective == 1.0


def test_an_arm_defined_in_a_test_file_runs_through_a_sweep_into_mlflow_and_the_report(
    tmp_path, monkeypatch
):
    from test_harness_sweep import assert_ok, run_sweep, sweep_env, write_study

    monkeypatch.setenv("BEVLABELS_ARMS", THIS_FILE)
    sweep = write_study(
        tmp_path,
        "own_arm",
        methods=["supervised", "supervised_temporal"],
        search={"finetune.label_fraction": [1.0]},
        seeds=[0, 1],
        finetune={"budget": {"value": 1}, "batch_size": 2},
        mlflow={"system_metrics": False, "log_checkpoint": False, "log_images": False},
        runtime={"alignment": False},
        max_concurrent=2,
    )
    env = sweep_env(BEVLABELS_ARMS=THIS_FILE)
    assert_ok(run_sweep(sweep, "--quiet", env=env))
    runs = sweep.runs("trial")
    mine = [r for r in runs if r.data.params["method"] == "supervised_temporal"]
    assert len(runs) == 4 and len(mine) == 2
    for run in mine:
        assert run.data.params["finetune.w_temporal"] == "0.1"
        assert "train/loss_temporal" in run.data.metrics
    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--experiment", "own_arm",
         "--tracking-uri", sweep.tracking_uri, "--out", str(out), "--no-mlflow-log"],  # fmt: skip
        env={**os.environ, "BEVLABELS_ARMS": THIS_FILE},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    verdicts = (out / "verdicts.csv").read_text()
    assert "supervised_temporal" in verdicts


def test_pseudo_label_sets_are_prepared_once_per_distinct_data_section():
    from harness.spec import load_spec
    from harness.trials import expand_trials, pseudo_label_specs

    def specs(*overrides: str) -> list:
        spec = load_spec(Path(THIS_FILE).parents[1] / "experiments/label_fraction.yaml", overrides)
        return pseudo_label_specs([t.resolve(spec) for t in expand_trials(spec)])

    assert len(specs()) == 1  # 80 trials, 40 of them read pseudo-labels (pretrained, pct), one set
    sources = specs("search.data.pseudo_label_source=[labeler,shuffled]")
    assert {s.data.pseudo_label_source for s in sources} == {"labeler", "shuffled"}
    assert len(sources) == 2
    assert specs("methods=[supervised]") == []


def test_a_bad_arms_module_exits_2_with_one_line_naming_the_file_and_key(
    tmp_path, monkeypatch, capsys
):
    from harness.sweep import main

    spec = tmp_path / "s.yaml"
    spec.write_text("study: s\n")  # no methods: the default arms are checked all the same
    bad = tmp_path / "bad_arms.py"
    bad.write_text("ARMS = (1,)\n")
    for value, problem in [
        (str(tmp_path / "missing.py"), "cannot load"),
        (str(bad), "ARMS holds 1, not an Arm row"),
    ]:
        monkeypatch.setenv("BEVLABELS_ARMS", value)
        assert main([str(spec), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"error: {spec}: methods: BEVLABELS_ARMS: ") and problem in err
