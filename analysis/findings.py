"""What one study's MLflow runs say: the numbers of a report (``Analysis``, computed once by
``analyse``) and its figures (``make_figures``), shown by the report CLI (``analysis.report``),
its HTML and markdown (``analysis.display``) and the notebook alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.alignment import alignment_table
from analysis.load import AnalysisError, Study, analysed_trials
from analysis.quality import Quality
from analysis.savings import label_savings_table
from analysis.sequential_study import design_of, sequential_verdicts
from analysis.stats import CONFIDENCE, POWER, Cell, default_reference, paired_verdicts, summarise
from analysis.target_time import time_to_target
from model import arms

FIGURES = ("miou_vs_fraction", "miou_vs_pretrain_length", "gain_vs_quality", "miou_vs_time",
           "class_iou_heatmap", "pareto")  # fmt: skip
# Drawn for studies of several pretraining lengths, of several pseudo-label sources, only.
OPTIONAL_FIGURES = ("miou_vs_pretrain_length", "gain_vs_quality")


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
    # A sequential study's verdicts (analysis.sequential_study): the ones to report; None for
    # a fixed-seed study.
    sequential: pd.DataFrame | None
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
    sequential = None
    if (design := design_of(study.sweep)) is not None:
        sequential = sequential_verdicts(trials, design[0], design[1] or reference)
        notes.append(
            "seeds ran in rounds (a group-sequential design): the sequential verdicts and their "
            "repeated CIs are the study's; the fixed-n t-intervals are not valid after the rounds' "
            "stopping and are shown for reference only"
        )
    return Analysis(
        study=study,
        quality=quality,
        sequential=sequential,
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
    from analysis.savings import LabelSavings

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
