"""``python -m model.data.prepare``: precompute the BEV labels of every split of a dataroot.

    python -m model.data.prepare --dataroot DIR --version v1.0-mini [--protocol fine]

Training never waits for labels after this; the label cache itself is model/data/label_cache.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from model.data.dataset import dataset_fingerprint, index_split, split_names
from model.data.label_cache import LabelCache, LabelJob, default_cache_dir
from model.data.labels import PROTOCOLS, LabelConfig
from model.geometry import BevGrid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", type=Path, required=True)
    parser.add_argument("--version", default="v1.0-mini")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="hdmapnet")
    parser.add_argument("--splits", nargs="*", help="default: every split of the dataroot")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--divider-width-m", type=float, default=0.75)
    parser.add_argument("--boundary-width-m", type=float, default=0.75)
    parser.add_argument(
        "--grid",
        type=float,
        nargs=5,
        metavar=("X_MIN", "X_MAX", "Y_MIN", "Y_MAX", "RES"),
        default=None,
        help="BEV grid in metres (default: model.geometry.BevGrid())",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    grid = BevGrid(*args.grid) if args.grid else BevGrid()
    cfg = LabelConfig(
        protocol=args.protocol,
        grid=grid,
        divider_width_m=args.divider_width_m,
        boundary_width_m=args.boundary_width_m,
    )
    splits = args.splits or split_names(args.dataroot, args.version)
    jobs: dict[str, LabelJob] = {}
    for split in splits:
        for record in index_split(args.dataroot, args.version, split):
            jobs[record.sample_token] = LabelJob(
                record.sample_token, record.location, record.global_from_ego
            )
    cache = LabelCache(
        args.cache_dir or default_cache_dir(), dataset_fingerprint(args.dataroot, args.version), cfg
    )
    elapsed = cache.ensure(list(jobs.values()), args.dataroot, num_workers=args.workers)
    print(
        f"{len(jobs)} labels ({', '.join(splits)}) cached in {cache.root} "
        f"({elapsed:.1f} s building)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
