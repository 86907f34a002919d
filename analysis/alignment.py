"""Target alignment in the report: what each pretraining's supervision could reach, and what
its head learnt (the ``align/*`` metrics of the pretraining runs, model.evaluation.diagnostics).

One row per statistic, mean and range over the study's pretraining runs (one per seed and
pretraining configuration). Read together: the ceiling bounds what a head trained only on the
pseudo-labels can score against the BEV labels; the head's mIoU on reached cells against that
ceiling says how much of the reachable signal it learnt; the reach says how much of the grid the
signal touches at all.
"""

from __future__ import annotations

import pandas as pd

from model import names

# (statistic, what it is), in the order the report lists them.
STATISTICS = (
    ("reach", "share of BEV cells a valid ray reaches"),
    ("ceiling_mIoU", "pseudo-labels splatted into BEV vs BEV labels (all cells)"),
    ("ceiling_reached_mIoU", "the same, on reached cells only"),
    ("perspective_mIoU", "BEV labels reprojected vs pseudo-labels (image pixels)"),
    ("chance_mIoU", "a uniformly random prediction vs BEV labels (expected, all cells)"),
    ("head_mIoU", "pretrained head vs BEV labels (all cells: pretrain/val_mIoU)"),
    ("head_reached_mIoU", "pretrained head vs BEV labels, reached cells only"),
    ("head_perspective_mIoU", "pretrained head reprojected vs pseudo-labels"),
)
HEAD_MIOU = names.val_metric("pretrain", names.MIOU)


def alignment_runs(runs: list) -> pd.DataFrame:
    """One row per pretraining run that logged ``align/*``: its key, seed and every value
    (``reach``, ``reach_divider``, ``ceiling_mIoU``, ..., ``head_mIoU``)."""
    rows = []
    for run in runs:
        metrics = run.data.metrics
        values = {
            key[len(names.ALIGN_PREFIX) :]: value
            for key, value in metrics.items()
            if key.startswith(names.ALIGN_PREFIX)
        }
        if not values:
            continue
        rows.append(
            {
                "pretrain_key": run.data.tags.get(names.PRETRAIN_KEY),
                "seed": run.data.params.get(names.SEED),
                "head_mIoU": metrics.get(HEAD_MIOU, float("nan")),
                **values,
            }
        )
    return pd.DataFrame(rows)


def alignment_table(runs: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """statistic | meaning | mean | min | max | runs, over the pretraining runs; per-class reach
    rows after the main ones. Empty when no run logged alignment."""
    if runs.empty:
        return pd.DataFrame(columns=["statistic", "meaning", "mean", "min", "max", "runs"])
    rows = list(STATISTICS) + [
        (f"reach_{c}", f"reach of {c} cells") for c in class_names if f"reach_{c}" in runs
    ]
    out = []
    for statistic, meaning in rows:
        values = runs[statistic].dropna() if statistic in runs else pd.Series(dtype=float)
        if values.empty:
            continue
        out.append(
            {
                "statistic": statistic,
                "meaning": meaning,
                "mean": values.mean(),
                "min": values.min(),
                "max": values.max(),
                "runs": len(values),
            }
        )
    return pd.DataFrame(out)
