"""The dry run's output (`python -m harness.sweep SPEC --dry-run`): one row per trial, the
pretraining runs they share, and the WSD pretraining plan."""

from __future__ import annotations

from harness.distributed import local_capacity, trial_devices, trials_at_once
from harness.spec import Spec
from harness.trials import Trial, pretrain_plan, short_value


def plan_text(spec: Spec, trials: list[Trial]) -> str:
    """The dry run's output: one row per trial and the pretraining runs they share."""
    lines = [f"study {spec.study}: {spec.description}".rstrip(": ")]
    if spec.optuna is not None:
        optuna = spec.optuna
        fixed = ", ".join(f"{path} {values[0]}" for path, values in spec.search.items())
        lines.append(
            f"Optuna search, {optuna.num_samples} trials (seed {optuna.seed}), method pretrained, "
            f"seed {spec.seed_list[0]}, finetune.budget {_budget(spec.finetune)}, "
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
    if spec.sequential is not None:
        lines.append(_rounds_line(spec, trials))
    lines.append(resources_line(spec))
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


def _rounds_line(spec: Spec, trials: list[Trial]) -> str:
    """What a sequential study runs: round 1 in full, later rounds only while undecided."""
    seq, rounds = spec.sequential, spec.seed_rounds()
    per_seed = len(trials) // len(spec.seed_list)
    sizes = ", ".join(str(len(seeds)) for seeds in rounds)
    return (
        f"seeds in rounds of {sizes} (seeds 0..{seq.max - 1}; {seq.spending} spending, "
        f"alpha {seq.alpha:g}{f', margin {seq.margin:g}' if seq.margin else ''}"
        f"{', futility' if seq.futility else ''}): round 1 runs "
        f"{_count(per_seed * len(rounds[0]), 'trial')}; each later round at most "
        f"{per_seed} per seed, for the comparisons still open; at most {len(trials)} in all"
    )


def resources_line(spec: Spec) -> str:
    """What one trial holds (its workers' devices) and how many run at once on this machine
    (a cluster offers more: `ray status`)."""
    res = spec.resources
    cpus, gpus = trial_devices(res)
    here_cpus, here_gpus = local_capacity()
    at_once = trials_at_once(res, here_cpus, here_gpus)
    if spec.max_concurrent:
        at_once = min(at_once, spec.max_concurrent)
    workers = (
        f"{_count(res.workers, 'worker')} x (cpu {res.cpu:g}, gpu {res.gpu:g}) per trial"
        if res.workers > 1
        else f"one process per trial (cpu {res.cpu:g}, gpu {res.gpu:g})"
    )
    return (
        f"resources: {workers}: {cpus:g} CPUs, {gpus:g} GPUs per trial; trials at once on "
        f"this machine ({here_cpus:g} CPUs, {here_gpus:g} GPUs): {at_once}"
    )


def _budget(cfg) -> str:
    return f"{cfg.budget.value} {cfg.budget.unit}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
