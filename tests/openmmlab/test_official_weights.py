"""Official BEVFormer checkpoints into BEVFormerSeg: a state dict with the official names and
shapes (built from mmdet's ResNet / FPN and mmcv's attention / FFN modules of the same
configuration) loads through the explicit name map, computes what the official modules compute,
and anything that does not fit is refused before the model is touched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from official_reference import (
    OFFICIAL_ORDER,
    official_backbone,
    official_msda3d,
    official_neck,
    official_state_dict,
    official_tsa,
)

from model.geometry import CAMERAS, BevGrid
from model.interop.official_weights import (
    CheckpointMismatchError,
    load_official_checkpoint,
    official_name_map,
)
from model.network.bevformer import BEVFormerSeg
from model.presets import ModelConfig

# Small, but with everything the map has to get right: two FPN inputs and an extra level,
# a backbone stage the config cuts off, several encoder layers, non-square BEV grid.
SMALL = ModelConfig(
    name="interop-small",
    backbone="resnet18",
    backbone_out_stages=(2, 3),
    frozen_stages=-1,
    norm_eval=False,
    num_levels=3,
    image_size=(64, 96),
    bev_h=6,
    bev_w=4,
    embed_dim=32,
    num_heads=4,
    ffn_dim=64,
    num_layers=2,
    dropout=0.0,
    num_points=4,
    tsa_num_points=4,
    z_anchors_m=(0.0, 1.0),
    head_channels=8,
    attention_impl="pytorch",
)
LABEL_GRID = BevGrid(resolution_m=3.0)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def make_model(cfg: ModelConfig = SMALL) -> BEVFormerSeg:
    return BEVFormerSeg(cfg, num_classes=4, label_grid=LABEL_GRID).eval()


@pytest.fixture(scope="module")
def official():
    return official_state_dict(SMALL)


@pytest.fixture(scope="module")
def loaded(official):
    model = make_model()
    report = load_official_checkpoint(model, official)
    return model, report


# --- what the report says -------------------------------------------------------------------


def test_every_tensor_outside_the_seg_head_is_loaded(loaded):
    model, report = loaded
    ours = [k for k in model.state_dict() if not k.startswith("head.")]
    assert sorted(report.loaded) == sorted(ours)


def test_only_the_seg_head_is_new(loaded):
    model, report = loaded
    assert report.new and all(k.startswith("head.") for k in report.new)
    assert sorted(report.new) == sorted(k for k in model.state_dict() if k.startswith("head."))


def test_the_detection_part_and_cut_stages_are_ignored_with_reasons(loaded, official):
    _, report = loaded
    assert set(report.loaded.values()) | set(report.ignored) == set(official)
    reasons = {name: reason for name, reason in report.ignored.items()}
    assert reasons["pts_bbox_head.transformer.decoder.layers.0.attentions.0.attn.in_proj_weight"] \
        == "detection decoder"  # fmt: skip
    assert reasons["pts_bbox_head.cls_branches.1.3.weight"] == "detection branches"
    assert reasons["pts_bbox_head.reg_branches.0.2.bias"] == "detection branches"
    assert reasons["pts_bbox_head.query_embedding.weight"] == "detection decoder"
    assert "CAN-bus" in reasons["pts_bbox_head.transformer.can_bus_mlp.0.weight"]
    assert "cut off" in reasons["img_backbone.layer4.0.conv1.weight"]
    assert not any(n.startswith(("img_neck.", "pts_bbox_head.transformer.encoder."))
                   for n in report.ignored)  # fmt: skip


def test_summary_counts_each_kind(loaded):
    _, report = loaded
    text = report.summary()
    assert f"loaded {len(report.loaded)} tensors" in text
    assert "seg head" in text and "detection decoder" in text


def test_name_map_covers_the_encoder_with_official_names():
    mapped, _ = official_name_map(make_model())
    enc = "pts_bbox_head.transformer.encoder.layers.1."
    expected = {
        "encoder.layers.1.temporal.sampling_offsets.weight":
            enc + "attentions.0.sampling_offsets.weight",
        "encoder.layers.1.spatial.deformable_attention.value_proj.bias":
            enc + "attentions.1.deformable_attention.value_proj.bias",
        "encoder.layers.1.spatial.output_proj.weight": enc + "attentions.1.output_proj.weight",
        "encoder.layers.1.ffn.layers.0.weight": enc + "ffns.0.layers.0.0.weight",
        "encoder.layers.1.ffn.layers.3.bias": enc + "ffns.0.layers.1.bias",
        "encoder.layers.1.norms.2.weight": enc + "norms.2.weight",
        "backbone.fpn.inner_blocks.1.0.weight": "img_neck.lateral_convs.1.conv.weight",
        "backbone.fpn.layer_blocks.0.0.bias": "img_neck.fpn_convs.0.conv.bias",
        "backbone.fpn.extra_blocks.convs.0.weight": "img_neck.fpn_convs.2.conv.weight",
        "backbone.body.layer2.1.bn2.running_var": "img_backbone.layer2.1.bn2.running_var",
    }  # fmt: skip
    assert {k: mapped[k].official for k in expected} == expected


# --- what the loaded model computes ---------------------------------------------------------


def test_backbone_and_neck_compute_what_mmdet_computes(loaded, official):
    model, _ = loaded
    backbone, neck = official_backbone(SMALL), official_neck(SMALL)
    backbone.load_state_dict(_strip(official, "img_backbone."))
    neck.load_state_dict(_strip(official, "img_neck."))
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = neck(backbone(images))
        got = model.backbone(images)
    assert len(got) == len(expected) == SMALL.num_levels
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bev_rows_are_flipped_to_our_front_up_convention(loaded, official):
    """Official row r runs along +lidar-y from the rear; ours has row 0 at the front."""
    model, _ = loaded
    h, w, dim = SMALL.bev_h, SMALL.bev_w, SMALL.embed_dim
    theirs = official["pts_bbox_head.bev_embedding.weight"].view(h, w, dim)
    ours = model.bev_queries.weight.detach().view(h, w, dim)
    torch.testing.assert_close(ours, theirs.flip(0))
    # The positional encoding: mmdet's LearnedPositionalEncoding output, rows flipped.
    from mmdet.models.layers import LearnedPositionalEncoding

    pe = LearnedPositionalEncoding(dim // 2, row_num_embed=h, col_num_embed=w)
    pe.load_state_dict(_strip(official, "pts_bbox_head.positional_encoding."))
    pos = pe(torch.zeros(1, h, w))[0]  # (D, h, w)
    expected = pos.flip(1).permute(1, 2, 0).reshape(h * w, dim)
    torch.testing.assert_close(model.bev_pos().detach(), expected)


def test_camera_embeddings_follow_our_camera_order(loaded, official):
    model, _ = loaded
    theirs = official["pts_bbox_head.transformer.cams_embeds"]
    for i, cam in enumerate(CAMERAS):
        torch.testing.assert_close(model.cams_embeds[i].detach(), theirs[OFFICIAL_ORDER.index(cam)])


def test_level_embeddings_are_the_first_rows_the_official_model_uses(loaded, official):
    model, _ = loaded
    torch.testing.assert_close(
        model.level_embeds.detach(),
        official["pts_bbox_head.transformer.level_embeds"][: SMALL.num_levels],
    )


def _official_layer_params(official: dict, layer: int, sub: str) -> dict:
    return _strip(official, f"pts_bbox_head.transformer.encoder.layers.{layer}.{sub}.")


def test_encoder_attention_layers_compute_the_official_functions(loaded, official):
    model, _ = loaded
    layer = model.encoder.layers[1]
    dim, heads, n = SMALL.embed_dim, SMALL.num_heads, SMALL.bev_h * SMALL.bev_w
    torch.manual_seed(0)
    query, pos, history, initial = (torch.randn(1, n, dim) for _ in range(4))
    ref_2d = model.encoder.ref_2d
    with torch.no_grad():
        got = layer.temporal(query, pos, ref_2d, (SMALL.bev_h, SMALL.bev_w), history, initial)
        expected = official_tsa(
            _official_layer_params(official, 1, "attentions.0"), query, pos, ref_2d,
            (SMALL.bev_h, SMALL.bev_w), heads, SMALL.tsa_num_points, history, initial,
        )  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

        shapes = [(8, 12), (4, 6), (2, 3)]
        value = torch.randn(2, sum(h * w for h, w in shapes), dim)
        q, ref = torch.randn(2, 5, dim), torch.rand(2, 5, SMALL.num_z_anchors, 2)
        got = layer.spatial.deformable_attention(q, value, ref, shapes)
        expected = official_msda3d(
            _official_layer_params(official, 1, "attentions.1.deformable_attention"), q, value,
            ref, torch.tensor(shapes), heads, SMALL.num_levels, SMALL.num_points,
        )  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoder_ffn_computes_mmcvs_ffn(loaded, official):
    from mmcv.cnn.bricks.transformer import FFN

    model, _ = loaded
    ffn = FFN(embed_dims=SMALL.embed_dim, feedforward_channels=SMALL.ffn_dim).eval()
    ffn.load_state_dict(_official_layer_params(official, 0, "ffns.0"))
    x = torch.randn(2, 7, SMALL.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.layers[0].ffn(x), ffn(x))


def test_whole_model_runs_after_loading(loaded):
    model, _ = loaded
    images = torch.randn(1, 6, 3, *SMALL.image_size)
    intrinsics = torch.tensor([[50.0, 0, 48], [0, 50.0, 32], [0, 0, 1]]).expand(1, 6, 3, 3)
    with torch.no_grad():
        out = model(images, intrinsics, torch.eye(4).expand(1, 6, 4, 4))
    assert out["bev_logits"].shape == (1, 4, *LABEL_GRID.shape)
    assert torch.isfinite(out["bev_logits"]).all()


def test_dcn_offsets_load_and_match_mmcvs_modulated_deform_conv():
    """R-DCN checkpoints (small/base): mmcv's DCNv2 conv_offset layout in torchvision's
    deform_conv2d gives mmcv's features (offsets made non-zero so that they matter)."""
    cfg = dataclasses.replace(
        SMALL, backbone="resnet50", backbone_out_stages=(3,), dcn_stages=(3,), num_levels=1,
        num_layers=1,
    )  # fmt: skip
    official = official_state_dict(cfg, seed=1)
    for name in official:
        if "conv_offset" in name:
            official[name] = torch.randn_like(official[name]) * 0.05
    model = make_model(cfg)
    report = load_official_checkpoint(model, official)
    assert "backbone.body.layer3.0.conv2.conv_offset.weight" in report.loaded
    assert any("caffe-style" in note for note in report.notes)
    backbone, neck = official_backbone(cfg), official_neck(cfg)
    backbone.load_state_dict(_strip(official, "img_backbone."))
    neck.load_state_dict(_strip(official, "img_neck."))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone(images)[0], neck(backbone(images))[0], rtol=1e-4, atol=1e-4
        )


# --- what is refused ------------------------------------------------------------------------


def _refuses(cfg_model: ModelConfig, official: dict, *fragments: str) -> None:
    model = make_model(cfg_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(model, official)
    for fragment in fragments:
        assert fragment in str(err.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model was changed"


def test_shape_mismatch_is_refused_naming_both_shapes(official):
    _refuses(
        dataclasses.replace(SMALL, embed_dim=16, ffn_dim=32, head_channels=8),
        official,
        "img_neck.lateral_convs.0.conv.weight (32, 128, 1, 1)",
        "backbone.fpn.inner_blocks.0.0.weight needs (16, 128, 1, 1)",
        "differ in shape",
    )


def test_other_bev_grid_is_refused(official):
    _refuses(
        dataclasses.replace(SMALL, bev_h=5),
        official,
        "pts_bbox_head.bev_embedding.weight (24, 32) -> bev_queries.weight needs (20, 32)",
    )


def test_checkpoint_with_more_encoder_layers_is_refused():
    official = official_state_dict(dataclasses.replace(SMALL, num_layers=3))
    _refuses(SMALL, official, "have no place", "encoder.layers.2.")


def test_checkpoint_with_fewer_encoder_layers_is_refused():
    official = official_state_dict(dataclasses.replace(SMALL, num_layers=1))
    _refuses(SMALL, official, "not in the checkpoint", "encoder.layers.1.")


def test_dcn_checkpoint_into_plain_backbone_is_refused():
    dcn = dataclasses.replace(
        SMALL, backbone="resnet50", backbone_out_stages=(3,), dcn_stages=(3,), num_levels=1
    )
    plain = dataclasses.replace(dcn, dcn_stages=())
    _refuses(plain, official_state_dict(dcn), "conv2.conv_offset")


# --- files ------------------------------------------------------------------------------------


class NotAWeight:
    pass


def test_checkpoint_file_loads_with_weights_only(tmp_path, official):
    path = tmp_path / "bevformer_small_epoch_24.pth"
    meta = {"epoch": 24, "mmcv_version": "1.4.0", "config": "model = dict(type='BEVFormer')"}
    torch.save({"meta": meta, "state_dict": official, "optimizer": {"state": {}}}, path)
    report = load_official_checkpoint(make_model(), path)
    assert len(report.loaded) > 0


def test_checkpoint_with_pickled_objects_needs_trust(tmp_path, official):
    path = tmp_path / "odd.pth"
    torch.save({"meta": {"thing": NotAWeight()}, "state_dict": official}, path)
    with pytest.raises(ValueError, match="trusted=True"):
        load_official_checkpoint(make_model(), path)
    assert load_official_checkpoint(make_model(), path, trusted=True).loaded


def test_data_parallel_prefixes_are_stripped(official):
    wrapped = {"module." + k: v for k, v in official.items()}
    assert load_official_checkpoint(make_model(), {"state_dict": wrapped}).loaded
