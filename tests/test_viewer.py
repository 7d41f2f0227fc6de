"""``gradgym view`` in a real headless Chromium driven through the DevTools protocol.

Screenshots are taken after real seconds (``--virtual-time-budget`` never returns on a page
that streams). The viewer runs as the real command in its own process group.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import run_gradgym, start_gradgym, stop_process_group
from PIL import Image
from websockets.sync.client import connect

from gradgym.platform.cli import main
from gradgym.platform.records import RunRecord
from gradgym.platform.replays import ReplayRecorder
from gradgym.platform.viewer.session import parse_frame_message

CHROMIUM = shutil.which("chromium")
TINY_RUN = ["pipeline=trajectory", "backend=torch", "env=Pendulum", "pipeline.batch=4",
            "pipeline.horizon=40", "tracking.enabled=false", "progress=false"]


# ---------------------------------------------------------------------- helpers

class Chromium:
    """A headless Chromium and one page of it, driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        assert CHROMIUM, "Debian's chromium is needed (.ci/apt-packages.txt)"
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1100,800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 60, "Chromium's DevTools port")
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self._closing = contextlib.ExitStack()
        self.socket = self._closing.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, proxy=None))
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events are skipped
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        wait_for(lambda: (self.js("window.gradgymViewer && gradgymViewer.frames") or 0) > 0, 90,
                 "the first frame on the page")

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def frame(self) -> np.ndarray:
        """A screenshot of the page's frame image, as an RGB array."""
        box = self.js("(() => { const r = document.getElementById('frame').getBoundingClientRect();"
                      " return [r.x, r.y, r.width, r.height]; })()")
        clip = dict(zip(("x", "y", "width", "height"), box), scale=1)
        png = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")).astype(int)

    def close(self) -> None:
        self._closing.close()
        stop_process_group(self.process)


def wait_for(condition, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout} s for {what}")


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


class ViewServer:
    """``gradgym view ARGS --port 0`` in its own process group; its URL from its output."""

    def __init__(self, args: list[str], cwd: Path):
        self.log = cwd / f"view-{time.monotonic_ns()}.log"
        self.process = start_gradgym(["view", *args, "--port", "0"], cwd, self.log)
        match = wait_for(lambda: re.search(r"http://127\.0\.0\.1:(\d+)/", self.output()), 120,
                         f"the viewer's URL ({self.log})")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        if self.process.poll() is not None and "http://" not in self.log.read_text():
            raise RuntimeError(f"gradgym view exited: {self.log.read_text()}")
        return self.log.read_text()

    def stop(self) -> None:
        stop_process_group(self.process)


@pytest.fixture
def start_view(tmp_path):
    servers: list[ViewServer] = []

    def start(*args: str) -> ViewServer:
        servers.append(ViewServer(list(args), tmp_path))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def not_blank(frame: np.ndarray) -> bool:
    return frame.std() > 5.0 and frame.shape[0] > 100


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    """How many pixels of two same-size screenshots differ visibly."""
    assert a.shape == b.shape
    return int((np.abs(a - b).max(axis=-1) > 40).sum())


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return changed_pixels(a, b) > 50


# ---------------------------------------------------------------------- pages

@pytest.mark.slow
def test_classic_page_streams_changing_frames_and_its_controls_work(browser, start_view):
    server = start_view("Pendulum")
    browser.open(server.url)
    first = browser.frame()
    time.sleep(1.5)
    second = browser.frame()
    assert not_blank(first) and not_blank(second)
    assert differs(first, second), "the frames do not change while playing"

    browser.js("document.getElementById('play').click()")  # pause
    time.sleep(1.0)
    frames, paused = browser.js("gradgymViewer.frames"), browser.frame()
    time.sleep(1.5)
    assert browser.js("gradgymViewer.frames") == frames
    assert changed_pixels(paused, browser.frame()) == 0, "frames change while paused"

    def reset(seed: int) -> np.ndarray:
        frames = browser.js("gradgymViewer.frames")
        browser.js(f"document.getElementById('seed').value = {seed};"
                   "document.getElementById('reset').click()")
        wait_for(lambda: browser.js("gradgymViewer.frames") > frames, 30, "the reset frame")
        header = browser.js("gradgymViewer.header")
        assert (header["seed"], header["t"]) == (seed, 0)
        time.sleep(0.3)  # the image element shows the decoded frame
        return browser.frame()

    seven = reset(7)
    for _ in range(5):
        browser.js("document.getElementById('step').click()")
    wait_for(lambda: browser.js("gradgymViewer.header.t") == 5, 30, "five single steps")
    assert differs(seven, browser.frame()), "single steps do not move the pendulum"
    assert changed_pixels(seven, reset(7)) == 0, "reset with the same seed gives another first frame"
    assert differs(seven, reset(8)), "another seed gives the same first frame"


@pytest.mark.slow
def test_mujoco_page_streams_changing_frames_and_a_grid(browser, start_view):
    server = start_view("InvertedDoublePendulum-v5", "width=240", "height=240")
    browser.open(server.url)
    browser.js("gradgymViewer.send({cmd: 'source', value: 'random'})")
    wait_for(lambda: browser.js("gradgymViewer.header.source") == "random", 60, "random actions")
    first = browser.frame()
    wait_for(lambda: browser.js("gradgymViewer.header.t") >= 5, 60, "five steps")
    second = browser.frame()
    assert not_blank(first) and not_blank(second)
    assert differs(first, second), "the MuJoCo frames do not change while playing"

    browser.js("gradgymViewer.send({cmd: 'grid', value: 4})")
    wait_for(lambda: browser.js("gradgymViewer.header.grid") == 4, 60, "a 2x2 grid")
    size = browser.js("[document.getElementById('frame').naturalWidth,"
                      " document.getElementById('frame').naturalHeight]")
    assert size == [480, 480]  # four 240x240 members


@pytest.mark.slow
def test_replays_a_finished_run_with_the_return_it_reported(browser, start_view, tmp_path):
    result = run_gradgym(["run", *TINY_RUN, "pipeline.iters=8", "run_dir=done"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = RunRecord(tmp_path / "done").finished_summary()

    server = start_view("done")
    browser.open(server.url)
    hello = browser.js("gradgymViewer.hello")
    assert hello["run"]["status"] == "FINISHED" and len(hello["run"]["points"]) == 8
    browser.js("gradgymViewer.send({cmd: 'grid', value: 4});"  # all four start states
               "gradgymViewer.send({cmd: 'speed', value: 0})")
    # the header of the episode's last frame, read in the same call (the replay starts over)
    header = wait_for(lambda: browser.js("(h => h.t == 40 && h.grid == 4 ? h : null)"
                                         "(gradgymViewer.header)"),
                      90, "the end of the replayed episode")
    assert header["source"] == "run" and header["replay_live"] is False
    # The plan replayed on numpy from the run's start states earns what the run reported.
    assert header["return"] == pytest.approx(summary["best_return"], rel=2e-3)
    assert not_blank(browser.frame())


@pytest.mark.slow
def test_follows_a_running_run_as_it_improves(browser, start_view, tmp_path):
    run = start_gradgym(["run", *TINY_RUN, "pipeline.iters=100000", "pipeline.torch_compile=false",
                         "run_dir=going"], tmp_path, tmp_path / "run.log")
    try:
        record = RunRecord(tmp_path / "going")
        wait_for(lambda: len(record.read_metrics()) > 3, 240, "the run's first iterations")
        assert not record.replay_paths(live=True)[1].exists()  # nobody follows: no live replay

        server = start_view("going")
        browser.open(server.url)
        wait_for(lambda: browser.js("gradgymViewer.header.replay_live") is True, 60,
                 "the run's best plan so far on the page")
        assert record.follow_marker_path.exists()
        first = browser.js("gradgymViewer.header.replay_iteration")
        wait_for(lambda: browser.js("gradgymViewer.header.replay_iteration") > first, 60,
                 "a newer best plan on the page")
        # The curve reaches the page in the hello or, if the tab came before the viewer's
        # first look at the folder, in the run messages after it.
        wait_for(lambda: browser.js("gradgymViewer.series.run.length") > 3, 30,
                 "the run's return curve on the page")
        wait_for(lambda: browser.js("document.getElementById('run-title').textContent")
                 .startswith("run (RUNNING)"), 10, "the run's status")
        assert browser.js("gradgymViewer.frames") > 0
    finally:
        stop_process_group(run)


# ---------------------------------------------------------------------- process and sockets

@pytest.mark.slow
def test_serves_several_tabs_on_loopback_only_and_nothing_after_sigterm(start_view):
    server = start_view("CartPole")
    viewer = psutil.Process(server.process.pid)
    listening = [c for c in viewer.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
    url = f"ws://127.0.0.1:{server.port}/ws"
    with connect(url, proxy=None) as tab, connect(url, proxy=None) as other_tab:
        other_tab.recv(timeout=30)  # hello
        other_tab.send(json.dumps({"cmd": "reset", "seed": 5}))
        assert json.loads(tab.recv(timeout=30))["type"] == "hello"
        seeds = {parse_frame_message(tab.recv(timeout=60))[0]["seed"] for _ in range(3)}
        other_seeds = {parse_frame_message(m)[0]["seed"]
                       for m in (other_tab.recv(timeout=60) for _ in range(5))}
        assert seeds == {0} and 5 in other_seeds  # each tab has its own simulation
        os.kill(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    with pytest.raises(ProcessLookupError):  # no process of its group is left
        os.killpg(server.process.pid, 0)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0, "something still listens"


def test_bad_input_gets_a_clear_error_and_exit_2(tmp_path, capsys):
    assert main(["view", "Pendulm"]) == 2
    assert "unknown env 'Pendulm' (did you mean 'Pendulum'?)" in capsys.readouterr().err
    assert main(["view", "Reacher", "num_joint=3"]) == 2
    assert "unknown argument(s) ['num_joint'] for Reacher" in capsys.readouterr().err
    assert main(["view", str(tmp_path)]) == 2
    assert "is not a run folder: it has no config.yaml" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", "Pendulum", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
        assert main(["view", "Pendulum", "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "warning: the viewer will listen on 0.0.0.0, reachable from other machines" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err


# ---------------------------------------------------------------------- the run side

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_run_looks_at_the_follow_marker_at_most_once_a_second(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from gradgym.pipelines.base import plan_replay

    cfg = OmegaConf.create({"env": "Pendulum", "env_kwargs": {}, "seed": 3, "backend": "numpy",
                            "pipeline": {"name": "cem", "batch": 2, "horizon": 5}})
    record = RunRecord(tmp_path).create()
    clock = FakeClock()
    recorder = ReplayRecorder(cfg, record, plan_replay, clock=clock)
    looks = []
    followed = record.followed
    monkeypatch.setattr(record, "followed", lambda: looks.append(clock.now) or followed())

    for _ in range(100):  # 100 iterations within one second: one look at the marker
        assert recorder.wants_best_params() is False
        clock.now += 0.009
    assert looks == [0.0]

    record.touch_follow_marker()
    clock.now = 1.5
    assert recorder.wants_best_params() is True
    plan = np.full((2, 5, 1), 0.5, np.float32)
    recorder.save_live(plan, 7)
    recorder.save_live(np.zeros_like(plan), 8)  # within the second: not written
    meta, arrays = record.read_replay(live=True)
    assert (meta["iteration"], meta["seed"], meta["kind"]) == (7, 3, "plan")
    np.testing.assert_array_equal(arrays["actions"], plan)


@pytest.mark.slow
def test_a_run_logs_its_replay_and_view_command_to_mlflow(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    result = run_gradgym(["run", *TINY_RUN[:-2], "pipeline=policy", "pipeline.iters=3",
                          "tracking.experiment=viewer-replay", "run_dir=logged"], cwd=tmp_path,
                         MLFLOW_TRACKING_URI=mlflow_server.uri)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("viewer-replay")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["gradgym.view"] == f"gradgym view {tmp_path / 'logged'}"
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"replay.json", "replay.npz"} <= names
    meta, arrays = RunRecord(tmp_path / "logged").read_replay()
    assert meta["kind"] == "mlp" and arrays["weight_0"].shape == (3, 64)


def test_mujoco_frames_without_effects_still_show_the_state():
    import gradgym

    plain = gradgym.make("Hopper-v5", render_effects=False)
    full = gradgym.make("Hopper-v5")
    state = plain.reset(0, batch=2)
    bent = np.array([0.0, 0.3, 0.4, 0.5, 0.0, 0.0])  # the hopper's joints, folded
    moved = plain.state_from_qpos_qvel(np.asarray(state.qpos) + bent, np.asarray(state.qvel))
    frame, other = plain.render(state, 0), plain.render(moved, 0)
    assert frame.shape == full.render(state, 0).shape and not_blank(frame)
    assert differs(frame.astype(int), other.astype(int))
    renderer = plain._renderers[None]
    assert renderer.model.vis.quality.offsamples == 0  # no multisampling
    assert not any(renderer.renderer.scene.flags[flag] for flag in renderer.flags_off)


def test_a_policy_replay_acts_like_the_pipelines_policy():
    from gradgym.envs import make
    from gradgym.pipelines.base import mlp_replay
    from gradgym.pipelines.policy import init_mlp, mlp_action
    from gradgym.platform.viewer.session import LoadedReplay

    env = make("Reacher", backend="numpy", num_joints=3)
    layers = init_mlp(env, np.random.default_rng(0), [env.spec.obs_dim, 64, 64, env.spec.act_dim])
    replay = mlp_replay(layers)
    loaded = LoadedReplay({"kind": replay.kind}, replay.arrays, version=1)
    obs = np.asarray(env.observe(env.reset(1, batch=5)))
    np.testing.assert_allclose(loaded.actions(obs, np.arange(5), t=0),
                               mlp_action(np, layers, obs), rtol=1e-5, atol=1e-6)


def test_actions_from_a_run_fit_only_that_runs_env(tmp_path):
    from omegaconf import OmegaConf

    from gradgym.platform.viewer import ViewerError, resolve_target

    record = RunRecord(tmp_path / "reacher-run").create()
    record.write_config(OmegaConf.create({"env": "Reacher", "env_kwargs": {"num_joints": 3},
                                          "seed": 4, "pipeline": {"name": "policy"}}))
    target = resolve_target("Reacher", ["num_joints=3", "seed=2"], run=str(record.folder))
    assert (target.env, target.env_kwargs, target.seed) == ("Reacher", {"num_joints": 3}, 2)
    assert target.run.folder == record.folder
    assert resolve_target(str(record.folder)).seed == 4  # a run replays from its own seed
    with pytest.raises(ViewerError, match="that run optimized Reacher with .* not Pendulum"):
        resolve_target("Pendulum", run=str(record.folder))
    with pytest.raises(ViewerError, match=r"\{'num_joints': 3\}, not Reacher with \{'num_joints': 2\}"):
        resolve_target("Reacher", ["num_joints=2"], run=str(record.folder))


def test_a_grid_draws_its_members_small_into_the_picture_it_sends():
    """A 4x4 grid of a classic task: 16 members drawn 128 px wide into one 512 px picture
    (not 16 full-size frames shrunk afterwards); each tile is its member's frame."""
    from gradgym.platform.viewer.session import GRID_WIDTH, Session, tile_size
    from gradgym.platform.viewer.target import ViewTarget

    assert [tile_size(256, side) for side in (2, 3, 4)] == [None, 170, 128]
    assert tile_size(64, 4) is None  # never drawn larger than the member's own frame
    session = Session(ViewTarget("CartPole"))
    session.command({"cmd": "grid", "value": 16})
    header, jpeg = parse_frame_message(session.next_frame())
    picture = np.asarray(Image.open(io.BytesIO(jpeg))).astype(int)
    assert header["grid"] == 16 and picture.shape == (GRID_WIDTH, GRID_WIDTH, 3)
    for member in (0, 6, 15):
        row, column = divmod(member, 4)
        tile = picture[row * 128:(row + 1) * 128, column * 128:(column + 1) * 128]
        frame = session._env.render(session._state, member, 128)
        assert np.abs(tile - frame).mean() < 4.0  # the same picture, up to JPEG
        other = session._env.render(session._state, (member + 1) % 16, 128)
        assert np.abs(tile - other).mean() > 2 * np.abs(tile - frame).mean()
    session.close()
