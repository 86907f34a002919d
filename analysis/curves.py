"""The study's figures (matplotlib + seaborn), publication style, colour-blind-safe.

Colours are the Okabe-Ito palette (distinguishable under the common colour-vision deficiencies),
and every configuration also gets its own marker, so the figures survive greyscale printing.
Heatmaps use cividis (perceptually uniform, CVD-safe). Every function returns a Figure and
leaves global matplotlib state alone; `save_figure` writes PNG and SVG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from analysis.savings import LabelSavings
from analysis.stats import CONFIDENCE, pareto_front, summarise, t_interval
from model import arms

OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
ACCOUNTING_LABELS = {
    "own": "this trial only",
    "incl_pretrain": "incl. full pretraining",
    "amortised": "incl. amortised pretraining",
}
PNG_DPI = 200


@contextmanager
def figure_style() -> Iterator[None]:
    """Paper context, white background, no top/right spines, editable SVG text."""
    rc = {
        **sns.axes_style("ticks"),
        **sns.plotting_context("paper", font_scale=1.15),
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e6e6e6",
        "grid.linewidth": 0.6,
        "legend.frameon": False,
        "svg.fonttype": "none",
        "figure.dpi": 100,
    }
    with mpl.rc_context(rc):
        yield


def variant_styles(variants) -> dict[str, dict]:
    """Colour and marker per configuration, in the arms' display order (model.arms; a variant
    ``arm (param=value)`` sorts with its arm): each arm keeps its colour across figures."""
    ordered = sorted(set(variants), key=lambda v: (arms.order(str(v).split(" (")[0]), str(v)))
    return {
        v: {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)]}
        for i, v in enumerate(ordered)
    }


def _percent(value: float, _pos=None) -> str:
    return f"{value * 100:g}%"


def _time_scale(max_s: float) -> tuple[float, str]:
    if max_s >= 2 * 3600:
        return 3600.0, "h"
    if max_s >= 2 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _clipped(values) -> np.ndarray:
    """An interval bound as drawn: mIoU lives in [0, 1], a t-band of few seeds need not."""
    return np.clip(np.asarray(values, dtype=float), 0.0, 1.0)


def _band(ax, x, low, high, color) -> None:
    ax.fill_between(x, _clipped(low), _clipped(high), color=color, alpha=0.18, lw=0)


def _partial_note(fig: Figure, trials: pd.DataFrame) -> None:
    n = int(trials["partial"].sum()) if "partial" in trials else 0
    if n:
        fig.text(
            0.99,
            0.005,
            f"partial: {n} trial(s) still running",
            ha="right",
            va="bottom",
            fontsize="small",
            color="#D55E00",
        )


def plot_miou_vs_fraction(
    trials: pd.DataFrame,
    confidence: float = CONFIDENCE,
    savings: list[LabelSavings] | None = None,
    metric: str = "val_mIoU",
) -> Figure:
    """Final mIoU against label fraction (log x): mean over seeds with a Student-t band, one line
    per configuration, faint dots for single seeds, and the supervised 100% mean (with its band)
    as a horizontal reference. A dotted vertical line marks each label-savings point."""
    summary = summarise(trials, metric, confidence)
    styles = variant_styles(summary["variant"])
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.0, 3.6), layout="constrained")
        reference = arms.reference().name
        ref = summary[
            (summary["method"] == reference) & np.isclose(summary["label_fraction"], 1)
        ]
        if not ref.empty:
            row = (
                ref[ref["variant"] == reference].iloc[0]
                if (ref["variant"] == reference).any()
                else ref.iloc[0]
            )
            ax.axhline(
                row["mean"],
                color="#555555",
                ls="--",
                lw=1.0,
                label=f"{arms.label(reference)}, 100% labels",
            )
            if np.isfinite(row["ci_low"]):
                low, high = _clipped([row["ci_low"], row["ci_high"]])
                ax.axhspan(low, high, color="#999999", alpha=0.15, lw=0)
        for variant, cell in summary.groupby("variant", sort=False):
            style = styles[variant]
            cell = cell.sort_values("label_fraction")
            seeds = trials[trials["variant"] == variant]
            ax.scatter(
                seeds["label_fraction"],
                seeds[metric],
                s=9,
                color=style["color"],
                alpha=0.35,
                lw=0,
                zorder=2,
            )
            ax.plot(
                cell["label_fraction"],
                cell["mean"],
                color=style["color"],
                marker=style["marker"],
                ms=5,
                lw=1.6,
                label=f"{variant} (n={int(cell['n_seeds'].max())})",
                zorder=3,
            )
            _band(ax, cell["label_fraction"], cell["ci_low"], cell["ci_high"], style["color"])
        for result in savings or []:
            if result.fraction is not None and np.isfinite(result.fraction):
                ax.axvline(
                    result.fraction,
                    color=styles.get(result.variant, {}).get("color", "k"),
                    ls=":",
                    lw=1.0,
                    label=f"{result.variant} reaches it ({_percent(result.fraction)})",
                )
        fractions = sorted(summary["label_fraction"].unique())
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(fractions))
        ax.xaxis.set_major_formatter(FuncFormatter(_percent))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("BEV label fraction (log scale)")
        ax.set_ylabel("val mIoU (final epoch)")
        ax.legend(
            title=f"mean, {confidence:.0%} t-interval over seeds",
            loc="lower right",
            fontsize="small",
            title_fontsize="small",
        )
        _partial_note(fig, trials)
    return fig


def _epoch_summary(epochs: pd.DataFrame, time_column: str, confidence: float) -> pd.DataFrame:
    rows = []
    for (variant, fraction, epoch), cell in epochs.groupby(
        ["variant", "label_fraction", "epoch"], observed=True
    ):
        mean, low, high = t_interval(cell["val_mIoU"], confidence)
        rows.append(
            {
                "variant": variant,
                "label_fraction": fraction,
                "epoch": epoch,
                "time": cell[time_column].mean(),
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def plot_miou_vs_time(
    epochs: pd.DataFrame,
    clock: str = "wall",
    accountings: tuple[str, ...] = ("incl_pretrain", "amortised"),
    confidence: float = CONFIDENCE,
    time_to_target: pd.DataFrame | None = None,
) -> Figure:
    """Validation mIoU against cumulative training time, one row per time accounting (the
    pretraining counted in full, or only the trial's share of it) and one column per label
    fraction; per configuration the mean over seeds at every epoch with a t-band. With a
    `time_to_target` table (`analysis.target_time.time_to_target`), a dotted line at its target
    and a star where each mean curve first reaches it."""
    fractions = sorted(epochs["label_fraction"].unique())
    targets_given = time_to_target is not None and not time_to_target.empty
    targets, target, marked = {}, math.nan, False
    if targets_given:
        target = float(time_to_target["target"].iloc[0])
        for row in time_to_target[time_to_target["reached"]].itertuples():
            targets[(row.variant, row.label_fraction, row.accounting)] = row.time_s
    styles = variant_styles(epochs["variant"])
    max_s = max(
        float(epochs[f"cum_{clock}_s{'' if a == 'own' else '_' + a}"].max()) for a in accountings
    )
    scale, unit = _time_scale(max_s if math.isfinite(max_s) else 1.0)
    with figure_style():
        fig, axes = plt.subplots(
            len(accountings),
            len(fractions),
            figsize=(2.3 * len(fractions) + 0.6, 2.3 * len(accountings) + 0.5),
            sharex="col",
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        for r, accounting in enumerate(accountings):
            column = f"cum_{clock}_s" + ("" if accounting == "own" else f"_{accounting}")
            summary = _epoch_summary(epochs, column, confidence)
            for c, fraction in enumerate(fractions):
                ax = axes[r, c]
                here = summary[np.isclose(summary["label_fraction"], fraction)]
                for variant, cell in here.groupby("variant", sort=False):
                    style = styles[variant]
                    cell = cell.sort_values("epoch")
                    x = cell["time"] / scale
                    ax.plot(
                        x,
                        cell["mean"],
                        color=style["color"],
                        marker=style["marker"],
                        ms=3.5,
                        lw=1.4,
                        label=variant,
                    )
                    _band(ax, x, cell["ci_low"], cell["ci_high"], style["color"])
                    reached = targets.get((variant, fraction, accounting))
                    if reached is not None:
                        ax.plot(
                            reached / scale,
                            target,
                            marker="*",
                            ms=10,
                            color=style["color"],
                            mec="black",
                            mew=0.6,
                            ls="none",
                            zorder=4,
                        )
                        marked = True
                if targets_given:
                    ax.axhline(target, color="#555555", ls=":", lw=1.0, zorder=1)
                if r == 0:
                    ax.set_title(f"{_percent(fraction)} labels")
                if r == len(accountings) - 1:
                    ax.set_xlabel(f"cumulative {clock} time [{unit}]")
                if c == 0:
                    ax.set_ylabel(f"val mIoU\n({ACCOUNTING_LABELS[accounting]})")
                ax.set_xlim(left=0)
                ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        handles = [
            mpl.lines.Line2D([], [], color=s["color"], marker=s["marker"], label=v)
            for v, s in styles.items()
        ]
        if targets_given:
            handles.append(
                mpl.lines.Line2D([], [], color="#555555", ls=":", label=f"target mIoU {target:.3f}")
            )
        if marked:
            handles.append(
                mpl.lines.Line2D(
                    [],
                    [],
                    color="#777777",
                    marker="*",
                    ms=9,
                    mec="black",
                    ls="none",
                    label="mean curve reaches target",
                )
            )
        fig.legend(
            handles=handles,
            loc="outside upper center",
            ncols=min(len(handles), 4),
            fontsize="small",
        )
        _partial_note(fig, epochs.drop_duplicates("trial_id"))
    return fig


def class_iou_table(trials: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Mean final IoU over seeds per (configuration, fraction) and class, plus mIoU."""
    columns = [f"IoU_{c}" for c in class_names if f"IoU_{c}" in trials] + ["val_mIoU"]
    table = (
        trials.groupby(["method", "variant", "label_fraction"], observed=True)[columns]
        .mean()
        .reset_index()
    )
    return table.rename(columns={f"IoU_{c}": c for c in class_names} | {"val_mIoU": "mIoU"})


def plot_class_iou_heatmap(trials: pd.DataFrame, class_names: list[str]) -> Figure:
    """Per-class final IoU (mean over seeds), rows = configuration and label fraction."""
    table = class_iou_table(trials, class_names)
    table.index = [
        f"{v}, {_percent(f)}"
        for v, f in zip(table["variant"], table["label_fraction"], strict=True)
    ]
    values = table.drop(columns=["method", "variant", "label_fraction"])
    fmt = ".1f" if values.max().max() > 1.5 else ".3f"
    with figure_style():
        fig, ax = plt.subplots(
            figsize=(1.05 * values.shape[1] + 2.6, 0.34 * values.shape[0] + 1.3),
            layout="constrained",
        )
        sns.heatmap(
            values,
            annot=True,
            fmt=fmt,
            cmap="cividis",
            linewidths=0.5,
            linecolor="white",
            cbar_kws={"label": "IoU (mean over seeds)"},
            ax=ax,
            annot_kws={"fontsize": 7},
        )
        ax.set_xlabel("class")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(False)
        _partial_note(fig, trials)
    return fig


def plot_pareto(
    trials: pd.DataFrame,
    clock: str = "wall",
    accountings: tuple[str, ...] = ("incl_pretrain", "amortised"),
    confidence: float = CONFIDENCE,
) -> Figure:
    """Final mean mIoU against mean total training time, one point per configuration and label
    fraction (annotated with the fraction); the step line joins the Pareto-optimal points (no
    other point is both faster and better)."""
    summary = summarise(trials, confidence=confidence)
    styles = variant_styles(summary["variant"])
    columns = [f"cum_{clock}_s" + ("" if a == "own" else f"_{a}") for a in accountings]
    scale, unit = _time_scale(float(summary[columns].max().max()))
    with figure_style():
        fig, axes = plt.subplots(
            1,
            len(accountings),
            figsize=(4.2 * len(accountings), 3.5),
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        for ax, accounting, column in zip(axes[0], accountings, columns, strict=True):
            points = pareto_front(summary, column)
            for variant, cell in points.groupby("variant", sort=False):
                style = styles[variant]
                ax.errorbar(
                    cell[column] / scale,
                    cell["mean"],
                    yerr=[
                        cell["mean"] - _clipped(cell["ci_low"]),
                        _clipped(cell["ci_high"]) - cell["mean"],
                    ],
                    fmt=style["marker"],
                    color=style["color"],
                    ms=5,
                    lw=0.8,
                    capsize=2,
                    label=variant,
                )
                for _, p in cell.iterrows():
                    ax.annotate(
                        _percent(p["label_fraction"]),
                        (p[column] / scale, p["mean"]),
                        xytext=(4, -9),
                        textcoords="offset points",
                        fontsize=6.5,
                        color=style["color"],
                    )
            front = points[points["on_front"]]
            ax.step(
                front[column] / scale,
                front["mean"],
                where="post",
                color="#333333",
                lw=1.0,
                ls="--",
                label="Pareto front",
                zorder=1,
            )
            ax.set_title(f"time {ACCOUNTING_LABELS[accounting]}")
            ax.set_xlabel(f"mean total {clock} time [{unit}]")
            ax.set_xlim(left=0)
        axes[0, 0].set_ylabel("val mIoU (final, mean over seeds)")
        axes[0, -1].legend(loc="lower right", fontsize="small")
        _partial_note(fig, trials)
    return fig


def plot_miou_vs_pretrain_length(
    trials: pd.DataFrame, confidence: float = CONFIDENCE, metric: str = "val_mIoU"
) -> Figure:
    """Final mIoU against pretraining length (``pretrain.budget.value``), one line per label
    fraction: mean over seeds with a Student-t band; dashed, the supervised mean at that
    fraction. (mIoU against total training time per length is the Pareto figure.)"""
    pretrained = trials[trials["method"].isin(arms.pretraining())]
    rows = []
    for (fraction, length), cell in pretrained.groupby(["label_fraction", "pretrain_epochs"]):
        mean, low, high = t_interval(cell[metric], confidence)
        rows.append({"fraction": fraction, "length": length, "mean": mean, "low": low,
                     "high": high})  # fmt: skip
    summary = pd.DataFrame(rows)
    palette = sns.color_palette("viridis", n_colors=max(1, summary["fraction"].nunique()))
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.0, 3.6), layout="constrained")
        for color, (fraction, cell) in zip(palette, summary.groupby("fraction"), strict=True):
            cell = cell.sort_values("length")
            ax.plot(cell["length"], cell["mean"], color=color, marker="o", ms=4, lw=1.6,
                    label=f"{_percent(fraction)} labels")  # fmt: skip
            _band(ax, cell["length"], cell["low"], cell["high"], color)
            supervised = trials[(trials["method"] == arms.reference().name)
                                & np.isclose(trials["label_fraction"], fraction)]  # fmt: skip
            if not supervised.empty:
                ax.axhline(supervised[metric].mean(), color=color, ls="--", lw=1.0)
        lengths = sorted(summary["length"].unique())
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("pretraining length (pretrain.budget.value, log scale)")
        ax.set_ylabel("val mIoU (final epoch)")
        ax.legend(title=f"mean, {confidence:.0%} t-interval; dashed: supervised",
                  loc="lower right", fontsize="small", title_fontsize="small")  # fmt: skip
        _partial_note(fig, trials)
    return fig


def save_figure(fig: Figure, out_dir: Path, name: str) -> dict[str, Path]:
    """Write `name`.png (200 dpi) and `name`.svg under `out_dir`; closes the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{name}.png", "svg": out_dir / f"{name}.svg"}
    with figure_style():
        fig.savefig(paths["png"], dpi=PNG_DPI, facecolor="white")
        fig.savefig(paths["svg"], facecolor="white")
    plt.close(fig)
    return paths
