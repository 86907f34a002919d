"""Bad input to the command-line entry points: status 2 and one line on stderr that names the
argument or file and says what is wrong; no traceback; nothing written.

`CASES` is the table, one row per case: `Case(id, argv, names, says)`.

- `argv`: what follows `python -m`, module first, split like a shell line;
- `names`: what the line must name (the option, or the file or URI at fault);
- `says`: a fragment of the problem as the line states it.

Placeholders in all three: `{root}` a synthetic dataroot, `{plain}` a dataroot folder with no
tables and no synthetic.json, `{file}` a plain file, `{missing}` a path that does not exist,
`{ckpt}` a folder with no config.json, `{m2f}` one with a config.json, `{uri}` an MLflow SQLite
store holding experiment `toy`, `{corrupt}` a file of random bytes, `{empty}` an empty file.
They all lie in one study folder, hashed file by file before and after each case: it must not
change. Each case runs in an empty working directory (with the label cache pointed inside it),
which must stay empty.

The cases run as real subprocesses, two at a time, each worker with its own copy of the folder.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from test_analysis_store import build_store


class Case(NamedTuple):
    id: str
    argv: str
    names: str
    says: str


P, Q = "model.data.prepare --dataroot {root}", "model.data.pseudo_labels --dataroot {root}"
R, L = "analysis.report --experiment toy", "analysis.plan --experiment toy"
STORE = "--tracking-uri {uri}"
S = f"harness.sweep {Path(__file__).resolve().parents[1] / 'experiments' / 'quick.yaml'}"

CASES = [
    # model.data.prepare: argument checks first (before torch and the devkit load) ...
    Case("prepare-no-dataroot", "model.data.prepare", "--dataroot", "arguments are required"),
    Case(
        "prepare-dataroot-missing",
        "model.data.prepare --dataroot {missing}",
        "--dataroot",
        "{missing} does not exist",
    ),
    Case(
        "prepare-dataroot-is-a-file",
        "model.data.prepare --dataroot {file}",
        "--dataroot",
        "{file} is not a directory",
    ),
    Case("prepare-workers-negative", f"{P} --workers -3", "--workers", "must be >= 1, got -3"),
    Case("prepare-workers-not-a-number", f"{P} --workers two", "--workers", "an integer"),
    Case("prepare-cache-dir-is-a-file", f"{P} --cache-dir {{file}}", "--cache-dir", "{file}"),
    Case("prepare-grid-too-short", f"{P} --grid -30 30", "--grid", "expected 5 arguments"),
    Case("prepare-unknown-option", f"{P} --line-widht-m 1", "--line-widht-m", "unrecognized"),
    # ... then those that need the label config or the dataroot's tables.
    Case(
        "prepare-version-unknown",
        f"{P} --version v9.9",
        "--version",
        "{root}/v9.9 does not exist",
    ),
    Case("prepare-split-unknown", f"{P} --splits train nope", "--splits", "split 'nope'"),
    Case("prepare-line-width-negative", f"{P} --line-width-m -0.5", "--line-width-m", "> 0"),
    Case("prepare-margin-negative", f"{P} --clear-margin-m -1", "--clear-margin-m", ">= 0"),
    Case(
        "prepare-grid-reversed",
        f"{P} --grid 30 -30 -15 15 0.15",
        "--grid",
        "grid.x_max_m: must be > grid.x_min_m",
    ),
    Case("prepare-protocol-unknown", f"{P} --protocol hdmap", "--protocol", "got 'hdmap'"),
    # model.data.pseudo_labels
    Case(
        "pseudo-dataroot-missing",
        "model.data.pseudo_labels --dataroot {missing}",
        "--dataroot",
        "{missing} does not exist",
    ),
    Case(
        "pseudo-version-unknown",
        f"{Q} --version v9.9 --checkpoint {{m2f}}",
        "--version",
        "v9.9 does not exist",
    ),
    Case("pseudo-no-checkpoint", Q, "--checkpoint", "required for --labeler mask2former"),
    Case(
        "pseudo-checkpoint-missing",
        f"{Q} --checkpoint {{missing}}",
        "--checkpoint",
        "{missing} does not exist",
    ),
    Case(
        "pseudo-checkpoint-not-a-model",
        f"{Q} --checkpoint {{ckpt}}",
        "--checkpoint",
        "{ckpt} has no config.json",
    ),
    Case("pseudo-noise-unknown", f"{Q} --labeler synthetic --noise loud", "--noise", "'loud'"),
    Case(
        "pseudo-synthetic-on-real-data",
        "model.data.pseudo_labels --dataroot {plain} --labeler synthetic",
        "--labeler",
        "{plain} has no synthetic.json",
    ),
    Case("pseudo-batch-size-zero", f"{Q} --batch-size 0", "--batch-size", "must be >= 1"),
    Case(
        "pseudo-device-unknown",
        f"{Q} --checkpoint {{m2f}} --device tpu",
        "--device",
        "expected cpu, cuda or cuda:N, got 'tpu'",
    ),
    # analysis.report
    Case("report-no-experiment", "analysis.report", "--experiment", "arguments are required"),
    Case("report-experiment-empty", "analysis.report --experiment ''", "--experiment", "empty"),
    Case("report-n-boot-zero", f"{R} {STORE} --n-boot 0", "--n-boot", "must be >= 100"),
    Case("report-n-boot-not-a-number", f"{R} --n-boot lots", "--n-boot", "an integer"),
    Case("report-out-is-a-file", f"{R} {STORE} --out {{file}}", "--out", "{file} exists"),
    Case("report-out-under-a-file", f"{R} --out {{file}}/report", "--out", "not a directory"),
    Case("report-confidence-one", f"{R} --confidence 1", "--confidence", "0 < x < 1"),
    Case("report-power-zero", f"{R} --power 0", "--power", "0 < x < 1"),
    Case("report-target-above-one", f"{R} --target 1.5", "--target", "0 < x <= 1"),
    Case("report-seed-negative", f"{R} --seed -1", "--seed", "must be >= 0"),
    Case("report-clock-unknown", f"{R} --clock cpu", "--clock", "invalid choice: 'cpu'"),
    Case("report-reference-malformed", f"{R} --reference supervised", "--reference", "@FRACTION"),
    Case(
        "report-experiment-missing",
        f"analysis.report --experiment nope {STORE}",
        "'nope'",
        "not found in sqlite:///",
    ),
    Case(
        "report-uri-unsupported",
        f"{R} --tracking-uri garbage://x",
        "garbage://x",
        "unsupported MLflow tracking URI",
    ),
    Case(
        "report-server-unreachable",
        f"{R} --tracking-uri http://127.0.0.1:9",
        "http://127.0.0.1:9",
        "cannot reach MLflow server",
    ),
    Case(
        "report-db-corrupt",
        f"{R} --tracking-uri sqlite:///{{corrupt}}",
        "{corrupt}",
        "is not a SQLite database",
    ),
    Case(
        "report-db-empty",
        f"{R} --tracking-uri sqlite:///{{empty}}",
        "{empty}",
        "has no MLflow tables",
    ),
    Case(
        "report-db-missing",
        f"{R} --tracking-uri sqlite:///{{missing}}.db",
        "{missing}.db",
        "no MLflow store",
    ),
    Case("report-default-store-missing", R, "studies/toy/mlflow.db", "no MLflow store"),
    # analysis.plan
    Case("plan-effect-zero", f"{L} --effect 0", "--effect", "0 < x <= 1"),
    Case("plan-alpha-one", f"{L} --alpha 1", "--alpha", "0 < x < 1"),
    Case("plan-power-above-one", f"{L} --power 1.2", "--power", "0 < x < 1"),
    Case("plan-reference-malformed", f"{L} --reference x@2", "--reference", "'x@2' is not"),
    Case(
        "plan-experiment-missing",
        f"analysis.plan --experiment nope {STORE}",
        "'nope'",
        "not found in sqlite:///",
    ),
    Case(
        "plan-uri-unsupported",
        f"{L} --tracking-uri garbage://x",
        "garbage://x",
        "unsupported MLflow tracking URI",
    ),
    Case(
        "plan-db-corrupt",
        f"{L} --tracking-uri sqlite:///{{corrupt}}",
        "{corrupt}",
        "is not a SQLite database",
    ),
    # harness.sweep: where results go, checked before any trial starts (#17)
    Case(
        "sweep-tracking-server-unreachable",
        f"{S} --tracking-uri http://127.0.0.1:9",
        "http://127.0.0.1:9",
        "cannot reach MLflow server",
    ),
    Case(
        "sweep-tracking-db-corrupt",
        f"{S} --tracking-uri sqlite:///{{corrupt}}",
        "{corrupt}",
        "is not a SQLite database",
    ),
    Case(
        "sweep-artifacts-not-writable",
        f"{S} --set storage_path={{file}}/study",
        "{file}/study/artifacts",
        "cannot be written: {file} is not a directory",
    ),
]


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    changed: list[str]  # files of the study folder added, removed or altered
    left: list[str]  # what the case left in its working directory


def make_study(folder: Path, dataroot: Path) -> None:
    shutil.copytree(dataroot, folder / "dataroot")
    (folder / "plain" / "v1.0-mini").mkdir(parents=True)
    (folder / "ckpt").mkdir()
    (folder / "m2f").mkdir()
    (folder / "m2f" / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("a file, not a folder\n")
    (folder / "corrupt.db").write_bytes(random.Random(0).randbytes(8192))
    (folder / "empty.db").write_bytes(b"")
    build_store(folder / "store")


def placeholders(folder: Path) -> dict[str, str]:
    return {
        "root": str(folder / "dataroot"),
        "plain": str(folder / "plain"),
        "file": str(folder / "notes.txt"),
        "missing": str(folder / "no_such_thing"),
        "ckpt": str(folder / "ckpt"),
        "m2f": str(folder / "m2f"),
        "uri": f"sqlite:///{folder / 'store' / 'mlflow.db'}",
        "corrupt": str(folder / "corrupt.db"),
        "empty": str(folder / "empty.db"),
    }


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_case(case: Case, folder: Path, base: Path, workdir: Path) -> Outcome:
    before = fingerprint(folder)
    argv = [token.format(**placeholders(folder)) for token in shlex.split(case.argv)]
    workdir.mkdir(parents=True)
    env = os.environ | {"MPLBACKEND": "Agg", "BEVLABELS_CACHE_DIR": str(workdir / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    after = fingerprint(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:  # put the folder back for the next case of this worker
        shutil.rmtree(folder)
        shutil.copytree(base, folder)
    left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    return Outcome(result.returncode, result.stdout, result.stderr, changed, left)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, synthetic_root) -> dict[str, tuple[Outcome, dict[str, str]]]:
    """Every case of CASES, run once: id -> (outcome, the placeholders it ran with)."""
    top = tmp_path_factory.mktemp("bad_input")
    base = top / "base"
    make_study(base, synthetic_root)
    folders: queue.Queue[Path] = queue.Queue()
    for worker in range(2):
        shutil.copytree(base, top / f"study{worker}")
        folders.put(top / f"study{worker}")

    def run(case: Case) -> tuple[Outcome, dict[str, str]]:
        folder = folders.get()
        try:
            return run_case(case, folder, base, top / "work" / case.id), placeholders(folder)
        finally:
            folders.put(folder)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.id for c in CASES], pool.map(run, CASES), strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_problem(outcomes, case):
    outcome, where = outcomes[case.id]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.returncode == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert case.names.format(**where) in lines[0], lines[0]
    assert case.says.format(**where) in lines[0], lines[0]
    assert not outcome.stdout
    assert not outcome.changed, f"changed in the study folder: {outcome.changed}"
    assert not outcome.left, f"written in the working directory: {outcome.left}"


def test_the_table_has_unique_ids():
    assert len({c.id for c in CASES}) == len(CASES)
