"""``python -m model.data.prepare``: precompute the BEV labels of every split of a dataroot.

    python -m model.data.prepare --dataroot DIR --version v1.0-mini [--protocol fine]

Training never waits for labels after this; the label cache itself is model/data/label_cache.py.
Bad input exits with status 2 and one line on stderr, before anything is written. The arguments
are checked before torch and the devkit are imported, so a typo is answered at once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from model.cli import OneLineParser, dir_to_create, existing_dir, int_at_least, one_line

PROG = "python -m model.data.prepare"
DESCRIPTION = "Precompute the BEV labels of every split of a dataroot."


def _parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=DESCRIPTION)
    add = parser.add_argument
    add("--dataroot", type=existing_dir, required=True, help="nuScenes-format dataroot")
    add("--version", default="v1.0-mini", help="table version folder (default v1.0-mini)")
    # The label options are LabelConfig's fields (its defaults, its checks): --NAME-WITH-DASHES.
    add("--protocol", help="label protocol, one of model.data.labels.PROTOCOLS (hdmapnet)")
    add("--source", help="map or paint (synthetic dataroots; default map)")
    add("--line-width-m", type=float, help="width of drawn lines in metres (0.75)")
    add("--clear-margin-m", type=float, help="margin a higher class clears per side (0.3)")
    add(
        "--grid",
        type=float,
        nargs=5,
        metavar=("X_MIN", "X_MAX", "Y_MIN", "Y_MAX", "RES"),
        help="BEV grid in metres (default: model.geometry.BevGrid())",
    )
    add("--splits", nargs="*", help="splits to label (default: every split of the dataroot)")
    add(
        "--cache-dir",
        type=dir_to_create,
        help="label cache (default $BEVLABELS_CACHE_DIR, else ~/.cache/bevlabels)",
    )
    add(
        "--workers",
        type=int_at_least(1),
        help="label processes (default min(cores, 8)); 1 labels in this process",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    from model.data.errors import DataError
    from model.data.keyframes import (
        check_dataroot,
        dataset_fingerprint,
        index_split,
        split_names,
        split_scenes,
    )
    from model.data.label_cache import LabelCache, LabelJob, default_cache_dir
    from model.data.labels import LabelConfig
    from model.geometry import BevGrid

    given = {
        name: getattr(args, name)
        for name in ("protocol", "source", "line_width_m", "clear_margin_m", "grid")
        if getattr(args, name) is not None
    }
    if "grid" in given:
        given["grid"] = BevGrid(*given["grid"])
    try:
        cfg = LabelConfig(**given)
    except ValueError as exc:  # "<field>[.<part>]: problem", for a field of `given`
        message = one_line(exc)
        field = message.split(":")[0].split(".")[0]
        if field not in given:
            raise
        parser.reject(f"--{field.replace('_', '-')}", message.removeprefix(f"{field}: "))
    try:
        check_dataroot(args.dataroot, args.version)
    except DataError as exc:
        parser.reject("--version", one_line(exc))
    splits = args.splits or split_names(args.dataroot, args.version)
    for split in splits:
        try:
            split_scenes(args.dataroot, args.version, split)
        except ValueError as exc:
            parser.reject("--splits", one_line(exc))

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cache_dir = args.cache_dir or default_cache_dir()
        jobs: dict[str, LabelJob] = {}
        for split in splits:  # the keyframe index of each split is cached too
            for record in index_split(args.dataroot, args.version, split, cache_dir=cache_dir):
                jobs[record.sample_token] = LabelJob(
                    record.sample_token, record.location, record.global_from_ego
                )
        fingerprint = dataset_fingerprint(args.dataroot, args.version)
        cache = LabelCache(cache_dir, fingerprint, cfg)
        elapsed = cache.ensure(list(jobs.values()), args.dataroot, num_workers=args.workers)
    except DataError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(
        f"{len(jobs)} labels ({', '.join(splits)}) cached in {cache.root} "
        f"({elapsed:.1f} s building)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
