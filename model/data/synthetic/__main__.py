"""python -m model.data.synthetic --out DIR [--scenes N] [--samples-per-scene M]
[--image-size HxW] [--seed S] [--overwrite]

Bad arguments print one line on stderr and exit with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from model.cli import OneLineParser, int_at_least

PROG = "python -m model.data.synthetic"


_positive, _non_negative = int_at_least(1), int_at_least(0)


def _image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 225x400, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description="Write a synthetic nuScenes-format dataroot.")
    parser.add_argument("--out", required=True, type=Path, help="dataroot to create")
    parser.add_argument("--scenes", type=_positive, default=12, help="number of scenes (12)")
    parser.add_argument(
        "--samples-per-scene", type=_positive, default=20, help="2 Hz keyframes per scene (20)"
    )
    parser.add_argument(
        "--image-size", type=_image_size, default=(225, 400), help="HEIGHTxWIDTH (225x400)"
    )
    parser.add_argument("--seed", type=_non_negative, default=0, help="random seed (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from model.data.synthetic.generate import generate_dataset

    try:
        generate_dataset(
            args.out,
            scenes=args.scenes,
            samples_per_scene=args.samples_per_scene,
            image_size=args.image_size,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
