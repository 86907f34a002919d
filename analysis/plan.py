"""Seed planner: how many seeds a study needs, from a pilot's spread of paired differences.

    python -m analysis.plan --experiment NAME [--tracking-uri URI] [--effect 0.025]
        [--power 0.8] [--alpha 0.05] [--reference supervised@1.0] [--rounds 3:2:20]

For every (configuration, label fraction) cell of the pilot, the per-seed differences to the
reference cell (same seed: same label subset, same initialisation) give a standard deviation;
with it, the smallest number of seeds at which a two-sided paired t-test detects a true
difference of `--effect` with `--power`, and the smallest difference the pilot's own seeds
detect. Then, for the group-sequential design of ``--rounds`` (``analysis.sequential``: seeds
in rounds of FIRST, then STEP more, up to MAX), the seeds a comparison is expected to use under
the effect and under none, and the seeds of the fixed design of the same power. Prints tables;
writes nothing. Input problems exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from analysis.inputs import (
    check_store,
    fraction_arg,
    input_errors,
    one_line_error,
    probability_arg,
    study_parser,
)
from analysis.load import AnalysisError, analysed_trials, load_study, resolve_tracking_uri
from analysis.sequential import SequentialDesign, expected_seeds
from analysis.sequential_study import sequential_verdicts
from analysis.stats import (
    POWER,
    Cell,
    cell_trials,
    default_reference,
    paired_verdicts,
    seeds_needed,
)
from model.cli import stay_offline

PROG = "python -m analysis.plan"
DESCRIPTION = "Seeds needed for a paired comparison, from a pilot study's MLflow runs."
EFFECT = 0.025  # the paper's "+2.5 pp mIoU"
ALPHA = 0.05
PLAN_COLUMNS = {
    "cell": "cell",
    "n_seeds": "pilot seeds",
    "mean_diff": "mean diff",
    "sd_diff": "sd diff",
    "seeds_needed": "seeds needed",
    "mde": "detectable now",
}


def plan_table(
    trials: pd.DataFrame,
    effect: float = EFFECT,
    power: float = POWER,
    alpha: float = ALPHA,
    reference: Cell | None = None,
) -> pd.DataFrame:
    """Per cell of the pilot (final-epoch trials): paired seeds, mean and sd of the paired
    differences to `reference`, `seeds_needed` to detect `effect` with `power` at `alpha`
    (None: sd unknown or more than 1000), and `mde`, the smallest effect the pilot's seeds
    detect."""
    table = paired_verdicts(trials, reference, confidence=1 - alpha, n_boot=1, power=power)
    if table.empty:
        return table
    cells = zip(table["variant"], table["label_fraction"], strict=True)
    table.insert(0, "cell", [f"{variant}@{fraction}" for variant, fraction in cells])
    table["seeds_needed"] = [seeds_needed(effect, sd, power, alpha) for sd in table["sd_diff"]]
    return table[list(PLAN_COLUMNS)]


def format_plan(table: pd.DataFrame) -> str:
    """The plan as the CLI prints it: differences to 4 decimals, "> 1000" for no finite n."""

    def number(value: float, sign: str = "") -> str:
        return "–" if pd.isna(value) else f"{value:{sign}.4f}"

    shown = pd.DataFrame(
        {
            "cell": table["cell"],
            "n_seeds": table["n_seeds"],
            "mean_diff": [number(v, "+") for v in table["mean_diff"]],
            "sd_diff": [number(v) for v in table["sd_diff"]],
            "seeds_needed": [
                "> 1000" if pd.isna(n) else str(int(n)) for n in table["seeds_needed"]
            ],
            "mde": [number(v) for v in table["mde"]],
        }
    )
    return shown.rename(columns=PLAN_COLUMNS).to_string(index=False)


def sequential_plan(table: pd.DataFrame, design: SequentialDesign, effect: float) -> str:
    """Per cell: expected seeds of ``design`` under ``effect`` and under none (simulated, fixed
    generator seed), its power, and the fixed design's seeds at that power."""
    lines = []
    for cell, sd in zip(table["cell"], table["sd_diff"], strict=True):
        plan = expected_seeds(design, effect, sd)
        if pd.isna(plan.sequential):
            lines.append(f"  {cell}: no spread to plan with")
            continue
        fixed = "> 1000" if plan.fixed is None else str(plan.fixed)
        lines.append(
            f"  {cell}: {plan.sequential:.1f} seeds expected under the effect "
            f"({plan.power:.0%} power), {plan.under_null:.1f} under none; the fixed design of "
            f"that power: {fixed}"
        )
    return "\n".join(lines)


def rounds(text: str) -> SequentialDesign:
    """``FIRST:STEP:MAX`` -> a sequential design (argparse type: a bad value exits 2)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST:STEP:MAX, three integers")
    first, step, most = (int(part) for part in parts)
    try:
        return SequentialDesign(first=first, step=step, max=most)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = study_parser(PROG, DESCRIPTION, "MLflow experiment of the pilot study")
    parser.add_argument(
        "--effect",
        type=fraction_arg,
        default=EFFECT,
        help=f"paired mIoU difference to detect, absolute (default {EFFECT}: 2.5 pp)",
    )
    parser.add_argument(
        "--power", type=probability_arg, default=POWER, help=f"wanted power (default {POWER})"
    )
    parser.add_argument(
        "--alpha",
        type=probability_arg,
        default=ALPHA,
        help=f"two-sided significance level of the paired t-test (default {ALPHA})",
    )
    parser.add_argument(
        "--rounds",
        type=rounds,
        default=rounds("3:2:20"),
        help="sequential seeds FIRST:STEP:MAX (default 3:2:20): expected seeds per comparison",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stay_offline()
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    name = args.experiment
    uri = resolve_tracking_uri(args.tracking_uri, name)
    try:
        check_store(uri)
        study = load_study(name, uri)
        trials = analysed_trials(study.trials)
        n_seeds = int(trials["seed"].nunique())
        if n_seeds < 2:
            raise AnalysisError(
                f"experiment {name!r} has {n_seeds} seed(s); a pilot needs at least 2 to "
                "estimate the spread of paired differences"
            )
        reference = args.reference or default_reference(trials)
        table = plan_table(trials, args.effect, args.power, args.alpha, reference)
        if table.empty:
            raise AnalysisError(
                f"experiment {name!r} has no trials in the reference cell "
                f"{reference[0]}@{reference[1]}"
            )
    except input_errors() as exc:
        return one_line_error(exc, uri)
    print(
        f"Pilot {name!r}: {n_seeds} seeds; per-seed paired differences of final val mIoU to "
        f"{reference[0]}@{reference[1]}.\n"
        f"Seeds needed to detect a paired effect of {args.effect:g} with {args.power:.0%} power "
        f"(two-sided paired t-test, alpha {args.alpha:g}); 'detectable now': the smallest effect "
        f"the pilot's seeds detect with that power.\n"
    )
    print(format_plan(table))
    design = SequentialDesign(
        args.rounds.first, args.rounds.step, args.rounds.max, alpha=args.alpha
    )
    print(
        f"\nGroup-sequential seeds, rounds {list(design.rounds())} (O'Brien-Fleming-type "
        f"alpha spending, two-sided {args.alpha:g}; analysis.sequential), by simulation:"
    )
    print(sequential_plan(table, design, args.effect))
    print(
        "\nOn this study's own seeds, taken in order, the design would have decided "
        "(analysis.sequential_study):"
    )
    print(replay_text(trials, design, reference))
    return 0


def replay_text(trials: pd.DataFrame, design: SequentialDesign, reference: Cell) -> str:
    """What the sequential design decides on a finished study's seeds: per comparison the
    round and seeds it stops at, its verdict and repeated CI; and the trials it would run."""
    table = sequential_verdicts(trials, design, reference)
    lines = [
        f"  {r.variant}@{r.label_fraction}: {r.verdict} at round {r.round} of {r.rounds} "
        f"({r.n_seeds} seeds), {r.mean_diff:+.4f} [{r.rci_low:+.4f}, {r.rci_high:+.4f}]"
        for r in table.itertuples()
    ]
    used = int(table["n_seeds"].sum() + table["n_seeds"].max()) if not table.empty else 0
    ran = len(cell_trials(trials, reference)) + sum(
        len(cell_trials(trials, (r.variant, r.label_fraction))) for r in table.itertuples()
    )
    lines.append(
        f"  trials: {used} of the study's {ran} (the reference runs to the last open round)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
