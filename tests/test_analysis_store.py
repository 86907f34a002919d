"""MLflow stores with known numbers, written through the MLflow API in the layout of
docs/architecture.md ("MLflow layout"), for the analysis tests.

The other test_analysis_* modules import `build_store` and the numbers below from here; the tests
in this module check that the store really follows the documented layout, so the analysis tests
exercise the same contract the harness writes.

The standard study: methods supervised / pretrained, label fractions 0.1, 0.25, 0.5, 1.0, seeds
0-2, 3 fine-tuning epochs, plus one FAILED and one RUNNING trial (seed 3) that the statistics must
leave out. Time per epoch is 10 + 90 * fraction wall seconds (GPU seconds: half of that); each
seed's pretraining takes 300 wall seconds, shared by the 4 pretrained trials of that seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from harness.trials import fraction_text

CLASSES = ["background", "divider", "ped_crossing", "boundary"]
FRACTIONS = [0.1, 0.25, 0.5, 1.0]
SEEDS = [0, 1, 2]
EPOCHS = 3
PRETRAIN_WALL_S = 300.0
SPEC_YAML = (
    "study: toy\nmethods: [supervised, pretrained]\nlabel_fractions: [0.1, 0.25, 0.5, 1.0]\n"
)

# Final val/mIoU per (method, fraction): one value per seed 0, 1, 2.
FINAL_MIOU = {
    ("supervised", 0.1): [0.30, 0.32, 0.34],
    ("supervised", 0.25): [0.40, 0.42, 0.44],
    ("supervised", 0.5): [0.50, 0.52, 0.54],
    ("supervised", 1.0): [0.60, 0.62, 0.64],
    ("pretrained", 0.1): [0.45, 0.47, 0.49],
    ("pretrained", 0.25): [0.55, 0.57, 0.59],
    ("pretrained", 0.5): [0.61, 0.63, 0.65],
    ("pretrained", 1.0): [0.66, 0.68, 0.70],
}


@dataclass
class Trial:
    method: str
    label_fraction: float
    seed: int
    final_miou: float
    status: str = "FINISHED"
    epochs_logged: int = EPOCHS
    params: dict[str, str] = field(default_factory=dict)  # overrides of the standard params

    @property
    def run_name(self) -> str:
        return f"{self.method}@{fraction_text(self.label_fraction)}-s{self.seed}"


# The target alignment each pretraining run logs, by seed (model.evaluation.diagnostics' names).
ALIGNMENT = {
    "reach": lambda seed: 0.30 + 0.01 * seed,
    "reach_divider": lambda seed: 0.50,
    "ceiling_mIoU": lambda seed: 0.12 + 0.02 * seed,
    "head_reached_mIoU": lambda seed: 0.05,
}


def standard_trials() -> list[Trial]:
    trials = [
        Trial(method, fraction, seed, miou)
        for (method, fraction), values in FINAL_MIOU.items()
        for seed, miou in zip(SEEDS, values, strict=True)
    ]
    trials.append(Trial("supervised", 0.1, 3, 0.01, status="FAILED", epochs_logged=1))
    trials.append(Trial("pretrained", 0.1, 3, 0.20, status="RUNNING", epochs_logged=1))
    return trials


def epoch_wall_s(fraction: float) -> float:
    return 10.0 + 90.0 * fraction


def class_iou(miou: float) -> dict[str, float]:
    """Per-class IoU whose foreground mean is `miou` (background is not in the mean)."""
    return {
        "background": 0.9,
        "divider": miou - 0.05,
        "ped_crossing": miou,
        "boundary": miou + 0.05,
    }


def build_store(
    root: Path,
    trials: list[Trial] | None = None,
    experiment: str = "toy",
    with_sweep: bool = True,
    spec_yaml: str = SPEC_YAML,
) -> str:
    """Write `trials` (default: the standard study) to a fresh SQLite store under `root`;
    returns its tracking URI."""
    trials = standard_trials() if trials is None else trials
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    now = int(time.time() * 1000)

    parent_id = None
    if with_sweep:
        sweep = client.create_run(
            exp_id,
            run_name=f"{experiment}-sweep",
            tags={
                "bev.role": "sweep",
                "bev.study": experiment,
                "bev.git_commit": "0123abc",
                "bev.dataset_fingerprint": "fp-synthetic",
                "bev.config_hash": "cfg-hash",
            },
        )
        parent_id = sweep.info.run_id
        client.log_batch(
            parent_id,
            params=[Param("study", experiment), Param("label_fractions", "[0.1, 0.25, 0.5, 1.0]")],
            metrics=[
                Metric("sweep/trials_total", len(trials), now, 0),
                Metric("sweep/trials_failed", sum(t.status == "FAILED" for t in trials), now, 0),
            ],
        )
        client.log_text(parent_id, spec_yaml, "spec.yaml")
        client.log_text(
            parent_id, json.dumps({"python": "3.11", "torch": "2.14.1"}), "environment.json"
        )

    pretrain_ids: dict[int, str] = {}
    sharing = {}
    for t in trials:
        if t.method == "pretrained":
            sharing[t.seed] = sharing.get(t.seed, 0) + 1
    for seed in sorted(sharing):
        tags = {"bev.role": "pretrain", "bev.pretrain_key": f"pk{seed}", "bev.seed": str(seed)}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = client.create_run(exp_id, run_name=f"pretrain-s{seed}", tags=tags)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("pretrain/loss", 1.0 / e, now, e) for e in (1, 2)]
            + [Metric("time/cum_wall_s", PRETRAIN_WALL_S * e / 2, now, e) for e in (1, 2)]
            + [Metric(f"align/{k}", v(seed), now, 0) for k, v in ALIGNMENT.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        pretrain_ids[seed] = run.info.run_id

    for i, t in enumerate(trials):
        pretrained = t.method == "pretrained"
        labelled = int(round(1000 * t.label_fraction))
        tags = {
            "bev.role": "trial",
            "bev.trial_id": f"trial_{i:03d}",
            "bev.method": t.method,
            "bev.label_fraction": fraction_text(t.label_fraction),
            "bev.seed": str(t.seed),
        }
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        if pretrained:
            tags["bev.pretrain_key"] = f"pk{t.seed}"
            tags["bev.pretrain_run_id"] = pretrain_ids[t.seed]
        run = client.create_run(exp_id, run_name=t.run_name, tags=tags)
        # The harness's names (model/names.py): the spec's dotted keys; no pretrain.* params
        # on a supervised trial.
        params = {
            "method": t.method,
            "variant": f"{t.method}@{fraction_text(t.label_fraction)}",
            "finetune.label_fraction": fraction_text(t.label_fraction),
            "labelled_samples": str(labelled),
            "finetune.epochs": str(EPOCHS),
            "finetune.w_bev": "1.0",
            "seed": str(t.seed),
            "model.preset": "nano",
        }
        if pretrained:
            params |= {"pretrain.epochs": "2", "pretrain.w_reproj": "1.0"}
            params |= {"pretrain.w_temporal": "0.5"}
        params |= t.params
        share = PRETRAIN_WALL_S / sharing[t.seed] if pretrained else 0.0
        full = PRETRAIN_WALL_S if pretrained else 0.0
        metrics = []
        for epoch in range(1, t.epochs_logged + 1):
            miou = t.final_miou * epoch / EPOCHS
            wall = epoch_wall_s(t.label_fraction) * epoch
            values = {
                "train/loss": 1.0 / epoch,
                "val/mIoU": miou,
                **{f"val/IoU_{c}": v for c, v in class_iou(miou).items()},
                "time/cum_wall_s": wall,
                "time/cum_gpu_s": wall / 2,
                "time/cum_wall_s_incl_pretrain": wall + full,
                "time/cum_gpu_s_incl_pretrain": (wall + full) / 2,
                "time/cum_wall_s_amortised": wall + share,
                "time/cum_gpu_s_amortised": (wall + share) / 2,
                "labelled_samples": labelled,
            }
            metrics += [Metric(k, float(v), now + epoch, epoch) for k, v in values.items()]
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("bev.config", "x")],
        )
        client.log_text(run.info.run_id, json.dumps(params), "trial_config.json")
        if t.status != "RUNNING":
            client.set_terminated(run.info.run_id, t.status)
    return uri


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("toy_store"))


def test_store_trials_carry_the_documented_tags_and_params(toy_store):
    client = MlflowClient(tracking_uri=toy_store)
    exp = client.get_experiment_by_name("toy")
    trials = client.search_runs([exp.experiment_id], "tags.`bev.role` = 'trial'", max_results=100)
    assert len(trials) == len(standard_trials())
    for run in trials:
        assert {"bev.trial_id", "bev.method", "bev.label_fraction", "bev.seed"} <= set(
            run.data.tags
        )
        assert {"method", "finetune.label_fraction", "labelled_samples", "seed"} <= set(
            run.data.params
        )
        assert {"val/mIoU", "time/cum_wall_s_amortised", "time/cum_gpu_s_incl_pretrain"} <= set(
            run.data.metrics
        )


def test_store_has_one_sweep_parent_with_spec(toy_store):
    client = MlflowClient(tracking_uri=toy_store)
    exp = client.get_experiment_by_name("toy")
    sweeps = client.search_runs([exp.experiment_id], "tags.`bev.role` = 'sweep'")
    assert len(sweeps) == 1
    names = {f.path for f in client.list_artifacts(sweeps[0].info.run_id)}
    assert {"spec.yaml", "environment.json"} <= names
