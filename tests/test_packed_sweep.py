"""Packed sweeps through the platform: which configs share a trial, a pack's members equal
their lone runs (run folders included), bad ``pack`` values, the compile cache of runs, and
packed sweeps end to end on real Ray and MLflow (a crash inside a pack, results vs
``gradgym run``)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_gradgym
from mlflow import MlflowClient
from omegaconf import OmegaConf

from gradgym.platform.config import ConfigError, compose_run_config, load_sweep_config
from gradgym.platform.faults import FAULTS_VARIABLE
from gradgym.platform.records import RunRecord
from gradgym.platform.runner import execute_pack, execute_run, pack_group
from gradgym.platform.sweep import make_packs

TIMING = {"iter_time_s", "env_steps_per_s", "timestamp_ms"}
TINY = {"pipeline": "trajectory", "pipeline.iters": 5, "pipeline.horizon": 10, "pipeline.batch": 2,
        "pipeline.grad_hist_every": 0, "pipeline.render": False, "tracking.enabled": False,
        "progress": False}


def _sweep(tmp_path: Path, name: str = "s", **content) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **content}, sort_keys=False))
    return path


def _values(pack: list[dict]) -> list[dict]:
    return [member["values"] for member in pack]


# ---------------------------------------------------------------------- which configs share a pack

def test_configs_that_differ_in_seed_and_lr_share_packs_of_at_most_pack(tmp_path):
    grid = {"env": ["Pendulum", "CartPole"], "backend": ["jax", "torch"], "seed": [0, 1, 2],
            "pipeline.lr": [0.1, 0.01]}
    cfg = load_sweep_config(_sweep(tmp_path, overrides={"pipeline": "trajectory"}, grid=grid, pack=4))
    packs = make_packs(cfg)
    ids = [member["id"] for pack in packs for member in pack]
    assert sorted(ids) == [f"{i:05d}" for i in range(24)]  # every config once, stable ids
    assert [len(pack) for pack in packs] == [3, 3] * 4  # 6 per env x backend, split evenly
    for pack in packs:
        values = _values(pack)
        assert len({(v["env"], v["backend"]) for v in values}) == 1
    # What does not pack (pipeline.horizon shapes the computation) goes to separate packs.
    cfg = load_sweep_config(_sweep(tmp_path, grid={"pipeline.horizon": [10, 20], "seed": [0, 1]}))
    assert sorted(sorted(v["pipeline.horizon"] for v in _values(p)) for p in make_packs(cfg)) == [
        [10, 10], [20, 20]]


def test_pack_one_and_asha_run_every_config_alone(tmp_path):
    grid = {"seed": [0, 1, 2]}
    alone = load_sweep_config(_sweep(tmp_path, grid=grid, pack=1))
    assert [len(p) for p in make_packs(alone)] == [1, 1, 1]
    asha = load_sweep_config(_sweep(tmp_path, grid=grid, scheduler="asha"))
    assert [len(p) for p in make_packs(asha)] == [1, 1, 1]


def test_packs_are_split_further_so_that_no_trial_slot_idles(tmp_path):
    cfg = load_sweep_config(_sweep(tmp_path, grid={"seed": list(range(10))}))
    assert [len(p) for p in make_packs(cfg, slots=1)] == [10]
    assert [len(p) for p in make_packs(cfg, slots=4)] == [3, 3, 2, 2]
    assert [len(p) for p in make_packs(cfg, slots=32)] == [1] * 10


def test_search_draws_are_reproducible_configs_of_their_own(tmp_path):
    path = _sweep(tmp_path, grid={"env": ["Pendulum"]}, num_samples=6,
                  search={"pipeline.lr": {"loguniform": [1e-3, 1e-1]}, "seed": {"randint": [0, 100]}})
    first, again = (make_packs(load_sweep_config(path)) for _ in range(2))
    assert first == again
    values = [v for pack in first for v in _values(pack)]
    lrs = [v["pipeline.lr"] for v in values]
    assert len(values) == 6 and len(set(lrs)) == 6 and all(1e-3 <= lr <= 1e-1 for lr in lrs)
    assert all(isinstance(v["seed"], int) and 0 <= v["seed"] < 100 for v in values)
    other = make_packs(load_sweep_config(path, ["search_seed=1"]))
    assert [v["pipeline.lr"] for p in other for v in _values(p)] != lrs


@pytest.mark.parametrize("value, message", [
    ("pack=0", "allowed: an int >= 1"),
    ("pack=-3", "allowed: an int >= 1"),
    ("pack=many", "invalid value 'many' for sweep key 'pack'"),
    ("pack=1.5", "sweep key 'pack'"),
])
def test_bad_pack_values_are_rejected_with_what_is_allowed(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(_sweep(tmp_path, grid={"seed": [0, 1]}), [value])


def test_asha_with_packs_is_rejected_before_ray_starts(tmp_path):
    path = _sweep(tmp_path, grid={"seed": [0, 1]}, scheduler="asha", pack=8)
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ASHA stops configs one by one" in result.stderr and "allowed: pack=1 or null" in result.stderr
    assert not (tmp_path / "sweeps").exists() or not list((tmp_path / "sweeps").glob("*/tune"))


# ---------------------------------------------------------------------- a pack equals its lone runs

@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_packs_run_folders_equal_lone_runs(tmp_path, backend):
    members = [{"seed": 0, "pipeline.lr": 0.1}, {"seed": 3, "pipeline.lr": 0.03},
               {"seed": 3, "pipeline.lr": 0.1, "pipeline.init_scale": 1.0}]
    base = {**TINY, "env": "CartPole", "backend": backend, "compile_cache": None}
    packed = [compose_run_config(base, m, {"run_dir": str(tmp_path / f"pack{i}")})
              for i, m in enumerate(members)]
    alone = [compose_run_config(base, m, {"run_dir": str(tmp_path / f"alone{i}")})
             for i, m in enumerate(members)]
    assert len({pack_group(cfg) for cfg in packed}) == 1
    summaries = execute_pack(packed)
    for cfg_p, cfg_a, summary in zip(packed, alone, summaries):
        lone = execute_run(cfg_a)
        assert summary["status"] == lone["status"] == "FINISHED"
        assert summary["seed"] == lone["seed"] and summary["iterations"] == lone["iterations"] == 5
        np.testing.assert_allclose(summary["final_return"], lone["final_return"], rtol=1e-5)
        np.testing.assert_allclose(summary["best_return"], lone["best_return"], rtol=1e-5)
        packed_log, lone_log = RunRecord(cfg_p.run_dir).read_metrics(), RunRecord(cfg_a.run_dir).read_metrics()
        assert [e["iteration"] for e in packed_log] == [e["iteration"] for e in lone_log] == list(range(5))
        for p, a in zip(packed_log, lone_log):
            assert set(p) == set(a)
            for key in set(a) - TIMING:
                np.testing.assert_allclose(p[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert OmegaConf.to_container(RunRecord(cfg_p.run_dir).read_config())["seed"] == cfg_p.seed


def test_configs_that_cannot_share_a_pack_are_refused_before_any_work(tmp_path):
    cfgs = [compose_run_config(TINY, {"run_dir": str(tmp_path / "a")}),
            compose_run_config(TINY, {"pipeline.horizon": 20, "run_dir": str(tmp_path / "b")})]
    with pytest.raises(ValueError, match="must share pipeline, env, backend"):
        execute_pack(cfgs)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------- compile cache

def test_a_second_run_loads_its_compilation_from_the_cache_folder(tmp_path):
    cache = tmp_path / "cache"
    args = ["run", "env=Pendulum", "backend=jax", "tracking.enabled=false", "pipeline.iters=3",
            "pipeline.horizon=30", "pipeline.render=false", f"compile_cache={cache}"]
    times = []
    for attempt in range(2):
        result = run_gradgym([*args, f"run_dir={tmp_path / f'run{attempt}'}"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        times.append(json.loads((tmp_path / f"run{attempt}" / "summary.json").read_text())["compile_time_s"])
    assert any((cache / "jax").iterdir()), "the first run wrote its compilation"
    assert times[1] < 0.5 * times[0], times


# ---------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_crash_inside_a_pack_is_retried_without_duplicate_histories(tmp_path):
    iters = 6
    overrides = {**TINY, "pipeline.iters": iters, "env": "Pendulum", "backend": "torch",
                 "tracking.enabled": True, "tracking.flush_every_s": 0.5, "pipeline.render": True}
    path = _sweep(tmp_path, "t-pack-crash", overrides=overrides,
                  grid={"seed": [0, 1, 2], "pipeline.lr": [0.1, 0.03]}, max_failures=1,
                  max_concurrent=1)  # one trial slot: the six configs form one pack
    # The config with seed 1 crashes its first attempt halfway: the whole pack with it.
    faults = [{"match": {"seed": 1, "pipeline.lr": 0.1}, "crash_attempts": 1}]
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=900,
                         **{FAULTS_VARIABLE: json.dumps(faults)})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "6 configs (6 finished)" in result.stdout

    sweep_dir = tmp_path / "sweeps" / "t-pack-crash"
    with open(sweep_dir / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert len({row["pack"] for row in rows}) == 1, "the six configs ran as one pack"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t-pack-crash")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "return_mean")]
        assert sorted(steps) == list(range(iters)), "no iteration logged twice"
        assert "video_best.gif" in {a.path for a in client.list_artifacts(child.info.run_id)}
    attempts = Counter(int((sweep_dir / "trials" / row["trial"] / "attempts").read_text()) for row in rows)
    assert attempts == {2: 6}, "the pack was retried as a whole"


@pytest.mark.slow
def test_a_packed_sweep_computes_what_gradgym_run_computes(tmp_path):
    overrides = {**TINY, "env": "Pendulum", "backend": "jax", "tracking.enabled": False}
    path = _sweep(tmp_path, "t-pack-equal", overrides=overrides,
                  grid={"seed": [0, 1, 2, 3], "pipeline.lr": [0.1, 0.02]})
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with open(tmp_path / "sweeps" / "t-pack-equal" / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and len({row["pack"] for row in rows}) < 8, "configs were packed"
    row = next(r for r in rows if r["seed"] == "2" and float(r["pipeline.lr"]) == 0.02)
    alone = run_gradgym(["run", "env=Pendulum", "backend=jax", "seed=2", "pipeline.lr=0.02",
                         *(f"{k}={v}" for k, v in overrides.items() if k not in ("env", "backend")),
                         f"run_dir={tmp_path / 'alone'}"], cwd=tmp_path)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    np.testing.assert_allclose(float(row["final_return"]), summary["final_return"], rtol=1e-5)
    np.testing.assert_allclose(float(row["best_return"]), summary["best_return"], rtol=1e-5)
