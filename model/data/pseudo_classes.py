"""The perspective classes pseudo-labels use, per protocol, and how Mapillary Vistas classes map to
them (by *name*, so any checkpoint whose ``id2label`` uses the Vistas names works whatever its
class order)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from model.data.labels import PSEUDO_LABEL_PROTOCOL
from model.data.vistas import VISTAS_CLASSES
from model.names import IGNORE

log = logging.getLogger(__name__)


# Perspective classes per protocol. hdmapnet: the BEV classes themselves. fine: Vistas v1.2
# cannot tell lane from road dividers or stop lines apart, so its perspective classes are
# coarser; PSEUDO_TO_BEV says which BEV channels each one stands for.
PSEUDO_CLASSES: dict[str, tuple[str, ...]] = {
    "hdmapnet": ("background", "divider", "ped_crossing", "boundary"),
    "fine": ("background", "drivable_area", "lane_marking", "ped_crossing"),
}
PSEUDO_TO_BEV: dict[str, dict[str, tuple[str, ...]]] = {
    "hdmapnet": {name: (name,) for name in PSEUDO_CLASSES["hdmapnet"]},
    "fine": {
        "background": (),
        "drivable_area": ("drivable_area",),
        "lane_marking": ("lane_divider", "road_divider", "stop_line"),
        "ped_crossing": ("ped_crossing",),
    },
}


def pseudo_channel_groups(protocol: str) -> list[list[int]]:
    """For each perspective class id, the channel indices of BEV ``protocol`` it stands for
    (PSEUDO_TO_BEV of the protocol's pseudo-label classes)."""
    from model.data.labels import class_names

    bev = class_names(protocol)
    pseudo = PSEUDO_LABEL_PROTOCOL[protocol]
    return [[bev.index(name) for name in PSEUDO_TO_BEV[pseudo][c]] for c in PSEUDO_CLASSES[pseudo]]


# Flat, paved ground that carries no marking: the BEV says "background" there. Uneven or
# occluding surfaces (terrain, vegetation, snow) are left out: their pixels are not reliably on
# the ground plane the reprojection assumes.
_PAVED_GROUND = (
    "Road",
    "Service Lane",
    "Bike Lane",
    "Parking",
    "Rail Track",
    "Manhole",
    "Pothole",
    "Catch Basin",
    "Sidewalk",
    "Pedestrian Area",
)
_DRIVABLE = ("Road", "Service Lane", "Bike Lane", "Parking", "Manhole", "Pothole", "Catch Basin")

# Vistas class name -> perspective class name. Every name not listed (vehicles, people, sky,
# buildings, poles, vegetation, ...) is ignored (255).
VISTAS_TO_PROTOCOL: dict[str, dict[str, str]] = {
    "hdmapnet": {
        **{name: "background" for name in _PAVED_GROUND},
        "Lane Marking - General": "divider",
        "Lane Marking - Crosswalk": "ped_crossing",
        "Crosswalk - Plain": "ped_crossing",
        "Curb": "boundary",
        "Curb Cut": "boundary",
    },
    "fine": {
        **{name: "background" for name in _PAVED_GROUND},
        **{name: "drivable_area" for name in _DRIVABLE},
        "Lane Marking - General": "lane_marking",
        "Lane Marking - Crosswalk": "ped_crossing",
        "Crosswalk - Plain": "ped_crossing",
        "Curb": "background",
        "Curb Cut": "background",
    },
}


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def class_lookup(id2label: Mapping[int, str], protocol: str) -> np.ndarray:
    """(256,) uint8 table: a checkpoint's class id -> perspective class id (255 ignore)."""
    if protocol not in PSEUDO_CLASSES:
        raise ValueError(f"unknown protocol {protocol!r}")
    ours = {_normalise(k): v for k, v in VISTAS_TO_PROTOCOL[protocol].items()}
    ids = PSEUDO_CLASSES[protocol]
    table = np.full(256, IGNORE, np.uint8)
    matched = 0
    for index, name in id2label.items():
        target = ours.get(_normalise(str(name)))
        if target is not None:
            table[int(index)] = ids.index(target)
            matched += 1
    if not any(table[int(i)] not in (IGNORE, 0) for i in id2label):
        raise ValueError(
            "the checkpoint's id2label has none of the Vistas marking classes "
            f"({sorted(k for k, v in VISTAS_TO_PROTOCOL[protocol].items() if v != 'background')}); "
            "is it a Mapillary Vistas semantic checkpoint?"
        )
    log.debug("mapped %d of %d checkpoint classes", matched, len(id2label))
    return table


VISTAS_LOOKUP = {p: class_lookup(dict(enumerate(VISTAS_CLASSES)), p) for p in PSEUDO_CLASSES}
