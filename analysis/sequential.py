"""Group-sequential design over seeds: seeds run in rounds, every comparison's paired
differences are looked at after each round, and a comparison stops once decided, without the
false verdicts that re-testing every round at the nominal level adds.

Boundaries come from an alpha-spending function (Lan & DeMets 1983, "Discrete sequential
boundaries for clinical trials", Biometrika 70: O'Brien-Fleming-type or Pocock-type) spent at
the information fractions t_k = n_k / n_max of the rounds. A two-sided symmetric design spends
alpha/2 on each side with the one-sided function (the convention of gsDesign, ldbounds and
Jennison & Turnbull 2000, "Group Sequential Methods with Applications to Clinical Trials"):
five equal looks at alpha 0.05 give the published OBF-type z boundaries 4.877, 3.357, 2.680,
2.290, 2.031. The z boundaries are exact up to a Simpson grid: recursive numerical integration
of the canonical joint distribution of the z statistics (Armitage, McPherson & Rowe 1969;
Jennison & Turnbull ch. 19), on the score scale B(t_k) = Z_k sqrt(t_k), whose increments are
independent N(0, t_k - t_(k-1)). It is written by hand: scipy has no group-sequential boundary
routine, and statsmodels (not installed here) has none either.

The per-seed sd is estimated, so each z boundary is carried to the paired t statistic by the
significance-level approach (Jennison & Turnbull sec. 3.8): round k rejects when the t-test on
its n_k seeds (n_k - 1 degrees of freedom) has the nominal two-sided p of the z boundary. With a
few seeds per round that alone is liberal (the t statistics' joint law is not the z statistics'
at 2..9 df): OBF-type at 3, 5, 7, 9, 10 seeds spends 5.4 % instead of 5 %. So by default
(`calibrated`) the spending runs at the level alpha* <= alpha whose t-sequence false-verdict
rate, simulated once per design (fixed seed, up to a million null studies), is alpha less three
Monte Carlo standard errors (alpha* = 0.0451 there; alpha* nears alpha as seed counts grow).

The repeated confidence interval of round k, mean +- c_k se with c_k that round's t boundary,
covers the true difference at every round at once with probability 1 - alpha (Jennison &
Turnbull ch. 7): valid wherever the sweep stops, it is the interval to report (labelled
sequentially valid), not the fixed-n t interval of analysis.stats.

Verdict of a look: "better" / "worse" when |t| reaches the boundary (the repeated CI excludes
0); else "equivalent" when a margin is given and the repeated CI lies inside (-margin, margin);
else, with `futility`, "futile" at an interim round when the conditional power under the current
trend (of crossing the last boundary were the estimated effect true; Lachin 2005) is below 10 %;
else "continue", or "not distinguishable" at the last round. The futility rule is non-binding:
the efficacy boundaries ignore it, so obeying it only lowers the false-verdict rate (and power).
`simulate` draws normal differences as each round's sufficient statistics, vectorised.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as sps
from scipy.optimize import brentq

SPENDING_KINDS = ("obrien_fleming", "pocock")
FUTILITY_POWER = 0.10  # "futile" below this conditional power under the current trend
_GRID_STEP = 1 / 6  # Simpson grid spacing, in sds of the next increment (or of B(t))
_GRID_SDS = 10.0  # the grid reaches at most this many sds of B(t) from 0
_CALIBRATION_VALUES = 5_000_000  # null t statistics simulated for a calibration (paths x rounds)
_CALIBRATION_SEED = 20_240_817


@dataclass(frozen=True)
class SequentialDesign:
    """Seeds in rounds: `first`, then `step` more per round, `max` at most; two-sided level
    `alpha` spent by `spending`; optional non-binding `futility` stop and equivalence `margin`
    (in the metric's units); `calibrated`: the small-sample correction of the level."""

    first: int
    step: int
    max: int
    alpha: float = 0.05
    spending: str = "obrien_fleming"
    futility: bool = False
    margin: float | None = None
    calibrated: bool = True

    def __post_init__(self):
        if self.first < 2 or self.step < 1 or self.max < self.first:
            raise ValueError(
                f"need first >= 2, step >= 1 and max >= first, got first={self.first}, "
                f"step={self.step}, max={self.max}"
            )
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.spending not in SPENDING_KINDS:
            raise ValueError(f"spending must be one of {SPENDING_KINDS}, got {self.spending!r}")
        if self.margin is not None and not self.margin > 0:
            raise ValueError(f"margin must be positive, got {self.margin}")

    def rounds(self) -> tuple[int, ...]:
        """Seed counts after each round: first, first + step, ..., and exactly max last."""
        return tuple(range(self.first, self.max, self.step)) + (self.max,)

    def fractions(self) -> np.ndarray:
        """Information fractions t_k = n_k / max of the rounds."""
        return np.asarray(self.rounds(), dtype=float) / self.max


def spending(t, alpha: float, kind: str = "obrien_fleming"):
    """Lan-DeMets alpha-spending function: the level spent by information fraction t (0 at 0,
    alpha at 1). O'Brien-Fleming-type 2 - 2 Phi(z_{alpha/2} / sqrt(t)); Pocock-type
    alpha ln(1 + (e - 1) t). A two-sided symmetric design spends alpha/2 on each side."""
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    if kind == "obrien_fleming":
        with np.errstate(divide="ignore"):
            return 2 * sps.norm.sf(sps.norm.isf(alpha / 2) / np.sqrt(t))
    if kind == "pocock":
        return alpha * np.log1p((math.e - 1) * t)
    raise ValueError(f"spending must be one of {SPENDING_KINDS}, got {kind!r}")


def _simpson(half_width: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid over [-half_width, half_width], spacing at most `step`, with Simpson weights."""
    points = 2 * max(50, math.ceil(half_width / step)) + 1
    x = np.linspace(-half_width, half_width, points)
    w = np.where(np.arange(points) % 2, 4.0, 2.0)
    w[0] = w[-1] = 1.0
    return x, w * (x[1] - x[0]) / 3


@functools.lru_cache(maxsize=256)
def _z_boundaries(fractions: tuple[float, ...], alpha: float, kind: str) -> tuple[float, ...]:
    spent = 2 * spending(np.asarray(fractions), alpha / 2, kind)
    targets = np.diff(spent, prepend=0.0)  # level each look spends, both sides together
    sds = np.sqrt(np.diff(fractions, prepend=0.0))  # sd of each increment of B
    bounds, grid, mass = [], None, None
    for k, (t, target) in enumerate(zip(fractions, targets, strict=True)):
        if target <= 0:
            c = math.inf
        elif grid is None:
            c = float(sps.norm.isf(target / 2))
        else:

            def excess(c, grid=grid, mass=mass, t=t, sd=sds[k], target=target):
                b = c * math.sqrt(t)  # the boundary on the score scale
                crossing = special.ndtr((-b - grid) / sd) + special.ndtr((grid - b) / sd)
                return float(mass @ crossing) - target

            c = math.inf if excess(50.0) >= 0 else brentq(excess, 0.0, 50.0, xtol=1e-10)
        bounds.append(c)
        if k + 1 == len(fractions):
            break
        half = min(c, _GRID_SDS) * math.sqrt(t)
        new_grid, weights = _simpson(half, _GRID_STEP * min(sds[k + 1], math.sqrt(t)))
        if grid is None:
            density = sps.norm.pdf(new_grid, scale=math.sqrt(t))
        else:  # density of B(t_k) on the paths that have not crossed yet
            density = sps.norm.pdf(new_grid[:, None] - grid[None, :], scale=sds[k]) @ mass
        grid, mass = new_grid, weights * density
    return tuple(bounds)


def z_boundaries(fractions, alpha: float = 0.05, kind: str = "obrien_fleming") -> np.ndarray:
    """Two-sided efficacy boundaries c_k on the z scale at increasing information fractions
    (the last 1): P(|Z_j| < c_j for j < k, |Z_k| >= c_k) under no effect is the spending
    function's increment at t_k. Recursive numerical integration; cached."""
    key = tuple(float(t) for t in fractions)
    if not key or any(b <= a for a, b in zip((0.0, *key), key, strict=False)) or key[-1] > 1:
        raise ValueError(f"fractions must increase within (0, 1], got {key}")
    return np.array(_z_boundaries(key, float(alpha), kind))


def _summaries(rounds, effect: float, sd: float, n_studies: int, seed: int):
    """Simulated studies of N(effect, sd^2) differences, round by round: (n, mean, sd) arrays,
    drawn as each round's group mean and within-group sum of squares (sd^2 chi^2_(m-1))."""
    rng = np.random.default_rng(seed)
    mean, squares, before = np.zeros(n_studies), np.zeros(n_studies), 0
    for n in rounds:
        m = n - before
        group = effect + sd / math.sqrt(m) * rng.standard_normal(n_studies)
        within = 2 * sd**2 * rng.standard_gamma((m - 1) / 2, n_studies)
        squares = squares + within + before * m / n * (group - mean) ** 2
        mean = mean + m / n * (group - mean)
        before = n
        yield n, mean, np.sqrt(squares / (n - 1))


def _significance_level(z, rounds) -> np.ndarray:
    """t boundaries of the same nominal two-sided p as the z boundaries, n_k - 1 df."""
    return sps.t.isf(sps.norm.sf(z), np.asarray(rounds) - 1)


@functools.lru_cache(maxsize=32)
def _calibrated_alpha(rounds: tuple[int, ...], alpha: float, kind: str) -> float:
    if len(rounds) == 1:
        return alpha  # one look: the t-test is exact
    n_paths = max(100_000, _CALIBRATION_VALUES // len(rounds))
    null = _summaries(rounds, 0.0, 1.0, n_paths, _CALIBRATION_SEED)
    t = np.array([np.abs(m) / s * math.sqrt(n) for n, m, s in null], dtype=np.float32)
    fractions = np.asarray(rounds) / rounds[-1]
    target = alpha - 3 * math.sqrt(alpha * (1 - alpha) / n_paths)

    def excess(level: float) -> float:
        bounds = _significance_level(z_boundaries(fractions, level, kind), rounds)
        return float((t >= bounds[:, None]).any(axis=0).mean()) - target

    if excess(alpha) <= 0:
        return alpha
    return float(brentq(excess, alpha / 10, alpha, xtol=alpha * 1e-4))


def t_boundaries(design: SequentialDesign) -> np.ndarray:
    """The boundaries on the paired t statistic of each round (n_k - 1 df): the z boundaries
    of the design's spending by the significance-level approach, at the calibrated level when
    `design.calibrated` (the first call per design simulates; cached)."""
    rounds = design.rounds()
    level = design.alpha
    if design.calibrated:
        level = _calibrated_alpha(rounds, design.alpha, design.spending)
    return _significance_level(z_boundaries(design.fractions(), level, design.spending), rounds)


@dataclass(frozen=True)
class Decision:
    """One look at one comparison: the paired t statistic, its boundary (n_seeds - 1 df) and
    nominal two-sided p, the verdict and the sequentially valid repeated CI (`interval_label`)."""

    round_index: int
    n_seeds: int
    mean: float
    sd: float
    t: float
    boundary: float
    nominal_alpha: float
    verdict: str
    rci_low: float
    rci_high: float
    interval_label: str

    @property
    def stopped(self) -> bool:
        return self.verdict != "continue"


def _verdicts(mean, sd, n, bound, last, margin=None, futility=None):
    """Vectorised look at arrays of means and sds of n differences against a t boundary:
    t statistics, verdict words and repeated CIs. `futility`: (fraction, last z boundary)."""
    se = sd / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.nan_to_num(mean / se, nan=0.0, posinf=np.inf, neginf=-np.inf)
    half = np.where(se > 0, bound * se, 0.0)
    low, high = mean - half, mean + half
    inside = np.zeros(t.shape, bool) if margin is None else (low > -margin) & (high < margin)
    futile = np.zeros(t.shape, bool)
    if futility is not None and not last:
        fraction, final_z = futility
        z = sps.norm.isf(sps.t.sf(np.abs(t), n - 1))  # |t| as the z of the same p
        power = sps.norm.cdf((z / math.sqrt(fraction) - final_z) / math.sqrt(1 - fraction))
        futile = power < FUTILITY_POWER
    verdict = np.select(
        [t >= bound, t <= -bound, inside, futile],
        ["better", "worse", "equivalent", "futile"],
        "not distinguishable" if last else "continue",
    )
    return t, verdict, low, high


def _futility(design: SequentialDesign, bounds: np.ndarray, k: int):
    """(fraction, final z boundary) for the futility rule at round k, None without it."""
    if not design.futility:
        return None
    final_z = sps.norm.isf(sps.t.sf(bounds[-1], design.max - 1))
    return design.rounds()[k] / design.max, final_z


def look(differences, design: SequentialDesign, round_index: int) -> Decision:
    """The decision after round `round_index` (0-based) for one comparison, from its per-seed
    paired differences so far (exactly design.rounds()[round_index] of them, in seed order)."""
    rounds = design.rounds()
    if not 0 <= round_index < len(rounds):
        raise ValueError(f"round_index must be in [0, {len(rounds)}), got {round_index}")
    x = np.asarray(differences, dtype=float)
    n = rounds[round_index]
    if x.shape != (n,) or not np.isfinite(x).all():
        raise ValueError(f"round {round_index} needs {n} finite differences, got {x.shape}")
    bounds = t_boundaries(design)
    bound, last = bounds[round_index], round_index == len(rounds) - 1
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    futility = _futility(design, bounds, round_index)
    t, verdict, low, high = _verdicts(
        np.array([mean]), np.array([sd]), n, bound, last, design.margin, futility
    )
    kind = {"obrien_fleming": "O'Brien-Fleming", "pocock": "Pocock"}[design.spending]
    label = (
        f"{1 - design.alpha:.0%} repeated CI, sequentially valid (Lan-DeMets {kind}-type, "
        f"round {round_index + 1} of {len(rounds)})"
    )
    nominal = float(2 * sps.t.sf(bound, n - 1))
    return Decision(
        round_index=round_index,
        n_seeds=n,
        mean=mean,
        sd=sd,
        t=float(t[0]),
        boundary=float(bound),
        nominal_alpha=nominal,
        verdict=str(verdict[0]),
        rci_low=float(low[0]),
        rci_high=float(high[0]),
        interval_label=label,
    )


@dataclass(frozen=True)
class Rule:
    """One stopping rule over simulated studies: rate of any 'better'/'worse' verdict; of the
    true sign's (`power`; `rejection` at zero effect); mean seeds used; for the sequential rule,
    rate of studies whose repeated CIs cover the true effect at every round."""

    rejection: float
    power: float
    expected_seeds: float
    rci_coverage: float = math.nan


@dataclass(frozen=True)
class Simulation:
    sequential: Rule
    naive: Rule
    fixed: Rule


class _Stops:
    """First stopping verdict and seeds used per simulated study, for one rule."""

    def __init__(self, n_studies: int):
        self.verdicts = np.full(n_studies, "continue", dtype=object)
        self.seeds = np.zeros(n_studies, dtype=int)

    def record(self, verdict: np.ndarray, n: int) -> None:
        fresh = (self.verdicts == "continue") & (verdict != "continue")
        self.verdicts[fresh], self.seeds[fresh] = verdict[fresh], n

    def rule(self, effect: float, coverage: float = math.nan) -> Rule:
        rejection = float(np.isin(self.verdicts, ["better", "worse"]).mean())
        right = "better" if effect > 0 else "worse"
        power = rejection if effect == 0 else float((self.verdicts == right).mean())
        return Rule(rejection, power, float(self.seeds.mean()), coverage)


def simulate(
    design: SequentialDesign, effect: float, sd: float, n_studies: int = 100_000, seed: int = 0
) -> Simulation:
    """Simulate `n_studies` studies whose per-seed paired differences are N(effect, sd^2),
    on the same draws: the design's sequential rule, the naive rule (a t-test at nominal alpha
    every round, stopping at the first rejection) and the fixed design (one t-test at max)."""
    if not sd > 0 or n_studies < 1:
        raise ValueError(f"need sd > 0 and n_studies >= 1, got sd={sd}, n_studies={n_studies}")
    rounds = design.rounds()
    bounds = t_boundaries(design)
    nominal = sps.t.isf(design.alpha / 2, np.asarray(rounds) - 1)
    sequential, naive, fixed = _Stops(n_studies), _Stops(n_studies), _Stops(n_studies)
    covered = np.ones(n_studies, dtype=bool)
    for k, (n, mean, s) in enumerate(_summaries(rounds, effect, sd, n_studies, seed)):
        last = k == len(rounds) - 1
        futility = _futility(design, bounds, k)
        _, verdict, low, high = _verdicts(mean, s, n, bounds[k], last, design.margin, futility)
        sequential.record(verdict, n)
        covered &= (low <= effect) & (effect <= high)
        naive.record(_verdicts(mean, s, n, nominal[k], last)[1], n)
        if last:
            fixed.record(_verdicts(mean, s, n, nominal[k], last)[1], n)
    return Simulation(
        sequential=sequential.rule(effect, float(covered.mean())),
        naive=naive.rule(effect),
        fixed=fixed.rule(effect),
    )


@dataclass(frozen=True)
class ExpectedSeeds:
    """For analysis.plan: the sequential design's expected seeds per comparison under the
    effect and under no effect, its power, and the seeds of the fixed design of that power."""

    sequential: float
    under_null: float
    power: float
    fixed: int | None


def _fixed_seeds(effect: float, sd: float, power: float, alpha: float, limit: int = 1000):
    """Smallest n whose two-sided paired t-test has `power` (noncentral t; at most 0.999, as
    a simulated power of 1 is one only up to Monte Carlo error), None past `limit`."""
    power, n = min(power, 0.999), np.arange(2, limit + 1)
    critical = sps.t.isf(alpha / 2, n - 1)
    shift = abs(effect) / sd * np.sqrt(n)
    reached = sps.nct.sf(critical, n - 1, shift) + sps.nct.cdf(-critical, n - 1, shift) >= power
    return int(n[reached.argmax()]) if reached.any() else None


def expected_seeds(
    design: SequentialDesign, effect: float, sd: float, n_studies: int = 100_000, seed: int = 0
) -> ExpectedSeeds:
    """Expected seeds per comparison by simulation with a fixed seed (deterministic for the
    same arguments; Monte Carlo error about 0.01 seeds at 100,000 studies). NaNs and None when
    sd is not a positive number (no pilot spread, no plan)."""
    if not (np.isfinite(sd) and sd > 0):
        return ExpectedSeeds(math.nan, math.nan, math.nan, None)
    alt = simulate(design, effect, sd, n_studies, seed).sequential
    null = simulate(design, 0.0, sd, n_studies, seed).sequential
    fixed = _fixed_seeds(effect, sd, alt.power, design.alpha)
    return ExpectedSeeds(alt.expected_seeds, null.expected_seeds, alt.power, fixed)
