"""Sweeps on Ray Tune: every trial is one run (env, backend, seed, hyperparameters).

A sweep lives in ``<storage>/<name>/``::

    sweep.yaml       the resolved sweep config (what --resume runs again)
    parent.json      the MLflow parent run of the sweep
    tune/            Ray Tune's experiment state (Tuner.restore resumes from it)
    trials/<id>/     one run folder per trial (see gradgym.platform.runner)
    summary.csv      one row per trial
    comparison.png   backends compared: return vs iteration, time per iteration

Ray: with ``RAY_ADDRESS`` set the sweep runs on that cluster unchanged; otherwise on a local
Ray bound to 127.0.0.1. Trials are idempotent: a trial whose folder already holds a
finished run reports that run instead of running again, and a retried or resumed trial
continues its MLflow run without logging any iteration twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradgym.platform.config import (
    ConfigError,
    flatten,
    grid_axes,
    load_sweep_config,
    search_space,
    trial_layers,
)
from gradgym.platform.runner import settle_run
from gradgym.platform.tracking import (
    METRICS_FILE,
    STATE_FILE,
    configure_http,
    ensure_experiment,
    is_transient,
    read_json,
    read_jsonl,
    resolve_tracking_uri,
    tracking_client,
    write_json,
)

SWEEP_FILE = "sweep.yaml"
PARENT_FILE = "parent.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# Keys every trial's label leaves out: they are the plot's columns, lines and spread.
_NOT_IN_LABEL = ("env", "backend", "seed")
# Local Ray: Tune passes only small results around, a big object store is wasted memory.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# Jax (XLA) in a trial: one thread per trial, like torch_threads.
TRIAL_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class SweepFailed(RuntimeError):
    """The sweep could not start or finish (not: some trials failed)."""


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    name: str
    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trial
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    fit_wall_s: float = 0.0  # wall time of Ray Tune's fit (all trials, without Ray's start)

    @property
    def interrupted(self) -> bool:
        """Whether trials are left unfinished (the sweep was interrupted): resume it."""
        return any(row["status"] == "UNFINISHED" for row in self.rows)

    @property
    def all_finished(self) -> bool:
        """Whether every trial finished or was stopped early by the scheduler (none failed)."""
        return bool(self.rows) and all(row["status"] in ("FINISHED", "STOPPED") for row in self.rows)

    def describe(self) -> str:
        """A short text summary for the terminal."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        lines = [
            f"sweep {self.name!r}: {len(self.rows)} trials ("
            + ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items())) + ")",
            f"  folder:     {self.sweep_dir}",
            f"  summary:    {self.sweep_dir / 'summary.csv'}",
            f"  comparison: {self.sweep_dir / 'comparison.png'}",
        ]
        if self.parent_run_id:
            lines.append(f"  MLflow:     {self.tracking_uri} (parent run {self.parent_run_id}); "
                         "open it with `gradgym ui`")
        for row in self.rows:
            if row["status"] == "FAILED":
                lines.append(f"  trial {row['trial']} FAILED: {row.get('error', '')[:200]}")
        if self.interrupted:
            lines.append(f"  unfinished trials: finish them with `gradgym sweep --resume {self.name}`")
        return "\n".join(lines)


# ---------------------------------------------------------------------- entry points

def start_sweep(path: str | Path, overrides: Sequence[str] = (), *, storage: str | None = None) -> SweepOutcome:
    """Validate the sweep file (every trial), then run it on Ray Tune.

    Raises:
        ConfigError: an invalid sweep file or override, before Ray starts.
        SweepFailed: the tracking store is unreachable at the start, or Ray fails.
    """
    cfg = load_sweep_config(path, overrides)
    storage_dir = Path(storage or cfg.storage).resolve()
    sweep_dir = _new_sweep_dir(storage_dir, cfg.name)
    cfg = _with_name(cfg, sweep_dir.name)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_FILE).write_text(OmegaConf.to_yaml(cfg))
    from ray import tune  # noqa: F401 - imported here, not beside MLflow's import in the thread

    with ThreadPoolExecutor(1, thread_name_prefix="gradgym-parent-run") as pool:
        # Importing MLflow and opening the store take seconds: they overlap Ray's start.
        parent = pool.submit(_create_parent_run, cfg, sweep_dir)
        return _run(cfg, sweep_dir, parent, restore=False)


def resume_sweep(name: str, *, storage: str = "sweeps") -> SweepOutcome:
    """Finish sweep ``name`` (a name under ``storage`` or the sweep's folder): only the
    trials that had not finished run again."""
    sweep_dir = Path(name) if Path(name, SWEEP_FILE).is_file() else Path(storage) / name
    sweep_dir = sweep_dir.resolve()
    if not (sweep_dir / SWEEP_FILE).is_file() or not (sweep_dir / TUNE_DIR).is_dir():
        known = sorted(p.name for p in Path(storage).glob("*") if (p / SWEEP_FILE).is_file())
        raise ConfigError(
            f"no sweep to resume at {str(sweep_dir)!r}; sweeps in {storage!r}: "
            f"{', '.join(known) or 'none'}"
        )
    cfg = load_sweep_config(sweep_dir / SWEEP_FILE)
    parent = read_json(sweep_dir / PARENT_FILE)  # {} when the sweep logs nothing to MLflow
    if parent:
        _retry_store(lambda: tracking_client(parent["uri"]).update_run(parent["run_id"], status="RUNNING"),
                     _outage_limit(cfg))
    return _run(cfg, sweep_dir, parent, restore=True)


def _new_sweep_dir(storage: Path, name: str) -> Path:
    """``storage/name``, or ``name-2``, ``name-3``... if that sweep exists already."""
    candidate, number = storage / name, 1
    while candidate.exists():
        number += 1
        candidate = storage / f"{name}-{number}"
    return candidate


def _with_name(cfg: DictConfig, name: str) -> DictConfig:
    cfg = OmegaConf.merge(cfg, {"name": name})
    OmegaConf.set_readonly(cfg, True)
    return cfg


# ---------------------------------------------------------------------- tracking (driver)

def _base_layer(cfg: DictConfig) -> dict[str, Any]:
    return flatten(OmegaConf.to_container(cfg.overrides, resolve=True))


def _tracking_settings(cfg: DictConfig) -> DictConfig:
    """The tracking config every trial gets (composed from the sweep's overrides)."""
    from gradgym.platform.config import compose_run_config

    return compose_run_config(_base_layer(cfg)).tracking


def _outage_limit(cfg: DictConfig) -> float:
    return float(_tracking_settings(cfg).outage_limit_s)


def _create_parent_run(cfg: DictConfig, sweep_dir: Path) -> dict[str, Any]:
    tracking = _tracking_settings(cfg)
    if not tracking.enabled:
        return {}
    uri = resolve_tracking_uri(tracking.uri)
    configure_http(tracking.request_timeout_s)
    experiment = cfg.experiment or cfg.name
    client = tracking_client(uri)

    def create() -> dict[str, Any]:
        experiment_id = ensure_experiment(client, experiment)
        run = client.create_run(experiment_id, run_name=cfg.name,
                                tags={"sweep": cfg.name, "gradgym.kind": "sweep"})
        return {"run_id": run.info.run_id, "experiment_id": experiment_id, "uri": uri,
                "experiment": experiment}

    try:
        # Fail before Ray starts if the store cannot be reached at all.
        parent = _retry_store(create, min(30.0, tracking.outage_limit_s))
    except Exception as err:
        raise SweepFailed(f"cannot reach the MLflow tracking store {uri}: {err}") from err
    from mlflow.entities import Param

    params = {k: str(v)[:6000] for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(parent["run_id"], params=items[i:i + 100])
    client.log_artifact(parent["run_id"], str(sweep_dir / SWEEP_FILE))
    write_json(sweep_dir / PARENT_FILE, parent)
    return parent


def _retry_store(action: Any, limit_s: float) -> Any:
    """Run ``action`` until it succeeds, retrying transient store errors for ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return action()
        except Exception as err:
            if not is_transient(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


# ---------------------------------------------------------------------- Ray Tune

def _run(cfg: DictConfig, sweep_dir: Path, parent: Mapping[str, Any] | Future, restore: bool) -> SweepOutcome:
    """Run the sweep's trials on Ray Tune; ``parent`` is the MLflow parent run, or the
    future of its creation (which fails the sweep, before any trial, if the store is away)."""
    from ray import tune

    started_ray = _init_ray(cfg)
    try:
        if isinstance(parent, Future):
            parent = parent.result()
        constants = {
            "name": cfg.name,
            "sweep_dir": str(sweep_dir),
            "base": _base_layer(cfg),
            "tracking_uri": parent.get("uri"),
            "experiment": parent.get("experiment"),
            "parent_run_id": parent.get("run_id"),
            "report_every_s": float(cfg.tune_report_every_s),
        }
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep=constants),
            {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
        )
        if restore:
            tuner = tune.Tuner.restore(str(sweep_dir / TUNE_DIR), trainable=trainable,
                                       resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(cfg),
                tune_config=tune.TuneConfig(
                    num_samples=cfg.num_samples,
                    scheduler=_scheduler(cfg),
                    max_concurrent_trials=cfg.max_concurrent or None,
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=str(sweep_dir),
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                ),
            )
        began = time.perf_counter()
        results = tuner.fit()
        fit_wall_s = time.perf_counter() - began
        outcome = _finish(cfg, sweep_dir, parent, results)
        outcome.fit_wall_s = fit_wall_s
        return outcome
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _trial_name(trial: Any) -> str:
    """The progress table's name of a trial: its grid values and number, e.g. ``Pendulum-jax-0_00003``."""
    values = "-".join(str(v) for v in trial.config.get(GRID_PARAM, {}).values())
    number = trial.trial_id.rsplit("_", 1)[-1]
    return f"{values}_{number}" if values else trial.trial_id


def _init_ray(cfg: DictConfig) -> bool:
    """Connect to ``$RAY_ADDRESS`` or start a local Ray on 127.0.0.1; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", TRIAL_XLA_FLAGS)}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env_vars})  # that cluster, unchanged
        return True
    _local_only_ray()
    # address="local": a new instance, even if `ray start` left a cluster on this machine.
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env={"env_vars": env_vars})
    return True


def _local_only_ray() -> None:
    """Ray's local-only mode: every Ray process binds to loopback, none to 0.0.0.0.

    Ray reads the variable when it is imported; children (GCS, raylet, workers) read it from
    the environment. If this process imported Ray before, its constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


GRID_PARAM = "grid"  # the Tune parameter that holds a trial's grid values


def _param_space(cfg: DictConfig) -> dict[str, Any]:
    """Tune's search space: the grid as one axis of its points, in the sweep file's order
    (nested loops: the last key varies fastest; Tune would sort separate axes by name), and
    the random-search distributions."""
    from ray import tune

    space: dict[str, Any] = {}
    if cfg.grid:
        space[GRID_PARAM] = tune.grid_search(trial_layers(cfg))
    draw = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    for key, (kind, args) in search_space(cfg).items():
        space[key] = tune.choice(args) if kind == "choice" else draw[kind](*args)
    return space


def _scheduler(cfg: DictConfig) -> Any:
    if cfg.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    from gradgym.platform.config import compose_run_config

    iters = compose_run_config(_base_layer(cfg)).pipeline.iters
    # max_t past the last iteration: ASHA stops a trial *at* max_t, which would cut a
    # trial that is finishing anyway.
    return ASHAScheduler(time_attr="iteration", metric=cfg.asha.metric, mode=cfg.asha.mode,
                         max_t=max(iters, cfg.asha.grace_period) + 1,
                         grace_period=cfg.asha.grace_period,
                         reduction_factor=cfg.asha.reduction_factor)


# ---------------------------------------------------------------------- one trial

def run_trial(config: dict[str, Any], sweep: Mapping[str, Any]) -> None:
    """The Tune trainable: compose the trial's run config and execute it.

    ``config`` holds this trial's grid/search values (run-config keys); ``sweep`` the
    sweep-wide settings. A trial folder that already holds a finished run (the driver died
    after the trial finished, before Tune recorded it) is reported, not run again.
    """
    from ray import tune

    from gradgym.platform.config import compose_run_config
    from gradgym.platform.runner import execute_run

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(sweep["sweep_dir"]) / TRIALS_DIR / trial_id
    placement = {"run_dir": str(run_dir), "progress": False}
    if sweep["tracking_uri"]:
        placement.update({"tracking.uri": sweep["tracking_uri"], "tracking.experiment": sweep["experiment"]})
    drawn = {key: value for key, value in config.items() if key != GRID_PARAM}
    cfg = compose_run_config(sweep["base"], config.get(GRID_PARAM, {}), drawn, placement)

    summary = _finished_summary(run_dir)
    if summary is None:
        reporter = _TuneReporter(sweep["report_every_s"])
        summary = execute_run(cfg, resume=True, parent_run_id=sweep["parent_run_id"],
                              sweep=sweep["name"], run_name=trial_id, on_iteration=reporter)
    # The last value of every metric (schedulers expect theirs in every result) and the summary.
    last: dict[str, Any] = {}
    for entry in _read_jsonl(run_dir / METRICS_FILE):
        last.update(entry)
    last.pop("timestamp_ms", None)
    final = {k: v for k, v in {**last, **summary}.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**final, "iteration": summary["iterations"], "finished": 1})


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    summary = read_json(run_dir / "summary.json")
    return summary if summary.get("status") == "FINISHED" else None


class _TuneReporter:
    """Reports iterations to Tune at most every ``every_s`` (a report costs milliseconds)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last = -float("inf")

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        from ray import tune

        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            tune.report({**metrics, "iteration": step + 1})


# ---------------------------------------------------------------------- the end

def _finish(cfg: DictConfig, sweep_dir: Path, parent: Mapping[str, Any], results: Any) -> SweepOutcome:
    from gradgym.platform.reports import backend_comparison, summary_table

    rows, curves = _collect(cfg, sweep_dir, results)
    summary_table(rows, sweep_dir / "summary.csv")
    backend_comparison(curves, sweep_dir / "comparison.png", title=f"sweep {cfg.name}")
    outcome = SweepOutcome(cfg.name, sweep_dir, rows, parent.get("run_id"), parent.get("uri"))
    if parent:
        # Deliver what trials could not before their process ended (killed, stopped while
        # closing, out of retries): unsent iterations, artifacts, the end of their run.
        tracking = _trial_tracking(cfg, parent)
        for row in rows:
            settle_run(sweep_dir / TRIALS_DIR / row["trial"], tracking, status=row["status"],
                       error=row.get("error"), parent_run_id=parent["run_id"], sweep=cfg.name,
                       run_name=row["trial"])
        _close_parent(parent, sweep_dir, rows, tracking.outage_limit_s, interrupted=outcome.interrupted)
    return outcome


def _trial_tracking(cfg: DictConfig, parent: Mapping[str, Any]) -> DictConfig:
    from gradgym.platform.config import compose_run_config

    placement = {"tracking.uri": parent["uri"], "tracking.experiment": parent["experiment"]}
    return compose_run_config(_base_layer(cfg), placement).tracking


def _collect(cfg: DictConfig, sweep_dir: Path, results: Any) -> tuple[list[dict], list[dict]]:
    """One summary row per trial and the iteration histories of the finished ones."""
    swept = [k for k in list(grid_axes(cfg)) + list(search_space(cfg)) if k not in _NOT_IN_LABEL]
    rows, curves = [], []
    for result in results:
        trial = Path(result.path).name
        run_dir = sweep_dir / TRIALS_DIR / trial
        summary = read_json(run_dir / "summary.json")
        state = read_json(run_dir / STATE_FILE)
        trial_values = {**result.config.get(GRID_PARAM, {}), **result.config}
        values = {key: trial_values.get(key) for key in swept}
        status = summary.get("status", "UNFINISHED")  # never ran, or interrupted
        if result.error is not None:
            status = "FAILED"
        row = {"trial": trial, **summary, "status": status, **values,
               "mlflow_run_id": state.get("run_id", summary.get("mlflow_run_id", "")),
               "trial_time_s": result.metrics.get("time_total_s")}  # all of it, per Tune
        if result.error is not None:
            row["error"] = f"{type(result.error).__name__}: {result.error}"[:2000]
        rows.append(row)
        history = _read_jsonl(run_dir / METRICS_FILE)
        if status in ("FINISHED", "STOPPED") and history and "env" in summary:
            label = " ".join([summary["backend"]] + [f"{k}={v}" for k, v in values.items()])
            curves.append({"env": summary["env"], "backend": summary["backend"], "label": label,
                           "history": history})
    rows.sort(key=lambda row: row["trial"])
    return rows, curves


def _close_parent(parent: Mapping[str, Any], sweep_dir: Path, rows: list[dict], limit_s: float,
                  interrupted: bool) -> None:
    """Log the sweep's artifacts and end the parent run (KILLED if trials are left to resume)."""
    client = tracking_client(parent["uri"])

    def close() -> None:
        for name in ("summary.csv", "comparison.png"):
            client.log_artifact(parent["run_id"], str(sweep_dir / name))
        failed = sum(row["status"] == "FAILED" for row in rows)
        client.set_tag(parent["run_id"], "trials", str(len(rows)))
        client.set_tag(parent["run_id"], "trials_failed", str(failed))
        client.set_terminated(parent["run_id"], status="KILLED" if interrupted else "FINISHED")

    _retry_store(close, limit_s)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.is_file() else []
