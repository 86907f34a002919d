"""Target alignment: how far the pseudo-labels the pretraining sees can carry the BEV labels.

The statistics of ``model.data.alignment_stats`` (reach, ceiling, perspective IoU, chance)
over one split of a dataroot, and the command that prints them:

    python -m model.data.alignment --dataroot DIR [--version v1.0-mini] [--protocol hdmapnet]
        [--source map|paint] [--resolution 0.5] [--image-size H W] [--stride 1] [--split val]
        [--checkpoint PRETRAIN.pt ...]

``--checkpoint`` adds, per pretraining checkpoint, its head scored against these labels (all
cells, reached cells, reprojected against the pseudo-labels), e.g. a study's pretrainings under
``--source paint`` although they were scored on map labels when they ran (the weights do not
depend on the label source). The checkpoint's own grid, stride and history setting are used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.cli import OneLineParser
from model.data.alignment_stats import AlignmentMeter
from model.geometry import BevGrid
from model.names import MIOU, iou_name
from model.network.reprojection import reprojection_grids

PROG = "python -m model.data.alignment"


# --- a dataroot ------------------------------------------------------------------------------


def _pseudo_label_paths(dataset, labeler: str, protocol: str) -> list[list[Path]]:
    from model.data.pseudo_sources import pseudo_label_path

    return [
        [pseudo_label_path(dataset.dataroot, labeler, protocol, p) for p in rec.image_paths]
        for rec in dataset.records
    ]


def _read_pseudo_labels(paths: list[Path], image_size: tuple[int, int]) -> torch.Tensor:
    import cv2

    from model.data.images import read_image

    height, width = image_size
    out = []
    for path in paths:
        label = read_image(path, cv2.IMREAD_UNCHANGED)
        if label.shape != (height, width):
            label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        out.append(label)
    return torch.from_numpy(np.stack(out).astype(np.int64))[None]


def diagnose(
    dataroot: Path | str,
    version: str,
    split: str,
    label_cfg,
    image_size: tuple[int, int],
    stride: int = 1,
    labeler: str = "synthetic",
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """The diagnostics of ``AlignmentMeter`` for one split (builds missing BEV labels)."""
    from tqdm import tqdm

    from model.data.dataset import NuScenesBevDataset
    from model.data.labels import PSEUDO_LABEL_PROTOCOL

    dataset = NuScenesBevDataset(
        dataroot, version, split, image_size, label_cfg, cache_dir=cache_dir, load_prev=False,
        progress=progress,
    )  # fmt: skip
    paths = _pseudo_label_paths(dataset, labeler, PSEUDO_LABEL_PROTOCOL[label_cfg.protocol])
    meter = AlignmentMeter(label_cfg.class_names, label_cfg.grid)
    for index in tqdm(range(len(dataset)), desc="alignment", unit="sample", disable=not progress):
        sample = dataset[index]
        grids = reprojection_grids(
            sample["intrinsics"][None], sample["ego_from_cam"][None], image_size,
            label_cfg.grid, stride, cache=False,
        )  # fmt: skip
        pseudo = _read_pseudo_labels(paths[index], image_size)
        meter.update(grids, sample["bev_label"][None], pseudo)
    return {"samples": len(dataset), **meter.compute()}


# --- CLI -------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _parser() -> OneLineParser:
    from model.data.labels import SOURCES

    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataroot", type=Path, required=True, help="nuScenes-format dataroot")
    add("--version", default="v1.0-mini", help="table version folder (v1.0-mini)")
    add(
        "--protocol",
        choices=("hdmapnet", "hdmapnet_filled"),
        default="hdmapnet",
        help="single-label BEV protocol (hdmapnet)",
    )
    add("--source", choices=SOURCES, default="map", help="BEV labels from the map or the paint")
    add("--resolution", type=_positive_float, default=0.5, help="label cells in metres (0.5)")
    add(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(96, 160),
        help="images as the model sees them (96 160: nano)",
    )
    add("--stride", type=int, default=1, help="pixel stride of the rays (1)")
    add("--split", default="val", help="split to diagnose (val)")
    add(
        "--labeler",
        choices=("synthetic", "mask2former"),
        default=None,
        help="pseudo-labels (default: synthetic for a synthetic dataroot, else mask2former)",
    )
    add("--cache-dir", type=Path, default=None, help="BEV label cache (model.data's default)")
    add(
        "--checkpoint",
        type=Path,
        nargs="+",
        default=(),
        metavar="PT",
        help="pretraining checkpoints whose head to score against these labels",
    )
    add("--json", action="store_true", help="print one JSON object instead of a table")
    add("--quiet", action="store_true", help="no progress bars")
    return parser


def _checked_inputs(parser: OneLineParser, args: argparse.Namespace):
    """Everything the run needs, checked before anything is written; exit 2 naming the flag."""
    from model.data.errors import DataError
    from model.data.keyframes import index_split
    from model.data.labels import PSEUDO_LABEL_PROTOCOL, LabelConfig
    from model.data.pseudo_sources import pseudo_label_command, pseudo_label_path
    from model.data.rasterise import check_source

    if min(args.image_size) < 16:
        parser.error(f"--image-size {' '.join(map(str, args.image_size))}: sides must be >= 16")
    if args.stride < 1:
        parser.error(f"--stride {args.stride}: must be >= 1")
    root = args.dataroot.expanduser()
    if not root.is_dir():
        what = "not a directory" if root.exists() else "directory does not exist"
        parser.error(f"--dataroot {root}: {what}")
    for checkpoint in args.checkpoint:
        if not checkpoint.is_file():
            parser.error(f"--checkpoint {checkpoint}: no such file")
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        parser.error(f"--cache-dir {args.cache_dir}: not a directory")
    if not (root / args.version).is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir())
        parser.error(f"--version {args.version}: no such folder in {root} (has {found or 'none'})")
    grid = BevGrid(-30.0, 30.0, -15.0, 15.0, args.resolution)
    try:
        cfg = LabelConfig(args.protocol, grid, source=args.source)
    except ValueError as exc:
        parser.error(f"--resolution {args.resolution:g}: {str(exc).split(': ', 1)[-1]}")
    try:
        records = index_split(root, args.version, args.split)
    except DataError as exc:
        parser.error(f"--dataroot {root}: {' '.join(str(exc).split())}")
    except ValueError as exc:
        parser.error(f"--split {args.split}: {' '.join(str(exc).split())}")
    if not records:
        parser.error(f"--split {args.split}: no keyframes")
    try:
        check_source(root, [r.location for r in records], cfg)
    except ValueError as exc:
        parser.error(f"--source {args.source}: {str(exc).split(': ', 1)[-1]}")
    labeler = args.labeler or (
        "synthetic" if (root / "synthetic.json").is_file() else "mask2former"
    )
    protocol = PSEUDO_LABEL_PROTOCOL[args.protocol]
    wanted = [pseudo_label_path(root, labeler, protocol, p) for r in records for p in r.image_paths]
    missing = sum(not p.is_file() for p in wanted)
    if missing:
        command = pseudo_label_command(root, args.version, labeler, protocol)
        parser.error(
            f"--labeler {labeler}: {missing} of {len(wanted)} pseudo-label files are missing; "
            f"make them with: {command}"
        )
    return root, cfg, labeler


def score_checkpoint(
    checkpoint: Path, root: Path, args: argparse.Namespace, labeler: str
) -> dict[str, float]:
    """A pretraining head against the labels the flags describe: ``head_mIoU`` (all cells, as
    ``pretrain/val_mIoU``), ``head_reached_mIoU`` and ``head_perspective_mIoU``
    (``model.evaluation.diagnostics``), with the checkpoint's own grid, stride and history
    setting."""
    from model.config import DataConfig, PretrainConfig, RuntimeConfig
    from model.evaluation.diagnostics import PREFIX, checkpoint_alignment
    from model.training.checkpoint import load_checkpoint
    from model.training.train import evaluate_checkpoint

    pre = PretrainConfig.model_validate(load_checkpoint(checkpoint)["phase_cfg"])
    data = DataConfig(
        source="synthetic" if (root / "synthetic.json").is_file() else "nuscenes",
        dataroot=str(root), version=args.version, protocol=args.protocol,
        bev_label_source=args.source, pseudo_labels=labeler, val_split=args.split,
        cache_dir=None if args.cache_dir is None else str(args.cache_dir),
    )  # fmt: skip
    runtime = RuntimeConfig(device="cpu", progress=False)
    head = evaluate_checkpoint(data, checkpoint, pre.batch_size, pre.use_history, runtime)
    align = checkpoint_alignment(data, checkpoint, pre, runtime)
    return {
        "head_" + MIOU: next(v for k, v in head.items() if k.endswith("/" + MIOU)),
        **{k: align[PREFIX + k] for k in ("head_reached_" + MIOU, "head_perspective_" + MIOU)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    root, cfg, labeler = _checked_inputs(parser, args)
    out = diagnose(
        root, args.version, args.split, cfg, tuple(args.image_size), args.stride, labeler,
        args.cache_dir, progress=not args.quiet,
    )  # fmt: skip
    if args.checkpoint:
        out["checkpoints"] = {
            str(c): score_checkpoint(c, root, args, labeler) for c in args.checkpoint
        }
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(
        f"{out['samples']} samples of {args.split}, protocol {args.protocol}, source "
        f"{args.source}, {cfg.grid.height} x {cfg.grid.width} cells at {args.resolution:g} m, "
        f"images {args.image_size[0]} x {args.image_size[1]}, stride {args.stride}, "
        f"pseudo-labels {labeler}"
    )
    names = cfg.class_names
    print(f"{'':18s}{'all':>8s}" + "".join(f"{n:>14s}" for n in names))
    reach = [out[f"reach_{n}"] for n in names]
    print(f"{'reach':18s}{out['reach']:8.3f}" + "".join(f"{v:14.3f}" for v in reach))
    for prefix in ("ceiling", "ceiling_reached", "perspective"):
        ious = [out[f"{prefix}_{iou_name(n)}"] for n in names]
        print(
            f"{prefix + ' IoU':18s}{out[f'{prefix}_{MIOU}']:8.3f}"
            + "".join(f"{v:14.3f}" for v in ious)
        )
    print(f"{'chance mIoU':18s}{out[f'chance_{MIOU}']:8.3f}  (a uniformly random prediction)")
    print("(all: the share of every cell for reach; mIoU over the non-background classes for IoU)")
    heads = out.get("checkpoints", {})
    for path, head in heads.items():
        print(
            f"head mIoU {head['head_' + MIOU]:.3f}, on reached cells "
            f"{head['head_reached_' + MIOU]:.3f}, reprojected vs pseudo-labels "
            f"{head['head_perspective_' + MIOU]:.3f}: {path}"
        )
    if len(heads) > 1:
        values = [h["head_" + MIOU] for h in heads.values()]
        above = sum(v > out[f"chance_{MIOU}"] for v in values)
        print(
            f"head mIoU over {len(values)} checkpoints: mean {np.mean(values):.3f}, min "
            f"{min(values):.3f}, max {max(values):.3f}; above chance in {above} of {len(values)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
