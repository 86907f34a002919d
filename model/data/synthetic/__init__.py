"""Synthetic nuScenes-format dataroots: procedural road worlds rendered by ray casting.

    python -m model.data.synthetic --out DIR [--scenes N] [--samples-per-scene M]
                                   [--image-size HxW] [--seed S] [--overwrite]

See docs/synthetic.md for the worlds, the renderer and the files written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.data.synthetic.generate import GENERATOR_VERSION, generate_dataset

__all__ = ["GENERATOR_VERSION", "generate_dataset"]


def __getattr__(name: str):
    # Lazy, so that the CLI rejects bad arguments without importing numpy, cv2 and torch.
    if name in __all__:
        from model.data.synthetic import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
