"""Label subsets: whole scenes, nested across fractions for one seed, never empty."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data.subsets import label_subset

SCENES = [f"scene-{i:04d}" for i in range(37)]

fractions = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    num_scenes=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    a=fractions,
    b=fractions,
)
def test_smaller_fraction_is_inside_larger_one_for_every_seed(num_scenes, seed, a, b):
    scenes = [f"s{i}" for i in range(num_scenes)]
    small, large = sorted((a, b))
    sub_small = label_subset(scenes, small, seed)
    sub_large = label_subset(scenes, large, seed)
    assert set(sub_small.scenes) <= set(sub_large.scenes)
    assert 1 <= len(sub_small.scenes) <= len(sub_large.scenes) <= num_scenes
    assert len(sub_large.scenes) == max(1, math.ceil(large * num_scenes - 1e-9))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=fractions)
def test_subset_does_not_depend_on_input_order(seed, fraction):
    forward = label_subset(SCENES, fraction, seed)
    backward = label_subset(list(reversed(SCENES)), fraction, seed)
    assert forward == backward


def test_full_fraction_takes_every_scene():
    assert set(label_subset(SCENES, 1.0, seed=3).scenes) == set(SCENES)


def test_tiny_fraction_still_takes_one_scene():
    assert len(label_subset(SCENES, 1e-9, seed=0).scenes) == 1


def test_float_noise_does_not_add_a_scene():
    # 0.3 * 10 is 3.0000000000000004 in floating point: still 3 scenes.
    assert len(label_subset([f"s{i}" for i in range(10)], 0.3, seed=0).scenes) == 3


def test_seeds_pick_different_scenes():
    picks = {label_subset(SCENES, 0.25, seed=s).scenes for s in range(10)}
    assert len(picks) > 1


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0001, float("nan"), float("inf"), "0.5", True])
def test_fraction_outside_unit_interval_is_rejected(fraction):
    with pytest.raises(ValueError, match="fraction"):
        label_subset(SCENES, fraction, seed=0)


def test_empty_scene_list_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        label_subset([], 0.5, seed=0)


def test_num_samples_counts_labelled_keyframes():
    counts = {s: i + 1 for i, s in enumerate(SCENES)}
    subset = label_subset(SCENES, 0.5, seed=1, samples_per_scene=counts)
    assert subset.num_samples == sum(counts[s] for s in subset.scenes)
    assert label_subset(SCENES, 0.5, seed=1, samples_per_scene=40).num_samples == 40 * len(
        subset.scenes
    )
    assert label_subset(SCENES, 0.5, seed=1).num_samples is None
