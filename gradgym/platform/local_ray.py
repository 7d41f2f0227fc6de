"""A local Ray that lives and dies with the process that started it.

Ray ties the processes ``ray.init`` starts (GCS, raylet, ...) to the driver with a
parent-death signal, but not the agents and workers the raylet starts. After a driver's
``kill -9`` the dashboard and runtime-env agents stay up for a minute, holding loopback ports
(they report the raylet's death to the GCS, which is gone too, and wait 60 s for it), and the
runtime-env agent may ignore SIGTERM (ray-project/ray#59162).

So the processes of a local Ray started through :class:`LocalRay` are known by a random token
in their environment (:data:`OWNER_VARIABLE`: GCS and raylet inherit it from the driver,
workers from the raylet) and by descent from those (the agents overwrite their environment
when they rename themselves). A watchdog (this file run as a script: in a session of its own,
standard library only) notes them twice a second until the driver ends (end of file on a pipe
only the driver holds, however the driver ends), then stops every one still alive. A process
that is neither (a user's own ``ray start`` cluster, the driver's other children) is never
touched.

While the sweep runs, :meth:`LocalRay.on_core_death` watches Ray's core processes (GCS,
raylet): when one dies, the driver hears of it within a second, instead of hanging until Ray's
60 s reconnection timeout aborts it.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

OWNER_VARIABLE = "GRADGYM_RAY_OWNER"
STOP_GRACE_S = 1.0  # SIGTERM, then SIGKILL for what is left (Ray's agents may ignore SIGTERM)


def ray_processes(token: str, known: Mapping[int, int] | None = None) -> dict[int, int]:
    """The live processes of the local Ray whose token is ``token``: those that carry it in
    their environment, the ``known`` ones still alive, and their descendants, as
    ``{pid: start time}`` (Linux; elsewhere none are found and Ray's own fate sharing is all
    there is). ``known`` (a former answer) keeps processes whose environment Ray overwrote
    (its agents rename themselves) after their parent died."""
    table = _process_table()
    entry = f"{OWNER_VARIABLE}={token}".encode()
    found = {pid: start for pid, (_, start) in table.items()
             if (known or {}).get(pid) == start or entry in _environment(pid)}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                stack.append(child)
    found.pop(os.getpid(), None)
    return found


def _process_table() -> dict[int, tuple[int, int]]:
    """Every live process but zombies: ``{pid: (parent pid, start time)}``, from /proc."""
    table = {}
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()  # after "pid (name)"
        except (OSError, IndexError):  # gone meanwhile
            continue
        if fields[0] not in ("Z", "X"):
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def _environment(pid: int) -> list[bytes]:
    """A process's environment (``KEY=value`` entries), empty if it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return file.read().split(b"\0")
    except OSError:  # gone, or another user's
        return []


def stop_ray_processes(token: str, known: Mapping[int, int] | None = None,
                       timeout_s: float = 10.0) -> int:
    """Stop every process of the local Ray with ``token`` (see :func:`ray_processes`):
    SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`, until none is left (a raylet may start a
    worker meanwhile) or ``timeout_s`` has passed. Returns how many processes were stopped."""
    targets = ray_processes(token, known)
    _send(targets, signal.SIGTERM)
    grace_end, deadline = time.monotonic() + STOP_GRACE_S, time.monotonic() + timeout_s
    while time.monotonic() < grace_end and ray_processes(token, targets):
        time.sleep(0.05)
    while (left := ray_processes(token, targets)) and time.monotonic() < deadline:
        targets.update(left)
        _send(left, signal.SIGKILL)
        time.sleep(0.05)
    return len(targets)


def _send(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:  # gone already
            pass


class LocalRay:
    """A local Ray (``ray.init(address="local", ...)``) whose every process is stopped when
    this process ends, however it ends (see the module's docstring).

    Use: ``ray = LocalRay(); try: ray.start(...); ... finally: ray.shutdown()``.
    """

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self._watchdog: subprocess.Popen | None = None
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, **init_args: Any) -> None:
        """Start the watchdog, then Ray (``init_args``: for ``ray.init``)."""
        import ray

        # -I: the standard library only, not this file's folder on sys.path.
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), self.token], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        previous = os.environ.get(OWNER_VARIABLE)
        os.environ[OWNER_VARIABLE] = self.token  # inherited by every process Ray starts
        try:
            ray.init(address="local", **init_args)
        finally:
            if previous is None:
                os.environ.pop(OWNER_VARIABLE, None)
            else:
                os.environ[OWNER_VARIABLE] = previous

    def on_core_death(self, handler: Callable[[str], None], every_s: float = 1.0) -> None:
        """Call ``handler(what)`` (in a thread of its own) if Ray's GCS or raylet exits before
        :meth:`shutdown`; ``what`` names the processes and their exit status."""
        from ray._private import ray_constants
        from ray._private.worker import _global_node as node

        core = (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET)

        def watch() -> None:
            while not self._stop_watching.wait(every_s):
                dead = [f"{kind} (pid {process.pid}) exited with status {process.returncode}"
                        for kind, process in node.dead_processes() if kind in core]
                if dead:
                    handler("; ".join(dead))
                    return

        if node is not None:
            self._watcher = threading.Thread(target=watch, name="gradgym-ray-core", daemon=True)
            self._watcher.start()

    def stop_processes(self) -> None:
        """Have the watchdog stop every process of this Ray now, and wait for it (after Ray's
        core died, or once ``ray.shutdown`` has stopped what it knows of)."""
        if self._watchdog is not None and not self._watchdog.stdin.closed:
            self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self) -> None:
        """Stop Ray, then whatever Ray left behind."""
        import ray

        self._stop_watching.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        ray.shutdown()
        self.stop_processes()


def _watch(token: str, every_s: float = 0.5) -> None:
    """The watchdog: note Ray's processes every ``every_s`` until the driver ends (end of
    file on stdin), then stop them all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, int] = {}
    while not _closed(sys.stdin.fileno(), every_s):
        known = ray_processes(token, known)
    stop_ray_processes(token, known)


def _closed(fd: int, timeout_s: float) -> bool:
    """Whether the pipe ``fd`` reaches its end (its writer is gone) within ``timeout_s``."""
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable) and not os.read(fd, 4096)


if __name__ == "__main__":
    _watch(sys.argv[1])
