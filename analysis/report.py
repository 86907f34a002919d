"""Report CLI: what one experiment's MLflow runs say, as HTML, figures and CSVs.

    python -m analysis.report --experiment NAME [--tracking-uri URI] [--out DIR]

writes DIR/report.html (self-contained: figures embedded, tables with numbers, the sweep's spec
and environment), DIR/figures/*.png|svg, DIR/epochs.csv (the tidy frame), DIR/trials.csv,
DIR/summary.csv, DIR/label_savings.csv, DIR/class_iou.csv, and logs the figures and the report to
the sweep's parent run under `report/`. Input problems exit with status 2 and one line on stderr.
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

from analysis.load import AnalysisError, Study, analysed_trials, load_study, resolve_tracking_uri
from analysis.stats import CONFIDENCE, label_savings_table, summarise

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
FIGURES = ("miou_vs_fraction", "miou_vs_time", "class_iou_heatmap", "pareto")
FIGURE_CAPTIONS = {
    "miou_vs_fraction": "Final validation mIoU against BEV label fraction (log scale): mean over "
    "seeds with a two-sided {confidence:.0%} Student-t interval, faint dots single seeds; dashed: "
    "supervised with 100% labels; dotted: label-savings point.",
    "miou_vs_time": "Validation mIoU against cumulative {clock} training time, per label "
    "fraction; top row counts each pretrained trial's whole pretraining, bottom row only its "
    "share (pretraining / trials sharing it).",
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
    savings: pd.DataFrame
    class_iou: pd.DataFrame
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
    savings = label_savings_table(
        trials, confidence=confidence, n_boot=n_boot, seed=seed, clock=clock
    )
    if savings.empty:
        notes.append(
            "label savings not computed: needs supervised trials at label fraction 1.0 and "
            "pretrained trials"
        )
    return Analysis(
        study=study,
        trials=trials,
        epochs=epochs,
        summary=summarise(trials, confidence=confidence),
        savings=savings,
        class_iou=class_iou_table(trials, study.class_names),
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
    return {
        "miou_vs_fraction": curves.plot_miou_vs_fraction(
            analysis.trials, analysis.confidence, savings
        ),
        "miou_vs_time": curves.plot_miou_vs_time(
            analysis.epochs, clock=analysis.clock, confidence=analysis.confidence
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
    context = {
        "study": study,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "status_counts": study.status_counts,
        "notes": analysis.notes,
        "figures": figures,
        "savings_html": (
            savings.to_html(index=False, classes="num", border=0) if not savings.empty else ""
        ),
        "summary_html": table(analysis.summary),
        "class_iou_html": table(analysis.class_iou),
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
        "label_savings.csv": analysis.savings,
        "class_iou.csv": analysis.class_iou,
    }
    for name, frame in csvs.items():
        frame.to_csv(out_dir / name, index=False)
        paths[name] = out_dir / name
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(render_html(analysis, pngs), encoding="utf-8")
    return paths


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
    for name in ("report.html", "summary.csv", "label_savings.csv", "class_iou.csv"):
        client.log_artifact(run_id, str(out_dir / name), "report")
    return run_id


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Curves, tables and an HTML report from a study's MLflow runs.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the study name)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///studies/<experiment>/mlflow.db",
    )
    parser.add_argument(
        "--out", type=Path, help="output directory (default: studies/<experiment>/report)"
    )
    parser.add_argument("--confidence", type=float, default=CONFIDENCE)
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap generator seed")
    parser.add_argument("--clock", choices=("wall", "gpu"), default="wall")
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mlflow.exceptions import MlflowException

    if not 0 < args.confidence < 1:
        print("error: --confidence must be between 0 and 1", file=sys.stderr)
        return 2
    out_dir = args.out or Path("studies") / args.experiment.replace("/", "_") / "report"
    try:
        uri = resolve_tracking_uri(args.tracking_uri, args.experiment)
        study = load_study(args.experiment, uri)
        analysis = analyse(
            study, args.confidence, args.n_boot, args.seed, args.clock, args.include_partial
        )
        paths = write_report(analysis, out_dir)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: MLflow: {exc.message.strip().splitlines()[0]}", file=sys.stderr)
        return 2
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
