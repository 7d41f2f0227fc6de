"""The Gymnasium adapter: env_checker, registration, task kwargs, action validation."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass

import gymnasium
import numpy as np
import pytest
from env_cases import CASE_IDS, CLASSIC_CASES
from gymnasium.utils.env_checker import check_env

import gradgym
from gradgym.envs import GymEnv, gym_id, register_gymnasium_envs
from gradgym.envs import core as envs_core
from gradgym.envs.classic import Pendulum


@pytest.mark.parametrize(("name", "kwargs"), CLASSIC_CASES, ids=CASE_IDS)
def test_check_env_passes(name, kwargs):
    env = gymnasium.make(gym_id(name), render_mode="rgb_array", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
    # The only remarks: observations are unbounded, as the tasks' states are.
    remarks = {str(w.message) for w in caught}
    assert all("infinity" in remark for remark in remarks), remarks


def test_every_registered_env_has_a_gymnasium_id():
    for name, entry in gradgym.registered().items():
        if "numpy" not in entry.backends:
            continue
        spec = gymnasium.spec(gym_id(name))
        assert spec.max_episode_steps == entry.factory.horizon
        assert spec.kwargs == {}  # the task is bound by the entry point, not a keyword
        env = gymnasium.make(spec.id)
        assert env.unwrapped.task.name == name if entry.family == "mujoco" else env.unwrapped.env.spec.name == name
    assert gym_id("CartPole") == "gradgym/CartPole-v0"
    assert gym_id("HalfCheetah-v5") == "gradgym/HalfCheetah-v5"
    assert gym_id("Swimmer") == "gradgym/Fish-v0"  # "Swimmer" is MuJoCo's Swimmer-v5
    assert register_gymnasium_envs() == []  # idempotent: nothing new the second time


def test_episodes_are_truncated_at_the_horizon():
    env = gymnasium.make("gradgym/Pendulum-v0")
    env.reset(seed=0)
    steps, truncated, terminated = 0, False, False
    while not (truncated or terminated):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
    assert (steps, terminated, truncated) == (100, False, True)


def test_observations_and_rewards_match_the_functional_env():
    gym_env = GymEnv("Swimmer", dtype="float64", num_urchins=3)
    obs, _ = gym_env.reset(seed=5)
    functional = gradgym.make("Swimmer", dtype="float64", num_urchins=3)
    state = functional.reset(np.random.default_rng(5), batch=1)  # what np_random(5) draws
    np.testing.assert_allclose(obs, functional.observe(state)[0].astype(np.float32), rtol=0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        action = rng.uniform(-1, 1, 2)
        obs, reward, terminated, truncated, info = gym_env.step(action)
        state, expected_obs, expected_reward, _ = functional.step(state, action[None])
        assert obs.dtype == np.float32 and obs.shape == (12,)
        assert isinstance(reward, float) and reward == pytest.approx(expected_reward[0], rel=1e-12)
        np.testing.assert_allclose(obs, expected_obs[0].astype(np.float32), rtol=0)
        assert (terminated, truncated, info) == (False, False, {})



@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["CartPole", "Pendulum", "MountainCar", "Reacher", "Swimmer"])
def test_the_host_path_equals_a_batch_of_one(name, dtype):
    """The classic ids step one unbatched env on the host (gradgym.envs.host): the same
    observations and rewards as the functional env with a batch of one -- to the last bit in
    float64; in float32 numpy's exp of a scalar and of a vector differ by a few ulps."""
    gym_env = GymEnv(name, dtype=dtype)
    assert gym_env._unbatched
    obs, _ = gym_env.reset(seed=3)
    functional = gradgym.make(name, dtype=dtype)
    state = functional.reset(np.random.default_rng(3), batch=1)
    np.testing.assert_array_equal(obs, functional.observe(state)[0].astype(np.float32))
    rng = np.random.default_rng(1)
    for _ in range(200):
        action = rng.uniform(-1, 1, functional.spec.act_dim).astype(dtype)
        obs, reward, terminated, _, _ = gym_env.step(action)
        state, expected_obs, expected_reward, expected_done = functional.step(state, action[None])
        ulp = 0 if dtype == "float64" else 1e-6
        np.testing.assert_allclose(obs, expected_obs[0].astype(np.float32), rtol=ulp, atol=0)
        assert reward == pytest.approx(float(expected_reward[0]), rel=ulp, abs=0)
        assert terminated == bool(expected_done[0])

def test_seeding_is_reproducible():
    env = gymnasium.make("gradgym/CartPole-v0")
    first, _ = env.reset(seed=11)
    other, _ = env.reset(seed=12)
    again, _ = env.reset(seed=11)
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)


def test_task_kwargs_pass_through_make():
    env = gymnasium.make("gradgym/Reacher-v0", num_joints=3)
    assert env.observation_space.shape == (11,)
    assert env.action_space.shape == (3,)
    assert env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    assert gymnasium.make("gradgym/Fish-v0", num_urchins=0).observation_space.shape == (6,)
    with pytest.raises(ValueError, match="available: num_joints, torque_scale"):
        gymnasium.make("gradgym/Reacher-v0", joints=3)
    with pytest.raises(ValueError, match="num_joints must be an int >= 1"):
        gymnasium.make("gradgym/Reacher-v0", num_joints=0)


def test_render_modes():
    env = gymnasium.make("gradgym/MountainCar-v0", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert env.metadata["render_fps"] == 50  # 1 / dt: videos play in real time
    quiet = GymEnv("MountainCar")
    quiet.reset(seed=0)
    assert quiet.render() is None
    with pytest.raises(ValueError, match="'human' is not supported; allowed: None, 'rgb_array'"):
        GymEnv("MountainCar", render_mode="human")


def test_module_prefix_imports_gradgym():
    """``gym.make("gradgym:gradgym/<Name>-v0")`` works without importing gradgym first."""
    code = (
        "import sys, gymnasium\n"
        "assert 'gradgym' not in sys.modules\n"
        "env = gymnasium.make('gradgym:gradgym/Pendulum-v0')\n"
        "obs, _ = env.reset(seed=0)\n"
        "print(type(env.unwrapped).__name__, obs.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GymEnv", "(3,)"]


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def reacher():
    env = GymEnv("Reacher", num_joints=2)
    env.reset(seed=0)
    return env


@pytest.mark.parametrize(
    ("action", "error", "match"),
    [
        (np.zeros(3, np.float32), ValueError, r"action has shape \(3,\), expected \(2,\)"),
        (np.zeros((1, 2), np.float32), ValueError, r"action has shape \(1, 2\), expected \(2,\)"),
        (np.float32(0.5), ValueError, r"action has shape \(\), expected \(2,\)"),
        (["a", "b"], TypeError, "action dtype <U1 is not allowed; use a real-number"),
        (np.zeros(2, complex), TypeError, "action dtype complex128 is not allowed"),
        (np.array([0.0, np.nan], np.float32), ValueError, "action contains NaN or inf"),
        (np.array([np.inf, 0.0]), ValueError, "action contains NaN or inf"),
        (np.array([0.5, 1.5], np.float32), ValueError,
         r"action values \[1.5\] at indices \[1\] are outside the allowed range \[-1, 1\]"),
        (np.array([-1.01, -3.0]), ValueError, r"indices \[0, 1\] are outside"),
    ],
)
def test_bad_actions_get_clear_errors(reacher, action, error, match):
    obs_before = reacher._observation()
    with pytest.raises(error, match=match):
        reacher.step(action)
    np.testing.assert_array_equal(reacher._observation(), obs_before)  # nothing stepped


def test_good_actions_of_any_real_kind(reacher):
    for action in (np.array([1.0, -1.0]), np.array([0.25, 0.5], np.float32), [0.1, -0.2],
                   np.array([0.5, 0.5], np.float16), np.array([1, 0]), np.array([True, False]),
                   [0, -1]):
        obs, *_ = reacher.step(action)
        assert obs.shape == (8,)


def test_actions_within_float_rounding_of_the_bounds_are_clipped(reacher):
    twin = GymEnv("Reacher", num_joints=2)
    twin.reset(seed=0)
    action = np.array([np.nextafter(np.float32(1), np.float32(2)), -1.0000005], np.float32)
    original = action.copy()
    obs, *_ = reacher.step(action)
    np.testing.assert_array_equal(action, original)  # the caller's array is left alone
    expected, *_ = twin.step(np.array([1.0, -1.0], np.float32))
    np.testing.assert_array_equal(obs, expected)


def test_step_and_render_before_reset():
    env = GymEnv("Pendulum", render_mode="rgb_array")
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(1, np.float32))
    with pytest.raises(RuntimeError, match="before reset"):
        env.render()


# ----------------------------------------------------------------------------- termination


@dataclass(frozen=True)
class TippingPendulum(Pendulum):
    """A task that terminates (as MuJoCo tasks may): once it leans more than 0.5 rad."""

    def terminated(self, backend, state):
        return backend.xp.abs(state.angle) > 0.5


def test_a_terminating_task_terminates_through_gymnasium(monkeypatch):
    monkeypatch.setattr(envs_core, "_REGISTRY", dict(envs_core._REGISTRY))
    gym_registry = dict(gymnasium.registry)  # restored afterwards: no test env leaks out
    monkeypatch.setattr(gymnasium.envs.registration, "registry", gym_registry)
    monkeypatch.setattr(gymnasium, "registry", gym_registry)
    envs_core.register("TippingPendulum", TippingPendulum)
    assert register_gymnasium_envs() == ["gradgym/TippingPendulum-v0"]
    env = gymnasium.make("gradgym/TippingPendulum-v0")
    check_env(env.unwrapped)
    env.reset(seed=0)
    env.unwrapped._state = env.unwrapped._state._replace(angle=np.float32(0.49))  # one env, unbatched
    _, _, terminated, truncated, _ = env.step(np.ones(1, np.float32))
    assert (terminated, truncated) == (True, False)
