"""Target-alignment diagnostics: which cell a ray lands in (BevGrid's own pixel convention),
reach, splatting, perspective IoU, and the CLI's errors and output on a dataroot it makes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from model.data.alignment import PROG, main
from model.data.alignment_stats import (
    AlignmentMeter,
    chance_miou,
    one_hot_logits,
    ray_cells,
    reached_cells,
    splat_pseudo_labels,
    update_perspective_iou,
    update_reached_iou,
)
from model.data.labels import HDMAPNET_CLASSES
from model.data.synthetic.rig import camera_rig
from model.evaluation.metrics import ArgmaxIoU
from model.geometry import BevGrid
from model.network.reprojection import (
    IGNORE,
    ReprojectionGrids,
    reproject_bev_logits,
    reprojection_grids,
)

GRID = BevGrid(-30.0, 30.0, -15.0, 15.0, 0.5)
NUM = len(HDMAPNET_CLASSES)
PED = HDMAPNET_CLASSES.index("ped_crossing")
IMAGE_HW = (48, 80)


def hand_grids(xy_ego: np.ndarray, valid: np.ndarray) -> ReprojectionGrids:
    """Grids of one camera whose (1, n) pixels' rays land at the given ego points."""
    uv = GRID.bev_normalized_from_ego(torch.from_numpy(xy_ego)).float()
    return ReprojectionGrids(
        uv[None, None, None], torch.from_numpy(valid)[None, None, None], 1, (1, len(xy_ego))
    )


def rig_grids(batch: int = 1, stride: int = 1) -> ReprojectionGrids:
    """The synthetic rig's six cameras, ``batch`` times."""
    rig = camera_rig(IMAGE_HW)
    k = torch.tensor(np.stack([c.img_from_cam for c in rig]), dtype=torch.float32)
    e = torch.tensor(np.stack([c.ego_from_cam for c in rig]), dtype=torch.float32)
    return reprojection_grids(
        k.expand(batch, -1, -1, -1),
        e.expand(batch, -1, -1, -1),
        IMAGE_HW,
        GRID,
        stride,
        cache=False,
    )


def random_label(seed: int, batch: int = 1) -> torch.Tensor:
    """Blocky (B, H, W) class ids: 2 x 2 m blocks, so rays meet every class often."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, NUM, (batch, GRID.height // 4, GRID.width // 4))
    return torch.from_numpy(blocks.repeat(4, 1).repeat(4, 2)).long()


def seen_at_rays(label: torch.Tensor, grids: ReprojectionGrids) -> torch.Tensor:
    """Pseudo-labels that are exactly the BEV label of the cell each ray lands in."""
    cells = ray_cells(grids, GRID)
    flat = label.flatten(1)
    out = torch.gather(flat, 1, cells.clamp(min=0).flatten(1)).reshape(cells.shape)
    return torch.where(cells >= 0, out, torch.full_like(out, IGNORE))


# --- one batch ------------------------------------------------------------------------------


def test_a_ray_lands_in_the_cell_that_contains_its_ground_point():
    rng = np.random.default_rng(0)
    xy = np.stack([rng.uniform(-29.99, 29.99, 500), rng.uniform(-14.99, 14.99, 500)], 1)
    cells = ray_cells(hand_grids(xy, np.ones(500, bool)), GRID).reshape(-1).numpy()
    row, col = np.floor(GRID.bev_pixel_from_ego(xy) + 0.5).T.astype(int)  # cell centres
    np.testing.assert_array_equal(cells, row * GRID.width + col)


def test_invalid_rays_and_ignored_pixels_reach_nothing():
    xy = np.array([[10.2, 3.1], [-5.3, -7.7], [20.1, 0.4]])
    grids = hand_grids(xy, np.array([True, False, True]))
    labels = torch.tensor([[[[1, 2, IGNORE]]]])
    reached = reached_cells(grids, GRID, labels)[0]
    row, col = np.floor(GRID.bev_pixel_from_ego(xy) + 0.5).T.astype(int)
    assert reached[row[0], col[0]] and reached.sum() == 1
    assert reached_cells(grids, GRID)[0].sum() == 2  # geometry alone


def test_splat_takes_the_majority_of_a_cells_rays_ties_to_the_lower_class():
    centre = GRID.ego_from_bev_pixel(np.array([[40, 20], [70, 33]]))
    xy = np.repeat(centre, [5, 2], axis=0) + 0.1
    grids = hand_grids(xy, np.ones(7, bool))
    labels = torch.tensor([[[[1, 3, 3, 1, 3, 2, 1]]]])
    splat = splat_pseudo_labels(grids, GRID, labels, NUM)[0]
    assert splat[40, 20] == 3 and splat[70, 33] == 1  # 3 of 5; a 1-1 tie
    assert (splat != 0).sum() == 2  # unreached cells are background


def test_pseudo_labels_equal_to_the_bev_label_reach_the_ceiling_on_reached_cells():
    label = random_label(1, batch=2)
    grids = rig_grids(batch=2)
    pseudo = seen_at_rays(label, grids)
    metric = ArgmaxIoU(HDMAPNET_CLASSES)
    splat = splat_pseudo_labels(grids, GRID, pseudo, NUM)
    update_reached_iou(
        metric, one_hot_logits(splat, NUM), label, reached_cells(grids, GRID, pseudo)
    )
    assert metric.compute()["mIoU"] == pytest.approx(1.0)


def test_a_bev_label_reprojected_scores_one_against_itself_and_less_when_shifted():
    label = random_label(2)
    grids = rig_grids(stride=2)
    # Pseudo-labels made by reprojecting the label itself: perspective IoU 1. Where rays miss
    # the grid they say "ped_crossing", not IGNORE: those pixels must not count.
    rep = reproject_bev_logits(one_hot_logits(label, NUM), grids)
    pseudo = torch.where(
        rep.valid, rep.logits.argmax(2), torch.full_like(rep.valid, PED, dtype=torch.long)
    )
    same, shifted = ArgmaxIoU(HDMAPNET_CLASSES), ArgmaxIoU(HDMAPNET_CLASSES)
    update_perspective_iou(same, one_hot_logits(label, NUM), grids, pseudo)
    update_perspective_iou(shifted, one_hot_logits(label.roll(3, dims=1), NUM), grids, pseudo)
    assert same.compute()["mIoU"] == pytest.approx(1.0)
    assert shifted.compute()["mIoU"] < 0.9


def test_chance_is_what_a_uniformly_random_prediction_scores():
    # The oracle: ArgmaxIoU on real random predictions, many cells, against the closed form.
    generator = torch.Generator().manual_seed(0)
    names = list(HDMAPNET_CLASSES)
    target = torch.multinomial(torch.tensor([0.85, 0.08, 0.02, 0.05]), 400_000, True,
                               generator=generator).reshape(1, 400, 1000)  # fmt: skip
    logits = torch.rand(1, len(names), 400, 1000, generator=generator)
    metric = ArgmaxIoU(names)
    metric.update(logits, target)
    counts = torch.bincount(target.flatten(), minlength=len(names)).tolist()
    assert chance_miou(counts, names) == pytest.approx(metric.compute()["mIoU"], abs=2e-3)
    # Background does not count; a class that never occurs scores 0.
    assert chance_miou([10, 0, 0, 0], names) == 0.0


def test_meter_pools_reach_per_class_over_the_split():
    meter = AlignmentMeter(HDMAPNET_CLASSES, GRID)
    grids = rig_grids()
    labels = [random_label(s) for s in (3, 4)]
    for label in labels:
        meter.update(grids, label, seen_at_rays(label, grids))
    out = meter.compute()
    reached = reached_cells(grids, GRID)[0]
    assert out["reach"] == pytest.approx(float(reached.float().mean()))
    stacked = torch.cat(labels)
    for c, name in enumerate(HDMAPNET_CLASSES):
        expected = (reached[None] & (stacked == c)).sum() / (stacked == c).sum()
        assert out[f"reach_{name}"] == pytest.approx(float(expected))
    assert out["ceiling_reached_mIoU"] == pytest.approx(1.0)
    assert 0.0 < out["ceiling_mIoU"] < out["ceiling_reached_mIoU"]


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """2 scenes x 2 keyframes (one val scene) with simulated pseudo-labels."""
    from model.data.simulated_labeler import run_synthetic
    from model.data.synthetic import generate_dataset

    root = generate_dataset(
        tmp_path_factory.mktemp("align") / "root", scenes=2, samples_per_scene=2,
        image_size=(48, 80), seed=3, progress=False,
    )  # fmt: skip
    run_synthetic(root, "v1.0-mini", progress=False)
    return root


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("source", ["map", "paint"])
def test_cli_prints_the_diagnostics_of_a_dataroot(tiny_root, tmp_path, capsys, source):
    argv = ["--dataroot", tiny_root, "--source", source, "--image-size", 48, 80]
    code, out, err = run_cli(capsys, *argv, "--cache-dir", tmp_path, "--json", "--quiet")
    assert code == 0, err
    values = json.loads(out)
    assert values["samples"] == 2
    for key in ("reach", "ceiling_mIoU", "ceiling_reached_mIoU", "perspective_mIoU"):
        assert 0.0 < values[key] <= 1.0, key
    assert values["ceiling_mIoU"] <= values["ceiling_reached_mIoU"]
    code, table, _ = run_cli(capsys, *argv, "--cache-dir", tmp_path, "--quiet")
    assert code == 0 and "perspective IoU" in table and "reach" in table
    assert f"{'chance mIoU':18s}{values['chance_mIoU']:8.3f}" in table


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--dataroot", "{missing}"], "--dataroot"),
        (["--version", "v1.0-trainval"], "--version"),
        (["--resolution", "0"], "--resolution"),
        (["--resolution", "7"], "--resolution"),
        (["--image-size", "8", "80"], "--image-size"),
        (["--stride", "0"], "--stride"),
        (["--split", "nope"], "--split"),
        (["--protocol", "fine"], "--protocol"),
        (["--source", "paint"], "--source"),
        (["--labeler", "mask2former"], "--labeler"),
        (["--checkpoint", "{missing}"], "--checkpoint"),
    ],
    ids=str,
)
def test_cli_user_errors_exit_2_with_one_line_naming_the_flag(
    tiny_root, tmp_path, capsys, argv, flag
):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("samples", "semantic"))
    if flag == "--source":
        shutil.rmtree(root / "maps" / "paint")
    argv = [a.format(missing=tmp_path / "nowhere") for a in argv]
    if "--dataroot" not in argv:
        argv = ["--dataroot", root, *argv]
    cache = tmp_path / "cache"
    code, out, err = run_cli(capsys, *argv, "--cache-dir", cache, "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{PROG}: error: ") and flag in err, err
    assert not cache.exists()  # nothing written


def test_cli_has_help_on_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    import model.data.alignment as alignment

    for action in alignment._parser()._actions:
        assert action.help, action.option_strings
    assert text.startswith(f"usage: {PROG}")
