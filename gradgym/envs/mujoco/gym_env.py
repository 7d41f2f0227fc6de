"""Drop-in Gymnasium envs of the MuJoCo tasks: ``gymnasium.make("gradgym/Hopper-v5")``.

Each id behaves like Gymnasium's own ``<Task>-v5``: the same constructor arguments
(rendering ones included), the same spaces (actions in the actuators' control ranges,
float64 observations), the same start state for the same seed, and the same observation,
reward, termination and ``info`` for the same actions. Like Gymnasium, one env steps one
``MjData`` on the host in float64 (Gymnasium's ``MujocoEnv`` is the base class, so
rendering, ``set_state`` and ``render_mode="human"`` are Gymnasium's); unlike it, the
observation, reward terms, termination and ``info`` come from the gradgym task's own
Array API code, the code the differentiable functional env runs.

Two deliberate differences, both about bad input: a NaN/inf action raises a
``ValueError`` (Gymnasium hands it to MuJoCo, which resets the simulation with a warning),
and so does an action of another dtype than a real number. Actions outside the control
range are accepted, as in Gymnasium (MuJoCo clamps the applied control; the control cost
is taken on the action as given).

Gradients: :meth:`MujocoGymEnv.functional` returns the functional env (torch or jax) and
the current state, so a differentiable rollout can start where the Gymnasium env is.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import gymnasium
import mujoco
import numpy as np
from gymnasium import spaces
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer

from gradgym.envs.core import Env, make
from gradgym.envs.host import FLOAT64_ZERO, HOST_BACKEND, HOST_XP, as_scalar, batch_of_one
from gradgym.envs.mujoco import TASKS
from gradgym.envs.mujoco.base import HostMujocoState, MujocoState, MujocoTask, all_finite, sum_terms
from gradgym.envs.mujoco.physics import asset_path, load_model

# "use Gymnasium's default for this id": a sentinel, since None is a valid camera config.
_GYMNASIUM_DEFAULT: Any = object()
# MjData fields only mj_rnePostConstraint computes (Gymnasium calls it after every step).
_POST_CONSTRAINT_FIELDS = frozenset({"cacc", "cfrc_int", "cfrc_ext"})
_REAL_KINDS = frozenset("fiub")  # float, int, unsigned, bool: what casts to a control
_RENDER_ARGS = ("width", "height", "camera_id", "camera_name", "default_camera_config",
                "max_geom", "visual_options")


_NO_READOUTS = np.empty(0)  # the readouts of a task that reads none (never written)
_NO_READOUTS.flags.writeable = False


class MujocoGymEnv(MujocoEnv):
    """A gradgym MuJoCo task as Gymnasium's ``<Task>-v5`` env (one env, float64).

    Subclasses (one per task, below) set :attr:`task_class`. Constructor arguments are
    Gymnasium's: the rendering ones listed here, and the task's (``xml_file``,
    ``frame_skip``, ``forward_reward_weight``, ...) as keywords.

    Args:
        render_mode: ``None``, ``"human"``, ``"rgb_array"``, ``"depth_array"`` or
            ``"rgbd_tuple"``.
        width, height, camera_id, camera_name, default_camera_config, max_geom,
            visual_options: as in Gymnasium's ``MujocoEnv`` (``default_camera_config``
            defaults to that of Gymnasium's env of the same id).
        **task_kwargs: the task's arguments (unknown ones raise ``TypeError``).
    """

    task_class: ClassVar[type[MujocoTask]]
    metadata: ClassVar[dict[str, Any]] = {  # type: ignore[misc]
        "render_modes": ["human", "rgb_array", "depth_array", "rgbd_tuple"],
    }

    def __init__(self, render_mode: str | None = None, width: int = 480, height: int = 480,
                 camera_id: int | None = None, camera_name: str | None = None,
                 default_camera_config: dict[str, Any] | None = _GYMNASIUM_DEFAULT,
                 max_geom: int = 1000, visual_options: dict[int, bool] | None = None,
                 **task_kwargs: Any):
        task = _build_task(self.task_class, task_kwargs)
        if default_camera_config is _GYMNASIUM_DEFAULT:
            default_camera_config = gymnasium_default(task.name, "default_camera_config")
        self._render_args = {"width": width, "height": height, "camera_id": camera_id,
                             "camera_name": camera_name, "max_geom": max_geom,
                             "default_camera_config": default_camera_config,
                             "visual_options": visual_options}
        MujocoEnv.__init__(self, str(asset_path(task.xml_file)), task.frame_skip,
                           observation_space=None, render_mode=render_mode,
                           **self._render_args)
        self.metadata = {**self.metadata, "render_fps": int(np.round(1.0 / self.dt))}
        self.task = task
        self._task_kwargs = dict(task_kwargs)
        self._prepare()
        obs_dim = task.observe(HOST_XP, self._read(np.zeros(self.model.nu), None)).shape[-1]
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64)

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        # Gymnasium's, with MuJoCo's compiler warnings sent to a logger (load_model)
        model = load_model(self.fullpath)
        model.vis.global_.offwidth = self.width
        model.vis.global_.offheight = self.height
        return model, mujoco.MjData(model)

    def _prepare(self) -> None:
        """Constants the step reads, looked up once."""
        task, physics = self.task, self.task.physics
        self._post_constraint = bool(_POST_CONSTRAINT_FIELDS & set(task.readout_fields))
        self._readout_slices = [(physics.readout_slices[name], name) for name in task.readout_fields]
        self._readout_size = physics.readout_size
        self._dt = self.dt  # a property reading the model: once, not every step
        self._action_shape = (self.model.nu,)
        self._nq, self._nv = self.model.nq, self.model.nv  # MjModel's attributes cost a call
        self._ctrl_on_data = getattr(task, "gym_ctrl_cost_on_applied_ctrl", False)
        self._data_info = dict(getattr(task, "gym_info_data_fields", ()))
        self._state: MujocoState | None = None
        self._view_data()

    def _view_data(self) -> None:
        # Views of the MjData arrays the step reads and writes: MjData's attributes build a
        # new array object on every access. Views, not copies: rebuilt after unpickling.
        data = self.data
        self._qpos, self._qvel, self._ctrl = data.qpos, data.qvel, data.ctrl
        self._readout_views = [(part, getattr(data, name).reshape(-1))
                               for part, name in self._readout_slices]

    # ------------------------------------------------------------------ Gymnasium API
    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        """One env step, as Gymnasium's env of the same id takes it."""
        ctrl = self._checked(action)
        model, data = self.model, self.data
        self._ctrl[:] = ctrl
        mujoco.mj_step(model, data, self.frame_skip)  # positional: keywords cost pybind11 a lookup
        if self._post_constraint:  # the only fields it writes are cacc, cfrc_int, cfrc_ext
            mujoco.mj_rnePostConstraint(model, data)
        previous = self._state
        state = self._state = self._read(ctrl, previous)
        obs, terms, terminated = self.task.step_outputs(HOST_BACKEND, state)
        info = self._info(state, previous, terms)
        if self.render_mode == "human":
            self.render()
        return obs, as_scalar(sum_terms(terms)), bool(terminated), False, info

    def reset_model(self) -> np.ndarray:
        """Gymnasium's draws: ``qpos0 + U(-s, s)``, then ``qvel`` uniform or ``s * N(0, 1)``."""
        task, scale, draw = self.task, self.task.reset_noise_scale, self.np_random
        qpos = self.init_qpos + draw.uniform(low=-scale, high=scale, size=self._nq)
        if task.qvel_noise == "normal":
            qvel = self.init_qvel + scale * draw.standard_normal(self._nv)
        else:
            qvel = self.init_qvel + draw.uniform(low=-scale, high=scale, size=self._nv)
        self.set_state(qpos, qvel)
        return task.observe(HOST_XP, self._state)

    def set_state(self, qpos: Any, qvel: Any) -> None:
        """Set ``qpos`` and ``qvel`` and recompute the derived quantities (``mj_forward``),
        as Gymnasium's ``set_state`` does, on the kept views of ``MjData`` (every reset calls
        it; Gymnasium's spends more than MuJoCo's ``mj_forward`` on lookups and copies).
        Gymnasium also writes ``act[:] = None`` when the model has no activations: a no-op.
        The next step's velocities (``x_velocity``) are taken from this state."""
        qpos, qvel = np.asarray(qpos), np.asarray(qvel)
        if qpos.shape != self._qpos.shape or qvel.shape != self._qvel.shape:
            raise ValueError(
                f"{self.task.name}: set_state takes qpos of shape {self._qpos.shape} and qvel of "
                f"shape {self._qvel.shape}, got {qpos.shape} and {qvel.shape}"
            )
        self._qpos[:], self._qvel[:] = qpos, qvel
        mujoco.mj_forward(self.model, self.data)
        self._state = self._read(self._ctrl.copy(), None)

    def _get_reset_info(self) -> dict[str, Any]:
        return self._info(self._state, None, {})

    # ------------------------------------------------------------------ gradients
    def functional(self, backend: str = "torch", dtype: str = "float64") -> tuple[Env, MujocoState]:
        """The differentiable functional env of this task and the current state (batch 1).

        Stepping the returned env from the returned state with the normalized action
        :meth:`normalized_action` ``(a)`` gives the next state this env reaches with
        ``a``, and gradients of anything computed from it (torch autograd, ``jax.grad``).
        """
        if self._state is None:
            raise RuntimeError(f"{self.task.name}: functional() called before reset()")
        env = make(self.task.name, backend=backend, dtype=dtype, **self._task_kwargs)
        state = MujocoState(*self._state)._replace(ctrl=np.asarray(self._state.ctrl, np.float64),
                                                   warmstart=self.data.qacc_warmstart.copy())
        return env, env.as_state(batch_of_one(state))

    def normalized_action(self, action: Any) -> np.ndarray:
        """``action`` (in the control ranges, as this env takes it) as the functional API's
        action in [-1, 1] (``gradgym.make(...).step`` takes ``[B, act_dim]`` of these)."""
        physics = self.task.physics
        return (np.asarray(action, np.float64) - physics.ctrl_center) / physics.ctrl_half_range

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # The renderer holds GL contexts and ctypes; it is rebuilt lazily after unpickling.
        # The views of MjData would come back as copies: they are rebuilt too.
        state = dict(self.__dict__)
        for key in ("mujoco_renderer", "_qpos", "_qvel", "_ctrl", "_readout_views"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._view_data()
        self.mujoco_renderer = MujocoRenderer(self.model, self.data, **_renderer_args(self._render_args))

    # ------------------------------------------------------------------ helpers
    def _checked(self, action: Any) -> np.ndarray:
        """``action`` as an array, or a clear error (shape, dtype, NaN/inf)."""
        array = action if type(action) is np.ndarray else np.asarray(action)
        if array.shape != self._action_shape:
            raise ValueError(
                f"{self.task.name}: action has shape {array.shape}, expected {self._action_shape}"
            )
        kind = array.dtype.kind
        if kind not in _REAL_KINDS:
            raise TypeError(f"{self.task.name}: action dtype {array.dtype} is not a real number type")
        if kind == "f" and not all_finite(HOST_XP, array):
            raise ValueError(f"{self.task.name}: action contains NaN or inf: {array.tolist()}")
        return array

    def _read(self, ctrl: np.ndarray, previous: MujocoState | None) -> MujocoState:
        """The task's state of this one env (unbatched leaves, so that per-env quantities
        are numpy scalars) from ``MjData``; copies, as the data moves on."""
        task = self.task
        qpos, qvel = self._qpos.copy(), self._qvel.copy()
        readouts = _NO_READOUTS
        if self._readout_views:
            readouts = np.empty(self._readout_size)
            for part, view in self._readout_views:
                readouts[part] = view
        x_velocity = FLOAT64_ZERO
        if task.tracks_x:
            # the tracked x of the last state is kept: Humanoid's (its center of mass) is dear
            x = task.tracked_x(HOST_XP, qpos, readouts)
            if previous is not None:
                x_velocity = (x - self._x) / self._dt
            self._x = x
        applied = self._ctrl.copy() if self._ctrl_on_data else ctrl
        return HostMujocoState.of(qpos, qvel, applied, x_velocity, readouts, None)

    def _info(self, state: MujocoState, previous: MujocoState | None,
              terms: dict[str, Any]) -> dict[str, Any]:
        info = {**self.task.info(HOST_XP, state, previous), **terms}
        for key, value in info.items():  # Gymnasium's values are scalars, not 0-d arrays
            if type(value) is np.ndarray:
                info[key] = as_scalar(value)
        for key, field in self._data_info.items():
            info[key] = getattr(self.data, field).copy()
        return info


def gymnasium_default(env_id: str, argument: str) -> Any:
    """The default of constructor ``argument`` of Gymnasium's own env ``env_id``."""
    creator = gymnasium.envs.registration.load_env_creator(gymnasium.spec(env_id).entry_point)
    return inspect.signature(creator).parameters[argument].default


def _renderer_args(args: dict[str, Any]) -> dict[str, Any]:
    # MujocoRenderer names the camera config argument differently from MujocoEnv
    renamed = dict(args)
    renamed["default_cam_config"] = renamed.pop("default_camera_config")
    return renamed


def _build_task(task_class: type[MujocoTask], kwargs: dict[str, Any]) -> MujocoTask:
    from gradgym.envs.core import task_arguments

    allowed = [name for name in task_arguments(task_class) if name not in _RENDER_ARGS]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"{task_class.name}: unknown argument(s) {unknown}; the env takes "
            f"{', '.join(('render_mode',) + _RENDER_ARGS + tuple(allowed))}"
        )
    task = task_class(**kwargs)
    task.validate()
    return task


def _env_class(task_class: type[MujocoTask]) -> type[MujocoGymEnv]:
    """The Gymnasium env class of one task (named like Gymnasium's: ``HopperEnv``)."""
    name = task_class.__name__ + "Env"
    return type(name, (MujocoGymEnv,), {
        "task_class": task_class, "__module__": __name__, "__qualname__": name,
        "__doc__": f"Gymnasium's {task_class.name} on gradgym (see :class:`MujocoGymEnv`).",
    })


# One module-level class per task, so that an env pickles by reference and an id cannot be
# told to build another task (``gym.make("gradgym/Hopper-v5", name="Ant-v5")`` raises).
ENV_CLASSES: dict[str, type[MujocoGymEnv]] = {}
for _task_class in TASKS:
    ENV_CLASSES[_task_class.name] = globals()[_task_class.__name__ + "Env"] = _env_class(_task_class)
