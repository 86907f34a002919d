"""Pseudo-labels: the Vistas name mapping, the real Mask2Former code path on a small random
model loaded with from_pretrained, and the simulated (synthetic) labeller."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.data import pseudo_labels as pl
from model.data.mask2former_labeler import load_mask2former, run_mask2former
from model.data.pseudo_classes import (
    PSEUDO_CLASSES,
    VISTAS_LOOKUP,
    class_lookup,
    pseudo_channel_groups,
)
from model.data.pseudo_sources import pseudo_label_path
from model.data.simulated_labeler import (
    Corruption,
    corrupt_label,
    read_noise_report,
    run_synthetic,
    semantic_path,
)
from model.data.vistas import VISTAS_CLASSES, VISTAS_ID
from model.names import IGNORE

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def labelled_root(synthetic_root, tmp_path_factory) -> Path:
    """A private copy of the synthetic dataroot to write pseudo-labels into."""
    return Path(shutil.copytree(synthetic_root, tmp_path_factory.mktemp("pl") / "dataroot"))


def camera_image_paths(root: Path) -> list[Path]:
    return sorted((root / "samples").glob("CAM_*/*.jpg"))


def label_files(root: Path, labeler: str, protocol: str = "hdmapnet") -> list[Path]:
    return sorted((root / "pseudo_labels" / labeler / protocol).glob("CAM_*/*.png"))


# --- the mapping table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vistas, ours",
    [
        ("Lane Marking - General", "divider"),
        ("Lane Marking - Crosswalk", "ped_crossing"),
        ("Curb", "boundary"),
        ("Road", "background"),
        ("Sidewalk", "background"),
        ("Car", None),
        ("Person", None),
        ("Sky", None),
        ("Building", None),
        ("Ego Vehicle", None),
    ],
)
def test_vistas_classes_map_by_name_to_hdmapnet(vistas, ours):
    table = class_lookup(dict(enumerate(VISTAS_CLASSES)), "hdmapnet")
    expected = IGNORE if ours is None else PSEUDO_CLASSES["hdmapnet"].index(ours)
    assert table[VISTAS_ID[vistas]] == expected


def test_mapping_follows_names_not_indices():
    shuffled = list(VISTAS_CLASSES)
    np.random.default_rng(0).shuffle(shuffled)
    table = class_lookup(dict(enumerate(shuffled)), "hdmapnet")
    assert table[shuffled.index("Lane Marking - General")] == 1
    assert table[shuffled.index("Car")] == IGNORE


def test_a_checkpoint_without_vistas_names_is_rejected():
    with pytest.raises(ValueError, match="Vistas"):
        class_lookup({0: "person", 1: "bicycle", 2: "car"}, "hdmapnet")


# --- Mask2Former through transformers -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory) -> Path:
    """A randomly initialised Mask2Former with the Vistas label names, saved like a checkpoint."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=len(VISTAS_CLASSES),
        id2label=dict(enumerate(VISTAS_CLASSES)),
        label2id=dict(VISTAS_ID),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=10,
    )
    out = tmp_path_factory.mktemp("mask2former")
    Mask2FormerForUniversalSegmentation(config).save_pretrained(out)
    Mask2FormerImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(out)
    return out


def test_mask2former_cli_writes_one_label_png_per_image(labelled_root, tiny_mask2former, capsys):
    args = ["--dataroot", str(labelled_root), "--version", VERSION, "--quiet"]
    args += ["--checkpoint", str(tiny_mask2former), "--batch-size", "5"]
    assert pl.main(args) == 0
    images = camera_image_paths(labelled_root)
    labels = label_files(labelled_root, "mask2former")
    assert sorted(p.stem for p in labels) == sorted(p.stem for p in images)
    for image_path in images[:: max(1, len(images) // 12)]:
        label_path = pseudo_label_path(labelled_root, "mask2former", "hdmapnet", image_path)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(image_path))
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        assert set(np.unique(label)) <= {0, 1, 2, 3, IGNORE}
    assert "images/s" in capsys.readouterr().out


def test_mask2former_run_resumes_without_relabelling(labelled_root, tiny_mask2former):
    done = label_files(labelled_root, "mask2former")
    done[0].unlink()
    stamp = {p: p.stat().st_mtime_ns for p in done[1:]}
    report = run_mask2former(
        labelled_root, VERSION, tiny_mask2former, batch_size=4, progress=False
    )
    assert (report.written, report.skipped) == (1, len(done) - 1)
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())


def test_mask2former_without_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Mask2Former checkpoint"):
        load_mask2former(tmp_path, "cpu")


# --- the simulated labeller ---------------------------------------------------------------------


def clean_labels(root: Path, protocol: str = "hdmapnet") -> dict[str, np.ndarray]:
    lookup = VISTAS_LOOKUP[protocol]
    return {
        p.stem: lookup[cv2.imread(str(semantic_path(root, p)), cv2.IMREAD_UNCHANGED)]
        for p in camera_image_paths(root)
    }


def test_clean_simulation_equals_mapped_ground_truth(labelled_root):
    run_synthetic(labelled_root, VERSION, noise_level="clean", progress=False, overwrite=True)
    clean = clean_labels(labelled_root)
    for path in label_files(labelled_root, "synthetic-clean"):
        np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), clean[path.stem])
    report = read_noise_report(labelled_root, noise_level="clean")
    assert report["simulation"] and report["noise_level"] == "clean"
    assert report["pixel_error_rate"] == 0.0


def test_noise_level_is_logged_and_grows_with_the_setting(labelled_root):
    rates = {}
    for level in ("low", "high"):
        run_synthetic(labelled_root, VERSION, noise_level=level, progress=False, overwrite=True)
        report = read_noise_report(labelled_root, noise_level=level)
        assert report["noise_level"] == level and report["complete"]
        assert set(report["iou_vs_clean"]) == set(PSEUDO_CLASSES["hdmapnet"])
        rates[level] = report["pixel_error_rate"]
    assert 0.0 < rates["low"] < rates["high"] < 0.6


def test_simulation_is_seeded_and_resumable(labelled_root):
    run_synthetic(labelled_root, VERSION, noise_level="medium", progress=False, overwrite=True)
    first = {p.name: p.read_bytes() for p in label_files(labelled_root, "synthetic")}
    victim = label_files(labelled_root, "synthetic")[3]
    victim.unlink()
    report = run_synthetic(labelled_root, VERSION, noise_level="medium", progress=False)
    assert report.written == 1
    assert {p.name: p.read_bytes() for p in label_files(labelled_root, "synthetic")} == first


def test_resuming_with_other_settings_is_refused(labelled_root):
    run_synthetic(labelled_root, VERSION, noise_level="medium", progress=False, overwrite=True)
    with pytest.raises(ValueError, match="--overwrite"):
        run_synthetic(labelled_root, VERSION, noise_level="medium", seed=1, progress=False)


def test_fine_protocol_pseudo_labels(labelled_root):
    run_synthetic(labelled_root, VERSION, protocol="fine", progress=False, overwrite=True)
    values = set()
    for path in label_files(labelled_root, "synthetic", "fine"):
        values |= set(np.unique(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)).tolist())
    assert values <= set(range(len(PSEUDO_CLASSES["fine"]))) | {IGNORE}
    assert PSEUDO_CLASSES["fine"].index("drivable_area") in values


def synthetic_scene_label() -> np.ndarray:
    """A clean perspective label: sky on top, road below with two dividers and a curb."""
    label = np.full((60, 100), IGNORE, np.uint8)
    label[25:] = 0
    label[30:60, 30:32] = 1
    label[30:60, 70:72] = 1
    label[50:56, 40:60] = 2
    label[25:60, 0:4] = 3
    return label


def test_missed_markings_drop_whole_dividers():
    clean = synthetic_scene_label()
    corruption = Corruption(
        miss_marking_prob=1.0,
        boundary_shift_px=0,
        false_positive_blobs=0.0,
        confusion_prob=0.0,
        far_noise=0.0,
    )
    noisy = corrupt_label(clean, "hdmapnet", corruption, np.random.default_rng(0))
    assert not (noisy == 1).any()
    np.testing.assert_array_equal(noisy == 2, clean == 2)  # crossings are not thin markings
    np.testing.assert_array_equal(noisy == IGNORE, clean == IGNORE)


def test_far_noise_grows_towards_the_top_of_the_road():
    clean = synthetic_scene_label()
    corruption = Corruption(
        miss_marking_prob=0.0,
        boundary_shift_px=0,
        false_positive_blobs=0.0,
        confusion_prob=0.0,
        far_noise=0.8,
        far_noise_block_px=2,
    )
    changed = np.zeros(clean.shape)
    for seed in range(20):
        changed += (
            corrupt_label(clean, "hdmapnet", corruption, np.random.default_rng(seed)) != clean
        )
    assert changed[26:35].mean() > 3 * changed[50:60].mean()
    assert not changed[:25].any()  # ignored pixels stay ignored


def test_noise_json_lies_beside_the_labels(labelled_root):
    run_synthetic(labelled_root, VERSION, progress=False, overwrite=True)
    noise = labelled_root / "pseudo_labels" / "synthetic" / "hdmapnet" / "noise.json"
    assert json.loads(noise.read_text())["images"] == len(camera_image_paths(labelled_root))


def test_fine_perspective_classes_name_their_bev_channels():
    groups = pseudo_channel_groups("fine")
    assert groups[PSEUDO_CLASSES["fine"].index("background")] == []
    from model.data.labels import FINE_CLASSES

    lane_marking = groups[PSEUDO_CLASSES["fine"].index("lane_marking")]
    assert sorted(FINE_CLASSES[i] for i in lane_marking) == [
        "lane_divider",
        "road_divider",
        "stop_line",
    ]
    assert pseudo_channel_groups("hdmapnet") == [[0], [1], [2], [3]]


def test_hdmapnet_filled_reads_the_hdmapnet_pseudo_labels():
    from model.data.labels import PSEUDO_LABEL_PROTOCOL
    from model.data.pseudo_classes import pseudo_channel_groups

    # Only the BEV rasterisation differs: same perspective classes, same BEV channels.
    assert PSEUDO_LABEL_PROTOCOL["hdmapnet_filled"] == "hdmapnet"
    assert pseudo_channel_groups("hdmapnet_filled") == pseudo_channel_groups("hdmapnet")
    assert pseudo_channel_groups("hdmapnet") == [[0], [1], [2], [3]]
