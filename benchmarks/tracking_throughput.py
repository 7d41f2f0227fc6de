"""Tracking throughput: how fast N runs' per-iteration metrics reach MLflow from one process.

N runs x ITERS iterations x K metrics are logged through ``MlflowTracker`` (one tracker per
run, all in this process, as in a packed trial: the members report in lockstep, as fast as
the trackers take it), then every tracker finishes. Delivery paths:

- ``bulk``: the embedded sqlite store, every run's points of a flush in one SQLAlchemy Core
  transaction over MLflow's tables (``tracking.bulk_sql=true``, the default);
- ``log_batch``: the same store through MLflow's ``log_batch`` per run
  (``tracking.bulk_sql=false``, and what every tracker did before);
- ``server``: a real ``mlflow server`` on 127.0.0.1 (sqlite behind it), ``log_batch`` per run
  over HTTP; the server's CPU is measured too (psutil), since its ORM does the writing.

For each path it prints the wall time from the first iteration to the last ``finish()``,
metric points per second, and CPU seconds per 1000 points: of this process (all threads,
including the writing of ``metrics.jsonl``), minus the same loop with ``tracking.enabled=
false`` (the run folder only), i.e. what MLflow delivery costs; and, for the server, the
server processes' CPU. The load average is printed beside the figures: the machine is shared.

    python benchmarks/tracking_throughput.py                      # 64 runs x 200 x 10, sqlite
    python benchmarks/tracking_throughput.py --runs 16 --paths bulk log_batch server

Measured on this project's 2-CPU machine, shared (load average 9-15 during the runs),
64 runs x 200 x 10 = 128,128 points, MLflow 3.17, SQLAlchemy 2.1:

    path       points/s   CPU s/1000 (this process / delivery only / server)
    bulk       11,626     0.035 / 0.030 / -          (load 8.8 -> 9.5)
    log_batch   1,561     0.169 / 0.164 / -          (load 9.5 -> 14.8)
    server        813     0.070 / 0.064 / 0.286      (load 10.9 -> 10.4)

A 640-config sweep's 1.3M points cost ~40 CPU s of delivery on the bulk path (~210-310 CPU s
with log_batch); against a tracking server the server's own ORM (~0.29 CPU s / 1000 points,
~370 CPU s for 1.3M points) is the cost.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine_load import load_average

from gradgym.platform.config import compose_run_config
from gradgym.platform.records import RunRecord
from gradgym.platform.tracking import RunIdentity, open_tracker

PATHS = ("bulk", "log_batch", "server")


def log_runs(root: Path, tracking: list[str], runs: int, iters: int, metrics: int) -> tuple[float, float]:
    """Log ``runs`` x ``iters`` x ``metrics`` points through trackers and finish them all;
    returns (wall seconds, CPU seconds of this process)."""
    cfg = compose_run_config(tracking).tracking
    params = {f"pipeline.p{i}": str(i) for i in range(20)}
    trackers = [open_tracker(RunRecord(root / f"run{r}"), cfg,
                             RunIdentity(f"run{r}", tags={"env": "Pendulum"}, params=params)).start()
                for r in range(runs)]
    keys = [f"metric_{k}" for k in range(metrics)]
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(iters):
        for r, tracker in enumerate(trackers):
            tracker.log_iteration({key: r + step * 0.001 + k for k, key in enumerate(keys)}, step)
    for tracker in trackers:
        tracker.log_final({"best_return": 1.0, "final_return": 1.0}, iters)
    for tracker in trackers:
        tracker.finish()
    return time.perf_counter() - wall, time.process_time() - cpu


def warm_up(uri: str, root: Path) -> None:
    """Import MLflow and create the store's tables before timing (seconds, once)."""
    log_runs(root / "warmup", [f"tracking.uri={uri}", "tracking.experiment=warmup"], 1, 2, 2)


class Server:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store (as the tests start one)."""

    def __init__(self, root: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                   "--artifacts-destination", str(root / "server-artifacts")]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(root / "server.log", "wb") as log:  # the server keeps its own copy
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: see {root / 'server.log'}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def cpu_s(self) -> float | None:
        """CPU seconds of the server and its workers so far (None without psutil)."""
        try:
            import psutil
        except ImportError:
            return None
        root = psutil.Process(self.process.pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        os.killpg(self.process.pid, 15)
        self.process.wait(timeout=30)


def measure(path: str, root: Path, args: argparse.Namespace, local_cpu: float) -> dict:
    """One path's figures."""
    server = Server(root) if path == "server" else None
    uri = server.uri if server else f"sqlite:///{root / 'mlflow.db'}"
    try:
        warm_up(uri, root)
        before = server.cpu_s() if server else None
        tracking = [f"tracking.uri={uri}", "tracking.experiment=throughput",
                    f"tracking.bulk_sql={path == 'bulk'}"]
        wall, cpu = log_runs(root / "runs", tracking, args.runs, args.iters, args.metrics)
        server_cpu = server.cpu_s() - before if server and before is not None else None
    finally:
        if server:
            server.stop()
    points = args.runs * (args.iters * args.metrics + 2)
    return {"path": path, "wall": wall, "points_per_s": points / wall,
            "cpu_per_1000": 1000 * cpu / points, "delivery_cpu_per_1000": 1000 * (cpu - local_cpu) / points,
            "server_cpu_per_1000": None if server_cpu is None else 1000 * server_cpu / points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--metrics", type=int, default=10)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["bulk", "log_batch"])
    args = parser.parse_args()

    points = args.runs * (args.iters * args.metrics + 2)
    print(f"{args.runs} runs x {args.iters} iterations x {args.metrics} metrics = {points} points, "
          f"one process; load average before: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        _, local_cpu = log_runs(Path(tmp) / "local", ["tracking.enabled=false"], args.runs, args.iters,
                                args.metrics)
        print(f"run folders only (tracking.enabled=false): {1000 * local_cpu / points:.3f} CPU s / 1000 points")
        rows = []
        for path in args.paths:
            folder = Path(tmp) / path
            folder.mkdir()
            rows.append(measure(path, folder, args, local_cpu))
            print(f"  {path}: done, load average {load_average()}", flush=True)
    print()
    print(f"{'path':<10} {'wall s':>8} {'points/s':>10} {'CPU s/1000':>11} {'delivery':>9} {'server':>8}")
    for row in rows:
        server = "-" if row["server_cpu_per_1000"] is None else f"{row['server_cpu_per_1000']:.3f}"
        print(f"{row['path']:<10} {row['wall']:>8.1f} {row['points_per_s']:>10.0f} "
              f"{row['cpu_per_1000']:>11.3f} {row['delivery_cpu_per_1000']:>9.3f} {server:>8}")
    by_path = {row["path"]: row for row in rows}
    if "bulk" in by_path and "log_batch" in by_path:
        ratio = by_path["log_batch"]["delivery_cpu_per_1000"] / max(by_path["bulk"]["delivery_cpu_per_1000"], 1e-9)
        print(f"\nbulk vs log_batch: {by_path['bulk']['points_per_s'] / by_path['log_batch']['points_per_s']:.1f}x "
              f"the points/s, {ratio:.1f}x less delivery CPU per point")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
