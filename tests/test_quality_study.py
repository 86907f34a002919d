"""The pseudo-label quality study (issue #30): one axis of pseudo-label sources in the spec
(a mapping sets several data keys together), grid points left out by `exclude`, supervised
trials shared by every source, and analysis.quality's gain-against-quality numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.quality import QUALITY, Quality, crossover, gap, quality_table
from harness.spec import SpecError, load_spec
from harness.trials import expand_trials
from model import names

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    {"pseudo_label_source": "oracle"},
    {"pseudo_label_noise": "clean"},
    {"pseudo_label_source": "shuffled", "pseudo_label_noise": "high"},
]


def write(folder: Path, **sections) -> Path:
    body = {"study": "quality", "model": {"preset": "nano"}, "seeds": [0, 1]}
    body.update(sections)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def quality_spec(folder: Path, methods=("supervised", "pretrained")):
    return load_spec(
        write(
            folder,
            data={"pseudo_label_noise": "low"},
            search={"finetune.label_fraction": [0.5, 1.0], "data": SOURCES},
            exclude=[{"method": "pretrained", "finetune.label_fraction": 1.0}],
            methods=list(methods),
        )
    )


def test_a_mapping_value_sets_its_keys_and_keeps_the_sections_others(tmp_path):
    spec = quality_spec(tmp_path)
    data = {
        t.label: t.resolve(spec).spec.data for t in expand_trials(spec) if t.method == "pretrained"
    }
    got = {(d.pseudo_label_source, d.pseudo_label_noise, d.protocol) for d in data.values()}
    # The spec's own noise (low) stays where the entry does not set it.
    assert got == {
        ("oracle", "low", "hdmapnet"),
        ("labeler", "clean", "hdmapnet"),
        ("shuffled", "high", "hdmapnet"),
    }
    assert "pretrained-data=shuffled+high-label_fraction=0.5-s1" in data


def test_supervised_trials_are_shared_by_every_source_and_exclude_drops_points(tmp_path):
    spec = quality_spec(tmp_path)
    trials = expand_trials(spec)
    supervised = [t for t in trials if t.method == "supervised"]
    pretrained = [t for t in trials if t.method == "pretrained"]
    # supervised reads no pseudo-labels: 2 fractions x 2 seeds, not x 3 sources
    assert len(supervised) == 4
    assert all("data" not in dict(t.overrides) for t in supervised)
    # pretrained: 3 sources x 2 seeds at 0.5 only (1.0 is excluded)
    assert len(pretrained) == 6
    assert {dict(t.overrides)["finetune.label_fraction"] for t in pretrained} == {0.5}
    keys = {t.resolve(spec).pretrain_key("fp") for t in pretrained}
    assert len(keys) == 6  # one pretraining per source and seed


def test_an_arm_that_reads_pseudo_labels_takes_the_axis(tmp_path):
    spec = quality_spec(tmp_path, methods=("supervised", "pretrained", "pct"))
    pct = [t for t in expand_trials(spec) if t.method == "pct"]
    assert len(pct) == 2 * 2 * 3  # both fractions (exclude names pretrained), 2 seeds, 3 sources


def test_the_shipped_study_runs_three_sources_at_half_the_labels():
    spec = load_spec(REPO / "experiments" / "pseudo_label_quality.yaml")
    trials = expand_trials(spec)
    data = [t.resolve(spec).spec.data for t in trials if t.method == "pretrained"]
    sources = {names.pseudo_label_name(None, d.pseudo_label_source, d.pseudo_label_noise)
               for d in data}  # fmt: skip
    assert sources == {"oracle", "medium", "shuffled"}
    assert len(trials) == 3 * 10 + 2 * 10


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"exclude": [{"method": "pretrianed"}]}, "exclude[0].method"),
        ({"exclude": [{"finetune.lr": 1.0}]}, "exclude[0].finetune.lr"),
        ({"exclude": [{"finetune.label_fraction": 0.3}]}, "exclude[0].finetune.label_fraction"),
        ({"exclude": [{}]}, "exclude[0]"),
        ({"search": {"data": [{"pseudo_label_source": "oracel"}]}}, "search.data[0]"),
        ({"search": {"data": [{"pseudo_label_nosie": "low"}]}}, "search.data[0]"),
        ({"search": {"data": ["oracle"]}}, "search.data"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_file_and_key(tmp_path, sections, key):
    base = {"search": {"finetune.label_fraction": [0.5, 1.0]}, "methods": ["pretrained"]}
    path = write(tmp_path, **{**base, **sections})
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and str(path) in message and key in message, message
    study = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.sweep", str(path), "--set", f"storage_path={study}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and not study.exists()


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ((None, "labeler", "medium"), "medium"),
        (("synthetic", "labeler", "clean"), "clean"),
        (("mask2former", "labeler", "medium"), "mask2former"),
        (("synthetic", "oracle", "high"), "oracle"),
        (("synthetic", "shuffled", "medium"), "shuffled"),
        (("synthetic", "shuffled", "high"), "shuffled-high"),
    ],
)
def test_each_source_has_one_name_on_the_quality_axis(params, name):
    assert names.pseudo_label_name(*params) == name


# --- analysis.quality on a study with known effects -----------------------------------------

QUALITIES = {"oracle": 0.9, "clean": 0.6, "medium": 0.3, "shuffled": 0.05}
SLOPE, GAP, BASE = 0.1, 0.05, 0.12  # gain = SLOPE * quality: the gap closes at quality 0.5


def known_study(noise_sd: float, slope: float = SLOPE, seeds: int = 10):
    rng = np.random.default_rng(0)
    rows, runs = [], []
    for seed in range(seeds):
        seed_effect = rng.normal(0, 0.02)  # shared by every cell of the seed: paired
        sup = BASE + seed_effect
        rows.append(("supervised", "supervised", 0.5, seed, sup, "medium", None))
        rows.append(("supervised", "supervised", 1.0, seed, sup + GAP, "medium", None))
        for source, quality in QUALITIES.items():
            key = f"{source}-{seed}"
            value = sup + slope * quality + rng.normal(0, noise_sd)
            variant = f"pretrained (pseudo_labels={source})"
            rows.append(("pretrained", variant, 0.5, seed, value, source, key))
            alignment = {"ceiling_mIoU": quality / 3, "reach": 0.3, "head_mIoU": 0.1}
            runs.append({"pretrain_key": key, QUALITY: quality, **alignment})
    columns = ["method", "variant", "label_fraction", "seed", "val_mIoU", "pseudo_labels",
               "pretrain_key"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(runs)


def test_the_table_has_each_sources_quality_gain_and_verdicts():
    trials, runs = known_study(noise_sd=0.002)
    table = quality_table(trials, runs)
    assert list(table["pseudo_labels"]) == ["oracle", "clean", "medium", "shuffled"]
    for row in table.itertuples():
        assert row.perspective_mIoU == pytest.approx(QUALITIES[row.pseudo_labels])
        assert row.gain_low < SLOPE * row.perspective_mIoU < row.gain_high
        assert row.n_seeds == 10
    verdicts = dict(zip(table["pseudo_labels"], table["vs_full_verdict"], strict=True))
    assert verdicts == {"oracle": "better", "clean": "better", "medium": "worse",
                        "shuffled": "worse"}  # fmt: skip
    g = gap(trials)
    assert g["gap"] == pytest.approx(GAP) and g["n_seeds"] == 10


def test_the_crossover_is_where_the_line_meets_the_gap():
    trials, runs = known_study(noise_sd=0.004)
    cross = crossover(trials, quality_table(trials, runs), n_boot=1000)
    assert cross.estimable and cross.note == ""
    assert cross.low < GAP / SLOPE < cross.high
    assert cross.estimate == pytest.approx(GAP / SLOPE, abs=0.05)
    assert cross.slope_low > 0


def test_a_gain_that_does_not_rise_with_quality_has_no_crossover():
    trials, runs = known_study(noise_sd=0.01, slope=0.0)
    cross = crossover(trials, quality_table(trials, runs), n_boot=1000)
    assert not cross.estimable and math.isnan(cross.low)
    assert "not estimable" in cross.note and cross.slope_low <= 0 <= cross.slope_high


def test_a_study_of_one_source_is_no_quality_study():
    trials, runs = known_study(noise_sd=0.002)
    one = trials[trials["pseudo_labels"].isin(["medium"]) | (trials["method"] == "supervised")]
    assert Quality.of(one, runs) is None
    quality = Quality.of(trials, runs, n_boot=500)
    assert quality is not None and quality.fraction == 0.5
    text = quality.markdown()
    assert "| oracle | pretrained | 0.900 |" in text and "Crossover quality" in text
    fig = quality.figure()
    assert len(fig.axes[0].lines) >= 3  # zero line, gap line, fitted line (+ error bars)
