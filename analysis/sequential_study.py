"""A study's sequential verdicts: the group-sequential design of `analysis.sequential` applied
to its trials, one comparison per cell against the reference cell.

The sweep (`seeds: {sequential: ...}` in a spec) calls `sequential_verdicts` after each round to
decide which cells run more seeds; the report calls it on the finished study and gets the same
rows: the round each comparison stopped at, why, and its repeated confidence interval (valid
wherever the sweep stopped). On a fixed-seed study it answers "what would the sequential
design have decided on these seeds, taken in order".

Seeds enter in sorted order: round k looks at a cell's first n_k paired differences (n_k the
design's seeds after round k) once it has them.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from analysis.load import SweepInfo
from analysis.sequential import SequentialDesign, look
from analysis.stats import Cell, compared_cells, paired_differences, parse_cell

DESIGN_TAG = "bev.sequential"  # on the sweep run: the design and its reference, as JSON
OPEN = "continue"  # the verdict of a comparison that needs the next round's seeds
COLUMNS = [
    "variant", "method", "label_fraction", "reference", "round", "rounds", "n_seeds", "seeds",
    "mean_diff", "sd_diff", "t", "boundary", "nominal_alpha", "verdict", "rci_low", "rci_high",
    "reason", "interval",
]  # fmt: skip


def design_tag(design: SequentialDesign, reference: str | None) -> str:
    """The sweep run's `bev.sequential` tag: what the report needs to redo the decisions."""
    fields = {k: getattr(design, k) for k in SequentialDesign.__dataclass_fields__}
    return json.dumps({**fields, "reference": reference}, sort_keys=True)


def design_of(sweep: SweepInfo | None) -> tuple[SequentialDesign, Cell | None] | None:
    """The sequential design a study's sweep ran (and its reference cell, None: the default),
    or None for a fixed-seed study."""
    text = (sweep.tags if sweep else {}).get(DESIGN_TAG)
    if not text:
        return None
    fields = json.loads(text)
    reference = fields.pop("reference", None)
    return SequentialDesign(**fields), parse_cell(reference) if reference else None


def _reason(decision, design: SequentialDesign, rounds: tuple[int, ...]) -> str:
    k, t, c = decision.round_index, abs(decision.t), decision.boundary
    if decision.verdict in ("better", "worse"):
        return f"|t| {t:.2f} reached the boundary {c:.2f} at round {k + 1}"
    if decision.verdict == "equivalent":
        return f"repeated CI inside +-{design.margin:g} at round {k + 1}"
    if decision.verdict == "futile":
        return f"futile at round {k + 1}: conditional power under the trend below 10 %"
    if decision.verdict == "not distinguishable":
        return f"max seeds ({decision.n_seeds}) reached; |t| {t:.2f} < boundary {c:.2f}"
    return f"|t| {t:.2f} < boundary {c:.2f}; round {k + 2} takes it to {rounds[k + 1]} seeds"


def _row(cell, method, reference: Cell, diffs: pd.Series, design: SequentialDesign) -> dict:
    rounds = design.rounds()
    row = {
        "variant": cell[0],
        "method": method,
        "label_fraction": cell[1],
        "reference": f"{reference[0]}@{reference[1]}",
        "rounds": len(rounds),
    }
    decision = None
    for k, n in enumerate(rounds):
        if len(diffs) < n:
            break
        decision = look(diffs.to_numpy()[:n], design, k)
        if decision.stopped:
            break
    if decision is None:  # not even the first round's seeds yet
        n = len(diffs)
        return row | {
            "round": 0, "n_seeds": n, "seeds": " ".join(str(s) for s in diffs.index),
            "mean_diff": float(diffs.mean()) if n else math.nan, "sd_diff": math.nan,
            "t": math.nan, "boundary": math.nan, "nominal_alpha": math.nan, "verdict": OPEN,
            "rci_low": math.nan, "rci_high": math.nan,
            "reason": f"waiting for round 1 ({rounds[0]} seeds, {n} so far)", "interval": "",
        }  # fmt: skip
    used = diffs.index[: decision.n_seeds]
    return row | {
        "round": decision.round_index + 1,
        "n_seeds": decision.n_seeds,
        "seeds": " ".join(str(s) for s in used),
        "mean_diff": decision.mean,
        "sd_diff": decision.sd,
        "t": decision.t,
        "boundary": decision.boundary,
        "nominal_alpha": decision.nominal_alpha,
        "verdict": decision.verdict,
        "rci_low": decision.rci_low,
        "rci_high": decision.rci_high,
        "reason": _reason(decision, design, rounds),
        "interval": decision.interval_label,
    }


def sequential_verdicts(
    trials: pd.DataFrame, design: SequentialDesign, reference: Cell, metric: str = "val_mIoU"
) -> pd.DataFrame:
    """One row per (variant, label fraction) other than `reference`: the first round whose
    look stopped the comparison (or the last round looked at, verdict "continue", while it
    waits for seeds), with the paired statistic, the boundary, the repeated CI and the reason.
    Empty when the reference cell has no trials."""
    rows = []
    for method, variant, fraction in compared_cells(trials, reference):
        diffs = paired_differences(trials, (variant, fraction), reference, metric)
        rows.append(_row((variant, fraction), method, reference, diffs, design))
    return pd.DataFrame(rows, columns=COLUMNS)


def open_cells(table: pd.DataFrame, reference: Cell) -> set[Cell]:
    """The cells the next round runs: those still open, and the reference while any is."""
    still = table[table["verdict"] == OPEN]
    cells = {(v, float(f)) for v, f in zip(still["variant"], still["label_fraction"], strict=True)}
    return cells | {(reference[0], float(reference[1]))} if cells else set()
