"""An Optuna study's answer: the best setting found, which sampled parameter mattered, and a
spec that re-runs the best against the defaults on fresh seeds.

    python -m analysis.search --experiment NAME [--tracking-uri URI] [--out DIR]
        [--confirm SPEC.yaml --seeds 1 2 3 ...]

The search's own seed chose its best trial, so the best score is biased upward (the winner's
curse); whether the best beats the defaults is a paired comparison on seeds the search never
saw. `--confirm` writes it as a grid spec: the search's spec without `optuna` and `scheduler`,
one axis of two settings (the best, and `{}`: the spec's own values, else the core's
defaults), and the supervised reference at the same fraction. Run it with `python -m
harness.sweep`, judge it with `python -m analysis.report --reference "pretrained (...)@F"`.

Importance is Optuna's fANOVA (`optuna.importance`, fixed seed) over every trial's val mIoU at
the last validation all of them reached (ASHA's first rung at least): one budget for all, where
the trials that ran to the end may be too few to rank anything. With a dozen trials it ranks
parameters coarsely; it is printed with the trial count and the validation. Reads the search
spec the sweep logged (`spec.yaml` of the sweep run), so it needs no file of the user's.
Input problems exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import yaml

from analysis.inputs import (
    check_store,
    input_errors,
    one_line_error,
    study_parser,
)
from analysis.load import (
    FAILED,
    PARAM_COLUMNS,
    AnalysisError,
    load_study,
    resolve_tracking_uri,
)
from model import arms
from model.cli import dir_to_create, stay_offline

PROG = "python -m analysis.search"
DESCRIPTION = "Best setting, parameter importance and a confirmation spec of an Optuna study."
METRIC = "val_mIoU"
COLUMN_OF = {param: column for column, param in PARAM_COLUMNS.items()}


def searched_params(spec: dict) -> dict[str, dict]:
    """The spec's `optuna.params`: dotted path -> distribution (type, low, high or values)."""
    params = (spec.get("optuna") or {}).get("params") or {}
    if not params:
        raise AnalysisError("the sweep's spec has no optuna.params: not an Optuna study")
    missing = [path for path in params if path not in COLUMN_OF]
    if missing:
        raise AnalysisError(
            f"optuna.params {', '.join(missing)}: not a param the analysis reads "
            f"({', '.join(sorted(COLUMN_OF))})"
        )
    return params


def search_table(trials: pd.DataFrame, params: dict[str, dict]) -> pd.DataFrame:
    """One row per trial, best first: the sampled values, the last val mIoU, the validations
    it ran and whether it ran them all (ASHA stops the others)."""
    columns = [COLUMN_OF[path] for path in params]
    done = trials[~trials["status"].isin(FAILED)]
    full = done["epochs_done"].max()
    table = done[["trial_id", "run_name", *columns, METRIC, "epochs_done"]].copy()
    table = table.rename(columns={COLUMN_OF[path]: path for path in params})
    table["ran_to_the_end"] = done["epochs_done"].eq(full)
    # Best: among trials that ran to the end; a stopped trial's last value is an early one.
    return table.sort_values(["ran_to_the_end", METRIC], ascending=False).reset_index(drop=True)


def common_validation(table: pd.DataFrame, epochs: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The last validation every trial reached (ASHA's first rung at least) and each trial's
    val mIoU there: values at one budget, comparable across trials stopped or not."""
    common = int(table["epochs_done"].min())
    at = epochs[epochs["epoch"] == common][["trial_id", METRIC]]
    return common, table.drop(columns=[METRIC]).merge(at, on="trial_id")


def importance(table: pd.DataFrame, params: dict[str, dict], seed: int = 0) -> pd.Series:
    """fANOVA importance of each sampled path (sums to 1) for `table`'s val mIoU."""
    import optuna

    def distribution(dist: dict):
        kind = dist["type"]
        if kind == "choice":
            return optuna.distributions.CategoricalDistribution(dist["values"])
        low, high = float(dist["low"]), float(dist["high"])
        return optuna.distributions.FloatDistribution(low, high, log=kind == "loguniform")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    distributions = {path: distribution(dist) for path, dist in params.items()}
    for _, row in table.dropna(subset=[METRIC]).iterrows():
        values = {path: row[path] for path in params}
        study.add_trial(
            optuna.trial.create_trial(
                params=values, distributions=distributions, value=float(row[METRIC])
            )
        )
    if len(study.trials) < 2:
        raise AnalysisError("importance needs at least 2 trials with a val mIoU")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    scores = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return pd.Series(scores, name="importance").rename_axis("param")


def confirm_spec(spec: dict, best: dict, seeds: list[int]) -> dict:
    """The search's spec as a grid: the best setting and the spec's own (an empty entry: what
    the spec sets, else the core's defaults) as one axis, the supervised reference beside them,
    on `seeds` (which must not include the search's own)."""
    used = set(spec.get("seeds") or [])
    if used & set(seeds):
        raise AnalysisError(
            f"--seeds {sorted(used & set(seeds))}: the search's own seed(s); confirm on fresh ones"
        )
    sections = {path.split(".", 1)[0] for path in best}
    if len(sections) != 1:
        raise AnalysisError(f"sampled paths span sections {sorted(sections)}; one axis needs one")
    (section,) = sections
    settings = [{path.split(".", 1)[1]: _plain(value) for path, value in best.items()}, {}]
    confirm = {k: v for k, v in spec.items() if k not in ("optuna", "scheduler", "search")}
    confirm["study"] = f"{spec['study']}_confirm"
    confirm["description"] = f"best vs default {section} settings of {spec['study']}, fresh seeds"
    confirm["search"] = {section: settings}
    confirm["methods"] = [arms.reference().name, *spec.get("methods", [])]
    confirm["seeds"] = list(seeds)
    return confirm


def _plain(value):
    return round(float(value), 6) if isinstance(value, float | int) else value


def _parser():
    parser = study_parser(PROG, DESCRIPTION, "MLflow experiment of the Optuna study")
    parser.add_argument("--out", type=dir_to_create, help="write search.csv, importance.csv here")
    parser.add_argument("--confirm", type=Path, help="write the confirmation spec (YAML) here")
    parser.add_argument("--seeds", type=int, nargs="+", help="fresh seeds for --confirm")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.confirm is not None and not args.seeds:
        parser.error("--confirm needs --seeds (seeds the search did not use)")
    stay_offline()
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(args.tracking_uri, args.experiment)
    try:
        check_store(uri)
        study = load_study(args.experiment, uri, progress=False)
        if study.sweep is None or not study.sweep.spec_yaml:
            raise AnalysisError(f"experiment {args.experiment!r} has no sweep run with spec.yaml")
        spec = yaml.safe_load(study.sweep.spec_yaml)
        params = searched_params(spec)
        table = search_table(study.trials, params)
        if table.empty or not table["ran_to_the_end"].any():
            raise AnalysisError(f"experiment {args.experiment!r} has no finished trial")
        common, at_common = common_validation(table, study.epochs)
        scores = importance(at_common, params)
        best = {path: float(table.loc[0, path]) for path in params}
        confirm = None
        if args.confirm is not None:
            confirm = confirm_spec(spec, best, args.seeds)
    except input_errors() as exc:
        return one_line_error(exc, uri)
    print(
        f"Optuna study {args.experiment!r}: {len(table)} trials, "
        f"{int(table['ran_to_the_end'].sum())} ran every validation (ASHA stopped the rest)."
    )
    print(table.drop(columns=["trial_id"]).to_string(index=False, float_format="%.4g"))
    settings = ", ".join(f"{path} {value:.4g}" for path, value in best.items())
    print(
        f"\nBest (of the trials that ran to the end): {settings}: {METRIC} "
        f"{table.loc[0, METRIC]:.4f} on the search's own seed (biased upward: judge it with "
        "--confirm on fresh seeds)."
    )
    print(
        f"\nfANOVA importance over all {len(at_common)} trials at validation {common}, the last "
        "every trial reached (one budget for all; coarse with few trials):"
    )
    print(scores.to_string(float_format="%.3f"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "search.csv", index=False)
        scores.to_csv(args.out / "importance.csv")
        print(f"\nwrote {args.out / 'search.csv'} and {args.out / 'importance.csv'}")
    if confirm is not None:
        header = (
            f"# Written by {PROG} --experiment {args.experiment} from the search's logged spec:\n"
            "# its best setting against the spec's own ({}: the spec's values, else the core's\n"
            "# defaults), paired by seed, on seeds the search did not use, beside the supervised\n"
            "# reference at the same label fraction.\n#\n"
            f"#   python -m harness.sweep {args.confirm}\n"
        )
        args.confirm.write_text(header + yaml.safe_dump(confirm, sort_keys=False))
        print(f"wrote {args.confirm}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
