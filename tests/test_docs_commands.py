"""The documentation's commands still run: every shell command in README.md, docs/*.md and the
header comments of experiments/*.yaml parses and starts, in a form that runs no study.

- `python -m harness.sweep ...`: the same command with `--dry-run`, exit 0 (in this process);
- `python -m analysis.report|plan ...`: against one small finished study (`build_store`), with
  `--experiment`, `--tracking-uri` and `--out` pointed at it, exit 0 (in this process);
- `mlflow ui|server ...`: started with the documented arguments on a free 127.0.0.1 port
  (`--workers 1` added, MLflow's background job runner off), answers HTTP 200 on `/` within 60 s
  of polling, then stopped;
- any other `python -m MODULE ...`, a usage synopsis (`[--flag X]`), a command in a table cell or a
  bare name: `python -m MODULE --help` exits 0 and names every flag the command uses;
- `bash FILE`, `docker compose -f FILE`, `docker build -f FILE`, `cp FILE ...`: FILE exists;
  `pip install .[EXTRA]`: pyproject.toml declares EXTRA. Docker and pip never run; the command a
  `docker ... run` runs inside the image is checked on its own (id `FILE:LINE:inner`).

A command is a line of an indented (or shell-fenced) Markdown code block, a `#   ` line of a YAML
header, or an inline code span, that starts with one of the programs in PROGRAM; a trailing
backslash continues it and `&&` separates two. One that fits no check above must be in SKIP with a
reason, and a placeholder in one that runs must be in PLACEHOLDERS: a new command fails until
someone classifies it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from test_analysis_store import build_store, standard_trials

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SPECS = sorted((REPO / "experiments").glob("*.yaml"))
PACKAGES = ("harness", "model", "analysis")
EXPERIMENT = "toy"  # the fake finished study every analysis command reads
SERVE_TIMEOUT_S = 60
SERVER_TEST = "test_mlflow_command_serves_the_ui"  # its servers start with the module
# MLflow >= 3.x starts a job runner and seven Huey consumers beside each server: CPU the UI does
# not need, and three servers' worth of it on two cores.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# What the docs write in place of real values, and what the test runs instead. {root}: the fake
# study's folder (the working directory of analysis commands); {store}: its tracking URI;
# {server_store}: a copy of it for the MLflow servers.
PLACEHOLDERS = {
    "SPEC": "experiments/quick.yaml",
    "NAME": EXPERIMENT,
    "<name>": EXPERIMENT,
    "<study>": EXPERIMENT,
    "/data/nuscenes": "{root}/nuscenes",
    "/shared/": "{root}/shared/",
    "HEAD:6379": "127.0.0.1:6379",
    "HEAD_IP": "127.0.0.1",
    "PRIVATE_IP": "127.0.0.1",
    "<tracking-host's private address>": "127.0.0.1",
    "http://127.0.0.1:5000": "{store}",
    "http://tracking-host:5000": "{store}",
    "http://mlflow:5000": "{store}",
    "postgresql://mlflow:PASSWORD@db-host/mlflow": "{server_store}",
    "postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow": "{server_store}",
    "PGPASSWORD=...": "PGPASSWORD=unused",
}

# Commands the test does not run, by their first words, and why.
SKIP = {
    "pip install ": "installs third-party packages (the OpenMMLab build): tests never run pip",
    "pip download ": "downloads the mmcv sdist from PyPI: tests never run pip",
    "python -c ": "inline Python that needs the OpenMMLab venv (mmcv) or a GPU image",
    ". ": "activates the venv the command before it creates",
    "tar ": "unpacks the mmcv sdist that `pip download` fetched",
    "sed -i ": "edits a file in place (mmcv's setup.py, docker/.env)",
    "chmod ": "changes docker/.env's mode after `cp` wrote it",
    "export ": "sets shell variables for the commands after it",
    "ray start": "starts or joins a Ray cluster node (Ray's CLI, not ours)",
    "ray status": "asks a running Ray cluster (Ray's CLI, not ours)",
    "papermill ": "runs the report notebook: tests/test_analysis_notebook.py runs it on a study",
    "jupyter nbconvert ": "renders papermill's output notebook",
    "docker run ": "runs the image (no Docker engine in tests); its inner command is checked",
}

PROMPT = re.compile(r"^\w+\$\s+")  # `head$   python -m ...`
ASSIGNMENT = re.compile(r"^[A-Z][A-Z0-9_]*=")
PROGRAM = re.compile(
    r"^(?:[A-Z][A-Z0-9_]*=(?:\$\([^)]*\)|\S*)\s+)*"
    r"(?:\S*python3? |mlflow |bash |docker |pip |ray |papermill |jupyter |cp |sed |tar "
    r"|export |chmod |\. )"
)
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
MODULE_CHECKS = {"harness.sweep": "dry-run", "analysis.report": "study", "analysis.plan": "study"}


# --- collecting the commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    where: str  # FILE:LINE of its first line
    text: str  # as documented, continuations joined, prompt removed
    reference: bool = False  # a usage synopsis, a table cell or a bare name: flags only

    @property
    def env(self) -> dict[str, str]:
        return dict(w.split("=", 1) for w in self._split()[0])

    @property
    def words(self) -> list[str]:
        """The program and its arguments, after the environment assignments."""
        words = self._split()[1]
        if words and words[0].endswith("/python"):
            words = ["python", *words[1:]]  # a venv's python runs the same module
        return words

    def _split(self) -> tuple[list[str], list[str]]:
        # `<tracking-host's address>` is one placeholder, not a quote; `$(...)` one word.
        text = re.sub(r"<[^<>]*>|\$\([^)]*\)", "PLACEHOLDER", self.text)
        words = shlex.split(text, comments=True)
        n = next((i for i, w in enumerate(words) if not ASSIGNMENT.match(w)), len(words))
        return words[:n], words[n:]

    @property
    def module(self) -> str | None:
        words = self.words
        return words[2] if words[:2] == ["python", "-m"] and len(words) > 2 else None


def command_lines(lines: list[tuple[int, str]], where: str) -> list[DocCommand]:
    """Commands in code lines `(line number, text)`: backslashes joined, `&&` split."""
    commands, i = [], 0
    while i < len(lines):
        number, text = lines[i]
        text = PROMPT.sub("", text.strip())
        if text.startswith("#"):  # `# or: CMD` offers an alternative command
            text = re.sub(r"^#\s*(or:\s*)?", "", text)
        starts = [(0, number)]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " "
            starts.append((len(text), lines[i][0]))
            text += PROMPT.sub("", lines[i][1].strip())
        i += 1
        offset = 0
        for part in text.split(" && "):
            line = max(n for at, n in starts if at <= offset)
            offset += len(part) + len(" && ")
            if PROGRAM.match(part.strip()):
                commands.append(DocCommand(f"{where}:{line}", part.strip()))
    return commands


def inline_commands(prose: str, where: str) -> list[DocCommand]:
    """Commands in inline code spans of `prose` (code blocks blanked, line numbers kept)."""
    lines = prose.split("\n")
    commands = []
    for match in re.finditer(r"`([^`]+)`", prose):
        text = " ".join(match.group(1).split())
        if not PROGRAM.match(text):
            continue
        line = prose.count("\n", 0, match.start()) + 1
        command = DocCommand(f"{where}:{line}", text)
        bare = len(command.words) <= (3 if command.module else 2)
        in_table = lines[line - 1].lstrip().startswith("|")
        commands.append(DocCommand(command.where, text, reference=bare or in_table))
    return commands


def markdown_commands(path: Path) -> list[DocCommand]:
    lines = path.read_text().splitlines()
    code, prose = [], list(lines)
    fence, in_block, blank_before = None, False, True
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip()
            prose[number - 1] = ""
        elif fence is not None:
            fence = None if stripped.startswith("```") else fence
            if fence in SHELL_FENCES:
                code.append((number, line))
            prose[number - 1] = ""
        else:
            indented = line.startswith("    ") and bool(stripped)
            in_block = indented and (in_block or blank_before) or (in_block and not stripped)
            if in_block:
                code.append((number, line))
                prose[number - 1] = ""
        blank_before = not stripped
    where = str(path.relative_to(REPO))
    return command_lines(code, where) + inline_commands("\n".join(prose), where)


def spec_commands(path: Path) -> list[DocCommand]:
    """Commands in a spec's header comment: `#   CMD` lines and inline code spans."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    code = [(n, line[1:]) for n, line in enumerate(header, 1) if re.match(r"#\s{2,}\S", line)]
    coded = {n for n, _ in code}
    prose = "\n".join("" if n in coded else line[1:] for n, line in enumerate(header, 1))
    where = str(path.relative_to(REPO))
    return command_lines(code, where) + inline_commands(prose, where)


def inner_commands(commands: list[DocCommand]) -> list[DocCommand]:
    """What `docker run IMAGE python ...` and `docker compose ... run SERVICE python ...` run."""
    inner = []
    for command in commands:
        words = command.words
        if words[:1] == ["docker"] and "run" in words and " python " in command.text:
            text = command.text[command.text.index(" python ") + 1 :]
            inner.append(DocCommand(f"{command.where}:inner", text))
    return inner


def collect() -> list[DocCommand]:
    commands = [c for path in DOCUMENTS for c in markdown_commands(path)]
    commands += [c for path in SPECS for c in spec_commands(path)]
    commands += inner_commands(commands)
    seen: dict[str, int] = {}
    unique = []
    for command in commands:  # two commands on one line: FILE:LINE, FILE:LINE#2
        seen[command.where] = seen.get(command.where, 0) + 1
        n = seen[command.where]
        where = command.where if n == 1 else f"{command.where}#{n}"
        unique.append(DocCommand(where, command.text, command.reference))
    return unique


# --- what each command is checked by -------------------------------------------------------------


def skip_reason(command: DocCommand) -> str | None:
    line = " ".join(command.words)
    return next((why for start, why in SKIP.items() if line.startswith(start)), None)


def local_install(words: list[str]) -> bool:
    targets = [w for w in words[2:] if not w.startswith("-")]
    return words[:2] == ["pip", "install"] and all(
        re.fullmatch(r"\.(\[[\w,-]+\])?", t) for t in targets
    )


def check_of(command: DocCommand) -> str:
    words = command.words
    usage = command.reference or "[-" in command.text  # `[--flag X]`: a usage synopsis
    if command.module:
        if usage:
            return "help"
        return MODULE_CHECKS.get(command.module, "help")
    if words[:1] == ["mlflow"] and words[1:2] in (["ui"], ["server"]):
        return "help" if usage else "serve"
    if words[:1] in (["bash"], ["cp"]) or words[:2] in (["docker", "compose"], ["docker", "build"]):
        return "files"
    if local_install(words):
        return "files"
    return "skip" if skip_reason(command) else "unclassified"


COMMANDS = collect()


def commands_checked_by(check: str) -> list:
    return [pytest.param(c, id=c.where) for c in COMMANDS if check_of(c) == check]


# --- running them --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    root: Path  # holds studies/<EXPERIMENT>/mlflow.db, the analysis commands' default store
    uri: str
    server_uri: str

    def substitute(self, command: DocCommand) -> DocCommand:
        """`command` with the placeholders replaced; an unknown `$(...)` or `<...>` fails."""
        text = command.text
        values = {"root": str(self.root), "store": self.uri, "server_store": self.server_uri}
        for key in sorted(PLACEHOLDERS, key=len, reverse=True):
            left = r"(?<![\w./-])" if key[0].isalnum() else ""
            right = r"(?![\w-])" if key[-1].isalnum() else ""
            value = PLACEHOLDERS[key].format(**values)
            text = re.sub(left + re.escape(key) + right, lambda _: value, text)  # noqa: B023
        unknown = re.findall(r"\$\([^)]*\)|<[^>\s][^>]*>", text)
        assert not unknown, f"{command.where}: add {unknown} to PLACEHOLDERS"
        return DocCommand(command.where, text)


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Study:
    """One small finished study (2 methods x fractions 0.5, 1.0 x 3 seeds) in the documented
    MLflow layout."""
    import matplotlib

    for package in PACKAGES:  # in-process runs must test this checkout, not an installed one
        path = Path(importlib.import_module(package).__file__).resolve()
        assert path.is_relative_to(REPO), f"{package} is {path}: run with PYTHONPATH={REPO}"
    matplotlib.use("Agg")
    root = tmp_path_factory.mktemp("docs_study")
    trials = [
        t for t in standard_trials() if t.label_fraction in (0.5, 1.0) and t.status == "FINISHED"
    ]
    uri = build_store(root / "studies" / EXPERIMENT, trials, experiment=EXPERIMENT)
    server_db = root / "server" / "mlflow.db"
    server_db.parent.mkdir()
    shutil.copy(root / "studies" / EXPERIMENT / "mlflow.db", server_db)
    return Study(root, uri, f"sqlite:///{server_db}")


def python_path() -> str:
    """$PYTHONPATH for a child process: this checkout first, whatever is installed."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@contextlib.contextmanager
def as_process(cwd: Path, env: dict[str, str]):
    """This process as the documented command's: its working directory and environment (no
    inherited tracking URI or Ray address), output captured; all restored afterwards."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    with (
        mock.patch.dict(os.environ),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            os.environ.pop(name, None)
        os.environ.update(env)
        os.chdir(cwd)
        try:
            yield out, err
        finally:
            os.chdir(previous)


def exit_code(run) -> int:
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 1)


@functools.cache
def module_help(module: str) -> tuple[int, str]:
    """`python -m MODULE --help`: the project's modules in this process, others in a child."""
    if module.split(".")[0] not in PACKAGES:
        env = os.environ | {"PYTHONPATH": python_path()}
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, done.stdout + done.stderr
    with as_process(REPO, {}) as (out, err), mock.patch.object(sys, "argv", [module, "--help"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # re-running an imported module
            code = exit_code(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    return code, out.getvalue() + err.getvalue()


def mlflow_options(subcommand: str) -> str:
    """The options `mlflow SUBCOMMAND` takes, as one string (read from its click command)."""
    import click
    from mlflow.cli import cli

    command = cli.get_command(click.Context(cli), subcommand)  # `ui` is an alias of `server`
    return " ".join(opt for param in command.params for opt in param.opts)


def flags(text: str) -> list[str]:
    return sorted(set(re.findall(r"(?<![\w/:.=-])(--?[A-Za-z][\w-]*)", text)))


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with `option`'s value (`--x V` or `--x=V`) replaced; unchanged without it."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            argv[i + 1] = value
        elif word.startswith(option + "="):
            argv[i] = f"{option}={value}"
    return argv


def set_option(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with `option`'s value replaced, or with `option value` added."""
    present = any(w == option or w.startswith(option + "=") for w in argv)
    return replace_option(argv, option, value) if present else [*argv, option, value]


def assert_exit_0(command: DocCommand, code: int, out: str) -> None:
    tail = "\n".join(out.strip().splitlines()[-15:])
    assert code == 0, f"{command.where}: `{command.text}` exited {code}:\n{tail}"


# --- the tests -----------------------------------------------------------------------------------


def test_every_file_shows_commands():
    files = {c.where.split(":")[0] for c in COMMANDS}
    assert "README.md" in files
    assert {str(p.relative_to(REPO)) for p in SPECS} <= files  # each spec says how to run it


def test_every_command_is_checked_or_skipped_with_a_reason():
    unclassified = [f"{c.where}: {c.text}" for c in COMMANDS if check_of(c) == "unclassified"]
    assert not unclassified, "add a check or a SKIP entry with its reason:\n" + "\n".join(
        unclassified
    )


def test_every_skip_and_placeholder_entry_is_still_used():
    lines = [" ".join(c.words) for c in COMMANDS]
    assert [s for s in SKIP if not any(line.startswith(s) for line in lines)] == []
    texts = " ".join(c.text for c in COMMANDS if check_of(c) not in ("help", "skip"))
    assert [p for p in PLACEHOLDERS if p not in texts] == []


@pytest.mark.parametrize("command", commands_checked_by("dry-run"))
def test_sweep_command_dry_runs(command, study):
    from harness.sweep import main

    command = study.substitute(command)
    argv = command.words[3:] + ([] if "--dry-run" in command.words else ["--dry-run"])
    with as_process(REPO, command.env) as (out, err):
        code = exit_code(lambda: main(argv))
    assert_exit_0(command, code, err.getvalue() or out.getvalue())


@functools.cache
def run_analysis(module: str, argv: tuple[str, ...], env: tuple, root: Path) -> tuple[int, str]:
    """One run per distinct invocation: many documented commands are the same one here."""
    main = importlib.import_module(module).main
    with as_process(root, dict(env)) as (out, err):
        code = exit_code(lambda: main(list(argv)))
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("command", commands_checked_by("study"))
def test_analysis_command_runs_on_a_finished_study(command, study):
    command = study.substitute(command)
    argv = replace_option(command.words[3:], "--experiment", EXPERIMENT)
    argv = replace_option(argv, "--tracking-uri", study.uri)
    if command.module == "analysis.report":  # its output in the study's folder, not the docs'
        argv = set_option(argv, "--out", str(study.root / "report"))
    env = {k: study.uri if k == "MLFLOW_TRACKING_URI" else v for k, v in command.env.items()}
    code, out = run_analysis(command.module, tuple(argv), tuple(sorted(env.items())), study.root)
    assert_exit_0(command, code, out)


@pytest.mark.parametrize("command", commands_checked_by("help"))
def test_command_flags_are_in_its_help(command):
    if command.module:
        code, text = module_help(command.module)
        assert_exit_0(DocCommand(command.where, f"python -m {command.module} --help"), code, text)
    else:
        text = mlflow_options(command.words[1])
    missing = [
        f
        for f in flags(command.text.split(command.module or command.words[1], 1)[1])
        if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)
    ]
    assert not missing, f"{command.where}: `{command.text}`: no {missing} in its --help"


def files_named(words: list[str]) -> list[str]:
    if words[0] in ("bash", "cp"):
        return [words[1]]
    if words[1] == "build":
        return [words[words.index("-f") + 1]] if "-f" in words else []
    named, i = [], 2  # compose's own options come before its subcommand
    while i + 1 < len(words) and words[i].startswith("-"):
        if words[i] in ("-f", "--file"):
            named.append(words[i + 1])
        i += 2
    return named


@pytest.mark.parametrize("command", commands_checked_by("files"))
def test_file_a_command_names_exists(command):
    words = command.words
    if words[0] == "pip":
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        declared = set(project.get("optional-dependencies", {}))
        wanted = {
            x for w in words for group in re.findall(r"^\.\[(.+)\]$", w) for x in group.split(",")
        }
        assert wanted <= declared, (
            f"{command.where}: no extra {wanted - declared} in pyproject.toml"
        )
        return
    named = files_named(words)
    assert named, f"{command.where}: `{command.text}` names no file to check"
    for name in named:
        assert (REPO / name).is_file(), f"{command.where}: `{command.text}`: no {name}"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, id=c.where, marks=pytest.mark.skip(reason=skip_reason(c)))
        for c in COMMANDS
        if check_of(c) == "skip"
    ],
)
def test_unrunnable_command_is_skipped_with_its_reason(command):
    """Never runs: listed so that `pytest -ra` prints each such command with SKIP's reason."""


# --- MLflow servers: all started at once, each test waits for its own ---------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    host_header: str | None  # the first host --allowed-hosts lets in, if the command sets it
    log: Path


def server_argv(command: DocCommand, study: Study) -> list[str]:
    """`mlflow ui|server`'s arguments on the study's store and 127.0.0.1, one worker."""
    words = command.words
    argv = replace_option(words[2:], "--backend-store-uri", study.server_uri)
    argv = set_option(argv, "--host", "127.0.0.1")
    argv = [w for w, prev in zip(argv, ["", *argv[:-1]], strict=True) if "--port" not in (w, prev)]
    if "--workers" not in argv and "--workers" in mlflow_options(words[1]):
        argv += ["--workers", "1"]
    return [words[1], *argv]


def start_server(argv: list[str], env: dict[str, str], log: Path) -> Server:
    port = free_port()
    allowed = dict(zip(argv, argv[1:], strict=False)).get("--allowed-hosts", "")
    host = next((h for h in allowed.split(",") if h and "*" not in h), None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *set_option(argv, "--port", str(port))],
            cwd=log.parent,
            env=os.environ | env | SERVER_ENV | {"PYTHONPATH": python_path()},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn and its worker stop together
        )
    return Server(proc, f"http://127.0.0.1:{port}/", host, log)


def stop(server: Server) -> None:
    """After SIGTERM to its group: a few seconds to exit, then SIGKILL."""
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def mlflow_servers(request, tmp_path_factory):
    """Every documented `mlflow ui|server` command, started when this module starts (if one of
    its tests is selected) so that their startups overlap the other tests; commands that are the
    same here share one server."""
    serving = [i for i in request.session.items if i.originalname == SERVER_TEST]
    if not serving:
        yield {}
        return
    study = request.getfixturevalue("study")
    folder = tmp_path_factory.mktemp("mlflow_servers")
    by_argv: dict[tuple[str, ...], Server] = {}
    servers = {}
    try:
        for item in serving:
            command = study.substitute(item.callspec.params["command"])
            argv = server_argv(command, study)
            key = (*argv, *sorted(command.env.items()))
            if key not in by_argv:
                log = folder / f"{command.where.replace('/', '_')}.log"
                by_argv[key] = start_server(argv, command.env, log)
            servers[command.where] = by_argv[key]
        yield servers
    finally:
        for server in by_argv.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGTERM)
        for server in by_argv.values():
            stop(server)


def http_status(server: Server) -> int | None:
    request = urllib.request.Request(server.url)
    if server.host_header:
        request.add_header("Host", server.host_header)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.mark.parametrize("command", commands_checked_by("serve"))
def test_mlflow_command_starts_one_worker(command):
    """MLflow's default is 4 uvicorn workers (and as many job consumers): on a 2-core machine a
    UI should not start a process per core it does not have; `--workers 1` says so."""
    words = command.words
    assert "--workers" in words, f"{command.where}: no --workers 1"
    assert words[words.index("--workers") + 1] == "1", command.where


@pytest.mark.parametrize("command", commands_checked_by("serve"))
def test_mlflow_command_serves_the_ui(command, mlflow_servers):
    server = mlflow_servers[command.where]
    status = None
    deadline = time.monotonic() + SERVE_TIMEOUT_S  # it has been starting since the module began
    while time.monotonic() < deadline and server.proc.poll() is None:
        status = http_status(server)
        if status == 200:
            return
        time.sleep(0.5)
    log = server.log.read_text()[-2000:]
    pytest.fail(f"{command.where}: `{command.text}` gave no HTTP 200 on / (last: {status}):\n{log}")
