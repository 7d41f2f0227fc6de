"""One pipeline run with its run folder and MLflow tracking.

This is what ``gradgym run`` does in the user's process and what a sweep trial does in a
Ray worker. The run folder holds::

    config.yaml          the resolved run config
    metrics.jsonl        one JSON object per iteration: iteration, timestamp_ms, metrics
    summary.json         status, final and best return, compile and wall time, MLflow run id
    video_initial.gif    the first start state's trajectory before optimization
    video_best.gif       the best trajectory found
    gradients/*.png      gradient histograms every ``pipeline.grad_hist_every`` iterations
    tracking.json        the MLflow run id and how much of metrics.jsonl it acknowledged
    attempts             how many times this run has started (retries of a trial)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradgym.pipelines.base import FINAL_METRICS, ITERATION_METRICS
from gradgym.platform.config import flat_params
from gradgym.platform.reports import gradient_histogram
from gradgym.platform.tracking import (
    METRICS_FILE,
    STATE_FILE,
    RunTracker,
    TrackingError,
    format_error,
    read_json,
    read_jsonl,
    resolve_tracking_uri,
    tracking_client,
    write_json,
)

OnIteration = Callable[[Mapping[str, float], int], None]


class SimulatedCrash(RuntimeError):
    """Raised by ``testing.crash_attempts`` to exercise retries."""


class RunDirExistsError(FileExistsError):
    """``gradgym run`` was pointed at a folder that already holds a run."""


def default_run_dir(cfg: DictConfig, root: str | Path = "runs") -> Path:
    """``runs/<pipeline>-<env>-<backend>-s<seed>-<YYYYmmdd-HHMMSS>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.pipeline.name}-{cfg.env}-{cfg.backend}-s{cfg.seed}-{stamp}"


def run_tags(cfg: DictConfig, sweep: str | None = None) -> dict[str, str]:
    """The MLflow tags every run carries (``sweep`` only for sweep trials)."""
    tags = {"backend": cfg.backend, "env": cfg.env, "pipeline": cfg.pipeline.name, "seed": str(cfg.seed)}
    if sweep:
        tags["sweep"] = sweep
    return tags


def execute_run(cfg: DictConfig, *, resume: bool = False, parent_run_id: str | None = None,
                sweep: str | None = None, run_name: str | None = None,
                on_iteration: OnIteration | None = None) -> dict[str, Any]:
    """Run ``cfg``'s pipeline, writing its run folder and logging to MLflow.

    Args:
        cfg: a composed run config with ``run_dir`` set.
        resume: continue a run folder left by an earlier attempt (a retried or resumed
            trial): iterations it logged are not logged again. Without it an existing run
            folder is an error.
        parent_run_id: the sweep's MLflow parent run.
        sweep: the sweep's name (tag).
        run_name: the MLflow run name (default: the run folder's name).
        on_iteration: called after each iteration is logged (e.g. to report to Ray Tune).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        Whatever the pipeline raised (``NonFiniteReturnError``...) or ``TrackingError``, after
        the summary and every logged iteration are on disk.
    """
    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / METRICS_FILE).exists():
        raise RunDirExistsError(
            f"run_dir {str(run_dir)!r} already holds a run; choose another run_dir (or leave it "
            "unset for a new timestamped folder)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = _count_attempt(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _limit_threads(cfg)

    tracker = RunTracker(run_dir, cfg.tracking, run_name=run_name or run_dir.name,
                         tags=run_tags(cfg, sweep), params=flat_params(cfg),
                         parent_run_id=parent_run_id).start()
    tracker.log_artifact(run_dir / "config.yaml")
    began = time.perf_counter()
    recorder = _Recorder(cfg, run_dir, tracker, attempt, on_iteration)
    try:
        result = _run_pipeline(cfg, recorder)
    except BaseException as err:
        status = _ending(err)
        summary = _summary(cfg, tracker, recorder, began, status=status, error=err)
        _close_after_error(tracker, recorder, summary, status, err, run_dir)
        raise
    finally:
        recorder.close()
    tracker.log_artifact(run_dir / METRICS_FILE)
    tracker.log_final(recorder.final, recorder.final_step)
    tracker.drain()  # every iteration delivered; the MLflow run id is known
    summary = _summary(cfg, tracker, recorder, began, status="FINISHED", result=result)
    write_json(run_dir / "summary.json", summary)  # once: a FINISHED summary is final
    tracker.log_artifact(run_dir / "summary.json")
    tracker.finish("FINISHED")
    return summary


def settle_run(run_dir: Path, tracking: DictConfig, *, status: str, error: str | None = None,
               parent_run_id: str | None = None, sweep: str | None = None,
               run_name: str | None = None) -> bool:
    """Deliver a run folder to MLflow that its own process could not finish delivering.

    A process killed between iterations or while closing leaves the MLflow run RUNNING,
    iterations unsent, artifacts not uploaded, or no MLflow run at all (the store was slow
    to answer). From the folder alone this sends what is missing (nothing twice) and ends
    the run with ``status`` (a summary status). Returns whether anything had to be done.
    """
    state = read_json(run_dir / STATE_FILE)
    if not (run_dir / "config.yaml").is_file():
        return False  # the run never started
    lines = len(read_jsonl(run_dir / METRICS_FILE)) if (run_dir / METRICS_FILE).is_file() else 0
    if state.get("run_id") and state.get("acked", 0) >= lines:
        run = tracking_client(resolve_tracking_uri(tracking.uri)).get_run(state["run_id"])
        if run.info.status != "RUNNING":
            return False  # delivered and ended
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tracker = RunTracker(run_dir, tracking, run_name=run_name or run_dir.name,
                         tags=run_tags(cfg, sweep), params=flat_params(cfg),
                         parent_run_id=parent_run_id)
    for path in sorted(run_dir.glob("*.yaml")) + sorted(run_dir.glob("*.gif")):
        tracker.log_artifact(path)
    for path in sorted(run_dir.glob("gradients/*.png")):
        tracker.log_artifact(path, "gradients")
    summary = read_json(run_dir / "summary.json")
    for name in ("summary.json", METRICS_FILE):
        if (run_dir / name).is_file():
            tracker.log_artifact(run_dir / name)
    final = {k: summary[k] for k in FINAL_METRICS if isinstance(summary.get(k), (int, float))}
    tracker.log_final(final, summary.get("iterations", lines))
    stopped = status == "STOPPED"
    tracker.finish(MLFLOW_STATUS.get(status, "KILLED"),  # UNFINISHED: KILLED until resumed
                   error=error if status == "FAILED" else None,
                   tags={"stopped_early": "true"} if stopped else None)
    return True


def _run_pipeline(cfg: DictConfig, recorder: _Recorder) -> Any:
    from gradgym.envs import make
    from gradgym.pipelines import run_pipeline

    env = make(cfg.env, backend=cfg.backend, dtype=cfg.dtype, **OmegaConf.to_container(cfg.env_kwargs))
    pipeline_cfg = OmegaConf.to_object(cfg.pipeline)  # the pipeline's own dataclass
    return run_pipeline(cfg.pipeline.name, env, pipeline_cfg, seed=cfg.seed, report=recorder)


def _ending(err: BaseException) -> str:
    """The summary status of a run that raised ``err``."""
    if isinstance(err, SystemExit):
        return "STOPPED"  # Ray Tune ends a trial its scheduler (ASHA) stopped with SystemExit
    if isinstance(err, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


# Summary status -> MLflow run status (MLflow has no "stopped early").
MLFLOW_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED", "STOPPED": "KILLED"}


def _close_after_error(tracker: RunTracker, recorder: _Recorder, summary: dict[str, Any],
                       status: str, err: BaseException, run_dir: Path) -> None:
    write_json(run_dir / "summary.json", summary)
    if isinstance(err, TrackingError):
        tracker.close()  # the store is what failed: do not wait for it again
        return
    tracker.log_artifact(run_dir / "summary.json")
    tracker.log_final(recorder.final, recorder.final_step)
    stopped = status == "STOPPED"
    try:
        tracker.finish(MLFLOW_STATUS[status], error=None if stopped else format_error(err),
                       tags={"stopped_early": "true"} if stopped else None)
    except TrackingError as tracking_err:
        err.add_note(str(tracking_err))


class _Recorder:
    """The pipeline's report callback: metrics to the tracker, artifacts to files."""

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: RunTracker, attempt: int,
                 on_iteration: OnIteration | None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.tracker = tracker
        self.attempt = attempt
        self.on_iteration = on_iteration
        self.final: dict[str, float] = {}
        self.final_step = 0
        self.iter_times: list[float] = []
        self.returns: list[float] = []
        self._crash_at = cfg.pipeline.iters // 2 if attempt <= cfg.testing.crash_attempts else None
        self._bar = _progress_bar(cfg)

    def __call__(self, metrics: Mapping[str, float], step: int,
                 artifacts: Mapping[str, Any] | None = None) -> None:
        if artifacts:
            self._save_artifacts(artifacts, step)
        if not any(key in metrics for key in ITERATION_METRICS):
            self.final.update(metrics)  # the pipeline's closing call
            self.final_step = step
            return
        self.tracker.log_iteration(metrics, step)
        self.iter_times.append(metrics.get("iter_time_s", math.nan))
        self.returns.append(metrics.get("return_mean", math.nan))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(return_mean=f"{metrics.get('return_mean', math.nan):.4g}", refresh=False)
        if self.on_iteration is not None:
            self.on_iteration(metrics, step)
        if self._crash_at is not None and step >= self._crash_at:
            raise SimulatedCrash(
                f"testing.crash_attempts={self.cfg.testing.crash_attempts}: simulated crash of "
                f"attempt {self.attempt} at iteration {step}"
            )
        if self.cfg.testing.iteration_delay_s:
            time.sleep(self.cfg.testing.iteration_delay_s)

    def _save_artifacts(self, artifacts: Mapping[str, Any], step: int) -> None:
        from gradgym.envs.video import write_gif

        for key in ("video_initial", "video_best"):
            frames = artifacts.get(key)
            if frames:
                path = write_gif(self.run_dir / f"{key}.gif", frames, fps=20)
                self.tracker.log_artifact(path)
        gradients = artifacts.get("gradients")
        if gradients is not None:
            folder = self.run_dir / "gradients"
            folder.mkdir(exist_ok=True)
            path = gradient_histogram(gradients, step, folder / f"step_{step:06d}.png")
            self.tracker.log_artifact(path, "gradients")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress_bar(cfg: DictConfig) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.pipeline.iters, desc=f"{cfg.pipeline.name} {cfg.env} ({cfg.backend})",
                unit="it", dynamic_ncols=True)


def _summary(cfg: DictConfig, tracker: RunTracker, recorder: _Recorder, began: float,
             status: str, result: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    times = [t for t in recorder.iter_times if math.isfinite(t)]
    summary: dict[str, Any] = {
        "status": status,
        "env": cfg.env,
        "backend": cfg.backend,
        "pipeline": cfg.pipeline.name,
        "seed": cfg.seed,
        "iterations": result.iterations if result is not None else len(recorder.returns),
        "final_return": result.final_return if result is not None else recorder.final.get("final_return"),
        "best_return": result.best_return if result is not None else recorder.final.get("best_return"),
        "compile_time_s": result.compile_time_s if result is not None else recorder.final.get("compile_time_s"),
        "wall_time_s": time.perf_counter() - began,
        "mean_iter_time_s": sum(times) / len(times) if times else None,
        "run_dir": str(cfg.run_dir),
        "mlflow_run_id": tracker.run_id,
    }
    if error is not None:
        summary["error"] = f"{type(error).__name__}: {error}"
    return summary


def _count_attempt(run_dir: Path) -> int:
    marker = run_dir / "attempts"
    attempt = int(marker.read_text() or 0) + 1 if marker.exists() else 1
    marker.write_text(str(attempt))
    return attempt


def _limit_threads(cfg: DictConfig) -> None:
    if cfg.backend == "torch":
        import torch

        torch.set_num_threads(cfg.torch_threads)
