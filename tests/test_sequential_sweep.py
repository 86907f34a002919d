"""Seeds in rounds (`seeds: {sequential: ...}`): the spec, the dry run, the look after a round
(which cells run the next round's seeds), the report's sequential verdicts, and bad values.

The look reads a real SQLite MLflow store whose trial runs this file writes with known
val/mIoU (no training); the end-to-end sweep with kills between and during rounds is in the
slow tier (tests/test_sequential_resume.py).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.sequential import SequentialDesign, look
from analysis.sequential_study import (
    DESIGN_TAG,
    OPEN,
    design_of,
    design_tag,
    open_cells,
    sequential_verdicts,
)
from harness import rounds, sweep
from harness.spec import load_spec
from harness.trials import expand_trials, fraction_text

ROUNDS = {"first": 3, "step": 2, "max": 7}
BASE = {
    "study": "seq",
    "data": {"source": "synthetic"},
    "model": {"preset": "nano"},
    "search": {"finetune.label_fraction": [0.5, 1.0]},
    "methods": ["supervised", "pretrained"],
    "seeds": {"sequential": ROUNDS},
}


def write_spec(folder, **changes):
    spec = {**BASE, "storage_path": str(folder / "study"), **changes}
    path = folder / "seq.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- the spec and the dry run ----------------------------------------------------------------


def test_sequential_seeds_run_in_rounds_of_the_design(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    assert spec.seed_rounds() == [[0, 1, 2], [3, 4], [5, 6]]
    assert spec.seed_list == list(range(7))
    assert spec.sequential.design().rounds() == (3, 5, 7)
    assert [rounds.round_of(spec, s) for s in range(7)] == [1, 1, 1, 2, 2, 3, 3]
    # The grid holds every seed a round may run; round 1 runs every cell on the first seeds.
    trials = expand_trials(spec)
    assert len(trials) == 4 * 7
    assert {t.seed for t in rounds.first_round(spec, trials)} == {0, 1, 2}
    assert len(rounds.first_round(spec, trials)) == 12


def test_a_fixed_seed_list_is_one_round_as_before(tmp_path):
    spec = load_spec(write_spec(tmp_path, seeds=[4, 2]))
    assert spec.sequential is None
    assert spec.seed_rounds() == [[4, 2]]
    assert rounds.first_round(spec, expand_trials(spec)) == expand_trials(spec)


def test_the_dry_run_states_the_rounds(tmp_path, capsys):
    assert sweep.main([str(write_spec(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seeds in rounds of 3, 2, 2 (seeds 0..6" in out
    assert "round 1 runs 12 trials" in out and "at most 28 in all" in out
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    ("seeds", "key", "problem"),
    [
        ({"sequential": {"first": 1, "max": 5}}, "seeds.sequential.first", "must be >= 2"),
        ({"sequential": {"first": 4, "max": 3}}, "seeds.sequential.max", "must be >= first"),
        ({"sequential": {"first": 3, "max": 5, "step": 0}}, "seeds.sequential.step", ">= 1"),
        ({"sequential": {"first": 3, "max": 5, "alpha": 0}}, "seeds.sequential.alpha", "> 0"),
        ({"sequential": {"first": 3, "max": 5, "margin": -1}}, "seeds.sequential.margin", "> 0"),
        ({"sequential": {"first": 3, "max": 5, "spending": "haybittle"}},
         "seeds.sequential.spending", "allowed: obrien_fleming, pocock"),
        ({"sequential": {"first": 3, "max": 5, "reference": "supervised"}},
         "seeds.sequential.reference", "VARIANT@FRACTION"),
        ({"sequential": {"first": 3, "maks": 5}}, "seeds.sequential.maks", "did you mean 'max'"),
        ({"sequentail": {"first": 3, "max": 5}}, "seeds.sequentail", "did you mean 'sequential'"),
        ({"sequential": {"first": 3}}, "seeds.sequential.max", "required key is missing"),
    ],
)  # fmt: skip
def test_bad_sequential_values_exit_2_with_one_line_naming_the_file_and_key(
    tmp_path, capsys, seeds, key, problem
):
    path = write_spec(tmp_path, seeds=seeds)
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: {key}: ") and problem in err, err
    assert not (tmp_path / "study").exists()  # nothing written


def test_sequential_rounds_refuse_asha_and_optuna(tmp_path, capsys):
    path = write_spec(tmp_path, scheduler={"type": "asha"}, methods=["pretrained"])
    assert sweep.main([str(path)]) == 2
    assert "seeds.sequential: compares finished trials" in capsys.readouterr().err
    optuna = {
        "num_samples": 2,
        "params": {"pretrain.w_reproj": {"type": "uniform", "low": 0.1, "high": 1}},
    }  # noqa: E501
    path = write_spec(tmp_path, optuna=optuna, methods=["pretrained"], search={})
    assert sweep.main([str(path)]) == 2
    assert "seeds: an Optuna search takes a single seed" in capsys.readouterr().err


# --- the verdicts of a study's rounds ----------------------------------------------------------

DESIGN = SequentialDesign(first=3, step=2, max=7)
REFERENCE = ("supervised", 1.0)
# Per seed 0..6: a cell far below the reference (|t| about 10 at 3 seeds, 17 at 5: decided at
# round 2, as round 1's boundary is 31 and round 2's 4.2), and a cell no different from it
# (undecided to the end).
RNG = np.random.default_rng(7)
BASE_MIOU = 0.30 + 0.01 * RNG.standard_normal(7)
CELLS = {
    ("supervised", 1.0): BASE_MIOU,
    ("supervised", 0.5): BASE_MIOU - 0.05 + 0.008 * RNG.standard_normal(7),
    ("pretrained", 0.5): BASE_MIOU + 0.01 * RNG.standard_normal(7),
}


def frame_of(cells: dict, seeds) -> pd.DataFrame:
    rows = [
        {"method": cell[0], "variant": cell[0], "label_fraction": cell[1], "seed": s,
         "val_mIoU": float(values[s]), "trial_id": f"{cell[0]}@{cell[1]}-s{s}"}
        for cell, values in cells.items()
        for s in seeds
    ]  # fmt: skip
    return pd.DataFrame(rows)


def by_cell(table: pd.DataFrame) -> dict:
    return {(r.variant, r.label_fraction): r for r in table.itertuples()}


def test_verdicts_stop_a_decided_comparison_and_keep_an_undecided_one_open():
    after_1 = by_cell(sequential_verdicts(frame_of(CELLS, range(3)), DESIGN, REFERENCE))
    assert after_1[("supervised", 0.5)].verdict == OPEN  # |t| 9.7 < 31
    after_2 = by_cell(sequential_verdicts(frame_of(CELLS, range(5)), DESIGN, REFERENCE))
    worse = after_2[("supervised", 0.5)]
    assert (worse.verdict, worse.round, worse.n_seeds) == ("worse", 2, 5)
    assert worse.rci_high < 0 and "reached the boundary" in worse.reason
    assert after_2[("pretrained", 0.5)].verdict == OPEN
    # The stopped comparison keeps its round-2 decision when more seeds exist (a fixed study).
    final = by_cell(sequential_verdicts(frame_of(CELLS, range(7)), DESIGN, REFERENCE))
    assert final[("supervised", 0.5)].round == 2
    undecided = final[("pretrained", 0.5)]
    assert (undecided.verdict, undecided.round, undecided.n_seeds) == ("not distinguishable", 3, 7)
    assert undecided.rci_low < 0 < undecided.rci_high
    # Each row is analysis.sequential.look on the cell's first n differences.
    diffs = CELLS[("supervised", 0.5)][:5] - BASE_MIOU[:5]
    assert worse.t == pytest.approx(look(diffs, DESIGN, 1).t)
    table = sequential_verdicts(frame_of(CELLS, range(5)), DESIGN, REFERENCE)
    assert open_cells(table, REFERENCE) == {("pretrained", 0.5), ("supervised", 1.0)}


def test_a_cell_without_the_first_rounds_seeds_waits():
    table = sequential_verdicts(frame_of(CELLS, range(2)), DESIGN, REFERENCE)
    assert set(table["verdict"]) == {OPEN}
    assert set(table["round"]) == {0}


def test_the_design_tag_round_trips():
    class Sweep:
        tags = {DESIGN_TAG: design_tag(DESIGN, "supervised@0.5")}

    design, reference = design_of(Sweep())
    assert design == DESIGN and reference == ("supervised", 0.5)
    assert json.loads(Sweep.tags[DESIGN_TAG])["max"] == 7
    assert design_of(None) is None


# --- the look after a round, read from a real MLflow store -------------------------------------


def log_trials(tracking_uri: str, experiment: str, spec, trials, values) -> None:
    """Finished trial runs as a sweep logs them (tags, val/mIoU per epoch), with known values."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    exp = found.experiment_id if found else client.create_experiment(experiment)
    for trial in trials:
        resolved = trial.resolve(spec)
        fraction = resolved.finetune.label_fraction
        run = client.create_run(
            exp,
            run_name=resolved.name,
            tags={"bev.role": "trial", "bev.trial_id": trial.key, "bev.method": trial.method,
                  "bev.label_fraction": fraction_text(fraction), "bev.seed": str(trial.seed)},
        )  # fmt: skip
        client.log_metric(
            run.info.run_id, "val/mIoU", values[(trial.method, fraction)][trial.seed], step=1
        )  # noqa: E501
        client.set_terminated(run.info.run_id, "FINISHED")


def test_the_look_runs_the_next_round_for_open_cells_and_the_reference_only(tmp_path):
    spec = load_spec(write_spec(tmp_path, methods=["supervised", "pretrained"]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trials = expand_trials(spec)
    values = {
        ("supervised", 1.0): BASE_MIOU,
        ("supervised", 0.5): CELLS[("supervised", 0.5)],
        ("pretrained", 0.5): CELLS[("pretrained", 0.5)],
        ("pretrained", 1.0): BASE_MIOU + 0.01 * RNG.standard_normal(7),
    }
    log_trials(uri, spec.experiment, spec, rounds.first_round(spec, trials), values)
    after_1 = rounds.look(spec, uri, trials, 0)
    assert after_1.open == 3
    assert len(after_1.next_trials) == 4 * 2  # every cell, seeds 3 and 4
    log_trials(uri, spec.experiment, spec, after_1.next_trials, values)
    after_2 = rounds.look(spec, uri, trials, 1)
    decided = after_2.table[after_2.table["verdict"] != OPEN]
    assert list(decided["variant"] + "@" + decided["label_fraction"].astype(str)) == [
        "supervised@0.5"
    ]
    chosen = {
        (t.method, t.resolve(spec).finetune.label_fraction, t.seed) for t in after_2.next_trials
    }
    assert chosen == {
        (m, f, s) for m, f in [("supervised", 1.0), ("pretrained", 0.5), ("pretrained", 1.0)]
        for s in (5, 6)
    }  # fmt: skip
    log_trials(uri, spec.experiment, spec, after_2.next_trials, values)
    assert rounds.look(spec, uri, trials, 2).next_trials == []  # the last round
