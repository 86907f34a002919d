"""Seeds in rounds, for the sweep driver: which trials each round runs, and the look after it.

A fixed seed list is one round of every trial. With `seeds: {sequential: ...}` round 1 runs
every cell on the first seeds; after each round `analysis.sequential_study` looks at every
comparison with the reference cell, and the next round runs its seeds only for the cells still
open (and the reference while any is). The look reads the study's MLflow runs, so it gives the
same answer in the sweep, after a `--resume` and in the report.

The sweep's state file records each round (its seeds, its trials' keys, whether it finished):
a resumed sweep reruns no finished round and continues the unfinished one with the same trials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.spec import Spec
from harness.trials import Trial

log = logging.getLogger("harness.sweep")

ROUND_TAG = "bev.round"  # on each trial run: the round (1-based) that ran it


def round_of(spec: Spec, seed: int) -> int:
    """The round (1-based) whose seeds include `seed`."""
    for index, seeds in enumerate(spec.seed_rounds()):
        if seed in seeds:
            return index + 1
    raise ValueError(f"seed {seed} is in no round of study {spec.study}")


def ray_path_of(ray_path: Path, index: int) -> Path:
    """Ray Tune's experiment folder of round `index` (0-based): the sweep's own for round 1."""
    return ray_path if index == 0 else ray_path.with_name(f"{ray_path.name}-round{index + 1}")


def first_round(spec: Spec, trials: list[Trial]) -> list[Trial]:
    seeds = set(spec.seed_rounds()[0])
    return [t for t in trials if t.seed in seeds]


@dataclass
class Look:
    """The sequential verdicts after a round and the trials the next round runs."""

    table: pd.DataFrame  # analysis.sequential_study.sequential_verdicts
    next_trials: list[Trial]

    @property
    def open(self) -> int:
        from analysis.sequential_study import OPEN

        return int((self.table["verdict"] == OPEN).sum())


def _signature(trial: Trial) -> tuple:
    return trial.method, trial.overrides


def look(spec: Spec, tracking_uri: str, trials: list[Trial], index: int) -> Look:
    """The look after round `index` (0-based) of a sequential sweep: the verdicts over every
    finished trial of the study, and the trials of round `index + 1` (none after the last
    round or once every comparison has stopped)."""
    from analysis.load import analysed_trials, load_study
    from analysis.sequential_study import open_cells, sequential_verdicts
    from analysis.stats import default_reference, parse_cell

    sequential = spec.sequential
    study = load_study(spec.experiment, tracking_uri, progress=False)
    frame = analysed_trials(study.trials, include_partial=False)
    by_key = {t.key: t for t in trials}
    frame = frame[frame["trial_id"].isin(by_key)]
    reference = parse_cell(sequential.reference) if sequential.reference else None
    reference = reference or default_reference(frame)
    table = sequential_verdicts(frame, sequential.design(), reference)
    rounds = spec.seed_rounds()
    if index + 1 >= len(rounds):
        return Look(table, [])
    cells = open_cells(table, reference)
    signatures = {
        _signature(by_key[key])
        for key, variant, fraction in zip(
            frame["trial_id"], frame["variant"], frame["label_fraction"], strict=True
        )
        if (variant, float(fraction)) in cells
    }
    seeds = set(rounds[index + 1])
    chosen = [t for t in trials if t.seed in seeds and _signature(t) in signatures]
    return Look(table, chosen)


def summary(look: Look, index: int) -> str:
    """One log line per round: what was decided and what runs next."""
    from analysis.sequential_study import OPEN

    decided = look.table[look.table["verdict"] != OPEN]
    words = ", ".join(f"{v} {n}" for v, n in decided["verdict"].value_counts().items())
    return (
        f"round {index + 1}: {len(decided)} of {len(look.table)} comparisons decided"
        + (f" ({words})" if words else "")
        + f"; the next round runs {len(look.next_trials)} trials"
    )
