"""The dataset over a synthetic nuScenes-format dataroot: the sample contract of
docs/architecture.md, splits, temporal links, the label cache, loaders and bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nuscenes.map_expansion.map_api import NuScenesMap

from model.data import label_cache, prepare
from model.data.batching import collate, make_loader
from model.data.dataset import NuScenesBevDataset
from model.data.errors import (
    CorruptImageError,
    DatarootNotFoundError,
    MapNotFoundError,
    MissingPseudoLabelsError,
)
from model.data.keyframes import dataset_fingerprint, index_split, split_scenes
from model.data.labels import FINE_CLASSES, LabelConfig
from model.data.rasterise import rasterise_bev_label
from model.data.subsets import label_subset
from model.geometry import CAMERAS, BevGrid, invert_transform

IMAGE_SIZE = (48, 80)
GRID = BevGrid(-15.0, 15.0, -7.5, 7.5, 0.3)  # 100 x 50: quick to rasterise
CFG = LabelConfig(grid=GRID)
VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label_cache")


@pytest.fixture(scope="module")
def train_set(synthetic_root, cache_dir) -> NuScenesBevDataset:
    return NuScenesBevDataset(
        synthetic_root, VERSION, "train", IMAGE_SIZE, CFG, cache_dir=cache_dir, progress=False
    )


@pytest.fixture
def writable_root(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic dataroot that a test may damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "dataroot"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


# --- the sample contract ------------------------------------------------------------------------


def test_sample_matches_the_contract(train_set):
    sample = train_set[1]
    h, w = IMAGE_SIZE
    expected = {
        "images": ((6, 3, h, w), torch.float32),
        "intrinsics": ((6, 3, 3), torch.float32),
        "ego_from_cam": ((6, 4, 4), torch.float32),
        "global_from_ego": ((4, 4), torch.float64),
        "prev_ego_from_ego": ((4, 4), torch.float32),
        "has_prev": ((), torch.bool),
        "bev_label": (GRID.shape, torch.int64),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(sample[key].shape) == shape, key
        assert sample[key].dtype == dtype, key
    assert set(sample["prev"]) == {"images", "intrinsics", "ego_from_cam"}
    assert sample["prev"]["images"].shape == sample["images"].shape
    assert isinstance(sample["sample_token"], str) and isinstance(sample["scene_name"], str)
    assert "pseudo_labels" not in sample
    assert set(sample["bev_label"].unique().tolist()) <= {0, 1, 2, 3}


def test_images_are_imagenet_normalised(train_set):
    images = train_set[0]["images"]
    assert torch.isfinite(images).all()
    assert -2.2 < images.min() < 0.0 < images.max() < 2.7  # (0 - 0.485)/0.229 .. (1 - 0.406)/0.225


def test_intrinsics_are_scaled_to_the_resized_images(train_set):
    rec = train_set.records[0]
    (h0, w0), (h, w) = rec.image_sizes[0], IMAGE_SIZE
    k = train_set[0]["intrinsics"][0].double().numpy()
    k0 = rec.intrinsics[0]
    np.testing.assert_allclose(k[0, 0], k0[0, 0] * w / w0, rtol=1e-5)
    np.testing.assert_allclose(k[1, 1], k0[1, 1] * h / h0, rtol=1e-5)
    np.testing.assert_allclose(k[0, 2], (k0[0, 2] + 0.5) * w / w0 - 0.5, rtol=1e-5)


def test_fine_protocol_label_is_multi_hot_float(synthetic_root, cache_dir):
    ds = NuScenesBevDataset(
        synthetic_root,
        VERSION,
        "val",
        IMAGE_SIZE,
        LabelConfig("fine", GRID),
        cache_dir=cache_dir,
        progress=False,
    )
    label = ds[0]["bev_label"]
    assert label.shape == (len(FINE_CLASSES), *GRID.shape) and label.dtype == torch.float32
    assert set(label.unique().tolist()) <= {0.0, 1.0}


def test_bev_label_is_the_rasterised_map_around_the_ego_pose(synthetic_root, train_set):
    for index in (0, len(train_set) - 1):
        rec = train_set.records[index]
        nusc_map = NuScenesMap(dataroot=str(synthetic_root), map_name=rec.location)
        expected = rasterise_bev_label(nusc_map, rec.global_from_ego, CFG)
        np.testing.assert_array_equal(train_set[index]["bev_label"].numpy(), expected)


def test_the_map_has_all_hdmapnet_classes_somewhere(train_set):
    seen = set()
    for index in range(len(train_set)):
        seen |= set(train_set[index]["bev_label"].unique().tolist())
    assert seen == {0, 1, 2, 3}


# --- splits and temporal links ------------------------------------------------------------------


def test_splits_come_from_splits_json(synthetic_root, train_set):
    splits = json.loads((synthetic_root / "splits.json").read_text())
    assert split_scenes(synthetic_root, VERSION, "train") == splits["train"]
    assert train_set.scene_names == splits["train"]
    assert not set(splits["train"]) & set(splits["val"])


def test_prev_links_consecutive_keyframes_of_a_scene(train_set):
    for index, rec in enumerate(train_set.records):
        sample = train_set[index]
        if index == 0 or train_set.records[index - 1].scene_name != rec.scene_name:
            assert not sample["has_prev"]
            torch.testing.assert_close(sample["prev_ego_from_ego"], torch.eye(4))
            assert torch.equal(sample["prev"]["images"], sample["images"])
        else:
            prev_rec = train_set.records[index - 1]
            assert sample["has_prev"]
            expected = invert_transform(prev_rec.global_from_ego) @ rec.global_from_ego
            np.testing.assert_allclose(sample["prev_ego_from_ego"].numpy(), expected, atol=1e-5)
            assert torch.equal(sample["prev"]["images"], train_set[index - 1]["images"])


def test_scenes_restrict_the_dataset_to_a_label_subset(synthetic_root, cache_dir, train_set):
    subset = label_subset(
        train_set.scene_names, 0.5, seed=0, samples_per_scene=train_set.samples_per_scene
    )
    ds = NuScenesBevDataset(
        synthetic_root,
        VERSION,
        "train",
        IMAGE_SIZE,
        CFG,
        scenes=subset.scenes,
        cache_dir=cache_dir,
        progress=False,
    )
    assert set(ds.scene_names) == set(subset.scenes)
    assert len(ds) == subset.num_samples


def test_scenes_outside_the_split_are_rejected(synthetic_root, cache_dir):
    with pytest.raises(ValueError, match="not in split"):
        NuScenesBevDataset(
            synthetic_root, VERSION, "train", IMAGE_SIZE, CFG, scenes=["nope"], cache_dir=cache_dir
        )


# --- label cache --------------------------------------------------------------------------------


def test_label_cache_is_reused_and_keyed_by_config(synthetic_root, cache_dir, train_set):
    again = NuScenesBevDataset(
        synthetic_root, VERSION, "train", IMAGE_SIZE, CFG, cache_dir=cache_dir, progress=False
    )
    assert again.label_build_s == 0.0
    assert again.label_cache.root == train_set.label_cache.root
    assert dataset_fingerprint(synthetic_root, VERSION) in train_set.label_cache.root.name
    wider = LabelConfig(grid=GRID, line_width_m=1.5)
    other = label_cache.LabelCache(cache_dir, train_set.fingerprint, wider)
    assert other.root != train_set.label_cache.root
    config = json.loads((train_set.label_cache.root / "config.json").read_text())
    assert config["fingerprint"] == train_set.fingerprint


def test_parallel_label_build_equals_serial(synthetic_root, train_set, tmp_path, monkeypatch):
    jobs = [
        label_cache.LabelJob(r.sample_token, r.location, r.global_from_ego)
        for r in train_set.records
    ]
    monkeypatch.setattr(label_cache, "_MIN_LABELS_FOR_POOL", 1)
    parallel = label_cache.LabelCache(tmp_path, train_set.fingerprint, CFG)
    parallel.ensure(jobs, synthetic_root, num_workers=2, progress=False)
    for job in jobs:
        np.testing.assert_array_equal(
            parallel.load(job.sample_token), train_set.label_cache.load(job.sample_token)
        )


def test_prepare_cli_precomputes_every_split(synthetic_root, tmp_path, capsys):
    grid = ["-15", "15", "-7.5", "7.5", "0.3"]
    args = ["--dataroot", str(synthetic_root), "--cache-dir", str(tmp_path), "--grid", *grid]
    assert prepare.main(args) == 0
    splits = json.loads((synthetic_root / "splits.json").read_text())
    labels = list(tmp_path.glob("bev_labels/*/*.png"))
    assert len(labels) == 6 * len(splits["train"] + splits["val"])  # 6 samples per scene
    assert "labels" in capsys.readouterr().out
    assert prepare.main(args) == 0  # a second run finds everything cached
    assert "0.0 s building" in capsys.readouterr().out


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "label.png"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(label_cache.os, "replace", broken_replace)
    with pytest.raises(OSError):
        label_cache.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


# --- loaders ------------------------------------------------------------------------------------


def test_collate_stacks_tensors_and_lists_strings(train_set):
    batch = collate([train_set[0], train_set[1]])
    assert batch["images"].shape == (2, 6, 3, *IMAGE_SIZE)
    assert batch["prev"]["images"].shape == (2, 6, 3, *IMAGE_SIZE)
    assert batch["global_from_ego"].dtype == torch.float64
    assert batch["has_prev"].shape == (2,)
    assert batch["sample_token"] == [
        train_set.records[0].sample_token,
        train_set.records[1].sample_token,
    ]


def test_full_pass_with_two_workers(train_set):
    loader = make_loader(train_set, batch_size=4, shuffle=True, num_workers=2, seed=0)
    tokens = []
    for batch in loader:
        assert batch["images"].shape[1:] == (6, 3, *IMAGE_SIZE)
        assert batch["bev_label"].shape[1:] == GRID.shape
        tokens += batch["sample_token"]
    assert sorted(tokens) == sorted(r.sample_token for r in train_set.records)


def test_shuffling_is_seeded(train_set):
    def order(seed):
        loader = make_loader(train_set, batch_size=len(train_set), shuffle=True, seed=seed)
        return next(iter(loader))["sample_token"]

    assert order(1) == order(1)
    assert order(1) != order(2)


# --- bad input ----------------------------------------------------------------------------------


def test_missing_dataroot_names_the_path(tmp_path):
    missing = tmp_path / "no_such_dataroot"
    with pytest.raises(DatarootNotFoundError, match=str(missing)):
        NuScenesBevDataset(missing, VERSION, "train", IMAGE_SIZE, CFG, cache_dir=tmp_path)


def test_missing_version_names_the_path_and_the_versions_present(synthetic_root, tmp_path):
    with pytest.raises(DatarootNotFoundError, match="v1.0-trainval.*v1.0-mini"):
        NuScenesBevDataset(
            synthetic_root, "v1.0-trainval", "train", IMAGE_SIZE, CFG, cache_dir=tmp_path
        )


def test_scene_whose_map_is_missing_is_named_and_no_cache_is_written(writable_root, tmp_path):
    for path in (writable_root / "maps" / "expansion").glob("*.json"):
        path.unlink()
    cache = tmp_path / "cache"
    with pytest.raises(MapNotFoundError, match=r"scene .* map location .*expansion"):
        NuScenesBevDataset(writable_root, VERSION, "train", IMAGE_SIZE, CFG, cache_dir=cache)
    assert not cache.exists()


def test_missing_pseudo_labels_say_how_many_and_which_command(writable_root, cache_dir):
    def make():
        return NuScenesBevDataset(
            writable_root,
            VERSION,
            "train",
            IMAGE_SIZE,
            CFG,
            pseudo_labels="synthetic",
            cache_dir=cache_dir,
            progress=False,
        )

    total = 6 * len(json.loads((writable_root / "splits.json").read_text())["train"]) * 6
    with pytest.raises(MissingPseudoLabelsError) as error:
        make()
    message = str(error.value)
    assert f"{total} of {total} pseudo-label files are missing" in message
    assert (
        f"python -m model.data.pseudo_labels --dataroot {writable_root} --version {VERSION} "
        "--labeler synthetic --protocol hdmapnet" in message
    )
    from model.data.pseudo_labels import main as pseudo_main

    pseudo_main(["--dataroot", str(writable_root), "--labeler", "synthetic", "--quiet"])
    victim = next((writable_root / "pseudo_labels").rglob("*.png"))
    victim.unlink()
    with pytest.raises(MissingPseudoLabelsError, match=f"1 of {total} "):
        make()
    pseudo_main(["--dataroot", str(writable_root), "--labeler", "synthetic", "--quiet"])
    labels = make()[0]["pseudo_labels"]
    assert labels.shape == (6, *IMAGE_SIZE) and labels.dtype == torch.int64


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named_and_the_cache_stays_intact(writable_root, tmp_path, damage):
    cache = tmp_path / "cache"
    ds = NuScenesBevDataset(
        writable_root, VERSION, "train", IMAGE_SIZE, CFG, cache_dir=cache, progress=False
    )
    before = tree_digest(cache)
    victim = ds.records[2].image_paths[CAMERAS.index("CAM_BACK")]
    data = victim.read_bytes()
    victim.write_bytes(b"not a jpeg" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=str(victim)):
        ds[2]
    assert tree_digest(cache) == before
    ds[0]  # other samples still load


# --- keyframe index cache -----------------------------------------------------------------------


def assert_same_records(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for name in ("sample_token", "scene_name", "location", "image_paths", "image_sizes"):
            assert getattr(a, name) == getattr(b, name), name
        assert a.prev_index == b.prev_index
        for name in ("intrinsics", "ego_from_cam", "global_from_ego"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_the_cached_keyframe_index_equals_the_devkit_records(synthetic_root, tmp_path):
    devkit = index_split(synthetic_root, VERSION, "val")
    built = index_split(synthetic_root, VERSION, "val", cache_dir=tmp_path)
    (cached,) = (tmp_path / "keyframes").glob("*.npz")
    assert dataset_fingerprint(synthetic_root, VERSION) in cached.name
    read = index_split(synthetic_root, VERSION, "val", cache_dir=tmp_path)
    assert_same_records(built, devkit)
    assert_same_records(read, devkit)
    # A label subset of a cached split: the devkit's records of those scenes, prev renumbered.
    scene = devkit[-1].scene_name
    subset = index_split(synthetic_root, VERSION, "val", [scene], cache_dir=tmp_path)
    assert_same_records(subset, index_split(synthetic_root, VERSION, "val", [scene]))
    assert [r.prev_index for r in subset] == [-1, *range(len(subset) - 1)]
    assert [r.sample_token for r in subset] == [
        r.sample_token for r in devkit if r.scene_name == scene
    ]


def test_a_dataset_with_a_cached_index_does_not_import_the_devkit(synthetic_root, cache_dir):
    NuScenesBevDataset(
        synthetic_root, VERSION, "train", IMAGE_SIZE, CFG, cache_dir=cache_dir, progress=False
    )
    code = (
        "import sys\n"
        "from model.data.dataset import NuScenesBevDataset\n"
        "from model.data.labels import LabelConfig\n"
        "from model.geometry import BevGrid\n"
        f"grid = BevGrid(**{GRID.__dict__!r})\n"
        f"ds = NuScenesBevDataset({str(synthetic_root)!r}, {VERSION!r}, 'train', {IMAGE_SIZE!r},"
        f" LabelConfig(grid=grid), cache_dir={str(cache_dir)!r}, progress=False)\n"
        "assert ds.label_build_s == 0.0\n"
        "print(len(ds), sorted(m for m in sys.modules if m.startswith('nuscenes')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.stdout.split(" ", 1) == ["24", "[]\n"], out.stdout


def test_an_unreadable_keyframe_index_is_rebuilt(synthetic_root, tmp_path, caplog):
    want = index_split(synthetic_root, VERSION, "train", cache_dir=tmp_path)
    (cached,) = (tmp_path / "keyframes").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated, as by a full disk
    with caplog.at_level("WARNING"):
        got = index_split(synthetic_root, VERSION, "train", cache_dir=tmp_path)
    assert "unreadable" in caplog.text and cached.name in caplog.text
    assert_same_records(got, want)
    assert_same_records(index_split(synthetic_root, VERSION, "train", cache_dir=tmp_path), want)
