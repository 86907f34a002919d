"""How the report shows a study's findings (``analysis.findings``): tables formatted for
reading, ``verdicts.md`` and the self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from analysis.findings import FIGURES, Analysis
from analysis.stats import CONFIDENCE, Cell
from analysis.target_time import TARGET_ACCOUNTINGS

TEMPLATES = Path(__file__).parent / "templates"
FIGURE_CAPTIONS = {
    "miou_vs_pretrain_length": "Final validation mIoU against pretraining length, per label "
    "fraction: mean over seeds with a two-sided {confidence:.0%} Student-t band; dashed: the "
    "supervised mean at that fraction. mIoU against total training time per length: Pareto.",
    "gain_vs_quality": "Paired gain of each pretraining arm over supervised at the same label "
    "fraction (mean over seeds, {confidence:.0%} Student-t interval) against the quality of its "
    "pseudo-labels (their mIoU against the BEV labels reprojected into the val images); dashed "
    "band: what supervised loses by halving the labels (paired); dotted: least-squares line.",
    "miou_vs_fraction": "Final validation mIoU against BEV label fraction (log scale): mean over "
    "seeds with a two-sided {confidence:.0%} Student-t interval, faint dots single seeds; dashed: "
    "supervised with 100% labels; dotted: label-savings point.",
    "miou_vs_time": "Validation mIoU against cumulative {clock} training time, per label "
    "fraction (mean over seeds, {confidence:.0%} t-band clipped to [0, 1]); top row counts each "
    "pretrained trial's whole pretraining, bottom row only its share (pretraining / trials "
    "sharing it). Dotted: the target mIoU; stars: where a mean curve first reaches it.",
    "class_iou_heatmap": "Per-class final IoU, mean over seeds.",
    "pareto": "Mean final mIoU against mean total {clock} time per configuration and label "
    "fraction ({confidence:.0%} t-interval); dashed: Pareto front (nothing else is both faster "
    "and better).",
}


def _fmt_cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if column.startswith("cum_"):
            return f"{value:.1f}"
        if column.startswith("time_ratio"):
            return f"{value:.3f}"
        if column in ("label_fraction", "labelled_samples", "reached_share", "confidence"):
            return f"{value:g}"
        return f"{value:.4f}"
    return str(value)


def format_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Strings as the report prints them: mIoU/IoU 4 decimals, seconds 1, fractions as given."""
    out = frame.copy().astype(object)
    for column in out.columns:
        out[column] = [_fmt_cell(column, v) for v in frame[column].tolist()]
    return out


def savings_for_display(savings: pd.DataFrame) -> pd.DataFrame:
    """The label-savings table with "not reached" spelled out."""
    if savings.empty:
        return savings
    table = savings[
        [
            "variant",
            "reference_variant",
            "reference_mIoU",
            "fraction",
            "ci_low",
            "ci_high",
            "mIoU_at_fraction",
            "time_ratio_incl_pretrain",
            "time_ratio_amortised",
            "reached_share",
            "n_seeds",
        ]
    ].copy()
    shown = format_table(table)
    for column in ("fraction", "ci_low", "ci_high"):
        shown[column] = [
            "not reached" if v is None or pd.isna(v) else f"{v:g}" for v in table[column]
        ]
    return shown


def _signed(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:+.4f}"


def _interval(low: float, high: float, fmt=_signed, open_end: str = "–") -> str:
    if pd.isna(low) and pd.isna(high):
        return "–"
    return f"[{fmt(low)}, {open_end if pd.isna(high) else fmt(high)}]"


def verdicts_for_display(verdicts: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per cell: the per-seed differences to the reference, their mean, both intervals,
    the verdict and, next to it, the smallest effect the seeds detect."""
    if verdicts.empty:
        return verdicts
    level = f"{confidence:.0%}"
    power = f"{verdicts['power'].iloc[0]:.0%}"
    return pd.DataFrame(
        {
            "cell": [
                f"{v}@{f}"
                for v, f in zip(verdicts["variant"], verdicts["label_fraction"], strict=True)
            ],
            "vs": verdicts["reference"],
            "seeds": verdicts["n_seeds"],
            "per-seed differences": verdicts["diffs"],
            "mean difference": [_signed(v) for v in verdicts["mean_diff"]],
            f"{level} t-interval": [
                _interval(lo, hi)
                for lo, hi in zip(verdicts["t_low"], verdicts["t_high"], strict=True)
            ],
            f"{level} bootstrap": [
                _interval(lo, hi)
                for lo, hi in zip(verdicts["boot_low"], verdicts["boot_high"], strict=True)
            ],
            "verdict": verdicts["verdict"],
            f"smallest detectable ({power} power)": [
                "–" if pd.isna(v) else f"{v:.4f}" for v in verdicts["mde"]
            ],
        }
    )


def sequential_for_display(table: pd.DataFrame | None) -> pd.DataFrame:
    """One row per comparison of a sequential study: the round it stopped at and why, its
    seeds, the mean difference, the repeated CI (sequentially valid) and the verdict."""
    if table is None or table.empty:
        return pd.DataFrame()
    rows = [
        {
            "cell": f"{r.variant}@{r.label_fraction}",
            "vs": r.reference,
            "stopped at round": f"{r.round} of {r.rounds}",
            "seeds": r.n_seeds,
            "mean difference": _signed(r.mean_diff),
            "repeated CI (sequentially valid)": _interval(r.rci_low, r.rci_high),
            "verdict": r.verdict,
            "why": r.reason,
        }
        for r in table.itertuples()
    ]
    return pd.DataFrame(rows)


def sequential_markdown(analysis: Analysis) -> str:
    """verdicts.md's section for a sequential study (empty for a fixed-seed one)."""
    if analysis.sequential is None:
        return ""
    table = sequential_for_display(analysis.sequential)
    labels = [text for text in analysis.sequential["interval"] if text]
    return (
        "## Sequential verdicts (the study's): seeds ran in rounds\n\n"
        "Each comparison stopped at the first round whose look decided it; its interval is that "
        "round's "
        + (labels[0].rsplit(", round", 1)[0] + ")" if labels else "repeated confidence interval")
        + ", valid wherever the rounds stopped. The fixed-n table below is not (its cells' "
        "seeds were chosen by the rounds).\n\n"
        + (markdown_table(table) if not table.empty else "Not computed.\n")
    )


def time_to_target_for_display(
    to_target: pd.DataFrame, reference: Cell, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """One row per arm; per time accounting the time to target with its bootstrap interval
    ("not reached" spelled out) and the ratio to the reference's own time."""
    if to_target.empty:
        return to_target

    def seconds(value: float) -> str:
        return "not reached" if pd.isna(value) else f"{value:.1f}"

    rows = []
    arms = to_target.groupby(["method", "variant", "label_fraction"], observed=True, sort=False)
    for (_, variant, fraction), arm in arms:
        row = {
            "arm": f"{variant}@{fraction}",
            "seeds": int(arm["n_seeds"].max()),
            "resamples never reaching": f"{arm['never_share'].max():.0%}",
        }
        for r in arm.itertuples():
            label = TARGET_ACCOUNTINGS[r.accounting]
            interval = _interval(r.ci_low_s, r.ci_high_s, seconds, "not reached")
            row[f"time [s], {label} ({confidence:.0%} CI)"] = (
                seconds(r.time_s) if not r.reached else f"{seconds(r.time_s)} {interval}"
            )
            row[f"ratio, {label}"] = "–" if pd.isna(r.ratio) else f"{r.ratio:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a frame of strings."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |"]
    lines.append("|" + "---|" * len(frame.columns))
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def verdicts_markdown(analysis: Analysis) -> str:
    """verdicts.md: the paired verdicts and the time-to-target table."""
    ref = f"{analysis.reference[0]}@{analysis.reference[1]}"
    parts = [f"# {analysis.study.experiment_name}: paired verdicts against {ref}\n"]
    if analysis.sequential is not None:
        parts.append(sequential_markdown(analysis))
        parts.append("## Fixed-n paired t-intervals (for reference only: not sequentially valid)\n")
    verdicts = verdicts_for_display(analysis.verdicts, analysis.confidence)
    parts.append(markdown_table(verdicts) if not verdicts.empty else "Not computed.\n")
    parts.append(f"\n## Time to target mIoU {analysis.target:.4f} (ratio: to {ref}'s own time)\n")
    to_target = time_to_target_for_display(
        analysis.time_to_target, analysis.reference, analysis.confidence
    )
    parts.append(markdown_table(to_target) if not to_target.empty else "Not computed.\n")
    if analysis.quality is not None:
        parts.append(analysis.quality.markdown(analysis.confidence))
    return "\n".join(parts)


TRIAL_COLUMNS = [
    "trial_id",
    "run_name",
    "method",
    "variant",
    "label_fraction",
    "labelled_samples",
    "seed",
    "status",
    "epochs_done",
    "val_mIoU",
    "cum_wall_s",
    "cum_wall_s_incl_pretrain",
    "cum_wall_s_amortised",
    "cum_gpu_s",
    "cum_gpu_s_amortised",
]


def analysis_environment() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("mlflow", "pandas", "numpy", "scipy", "matplotlib", "seaborn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def render_html(analysis: Analysis, figure_pngs: dict[str, Path]) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    study = analysis.study
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"])
    )

    def table(frame: pd.DataFrame) -> str:
        return format_table(frame).to_html(index=False, classes="num", border=0, escape=True)

    figures = []
    for name in FIGURES:
        if name in figure_pngs:
            data = base64.b64encode(figure_pngs[name].read_bytes()).decode("ascii")
            caption = FIGURE_CAPTIONS[name].format(
                confidence=analysis.confidence, clock=analysis.clock
            )
            figures.append({"name": name, "data": data, "caption": caption})
    sweep = study.sweep
    savings = savings_for_display(analysis.savings)
    verdicts = verdicts_for_display(analysis.verdicts, analysis.confidence)
    to_target = time_to_target_for_display(
        analysis.time_to_target, analysis.reference, analysis.confidence
    )

    def plain(frame: pd.DataFrame) -> str:
        return frame.to_html(index=False, classes="num", border=0) if not frame.empty else ""

    context = {
        "study": study,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "status_counts": study.status_counts,
        "notes": analysis.notes,
        "figures": figures,
        "savings_html": plain(savings),
        "verdicts_html": plain(verdicts),
        "sequential_html": plain(sequential_for_display(analysis.sequential)),
        "time_to_target_html": plain(to_target),
        "reference": f"{analysis.reference[0]}@{analysis.reference[1]}",
        "target": analysis.target,
        "power": analysis.power,
        "summary_html": table(analysis.summary),
        "class_iou_html": table(analysis.class_iou),
        "alignment_html": table(analysis.alignment) if not analysis.alignment.empty else None,
        "quality_summary": analysis.quality.summary(analysis.confidence)
        if analysis.quality is not None
        else None,
        "quality_html": table(analysis.quality.table) if analysis.quality is not None else None,
        "trials_html": table(study.trials[[c for c in TRIAL_COLUMNS if c in study.trials]]),
        "sweep": sweep,
        "sweep_environment": json.dumps(sweep.environment, indent=2, sort_keys=True)
        if sweep and sweep.environment
        else None,
        "analysis_environment": analysis_environment(),
        "confidence": analysis.confidence,
        "n_boot": analysis.n_boot,
        "seed": analysis.seed,
        "clock": analysis.clock,
        "escape": html.escape,
    }
    return env.get_template("report.html.j2").render(**context)
