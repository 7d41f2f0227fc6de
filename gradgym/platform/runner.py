"""One pipeline run with its run record and tracker.

This is what ``gradgym run`` does in the user's process and what a sweep trial does in a
Ray worker. The run folder's layout is :mod:`gradgym.platform.records`'s; where the run is
tracked besides (MLflow, or nowhere) is the tracker's (:mod:`gradgym.platform.tracking`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradgym.pipelines import get_pipeline
from gradgym.platform.config import flat_params
from gradgym.platform.faults import faults_for
from gradgym.platform.records import VIDEO_KEYS, RunRecord
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


class RunDirExistsError(FileExistsError):
    """``gradgym run`` was pointed at a folder that already holds a run."""


def default_run_dir(cfg: DictConfig, root: str | Path = "runs") -> Path:
    """``runs/<pipeline>-<env>-<backend>-s<seed>-<YYYYmmdd-HHMMSS>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.pipeline.name}-{cfg.env}-{cfg.backend}-s{cfg.seed}-{stamp}"


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
    record = RunRecord(cfg.run_dir)
    if not resume and record.holds_run():
        raise RunDirExistsError(
            f"run_dir {str(record.folder)!r} already holds a run; choose another run_dir (or leave "
            "it unset for a new timestamped folder)"
        )
    record.create()
    attempt = record.count_attempt()
    record.write_config(cfg)
    _limit_threads(cfg)

    identity = run_identity(cfg, run_name or record.folder.name, sweep=sweep, parent_run_id=parent_run_id)
    tracker = open_tracker(record, cfg.tracking, identity).start()
    tracker.log_artifact(record.config_path)
    began = time.perf_counter()
    recorder = _Recorder(cfg, record, tracker, attempt, on_iteration)
    try:
        result = _run_pipeline(cfg, recorder)
    except BaseException as err:
        status = _ending(err)
        summary = _summary(cfg, tracker, recorder, began, status=status, error=err)
        _close_after_error(tracker, record, recorder, summary, status, err)
        raise
    finally:
        recorder.close()
    for path in recorder.replays.save_final(result.best_params, result.iterations):
        tracker.log_artifact(path)
    tracker.log_artifact(record.metrics_path)
    tracker.log_final(recorder.final_metrics, recorder.final_step)
    tracker.drain()  # every iteration delivered; the tracker's run id is known
    summary = _summary(cfg, tracker, recorder, began, status="FINISHED", result=result)
    record.write_summary(summary)  # once: a FINISHED summary is final
    tracker.log_artifact(record.summary_path)
    tracker.finish("FINISHED")
    return summary


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


def _run_pipeline(cfg: DictConfig, recorder: _Recorder) -> Any:
    from gradgym.envs import make

    env = make(cfg.env, backend=cfg.backend, dtype=cfg.dtype, **OmegaConf.to_container(cfg.env_kwargs))
    pipeline_cfg = OmegaConf.to_object(cfg.pipeline)  # the pipeline's own dataclass
    return get_pipeline(cfg.pipeline.name).optimize(env, pipeline_cfg, seed=cfg.seed, report=recorder)


def _ending(err: BaseException) -> str:
    """The run status of a run that raised ``err``."""
    if isinstance(err, SystemExit):
        return "STOPPED"  # Ray Tune ends a trial its scheduler (ASHA) stopped with SystemExit
    if isinstance(err, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


def _close_after_error(tracker: Tracker, record: RunRecord, recorder: _Recorder,
                       summary: dict[str, Any], status: str, err: BaseException) -> None:
    record.write_summary(summary)
    if isinstance(err, TrackingError):
        tracker.close()  # the store is what failed: do not wait for it again
        return
    tracker.log_artifact(record.summary_path)
    tracker.log_final(recorder.final_metrics, recorder.final_step)
    try:
        tracker.finish(status, error=format_error(err))
    except TrackingError as tracking_err:
        err.add_note(str(tracking_err))


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
            self._bar.update(1)
            self._bar.set_postfix(return_mean=f"{metrics.get('return_mean', math.nan):.4g}", refresh=False)
        if self.on_iteration is not None:
            self.on_iteration(metrics, step)
        self._faults.after_iteration(step, self.attempt, self.cfg.pipeline.iters)

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

    return tqdm(total=cfg.pipeline.iters, desc=f"{cfg.pipeline.name} {cfg.env} ({cfg.backend})",
                unit="it", dynamic_ncols=True)


def _summary(cfg: DictConfig, tracker: Tracker, recorder: _Recorder, began: float,
             status: str, result: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    times = [t for t in recorder.iter_times if math.isfinite(t)]
    summary: dict[str, Any] = {
        "status": status,
        "env": cfg.env,
        "backend": cfg.backend,
        "pipeline": cfg.pipeline.name,
        "seed": cfg.seed,
        "iterations": result.iterations if result is not None else len(recorder.returns),
        "final_return": result.final_return if result is not None else recorder.final_metrics.get("final_return"),
        "best_return": result.best_return if result is not None else recorder.final_metrics.get("best_return"),
        "compile_time_s": result.compile_time_s if result is not None else recorder.final_metrics.get("compile_time_s"),
        "wall_time_s": time.perf_counter() - began,
        "mean_iter_time_s": sum(times) / len(times) if times else None,
        "run_dir": str(cfg.run_dir),
        "mlflow_run_id": tracker.run_id,
    }
    if error is not None:
        summary["error"] = f"{type(error).__name__}: {error}"
    return summary


def _limit_threads(cfg: DictConfig) -> None:
    if cfg.backend == "torch":
        import torch

        torch.set_num_threads(cfg.torch_threads)
