"""Sweeps on Ray Tune: every trial is one run (env, backend, seed, hyperparameters).

A sweep lives in ``<storage>/<name>/``::

    sweep.yaml       the resolved sweep config (what --resume runs again)
    parent.json      the MLflow parent run of the sweep
    tune/            Ray Tune's experiment state (Tuner.restore resumes from it)
    trials/<id>/     one run folder per config (see gradgym.platform.records)
    summary.csv      one row per config
    comparison.png   backends compared: return vs iteration, time per iteration

Packs: configs that differ only in seed and in per-member hyperparameters (the pipeline's
packable fields) share one Tune trial and run as one vectorized computation
(:func:`gradgym.platform.runner.execute_pack`); each keeps its own run folder, MLflow run and
summary row, and computes what it would alone. The sweep file's ``pack`` caps the configs
per trial (1: no packing); packs are split further when there are fewer of them than trial
slots, so that no CPU idles.

Ray: with ``RAY_ADDRESS`` set the sweep runs on that cluster unchanged; otherwise on a local
Ray bound to 127.0.0.1 whose processes all end with the driver, however it ends, and whose
core's death ends the sweep at once (:mod:`gradgym.platform.local_ray`). Trials are idempotent: a config whose folder already holds a
finished run is not run again, and a retried or resumed trial continues its configs' MLflow
runs without logging any iteration twice. A trial that crashes is retried as a whole (its
unfinished configs), up to ``max_failures`` times.
"""

from __future__ import annotations

import grp
import logging
import math
import os
import pwd
import shutil
import stat
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from ray.tune import Callback

from gradgym.platform import mlflow_tracking
from gradgym.platform.allocator import allocator_library, with_allocator
from gradgym.platform.asha import RecordingASHA, stopped_trial_ids
from gradgym.platform.config import (
    ConfigError,
    compose_run_config,
    flatten,
    grid_axes,
    load_sweep_config,
    pack_limit,
    search_space,
    sweep_base_layer,
    sweep_points,
    trial_layers,
    trial_run_configs,
)
from gradgym.platform.local_ray import LocalRay
from gradgym.platform.records import RunRecord, read_json, write_json
from gradgym.platform.runner import (
    can_run_packs,
    pack_group,
    planned_iterations,
    settle_dead_run,
    settle_run,
)
from gradgym.platform.tracking import TrackingError

SWEEP_FILE = "sweep.yaml"
PARENT_FILE = "parent.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# Tune trial ids the scheduler (ASHA) stopped, one per line: Tune may end such a trial's
# process before it writes its own summary, which would otherwise read as unfinished.
STOPPED_EARLY_FILE = "stopped_early.txt"
# Keys every trial's run name starts with; the plot's columns, lines and spread.
_NAMED_FIRST = ("env", "backend", "seed")
# Local Ray: Tune passes only small results around, a big object store is wasted memory.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# The prefix of the environment variables a sweep passes on to its trials.
GRADGYM_VARIABLES = "GRADGYM_"
# Jax (XLA) in a trial: one thread per trial, like torch_threads.
# How long a sweep on a Ray cluster waits for a node that fits one trial (autoscaling).
CLUSTER_RESOURCE_WAIT_S = 300.0
SETTLE_WAIT_S = 15.0  # how long trials Ray stopped may still hold their folders, in all
TRIAL_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class SweepFailed(RuntimeError):
    """The sweep could not start or finish (not: some trials failed)."""


class SweepNotStarted(SweepFailed):
    """The sweep failed before any trial ran (its new folder is removed)."""


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    name: str
    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per config
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
            f"sweep {self.name!r}: {len(self.rows)} configs ("
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
                lines.append(f"  config {row['trial']} FAILED: {row.get('error', '')[:200]}")
        if self.interrupted:
            lines.append(f"  unfinished configs: finish them with `gradgym sweep --resume {self.name}`")
        return "\n".join(lines)


# ---------------------------------------------------------------------- entry points

def start_sweep(path: str | Path, overrides: Sequence[str] = (), *, storage: str | None = None) -> SweepOutcome:
    """Validate the sweep file (every trial), then run it on Ray Tune.

    Raises:
        ConfigError: an invalid sweep file or override, before Ray starts.
        SweepFailed: the tracking store is unreachable at the start, or Ray fails.
    """
    cfg = load_sweep_config(path, overrides)
    allocator_library()  # an invalid GRADGYM_MALLOC fails here, before anything starts
    storage_dir = Path(storage or cfg.storage).resolve()
    sweep_dir = _new_sweep_dir(storage_dir, cfg.name)
    cfg = _with_name(cfg, sweep_dir.name)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_FILE).write_text(OmegaConf.to_yaml(cfg))
    from ray import tune  # noqa: F401 - imported here, not beside MLflow's import in the thread

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="gradgym-parent-run") as pool:
            # Importing MLflow and opening the store take seconds: they overlap Ray's start.
            parent = pool.submit(_create_parent_run, cfg, sweep_dir)
            return _run(cfg, sweep_dir, parent, restore=False)
    except (SweepNotStarted, ConfigError):
        # Nothing ran: leave no folder, so that the next start is not NAME-2 and --resume
        # does not offer a sweep it cannot resume.
        shutil.rmtree(sweep_dir, ignore_errors=True)
        raise


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
    check_tune_state_trusted(sweep_dir / TUNE_DIR)  # before Tuner.restore unpickles it
    cfg = load_sweep_config(sweep_dir / SWEEP_FILE)
    allocator_library()
    parent = read_json(sweep_dir / PARENT_FILE)  # {} when the sweep logs nothing to MLflow
    previous = _reopen_parent(cfg, parent) if parent else None
    try:
        return _run(cfg, sweep_dir, parent, restore=True)
    except BaseException:
        if previous and previous != "RUNNING":
            _end_parent(cfg, parent, previous)  # a failed resume leaves the parent as it was
        raise


def _reopen_parent(cfg: DictConfig, parent: Mapping[str, Any]) -> str:
    """Mark the parent run RUNNING again; returns its status before. Waits for the store
    at most ``tracking.outage_limit_s``.

    Raises:
        SweepFailed: the store is unreachable or refused.
    """
    tracking = _trial_tracking(cfg)
    mlflow_tracking.configure_http(tracking.request_timeout_s)  # no minutes-long HTTP retries
    limit = tracking.outage_limit_s
    try:
        client = mlflow_tracking.tracking_client(parent["uri"])
        previous = mlflow_tracking.with_retries(lambda: client.get_run(parent["run_id"]).info.status, limit)
        mlflow_tracking.reopen_run(parent, limit)
    except Exception as err:
        raise SweepFailed(
            f"cannot reopen the sweep's MLflow parent run {parent.get('run_id')} at "
            f"{parent.get('uri')} (waited up to tracking.outage_limit_s={limit:g} s): {err}; "
            "start the tracking server and resume again"
        ) from err
    return previous


def _end_parent(cfg: DictConfig, parent: Mapping[str, Any], mlflow_status: str) -> None:
    """End the parent run with an MLflow status, best effort (the sweep is failing already)."""
    tracking = _trial_tracking(cfg)
    try:
        client = mlflow_tracking.tracking_client(parent["uri"])
        mlflow_tracking.with_retries(
            lambda: client.set_terminated(parent["run_id"], status=mlflow_status),
            min(30.0, tracking.outage_limit_s))
    except Exception as err:  # noqa: BLE001 - reported, the sweep's own error goes on
        logging.getLogger(__name__).warning("could not end the sweep's MLflow run: %s", err)


def check_tune_state_trusted(tune_dir: Path) -> None:
    """Refuse Ray Tune state that someone else could have written.

    ``Tuner.restore`` unpickles ``tuner.pkl`` (and trial state) from ``tune_dir``: a file
    crafted by another user runs code as this one. Every file and folder beneath must be
    owned by this user, not a symbolic link, and writable by nobody else (group-writable
    only through the user's own private group).

    Raises:
        SweepFailed: naming the first file that fails and why.
    """
    uid = os.getuid()
    own_group = _private_group()
    for path in [tune_dir, *sorted(tune_dir.rglob("*"))]:
        info = path.lstat()
        problem = None
        if stat.S_ISLNK(info.st_mode):
            problem = "is a symbolic link"
        elif info.st_uid != uid:
            problem = f"is owned by uid {info.st_uid}, not by you (uid {uid})"
        elif info.st_mode & stat.S_IWOTH:
            problem = "is writable by every user"
        elif info.st_mode & stat.S_IWGRP and info.st_gid != own_group:
            problem = f"is writable by group {info.st_gid}"
        if problem:
            raise SweepFailed(
                f"refusing to resume: {str(path)!r} {problem}; Ray Tune's state is unpickled on "
                "resume, so it must be written by you alone (see README: trust boundary)"
            )


def _private_group() -> int | None:
    """The user's own group (user-private-group scheme: named as the user), else ``None``."""
    try:
        user = pwd.getpwuid(os.getuid())
        return user.pw_gid if grp.getgrgid(user.pw_gid).gr_name == user.pw_name else None
    except KeyError:
        return None


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
    # with the first trial's values: overrides may hold keys of the pipeline the grid picks
    return compose_run_config(sweep_base_layer(cfg), trial_layers(cfg)[0], placement).tracking


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
        raise SweepNotStarted(f"cannot reach the MLflow tracking store {uri}: {err}") from err
    write_json(sweep_dir / PARENT_FILE, parent)
    return parent


# ---------------------------------------------------------------------- Ray Tune

def _run(cfg: DictConfig, sweep_dir: Path, parent: Mapping[str, Any] | Future, restore: bool) -> SweepOutcome:
    """Run the sweep's packs on Ray Tune; ``parent`` is the MLflow parent run, or the
    future of its creation (which fails the sweep, before any trial, if the store is away)."""
    from ray import tune

    _quiet_tune()
    with _ray(cfg) as local_ray:
        if isinstance(parent, Future):
            parent = parent.result()
        if local_ray is not None:
            local_ray.on_core_death(lambda what: _ray_died(cfg, sweep_dir, parent, local_ray, what))
        try:
            # A cluster's autoscaler may add the node a trial needs; a local Ray has what it has.
            check_resources(cfg, wait_s=CLUSTER_RESOURCE_WAIT_S if os.environ.get("RAY_ADDRESS") else 0.0)
        except SweepNotStarted:
            if parent:
                _end_parent(cfg, parent, "FAILED")
            raise
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
            packs = make_packs(cfg, _trial_slots(cfg))
            tuner = tune.Tuner(
                trainable,
                param_space={PACK_PARAM: tune.grid_search(packs)},
                tune_config=tune.TuneConfig(
                    scheduler=_scheduler(cfg, sweep_dir),
                    max_concurrent_trials=cfg.max_concurrent or None,
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=str(sweep_dir),
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                    verbose=0,  # the progress bar below replaces Tune's tables
                    callbacks=[SweepProgress(cfg.name, packs)],
                ),
            )
        began = time.perf_counter()
        results = tuner.fit()
        fit_wall_s = time.perf_counter() - began
        outcome = _finish(cfg, sweep_dir, parent, results)
        outcome.fit_wall_s = fit_wall_s
        return outcome


def _quiet_tune() -> None:
    """Leave the terminal to the sweep's progress bar: no Tune tables or INFO lines."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old engine prints nothing at verbose=0
    for name in ("ray", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _trial_name(trial: Any) -> str:
    """The name of a pack's trial: what its configs share and how many, e.g.
    ``Pendulum-jax-x16_00003``."""
    members = trial.config.get(PACK_PARAM, [])
    values = members[0]["values"] if members else {}
    shared = "-".join(str(values[k]) for k in ("env", "backend") if k in values)
    number = trial.trial_id.rsplit("_", 1)[-1]
    return f"{shared}-x{len(members)}_{number}" if shared else f"x{len(members)}_{number}"


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


@contextmanager
def _ray(cfg: DictConfig) -> Iterator[LocalRay | None]:
    """Ray for the sweep, for the ``with`` block: ``$RAY_ADDRESS``'s cluster, or a local Ray on
    127.0.0.1 (yielded) whose processes all end with this one, however it ends. What is
    started or connected here is stopped or disconnected at the end."""
    import ray

    if ray.is_initialized():
        yield None
        return
    # gradgym's own settings (GRADGYM_*, e.g. GRADGYM_FAULTS) reach every worker, also
    # workers a cluster starts from another environment.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(GRADGYM_VARIABLES)}
    env_vars["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", TRIAL_XLA_FLAGS)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env_vars})  # that cluster, unchanged
        try:
            yield None
        finally:
            ray.shutdown()
        return
    _local_only_ray()
    # The local trials' workers start on gradgym's allocator (platform/allocator.py); a
    # cluster's nodes start theirs (the image's entrypoints).
    if preload := with_allocator(os.environ).get("LD_PRELOAD"):
        env_vars["LD_PRELOAD"] = preload
    local = LocalRay()
    try:
        # A new instance (LocalRay: address="local"), even if `ray start` left a cluster on
        # this machine. Trials' own output stays in Ray's logs (log_to_driver=False): the
        # terminal shows the sweep's progress bar; a failed config's error is in its summary
        # and the final report.
        local.start(num_cpus=cfg.num_cpus, include_dashboard=False,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env={"env_vars": env_vars},
                    logging_level=logging.WARNING, log_to_driver=False)
        yield local
    finally:
        local.shutdown()


def _ray_died(cfg: DictConfig, sweep_dir: Path, parent: Mapping[str, Any], local_ray: LocalRay,
              what: str) -> NoReturn:
    """Ray's core died under the sweep (in the thread that noticed): stop what is left of that
    Ray, end the trials' runs KILLED and the parent run FAILED, and exit. The driver cannot go
    on without its GCS or raylet; Ray itself would abort it after a 60 s timeout, leaving
    every run RUNNING."""
    print(f"\ngradgym sweep: Ray's core process died: {what}; the sweep stops (its MLflow "
          f"parent run ends FAILED); finish it with `gradgym sweep --resume {cfg.name}`",
          file=sys.stderr, flush=True)
    local_ray.stop_processes()
    # A stopped trial's lock goes with its process; on a busy machine that can lag the stop.
    _wait_for_trials_to_let_go(sweep_dir)
    for folder in sorted((sweep_dir / TRIALS_DIR).glob("*")):
        try:
            if not settle_dead_run(folder) and RunRecord(folder).is_live():
                logging.getLogger(__name__).warning(
                    "trial %s is still held by a live process; `gradgym runs --settle` ends it",
                    folder.name)
        except Exception as err:  # noqa: BLE001 - the next settle or resume ends it
            logging.getLogger(__name__).warning("could not settle trial %s: %s", folder.name, err)
    if parent:
        _end_parent(cfg, parent, "FAILED")
    os._exit(1)


def _local_only_ray() -> None:
    """Ray's local-only mode: every Ray process binds to loopback, none to 0.0.0.0.

    Ray reads the variable when it is imported; children (GCS, raylet, workers) read it from
    the environment. If this process imported Ray before, its constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


PACK_PARAM = "pack"  # the Tune parameter that holds a trial's configs: [{id, values}, ...]


def make_packs(cfg: DictConfig, slots: int = 1) -> list[list[dict[str, Any]]]:
    """The sweep's configs grouped into packs, one Tune trial each.

    Every config (:func:`~gradgym.platform.config.sweep_points`) gets a stable id, its index,
    which names its run folder. Configs that may share a pack (equal
    :func:`~gradgym.platform.runner.pack_group`) are split into packs of at most
    ``pack_limit(cfg)``, evenly, and into more packs while there are fewer than ``slots``
    (the trials that can run at once), so that packing never leaves a CPU idle.
    """
    base, limit = sweep_base_layer(cfg), pack_limit(cfg)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for index, point in enumerate(sweep_points(cfg)):
        run_cfg = compose_run_config(base, point)
        packable = limit > 1 and can_run_packs(run_cfg.pipeline.name)
        key = pack_group(run_cfg) if packable else ("alone", index)
        iters = planned_iterations(run_cfg)  # for the progress bar
        groups.setdefault(key, []).append({"id": f"{index:05d}", "values": point, "iters": iters})
    total = sum(len(members) for members in groups.values())
    packs = []
    for members in groups.values():
        count = max(math.ceil(len(members) / limit), math.ceil(len(members) * slots / total))
        packs.extend(_split_evenly(members, min(count, len(members))))
    return packs


def _split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` consecutive runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def check_resources(cfg: DictConfig, wait_s: float = 0.0) -> None:
    """Fail before any trial when no node of the Ray cluster can hold one trial (Tune would
    leave it PENDING for ever). ``wait_s``: how long to wait for such a node (a cluster's
    autoscaler may be adding one).

    Raises:
        SweepNotStarted: naming what a trial asks for and what the largest node has.
    """
    import ray

    deadline, warned = time.monotonic() + wait_s, False
    while True:
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        if any(node.get("CPU", 0.0) >= cfg.cpus_per_trial and node.get("GPU", 0.0) >= cfg.gpus_per_trial
               for node in nodes):
            return
        if time.monotonic() >= deadline:
            break
        if not warned:
            warned = True
            logging.getLogger(__name__).warning(
                "no Ray node fits a trial yet (cpus_per_trial=%g, gpus_per_trial=%g); waiting up "
                "to %g s for the cluster to add one", cfg.cpus_per_trial, cfg.gpus_per_trial, wait_s)
        time.sleep(5)
    cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    raise SweepNotStarted(
        f"no Ray node can run a trial: each asks for cpus_per_trial={cfg.cpus_per_trial:g}, "
        f"gpus_per_trial={cfg.gpus_per_trial:g}; the largest node has {cpus:g} CPUs and "
        f"{gpus:g} GPUs ({len(nodes)} node(s)); allowed: cpus_per_trial <= {cpus:g}, "
        f"gpus_per_trial <= {gpus:g} (or a bigger cluster / num_cpus)"
    )


def _trial_slots(cfg: DictConfig) -> int:
    """How many trials of the sweep can run at once on the Ray cluster."""
    import ray

    slots = int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_trial) or 1
    return min(slots, cfg.max_concurrent) if cfg.max_concurrent else slots


def _scheduler(cfg: DictConfig, sweep_dir: Path) -> Any:
    if cfg.scheduler != "asha":
        return None
    iters = max(planned_iterations(trial) for trial in trial_run_configs(cfg))
    # max_t past the last iteration: ASHA stops a trial *at* max_t, which would cut a
    # trial that is finishing anyway.
    return RecordingASHA(sweep_dir / STOPPED_EARLY_FILE,
                         time_attr="iteration", metric=cfg.asha.metric, mode=cfg.asha.mode,
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
    """The Tune trainable: run one pack of configs (``config["pack"]``).

    A config whose folder already holds a finished run (finished in an earlier attempt, or
    before the driver died) is not run again. Configs that end in an error fail the trial
    after the others have finished, so that Tune retries them (only them).
    """

    from gradgym.platform.runner import execute_pack

    members = config[PACK_PARAM]
    trials = Path(sweep.sweep_dir) / TRIALS_DIR
    placement: dict[str, Any] = {"progress": False}
    if sweep.tracking_uri:
        placement.update({"tracking.uri": sweep.tracking_uri, "tracking.experiment": sweep.experiment})
    cfgs = [compose_run_config(sweep.base, member["values"],
                               dict(placement, run_dir=str(trials / member["id"])))
            for member in members if RunRecord(trials / member["id"]).finished_summary() is None]
    reporter = _TuneReporter(sweep.report_every_s, configs=len(members),
                             done=len(members) - len(cfgs))
    outcomes = execute_pack(cfgs, resume=True, parent_run_id=sweep.parent_run_id, sweep=sweep.name,
                            run_names=[trial_run_name(cfg, sweep.named_keys) for cfg in cfgs],
                            on_iteration=reporter.iteration) if cfgs else []
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    reporter.finished(len(outcomes) - len(errors), len(errors))
    if len(members) == 1:
        reporter.last_result(RunRecord(trials / members[0]["id"]))
    else:
        reporter.report()
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise PackFailed(f"{len(errors)} of the pack's {len(members)} configs failed: "
                         + "; ".join(f"{type(e).__name__}: {e}"[:300] for e in errors))


class PackFailed(RuntimeError):
    """Some configs of a pack ended in an error (each one's is in its summary)."""


class _TuneReporter:
    """Reports a pack's progress to Tune, at most every ``every_s`` (a report costs ms).

    Every result carries ``iteration`` (the most iterations any config has done), the pack's
    counts (``configs``, ``configs_done``, ``configs_failed``, ``member_iterations``) and
    ``best_return``; a pack of one also carries its config's metrics, which schedulers read.
    """

    def __init__(self, every_s: float, configs: int, done: int):
        self.every_s = every_s
        self.counts = {"configs": configs, "configs_done": done, "configs_failed": 0}
        self.steps: dict[int, int] = {}  # member -> iterations done
        self.best = -math.inf
        self._last = -math.inf

    def iteration(self, index: int, metrics: Mapping[str, float], step: int) -> None:
        self.steps[index] = step + 1
        value = metrics.get("return_mean", -math.inf)
        if math.isfinite(value) and value > self.best:
            self.best = value
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.report(dict(metrics) if self.counts["configs"] == 1 else {})

    def finished(self, done: int, failed: int) -> None:
        """The pack's configs have ended: ``done`` finished, ``failed`` failed."""
        self.counts["configs_done"] += done
        self.counts["configs_failed"] += failed

    def last_result(self, record: RunRecord) -> None:
        """A pack of one: its config's last metrics and summary numbers, as the trial's result."""
        last: dict[str, Any] = {}
        for entry in record.read_metrics():
            last.update(entry)
        summary = record.read_summary()
        numbers = {k: v for k, v in {**last, **summary}.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "timestamp_ms"}
        self.report({**numbers, "iteration": summary.get("iterations", 0), "finished": 1})

    def report(self, extra: Mapping[str, Any] | None = None) -> None:
        """Send the pack's progress now (with ``extra`` values)."""
        from ray import tune

        result = {"iteration": max(self.steps.values(), default=0),
                  "member_iterations": sum(self.steps.values()), **self.counts}
        if math.isfinite(self.best):
            result["best_return"] = self.best
        tune.report({**result, **(extra or {})})


class SweepProgress(Callback):
    """The sweep's one live line on the terminal: configs done/total, running, failed,
    best return so far and the ETA, from the trials' reports (Tune's tables are off)."""

    def __init__(self, name: str, packs: list[list[dict[str, Any]]]):
        self.name = name
        self.configs = {pack[0]["id"]: len(pack) for pack in packs}  # pack -> its size
        self.iterations = sum(_iterations(m) for pack in packs for m in pack) or 1
        self.results: dict[str, dict[str, Any]] = {}  # trial id -> its latest report
        self.ended: dict[str, str] = {}  # trial id -> "done" | "error"
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None}  # Tune pickles its callbacks with the sweep

    def setup(self, **info: Any) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.iterations, desc=f"sweep {self.name}", unit="it",
                         dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                         "{postfix} [{elapsed}<{remaining}]")
        self._draw()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results[trial.trial_id] = result
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "done"
        self._draw()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "error"
        self._draw()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._draw()
        if self._bar is not None:
            self._bar.close()

    def _draw(self) -> None:
        if self._bar is None:
            return
        done = sum(r.get("configs_done", 0) for r in self.results.values())
        failed = sum(r.get("configs_failed", 0) for r in self.results.values())
        running = sum(r.get("configs", 0) - r.get("configs_done", 0) - r.get("configs_failed", 0)
                      for t, r in self.results.items() if t not in self.ended)
        best = max((r["best_return"] for r in self.results.values() if "best_return" in r), default=None)
        total = sum(self.configs.values())
        self._bar.n = min(self.iterations, sum(r.get("member_iterations", 0) for r in self.results.values()))
        text = f"configs {done}/{total} done, {running} running, {failed} failed"
        self._bar.set_postfix_str(text + (f", best return {best:.4g}" if best is not None else ""),
                                  refresh=False)
        self._bar.refresh()


def _iterations(member: Mapping[str, Any]) -> int:
    return int(member.get("iters", 1))


# ---------------------------------------------------------------------- the end

def _finish(cfg: DictConfig, sweep_dir: Path, parent: Mapping[str, Any], results: Any) -> SweepOutcome:
    from gradgym.platform.reports import backend_comparison, method_comparison, summary_table

    _wait_for_trials_to_let_go(sweep_dir)
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


def _wait_for_trials_to_let_go(sweep_dir: Path) -> None:
    """Wait (up to SETTLE_WAIT_S in all) for trial processes that still hold their folder.

    Tune counts a trial its scheduler stopped as ended once it asked it to stop; on a busy
    machine the process may still be writing its summary (status STOPPED) for a while.
    """
    deadline = time.monotonic() + SETTLE_WAIT_S
    for folder in sorted((sweep_dir / TRIALS_DIR).glob("*")):
        while RunRecord(folder).is_live() and time.monotonic() < deadline:
            time.sleep(0.1)


def _collect(cfg: DictConfig, sweep_dir: Path, results: Any) -> tuple[list[dict], list[dict]]:
    """One summary row per config and the iteration histories of the finished ones."""
    swept = [k for k in _swept_keys(cfg) if k not in _NAMED_FIRST]
    rows, curves = [], []
    stopped_early = stopped_trial_ids(sweep_dir / STOPPED_EARLY_FILE)
    for result in results:
        if not result.config:  # a trial Tune made but never started (the sweep was stopped)
            continue
        stopped = (result.metrics or {}).get("trial_id") in stopped_early
        for member in result.config[PACK_PARAM]:
            row, history = _member_row(sweep_dir, member, result, swept, stopped)
            rows.append(row)
            if row["status"] in ("FINISHED", "STOPPED") and history and "env" in row:
                label = " ".join([row["backend"]] + [f"{k}={row[k]}" for k in swept])
                curves.append({"env": row["env"], "backend": row["backend"], "label": label,
                               "history": history})
    rows.sort(key=lambda row: row["trial"])
    return rows, curves


def _member_row(sweep_dir: Path, member: Mapping[str, Any], result: Any, swept: Sequence[str],
                stopped_early: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary row of one config of a pack's trial, and its iterations."""
    record = RunRecord(sweep_dir / TRIALS_DIR / member["id"])
    summary = record.read_summary()
    # no status: never ran, interrupted, or ended by Tune before it wrote its summary
    status = summary.get("status", "STOPPED" if stopped_early else "UNFINISHED")
    failed = result.error is not None and status != "FINISHED"
    row = {"trial": member["id"], **summary, "status": "FAILED" if failed else status,
           **{key: member["values"].get(key) for key in swept},
           "mlflow_run_id": record.read_tracking_state().get("run_id", summary.get("mlflow_run_id", "")),
           "pack": Path(result.path).name}
    if failed:
        row["error"] = summary.get("error") or f"{type(result.error).__name__}: {result.error}"[:2000]
    return row, record.read_metrics()
