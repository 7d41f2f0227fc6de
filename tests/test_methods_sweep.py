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
                      "pipeline.eval_every": 1, "pipeline.render": False,
                      "pipeline.hidden": [16], "tracking.flush_every_s": 0.5},
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
        assert len(client.get_metric_history(child.info.run_id, "eval_return_mean")) == ITERS
        assert "final_return" in child.data.metrics

    download = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "parent")))
    image = iio.imread(download / "methods.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert (download / "comparison.png").is_file()
