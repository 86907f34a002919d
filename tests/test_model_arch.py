"""BEVFormerSeg: presets, shapes, history alignment, camera visibility, gradient flow, weights."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.network.encoder import gather_visible_queries, project_pillars
from model.presets import OFFICIAL_Z_ANCHORS_M, ModelConfig, get_preset

# 60 m x 30 m at 1 m: a 60 x 30 label grid; nano's 30 x 15 queries are 2 m x 2 m cells.
GRID = BevGrid(-30.0, 30.0, -15.0, 15.0, 1.0)
YAWS_DEG = (55.0, 0.0, -55.0, 110.0, 180.0, -110.0)  # nuScenes camera order, roughly


def camera_rig(batch: int, image_hw: tuple[int, int], focal: float = 60.0):
    """Six pinhole cameras 1.5 m up, looking out horizontally around the car."""
    h, w = image_hw
    intrinsics = torch.tensor([[focal, 0.0, (w - 1) / 2], [0.0, focal, (h - 1) / 2], [0, 0, 1.0]])
    ego_from_cam = torch.eye(4).repeat(6, 1, 1)
    for i, yaw_deg in enumerate(YAWS_DEG):
        yaw = math.radians(yaw_deg)
        forward = [math.cos(yaw), math.sin(yaw), 0.0]
        right = [math.sin(yaw), -math.cos(yaw), 0.0]
        down = [0.0, 0.0, -1.0]
        # Columns: camera x (right), y (down), z (forward) expressed in the ego frame.
        ego_from_cam[i, :3, :3] = torch.tensor([right, down, forward]).T
        ego_from_cam[i, :3, 3] = torch.tensor([1.0, 0.0, 1.5])
    return intrinsics.expand(batch, 6, 3, 3).clone(), ego_from_cam.expand(batch, 6, 4, 4).clone()


def nano_inputs(cfg: ModelConfig, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.image_size
    images = torch.randn(batch, 6, 3, h, w, generator=gen)
    intrinsics, ego_from_cam = camera_rig(batch, (h, w))
    return images, intrinsics, ego_from_cam


@pytest.fixture(scope="module")
def nano() -> BEVFormerSeg:
    torch.manual_seed(0)
    return BEVFormerSeg(get_preset("nano"), num_classes=4, label_grid=GRID)


# --- presets -----------------------------------------------------------------------------


def test_official_presets_mirror_the_bevformer_configs():
    tiny, small, base = get_preset("tiny"), get_preset("small"), get_preset("base")
    assert (tiny.backbone, small.backbone, base.backbone) == ("resnet50", "resnet101", "resnet101")
    assert [(c.bev_h, c.bev_w) for c in (tiny, small, base)] == [(50, 50), (150, 150), (200, 200)]
    assert [c.num_layers for c in (tiny, small, base)] == [3, 3, 6]
    assert [c.image_size for c in (tiny, small, base)] == [(450, 800), (720, 1280), (900, 1600)]
    # out_indices (3,) -> C5 only, one level; base: (1, 2, 3) -> C3..C5 + one extra conv.
    assert [c.backbone_out_stages for c in (tiny, small, base)] == [(4,), (4,), (2, 3, 4)]
    assert [c.num_levels for c in (tiny, small, base)] == [1, 1, 4]
    for cfg in (tiny, small, base):
        assert (cfg.embed_dim, cfg.num_heads, cfg.ffn_dim) == (256, 8, 512)
        assert (cfg.num_points, cfg.tsa_num_points, cfg.num_z_anchors) == (8, 4, 4)
        assert (cfg.frozen_stages, cfg.norm_eval) == (1, True)
    assert small.dcn_stages == base.dcn_stages == (3, 4) and tiny.dcn_stages == ()
    # Official lidar-frame heights -4.5, -2.17, 0.17, 2.5 m, raised by the 1.84 m lidar mount.
    assert OFFICIAL_Z_ANCHORS_M == pytest.approx((-2.66, -0.327, 2.007, 4.34), abs=1e-3)


def test_get_preset_applies_overrides_and_rejects_unknown_fields():
    cfg = get_preset("nano", bev_h=20, attention_impl="pytorch")
    assert (cfg.bev_h, cfg.attention_impl, cfg.name) == (20, "pytorch", "nano")
    with pytest.raises(ValueError, match="unknown"):
        get_preset("nano", bev_height=20)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip (lists -> tuples)
    assert ModelConfig.from_dict({**cfg.to_dict(), "image_size": [96, 160]}) == cfg


# --- shapes ------------------------------------------------------------------------------


def test_nano_forward_shapes_on_label_grid(nano):
    cfg = nano.cfg
    images, intrinsics, ego_from_cam = nano_inputs(cfg)
    out = nano(images, intrinsics, ego_from_cam)
    assert out["bev_logits"].shape == (2, 4, *GRID.shape)
    assert out["bev_features"].shape == (2, cfg.bev_h * cfg.bev_w, cfg.embed_dim)
    assert torch.isfinite(out["bev_logits"]).all()


def test_tiny_forward_shapes_at_a_small_input():
    cfg = get_preset("tiny", image_size=(64, 96))
    net = BEVFormerSeg(cfg, num_classes=3, label_grid=GRID).eval()
    images, intrinsics, ego_from_cam = nano_inputs(cfg, batch=1)
    with torch.no_grad():
        out = net(images, intrinsics, ego_from_cam)
        out2 = net(images, intrinsics, ego_from_cam, out["bev_features"], torch.eye(4)[None])
    assert out2["bev_logits"].shape == (1, 3, *GRID.shape)
    assert out2["bev_features"].shape == (1, 50 * 50, 256)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_official_presets_full_size_shapes_on_meta_device(name):
    cfg = get_preset(name)
    grid = BevGrid()  # the default 60 m x 30 m at 0.15 m: 400 x 200
    h, w = cfg.image_size
    with torch.device("meta"):
        net = BEVFormerSeg(cfg, num_classes=4, label_grid=grid)
        out = net(
            torch.empty(1, 6, 3, h, w),
            torch.empty(1, 6, 3, 3),
            torch.empty(1, 6, 4, 4),
            prev_bev=torch.empty(1, cfg.bev_h * cfg.bev_w, cfg.embed_dim),
            prev_ego_from_ego=torch.empty(1, 4, 4),
        )
    assert out["bev_logits"].shape == (1, 4, 400, 200)
    assert out["bev_features"].shape == (1, cfg.bev_h * cfg.bev_w, 256)
    levels = net.backbone(torch.empty(1, 3, -(-h // 32) * 32, -(-w // 32) * 32, device="meta"))
    assert len(levels) == cfg.num_levels


# --- temporal self-attention alignment ---------------------------------------------------


def test_history_is_aligned_with_the_real_ego_motion(nano):
    cfg = nano.cfg
    cell_x_m = (GRID.x_max_m - GRID.x_min_m) / cfg.bev_h  # 2 m
    cell_y_m = (GRID.y_max_m - GRID.y_min_m) / cfg.bev_w  # 2 m
    prev = torch.zeros(1, cfg.bev_h, cfg.bev_w, cfg.embed_dim)
    prev[0, 10, 5] = 1.0  # a landmark seen at row 10, column 5 of the previous frame
    # The car drove one cell forward and one cell to the left: current p -> previous p + t.
    prev_ego_from_ego = torch.eye(4)[None].clone()
    prev_ego_from_ego[0, :3, 3] = torch.tensor([cell_x_m, cell_y_m, 0.0])
    aligned, valid = nano.align_history(prev.flatten(1, 2), prev_ego_from_ego)
    aligned = aligned.view(1, cfg.bev_h, cfg.bev_w, -1)
    # Now the landmark is one cell closer (row + 1) and one cell further right (column + 1).
    assert aligned[0, 11, 6].sum() == pytest.approx(cfg.embed_dim, rel=1e-5)
    assert aligned.sum() == pytest.approx(cfg.embed_dim, rel=1e-5)
    valid = valid.view(cfg.bev_h, cfg.bev_w)
    assert not valid[0].any() and not valid[:, 0].any() and valid[1:, 1:].all()


def test_history_alignment_rotates_about_the_ego_origin(nano):
    cfg = nano.cfg
    prev = torch.zeros(1, cfg.bev_h, cfg.bev_w, 1)
    prev[0, 10, 7] = 1.0  # ego x = 30 - 10.5 * 2 = 9 m, y = 15 - 7.5 * 2 = 0 m: dead ahead
    yaw = math.pi / 2  # the car turned left by 90 degrees: the landmark now lies to its right
    prev_ego_from_ego = torch.eye(4)[None].clone()
    prev_ego_from_ego[0, :2, :2] = torch.tensor(
        [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    )
    aligned, _ = nano.align_history(prev.flatten(1, 2), prev_ego_from_ego)
    weights = aligned.view(cfg.bev_h, cfg.bev_w)
    rows = torch.arange(cfg.bev_h, dtype=torch.float32)[:, None] + 0.5
    cols = torch.arange(cfg.bev_w, dtype=torch.float32)[None, :] + 0.5
    x_m = ((GRID.x_max_m - rows * 2.0) * weights).sum() / weights.sum()
    y_m = ((GRID.y_max_m - cols * 2.0) * weights).sum() / weights.sum()
    # Rotated about the ego origin (not about a fixed pixel): 9 m to the right, level with us.
    assert (float(x_m), float(y_m)) == pytest.approx((0.0, -9.0), abs=1e-4)


def test_model_output_depends_on_history_and_its_ego_motion(nano):
    cfg = nano.cfg
    nano.eval()
    images, intrinsics, ego_from_cam = nano_inputs(cfg, batch=1)
    torch.manual_seed(1)
    prev_bev = torch.randn(1, cfg.bev_h * cfg.bev_w, cfg.embed_dim)
    still = torch.eye(4)[None]
    moved = still.clone()
    moved[0, 0, 3] = 4.0
    with torch.no_grad():
        none = nano(images, intrinsics, ego_from_cam)["bev_features"]
        a = nano(images, intrinsics, ego_from_cam, prev_bev, still)["bev_features"]
        b = nano(images, intrinsics, ego_from_cam, prev_bev, moved)["bev_features"]
        # has_prev=False takes the no-history path for that sample.
        c = nano(images, intrinsics, ego_from_cam, prev_bev, moved, torch.tensor([False]))
    nano.train()
    assert not torch.allclose(none, a, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(c["bev_features"], none)
    with pytest.raises(ValueError, match="prev_ego_from_ego"):
        nano(images, intrinsics, ego_from_cam, prev_bev)


# --- spatial cross-attention visibility --------------------------------------------------


def test_pillar_visibility_needs_front_and_inside_the_image():
    intrinsics = torch.tensor([[[[100.0, 0, 79.5], [0, 100.0, 47.5], [0, 0, 1]]]])  # 96 x 160
    ego_from_cam = camera_rig(1, (96, 160))[1][:, 1:2]  # the front camera only
    pillars = torch.tensor(
        [
            [[10.0, 0.0, 1.5]],  # straight ahead at camera height: image centre
            [[-10.0, 0.0, 1.5]],  # behind
            [[10.0, 20.0, 1.5]],  # far left, outside the 77 degree field of view
            [[10.0, 0.0, -30.0]],  # far below the bottom edge
            [[5.0, 1.0, 0.0]],  # on the ground, left of centre, lower half
        ]
    )
    ref, visible = project_pillars(pillars, intrinsics, ego_from_cam, (96, 160), (96, 160))
    assert visible[0, 0, :, 0].tolist() == [True, False, False, False, True]
    # Image centre pixel (79.5, 47.5) is the middle of the image: normalised (0.5, 0.5).
    assert ref[0, 0, 0, 0].tolist() == pytest.approx([0.5, 0.5])
    # Pinhole: u = 79.5 + 100 * (-1) / 4, v = 47.5 + 100 * 1.5 / 4 at depth 4 m (5 - 1).
    assert ref[0, 0, 4, 0].tolist() == pytest.approx([(79.5 - 25 + 0.5) / 160, (85.0 + 0.5) / 96])
    # Normalised by the padded size, visibility still judged on the real image.
    ref_pad, visible_pad = project_pillars(pillars, intrinsics, ego_from_cam, (96, 160), (128, 192))
    assert torch.equal(visible_pad, visible)
    assert ref_pad[0, 0, 0, 0].tolist() == pytest.approx([80 / 192, 48 / 128])


def test_queries_only_attend_to_cameras_that_see_them(nano):
    cfg = nano.cfg
    layer = nano.encoder.layers[0].spatial.eval()
    images, intrinsics, ego_from_cam = nano_inputs(cfg, batch=1)
    h, w = cfg.image_size
    ref_cam, bev_mask = project_pillars(
        nano.encoder.pillars_ego, intrinsics, ego_from_cam, (h, w), (h, w)
    )
    shapes = [(h // 8, w // 8)]
    torch.manual_seed(2)
    value = torch.randn(1, 6, shapes[0][0] * shapes[0][1], cfg.embed_dim)
    query = torch.randn(1, cfg.bev_h * cfg.bev_w, cfg.embed_dim)
    pos = torch.zeros_like(query)
    with torch.no_grad():
        seen = gather_visible_queries(ref_cam, bev_mask)
        before = layer(query, pos, value, shapes, seen)
        changed = value.clone()
        changed[:, 1] = torch.randn_like(changed[:, 1]) * 10  # only the front camera changes
        after = layer(query, pos, changed, shapes, seen)
    seen_by_front = bev_mask[0, 1].any(-1)
    differs = (after - before).abs().amax(-1)[0] > 1e-5
    assert seen_by_front.any() and (~seen_by_front).any()
    assert torch.equal(differs, seen_by_front)
    # Queries no camera sees get no image evidence at all: output = query + output_proj(0).
    unseen = ~bev_mask[0].any(-1).any(0)
    if unseen.any():
        expected = query[0, unseen] + layer.output_proj.bias
        torch.testing.assert_close(before[0, unseen], expected)


# --- gradients ---------------------------------------------------------------------------


def test_gradients_reach_bev_queries_positional_embedding_and_backbone():
    torch.manual_seed(0)
    net = BEVFormerSeg(get_preset("nano"), num_classes=4, label_grid=GRID)
    images, intrinsics, ego_from_cam = nano_inputs(net.cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = net(images, intrinsics, ego_from_cam)
        out["bev_logits"].logsumexp(1).mean().backward()
        opt.step()
        grads = {name: p.grad for name, p in net.named_parameters()}
        for name in ("bev_queries.weight", "cams_embeds", "level_embeds"):
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
        assert net.backbone.body.conv1.weight.grad.abs().sum() > 0
        assert net.backbone.body.layer2[-1].conv2.weight.grad.abs().sum() > 0
    # The positional embedding only steers offsets and attention weights, whose projections
    # start at zero (Deformable DETR init), so it gets gradient from the second step on.
    assert grads["row_embed.weight"].abs().sum() > 0
    assert grads["col_embed.weight"].abs().sum() > 0


# --- backbone freezing and weights -------------------------------------------------------


def test_frozen_stages_and_norm_eval_follow_mmdet_semantics():
    cfg = get_preset("tiny", backbone="resnet18", frozen_stages=1, norm_eval=True)
    net = BEVFormerSeg(cfg, num_classes=2, label_grid=GRID).train()
    body = net.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert body.layer2[0].conv1.weight.requires_grad
    assert not body.layer3[0].bn1.weight.requires_grad  # norm_cfg requires_grad=False
    assert not body.layer3[0].bn1.training  # norm_eval
    assert net.head.on_labels[1].training  # the head's BatchNorm still trains
    groups = net.param_groups(lr=2e-4)
    assert groups[0]["lr"] == pytest.approx(2e-5) and groups[0]["params"]


def test_pretrained_backbone_loads_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    cfg = get_preset("nano", pretrained_backbone_path=str(path))
    net = BEVFormerSeg(cfg, num_classes=2, label_grid=GRID)
    torch.testing.assert_close(net.backbone.body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(
        net.backbone.body.layer2[1].bn2.running_var, reference.layer2[1].bn2.running_var
    )
    torch.save(
        {"state_dict": {"backbone." + k: v for k, v in reference.state_dict().items()}}, path
    )
    net = BEVFormerSeg(cfg, num_classes=2, label_grid=GRID)  # mmdet-style wrapping also loads
    torch.testing.assert_close(
        net.backbone.body.layer1[0].conv1.weight, reference.layer1[0].conv1.weight
    )
    torch.save({"something": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no parameter matches"):
        BEVFormerSeg(cfg, num_classes=2, label_grid=GRID)


def test_dcn_backbone_starts_as_its_plain_convolution_at_half_mask():
    torch.manual_seed(4)
    from model.network.backbone import ModulatedDeformConv2d

    conv = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False)
    dcn = ModulatedDeformConv2d(conv)
    x = torch.randn(2, 8, 9, 11)
    torch.testing.assert_close(dcn(x), 0.5 * conv(x), atol=1e-5, rtol=1e-5)
