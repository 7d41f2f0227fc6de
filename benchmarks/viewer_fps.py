"""Frames per second that ``gradgym view`` delivers to a page, beside what rendering alone allows;
the iteration-time overhead of a run that a viewer follows.

Frames: a real ``gradgym view`` server (subprocess) and a websocket client that counts the
frames it receives at speed "max". Peers measured in the same run, in this process: the
task's renderer alone (MuJoCo's EGL renderer, the matplotlib renderer for each of the 16
members of a grid, at the viewer's tile size and at full size) and JPEG encoding alone; and,
for the WebGL alternative, what streaming scene state would cost (``mj_forward`` + body
poses) per frame.

Follow overhead: the same ``gradgym run`` config in this process, unfollowed and followed (a
fresh follow marker: the run writes its best plan so far once a second), alternated; the
mean wall time between iterations, and (robust to a busy machine, where the A/B difference is
noise) the time the run spends in its follow hooks (marker checks, live replay writes) over
the time of its iterations.

    python benchmarks/viewer_fps.py [--seconds 8] [--pairs 3]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine_load import load_average
from PIL import Image
from websockets.sync.client import connect

import gradgym
from gradgym.platform.viewer.session import parse_frame_message, tile_size


def delivered_fps(env_args: list[str], grid: int, seconds: float) -> tuple[float, int]:
    """(frames/s, bytes/frame) a websocket client receives from ``gradgym view ENV_ARGS``."""
    server = subprocess.Popen([sys.executable, "-m", "gradgym.platform.cli", "view", *env_args,
                               "--port", "0"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        line = server.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, proxy=None) as tab:
            tab.send(json.dumps({"cmd": "speed", "value": 0}))
            tab.send(json.dumps({"cmd": "grid", "value": grid}))
            while True:  # skip frames until the grid shows
                message = tab.recv(timeout=120)
                if isinstance(message, bytes) and _header(message)["grid"] == grid:
                    break
            frames, size, started = 0, 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                message = tab.recv(timeout=60)
                if isinstance(message, bytes):
                    frames += 1
                    size += len(message)
            return frames / (time.perf_counter() - started), size // max(frames, 1)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _header(message: bytes) -> dict:
    return parse_frame_message(message)[0]


def render_alone_fps(name: str, members: int, seconds: float, full_size: bool = False,
                     **kwargs) -> tuple[float, float]:
    """(frames/s of rendering ``members`` states per frame, JPEG encode ms of such a frame);
    a grid's members at the viewer's tile size, or at the env's own size (``full_size``)."""
    env = gradgym.make(name, backend="numpy", **kwargs)
    state = env.reset(0, batch=members)
    side = int(members ** 0.5)
    size = None if full_size or side == 1 else tile_size(env.render(state, 0).shape[1], side)
    tiles = [env.render(state, i, size) for i in range(members)]
    frames, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        action = np.random.uniform(-1, 1, (members, env.spec.act_dim)).astype(np.float32)
        state, *_ = env.step(state, action)
        tiles = [env.render(state, i, size) for i in range(members)]
        frames += 1
    fps = frames / (time.perf_counter() - started)
    image = np.concatenate([np.concatenate(tiles[r * side:(r + 1) * side], 1) for r in range(side)], 0)
    started = time.perf_counter()
    for _ in range(20):
        Image.fromarray(image).save(io.BytesIO(), "JPEG", quality=80)
    return fps, 1e3 * (time.perf_counter() - started) / 20


def scene_state_cost(name: str, repeats: int = 500) -> tuple[float, int]:
    """(µs, bytes) per frame of streaming scene state instead of pixels: ``mj_forward`` and
    every geom's position and orientation (what a WebGL client would draw)."""
    import mujoco

    env = gradgym.make(name, backend="numpy")
    model = env.task.physics.model
    data = mujoco.MjData(model)
    started = time.perf_counter()
    for _ in range(repeats):
        mujoco.mj_forward(model, data)
        payload = np.concatenate([data.geom_xpos.ravel(), data.geom_xmat.ravel()]).astype(np.float32).tobytes()
    return 1e6 * (time.perf_counter() - started) / repeats, len(payload)


class HookTimer:
    """Wraps the run side of following (``ReplayRecorder``'s hooks) and sums their time."""

    def __init__(self):
        from gradgym.platform.replays import ReplayRecorder

        self.seconds = {"wants_best_params": 0.0, "save_live": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)
        for name in self.seconds:
            setattr(ReplayRecorder, name, self._timed(name, getattr(ReplayRecorder, name)))

    def _timed(self, name: str, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)


def follow_overhead(pairs: int, iters: int) -> tuple[list[float], list[float], list[float]]:
    """Mean seconds between iterations of a run, unfollowed and followed, alternated; and per
    followed run, the fraction of its iteration time spent in the follow hooks."""
    from gradgym.platform.config import compose_run_config, default_run_layers
    from gradgym.platform.records import RunRecord
    from gradgym.platform.runner import execute_run

    hooks = HookTimer()
    hook_shares: list[float] = []

    def one(folder: Path, follow: bool) -> float:
        cfg = compose_run_config(*default_run_layers(), [
            "pipeline=trajectory", "backend=torch", "env=Pendulum", f"pipeline.iters={iters}",
            "pipeline.render=false", "pipeline.grad_hist_every=0", "tracking.enabled=false",
            "progress=false", "torch_threads=1", f"run_dir={folder}"])
        stamps: list[float] = []
        stop = threading.Event()
        if follow:  # a viewer attaches once the run holds its folder, as `gradgym view` does
            keeper = threading.Thread(target=_keep_fresh, args=(RunRecord(folder), stop), daemon=True)
            keeper.start()
        hooks.reset()
        try:
            execute_run(cfg, on_iteration=lambda metrics, step: stamps.append(time.perf_counter()))
        finally:
            stop.set()
        gaps = np.diff(stamps[10:])
        if follow:
            assert RunRecord(folder).read_replay(live=True) is not None, "no live replay written"
            hook_shares.append(sum(hooks.seconds.values()) / (stamps[-1] - stamps[0]))
            print(f"  followed run: {hooks.calls['save_live']} live-replay offers, "
                  f"{1e6 * sum(hooks.seconds.values()) / len(stamps):.1f} µs/iteration in the hooks")
        return float(np.mean(gaps))

    plain, followed = [], []
    with tempfile.TemporaryDirectory() as root:
        for pair in range(pairs):
            plain.append(one(Path(root) / f"plain{pair}", follow=False))
            followed.append(one(Path(root) / f"followed{pair}", follow=True))
    return plain, followed, hook_shares


def _keep_fresh(record, stop: threading.Event) -> None:
    touched = 0.0
    while not stop.wait(0.05):
        if record.is_run_folder() and time.monotonic() - touched >= 1.0:
            record.touch_follow_marker()
            touched = time.monotonic()


def frame_rates(seconds: float) -> None:
    """The frames/s table: page vs rendering alone, and the scene-state alternative."""
    print(f"\n{'case':<34}{'page frames/s':>14}{'render alone':>14}{'ratio':>7}"
          f"{'jpeg ms':>9}{'KB/frame':>10}  target")
    # The viewer draws MuJoCo frames without shadows, reflections and multisampling
    # (render_effects=false, its default); the last MuJoCo line is the full-quality renderer.
    cases = [("HalfCheetah-v5 480x480", [], "HalfCheetah-v5", 1, 30),
             ("HalfCheetah-v5 480x480 + effects", ["render_effects=true"], "HalfCheetah-v5", 1, 30),
             ("Pendulum 4x4 grid (16x128x128)", [], "Pendulum", 16, 15),
             ("CartPole 4x4 grid (16x128x128)", [], "CartPole", 16, 15)]
    for label, extra, name, grid, target in cases:
        page, size = delivered_fps([name, *extra], grid, seconds)
        kwargs = {"render_effects": "effects" in label} if "-v5" in name else {}
        alone, jpeg_ms = render_alone_fps(name, grid, seconds, **kwargs)
        verdict = "met" if page >= target else "MISSED"
        print(f"{label:<34}{page:>14.1f}{alone:>14.1f}{page / alone:>7.2f}{jpeg_ms:>9.2f}"
              f"{size / 1024:>10.1f}  >= {target} {verdict}")
    for name in ("Pendulum", "CartPole"):
        alone, jpeg_ms = render_alone_fps(name, 16, seconds, full_size=True)
        print(f"{name} 4x4 grid at full size (16x256x256, as the viewer drew grids before): "
              f"render alone {alone:.1f} frames/s, jpeg of 1024x1024 {jpeg_ms:.2f} ms")
    us, size = scene_state_cost("HalfCheetah-v5")
    print(f"scene state instead of pixels (HalfCheetah-v5): {us:.0f} µs and {size / 1024:.1f} KB "
          "per frame on the server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--skip-frames", action="store_true", help="only the follow overhead")
    parser.add_argument("--skip-follow", action="store_true", help="only the frame rates")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"load average at start: {load_average()}")

    if not args.skip_frames:
        frame_rates(args.seconds)
    if not args.skip_follow:
        follow_table(args.pairs, args.iters)
    print(f"load average at end: {load_average()}")


def follow_table(pairs: int, iters: int) -> None:
    """The follow overhead lines."""
    print()
    plain, followed, hook_shares = follow_overhead(pairs, iters)
    overhead = np.median(followed) / np.median(plain) - 1
    print(f"followed run, ms between iterations: unfollowed {[round(1e3 * v, 3) for v in plain]}, "
          f"followed {[round(1e3 * v, 3) for v in followed]}; medians differ by "
          f"{100 * overhead:+.2f}% (noise on a busy machine)")
    print(f"time a followed run spends in its follow hooks: "
          f"{', '.join(f'{100 * share:.3f}%' for share in hook_shares)} of its iteration time "
          f"(target <= 2%)")


if __name__ == "__main__":
    main()
