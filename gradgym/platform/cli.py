"""The ``gradgym`` command.

::

    gradgym run pipeline=trajectory env=Pendulum backend=torch pipeline.iters=200
    gradgym sweep configs/sweeps/backends.yaml grid.seed=[0,1,2]
    gradgym sweep --resume backends
    gradgym ui
    gradgym runs [--settle]
    gradgym view HalfCheetah-v5          (or: gradgym view runs/<name>)
    gradgym envs
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_CONFIG_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradgym`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG_ERROR
    if argv is None and args.command == "run":  # the console script, not a caller's main([...])
        from gradgym.platform.allocator import AllocatorError, execute_with_allocator

        try:
            execute_with_allocator(sys.orig_argv[1:])  # returns where nothing is to be done
        except AllocatorError as err:
            print(f"gradgym run: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    from gradgym.platform.config import ConfigError

    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"gradgym {args.command}: invalid config: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradgym",
        description="Experiments on differentiable RL environments: single runs, Ray sweeps, MLflow.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="one pipeline run in this process (no Ray, no server)",
                              description="Run one pipeline; KEY=VALUE items override the config "
                                          "(e.g. pipeline=cem backend=numpy pipeline.iters=50).")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--config", type=Path, help="base YAML (default: configs/run.yaml)")
    run.set_defaults(handler=_cmd_run)

    sweep = commands.add_parser("sweep", help="a grid/random search of runs on Ray Tune",
                                description="Run a sweep file on Ray (RAY_ADDRESS: that cluster, "
                                            "else a local Ray on 127.0.0.1); KEY=VALUE items "
                                            "override the file (e.g. grid.seed=[0,1,2]).")
    sweep.add_argument("file", nargs="?", type=Path, help="sweep YAML (not needed with --resume)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    sweep.add_argument("--resume", metavar="NAME", help="finish the unfinished trials of sweep NAME")
    sweep.set_defaults(handler=_cmd_sweep)

    ui = commands.add_parser("ui", help="the MLflow dashboard on 127.0.0.1")
    ui.add_argument("--port", type=_port, default=5000, help="TCP port, 1-65535 (default: 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ui.set_defaults(handler=_cmd_ui)

    runs = commands.add_parser("runs", help="list run folders with their true status",
                               description="List the run folders under ROOT (default: runs) with "
                                           "their true status: RUNNING only while a live process "
                                           "holds the folder; DEAD: its process died without "
                                           "ending the run (e.g. kill -9).")
    runs.add_argument("root", nargs="?", type=Path, default=Path("runs"), metavar="ROOT")
    runs.add_argument("--settle", action="store_true",
                      help="end every DEAD run as KILLED, in its folder and in MLflow")
    runs.set_defaults(handler=_cmd_runs)
    view = commands.add_parser(
        "view", help="watch an env, or replay/follow a run, live in the browser",
        description="Serve a page on 127.0.0.1 that shows WHAT live: an env (KEY=VALUE items "
                    "are task arguments, e.g. num_joints=3, or seed=N) or a run folder (its best "
                    "plan/policy; a run still going is followed as it improves).")
    view.add_argument("what", metavar="ENV_OR_RUN_FOLDER")
    view.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    view.add_argument("--run", metavar="FOLDER", help="with an ENV: a run folder whose plan or "
                                                      "policy can act in it")
    view.add_argument("--port", type=int, default=8765, help="0: any free port (default 8765)")
    view.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    view.set_defaults(handler=_cmd_view)

    envs = commands.add_parser("envs", help="list the registered environments")
    envs.set_defaults(handler=_cmd_envs)
    return parser


# ---------------------------------------------------------------------- run

def _cmd_run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from gradgym.platform.config import (
        compose_run_config,
        default_run_layers,
        env_defaults_in_use,
        load_yaml,
    )
    from gradgym.platform.mlflow_tracking import resolve_tracking_uri
    from gradgym.platform.runner import RunDirExistsError, default_run_dir, execute_run

    base = [load_yaml(args.config)] if args.config else default_run_layers()
    cfg = compose_run_config(*base, list(args.overrides))
    if cfg.run_dir is None:
        cfg = OmegaConf.merge(cfg, {"run_dir": str(default_run_dir(cfg))})
    if cfg.tracking.enabled:
        print(f"tracking: {resolve_tracking_uri(cfg.tracking.uri)} (experiment {cfg.tracking.experiment!r})")
    if in_use := env_defaults_in_use(cfg):
        print(f"{cfg.pipeline.name}'s defaults for {cfg.env}: "
              f"{' '.join(f'{key}={value}' for key, value in in_use.items())}")
    ended_by: list[int] = []
    previous = signal.signal(signal.SIGTERM, _interrupt_on(ended_by))
    try:
        summary = execute_run(cfg)
    except RunDirExistsError as err:
        print(f"gradgym run: {err}", file=sys.stderr)
        _settle_if_dead(cfg.run_dir)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        why = "terminated (SIGTERM)" if ended_by else "interrupted"
        print(f"gradgym run: {why}; the run ended KILLED; everything logged so far is in "
              f"{cfg.run_dir}", file=sys.stderr)
        return 128 + (ended_by[0] if ended_by else signal.SIGINT)
    except Exception as err:  # noqa: BLE001 - reported with where the data is, then exit 1
        print(f"gradgym run: failed: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"everything logged so far is in {cfg.run_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_run_summary(summary)
    if cfg.tracking.enabled:
        print("open the MLflow dashboard with: gradgym ui")
    return 0


def _settle_if_dead(run_dir: str) -> None:
    """A run folder this command touched whose run died without ending (e.g. kill -9): end
    it KILLED now, in the folder and its tracker, and say so."""
    from gradgym.platform.runner import settle_dead_run
    from gradgym.platform.tracking import TrackingError

    try:
        if settle_dead_run(run_dir):
            print(f"gradgym run: the run in {run_dir} had died without ending; it is now "
                  "settled as KILLED", file=sys.stderr)
    except TrackingError as err:
        print(f"gradgym run: the run in {run_dir} died without ending and cannot be settled "
              f"now: {err}; retry with `gradgym runs --settle`", file=sys.stderr)


def _interrupt_on(received: list[int]):
    """A signal handler that ends the run like Ctrl+C does (KILLED, everything delivered),
    noting the signal in ``received``: a process manager's SIGTERM must not leave the run
    RUNNING in MLflow."""

    def handler(signum: int, frame: object) -> None:
        if not received:  # a second signal while the run is closing does not cut the close
            received.append(signum)
            raise KeyboardInterrupt

    return handler


def _print_run_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['pipeline']} on {summary['env']} ({summary['backend']}, "
                        f"seed {summary['seed']})", show_header=False)
    for key in ("status", "iterations", "final_return", "best_return", "compile_time_s",
                "wall_time_s", "mean_iter_time_s", "malloc", "run_dir", "mlflow_run_id"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


# ---------------------------------------------------------------------- sweep

def _cmd_sweep(args: argparse.Namespace) -> int:
    from gradgym.platform.sweep import SweepFailed, resume_sweep, start_sweep

    if args.resume and (args.file is not None or args.overrides):
        print("gradgym sweep --resume NAME takes no file or overrides: the sweep's saved "
              "config is used", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if not args.resume and args.file is None:
        print("gradgym sweep: give a sweep file (e.g. configs/sweeps/backends.yaml) or "
              "--resume NAME", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if not args.resume and "=" in str(args.file):
        print(f"gradgym sweep: the first argument is the sweep file, got {str(args.file)!r}",
              file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # A process manager's SIGTERM stops the sweep as Ctrl+C does (Ray Tune saves its state
    # and the parent run ends UNFINISHED, resumable) instead of leaving it RUNNING.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        outcome = resume_sweep(args.resume) if args.resume else start_sweep(args.file, args.overrides)
    except SweepFailed as err:
        print(f"gradgym sweep: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(outcome.describe())
    return 0 if outcome.all_finished else 1


# ---------------------------------------------------------------------- ui

def _port(text: str) -> int:
    """argparse type of a TCP port."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}; allowed: an int in [1, 65535]")
    return port


def _cannot_bind(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on right now (``None`` if it can)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"unknown host {host!r}: {err}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind(address)
        except OSError as err:
            return f"cannot listen on {host}:{port}: {err.strerror or err}"
    return None


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the gradgym process dies, even by SIGKILL (Linux),
    so that a crashed ``gradgym ui`` leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the signal handlers below still stop it


def _cmd_ui(args: argparse.Namespace) -> int:
    # First, so that a signal while MLflow is imported stops this command cleanly too. SIGINT
    # gets the handler as well: a process started in the background inherits SIGINT ignored,
    # and Python then keeps ignoring it (no KeyboardInterrupt).
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve_ui(args)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_ui(args: argparse.Namespace) -> int:
    from gradgym.platform.mlflow_tracking import is_server_uri, resolve_tracking_uri

    uri = resolve_tracking_uri()
    if is_server_uri(uri):
        print(f"MLFLOW_TRACKING_URI points to a tracking server: open {uri} in a browser")
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the dashboard will listen on {args.host}, reachable from other machines; "
              "it has no login", file=sys.stderr)
    why = _cannot_bind(args.host, args.port)
    if why:
        print(f"gradgym ui: {why}; choose another --port (1-65535) or stop what uses it",
              file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    # Its own process group: the server's uvicorn workers are stopped with it, whatever
    # ends this command (Ctrl+C, SIGTERM from a process manager, an error here; a SIGKILL
    # through the parent-death signal). preexec_fn makes one prctl call, as Ray does for
    # the processes it starts.
    server = subprocess.Popen(command, env=env, start_new_session=True,
                              preexec_fn=_die_with_parent)  # noqa: PLW1509
    try:
        if not _wait_until_listening(server, args.host, args.port):
            print(f"gradgym ui: the MLflow server exited with status {server.returncode} before "
                  f"serving on {args.host}:{args.port}", file=sys.stderr)
            return 1
        print(f"MLflow dashboard of {uri}: http://{args.host}:{args.port}/#/experiments  "
              "(runs of each sweep under its experiment; Ctrl+C stops it)", flush=True)
        code = server.wait()
        if code:
            print(f"gradgym ui: the MLflow server exited with status {code}", file=sys.stderr)
        return 1 if code else 0
    finally:
        _stop_group(server)


def _wait_until_listening(server: subprocess.Popen, host: str, port: int) -> bool:
    """Wait until the server accepts connections; ``False`` if it exits first."""
    while server.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def _stop_group(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a process started in its own session and everything in its group: SIGTERM,
    then SIGKILL for whatever is still there after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(process):
            return
        os.killpg(process.pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(process):
            time.sleep(0.1)


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader, so that it does not count as alive
    try:
        os.killpg(process.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ---------------------------------------------------------------------- runs

def _cmd_runs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gradgym.platform.records import RunRecord
    from gradgym.platform.runner import run_status, settle_dead_run
    from gradgym.platform.tracking import TrackingError

    if not args.root.is_dir():
        print(f"gradgym runs: no run folders: {str(args.root)!r} is not a folder", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    table = Table(title=f"runs in {args.root}")
    for column in ("run", "status", "iterations", "final_return"):
        table.add_column(column)
    dead = unsettled = 0
    for folder in sorted(p for p in args.root.iterdir() if p.is_dir()):
        record = RunRecord(folder)
        if not record.is_run_folder():
            continue
        status = run_status(record)
        if status == "DEAD" and args.settle:
            try:
                if settle_dead_run(folder):
                    status = "KILLED (settled now)"
            except TrackingError as err:  # the store is away: the folder stays DEAD
                unsettled += 1
                print(f"gradgym runs: cannot settle {folder.name}: {err}", file=sys.stderr)
        dead += status == "DEAD"
        summary = record.read_summary()
        table.add_row(folder.name, status, str(summary.get("iterations", record.iterations())),
                      str(summary.get("final_return", "")))
    Console(width=120).print(table)
    if dead:
        print(f"{dead} DEAD run(s): their process died without ending them; "
              "`gradgym runs --settle` ends them KILLED in their folder and in MLflow")
    return 1 if unsettled else 0
# ---------------------------------------------------------------------- view

def _cmd_view(args: argparse.Namespace) -> int:
    from gradgym.platform.viewer import ViewerError, resolve_target, serve

    if not 0 <= args.port <= 65535:
        print(f"gradgym view: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        target = resolve_target(args.what, args.overrides, run=args.run)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: the viewer will listen on {args.host}, reachable from other "
                  "machines; it has no login", file=sys.stderr)
        serve(target, host=args.host, port=args.port)
    except ViewerError as err:
        print(f"gradgym view: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------------- envs

def _cmd_envs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gradgym.envs import registered

    table = Table(title="registered environments")
    for column in ("name", "family", "obs_dim", "act_dim", "dt", "horizon", "backends"):
        table.add_column(column, justify="right" if column in ("obs_dim", "act_dim", "dt", "horizon") else "left")
    for name, entry in sorted(registered().items(), key=lambda item: (item[1].family, item[0])):
        task = entry.factory()  # default task arguments
        table.add_row(name, entry.family, str(task.obs_dim), str(task.act_dim), f"{task.dt:g}",
                      str(task.horizon), ", ".join(entry.backends))
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
