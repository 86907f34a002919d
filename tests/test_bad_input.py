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
`BEVLABELS_BAD_INPUT_TABLE=cases.md python -m pytest tests/test_bad_input.py` also writes every
case with the line it printed as a Markdown table.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import tmpfs
from test_analysis_store import build_store


class Case(NamedTuple):
    id: str
    argv: str
    names: str
    says: str


P, Q = "model.data.prepare --dataroot {root}", "model.data.pseudo_labels --dataroot {root}"
S = "harness.sweep {spec} --set data.dataroot={root} --set storage_path={study}"
A, Y = "model.data.alignment --dataroot {root}", "model.data.synthetic --out"
B = "model.tools.bench"
R, L = "analysis.report --experiment toy", "analysis.plan --experiment toy"
STORE = "--tracking-uri {uri}"

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
    Case("report-out-is-a-file", f"{R} {STORE} --out {{file}}", "--out", "{file} is a file"),
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
        "without MLflow tables",
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
    # harness.sweep: the spec file ...
    Case("sweep-spec-missing", "harness.sweep {missing}.yaml", "{missing}.yaml", "cannot read"),
    Case("sweep-spec-empty", "harness.sweep {empty}", "{empty}", "the spec is empty"),
    Case("sweep-spec-binary", "harness.sweep {corrupt}", "{corrupt}", "not"),
    Case("sweep-spec-a-list", "harness.sweep {listing}", "{listing}", "must be a mapping"),
    Case("sweep-unknown-option", f"{S} --bogus", "--bogus", "unrecognized"),
    Case("sweep-max-concurrent-zero", f"{S} --max-concurrent 0", "max_concurrent", ">= 1"),
    Case("sweep-max-concurrent-text", f"{S} --max-concurrent two", "--max-concurrent", "'two'"),
    Case("sweep-set-no-equals", f"{S} --set finetune", "--set 'finetune'", "key.path=value"),
    # ... its values: duplicates, non-finite and absurd numbers, unknown names ...
    Case(
        "sweep-grid-duplicate",
        f"{S} --set search.finetune.label_fraction=[0.5,0.5]",
        "search.finetune.label_fraction[1]",
        "duplicate value 0.5",
    ),
    Case(
        "sweep-epochs-1e20",
        f"{S} --set finetune.budget.value=1e20",
        "finetune.budget.value",
        "valid integer",
    ),
    Case(
        "sweep-epochs-huge",
        f"{S} --set pretrain.budget.value=100000000",
        "pretrain.budget.value",
        "must be <= 10000000",
    ),
    Case("sweep-epochs-zero", f"{S} --set finetune.budget.value=0", "finetune.budget.value", ">"),
    Case("sweep-lr-inf", f"{S} --set finetune.optim.lr=.inf", "finetune.optim.lr", "finite"),
    Case("sweep-lr-negative", f"{S} --set pretrain.optim.lr=-1", "pretrain.optim.lr", "> 0"),
    Case("sweep-weight-inf", f"{S} --set pretrain.w_reproj=.inf", "pretrain.w_reproj", "finite"),
    Case("sweep-w-nan", f"{S} --set pretrain.w_temporal=.nan", "pretrain.w_temporal", "finite"),
    Case("sweep-bev-weight-inf", f"{S} --set finetune.w_bev=.inf", "finetune.w_bev", "finite"),
    Case("sweep-seeds-duplicate", f"{S} --set seeds=[0,0]", "seeds", "duplicate"),
    Case("sweep-seeds-empty", f"{S} --set seeds=[]", "seeds", "at least 1"),
    Case("sweep-methods-dup", f"{S} --set methods=[supervised,supervised]", "methods", "dupl"),
    Case("sweep-method-unknown", f"{S} --set methods=[superviced]", "methods[0]", "did you mean"),
    Case("sweep-key-unknown", f"{S} --set finetune.epochz=2", "finetune.epochz", "unknown key"),
    Case("sweep-key-renamed", f"{S} --set training.lr=1", "training.lr", "renamed"),
    Case("sweep-retries-negative", f"{S} --set retries=-1", "retries", ">= 0"),
    Case("sweep-cpu-zero", f"{S} --set resources.cpu=0", "resources.cpu", ">"),
    Case("sweep-workers-zero", f"{S} --set resources.workers=0", "resources.workers", ">= 1"),
    Case("sweep-workers-unplaceable", f"{S} --set resources.workers=4096",
         "resources.workers", "4096 CPUs; this machine has"),  # fmt: skip
    Case("sweep-workers-cpu-device-gpu",
         f"{S} --set resources.workers=2 --set resources.gpu=1 --set runtime.device=cpu",
         "runtime.device", "wastes the GPUs"),  # fmt: skip
    Case("sweep-fraction-1.5", f"{S} --set finetune.label_fraction=1.5", "label_fraction", "1"),
    Case("sweep-study-name", f"{S} --set 'study=a b'", "study", "'a b' is not allowed"),
    Case("sweep-search-axis-empty", f"{S} --set search.finetune.w_bev=[]", "search", "at least 1"),
    Case(
        "sweep-pseudo-source-misspelt",
        f"{S} --set data.pseudo_label_source=orcale",
        "{spec}: data.pseudo_label_source",
        "did you mean 'oracle'",
    ),
    Case(
        "sweep-pseudo-noise-unknown",
        f"{S} --set data.pseudo_label_noise=extreme",
        "{spec}: data.pseudo_label_noise",
        "unknown value 'extreme'",
    ),
    Case(
        "sweep-pseudo-noise-of-mask2former",
        f"{S} --set data.pseudo_labels=mask2former --set data.pseudo_label_noise=low",
        "{spec}: data: data.pseudo_label_noise",
        "mask2former pseudo-labels have none: allowed: medium",
    ),
    # ... and what only the disk shows, checked before anything is written.
    Case(
        "sweep-storage-is-a-file",
        f"{S} --set storage_path={{file}}",
        "storage_path",
        "{file} is a file, not a directory",
    ),
    Case(
        "sweep-storage-under-a-file",
        f"{S} --set storage_path={{file}}/study",
        "storage_path",
        "{file} is a file",
    ),
    Case(
        "sweep-dataroot-is-a-file",
        f"{S} --set data.dataroot={{file}}",
        "data.dataroot",
        "{file} is a file, not a directory",
    ),
    Case(
        "sweep-dataroot-missing",
        f"{S} --set data.dataroot={{missing}}",
        "data.dataroot",
        "{missing} does not exist",
    ),
    Case(
        "sweep-pseudo-labels-missing",
        f"{S} --set data.pseudo_labels=mask2former --set methods=[pretrained]",
        "data.pseudo_labels",
        "no mask2former pseudo-labels",
    ),
    Case(
        "sweep-uri-garbage",
        f"{S} --tracking-uri garbage://x",
        "--tracking-uri",
        "unsupported MLflow tracking URI 'garbage://x'",
    ),
    Case(
        "sweep-db-corrupt",
        f"{S} --tracking-uri sqlite:///{{corrupt}}",
        "{corrupt}",
        "is not a SQLite database",
    ),
    Case(
        "sweep-artifacts-not-writable",
        f"{S} --set storage_path={{file}}/study",
        "storage_path",
        "{file} is a file, not a directory",
    ),
    Case(
        "sweep-spec-db-corrupt",
        f"{S} --set mlflow.tracking_uri=sqlite:///{{corrupt}}",
        "mlflow.tracking_uri",
        "is not a SQLite database",
    ),
    Case(
        "sweep-db-empty",
        f"{S} --tracking-uri sqlite:///{{empty}}",
        "{empty}",
        "without MLflow tables",
    ),
    Case(
        "sweep-db-not-mlflow",
        f"{S} --tracking-uri sqlite:///{{otherdb}}",
        "{otherdb}",
        "without MLflow tables",
    ),
    Case(
        "sweep-server-unreachable",
        f"{S} --tracking-uri http://127.0.0.1:9",
        "--tracking-uri",
        "cannot reach MLflow server http://127.0.0.1:9",
    ),
    Case(
        "sweep-address-unreachable",
        f"{S} --address 127.0.0.1:1",
        "--address",
        "cannot reach a Ray cluster at 127.0.0.1:1",
    ),
    Case("sweep-address-malformed", f"{S} --address nohost", "--address", "not HOST:PORT"),
    Case(
        "sweep-spec-address-unreachable",
        f"{S} --set ray.address=127.0.0.1:1",
        "ray.address",
        "cannot reach a Ray cluster",
    ),
    Case("sweep-resume-nothing", f"{S} --resume", "--resume", "no sweep to resume"),
    Case(
        "sweep-state-truncated",
        f"{S} --resume --set storage_path={{truncated}}",
        "{truncated}/sweep_state.json",
        "not valid JSON",
    ),
    Case(
        "sweep-state-truncated-plain-run",
        f"{S} --set storage_path={{truncated}}",
        "{truncated}/sweep_state.json",
        "not valid JSON",
    ),
    Case(
        "sweep-state-empty-object",
        f"{S} --resume --set storage_path={{emptystate}}",
        "{emptystate}/sweep_state.json",
        "ray_path: required key is missing",
    ),
    Case(
        "sweep-state-a-list",
        f"{S} --resume --set storage_path={{liststate}}",
        "{liststate}/sweep_state.json",
        "expected a JSON object",
    ),
    # model.data.alignment
    Case("align-no-dataroot", "model.data.alignment", "--dataroot", "arguments are required"),
    Case(
        "align-dataroot-missing",
        "model.data.alignment --dataroot {missing}",
        "--dataroot",
        "directory does not exist",
    ),
    Case(
        "align-dataroot-is-a-file",
        "model.data.alignment --dataroot {file}",
        "--dataroot",
        "not a directory",
    ),
    Case("align-version-unknown", f"{A} --version v9.9", "--version", "v9.9: no such folder"),
    Case("align-stride-zero", f"{A} --stride 0", "--stride", ">= 1"),
    Case("align-resolution-negative", f"{A} --resolution -1", "--resolution", "> 0"),
    Case("align-image-size-zero", f"{A} --image-size 0 160", "--image-size", "0"),
    Case("align-split-unknown", f"{A} --split nope", "--split", "'nope'"),
    Case("align-protocol-unknown", f"{A} --protocol hdmap", "--protocol", "'hdmap'"),
    Case("align-cache-dir-is-a-file", f"{A} --cache-dir {{file}}", "--cache-dir", "{file}"),
    # model.data.synthetic
    Case("synthetic-no-out", "model.data.synthetic", "--out", "arguments are required"),
    Case("synthetic-out-is-a-file", f"{Y} {{file}}", "--out", "{file}"),
    Case("synthetic-out-not-empty", f"{Y} {{root}}", "--out", "--overwrite"),
    Case("synthetic-scenes-zero", f"{Y} {{missing}} --scenes 0", "--scenes", ">= "),
    Case("synthetic-samples-negative", f"{Y} {{missing}} --samples-per-scene -1", "--samples", ">"),
    Case("synthetic-size-90", f"{Y} {{missing}} --image-size 90", "--image-size", "x"),
    Case("synthetic-image-size-zero", f"{Y} {{missing}} --image-size 0x160", "image_size", "0"),
    Case("synthetic-seed-text", f"{Y} {{missing}} --seed zero", "--seed", "'zero'"),
    # model.tools.bench
    Case("bench-preset-unknown", f"{B} --preset huge", "--preset", "'huge'"),
    Case("bench-device-unknown", f"{B} --device tpu", "--device", "tpu: not a device"),
    Case("bench-batch-zero", f"{B} --batch 0", "--batch", "must be > 0, got 0"),
    Case("bench-steps-zero", f"{B} --steps 0", "--steps", "must be > 0, got 0"),
    Case("bench-repeats-zero", f"{B} --compare --repeats 0", "--repeats", "must be > 0"),
    Case("bench-threads-zero", f"{B} --threads 0", "--threads", "must be > 0, got 0"),
    Case("bench-attention-unknown", f"{B} --attention-impl nope", "--attention-impl", "'nope'"),
    Case("bench-warmup-negative", f"{B} --warmup -1", "--warmup", "got -1"),
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
    (folder / "sweep.yaml").write_text(SWEEP_SPEC)
    (folder / "list.yaml").write_text("- a\n- b\n")
    with sqlite3.connect(folder / "other.db") as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    for name, text in STATES.items():
        (folder / name).mkdir()
        (folder / name / "sweep_state.json").write_text(text)
    (folder / "study").mkdir()


# A study of the synthetic dataroot; the cases point it at the folder's copies with --set.
SWEEP_SPEC = """\
study: toy_sweep
model: {preset: nano}
pretrain: {budget: {value: 1}}
finetune: {budget: {value: 1}}
search: {finetune.label_fraction: [0.5, 1.0]}
"""
STATES = {"truncated": '{"ray_path": "/x", "tracki', "emptystate": "{}", "liststate": "[]"}


def placeholders(folder: Path) -> dict[str, str]:
    return {
        "spec": str(folder / "sweep.yaml"),
        "study": str(folder / "study"),
        "listing": str(folder / "list.yaml"),
        "otherdb": str(folder / "other.db"),
        **{name: str(folder / name) for name in STATES},
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
def outcomes(
    request, tmp_path_factory, synthetic_root
) -> dict[str, tuple[Outcome, dict[str, str]]]:
    """Every case of CASES the session runs (``-k`` picks some), run once: id -> (outcome, the
    placeholders it ran with)."""
    test = test_bad_input_exits_2_with_one_line_naming_the_problem.__name__
    items = [i for i in request.session.items if getattr(i, "originalname", "") == test]
    chosen = {i.callspec.id for i in items}
    cases = [c for c in CASES if c.id in chosen]
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
        results = dict(zip([c.id for c in cases], pool.map(run, cases), strict=True))
    if os.environ.get("BEVLABELS_BAD_INPUT_TABLE"):
        write_table(Path(os.environ["BEVLABELS_BAD_INPUT_TABLE"]), results)
    return results


def write_table(path: Path, results: dict[str, tuple[Outcome, dict[str, str]]]) -> None:
    """The table as Markdown, one row per case: its command and exit status and the line it
    printed, with the study folder's paths put back as their placeholders (`{root}`, ...).
    Asked for with BEVLABELS_BAD_INPUT_TABLE=<file>; the table's assertions stay in the test."""
    rows = ["| case | command (`python -m ...`) | exit | stderr |", "|---|---|---|---|"]
    for case in [c for c in CASES if c.id in results]:
        outcome, where = results[case.id]
        said = " / ".join(line for line in outcome.stderr.splitlines() if line.strip())
        paths = {**where, "folder": str(Path(where["file"]).parent)}
        for name, value in sorted(paths.items(), key=lambda kv: -len(kv[1])):
            said = said.replace(value, f"{{{name}}}")
        cells = [case.id, f"`{case.argv}`", str(outcome.returncode), said]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    path.write_text("\n".join(rows) + "\n")


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


@pytest.fixture
def read_only(tmp_path):
    """An empty folder this process cannot write: a read-only tmpfs for root (whom permission
    bits do not stop), mode 0555 for anyone else."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=1m"):
        yield folder


@pytest.mark.parametrize("where", ["the folder itself", "a folder inside it"])
def test_a_read_only_study_folder_exits_2_naming_storage_path(
    tmp_path, synthetic_root, read_only, where
):
    storage = read_only if where == "the folder itself" else read_only / "study"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SWEEP_SPEC)
    result = subprocess.run(
        [sys.executable, "-m", "harness.sweep", str(spec), "--set",
         f"data.dataroot={synthetic_root}", "--set", f"storage_path={storage}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=os.environ | {"BEVLABELS_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{spec}: storage_path: {read_only} is read-only" in lines[0], lines[0]
    assert not list(read_only.iterdir())
