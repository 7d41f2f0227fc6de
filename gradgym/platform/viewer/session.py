"""One page's simulation: a batch of envs on numpy, an action source, JPEG frames of a grid.

A :class:`Session` belongs to one browser tab. Its env, renderer and state are touched
only from the server's render thread (MuJoCo's GL context lives in the thread that made
it); the page's commands arrive from the event loop through a thread-safe queue and are
applied between frames.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradgym.platform.viewer.target import ViewerError, ViewTarget

SOURCES = ("zero", "random", "run")
GRID_SIZES = (1, 4, 9, 16)
MAX_SPEED = 0.0  # speed 0 in a command: as fast as the server can render
JPEG_QUALITY = 80
MAX_SENT_WIDTH = 960  # the page shows frames 480 px wide: twice that stays sharp on HiDPI
GRID_WIDTH = 512
"""Width a grid's picture is drawn at: its members are drawn ``GRID_WIDTH // side`` px wide
(at most their own width), not full size and then shrunk. A 4x4 grid of the classic tasks'
256 px frames was halved to 512 px before sending anyway."""


@dataclass(frozen=True)
class LoadedReplay:
    """A run's replay as read from its folder (``version`` grows with every new one)."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    version: int

    def actions(self, obs: np.ndarray, members: np.ndarray, t: int) -> np.ndarray:
        """The actions ``[n, act_dim]`` of the plan's rows ``members`` at step ``t`` (plans),
        or of the tanh MLP for ``obs`` (policies)."""
        if self.meta["kind"] == "plan":
            plan = self.arrays["actions"]
            return plan[members % plan.shape[0], min(t, plan.shape[1] - 1)].astype(np.float32)
        hidden = obs.astype(np.float32)
        for index in range(len(self.arrays) // 2):
            hidden = np.tanh(hidden @ self.arrays[f"weight_{index}"] + self.arrays[f"bias_{index}"])
        return hidden.astype(np.float32)


def frame_message(header: dict[str, Any], jpeg: bytes) -> bytes:
    """One websocket message: a 4-byte big-endian header length, the JSON header, the JPEG."""
    encoded = json.dumps(header).encode()
    return struct.pack(">I", len(encoded)) + encoded + jpeg


def parse_frame_message(message: bytes) -> tuple[dict[str, Any], bytes]:
    """The inverse of :func:`frame_message` (for clients written in Python)."""
    (length,) = struct.unpack(">I", message[:4])
    return json.loads(message[4:4 + length]), message[4 + length:]


def tile_size(own_width: int, side: int) -> int | None:
    """The frame width (``Env.render``'s ``size``) of the members of a ``side`` x ``side``
    grid whose frames are ``own_width`` px wide at the env's own size: ``GRID_WIDTH // side``,
    or ``None`` (their own size) where that is no smaller."""
    size = GRID_WIDTH // side
    return None if own_width <= size else size


class Session:
    """The state of one page: what plays, how fast, from which seed, with which actions."""

    def __init__(self, target: ViewTarget, replay: LoadedReplay | None = None):
        self.target = target
        self.playing = True
        self.speed = 1.0
        self.grid = 1
        self.seed = target.seed
        self.source = "run" if replay is not None or target.run is not None else "zero"
        self.replay = replay  # the newest replay; used from the next episode on
        self._episode_replay: LoadedReplay | None = None
        self._commands: deque[dict[str, Any]] = deque()
        self._needs_frame = True  # the first frame, and a frame after every command
        self._env: Any = None
        self._own_width: int | None = None  # width of a member's frame at the env's own size

    # ------------------------------------------------------------------ event loop side
    def command(self, message: dict[str, Any]) -> None:
        """Apply (play/pause/speed) or queue (step/reset/grid/source) a page's command.

        Raises:
            ViewerError: an unknown command or a bad value (sent back to the page).
        """
        name = message.get("cmd")
        if name == "play":
            self.playing = True
        elif name == "pause":
            self.playing = False
        elif name == "speed":
            self.speed = _speed(message.get("value"))
        elif name in ("step", "reset", "grid", "source"):
            _check_queued(name, message)
            self._commands.append(message)
        else:
            raise ViewerError(f"unknown command {name!r}; allowed: play, pause, speed, step, "
                              "reset, grid, source")

    @property
    def wants_frame(self) -> bool:
        """Whether the next frame should be made now (playing, or a command to show)."""
        return self.playing or self._needs_frame or bool(self._commands)

    def frame_interval_s(self) -> float:
        """Seconds between frames at the chosen speed (env time / speed; 0: no pacing)."""
        if self.speed == MAX_SPEED:
            return 0.0
        return self._dt / self.speed

    # ------------------------------------------------------------------ render thread side
    def next_frame(self) -> bytes:
        """Apply queued commands, advance one step if playing, and encode the frame message."""
        if self._env is None:
            self._build()
        stepped = False
        while self._commands:
            message = self._commands.popleft()
            stepped |= self._apply(message)
        if self.playing and not stepped and not self._needs_frame:
            self._advance()
        self._needs_frame = False
        return frame_message(self._header(), self._encode(self._tiles()))

    def close(self) -> None:
        """Drop the env and its renderer; call from the render thread (a MuJoCo renderer
        frees its GL context in the thread that made it)."""
        self._env = self._state = None

    def _apply(self, message: dict[str, Any]) -> bool:
        name = message["cmd"]
        if name == "step":
            self._advance()
            return True
        if name == "reset":
            self.seed = int(message.get("seed", self.seed))
        elif name == "grid":
            self.grid = int(message["value"])
        elif name == "source":
            self.source = message["value"]
        self._reset()
        return True

    def _build(self) -> None:
        from gradgym.envs import make

        if self._env is None:
            self._env = make(self.target.env, backend="numpy", **self.target.env_kwargs)
        self._reset()

    def _reset(self) -> None:
        env = self._env
        self._episode_replay = self.replay if self.source == "run" else None
        plan = self._episode_replay is not None and self._episode_replay.meta["kind"] == "plan"
        # A plan's start states are the run's (its batch from its seed); a member index
        # beyond the batch wraps around.
        batch = int(self._episode_replay.meta["batch"]) if plan else self.grid
        self._state = env.reset(self.seed, batch=batch)
        self._members = np.arange(self.grid)
        self._rng = np.random.default_rng(self.seed)
        self._t = 0
        self._episode_len = (int(self._episode_replay.meta["horizon"]) if plan
                             else env.spec.horizon)
        self._rewards = np.zeros(self.grid)
        self._returns = np.zeros(self.grid)

    def _advance(self) -> None:
        env = self._env
        first_replay = self.source == "run" and self._episode_replay is None and self.replay
        if self._t >= self._episode_len or first_replay:
            self._reset()  # loop the episode (with a newer replay, if one came)
            return
        action = self._actions()
        self._state, _, reward, _ = env.step(self._state, action)
        rewards = np.asarray(reward)[self._members % len(np.asarray(reward))]
        self._rewards = rewards.astype(float)
        self._returns = self._returns + self._rewards
        self._t += 1

    def _actions(self) -> np.ndarray:
        env = self._env
        batch = env.task.batch_shape(self._state)[0]
        act_dim = env.spec.act_dim
        if self._episode_replay is not None:
            members = np.arange(batch)
            obs = np.asarray(env.observe(self._state))
            return self._episode_replay.actions(obs, members, self._t)
        if self.source == "random":
            return self._rng.uniform(-1.0, 1.0, (batch, act_dim)).astype(np.float32)
        return np.zeros((batch, act_dim), np.float32)

    def _tiles(self) -> np.ndarray:
        """The members' frames side by side, drawn straight into one picture."""
        env, batch = self._env, self._env.task.batch_shape(self._state)[0]
        side = math.isqrt(len(self._members))
        size = self._tile_size(side)
        picture = None
        for position, member in enumerate(self._members):
            frame = env.render(self._state, int(member % batch), size)
            height, width = frame.shape[:2]
            if picture is None:
                picture = np.empty((side * height, side * width, 3), np.uint8)
            row, column = divmod(position, side)
            picture[row * height:(row + 1) * height, column * width:(column + 1) * width] = frame
        return picture

    def _tile_size(self, side: int) -> int | None:
        """The width members are drawn at in a ``side`` x ``side`` grid (see :func:`tile_size`)."""
        if side == 1:
            return None
        if self._own_width is None:
            self._own_width = self._env.render(self._state, 0).shape[1]
        return tile_size(self._own_width, side)

    @staticmethod
    def _encode(picture: np.ndarray) -> bytes:
        """JPEG of the picture; halved (box filter) while wider than the page shows it sharp."""
        from PIL import Image

        height, width = picture.shape[:2]
        image = Image.frombuffer("RGB", (width, height), picture, "raw", "RGB", 0, 1)  # no copy
        while image.width > MAX_SENT_WIDTH:
            image = image.reduce(2)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    def _header(self) -> dict[str, Any]:
        replay = self._episode_replay
        return {
            "t": self._t,
            "episode_len": self._episode_len,
            "seed": self.seed,
            "grid": self.grid,
            "source": self.source,
            "playing": self.playing,
            "reward": float(np.mean(self._rewards)),
            "return": float(np.mean(self._returns)),
            "replay_iteration": replay.meta.get("iteration") if replay else None,
            "replay_live": replay.meta.get("live") if replay else None,
        }

    @property
    def _dt(self) -> float:
        from gradgym.envs import registered

        if self._env is not None:
            return self._env.spec.dt
        return registered()[self.target.env].factory(**self.target.env_kwargs).dt


def _speed(value: Any) -> float:
    try:
        speed = float(value)
    except (TypeError, ValueError):
        speed = -1.0
    if not (speed == MAX_SPEED or 0.01 <= speed <= 100.0):
        raise ViewerError(f"speed must be between 0.01 and 100 (times real time) or 0 (as fast "
                          f"as possible), got {value!r}")
    return speed


def _check_queued(name: str, message: dict[str, Any]) -> None:
    if name == "reset" and "seed" in message:
        seed = message["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ViewerError(f"seed must be an int >= 0, got {seed!r}")
    if name == "grid" and message.get("value") not in GRID_SIZES:
        raise ViewerError(f"grid must be one of {GRID_SIZES} members, got {message.get('value')!r}")
    if name == "source" and message.get("value") not in SOURCES:
        raise ViewerError(f"source must be one of {SOURCES}, got {message.get('value')!r}")
