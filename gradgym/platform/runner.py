"""One pipeline run with its run record and tracker.

This is what ``gradgym run`` does in the user's process and what a sweep trial does in a
Ray worker. The run folder's layout is :mod:`gradgym.platform.records`'s; where the run is
tracked besides (MLflow, or nowhere) is the tracker's (:mod:`gradgym.platform.tracking`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradgym.pipelines import MemberOutcome, get_pipeline, pack_key
from gradgym.pipelines.base import NonFiniteReturnError
from gradgym.pipelines.compile_cache import enable_compile_cache
from gradgym.platform.allocator import loaded_allocator
from gradgym.platform.config import flat_params
from gradgym.platform.faults import faults_for
from gradgym.platform.records import (  # noqa: F401 - the errors are the runner's API too
    VIDEO_KEYS,
    NotARunDirError,
    RunDirBusyError,
    RunDirExistsError,
    RunRecord,
)
from gradgym.platform.replays import ReplayRecorder, view_command
from gradgym.platform.reports import gradient_histogram
from gradgym.platform.tracking import (
    RunIdentity,
    Tracker,
    TrackingError,
    format_error,
    open_tracker,
    settle,
)

OnIteration = Callable[[Mapping[str, float], int], None]
# (member index, metrics, step): a pack's members report through one callback.
OnMemberIteration = Callable[[int, Mapping[str, float], int], None]


def default_run_dir(cfg: DictConfig, root: str | Path = "runs") -> Path:
    """A new, empty folder ``runs/<pipeline>-<env>-<backend>-s<seed>-<YYYYmmdd-HHMMSS>``
    (``-2``, ``-3``... when another run took that name in the same second), created here:
    the atomic ``mkdir`` is what makes two runs started together get different folders."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{cfg.pipeline.name}-{cfg.env}-{cfg.backend}-s{cfg.seed}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")


def run_tags(cfg: DictConfig, sweep: str | None = None) -> dict[str, str]:
    """The tags every run carries (``sweep`` only for sweep trials)."""
    tags = {"backend": cfg.backend, "env": cfg.env, "pipeline": cfg.pipeline.name, "seed": str(cfg.seed)}
    if sweep:
        tags["sweep"] = sweep
    if cfg.get("run_dir"):
        tags["gradgym.view"] = view_command(cfg.run_dir)  # how to watch it in the browser
    return tags


def run_identity(cfg: DictConfig, name: str, *, sweep: str | None = None,
                 parent_run_id: str | None = None) -> RunIdentity:
    """How a tracker shows the run of ``cfg``: ``name``, tags, the resolved config as params."""
    return RunIdentity(name=name, tags=run_tags(cfg, sweep), params=flat_params(cfg),
                       parent_run_id=parent_run_id)


def execute_run(cfg: DictConfig, *, resume: bool = False, parent_run_id: str | None = None,
                sweep: str | None = None, run_name: str | None = None,
                on_iteration: OnIteration | None = None) -> dict[str, Any]:
    """Run ``cfg``'s pipeline, writing its run record and logging to its tracker.

    Args:
        cfg: a composed run config with ``run_dir`` set.
        resume: continue a run folder left by an earlier attempt (a retried or resumed
            trial): iterations it logged are not logged again. Without it an existing run
            folder is an error.
        parent_run_id: the sweep's parent run in the tracker.
        sweep: the sweep's name (tag).
        run_name: the tracker's run name (default: the run folder's name).
        on_iteration: called after each iteration is logged (e.g. to report to Ray Tune).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        Whatever the pipeline raised (``NonFiniteReturnError``...) or ``TrackingError``, after
        the summary and every logged iteration are on disk.
    """
    report = (lambda index, metrics, step: on_iteration(metrics, step)) if on_iteration else None
    (outcome,) = execute_pack([cfg], resume=resume, parent_run_id=parent_run_id, sweep=sweep,
                              run_names=[run_name], on_iteration=report)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def execute_pack(cfgs: Sequence[DictConfig], *, resume: bool = False,
                 parent_run_id: str | None = None, sweep: str | None = None,
                 run_names: Sequence[str | None] | None = None,
                 on_iteration: OnMemberIteration | None = None) -> list[dict[str, Any] | BaseException]:
    """Run a pack of configs (see :func:`pack_group`) as one computation, each member
    with its own run record and tracker, exactly as if it ran alone.

    A pack of one is a lone run. Pipelines that do not run packs take packs of one only.

    Args:
        cfgs: composed run configs with ``run_dir`` set and equal :func:`pack_group`.
        resume, parent_run_id, sweep: as for :func:`execute_run`, for every member.
        run_names: one tracker run name per member (``None``: the run folder's name).
        on_iteration: ``(member index, metrics, step)`` after each member's iteration.

    Returns:
        One entry per member: its summary, or the error that ended it (a member whose
        return became non-finite fails alone; the others go on).

    Raises:
        What ended the whole pack (a crash, ``KeyboardInterrupt``, Tune's ``SystemExit``, a
        ``TrackingError``), after every member's summary and iterations are on disk.
    """
    if not cfgs:
        raise ValueError("a pack needs at least one config")
    groups = {pack_group(cfg) for cfg in cfgs}
    if len(groups) > 1:
        raise ValueError("the configs of a pack must share pipeline, env, backend, dtype and "
                         "every field the pipeline cannot vary per member")
    run_names = list(run_names) if run_names is not None else [None] * len(cfgs)
    # Own every member's folder before anything is written into any of them.
    records: list[RunRecord] = []
    try:
        for cfg in cfgs:
            records.append(RunRecord(cfg.run_dir).claim(resume=resume))
    except BaseException:
        for record in records:
            record.release()
        raise
    try:
        return _run_members(cfgs, records, run_names, parent_run_id=parent_run_id, sweep=sweep,
                            on_iteration=on_iteration)
    finally:
        for record in records:
            record.release()  # after the summaries: the folders are settled


def _run_members(cfgs: Sequence[DictConfig], records: list[RunRecord],
                 run_names: Sequence[str | None], *, parent_run_id: str | None,
                 sweep: str | None, on_iteration: OnMemberIteration | None,
                 ) -> list[dict[str, Any] | BaseException]:
    """Start each member's tracker, run the pipeline, write each member's ending."""
    members: list[_Member] = []
    try:
        for index, (cfg, record, name) in enumerate(zip(cfgs, records, run_names)):
            members.append(_Member.start(cfg, record, index, name, parent_run_id=parent_run_id,
                                         sweep=sweep, on_iteration=on_iteration))
    except BaseException:
        for member in members:
            member.tracker.close()
        raise
    try:
        outcomes = _run_pipeline(cfgs, members)
    except BaseException as err:
        for member in members:
            member.close_after_error(err)
        raise
    finally:
        for member in members:
            member.recorder.close()
    return [member.close(outcome) for member, outcome in zip(members, outcomes)]


def pack_group(cfg: DictConfig) -> tuple:
    """A hashable key: run configs may share a pack exactly when their keys are equal.

    Members differ only in their seed, run folder, tracking and the pipeline's packable
    fields; everything that shapes the shared computation (env, backend, dtype, task
    arguments, threads, the pipeline's other fields) must be equal.
    """
    pipeline = OmegaConf.to_object(cfg.pipeline)
    env_kwargs = json.dumps(OmegaConf.to_container(cfg.env_kwargs, resolve=True), sort_keys=True)
    return pack_key(pipeline, env=cfg.env, backend=cfg.backend, dtype=cfg.dtype,
                    env_kwargs=env_kwargs, torch_threads=cfg.torch_threads,
                    compile_cache=cfg.compile_cache)


def planned_iterations(cfg: DictConfig) -> int:
    """How many iterations the run of ``cfg`` will make (its pipeline says how it budgets)."""
    return get_pipeline(cfg.pipeline.name).iterations(OmegaConf.to_object(cfg.pipeline))


def can_run_packs(pipeline: str) -> bool:
    """Whether configs of ``pipeline`` may run in packs of more than one."""
    return get_pipeline(pipeline).optimize_pack is not None


def settle_run(run_dir: Path, tracking: DictConfig, *, status: str, error: str | None = None,
               parent_run_id: str | None = None, sweep: str | None = None,
               run_name: str | None = None) -> bool:
    """Deliver a run folder to its tracker that its own process could not finish delivering
    (see :func:`gradgym.platform.tracking.settle`); returns whether anything was done."""
    record = RunRecord(run_dir)
    if not record.started():
        return False
    identity = run_identity(record.read_config(), run_name or record.folder.name, sweep=sweep,
                            parent_run_id=parent_run_id)
    return settle(record, tracking, identity, status=status, error=error)


DIED_MESSAGE = "the run's process died without ending the run (e.g. SIGKILL); settled afterwards"


def run_status(record: RunRecord) -> str:
    """A run folder's true status: ``RUNNING`` only while a live process holds it; ``DEAD``
    for a run whose process died before writing its ending (see :func:`settle_dead_run`);
    else its summary's status."""
    if record.is_live():
        return "RUNNING"
    status = record.read_summary().get("status")
    if status:
        return status
    return "DEAD" if record.started() else "EMPTY"


def settle_dead_run(run_dir: str | Path, *, status: str = "KILLED") -> bool:
    """End a run whose process died without ending it: a summary with ``status`` in the
    folder (its iterations: what ``metrics.jsonl`` holds) and the same ending in its
    tracker, with every iteration not yet delivered. Returns whether the run was dead.

    The folder is claimed while settling, so a live run (or another settler) is never
    touched.
    """
    record = RunRecord(run_dir)
    if record.is_live() or not record.started() or record.read_summary().get("status"):
        return False
    try:
        record.claim(resume=True)
    except RunDirExistsError:
        return False  # taken meanwhile
    try:
        if record.read_summary().get("status"):
            return False  # ended by someone else before the claim
        cfg = record.read_config()
        # The tracker first: if its store is away (TrackingError), the folder stays DEAD and
        # the next settle tries again, instead of a folder that says KILLED over a RUNNING run.
        settle_run(record.folder, cfg.tracking, status=status, error=DIED_MESSAGE)
        record.write_summary({
            "status": status, "env": cfg.get("env"), "backend": cfg.get("backend"),
            "pipeline": OmegaConf.select(cfg, "pipeline.name"), "seed": cfg.get("seed"),
            "iterations": record.iterations(), "run_dir": str(record.folder),
            "mlflow_run_id": record.read_tracking_state().get("run_id"), "error": DIED_MESSAGE,
        })
        return True
    finally:
        record.release()


def _run_pipeline(cfgs: Sequence[DictConfig], members: list[_Member]) -> list[MemberOutcome]:
    from gradgym.envs import make

    cfg = cfgs[0]  # what the members share
    _limit_threads(cfg)
    if cfg.compile_cache:
        enable_compile_cache(cfg.compile_cache)
    env = make(cfg.env, backend=cfg.backend, dtype=cfg.dtype, **OmegaConf.to_container(cfg.env_kwargs))
    spec = get_pipeline(cfg.pipeline.name)
    pipeline_cfgs = [OmegaConf.to_object(c.pipeline) for c in cfgs]  # the pipeline's dataclass
    seeds = [c.seed for c in cfgs]
    recorders = [member.recorder for member in members]
    if spec.optimize_pack is not None:
        return spec.optimize_pack(env, pipeline_cfgs, seeds, recorders)
    if len(cfgs) > 1:
        raise ValueError(f"the {spec.name} pipeline does not run packs; run its configs one by one")
    try:
        return [spec.optimize(env, pipeline_cfgs[0], seed=seeds[0], report=recorders[0])]
    except NonFiniteReturnError as err:
        return [err]


def _ending(err: BaseException) -> str:
    """The run status of a run that raised ``err``."""
    if isinstance(err, SystemExit):
        return "STOPPED"  # Ray Tune ends a trial its scheduler (ASHA) stopped with SystemExit
    if isinstance(err, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


class _Member:
    """One run of a pack: its run record, tracker and recorder, from start to summary."""

    def __init__(self, cfg: DictConfig, record: RunRecord, tracker: Tracker, recorder: _Recorder):
        self.cfg, self.record, self.tracker, self.recorder = cfg, record, tracker, recorder
        self.began = time.perf_counter()

    @classmethod
    def start(cls, cfg: DictConfig, record: RunRecord, index: int, run_name: str | None, *,
              parent_run_id: str | None, sweep: str | None,
              on_iteration: OnMemberIteration | None) -> _Member:
        """Record the attempt and config in the claimed run folder, start the tracker."""
        attempt = record.count_attempt()
        record.write_config(cfg)
        identity = run_identity(cfg, run_name or record.folder.name, sweep=sweep,
                                parent_run_id=parent_run_id)
        tracker = open_tracker(record, cfg.tracking, identity).start()
        tracker.log_artifact(record.config_path)
        report = functools.partial(on_iteration, index) if on_iteration else None
        return cls(cfg, record, tracker, _Recorder(cfg, record, tracker, attempt, report))

    def close(self, outcome: MemberOutcome) -> dict[str, Any] | BaseException:
        """Deliver and write the summary of a member the pipeline finished (or failed alone)."""
        if isinstance(outcome, BaseException):
            try:
                self.close_after_error(outcome)
            except BaseException as err:  # noqa: BLE001 - returned like the member's own error
                return err
            return outcome
        for path in self.recorder.replays.save_final(outcome.best_params, outcome.iterations):
            self.tracker.log_artifact(path)
        self.tracker.log_artifact(self.record.metrics_path)
        self.tracker.log_final(self.recorder.final_metrics, self.recorder.final_step)
        self.tracker.drain()  # every iteration delivered; the tracker's run id is known
        summary = self._summary("FINISHED", result=outcome)
        self.record.write_summary(summary)  # once: a FINISHED summary is final
        self.tracker.log_artifact(self.record.summary_path)
        self.tracker.finish("FINISHED")
        return summary

    def close_after_error(self, err: BaseException) -> None:
        """Write the summary of a member that ``err`` ended and end its tracker's run."""
        status = _ending(err)
        self.record.write_summary(self._summary(status, error=err))
        if isinstance(err, TrackingError):
            self.tracker.close()  # the store is what failed: do not wait for it again
            return
        self.tracker.log_artifact(self.record.summary_path)
        self.tracker.log_final(self.recorder.final_metrics, self.recorder.final_step)
        try:
            self.tracker.finish(status, error=format_error(err))
        except TrackingError as tracking_err:
            err.add_note(str(tracking_err))

    def _summary(self, status: str, result: Any = None, error: BaseException | None = None) -> dict[str, Any]:
        cfg, recorder = self.cfg, self.recorder
        times = [t for t in recorder.iter_times if math.isfinite(t)]
        final = recorder.final_metrics
        summary: dict[str, Any] = {
            "status": status,
            "env": cfg.env,
            "backend": cfg.backend,
            "pipeline": cfg.pipeline.name,
            "seed": cfg.seed,
            # Without a result: what metrics.jsonl holds (an iteration logged locally whose
            # delivery then failed counts; earlier attempts' iterations too).
            "iterations": result.iterations if result is not None else self.record.iterations(),
            "final_return": result.final_return if result is not None else final.get("final_return"),
            "best_return": result.best_return if result is not None else final.get("best_return"),
            "compile_time_s": result.compile_time_s if result is not None else final.get("compile_time_s"),
            "wall_time_s": time.perf_counter() - self.began,
            "mean_iter_time_s": sum(times) / len(times) if times else None,
            "malloc": loaded_allocator(),  # the iteration times' context (platform/allocator.py)
            "run_dir": str(cfg.run_dir),
            "mlflow_run_id": self.tracker.run_id,
        }
        if error is not None:
            summary["error"] = f"{type(error).__name__}: {error}"
        return summary


class _Recorder:
    """The pipeline's reporter: iterations to the tracker, artifacts to the run record."""

    def __init__(self, cfg: DictConfig, record: RunRecord, tracker: Tracker, attempt: int,
                 on_iteration: OnIteration | None):
        self.cfg = cfg
        self.record = record
        self.tracker = tracker
        self.attempt = attempt
        self.on_iteration = on_iteration
        self.final_metrics: dict[str, float] = {}
        self.final_step = 0
        self.iter_times: list[float] = []
        self.returns: list[float] = []
        self._faults = faults_for(cfg)
        self._bar = _progress_bar(cfg)
        self.replays = ReplayRecorder(cfg, record, get_pipeline(cfg.pipeline.name).replay)

    def wants_best_params(self) -> bool:
        """Whether the pipeline should pass its best parameters so far (a viewer follows)."""
        return self.replays.wants_best_params()

    def iteration(self, metrics: Mapping[str, float], step: int,
                  artifacts: Mapping[str, Any] | None = None) -> None:
        """One iteration's metrics (and artifacts): logged, shown, passed on."""
        if artifacts:
            self._save_artifacts(artifacts, step)
        self.tracker.log_iteration(metrics, step)
        self.iter_times.append(metrics.get("iter_time_s", math.nan))
        self.returns.append(metrics.get("return_mean", math.nan))
        if self._bar is not None:
            if self._bar.n == 0:  # rate and ETA from here on: the compile before is left out
                self._bar.reset()
            self._bar.update(1)
            self._bar.set_postfix(return_mean=f"{metrics.get('return_mean', math.nan):.4g}", refresh=False)
        if self.on_iteration is not None:
            self.on_iteration(metrics, step)
        self._faults.after_iteration(step, self.attempt, planned_iterations(self.cfg))

    def final(self, metrics: Mapping[str, float], step: int,
              artifacts: Mapping[str, Any] | None = None) -> None:
        """The pipeline's closing report."""
        if artifacts:
            self._save_artifacts(artifacts, step)
        self.final_metrics.update(metrics)
        self.final_step = step

    def _save_artifacts(self, artifacts: Mapping[str, Any], step: int) -> None:
        from gradgym.envs.video import write_gif

        for key in VIDEO_KEYS:
            frames = artifacts.get(key)
            if frames:
                self.tracker.log_artifact(write_gif(self.record.video_path(key), frames, fps=20))
        if artifacts.get("best_params") is not None:
            self.replays.save_live(artifacts["best_params"], step)
        gradients = artifacts.get("gradients")
        if gradients is not None:
            path = gradient_histogram(gradients, step, self.record.gradient_path(step))
            self.tracker.log_artifact(path, path.parent.name)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress_bar(cfg: DictConfig) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=planned_iterations(cfg), desc=f"{cfg.pipeline.name} {cfg.env} ({cfg.backend})",
               unit="it", dynamic_ncols=True)
    if _compiles(cfg):  # a cold torch compile can take half a minute before the first iteration
        cached = " (kept in the compile cache for the next run)" if cfg.compile_cache else ""
        bar.set_postfix_str(f"compiling{cached}")
    return bar


def _compiles(cfg: DictConfig) -> bool:
    """Whether the run compiles before its first iteration: jax, or torch with
    ``torch_compile`` (which ``compose_run_config`` decided when it was ``auto``)."""
    return cfg.backend == "jax" or (
        cfg.backend == "torch" and cfg.pipeline.get("torch_compile", False) is True)


def _limit_threads(cfg: DictConfig) -> None:
    if cfg.backend == "torch":
        import torch

        torch.set_num_threads(cfg.torch_threads)
