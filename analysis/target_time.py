"""Time to target: when does an arm's mean curve over seeds first reach a target mIoU, on each
time accounting, with a seed bootstrap (formulas: docs/analysis.md). Takes `analysis.load`'s
per-epoch frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.load import TIME_ACCOUNTING
from analysis.stats import CONFIDENCE, TIE_TOLERANCE, Cell, cell_trials, default_reference

# Time accountings of time-to-target, in report order, with their labels.
TARGET_ACCOUNTINGS = {"incl_pretrain": "incl. full pretraining",
                      "amortised": "incl. amortised pretraining",
                      "own": "fine-tuning only"}  # fmt: skip


def crossing_times(times, values, target: float) -> np.ndarray:
    """Rows of `times` and `values` (curves x epochs, epochs in order) -> the time each curve
    first reaches `target`: the epoch's time if the first epoch at or above it is the first
    epoch, else linearly interpolated between that epoch and the one before; NaN where the curve
    never reaches it."""
    times, values = np.atleast_2d(times).astype(float), np.atleast_2d(values).astype(float)
    reached = values >= target - TIE_TOLERANCE  # NaN compares False
    first = reached.argmax(axis=1)
    before = np.maximum(first - 1, 0)
    rows = np.arange(len(values))
    v0, v1 = values[rows, before], values[rows, first]
    t0, t1 = times[rows, before], times[rows, first]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(first > 0, np.clip((target - v0) / (v1 - v0), 0.0, 1.0), 1.0)
    return np.where(reached.any(axis=1), t0 + share * (t1 - t0), np.nan)


def crossing_time(times, values, target: float) -> float:
    """`crossing_times` of one curve."""
    return float(crossing_times(np.asarray(times)[None], np.asarray(values)[None], target)[0])


def _seed_curves(arm: pd.DataFrame, time_column: str, metric: str) -> tuple[np.ndarray, ...]:
    """(seeds x epochs) matrices of time and metric on the epochs every seed of the arm logged."""
    grid = arm.pivot_table(
        index="seed", columns="epoch", values=[time_column, metric], dropna=False
    )
    times, values = grid[time_column], grid[metric].reindex(columns=grid[time_column].columns)
    complete = times.notna().all() & values.notna().all()
    return times.loc[:, complete].to_numpy(float), values.loc[:, complete].to_numpy(float)


def final_mean(epochs: pd.DataFrame, cell: Cell, metric: str = "val_mIoU") -> float:
    """Mean over seeds of `cell`'s last-epoch `metric` (NaN when the cell has no trials)."""
    last = cell_trials(epochs, cell).sort_values("epoch").groupby("trial_id", observed=True).tail(1)
    return float(last.groupby("seed")[metric].mean().mean()) if not last.empty else math.nan


def time_to_target(
    epochs: pd.DataFrame,
    target: float | None = None,
    reference: Cell | None = None,
    clock: str = "wall",
    metric: str = "val_mIoU",
    confidence: float = CONFIDENCE,
    n_boot: int = 2000,
    seed: int = 0,
    accountings: tuple[str, ...] = tuple(TARGET_ACCOUNTINGS),
) -> pd.DataFrame:
    """Per arm (variant, label fraction) and time accounting: the time at which the mean curve
    over seeds (mean metric per epoch against mean cumulative time per epoch) first reaches
    `target` (default: the final mean of `reference`, itself by default supervised at 100%),
    see `crossing_times`; `reached` False and NaN times when it never does.

    Bootstrap over seeds: each replicate draws the arm's seeds with replacement (generator
    seeded with `seed`, the same draws for every accounting) and recomputes the mean curve and
    its crossing. `never_share` is the share of replicates that never reach the target; they
    count as infinitely late, so a bound that falls among them is NaN ("not reached").
    `ratio` = the arm's time / the reference's own time-to-target on the same accounting.
    """
    reference = reference or default_reference(epochs)
    if target is None:
        target = final_mean(epochs, reference, metric)
    if math.isnan(target):
        return pd.DataFrame()
    rows = []
    alpha = 1 - confidence
    arms = epochs.groupby(["method", "variant", "label_fraction"], observed=True)
    for (method, variant, fraction), arm in arms:
        for accounting in accountings:
            column = f"cum_{clock}_s{TIME_ACCOUNTING[accounting]}"
            times, values = _seed_curves(arm, column, metric)
            if values.size == 0:  # no epoch that every seed logged on this clock
                continue
            n_seeds = len(values)
            point = crossing_time(times.mean(axis=0), values.mean(axis=0), target)
            draws = np.random.default_rng(seed).integers(0, n_seeds, size=(n_boot, n_seeds))
            replicates = crossing_times(
                times[draws].mean(axis=1), values[draws].mean(axis=1), target
            )
            late = np.where(np.isnan(replicates), np.inf, replicates)
            low, high = np.quantile(late, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
            rows.append(
                {
                    "variant": variant,
                    "method": method,
                    "label_fraction": fraction,
                    "accounting": accounting,
                    "time_column": column,
                    "target": target,
                    "n_seeds": n_seeds,
                    "reached": not math.isnan(point),
                    "time_s": point,
                    "ci_low_s": low if np.isfinite(low) else math.nan,
                    "ci_high_s": high if np.isfinite(high) else math.nan,
                    "never_share": float(np.isnan(replicates).mean()),
                }
            )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    is_reference = (table["variant"] == reference[0]) & np.isclose(
        table["label_fraction"], reference[1]
    )
    own = table[is_reference].set_index("accounting")["time_s"]
    with np.errstate(invalid="ignore", divide="ignore"):
        table["ratio"] = table["time_s"] / table["accounting"].map(own).replace(0.0, np.nan)
    return table
