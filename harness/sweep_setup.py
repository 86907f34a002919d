"""What a sweep sets up before its first trial: the dataroot (a synthetic one generated on
first use), the pseudo-label sets and the keyframe index the trials read, Ray, and the sweep's
parent MLflow run."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from harness import cache
from harness.context import label_cache_dir
from harness.preflight import missing_pseudo_labels
from harness.spec import Spec, SpecError, stable_hash
from harness.tracking import Tracker, environment_info, flatten, git_commit
from harness.trials import ResolvedTrial, pseudo_label_specs
from model import arms
from model.names import ROLE

log = logging.getLogger("harness.sweep")  # the sweep's log, as in harness.sweep


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
    from model.training.train import ensure_pseudo_labels

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
    if spec.sequential is not None:  # what the report needs to redo the round decisions
        from analysis.sequential_study import DESIGN_TAG, design_tag

        tag = design_tag(spec.sequential.design(), spec.sequential.reference)
        tracker.set_tags(run_id, {DESIGN_TAG: tag})
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
