"""What the harness writes on an experiment for MLflow's UI (harness.study_view, through
harness.tracking.Tracker): the experiment kind, the saved study view, and a description that
links the view; new experiments get them at creation, existing ones when a sweep opens them.
tests/test_mlflow_ui.py checks what the UI makes of them."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from harness.study_view import (
    EXPERIMENT_KIND,
    STUDY_VIEW_KEY,
    TIME_AXIS,
    study_view_link,
    study_view_tags,
)
from harness.tracking import Tracker

NOTE = "mlflow.note.content"
VIEW_TAG = f"mlflow.sharedViewState.{STUDY_VIEW_KEY}"


def tags_of(uri: str, name: str) -> dict[str, str]:
    return MlflowClient(tracking_uri=uri).get_experiment_by_name(name).tags


def test_a_new_experiment_has_the_kind_the_view_and_a_description_linking_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    tracker = Tracker(uri, "study", description="bevlabels study quick")

    tags = tags_of(uri, "study")
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags[VIEW_TAG] == study_view_tags()[VIEW_TAG]
    assert tags[NOTE].startswith("bevlabels study quick")
    assert f"]({study_view_link(tracker.experiment_id)})" in tags[NOTE]
    assert "workflowType=machine_learning" in study_view_link(tracker.experiment_id)


def test_an_existing_experiment_gets_them_and_keeps_its_own_description(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    old_view = json.dumps({"searchFilter": "tags.`bev.role` = 'trial'"})
    client.create_experiment(
        "study",
        tags={NOTE: "my notes", VIEW_TAG: old_view, "mlflow.experimentKind": "genai_development"},
    )

    tracker = Tracker(uri, "study")
    Tracker(uri, "study")  # a second opening (a trial's) changes nothing more

    tags = tags_of(uri, "study")
    assert tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]
    assert tags[VIEW_TAG] == study_view_tags()[VIEW_TAG]
    assert tags[NOTE].startswith("my notes")
    assert tags[NOTE].count(study_view_link(tracker.experiment_id)) == 1


def test_the_view_lists_finished_trials_by_run_name_and_charts_miou_against_time_first():
    view = json.loads(study_view_tags()[VIEW_TAG])
    assert "tags.`bev.role` = 'trial'" in view["searchFilter"]
    # Sorted by start time (the default), the UI would fetch the trials' parent sweep run.
    assert view["orderByKey"] not in ("", "attributes.start_time")
    first = view["compareRunCharts"][0]
    assert (first["metricKey"], first["xAxisKey"]) == ("val/mIoU", "metric")
    assert first["selectedXAxisMetricKey"] == TIME_AXIS
    sections = {s["uuid"] for s in view["compareRunSections"]}
    assert {c["metricSectionId"] for c in view["compareRunCharts"]} <= sections
