"""mmdet3d nuScenes info files drive our dataset: files written by mmdet3d 1.4's own converter
(``tools/dataset_converters``, shipped in the wheel under ``mmdet3d/.mim/tools``) from a
synthetic dataroot give the same keyframes and geometry as our reading of the tables."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import mmdet3d
import numpy as np
import pytest

from model.data.keyframes import index_split
from model.interop.mmdet3d_infos import (
    check_records_agree,
    dataset_from_infos,
    read_info_file,
    records_from_infos,
)

VERSION = "v1.0-mini"
MIM = Path(mmdet3d.__file__).parent / ".mim"


@pytest.fixture(scope="module")
def converters():
    """mmdet3d's converter modules, imported the way create_data.py imports them."""
    if not (MIM / "tools" / "dataset_converters" / "nuscenes_converter.py").is_file():
        pytest.fail(f"mmdet3d {mmdet3d.__version__} does not ship tools/ under {MIM}")
    sys.path.insert(0, str(MIM))
    try:
        from tools.dataset_converters import nuscenes_converter, update_infos_to_v2
    finally:
        sys.path.remove(str(MIM))
    return nuscenes_converter, update_infos_to_v2


@pytest.fixture(scope="module")
def info_files(synthetic_root, converters, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(format, split): path}. Runs what ``create_data.py nuscenes`` runs: the legacy infos
    (written into the dataroot, as the converter does), then ``update_pkl_infos`` to v2."""
    import nuscenes.utils.splits

    nuscenes_converter, update_infos_to_v2 = converters
    splits = json.loads((synthetic_root / "splits.json").read_text())
    work = tmp_path_factory.mktemp("mmdet3d")
    (work / "data").mkdir()
    (work / "data" / "nuscenes").symlink_to(synthetic_root)  # update_infos reads ./data/nuscenes
    out_dir = work / "v2"
    out_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        # The converter takes v1.0-mini's scene lists from the devkit; point them at ours.
        mp.setattr(nuscenes.utils.splits, "mini_train", splits["train"])
        mp.setattr(nuscenes.utils.splits, "mini_val", splits["val"])
        mp.chdir(work)
        nuscenes_converter.create_nuscenes_infos(
            str(synthetic_root), "synthetic", version=VERSION, max_sweeps=2
        )
        files = {}
        for split in ("train", "val"):
            legacy = synthetic_root / f"synthetic_infos_{split}.pkl"
            update_infos_to_v2.update_pkl_infos(
                "nuscenes", out_dir=str(out_dir), pkl_path=str(legacy)
            )
            files["legacy", split] = legacy
            files["v2", split] = out_dir / legacy.name
    return files


def _dump(content, path: Path) -> Path:
    path.write_bytes(pickle.dumps(content))
    return path


@pytest.mark.parametrize("fmt", ["legacy", "v2"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_info_file_records_match_the_tables(info_files, synthetic_root, fmt, split):
    info = read_info_file(info_files[fmt, split], synthetic_root)
    assert info.format == fmt and info.version == VERSION
    ours = records_from_infos(info, synthetic_root, VERSION)
    tables = index_split(synthetic_root, VERSION, split)
    check_records_agree(ours, tables, atol=1e-5)
    assert [r.sample_token for r in ours] == [r.sample_token for r in tables]
    assert [r.prev_index for r in ours] == [r.prev_index for r in tables]
    assert [r.image_sizes for r in ours] == [r.image_sizes for r in tables]


def test_v2_extrinsics_agree_with_legacy_to_float32_precision(info_files, synthetic_root):
    legacy = read_info_file(info_files["legacy", "val"], synthetic_root)
    v2 = read_info_file(info_files["v2", "val"], synthetic_root)
    assert legacy.tokens == v2.tokens
    for a, b in zip(legacy.samples, v2.samples, strict=True):
        np.testing.assert_allclose(a.ego_from_cam, b.ego_from_cam, atol=1e-5)
        # v2 stores float32 matrices: a few 1e-5 m on global translations of hundreds of metres
        np.testing.assert_allclose(a.global_from_ego, b.global_from_ego, rtol=1e-7, atol=1e-9)
        assert a.timestamp_us == b.timestamp_us
        assert a.image_paths == b.image_paths


def test_dataset_from_infos_serves_the_files_keyframes(info_files, synthetic_root, tmp_path):
    dataset = dataset_from_infos(
        info_files["v2", "val"], synthetic_root, VERSION, image_size=(32, 48),
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    info = read_info_file(info_files["v2", "val"], synthetic_root)
    assert dataset.split == "val"
    assert sorted(r.sample_token for r in dataset.records) == sorted(info.tokens)
    sample = dataset[1]
    rec = next(s for s in info.samples if s.token == sample["sample_token"])
    np.testing.assert_allclose(sample["ego_from_cam"].numpy(), rec.ego_from_cam, atol=1e-4)
    assert sample["images"].shape == (6, 3, 32, 48)


def test_bevformer_temporal_infos_are_read(info_files, synthetic_root, tmp_path):
    """BEVFormer's converter writes the legacy format plus scene_token, can_bus, frame_idx."""
    content = pickle.loads(info_files["legacy", "train"].read_bytes())
    for i, info in enumerate(content["infos"]):
        info.update(scene_token=f"scene{i // 3}", can_bus=np.zeros(18), frame_idx=i % 3)
    path = _dump(content, tmp_path / "synthetic_infos_temporal_train.pkl")
    info = read_info_file(path, synthetic_root)
    assert info.samples[4].scene_token == "scene1"
    check_records_agree(
        records_from_infos(info, synthetic_root, VERSION),
        index_split(synthetic_root, VERSION, "train"),
    )


def test_relative_image_paths_resolve_under_the_dataroot(info_files, synthetic_root, tmp_path):
    """Converters run from mmdet3d's repo write ./data/nuscenes/samples/...: kept from samples/."""
    content = pickle.loads(info_files["legacy", "val"].read_bytes())
    for info in content["infos"]:
        for cam in info["cams"].values():
            cam["data_path"] = (
                "./data/nuscenes/" + cam["data_path"].split(str(synthetic_root) + "/")[1]
            )
    info = read_info_file(_dump(content, tmp_path / "rel.pkl"), synthetic_root)
    check_records_agree(
        records_from_infos(info, synthetic_root, VERSION),
        index_split(synthetic_root, VERSION, "val"),
    )


def test_info_file_with_other_geometry_is_refused(info_files, synthetic_root, tmp_path):
    content = pickle.loads(info_files["legacy", "val"].read_bytes())
    content["infos"][0]["cams"]["CAM_BACK"]["sensor2lidar_translation"] += 0.05
    path = _dump(content, tmp_path / "moved.pkl")
    with pytest.raises(ValueError, match="ego_from_cam of sample .* differs"):
        dataset_from_infos(
            path, synthetic_root, VERSION, (32, 48), cache_dir=tmp_path, progress=False
        )


def test_partial_scene_is_refused(info_files, synthetic_root, tmp_path):
    content = pickle.loads(info_files["legacy", "val"].read_bytes())
    content["infos"] = content["infos"][1:]
    path = _dump(content, tmp_path / "partial.pkl")
    with pytest.raises(ValueError, match="different keyframes"):
        dataset_from_infos(
            path, synthetic_root, VERSION, (32, 48), cache_dir=tmp_path, progress=False
        )


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_info_pickles_cannot_run_code(tmp_path, synthetic_root, capsys):
    path = _dump({"infos": [Payload()]}, tmp_path / "evil.pkl")
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_info_file(path, synthetic_root)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_not_an_info_file_is_refused(tmp_path, synthetic_root):
    with pytest.raises(ValueError, match="not an mmdet3d nuScenes info file"):
        read_info_file(_dump({"something": 1}, tmp_path / "x.pkl"), synthetic_root)
