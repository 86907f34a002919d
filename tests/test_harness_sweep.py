"""Real sweeps: `python -m harness.sweep` on generated synthetic data, the real training core,
Ray Tune, and a real SQLite MLflow store, checked through MLflow's own API.

The default tier runs one small sweep (4 trials, 1 shared pretraining) and checks it from many
sides. The slow tier kills a sweep with SIGKILL and resumes it, runs a sweep on a two-node
Ray cluster started with `ray start`, and runs an Optuna search with ASHA.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL_SYNTHETIC

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "divider", "ped_crossing", "boundary"]
SWEEP_TIMEOUT_S = 600


@dataclass
class Sweep:
    spec_path: Path
    storage: Path
    tracking_uri: str
    experiment: str
    proc: subprocess.CompletedProcess | None = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def runs(self, role: str):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.search_runs(
            experiment_names=[self.experiment],
            filter_string=f"tags.`bev.role` = '{role}'",
            output_format="list",
        )

    def history(self, run_id: str, key: str) -> list:
        return sorted(self.client().get_metric_history(run_id, key), key=lambda m: m.timestamp)


def write_study(folder: Path, name: str, **sections) -> Sweep:
    storage = folder / "study"
    spec = {
        "study": name,
        "storage_path": str(storage),
        "data": {"source": "synthetic", "synthetic": _generator_args()},
        "model": {"preset": "nano"},
        "pretrain": {"budget": {"value": 1}, "batch_size": 2},
        "finetune": {"budget": {"value": 2}, "batch_size": 2},
        "search": {"finetune.label_fraction": [0.5, 1.0]},
        "methods": ["supervised", "pretrained"],
        "seeds": [0],
        "resources": {"cpu": 1},
        "retries": 0,
        "mlflow": {"system_metrics_interval_s": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return Sweep(path, storage, f"sqlite:///{storage}/mlflow.db", name)


def _generator_args() -> dict:
    args = dict(SMALL_SYNTHETIC)
    args["image_size"] = list(args["image_size"])
    return args


def sweep_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run_sweep(sweep: Sweep, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.sweep", str(sweep.spec_path), *args],
        cwd=sweep.spec_path.parent,
        env=env or sweep_env(),
        capture_output=True,
        text=True,
        timeout=SWEEP_TIMEOUT_S,
    )
    sweep.proc = proc
    return proc


def start_sweep(sweep: Sweep, cwd: Path, *args: str) -> subprocess.Popen:
    """The sweep in the background, in its own process group (for a test to SIGKILL it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "harness.sweep", str(sweep.spec_path), *args],
        cwd=cwd,
        env=sweep_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def assert_ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )


# --- one small sweep, checked from every side ----------------------------------------------------


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory) -> Sweep:
    sweep = write_study(tmp_path_factory.mktemp("sweep"), "small", max_concurrent=2)
    assert_ok(run_sweep(sweep))
    return sweep


def test_sweep_logs_one_finished_run_per_trial_with_the_documented_params(small_sweep):
    trials = small_sweep.runs("trial")
    assert len(trials) == 4
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert len({r.data.tags["bev.trial_id"] for r in trials}) == 4
    cells = {
        (r.data.params["method"], float(r.data.params["finetune.label_fraction"])) for r in trials
    }
    assert cells == {(m, f) for m in ("supervised", "pretrained") for f in (0.5, 1.0)}
    for run in trials:
        params, tags = run.data.params, run.data.tags
        pretrained = params["method"] == "pretrained"
        # The spec's dotted names; a supervised trial has no pretraining params.
        for name in ("labelled_samples", "finetune.budget.value", "finetune.w_bev", "seed",
                     "model.preset", "finetune.optim.lr", "runtime.device"):  # fmt: skip
            assert name in params, name
        for name in ("pretrain.budget.value", "pretrain.w_reproj", "pretrain.w_temporal"):
            assert (name in params) == pretrained, name
        assert params["model.preset"] == "nano" and params["finetune.budget.value"] == "2"
        assert params["variant"] == f"{params['method']}@{tags['bev.label_fraction']}"
        assert tags["bev.method"] == params["method"] and tags["bev.seed"] == "0"
        assert float(tags["bev.label_fraction"]) == float(params["finetune.label_fraction"])
        assert int(params["labelled_samples"]) > 0


def test_every_trial_logs_losses_val_metrics_and_clocks_per_epoch(small_sweep):
    for run in small_sweep.runs("trial"):
        keys = set(run.data.metrics)
        assert {"val/mIoU", "time/cum_wall_s", "time/cum_gpu_s", "labelled_samples"} <= keys
        assert {f"val/IoU_{c}" for c in CLASSES[1:]} <= keys
        assert any(k.startswith("train/loss") for k in keys)
        for key in ("val/mIoU", "time/cum_wall_s", "time/cum_wall_s_amortised"):
            assert [m.step for m in small_sweep.history(run.info.run_id, key)] == [1, 2], key
        wall = [m.value for m in small_sweep.history(run.info.run_id, "time/cum_wall_s")]
        assert 0 < wall[0] < wall[1]


def test_pretraining_runs_once_for_the_trials_that_share_it(small_sweep):
    (pretrain,) = small_sweep.runs("pretrain")
    assert pretrain.info.status == "FINISHED"
    pretrained = [r for r in small_sweep.runs("trial") if r.data.params["method"] == "pretrained"]
    assert len(pretrained) == 2
    assert {r.data.tags["bev.pretrain_key"] for r in pretrained} == {
        pretrain.data.tags["bev.pretrain_key"]
    }
    assert {r.data.tags["bev.pretrain_run_id"] for r in pretrained} == {pretrain.info.run_id}
    entries = [p for p in (small_sweep.storage / "pretrain").iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [pretrain.data.tags["bev.pretrain_key"]]
    assert not list((small_sweep.storage / "pretrain").glob("*.partial"))
    assert pretrain.data.metrics["time/cum_wall_s"] > 0
    assert [m.step for m in small_sweep.history(pretrain.info.run_id, "time/cum_wall_s")] == [1]


def test_the_pretraining_run_logs_its_target_alignment_on_val(small_sweep):
    (pretrain,) = small_sweep.runs("pretrain")
    m = pretrain.data.metrics
    for name in ("reach", "ceiling_mIoU", "ceiling_reached_mIoU", "perspective_mIoU"):
        assert 0.0 < m[f"align/{name}"] <= 1.0, name
    for name in ("head_reached_mIoU", "head_perspective_mIoU"):
        assert 0.0 <= m[f"align/{name}"] <= 1.0, name
    assert {"align/reach_divider", "align/head_reached_IoU_divider"} <= set(m)


def test_pretrained_trials_add_the_whole_and_the_shared_pretraining_time(small_sweep):
    (pretrain,) = small_sweep.runs("pretrain")
    pre_wall = pretrain.data.metrics["time/cum_wall_s"]
    for run in small_sweep.runs("trial"):
        m = run.data.metrics
        if run.data.params["method"] == "pretrained":
            assert m["time/cum_wall_s_incl_pretrain"] == pytest.approx(
                m["time/cum_wall_s"] + pre_wall
            )
            assert m["time/cum_wall_s_amortised"] == pytest.approx(
                m["time/cum_wall_s"] + pre_wall / 2
            )
        else:
            assert m["time/cum_wall_s_incl_pretrain"] == pytest.approx(m["time/cum_wall_s"])


def test_a_finished_sweep_writes_its_report_and_logs_it_under_the_sweep_run(small_sweep):
    (sweep,) = small_sweep.runs("sweep")
    logged = {a.path for a in small_sweep.client().list_artifacts(sweep.info.run_id, "report")}
    assert {"report/report.html", "report/summary.csv", "report/figures"} <= logged, logged
    assert (small_sweep.storage / "report" / "report.html").is_file()


def test_trials_and_pretraining_are_children_of_one_sweep_run_with_provenance(small_sweep):
    (sweep,) = small_sweep.runs("sweep")
    assert sweep.info.status == "FINISHED"
    tags = sweep.data.tags
    for name in ("bev.git_commit", "bev.dataset_fingerprint", "bev.config_hash"):
        assert tags[name], name
    assert tags["bev.study"] == "small"
    assert sweep.data.params["search.finetune.label_fraction"] == "[0.5, 1.0]"
    assert sweep.data.metrics["sweep/trials_total"] == 4
    assert sweep.data.metrics["sweep/trials_failed"] == 0
    shares = [sweep.data.metrics[f"sweep/{k}_share"] for k in ("train", "val", "overhead")]
    assert all(0 <= x < 1 for x in shares) and sum(shares) == pytest.approx(1.0)
    assert sweep.data.metrics["sweep/val_wall_s"] > 0  # every fine-tuning epoch validates
    children = small_sweep.runs("trial") + small_sweep.runs("pretrain")
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {sweep.info.run_id}
    artifacts = {a.path for a in small_sweep.client().list_artifacts(sweep.info.run_id)}
    assert {"spec.yaml", "resolved_spec.json", "environment.json"} <= artifacts
    env = json.loads(
        Path(
            small_sweep.client().download_artifacts(sweep.info.run_id, "environment.json")
        ).read_text()
    )
    assert env["packages"]["ray"] and env["packages"]["mlflow"]


def test_trials_log_a_per_class_iou_table_and_their_config(small_sweep):
    client = small_sweep.client()
    for run in small_sweep.runs("trial"):
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_class_iou.csv", "trial_config.json"} <= artifacts
        table = Path(client.download_artifacts(run.info.run_id, "per_class_iou.csv")).read_text()
        rows = dict(line.split(",") for line in table.strip().splitlines()[1:])
        assert set(CLASSES[1:]) <= set(rows)
        assert float(rows["mIoU"]) == pytest.approx(run.data.metrics["val/mIoU"], abs=1e-6)


def test_mlflow_artifacts_live_in_the_study_folder_with_source_tags_and_kind(small_sweep):
    client = small_sweep.client()
    exp = client.get_experiment_by_name(small_sweep.experiment)
    assert exp.artifact_location == (small_sweep.storage / "artifacts").resolve().as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.note.content"]  # the study's description
    view = json.loads(exp.tags["mlflow.sharedViewState.study"])  # the UI's study view
    assert view["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "variant"}]
    for role in ("sweep", "trial", "pretrain"):
        for run in small_sweep.runs(role):
            assert run.info.artifact_uri.startswith(exp.artifact_location), role
            assert run.data.tags["mlflow.source.git.commit"], role
            assert run.data.tags["mlflow.source.name"].startswith("harness.sweep"), role
    assert list((small_sweep.storage / "artifacts").rglob("trial_config.json"))


def test_trials_log_datasets_a_model_checkpoint_a_table_and_prediction_images(small_sweep):
    client = small_sweep.client()
    for run in small_sweep.runs("trial"):
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        contexts = {d.tags[0].value for d in inputs.values()}
        assert contexts == {"train", "train_labelled", "validation"}
        (labelled,) = [d for d in inputs.values() if d.tags[0].value == "train_labelled"]
        scenes = json.loads(labelled.dataset.profile)["scenes"]
        assert len(scenes) == int(run.data.params["labelled_samples"]) // 6  # 6 keyframes a scene
        where = run.data.tags["bev.model_artifact"]
        state = torch.load(client.download_artifacts(run.info.run_id, where), weights_only=True)
        assert state["phase"] == "finetune" and state["epoch"] == 2
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_class_iou.json"))
                           .read_text())  # fmt: skip
        assert table["columns"] == ["epoch", "class", "iou"]
        last = [row for row in table["data"] if row[0] == 2]  # one row per class and epoch
        assert [row[1] for row in last] == [*CLASSES, "mIoU"]
        assert last[-1][2] == pytest.approx(run.data.metrics["val/mIoU"])
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert any("bev_prediction" in path for path in images), images


# Lines that `python -m harness.sweep experiments/quick.yaml` printed (stdout and stderr) in a
# fresh study folder, data generation included, at commit c5a31d8, before the console of #17.
CONSOLE_LINES_BEFORE = 323
NOISE = ("Current best trial", "snapshotting", "tensorboard", "mlflow.system_metrics",
         "Checkpoint successfully created", "Token authentication is enabled",
         "Exception ignored", "Traceback")  # fmt: skip
TABLE_HEADER = ["trial", "method", "label_fraction", "seed", "status", "epoch", "val/mIoU"]


def test_the_console_is_a_third_of_its_old_length_and_ends_with_the_summary(small_sweep):
    out, err = small_sweep.proc.stdout, small_sweep.proc.stderr
    # Lines as a terminal (and `wc -l`) counts them: a progress bar redrawn with \r is one.
    assert (out + err).count("\n") <= CONSOLE_LINES_BEFORE // 3, out + err
    # The progress table has the study's columns, and a finished trial's last row its mIoU.
    assert any(line.split() == TABLE_HEADER for line in out.splitlines())
    finished = [line.split() for line in out.splitlines() if " TERMINATED " in line]
    assert {row[1] for row in finished} == {"supervised", "pretrained"}
    assert all(row[5] == "2/2" and 0 <= float(row[6]) <= 1 for row in finished)
    assert "shared pretraining pretrain-s0-" in out  # progress while trials wait for it
    for noise in NOISE:
        assert noise not in out + err, noise
    # The summary ends the output: a mean per cell, then the report and the UI commands.
    tail = out.strip().splitlines()
    report = "python -m analysis.report --experiment small --tracking-uri "
    assert tail[-2] == f"report:    {report}{small_sweep.tracking_uri}"
    assert tail[-1].startswith(
        f"MLflow UI: mlflow ui --backend-store-uri {small_sweep.tracking_uri}"
    )
    cells = {tuple(line.split()[:2]) for line in tail[-12:]}
    assert {(m, f) for m in ("supervised", "pretrained") for f in ("0.5", "1")} <= cells


def test_trials_log_mlflow_system_metrics(small_sweep):
    logged = set()
    for run in small_sweep.runs("trial"):
        logged |= {k for k in run.data.metrics if k.startswith("system/")}
    assert "system/cpu_utilization_percentage" in logged


def test_synthetic_data_is_generated_once_into_the_study_folder(small_sweep):
    roots = list((small_sweep.storage / "data").glob("synthetic-*/dataroot"))
    assert len(roots) == 1
    assert (roots[0] / "v1.0-mini" / "scene.json").is_file()


def test_no_run_is_left_running(small_sweep):
    with sqlite3.connect(small_sweep.storage / "mlflow.db") as db:
        statuses = {row[0] for row in db.execute("SELECT status FROM runs")}
    assert statuses == {"FINISHED"}


def test_analysis_reads_the_sweep_back(small_sweep):
    from analysis.load import load_study

    study = load_study("small", tracking_uri=small_sweep.tracking_uri, progress=False)
    assert len(study.trials) == 4
    assert set(study.trials["method"].astype(str)) == {"supervised", "pretrained"}


# --- kill and resume -----------------------------------------------------------------------------


def _trial_rows(db_path: Path) -> list[tuple]:
    """(run_uuid, status, epochs logged) of every trial run, read straight from SQLite."""
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(db_path, timeout=1) as db:
            return db.execute(
                """SELECT r.run_uuid, r.status,
                          (SELECT COUNT(*) FROM metrics m
                           WHERE m.run_uuid = r.run_uuid AND m.key = 'val/mIoU')
                   FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid
                   WHERE t.key = 'bev.role' AND t.value = 'trial'"""
            ).fetchall()
    except sqlite3.Error:
        return []


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_without_rerunning_finished_trials(tmp_path):
    sweep = write_study(
        tmp_path,
        "resumable",
        finetune={"budget": {"value": 3}},
        max_concurrent=1,
        mlflow={"system_metrics": False},
    )
    db = sweep.storage / "mlflow.db"
    proc = start_sweep(sweep, tmp_path)
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        # Kill once one trial has finished and the next has checkpointed an epoch.
        while True:
            rows = _trial_rows(db)
            finished = [r for r in rows if r[1] == "FINISHED"]
            started = [r for r in rows if r[1] == "RUNNING" and r[2] >= 1]
            if finished and started:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no progress to interrupt"
            time.sleep(0.5)
        time.sleep(1.0)  # let Tune persist the checkpoint reported with that epoch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    before = {r[0]: r for r in _trial_rows(db)}
    done_before = {run_id for run_id, row in before.items() if row[1] == "FINISHED"}
    assert done_before
    resumed_at_ms = time.time() * 1000

    assert_ok(run_sweep(sweep, "--resume"))

    trials = sweep.runs("trial")
    assert len(trials) == 4
    assert len({r.data.tags["bev.trial_id"] for r in trials}) == 4
    assert {r.info.status for r in trials} == {"FINISHED"}
    for run in trials:
        steps = [m.step for m in sweep.history(run.info.run_id, "val/mIoU")]
        assert sorted(set(steps)) == [1, 2, 3]
        after_resume = [
            m.step
            for m in sweep.history(run.info.run_id, "val/mIoU")
            if m.timestamp >= resumed_at_ms
        ]
        if run.info.run_id in done_before:
            assert after_resume == [], "a finished trial ran again"
        elif before.get(run.info.run_id, (None, None, 0))[2] >= 1:
            assert after_resume and min(after_resume) > 1, "did not resume from its checkpoint"
    (sweep_run,) = sweep.runs("sweep")
    assert sweep_run.info.status == "FINISHED"
    assert len(sweep.runs("pretrain")) == 1


@pytest.mark.slow
def test_an_optuna_search_with_asha_samples_weights_in_bounds_and_pretrains_per_sample(tmp_path):
    bounds = {"pretrain.w_reproj": (0.1, 10.0), "pretrain.w_temporal": (0.01, 1.0)}
    sweep = write_study(
        tmp_path,
        "search",
        finetune={"budget": {"value": 3}},
        search={"finetune.label_fraction": [0.5]},
        optuna={
            "num_samples": 3,
            "seed": 0,
            "params": {
                name: {"type": "loguniform", "low": low, "high": high}
                for name, (low, high) in bounds.items()
            },
        },
        methods=["pretrained"],
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        mlflow={"system_metrics": False},
    )
    assert_ok(run_sweep(sweep))

    trials = sweep.runs("trial")
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}
    pair = ("pretrain.w_reproj", "pretrain.w_temporal")
    sampled = {tuple(r.data.params[k] for k in pair) for r in trials}
    assert len(sampled) == 3  # Optuna proposed three different weight pairs
    for run in trials:
        for name, (low, high) in bounds.items():
            assert low <= float(run.data.params[name]) <= high
        steps = [m.step for m in sweep.history(run.info.run_id, "val/mIoU")]
        assert steps and max(steps) <= 3
        # ASHA may stop a trailing trial after its grace period; the run says so.
        if max(steps) < 3:
            assert run.data.tags.get("bev.stopped_early") == "true"
    pretrainings = sweep.runs("pretrain")
    assert len(pretrainings) == 3  # each sampled weight pair needs its own pretraining
    assert {tuple(p.data.params[k] for k in pair) for p in pretrainings} == sampled


@pytest.mark.slow
def test_step_budgets_compute_matching_and_early_stopping_in_a_sweep(tmp_path):
    stopping = {"patience": 1, "min_delta": 1.0}  # nothing beats the first validation by 1.0
    sweep = write_study(
        tmp_path,
        "protocol",
        finetune={"budget": {"unit": "steps", "value": 6, "every": 2}, "batch_size": 2},
        search={
            "finetune.label_fraction": [0.25, 1.0],
            "finetune.early_stopping": [None, stopping],
        },
        methods=["supervised", "supervised_matched"],
        data={"source": "synthetic", "synthetic": _generator_args(), "max_val_samples": 2},
        max_concurrent=2,
        mlflow={"system_metrics": False},
    )
    assert_ok(run_sweep(sweep))

    trials = sweep.runs("trial")
    assert len(trials) == 8 and {r.info.status for r in trials} == {"FINISHED"}
    by_cell = {}
    for run in trials:
        p = run.data.params
        stops = "finetune.early_stopping.patience" in p
        key = (p["method"], float(p["finetune.label_fraction"]), stops)
        by_cell[key] = run
    steps = {k: r.data.metrics["train/steps"] for k, r in by_cell.items()}
    # Equal steps at 25 % and 100 % of the labels: the budget is in steps, not epochs.
    assert steps[("supervised", 0.25, False)] == steps[("supervised", 1.0, False)] == 6
    # The matched arm gets its twin's pretraining on top: 1 epoch over the 4 train scenes of
    # 6 keyframes at batch 2 = 12 steps (whole, the default).
    for fraction in (0.25, 1.0):
        run = by_cell[("supervised_matched", fraction, False)]
        assert run.data.params["finetune.extra_steps"] == "12"
        assert run.data.metrics["train/steps"] == 6 + 12
    # Early stopping stops after its patience and logs the best epoch under its own name.
    stopped = by_cell[("supervised", 1.0, True)]
    assert stopped.data.metrics["best/epoch"] == 1
    assert stopped.data.metrics["train/steps"] == 4  # periods of 2 steps, stopped after 2
    assert stopped.data.tags.get("bev.stopped_early") == "true"
    assert "best/val_mIoU" in stopped.data.metrics and "val/mIoU" in stopped.data.metrics


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a process group this test started (Ray's helpers of a killed driver)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_trial_is_retried_then_recorded_failed_while_the_others_finish(tmp_path):
    from harness.spec import load_spec
    from harness.trials import expand_trials
    from model.data.keyframes import dataset_fingerprint
    from model.data.synthetic import generate_dataset

    dataroot = tmp_path / "dataroot"
    generate_dataset(dataroot, progress=False, **SMALL_SYNTHETIC)
    sweep = write_study(
        tmp_path,
        "faulty",
        data={"source": "synthetic", "dataroot": str(dataroot)},
        search={"finetune.label_fraction": [1.0]},
        retries=1,
        max_concurrent=1,
        mlflow={"system_metrics": False},
    )
    # A corrupt entry in the pretraining cache: the pretrained trial fails to load it.
    spec = load_spec(sweep.spec_path)
    (pretrained,) = [t for t in expand_trials(spec) if t.method == "pretrained"]
    fingerprint = dataset_fingerprint(dataroot, "v1.0-mini")
    entry = sweep.storage / "pretrain" / pretrained.resolve(spec).pretrain_key(fingerprint)
    entry.mkdir(parents=True)
    (entry / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (entry / "entry.json").write_text(
        json.dumps({"checkpoint": "checkpoint.pt", "wall_s": 1.0, "gpu_s": 0.0, "run_id": "x"})
    )

    assert_ok(run_sweep(sweep), code=1)

    by_method = {r.data.params["method"]: r for r in sweep.runs("trial")}
    assert len(sweep.runs("trial")) == 2
    assert by_method["supervised"].info.status == "FINISHED"
    failed = by_method["pretrained"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["bev.error"]
    assert failed.data.tags["bev.retries"] == "1"
    (sweep_run,) = sweep.runs("sweep")
    assert sweep_run.data.metrics["sweep/trials_failed"] == 1
    assert sweep_run.info.status == "FAILED"


# --- a real two-node Ray cluster -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A head and a second worker node started with `ray start`, one CPU each; stopped by killing
    the process groups of the two `ray start --block` commands (never a machine-wide `ray stop`,
    which would also stop other users' clusters)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="bvr-"))  # Ray's socket paths must stay short
    port = _free_port()
    # Token auth on for every process of this cluster: a head that finds ~/.ray/auth_token turns
    # it on by itself, and then a node or driver without the token cannot join.
    env = sweep_env(RAY_AUTH_MODE="token")
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-gpus=0", "--disable-usage-stats"]
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    procs = []

    def start(args: list[str], log_name: str) -> subprocess.Popen:
        log = (temp_dir / log_name).open("w")
        proc = subprocess.Popen(
            ray_cli + args + common, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    try:
        start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=1",
               "--include-dashboard=false"], "head.log")  # fmt: skip
        _wait_for(lambda: list(temp_dir.glob("session_*/logs/raylet.out")), temp_dir / "head.log")
        start([f"--address=127.0.0.1:{port}", "--num-cpus=1"], "worker.log")
        _wait_for(lambda: len(list(temp_dir.glob("session_*/logs/raylet*.out"))) >= 2,
                  temp_dir / "worker.log")  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for(condition, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"ray start did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_sweep_runs_on_an_existing_two_node_cluster_given_by_address(tmp_path, ray_cluster):
    address, env = ray_cluster
    sweep = write_study(
        tmp_path,
        "clustered",
        search={"finetune.label_fraction": [1.0]},
        finetune={"budget": {"value": 1}},
        mlflow={"system_metrics": False},
    )

    assert_ok(run_sweep(sweep, "--address", address, env=env))

    trials = sweep.runs("trial")
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    # One CPU per node and per trial: the two trials ran at once, one on each node.
    assert len({r.data.tags["bev.ray_node_id"] for r in trials}) == 2
    (sweep_run,) = sweep.runs("sweep")
    assert sweep_run.data.tags["bev.ray_address"] == address


# --- pretraining lengths sharing one WSD trunk ---------------------------------------------------


def _statuses(db_path: Path, role: str) -> list[str]:
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(db_path, timeout=1) as db:
            rows = db.execute(
                """SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid
                   WHERE t.key = 'bev.role' AND t.value = ?""",
                (role,),
            ).fetchall()
    except sqlite3.Error:
        return []
    return [status for (status,) in rows]


@pytest.mark.slow
def test_three_wsd_lengths_run_one_trunk_and_three_branches_and_resume_after_sigkill(tmp_path):
    sweep = write_study(
        tmp_path,
        "lengths",
        # Decay starts at steps 3, 18 and 24: the trunk's segments are 3, 15 and 6 steps long.
        pretrain={
            "budget": {"unit": "steps", "value": 4, "every": 3},
            "optim": {"schedule": "wsd", "decay_fraction": 0.25, "warmup_iters": 0},
            "val_every": None,
        },
        finetune={"budget": {"value": 3}},
        search={"finetune.label_fraction": [1.0], "pretrain.budget.value": [4, 24, 32]},
        methods=["pretrained"],
        max_concurrent=2,
        mlflow={"system_metrics": False, "log_images": False, "log_checkpoint": False},
    )
    db = sweep.storage / "mlflow.db"
    proc = start_sweep(sweep, tmp_path)
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        # Kill inside the trunk's second segment, once the shortest length's branch is done
        # and while its trial still fine-tunes: the resumed trial must find the branch cached.
        while not ("FINISHED" in _statuses(db, "pretrain") and
                   _statuses(db, "pretrain_trunk") == ["RUNNING"] and
                   "FINISHED" not in _statuses(db, "trial")):  # fmt: skip
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no progress to interrupt"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    finished = {r.info.run_id for r in sweep.runs("pretrain") if r.info.status == "FINISHED"}
    assert len(finished) == 1
    resumed_at_ms = time.time() * 1000

    assert_ok(run_sweep(sweep, "--resume"))

    (trunk,) = sweep.runs("pretrain_trunk")
    branches = sweep.runs("pretrain")
    assert trunk.info.status == "FINISHED" and len(branches) == 3
    assert {r.data.params["pretrain.budget.value"] for r in branches} == {"4", "24", "32"}
    assert {r.data.tags["bev.trunk_key"] for r in branches} == {trunk.data.tags["bev.trunk_key"]}
    for run in branches:
        history = sweep.history(run.info.run_id, "time/branch_wall_s")
        assert history, "a branch logs its own clock"
        if run.info.run_id in finished:
            assert all(m.timestamp < resumed_at_ms for m in history), "a branch ran again"
        whole = run.data.metrics["time/cum_wall_s"]
        shared = run.data.metrics["time/cum_wall_s_amortised"]
        assert history[-1].value < shared <= whole  # the trunk's share, then all of it
    entries = sorted(p.name.split("-")[0] for p in (sweep.storage / "pretrain").iterdir()
                     if p.is_dir() and "." not in p.name)  # fmt: skip
    assert entries.count("trunk") == 3 and len(entries) == 6  # 3 segments, 3 branches
    trials = sweep.runs("trial")
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}
