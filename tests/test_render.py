"""Rendering of the classic tasks and the GIF/MP4 video helpers."""

from __future__ import annotations

import imageio.v3 as iio
import matplotlib.colors
import numpy as np
import pytest
import torch

import gradgym
from gradgym.envs import render_rollout, to_numpy, write_gif, write_mp4, write_video
from gradgym.envs.rendering import BACKGROUND, FRAME_SIZE, reward_color

torch.set_num_threads(1)

from env_cases import CASE_IDS
from env_cases import CLASSIC_CASES as ENV_CASES

BACKGROUND_RGB = np.round(np.array(matplotlib.colors.to_rgb(BACKGROUND)) * 255).astype(np.uint8)


def rollout(env, batch=2, steps=8, seed=0):
    """States of a short rollout under constant full-throttle actions (they move everything)."""
    state = env.reset(seed, batch=batch)
    action = env.backend.asarray(np.ones((batch, env.spec.act_dim)))
    states = [state]
    for _ in range(steps):
        state, *_ = env.step(state, action)
        states.append(state)
    return states


def drawn_fraction(frame):
    """Fraction of pixels that differ from the background color."""
    return float(np.mean(np.any(frame != BACKGROUND_RGB, axis=-1)))


@pytest.mark.parametrize(("name", "kwargs"), ENV_CASES, ids=CASE_IDS)
def test_frame_shape_dtype_not_blank_and_follows_the_state(name, kwargs):
    env = gradgym.make(name, dtype="float64", **kwargs)
    states = rollout(env)
    first, last = env.render(states[0], 0), env.render(states[-1], 0)
    for frame in (first, last):
        assert frame.shape == (FRAME_SIZE, FRAME_SIZE, 3)
        assert frame.dtype == np.uint8
        assert frame.flags.c_contiguous
        # something is drawn, but it is a scene, not a filled canvas
        assert 0.005 < drawn_fraction(frame) < 0.9
        assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 10
    assert np.any(first != last), "the frame did not change when the state changed"
    # another batch entry (another random start) is drawn differently
    assert np.any(env.render(states[0], 1) != first)
    # the same state draws the same frame again (artists are reused, nothing accumulates)
    np.testing.assert_array_equal(env.render(states[0], 0), first)


@pytest.mark.parametrize(("name", "kwargs"), ENV_CASES, ids=CASE_IDS)
def test_a_frame_size_draws_the_same_scene_scaled(name, kwargs):
    """A smaller frame (a grid's tiles in ``gradgym view``) is the full-size frame scaled down,
    up to anti-aliasing and pixel snapping: far closer to it than to another state's frame."""
    from PIL import Image

    env = gradgym.make(name, dtype="float64", **kwargs)
    state = env.reset(3, batch=2)

    def downscaled(index, size):
        frame = Image.fromarray(env.render(state, index))
        return np.asarray(frame.resize((size, size), Image.BOX)).astype(int)

    for size in (128, 101):
        small = env.render(state, 0, size)
        assert small.shape == (size, size, 3) and small.dtype == np.uint8
        same = np.abs(small - downscaled(0, size)).mean()
        other = np.abs(small - downscaled(1, size)).mean()
        assert same < 3.0 and same < 0.5 * other, (size, same, other)
    assert env.render(state, 0, FRAME_SIZE).tobytes() == env.render(state, 0).tobytes()
    with pytest.raises(ValueError, match="frame size"):
        env.render(state, 0, 8)


@pytest.mark.parametrize(("name", "kwargs"), ENV_CASES, ids=CASE_IDS)
def test_frame_shows_the_reward_color(name, kwargs):
    env = gradgym.make(name, dtype="float64", **kwargs)
    state = env.reset(1, batch=1)
    reward = float(to_numpy(env.reward(state))[0])
    frame = env.render(state)
    expected = np.round(np.array(reward_color(reward)[:3]) * 255).astype(np.uint8)
    # the reward gauge (and the body it colors) carry exactly this color when reward > 0
    if reward > 0.02:
        assert np.any(np.all(np.abs(frame.astype(int) - expected) <= 1, axis=-1))


def test_reward_colors_run_from_red_to_green():
    low, mid, high = (np.array(reward_color(r)[:3]) for r in (0.0, 0.5, 1.0))
    assert low[0] > low[1] and high[1] > high[0]  # red at 0, green at 1
    assert mid[0] > 0.9 and mid[1] > 0.9  # yellow-ish in between
    np.testing.assert_array_equal(reward_color(-5.0), reward_color(0.0))  # clipped
    np.testing.assert_array_equal(reward_color(7.0), reward_color(1.0))
    np.testing.assert_array_equal(reward_color(float("nan")), reward_color(0.0))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_backend_draws_the_numpy_frame(backend):
    numpy_env = gradgym.make("Reacher", dtype="float64", num_joints=3)
    state = numpy_env.reset(2, batch=3)
    env = gradgym.make("Reacher", backend=backend, dtype="float64", num_joints=3)
    np.testing.assert_array_equal(env.render(env.as_state(state), 2), numpy_env.render(state, 2))


PAGING_CASES = [  # a task whose window pages along, and a move of its state to another page
    ("CartPole", lambda s: s._replace(x=np.array([25.0]))),
    ("MountainCar", lambda s: s._replace(x=np.array([7.0]))),
    ("Swimmer", lambda s: s._replace(xy=np.array([[9.0, -6.0]]))),
]


def test_objects_that_leave_the_window_stay_in_view():
    """Cart, car and fish far from the origin: the window pages along instead of losing them."""
    for name, move in PAGING_CASES:
        env = gradgym.make(name, dtype="float64")
        state = env.reset(0, batch=1)
        home, away = env.render(state), env.render(move(state))
        assert np.any(home != away)
        assert drawn_fraction(away) > 0.005
        # coming back redraws the original window exactly
        np.testing.assert_array_equal(env.render(state), home)


def test_states_in_different_pages_drawn_in_turn_match_a_fresh_renderer():
    """One renderer keeps a background per window page (a grid's members in different pages,
    drawn in turn): every frame is the one a fresh renderer draws for that state alone."""
    for name, move in PAGING_CASES:
        env = gradgym.make(name, dtype="float64")
        home = env.reset(0, batch=1)
        states = [home, move(home), home, move(home)]
        for state, frame in zip(states, [env.render(s) for s in states], strict=True):
            np.testing.assert_array_equal(frame, gradgym.make(name, dtype="float64").render(state))


def test_render_index_out_of_range():
    env = gradgym.make("Pendulum")
    with pytest.raises(IndexError, match="out of range"):
        env.render(env.reset(0, batch=2), index=2)


# ----------------------------------------------------------------------------- videos


def test_render_rollout_accepts_a_list_or_a_stacked_state():
    env = gradgym.make("Swimmer", backend="torch", dtype="float64", num_urchins=3)
    states = rollout(env, batch=2, steps=5)
    stacked = env.State(*(torch.stack(leaves) for leaves in zip(*states, strict=True)))
    from_list = render_rollout(env, states, index=1)
    from_stack = render_rollout(env, stacked, index=1)
    assert len(from_list) == len(from_stack) == 6
    for a, b in zip(from_list, from_stack, strict=True):
        np.testing.assert_array_equal(a, b)


def test_render_rollout_errors():
    env = gradgym.make("Pendulum")
    with pytest.raises(ValueError, match="states is empty"):
        render_rollout(env, [])
    with pytest.raises(TypeError, match="list of states or one stacked state"):
        render_rollout(env, "states")
    ragged = env.State(np.zeros((4, 1)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="same leading time axis"):
        render_rollout(env, ragged)


def test_gif_decodes_with_the_expected_frames(tmp_path):
    env = gradgym.make("CartPole", dtype="float64")
    frames = render_rollout(env, rollout(env, batch=1, steps=11))
    path = write_video(tmp_path / "cartpole.gif", frames, fps=20)
    decoded = iio.imread(path, index=None)
    assert decoded.shape == (12, FRAME_SIZE, FRAME_SIZE, 3)
    # GIF stores a 256-color palette: close to the frames, not identical
    assert np.mean(np.abs(decoded.astype(int) - np.stack(frames))) < 4.0
    assert iio.immeta(path)["duration"] == 50  # 1000 ms / 20 fps
    assert iio.immeta(path)["loop"] == 0


def test_gif_merges_identical_frames_but_keeps_the_duration(tmp_path):
    still = np.zeros((32, 32, 3), np.uint8)
    moved = np.full((32, 32, 3), 200, np.uint8)
    path = write_gif(tmp_path / "still.gif", [still, still, still, moved], fps=10)
    with iio.imopen(path, "r") as gif:
        durations = [gif.metadata(index=i)["duration"] for i in range(gif.properties().n_images)]
    assert durations == [300, 100]


def test_mp4_decodes_with_the_expected_frames(tmp_path):
    env = gradgym.make("Reacher", num_joints=3)
    frames = render_rollout(env, rollout(env, batch=1, steps=9))
    path = write_video(tmp_path / "reacher.mp4", frames, fps=20)
    decoded = iio.imread(path, index=None)
    assert decoded.shape == (10, FRAME_SIZE, FRAME_SIZE, 3)
    # lossy H.264: close on average
    assert np.mean(np.abs(decoded.astype(int) - np.stack(frames))) < 6.0


def test_mp4_pads_odd_frame_sizes(tmp_path):
    frames = [np.full((33, 45, 3), 10 * i, np.uint8) for i in range(4)]
    decoded = iio.imread(write_mp4(tmp_path / "odd.mp4", frames), index=None)
    assert decoded.shape == (4, 34, 46, 3)


@pytest.mark.parametrize(
    ("path", "frames", "fps", "error", "match"),
    [
        ("video.avi", [np.zeros((8, 8, 3), np.uint8)], 30, ValueError,
         "allowed suffixes: .gif, .mp4"),
        ("video", [np.zeros((8, 8, 3), np.uint8)], 30, ValueError, "no suffix"),
        ("missing/video.gif", [np.zeros((8, 8, 3), np.uint8)], 30, FileNotFoundError,
         "does not exist"),
        ("video.gif", [], 30, ValueError, "frames is empty"),
        ("video.mp4", [], 30, ValueError, "frames is empty"),
        ("video.gif", [np.zeros((8, 8), np.uint8)], 30, ValueError, "H x W x 3 uint8"),
        ("video.gif", [np.zeros((8, 8, 3), np.float32)], 30, ValueError, "H x W x 3 uint8"),
        ("video.gif", [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], 30,
         ValueError, "same size"),
        ("video.gif", [np.zeros((8, 8, 3), np.uint8)], 0, ValueError, "fps"),
        ("video.mp4", [np.zeros((8, 8, 3), np.uint8)], -1.0, ValueError, "fps"),
    ],
)
def test_video_errors(tmp_path, path, frames, fps, error, match):
    with pytest.raises(error, match=match):
        write_video(tmp_path / path, frames, fps=fps)
    assert not (tmp_path / path).exists()


def test_video_path_that_is_a_folder(tmp_path):
    (tmp_path / "out.gif").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_gif(tmp_path / "out.gif", [np.zeros((8, 8, 3), np.uint8)])
