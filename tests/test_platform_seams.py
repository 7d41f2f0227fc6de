"""The platform's seams: a pipeline registered from outside the platform runs through it,
a run without MLflow leaves a complete run record, and the layout has one owner."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
from omegaconf import OmegaConf

from gradgym.envs.backends import ARRAY_BACKENDS, AUTODIFF_BACKENDS, BACKENDS, get_backend
from gradgym.pipelines import get_pipeline, pipelines, registry
from gradgym.pipelines.base import FINAL_METRICS, LOOP_METRICS, PipelineResult, as_reporter
from gradgym.pipelines.config import _Common
from gradgym.platform.config import (
    ConfigError,
    compose_run_config,
    env_defaults_in_use,
    load_sweep_config,
    trial_run_configs,
)
from gradgym.platform.records import RunRecord
from gradgym.platform.runner import execute_run, settle_run
from gradgym.platform.tracking import LocalTracker, RunIdentity, open_tracker


@dataclass
class _RandomSearchConfig(_Common):
    """A toy pipeline that lives outside gradgym: random plans, keep the best."""

    name: str = "random-search"
    iters: int = 3
    horizon: int = 5
    batch: int = 2


def _random_search(env, cfg, seed=0, report=None) -> PipelineResult:
    """Its own loop, reporting through the documented contract: one call per iteration with
    the metrics it declares, then the closing call."""
    import functools

    from gradgym.pipelines._rollout import backend_ops, host_rng, start_states, transition
    from gradgym.pipelines.cem import plan_action, plan_returns

    reporter = as_reporter(report)
    ops = backend_ops(env, cfg.name, gradient=False)
    start = start_states(env, seed, cfg.batch)
    rng = host_rng(seed, 1)
    returns = functools.partial(plan_returns, env, ops, functools.partial(transition, env, plan_action),
                                cfg.horizon)
    best = -np.inf
    for iteration in range(cfg.iters):
        plans = env.backend.asarray(rng.uniform(-1, 1, (cfg.batch, cfg.horizon, env.spec.act_dim)))
        value = float(np.mean(np.asarray(returns(plans, start))))
        best = max(best, value)
        steps = cfg.batch * cfg.horizon
        reporter.iteration({"return_mean": value, "iter_time_s": 1e-3, "env_steps_per_s": steps / 1e-3,
                            "env_steps": float(steps * (iteration + 1))}, iteration)
    final = {"compile_time_s": 0.0, "best_return": best, "final_return": value}
    reporter.final(final, cfg.iters)
    return PipelineResult(best_return=best, final_return=value, compile_time_s=0.0, wall_time_s=0.0,
                          iterations=cfg.iters)


@pytest.fixture
def toy_pipeline():
    spec = registry.register(registry.PipelineSpec(
        name="random-search", config=_RandomSearchConfig, optimize=_random_search,
        backends=("numpy",), needs_gradients=False, step_metrics=("return_mean",)))
    yield spec
    registry._SPECS.pop("random-search")


def test_a_pipeline_registered_outside_the_platform_runs_through_it(tmp_path, toy_pipeline):
    assert "random-search" in pipelines()
    cfg = compose_run_config([
        "pipeline=random-search", "backend=numpy", "env=Pendulum", "pipeline.iters=4",
        f"run_dir={tmp_path / 'run'}", "tracking.enabled=false", "progress=false",
    ])
    assert OmegaConf.get_type(cfg.pipeline) is _RandomSearchConfig
    summary = execute_run(cfg)
    assert summary["status"] == "FINISHED" and summary["iterations"] == 4
    lines = RunRecord(tmp_path / "run").read_metrics()
    assert [line["iteration"] for line in lines] == [0, 1, 2, 3]
    assert set(lines[0]) - {"iteration", "timestamp_ms"} == set(toy_pipeline.iteration_metrics)
    # Its backends and fields are checked like a built-in pipeline's.
    with pytest.raises(ConfigError, match="'random-search' pipeline does not run there; allowed: numpy"):
        compose_run_config(["pipeline=random-search", "backend=jax"])
    with pytest.raises(ConfigError, match=r"pipeline.iters=0 is invalid; allowed: an int >= 1"):
        compose_run_config(["pipeline=random-search", "backend=numpy", "pipeline.iters=0"])
    # A sweep's ASHA metric is checked against what its pipelines report.
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\noverrides: {pipeline: random-search, backend: numpy}\n"
                    "scheduler: asha\nasha: {metric: grad_norm}\n")
    with pytest.raises(ConfigError, match="'asha.metric'.*allowed: return_mean, iter_time_s"):
        load_sweep_config(path)


def test_every_built_in_pipeline_declares_what_the_platform_needs():
    assert list(pipelines()) == list(registry.BUILTIN)
    for name, spec in pipelines().items():
        assert spec.name == name and spec.config().name == name
        assert set(spec.backends) <= set(ARRAY_BACKENDS)
        assert spec.needs_gradients == (set(spec.backends) <= set(AUTODIFF_BACKENDS))
        assert spec.iteration_metrics[-len(LOOP_METRICS) - bool(spec.eval_metric):][:3] == LOOP_METRICS
        assert spec.schedule_metric in spec.iteration_metrics
        assert spec.final_metrics == FINAL_METRICS
    with pytest.raises(ValueError, match="unknown pipeline 'trajectroy' \\(did you mean 'trajectory'\\?\\)"):
        get_pipeline("trajectroy")


def test_backends_are_declared_once_and_ivy_is_not_an_array_backend():
    assert BACKENDS == ARRAY_BACKENDS + ("ivy",) and set(AUTODIFF_BACKENDS) < set(ARRAY_BACKENDS)
    with pytest.raises(ValueError) as info:
        get_backend("ivy")
    message = str(info.value)
    assert "available: numpy, jax, torch" in message and "backend='ivy'" in message


@pytest.mark.parametrize("backend", ARRAY_BACKENDS)
def test_normal_samples_of_every_backend_are_standard_normal(backend):
    from gradgym.envs.backends import to_numpy

    samples = to_numpy(get_backend(backend, "float64").normal(3, (20000,)))
    assert samples.dtype == np.float64
    assert abs(samples.mean()) < 0.03 and abs(samples.std() - 1.0) < 0.03
    again = to_numpy(get_backend(backend, "float64").normal(3, (20000,)))
    np.testing.assert_array_equal(samples, again)  # the same seed, the same draw


def test_a_run_without_mlflow_leaves_a_complete_record_and_nothing_to_settle(tmp_path):
    cfg = compose_run_config([
        "pipeline=cem", "backend=numpy", "env=Pendulum", "pipeline.iters=3", "pipeline.horizon=5",
        "pipeline.batch=2", "pipeline.population=8", "pipeline.elites=2",
        f"run_dir={tmp_path / 'run'}", "tracking.enabled=false", "progress=false",
    ])
    assert isinstance(open_tracker(RunRecord(cfg.run_dir), cfg.tracking, RunIdentity("x")), LocalTracker)
    summary = execute_run(cfg)
    record = RunRecord(tmp_path / "run")
    assert summary == record.read_summary() and summary["mlflow_run_id"] is None
    assert record.read_config().pipeline.name == "cem" and record.attempts() == 1
    assert [line["iteration"] for line in record.read_metrics()] == [0, 1, 2]
    assert {p.name for p, _ in record.artifacts()} >= {"config.yaml", "video_best.gif", "summary.json"}
    assert not (tmp_path / "mlflow.db").exists() and not record.tracking_path.exists()
    assert not settle_run(record.folder, cfg.tracking, status="FINISHED")


def test_no_run_records_test_hooks(tmp_path, monkeypatch):
    """Fault injection comes from GRADGYM_FAULTS and never lands in a run's config."""
    monkeypatch.setenv("GRADGYM_FAULTS", json.dumps([{"match": {"seed": 2}, "crash_attempts": 1}]))
    base = ["pipeline=cem", "backend=numpy", "env=Pendulum", "pipeline.iters=4", "pipeline.horizon=5",
            "pipeline.batch=2", "pipeline.population=8", "pipeline.elites=2", "pipeline.render=false",
            "tracking.enabled=false", "progress=false"]
    from gradgym.platform.faults import SimulatedCrash

    execute_run(compose_run_config([*base, "seed=1", f"run_dir={tmp_path / 'a'}"]))  # no match
    crashing = compose_run_config([*base, "seed=2", f"run_dir={tmp_path / 'b'}"])
    with pytest.raises(SimulatedCrash, match="attempt 1 at iteration 2"):
        execute_run(crashing)
    summary = execute_run(crashing, resume=True)  # the second attempt is not crashed
    assert summary["status"] == "FINISHED" and RunRecord(tmp_path / "b").attempts() == 2
    for folder in ("a", "b"):
        assert "testing" not in RunRecord(tmp_path / folder).read_config()
    assert not any(f.name == "testing" for f in dataclasses.fields(type(OmegaConf.to_object(crashing))))


@pytest.mark.parametrize(("overrides", "compiles"), [
    ([], True),  # policy's 2000 iterations on a classic env: torch_compile=auto compiles
    (["pipeline.iters=10"], False),
    (["env=Hopper-v5"], False),  # MuJoCo steps on the host: eager
    (["pipeline.iters=10", "pipeline.torch_compile=true"], True),
])
def test_a_torch_run_config_and_its_progress_bar_say_whether_it_compiles(overrides, compiles):
    from gradgym.platform.runner import _compiles

    cfg = compose_run_config(["pipeline=policy", "backend=torch", "env=CartPole", *overrides])
    assert cfg.pipeline.torch_compile is compiles  # auto decided: config.yaml and MLflow show it
    assert _compiles(cfg) is compiles


def test_torch_compile_auto_stays_auto_on_other_backends():
    cfg = compose_run_config(["pipeline=policy", "backend=jax", "env=CartPole"])
    assert cfg.pipeline.torch_compile == "auto"


@pytest.mark.parametrize(("backend", "compiles"), [("jax", True), ("numpy", False)])
def test_the_progress_bar_says_compiling_until_the_first_iteration(tmp_path, capsys, backend,
                                                                   compiles):
    cfg = compose_run_config([
        "pipeline=cem", f"backend={backend}", "env=Pendulum", "pipeline.iters=3",
        "pipeline.horizon=10", "pipeline.population=8", "pipeline.elites=2", "pipeline.render=false",
        f"run_dir={tmp_path / 'run'}", "tracking.enabled=false", "progress=true",
    ])
    assert execute_run(cfg)["status"] == "FINISHED"
    shown = capsys.readouterr().err
    assert ("compiling" in shown) is compiles, shown
    assert "3/3" in shown and "return_mean=" in shown


@pytest.fixture
def toy_pipeline_with_env_defaults():
    spec = registry.register(registry.PipelineSpec(
        name="random-search", config=_RandomSearchConfig, optimize=_random_search,
        backends=("numpy",), needs_gradients=False, step_metrics=("return_mean",),
        env_defaults={"CartPole": {"horizon": 7, "batch": 3}}))
    yield spec
    registry._SPECS.pop("random-search")


def test_a_pipelines_env_defaults_come_between_its_schema_and_every_layer(
        tmp_path, toy_pipeline_with_env_defaults):
    base = ["pipeline=random-search", "backend=numpy"]
    on = lambda *items: compose_run_config(base, list(items)).pipeline
    assert (on("env=CartPole").horizon, on("env=CartPole").batch) == (7, 3)
    assert on("env=Pendulum").horizon == _RandomSearchConfig().horizon
    # Whatever a layer sets wins, wherever it stands: before or after the env is chosen,
    # and across layers (a base file choosing one env, the command line another).
    assert on("pipeline.horizon=9", "env=CartPole").horizon == 9
    assert on("env=CartPole", "pipeline.horizon=9").batch == 3
    assert compose_run_config(base, ["env=Pendulum"], ["env=CartPole"]).pipeline.horizon == 7
    # `gradgym run` names the env's defaults a run keeps (not those a layer replaced).
    kept = env_defaults_in_use(compose_run_config(base, ["env=CartPole", "pipeline.batch=4"]))
    assert kept == {"pipeline.horizon": 7}
    assert env_defaults_in_use(compose_run_config(base, ["env=Pendulum"])) == {}
    # The Python API starts from the same config.
    spec = toy_pipeline_with_env_defaults
    assert spec.default_config("CartPole") == _RandomSearchConfig(horizon=7, batch=3)
    assert spec.default_config("CartPole", batch=5) == _RandomSearchConfig(horizon=7, batch=5)
    assert spec.default_config("Pendulum") == spec.default_config() == _RandomSearchConfig()
    # A sweep over envs gives each trial its env's defaults.
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\noverrides: {pipeline: random-search, backend: numpy}\n"
                    "grid: {env: [Pendulum, CartPole]}\n")
    trials = trial_run_configs(load_sweep_config(path))
    assert {t.env: t.pipeline.horizon for t in trials} == {"Pendulum": 5, "CartPole": 7}


@pytest.mark.parametrize(("env_defaults", "message"), [
    ({"Cartpole": {"horizon": 7}}, "names 'Cartpole', which is not a registered env"),
    ({"CartPole": {"horizn": 7}}, r"env_defaults\['CartPole'\] sets horizn, which _RandomSearchConfig"),
    ({"CartPole": {"iters": 0}}, r"env_defaults\['CartPole'\]: random-search.iters=0 is invalid; allowed: an int >= 1"),
])
def test_env_defaults_that_name_no_env_field_or_valid_value_are_refused(env_defaults, message):
    with pytest.raises(ValueError, match=message):
        registry.register(registry.PipelineSpec(
            name="random-search", config=_RandomSearchConfig, optimize=_random_search,
            backends=("numpy",), needs_gradients=False, step_metrics=("return_mean",),
            env_defaults=env_defaults))
    assert "random-search" not in pipelines()
