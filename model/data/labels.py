"""BEV road-marking labels in the ego frame, from the nuScenes vector map or from the paint.

Protocols (the rules in full, with where each comes from: docs/data.md):

- ``hdmapnet`` (default): HDMapNet's rules (Tsinghua-MARS-Lab/HDMapNet, data/vector_map.py and
  data/rasterize.py), ``background, divider, ped_crossing, boundary`` as ``(H, W)`` uint8 ids.
  divider = road_divider + lane_divider lines; ped_crossing = the two longest exterior edges of
  each crossing polygon, as lines; boundary = the rings of union(road_segment, lane). All are
  clipped to the grid (boundary to the grid shrunk by 0.2 m) and drawn as bands
  ``line_width_m`` wide: a cell belongs to a band iff its centre lies within ``line_width_m / 2``
  of the line, so the band's width does not depend on the resolution. A higher class clears the
  lower ones (boundary > ped_crossing > divider) within a band ``clear_margin_m`` wider on each
  side (HDMapNet's ``thickness + 4`` px filter mask: 0.3 m per side at its 0.15 m).
- ``hdmapnet_filled``: the same classes under the rules this project used before: crossings as
  filled polygons, lines buffered and filled with the devkit's vertex rounding, paint order
  ped_crossing < boundary < divider (a later class overwrites).
- ``fine``: ``lane_divider, road_divider, ped_crossing, stop_line, drivable_area``, multi-hot
  ``(C, H, W)``, filled like ``hdmapnet_filled``, no priority.

Sources: ``map`` (the vector map, real nuScenes and synthetic alike) or ``paint`` (``hdmapnet``
on synthetic dataroots only): the painted marks and curbs as the cameras see them, read from
``DIR/maps/paint/<location>.json`` (``model.data.synthetic``), each mark widened to at least
``line_width_m`` and then drawn like the map's bands. Paint labels are what the pseudo-labels
can see: dashes without their gaps, zebra bars, stop lines (Vistas' "Lane Marking - General",
hence divider), curbs where the curb is.

How a label is drawn: ``model.data.rasterise`` (``rasterise_bev_label``, on the canvas of
``model.data.canvas``); how it is stored: ``pack_label`` below, in ``model.data.label_cache``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.geometry import BevGrid, check_grid, check_number

PROTOCOLS: tuple[str, ...] = ("hdmapnet", "hdmapnet_filled", "fine")
SOURCES: tuple[str, ...] = ("map", "paint")

HDMAPNET_CLASSES: tuple[str, ...] = ("background", "divider", "ped_crossing", "boundary")
FINE_CLASSES: tuple[str, ...] = (
    "lane_divider",
    "road_divider",
    "ped_crossing",
    "stop_line",
    "drivable_area",
)
_CLASSES = {"hdmapnet": HDMAPNET_CLASSES, "hdmapnet_filled": HDMAPNET_CLASSES, "fine": FINE_CLASSES}

# Bump when the rasteriser changes in a way that changes labels: invalidates label caches.
LABEL_ALGORITHM_VERSION = 2

# The rules each protocol's rasteriser reads. They are part of the cache key: changing one
# rebuilds the labels.
HDMAPNET_RULES: dict = {
    "divider_layers": ("road_divider", "lane_divider"),  # vector_map.py line_classes
    "ped_crossing_edges": 2,  # get_ped_crossing_line: np.argsort(edge lengths)[-2:]
    "boundary_layers": ("road_segment", "lane"),  # contour_classes: rings of their union
    "boundary_inset_m": 0.2,  # poly_geoms_to_vectors: rings clipped to the patch less 0.2 m
    "priority": ("boundary", "ped_crossing", "divider"),  # rasterize.py overlap_filter
}
HDMAPNET_FILLED_RULES: dict = {
    "divider_layers": ("road_divider", "lane_divider"),
    "ped_crossing_layers": ("ped_crossing",),
    "boundary_layers": ("road_segment", "lane"),
    "paint_order": ("ped_crossing", "boundary", "divider"),  # a later class overwrites
}
FINE_RULES: dict = {
    "lines": {"lane_divider": ("lane_divider",), "road_divider": ("road_divider",)},
    "polygons": {n: (n,) for n in ("ped_crossing", "stop_line", "drivable_area")},
}
_RULES = {"hdmapnet": HDMAPNET_RULES, "hdmapnet_filled": HDMAPNET_FILLED_RULES, "fine": FINE_RULES}
# The perspective classes (pseudo-labels) a BEV protocol is trained against: hdmapnet_filled
# has hdmapnet's classes, so it shares hdmapnet's pseudo-labels.
PSEUDO_LABEL_PROTOCOL: dict[str, str] = {
    "hdmapnet": "hdmapnet",
    "hdmapnet_filled": "hdmapnet",
    "fine": "fine",
}
# A paint mark's Vistas class -> hdmapnet class: pseudo_classes.VISTAS_TO_PROTOCOL["hdmapnet"].
PAINT_CLASSES: dict[str, str] = {
    "Lane Marking - General": "divider",
    "Lane Marking - Crosswalk": "ped_crossing",
    "Curb": "boundary",
}


def class_names(protocol: str) -> list[str]:
    """The BEV classes of a protocol, in channel / id order."""
    if protocol not in _CLASSES:
        raise ValueError(
            f"protocol: unknown label protocol {protocol!r}; expected one of {PROTOCOLS}"
        )
    return list(_CLASSES[protocol])


def is_multilabel(protocol: str) -> bool:
    """True where the protocol's label is multi-hot ``(C, H, W)``, not class ids ``(H, W)``."""
    class_names(protocol)
    return protocol == "fine"


def paint_path(dataroot: Path | str, location: str) -> Path:
    """Where a synthetic dataroot keeps a location's painted marks."""
    return Path(dataroot) / "maps" / "paint" / f"{location}.json"


@dataclass(frozen=True)
class LabelConfig:
    """What a BEV label is: class protocol, grid, line width, overlap margin and source."""

    protocol: str = "hdmapnet"
    grid: BevGrid = field(default_factory=BevGrid)
    line_width_m: float = 0.75  # HDMapNet: thickness 5 px at 0.15 m
    clear_margin_m: float = 0.3  # hdmapnet: per side, HDMapNet's thickness + 4 px at 0.15 m
    source: str = "map"  # "map" | "paint" (synthetic dataroots, hdmapnet)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol: must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "paint" and self.protocol != "hdmapnet":
            raise ValueError(
                f"source: 'paint' labels exist for protocol 'hdmapnet' only, got protocol "
                f"{self.protocol!r}"
            )
        object.__setattr__(self, "grid", check_grid(self.grid))
        check_number("line_width_m", self.line_width_m, 0.0, strict=True)
        check_number("clear_margin_m", self.clear_margin_m, 0.0, strict=False)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.protocol)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        return is_multilabel(self.protocol)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rules(self) -> dict:
        """The rules the rasteriser applies for this config (they key the cache)."""
        out = {"protocol": _RULES[self.protocol]}
        if self.source == "paint":
            from model.data.synthetic.maps import PAINT_FORMAT_VERSION

            out["paint"] = {"classes": PAINT_CLASSES, "format": PAINT_FORMAT_VERSION}
        return out

    def cache_key(self) -> str:
        """Short hash of everything that changes a label (config, rules, rasteriser version)."""
        payload = json.dumps(
            {"config": self.to_dict(), "rules": self.rules(), "algorithm": LABEL_ALGORITHM_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Storage: one single-channel uint8 image per label (multi-hot channels packed as bits).


def pack_label(label: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """Label -> ``(H, W)`` uint8 (class ids as is; multi-hot channel k as bit k)."""
    if not cfg.multilabel:
        return label.astype(np.uint8)
    if label.shape[0] > 8:
        raise ValueError("at most 8 multi-label channels fit in one uint8 image")
    bits = (1 << np.arange(label.shape[0], dtype=np.uint8))[:, None, None]
    return ((label > 0).astype(np.uint8) * bits).sum(axis=0).astype(np.uint8)


def unpack_label(packed: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """Inverse of ``pack_label``."""
    if not cfg.multilabel:
        return packed
    bits = (1 << np.arange(cfg.num_classes, dtype=np.uint8))[:, None, None]
    return ((packed[None] & bits) > 0).astype(np.uint8)
