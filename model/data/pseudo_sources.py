"""Pseudo-label sets: which files a data config's pseudo-labels are, and where they lie.

A *set* is one folder of per-camera label images, ``DIR/pseudo_labels/<set>/<protocol>/CAM_*/
<stem>.png`` (uint8 perspective class ids, 255 = ignore; ``<protocol>`` the perspective classes,
``model.data.labels.PSEUDO_LABEL_PROTOCOL``). Every value that changes the labels is in the
set's name, so two settings never share files:

    mask2former          Mask2Former's labels (``model.data.pseudo_labels``)
    synthetic            the simulated labeller at noise ``medium`` (the default; its folder of old)
    synthetic-<noise>    the simulated labeller at ``clean``, ``low`` or ``high`` (``custom``: a
                         ``Corruption`` that is no preset, written by ``run_synthetic`` only)
    oracle-<label key>   the BEV labels of one label config (``LabelConfig.cache_key``)
                         reprojected into the cameras: the positive control
    shuffled-<set>       the labels of ``<set>``, each image given another keyframe's same
                         camera: the negative control

(the controls: ``model.data.controls``).

A data config names its set with three fields: ``pseudo_labels`` (the labeller),
``pseudo_label_noise`` (the simulated labeller's preset) and ``pseudo_label_source`` (one of
``SOURCES``); ``label_set`` turns them into the folder name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

LABELERS = ("synthetic", "mask2former")
# labeler: the labeller's own labels; oracle, shuffled: the controls (model.data.controls).
SOURCES = ("labeler", "oracle", "shuffled")
NOISE_LEVELS = ("clean", "low", "medium", "high")  # model.data.simulated_labeler.Corruption.preset
DEFAULT_NOISE = "medium"
MARKER = "source.json"  # beside a control's labels: how they were made, and whether completely

_SET = re.compile(
    r"^(?:shuffled-)?(?:mask2former|synthetic(?:-(?:clean|low|high|custom))?)$|^oracle-[0-9a-f]+$"
)


def labeler_set(labeler: str, noise_level: str = DEFAULT_NOISE) -> str:
    """The set of a labeller's own labels (the noise level is the simulated labeller's only)."""
    if labeler not in LABELERS:
        raise ValueError(f"unknown labeller {labeler!r}; expected one of {LABELERS}")
    if labeler == "mask2former" or noise_level == DEFAULT_NOISE:
        return labeler
    return f"{labeler}-{noise_level}"


def oracle_set(label_key: str) -> str:
    return f"oracle-{label_key}"


def shuffled_set(base: str) -> str:
    return f"shuffled-{base}"


def label_set(source: str, labeler: str, noise_level: str, label_key: str) -> str:
    """The set a data config reads: ``source`` of ``SOURCES``, the labeller and its noise level
    (read by ``labeler`` and ``shuffled``), the BEV label config's key (read by ``oracle``)."""
    if source == "oracle":
        return oracle_set(label_key)
    if source == "shuffled":
        return shuffled_set(labeler_set(labeler, noise_level))
    if source == "labeler":
        return labeler_set(labeler, noise_level)
    raise ValueError(f"unknown pseudo-label source {source!r}; expected one of {SOURCES}")


def check_label_set(name: str) -> str:
    """``name`` if it names a set (module docstring), else ValueError."""
    if not _SET.match(name):
        raise ValueError(
            f"pseudo_labels: {name!r} names no pseudo-label set (mask2former, synthetic, "
            "synthetic-<noise>, oracle-<label key> or shuffled-<one of these labeller sets>)"
        )
    return name


def pseudo_label_path(dataroot: Path, label_set: str, protocol: str, image_path: Path) -> Path:
    """``DIR/pseudo_labels/<set>/<protocol>/CAM_*/<stem>.png`` for a camera image."""
    return (
        Path(dataroot)
        / "pseudo_labels"
        / label_set
        / protocol
        / image_path.parent.name
        / f"{image_path.stem}.png"
    )


def pseudo_label_command(dataroot: Path, version: str, label_set: str, protocol: str) -> str:
    """How the files of a set are made (what a missing-files error tells the user)."""
    if label_set.startswith(("oracle-", "shuffled-")):
        return (
            "a training run that reads them (model.training.train.ensure_pseudo_labels writes "
            f"{label_set} into {Path(dataroot) / 'pseudo_labels'} on first use)"
        )
    labeler, _, noise = label_set.partition("-")
    command = (
        f"python -m model.data.pseudo_labels --dataroot {dataroot} --version {version} "
        f"--labeler {labeler} --protocol {protocol}"
    )
    if noise:
        command += f" --noise {noise}"
    if labeler == "mask2former":
        command += " --checkpoint <DIR of the Mask2Former Vistas checkpoint>"
    return command


def is_complete(marker: Path) -> bool:
    """Whether a set's marker file (``noise.json``, ``source.json``) says its writer finished."""
    try:
        return bool(json.loads(Path(marker).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


@dataclass
class LabelerReport:
    """What a labelling run did."""

    written: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0
