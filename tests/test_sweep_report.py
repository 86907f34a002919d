"""The report a sweep writes when all its trials finished (`analysis.report.
report_finished_sweep`): logged to the sweep run under `report/`, and a failure of the report
is one warning, never the sweep's failure. tests/test_harness_sweep.py checks a real sweep."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient
from test_analysis_store import build_store

from analysis.report import report_finished_sweep


def test_the_report_is_written_and_logged_under_the_sweep_runs_report_folder(tmp_path):
    uri = build_store(tmp_path / "store")

    html = report_finished_sweep("toy", uri, tmp_path / "report")

    assert html == tmp_path / "report" / "report.html" and html.is_file()
    client = MlflowClient(tracking_uri=uri)
    (sweep,) = client.search_runs(
        [client.get_experiment_by_name("toy").experiment_id], "tags.`bev.role` = 'sweep'"
    )
    logged = {a.path for a in client.list_artifacts(sweep.info.run_id, "report")}
    assert {"report/report.html", "report/verdicts.csv", "report/figures"} <= logged


def test_a_report_that_fails_is_one_warning_naming_the_command_not_an_error(tmp_path, caplog):
    uri = build_store(tmp_path / "store")

    with caplog.at_level(logging.WARNING, logger="analysis.report"):
        html = report_finished_sweep("no-such-study", uri, tmp_path / "report")

    assert html is None
    (record,) = caplog.records
    assert "python -m analysis.report --experiment no-such-study" in record.getMessage()


def test_a_quiet_sweep_logs_its_report_and_prints_nothing_else_but_its_summary(tmp_path):
    from test_harness_sweep import assert_ok, run_sweep, write_study

    sweep = write_study(
        tmp_path,
        "quiet_report",
        methods=["supervised"],
        search={"finetune.label_fraction": [1.0]},
        finetune={"budget": {"value": 1}, "batch_size": 2},
        mlflow={"system_metrics": False, "log_checkpoint": False, "log_images": False},
        runtime={"alignment": False},
    )

    proc = run_sweep(sweep, "--quiet")

    assert_ok(proc)
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    assert "report" not in proc.stdout.split("val mIoU")[0], proc.stdout  # summary first
    (run,) = sweep.runs("sweep")
    logged = {a.path for a in sweep.client().list_artifacts(run.info.run_id, "report")}
    assert "report/report.html" in logged, logged
