"""The controls of the pseudo-label axis (model.data.controls) on a synthetic dataroot: the
oracle is the BEV labels where the loss's rays hit, the shuffled set keeps the statistics and
loses the geometry, and source and noise key the files, the pretraining and the spec."""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from harness.context import pretrain_params
from harness.spec import SpecError, load_spec
from harness.trials import Trial, expand_trials
from model.config import DataConfig
from model.data.controls import ensure_label_set, perspective_classes, shuffle_partners
from model.data.keyframes import dataset_fingerprint, index_split, split_names
from model.data.label_cache import LabelCache
from model.data.labels import FINE_CLASSES, LabelConfig
from model.data.pseudo_classes import PSEUDO_CLASSES
from model.data.pseudo_sources import (
    MARKER,
    NOISE_LEVELS,
    SOURCES,
    is_complete,
    label_set,
    pseudo_label_path,
)
from model.geometry import BevGrid
from model.names import IGNORE
from model.network.reprojection import reprojection_grids

VERSION = "v1.0-mini"
GRID = BevGrid(-30.0, 30.0, -15.0, 15.0, 0.5)  # the nano preset's label grid
CFG = LabelConfig("hdmapnet", GRID)


@pytest.fixture(scope="module")
def root(synthetic_root, tmp_path_factory) -> Path:
    """A private copy of the synthetic dataroot to write pseudo-labels into."""
    return Path(shutil.copytree(synthetic_root, tmp_path_factory.mktemp("controls") / "root"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label_cache")


@pytest.fixture(scope="module")
def oracle(root, cache) -> str:
    return ensure_label_set(root, VERSION, "oracle", "synthetic", "medium", CFG, cache)


@pytest.fixture(scope="module")
def shuffled(root, cache) -> str:
    return ensure_label_set(root, VERSION, "shuffled", "synthetic", "medium", CFG, cache)


def keyframes(root: Path, cache: Path, split: str | None = None):
    splits = [split] if split else split_names(root, VERSION)
    return [r for s in splits for r in index_split(root, VERSION, s, cache_dir=cache)]


def read_label(root: Path, name: str, image_path: Path) -> np.ndarray:
    path = pseudo_label_path(root, name, "hdmapnet", image_path)
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# --- oracle --------------------------------------------------------------------------------------


def bev_label_at_rays(bev_label: np.ndarray, intrinsics, ego_from_cam, image_hw) -> np.ndarray:
    """The expected oracle, computed apart from the code under test: the loss's sampling grid
    at every pixel, the BEV label read there by nearest-neighbour ``grid_sample``."""
    grids = reprojection_grids(
        torch.from_numpy(intrinsics)[None, None], torch.from_numpy(ego_from_cam)[None, None],
        image_hw, GRID, stride=1, cache=False,
    )  # fmt: skip
    bev = torch.from_numpy(bev_label.astype(np.float32))[None, None]
    uv = grids.uv.reshape(1, *image_hw, 2)
    sampled = F.grid_sample(bev, uv, mode="nearest", align_corners=False)[0, 0].long()
    hit = grids.valid[0, 0]
    return torch.where(hit, sampled, torch.full_like(sampled, IGNORE)).numpy().astype(np.uint8)


def test_oracle_labels_are_the_bev_labels_where_the_rays_hit(root, cache, oracle):
    labels = LabelCache(cache, dataset_fingerprint(root, VERSION), CFG)
    hits = pixels = 0
    classes = set()
    for rec in keyframes(root, cache):
        bev = labels.load(rec.sample_token)
        for path, hw, k, e in zip(
            rec.image_paths, rec.image_sizes, rec.intrinsics, rec.ego_from_cam, strict=True
        ):
            got = read_label(root, oracle, path)
            np.testing.assert_array_equal(got, bev_label_at_rays(bev, k, e, hw), err_msg=str(path))
            hits += int((got != IGNORE).sum())
            pixels += got.size
            classes |= set(np.unique(got).tolist())
    assert hits > 0.2 * pixels  # the comparison covers the ground, not just ignored sky
    assert classes == {0, 1, 2, 3, IGNORE}  # every class is reached somewhere


def test_the_oracle_check_sees_the_geometry_moved_by_one_pixel(root, cache, oracle):
    """The comparison above is sharp: the expected labels with the principal point moved by
    one pixel disagree with the written ones in every camera of a keyframe."""
    labels = LabelCache(cache, dataset_fingerprint(root, VERSION), CFG)
    rec = keyframes(root, cache)[0]
    bev = labels.load(rec.sample_token)
    for path, hw, k, e in zip(
        rec.image_paths, rec.image_sizes, rec.intrinsics, rec.ego_from_cam, strict=True
    ):
        moved = k.copy()
        moved[0, 2] += 1.0
        got = read_label(root, oracle, path)
        assert (got != bev_label_at_rays(bev, moved, e, hw)).sum() > 0, path


def test_oracle_needs_only_the_bev_labels_and_the_calibration(synthetic_root, tmp_path):
    bare = tmp_path / "root"  # as real nuScenes: no simulated ground truth, no labeller's files
    shutil.copytree(synthetic_root, bare, ignore=shutil.ignore_patterns("semantic", "pseudo_*"))
    (bare / "synthetic.json").unlink()
    name = ensure_label_set(bare, VERSION, "oracle", "mask2former", "medium", CFG, tmp_path / "c")
    assert sorted(p.name for p in (bare / "pseudo_labels").iterdir()) == [name]
    written = list((bare / "pseudo_labels" / name / "hdmapnet").glob("CAM_*/*.png"))
    assert len(written) == 6 * len(keyframes(bare, tmp_path / "c"))


def test_a_marking_over_the_drivable_area_is_the_marking_in_perspective():
    label = np.zeros((len(FINE_CLASSES), 1, 4), np.uint8)  # four cells, multi-hot channels
    label[FINE_CLASSES.index("drivable_area"), 0, 1:] = 1
    label[FINE_CLASSES.index("stop_line"), 0, 2] = 1
    label[FINE_CLASSES.index("ped_crossing"), 0, 3] = 1
    names = [PSEUDO_CLASSES["fine"][c] for c in perspective_classes(label, "fine")[0]]
    assert names == ["background", "drivable_area", "lane_marking", "ped_crossing"]


# --- shuffled ------------------------------------------------------------------------------------


def class_histogram(root: Path, name: str, records) -> np.ndarray:
    counts = np.zeros(256, np.int64)
    for rec in records:
        for path in rec.image_paths:
            counts += np.bincount(read_label(root, name, path).ravel(), minlength=256)
    return counts


@pytest.mark.parametrize("split", ["train", "val"])
def test_shuffled_labels_keep_the_class_histogram_of_the_split(root, cache, shuffled, split):
    records = keyframes(root, cache, split)
    base = class_histogram(root, "synthetic", records)
    assert base[:4].all()
    np.testing.assert_array_equal(class_histogram(root, shuffled, records), base)


def test_shuffled_labels_are_another_keyframes_of_another_scene(root, cache, shuffled):
    marker = root / "pseudo_labels" / shuffled / "hdmapnet" / "source.json"
    partners = json.loads(marker.read_text())["partners"]
    records = {r.sample_token: r for r in keyframes(root, cache)}
    assert set(partners) == set(records)
    kept = []  # images that still hold their own labels
    for token, rec in records.items():
        partner = records[partners[token]]
        assert partner.scene_name != rec.scene_name
        for path, partner_path in zip(rec.image_paths, partner.image_paths, strict=True):
            got = read_label(root, shuffled, path)
            np.testing.assert_array_equal(got, read_label(root, "synthetic", partner_path))
            if np.array_equal(got, read_label(root, "synthetic", path)):
                kept.append(path)
    # An image keeps its labels only if two keyframes' labels are identical: not one here.
    assert kept == []


def test_the_shuffle_is_a_fixed_permutation_with_no_keyframe_of_its_own_scene():
    scenes = [s for s in "abcdef" for _ in range(4)] + ["g"] * 7
    partner = shuffle_partners(scenes, "train")
    assert sorted(partner) == list(range(len(scenes)))
    assert all(scenes[j] != scenes[i] for i, j in enumerate(partner))
    assert shuffle_partners(scenes, "train") == partner  # fixed: no trial or seed changes it
    assert shuffle_partners(scenes, "val") != partner


def test_a_split_of_one_big_scene_is_still_shuffled_without_fixed_points():
    scenes = ["a"] * 5 + ["b"]
    partner = shuffle_partners(scenes, "val")
    assert sorted(partner) == list(range(6)) and all(j != i for i, j in enumerate(partner))
    with pytest.raises(ValueError, match="1 keyframe"):
        shuffle_partners(["a"], "val")


# --- keys: files, pretraining, params, search ----------------------------------------------------


def test_every_source_and_noise_level_has_its_own_folder():
    names = {label_set(s, "synthetic", n, CFG.cache_key()) for s in SOURCES for n in NOISE_LEVELS}
    assert len(names) == 2 * len(NOISE_LEVELS) + 1  # the oracle reads no labeller
    assert label_set("labeler", "synthetic", "medium", "") == "synthetic"  # the folder of old
    fields = DataConfig.model_fields
    assert typing.get_args(fields["pseudo_label_source"].annotation) == SOURCES
    assert typing.get_args(fields["pseudo_label_noise"].annotation) == NOISE_LEVELS


def write_spec(folder: Path, data: dict, search: dict | None = None) -> Path:
    body = {"study": "controls", "model": {"preset": "nano"}, "data": data, "seeds": [0]}
    path = folder / f"spec{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**body, "search": search or {}}))
    return path


def test_the_pretraining_key_changes_with_the_source_and_the_noise(synthetic_root, tmp_path):
    fingerprint = dataset_fingerprint(synthetic_root, VERSION)  # the tables and maps only
    settings = [
        {},
        {"pseudo_label_source": "oracle"},
        {"pseudo_label_source": "shuffled"},
        {"pseudo_label_noise": "low"},
        {"pseudo_label_noise": "high", "pseudo_label_source": "shuffled"},
    ]
    specs = [load_spec(write_spec(tmp_path, data)) for data in settings]
    keys = {Trial("pretrained", 0).resolve(spec).pretrain_key(fingerprint) for spec in specs}
    assert len(keys) == len(settings)


def test_the_source_and_the_noise_are_logged_as_params(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"pseudo_label_source": "oracle"}))
    params = pretrain_params(Trial("pretrained", 0).resolve(spec))
    assert params["data.pseudo_label_source"] == "oracle"
    assert params["data.pseudo_label_noise"] == "medium"


def test_the_source_is_a_search_axis(tmp_path):
    axis = {"data.pseudo_label_source": ["oracle", "shuffled"]}
    spec = load_spec(write_spec(tmp_path, {}, search=axis))
    pretrained = [t.resolve(spec) for t in expand_trials(spec) if t.method == "pretrained"]
    assert sorted(t.spec.data.pseudo_label_source for t in pretrained) == ["oracle", "shuffled"]
    with pytest.raises(SpecError, match=r"search\.data\.pseudo_label_source\[0\].*'oracle'"):
        load_spec(write_spec(tmp_path, {}, search={"data.pseudo_label_source": ["orcale"]}))


# --- the training core's entry point --------------------------------------------------------------


def test_training_reads_the_set_its_data_config_names(root, cache, oracle):
    from model.presets import get_preset
    from model.training.train import ensure_pseudo_labels

    data = DataConfig(dataroot=str(root), cache_dir=str(cache), pseudo_label_source="oracle")
    assert ensure_pseudo_labels(data, get_preset("nano")) == oracle
    data = data.model_copy(update={"pseudo_label_source": "labeler", "pseudo_label_noise": "low"})
    name = ensure_pseudo_labels(data, get_preset("nano"))
    assert name == "synthetic-low" and (root / "pseudo_labels" / name / "hdmapnet").is_dir()


def test_the_sweep_writes_every_set_its_trials_read(synthetic_root, tmp_path):
    from harness.sweep_setup import prepare_pseudo_labels

    root = Path(shutil.copytree(synthetic_root, tmp_path / "root"))
    axis = {"data.pseudo_label_source": ["oracle", "shuffled"]}
    spec = load_spec(write_spec(tmp_path, {"dataroot": str(root)}, search=axis))
    resolved = [t.resolve(spec) for t in expand_trials(spec)]
    prepare_pseudo_labels(resolved, root, VERSION, tmp_path / "study")
    controls = {f"oracle-{CFG.cache_key()}", "shuffled-synthetic"}
    assert {p.name for p in (root / "pseudo_labels").iterdir()} == {"synthetic", *controls}
    for name in controls:
        assert is_complete(root / "pseudo_labels" / name / "hdmapnet" / MARKER)
    assert (tmp_path / "study" / "labels" / "bev_labels").is_dir()  # the study's label cache
