"""Statistics over seeds, read from real MLflow stores with known numbers and checked against
values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_analysis_store import Trial, build_store

from analysis.load import analysed_trials, load_study
from analysis.stats import label_savings, pareto_front, summarise, t_interval

T_975_DF2 = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)
HALF_WIDTH_3_SEEDS = T_975_DF2 * 0.02 / math.sqrt(3)  # s = 0.02 for every standard cell


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    study = load_study("toy", build_store(tmp_path_factory.mktemp("stats_store")), progress=False)
    return analysed_trials(study.trials)


def test_t_interval_matches_the_hand_computed_interval():
    mean, low, high = t_interval([0.30, 0.32, 0.34])
    assert mean == pytest.approx(0.32)
    assert low == pytest.approx(0.32 - HALF_WIDTH_3_SEEDS)
    assert high == pytest.approx(0.32 + HALF_WIDTH_3_SEEDS)


def test_t_interval_of_one_seed_has_no_width():
    mean, low, high = t_interval([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)


def test_summary_per_method_and_fraction_has_mean_and_t_interval(trials):
    summary = summarise(trials)
    assert len(summary) == 8
    row = summary.query("variant == 'pretrained' and label_fraction == 0.5").iloc[0]
    assert row["n_seeds"] == 3
    assert row["mean"] == pytest.approx(0.63)
    assert row["std"] == pytest.approx(0.02)
    assert row["ci_low"] == pytest.approx(0.63 - HALF_WIDTH_3_SEEDS)  # 0.5803
    assert row["ci_high"] == pytest.approx(0.63 + HALF_WIDTH_3_SEEDS)
    assert row["cum_wall_s_amortised"] == pytest.approx(240.0)


def test_label_savings_point_interval_and_time_ratio(trials):
    # Supervised 100%: mean 0.62. Pretrained means: 10% 0.47, 25% 0.57, 50% 0.63 -> 50%.
    # Every seed replicate shifts both sides alike (paired seeds), so the interval is [50%, 50%].
    result = label_savings(trials, n_boot=1000, seed=0)
    assert result.reference_mIoU == pytest.approx(0.62)
    assert result.fraction == 0.5
    assert (result.ci_low, result.ci_high) == (0.5, 0.5)
    assert result.mIoU_at_fraction == pytest.approx(0.63)
    # Time at that point: (165 + 300) / 300 with all pretraining, (165 + 75) / 300 amortised.
    assert result.time_ratio_incl_pretrain == pytest.approx(1.55)
    assert result.time_ratio_amortised == pytest.approx(0.8)
    assert result.reached_share == 1.0


@pytest.fixture(scope="module")
def two_seed_trials(tmp_path_factory):
    """Seeds 0 and 1 with the supervised 100% reference at 0.60 for both. A bootstrap replicate
    draws two seeds: {0,0} (p = 1/4) reaches it at 25% (0.62), {0,1} (p = 1/2) at 50%
    (mean 0.605), {1,1} (p = 1/4) never (1.0 gives 0.59)."""
    pretrained = {0.25: (0.62, 0.56), 0.5: (0.63, 0.58), 1.0: (0.64, 0.59)}
    trials = [Trial("supervised", 1.0, s, 0.60) for s in (0, 1)]
    trials += [
        Trial("pretrained", f, s, values[s]) for f, values in pretrained.items() for s in (0, 1)
    ]
    study = load_study(
        "toy", build_store(tmp_path_factory.mktemp("two_seeds"), trials), progress=False
    )
    return analysed_trials(study.trials)


def test_label_savings_bootstrap_interval_matches_the_enumerated_distribution(two_seed_trials):
    result = label_savings(two_seed_trials, n_boot=4000, seed=0)
    assert result.fraction == 0.5  # all seeds: 0.605 >= 0.60 at 50%, 0.59 < 0.60 at 25%
    # 95%: the 2.5% quantile falls in the {0,0} quarter (25%), the 97.5% one in the {1,1}
    # quarter (not reached).
    assert (result.ci_low, result.ci_high) == (0.25, None)
    assert result.reached_share == pytest.approx(0.75, abs=0.03)
    # 40%: quantiles 0.3 and 0.7 both fall in the {0,1} half.
    narrow = label_savings(two_seed_trials, confidence=0.4, n_boot=4000, seed=0)
    assert (narrow.ci_low, narrow.ci_high) == (0.5, 0.5)


def test_label_savings_bootstrap_is_reproducible_for_a_seed(two_seed_trials):
    first = label_savings(two_seed_trials, n_boot=500, seed=7)
    again = label_savings(two_seed_trials, n_boot=500, seed=7)
    assert first == again


def test_label_savings_not_reached_has_no_fraction_or_time_ratio(tmp_path):
    trials = [Trial("supervised", 1.0, s, 0.60) for s in (0, 1)]
    trials += [Trial("pretrained", 0.5, s, 0.50) for s in (0, 1)]
    study = load_study("toy", build_store(tmp_path, trials), progress=False)
    result = label_savings(analysed_trials(study.trials), n_boot=200)
    assert result.fraction is None and result.ci_low is None and result.ci_high is None
    assert result.time_ratio_amortised is None and result.reached_share == 0.0


def test_label_savings_needs_a_supervised_100_percent_reference(trials):
    assert label_savings(trials[trials["label_fraction"] < 1.0]) is None


def test_pareto_front_with_amortised_pretraining(trials):
    # (time s, mIoU): sup 57/.32, 97.5/.42, 165/.52, 300/.62; pre 132/.47, 172.5/.57,
    # 240/.63, 375/.68. Only supervised 100% is beaten (by pretrained 50%: faster and better).
    front = pareto_front(summarise(trials), "cum_wall_s_amortised")
    off = front[~front["on_front"]]
    assert list(zip(off["variant"], off["label_fraction"], strict=True)) == [("supervised", 1.0)]
    assert np.all(np.diff(front["cum_wall_s_amortised"]) >= 0)


def test_pareto_front_with_full_pretraining(trials):
    # Pretrained times grow by 300 s: 357/.47 and 397.5/.57 are beaten by supervised 100%.
    front = pareto_front(summarise(trials), "cum_wall_s_incl_pretrain")
    off = front[~front["on_front"]]
    assert sorted(zip(off["variant"], off["label_fraction"], strict=True)) == [
        ("pretrained", 0.1),
        ("pretrained", 0.25),
    ]
