"""`python -m analysis.report`: HTML, figures and CSVs from a real MLflow store, logged back to
the sweep run; clear one-line errors for bad input."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from test_analysis_store import EPOCHS, FINAL_MIOU, SEEDS, Trial, build_store

from analysis.report import FIGURES

HALF_WIDTH_3_SEEDS = 4.302652729749462 * 0.02 / math.sqrt(3)


def run_report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"MPLBACKEND": "Agg"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "analysis.report", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = build_store(root / "store")
    out = root / "out"
    result = run_report(
        "--experiment",
        "toy",
        "--tracking-uri",
        uri,
        "--out",
        str(out),
        "--n-boot",
        "500",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return {"uri": uri, "out": out, "stdout": result.stdout, "cwd": root}


def test_report_writes_html_figures_and_csvs(report):
    out = report["out"]
    assert report["stdout"].strip() == str(out / "report.html")
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").is_file()
        assert (out / "figures" / f"{name}.svg").is_file()
    for name in ("epochs.csv", "trials.csv", "summary.csv", "label_savings.csv", "class_iou.csv"):
        assert (out / name).is_file()


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_not_blank(report, name):
    pixels = np.asarray(Image.open(report["out"] / "figures" / f"{name}.png").convert("L"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert (pixels < 200).mean() > 0.01, "almost every pixel is white"
    svg = ET.parse(report["out"] / "figures" / f"{name}.svg").getroot()
    assert svg.tag.endswith("svg") and len(list(svg.iter())) > 50


def test_tidy_csv_has_one_row_per_trial_and_epoch(report):
    epochs = pd.read_csv(report["out"] / "epochs.csv")
    assert len(epochs) == len(FINAL_MIOU) * len(SEEDS) * EPOCHS + 2
    assert {
        "method",
        "label_fraction",
        "seed",
        "epoch",
        "val_mIoU",
        "IoU_divider",
        "cum_wall_s_amortised",
        "status",
        "partial",
    } <= set(epochs.columns)


def test_html_is_self_contained(report):
    html = (report["out"] / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'(src|href)="https?://', html)


def test_html_holds_the_table_numbers_spec_and_environment(report):
    html = (report["out"] / "report.html").read_text()
    assert "0.6200" in html  # supervised 100% mean mIoU (savings reference)
    # pretrained 50%: t-interval 0.5803 .. 0.6797, as table cells
    assert f"<td>{0.63 - HALF_WIDTH_3_SEEDS:.4f}</td>" in html
    assert f"<td>{0.63 + HALF_WIDTH_3_SEEDS:.4f}</td>" in html
    assert "<td>1.550</td>" in html and "<td>0.800</td>" in html  # time ratios at savings point
    assert "label_fractions: [0.1, 0.25, 0.5, 1.0]" in html  # spec.yaml of the sweep run
    assert "2.14.1" in html  # the sweep's environment.json
    assert "FAILED 1" in html and "RUNNING 1" in html


def test_report_is_logged_to_the_sweep_run(report):
    client = MlflowClient(tracking_uri=report["uri"])
    exp = client.get_experiment_by_name("toy")
    sweep = client.search_runs([exp.experiment_id], "tags.`bev.role` = 'sweep'")[0]
    logged = {f.path for f in client.list_artifacts(sweep.info.run_id, "report")}
    assert {"report/report.html", "report/summary.csv", "report/figures"} <= logged
    figures = {f.path for f in client.list_artifacts(sweep.info.run_id, "report/figures")}
    assert {f"report/figures/{name}.png" for name in FIGURES} <= figures


def test_report_leaves_no_files_in_the_working_directory(report):
    leftovers = {p.name for p in report["cwd"].iterdir()} - {"store", "out"}
    assert not leftovers


def _bad_store(kind: str, root: Path) -> tuple[str, str]:
    """(tracking URI, experiment) for one kind of bad input."""
    if kind == "unknown experiment":
        return build_store(root), "no_such_study"
    if kind == "empty experiment":
        uri = build_store(root, trials=[])
        MlflowClient(tracking_uri=uri).create_experiment("empty")
        return uri, "empty"
    if kind == "only failed runs":
        trials = [
            Trial("supervised", 1.0, s, 0.1, status="FAILED", epochs_logged=1) for s in (0, 1)
        ]
        return build_store(root, trials), "toy"
    return f"sqlite:///{root / 'missing.db'}", "toy"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("unknown experiment", "experiment 'no_such_study' not found"),
        ("empty experiment", "has no trial runs"),
        ("only failed runs", "all 2 trial runs failed"),
        ("missing store", "no MLflow store at"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, kind, message):
    uri, experiment = _bad_store(kind, tmp_path / "store")
    result = run_report("--experiment", experiment, "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "studies").exists()


def test_console_script_entry_point_returns_the_exit_status(tmp_path, capsys):
    from analysis.report import main  # bevlabels-report = analysis.report:main

    uri = build_store(tmp_path / "store")
    capsys.readouterr()
    assert main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.startswith("error: experiment 'nope' not found")
