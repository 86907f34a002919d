"""Statistics over seeds: t-intervals per (configuration, label fraction), paired verdicts
against a reference cell with the power of the paired test, label savings with a seed bootstrap,
time-to-target on the mean curves, and the time-vs-mIoU Pareto front.

The table builders take `analysis.load`'s one-row-per-trial frame (`variant`, `method`,
`label_fraction`, `seed`, `val_mIoU`, `cum_*_s*`) or, for time-to-target, its per-epoch frame;
the statistics under them are plain functions of arrays (formulas: docs/analysis.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

from analysis.load import TIME_ACCOUNTING, TIME_COLUMNS
from model import arms

CONFIDENCE = 0.95
POWER = 0.8
REFERENCE_FRACTION = 1.0
# Time accountings of time-to-target, in report order, with their labels.
TARGET_ACCOUNTINGS = {"incl_pretrain": "incl. full pretraining",
                      "amortised": "incl. amortised pretraining",
                      "own": "fine-tuning only"}  # fmt: skip
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
    reference = arms.reference().name
    supervised = trials[
        (trials["method"] == reference) & np.isclose(trials["label_fraction"], REFERENCE_FRACTION)
    ]
    if supervised.empty:
        return None
    variants = sorted(supervised["variant"].unique())
    return reference if reference in variants else variants[0]


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
    variant: str | None = None,
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
    if variant is None:  # the first arm under test (model.arms) that the study ran
        variant = next((m for m in arms.methods_under_test() if (trials.method == m).any()), "")
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
    """`label_savings` for every variant of an arm under test (model.arms), one row each."""
    rows, tested = [], trials.method.isin(arms.methods_under_test())
    for variant in sorted(trials.loc[tested, "variant"].unique()):
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


def _cell(trials: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    variant, fraction = cell
    return trials[(trials["variant"] == variant) & np.isclose(trials["label_fraction"], fraction)]


def paired_differences(
    trials: pd.DataFrame, cell: Cell, reference: Cell, metric: str = "val_mIoU"
) -> pd.Series:
    """Per seed: `metric` of `cell` minus `metric` of `reference` (same seed: same label subset,
    same initialisation), on the seeds both have; indexed by seed, sorted."""
    mine = _cell(trials, cell).groupby("seed")[metric].mean()
    theirs = _cell(trials, reference).groupby("seed")[metric].mean()
    both = mine.index.intersection(theirs.index).sort_values()
    return (mine[both] - theirs[both]).rename(f"{metric}_diff")


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
    if not _cell(trials, reference).empty:
        cells = trials.groupby(["method", "variant", "label_fraction"], observed=True).size()
        for method, variant, fraction in cells.index:
            if variant == reference[0] and np.isclose(fraction, reference[1]):
                continue
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


# Time-to-target: when does an arm's mean curve first reach a target mIoU?


def crossing_times(times, values, target: float) -> np.ndarray:
    """Rows of `times` and `values` (curves x epochs, epochs in order) -> the time each curve
    first reaches `target`: the epoch's time if the first epoch at or above it is the first
    epoch, else linearly interpolated between that epoch and the one before; NaN where the curve
    never reaches it."""
    times, values = np.atleast_2d(times).astype(float), np.atleast_2d(values).astype(float)
    reached = values >= target - _TIE_TOLERANCE  # NaN compares False
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
    last = _cell(epochs, cell).sort_values("epoch").groupby("trial_id", observed=True).tail(1)
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
