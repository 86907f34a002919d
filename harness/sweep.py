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
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from harness import cache, console
from harness.context import SweepContext, label_cache_dir
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
from harness.lock import StudyLocked, study_lock
from harness.preflight import (
    SweepPlan,
    missing_pseudo_labels,
    plan_sweep,
    refuse_interrupted,
)
from harness.restore import can_restore, failures_for_lack_of_space
from harness.spec import Spec, SpecError, load_spec, stable_hash
from harness.tracking import (
    Tracker,
    environment_info,
    flatten,
    git_commit,
    local_artifact_location,
    source_tags,
)
from harness.trial import run_trial
from harness.trials import (
    ResolvedTrial,
    Trial,
    expand_trials,
    pretrain_plan,
    pretrain_shares,
    pseudo_label_specs,
    short_value,
    wsd_trunks,
)
from model import arms, names
from model.cli import OneLineParser
from model.names import ROLE

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


# --- the plan ----------------------------------------------------------------------------------


def plan_text(spec: Spec, trials: list[Trial]) -> str:
    """The dry run's output: one row per trial and the pretraining runs they share."""
    lines = [f"study {spec.study}: {spec.description}".rstrip(": ")]
    if spec.optuna is not None:
        optuna = spec.optuna
        fixed = ", ".join(f"{path} {values[0]}" for path, values in spec.search.items())
        lines.append(
            f"Optuna search, {optuna.num_samples} trials (seed {optuna.seed}), method pretrained, "
            f"seed {spec.seeds[0]}, finetune.budget {_budget(spec.finetune)}, "
            f"scheduler {spec.scheduler.type}" + (f", {fixed}" if fixed else "")
        )
        for path, dist in optuna.params.items():
            rng = dist.values if dist.type == "choice" else f"[{dist.low:g}, {dist.high:g}]"
            lines.append(f"  {path} ~ {dist.type} {rng}")
        lines.append(f"pretraining runs: up to {optuna.num_samples} (one per sampled setting)")
        return "\n".join(lines)
    resolved = [t.resolve(spec) for t in trials]
    # Keys without the dataset fingerprint: the dry run does not generate the data.
    keys = [r.pretrain_key("") for r in resolved]
    index = {key: i + 1 for i, key in enumerate(dict.fromkeys(k for k in keys if k))}
    axes = list(spec.search)
    header = ("#", "method", *axes, "seed", "pretraining")
    rows = [
        (
            str(i + 1),
            r.trial.method,
            *(short_value(dict(r.trial.overrides).get(path, "-")) for path in axes),
            str(r.trial.seed),
            f"P{index[key]}" if key else "-",
        )
        for i, (r, key) in enumerate(zip(resolved, keys, strict=True))
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    shared = sum(1 for k in keys if k)
    lines.append(
        f"{_count(len(trials), 'trial')}; {_count(len(index), 'pretraining run')}, shared by "
        f"{_count(shared, 'pretrained trial')}; pretrain.budget {_budget(spec.pretrain)}, "
        f"finetune.budget {_budget(spec.finetune)}"
    )
    plan = pretrain_plan(resolved, "")
    if plan.trunks:
        unit, branches = spec.pretrain.budget.unit, "branch" if plan.branches == 1 else "branches"
        lines.append(
            f"pretraining plan: {_count(plan.runs, 'run')} from scratch, "
            f"{_count(plan.trunks, 'wsd trunk')} with {plan.branches} {branches}; "
            f"{plan.shared:g} {unit} of pretraining instead of {plan.alone:g} "
            f"({plan.saved:g} {unit} saved)"
        )
    return "\n".join(lines)


def _budget(cfg) -> str:
    return f"{cfg.budget.value} {cfg.budget.unit}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        slots = trial_slots(spec, planned)
        tracker.set_tags(sweep_run_id, {"bev.ray_address": plan.address or "local"})
        # Killed before Ray Tune saved its first state: the same experiment, started afresh
        # (trials reopen their MLflow runs by tag).
        restore = previous is not None and can_restore(ray_path)
        tuner = build_tuner(spec, context, trials, ray_path, restore, args.loudness)
        tuner.fit()
        outcome = SweepOutcome.read(planned, ray_path, tracker, sweep_run_id)
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
    print(console.summary_text(spec.experiment, plan.tracking_uri, tracker.experiment_id))
    return EXIT_TRIALS_FAILED if outcome.failed else EXIT_OK


def start_ray(address: str | None) -> None:
    """Connect to the cluster at ``address``, or start a local Ray that listens on loopback only.

    Ray's GCS, raylet, runtime-env agent and every worker's gRPC server bind 127.0.0.1 only when
    the node address is exactly 127.0.0.1, else every interface (``::``). Ray 2.60's ``ray.init``
    rewrites a loopback ``_node_ip_address`` to the routable address unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is false (Ray's local-only mode; its env var is read
    when ``ray`` is first imported), so the flag is lowered for ``ray.init`` alone. The
    dashboard stays off; ``test_a_local_sweep_listens_on_loopback_only`` reads the sockets. A
    cluster is an explicit opt-in (``--address``; docs/scaling.md).
    """
    import ray
    from ray._private import ray_constants

    options = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        if os.environ.get(arms.ENV):  # arms of one's own reach the cluster's workers too
            options["runtime_env"] = {"env_vars": {arms.ENV: os.environ[arms.ENV]}}
        ray.init(address=address, ignore_reinit_error=True, **options)
        return
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


def prepare_data(spec: Spec, storage: Path, progress: bool = True) -> tuple[Path, str]:
    """The dataroot the trials read: the spec's, or a synthetic one generated on first use (with
    a progress bar and a closing line unless ``progress`` is false: --quiet)."""
    version = spec.data.resolved_version
    if spec.data.dataroot:
        return Path(spec.data.dataroot).expanduser().resolve(), version
    from model.data.synthetic import generate_dataset

    args = spec.data.synthetic.model_dump(mode="json")
    args["image_size"] = tuple(args["image_size"])

    def build(work: Path) -> dict:
        log.info("generating the synthetic dataset %s (first use)", args)
        generate_dataset(work / "dataroot", progress=progress, **args)
        return {"generator_args": args}

    entry = cache.compute_once(storage / "data", f"synthetic-{stable_hash(args, 12)}", build)
    return entry.path / "dataroot", version


def prepare_index(resolved: list, dataroot: Path, version: str, storage: Path) -> None:
    """The keyframe index of every split the trials read, cached once here: each trial reads it
    instead of importing the devkit and loading its tables."""
    from model.data.keyframes import index_split

    for split in sorted({s for r in resolved for s in (r.spec.data.train_split, r.spec.data.val_split)}):  # noqa: E501
        index_split(dataroot, version, split, cache_dir=label_cache_dir(storage))


def prepare_pseudo_labels(resolved: list, dataroot: Path, version: str, storage: Path) -> None:
    """The trials' pseudo-label sets, checked (and made, but Mask2Former's) once, up front."""
    from model.train import ensure_pseudo_labels

    where = dict(dataroot=str(dataroot), version=version, cache_dir=str(label_cache_dir(storage)))
    for spec in pseudo_label_specs(resolved):
        if problem := missing_pseudo_labels(spec, dataroot, version):
            raise SpecError(problem)
        ensure_pseudo_labels(spec.data.model_copy(update=where), spec.model.build())


def start_sweep_run(
    spec: Spec,
    spec_path: Path,
    overrides: list[str],
    tracker: Tracker,
    fingerprint: str,
    resolved: list[ResolvedTrial],
    source: dict[str, str],
) -> str:
    commit, dirty = git_commit()
    run = tracker.client.create_run(
        tracker.experiment_id,
        run_name=f"{spec.study}-sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            **source,
            ROLE: "sweep",
            "bev.study": spec.study,
            "bev.git_commit": commit,
            "bev.git_dirty": str(dirty).lower(),
            "bev.dataset_fingerprint": fingerprint,
            "bev.config_hash": spec.config_hash(),
            "bev.spec_file": str(spec_path),
            "bev.overrides": " ".join(overrides),
        },
    )
    run_id = run.info.run_id
    tracker.log_params(run_id, flatten(spec.model_dump(mode="json")))
    tracker.log_text(run_id, Path(spec_path).read_text(), "spec.yaml")
    spec_json = {
        "spec": spec.model_dump(mode="json"),
        "overrides": overrides,
        "storage_dir": str(spec.storage_dir()),
        "trials": [r.trial.to_dict() | {"name": r.name, "trial_id": r.trial.key} for r in resolved],
    }
    tracker.log_json(run_id, spec_json, "resolved_spec.json")
    tracker.log_json(run_id, environment_info(), "environment.json")
    total = spec.optuna.num_samples if spec.optuna else len(resolved)
    tracker.log_metrics(run_id, {"sweep/trials_total": total}, step=0)
    return run_id


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
        tune.with_parameters(run_trial, context=context),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
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
            max_t=spec.finetune.budget.value,
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
            max_concurrent_trials=spec.max_concurrent,
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
    return {"method": spec.methods[0], "seed": spec.seeds[0], "overrides": overrides}


def _trial_name(trial) -> str:
    return trial_of(trial).label


def _trial_dirname(trial) -> str:
    return f"{trial_of(trial).label}-{trial.trial_id}"


if __name__ == "__main__":
    sys.exit(main())
