"""The training core's public entry points: pretraining, fine-tuning, evaluation.

    ckpt = pretrain(data, model, pre, out_dir, seed=0)             # pseudo-labels only
    result = finetune(data, model, fine, out_dir, seed=0,
                      init_checkpoint=ckpt)                        # BEV labels of a subset
    metrics = evaluate_checkpoint(data, ckpt)                      # the pretrained head alone

``data``: ``model.config.DataConfig``; ``model``: a ``model.presets.ModelConfig``; ``pre`` /
``fine``: ``PretrainConfig`` / ``FinetuneConfig``; ``runtime``: ``RuntimeConfig`` (device,
precision, progress). The model is initialised from ``seed``, and fine-tuning draws its nested
label subset with it (``model.data.subsets.label_subset``), so a seed pairs the two methods.

Checkpoints (``model.training.checkpoint``): ``<out_dir>/pretrain.pt`` or ``<out_dir>/finetune.pt``,
rewritten atomically after every epoch; calling the same function again with the same
``out_dir`` resumes after the last finished epoch (or returns at once if all are done).
The loop itself is ``model.training.loop``; class weights ``model.training.class_weights``; the
loaders ``model.training.loaders``; the checkpoint compatibility rules ``model.training.compat``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from model import names, objectives
from model.config import (
    DataConfig,
    EpochReport,
    FinetuneConfig,
    FinetuneResult,
    PhaseConfig,
    PretrainConfig,
    RuntimeConfig,
)
from model.data.controls import ensure_label_set
from model.data.keyframes import index_split, split_scenes
from model.data.label_cache import default_cache_dir
from model.data.labels import class_names
from model.data.subsets import LabelSubset, label_subset
from model.evaluation.forward import evaluate
from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.network.interface import BevModel
from model.presets import ModelConfig
from model.training.checkpoint import load_checkpoint
from model.training.class_weights import (
    balanced_class_weights,
    pseudo_label_class_weights,
    resolve_class_weights,
)
from model.training.compat import check_init, checkpoint_meta
from model.training.loaders import label_config, make_dataset, train_loader, val_loader
from model.training.loop import Phase, prepare, run_phase, schedule, seed_everything
from model.training.precision import (
    bf16_autocast_active,
    can_keep_freed_memory,
    fused_adamw_supported,
    keep_freed_memory,
)

log = logging.getLogger(__name__)

OnEpoch = Callable[[EpochReport], None]
DEFAULT_RUNTIME = RuntimeConfig()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def effective_runtime(runtime: RuntimeConfig) -> dict[str, bool | str]:
    """What ``runtime``'s speed switches do on this machine, logged beside the ``runtime.*``
    params: whether bf16 autocast really runs (``runtime.bf16`` asks for it where supported),
    and which AdamW kernel steps (fused, foreach, or torch's default)."""
    device = resolve_device(runtime.device)
    adamw = "default"
    if runtime.fused_adamw:
        adamw = "fused" if fused_adamw_supported(device) else "foreach"
    return {
        "effective.bf16": bf16_autocast_active(device, runtime.bf16),
        "effective.adamw": adamw,
        "effective.keep_freed_memory": runtime.keep_freed_memory and can_keep_freed_memory(),
    }


def set_up_process(runtime: RuntimeConfig) -> None:
    """The process-wide settings of ``runtime``: threads pinned, freed memory kept."""
    pin_threads(runtime.threads)
    if runtime.keep_freed_memory:
        keep_freed_memory()


def pin_threads(threads: int) -> None:
    """torch's intra-op pool at ``threads``, inter-op at 1: CPU results are reproducible only
    at a fixed thread count."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable only before the first inter-op work
        torch.set_num_interop_threads(1)


def labelled_subset(data: DataConfig, cfg: FinetuneConfig, seed: int) -> LabelSubset:
    """The nested label subset a fine-tuning of ``cfg`` with ``seed`` trains on."""
    train_scenes = split_scenes(data.root, data.resolved_version, data.train_split)
    return label_subset(train_scenes, cfg.label_fraction, seed)


def build_model(model: ModelConfig, num_classes: int, grid: BevGrid, seed: int) -> BevModel:
    """The network ``model.architecture`` names (``model.network.interface.BevModel``), initialised
    from ``seed``."""
    torch.manual_seed(seed)
    if model.architecture == "bevformer":
        return BEVFormerSeg(model, num_classes=num_classes, label_grid=grid)
    raise ValueError(f"no network for architecture {model.architecture!r}")


def pseudo_label_weights(cfg: PhaseConfig, data: DataConfig, dataset) -> tuple[float, ...] | None:
    """The class weights of the pseudo-label terms (``cfg.reprojection.class_weights``), when an
    active objective reads pseudo-labels."""
    if "pseudo_labels" not in objectives.needs(cfg.weights):
        return None
    return resolve_class_weights(
        cfg.reprojection.class_weights,
        data.protocol,
        lambda: pseudo_label_class_weights(dataset),
        "pseudo-label",
    )


def ensure_pseudo_labels(data: DataConfig, model: ModelConfig) -> str:
    """The pseudo-label set ``data`` reads (``model.training.loaders.pseudo_label_set``). Simulated
    ("synthetic") pseudo-labels and the controls (oracle, shuffled) are made on first use;
    Mask2Former ones must exist (``python -m model.data.pseudo_labels``)."""
    return ensure_label_set(
        data.root, data.resolved_version, data.pseudo_label_source, data.resolved_pseudo_labels,
        data.pseudo_label_noise, label_config(data, model), data.cache_dir,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Run:
    """What both phases set up first: the process, the seed, the device and the label grid."""

    data: DataConfig
    model: ModelConfig
    runtime: RuntimeConfig
    seed: int
    device: torch.device
    grid: BevGrid
    num_classes: int

    @classmethod
    def start(cls, data: DataConfig, model: ModelConfig, runtime: RuntimeConfig, seed: int):
        device = resolve_device(runtime.device)
        set_up_process(runtime)
        seed_everything(seed)
        num_classes = len(class_names(data.protocol))
        return cls(data, model, runtime, seed, device, data.label_grid(model), num_classes)

    def phase(self, name: str, cfg: PhaseConfig, net, dataset, out_dir, meta, **rest) -> Phase:
        """The phase `name` on `dataset`, checkpointed at ``<out_dir>/<name>.pt``."""
        return Phase(
            name=name,
            cfg=cfg,
            net=net,
            loader=train_loader(dataset, self.data, cfg.batch_size, self.seed),
            seed=self.seed,
            protocol=self.data.protocol,
            grid=self.grid,
            device=self.device,
            runtime=self.runtime,
            checkpoint_path=Path(out_dir) / f"{name}.pt",
            meta=meta,
            **rest,
        )


def pretrain(
    data: DataConfig,
    model: ModelConfig,
    cfg: PretrainConfig,
    out_dir: Path | str,
    seed: int = 0,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    on_epoch: OnEpoch | None = None,
    init_from: Path | str | None = None,
    stop_step: int | None = None,
) -> Path:
    """Self-supervised pretraining on the train split's pseudo-labels; no BEV label is used.

    Returns the checkpoint path (``<out_dir>/pretrain.pt``); resumes from it when it exists.
    WSD (``cfg.optim.schedule``): ``stop_step`` ends the run early, at most at its decay start
    (a trunk segment); ``init_from`` starts it from such a checkpoint of the same config at
    another length (the next segment, or this length's decay branch). See ``model.training.loop``.
    """
    run = _Run.start(data, model, runtime, seed)
    needs = objectives.needs(cfg.weights)
    load_prev = cfg.use_history or "prev" in needs
    pseudo = ensure_pseudo_labels(data, model) if "pseudo_labels" in needs else None
    dataset = make_dataset(data, model, data.train_split, pseudo, load_prev)
    reproj_weights = pseudo_label_weights(cfg, data, dataset)
    meta = checkpoint_meta(data, model, cfg, seed, run.grid, run.num_classes)
    meta.update(reproj_class_weights=list(reproj_weights) if reproj_weights else None)
    net = build_model(model, run.num_classes, run.grid, seed)
    objectives.add_heads(net, cfg.weights, data.protocol)
    phase = run.phase(
        "pretrain",
        cfg,
        net,
        dataset,
        out_dir,
        meta,
        val=None
        if cfg.val_every is None
        else val_loader(data, model, cfg.batch_size, cfg.use_history),
        labelled_samples=0,
        reproj_class_weights=reproj_weights,
        stop_step=stop_step,
        init_from=Path(init_from) if init_from is not None else None,
    )
    run_phase(phase, on_epoch)
    return phase.checkpoint_path


def finetune(
    data: DataConfig,
    model: ModelConfig,
    cfg: FinetuneConfig,
    out_dir: Path | str,
    seed: int = 0,
    init_checkpoint: Path | str | None = None,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    on_epoch: OnEpoch | None = None,
    subset: LabelSubset | None = None,
) -> FinetuneResult:
    """Supervised training on the BEV labels of a nested label subset of the train scenes
    (``label_subset(train scenes, cfg.label_fraction, seed)``), from ``init_checkpoint`` (a
    pretraining) or from scratch. Validates every ``cfg.val_every`` epochs and after the last.
    ``subset``: that subset, when the caller drew it already (``labelled_subset``).
    """
    run = _Run.start(data, model, runtime, seed)
    subset = subset or labelled_subset(data, cfg, seed)
    needs = objectives.needs(cfg.weights)
    pseudo = ensure_pseudo_labels(data, model) if "pseudo_labels" in needs else None
    load_prev = cfg.use_history or "prev" in needs
    # An objective on every training sample (pseudo-labels are free) reads the whole split,
    # each sample marked labelled or not; otherwise the loader holds the labelled subset only.
    mixed = objectives.uses_every_sample(cfg.weights)
    dataset = make_dataset(
        data,
        model,
        data.train_split,
        pseudo,
        load_prev,
        scenes=None if mixed else subset.scenes,
        labelled_scenes=subset.scenes if mixed else None,
    )
    class_weights = resolve_class_weights(
        cfg.bev_class_weights, data.protocol, lambda: balanced_class_weights(dataset), "BEV"
    )
    reproj_weights = pseudo_label_weights(cfg, data, dataset)
    net = build_model(model, run.num_classes, run.grid, seed)
    if init_checkpoint is not None:
        state = load_checkpoint(init_checkpoint)
        check_init(state, init_checkpoint, model, data.protocol, run.grid)
        net.load_state_dict(without_aux(state["model"]))
    objectives.add_heads(net, cfg.weights, data.protocol)
    meta = checkpoint_meta(data, model, cfg, seed, run.grid, run.num_classes)
    meta.update(
        subset={"fraction": cfg.label_fraction, "seed": seed, "scenes": list(subset.scenes)},
        init_checkpoint=str(init_checkpoint) if init_checkpoint is not None else None,
        bev_class_weights=list(class_weights) if class_weights else None,
        reproj_class_weights=list(reproj_weights) if reproj_weights else None,
    )
    phase = run.phase(
        "finetune",
        cfg,
        net,
        dataset,
        out_dir,
        meta,
        val=val_loader(data, model, cfg.batch_size, cfg.use_history),
        labelled_samples=dataset.labelled_count,
        bev_class_weights=class_weights,
        bev_pos_weight=cfg.bev_pos_weight,
        reproj_class_weights=reproj_weights,
        extra_steps=cfg.extra_steps,
        early_stopping=cfg.early_stopping,
        preview=runtime.preview,
    )
    history = run_phase(phase, on_epoch)
    last = history[-1]
    return FinetuneResult(
        val=last.val,
        labelled_samples=dataset.labelled_count,
        labelled_scenes=subset.scenes,
        epochs=last.epoch,
        cum_wall_s=last.cum_wall_s,
        cum_gpu_s=last.cum_gpu_s,
        checkpoint=phase.checkpoint_path,
        history=history,
    )


def planned_steps(data: DataConfig, cfg: PhaseConfig, workers: int = 1) -> int:
    """Optimiser steps a phase over the whole train split takes under ``cfg.budget`` (what a
    pretraining costs, so the compute-matched supervised arm can be given as many), on
    ``workers`` data-parallel processes (a step reads ``workers x batch_size`` samples)."""
    cache_dir = data.cache_dir or default_cache_dir()
    records = index_split(data.root, data.resolved_version, data.train_split, cache_dir=cache_dir)
    steps_per_pass = math.ceil(len(records) / (cfg.batch_size * workers))
    return schedule(cfg, steps_per_pass, workers=workers).total_steps


def load_model(checkpoint: Path | str, device: torch.device | str = "cpu") -> BevModel:
    """The network of a checkpoint written by ``pretrain`` or ``finetune``, in eval mode,
    without the training-only heads of its objectives."""
    state = load_checkpoint(checkpoint)
    net = build_model(
        ModelConfig.from_dict(state["model_cfg"]),
        int(state["num_classes"]),
        BevGrid(**state["grid"]),
        seed=0,
    )
    net.load_state_dict(without_aux(state["model"]))
    return net.to(device).eval()


def without_aux(weights: dict) -> dict:
    """A state dict without the training-only heads of objectives (``net.aux``)."""
    return {key: value for key, value in weights.items() if not key.startswith("aux.")}


def evaluate_checkpoint(
    data: DataConfig,
    checkpoint: Path | str,
    batch_size: int = 2,
    use_history: bool = True,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> dict[str, float]:
    """Val metrics (``val/...`` names) of a checkpoint as it is, e.g. a pretraining's head with
    no fine-tuning (the "pretrained only" point of a study)."""
    device = resolve_device(runtime.device)
    net = prepare(load_model(checkpoint), device, runtime)
    if data.label_grid(net.cfg) != net.label_grid:
        data = data.model_copy(update={"grid": net.label_grid})
    loader = val_loader(data, net.cfg, batch_size, use_history)
    metrics = evaluate(net, loader, data.protocol, device, runtime.bf16, use_history)
    return {names.val_metric("finetune", k): v for k, v in metrics.items()}
