"""The MuJoCo family: parity with Gymnasium v5, backends, rendering, adapters, bad input.

Gradients and optimization through the MuJoCo tasks are in ``test_mujoco_grad.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import gradgym
from gradgym.envs import registered, to_numpy

gymnasium = pytest.importorskip("gymnasium")

MUJOCO_ENVS = [
    "InvertedPendulum-v5",
    "InvertedDoublePendulum-v5",
    "Swimmer-v5",
    "Hopper-v5",
    "HalfCheetah-v5",
    "Walker2d-v5",
    "Ant-v5",
    "Humanoid-v5",
]
PARITY_STEPS = 200
# Both sides run the same MuJoCo calls on the same float64 inputs; what may differ is the
# order of float operations in the rewards (e.g. Humanoid's mass-weighted sum), ~1e-15.
PARITY_TOL = 1e-8


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _mujoco_warnings_to_logging():
    """Gymnasium's half_cheetah.xml makes MuJoCo's compiler warn (a deprecated attribute),
    which MuJoCo would append to a MUJOCO_LOG.TXT in the working directory."""
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(logging.getLogger("mujoco").info)
    yield
    mujoco.set_mju_user_warning(previous)


def gymnasium_start(name: str, seed: int, **kwargs):
    """A Gymnasium env reset with ``seed`` and our env at its exact reset state."""
    reference = gymnasium.make(name, **kwargs)
    observation, _ = reference.reset(seed=seed)
    data = reference.unwrapped.data
    env = gradgym.make(name, dtype="float64", **kwargs)
    state = env.state_from_qpos_qvel(data.qpos[None].copy(), data.qvel[None].copy())
    return reference, observation, env, state


# ----------------------------------------------------------------------------- registry


def test_the_eight_tasks_are_registered_as_the_mujoco_family():
    entries = {name: entry for name, entry in registered().items() if entry.family == "mujoco"}
    assert sorted(entries) == sorted(MUJOCO_ENVS)
    for entry in entries.values():
        assert entry.backends == ("numpy", "jax", "torch")


@pytest.mark.parametrize("name", MUJOCO_ENVS)
def test_spec_matches_gymnasium(name):
    env = gradgym.make(name)
    reference = gymnasium.make(name)
    assert env.spec.obs_dim == reference.observation_space.shape[0]
    assert env.spec.act_dim == reference.action_space.shape[0]
    assert env.spec.dt == pytest.approx(reference.unwrapped.dt)
    assert env.spec.horizon == reference.spec.max_episode_steps


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", MUJOCO_ENVS)
def test_parity_with_gymnasium_v5(name):
    """Same seed, same reset state, same 200 random actions: same observations, rewards
    and terminations as ``gymnasium.make(name)``, up to and including termination."""
    reference, observation, env, state = gymnasium_start(name, seed=7)
    np.testing.assert_allclose(env.observe(state)[0], observation, rtol=PARITY_TOL, atol=PARITY_TOL)
    actions = np.random.default_rng(7).uniform(-1.0, 1.0, (PARITY_STEPS, 1, env.spec.act_dim))
    # gradgym actions are in [-1, 1]; Gymnasium's are the actuator controls they map to
    controls = env.task.ctrl_from_action(np, actions)
    assert np.all(np.abs(controls) <= reference.action_space.high + 1e-12)
    for t in range(PARITY_STEPS):
        state, obs, reward, done = env.step(state, actions[t])
        ref_obs, ref_reward, ref_terminated, truncated, _ = reference.step(controls[t, 0])
        np.testing.assert_allclose(obs[0], ref_obs, rtol=PARITY_TOL, atol=PARITY_TOL,
                                   err_msg=f"{name} observation at step {t}")
        assert reward[0] == pytest.approx(ref_reward, rel=PARITY_TOL, abs=PARITY_TOL), f"step {t}"
        assert bool(done[0]) == ref_terminated, f"{name}: termination differs at step {t}"
        assert not truncated
        if ref_terminated:
            break


@pytest.mark.parametrize("name", MUJOCO_ENVS)
def test_parity_continues_past_termination(name):
    """Random actions end most episodes within a few steps; stepping both envs on (the bare
    Gymnasium env keeps simulating) compares all 200 steps, through falls and contacts."""
    reference, _, env, state = gymnasium_start(name, seed=5)
    reference = reference.unwrapped  # no TimeLimit / order checks: steps after termination
    actions = np.random.default_rng(5).uniform(-1.0, 1.0, (PARITY_STEPS, 1, env.spec.act_dim))
    controls = env.task.ctrl_from_action(np, actions)
    for t in range(PARITY_STEPS):
        state, obs, reward, done = env.step(state, actions[t])
        ref_obs, ref_reward, ref_terminated, _, _ = reference.step(controls[t, 0])
        np.testing.assert_allclose(obs[0], ref_obs, rtol=PARITY_TOL, atol=PARITY_TOL,
                                   err_msg=f"{name} observation at step {t}")
        assert reward[0] == pytest.approx(ref_reward, rel=PARITY_TOL, abs=PARITY_TOL), f"step {t}"
        assert bool(done[0]) == ref_terminated, f"{name}: termination differs at step {t}"


@pytest.mark.parametrize("name", ["Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5"])
def test_parity_with_terminate_when_unhealthy_off(name):
    """The constructor argument reaches both sides: never done, while the healthy reward
    still follows health."""
    reference, _, env, state = gymnasium_start(name, seed=3, terminate_when_unhealthy=False)
    actions = np.random.default_rng(3).uniform(-1.0, 1.0, (PARITY_STEPS, 1, env.spec.act_dim))
    controls = env.task.ctrl_from_action(np, actions)
    unhealthy_steps = 0
    for t in range(PARITY_STEPS):
        state, obs, reward, done = env.step(state, actions[t])
        ref_obs, ref_reward, ref_terminated, _, _ = reference.step(controls[t, 0])
        np.testing.assert_allclose(obs[0], ref_obs, rtol=PARITY_TOL, atol=PARITY_TOL)
        assert reward[0] == pytest.approx(ref_reward, rel=PARITY_TOL, abs=PARITY_TOL)
        assert not done[0] and not ref_terminated
        unhealthy_steps += int(not reference.unwrapped.is_healthy)
    assert unhealthy_steps > 0, "the rollout never became unhealthy: the check proved nothing"


def test_batched_step_equals_one_env_at_a_time():
    env = gradgym.make("Walker2d-v5", dtype="float64")
    state = env.reset(11, batch=5)
    actions = np.random.default_rng(0).uniform(-1, 1, (10, 5, env.spec.act_dim))
    singles = [env.State(*(leaf[i:i + 1] for leaf in state)) for i in range(5)]
    for action in actions:
        state, obs, reward, done = env.step(state, action)
        for i in range(5):
            singles[i], obs_i, reward_i, done_i = env.step(singles[i], action[i:i + 1])
            np.testing.assert_array_equal(obs_i[0], obs[i])
            assert reward_i[0] == reward[i] and done_i[0] == done[i]


@pytest.mark.parametrize("name", ["HalfCheetah-v5", "Ant-v5"])  # MuJoCo's batch; the MjData loop
def test_threads_give_the_same_steps(name):
    one = gradgym.make(name, dtype="float64")
    two = gradgym.make(name, dtype="float64", num_threads=2)
    state = one.reset(4, batch=7)
    np.testing.assert_array_equal(two.reset(4, batch=7).readouts, state.readouts)  # mj_forward
    actions = np.random.default_rng(4).uniform(-1, 1, (5, 7, one.spec.act_dim))
    state_one = state_two = state
    for action in actions:
        state_one, obs_one, _, _ = one.step(state_one, action)
        state_two, obs_two, _, _ = two.step(state_two, action)
        np.testing.assert_array_equal(obs_one, obs_two)


@pytest.mark.parametrize("name", ["Hopper-v5", "InvertedDoublePendulum-v5"])  # no readouts; readouts
def test_vec_env_restarts_fallen_robots_at_fresh_reset_states(name):
    from gradgym.envs import VecEnv

    env = gradgym.make(name, dtype="float64")
    envs = VecEnv(env, num_envs=6)
    envs.reset(seed=0)
    qpos0, scale = env.task.physics.model.qpos0, env.task.reset_noise_scale
    rng = np.random.default_rng(0)
    restarts = 0
    for _ in range(100):  # full-force random actions topple both within a few dozen steps
        before = envs.state.env_state
        action = rng.choice([-1.0, 1.0], (6, env.spec.act_dim))
        _, stepped_obs, _, _ = env.step(before, action)
        obs, _, terminated, truncated, info = envs.step(action)
        done = np.asarray(terminated) | np.asarray(truncated)
        np.testing.assert_array_equal(info["final_obs"], stepped_obs)
        np.testing.assert_array_equal(obs[~done], stepped_obs[~done])
        if done.any():
            restarts += int(done.sum())
            fresh = envs.state.env_state
            assert np.abs(np.asarray(fresh.qpos)[done] - qpos0).max() <= scale
            assert not np.any(np.asarray(fresh.ctrl)[done])
            # the readouts of a restarted entry are those of its new state
            np.testing.assert_array_equal(
                np.asarray(fresh.readouts)[done],
                env.task.physics.forward(np.asarray(fresh.qpos)[done], np.asarray(fresh.qvel)[done]),
            )
            np.testing.assert_array_equal(np.asarray(envs.state.steps)[done], 0)
    assert restarts >= 6


def test_tasks_pickle_without_their_engine():
    import pickle

    env = gradgym.make("Ant-v5", healthy_z_range=(0.3, 1.0))
    env.reset(0, batch=2)  # builds the engine
    task = pickle.loads(pickle.dumps(env.task))
    assert task == env.task and "_physics" not in task.__dict__
    assert task.physics.nq == 15


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("name", ["Hopper-v5", "Ant-v5", "InvertedDoublePendulum-v5"])
def test_torch_and_jax_steps_equal_numpy(name):
    jnp = pytest.importorskip("jax.numpy")
    torch = pytest.importorskip("torch")
    start = gradgym.make(name, dtype="float64").reset(5, batch=3)
    actions = np.random.default_rng(5).uniform(-1, 1, (8, 3, gradgym.make(name).spec.act_dim))
    results = {}
    for backend, convert in (("numpy", np.asarray), ("torch", torch.as_tensor), ("jax", jnp.asarray)):
        env = gradgym.make(name, backend=backend, dtype="float64")
        state, rewards, dones = env.as_state(start), [], []
        for action in actions:
            state, obs, reward, done = env.step(state, convert(action))
            rewards.append(to_numpy(reward))
            dones.append(to_numpy(done))
        results[backend] = (to_numpy(obs), np.stack(rewards), np.stack(dones))
    for backend in ("torch", "jax"):
        obs, rewards, dones = results[backend]
        # same physics bits; reductions in the reward may sum in another order
        np.testing.assert_allclose(obs, results["numpy"][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rewards, results["numpy"][1], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(dones, results["numpy"][2])


def test_jax_jit_vmap_and_scan_through_the_step():
    jax = pytest.importorskip("jax")
    env = gradgym.make("Swimmer-v5", backend="jax", dtype="float64")
    twin = gradgym.make("Swimmer-v5", dtype="float64")
    start = twin.reset(2, batch=4)
    actions = np.random.default_rng(2).uniform(-1, 1, (6, 4, env.spec.act_dim))

    def rollout(state, actions):
        def body(state, action):
            state, _, reward, _ = env.step(state, action)
            return state, reward
        return jax.lax.scan(body, state, actions)

    _, rewards = jax.jit(rollout)(env.as_state(start), jax.numpy.asarray(actions))
    expected_state, expected = start, []
    for action in actions:
        expected_state, _, reward, _ = twin.step(expected_state, action)
        expected.append(reward)
    np.testing.assert_allclose(np.asarray(rewards), np.stack(expected), rtol=1e-12)
    # vmap over a leading axis of independent batches of 2
    split = env.State(*(jax.numpy.reshape(leaf, (2, 2) + leaf.shape[1:]) for leaf in env.as_state(start)))
    _, vmapped_obs, _, _ = jax.vmap(env.step)(split, jax.numpy.reshape(actions[0], (2, 2, -1)))
    _, obs, _, _ = twin.step(start, actions[0])
    np.testing.assert_allclose(np.reshape(np.asarray(vmapped_obs), obs.shape), obs, rtol=1e-12)


def test_torch_compile_through_a_mujoco_step():
    torch = pytest.importorskip("torch")
    env = gradgym.make("HalfCheetah-v5", backend="torch", dtype="float64")
    state = env.reset(0, batch=2)
    action = torch.full((2, env.spec.act_dim), 0.3, dtype=torch.float64, requires_grad=True)
    # dynamo tracing with the graph break at the host call; "eager" skips inductor codegen
    _, obs, reward, _ = torch.compile(env.step, backend="eager")(state, action)
    (grad,) = torch.autograd.grad(reward.sum(), action)
    _, eager_obs, eager_reward, _ = env.step(state, action)
    (eager_grad,) = torch.autograd.grad(eager_reward.sum(), action)
    torch.testing.assert_close(obs, eager_obs)
    torch.testing.assert_close(grad, eager_grad)
    assert grad.abs().sum() > 0


def test_float32_env_keeps_its_dtype():
    torch = pytest.importorskip("torch")
    env = gradgym.make("HalfCheetah-v5", backend="torch")
    state = env.reset(0, batch=2)
    state, obs, reward, done = env.step(state, torch.zeros(2, env.spec.act_dim))
    assert obs.dtype == reward.dtype == state.qpos.dtype == torch.float32
    assert done.dtype == torch.bool


def test_reset_draws_gymnasium_noise_around_qpos0():
    env = gradgym.make("Ant-v5", dtype="float64")
    state = env.reset(0, batch=2000)
    qpos0 = env.task.physics.model.qpos0
    noise = np.asarray(state.qpos) - qpos0
    assert np.abs(noise).max() <= 0.1 and np.abs(noise).max() > 0.09  # U(-0.1, 0.1)
    assert np.std(np.asarray(state.qvel)) == pytest.approx(0.1, rel=0.05)  # N(0, 0.1^2)
    assert not np.any(np.asarray(env.reset(0, batch=2000).qpos) - np.asarray(state.qpos))
    assert np.any(np.asarray(env.reset(1, batch=2000).qpos) - np.asarray(state.qpos))


# ----------------------------------------------------------------------------- rendering


def test_render_frames_show_the_robot_and_change(tmp_path):
    imageio = pytest.importorskip("imageio.v3")
    from gradgym.envs import render_rollout, write_gif

    env = gradgym.make("HalfCheetah-v5", width=96, height=64)
    state = env.reset(0, batch=2)
    states = [state]
    for _ in range(3):
        state, _, _, _ = env.step(state, np.ones((2, env.spec.act_dim), dtype=np.float32))
        states.append(state)
    frames = render_rollout(env, states, index=1)
    assert frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
    assert frames[0].std() > 10.0, "blank frame"
    assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 1.0, "frames do not change"
    path = write_gif(tmp_path / "cheetah.gif", frames, fps=20)
    decoded = imageio.imread(path, index=None)
    assert decoded.shape[0] >= 2 and decoded.shape[1:3] == (64, 96)


@pytest.mark.parametrize("name", ["InvertedPendulum-v5", "Humanoid-v5"])
def test_render_each_kind_of_camera(name):
    env = gradgym.make(name, width=64, height=48)
    state = env.reset(0, batch=1)
    frame = env.render(state, 0)
    assert frame.shape == (48, 64, 3) and frame.std() > 5.0
    assert env.render(state, 0) is not frame  # a fresh array each time, same renderer
    small = env.render(state, 0, size=32)  # a frame size keeps the aspect ratio
    assert small.shape == (24, 32, 3) and small.std() > 5.0


# ----------------------------------------------------------------------------- Gymnasium adapter


def test_gymnasium_adapter_runs_a_mujoco_task_to_termination():
    env = gymnasium.make("gradgym/Hopper-v5", render_mode="rgb_array", width=64, height=48)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (11,)
    terminated, steps = False, 0
    while not terminated and steps < 300:
        obs, _, terminated, _, _ = env.step(env.action_space.sample())
        steps += 1
    assert terminated, "random actions should topple the hopper within 300 steps"
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.std() > 5.0


# ----------------------------------------------------------------------------- bad input


def test_state_from_qpos_qvel_rejects_wrong_shapes():
    env = gradgym.make("Ant-v5")
    with pytest.raises(ValueError, match=r"qpos must have shape \[B, 15\]"):
        env.state_from_qpos_qvel(np.zeros((2, 14)), np.zeros((2, 14)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        env.state_from_qpos_qvel(np.zeros((2, 15)), np.zeros((3, 14)))
    with pytest.raises(TypeError, match="MuJoCo family only"):
        gradgym.make("Pendulum").state_from_qpos_qvel(np.zeros((1, 1)), np.zeros((1, 1)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frame_skip": 0}, "frame_skip must be an int >= 1"),
        ({"reset_noise_scale": -1.0}, "reset_noise_scale must be a number >= 0"),
        ({"healthy_z_range": (2.0, 1.0)}, "healthy_z_range must be a pair"),
        ({"main_body": "tail"}, "main_body 'tail' is not a body"),
        ({"xml_file": "no_such_robot.xml"}, "neither a path nor one of Gymnasium's MuJoCo assets"),
        ({"gravity": 1.0}, "unknown argument"),
        ({"ctrl_cost_weight": "high"}, "ctrl_cost_weight must be a number"),
        ({"terminate_when_unhealthy": 0}, "terminate_when_unhealthy must be True or False"),
    ],
)
def test_bad_task_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradgym.make("Ant-v5", **kwargs)


def test_constructor_arguments_change_the_task():
    env = gradgym.make("Ant-v5", include_cfrc_ext_in_observation=False, exclude_current_positions_from_observation=False)
    assert env.spec.obs_dim == 15 + 14
    slow = gradgym.make("HalfCheetah-v5", frame_skip=10)
    assert slow.spec.dt == pytest.approx(0.1)
