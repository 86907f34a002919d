"""Every command-line tool is a console script (`[project.scripts]` in pyproject.toml) whose
`--help` exits 0 and says what each of its options and arguments is for."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# Every `python -m` tool of the packages: a module with a `main` run under `__main__`.
TOOLS = {
    "harness.sweep",
    "analysis.report",
    "analysis.plan",
    "analysis.search",
    "model.tools.bench",
    "model.data.prepare",
    "model.data.pseudo_labels",
    "model.data.alignment",
    "model.data.bench",
    "model.data.synthetic.__main__",
}
ENTRY = re.compile(r"^  (\S.*?)(?:\s{2,}(\S.*))?$")  # "  --flag METAVAR   help" or "  spec  help"


def test_every_tool_has_a_console_script():
    modules = {target.split(":")[0] for target in SCRIPTS.values()}
    assert modules == TOOLS
    assert all(name.startswith("bevlabels-") for name in SCRIPTS)


def test_the_tool_list_is_every_module_that_runs_as_main():
    found = set()
    for package in ("harness", "analysis", "model"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if path.name == "__main__.py" or 'if __name__ == "__main__":' in text:
                found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    assert found == TOOLS


def run_help(target: str) -> subprocess.CompletedProcess:
    """What the console script runs (`sys.exit(main())`), with --help."""
    module, function = target.split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    env = os.environ | {"COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-c", code, "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(run_help, SCRIPTS.values()), strict=True))


def undocumented(text: str) -> list[str]:
    """Options and arguments in an argparse help text that have no help of their own."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        match = ENTRY.match(line)
        if not match or line.endswith(":"):
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        help_below = following.startswith("    ") and not following.startswith("  -", 0)
        if match.group(2) is None and not help_below:
            missing.append(match.group(1))
    return missing


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_exits_0_and_every_option_has_help(helps, script):
    result = helps[script]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: "), result.stdout[:200]
    assert "options:" in result.stdout
    assert undocumented(result.stdout) == [], result.stdout


def test_an_option_without_help_is_found():
    text = "usage: x\n\noptions:\n  -h, --help  show this help\n  --bare BARE\n  --ok  fine\n"
    assert undocumented(text) == ["--bare BARE"]
