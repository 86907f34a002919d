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

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from test_analysis_store import EPOCHS, FINAL_MIOU, SEEDS, Trial, build_store

from analysis.findings import FIGURES, OPTIONAL_FIGURES
from analysis.report import LOGGED_FILES

ALWAYS_DRAWN = [name for name in FIGURES if name not in OPTIONAL_FIGURES]

HALF_WIDTH_3_SEEDS = 4.302652729749462 * 0.02 / math.sqrt(3)


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module args` in `cwd`, without $MLFLOW_TRACKING_URI."""
    env = os.environ | {"MPLBACKEND": "Agg"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("analysis.report", *args, cwd=cwd)


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
    for name in ALWAYS_DRAWN:
        assert (out / "figures" / f"{name}.png").is_file()
        assert (out / "figures" / f"{name}.svg").is_file()
    for name in ("epochs.csv", "trials.csv", *LOGGED_FILES):
        # quality.csv: only a study of several pseudo-label sources (tests/test_quality_study);
        # sequential.csv: only a study whose seeds ran in rounds (tests/test_sequential_resume)
        optional = name in ("quality.csv", "sequential.csv")
        assert (out / name).is_file() == (not optional), name
    assert {"verdicts.csv", "time_to_target.csv", "verdicts.md"} <= set(LOGGED_FILES)


@pytest.mark.parametrize("name", ALWAYS_DRAWN)
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
    assert html.count('src="data:image/png;base64,') == len(ALWAYS_DRAWN)
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


def test_verdicts_csv_has_one_row_per_cell_against_supervised_100(report):
    # Standard store: every cell is supervised@1.0 plus a constant per seed, so the paired
    # differences do not vary: pretrained@0.5 is +0.01 on every seed, an interval [0.01, 0.01].
    verdicts = pd.read_csv(report["out"] / "verdicts.csv")
    assert len(verdicts) == len(FINAL_MIOU) - 1
    row = verdicts.query("variant == 'pretrained' and label_fraction == 0.5").iloc[0]
    assert row["reference"] == "supervised@1.0" and row["n_seeds"] == 3
    assert row["mean_diff"] == pytest.approx(0.01) and row["t_low"] == pytest.approx(0.01)
    assert row["verdict"] == "better" and row["mde"] == pytest.approx(0.0, abs=1e-9)
    assert set(verdicts["verdict"]) == {"better", "worse"}


def test_time_to_target_csv_has_three_clocks_and_the_ratio(report):
    # Target 0.62 (supervised@1.0 final mean, reached at its last epoch, 300 s). pretrained@0.5:
    # mean curve 0.42 at 110 s, 0.63 at 165 s fine-tuning: 110 + 0.20 / 0.21 * 55 = 162.38 s,
    # + 300 s whole pretraining, + 75 s amortised.
    table = pd.read_csv(report["out"] / "time_to_target.csv")
    rows = table.query("variant == 'pretrained' and label_fraction == 0.5").set_index("accounting")
    fine_tuning = 110 + 0.20 / 0.21 * 55
    for accounting, extra in (("own", 0), ("incl_pretrain", 300), ("amortised", 75)):
        assert rows.loc[accounting, "time_s"] == pytest.approx(fine_tuning + extra)
        assert rows.loc[accounting, "ratio"] == pytest.approx((fine_tuning + extra) / 300)
    never = table.query("variant == 'pretrained' and label_fraction == 0.25")
    assert not never["reached"].any() and never["time_s"].isna().all()


def test_html_holds_the_verdict_and_time_to_target_tables(report):
    html = (report["out"] / "report.html").read_text()
    assert "Paired verdicts against supervised@1.0" in html
    assert "<td>+0.0100 +0.0100 +0.0100</td>" in html and "<td>better</td>" in html
    assert "smallest detectable (80% power)" in html
    assert "target mIoU 0.6200" in html
    assert "<td>162.4 [" in html and "<td>0.541</td>" in html  # fine-tuning only, pretrained@0.5
    assert "<td>not reached</td>" in html
    markdown = (report["out"] / "verdicts.md").read_text()
    assert "| pretrained@0.5 | supervised@1.0 | 3 | +0.0100 +0.0100 +0.0100 |" in markdown


def test_time_figure_marks_the_target_and_legends_only_what_is_drawn(report):
    svg = (report["out"] / "figures" / "miou_vs_time.svg").read_text()
    assert "target mIoU 0.620" in svg and "mean curve reaches target" in svg
    fraction_svg = (report["out"] / "figures" / "miou_vs_fraction.svg").read_text()
    assert "reaches it" in fraction_svg  # the savings point is drawn, so it is in the legend


def test_t_bands_are_clipped_to_the_unit_interval():
    from matplotlib.collections import PolyCollection

    from analysis.curves import plot_miou_vs_fraction

    # Two seeds at 0.01 and 0.30: the t-interval reaches far below 0 (12.7 * 0.145 wide).
    trials = pd.DataFrame(
        {
            "variant": "supervised",
            "method": "supervised",
            "label_fraction": [0.5, 0.5, 1.0, 1.0],
            "seed": [0, 1, 0, 1],
            "val_mIoU": [0.01, 0.30, 0.95, 0.99],
        }
    )
    fig = plot_miou_vs_fraction(trials)
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    y = np.concatenate([p.vertices[:, 1] for band in bands for p in band.get_paths()])
    assert bands and y.min() >= 0.0 and y.max() <= 1.0
    assert fig.axes[0].patches[0].get_path().vertices[:, 1].max() <= 1.0 + 1e-9  # reference band
    plt.close(fig)


def test_the_length_figure_draws_one_line_per_fraction_over_the_lengths():
    from analysis.curves import plot_miou_vs_pretrain_length

    lengths, seeds = [2, 4, 8], [0, 1]
    pretrained = [
        {"method": "pretrained", "label_fraction": f, "pretrain_epochs": n, "seed": s,
         "val_mIoU": 0.3 + 0.02 * n + 0.1 * f + 0.01 * s}
        for f in (0.1, 1.0) for n in lengths for s in seeds
    ]  # fmt: skip
    supervised = [{"method": "supervised", "label_fraction": f, "seed": s, "val_mIoU": 0.2}
                  for f in (0.1, 1.0) for s in seeds]  # fmt: skip
    trials = pd.DataFrame(pretrained + supervised).assign(variant=lambda t: t["method"])
    fig = plot_miou_vs_pretrain_length(trials)
    solid = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    assert [list(line.get_xdata()) for line in solid] == [lengths, lengths]
    expected = [0.3 + 0.02 * n + 0.1 * 0.1 + 0.005 for n in lengths]
    assert np.allclose(solid[0].get_ydata(), expected)  # the mean over seeds
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in dashed] == [0.2, 0.2]  # supervised per fraction
    plt.close(fig)


def test_time_figure_legend_has_no_target_entries_for_what_is_not_drawn():
    from analysis.curves import plot_miou_vs_time
    from analysis.target_time import time_to_target

    epochs = pd.DataFrame(
        {
            "trial_id": ["a", "a", "b", "b"],
            "variant": "supervised",
            "method": "supervised",
            "label_fraction": 1.0,
            "seed": [0, 0, 1, 1],
            "epoch": [1, 2, 1, 2],
            "val_mIoU": [0.2, 0.4, 0.2, 0.5],
        }
    )
    for column in ("cum_wall_s", "cum_wall_s_incl_pretrain", "cum_wall_s_amortised"):
        epochs[column] = 10.0 * epochs["epoch"]

    def legend(fig) -> list[str]:
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        plt.close(fig)
        return texts

    assert legend(plot_miou_vs_time(epochs)) == ["supervised"]
    unreachable = time_to_target(epochs, target=0.9, n_boot=10)
    assert legend(plot_miou_vs_time(epochs, time_to_target=unreachable)) == [
        "supervised",
        "target mIoU 0.900",
    ]


def test_alignment_csv_summarises_the_pretraining_runs(report):
    table = pd.read_csv(report["out"] / "alignment.csv").set_index("statistic")
    seeds = (0, 1, 2, 3)  # one pretraining run per seed in the standard store (3: running trial)
    assert table.loc["reach", "mean"] == pytest.approx(0.315)  # (0.30 + ... + 0.33) / 4
    assert table.loc["ceiling_mIoU", "min"] == pytest.approx(0.12)
    assert table.loc["ceiling_mIoU", "max"] == pytest.approx(0.18)
    assert table.loc["reach_divider", "runs"] == len(seeds)
    assert "head_reached_mIoU" in table.index and "perspective_mIoU" not in table.index
    assert "Target alignment of the pretraining" in (report["out"] / "report.html").read_text()


def test_report_is_logged_to_the_sweep_run(report):
    client = MlflowClient(tracking_uri=report["uri"])
    exp = client.get_experiment_by_name("toy")
    sweep = client.search_runs([exp.experiment_id], "tags.`bev.role` = 'sweep'")[0]
    logged = {f.path for f in client.list_artifacts(sweep.info.run_id, "report")}
    optional = ("quality.csv", "sequential.csv")  # a quality study's, a sequential study's
    written = [name for name in LOGGED_FILES if name not in optional]
    assert {f"report/{name}" for name in written} | {"report/figures"} <= logged
    assert not {f"report/{name}" for name in optional} & logged
    figures = {f.path for f in client.list_artifacts(sweep.info.run_id, "report/figures")}
    assert {f"report/figures/{name}.png" for name in ALWAYS_DRAWN} <= figures


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
