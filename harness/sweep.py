"""`python -m harness.sweep SPEC`: a study spec -> Ray Tune trials -> MLflow.

    python -m harness.sweep experiments/quick.yaml               run a study
    python -m harness.sweep experiments/quick.yaml --dry-run     print its trials and exit
    python -m harness.sweep experiments/quick.yaml --resume      continue a killed sweep
    python -m harness.sweep SPEC --address 10.0.0.1:6379         run on an existing Ray cluster
    python -m harness.sweep SPEC --set training.finetune_epochs=1 --set seeds=[0]

Exit status: 0 every trial finished, 1 a trial failed (after its retries), 2 a bad spec or
command line (nothing was started), 130 interrupted (resume with --resume).

Everything about where results go is decided here, once: the study folder (`storage_path`,
default `studies/<study>`) holds Ray Tune's experiment state, the synthetic dataset, the
pretraining cache and, by default, the MLflow SQLite store. docs/harness.md has the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import cache
from harness.spec import (
    Spec,
    SpecError,
    TrialSpec,
    expand_trials,
    load_spec,
    pretrain_groups,
    stable_hash,
)
from harness.tracking import (
    PARENT,
    ROLE,
    TRIAL_ID,
    Tracker,
    environment_info,
    flatten,
    git_commit,
    resolve_ray_address,
    resolve_tracking_uri,
    sqlite_uri,
)
from harness.trial import SweepContext, run_trial, trial_key

log = logging.getLogger("harness.sweep")

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STATE_FILE = "sweep_state.json"
METRIC, MODE = "val/mIoU", "max"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    overrides = list(args.overrides)
    if args.max_concurrent is not None:
        overrides.append(f"max_concurrent={args.max_concurrent}")
    try:
        spec = load_spec(args.spec, overrides)
        if args.resume and not overrides:
            # A resumed sweep keeps the --set overrides it was started with.
            stored = (_read_state(spec.storage_dir() / STATE_FILE) or {}).get("overrides")
            if stored:
                overrides = list(stored)
                spec = load_spec(args.spec, overrides)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.overrides = overrides
    trials = expand_trials(spec) if spec.search.optuna is None else []
    if args.dry_run:
        print(plan_text(spec, trials))
        return EXIT_OK
    try:
        return run_sweep(spec, args, trials)
    except SpecError as exc:  # problems only visible once we look at the disk
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.warning("interrupted; resume with: python -m harness.sweep %s --resume", args.spec)
        return EXIT_INTERRUPTED


# --- the plan ----------------------------------------------------------------------------------


def plan_text(spec: Spec, trials: list[TrialSpec]) -> str:
    """The dry run's output: one row per trial and the pretraining runs they share."""
    lines = [f"study {spec.study}: {spec.description}".rstrip(": ")]
    if spec.search.optuna is not None:
        optuna = spec.search.optuna
        t = spec.training
        lines.append(
            f"Optuna search, {optuna.num_samples} trials (seed {optuna.seed}), method pretrained, "
            f"label_fraction {spec.search.label_fraction[0]:g}, seed {spec.seeds[0]}, "
            f"pretrain_epochs {(spec.search.pretrain_epochs or [t.pretrain_epochs])[0]}, "
            f"finetune_epochs {t.finetune_epochs}, scheduler {spec.scheduler.type}"
        )
        for name, dist in optuna.params.items():
            rng = dist.values if dist.type == "choice" else f"[{dist.low:g}, {dist.high:g}]"
            lines.append(f"  {name} ~ {dist.type} {rng}")
        lines.append(f"pretraining runs: up to {optuna.num_samples} (one per sampled weight set)")
        return "\n".join(lines)
    groups = pretrain_groups(trials)
    index = {group: i + 1 for i, group in enumerate(groups)}
    header = (
        "#", "method", "label_fraction", "pretrain_epochs", "finetune_epochs",
        "w_bev", "w_reproj", "w_temporal", "seed", "pretraining",
    )  # fmt: skip
    rows = [
        (
            str(i + 1),
            t.method,
            f"{t.label_fraction:g}",
            str(t.pretrain_epochs),
            str(t.finetune_epochs),
            f"{t.w_bev:g}",
            f"{t.w_reproj:g}",
            f"{t.w_temporal:g}",
            str(t.seed),
            f"P{index[t.pretrain_group]}" if t.pretrain_group else "-",
        )
        for i, t in enumerate(trials)
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    shared = sum(groups.values())
    lines.append(
        f"{_count(len(trials), 'trial')}; {_count(len(groups), 'pretraining run')}, shared by "
        f"{_count(shared, 'pretrained trial')}"
    )
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --- the sweep ---------------------------------------------------------------------------------


def run_sweep(spec: Spec, args: argparse.Namespace, trials: list[TrialSpec]) -> int:
    import ray

    if spec.data.dataroot and not Path(spec.data.dataroot).expanduser().is_dir():
        raise SpecError(
            f"{args.spec}: data.dataroot: directory {spec.data.dataroot} does not exist"
        )
    started = time.monotonic()
    storage = spec.storage_dir()
    state_path = storage / STATE_FILE
    previous = _read_state(state_path) if args.resume else None
    if args.resume and previous is None:
        raise SpecError(f"{args.spec}: --resume: no sweep to resume ({state_path} not found)")

    # A resumed sweep goes on writing where it started, unless told otherwise.
    default_uri = previous["tracking_uri"] if previous else sqlite_uri(storage / "mlflow.db")
    tracking_uri = resolve_tracking_uri(args.tracking_uri, spec.mlflow.tracking_uri, default_uri)
    address = resolve_ray_address(args.address, spec.ray.address)
    storage.mkdir(parents=True, exist_ok=True)

    dataroot, version = prepare_data(spec, storage)
    if "pretrained" in spec.methods:
        prepare_pseudo_labels(spec, dataroot, version)
    from model.data.dataset import dataset_fingerprint

    fingerprint = dataset_fingerprint(dataroot, version)
    tracker = Tracker(tracking_uri, spec.experiment)

    if previous is not None:
        ray_path = Path(previous["ray_path"])
        sweep_run_id = previous["sweep_run_id"]
        if previous.get("config_hash") != spec.config_hash():
            log.warning("the spec changed since the sweep started; resuming with the stored trials")
        tracker.client.update_run(sweep_run_id, status="RUNNING")
        log.info("resuming sweep %s (MLflow run %s)", ray_path.name, sweep_run_id)
    else:
        ray_path = storage / "ray" / f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_run_id = start_sweep_run(
            spec, args.spec, args.overrides, tracker, fingerprint, trials
        )
        log.info("sweep %s: MLflow run %s in %s", ray_path.name, sweep_run_id, tracking_uri)
    _write_state(
        state_path,
        {
            "ray_path": str(ray_path),
            "sweep_run_id": sweep_run_id,
            "tracking_uri": tracking_uri,
            "experiment": spec.experiment,
            "config_hash": spec.config_hash(),
            "overrides": list(args.overrides),
        },
    )

    groups = pretrain_groups(trials)
    context = SweepContext(
        study=spec.study,
        tracking_uri=tracking_uri,
        experiment=spec.experiment,
        sweep_run_id=sweep_run_id,
        storage_dir=str(storage),
        dataroot=str(dataroot),
        version=version,
        dataset_fingerprint=fingerprint,
        spec=spec.model_dump(mode="json"),
        pretrain_shares={repr(group): count for group, count in groups.items()},
    )

    planned = spec.search.optuna.num_samples if spec.search.optuna else len(trials)
    slots = 1
    status = "KILLED"
    outcome = SweepOutcome(planned)
    try:
        ray.init(
            address=address or "local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            ignore_reinit_error=True,
        )
        slots = trial_slots(spec, planned)
        tracker.set_tags(sweep_run_id, {"bev.ray_address": address or "local"})
        tuner = build_tuner(spec, context, trials, ray_path, args.resume)
        tuner.fit()
        outcome = SweepOutcome.read(planned, ray_path, tracker, sweep_run_id)
        status = "FAILED" if outcome.failed else "FINISHED"
        if outcome.unfinished:
            status = "KILLED"
    finally:
        closed = tracker.close_unfinished(sweep_run_id, status="KILLED")
        if closed:
            log.warning("%d run(s) were still RUNNING; marked KILLED", closed)
        wall_s = time.monotonic() - started
        tracker.log_metrics(sweep_run_id, outcome.metrics(wall_s, slots), step=0)
        tracker.finish(sweep_run_id, status)
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
        log.warning("resume with: python -m harness.sweep %s --resume", args.spec)
        return EXIT_INTERRUPTED
    return EXIT_TRIALS_FAILED if outcome.failed else EXIT_OK


def prepare_data(spec: Spec, storage: Path) -> tuple[Path, str]:
    """The dataroot the trials read: the spec's, or a synthetic one generated on first use."""
    version = spec.data.resolved_version
    if spec.data.dataroot:
        return Path(spec.data.dataroot).expanduser().resolve(), version
    from model.data.synthetic import generate_dataset

    args = spec.data.synthetic.model_dump(mode="json")
    args["image_size"] = tuple(args["image_size"])

    def build(work: Path) -> dict:
        log.info("generating the synthetic dataset %s (first use)", args)
        generate_dataset(work / "dataroot", progress=True, **args)
        return {"generator_args": args}

    entry = cache.compute_once(storage / "data", f"synthetic-{stable_hash(args, 12)}", build)
    return entry.path / "dataroot", version


def prepare_pseudo_labels(spec: Spec, dataroot: Path, version: str) -> None:
    """Pretraining's pseudo-labels: simulated ones are written once here (not by every trial);
    Mask2Former ones must have been made beforehand."""
    from model import train as core
    from model.data.dataset import pseudo_label_command

    labeler, protocol = spec.data.resolved_pseudo_labels, spec.data.protocol
    if labeler == "synthetic":
        core.ensure_pseudo_labels(
            core.DataConfig(str(dataroot), version, protocol=protocol, pseudo_labels=labeler)
        )
    elif not (dataroot / "pseudo_labels" / labeler / protocol).is_dir():
        command = pseudo_label_command(dataroot, version, labeler, protocol)
        raise SpecError(
            f"data.pseudo_labels: no {labeler} pseudo-labels under {dataroot}; make them with: "
            f"{command}"
        )


def start_sweep_run(
    spec: Spec,
    spec_path: Path,
    overrides: list[str],
    tracker: Tracker,
    fingerprint: str,
    trials: list[TrialSpec],
) -> str:
    commit, dirty = git_commit()
    run = tracker.client.create_run(
        tracker.experiment_id,
        run_name=f"{spec.study}-sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
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
    resolved = {
        "spec": spec.model_dump(mode="json"),
        "overrides": overrides,
        "storage_dir": str(spec.storage_dir()),
        "trials": [t.to_dict() | {"name": t.name, "trial_id": trial_key(t)} for t in trials],
    }
    tracker.log_json(run_id, resolved, "resolved_spec.json")
    tracker.log_json(run_id, environment_info(), "environment.json")
    total = spec.search.optuna.num_samples if spec.search.optuna else len(trials)
    tracker.log_metrics(run_id, {"sweep/trials_total": total}, step=0)
    return run_id


def build_tuner(
    spec: Spec, context: SweepContext, trials: list[TrialSpec], ray_path: Path, resume: bool
):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    if resume:
        if not tune.Tuner.can_restore(str(ray_path)):
            raise SpecError(f"--resume: {ray_path} holds no Ray Tune experiment to restore")
        # Finished trials are skipped, unfinished ones continue from their last checkpoint;
        # trials that failed after their retries stay failed.
        return tune.Tuner.restore(str(ray_path), trainable=trainable, resume_errored=False)

    scheduler = search_alg = None
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=spec.training.finetune_epochs,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    if spec.search.optuna is None:
        param_space = {"trial": tune.grid_search([t.to_dict() for t in trials])}
        num_samples = 1
    else:
        from ray.tune.search.optuna import OptunaSearch

        param_space = {"trial": optuna_space(spec)}
        search_alg = OptunaSearch(seed=spec.search.optuna.seed)
        num_samples = spec.search.optuna.num_samples

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
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=ray_path.name,
            storage_path=str(ray_path.parent),
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[SweepCallback(str(ray_path.parent.parent / STATE_FILE))],
            verbose=1,
        ),
    )


def optuna_space(spec: Spec) -> dict:
    from ray import tune

    t, s = spec.training, spec.search
    space: dict = {
        "method": "pretrained",
        "label_fraction": s.label_fraction[0],
        "seed": spec.seeds[0],
        "pretrain_epochs": (s.pretrain_epochs or [t.pretrain_epochs])[0],
        "finetune_epochs": t.finetune_epochs,
        "w_bev": t.w_bev,
        "w_reproj": (s.w_reproj or [t.w_reproj])[0],
        "w_temporal": (s.w_temporal or [t.w_temporal])[0],
    }
    for name, dist in spec.search.optuna.params.items():
        if dist.type == "uniform":
            space[name] = tune.uniform(dist.low, dist.high)
        elif dist.type == "loguniform":
            space[name] = tune.loguniform(dist.low, dist.high)
        else:
            space[name] = tune.choice(list(dist.values))
    return space


def _trial_spec(trial) -> TrialSpec:
    return TrialSpec(**trial.config["trial"])


def _trial_name(trial) -> str:
    return _trial_spec(trial).name


def _trial_dirname(trial) -> str:
    return f"{_trial_spec(trial).name}-{trial.trial_id}"


# --- bookkeeping on the driver -----------------------------------------------------------------


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object


class SweepCallback(_TuneCallback):
    """Keeps MLflow's view of each trial in step with Ray Tune's on the driver.

    Trials mark their own runs FAILED when they raise. This callback covers what a trial cannot:
    a worker process that died (FAILED with the reason), a trial stopped early by ASHA (FINISHED,
    tagged `bev.stopped_early`), and retries (`bev.retries`). Ray Tune pickles it with the
    experiment, so it keeps only the state file's path and reads where MLflow is on `setup`.
    """

    def __init__(self, state_path: str):
        self.state_path = state_path
        self._tracker: Tracker | None = None
        self._sweep_run_id: str | None = None

    def __getstate__(self) -> dict:
        return {"state_path": self.state_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["state_path"])

    def setup(self, **info) -> None:
        state = _read_state(Path(self.state_path)) or {}
        if state:
            self._tracker = Tracker(state["tracking_uri"], state["experiment"])
            self._sweep_run_id = state["sweep_run_id"]

    def _run(self, trial):
        if self._tracker is None:
            return None
        found = self._tracker.find(
            {ROLE: "trial", TRIAL_ID: trial_key(_trial_spec(trial)), PARENT: self._sweep_run_id}
        )
        return found[0] if found else None

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        if run is not None:
            retries = int(run.data.tags.get("bev.retries", "0")) + 1
            self._tracker.set_tags(run.info.run_id, {"bev.retries": retries})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        if run is None:
            return
        error = run.data.tags.get("bev.error") or _trial_error(trial)
        self._tracker.finish(run.info.run_id, "FAILED", error=error)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        if run is None or run.info.status != "RUNNING":
            return
        epochs = (trial.last_result or {}).get("epoch", 0)
        if epochs < _trial_spec(trial).finetune_epochs:
            self._tracker.set_tags(run.info.run_id, {"bev.stopped_early": "true"})
        self._tracker.finish(run.info.run_id, "FINISHED")


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines()
        return text[-1] if text else "trial failed"
    except OSError:
        return "trial failed (worker process died)"


@dataclass
class SweepOutcome:
    """What the sweep achieved, read back from Ray Tune's experiment state and MLflow."""

    planned: int = 0  # trials the spec asks for (grid points or Optuna samples)
    statuses: dict[str, str] = field(default_factory=dict)  # Ray trial id -> Tune status
    core_wall_s: float = 0.0  # the core's training clocks, summed over trials and pretrainings
    val_wall_s: float = 0.0  # their validation passes, summed the same way

    @property
    def finished(self) -> int:
        return sum(s == "TERMINATED" for s in self.statuses.values())

    @property
    def failed(self) -> int:
        return sum(s == "ERROR" for s in self.statuses.values())

    @property
    def unfinished(self) -> int:
        # Ray creates grid trials lazily: an interrupted sweep may not know all of them yet.
        return max(self.planned, len(self.statuses)) - self.finished - self.failed

    @classmethod
    def read(cls, planned: int, ray_path: Path, tracker: Tracker, sweep_run_id: str):
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(str(ray_path))
        statuses = {t.trial_id: str(t.status) for t in analysis.trials}
        core = val = 0.0
        for run in tracker.find({PARENT: sweep_run_id}):
            if run.data.tags.get(ROLE) in ("trial", "pretrain"):
                core += run.data.metrics.get("time/cum_wall_s", 0.0)
                history = tracker.client.get_metric_history(run.info.run_id, "time/val_wall_s")
                # One value per epoch; a resumed epoch logs its step again: count it once.
                val += sum({m.step: m.value for m in history}.values())
        return cls(planned, statuses, core, val)

    def metrics(self, wall_s: float, slots: int) -> dict[str, float]:
        values = {
            "sweep/trials_total": max(self.planned, len(self.statuses)),
            "sweep/trials_finished": self.finished,
            "sweep/trials_failed": self.failed,
            "sweep/wall_s": wall_s,
        }
        if self.core_wall_s:
            held = wall_s * slots
            values["sweep/core_wall_s"] = self.core_wall_s
            values["sweep/val_wall_s"] = self.val_wall_s
            values["sweep/slots"] = slots
            values["sweep/train_share"] = min(1.0, self.core_wall_s / held)
            values["sweep/val_share"] = min(1.0, self.val_wall_s / held)
            # Share of the slot-seconds the sweep held that went to anything but the core's
            # training and validation loops: startup, data, caches, MLflow, Ray, idle slots.
            values["sweep/overhead_share"] = max(
                0.0, 1.0 - (self.core_wall_s + self.val_wall_s) / held
            )
        return values


def trial_slots(spec: Spec, planned: int) -> int:
    """How many trials can run at once on the connected Ray cluster."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    slots = max(1, int(cpus // spec.resources.cpu))
    if spec.resources.gpu > 0:
        slots = min(slots, max(1, int(ray.cluster_resources().get("GPU", 0) // spec.resources.gpu)))
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    return max(1, min(slots, planned or slots))


if __name__ == "__main__":
    sys.exit(main())
