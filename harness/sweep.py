"""`python -m harness.sweep SPEC`: a study spec -> Ray Tune trials -> MLflow.

    python -m harness.sweep experiments/quick.yaml               run a study
    python -m harness.sweep experiments/quick.yaml --dry-run     print its trials and exit
    python -m harness.sweep experiments/quick.yaml --resume      continue a killed sweep
    python -m harness.sweep SPEC --address 10.0.0.1:6379         run on an existing Ray cluster
    python -m harness.sweep SPEC --set finetune.budget.value=1 --set seeds=[0]

Exit status: 0 every trial finished, 1 a trial failed (after its retries), 2 a bad spec or
command line (nothing was started), 130 interrupted (resume with --resume).

Everything about where results go is decided here, once: the study folder (`storage_path`,
default `studies/<study>`) holds Ray Tune's experiment state, the synthetic dataset, the
pretraining cache and, by default, the MLflow SQLite store. docs/harness.md has the details.
What the sweep sets up before its trials is `harness.sweep_setup`'s; the dry run's table
`harness.dry_run`'s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from harness import console, rounds
from harness.context import SweepContext
from harness.distributed import check_cluster, max_concurrent, trial_bundle
from harness.driver import (
    STATE_FILE,
    SweepCallback,
    SweepClock,
    SweepOutcome,
    begin_state,
    close_sweep,
    read_state,
    stop_like_ctrl_c,
    trial_of,
    trial_slots,
    update_state,
)
from harness.dry_run import plan_text
from harness.lock import StudyLocked, study_lock
from harness.preflight import SweepPlan, plan_sweep, refuse_interrupted
from harness.restore import can_restore, failures_for_lack_of_space
from harness.spec import Spec, SpecError, load_spec
from harness.sweep_setup import (
    prepare_data,
    prepare_index,
    prepare_pseudo_labels,
    start_ray,
    start_sweep_run,
)
from harness.tracking import Tracker, local_artifact_location, source_tags
from harness.trial import run_trial
from harness.trials import Trial, expand_trials, pretrain_shares, wsd_trunks
from model import names
from model.cli import OneLineParser

log = logging.getLogger("harness.sweep")

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
METRIC, MODE = names.VAL_MIOU, "max"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m harness.sweep",
        description="Run a label-efficiency study: YAML spec -> Ray Tune trials -> MLflow.",
    )
    parser.add_argument("spec", type=Path, help="study spec (YAML), e.g. experiments/quick.yaml")
    parser.add_argument(
        "--resume", action="store_true", help="continue the study's last sweep (after a kill)"
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to run on (host:port or 'auto'); overrides $RAY_ADDRESS and ray.address",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI; overrides $MLFLOW_TRACKING_URI and mlflow.tracking_uri",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the trial table and pretraining count, exit"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value (dotted key, YAML value); repeatable",
    )
    parser.add_argument(
        "--max-concurrent", type=int, help="at most N trials at once (overrides max_concurrent)"
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="print only errors and the final summary"
    )
    loudness.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Ray Tune's own full output (trial configs and results) and debug logging",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.loudness = (
        console.VERBOSE if args.verbose else console.QUIET if args.quiet else console.DEFAULT
    )
    console.configure(args.loudness)
    overrides = list(args.overrides)
    if args.max_concurrent is not None:
        overrides.append(f"max_concurrent={args.max_concurrent}")
    try:
        spec = load_spec(args.spec, overrides)
        if args.resume and not overrides:
            # A resumed sweep keeps the --set overrides it was started with.
            stored = (read_state(spec.storage_dir() / STATE_FILE) or {}).get("overrides")
            if stored:
                overrides = list(stored)
                spec = load_spec(args.spec, overrides)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.overrides = overrides
    trials = expand_trials(spec) if spec.optuna is None else []
    if args.dry_run:
        print(plan_text(spec, trials))
        return EXIT_OK
    try:
        plan = plan_sweep(spec, args.spec, args.resume, args.tracking_uri, args.address)
        if plan.finished:
            print(f"{args.spec}: study {spec.study}: its sweep already finished; nothing to resume")
            return EXIT_OK
        # The lock comes first, and the state right after it: see run_sweep.
        with study_lock(spec.storage_dir()):
            if not args.resume:
                refuse_interrupted(spec)
            return run_sweep(spec, args, trials, plan)
    except StudyLocked as exc:
        print(f"error: {args.spec}: storage_path: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:  # problems only visible once we look at the disk
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print_resume_hint(args.spec)
        return EXIT_INTERRUPTED


def print_resume_hint(spec_path: str) -> None:
    """On stderr at every loudness, `--quiet` included: an interrupted sweep's next command."""
    hint = f"interrupted; resume with: python -m harness.sweep {spec_path} --resume"
    print(hint, file=sys.stderr)


# --- the sweep ---------------------------------------------------------------------------------


def run_sweep(spec: Spec, args: argparse.Namespace, trials: list[Trial], plan: SweepPlan) -> int:
    """Run (or continue) the sweep; the caller holds the study lock.

    The state file is written before anything else (data, MLflow, Ray), so a kill at any point
    leaves a sweep that `--resume` continues into the same parent MLflow run.
    """
    import ray

    storage = spec.storage_dir()
    state_path = storage / STATE_FILE
    previous = plan.previous
    stop_like_ctrl_c()
    state = begin_state(
        state_path,
        previous,
        storage / "ray" / f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}",
        tracking_uri=plan.tracking_uri,
        experiment=spec.experiment,
        config_hash=spec.config_hash(),
        overrides=list(args.overrides),
    )
    ray_path, sweep_run_id = Path(state["ray_path"]), state["sweep_run_id"]
    log.info("MLflow tracking URI %s; Ray %s", plan.tracking_uri, plan.address or "local")
    if previous is not None and previous.get("config_hash") != spec.config_hash():
        log.warning("the spec changed since the sweep started; resuming with the stored trials")
    planned = spec.optuna.num_samples if spec.optuna else len(trials)
    slots, status, complete, outcome, tracker = 1, "KILLED", False, SweepOutcome(planned), None
    clock = SweepClock(state_path).start()
    try:
        dataroot, version = prepare_data(spec, storage, progress=args.loudness != console.QUIET)
        resolved = [t.resolve(spec) for t in trials]
        prepare_pseudo_labels(resolved, dataroot, version, storage)
        from model.data.keyframes import dataset_fingerprint

        fingerprint = dataset_fingerprint(dataroot, version)
        prepare_index(resolved, dataroot, version, storage)
        source = source_tags(f"harness.sweep {args.spec}")
        tracker = Tracker(
            plan.tracking_uri,
            spec.experiment,
            artifact_location=local_artifact_location(plan.tracking_uri, storage),
            description=spec.description or f"bevlabels study {spec.study} ({args.spec})",
        )
        if sweep_run_id is not None:
            tracker.client.update_run(sweep_run_id, status="RUNNING")
            log.info("resuming sweep %s (MLflow run %s)", ray_path.name, sweep_run_id)
        else:
            sweep_run_id = start_sweep_run(
                spec, args.spec, args.overrides, tracker, fingerprint, resolved, source
            )
            update_state(state_path, sweep_run_id=sweep_run_id)
            log.info("sweep %s: MLflow run %s", ray_path.name, sweep_run_id)

        context = SweepContext(
            study=spec.study,
            tracking_uri=plan.tracking_uri,
            experiment=spec.experiment,
            sweep_run_id=sweep_run_id,
            storage_dir=str(storage),
            dataroot=str(dataroot),
            version=version,
            dataset_fingerprint=fingerprint,
            spec=spec.model_dump(mode="json"),
            source_tags=source,
            pretrain_shares=pretrain_shares(resolved, fingerprint),
            wsd_trunks=wsd_trunks(resolved, fingerprint),
        )
        start_ray(plan.address)
        stop_like_ctrl_c()  # ray.init replaced the SIGTERM handler
        check_cluster(spec, str(args.spec))
        slots = trial_slots(spec, planned)
        tracker.set_tags(sweep_run_id, {"bev.ray_address": plan.address or "local"})
        outcome = run_rounds(spec, args, context, trials, ray_path, previous, tracker)
        complete = not outcome.unfinished
        status = "FAILED" if outcome.failed else "FINISHED" if complete else "KILLED"
    except Exception:
        status = "FAILED"  # a full disk, a store gone: nothing is left RUNNING
        raise
    finally:
        clock.stop()
        wall_s = close_sweep(state_path, tracker, sweep_run_id, status, outcome, slots, complete)
        ray.shutdown()
    log.info(
        "sweep %s: %d trials finished, %d failed, %d unfinished; %.0f s",
        status.lower(),
        outcome.finished,
        outcome.failed,
        outcome.unfinished,
        wall_s,
    )
    if outcome.unfinished:
        print_resume_hint(args.spec)
        return EXIT_INTERRUPTED
    if status == "FINISHED":  # the README's report under the sweep run's report/
        from analysis.report import report_finished_sweep

        report_finished_sweep(spec.experiment, plan.tracking_uri, storage / "report")
    print(console.summary_text(spec.experiment, plan.tracking_uri, tracker.experiment_id))
    return EXIT_TRIALS_FAILED if outcome.failed else EXIT_OK


def run_rounds(
    spec: Spec,
    args: argparse.Namespace,
    context: SweepContext,
    trials: list[Trial],
    ray_path: Path,
    previous: dict | None,
    tracker: Tracker,
) -> SweepOutcome:
    """Run the sweep's rounds (a fixed seed list or an Optuna search is one round), each a Ray
    Tune experiment of its trials, the first in `ray_path`. A round the state file records as
    done is not run again; one recorded unfinished continues with its recorded trials. Stops
    at a round that did not finish (interrupted, or a trial failed)."""
    state_path = spec.storage_dir() / STATE_FILE
    by_key = {t.key: t for t in trials}
    recorded = (previous or {}).get("rounds", [])
    done = [r for r in recorded if r.get("done")]
    started = [r for r in recorded if not r.get("done")]
    outcome = SweepOutcome(0)
    for record in done:
        path = Path(record["ray_path"])
        outcome.add(SweepOutcome.read(record["planned"], path, tracker, context.sweep_run_id))
    index, pending = len(done), None
    if done and spec.sequential is not None and not done[-1].get("looked"):
        pending = look_and_log(spec, context, trials, tracker, done)  # killed before its look
    while index < len(spec.seed_rounds()):
        if started:
            chosen = [by_key[key] for key in started.pop()["trials"] if key in by_key]
        elif index == 0:
            chosen = rounds.first_round(spec, trials)
        else:
            if pending is None:  # resumed between two rounds: the look again (same answer)
                pending = rounds.look(spec, context.tracking_uri, trials, index - 1).next_trials
            chosen = pending
        if not chosen and spec.optuna is None:
            break  # every comparison has stopped
        path = rounds.ray_path_of(ray_path, index)
        planned = spec.optuna.num_samples if spec.optuna else len(chosen)
        record = {"round": index + 1, "seeds": sorted({t.seed for t in chosen}),
                  "trials": [t.key for t in chosen], "planned": planned, "ray_path": str(path),
                  "done": False}  # fmt: skip
        update_state(state_path, rounds=[*done, record])
        restore = previous is not None and path.exists() and can_restore(path)
        build_tuner(spec, context, chosen, path, restore, args.loudness).fit()
        result = SweepOutcome.read(planned, path, tracker, context.sweep_run_id)
        outcome.add(result)
        if result.unfinished or result.failed:
            break
        done.append(record | {"done": True})
        update_state(state_path, rounds=done)
        index += 1
        if spec.sequential is not None:
            pending = look_and_log(spec, context, trials, tracker, done)
    return outcome


def look_and_log(
    spec: Spec, context: SweepContext, trials: list[Trial], tracker: Tracker, done: list[dict]
) -> list[Trial]:
    """The look after the last finished round, recorded on the sweep run (the round's number
    is the metrics' step: its trials, the seeds so far, the comparisons still open) and marked
    in the state file; returns the next round's trials."""
    number = len(done)
    look = rounds.look(spec, context.tracking_uri, trials, number - 1)
    metrics = {
        "sweep/round_trials": len(done[-1]["trials"]),
        "sweep/round_seeds": sum(len(s) for s in spec.seed_rounds()[:number]),
        "sweep/comparisons_open": look.open if look.next_trials else 0,
    }
    tracker.log_metrics(context.sweep_run_id, metrics, step=number)
    log.info(rounds.summary(look, number - 1))
    done[-1]["looked"] = True
    update_state(spec.storage_dir() / STATE_FILE, rounds=done)
    return look.next_trials


def build_tuner(
    spec: Spec,
    context: SweepContext,
    trials: list[Trial],
    ray_path: Path,
    restore: bool,
    loudness: str = console.DEFAULT,
):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), trial_bundle(spec.resources)
    )
    if restore:
        # Finished trials are skipped, unfinished ones continue from their last checkpoint;
        # trials that failed after their retries stay failed, unless a trial failed for lack of
        # disk space: then every failed trial resumes (Tune resumes failed trials all or none).
        full = failures_for_lack_of_space(ray_path)
        if full:
            log.warning(
                "%d trial(s) failed for lack of disk space (%s): the failed trials resume "
                "from their last checkpoint",
                len(full),
                ", ".join(full),
            )
        return tune.Tuner.restore(str(ray_path), trainable=trainable, resume_errored=bool(full))

    scheduler = search_alg = None
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=spec.finetune.budget.periods(spec.finetune.batch_size, spec.resources.workers),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    if spec.optuna is None:
        param_space = {"trial": tune.grid_search([t.to_dict() for t in trials])}
        num_samples = 1
    else:
        from ray.tune.search.optuna import OptunaSearch

        param_space = {"trial": optuna_space(spec)}
        search_alg = OptunaSearch(seed=spec.optuna.seed)
        num_samples = spec.optuna.num_samples

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent(spec),
            reuse_actors=spec.ray.reuse_workers,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=ray_path.name,
            storage_path=str(ray_path.parent),
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[
                SweepCallback(str(ray_path.parent.parent / STATE_FILE)),
                # What ExperimentAnalysis reads; no TensorBoard files (MLflow has the metrics).
                CSVLoggerCallback(),
                JsonLoggerCallback(),
            ],
            progress_reporter=console.StudyReporter(
                context.tracking_uri, context.experiment, context.sweep_run_id
            )
            if loudness == console.DEFAULT
            else None,
            verbose=console.tune_verbosity(loudness),
        ),
    )


def optuna_space(spec: Spec) -> dict:
    """A trial dict whose sampled overrides are Tune distributions (Optuna fills them in)."""
    from ray import tune

    overrides: dict = {path: values[0] for path, values in spec.search.items()}
    for path, dist in spec.optuna.params.items():
        if dist.type == "uniform":
            overrides[path] = tune.uniform(dist.low, dist.high)
        elif dist.type == "loguniform":
            overrides[path] = tune.loguniform(dist.low, dist.high)
        else:
            overrides[path] = tune.choice(list(dist.values))
    return {"method": spec.methods[0], "seed": spec.seed_list[0], "overrides": overrides}


def _trial_name(trial) -> str:
    return trial_of(trial).label


def _trial_dirname(trial) -> str:
    return f"{trial_of(trial).label}-{trial.trial_id}"


if __name__ == "__main__":
    sys.exit(main())
