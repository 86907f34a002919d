"""Statistics over seeds: t-intervals per (configuration, label fraction), paired verdicts
against a reference cell with the power of the paired test, and the time-vs-mIoU Pareto front.
Label savings (`analysis.savings`) and time-to-target (`analysis.target_time`) build on them.

The table builders take `analysis.load`'s one-row-per-trial frame (`variant`, `method`,
`label_fraction`, `seed`, `val_mIoU`, `cum_*_s*`); the statistics under them are plain
functions of arrays (formulas: docs/analysis.md).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

from analysis.load import TIME_COLUMNS
from model import arms

CONFIDENCE = 0.95
POWER = 0.8
REFERENCE_FRACTION = 1.0
# Two means closer than this count as equal (">=" in label savings and time-to-target).
TIE_TOLERANCE = 1e-9


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean: mean +- t * s / sqrt(n),
    with s the sample standard deviation (ddof=1) and t the (1+confidence)/2 quantile with n-1
    degrees of freedom. One value gives a NaN interval."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(sps.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def summarise(
    trials: pd.DataFrame, metric: str = "val_mIoU", confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """One row per (variant, label fraction): number of seeds, mean, sample std and t-interval
    of `metric` over seeds, and the mean of every final cumulative-time column."""
    rows = []
    for (method, variant, fraction), cell in trials.groupby(
        ["method", "variant", "label_fraction"], observed=True, sort=True
    ):
        mean, low, high = t_interval(cell[metric], confidence)
        row = {
            "variant": variant,
            "method": method,
            "label_fraction": fraction,
            "n_seeds": int(cell["seed"].nunique()),
            "mean": mean,
            "std": float(cell[metric].std(ddof=1)) if len(cell) > 1 else math.nan,
            "ci_low": low,
            "ci_high": high,
        }
        if "labelled_samples" in cell:
            row["labelled_samples"] = cell["labelled_samples"].mean()
        for column in TIME_COLUMNS:
            if column in cell:
                row[column] = cell[column].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def reference_variant(trials: pd.DataFrame) -> str | None:
    """The supervised configuration the savings compare against: plain `supervised` if present,
    else the first supervised variant that has a 100% label-fraction trial."""
    reference = arms.reference().name
    supervised = trials[
        (trials["method"] == reference) & np.isclose(trials["label_fraction"], REFERENCE_FRACTION)
    ]
    if supervised.empty:
        return None
    variants = sorted(supervised["variant"].unique())
    return reference if reference in variants else variants[0]


def pareto_front(
    summary: pd.DataFrame, time_column: str = "cum_wall_s_amortised", metric: str = "mean"
) -> pd.DataFrame:
    """Mark the configurations (rows of `summarise`) that no other configuration beats on both
    axes: less or equal time and higher or equal mean mIoU, one of them strictly. Returns the
    rows sorted by time with a boolean `on_front` column."""
    points = summary.dropna(subset=[time_column, metric]).sort_values(time_column).copy()
    t = points[time_column].to_numpy()
    m = points[metric].to_numpy()
    dominated = [
        bool(np.any((t <= t[i]) & (m >= m[i]) & ((t < t[i]) | (m > m[i]))))
        for i in range(len(points))
    ]
    points["on_front"] = ~np.array(dominated, dtype=bool)
    return points.reset_index(drop=True)


# Paired verdicts: the unit of evidence is the per-seed difference to a reference cell.

Cell = tuple[str, float]  # (variant, label fraction)


def parse_cell(text: str) -> Cell:
    """`supervised@1.0` -> ("supervised", 1.0): a configuration and its label fraction."""
    variant, sep, fraction = text.rpartition("@")
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if not sep or not variant or not 0 < value <= 1:
        raise ValueError(f"{text!r} is not VARIANT@FRACTION with 0 < FRACTION <= 1")
    return variant, value


def bootstrap_interval(
    values, confidence: float = CONFIDENCE, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `n_boot` resamples of the values with
    replacement (generator seeded with `seed`), the (1-confidence)/2 and (1+confidence)/2
    quantiles of their means. Fewer than two values give a NaN interval."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    low, high = np.quantile(x[draws].mean(axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def verdict(ci_low: float, ci_high: float) -> str:
    """`better` when the interval of the paired difference lies above 0, `worse` below 0, else
    (it contains 0, or there is no interval) `not distinguishable`."""
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "not distinguishable"


def paired_power(n: int, effect: float, sd: float, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided paired t-test with `n` pairs to detect a true mean difference
    `effect` when the differences have standard deviation `sd`: P(|T| > t(1-alpha/2, n-1)) with
    T noncentral t, n-1 degrees of freedom, noncentrality effect / sd * sqrt(n)."""
    if n < 2 or not sd > 0:
        return math.nan
    df, noncentrality = n - 1, abs(effect) / sd * math.sqrt(n)
    critical = sps.t.ppf(1 - alpha / 2, df)
    right_side = sps.nct.sf(critical, df, noncentrality)
    wrong_side = sps.nct.cdf(-critical, df, noncentrality)
    if np.isnan(right_side):  # scipy gives NaN far out in a tail, where it is 0 or 1
        right_side = float(noncentrality > critical)
    return float(right_side + np.nan_to_num(wrong_side))


def seeds_needed(
    effect: float,
    sd: float,
    power: float = POWER,
    alpha: float = 1 - CONFIDENCE,
    max_seeds: int = 1000,
) -> int | None:
    """Smallest number of seeds (pairs) whose paired t-test reaches `power` for `effect`; 2 when
    the differences do not vary, None when even `max_seeds` is not enough (or sd is unknown)."""
    if sd == 0:
        return 2
    if not np.isfinite(sd) or effect == 0:
        return None
    for n in range(2, max_seeds + 1):
        if paired_power(n, effect, sd, alpha) >= power:
            return n
    return None


def min_detectable_effect(
    n: int, sd: float, power: float = POWER, alpha: float = 1 - CONFIDENCE
) -> float:
    """Smallest true mean difference the paired t-test on `n` seeds detects with `power`, for
    differences with standard deviation `sd` (solves paired_power = power for the effect)."""
    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    high = 1.0
    while paired_power(n, high, 1.0, alpha) < power:
        high *= 2
    standardised = brentq(lambda d: paired_power(n, d, 1.0, alpha) - power, 0.0, high, xtol=1e-10)
    return float(standardised * sd)


def cell_trials(trials: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    variant, fraction = cell
    return trials[(trials["variant"] == variant) & np.isclose(trials["label_fraction"], fraction)]


def paired_differences(
    trials: pd.DataFrame, cell: Cell, reference: Cell, metric: str = "val_mIoU"
) -> pd.Series:
    """Per seed: `metric` of `cell` minus `metric` of `reference` (same seed: same label subset,
    same initialisation), on the seeds both have; indexed by seed, sorted."""
    mine = cell_trials(trials, cell).groupby("seed")[metric].mean()
    theirs = cell_trials(trials, reference).groupby("seed")[metric].mean()
    both = mine.index.intersection(theirs.index).sort_values()
    return (mine[both] - theirs[both]).rename(f"{metric}_diff")


def compared_cells(trials: pd.DataFrame, reference: Cell) -> list[tuple[str, str, float]]:
    """(method, variant, label fraction) of every cell but `reference`, in the frame's order
    of cells; none when the reference cell has no trials (nothing to pair with)."""
    if cell_trials(trials, reference).empty:
        return []
    cells = trials.groupby(["method", "variant", "label_fraction"], observed=True).size()
    return [
        (method, variant, fraction)
        for method, variant, fraction in cells.index
        if not (variant == reference[0] and np.isclose(fraction, reference[1]))
    ]


def default_reference(frame: pd.DataFrame) -> Cell:
    return reference_variant(frame) or arms.reference().name, REFERENCE_FRACTION


def paired_verdicts(
    trials: pd.DataFrame,
    reference: Cell | None = None,
    metric: str = "val_mIoU",
    confidence: float = CONFIDENCE,
    n_boot: int = 2000,
    seed: int = 0,
    power: float = POWER,
) -> pd.DataFrame:
    """One row per (variant, label fraction) other than `reference` (default: supervised at
    100% labels): the paired differences to the reference, their mean and sd, the Student-t and
    the percentile-bootstrap interval of the mean difference, the verdict word from the t
    interval, and `mde`, the smallest effect these seeds detect with `power` at
    alpha = 1 - confidence. Empty when the reference cell has no trials."""
    reference = reference or default_reference(trials)
    rows = []
    for method, variant, fraction in compared_cells(trials, reference):
        diffs = paired_differences(trials, (variant, fraction), reference, metric)
        mean, low, high = t_interval(diffs, confidence)
        boot_low, boot_high = bootstrap_interval(diffs, confidence, n_boot, seed)
        sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan
        rows.append(
            {
                "variant": variant,
                "method": method,
                "label_fraction": fraction,
                "reference": f"{reference[0]}@{reference[1]}",
                "n_seeds": len(diffs),
                "seeds": " ".join(str(s) for s in diffs.index),
                "diffs": " ".join(f"{d:+.4f}" for d in diffs),
                "mean_diff": mean,
                "sd_diff": sd,
                "t_low": low,
                "t_high": high,
                "boot_low": boot_low,
                "boot_high": boot_high,
                "verdict": verdict(low, high),
                "mde": min_detectable_effect(len(diffs), sd, power, 1 - confidence),
                "power": power,
            }
        )
    return pd.DataFrame(rows)
