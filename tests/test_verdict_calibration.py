"""The verdict machinery, checked by simulation: on paired studies with a known effect and the
headline study's spread, the 95 % t-intervals that `paired_verdicts` reports cover the true
effect about 95 % of the time, and with no effect the verdict says "better" or "worse" in at
most 5 % of studies.

Spread: the headline's paired differences (docs/results/label_fraction/verdicts.md, 10 seeds)
have sds of 0.020-0.029 mIoU; 0.025 is used, with a 2.5 pp effect (the paper's claim). Differences
are drawn normal and, as a check that the t-interval does not lean on normality at 10 seeds,
from a Student t with 5 degrees of freedom scaled to the same sd.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.stats import paired_verdicts, t_interval, verdict

STUDIES, SEEDS, SD, EFFECT = 2000, 10, 0.025, 0.025


def _differences(kind: str, effect: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        noise = rng.normal(0.0, SD, (STUDIES, SEEDS))
    else:  # Student t, 5 df, scaled to sd SD (var of t5 is 5/3)
        noise = rng.standard_t(5, (STUDIES, SEEDS)) * SD / np.sqrt(5 / 3)
    return effect + noise


def _intervals(differences: np.ndarray) -> list[tuple[float, float, float]]:
    return [t_interval(row) for row in differences]


@pytest.mark.parametrize("kind", ["normal", "t5"])
def test_paired_t_intervals_cover_a_known_effect_95_percent_of_the_time(kind):
    rng = np.random.default_rng(2026)
    intervals = _intervals(_differences(kind, EFFECT, rng))
    covered = np.mean([low <= EFFECT <= high for _, low, high in intervals])
    assert 0.93 <= covered <= 0.97, covered


@pytest.mark.parametrize("kind", ["normal", "t5"])
def test_with_no_effect_the_verdict_is_better_or_worse_in_at_most_5_percent(kind):
    rng = np.random.default_rng(7)
    words = [verdict(low, high) for _, low, high in _intervals(_differences(kind, 0.0, rng))]
    decided = np.mean([word != "not distinguishable" for word in words])
    assert decided <= 0.05, decided


def test_paired_verdicts_reports_the_interval_and_word_checked_above():
    # The table's t-interval and verdict are the functions simulated above, on the per-seed
    # differences to the reference: one simulated study through the real table builder.
    rng = np.random.default_rng(3)
    reference = rng.normal(0.15, 0.02, SEEDS)
    diffs = _differences("normal", EFFECT, rng)[0]
    trials = pd.DataFrame(
        {
            "method": ["supervised"] * SEEDS + ["pretrained"] * SEEDS,
            "variant": ["supervised"] * SEEDS + ["pretrained"] * SEEDS,
            "label_fraction": [1.0] * SEEDS + [0.5] * SEEDS,
            "seed": list(range(SEEDS)) * 2,
            "val_mIoU": np.concatenate([reference, reference + diffs]),
        }
    )
    row = paired_verdicts(trials, ("supervised", 1.0), n_boot=10).iloc[0]
    mean, low, high = t_interval(diffs)
    assert (row.mean_diff, row.t_low, row.t_high) == pytest.approx((mean, low, high))
    assert row.verdict == verdict(low, high)
