"""Milliseconds per rendered frame for every classic env, beside a full redraw.

gradgym's renderers reuse their artists and blit: each frame restores a cached background
and draws only the moving artists. The peer, measured in the same run on the same
renderer, redraws the whole figure each frame (``canvas.draw()``, what a naive matplotlib
renderer does). Also times writing the frames as GIF and MP4.

    python benchmarks/render_speed.py [--frames 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import gradgym
from gradgym.envs import render_rollout, write_gif, write_mp4

CASES = [
    ("CartPole", {}),
    ("Pendulum", {}),
    ("MountainCar", {}),
    ("Reacher", {"num_joints": 2}),
    ("Reacher", {"num_joints": 3}),
    ("Swimmer", {"num_urchins": 5}),
    ("Swimmer", {"num_urchins": 8}),
]


def rollout(env, steps: int, seed: int = 0) -> list:
    """States of one episode under random actions."""
    rng = np.random.default_rng(seed)
    state = env.reset(seed, batch=1)
    states = [state]
    for _ in range(steps - 1):
        action = rng.uniform(-1, 1, (1, env.spec.act_dim)).astype(np.float32)
        state, *_ = env.step(state, action)
        states.append(state)
    return states


def best_ms(fn, states, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for state in states:
            fn(state)
        best = min(best, (time.perf_counter() - start) / len(states))
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()

    print(f"{'env':<22}{'blit ms/frame':>15}{'redraw ms/frame':>17}{'speedup':>9}"
          f"{'gif ms/frame':>14}{'mp4 ms/frame':>14}")
    with tempfile.TemporaryDirectory() as folder:
        for name, kwargs in CASES:
            env = gradgym.make(name, **kwargs)
            states = rollout(env, args.frames)
            env.render(states[0])  # builds the renderer (imports matplotlib, loads fonts)
            blit = best_ms(lambda s, env=env: env.render(s), states)
            frames = render_rollout(env, states)
            env._renderers[None].blit = False  # the peer: same renderer, whole figure per frame
            redraw = best_ms(lambda s, env=env: env.render(s), states)
            redrawn = render_rollout(env, states)
            # same pictures both ways (up to anti-aliasing at the edges of moving artists)
            assert max(np.mean(a != b) for a, b in zip(frames, redrawn, strict=True)) < 0.01
            start = time.perf_counter()
            write_gif(Path(folder) / "video.gif", frames)
            gif = 1e3 * (time.perf_counter() - start) / len(frames)
            start = time.perf_counter()
            write_mp4(Path(folder) / "video.mp4", frames)
            mp4 = 1e3 * (time.perf_counter() - start) / len(frames)
            label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
            print(f"{label:<22}{blit:>15.2f}{redraw:>17.2f}{redraw / blit:>8.1f}x"
                  f"{gif:>14.2f}{mp4:>14.2f}")


if __name__ == "__main__":
    main()
