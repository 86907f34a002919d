"""The group-sequential design over seeds (analysis.sequential): spending functions, boundaries
against published values, and its operating characteristics by simulation (no training).

The simulated setting is the headline's: per-seed paired differences with sd 0.025, a true
effect of 0.025 (2.5 pp mIoU), rounds of 3, 5, 7, 9 and 10 seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from analysis.sequential import (
    SequentialDesign,
    expected_seeds,
    look,
    simulate,
    spending,
    t_boundaries,
    z_boundaries,
)
from analysis.stats import paired_power

SD, EFFECT, ALPHA = 0.025, 0.025, 0.05
DESIGN = SequentialDesign(first=3, step=2, max=10, alpha=ALPHA)
STUDIES = 1_000_000  # Monte Carlo standard error of a 5 % rate: 0.0002
FIVE_LOOKS = np.arange(1, 6) / 5


@pytest.fixture(scope="module")
def no_effect():
    return simulate(DESIGN, 0.0, SD, STUDIES, seed=1)


@pytest.fixture(scope="module")
def with_effect():
    return simulate(DESIGN, EFFECT, SD, STUDIES, seed=2)


@pytest.mark.parametrize("kind", ["obrien_fleming", "pocock"])
def test_spending_reaches_alpha_at_full_information_and_increases(kind):
    t = np.linspace(0, 1, 101)
    spent = spending(t, ALPHA, kind)
    assert spent[0] == 0
    assert spent[-1] == pytest.approx(ALPHA, rel=1e-12)
    assert np.all(np.diff(spent) > 0)


def test_design_refuses_a_first_round_without_a_spread():
    with pytest.raises(ValueError, match="first >= 2"):
        SequentialDesign(first=1, step=2, max=10)


def test_rounds_step_from_first_and_end_exactly_at_max():
    assert DESIGN.rounds() == (3, 5, 7, 9, 10)
    assert SequentialDesign(first=3, step=2, max=11).rounds() == (3, 5, 7, 9, 11)
    assert SequentialDesign(first=5, step=5, max=5).rounds() == (5,)


def test_obrien_fleming_boundaries_match_published_values():
    # Two-sided alpha 0.05, Lan-DeMets OBF-type (gsDesign sfLDOF, ldbounds): 5 equal looks, and
    # 3 equal looks (gsDesign: 3.7103, 2.5114, 1.9930).
    five = z_boundaries(FIVE_LOOKS, ALPHA, "obrien_fleming")
    three = z_boundaries([1 / 3, 2 / 3, 1], ALPHA, "obrien_fleming")
    assert five == pytest.approx([4.877, 3.357, 2.680, 2.290, 2.031], abs=0.005)
    assert three == pytest.approx([3.710, 2.511, 1.993], abs=0.005)


def test_pocock_boundaries_match_published_values():
    # Lan-DeMets Pocock-type, 5 equal looks, two-sided 0.05: 2.438, 2.427, 2.410, 2.397 as the
    # issue quotes them (gsDesign sfLDPocock); the last, 2.386, derived by this integration and
    # confirmed by the Monte Carlo spending test below.
    bounds = z_boundaries(FIVE_LOOKS, ALPHA, "pocock")
    assert bounds == pytest.approx([2.438, 2.427, 2.410, 2.397, 2.386], abs=0.005)


@pytest.mark.parametrize("kind", ["obrien_fleming", "pocock"])
def test_boundaries_spend_what_the_spending_function_says(kind):
    # Independent of the integration: Brownian paths at the looks, z = B(t) / sqrt(t); the
    # two-sided design spends alpha/2 a side.
    paths = np.random.default_rng(3).standard_normal((400_000, 5)).cumsum(axis=1)
    z = paths / np.sqrt(np.arange(1, 6))
    crossed = np.maximum.accumulate(np.abs(z) >= z_boundaries(FIVE_LOOKS, ALPHA, kind), axis=1)
    spent = 2 * spending(FIVE_LOOKS, ALPHA / 2, kind)
    assert crossed.mean(axis=0) == pytest.approx(spent, abs=0.0015)


def test_sequential_rule_keeps_false_verdicts_within_alpha_and_naive_rule_does_not(no_effect):
    sequential, naive = no_effect.sequential.rejection, no_effect.naive.rejection
    print(
        f"\nno effect, {STUDIES} studies: any-round 'better'/'worse': sequential "
        f"{sequential:.4f}, naive {naive:.4f}, fixed {no_effect.fixed.rejection:.4f}"
    )
    assert sequential <= ALPHA
    assert naive > ALPHA


def test_significance_level_approach_alone_is_liberal_with_few_seeds():
    # Why the design calibrates its level: carried to t statistics of 3..10 seeds, the
    # spending's z boundaries give more than alpha.
    uncalibrated = dataclasses.replace(DESIGN, calibrated=False)
    rate = simulate(uncalibrated, 0.0, SD, STUDIES, seed=4).sequential.rejection
    print(f"\nsignificance-level approach without calibration: {rate:.4f}")
    assert rate > ALPHA


# The design experiments/label_fraction_sequential.yaml uses: three looks, at 4, 7 and 10 seeds.
# Five looks at 3, 5, 7, 9, 10 (DESIGN above) save a little more under an effect but lose 3.8
# points of power (0.765 against 0.804, the test below bounds it by 5): each extra look at few
# seeds costs power, as the sd is estimated at 2..9 df.
SHIPPED = SequentialDesign(first=4, step=3, max=10, alpha=ALPHA)


def test_the_shipped_design_keeps_alpha_and_power_within_3_points_of_the_fixed_design():
    effect = simulate(SHIPPED, EFFECT, SD, 200_000, seed=5)
    null = simulate(SHIPPED, 0.0, SD, 200_000, seed=6)
    print(
        f"\nrounds {SHIPPED.rounds()}: no effect: any-round verdict sequential "
        f"{null.sequential.rejection:.4f}, naive {null.naive.rejection:.4f}; effect {EFFECT}: "
        f"power sequential {effect.sequential.power:.4f}, fixed {effect.fixed.power:.4f}; expected "
        f"seeds {effect.sequential.expected_seeds:.2f} under the effect, "
        f"{null.sequential.expected_seeds:.2f} under none"
    )
    assert null.sequential.rejection <= ALPHA < null.naive.rejection
    assert effect.sequential.power >= effect.fixed.power - 0.03
    assert effect.sequential.expected_seeds < SHIPPED.max


def test_power_loss_against_the_fixed_design_stays_under_5_points(with_effect):
    sequential, fixed = with_effect.sequential.power, with_effect.fixed.power
    print(f"\neffect {EFFECT}, sd {SD}: power sequential {sequential:.4f}, fixed {fixed:.4f}")
    assert fixed - 0.05 <= sequential < fixed


def test_expected_seeds_are_below_max_under_effect_and_under_no_effect(with_effect, no_effect):
    under_effect = with_effect.sequential.expected_seeds
    under_null = no_effect.sequential.expected_seeds
    print(f"\nexpected seeds: {under_effect:.2f} under the effect, {under_null:.2f} under none")
    assert under_effect < 9
    assert under_null < DESIGN.max


def test_repeated_ci_covers_the_true_effect_at_every_round(with_effect):
    coverage = with_effect.sequential.rci_coverage
    print(f"\nrepeated CIs covering the true effect at all rounds: {coverage:.4f}")
    assert coverage >= 1 - ALPHA


def test_non_binding_futility_saves_seeds_without_adding_false_verdicts(no_effect):
    futile = dataclasses.replace(DESIGN, futility=True)
    with_futility = simulate(futile, 0.0, SD, 200_000, seed=5).sequential
    assert with_futility.rejection <= ALPHA
    assert with_futility.expected_seeds < no_effect.sequential.expected_seeds - 3


def test_look_says_better_when_t_crosses_the_boundary():
    differences = EFFECT + SD / 10 * np.random.default_rng(6).standard_normal(9)
    decision = look(differences, DESIGN, 3)
    assert decision.verdict == "better" and decision.stopped
    assert decision.t >= decision.boundary == pytest.approx(t_boundaries(DESIGN)[3])
    assert 0 < decision.rci_low < decision.mean < decision.rci_high
    assert "sequentially valid" in decision.interval_label


def test_look_continues_on_an_undecided_interim_and_ends_undecided_at_the_last_round():
    differences = np.array([0.01, -0.02, 0.03, 0.0, -0.01, 0.02, -0.03, 0.01, 0.0, -0.01])
    assert look(differences[:5], DESIGN, 1).verdict == "continue"
    final = look(differences, DESIGN, 4)
    assert final.verdict == "not distinguishable"
    assert final.rci_low < 0 < final.rci_high


def test_look_says_equivalent_when_the_repeated_ci_lies_inside_the_margin():
    differences = np.array([0.004, -0.003, 0.002, -0.001, 0.0, 0.003, -0.002, 0.001, -0.004])
    with_margin = dataclasses.replace(DESIGN, margin=0.01)
    assert look(differences, with_margin, 3).verdict == "equivalent"
    assert look(differences, DESIGN, 3).verdict == "continue"


def test_look_says_futile_when_conditional_power_is_low():
    differences = np.array([0.01, -0.012, 0.02, -0.018, 0.0])
    futile = dataclasses.replace(DESIGN, futility=True)
    assert look(differences, futile, 1).verdict == "futile"


def test_look_refuses_a_round_with_the_wrong_number_of_seeds():
    with pytest.raises(ValueError, match="needs 5 finite differences"):
        look(np.zeros(4), DESIGN, 1)


def test_expected_seeds_compare_with_the_fixed_design_of_the_same_power():
    plan = expected_seeds(DESIGN, EFFECT, SD)
    print(f"\nplan: {plan}")
    assert plan.sequential < plan.under_null <= DESIGN.max
    assert paired_power(plan.fixed, EFFECT, SD, ALPHA) >= plan.power
    assert paired_power(plan.fixed - 1, EFFECT, SD, ALPHA) < plan.power


def test_expected_seeds_are_undefined_without_a_pilot_spread():
    plan = expected_seeds(DESIGN, EFFECT, float("nan"))
    assert np.isnan(plan.sequential) and plan.fixed is None
