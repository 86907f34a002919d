"""`python -m analysis.plan`: seeds needed for a paired effect, from a pilot in a real MLflow
store; one-line errors (exit 2) for a pilot with too few seeds or a missing experiment."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_analysis_report import run_cli
from test_analysis_store import Trial, build_store

from analysis.load import analysed_trials, load_study
from analysis.plan import main, plan_table

# Pilot: supervised@1.0 finals 0.60, 0.62, 0.64 for seeds 0-2; pretrained@0.5 adds the paired
# differences +0.02, +0.04, +0.06 (mean 0.04, sd exactly 0.02), pretrained@0.25 adds
# -0.05, -0.03, -0.01 (sd 0.02 as well).
REFERENCE = (0.60, 0.62, 0.64)
CELLS = {0.5: (0.02, 0.04, 0.06), 0.25: (-0.05, -0.03, -0.01)}


def pilot_trials(seeds: tuple[int, ...] = (0, 1, 2)) -> list[Trial]:
    trials = [Trial("supervised", 1.0, s, REFERENCE[s]) for s in seeds]
    for fraction, diffs in CELLS.items():
        trials += [Trial("pretrained", fraction, s, REFERENCE[s] + diffs[s]) for s in seeds]
    return trials


@pytest.fixture(scope="module")
def pilot(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("pilot"), pilot_trials())


def test_plan_table_needs_ten_seeds_for_a_one_sd_effect(pilot):
    # effect = sd = 0.02: d = 1, so n = 10 (power 0.803; 9 seeds give 0.748), see
    # test_analysis_stats.py for the hand check.
    trials = analysed_trials(load_study("toy", pilot, progress=False).trials)
    table = plan_table(trials, effect=0.02).set_index("cell")
    assert table.loc["pretrained@0.5", "n_seeds"] == 3
    assert table.loc["pretrained@0.5", "mean_diff"] == pytest.approx(0.04)
    assert table.loc["pretrained@0.5", "sd_diff"] == pytest.approx(0.02)
    assert table.loc["pretrained@0.5", "seeds_needed"] == 10
    # The negative cell has the same spread: the same plan, for an effect of either sign.
    assert table.loc["pretrained@0.25", "mean_diff"] == pytest.approx(-0.03)
    assert table.loc["pretrained@0.25", "seeds_needed"] == 10
    assert "supervised@1.0" not in table.index


def test_plan_cli_prints_seeds_needed_and_the_detectable_effect(pilot, capsys):
    assert main(["--experiment", "toy", "--tracking-uri", pilot, "--effect", "0.02"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.lstrip().startswith("pretrained@0.5"))
    # pilot seeds, mean diff, sd diff, seeds needed, detectable now (3 seeds: 3.264 sd).
    assert row.split() == ["pretrained@0.5", "3", "+0.0400", "0.0200", "10", "0.0653"]
    assert "80% power" in out and "supervised@1.0" in out


def test_plan_cli_prints_the_expected_seeds_of_a_sequential_design(pilot, capsys):
    args = ["--experiment", "toy", "--tracking-uri", pilot, "--effect", "0.02"]
    assert main([*args, "--rounds", "3:2:10"]) == 0
    out = capsys.readouterr().out
    assert "rounds [3, 5, 7, 9, 10]" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("pretrained@0.5:"))
    numbers = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)", row.split(":", 1)[1])]
    expected_effect, power, expected_null, fixed = numbers[0], numbers[1], numbers[2], numbers[3]
    # d = 1 at 10 seeds most: fewer than 10 expected under the effect, about 10 under none,
    # and a fixed design of the same power needs at least the sequential one's average.
    assert 3 < expected_effect < 10 and 9 < expected_null <= 10 and 50 < power < 100
    assert expected_effect < fixed <= 10
    # And what the design decides on the pilot's own 3 seeds: |t| 3.46 against round 1's
    # boundary of about 126, so both comparisons wait for round 2.
    replay = out.split("On this study's own seeds", 1)[1]
    assert "pretrained@0.5: continue at round 1 of 5 (3 seeds), +0.0400 [" in replay
    assert "pretrained@0.25: continue at round 1 of 5 (3 seeds), -0.0300 [" in replay
    assert "trials: 9 of the study's 9" in replay


@pytest.mark.parametrize(
    ("value", "problem"),
    [("3:2", "expected FIRST:STEP:MAX, three integers"), ("1:2:10", "need first >= 2")],
)
def test_plan_rejects_a_bad_rounds_value_with_one_line(value, problem, pilot, tmp_path):
    result = run_plan(
        "--experiment", "toy", "--tracking-uri", pilot, "--rounds", value, cwd=tmp_path
    )
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"error: argument --rounds: '{value}': {problem}" in result.stderr


def run_plan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("analysis.plan", *args, cwd=cwd)


def assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and not result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_plan_of_a_pilot_with_one_seed_exits_2(tmp_path):
    uri = build_store(tmp_path / "store", pilot_trials(seeds=(0,)), experiment="one_seed")
    before = sorted(tmp_path.rglob("*"))
    result = run_plan("--experiment", "one_seed", "--tracking-uri", uri, cwd=tmp_path)
    assert_one_error_line(result, "experiment 'one_seed' has 1 seed(s)")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_plan_of_a_missing_experiment_exits_2(pilot, tmp_path, capsys):
    assert main(["--experiment", "no_such_pilot", "--tracking-uri", pilot]) == 2
    captured = capsys.readouterr()
    assert not captured.out
    assert captured.err.startswith("error: experiment 'no_such_pilot' not found")
    assert len(captured.err.strip().splitlines()) == 1
    # Without a store at all (the default sqlite:///studies/<name>/mlflow.db): nothing created.
    result = run_plan("--experiment", "no_such_pilot", cwd=tmp_path)
    assert_one_error_line(result, "no MLflow store at")
    assert not list(tmp_path.iterdir())
