"""analysis.load: an MLflow experiment -> tidy per-epoch frame and per-trial view."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_analysis_store import EPOCHS, FINAL_MIOU, SEEDS, SPEC_YAML, Trial, build_store

from analysis.load import AnalysisError, analysed_trials, load_study, resolve_tracking_uri

N_TRIALS = len(FINAL_MIOU) * len(SEEDS) + 2  # plus one FAILED and one RUNNING


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("load_store"))


@pytest.fixture(scope="module")
def study(store):
    return load_study("toy", store, progress=False)


def test_tidy_frame_has_one_row_per_trial_and_epoch(study):
    epochs = study.epochs
    assert len(epochs) == len(FINAL_MIOU) * len(SEEDS) * EPOCHS + 1 + 1
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert epochs["trial_id"].nunique() == N_TRIALS


def test_tidy_frame_columns_are_typed(study):
    dtypes = study.epochs.dtypes
    assert isinstance(dtypes["method"], pd.CategoricalDtype)
    assert list(dtypes["method"].categories[:2]) == ["supervised", "pretrained"]
    for column in ("label_fraction", "w_reproj", "w_temporal", "w_bev", "val_mIoU", "IoU_divider"):
        assert dtypes[column] == "float64", column
    for column in ("labelled_samples", "pretrain_epochs", "seed"):
        assert dtypes[column] == "Int64", column
    assert dtypes["epoch"] == "int64"
    assert dtypes["partial"] == "bool"


def test_class_columns_follow_the_protocol_order(study):
    assert study.class_names == ["background", "divider", "ped_crossing", "boundary"]


def test_cumulative_time_in_three_accountings(study):
    # pretrained, 50% labels, seed 0, last epoch: 3 epochs of 10 + 90 * 0.5 s; the seed's
    # pretraining took 300 s and is shared by 4 pretrained trials.
    row = study.epochs.query(
        "method == 'pretrained' and label_fraction == 0.5 and seed == 0 and epoch == 3"
    ).iloc[0]
    assert row["cum_wall_s"] == pytest.approx(165.0)
    assert row["cum_wall_s_incl_pretrain"] == pytest.approx(465.0)
    assert row["cum_wall_s_amortised"] == pytest.approx(240.0)
    assert row["cum_gpu_s_amortised"] == pytest.approx(120.0)


def test_supervised_time_is_the_same_in_every_accounting(study):
    supervised = study.epochs[study.epochs["method"] == "supervised"]
    assert (supervised["cum_wall_s"] == supervised["cum_wall_s_incl_pretrain"]).all()
    assert (supervised["cum_wall_s"] == supervised["cum_wall_s_amortised"]).all()


def test_running_trial_is_marked_partial(study):
    running = study.epochs[study.epochs["status"] == "RUNNING"]
    assert len(running) == 1 and running["partial"].all()
    assert not study.epochs.loc[study.epochs["status"] != "RUNNING", "partial"].any()
    assert any("still running" in w for w in study.warnings)


def test_final_view_has_each_trials_last_epoch(study):
    trials = study.trials
    assert len(trials) == N_TRIALS
    finished = trials[trials["complete"]]
    assert (finished["epochs_done"] == EPOCHS).all()
    for (method, fraction), values in FINAL_MIOU.items():
        cell = finished[(finished["method"] == method) & (finished["label_fraction"] == fraction)]
        assert sorted(cell["val_mIoU"]) == pytest.approx(values)


def test_statistics_use_finished_trials_only(study):
    used = analysed_trials(study.trials)
    assert len(used) == len(FINAL_MIOU) * len(SEEDS)
    assert set(used["status"]) == {"FINISHED"}


def test_running_trials_count_while_nothing_has_finished(tmp_path):
    trials = [
        Trial("supervised", 1.0, 0, 0.6, status="RUNNING", epochs_logged=1),
        Trial("pretrained", 0.5, 0, 0.6, status="RUNNING", epochs_logged=2),
    ]
    study = load_study("toy", build_store(tmp_path, trials), progress=False)
    used = analysed_trials(study.trials)
    assert len(used) == 2 and used["partial"].all()
    assert sorted(used["epochs_done"]) == [1, 2]


def test_sweep_run_gives_spec_environment_and_provenance(study):
    assert study.sweep is not None
    assert study.sweep.spec_yaml == SPEC_YAML
    assert study.sweep.environment == {"python": "3.11", "torch": "2.14.1"}
    assert study.sweep.tags["bev.git_commit"] == "0123abc"


def test_differing_loss_weights_make_separate_variants(tmp_path):
    trials = [Trial("supervised", 1.0, s, 0.6) for s in (0, 1)]
    for w in ("0.5", "1.0"):
        trials += [
            Trial("pretrained", 0.5, s, 0.6, params={"pretrain.w_temporal": w}) for s in (0, 1)
        ]
    study = load_study("toy", build_store(tmp_path, trials), progress=False)
    assert sorted(study.trials["variant"].unique()) == [
        "pretrained (w_temporal=0.5)",
        "pretrained (w_temporal=1)",
        "supervised",
    ]


def test_runs_of_older_sweeps_read_their_fraction_written_as_g(tmp_path):
    """Sweeps before the one fraction form wrote `1` and `supervised@1` (params, tags, names)."""
    old = {"finetune.label_fraction": "1", "variant": "supervised@1"}
    trials = [Trial("supervised", 1.0, s, 0.6, params=old) for s in (0, 1)]
    study = load_study("toy", build_store(tmp_path, trials), progress=False)
    assert study.trials["label_fraction"].tolist() == [1.0, 1.0]


def test_unknown_experiment_names_the_known_ones(store):
    with pytest.raises(AnalysisError, match=r"experiment 'nope' not found .*toy"):
        load_study("nope", store)


def test_empty_experiment_is_reported(store):
    MlflowClient(tracking_uri=store).create_experiment("empty")
    with pytest.raises(AnalysisError, match="has no trial runs"):
        load_study("empty", store)


def test_store_with_only_failed_trials_is_reported(tmp_path):
    trials = [Trial("supervised", 1.0, s, 0.1, status="FAILED", epochs_logged=1) for s in (0, 1)]
    uri = build_store(tmp_path, trials)
    with pytest.raises(AnalysisError, match="all 2 trial runs failed"):
        load_study("toy", uri)


def test_missing_sqlite_store_is_reported_not_created(tmp_path):
    db = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(AnalysisError, match="no MLflow store"):
        load_study("toy", f"sqlite:///{db}")
    assert not db.exists()


def test_tracking_uri_precedence_flag_then_env_then_study_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://flag:5000", "s") == "http://flag:5000"
    assert resolve_tracking_uri(None, "s") == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, "s") == "sqlite:///studies/s/mlflow.db"
