"""Shared fixtures. Append new fixtures; keep the existing ones working."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- platform: processes

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a gradgym subprocess: no tracking server or Ray cluster unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(extra)
    return env


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL if needed."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, local artifact root) for tests.

    ``stop()`` and ``start()`` again keep the port and the store, as a restart would.
    """

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> MlflowServer:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        with open(self.root / "server.log", "ab") as log:  # the server keeps its own copy
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.3)
        raise TimeoutError(f"mlflow server on port {self.port} not ready after {timeout} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One tracking server for the session. Tests use their own experiment names; a test
    that stops it must start it again."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


def run_gradgym(args: list[str], cwd: Path, timeout: float = 300.0, **env: str) -> subprocess.CompletedProcess:
    """Run ``gradgym ARGS`` (``python -m gradgym.platform.cli``) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "gradgym.platform.cli", *args], cwd=cwd, env=clean_env(**env),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def start_gradgym(args: list[str], cwd: Path, log_path: Path, **env: str) -> subprocess.Popen:
    """Start ``gradgym ARGS`` in its own process group (so that a test can kill all of it)."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(
            [sys.executable, "-m", "gradgym.platform.cli", *args], cwd=cwd, env=clean_env(**env),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
