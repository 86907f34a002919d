"""Target alignment: how far the pseudo-labels the pretraining sees can carry the BEV labels.

Pure functions over one batch, and a meter that pools them over a split:

- reach: the share of BEV cells a valid ray lands in (the cell containing the ray's ground
  point, for strided pixels whose ray meets the ground inside the grid and whose pseudo-label is
  not IGNORE: the rays the reprojection loss uses), overall and per BEV class;
- ceiling: the pseudo-labels splatted into the BEV (per cell the majority class of the rays
  landing in it, ties to the lower class id; cells no ray reaches are background), scored
  against the BEV labels with ``ArgmaxIoU``: what a head that reproduced the pseudo-labels
  exactly, and knew nothing else, would score; also on reached cells only;
- perspective: BEV logits (the one-hot BEV labels, or a model's prediction) reprojected into
  the images as the loss samples them (``model.reprojection``), argmax, scored against the
  pseudo-labels over the valid pixels;
- chance: the expected mIoU of a uniformly random prediction on the same BEV labels
  (``chance_miou``), the level a head that learned nothing scores.

For the training core: ``reached_cells`` and ``update_reached_iou`` (a pretrained head's mIoU
on the cells its supervision reaches), ``update_perspective_iou`` (a reprojected prediction
against the pseudo-labels). Single-label protocols only (the perspective classes are the BEV
classes).

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
import torch.nn.functional as F

from model.cli import OneLineParser
from model.geometry import BevGrid
from model.metrics import HDMAPNET_EXCLUDED, ArgmaxIoU
from model.names import MIOU, iou_name
from model.reprojection import (
    IGNORE,
    ReprojectionGrids,
    reproject_bev_logits,
    reprojection_grids,
    subsample_labels,
)

PROG = "python -m model.data.alignment"


# --- one batch ------------------------------------------------------------------------------


def ray_cells(grids: ReprojectionGrids, grid: BevGrid, pseudo_labels: torch.Tensor | None = None):
    """(B, 6, h, w) int64: the flat BEV cell (``row * W + col``) each strided pixel's ray lands
    in, -1 where the ray is invalid (or, with ``pseudo_labels``, the pixel's label is IGNORE)."""
    u, v = grids.uv[..., 0], grids.uv[..., 1]  # grid_sample coordinates: -1, +1 = outer edges
    col = ((u + 1) * (grid.width / 2)).floor().long().clamp(0, grid.width - 1)
    row = ((v + 1) * (grid.height / 2)).floor().long().clamp(0, grid.height - 1)
    valid = grids.valid
    if pseudo_labels is not None:
        valid = valid & (_strided(pseudo_labels, grids).to(valid.device) != IGNORE)
    return torch.where(valid, row * grid.width + col, torch.full_like(row, -1))


def _strided(pseudo_labels: torch.Tensor, grids: ReprojectionGrids) -> torch.Tensor:
    if tuple(pseudo_labels.shape[-2:]) != tuple(grids.valid.shape[-2:]):
        pseudo_labels = subsample_labels(pseudo_labels, grids.stride)
    return pseudo_labels.long()


def reached_cells(
    grids: ReprojectionGrids, grid: BevGrid, pseudo_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, H, W) bool: cells at least one valid ray lands in."""
    cells = ray_cells(grids, grid, pseudo_labels).flatten(1)
    batch = cells.shape[0]
    hit = torch.zeros(batch, grid.height * grid.width + 1, dtype=torch.bool, device=cells.device)
    hit.scatter_(1, torch.where(cells < 0, grid.height * grid.width, cells), True)
    return hit[:, :-1].reshape(batch, grid.height, grid.width)


def splat_pseudo_labels(
    grids: ReprojectionGrids, grid: BevGrid, pseudo_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(B, H, W) int64: per cell the majority pseudo-label of the valid rays landing in it (ties
    to the lower id), 0 (background) where none does."""
    labels = _strided(pseudo_labels, grids).to(grids.valid.device)
    cells = ray_cells(grids, grid, labels).flatten(1)
    labels = labels.flatten(1).clamp(max=num_classes - 1)
    batch, n = cells.shape[0], grid.height * grid.width
    keep = cells >= 0
    index = (torch.arange(batch, device=cells.device)[:, None] * n + cells) * num_classes + labels
    votes = torch.bincount(index[keep], minlength=batch * n * num_classes)
    votes = votes.reshape(batch, n, num_classes)
    out = votes.argmax(-1)  # argmax of all-zero votes is 0: background
    return out.reshape(batch, grid.height, grid.width)


def one_hot_logits(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, C, H, W) float logits whose argmax is the label."""
    return F.one_hot(label.long(), num_classes).permute(0, 3, 1, 2).float()


def update_reached_iou(
    metric: ArgmaxIoU, bev_logits: torch.Tensor, bev_label: torch.Tensor, reached: torch.Tensor
) -> None:
    """Score (B, C, H, W) BEV logits against (B, H, W) labels on the reached cells only."""
    target = torch.where(
        reached.to(bev_label.device), bev_label, torch.full_like(bev_label, IGNORE)
    )
    metric.update(bev_logits, target)


def update_perspective_iou(
    metric: ArgmaxIoU,
    bev_logits: torch.Tensor,
    grids: ReprojectionGrids,
    pseudo_labels: torch.Tensor,
) -> None:
    """Reproject (B, C, H, W) BEV logits into the cameras (as the loss does) and score their
    argmax against the pseudo-labels over the valid pixels."""
    rep = reproject_bev_logits(bev_logits, grids, pseudo_labels)
    target = torch.where(rep.valid, rep.labels, torch.full_like(rep.labels, IGNORE))
    logits = rep.logits.flatten(0, 1)  # (B * 6, C, h, w)
    metric.update(logits, target.flatten(0, 1))


def chance_miou(class_cells: Sequence[int], class_names: Sequence[str]) -> float:
    """Expected mIoU (the classes ``ArgmaxIoU`` averages) of a prediction drawn uniformly from
    the K classes, independently per cell, on labels with these per-class cell counts: for a
    class of frequency f, intersection f / K and union f + 1 / K - f / K (shares of the cells)."""
    total = sum(class_cells)
    k = len(class_names)
    ious = []
    for name, cells in zip(class_names, class_cells, strict=True):
        if name in HDMAPNET_EXCLUDED:
            continue
        f = cells / total if total else 0.0
        ious.append((f / k) / (f + 1 / k - f / k))
    return float(np.mean(ious)) if ious else math.nan


class AlignmentMeter:
    """Reach, ceiling and perspective IoU of BEV labels against pseudo-labels, over a split."""

    def __init__(self, class_names: Sequence[str], grid: BevGrid) -> None:
        self.class_names = list(class_names)
        self.grid = grid
        num = len(self.class_names)
        self.cells = self.reached = 0
        self.class_cells = torch.zeros(num, dtype=torch.int64)
        self.class_reached = torch.zeros(num, dtype=torch.int64)
        self.ceiling = ArgmaxIoU(self.class_names)
        self.ceiling_reached = ArgmaxIoU(self.class_names)
        self.perspective = ArgmaxIoU(self.class_names)

    def update(
        self, grids: ReprojectionGrids, bev_label: torch.Tensor, pseudo_labels: torch.Tensor
    ) -> None:
        """One batch: grids of its cameras, (B, H, W) BEV labels, (B, 6, H', W') pseudo-labels."""
        num = len(self.class_names)
        bev_label = bev_label.long().cpu()
        reached = reached_cells(grids, self.grid, pseudo_labels).cpu()
        self.cells += bev_label.numel()
        self.reached += int(reached.sum())
        self.class_cells += torch.bincount(bev_label.flatten(), minlength=num)[:num]
        self.class_reached += torch.bincount(bev_label[reached], minlength=num)[:num]
        splat = splat_pseudo_labels(grids, self.grid, pseudo_labels, num).cpu()
        self.ceiling.update(one_hot_logits(splat, num), bev_label)
        update_reached_iou(self.ceiling_reached, one_hot_logits(splat, num), bev_label, reached)
        update_perspective_iou(
            self.perspective, one_hot_logits(bev_label, num), grids, pseudo_labels
        )

    def compute(self) -> dict[str, float]:
        out = {"reach": self.reached / max(self.cells, 1)}
        out["chance_" + MIOU] = chance_miou(self.class_cells.tolist(), self.class_names)
        for c, name in enumerate(self.class_names):
            cells = int(self.class_cells[c])
            out[f"reach_{name}"] = int(self.class_reached[c]) / cells if cells else math.nan
        for prefix, metric in (
            ("ceiling", self.ceiling),
            ("ceiling_reached", self.ceiling_reached),
            ("perspective", self.perspective),
        ):
            out.update({f"{prefix}_{k}": v for k, v in metric.compute().items()})
        return out


# --- a dataroot ------------------------------------------------------------------------------


def _pseudo_label_paths(dataset, labeler: str, protocol: str) -> list[list[Path]]:
    from model.data.dataset import pseudo_label_path

    return [
        [pseudo_label_path(dataset.dataroot, labeler, protocol, p) for p in rec.image_paths]
        for rec in dataset.records
    ]


def _read_pseudo_labels(paths: list[Path], image_size: tuple[int, int]) -> torch.Tensor:
    import cv2

    from model.data.dataset import read_image

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
    from model.data.dataset import index_split, pseudo_label_command, pseudo_label_path
    from model.data.errors import DataError
    from model.data.labels import PSEUDO_LABEL_PROTOCOL, LabelConfig, check_source

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
    (``model.diagnostics``), with the checkpoint's own grid, stride and history setting."""
    from model.checkpoint import load_checkpoint
    from model.config import DataConfig, PretrainConfig, RuntimeConfig
    from model.diagnostics import PREFIX, checkpoint_alignment
    from model.train import evaluate_checkpoint

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
