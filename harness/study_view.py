"""The study's face in MLflow's UI: the experiment's kind, its saved view and the link to it.

MLflow 3's UI opens an experiment on its runs or on its GenAI overview by the *workflow type*
(the sidebar's "GenAI" / "Model training" switch, default GenAI, remembered by the browser; a
`workflowType` query parameter overrides it), not by the experiment tag `mlflow.experimentKind`
that UIs before it read. The harness sets both: the tag on each experiment, the parameter on
every link it prints or writes. `harness.tracking.Tracker` writes these tags on each experiment.
"""

from __future__ import annotations

import json

from model.names import (
    AMORTISED,
    CUM_WALL_S,
    LABELLED_SAMPLES,
    METHOD,
    ROLE,
    SEED,
    VAL_MIOU,
)

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW_QUERY = "workflowType=machine_learning"

# The experiment page's saved view: MLflow's "share view" keeps the UI's state in an experiment
# tag `mlflow.sharedViewState.<key>`, opened with `?viewStateShareKey=<key>`. Finished trial
# runs only, grouped by `variant` (the cell, method@label_fraction and any other axis values:
# one row per cell, the mean of its seeds), with the key params and val/mIoU as columns; in
# chart mode first val/mIoU against the trial's amortised wall time, then against the epoch.
# Sorting by anything but the start time keeps the UI from fetching the trials' parent (the
# sweep run) into the view.
# docs/analysis.md shows it; tests/test_mlflow_ui.py opens it in Chromium.
STUDY_VIEW_KEY = "study"
FRACTION_TAG = "bev.label_fraction"
STUDY_SECTION = "study-charts"
TIME_AXIS = CUM_WALL_S + AMORTISED


def _line_chart(uuid: str, metric: str, x_metric: str | None) -> dict:
    """A line chart card of the UI's chart mode (its `RunsChartsLineCardConfig` fields)."""
    return {
        "uuid": uuid,
        "type": "LINE",
        "runsCountToCompare": 100,
        "metricSectionId": STUDY_SECTION,
        "deleted": False,
        "isGenerated": False,
        "displayName": f"{metric} vs {x_metric or 'epoch'}",
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "metric" if x_metric else "step",
        "selectedXAxisMetricKey": x_metric or "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": False,
        "useGlobalLineSmoothing": True,
    }


STUDY_VIEW = {
    "searchFilter": f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'",
    "orderByKey": "tags.`mlflow.runName`",  # the UI's own "Run Name" sort
    "orderByAsc": True,
    # The fraction as the tag: a group row averages a numeric param and prints `1` or
    # `0.1000000001` where its trials say `1.0`; a tag it leaves as the trials wrote it.
    "selectedColumns": [
        f"params.`{METHOD}`",
        f"tags.`{FRACTION_TAG}`",
        *(f"params.`{name}`" for name in (SEED, LABELLED_SAMPLES)),
        *(f"metrics.`{name}`" for name in (VAL_MIOU, TIME_AXIS)),
    ],
    "groupBy": {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "param", "groupByData": "variant"}],
    },
    # Charts draw each trial (not the group means: a mean over a metric x axis is undefined).
    "useGroupedValuesInCharts": False,
    "runsHiddenMode": "SHOW_ALL",
    "compareRunSections": [
        {
            "uuid": STUDY_SECTION,
            "name": "Study: mIoU against time and epochs",
            "display": True,
            "isReordered": False,
            "deleted": False,
            "isGenerated": False,
        },
    ],
    "compareRunCharts": [
        _line_chart("study-miou-vs-time", VAL_MIOU, TIME_AXIS),
        _line_chart("study-miou-vs-epoch", VAL_MIOU, None),
    ],
}


def study_view_tags() -> dict[str, str]:
    """The experiment tag that saves STUDY_VIEW."""
    return {f"mlflow.sharedViewState.{STUDY_VIEW_KEY}": json.dumps(STUDY_VIEW)}


def study_view_link(experiment_id: str) -> str:
    """The study view's address relative to the UI's root (`#/...`), with the workflow type."""
    page = f"#/experiments/{experiment_id}/runs"
    return f"{page}?viewStateShareKey={STUDY_VIEW_KEY}&{WORKFLOW_QUERY}"


def study_view_url(ui_url: str, experiment_id: str) -> str:
    return f"{ui_url.rstrip('/')}/{study_view_link(experiment_id)}"


def study_note(description: str | None, experiment_id: str) -> str:
    """The experiment's description (shown above its runs) with the study view's link: the
    plain runs page folds every trial under its sweep run."""
    link = f"**Open the [study view]({study_view_link(experiment_id)})**"
    lines = [*([description] if description else []), link]
    return "\n\n".join(lines) + (
        ": finished trials grouped by cell (method@label_fraction and any other axis value), "
        "and val/mIoU against time "
        "in chart mode."
    )
