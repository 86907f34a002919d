"""A real tracking deployment, as docker/compose.yaml wires it, without Docker.

The fixtures start Debian's PostgreSQL (initdb into a temporary directory, 127.0.0.1 on a free
port, as the `postgres` OS user when the tests run as root), a real `mlflow server` on it with
proxied artifact serving, and a one-node Ray cluster with `ray start --head`. A small sweep then
runs with only MLFLOW_TRACKING_URI and RAY_ADDRESS in its environment (no CLI flag, nothing in
the spec), and `analysis.load` reads the study back through the server's REST API.

Needs the postgresql server binaries (.ci/install-postgres.sh installs them). Locally the module
is skipped without them; in CI (CI=true) it fails instead, so a missing install step shows.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STARTUP_TIMEOUT_S = 180


def unavailable(reason: str):
    """Skip on a developer's machine; fail in CI, where .ci/run should have installed it."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: .ci/install-postgres.sh should have provided it)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    dbname: str

    @property
    def sqlalchemy_url(self) -> str:
        """No password in the URI: libpq takes it from PGPASSWORD, as in docker/compose.yaml."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def connect(self):
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            connect_timeout=10,
        )


def postgres_bindir() -> Path | None:
    """The newest installed server's bin directory (Debian keeps them off PATH)."""
    installed = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    installed.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    if installed:
        return installed[-1]
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


@pytest.fixture(scope="module")
def postgres():
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (the dev extra has psycopg2-binary)")

    # Postgres refuses to run as root: run it as the `postgres` OS user, in a directory it owns.
    as_user: dict = {}
    base = Path(tempfile.mkdtemp(prefix="bevlabels-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            unavailable("running as root, and there is no `postgres` OS user to run the server")
        as_user = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        os.chown(base, account.pw_uid, account.pw_gid)

    server = Postgres("127.0.0.1", free_port(), "mlflow", secrets.token_hex(16), "mlflow")
    data, log, pwfile = base / "data", base / "postgres.log", base / "pwfile"
    pwfile.write_text(server.password + "\n")
    if as_user:
        os.chown(pwfile, as_user["user"], as_user["group"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def pg(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **as_user,
            **kwargs,
        )

    started = False
    try:
        initdb = pg(
            "initdb",
            "-D",
            str(data),
            "-U",
            server.user,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        assert initdb.returncode == 0, initdb.stdout + initdb.stderr
        options = (
            f"-c listen_addresses={server.host} -p {server.port} "
            f"-c unix_socket_directories={base} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off"
        )
        start = pg(
            "pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"
        )
        started = start.returncode == 0
        assert started, start.stdout + start.stderr + tail(log)

        admin = Postgres(server.host, server.port, server.user, server.password, "postgres")
        connection = admin.connect()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {server.dbname}")
        connection.close()
        yield server
    finally:
        if started:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


# --- MLflow tracking server ---------------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str
    artifacts: Path
    log: Path


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow-server")
    artifacts, log = workdir / "artifacts", workdir / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PGPASSWORD"] = postgres.password
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", postgres.sqlalchemy_url,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy in {STARTUP_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield MlflowServer(url, artifacts, log)
    finally:
        stop_process_group(proc)


# --- Ray ---------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    auth_env: dict[str, str]  # what a driver needs to be let in (token authentication)

    def driver_logs(self) -> list[Path]:
        """Log files of the drivers that connected to this cluster (one per ray.init)."""
        return sorted(self.temp_dir.glob("session_*/logs/python-core-driver-*"))


@pytest.fixture(scope="module")
def ray_cluster():
    # A short temp dir: Ray's Unix socket paths must stay under ~100 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="bvray-"))
    port = free_port()
    # Token authentication, with a token of its own: the cluster neither depends on nor is
    # confused by a ~/.ray/auth_token that a local `ray.init()` may have left on this machine.
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | auth_env
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={port}", f"--temp-dir={temp_dir}",
        "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
        "--object-store-memory=200000000", "--disable-usage-stats",
    ]  # fmt: skip
    log = temp_dir / "ray-start.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    cluster = RayCluster(f"127.0.0.1:{port}", temp_dir, auth_env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not list(temp_dir.glob("session_*/logs/raylet.out")):
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"ray head not up in {STARTUP_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield cluster
    finally:
        # SIGTERM makes the head drain for up to 30 s; a throw-away cluster need not wait.
        stop_process_group(proc, timeout_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- the infrastructure alone -------------------------------------------------------------------


def test_tracking_server_keeps_runs_in_postgres(postgres, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment("infrastructure-smoke")
    run = client.create_run(experiment_id, tags={"bev.role": "smoke"})
    client.log_metric(run.info.run_id, "val/mIoU", 0.5, step=1)
    client.set_terminated(run.info.run_id)

    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchone() == ("FINISHED",)
        cursor.execute("SELECT value FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
        assert [row[0] for row in cursor.fetchall()] == [0.5]
    assert math.isclose(client.get_run(run.info.run_id).data.metrics["val/mIoU"], 0.5)


# --- a real sweep against the deployment -------------------------------------------------------

STUDY = "postgres-e2e"
# experiments/quick.yaml cut to one pretrained trial (one pretraining epoch, one fine-tuning
# epoch) on the session's small synthetic dataset: the smallest sweep that writes every kind of
# run (sweep, pretraining, trial), metric and artifact of the MLflow layout.
TINY_SWEEP = [
    f"study={STUDY}",
    "methods=[pretrained]",
    "search.finetune.label_fraction=[0.5]",
    "seeds=[0]",
    "pretrain.budget.value=1",
    "finetune.budget.value=1",
    "data.max_val_samples=2",
    "mlflow.system_metrics=false",
    "resources.cpu=1",
]


@dataclass
class Sweep:
    storage: Path
    output: str


@pytest.fixture(scope="module")
def sweep(mlflow_server, ray_cluster, synthetic_root, tmp_path_factory) -> Sweep:
    """`python -m harness.sweep` told where to go by the environment alone, as in compose."""
    workdir = tmp_path_factory.mktemp("sweep")
    storage = workdir / "study"
    overrides = [*TINY_SWEEP, f"storage_path={storage}", f"data.dataroot={synthetic_root}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env |= {"MLFLOW_TRACKING_URI": mlflow_server.url, "RAY_ADDRESS": ray_cluster.address}
    env |= ray_cluster.auth_env
    command = [sys.executable, "-m", "harness.sweep", str(ROOT / "experiments" / "quick.yaml")]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"sweep failed ({result.returncode}):\n{output[-6000:]}"
    return Sweep(storage, output)


def runs_by_role(postgres) -> dict[str, list[str]]:
    """MLflow's own tables in Postgres: run status per `bev.role` tag in the study's experiment."""
    query = """
        SELECT tags.value, runs.status FROM runs
        JOIN experiments ON experiments.experiment_id = runs.experiment_id
        JOIN tags ON tags.run_uuid = runs.run_uuid AND tags.key = 'bev.role'
        WHERE experiments.name = %s AND runs.lifecycle_stage = 'active'
    """
    roles: dict[str, list[str]] = {}
    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute(query, (STUDY,))
        for role, status in cursor.fetchall():
            roles.setdefault(role, []).append(status)
    return roles


def test_sweep_runs_land_in_postgres_through_the_tracking_server(sweep, postgres):
    assert runs_by_role(postgres) == {
        "sweep": ["FINISHED"],
        "pretrain": ["FINISHED"],
        "trial": ["FINISHED"],
    }


def test_sweep_keeps_no_local_store_when_the_environment_names_a_server(sweep):
    assert not (sweep.storage / "mlflow.db").exists()
    assert not list(sweep.storage.rglob("mlruns"))


def test_sweep_runs_on_the_ray_cluster_named_by_ray_address(sweep, ray_cluster):
    # Every driver that connects to a cluster leaves its log in that cluster's session folder;
    # a sweep that had started its own local Ray would have left nothing in this one.
    assert ray_cluster.driver_logs(), "the sweep's driver never connected to the test cluster"


def test_trial_artifacts_are_uploaded_to_the_server_artifact_store(sweep, mlflow_server):
    stored = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert {"per_class_iou.csv", "trial_config.json", "spec.yaml"} <= stored, stored
    assert not list(sweep.storage.rglob("per_class_iou.csv")), "artifacts written locally"


def test_analysis_reads_the_study_back_through_the_rest_api(sweep, mlflow_server):
    from analysis.load import load_study

    study = load_study(STUDY, tracking_uri=mlflow_server.url, progress=False)
    assert study.tracking_uri == mlflow_server.url
    trial = study.trials.iloc[0]
    assert len(study.trials) == 1 and trial["method"] == "pretrained"
    assert trial["label_fraction"] == 0.5 and trial["status"] == "FINISHED"
    assert 0.0 <= trial["val_mIoU"] <= 1.0
    assert study.class_names == ["background", "divider", "ped_crossing", "boundary"]
    assert trial["cum_wall_s_incl_pretrain"] > trial["cum_wall_s"] > 0
    # Artifacts come back through the server too: the sweep's spec and environment.
    assert study.sweep is not None and "methods:" in (study.sweep.spec_yaml or "")
    assert study.sweep.environment and "packages" in study.sweep.environment


def test_analysis_finds_the_server_through_mlflow_tracking_uri(sweep, mlflow_server, monkeypatch):
    from analysis.load import load_study

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    study = load_study(STUDY, progress=False)
    assert study.tracking_uri == mlflow_server.url
    assert len(study.trials) == 1
