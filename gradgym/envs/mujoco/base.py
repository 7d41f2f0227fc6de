"""What the eight MuJoCo tasks share: their state, reset, step and rendering.

A MuJoCo task is a :class:`~gradgym.envs.core.Task` whose dynamics is one Gymnasium-v5 env
step of MuJoCo itself (``frame_skip`` substeps, :mod:`gradgym.envs.mujoco.physics`), made
an operation of the backend by :mod:`gradgym.envs.mujoco.bridge`. Everything else --
observation, reward, health and termination -- is written once against the Array API
over the state below, so on torch and jax its gradient flows by autodiff and joins the
physics' Jacobians.

Actions are in [-1, 1] like every gradgym env and are mapped linearly onto the
actuators' ``ctrlrange`` (Inverted Pendulum: [-3, 3], Humanoid: [-0.4, 0.4], the others
[-1, 1]); rewards' control costs are taken on the resulting controls, as Gymnasium takes
them on its actions.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from gradgym.envs.backends import Backend, to_numpy
from gradgym.envs.core import Renderer, Task, component
from gradgym.envs.host import FLOAT64_ONE, FLOAT64_ZERO

if TYPE_CHECKING:  # imported lazily: importing gradgym must not load MuJoCo
    from gradgym.envs.mujoco.physics import Physics


class MujocoState(NamedTuple):
    """The batched state of a MuJoCo task (leaves ``[B, ...]``)."""

    qpos: Any  # [B, nq] generalized positions (MuJoCo's qpos)
    qvel: Any  # [B, nv] generalized velocities
    ctrl: Any  # [B, nu] actuator controls applied by the last step (zeros after reset)
    x_velocity: Any  # [B] forward (x) velocity of the task's tracked point over the last step
    readouts: Any  # [B, k] MjData fields the task reads after a step, flattened
    warmstart: Any  # [B, nv] constraint-solver warm start: bookkeeping, no gradient


class HostMujocoState(MujocoState):
    """One env's state on the host path (unbatched numpy leaves), with a memo of what
    :func:`per_state` methods computed from it. Build it with :meth:`of`: the NamedTuple's
    own constructor is a Python function, several times slower."""

    @classmethod
    def of(cls, *leaves: Any) -> HostMujocoState:
        """The state of these six leaves, in :class:`MujocoState`'s order."""
        return tuple.__new__(cls, leaves)

    def __getstate__(self) -> None:
        # The memo is a cache keyed by functions that pickle cannot name (the decorated
        # methods' originals): copies and pickles start without it.
        return None


_MISSING = object()  # per_state's "not computed yet": None is a result


@dataclass(frozen=True)
class Camera:
    """How a task is filmed: a free camera, or one that tracks ``track_body``."""

    distance: float
    elevation: float = -20.0
    azimuth: float = 90.0
    lookat: tuple[float, float, float] = (0.0, 0.0, 0.0)
    track_body: int | None = None


@dataclass(frozen=True)
class MujocoTask(Task):
    """Base class of the MuJoCo tasks (Gymnasium v5 semantics).

    Subclasses set the class variables and implement ``observe``, ``reward`` and, for
    tasks that end, ``terminated``. The shared fields are the constructor arguments every
    Gymnasium v5 MuJoCo env has, plus rendering size and engine threads.
    """

    xml_file: str = ""
    frame_skip: int = 1
    reset_noise_scale: float = 0.0
    width: int = 480
    height: int = 480
    num_threads: int = 1
    # Shadows, reflections and 4x multisampling in rendered frames. Off, a frame costs ~1/25
    # on a software GL renderer (llvmpipe; measured in benchmarks/viewer_fps.py): what a
    # live viewer wants on a machine without a GPU.
    render_effects: bool = True

    horizon = 1000
    State = MujocoState
    # MjData fields the task reads after a step (see Physics.readouts).
    readout_fields: ClassVar[tuple[str, ...]] = ()
    # Reset noise of qvel: "uniform" in [-scale, scale] or "normal" with std scale
    # (qpos noise is always uniform).
    qvel_noise: ClassVar[str] = "uniform"
    # Whether the reward or info reads ``x_velocity`` (the locomotion tasks). The balancing
    # tasks' states hold 0 there: tracking an x they never read costs the host step time.
    tracks_x: ClassVar[bool] = True
    camera: ClassVar[Camera] = Camera(distance=4.0, track_body=1)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        from gradgym.envs.mujoco.physics import asset_path

        _check_int(self, "frame_skip", 1)
        _check_int(self, "width", 1)
        _check_int(self, "height", 1)
        _check_int(self, "num_threads", 0)
        for field in dataclasses.fields(self):
            _check_like_default(self, field)
        if self.reset_noise_scale < 0:
            raise ValueError(
                f"{self.name}: reset_noise_scale must be a number >= 0, got {self.reset_noise_scale!r}"
            )
        asset_path(self.xml_file)

    # ------------------------------------------------------------------ model facts
    @property
    def physics(self) -> Physics:
        """The MuJoCo engine of this task (one per distinct task, shared by its envs)."""
        physics = self.__dict__.get("_physics")
        if physics is None:  # kept on the instance: the step path reads it often
            physics = _physics(self)
            object.__setattr__(self, "_physics", physics)
        return physics

    def __getstate__(self) -> dict[str, Any]:
        # the engine (threads, MuJoCo batches) is rebuilt where the task is unpickled
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @property
    def dt(self) -> float:  # type: ignore[override]
        return self.physics.dt

    @property
    def act_dim(self) -> int:
        return self.physics.nu

    @property
    def obs_dim(self) -> int:
        return int(self.observe(np, self._zero_state()).shape[-1])

    def batch_shape(self, state: MujocoState) -> tuple[int, ...]:
        return tuple(state.qpos.shape[:-1])

    # ------------------------------------------------------------------ states
    def reset_state(self, backend: Backend, rng: Any, batch: int) -> MujocoState:
        model = self.physics.model
        keys = backend.split(rng, 3)
        scale = self.reset_noise_scale
        qpos = backend.asarray(model.qpos0) + backend.uniform(keys[0], (batch, model.nq), -scale, scale)
        if self.qvel_noise == "normal":
            qvel = scale * backend.normal(keys[1], (batch, model.nv))
        else:
            qvel = backend.uniform(keys[1], (batch, model.nv), -scale, scale)
        return self.state_from_qpos_qvel(backend, qpos, qvel)

    def state_from_qpos_qvel(self, backend: Backend, qpos: Any, qvel: Any) -> MujocoState:
        """A state at generalized positions ``qpos [B, nq]`` and velocities ``qvel [B, nv]``
        (any backend's arrays), at rest otherwise: no control, no warm start, readouts
        as after Gymnasium's ``reset`` (``mj_forward``)."""
        from gradgym.envs.mujoco.bridge import physics_readouts

        physics = self.physics
        for label, value, size in (("qpos", qpos, physics.nq), ("qvel", qvel, physics.nv)):
            shape = tuple(getattr(value, "shape", ()))
            if len(shape) != 2 or shape[-1] != size:
                raise ValueError(f"{self.name}: {label} must have shape [B, {size}], got {shape}")
        if qpos.shape[0] != qvel.shape[0]:
            raise ValueError(
                f"{self.name}: qpos and qvel batch sizes differ ({qpos.shape[0]} vs {qvel.shape[0]})"
            )
        qpos, qvel = backend.asarray(qpos), backend.asarray(qvel)
        batch = qpos.shape[0]
        return MujocoState(
            qpos=qpos,
            qvel=qvel,
            ctrl=backend.zeros((batch, physics.nu)),
            x_velocity=backend.zeros((batch,)),
            readouts=physics_readouts(backend.xp, physics, qpos, qvel),
            warmstart=backend.zeros((batch, physics.nv)),
        )

    def _zero_state(self) -> MujocoState:
        p = self.physics
        return MujocoState(
            np.zeros((1, p.nq)), np.zeros((1, p.nv)), np.zeros((1, p.nu)), np.zeros(1),
            np.zeros((1, p.readout_size)), np.zeros((1, p.nv)),
        )

    # ------------------------------------------------------------------ step
    def dynamics(self, xp: Any, state: MujocoState, action: Any) -> MujocoState:
        from gradgym.envs.mujoco.bridge import physics_step

        ctrl = self.ctrl_from_action(xp, action)
        qpos, qvel, readouts, warmstart = physics_step(
            xp, self.physics, state.qpos, state.qvel, ctrl, state.warmstart
        )
        if self.tracks_x:
            before = self.tracked_x(xp, state.qpos, state.readouts)
            x_velocity = (self.tracked_x(xp, qpos, readouts) - before) / self.dt
        else:
            x_velocity = xp.zeros_like(component(qpos, 0))
        return MujocoState(qpos, qvel, ctrl, x_velocity, readouts, warmstart)

    def step_outputs(self, backend: Backend, state: MujocoState) -> tuple[Any, dict[str, Any], Any]:
        """The observation, reward terms and termination of ``state``: what the Gymnasium
        env's step returns. A task whose three share work may compute them together."""
        xp = backend.xp
        return self.observe(xp, state), self.reward_terms(xp, state), self.terminated(backend, state)

    def reward(self, xp: Any, state: MujocoState) -> Any:
        """``[...]`` the sum of :meth:`reward_terms`, added in their order."""
        return sum_terms(self.reward_terms(xp, state))

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        """The reward's terms ``[...]`` under the names Gymnasium's ``info`` gives them
        (costs and penalties negative), in the order Gymnasium adds them."""
        raise NotImplementedError

    def info(self, xp: Any, state: MujocoState, previous: MujocoState | None = None) -> dict[str, Any]:
        """The positions (and, after a step from ``previous``, velocities) Gymnasium's
        ``info`` reports beside the reward terms; ``previous=None`` gives the reset info."""
        return {}

    def ctrl_from_action(self, xp: Any, action: Any) -> Any:
        """Map actions in [-1, 1] linearly onto the actuators' control ranges."""
        half, center = self.physics.ctrl_half_range, self.physics.ctrl_center
        if isinstance(half, float) and center == 0.0:  # one symmetric range (all 8 tasks)
            return action * half
        return action * xp.asarray(half, dtype=action.dtype) + xp.asarray(center, dtype=action.dtype)

    def tracked_x(self, xp: Any, qpos: Any, readouts: Any) -> Any:
        """``[...]`` x position whose velocity the forward reward pays; by default the
        first generalized coordinate (the root's x slide)."""
        return component(qpos, 0)

    def readout(self, xp: Any, readouts: Any, name: str) -> Any:
        """Readout field ``name`` with its MjData shape, ``[..., *shape]``."""
        physics = self.physics
        part = readouts[..., physics.readout_slices[name]]
        return xp.reshape(part, readouts.shape[:-1] + physics.readout_shapes[name])

    # ------------------------------------------------------------------ rendering
    def make_renderer(self, size: int | None = None) -> MujocoRenderer:
        width, height = self.width, self.height
        if size is not None:
            width, height = size, max(1, round(size * self.height / self.width))
        return MujocoRenderer(self.physics.model, width, height, self.camera,
                              effects=self.render_effects)


# ---------------------------------------------------------------------------- helpers
def control_cost(xp: Any, ctrl: Any, weight: float) -> Any:
    """``weight * sum(ctrl^2)`` over the last axis."""
    return weight * xp.sum(ctrl * ctrl, axis=-1)


def per_state(method: Any) -> Any:
    """Memoize ``method(self, xp, state)`` on a :class:`HostMujocoState` -- the single-env
    Gymnasium path, which asks the reward, the termination and the observation of the same
    state, and whose health checks and observations share parts. The memo lives on the
    state, so it goes when the state does; the functional backends' states never cache."""

    @functools.wraps(method)
    def cached(self: Any, xp: Any, state: Any) -> Any:
        if type(state) is not HostMujocoState:
            return method(self, xp, state)
        memo = state.__dict__
        result = memo.get(method, _MISSING)
        if result is _MISSING:
            result = memo[method] = method(self, xp, state)
        return result

    return cached


def sum_terms(terms: dict[str, Any]) -> Any:
    """The sum of the values of ``terms``, left to right (a fixed order keeps it exact)."""
    values = iter(terms.values())
    total = next(values)
    for value in values:
        total = total + value
    return total


def locomotion_terms(xp: Any, task: Any, state: MujocoState) -> dict[str, Any]:
    """The reward terms the legged tasks share (Hopper, Walker2d, Ant, Humanoid): forward
    velocity, the survival bonus while ``task.healthy``, the control cost."""
    forward = task.forward_reward_weight * state.x_velocity
    return {
        "reward_forward": forward,
        "reward_survive": task.healthy_reward * indicator(xp, task.healthy(xp, state), forward),
        "reward_ctrl": -control_cost(xp, state.ctrl, task.ctrl_cost_weight),
    }


def walker_info(task: Any, state: MujocoState, previous: MujocoState | None) -> dict[str, Any]:
    """The info of the planar walkers (Hopper, Walker2d): x position, height above the
    model's start and, after a step, x velocity."""
    info = {
        "x_position": component(state.qpos, 0),
        "z_distance_from_origin": component(state.qpos, 1) - float(task.physics.model.qpos0[1]),
    }
    return info if previous is None else {**info, "x_velocity": state.x_velocity}


def planar_info(xp: Any, qpos: Any) -> dict[str, Any]:
    """``x_position``, ``y_position`` and ``distance_from_origin`` of a free or planar root
    whose first two coordinates are its x and y."""
    x, y = component(qpos, 0), component(qpos, 1)
    return {"x_position": x, "y_position": y, "distance_from_origin": xp.sqrt(x * x + y * y)}


def all_finite(xp: Any, x: Any) -> Any:
    """``[...]`` whether every entry of ``x [..., n]`` is finite (no NaN, no inf)."""
    if type(x) is np.ndarray and x.ndim == 1:
        # One env on the host path: numpy's isfinite and all cost about 2 µs on a short
        # vector, Python's sum of its floats a tenth of that. A NaN or inf makes the sum
        # non-finite; only then (or when huge finite values overflow) is numpy asked.
        finite = math.isfinite(sum(x.tolist())) or np.isfinite(x).all()
        return np.True_ if finite else np.False_
    return xp.all(xp.isfinite(x), axis=-1)


def indicator(xp: Any, condition: Any, like: Any) -> Any:
    """``condition`` as 1.0/0.0 in the dtype of ``like`` (no gradient, like a step)."""
    if type(condition) is np.bool_ and type(like) is np.float64:  # one env on the host path
        return FLOAT64_ONE if condition else FLOAT64_ZERO
    return xp.where(condition, xp.ones_like(like), xp.zeros_like(like))


def inside(xp: Any, value: Any, bounds: tuple[float, float], closed: bool = False) -> Any:
    """Whether ``low < value < high`` (``<=`` when closed); NaN is outside."""
    low, high = bounds
    if closed:
        return xp.logical_and(value >= low, value <= high)
    return xp.logical_and(value > low, value < high)


def _check_int(task: Task, name: str, minimum: int) -> None:
    value = getattr(task, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{task.name}: {name} must be an int >= {minimum}, got {value!r}")


def _check_like_default(task: Task, field: dataclasses.Field) -> None:
    """Flags must be bools, weights and scales real numbers, ranges (low, high) pairs."""
    value, default = getattr(task, field.name), field.default
    if field.name.endswith("_range"):
        _check_range(task, field.name)
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{task.name}: {field.name} must be True or False, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{task.name}: {field.name} must be a number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{task.name}: {field.name} must be a string, got {value!r}")


def _check_range(task: Task, name: str) -> None:
    value = getattr(task, name)
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and value[0] <= value[1]
    )
    if not ok:
        raise ValueError(f"{task.name}: {name} must be a pair (low, high) with low <= high, got {value!r}")


@functools.cache
def _physics(task: MujocoTask) -> Physics:
    from gradgym.envs.mujoco.physics import Physics

    return Physics(_model(task.xml_file), task.frame_skip, task.readout_fields,
                   num_threads=task.num_threads)


@functools.cache
def _model(xml_file: str) -> Any:
    from gradgym.envs.mujoco.physics import load_model

    return load_model(xml_file)


# ---------------------------------------------------------------------------- renderer
class MujocoRenderer(Renderer):
    """Frames from MuJoCo's own (headless) renderer; the GL context is made once.

    ``effects=False`` draws without shadows, reflections and multisampling.
    """

    def __init__(self, model: Any, width: int, height: int, camera: Camera, effects: bool = True):
        import mujoco

        self.model = copy.copy(model)  # the offscreen buffer size is a model setting
        self.model.vis.global_.offwidth = max(width, self.model.vis.global_.offwidth)
        self.model.vis.global_.offheight = max(height, self.model.vis.global_.offheight)
        self.flags_off: tuple[int, ...] = ()
        if not effects:
            self.model.vis.quality.offsamples = 0
            self.flags_off = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION)
        self.data = mujoco.MjData(self.model)
        try:
            self.renderer = mujoco.Renderer(self.model, height=height, width=width)
        except Exception as err:  # the GL backend is chosen when mujoco is imported
            raise RuntimeError(
                f"MuJoCo could not open an offscreen GL context ({err}). Headless rendering "
                "needs MUJOCO_GL=egl (or osmesa) set before mujoco is first imported, and "
                "the system's EGL/OSMesa libraries (see .ci/apt-packages.txt)."
            ) from err
        self.camera = mujoco.MjvCamera()
        self.camera.distance = camera.distance
        self.camera.elevation = camera.elevation
        self.camera.azimuth = camera.azimuth
        self.camera.lookat[:] = camera.lookat
        if camera.track_body is None:
            self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        else:
            self.camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
            self.camera.trackbodyid = camera.track_body

    def draw(self, state: Any, reward: float) -> np.ndarray:
        import mujoco

        self.data.qpos[:] = to_numpy(state.qpos)
        self.data.qvel[:] = to_numpy(state.qvel)
        mujoco.mj_forward(self.model, self.data)
        self.renderer.update_scene(self.data, camera=self.camera)
        for flag in self.flags_off:
            self.renderer.scene.flags[flag] = 0
        return self.renderer.render().copy()
