"""The datasets and loaders a phase reads, built from the data and model configs."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import DataLoader, Subset

from model.config import DataConfig
from model.data.batching import make_loader
from model.data.dataset import NuScenesBevDataset
from model.data.labels import LabelConfig
from model.data.pseudo_sources import label_set
from model.presets import ModelConfig
from model.training import distributed


def label_config(data: DataConfig, model: ModelConfig) -> LabelConfig:
    widths = {"line_width_m": data.line_width_m, "clear_margin_m": data.clear_margin_m}
    return LabelConfig(
        protocol=data.protocol,
        grid=data.label_grid(model),
        source=data.bev_label_source,
        **{k: v for k, v in widths.items() if v is not None},
    )


def pseudo_label_set(data: DataConfig, model: ModelConfig) -> str:
    """The pseudo-label set ``data`` reads (``model.data.pseudo_sources``): its source, labeller
    and noise level, and for the oracle the BEV label config."""
    return label_set(
        data.pseudo_label_source,
        data.resolved_pseudo_labels,
        data.pseudo_label_noise,
        label_config(data, model).cache_key(),
    )


def make_dataset(
    data: DataConfig,
    model: ModelConfig,
    split: str,
    pseudo_labels: str | None,
    load_prev: bool,
    scenes: Sequence[str] | None = None,
    progress: bool = False,
    labelled_scenes: Sequence[str] | None = None,
) -> NuScenesBevDataset:
    return NuScenesBevDataset(
        data.root,
        data.resolved_version,
        split,
        image_size=model.image_size,
        label_cfg=label_config(data, model),
        pseudo_labels=pseudo_labels,
        scenes=scenes,
        cache_dir=data.cache_dir,
        load_prev=load_prev,
        progress=progress,
        labelled_scenes=labelled_scenes,
    )


def train_loader(dataset, data: DataConfig, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches; the loop reseeds the loader's generator every epoch. With several
    processes, this process's share of each pass (``distributed.ShardSampler``)."""
    loader = make_loader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=data.num_workers, seed=seed
    )
    if not distributed.active():
        return loader
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=distributed.ShardSampler(
            loader.sampler, distributed.world_size(), distributed.rank()
        ),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,  # the one the sampler draws from: the loop reseeds it
        persistent_workers=loader.persistent_workers,
        prefetch_factor=loader.prefetch_factor,
    )


def val_loader(
    data: DataConfig, model: ModelConfig, batch_size: int, use_history: bool
) -> DataLoader:
    """The first ``max_val_samples`` keyframes of the val split, in order; with several
    processes, this process's contiguous run of them (``distributed.val_shard``)."""
    dataset = make_dataset(data, model, data.val_split, None, load_prev=use_history)
    if data.max_val_samples is not None and data.max_val_samples < len(dataset):
        dataset = Subset(dataset, range(data.max_val_samples))
    if distributed.active():
        dataset = Subset(dataset, distributed.val_shard(len(dataset)))
    return make_loader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=data.num_workers, seed=0
    )
