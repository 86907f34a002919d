"""Statistics over seeds: t-intervals per (configuration, label fraction), label savings with a
seed bootstrap, and the time-vs-mIoU Pareto front.

All functions take the one-row-per-trial frame of `analysis.load` (usually filtered with
`analysed_trials`): columns `variant`, `method`, `label_fraction`, `seed`, `val_mIoU` and the
`cum_*_s*` time columns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.load import TIME_COLUMNS

CONFIDENCE = 0.95
REFERENCE_FRACTION = 1.0
# Two means closer than this count as equal (">=" in the label-savings definition).
_TIE_TOLERANCE = 1e-9


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
    supervised = trials[
        (trials["method"] == "supervised")
        & np.isclose(trials["label_fraction"], REFERENCE_FRACTION)
    ]
    if supervised.empty:
        return None
    variants = sorted(supervised["variant"].unique())
    return "supervised" if "supervised" in variants else variants[0]


@dataclass
class LabelSavings:
    """Smallest label fraction at which `variant`'s mean mIoU over seeds reaches the supervised
    100% mean, with a percentile bootstrap interval over seeds and the time ratio there.

    `fraction` (and either CI bound) is None when the level is not reached at any tested
    fraction. `time_ratio_*` = pretrained mean final time at `fraction` (incl. all of its
    pretraining, or its amortised share) / supervised 100% mean final time.
    """

    variant: str
    reference_variant: str
    reference_mIoU: float
    fraction: float | None
    ci_low: float | None
    ci_high: float | None
    mIoU_at_fraction: float | None
    time_ratio_incl_pretrain: float | None
    time_ratio_amortised: float | None
    reached_share: float  # share of bootstrap replicates in which the level is reached at all
    n_seeds: int
    n_boot: int
    confidence: float
    seed: int
    clock: str

    def as_dict(self) -> dict:
        return asdict(self)


def _seed_matrix(cells: list[pd.DataFrame], seeds: list, metric: str) -> np.ndarray:
    matrix = np.full((len(cells), len(seeds)), np.nan)
    index = {s: i for i, s in enumerate(seeds)}
    for row, cell in enumerate(cells):
        for seed, value in cell.groupby("seed")[metric].mean().items():
            matrix[row, index[seed]] = value
    return matrix


def _first_reaching(means: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """means: (replicates, 1 + n_fractions), column 0 the reference. -> smallest fraction per
    replicate whose mean reaches the reference (inf where none does)."""
    reached = means[:, 1:] >= means[:, :1] - _TIE_TOLERANCE  # NaN compares False
    first = np.argmax(reached, axis=1)
    return np.where(reached.any(axis=1), fractions[first], np.inf)


def label_savings(
    trials: pd.DataFrame,
    variant: str = "pretrained",
    metric: str = "val_mIoU",
    confidence: float = CONFIDENCE,
    n_boot: int = 2000,
    seed: int = 0,
    clock: str = "wall",
) -> LabelSavings | None:
    """Label savings of `variant` against the supervised 100% reference; None when either side
    has no trials.

    Bootstrap: the resampling unit is the seed, one replicate of the whole study (its nested
    label subsets, its pretraining, its initialisation). Each of `n_boot` replicates draws as many
    seeds as there are, with replacement, from a generator seeded with `seed`; the same draw
    weights every (configuration, fraction) cell, keeping the pairing between the supervised
    reference and the pretrained cells that share a seed. A cell's replicate mean weights its
    trials by how often their seed was drawn. The interval is the percentile interval of the
    replicates' savings fraction (inverted-CDF quantiles, so bounds are tested fractions);
    a bound is None where the replicates there never reach the reference.
    """
    ref_variant = reference_variant(trials)
    mine = trials[trials["variant"] == variant]
    if ref_variant is None or mine.empty:
        return None
    reference = trials[
        (trials["variant"] == ref_variant)
        & np.isclose(trials["label_fraction"], REFERENCE_FRACTION)
    ]
    fractions = np.array(sorted(mine["label_fraction"].unique()), dtype=float)
    cells = [reference] + [mine[np.isclose(mine["label_fraction"], f)] for f in fractions]
    seeds = sorted(pd.concat(cells)["seed"].dropna().unique())
    matrix = _seed_matrix(cells, seeds, metric)
    present = ~np.isnan(matrix)
    values = np.nan_to_num(matrix)

    def means(weights: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ values.T) / (weights @ present.T)

    point = _first_reaching(means(np.ones((1, len(seeds)))), fractions)[0]

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    weights = np.zeros((n_boot, len(seeds)))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    replicates = _first_reaching(means(weights), fractions)
    alpha = 1 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")

    def finite(x: float) -> float | None:
        return None if not np.isfinite(x) else float(x)

    ref_mean = float(reference[metric].mean())
    result = LabelSavings(
        variant=variant,
        reference_variant=ref_variant,
        reference_mIoU=ref_mean,
        fraction=finite(point),
        ci_low=finite(low),
        ci_high=finite(high),
        mIoU_at_fraction=None,
        time_ratio_incl_pretrain=None,
        time_ratio_amortised=None,
        reached_share=float(np.isfinite(replicates).mean()),
        n_seeds=len(seeds),
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
        clock=clock,
    )
    if result.fraction is not None:
        at = mine[np.isclose(mine["label_fraction"], result.fraction)]
        result.mIoU_at_fraction = float(at[metric].mean())
        ref_time = reference[f"cum_{clock}_s"].mean()
        for accounting in ("incl_pretrain", "amortised"):
            ratio = at[f"cum_{clock}_s_{accounting}"].mean() / ref_time if ref_time else math.nan
            setattr(result, f"time_ratio_{accounting}", None if np.isnan(ratio) else float(ratio))
    return result


def label_savings_table(trials: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """`label_savings` for every pretrained variant, one row each."""
    rows = []
    for variant in sorted(trials.loc[trials["method"] == "pretrained", "variant"].unique()):
        result = label_savings(trials, variant=variant, **kwargs)
        if result is not None:
            rows.append(result.as_dict())
    return pd.DataFrame(rows)


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
