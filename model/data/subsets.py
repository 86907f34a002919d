"""Nested label subsets: which training scenes keep their BEV labels at a given label fraction.

Scenes, not samples, are chosen, so consecutive near-duplicate frames never straddle the cut.
For one seed the scenes are put in one seeded order and a fraction takes a prefix of it:
the 10% subset is inside the 25% subset, inside 50%, ..., and 100% is every scene.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelSubset:
    """The labelled scenes (in selection order) and how many labelled samples they hold.

    ``num_samples`` is None when no per-scene sample counts were given.
    """

    scenes: tuple[str, ...]
    num_samples: int | None


def scene_order(train_scenes: Sequence[str], seed: int) -> list[str]:
    """All scenes in the seeded order whose prefixes are the subsets (input order is ignored)."""
    names = sorted(set(train_scenes))
    if len(names) != len(train_scenes):
        raise ValueError("train_scenes contains duplicate scene names")
    if not names:
        raise ValueError("train_scenes is empty: there is nothing to take a label subset of")
    permutation = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in permutation]


def num_labelled_scenes(num_scenes: int, fraction: float) -> int:
    """``ceil(fraction * num_scenes)``, at least 1 (tolerant of float noise like 0.3 * 10)."""
    return max(1, math.ceil(fraction * num_scenes - 1e-9))


def label_subset(
    train_scenes: Sequence[str],
    fraction: float,
    seed: int,
    samples_per_scene: Mapping[str, int] | int | None = None,
) -> LabelSubset:
    """The scenes that keep their labels at ``fraction`` of the training set, for ``seed``.

    ``fraction`` must lie in (0, 1]; the subset is never empty. ``samples_per_scene`` (a
    mapping scene -> keyframe count, or one count for every scene) gives ``num_samples``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"label fraction must be a number in (0, 1], got {fraction!r}")
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction!r}")
    order = scene_order(list(train_scenes), seed)
    scenes = tuple(order[: num_labelled_scenes(len(order), fraction)])
    if samples_per_scene is None:
        num_samples = None
    elif isinstance(samples_per_scene, int):
        num_samples = samples_per_scene * len(scenes)
    else:
        missing = [s for s in scenes if s not in samples_per_scene]
        if missing:
            raise ValueError(f"samples_per_scene has no count for scenes {missing}")
        num_samples = int(sum(samples_per_scene[s] for s in scenes))
    return LabelSubset(scenes=scenes, num_samples=num_samples)
