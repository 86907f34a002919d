"""What a `--resume` restores after a full disk: trials that failed for lack of space run again,
trials that failed by themselves stay failed, and a failure record cut short by the full disk
does not stop the restore."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from harness.restore import failures_for_lack_of_space

ENOSPC_TEXT = (
    "Failure # 1 (occurred at 2026-12-06_08-51-20)\nOSError: [Errno 28] No space left on device\n"
)


def _trial(ray_path: Path, name: str, pickled: bytes | None, text: str | None) -> Path:
    folder = ray_path / name
    folder.mkdir(parents=True)
    if pickled is not None:
        (folder / "error.pkl").write_bytes(pickled)
    if text is not None:
        (folder / "error.txt").write_text(text)
    return folder


def test_only_failures_of_a_full_disk_or_cut_short_by_one_count(tmp_path):
    complete = pickle.dumps(RuntimeError("non-finite loss"))
    _trial(tmp_path, "a-empty-record", b"", "")
    _trial(
        tmp_path, "b-no-space", pickle.dumps(OSError(28, "No space left on device")), ENOSPC_TEXT
    )
    _trial(tmp_path, "c-cut-short", complete[:-3], "Failure # 1\nOSError: [Errno 28] No space")
    _trial(tmp_path, "d-own-failure", complete, "Failure # 1\nNonFiniteLossError: loss is nan\n")
    _trial(tmp_path, "e-finished", None, None)
    (tmp_path / "experiment_state-2026.json").write_text("{}")  # a file, not a trial

    assert failures_for_lack_of_space(tmp_path) == ["a-empty-record", "b-no-space", "c-cut-short"]


def test_an_unreadable_failure_record_is_set_aside_and_a_readable_one_kept(tmp_path):
    complete = pickle.dumps(RuntimeError("non-finite loss"))
    empty = _trial(tmp_path, "empty", b"", ENOSPC_TEXT)
    cut = _trial(tmp_path, "cut", complete[:-1], ENOSPC_TEXT)
    kept = _trial(tmp_path, "kept", complete, "Failure # 1\nNonFiniteLossError: loss is nan\n")

    failures_for_lack_of_space(tmp_path)

    for folder, content in ((empty, b""), (cut, complete[:-1])):
        assert not (folder / "error.pkl").exists()
        assert (folder / "error.pkl.corrupt").read_bytes() == content  # nothing is lost
        assert (folder / "error.txt").read_text() == ENOSPC_TEXT
    assert (kept / "error.pkl").read_bytes() == complete


# A Tune experiment whose only trial fails with ENOSPC until a file exists ("space is freed").
SCRIPT = """
import errno, json, sys
from pathlib import Path
from ray import tune
from harness.restore import failures_for_lack_of_space
from harness.sweep_setup import start_ray

root, step = Path(sys.argv[1]), sys.argv[2]

def trainable(config):
    if not Path(config["space"]).exists():
        raise OSError(errno.ENOSPC, "No space left on device")
    tune.report({"ok": 1})

start_ray(None)
trainable = tune.with_resources(trainable, {"cpu": 1})
full = []
if step == "first":
    run = tune.RunConfig(storage_path=str(root), name="exp", verbose=0,
                         failure_config=tune.FailureConfig(max_failures=0))
    grid = tune.Tuner(trainable, param_space={"space": str(root / "space")}, run_config=run).fit()
else:
    full = failures_for_lack_of_space(root / "exp")
    grid = tune.Tuner.restore(str(root / "exp"), trainable, resume_errored=bool(full)).fit()
print(json.dumps({"errors": grid.num_errors, "terminated": grid.num_terminated, "full": full}))
"""


def _tune(root: Path, step: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), step],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_trial_failed_for_lack_of_space_finishes_on_restore_despite_an_empty_record(tmp_path):
    assert _tune(tmp_path, "first") == {"errors": 1, "terminated": 0, "full": []}
    (record,) = (tmp_path / "exp").glob("*/error.pkl")
    record.write_bytes(b"")  # what the full disk left of it (Tune's restore raised EOFError)
    (tmp_path / "space").touch()  # the user frees space, then resumes

    outcome = _tune(tmp_path, "restore")
    assert outcome == {"errors": 0, "terminated": 1, "full": [record.parent.name]}
