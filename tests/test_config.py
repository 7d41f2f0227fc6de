"""Run and sweep configs: composition, overrides and errors that name key, value and allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from gradgym.envs import registered
from gradgym.pipelines import pipelines
from gradgym.pipelines.config import CEMConfig, TrajectoryConfig
from gradgym.platform.config import (
    CONFIGS_DIR,
    ConfigError,
    compose_run_config,
    default_run_layers,
    flat_params,
    load_sweep_config,
    parse_dotlist,
    search_space,
    trial_layers,
)


def test_defaults_follow_the_schemas():
    cfg = compose_run_config()
    assert cfg.pipeline.name == "trajectory"
    # torch_compile=auto decided for this torch run: 200 iterations stay eager
    assert OmegaConf.to_object(cfg.pipeline) == TrajectoryConfig(torch_compile=False)
    assert (cfg.env, cfg.backend, cfg.seed, cfg.torch_threads) == ("Pendulum", "torch", 0, 1)
    assert cfg.tracking.enabled and cfg.tracking.uri is None


def test_pipeline_name_selects_the_schema_then_overrides_apply():
    cfg = compose_run_config(*default_run_layers(), [
        "pipeline=cem", "backend=numpy", "pipeline.iters=7", "env=Reacher", "env_kwargs.num_joints=3",
    ])
    assert OmegaConf.get_type(cfg.pipeline) is CEMConfig
    assert cfg.pipeline.iters == 7 and cfg.pipeline.population == CEMConfig().population
    assert cfg.env_kwargs.num_joints == 3
    # The order of items does not matter for the selection.
    later = compose_run_config(["pipeline.iters=7", "pipeline=cem", "backend=numpy"])
    assert OmegaConf.get_type(later.pipeline) is CEMConfig and later.pipeline.iters == 7


def test_dotlist_nested_mapping_and_dotted_mapping_are_equivalent():
    dotlist = compose_run_config(["pipeline.lr=0.05", "env_kwargs.num_joints=4", "env=Reacher"])
    nested = compose_run_config({"pipeline": {"lr": 0.05}, "env": "Reacher", "env_kwargs": {"num_joints": 4}})
    dotted = compose_run_config({"pipeline.lr": 0.05, "env": "Reacher", "env_kwargs.num_joints": 4})
    assert OmegaConf.to_container(dotlist) == OmegaConf.to_container(nested) == OmegaConf.to_container(dotted)
    assert parse_dotlist(["grid.seed=[0,1,2]"]) == {"grid.seed": [0, 1, 2]}


def test_composed_config_is_read_only():
    cfg = compose_run_config()
    with pytest.raises(ReadonlyConfigError):
        cfg.seed = 3


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["foo=1"], ["'foo'", "allowed keys", "env", "backend", "pipeline"]),
        (["pipeline.iterz=3"], ["'pipeline.iterz'", "did you mean 'iters'", "horizon"]),
        (["pipeline.iters=abc"], ["'abc'", "'pipeline.iters'", "int"]),
        (["seed=1.5"], ["1.5", "'seed'", "int"]),
        (["env=Pendulm"], ["'Pendulm'", "'env'", "did you mean 'Pendulum'", "CartPole"]),
        (["backend=tensorflow"], ["'tensorflow'", "'backend'", "numpy, jax, torch"]),
        (["backend=numpy"], ["'numpy'", "'backend'", "needs gradients", "jax, torch", "pipeline=cem"]),
        (["pipeline=ddpg"], ["'ddpg'", "'pipeline'", "trajectory, policy, cem, ppo, shac"]),
        (["env=Reacher", "env_kwargs.num_joint=3"], ["env_kwargs", "num_joint", "num_joints"]),
        (["env=Reacher", "env_kwargs.num_joints=0"], ["env_kwargs", "num_joints", ">= 1"]),
        (["pipeline.iters=0"], ["pipeline.iters=0", "an int >= 1"]),
        (["pipeline.lr_schedule=cos"], ["pipeline.lr_schedule='cos'", "constant, cosine, linear"]),
        (["pipeline=cem", "backend=numpy", "pipeline.grad_clip=1"], ["'pipeline.grad_clip'", "'cem' pipeline", "population"]),
        (["dtype=float16"], ["'float16'", "'dtype'", "float32, float64"]),
        (["tracking.outage_limit_s=0"], ["'tracking.outage_limit_s'", "> 0"]),
        # Test hooks are not part of a run's config (they come from GRADGYM_FAULTS).
        (["testing.crash_attempts=1"], ["unknown key 'testing'", "allowed keys"]),
        (["seed"], ["key=value", "'seed'"]),
    ],
)
def test_invalid_run_config_names_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as info:
        compose_run_config(*default_run_layers(), overrides)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_run_yaml_and_every_pipeline_compose():
    assert default_run_layers(), "configs/run.yaml is the base layer of `gradgym run`"
    for name, spec in pipelines().items():
        backend = spec.backends[0]
        cfg = compose_run_config(*default_run_layers(), [f"pipeline={name}", f"backend={backend}"])
        assert cfg.pipeline.name == name


def test_flat_params_cover_the_resolved_config():
    cfg = compose_run_config(["env=Reacher", "env_kwargs.num_joints=3", "pipeline.iters=9"])
    params = flat_params(cfg)
    assert params["pipeline.iters"] == "9" and params["env_kwargs.num_joints"] == "3"
    assert params["tracking.enabled"] == "True" and params["env"] == "Reacher"


# ---------------------------------------------------------------------- sweeps

def _sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


SWEEP = """
name: t
overrides:
  pipeline: trajectory
  pipeline.iters: 5
grid:
  env: [Pendulum, CartPole]
  backend: [jax, torch]
  seed: [0, 1]
"""


def test_sweep_trials_are_the_grid_product(tmp_path):
    cfg = load_sweep_config(_sweep_file(tmp_path, SWEEP))
    layers = trial_layers(cfg)
    assert len(layers) == 8
    assert {(l["env"], l["backend"], l["seed"]) for l in layers} == {
        (e, b, s) for e in ("Pendulum", "CartPole") for b in ("jax", "torch") for s in (0, 1)
    }


def test_sweep_command_line_overrides_replace_file_values(tmp_path):
    cfg = load_sweep_config(_sweep_file(tmp_path, SWEEP), [
        "grid.seed=[0,1,2]", "overrides.pipeline.iters=20", "grid.pipeline.lr=[0.1,0.01]",
        "search.pipeline.init_scale.uniform=[1,2]", "max_failures=5",
    ])
    assert cfg.grid.seed == [0, 1, 2] and cfg.max_failures == 5
    assert cfg.overrides["pipeline.iters"] == 20
    assert len(trial_layers(cfg)) == 2 * 2 * 3 * 2
    assert search_space(cfg) == {"pipeline.init_scale": ("uniform", [1, 2])}


def test_nested_and_dotted_sweep_sections_are_the_same(tmp_path):
    nested = load_sweep_config(_sweep_file(tmp_path, """
name: t
overrides: {pipeline: {name: cem, iters: 3}}
grid: {backend: [numpy], pipeline: {population: [8, 16]}}
"""))
    assert nested.overrides == {"pipeline.name": "cem", "pipeline.iters": 3}
    assert trial_layers(nested) == [
        {"backend": "numpy", "pipeline.population": 8}, {"backend": "numpy", "pipeline.population": 16},
    ]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["grid.seed=[]"], ["grid.seed is empty"]),
        (["grid.seed=3"], ["grid.seed must be a list"]),
        (["colour=red"], ["'colour'", "allowed sweep keys", "grid"]),
        (["pipeline.iters=3"], ["'pipeline.iters'", "overrides.pipeline.iters"]),
        (["grid.env=[Pendulum,Pong]"], ["'Pong'", "'env'", "CartPole"]),
        (["grid.backend=[numpy]"], ["'numpy'", "needs gradients"]),
        (["overrides.pipeline.iterz=3"], ["'pipeline.iterz'", "iters"]),
        (["scheduler=hyperband"], ["'hyperband'", "fifo, asha"]),
        (["scheduler=asha", "asha.metric=reward"], ["'reward'", "return_mean"]),
        (["search.pipeline.lr.normal=[0.1,0.2]"], ["search.pipeline.lr.normal", "loguniform"]),
        (["search.pipeline.lr.loguniform=[0.1,0.01]"], ["low < high"]),
        (["num_samples=0"], ["'num_samples'", ">= 1"]),
        (["name=a/b"], ["'a/b'", "'name'"]),
    ],
)
def test_invalid_sweep_names_key_and_allowed(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_sweep_config(_sweep_file(tmp_path, SWEEP), overrides)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_shipped_sweep_files_are_valid():
    files = sorted((CONFIGS_DIR / "sweeps").glob("*.yaml"))
    assert {p.name for p in files} >= {"backends.yaml", "quick.yaml"}
    for path in files:
        cfg = load_sweep_config(path)
        for layer in trial_layers(cfg):
            assert layer["env"] in registered()
