"""Sweeps on Ray Tune: every trial is one run (env, backend, seed, hyperparameters).

A sweep lives in ``<storage>/<name>/``::

    sweep.yaml       the resolved sweep config (what --resume runs again)
    parent.json      the MLflow parent run of the sweep
    tune/            Ray Tune's experiment state (Tuner.restore resumes from it)
    trials/<id>/     one run folder per trial (see gradgym.platform.records)
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

from gradgym.platform import mlflow_tracking
from gradgym.platform.config import (
    ConfigError,
    compose_run_config,
    flatten,
    grid_axes,
    load_sweep_config,
    search_space,
    sweep_base_layer,
    trial_layers,
)
from gradgym.platform.records import RunRecord, read_json, write_json
from gradgym.platform.runner import settle_run
from gradgym.platform.tracking import TrackingError

SWEEP_FILE = "sweep.yaml"
PARENT_FILE = "parent.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# Keys every trial's run name starts with; the plot's columns, lines and spread.
_NAMED_FIRST = ("env", "backend", "seed")
# Local Ray: Tune passes only small results around, a big object store is wasted memory.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# The prefix of the environment variables a sweep passes on to its trials.
GRADGYM_VARIABLES = "GRADGYM_"
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
        try:
            mlflow_tracking.reopen_run(parent, _trial_tracking(cfg).outage_limit_s)
        except TrackingError as err:
            raise SweepFailed(f"cannot reopen the sweep's MLflow run: {err}") from err
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

def _trial_tracking(cfg: DictConfig, parent: Mapping[str, Any] | None = None) -> DictConfig:
    """The tracking config every trial gets (the sweep's overrides, and the parent's store)."""
    placement = {"tracking.uri": parent["uri"], "tracking.experiment": parent["experiment"]} if parent else {}
    return compose_run_config(sweep_base_layer(cfg), placement).tracking


def _create_parent_run(cfg: DictConfig, sweep_dir: Path) -> dict[str, Any]:
    tracking = _trial_tracking(cfg)
    if not tracking.enabled:
        return {}
    uri = mlflow_tracking.resolve_tracking_uri(tracking.uri)
    mlflow_tracking.configure_http(tracking.request_timeout_s)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    try:
        # Fail before any trial if the store cannot be reached at all.
        parent = mlflow_tracking.create_parent_run(
            uri, cfg.experiment or cfg.name, cfg.name, params, [sweep_dir / SWEEP_FILE],
            limit_s=min(30.0, tracking.outage_limit_s))
    except TrackingError as err:
        raise SweepFailed(f"cannot reach the MLflow tracking store {uri}: {err}") from err
    write_json(sweep_dir / PARENT_FILE, parent)
    return parent


# ---------------------------------------------------------------------- Ray Tune

def _run(cfg: DictConfig, sweep_dir: Path, parent: Mapping[str, Any] | Future, restore: bool) -> SweepOutcome:
    """Run the sweep's trials on Ray Tune; ``parent`` is the MLflow parent run, or the
    future of its creation (which fails the sweep, before any trial, if the store is away)."""
    from ray import tune

    started_ray = _init_ray(cfg)
    try:
        if isinstance(parent, Future):
            parent = parent.result()
        context = SweepContext(
            name=cfg.name,
            sweep_dir=str(sweep_dir),
            base=sweep_base_layer(cfg),
            named_keys=_swept_keys(cfg),
            tracking_uri=parent.get("uri"),
            experiment=parent.get("experiment"),
            parent_run_id=parent.get("run_id"),
            report_every_s=float(cfg.tune_report_every_s),
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep=context),
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


def _swept_keys(cfg: DictConfig) -> list[str]:
    """The run-config keys that vary between trials (grid and search), env/backend/seed first."""
    keys = list(grid_axes(cfg)) + list(search_space(cfg))
    return [k for k in _NAMED_FIRST if k in keys] + [k for k in keys if k not in _NAMED_FIRST]


def trial_run_name(cfg: DictConfig, swept: Sequence[str]) -> str:
    """A trial's readable run name: env, backend, seed and every other swept value, e.g.
    ``Pendulum jax s1 lr=0.03`` (a dotted key by its last part)."""
    parts = [str(cfg.env), str(cfg.backend), f"s{cfg.seed}"]
    for key in swept:
        if key not in _NAMED_FIRST:
            value = OmegaConf.select(cfg, key)
            parts.append(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float)
                         else f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts)


def _init_ray(cfg: DictConfig) -> bool:
    """Connect to ``$RAY_ADDRESS`` or start a local Ray on 127.0.0.1; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    # gradgym's own settings (GRADGYM_*, e.g. GRADGYM_FAULTS) reach every worker, also
    # workers a cluster starts from another environment.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(GRADGYM_VARIABLES)}
    env_vars["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", TRIAL_XLA_FLAGS)
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

    iters = compose_run_config(sweep_base_layer(cfg)).pipeline.iters
    # max_t past the last iteration: ASHA stops a trial *at* max_t, which would cut a
    # trial that is finishing anyway.
    return ASHAScheduler(time_attr="iteration", metric=cfg.asha.metric, mode=cfg.asha.mode,
                         max_t=max(iters, cfg.asha.grace_period) + 1,
                         grace_period=cfg.asha.grace_period,
                         reduction_factor=cfg.asha.reduction_factor)


# ---------------------------------------------------------------------- one trial

@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep is told by the driver."""

    name: str
    sweep_dir: str
    base: dict[str, Any]  # the sweep's overrides: run-config keys of every trial
    named_keys: list[str]  # the swept keys, for readable run names
    tracking_uri: str | None  # None: the sweep logs nothing to MLflow
    experiment: str | None
    parent_run_id: str | None
    report_every_s: float


def run_trial(config: dict[str, Any], sweep: SweepContext) -> None:
    """The Tune trainable: compose the trial's run config and execute it.

    ``config`` holds this trial's grid/search values (run-config keys). A trial folder that
    already holds a finished run (the driver died after the trial finished, before Tune
    recorded it) is reported, not run again.
    """
    from ray import tune

    from gradgym.platform.runner import execute_run

    trial_id = tune.get_context().get_trial_id()
    record = RunRecord(Path(sweep.sweep_dir) / TRIALS_DIR / trial_id)
    placement: dict[str, Any] = {"run_dir": str(record.folder), "progress": False}
    if sweep.tracking_uri:
        placement.update({"tracking.uri": sweep.tracking_uri, "tracking.experiment": sweep.experiment})
    drawn = {key: value for key, value in config.items() if key != GRID_PARAM}
    cfg = compose_run_config(sweep.base, config.get(GRID_PARAM, {}), drawn, placement)

    summary = record.finished_summary()
    if summary is None:
        reporter = _TuneReporter(sweep.report_every_s)
        summary = execute_run(cfg, resume=True, parent_run_id=sweep.parent_run_id, sweep=sweep.name,
                              run_name=trial_run_name(cfg, sweep.named_keys), on_iteration=reporter)
    # The last value of every metric (schedulers expect theirs in every result) and the summary.
    last: dict[str, Any] = {}
    for entry in record.read_metrics():
        last.update(entry)
    last.pop("timestamp_ms", None)
    final = {k: v for k, v in {**last, **summary}.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**final, "iteration": summary["iterations"], "finished": 1})


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
    from gradgym.platform.reports import backend_comparison, method_comparison, summary_table

    rows, curves = _collect(cfg, sweep_dir, results)
    summary_table(rows, sweep_dir / "summary.csv")
    backend_comparison(curves, sweep_dir / "comparison.png", title=f"sweep {cfg.name}")
    plots = [sweep_dir / "summary.csv", sweep_dir / "comparison.png"]
    if len({row.get("pipeline") for row in rows if row.get("pipeline")}) > 1:
        plots.append(method_comparison(curves, sweep_dir / "methods.png", title=f"sweep {cfg.name}"))
    outcome = SweepOutcome(cfg.name, sweep_dir, rows, parent.get("run_id"), parent.get("uri"))
    if parent:
        # Deliver what trials could not before their process ended (killed, stopped while
        # closing, out of retries): unsent iterations, artifacts, the end of their run.
        tracking = _trial_tracking(cfg, parent)
        swept = _swept_keys(cfg)
        for row in rows:
            record = RunRecord(sweep_dir / TRIALS_DIR / row["trial"])
            name = trial_run_name(record.read_config(), swept) if record.started() else row["trial"]
            settle_run(record.folder, tracking, status=row["status"], error=row.get("error"),
                       parent_run_id=parent["run_id"], sweep=cfg.name, run_name=name)
        failed = sum(row["status"] == "FAILED" for row in rows)
        mlflow_tracking.close_parent_run(
            parent, plots,
            {"trials": str(len(rows)), "trials_failed": str(failed)},
            "UNFINISHED" if outcome.interrupted else "FINISHED", tracking.outage_limit_s)
    return outcome


def _collect(cfg: DictConfig, sweep_dir: Path, results: Any) -> tuple[list[dict], list[dict]]:
    """One summary row per trial and the iteration histories of the finished ones."""
    swept = [k for k in _swept_keys(cfg) if k not in _NAMED_FIRST]
    rows, curves = [], []
    for result in results:
        trial = Path(result.path).name
        record = RunRecord(sweep_dir / TRIALS_DIR / trial)
        summary = record.read_summary()
        tracking_state = record.read_tracking_state()
        trial_values = {**result.config.get(GRID_PARAM, {}), **result.config}
        values = {key: trial_values.get(key) for key in swept}
        status = summary.get("status", "UNFINISHED")  # never ran, or interrupted
        if result.error is not None:
            status = "FAILED"
        row = {"trial": trial, **summary, "status": status, **values,
               "mlflow_run_id": tracking_state.get("run_id", summary.get("mlflow_run_id", "")),
               "trial_time_s": result.metrics.get("time_total_s")}  # all of it, per Tune
        if result.error is not None:
            row["error"] = f"{type(result.error).__name__}: {result.error}"[:2000]
        rows.append(row)
        history = record.read_metrics()
        if status in ("FINISHED", "STOPPED") and history and "env" in summary:
            label = " ".join([summary["backend"]] + [f"{k}={v}" for k, v in values.items()])
            curves.append({"env": summary["env"], "backend": summary["backend"], "label": label,
                           "history": history})
    rows.sort(key=lambda row: row["trial"])
    return rows, curves
