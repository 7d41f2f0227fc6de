"""Chaos: a sweep against a real MLflow server while faults hit it on a schedule.

Runs the same sweep twice, each with its own MLflow server on 127.0.0.1 (sqlite store):

1. fault-free: the reference wall time;
2. with faults, on a schedule measured from the sweep's start:
   - trial processes killed (SIGKILL to the Ray worker running a trial), ``--trial-kills`` times;
   - the tracking server stopped for ``--outage-s`` seconds, twice;
   - with ``--nodes``: a Ray worker node of a multi-node ``Cluster`` on loopback killed;
   - the sweep's driver killed (SIGKILL) and the sweep resumed with ``gradgym sweep --resume``
     (the second outage falls in the resumed part).

Every config runs ``cem`` on numpy (cheap, so the faults, not the compute, dominate), one
config per trial (``pack: 1``), slowed by ``GRADGYM_FAULTS``' ``iteration_delay_s``.

Reported: configs finished; metric points expected (``iters`` per config, ``return_mean``)
vs found in MLflow, lost and duplicated; MLflow runs left RUNNING (children and parent); the
faults actually injected; wall time with faults vs without (overhead). The load average is
printed before and after: on a shared machine it is part of the result.

    python benchmarks/chaos.py                          # >= 40 configs, 2 outages of 30 s
    python benchmarks/chaos.py --seeds 4 --iters 20 --outage-s 10   # a short form
    python benchmarks/chaos.py --nodes 2     # on a 3-node Cluster on loopback; a node killed

Exits 1 when the target is missed: 0 points lost or duplicated, 0 runs left RUNNING, every
config finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml
from machine_load import load_average

ENVS = ["Pendulum", "CartPole", "MountainCar", "Reacher", "Swimmer"]
SWEEP_NAME = "chaos"


def main() -> None:
    args = _parser().parse_args()
    print(f"load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gradgym-chaos-") as tmp:
        root = Path(tmp)
        baseline = None if args.skip_baseline else _sweep_once(root / "baseline", args, faults=False)
        chaos = _sweep_once(root / "chaos", args, faults=True)
    print(f"load average after: {load_average()}")
    print(json.dumps({"baseline": baseline, "chaos": chaos}, indent=2))
    if baseline:
        print(f"wall overhead of the faults: {chaos['wall_s'] / baseline['wall_s'] - 1:+.0%} "
              f"({chaos['wall_s']:.0f} s vs {baseline['wall_s']:.0f} s fault-free)")
    missed = {k: chaos[k] for k in ("points_lost", "points_duplicated", "runs_left_running") if chaos[k]}
    if missed or chaos["configs_finished"] < chaos["configs"]:
        print(f"TARGET MISSED (0 lost, 0 duplicated, 0 left RUNNING, every config finished): {missed}")
        sys.exit(1)
    print("target met: 0 lost, 0 duplicated, 0 left RUNNING, every config finished")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per env (5 envs)")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--delay-s", type=float, default=0.15, help="sleep after each iteration")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--trial-kills", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=0,
                        help="worker nodes of a multi-node Ray Cluster on loopback (1 CPU each, "
                             "beside a 1-CPU head); one is killed mid-sweep. 0: a local Ray")
    parser.add_argument("--skip-baseline", action="store_true")
    return parser


# ---------------------------------------------------------------------- one sweep

def _sweep_once(folder: Path, args: argparse.Namespace, *, faults: bool) -> dict:
    folder.mkdir(parents=True)
    server = MlflowServer(folder / "mlflow").start()
    sweep_file = folder / "chaos.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": SWEEP_NAME, "num_cpus": args.cpus, "pack": 1, "max_failures": 10,
        "experiment": SWEEP_NAME,
        "overrides": {"pipeline": "cem", "backend": "numpy", "pipeline.iters": args.iters,
                      "pipeline.horizon": 20, "pipeline.batch": 4, "pipeline.population": 16,
                      "pipeline.elites": 4, "pipeline.render": False,
                      "tracking.uri": server.uri, "tracking.flush_every_s": 0.5,
                      "tracking.outage_limit_s": 300},
        "grid": {"env": ENVS, "seed": list(range(args.seeds))},
    }))
    env = dict(os.environ, GRADGYM_FAULTS=json.dumps([{"match": {}, "iteration_delay_s": args.delay_s}]))
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    injected: dict[str, int] = {"trial_kills": 0, "outages": 0, "driver_kills": 0, "node_kills": 0}
    cluster = _start_cluster(args.nodes) if args.nodes else None
    if cluster is not None:  # its GCS listens on loopback only: the driver must stay there too
        env["RAY_ADDRESS"] = "127.0.0.1:" + cluster.address.rsplit(":", 1)[1]
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    began = time.monotonic()
    try:
        driver = _start(["sweep", str(sweep_file)], folder, env)
        if faults:
            _faults_first_part(driver, server, folder, args, injected, cluster)
            driver = _start(["sweep", "--resume", SWEEP_NAME], folder, env)
            _outage(server, args.outage_s, after_s=10, driver=driver, injected=injected)
        code = driver.wait()
        wall = time.monotonic() - began
        report = _count(server.uri, folder, args)
    finally:
        server.stop()
        if cluster is not None:
            cluster.shutdown()
    return {"exit_code": code, "wall_s": round(wall, 1), **report, "faults": injected}


def _faults_first_part(driver: subprocess.Popen, server: MlflowServer, folder: Path,
                       args: argparse.Namespace, injected: dict[str, int], cluster: Any) -> None:
    """Trial kills, a worker node killed (multi-node), one outage, then the driver killed;
    returns once it is dead."""
    _wait_for_trials(folder, minimum=2)
    # Trials run in the workers of the driver's local Ray, or of this process's cluster.
    ray_root = driver.pid if cluster is None else os.getpid()
    for _ in range(args.trial_kills):
        if _kill_a_trial(ray_root):
            injected["trial_kills"] += 1
        time.sleep(5)
    if cluster is not None:
        _kill_node(cluster, next(iter(cluster.worker_nodes)))
        injected["node_kills"] += 1
        print("killed a Ray worker node", flush=True)
    _outage(server, args.outage_s, after_s=2, driver=driver, injected=injected)
    _wait_for_trials(folder, minimum=len(ENVS) * args.seeds // 2)
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    injected["driver_kills"] += 1
    time.sleep(10)
    left = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    injected["ray_processes_left_10s_after_driver_kill"] = len(left)
    print("left after the driver's kill: " + ", ".join(_name(p) for p in left), flush=True)
    for process in left:  # started by this benchmark's driver: stop them before resuming
        try:
            process.kill()
        except psutil.Error:
            pass
    print(f"driver killed at {_finished(folder)} finished configs; resuming", flush=True)


def _outage(server: MlflowServer, seconds: float, *, after_s: float, driver: subprocess.Popen,
            injected: dict[str, int]) -> None:
    time.sleep(after_s)
    if driver.poll() is not None:
        return
    server.stop()
    injected["outages"] += 1
    print(f"tracking server stopped for {seconds:g} s", flush=True)
    time.sleep(seconds)
    server.start()


def _kill_a_trial(root_pid: int) -> bool:
    """SIGKILL one Ray worker running a trial among ``root_pid``'s descendants (only those:
    other Ray sessions on the machine are left alone)."""
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(process.cmdline()) + process.name()
            if "ImplicitFunc" in title or "run_trial" in title:
                process.kill()
                print(f"killed trial process {process.pid}", flush=True)
                return True
        except psutil.Error:
            continue
    return False


def _start_cluster(nodes: int) -> Any:
    """A Ray Cluster on loopback: a 1-CPU head and ``nodes`` 1-CPU worker nodes."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback only
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def _kill_node(cluster: Any, node: Any) -> None:
    """Remove a worker node and SIGKILL every process it started (as a lost machine)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    processes = [psutil.Process(raylet), *psutil.Process(raylet).children(recursive=True)]
    cluster.remove_node(node, allow_graceful=False)
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def _name(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:80]}"
    except psutil.Error:
        return str(process.pid)


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(cwd / "driver.log", "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-m", "gradgym.platform.cli", *args], cwd=cwd,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _finished(folder: Path) -> int:
    trials = folder / "sweeps" / SWEEP_NAME / "trials"
    return sum(1 for s in trials.glob("*/summary.json") if '"FINISHED"' in s.read_text())


def _wait_for_trials(folder: Path, minimum: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _finished(folder) < minimum:
        time.sleep(1)


# ---------------------------------------------------------------------- the count

def _count(uri: str, folder: Path, args: argparse.Namespace) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(SWEEP_NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=10000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    expected = len(ENVS) * args.seeds * args.iters
    found = lost = duplicated = 0
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "return_mean")]
        found += len(steps)
        duplicated += len(steps) - len(set(steps))
        lost += len(set(range(args.iters)) - set(steps))
    configs = len(ENVS) * args.seeds
    lost += (configs - len({r.data.tags.get("mlflow.runName") for r in children})) * args.iters
    return {
        "configs": configs, "configs_finished": _finished(folder),
        "child_runs": len(children), "points_expected": expected, "points_in_mlflow": found,
        "points_lost": lost, "points_duplicated": duplicated,
        "runs_left_running": sum(r.info.status == "RUNNING" for r in runs),
    }


# ---------------------------------------------------------------------- the server

class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (sqlite store); stop/start keep its port and store."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


if __name__ == "__main__":
    main()
