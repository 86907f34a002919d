"""Report CLI: what one experiment's MLflow runs say, as HTML, figures and CSVs.

    python -m analysis.report --experiment NAME [--tracking-uri URI] [--out DIR]

writes DIR/report.html (self-contained: figures embedded, tables with numbers, the sweep's spec
and environment), DIR/figures/*.png|svg, DIR/epochs.csv (the tidy frame), DIR/trials.csv,
DIR/summary.csv, DIR/verdicts.csv (paired verdicts against the reference cell),
DIR/time_to_target.csv, DIR/verdicts.md (both as markdown tables), DIR/label_savings.csv,
DIR/class_iou.csv, and logs the figures, the report and the tables to the sweep's parent run
under `report/`. Input problems exit with status 2 and one line on stderr.

The numbers and figures are `analysis.findings`' (`analyse`), their HTML and markdown
`analysis.display`'s; this module writes them and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.display import render_html, verdicts_markdown
from analysis.findings import Analysis, analyse, make_figures
from analysis.inputs import (
    check_store,
    fraction_arg,
    input_errors,
    one_line_error,
    probability_arg,
    study_parser,
)
from analysis.load import Study, load_study, resolve_tracking_uri
from analysis.stats import CONFIDENCE, POWER
from model.cli import dir_to_create, int_at_least, stay_offline

log = logging.getLogger(__name__)


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
        **({"sequential.csv": analysis.sequential} if analysis.sequential is not None else {}),
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
    "sequential.csv",
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
        if (out_dir / name).exists():  # quality.csv, sequential.csv: those studies only
            client.log_artifact(run_id, str(out_dir / name), "report")
    return run_id


def report_finished_sweep(experiment: str, tracking_uri: str, out_dir: Path) -> Path | None:
    """The report with the CLI's defaults, written to `out_dir` and logged to the sweep run
    under `report/`: what a sweep does when all its trials finished. A failure is logged as
    one warning and returns None; the sweep's own result stands either way."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a --quiet sweep prints no library warnings
            study = load_study(experiment, tracking_uri, progress=False)
            analysis = analyse(study)
            paths = write_report(analysis, out_dir)
            logged = log_to_sweep_run(study, out_dir)
    except Exception as exc:  # noqa: BLE001 (any failure of the report leaves the sweep done)
        log.warning(
            "could not write the report (%s); run: python -m analysis.report --experiment %s "
            "--tracking-uri %s",
            (str(exc).splitlines() or [type(exc).__name__])[0],
            experiment,
            tracking_uri,
        )
        return None
    where = " and under the sweep run's report/" if logged else ""
    log.info("report: %s%s", paths["report.html"], where)
    return paths["report.html"]


# --- the CLI ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = study_parser(
        "python -m analysis.report",
        "Curves, tables and an HTML report from a study's MLflow runs.",
        "MLflow experiment (the study name)",
    )
    parser.add_argument(
        "--out",
        type=dir_to_create,
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
