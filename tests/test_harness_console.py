"""The sweep's console (harness/console.py): the end-of-sweep summary read back from MLflow,
and the switches that decide what Ray and MLflow print. The console of a real sweep is checked
in test_harness_sweep.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_analysis_store import FINAL_MIOU, build_store, standard_trials

from harness import console


def test_the_summary_lists_the_mean_of_every_cell_and_the_paired_verdicts(tmp_path):
    uri = build_store(tmp_path / "store")

    text = console.summary_text("toy", uri, "1")

    lines = text.splitlines()
    for (method, fraction), values in FINAL_MIOU.items():
        mean = f"{sum(values) / len(values):.4f}"
        assert any(line.split()[:4] == [method, f"{fraction:g}", "3", mean] for line in lines), (
            method,
            fraction,
        )
    # pretrained at 50 % beats supervised at 100 % by +0.01 on every seed.
    (row,) = [line for line in lines if line.split()[:3] == ["pretrained", "0.5", "supervised@1.0"]]
    assert "+0.0100" in row and row.split()[-1] == "better"
    report = f"python -m analysis.report --experiment toy --tracking-uri {uri}"
    assert lines[-2] == f"report:    {report}"
    assert lines[-1] == (
        f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 "
        "--workers 1, then open http://127.0.0.1:5000/#/experiments/1/runs"
        "?viewStateShareKey=study&workflowType=machine_learning"
    )


def test_the_summary_gives_no_verdicts_with_one_seed(tmp_path):
    one_seed = [t for t in standard_trials() if t.seed == 0]
    uri = build_store(tmp_path / "store", trials=one_seed)

    text = console.summary_text("toy", uri, "1")

    assert "no paired verdicts" in text and "verdict" not in text.replace("no paired verdicts", "")
    assert "0.6000" in text  # supervised at 100 %, seed 0


def test_the_summary_of_an_experiment_without_results_still_names_the_next_commands(tmp_path):
    uri = build_store(tmp_path / "store", trials=[])

    lines = console.summary_text("toy", uri, "1").splitlines()

    assert lines[0].startswith("no results to summarise")
    assert lines[-1].startswith("MLflow UI: ")


@pytest.fixture
def restore_environment():
    """A clean slate for `configure`, and the environment and logger put back afterwards."""
    saved = dict(os.environ)
    for key in [*console.HARMLESS, "TQDM_DISABLE", console.LEVEL_VARIABLE]:
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)
    logger = logging.getLogger("harness.console")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


@pytest.mark.parametrize("level", [console.QUIET, console.DEFAULT])
def test_quiet_and_default_switch_off_the_known_harmless_messages(restore_environment, level):
    console.configure(level)

    assert {k: os.environ.get(k) for k in console.HARMLESS} == console.HARMLESS
    assert (os.environ.get("TQDM_DISABLE") == "1") == (level == console.QUIET)
    table = logging.getLogger("harness.console")
    assert table.isEnabledFor(logging.INFO) == (level == console.DEFAULT)


def test_verbose_leaves_ray_and_mlflow_their_own_output(restore_environment):
    console.configure(console.VERBOSE)

    assert not any(key in os.environ for key in console.HARMLESS)
    assert console.tune_verbosity(console.VERBOSE) == 2


def test_a_switch_the_user_set_is_kept(restore_environment):
    os.environ["MLFLOW_LOGGING_LEVEL"] = "DEBUG"

    console.configure(console.DEFAULT)

    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"


# Each probe is a fresh process: MLflow reads its switch when it is first imported. The CI and
# pytest variables that MLflow itself takes as "don't track" are removed, as on a user's laptop.
_PROBE = """
import sys
from harness import console
if sys.argv[1] != "unconfigured":
    console.configure(sys.argv[1])
from mlflow.telemetry.utils import is_telemetry_disabled
from ray._common.usage.usage_lib import usage_stats_enabled
print(is_telemetry_disabled(), usage_stats_enabled())
"""


def _probe(level: str, **env: str) -> str:
    from model.cli import OFFLINE

    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE}
    for key in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "DO_NOT_TRACK"):
        clean.pop(key, None)
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, level], env={**clean, **env}, capture_output=True,
        text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    return probe.stdout.strip()


@pytest.mark.parametrize("level", [console.QUIET, console.VERBOSE])
def test_the_sweep_turns_mlflow_telemetry_and_ray_usage_stats_off(level):
    assert _probe(level) == "True False"


def test_left_alone_the_libraries_phone_home_and_a_user_may_opt_in():
    assert _probe("unconfigured") == "False True"
    assert _probe(console.DEFAULT, MLFLOW_DISABLE_TELEMETRY="false") == "False False"
