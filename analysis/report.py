"""Report CLI: what one experiment's MLflow runs say, as HTML, figures and CSVs.

    python -m analysis.report --experiment NAME [--tracking-uri URI] [--out DIR]

writes DIR/report.html (self-contained: figures embedded, tables with numbers, the sweep's spec
and environment), DIR/figures/*.png|svg, DIR/epochs.csv (the tidy frame), DIR/trials.csv,
DIR/summary.csv, DIR/verdicts.csv (paired verdicts against the reference cell),
DIR/time_to_target.csv, DIR/verdicts.md (both as markdown tables), DIR/label_savings.csv,
DIR/class_iou.csv, and logs the figures, the report and the tables to the sweep's parent run
under `report/`. Input problems exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from analysis.alignment import alignment_table
from analysis.inputs import (
    check_store,
    fraction_arg,
    input_errors,
    one_line_error,
    output_dir,
    probability_arg,
    study_parser,
)
from analysis.load import AnalysisError, Study, analysed_trials, load_study, resolve_tracking_uri
from analysis.quality import Quality
from analysis.stats import (
    CONFIDENCE,
    POWER,
    TARGET_ACCOUNTINGS,
    Cell,
    default_reference,
    label_savings_table,
    paired_verdicts,
    summarise,
    time_to_target,
)
from model import arms
from model.cli import int_at_least, stay_offline

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
FIGURES = ("miou_vs_fraction", "miou_vs_pretrain_length", "gain_vs_quality", "miou_vs_time",
           "class_iou_heatmap", "pareto")  # fmt: skip
# Drawn for studies of several pretraining lengths, of several pseudo-label sources, only.
OPTIONAL_FIGURES = ("miou_vs_pretrain_length", "gain_vs_quality")
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


@dataclass
class Analysis:
    """The numbers of one report: computed once, shown by the CLI and the notebook."""

    study: Study
    trials: pd.DataFrame  # the trials the statistics use
    epochs: pd.DataFrame  # their epochs
    summary: pd.DataFrame
    verdicts: pd.DataFrame  # paired verdicts against `reference`
    time_to_target: pd.DataFrame
    reference: Cell
    target: float  # the mIoU time-to-target aims at
    power: float
    savings: pd.DataFrame
    class_iou: pd.DataFrame
    alignment: pd.DataFrame  # target alignment of the pretraining runs (analysis.alignment)
    quality: Quality | None  # a pseudo-label quality study's table (analysis.quality)
    confidence: float
    clock: str
    n_boot: int
    seed: int
    notes: list[str] = field(default_factory=list)


def analyse(
    study: Study,
    confidence: float = CONFIDENCE,
    n_boot: int = 2000,
    seed: int = 0,
    clock: str = "wall",
    include_partial: bool | None = None,
    reference: Cell | None = None,
    target: float | None = None,
    power: float = POWER,
) -> Analysis:
    from analysis.curves import class_iou_table

    trials = analysed_trials(study.trials, include_partial)
    if trials.empty:
        raise AnalysisError(
            f"experiment {study.experiment_name!r}: no finished or running trial with val/mIoU"
        )
    notes = list(study.warnings)
    if trials["partial"].any():
        notes.append(
            "no trial has finished yet: the statistics use the latest epoch of running trials"
        )
    epochs = study.epochs[study.epochs["trial_id"].isin(trials["trial_id"])]
    reference = reference or default_reference(trials)
    verdicts = paired_verdicts(trials, reference, "val_mIoU", confidence, n_boot, seed, power)
    to_target = time_to_target(
        epochs, target, reference, clock, confidence=confidence, n_boot=n_boot, seed=seed
    )
    if verdicts.empty:
        notes.append(
            f"paired verdicts not computed: no trials in the reference cell "
            f"{reference[0]}@{reference[1]}"
            + ("" if target is not None else " (nor time-to-target: no --target given)")
        )
    savings = label_savings_table(
        trials, confidence=confidence, n_boot=n_boot, seed=seed, clock=clock
    )
    if savings.empty:
        notes.append(
            "label savings not computed: needs supervised trials at label fraction 1.0 and "
            "pretrained trials"
        )
    quality = Quality.of(trials, study.alignment, confidence, n_boot, seed)
    return Analysis(
        study=study,
        quality=quality,
        trials=trials,
        epochs=epochs,
        summary=summarise(trials, confidence=confidence),
        verdicts=verdicts,
        time_to_target=to_target,
        reference=reference,
        target=float(to_target["target"].iloc[0]) if not to_target.empty else math.nan,
        power=power,
        savings=savings,
        class_iou=class_iou_table(trials, study.class_names),
        alignment=alignment_table(study.alignment, study.class_names),
        confidence=confidence,
        clock=clock,
        n_boot=n_boot,
        seed=seed,
        notes=notes,
    )


def make_figures(analysis: Analysis) -> dict:
    """name -> matplotlib Figure, for the report and for inline display in the notebook."""
    from analysis import curves
    from analysis.stats import LabelSavings

    savings = [LabelSavings(**row) for row in analysis.savings.to_dict("records")]
    trials, lengths = analysis.trials, {}
    pretrained = trials[trials["method"].isin(arms.pretraining())]
    if "pretrain_epochs" in pretrained and pretrained["pretrain_epochs"].nunique() > 1:
        lengths["miou_vs_pretrain_length"] = curves.plot_miou_vs_pretrain_length(
            trials, analysis.confidence
        )
    if analysis.quality is not None:
        lengths["gain_vs_quality"] = analysis.quality.figure(analysis.confidence)
    return {
        **lengths,
        "miou_vs_fraction": curves.plot_miou_vs_fraction(
            analysis.trials, analysis.confidence, savings
        ),
        "miou_vs_time": curves.plot_miou_vs_time(
            analysis.epochs,
            clock=analysis.clock,
            confidence=analysis.confidence,
            time_to_target=analysis.time_to_target,
        ),
        "class_iou_heatmap": curves.plot_class_iou_heatmap(
            analysis.trials, analysis.study.class_names
        ),
        "pareto": curves.plot_pareto(
            analysis.trials, clock=analysis.clock, confidence=analysis.confidence
        ),
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


def write_report(analysis: Analysis, out_dir: Path) -> dict[str, Path]:
    """Write figures, CSVs and report.html under `out_dir`; returns the paths by name."""
    from analysis.curves import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    pngs = {}
    for name, fig in make_figures(analysis).items():
        saved = save_figure(fig, out_dir / "figures", name)
        pngs[name] = saved["png"]
        paths[f"{name}.png"] = saved["png"]
        paths[f"{name}.svg"] = saved["svg"]
    csvs = {
        "epochs.csv": analysis.study.epochs,
        "trials.csv": analysis.study.trials,
        "summary.csv": analysis.summary,
        "verdicts.csv": analysis.verdicts,
        "time_to_target.csv": analysis.time_to_target,
        "label_savings.csv": analysis.savings,
        "class_iou.csv": analysis.class_iou,
        "alignment.csv": analysis.alignment,
        **({"quality.csv": analysis.quality.table} if analysis.quality is not None else {}),
    }
    for name, frame in csvs.items():
        frame.to_csv(out_dir / name, index=False)
        paths[name] = out_dir / name
    paths["verdicts.md"] = out_dir / "verdicts.md"
    paths["verdicts.md"].write_text(verdicts_markdown(analysis), encoding="utf-8")
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(render_html(analysis, pngs), encoding="utf-8")
    return paths


LOGGED_FILES = (
    "report.html",
    "summary.csv",
    "verdicts.csv",
    "time_to_target.csv",
    "verdicts.md",
    "label_savings.csv",
    "class_iou.csv",
    "alignment.csv",
    "quality.csv",
)


def log_to_sweep_run(study: Study, out_dir: Path) -> str | None:
    """Log report.html, the CSVs and the figures to the sweep's parent run under `report/`, so
    they show in the MLflow UI. Returns the run id, or None when there is no sweep run."""
    from mlflow.tracking import MlflowClient

    if study.sweep is None:
        log.warning(
            "no sweep run (tag bev.role=sweep) in %s: report not logged", study.experiment_name
        )
        return None
    client = MlflowClient(tracking_uri=study.tracking_uri)
    run_id = study.sweep.run_id
    client.log_artifacts(run_id, str(out_dir / "figures"), "report/figures")
    for name in LOGGED_FILES:
        if (out_dir / name).exists():  # quality.csv: quality studies only
            client.log_artifact(run_id, str(out_dir / name), "report")
    return run_id


# --- the CLI ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = study_parser(
        "python -m analysis.report",
        "Curves, tables and an HTML report from a study's MLflow runs.",
        "MLflow experiment (the study name)",
    )
    parser.add_argument(
        "--out",
        type=output_dir,
        help="output directory (default: studies/<experiment>/report)",
    )
    parser.add_argument(
        "--confidence",
        type=probability_arg,
        default=CONFIDENCE,
        help=f"interval level (default {CONFIDENCE})",
    )
    parser.add_argument(
        "--n-boot",
        type=int_at_least(100, " (fewer resamples give unstable intervals)"),
        default=2000,
        help="bootstrap replicates (default 2000)",
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help="bootstrap generator seed (default 0)"
    )
    parser.add_argument(
        "--clock", choices=("wall", "gpu"), default="wall", help="time clock (default wall)"
    )
    parser.add_argument(
        "--target",
        type=fraction_arg,
        help="mIoU for time-to-target (default: the reference's final mean over seeds)",
    )
    parser.add_argument(
        "--power",
        type=probability_arg,
        default=POWER,
        help=f"power of the smallest detectable effect printed next to each verdict "
        f"(default {POWER})",
    )
    parser.add_argument(
        "--include-partial",
        action="store_true",
        default=None,
        help="let running trials' latest epoch count in the statistics (default: only while "
        "no trial has finished)",
    )
    parser.add_argument(
        "--no-mlflow-log", action="store_true", help="do not log the report to the sweep run"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stay_offline()  # before MLflow is imported (the notebook's kernel inherits it too)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out_dir = args.out or Path("studies") / args.experiment.replace("/", "_") / "report"
    uri = resolve_tracking_uri(args.tracking_uri, args.experiment)
    try:
        check_store(uri)
        study = load_study(args.experiment, uri)
        analysis = analyse(
            study,
            args.confidence,
            args.n_boot,
            args.seed,
            args.clock,
            args.include_partial,
            args.reference,
            args.target,
            args.power,
        )
        paths = write_report(analysis, out_dir)
    except input_errors() as exc:
        return one_line_error(exc, uri)
    for note in analysis.notes:
        log.warning("note: %s", note)
    if not args.no_mlflow_log:
        try:
            run_id = log_to_sweep_run(study, out_dir)
            if run_id:
                log.info("logged the report to sweep run %s under report/", run_id)
        except Exception as exc:  # the report on disk is still good
            log.warning("could not log the report to MLflow: %s", str(exc).splitlines()[0])
    print(paths["report.html"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
