"""The Gymnasium ids as drop-in replacements: ``gym.make("gradgym/Hopper-v5")`` against
Gymnasium's own ``gym.make("Hopper-v5")``, step after step; pickling; SB3; wrappers."""

from __future__ import annotations

import copy
import pickle
import warnings

import cloudpickle
import gymnasium
import numpy as np
import pytest

import gradgym  # noqa: F401  (registers the ids)

TASKS = ["InvertedPendulum", "InvertedDoublePendulum", "Swimmer", "Hopper", "HalfCheetah",
         "Walker2d", "Ant", "Humanoid"]
# Non-default constructor arguments (Gymnasium's names) for a few tasks.
NON_DEFAULT = [
    ("Hopper", {"terminate_when_unhealthy": False, "exclude_current_positions_from_observation": False,
                "ctrl_cost_weight": 0.01, "reset_noise_scale": 0.05, "frame_skip": 3}),
    ("Ant", {"include_cfrc_ext_in_observation": False, "main_body": "torso",
             "healthy_z_range": (0.3, 1.5), "contact_cost_weight": 1e-3}),
    ("Humanoid", {"include_cinert_in_observation": False, "include_cvel_in_observation": False,
                  "exclude_current_positions_from_observation": False, "healthy_reward": 2.0}),
    ("InvertedDoublePendulum", {"healthy_reward": 5.0, "reset_noise_scale": 0.2}),
    ("Swimmer", {"forward_reward_weight": 2.0, "exclude_current_positions_from_observation": False}),
    ("HalfCheetah", {"xml_file": "half_cheetah.xml", "ctrl_cost_weight": 0.5}),
]


def make_pair(task: str, **kwargs):
    """Gymnasium's env and gradgym's, made the same way."""
    return gymnasium.make(f"{task}-v5", **kwargs), gymnasium.make(f"gradgym/{task}-v5", **kwargs)


def assert_same(ours, theirs, what: str) -> None:
    """Equal to 1e-9 (the reward may differ in the last bits: terms added in another
    order); bools and dict keys exactly."""
    if isinstance(theirs, tuple):
        assert len(ours) == len(theirs), what
        for i, (mine, their) in enumerate(zip(ours, theirs)):
            assert_same(mine, their, f"{what}[{i}]")
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), f"{what}: keys {sorted(ours)} != {sorted(theirs)}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{what}[{key}]")
    elif isinstance(theirs, (bool, np.bool_)):
        assert ours == theirs, f"{what}: {ours} != {theirs}"
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9, err_msg=what)
        assert np.shape(ours) == np.shape(theirs), what


def run_side_by_side(task: str, seed: int, steps: int, **kwargs) -> int:
    """Step both envs with the same actions (some outside the control range, which both
    accept), resetting both on termination or truncation; returns the episodes begun."""
    theirs, ours = make_pair(task, **kwargs)
    assert ours.observation_space == theirs.observation_space
    assert ours.action_space == theirs.action_space
    assert ours.action_space.dtype == theirs.action_space.dtype == np.float32
    assert ours.spec.max_episode_steps == theirs.spec.max_episode_steps
    assert ours.spec.reward_threshold == theirs.spec.reward_threshold
    assert ours.metadata["render_fps"] == theirs.metadata["render_fps"]
    rng = np.random.default_rng(seed)
    low, high = theirs.action_space.low, theirs.action_space.high
    episodes = 1
    assert_same(ours.reset(seed=seed), theirs.reset(seed=seed), "reset")
    for step in range(steps):
        action = rng.uniform(low * 1.2, high * 1.2).astype(np.float32)
        expected = theirs.step(action)
        got = ours.step(action)
        for name, mine, their in zip(("obs", "reward", "terminated", "truncated", "info"),
                                     got, expected):
            assert_same(mine, their, f"{task} seed {seed} step {step} {name}")
        if expected[2] or expected[3]:
            episodes += 1
            reset_seed = None if episodes % 2 else seed + episodes  # both kinds of reset
            assert_same(ours.reset(seed=reset_seed), theirs.reset(seed=reset_seed), "reset")
    return episodes


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_same_episodes_as_gymnasium(task):
    episodes = sum(run_side_by_side(task, seed, steps=1000) for seed in (0, 1))
    assert episodes >= 2


@pytest.mark.slow
@pytest.mark.parametrize(("task", "kwargs"), NON_DEFAULT, ids=[task for task, _ in NON_DEFAULT])
def test_same_episodes_as_gymnasium_with_non_default_arguments(task, kwargs):
    run_side_by_side(task, seed=3, steps=300, **kwargs)


@pytest.mark.parametrize("task", TASKS)
def test_same_first_steps_as_gymnasium(task):
    run_side_by_side(task, seed=7, steps=30)


def test_an_id_builds_only_its_own_task():
    with pytest.raises(TypeError, match="unknown argument.*'name'"):
        gymnasium.make("gradgym/Hopper-v5", name="Ant-v5")
    with pytest.raises(TypeError, match="unexpected keyword argument 'name'|multiple values"):
        gymnasium.make("gradgym/Pendulum-v0", name="CartPole")
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['healthy_z_rnage'\]"):
        gymnasium.make("gradgym/Hopper-v5", healthy_z_range=(0.5, 2), healthy_z_rnage=1)


def test_bad_actions_get_clear_errors():
    env = gymnasium.make("gradgym/Hopper-v5").unwrapped
    env.reset(seed=0)
    qpos = env.data.qpos.copy()
    for action, error, match in [
        (np.array([0.0, np.nan, 0.0]), ValueError, "NaN or inf"),
        (np.zeros(4), ValueError, r"shape \(4,\), expected \(3,\)"),
        (np.array(["a", "b", "c"]), TypeError, "not a real number type"),
    ]:
        with pytest.raises(error, match=match):
            env.step(action)
    np.testing.assert_array_equal(env.data.qpos, qpos)  # nothing stepped
    env.step(np.array([1, 0, -1]))  # ints, as Gymnasium takes them
    env.step([True, False, True])


@pytest.mark.parametrize("task", ["Hopper", "Humanoid"])
def test_set_state_matches_gymnasium_and_checks_shapes(task):
    theirs, ours = (env.unwrapped for env in make_pair(task))
    theirs.reset(seed=0), ours.reset(seed=0)
    rng = np.random.default_rng(1)
    qpos = theirs.init_qpos + rng.uniform(-0.1, 0.1, theirs.model.nq)
    qvel = rng.normal(size=theirs.model.nv)
    theirs.set_state(qpos, qvel), ours.set_state(qpos, qvel)
    for field in ("qpos", "qvel", "qacc", "xpos", "cfrc_ext", "act"):  # mj_forward ran
        np.testing.assert_array_equal(getattr(ours.data, field), getattr(theirs.data, field), field)
    action = np.full(theirs.action_space.shape, 0.1, np.float32)
    assert_same(ours.step(action), theirs.step(action), "step after set_state")
    with pytest.raises(ValueError, match=r"qpos of shape \(\d+,\).*got \(3,\)"):
        ours.set_state(np.zeros(3), qvel)


# ----------------------------------------------------------------------------- rendering


def test_rendering_arguments_and_depth_match_gymnasium():
    kwargs = {"width": 64, "height": 48, "max_geom": 500, "camera_name": "track",
                  "visual_options": {2: True}}
    for mode in ("rgb_array", "depth_array"):
        theirs, ours = make_pair("Hopper", render_mode=mode, **kwargs)
        theirs.reset(seed=1)
        ours.reset(seed=1)
        for _ in range(3):
            theirs.step(np.full(3, 0.3, np.float32))
            ours.step(np.full(3, 0.3, np.float32))
        np.testing.assert_array_equal(ours.render(), theirs.render())
    camera = {"distance": 2.0, "elevation": -10.0, "trackbodyid": 1}
    for extra in ({"camera_id": 0}, {"default_camera_config": camera}):
        theirs, ours = make_pair("Ant", render_mode="rgb_array", width=32, height=32, **extra)
        theirs.reset(seed=2)
        ours.reset(seed=2)
        np.testing.assert_array_equal(ours.render(), theirs.render())


# ----------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("env_id", ["gradgym/Hopper-v5", "gradgym/Humanoid-v5", "gradgym/InvertedPendulum-v5",
                                    "gradgym/Pendulum-v0", "gradgym/Fish-v0"])
def test_envs_pickle_and_deepcopy_before_and_after_rendering(env_id):
    env = gymnasium.make(env_id, render_mode="rgb_array")
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads),
                         (copy.deepcopy, None)):
        assert (dumps(env) if loads is None else loads(dumps(env))) is not None  # before reset
    env.reset(seed=4)
    action = env.action_space.sample()
    env.step(action)  # a stepped env holds what its last state's checks computed (a cache)
    for rendered in (False, True):
        if rendered:
            env.render()
        for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads),
                             (copy.deepcopy, None)):
            twin = dumps(env) if loads is None else loads(dumps(env))
            # the copy goes on from the same state, with the same generator
            assert_same(twin.step(action)[:2], copy.deepcopy(env).step(action)[:2], env_id)
            assert_same(twin.reset(), copy.deepcopy(env).reset(), env_id)
            assert twin.render().shape == env.render().shape
    # a copy steps its own MjData: equal steps to the original's, neither moving the other
    twin = pickle.loads(pickle.dumps(env))
    for _ in range(5):
        action = env.action_space.sample()
        assert_same(twin.step(action)[:2], env.step(action)[:2], env_id)


# ----------------------------------------------------------------------------- gradients


def test_gradients_from_a_gymnasium_id():
    torch = pytest.importorskip("torch")
    env = gymnasium.make("gradgym/InvertedPendulum-v5").unwrapped
    env.reset(seed=0)
    functional, state = env.functional(backend="torch", dtype="float64")
    action = np.array([1.5], np.float32)  # in InvertedPendulum's control range [-3, 3]
    normalized = torch.tensor(env.normalized_action(action)[None], requires_grad=True)
    next_state, obs, reward, _ = functional.step(state, normalized)
    expected_obs, expected_reward, *_ = env.step(action)
    np.testing.assert_allclose(obs.detach().numpy()[0], expected_obs, rtol=0, atol=1e-12)
    assert float(reward[0]) == expected_reward
    next_state.qvel[0, 1].backward()  # the pole's angular velocity depends on the push
    assert normalized.grad is not None and torch.isfinite(normalized.grad).all()
    assert float(normalized.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- classic ids


def test_the_fish_has_its_own_name_and_swimmer_is_mujoco():
    assert "gradgym/Swimmer-v0" not in gymnasium.registry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "out of date ... upgrade to v5" warning any more
        fish = gymnasium.make("gradgym/Fish-v0")
    with pytest.warns(UserWarning, match="latest versioned environment `gradgym/Swimmer-v5`"):
        swimmer = gymnasium.make("gradgym/Swimmer")
    assert fish.unwrapped.env.spec.name == "Swimmer" and fish.observation_space.shape == (16,)
    assert swimmer.unwrapped.task.name == "Swimmer-v5"


def test_rescale_action_with_asymmetric_bounds_reaches_the_bounds():
    env = gymnasium.wrappers.RescaleAction(gymnasium.make("gradgym/Fish-v0"), 0.41, 3.63)
    env.reset(seed=0)
    for value in np.linspace(0.41, 3.63, 600):  # boundary and interior, as float32 rounds them
        env.step(np.full(2, value, np.float32))
    mujoco = gymnasium.wrappers.RescaleAction(gymnasium.make("gradgym/InvertedPendulum-v5"), 0.41, 3.63)
    mujoco.reset(seed=0)
    mujoco.step(np.full(1, 3.63, np.float32))


def test_normalize_observation_and_reward_threshold():
    env = gymnasium.wrappers.NormalizeObservation(gymnasium.make("gradgym/HalfCheetah-v5"))
    env.reset(seed=0)
    for _ in range(20):
        obs, *_ = env.step(env.action_space.sample())
    assert obs.shape == (17,) and np.all(np.isfinite(obs))
    assert gymnasium.spec("gradgym/Hopper-v5").reward_threshold == gymnasium.spec("Hopper-v5").reward_threshold


def test_record_video(tmp_path):
    import moviepy  # noqa: F401 - Gymnasium's RecordVideo writes through it (a test extra)
    env = gymnasium.wrappers.RecordVideo(
        gymnasium.make("gradgym/Hopper-v5", render_mode="rgb_array", width=64, height=64),
        str(tmp_path), episode_trigger=lambda episode: True, disable_logger=True)
    env.reset(seed=0)
    for _ in range(10):
        env.step(env.action_space.sample())
    env.close()
    assert list(tmp_path.glob("*.mp4"))


# ----------------------------------------------------------------------------- SB3


@pytest.mark.parametrize("env_id", [f"gradgym/{task}-v5" for task in TASKS]
                         + ["gradgym/Pendulum-v0", "gradgym/Fish-v0"])
def test_sb3_check_env(env_id):
    env_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # remarks on unbounded observation spaces
        env_checker.check_env(gymnasium.make(env_id).unwrapped)


@pytest.mark.slow
def test_sb3_ppo_through_subprocvecenv():
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = make_vec_env("gradgym:gradgym/Hopper-v5", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
                       vec_env_kwargs={"start_method": "spawn"})
    try:
        model = PPO("MlpPolicy", vec, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
        model.learn(total_timesteps=256)
        assert model.num_timesteps >= 256
    finally:
        vec.close()
