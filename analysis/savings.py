"""Label savings: the smallest label fraction at which an arm's mean mIoU over seeds reaches the
supervised 100% mean, with a seed bootstrap and the time ratio there (formulas:
docs/analysis.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from analysis.stats import CONFIDENCE, REFERENCE_FRACTION, TIE_TOLERANCE, reference_variant
from model import arms


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
    reached = means[:, 1:] >= means[:, :1] - TIE_TOLERANCE  # NaN compares False
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
