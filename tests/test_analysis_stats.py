"""Statistics over seeds, read from real MLflow stores with known numbers (or from small frames
the tests make) and checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_analysis_store import Trial, build_store

from analysis.load import analysed_trials, load_study
from analysis.savings import label_savings
from analysis.stats import (
    bootstrap_interval,
    min_detectable_effect,
    paired_power,
    paired_verdicts,
    pareto_front,
    parse_cell,
    seeds_needed,
    summarise,
    t_interval,
)
from analysis.target_time import crossing_time, time_to_target

T_975_DF2 = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)
HALF_WIDTH_3_SEEDS = T_975_DF2 * 0.02 / math.sqrt(3)  # s = 0.02 for every standard cell


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return load_study("toy", build_store(tmp_path_factory.mktemp("stats_store")), progress=False)


@pytest.fixture(scope="module")
def trials(study):
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


# Paired verdicts: per-seed differences to supervised@1.0 (finals 0.60, 0.62, 0.64 for seeds
# 0, 1, 2). Each made-up cell below is reference + these differences.
HEADLINE_DIFFS = (0.031, -0.013, 0.023)  # pretrained@0.5 of the README's headline study
BETTER_DIFFS = (0.02, 0.03, 0.04)
WORSE_DIFFS = (-0.10, -0.12, -0.08)
REFERENCE_FINALS = (0.60, 0.62, 0.64)


def final_frame(cells: dict[tuple[str, float], tuple[float, ...]]) -> pd.DataFrame:
    """A one-row-per-trial frame: for each (variant, fraction), one final val_mIoU per seed."""
    rows = [
        {"method": v, "variant": v, "label_fraction": f, "seed": s, "val_mIoU": value}
        for (v, f), values in cells.items()
        for s, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def plus(diffs: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(r + d for r, d in zip(REFERENCE_FINALS, diffs, strict=True))


@pytest.fixture(scope="module")
def verdicts() -> pd.DataFrame:
    frame = final_frame(
        {
            ("supervised", 1.0): REFERENCE_FINALS,
            ("pretrained", 0.5): plus(HEADLINE_DIFFS),
            ("pretrained", 1.0): plus(BETTER_DIFFS),
            ("supervised", 0.5): plus(WORSE_DIFFS),
        }
    )
    return paired_verdicts(frame.sample(frac=1.0, random_state=1), n_boot=2000, seed=0)


def hand_t_interval(diffs: tuple[float, ...]) -> tuple[float, float, float]:
    """mean +- t(0.975, n-1) * s / sqrt(n), with s = sqrt(sum (d - mean)^2 / (n - 1))."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T_975_DF2 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict_row(verdicts: pd.DataFrame, variant: str, fraction: float) -> pd.Series:
    here = verdicts[(verdicts["variant"] == variant) & (verdicts["label_fraction"] == fraction)]
    assert len(here) == 1
    return here.iloc[0]


def test_paired_verdict_of_the_headline_is_not_distinguishable(verdicts):
    # mean 0.0137, s = 0.02344, half width 4.303 * 0.02344 / sqrt(3) = 0.0582.
    row = verdict_row(verdicts, "pretrained", 0.5)
    mean, low, high = hand_t_interval(HEADLINE_DIFFS)
    assert row["mean_diff"] == pytest.approx(mean) == pytest.approx(0.0137, abs=5e-5)
    assert (row["t_low"], row["t_high"]) == (pytest.approx(low), pytest.approx(high))
    assert (round(low, 3), round(high, 3)) == (-0.045, 0.072)
    assert row["verdict"] == "not distinguishable"
    assert row["diffs"] == "+0.0310 -0.0130 +0.0230" and row["n_seeds"] == 3


def test_paired_verdict_is_better_when_the_interval_is_above_zero(verdicts):
    # mean 0.03, s = 0.01: 0.03 -+ 4.303 * 0.01 / sqrt(3) = [0.0052, 0.0548].
    row = verdict_row(verdicts, "pretrained", 1.0)
    mean, low, high = hand_t_interval(BETTER_DIFFS)
    assert (row["mean_diff"], row["t_low"], row["t_high"]) == pytest.approx((mean, low, high))
    assert low == pytest.approx(0.0052, abs=1e-4)
    assert row["verdict"] == "better"


def test_paired_verdict_is_worse_when_the_interval_is_below_zero(verdicts):
    # mean -0.10, s = 0.02: -0.10 -+ 0.0497 = [-0.1497, -0.0503].
    row = verdict_row(verdicts, "supervised", 0.5)
    mean, low, high = hand_t_interval(WORSE_DIFFS)
    assert (row["mean_diff"], row["t_low"], row["t_high"]) == pytest.approx((mean, low, high))
    assert high == pytest.approx(-0.0503, abs=1e-4)
    assert row["verdict"] == "worse"


def test_paired_verdicts_leave_out_the_reference_and_carry_the_detectable_effect(verdicts):
    assert len(verdicts) == 3
    assert not ((verdicts["variant"] == "supervised") & (verdicts["label_fraction"] == 1.0)).any()
    row = verdict_row(verdicts, "pretrained", 1.0)
    assert row["mde"] == pytest.approx(min_detectable_effect(3, 0.01))
    assert paired_power(3, row["mde"], row["sd_diff"]) == pytest.approx(0.8)


def test_paired_differences_pair_by_seed_and_drop_unpaired_seeds():
    # Seed 3 has no reference trial: it is not evidence. Rows in any order.
    frame = final_frame({("supervised", 1.0): (0.6, 0.6, 0.6), ("pretrained", 0.5): (0.5,) * 4})
    frame.loc[frame["variant"] == "pretrained", "val_mIoU"] = [0.61, 0.62, 0.63, 0.99]
    row = paired_verdicts(frame.iloc[::-1]).iloc[0]
    assert row["n_seeds"] == 3 and row["seeds"] == "0 1 2"
    assert row["mean_diff"] == pytest.approx(0.02)


def test_bootstrap_interval_of_three_seeds_spans_their_extremes():
    # 27 equally likely resamples of 3 values; the all-smallest one alone has p = 1/27 = 3.7%,
    # above 2.5%, so the 2.5% quantile is the smallest value (and the 97.5% one the largest).
    low, high = bootstrap_interval(HEADLINE_DIFFS, n_boot=4000, seed=0)
    assert (low, high) == (pytest.approx(-0.013), pytest.approx(0.031))
    # Two values 0 and 0.1: resample means 0 (p 1/4), 0.05 (1/2), 0.1 (1/4); a 40% interval
    # (quantiles 0.3 and 0.7) lies inside the middle half.
    assert bootstrap_interval([0.0, 0.1], 0.4, n_boot=4000) == pytest.approx((0.05, 0.05))
    assert bootstrap_interval(HEADLINE_DIFFS, n_boot=50, seed=3) == bootstrap_interval(
        HEADLINE_DIFFS, n_boot=50, seed=3
    )


def test_verdict_table_has_a_seeded_bootstrap_interval(verdicts):
    row = verdict_row(verdicts, "pretrained", 0.5)
    assert (row["boot_low"], row["boot_high"]) == (pytest.approx(-0.013), pytest.approx(0.031))


def test_cell_parses_from_variant_at_fraction():
    assert parse_cell("supervised@1.0") == ("supervised", 1.0)
    assert parse_cell("pretrained (w_temporal=0.5)@0.25") == ("pretrained (w_temporal=0.5)", 0.25)
    for bad in ("supervised", "supervised@", "@0.5", "supervised@2"):
        with pytest.raises(ValueError):
            parse_cell(bad)


# Power of the two-sided paired t-test. Hand check for d = effect / sd = 1, alpha 0.05, 80%:
# the normal approximation with Guenther's correction gives n = ((z_0.975 + z_0.8) / d)^2 +
# z_0.975^2 / 2 = (1.960 + 0.842)^2 + 1.92 = 9.77 -> 10 (G*Power and power tables: n = 10,
# power 0.803). scipy: 1 - nct.cdf(t.ppf(0.975, 9), 9, sqrt(10)) + nct.cdf(-t.ppf(0.975, 9), 9,
# sqrt(10)) = 0.8031; the same at n = 9 (df 8, noncentrality 3) = 0.7480.


def test_paired_power_at_ten_seeds_for_a_one_sd_effect():
    assert paired_power(10, 0.025, 0.025) == pytest.approx(0.8031, abs=1e-4)
    assert paired_power(9, 1.0, 1.0) == pytest.approx(0.7480, abs=1e-4)


def test_seeds_needed_for_a_one_sd_effect_is_ten():
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(0.025, 0.025, power=0.8, alpha=0.05) == 10
    assert seeds_needed(0.025, 0.0) == 2  # differences that do not vary
    assert seeds_needed(0.001, 1.0, max_seeds=50) is None


def test_min_detectable_effect_inverts_the_power():
    # Ten seeds detect a one-sd effect with power 0.803, so the 80% effect is just below 1 sd.
    assert min_detectable_effect(10, 0.02) == pytest.approx(0.02 * 0.9960, abs=1e-5)
    assert paired_power(3, min_detectable_effect(3, 0.02), 0.02) == pytest.approx(0.8)
    assert math.isnan(min_detectable_effect(1, 0.02))


# Time to target on made-up mean curves: mIoU and cumulative time per epoch.


def test_time_to_target_reached_at_an_epoch():
    assert crossing_time([10, 20, 30], [0.2, 0.5, 0.6], 0.5) == 20.0
    assert crossing_time([10, 20, 30], [0.6, 0.7, 0.8], 0.5) == 10.0  # the first epoch


def test_time_to_target_between_epochs_is_interpolated():
    # 0.5 lies between 0.4 (20 s) and 0.6 (30 s): 20 + (0.5 - 0.4) / (0.6 - 0.4) * 10 = 25 s.
    assert crossing_time([10, 20, 30], [0.2, 0.4, 0.6], 0.5) == pytest.approx(25.0)
    # The first crossing counts, even if the curve drops again later.
    assert crossing_time([10, 20, 30], [0.2, 0.6, 0.3], 0.5) == pytest.approx(17.5)


def test_time_to_target_never_reached_is_nan():
    assert math.isnan(crossing_time([10, 20, 30], [0.2, 0.4, 0.6], 0.7))


CURVES = {  # (variant, fraction) -> per seed: (mIoU per epoch, fine-tuning time per epoch)
    ("supervised", 1.0): [((0.2, 0.4, 0.6), (10, 20, 30)), ((0.2, 0.4, 0.6), (10, 20, 30))],
    ("pretrained", 0.5): [((0.3, 0.5, 0.7), (5, 10, 15)), ((0.3, 0.6, 0.7), (7, 12, 17))],
    ("pretrained", 1.0): [((0.4, 0.6, 0.8), (8, 16, 24)), ((0.4, 0.6, 0.8), (8, 18, 24))],
    ("pretrained", 0.1): [((0.1, 0.2, 0.3), (1, 2, 3)), ((0.1, 0.2, 0.3), (1, 2, 3))],
}
PRETRAIN_S, SHARE_S = 100.0, 25.0  # each seed's pretraining, and one trial's amortised share


@pytest.fixture(scope="module")
def to_target() -> pd.DataFrame:
    rows = []
    for (variant, fraction), seeds in CURVES.items():
        extra = (PRETRAIN_S, SHARE_S) if variant == "pretrained" else (0.0, 0.0)
        for seed, (mious, times) in enumerate(seeds):
            for epoch, (miou, t) in enumerate(zip(mious, times, strict=True), start=1):
                rows.append(
                    {
                        "trial_id": f"{variant}-{fraction}-{seed}",
                        "method": variant,
                        "variant": variant,
                        "label_fraction": fraction,
                        "seed": seed,
                        "epoch": epoch,
                        "val_mIoU": miou,
                        "cum_wall_s": float(t),
                        "cum_wall_s_incl_pretrain": t + extra[0],
                        "cum_wall_s_amortised": t + extra[1],
                    }
                )
    return time_to_target(pd.DataFrame(rows), n_boot=4000, seed=0)


def target_row(table: pd.DataFrame, variant: str, fraction: float, accounting: str) -> pd.Series:
    here = table[
        (table["variant"] == variant)
        & (table["label_fraction"] == fraction)
        & (table["accounting"] == accounting)
    ]
    assert len(here) == 1
    return here.iloc[0]


def test_time_to_target_of_the_mean_curve_with_three_clocks(to_target):
    # Target: supervised@1.0's final mean, 0.6, reached at its last epoch (30 s). pretrained@0.5:
    # mean curve 0.30, 0.55, 0.70 at mean times 6, 11, 16 s: 11 + (0.6 - 0.55) / 0.15 * 5 =
    # 12.667 s fine-tuning; +100 s with its whole pretraining, +25 s amortised.
    assert to_target["target"].tolist() == pytest.approx([0.6] * len(to_target))
    reference = target_row(to_target, "supervised", 1.0, "incl_pretrain")
    assert reference["time_s"] == pytest.approx(30.0) and reference["ratio"] == pytest.approx(1)
    for accounting, extra in (("own", 0.0), ("incl_pretrain", 100.0), ("amortised", 25.0)):
        row = target_row(to_target, "pretrained", 0.5, accounting)
        assert row["reached"]
        assert row["time_s"] == pytest.approx(12.6667 + extra, abs=1e-4)
        assert row["ratio"] == pytest.approx((12.6667 + extra) / 30.0, abs=1e-5)


def test_time_to_target_exactly_at_an_epoch_takes_that_epochs_mean_time(to_target):
    # pretrained@1.0 reaches 0.6 at epoch 2, where the seeds' times are 16 and 18 s.
    assert target_row(to_target, "pretrained", 1.0, "own")["time_s"] == pytest.approx(17.0)


def test_time_to_target_not_reached_is_flagged(to_target):
    row = target_row(to_target, "pretrained", 0.1, "amortised")
    assert not row["reached"] and math.isnan(row["time_s"]) and math.isnan(row["ratio"])
    assert row["never_share"] == 1.0 and math.isnan(row["ci_low_s"])


def test_time_to_target_bootstrap_over_seeds(to_target):
    # Two seeds: resample {0,0} (p 1/4) crosses at 10 + 0.5 * 5 = 12.5 s, {1,1} (1/4) at its
    # epoch 2, 12 s, {0,1} (1/2) at 12.667 s: the 2.5% and 97.5% quantiles are 12 and 12.667.
    row = target_row(to_target, "pretrained", 0.5, "own")
    assert row["ci_low_s"] == pytest.approx(12.0)
    assert row["ci_high_s"] == pytest.approx(12.6667, abs=1e-4)
    assert row["never_share"] == 0.0


def test_time_to_target_share_of_resamples_never_reaching(study, trials):
    # Standard store, target 0.62: pretrained@0.5 finals 0.61, 0.63, 0.65; a resample of three
    # seeds misses the target when its mean final is below 0.62: (0.61, 0.61, 0.61) and the 3
    # orders of (0.61, 0.61, 0.63), 4 of 27 resamples; its upper bound is then not reached.
    epochs = study.epochs[study.epochs["trial_id"].isin(trials["trial_id"])]
    table = time_to_target(epochs, n_boot=4000, seed=0)
    row = target_row(table, "pretrained", 0.5, "own")
    assert row["never_share"] == pytest.approx(4 / 27, abs=0.02)
    assert math.isnan(row["ci_high_s"])
    # Mean curve: 0.42 at 110 s, 0.63 at 165 s: 110 + (0.62 - 0.42) / 0.21 * 55 = 162.38 s.
    assert row["time_s"] == pytest.approx(110 + 0.2 / 0.21 * 55)
