"""Pseudo-label quality: how the paired gain of pretraining depends on its pseudo-labels.

A quality study (experiments/pseudo_label_quality.yaml) runs a pretraining arm at one label
fraction with several pseudo-label sources (the trials' ``pseudo_labels`` column: ``oracle``,
``clean``, ``medium``, ``shuffled``, ``mask2former``, ...) beside the reference arm at that
fraction and at 100 %. For each source this module gives

- its quality: ``align/perspective_mIoU`` of its pretrainings, the pseudo-labels against the
  BEV labels reprojected into the cameras on val (model.evaluation.diagnostics), the axis a
  real-data user measures for their own labeller; with the splatted ceiling and the reach;
- the paired gain of the pretrained arm over the reference at the same fraction (per seed,
  Student-t interval, verdict), and its difference to the reference at 100 % (the claim);

and the gap to close, reference at 100 % minus reference at the fraction (paired), and the
crossover quality: where a straight line through the sources' (quality, gain) meets the gap.
Its interval is a seed bootstrap (seeds resampled jointly: every cell is paired by seed); it
is "not estimable" when the slope's interval is not above 0 or fewer than 3 sources have gains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.stats import CONFIDENCE, cell_trials, paired_differences, t_interval, verdict
from model import arms

QUALITY = "perspective_mIoU"  # the x-axis: align/perspective_mIoU of the pretrainings
ALIGNMENT_COLUMNS = ("ceiling_mIoU", "ceiling_reached_mIoU", "reach", "head_mIoU")
FULL = 1.0


@dataclass(frozen=True)
class Crossover:
    """The quality at which the gain would close the gap to the reference at 100 %."""

    estimate: float
    low: float
    high: float
    slope: float  # gain per unit of quality (the fitted line)
    slope_low: float
    slope_high: float
    note: str  # why not estimable, or where it lies; "" when inside the measured range

    @property
    def estimable(self) -> bool:
        return not math.isnan(self.estimate)


def is_quality_study(trials: pd.DataFrame) -> bool:
    """Whether the pretraining arms' trials read more than one pseudo-label source."""
    pretrained = trials[trials["method"].isin(arms.pretraining())]
    return "pseudo_labels" in trials and pretrained["pseudo_labels"].nunique() > 1


def _sources(trials: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """(method, variant, pseudo_labels) of the pretraining arms' cells at ``fraction``."""
    at = trials[
        trials["method"].isin(arms.pretraining()) & np.isclose(trials["label_fraction"], fraction)
    ]
    cells = at.groupby(["method", "variant", "pseudo_labels"], observed=True).size()
    return cells.reset_index()[["method", "variant", "pseudo_labels"]]


def _interval_columns(prefix: str, diffs: pd.Series, confidence: float) -> dict:
    mean, low, high = t_interval(diffs, confidence)
    return {
        prefix: mean,
        f"{prefix}_low": low,
        f"{prefix}_high": high,
        f"{prefix}_verdict": verdict(low, high),
    }


def quality_table(
    trials: pd.DataFrame,
    alignment: pd.DataFrame,
    fraction: float = 0.5,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One row per pretraining arm and pseudo-label source at ``fraction``, by quality: the
    source's alignment statistics (mean over its pretrainings), the paired ``gain`` over the
    reference arm at ``fraction`` and ``vs_full``, the difference to the reference at 100 %,
    each with its interval and verdict."""
    reference = arms.reference().name
    keys = alignment.set_index("pretrain_key") if "pretrain_key" in alignment else None
    rows = []
    for method, variant, source in _sources(trials, fraction).itertuples(index=False):
        cell = (variant, fraction)
        gain = paired_differences(trials, cell, (reference, fraction))
        vs_full = paired_differences(trials, cell, (reference, FULL))
        row = {"method": method, "variant": variant, "pseudo_labels": source, "n_seeds": len(gain)}
        mine = cell_trials(trials, cell)
        runs = pd.DataFrame()
        if keys is not None:
            runs = keys.loc[keys.index.intersection(mine["pretrain_key"].dropna().unique())]
        for column in (QUALITY, *ALIGNMENT_COLUMNS):
            values = runs[column] if column in runs else pd.Series(dtype=float)
            row[column] = float(values.mean()) if len(values.dropna()) else math.nan
        row["pretrained_mIoU"] = float(mine["val_mIoU"].mean())
        row.update(_interval_columns("gain", gain, confidence))
        row.update(_interval_columns("vs_full", vs_full, confidence))
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(QUALITY, ascending=False, na_position="last").reset_index(drop=True)


def gap(trials: pd.DataFrame, fraction: float = 0.5, confidence: float = CONFIDENCE) -> dict:
    """What halving the labels costs the reference arm: reference at 100 % minus reference
    at ``fraction``, paired by seed (mean, interval, seeds)."""
    reference = arms.reference().name
    diffs = paired_differences(trials, (reference, FULL), (reference, fraction))
    mean, low, high = t_interval(diffs, confidence)
    return {"gap": mean, "gap_low": low, "gap_high": high, "n_seeds": len(diffs)}


def _seed_matrix(trials: pd.DataFrame, table: pd.DataFrame, fraction: float) -> tuple:
    """Per seed (rows, the seeds every cell has): each source's gain and the gap."""
    reference = arms.reference().name
    gains = [
        paired_differences(trials, (v, fraction), (reference, fraction)) for v in table["variant"]
    ]
    full = paired_differences(trials, (reference, FULL), (reference, fraction))
    seeds = full.index
    for g in gains:
        seeds = seeds.intersection(g.index)
    return np.column_stack([g[seeds].to_numpy() for g in gains]), full[seeds].to_numpy()


def _line(quality: np.ndarray, gains: np.ndarray, target: np.ndarray) -> tuple:
    """Least-squares lines ``gain = a + b quality`` (one per row of ``gains``) and where each
    reaches ``target``: (slope, crossover), arrays."""
    x = quality - quality.mean()
    slope = (gains - gains.mean(axis=-1, keepdims=True)) @ x / (x @ x)
    intercept = gains.mean(axis=-1) - slope * quality.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        return slope, (target - intercept) / slope


def crossover(
    trials: pd.DataFrame,
    table: pd.DataFrame,
    fraction: float = 0.5,
    confidence: float = CONFIDENCE,
    n_boot: int = 2000,
    seed: int = 0,
) -> Crossover:
    """The quality where the fitted gain meets the gap, with a percentile seed-bootstrap
    interval; NaN with a note when it is not estimable."""
    nan = math.nan
    usable = table.dropna(subset=[QUALITY])
    if len(usable) < 3:
        return Crossover(nan, nan, nan, nan, nan, nan, "fewer than 3 sources with a quality")
    per_seed, full = _seed_matrix(trials, usable, fraction)
    if len(full) < 3:
        return Crossover(nan, nan, nan, nan, nan, nan, "fewer than 3 seeds in every cell")
    quality = usable[QUALITY].to_numpy(float)
    slope, estimate = _line(quality, per_seed.mean(axis=0), full.mean())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(full), size=(n_boot, len(full)))
    slopes, crossings = _line(quality, per_seed[draws].mean(axis=1), full[draws].mean(axis=1))
    tail = (1 - confidence) / 2
    slope_low, slope_high = np.quantile(slopes, [tail, 1 - tail])
    if not slope_low > 0:
        return Crossover(
            nan,
            nan,
            nan,
            float(slope),
            float(slope_low),
            float(slope_high),
            "not estimable: the gain does not rise with quality by the slope's interval",
        )
    low, high = np.quantile(crossings, [tail, 1 - tail])
    note = ""
    if estimate > quality.max():
        note = "above every source measured: extrapolated"
    elif estimate < quality.min():
        note = "below every source measured: extrapolated"
    return Crossover(
        float(estimate),
        float(low),
        float(high),
        float(slope),
        float(slope_low),
        float(slope_high),
        note,
    )


def crossover_sentence(cross: Crossover, confidence: float = CONFIDENCE) -> str:
    level = f"{confidence:.0%}"
    slope = (
        f"slope {cross.slope:+.3f} mIoU of gain per unit of quality ({level} interval "
        f"[{cross.slope_low:+.3f}, {cross.slope_high:+.3f}])"
    )
    if not cross.estimable:
        return f"Crossover quality: {cross.note} ({slope})."
    where = f"; {cross.note}" if cross.note else ""
    return (
        f"Crossover quality (the gain closes the gap to 100 % labels): {cross.estimate:.3f}"
        f", {level} seed-bootstrap interval [{cross.low:.3f}, {cross.high:.3f}]{where} "
        f"({slope})."
    )


def plot_gain_vs_quality(
    table: pd.DataFrame, gap_row: dict, cross: Crossover, fraction: float, confidence: float
):
    """Paired gain over the reference at the fraction (interval bars) against pseudo-label
    quality, one point per source; the gap to the reference at 100 % as a line with its band;
    the fitted line and the crossover when estimable."""
    import matplotlib.pyplot as plt

    from analysis.curves import figure_style

    reference, percent = arms.label(arms.reference().name), f"{fraction:.0%}"
    with figure_style():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = table[QUALITY].to_numpy(float)
        y = table["gain"].to_numpy(float)
        err = np.vstack([y - table["gain_low"], table["gain_high"] - y])
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt="o",
            color="C0",
            capsize=3,
            label=f"pretrained - {reference}, both at {percent}",
        )
        for xi, yi, name in zip(x, y, table["pseudo_labels"], strict=True):
            ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axhline(
            gap_row["gap"],
            color="C3",
            ls="--",
            lw=1.2,
            label=f"gap: {reference} at 100 % - at {percent}",
        )
        ax.axhspan(gap_row["gap_low"], gap_row["gap_high"], color="C3", alpha=0.12, lw=0)
        finite = ~np.isnan(x)
        if finite.sum() >= 2:
            grid = np.linspace(0, 1, 50)
            slope, _ = _line(x[finite], y[finite], 0.0)
            ax.plot(
                grid,
                y[finite].mean() + slope * (grid - x[finite].mean()),
                color="C0",
                ls=":",
                lw=1,
                label="least-squares line",
            )
        if cross.estimable:
            ax.axvline(cross.estimate, color="0.3", ls="-.", lw=1, label="crossover quality")
            ax.axvspan(cross.low, cross.high, color="0.5", alpha=0.1, lw=0)
        ax.set_xlim(0, 1)
        ax.set_xlabel("pseudo-label quality: mIoU against the BEV labels reprojected (val)")
        ax.set_ylabel("paired val mIoU difference")
        ax.set_title(f"Gain of pretraining at {percent} labels ({confidence:.0%} intervals)")
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Quality:
    """A quality study's numbers, as the report shows them."""

    table: pd.DataFrame
    gap: dict
    crossover: Crossover
    fraction: float

    @classmethod
    def of(cls, trials, alignment, confidence=CONFIDENCE, n_boot=2000, seed=0) -> Quality | None:
        """None unless a pretraining arm ran several pseudo-label sources at one fraction
        below 100 % (the smallest such fraction is used)."""
        if "pseudo_labels" not in trials:
            return None
        pretrained = trials[trials["method"].isin(arms.pretraining())]
        per_fraction = pretrained.groupby("label_fraction")["pseudo_labels"].nunique()
        fractions = [f for f, n in per_fraction.items() if n > 1 and f < FULL]
        if not fractions:
            return None
        fraction = float(min(fractions))
        table = quality_table(trials, alignment, fraction, confidence)
        cross = crossover(trials, table, fraction, confidence, n_boot, seed)
        return cls(table, gap(trials, fraction, confidence), cross, fraction)

    def figure(self, confidence: float = CONFIDENCE):
        return plot_gain_vs_quality(self.table, self.gap, self.crossover, self.fraction, confidence)

    def summary(self, confidence: float = CONFIDENCE) -> str:
        """What the columns are, the gap to close and the crossover, in sentences."""
        reference, g = arms.reference().name, self.gap
        return (
            "Quality: mIoU of the pseudo-labels against the BEV labels reprojected into the "
            "val images. Ceiling: the pseudo-labels splatted into the BEV against the BEV "
            "labels (all cells); reach: the share of BEV cells a ray reaches. Gap to close "
            f"({reference}@1 - {reference}@{self.fraction:g}, paired, {g['n_seeds']} seeds): "
            f"{g['gap']:+.4f} [{g['gap_low']:+.4f}, {g['gap_high']:+.4f}]. "
            + crossover_sentence(self.crossover, confidence)
        )

    def markdown(self, confidence: float = CONFIDENCE) -> str:
        """verdicts.md's section: the table, the gap and the crossover."""
        level, percent = f"{confidence:.0%}", f"{self.fraction:.0%}"
        reference = arms.reference().name
        rows = []
        for r in self.table.itertuples(index=False):
            rows.append(
                f"| {r.pseudo_labels} | {r.method} | {r.perspective_mIoU:.3f} | "
                f"{r.ceiling_mIoU:.3f} | {r.reach:.3f} | {r.n_seeds} | "
                f"{r.gain:+.4f} [{r.gain_low:+.4f}, {r.gain_high:+.4f}] {r.gain_verdict} | "
                f"{r.vs_full:+.4f} [{r.vs_full_low:+.4f}, {r.vs_full_high:+.4f}] "
                f"{r.vs_full_verdict} |"
            )
        return "\n".join(
            [
                f"\n## Pseudo-label quality: paired gain at {percent} labels "
                f"({level} t-intervals)\n",
                f"| pseudo-labels | arm | quality | ceiling | reach | seeds "
                f"| gain over {reference}@{self.fraction:g} | vs {reference}@1 |",
                "|---|---|---|---|---|---|---|---|",
                *rows,
                "",
                self.summary(confidence),
                "",
            ]
        )
