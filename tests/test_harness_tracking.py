"""Where runs go and how they are found again (harness/tracking.py)."""

from __future__ import annotations

import pytest

from analysis.load import resolve_tracking_uri  # the sweep's too (harness.preflight)
from harness.tracking import (
    PARENT,
    ROLE,
    TRIAL_ID,
    Tracker,
    flatten,
    resolve_ray_address,
    sqlite_uri,
)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return monkeypatch


def test_tracking_uri_precedence_is_flag_then_environment_then_spec_then_default(clean_env):
    assert resolve_tracking_uri(None, spec=None, default="sqlite:///d.db") == "sqlite:///d.db"
    assert resolve_tracking_uri(None, spec="http://spec", default="sqlite:///d.db") == "http://spec"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://env")
    assert resolve_tracking_uri(None, spec="http://spec", default="sqlite:///d.db") == "http://env"
    assert (
        resolve_tracking_uri("http://flag", spec="http://spec", default="sqlite:///d.db")
        == "http://flag"
    )


def test_ray_address_precedence_is_flag_then_environment_then_spec_then_local(clean_env):
    assert resolve_ray_address(None, None) is None
    assert resolve_ray_address(None, "spec:6379") == "spec:6379"
    clean_env.setenv("RAY_ADDRESS", "env:6379")
    assert resolve_ray_address(None, "spec:6379") == "env:6379"
    assert resolve_ray_address("flag:6379", "spec:6379") == "flag:6379"


def test_an_empty_environment_variable_does_not_count(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_tracking_uri(None, spec="http://spec") == "http://spec"


def test_flatten_spells_nested_keys_with_dots_and_keeps_lists_whole():
    assert flatten({"a": {"b": 1, "c": [0.1, 0.5]}, "d": None}) == {
        "a.b": "1",
        "a.c": "[0.1, 0.5]",
        "d": "None",
    }


def test_open_run_reopens_the_run_with_the_same_identity_instead_of_creating_another(tmp_path):
    tracker = Tracker(sqlite_uri(tmp_path / "mlflow.db"), "exp")
    identity = {ROLE: "trial", TRIAL_ID: "abc", PARENT: "sweep1"}
    run_id, created = tracker.open_run(identity, "t")
    tracker.finish(run_id, "FAILED", error="RuntimeError: boom")

    again, created_again = tracker.open_run(identity, "t")

    assert created and not created_again and again == run_id
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert "bev.error" not in run.data.tags  # a retry starts clean
    assert len(tracker.find({TRIAL_ID: "abc"})) == 1


def test_close_unfinished_marks_only_running_children_of_the_sweep(tmp_path):
    tracker = Tracker(sqlite_uri(tmp_path / "mlflow.db"), "exp")
    running, _ = tracker.open_run({TRIAL_ID: "a", PARENT: "s"}, "a")
    done, _ = tracker.open_run({TRIAL_ID: "b", PARENT: "s"}, "b")
    other, _ = tracker.open_run({TRIAL_ID: "c", PARENT: "other"}, "c")
    tracker.finish(done)

    assert tracker.close_unfinished("s") == 1

    status = {r: tracker.client.get_run(r).info.status for r in (running, done, other)}
    assert status == {running: "KILLED", done: "FINISHED", other: "RUNNING"}


def test_an_experiment_carries_the_study_view_new_or_old(tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.tracking import study_view_tags

    uri = sqlite_uri(tmp_path / "mlflow.db")
    fresh = Tracker(uri, "fresh")
    MlflowClient(tracking_uri=uri).create_experiment("old")  # made before the view existed
    old = Tracker(uri, "old")

    for tracker in (fresh, old):
        tags = tracker.client.get_experiment(tracker.experiment_id).tags
        assert study_view_tags().items() <= tags.items(), tracker.experiment


def test_two_trials_logging_the_same_dataset_at_once_both_get_it(tmp_path):
    """The race of two trials starting together (seen in CI): MLflow's SQL store looks the
    dataset up, another process inserts it, then this one's insert breaks the unique key. Here
    the other trial's log runs just before the first trial's INSERT reaches SQLite."""
    from sqlalchemy import event

    uri = sqlite_uri(tmp_path / "mlflow.db")
    first, other = Tracker(uri, "exp"), Tracker(uri, "exp")
    run_a, _ = first.open_run({TRIAL_ID: "a"}, "a")
    run_b, _ = other.open_run({TRIAL_ID: "b"}, "b")
    dataset = dict(name="train", digest="d1", source="/data", profile={"scenes": 3})
    engine = first.client._tracking_client.store.engine
    raced = []

    @event.listens_for(engine, "before_cursor_execute")
    def other_trial_gets_there_first(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO datasets") and not raced:
            raced.append(statement)
            other.log_dataset(run_b, **dataset, context="train")

    first.log_dataset(run_a, **dataset, context="train")

    assert raced  # the race happened
    for run_id in (run_a, run_b):
        inputs = first.client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("train", "d1")]
