"""The MLflow UI on a study's store: a real `mlflow server` on 127.0.0.1, opened in headless
Chromium (Debian's `chromium`, installed by .ci/install-chromium.sh), lists every trial run, and
the study view the harness saves on each experiment (docs/analysis.md) shows every cell
(method@label_fraction) as its own group row.

The screenshots are kept as test-artifacts/mlflow_ui_experiment.png and
test-artifacts/mlflow_ui_study_view.png. Without chromium the test is
skipped locally and fails in CI (CI=true), where .ci/run must have installed it.
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


def dump_dom(chromium: str, page: str, profile: Path, done) -> str:
    """The page's DOM once `done(dom)` holds; a loaded machine may need a longer virtual-time
    budget, so a second try doubles it."""
    dom = ""
    for attempt in range(2):
        dom = run_chromium(
            chromium,
            [f"--virtual-time-budget={20000 * (attempt + 1)}", "--dump-dom", page],
            profile.with_name(f"{profile.name}-{attempt}"),
        ).stdout
        if done(dom):
            break
    return dom


def screenshot(chromium: str, page: str, name: str, profile: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    run_chromium(chromium, ["--virtual-time-budget=20000", f"--screenshot={shot}", page], profile)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"


GROUP_ROW = re.compile(r"Group: ((?:supervised|pretrained)@[0-9.]+)<")


def test_the_study_view_shows_each_method_and_fraction_as_its_own_row(
    chromium, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    from harness.tracking import study_view_tags, study_view_url

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name("toy").experiment_id
    for key, value in study_view_tags().items():  # what a sweep saves on a new experiment
        client.set_experiment_tag(experiment_id, key, value)
    page = study_view_url(mlflow_server, experiment_id)
    cells = {f"{method}@{fraction:g}" for method, fraction in FINAL_MIOU}

    dom = dump_dom(chromium, page, tmp_path / "view", lambda d: set(GROUP_ROW.findall(d)))

    groups = GROUP_ROW.findall(dom)
    assert {"pretrained@0.5", "supervised@0.5"} <= set(groups), f"no 50 % groups on {page}"
    assert sorted(groups) == sorted(cells), groups  # one row per cell, each once
    for column in ("method", "finetune.label_fraction", "seed", "val/mIoU"):
        assert f">{column}<" in dom, column
    screenshot(chromium, page, "mlflow_ui_study_view.png", tmp_path / "view-shot")


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
