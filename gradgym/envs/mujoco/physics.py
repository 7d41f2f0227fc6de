"""MuJoCo physics for batches of environments: stepping, reset quantities and Jacobians.

A :class:`Physics` owns one compiled ``MjModel`` and steps any number of environments of
it at once. The functional state of an environment lives in plain float64 arrays
(``qpos``, ``qvel``, ``ctrl`` and the solver's warm start); every call loads those arrays
into MuJoCo, runs the engine and copies the results out, so the arrays stay the only
source of truth and a step is a pure function of them.

One env step is ``frame_skip`` calls to ``mj_step``, exactly as Gymnasium's MuJoCo envs do
(followed by ``mj_rnePostConstraint`` when a task reads the contact forces
``cfrc_ext``). Fields such as ``xpos`` or ``cfrc_ext`` that a task reads after the step
("readouts") are copied out as MuJoCo leaves them: like in Gymnasium they describe the
last substep's evaluation, not a fresh ``mj_forward`` at the new state.

Two engines run the batch:

- ``mujoco.batch.Batch`` (MuJoCo's own C thread pool over state rows) for tasks whose
  readouts ``mj_step`` computes itself;
- a loop over ``MjData`` (one per thread; ``mj_step`` releases the GIL) for tasks that
  read post-constraint forces, because ``mj_rnePostConstraint`` must run between the step
  and the readout, which the batch cannot do. These tasks (Ant, Humanoid) spend
  0.1-0.5 ms per env step in the engine, so the loop's per-env Python cost (a few
  microseconds) is small beside it.

Jacobians of an env step (outputs ``[qpos, qvel, readouts]`` with respect to inputs
``[qpos, qvel, ctrl]``; the warm start is held fixed) come from
``mujoco.mjd_transitionFD`` chained over the substeps where MuJoCo supports it
(Euler/implicit integrators, no readouts, ``nq == nv``), and otherwise from central
finite differences over the whole env step, all perturbations stepped as one batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mujoco
import numpy as np
from mujoco import batch as mj_batch

_log = logging.getLogger(__name__)

# State components an env step reads and writes (mjtState bits).
_STATE_SPEC = int(
    mujoco.mjtState.mjSTATE_QPOS
    | mujoco.mjtState.mjSTATE_QVEL
    | mujoco.mjtState.mjSTATE_WARMSTART
    | mujoco.mjtState.mjSTATE_CTRL
)
# MjData fields that only mj_rnePostConstraint computes.
_POST_CONSTRAINT_FIELDS = frozenset({"cacc", "cfrc_int", "cfrc_ext"})
# How many batches of different sizes a Physics keeps ready.
_BATCH_CACHE_SIZE = 4


def asset_path(xml_file: str) -> Path:
    """The path of a model file: a name in Gymnasium's MuJoCo assets, or a path.

    Raises:
        ValueError: the file does not exist (the message lists the bundled assets).
    """
    given = Path(xml_file).expanduser()
    if given.is_absolute() or xml_file.startswith("."):
        if given.is_file():
            return given
        raise ValueError(f"xml_file {xml_file!r} does not exist")
    assets = resources.files("gymnasium.envs.mujoco") / "assets"
    candidate = Path(str(assets / xml_file))
    if candidate.is_file():
        return candidate
    bundled = sorted(p.name for p in Path(str(assets)).glob("*.xml"))
    raise ValueError(
        f"xml_file {xml_file!r} is neither a path nor one of Gymnasium's MuJoCo assets: "
        f"{', '.join(bundled)}"
    )


def load_model(xml_file: str) -> mujoco.MjModel:
    """Compile a model file; compiler warnings go to this module's logger, not to a
    ``MUJOCO_LOG.TXT`` file in the working directory."""
    path = asset_path(xml_file)
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda message: _log.info("MuJoCo (%s): %s", path.name, message))
    try:
        return mujoco.MjModel.from_xml_path(str(path))
    finally:
        mujoco.set_mju_user_warning(previous)


@dataclass(frozen=True)
class StepOutput:
    """An env step's results, float64 arrays with the inputs' leading dimensions."""

    qpos: np.ndarray
    qvel: np.ndarray
    readouts: np.ndarray  # [..., readout_size]: the task's MjData fields, flattened
    warmstart: np.ndarray


class Physics:
    """A MuJoCo model stepped in batches ``frame_skip`` substeps at a time.

    Not safe to call from several threads at once on its own; calls take a lock, so
    host callbacks of jax (which may run on other threads) serialize on it.

    Args:
        model: the compiled model (not modified).
        frame_skip: ``mj_step`` calls per env step.
        readouts: ``MjData`` fields copied out after every step and reset, e.g.
            ``("cfrc_ext",)``; whole fields, flattened in this order.
        num_threads: threads a batch is stepped on (1: the calling thread only; 0: one
            per CPU).
        fd_eps: finite-difference step of the Jacobians.
        jacobian_method: ``"transitionFD"`` (MuJoCo's ``mjd_transitionFD`` chained over
            the substeps; not for RK4, readouts or quaternions), ``"central"`` (central
            differences over the env step) or ``"auto"`` (the first where it applies).
    """

    def __init__(self, model: mujoco.MjModel, frame_skip: int, readouts: tuple[str, ...] = (),
                 num_threads: int = 1, fd_eps: float = 1e-6, jacobian_method: str = "auto"):
        if model.na:
            # the functional state carries qpos, qvel, ctrl and the warm start only
            raise ValueError(
                f"models with actuator activations (na = {model.na}) are not supported: "
                "the state would have to carry them"
            )
        self.model = model
        self.frame_skip = int(frame_skip)
        self.readouts = tuple(readouts)
        self.num_threads = int(num_threads)
        self.fd_eps = float(fd_eps)
        self.dt = model.opt.timestep * self.frame_skip  # seconds per env step, as Gymnasium has it
        self.nq, self.nv, self.nu = model.nq, model.nv, model.nu
        low, high = model.actuator_ctrlrange.T
        half, center = (high - low) / 2.0, (high + low) / 2.0
        uniform = np.all(half == half[0]) and np.all(center == center[0])
        # The actuators' ranges as (half width, center): floats when all are alike.
        self.ctrl_half_range = float(half[0]) if uniform else half
        self.ctrl_center = float(center[0]) if uniform else center
        self._data = mujoco.MjData(model)
        self.readout_shapes = {name: getattr(self._data, name).shape for name in self.readouts}
        self.readout_slices: dict[str, slice] = {}
        offset = 0
        for name in self.readouts:
            size = int(np.prod(self.readout_shapes[name]))
            self.readout_slices[name] = slice(offset, offset + size)
            offset += size
        self.readout_size = offset
        self.post_constraint = bool(_POST_CONSTRAINT_FIELDS & set(self.readouts))
        transition_fd_applies = (
            model.opt.integrator != mujoco.mjtIntegrator.mjINT_RK4
            and not self.readouts
            and model.nq == model.nv
        )
        if jacobian_method == "auto":
            jacobian_method = "transitionFD" if transition_fd_applies else "central"
        elif jacobian_method not in ("transitionFD", "central"):
            raise ValueError(
                f"jacobian_method must be 'auto', 'transitionFD' or 'central', got {jacobian_method!r}"
            )
        elif jacobian_method == "transitionFD" and not transition_fd_applies:
            raise ValueError(
                "jacobian_method 'transitionFD' needs a non-RK4 integrator, no readouts and "
                "nq == nv; use 'central'"
            )
        self.jacobian_method = jacobian_method
        self._state_size = mujoco.mj_stateSize(model, _STATE_SPEC)
        self._batches: OrderedDict[int, tuple[mj_batch.Batch, dict[str, np.ndarray]]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None  # threads of the MjData loop
        self._pool_size = 0
        self._pool_data: list[mujoco.MjData] = []
        self._lock = threading.Lock()


    # ------------------------------------------------------------------ stepping
    def step(self, qpos: np.ndarray, qvel: np.ndarray, ctrl: np.ndarray,
             warmstart: np.ndarray) -> StepOutput:
        """One env step of every environment; inputs are ``[..., n]`` float arrays."""
        lead = qpos.shape[:-1]
        with self._lock:
            out = self._step_flat(*_flat_float64(qpos, qvel, ctrl, warmstart))
        if len(lead) == 1:
            return StepOutput(*out)
        return StepOutput(*(np.reshape(x, lead + x.shape[1:]) for x in out))

    def forward(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """The readouts ``[..., readout_size]`` of freshly set states, as after
        Gymnasium's ``reset`` (``mj_resetData``, set ``qpos``/``qvel``, ``mj_forward``)."""
        lead = qpos.shape[:-1]
        qpos = np.reshape(np.asarray(qpos, dtype=np.float64), (-1, self.nq))
        qvel = np.reshape(np.asarray(qvel, dtype=np.float64), (-1, self.nv))
        out = np.zeros((qpos.shape[0], self.readout_size))
        if not self.readouts:  # nothing to compute (VecEnv restarts call this every step)
            return np.reshape(out, lead + (0,))
        with self._lock:
            self._map_rows(self._forward_rows, qpos, qvel, out)
        return np.reshape(out, lead + (self.readout_size,))

    def _forward_rows(self, d: mujoco.MjData, qpos: np.ndarray, qvel: np.ndarray,
                      out: np.ndarray) -> None:
        m = self.model
        for i in range(qpos.shape[0]):
            mujoco.mj_resetData(m, d)
            d.qpos[:] = qpos[i]
            d.qvel[:] = qvel[i]
            mujoco.mj_forward(m, d)
            self._copy_readouts(d, out[i])

    def _step_flat(self, qpos, qvel, ctrl, warmstart):
        if self.post_constraint:
            return self._step_loop(qpos, qvel, ctrl, warmstart)
        return self._step_batch(qpos, qvel, ctrl, warmstart)

    def _step_batch(self, qpos, qvel, ctrl, warmstart):
        n = qpos.shape[0]
        batch, views = self._batch(n)
        views["qpos"][:] = qpos
        views["qvel"][:] = qvel
        views["qacc_warmstart"][:] = warmstart
        views["ctrl"][:] = ctrl
        batch.step(nstep=self.frame_skip)
        readouts = np.concatenate(
            [np.reshape(views[name], (n, -1)) for name in self.readouts] or [np.zeros((n, 0))],
            axis=1,
        )
        return views["qpos"].copy(), views["qvel"].copy(), readouts, views["qacc_warmstart"].copy()

    def _batch(self, size: int) -> tuple[mj_batch.Batch, dict[str, np.ndarray]]:
        """A batch of ``size`` simulations and its bound fields (live views)."""
        entry = self._batches.get(size)
        if entry is None:
            batch = mj_batch.Batch(self.model, nsim=size, nthread=self.num_threads)
            batch.reset(stage=mujoco.mjtStage.mjSTAGE_NONE)
            # outputs are copied out only once bound, so bind before stepping
            names = ("qpos", "qvel", "qacc_warmstart", "ctrl") + self.readouts
            entry = (batch, {name: batch.bind(name) for name in names})
            self._batches[size] = entry
            if len(self._batches) > _BATCH_CACHE_SIZE:
                self._batches.popitem(last=False)
        else:
            self._batches.move_to_end(size)
        return entry

    def _step_loop(self, qpos, qvel, ctrl, warmstart):
        n = qpos.shape[0]
        rows = np.empty((n, self._state_size))
        self._pack(rows, qpos, qvel, warmstart, ctrl)
        readouts = np.empty((n, self.readout_size))
        self._map_rows(self._step_rows, rows, readouts)
        out_qpos, out_qvel, out_warm, _ = self._unpack(rows)
        return out_qpos, out_qvel, readouts, out_warm

    def _step_rows(self, d: mujoco.MjData, rows: np.ndarray, readouts: np.ndarray) -> None:
        """Step every state row (a view) in place with MjData ``d``."""
        m = self.model
        for i in range(rows.shape[0]):
            mujoco.mj_setState(m, d, rows[i], _STATE_SPEC)
            mujoco.mj_step(m, d, nstep=self.frame_skip)
            mujoco.mj_rnePostConstraint(m, d)
            mujoco.mj_getState(m, d, rows[i], _STATE_SPEC)
            self._copy_readouts(d, readouts[i])

    def _map_rows(self, work, *arrays: np.ndarray) -> None:
        """``work(data, *row_slices)`` over the rows of ``arrays``, on the engine's threads
        (MuJoCo's calls release the GIL, so slices of the batch run in parallel)."""
        n = arrays[0].shape[0]
        threads = max(1, min(self.num_threads or os.cpu_count() or 1, n))
        if threads == 1:
            work(self._data, *arrays)
            return
        bounds = np.linspace(0, n, threads + 1).astype(int)
        parts = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
        pool, datas = self._thread_pool(threads)
        list(pool.map(lambda d, part: work(d, *(a[part] for a in arrays)), datas, parts))

    def _thread_pool(self, threads: int) -> tuple[ThreadPoolExecutor, list[mujoco.MjData]]:
        if self._pool is None or self._pool_size != threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gradgym-mujoco")
            self._pool_size = threads
            self._pool_data = [mujoco.MjData(self.model) for _ in range(threads)]
        return self._pool, self._pool_data

    def _pack(self, rows, qpos, qvel, warmstart, ctrl):
        # mj_setState's layout for _STATE_SPEC: qpos, qvel, warm start, ctrl
        nq, nv = self.nq, self.nv
        rows[:, :nq] = qpos
        rows[:, nq:nq + nv] = qvel
        rows[:, nq + nv:nq + 2 * nv] = warmstart
        rows[:, nq + 2 * nv:] = ctrl

    def _unpack(self, rows):
        nq, nv = self.nq, self.nv
        return (rows[:, :nq].copy(), rows[:, nq:nq + nv].copy(),
                rows[:, nq + nv:nq + 2 * nv].copy(), rows[:, nq + 2 * nv:].copy())

    def _copy_readouts(self, d: mujoco.MjData, out: np.ndarray) -> None:
        for name in self.readouts:
            out[self.readout_slices[name]] = getattr(d, name).ravel()

    # ------------------------------------------------------------------ derivatives
    def jacobian(self, qpos: np.ndarray, qvel: np.ndarray, ctrl: np.ndarray,
                 warmstart: np.ndarray) -> np.ndarray:
        """``d[qpos', qvel', readouts] / d[qpos, qvel, ctrl]`` of one env step,
        ``[..., nq + nv + readout_size, nq + nv + nu]``, the warm start held fixed."""
        lead = qpos.shape[:-1]
        flat = _flat_float64(qpos, qvel, ctrl, warmstart)
        with self._lock:
            if self.jacobian_method == "transitionFD":
                jac = self._jacobian_transition_fd(*flat)
            else:
                jac = self._jacobian_central(*flat)
        return np.reshape(jac, lead + jac.shape[1:])

    def vjp(self, qpos, qvel, ctrl, warmstart, grad_qpos, grad_qvel, grad_readouts):
        """Cotangents of ``(qpos, qvel, ctrl)`` for output cotangents of one env step."""
        jac = self.jacobian(qpos, qvel, ctrl, warmstart)
        grad_out = np.concatenate(
            [np.asarray(g, dtype=np.float64) for g in (grad_qpos, grad_qvel, grad_readouts)],
            axis=-1,
        )
        grad_in = np.einsum("...o,...oi->...i", grad_out, jac)
        nq, nv = self.nq, self.nv
        return grad_in[..., :nq], grad_in[..., nq:nq + nv], grad_in[..., nq + nv:]

    def _jacobian_central(self, qpos, qvel, ctrl, warmstart):
        # Perturb every input coordinate by +-eps; all 2 * n_in perturbed copies of every
        # env are stepped as one batch.
        n, nq, nv = qpos.shape[0], self.nq, self.nv
        inputs = np.concatenate([qpos, qvel, ctrl], axis=1)
        n_in = inputs.shape[1]
        offsets = self.fd_eps * np.concatenate([np.eye(n_in), -np.eye(n_in)])
        perturbed = (inputs[:, None, :] + offsets[None]).reshape(-1, n_in)
        warm = np.repeat(warmstart, 2 * n_in, axis=0)
        out_qpos, out_qvel, readouts, _ = self._step_flat(
            np.ascontiguousarray(perturbed[:, :nq]),
            np.ascontiguousarray(perturbed[:, nq:nq + nv]),
            np.ascontiguousarray(perturbed[:, nq + nv:]),
            warm,
        )
        outputs = np.concatenate([out_qpos, out_qvel, readouts], axis=1).reshape(n, 2, n_in, -1)
        # [n, n_in, n_out] -> [n, n_out, n_in]
        return np.swapaxes((outputs[:, 0] - outputs[:, 1]) / (2 * self.fd_eps), 1, 2)

    def _jacobian_transition_fd(self, qpos, qvel, ctrl, warmstart):
        # x' = A x + B u per substep (x = [qpos, qvel], qpos tangent = qpos as nq == nv);
        # chained: J_x <- A J_x, J_u <- A J_u + B.
        m, d = self.model, self._data
        n, nv, nu = qpos.shape[0], self.nv, self.nu
        jac = np.empty((n, 2 * nv, 2 * nv + nu))
        a_sub = np.empty((2 * nv, 2 * nv))
        b_sub = np.empty((2 * nv, nu))
        rows = np.empty((n, self._state_size))
        self._pack(rows, qpos, qvel, warmstart, ctrl)
        for i in range(n):
            mujoco.mj_setState(m, d, rows[i], _STATE_SPEC)
            jac_x, jac_u = np.eye(2 * nv), np.zeros((2 * nv, nu))
            for _ in range(self.frame_skip):
                mujoco.mjd_transitionFD(m, d, self.fd_eps, True, a_sub, b_sub, None, None)
                jac_x, jac_u = a_sub @ jac_x, a_sub @ jac_u + b_sub
                mujoco.mj_step(m, d)
            jac[i, :, :2 * nv] = jac_x
            jac[i, :, 2 * nv:] = jac_u
        return jac


def _flat_float64(*arrays: np.ndarray) -> list[np.ndarray]:
    """``[..., n]`` arrays as C-contiguous float64 ``[N, n]`` (no copy when they are)."""
    return [np.ascontiguousarray(x if x.ndim == 2 else np.reshape(x, (-1, x.shape[-1])),
                                 dtype=np.float64) for x in arrays]
