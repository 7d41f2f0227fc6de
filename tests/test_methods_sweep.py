"""A methods sweep (PPO, SHAC, BPTT) against a real MLflow tracking server: one child run
per trial tagged with its pipeline, a shared env-steps axis, methods.png on the parent."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import pytest
import yaml
from conftest import run_gradgym
from mlflow import MlflowClient

ITERS = 3
METHODS = ["ppo", "shac", "policy"]


@pytest.mark.slow
def test_methods_sweep_logs_children_per_method_and_the_comparison(tmp_path, mlflow_server):
    sweep = {
        "name": "t-methods",
        "overrides": {"env": "Pendulum", "backend": "torch", "pipeline.iters": ITERS,
                      "pipeline.render": False, "tracking.flush_every_s": 0.5},
        "grid": {"pipeline": METHODS, "seed": [0, 1]},
    }
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=900,
                         MLFLOW_TRACKING_URI=mlflow_server.uri)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("t-methods")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("gradgym.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["pipeline"] for c in children) == sorted(METHODS * 2)
    for child in children:
        assert child.info.status == "FINISHED"
        steps = client.get_metric_history(child.info.run_id, "env_steps")
        values = [m.value for m in sorted(steps, key=lambda m: m.step)]
        assert len(values) == ITERS and values[0] > 0
        assert values == [values[0] * (i + 1) for i in range(ITERS)]  # cumulative
        assert client.get_metric_history(child.info.run_id, "eval_return_mean")  # iteration 0
        assert "final_return" in child.data.metrics

    download = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "parent")))
    image = iio.imread(download / "methods.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert (download / "comparison.png").is_file()


def test_method_comparison_plots_each_method_against_env_steps_and_wall_time(tmp_path):
    import numpy as np

    from gradgym.platform.reports import _score_curve, method_comparison

    def history(per_iter: float, seconds: float, slope: float) -> list[dict]:
        return [{"iteration": i, "timestamp_ms": 1000 * seconds * (i + 1), "iter_time_s": seconds,
                 "env_steps": per_iter * (i + 1), "return_mean": 1.0,
                 **({"eval_return_mean": slope * i} if i % 2 == 0 else {})} for i in range(6)]

    curve = _score_curve(history(100.0, 0.5, 3.0), "env_steps")
    np.testing.assert_allclose(curve[0], [0, 200, 400])  # evaluations, before their update
    np.testing.assert_allclose(curve[1], [0, 6, 12])
    walls = _score_curve(history(100.0, 0.5, 3.0), "wall_time_s")[0]
    np.testing.assert_allclose(walls, [0.0, 1.0, 2.0])
    trials = [{"env": env, "pipeline": method, "label": f"jax pipeline={method}",
               "history": history(per_iter, 0.1, slope)}
              for env in ("Pendulum", "CartPole") for seed in range(2)
              for method, per_iter, slope in (("ppo", 2048, 1.0), ("shac", 2048, 2.0),
                                              ("policy", 6400, 0.5))]
    path = method_comparison(trials, tmp_path / "methods.png", title="t")
    image = iio.imread(path)
    assert image.shape[0] > 400 and image.shape[1] > 600 and image.ndim == 3


def test_overrides_may_hold_keys_of_the_pipelines_the_grid_picks(tmp_path):
    """`pipeline.env_steps` is a key of PPO and SHAC, not of the default pipeline: the sweep's
    start-up (tracking config, ASHA's horizon) composes it with each trial's pipeline."""
    from gradgym.platform.config import load_sweep_config
    from gradgym.platform.sweep import _scheduler, _trial_tracking

    sweep = {
        "name": "t-budget", "scheduler": "asha",
        "overrides": {"env": "Pendulum", "pipeline.env_steps": 20480, "tracking.enabled": False},
        "grid": {"pipeline": ["ppo", "shac"]},
    }
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    cfg = load_sweep_config(path)
    assert _trial_tracking(cfg).enabled is False
    # 20480 env steps: 10 iterations of PPO's 2048, 320 of SHAC's 64; ASHA stops one past
    # the last iteration of the longest
    assert _scheduler(cfg, tmp_path)._max_t == 321


def test_the_methods_sweep_file_composes_every_trial():
    from gradgym.platform.config import load_sweep_config, trial_run_configs

    path = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "methods.yaml"
    trials = trial_run_configs(load_sweep_config(path))
    assert sorted({t.pipeline.name for t in trials}) == sorted(METHODS)
    assert len(trials) == 45
