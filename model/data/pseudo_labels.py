"""Per-camera semantic pseudo-labels in a protocol's perspective classes.

Two labellers write the same files, ``DIR/pseudo_labels/<set>/<protocol>/CAM_*/<stem>.png``
(uint8 class ids, 255 = ignore; the set names the labeller and its noise level, see
``model.data.pseudo_sources``), one per keyframe camera image:

- ``mask2former`` (``model.data.mask2former_labeler``): Hugging Face transformers'
  ``Mask2FormerForUniversalSegmentation`` with a Mapillary Vistas semantic checkpoint from a
  local directory, batched, on the GPU in bf16 when there is one. Vistas classes map to ours by
  *name* (``VISTAS_TO_PROTOCOL`` of ``model.data.pseudo_classes``), so any checkpoint whose
  ``id2label`` uses the Vistas names works whatever its class order.
- ``synthetic`` (``model.data.simulated_labeler``): a *simulation* of such a labeller for the
  synthetic dataroot: the stored perspective ground truth, mapped through the same table, then
  corrupted the way real pseudo-labels go wrong (``Corruption``). The corruption settings and
  the resulting error rates are written to ``noise.json`` beside the labels so runs can log them.

Both skip images whose label file exists (resumable) and write each file atomically.

    python -m model.data.pseudo_labels --dataroot DIR --version v1.0-mini --checkpoint M2F_DIR
    python -m model.data.pseudo_labels --dataroot DIR --version v1.0-mini --labeler synthetic
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from model.data.keyframes import check_dataroot
from model.data.mask2former_labeler import run_mask2former
from model.data.pseudo_classes import PSEUDO_CLASSES
from model.data.pseudo_sources import NOISE_LEVELS
from model.data.simulated_labeler import read_noise_report, run_synthetic


def _parser() -> argparse.ArgumentParser:
    from model.cli import OneLineParser, existing_dir, int_at_least

    parser = OneLineParser(
        prog="python -m model.data.pseudo_labels", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--dataroot", type=existing_dir, required=True, help="nuScenes-format dataroot")
    add("--version", default="v1.0-mini", help="table version folder (default v1.0-mini)")
    add(
        "--labeler",
        choices=("mask2former", "synthetic"),
        default="mask2former",
        help="Mask2Former, or the simulation for synthetic dataroots (default mask2former)",
    )
    add(
        "--protocol",
        choices=tuple(PSEUDO_CLASSES),
        default="hdmapnet",
        help="perspective class protocol (hdmapnet; hdmapnet_filled reads hdmapnet's)",
    )
    add("--checkpoint", type=existing_dir, help="local Mask2Former Vistas checkpoint dir")
    add("--batch-size", type=int_at_least(1), default=8, help="mask2former: images per batch")
    add("--device", default=None, help="mask2former: cpu, cuda or cuda:N (default: cuda if any)")
    add("--noise", choices=NOISE_LEVELS, default="medium", help="synthetic: corruption preset")
    add("--seed", type=int_at_least(0), default=0, help="synthetic: corruption seed")
    add("--overwrite", action="store_true", help="synthetic: replace labels")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def _check_device(parser, device: str) -> None:
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or not (index == "" or index.isdigit()):
        parser.reject("--device", f"expected cpu, cuda or cuda:N, got {device!r}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= available:
        parser.reject("--device", f"{device} is not available here ({available} CUDA devices)")


def main(argv: Sequence[str] | None = None) -> int:
    from model.cli import one_line
    from model.data.errors import DataError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        root = check_dataroot(args.dataroot, args.version)
    except DataError as exc:
        parser.reject("--version", one_line(exc))
    if args.labeler == "mask2former":
        if args.checkpoint is None:
            parser.reject("--checkpoint", "a checkpoint DIR is required for --labeler mask2former")
        if not (args.checkpoint / "config.json").is_file():
            parser.reject(
                "--checkpoint",
                f"{args.checkpoint} has no config.json (expected a directory written by "
                "save_pretrained)",
            )
        if args.device is not None:
            _check_device(parser, args.device)
    elif not (root / "synthetic.json").is_file():
        parser.reject(
            "--labeler",
            f"synthetic needs a dataroot made by python -m model.data.synthetic "
            f"({root} has no synthetic.json)",
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.labeler == "mask2former":
            report = run_mask2former(
                root,
                args.version,
                args.checkpoint,
                protocol=args.protocol,
                batch_size=args.batch_size,
                device=args.device,
                progress=not args.quiet,
            )
        else:
            report = run_synthetic(
                root,
                args.version,
                protocol=args.protocol,
                noise_level=args.noise,
                seed=args.seed,
                progress=not args.quiet,
                overwrite=args.overwrite,
            )
    except DataError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(
        f"{args.labeler}: wrote {report.written} labels, skipped {report.skipped} existing, "
        f"{report.images_per_s:.2f} images/s"
    )
    if args.labeler == "synthetic":
        noise = read_noise_report(root, args.protocol, args.noise)
        print(
            f"simulated noise {noise['noise_level']}: "
            f"pixel error rate {noise['pixel_error_rate']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
