"""The ``gradgym`` command.

::

    gradgym run pipeline=trajectory env=Pendulum backend=torch pipeline.iters=200
    gradgym sweep configs/sweeps/backends.yaml grid.seed=[0,1,2]
    gradgym sweep --resume backends
    gradgym ui
    gradgym view HalfCheetah-v5          (or: gradgym view runs/<name>)
    gradgym envs
"""

from __future__ import annotations

import argparse
import os
import signal
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
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ui.set_defaults(handler=_cmd_ui)

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

    from gradgym.platform.config import compose_run_config, default_run_layers, load_yaml
    from gradgym.platform.mlflow_tracking import resolve_tracking_uri
    from gradgym.platform.runner import RunDirExistsError, default_run_dir, execute_run

    base = [load_yaml(args.config)] if args.config else default_run_layers()
    cfg = compose_run_config(*base, list(args.overrides))
    if cfg.run_dir is None:
        cfg = OmegaConf.merge(cfg, {"run_dir": str(default_run_dir(cfg))})
    if cfg.tracking.enabled:
        print(f"tracking: {resolve_tracking_uri(cfg.tracking.uri)} (experiment {cfg.tracking.experiment!r})")
    try:
        summary = execute_run(cfg)
    except RunDirExistsError as err:
        print(f"gradgym run: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        print(f"gradgym run: interrupted; everything logged so far is in {cfg.run_dir}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - reported with where the data is, then exit 1
        print(f"gradgym run: failed: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"everything logged so far is in {cfg.run_dir}", file=sys.stderr)
        return 1
    _print_run_summary(summary)
    if cfg.tracking.enabled:
        print("open the MLflow dashboard with: gradgym ui")
    return 0


def _print_run_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['pipeline']} on {summary['env']} ({summary['backend']}, "
                        f"seed {summary['seed']})", show_header=False)
    for key in ("status", "iterations", "final_return", "best_return", "compile_time_s",
                "wall_time_s", "mean_iter_time_s", "run_dir", "mlflow_run_id"):
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
    try:
        outcome = resume_sweep(args.resume) if args.resume else start_sweep(args.file, args.overrides)
    except SweepFailed as err:
        print(f"gradgym sweep: {err}", file=sys.stderr)
        return 1
    print(outcome.describe())
    return 0 if outcome.all_finished else 1


# ---------------------------------------------------------------------- ui

def _cmd_ui(args: argparse.Namespace) -> int:
    from gradgym.platform.mlflow_tracking import is_server_uri, resolve_tracking_uri

    uri = resolve_tracking_uri()
    if is_server_uri(uri):
        print(f"MLFLOW_TRACKING_URI points to a tracking server: open {uri} in a browser")
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the dashboard will listen on {args.host}, reachable from other machines; "
              "it has no login", file=sys.stderr)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    print(f"MLflow dashboard of {uri}: http://{args.host}:{args.port}/#/experiments  "
          "(runs of each sweep under its experiment; Ctrl+C stops it)", flush=True)
    # Its own process group: the server's uvicorn workers are stopped with it, whatever
    # ends this command (Ctrl+C, SIGTERM from a process manager, an error here).
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(server)


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
