"""Keyframes of a nuScenes-format dataroot as model-ready samples (contract: docs/architecture.md).

Every read of the dataroot's tables goes through nuscenes-devkit, for real nuScenes and the
synthetic dataroot alike. At construction the devkit tables are condensed into one small record
per keyframe (``model.data.keyframes``), kept in the cache beside the labels so later processes
(every trial) never import the devkit, and the BEV labels of the split are built into the label
cache if they are not there yet (``model.data.prepare`` precomputes both).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from model.data.errors import MissingPseudoLabelsError
from model.data.images import load_camera_image, read_image
from model.data.keyframes import SampleRecord, check_dataroot, dataset_fingerprint, index_split
from model.data.label_cache import LabelCache, LabelJob, default_cache_dir
from model.data.labels import PSEUDO_LABEL_PROTOCOL, LabelConfig
from model.data.pseudo_sources import check_label_set, pseudo_label_command, pseudo_label_path
from model.geometry import invert_transform, scale_intrinsics


class NuScenesBevDataset(Dataset):
    """Keyframes of one split; items are the sample dicts of docs/architecture.md.

    ``scenes`` restricts the split to those scenes (e.g. a label subset). ``load_prev=False``
    leaves out the ``prev`` entry (and its image reads) for phases without temporal terms.
    """

    def __init__(
        self,
        dataroot: Path | str,
        version: str,
        split: str,
        image_size: tuple[int, int],
        label_cfg: LabelConfig | None = None,
        pseudo_labels: str | None = None,
        scenes: Sequence[str] | None = None,
        cache_dir: Path | str | None = None,
        load_prev: bool = True,
        label_workers: int | None = None,
        progress: bool = True,
        labelled_scenes: Sequence[str] | None = None,
    ) -> None:
        self.dataroot = check_dataroot(dataroot, version)
        # A fine-tuning set that mixes labelled and unlabelled samples: each sample says which
        # it is (``labelled``), and only the labelled ones may be used for BEV supervision.
        self.labelled_scenes = None if labelled_scenes is None else frozenset(labelled_scenes)
        self.version = version
        self.split = split
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.label_cfg = label_cfg or LabelConfig()
        self.load_prev = load_prev
        # A pseudo-label set (model.data.pseudo_sources): a labeller's, or a control's.
        self.pseudo_labels = None if pseudo_labels is None else check_label_set(pseudo_labels)
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.records = index_split(self.dataroot, version, split, scenes, cache_dir=cache_dir)
        if not self.records:
            raise ValueError(f"split {split!r} of {self.dataroot} has no keyframes")
        self.fingerprint = dataset_fingerprint(self.dataroot, version)
        self.label_cache = LabelCache(cache_dir, self.fingerprint, self.label_cfg)
        self.label_build_s = self.label_cache.ensure(
            [LabelJob(r.sample_token, r.location, r.global_from_ego) for r in self.records],
            self.dataroot,
            num_workers=label_workers,
            progress=progress,
        )
        if pseudo_labels is not None:
            self._check_pseudo_labels()

    # -- bookkeeping

    def __len__(self) -> int:
        return len(self.records)

    def is_labelled(self, rec: SampleRecord) -> bool:
        return self.labelled_scenes is None or rec.scene_name in self.labelled_scenes

    @property
    def labelled_records(self) -> list[SampleRecord]:
        return [r for r in self.records if self.is_labelled(r)]

    @property
    def labelled_count(self) -> int:
        return len(self.labelled_records)

    @property
    def scene_names(self) -> list[str]:
        return list(dict.fromkeys(r.scene_name for r in self.records))

    @property
    def samples_per_scene(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.scene_name] = counts.get(r.scene_name, 0) + 1
        return counts

    @property
    def _pseudo_protocol(self) -> str:
        """The perspective classes the pseudo-labels use (hdmapnet_filled's are hdmapnet's)."""
        return PSEUDO_LABEL_PROTOCOL[self.label_cfg.protocol]

    def _pseudo_path(self, image_path: Path) -> Path:
        return pseudo_label_path(
            self.dataroot, self.pseudo_labels, self._pseudo_protocol, image_path
        )

    def _check_pseudo_labels(self) -> None:
        wanted = [self._pseudo_path(p) for r in self.records for p in r.image_paths]
        missing = [p for p in wanted if not p.is_file()]
        if missing:
            raise MissingPseudoLabelsError(
                missing,
                len(wanted),
                pseudo_label_command(
                    self.dataroot, self.version, self.pseudo_labels, self._pseudo_protocol
                ),
            )

    # -- items

    def _cameras(self, rec: SampleRecord) -> dict[str, torch.Tensor]:
        height, width = self.image_size
        images = np.empty((len(rec.image_paths), 3, height, width), np.float32)
        for i, (path, size) in enumerate(zip(rec.image_paths, rec.image_sizes, strict=True)):
            load_camera_image(path, self.image_size, size, out=images[i])
        intrinsics = np.stack(
            [
                scale_intrinsics(k, width / w0, height / h0)
                for k, (h0, w0) in zip(rec.intrinsics, rec.image_sizes, strict=True)
            ]
        )
        out = {
            "images": torch.from_numpy(images),
            "intrinsics": torch.from_numpy(intrinsics.astype(np.float32)),
            "ego_from_cam": torch.from_numpy(rec.ego_from_cam.astype(np.float32)),
        }
        if self.pseudo_labels is not None:
            out["pseudo_labels"] = torch.from_numpy(
                np.stack([self.load_pseudo_label(p) for p in rec.image_paths]).astype(np.int64)
            )
        return out

    def load_pseudo_label(self, image_path: Path) -> np.ndarray:
        """The pseudo-label image of one camera image, resized to ``image_size`` (nearest)."""
        path = self._pseudo_path(image_path)
        if not path.is_file():
            raise MissingPseudoLabelsError(
                [path],
                1,
                pseudo_label_command(
                    self.dataroot, self.version, self.pseudo_labels, self._pseudo_protocol
                ),
            )
        label = read_image(path, cv2.IMREAD_UNCHANGED)
        height, width = self.image_size
        if label.shape != (height, width):
            label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        return label

    def _bev_label(self, rec: SampleRecord) -> torch.Tensor:
        label = self.label_cache.load(rec.sample_token)
        if self.label_cfg.multilabel:
            return torch.from_numpy(label.astype(np.float32))
        return torch.from_numpy(label.astype(np.int64))

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        sample = self._cameras(rec)
        sample["global_from_ego"] = torch.from_numpy(rec.global_from_ego.copy())
        has_prev = rec.prev_index >= 0
        if has_prev:
            prev_rec = self.records[rec.prev_index]
            prev_ego_from_ego = invert_transform(prev_rec.global_from_ego) @ rec.global_from_ego
        else:
            prev_ego_from_ego = np.eye(4)
        sample["prev_ego_from_ego"] = torch.from_numpy(prev_ego_from_ego.astype(np.float32))
        sample["has_prev"] = torch.tensor(has_prev)
        if self.load_prev:
            # Without a previous keyframe the current one stands in (the loss masks it out).
            sample["prev"] = (
                self._cameras(prev_rec) if has_prev else dict(self._cameras_view(sample))
            )
        sample["bev_label"] = self._bev_label(rec)
        if self.labelled_scenes is not None:
            sample["labelled"] = torch.tensor(self.is_labelled(rec))
        sample["sample_token"] = rec.sample_token
        sample["prev_token"] = prev_rec.sample_token if has_prev else ""
        sample["scene_name"] = rec.scene_name
        return sample

    @staticmethod
    def _cameras_view(sample: dict) -> dict:
        keys = ("images", "intrinsics", "ego_from_cam", "pseudo_labels")
        return {k: sample[k] for k in keys if k in sample}
