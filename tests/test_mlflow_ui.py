"""The MLflow UI on a study's store: a real `mlflow server` on 127.0.0.1, opened in headless
Chromium (Debian's `chromium`, installed by .ci/install-chromium.sh). The experiment, as a sweep
leaves it (`harness.tracking.Tracker`), opens on its runs (not MLflow 3's GenAI overview) with a
link to the study view; the study view (docs/analysis.md) lists the trial runs only, each cell
(method@label_fraction, one fraction form) as its own group row, and in chart mode shows
val/mIoU against time first; the plain runs page lists every trial run.

The screenshots are kept as test-artifacts/mlflow_ui_experiment.png,
test-artifacts/mlflow_ui_study_view.png and test-artifacts/mlflow_ui_study_charts.png. Without
chromium the test is skipped locally and fails in CI (CI=true), where .ci/run must have
installed it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_analysis_store import FINAL_MIOU, build_store, standard_trials

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1400",
]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (run .ci/install-chromium.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must provide it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_binary()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1, backed by the standard study store."""
    root = tmp_path_factory.mktemp("ui_store")
    uri = build_store(root)
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            uri,
            "--artifacts-destination",
            (root / "mlartifacts").as_uri(),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: uvicorn and its worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def experiment_page(url: str, experiment_id: str) -> str:
    """The experiment's runs table with only trial runs, sorted by run name. Any order other
    than start time makes the UI list child runs flat instead of folding them under the sweep."""
    query = urllib.parse.urlencode(
        {
            "searchFilter": "tags.`bev.role` = 'trial'",
            "orderByKey": "attributes.run_name",
            "orderByAsc": "true",
        },
        quote_via=urllib.parse.quote,
    )
    return f"{url}/#/experiments/{experiment_id}/runs?{query}"


def run_chromium(chromium: str, args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


def dump_dom(chromium: str, page: str, profile: Path, done, budget_ms: int = 20000) -> str:
    """The page's DOM once `done(dom)` holds; a loaded machine may need a longer virtual-time
    budget, so a second try doubles it."""
    dom = ""
    for attempt in range(2):
        dom = run_chromium(
            chromium,
            [f"--virtual-time-budget={budget_ms * (attempt + 1)}", "--dump-dom", page],
            profile.with_name(f"{profile.name}-{attempt}"),
        ).stdout
        if done(dom):
            break
    return dom


def screenshot(chromium: str, page: str, name: str, profile: Path, budget_ms: int = 20000) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    run_chromium(
        chromium, [f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", page], profile
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"


@pytest.fixture(scope="module")
def experiment_id(mlflow_server) -> str:
    """The toy experiment as a sweep leaves it: a sweep's Tracker sets its kind, its study view
    and its note's link on an experiment that lacks them."""
    from harness.tracking import Tracker

    return Tracker(mlflow_server, "toy").experiment_id


GROUP_ROW = re.compile(r"Group: ((?:supervised|pretrained)@[0-9.]+)<")
# A cell's fraction in another form than `str(float)` (`supervised@1`, `@1-s0`, `@0.50`).
OTHER_FRACTION_FORM = re.compile(
    r'(?:supervised|pretrained)@(?!(?:0\.\d*[1-9]|1\.0)[-<\s"])[0-9][0-9.]*'
)
NO_DATA = "No data available"  # the GenAI overview's empty charts


def test_the_study_opens_on_its_runs_with_a_link_to_the_study_view(
    chromium, mlflow_server, experiment_id, tmp_path
):
    """Opening the experiment (what a click in the experiments list does) through the link the
    harness prints lands on the runs table, not on MLflow 3's GenAI overview."""
    from harness.study_view import WORKFLOW_QUERY, study_view_link

    page = f"{mlflow_server}/#/experiments/{experiment_id}?{WORKFLOW_QUERY}"

    dom = dump_dom(chromium, page, tmp_path / "root", lambda d: "toy-sweep" in d or NO_DATA in d)

    assert NO_DATA not in dom, f"{page} opened the GenAI overview"
    assert "toy-sweep" in dom, f"{page} does not list the runs"
    assert study_view_link(experiment_id).replace("&", "&amp;") in dom, "no link to the view"


def test_the_study_view_shows_trials_only_each_cell_as_its_own_row(
    chromium, mlflow_server, experiment_id, tmp_path
):
    from harness.study_view import study_view_url
    from harness.trials import fraction_text

    page = study_view_url(mlflow_server, experiment_id)
    cells = {f"{method}@{fraction_text(fraction)}" for method, fraction in FINAL_MIOU}
    finished = {t.run_name for t in standard_trials() if t.status == "FINISHED"}

    dom = dump_dom(chromium, page, tmp_path / "view", lambda d: set(GROUP_ROW.findall(d)))

    groups = GROUP_ROW.findall(dom)
    assert {"pretrained@0.5", "supervised@0.5"} <= set(groups), f"no 50 % groups on {page}"
    assert sorted(groups) == sorted(cells), groups  # one row per cell, each once
    for column in ("method", "bev.label_fraction", "seed", "val/mIoU"):
        assert f">{column}<" in dom, column
    assert not {name for name in finished if f">{name}<" not in dom}, "trial runs missing"
    assert "toy-sweep" not in dom and "Additional runs" not in dom, "the sweep run is in the view"
    text = re.sub(r"<[^>]*>", " ", dom)  # what a user reads: no ids, no attributes
    assert not OTHER_FRACTION_FORM.findall(text), OTHER_FRACTION_FORM.findall(text)[:5]
    screenshot(chromium, page, "mlflow_ui_study_view.png", tmp_path / "view-shot")


X_TITLE = re.compile(r'class="g-xtitle".*?data-unformatted="([^"]*)"', re.S)


def test_the_study_view_charts_miou_against_time_first(
    chromium, mlflow_server, experiment_id, tmp_path
):
    from harness.study_view import TIME_AXIS, study_view_url

    page = f"{study_view_url(mlflow_server, experiment_id)}&compareRunsMode=CHART"

    # The charts draw last and lazily: a longer virtual time than the table's.
    dom = dump_dom(chromium, page, tmp_path / "charts", X_TITLE.findall, budget_ms=60000)

    x_titles = X_TITLE.findall(dom)
    assert x_titles, f"no chart drawn on {page}"
    assert x_titles[0] == TIME_AXIS, x_titles  # the first chart: val/mIoU against time
    assert "sweep/" not in dom, "the sweep run's charts are in the view"
    screenshot(chromium, page, "mlflow_ui_study_charts.png", tmp_path / "charts-shot", 60000)


def test_experiment_page_lists_every_trial_run(chromium, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name("toy").experiment_id
    page = experiment_page(mlflow_server, experiment_id)
    expected = {t.run_name for t in standard_trials()}

    dom = dump_dom(chromium, page, tmp_path / "dom", lambda d: all(name in d for name in expected))
    missing = {name for name in expected if name not in dom}
    assert not missing, f"trial runs not listed on {page}: {sorted(missing)}"
    screenshot(chromium, page, "mlflow_ui_experiment.png", tmp_path / "profile-shot")
