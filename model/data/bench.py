"""DataLoader throughput: samples/s for the model presets' image sizes, with 0 and N workers.

    python -m model.data.bench [--dataroot DIR --version v1.0-mini] [--presets nano tiny]
                               [--workers 0 4] [--batch-size 2] [--pseudo-labels synthetic]

Without ``--dataroot`` it generates a small synthetic dataroot in a temporary directory. The
label cache is built before timing; the first batch (worker start-up) is timed separately.
A GPU step of the tiny preset takes tens of milliseconds, so loading keeps up when samples/s
exceeds batch size / step time.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from model.cli import OneLineParser, dir_to_create, existing_dir, int_at_least
from model.data.batching import default_num_workers, make_loader
from model.data.dataset import NuScenesBevDataset
from model.data.labels import LabelConfig

# Input sizes (H, W) of the presets, used when model.presets is not importable.
FALLBACK_IMAGE_SIZES = {"nano": (96, 160), "tiny": (450, 800), "small": (720, 1280)}


def preset_image_size(name: str) -> tuple[int, int]:
    try:
        from model.presets import get_preset

        return tuple(get_preset(name).image_size)
    except ImportError:
        return FALLBACK_IMAGE_SIZES[name]


def measure(
    dataset: NuScenesBevDataset, batch_size: int, num_workers: int, max_batches: int | None
) -> dict:
    loader = make_loader(dataset, batch_size, shuffle=True, num_workers=num_workers, seed=0)
    start = time.perf_counter()
    first_s = None
    samples = 0
    for index, batch in enumerate(loader):
        if first_s is None:
            first_s = time.perf_counter() - start
            steady_start, samples = time.perf_counter(), 0
        else:
            samples += len(batch["sample_token"])
        if max_batches is not None and index + 1 >= max_batches:
            break
    steady_s = time.perf_counter() - steady_start
    del loader  # stops persistent workers
    return {
        "first_batch_s": first_s,
        "samples_per_s": samples / steady_s if samples else float("nan"),
    }


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m model.data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataroot",
        type=existing_dir,
        help="nuScenes-format dataroot (default: a small synthetic one, generated for the run)",
    )
    parser.add_argument("--version", default="v1.0-mini", help="dataset version (v1.0-mini)")
    parser.add_argument("--split", default="train", help="split to load (train)")
    parser.add_argument(
        "--presets", nargs="+", default=["nano", "tiny"], help="presets whose image sizes to time"
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(0),
        nargs="+",
        default=None,
        help="DataLoader worker counts to time (default: 0 and this machine's default)",
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=2, help="samples per batch")
    parser.add_argument(
        "--max-batches", type=int_at_least(1), default=None, help="stop after N batches (all)"
    )
    parser.add_argument(
        "--pseudo-labels",
        default=None,
        choices=("synthetic", "mask2former"),
        help="also load these per-camera pseudo-labels (synthetic ones are written first)",
    )
    parser.add_argument(
        "--cache-dir",
        type=dir_to_create,
        default=None,
        help="BEV label cache (default: a temporary folder, built before timing)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workers = args.workers or [0, max(1, default_num_workers())]

    with tempfile.TemporaryDirectory() as tmp:
        dataroot = args.dataroot
        if dataroot is None:
            from model.data.synthetic import generate_dataset

            dataroot = Path(tmp) / "dataroot"
            generate_dataset(dataroot, scenes=4, samples_per_scene=10, seed=0, progress=False)
            print(f"generated synthetic dataroot {dataroot}")
        if args.pseudo_labels == "synthetic":
            from model.data.simulated_labeler import run_synthetic

            run_synthetic(dataroot, args.version, progress=False)
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        print(f"{'preset':8} {'image':>10} {'workers':>7} {'first batch s':>13} {'samples/s':>10}")
        for preset in args.presets:
            size = preset_image_size(preset)
            dataset = NuScenesBevDataset(
                dataroot,
                args.version,
                args.split,
                size,
                LabelConfig(),
                pseudo_labels=args.pseudo_labels,
                cache_dir=cache_dir,
                progress=False,
            )
            if dataset.label_build_s:
                print(
                    f"(label cache: {len(dataset)} labels built in {dataset.label_build_s:.2f} s)"
                )
            for num_workers in workers:
                result = measure(dataset, args.batch_size, num_workers, args.max_batches)
                print(
                    f"{preset:8} {size[0]:>4}x{size[1]:<5} {num_workers:>7} "
                    f"{result['first_batch_s']:>13.2f} {result['samples_per_s']:>10.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
