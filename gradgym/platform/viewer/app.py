"""The viewer's web app (Starlette on uvicorn): the page, one websocket per tab, a run watcher.

Frames are rendered on the server (the tasks' own renderers: matplotlib Agg for the classic
tasks, MuJoCo's EGL renderer) and sent as JPEG over the tab's websocket, each with a small
JSON header (step, reward, return). All rendering happens in one thread: MuJoCo's GL
contexts belong to the thread that made them, and on a CPU-only machine the renderer is
the bottleneck anyway (see ``benchmarks/viewer_fps.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gradgym.platform.records import RunRecord
from gradgym.platform.viewer.session import GRID_SIZES, SOURCES, LoadedReplay, Session
from gradgym.platform.viewer.target import ViewerError, ViewTarget

POLL_S = 0.5  # how often a run folder is read while it is shown
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED", "STOPPED")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RunWatcher:
    """A run folder as the viewer sees it: its newest replay, its return curve, its status.

    While the run goes on, each poll refreshes the folder's follow marker, which makes the run
    write its best parameters so far (``replay_live.*``).
    """

    def __init__(self, record: RunRecord):
        self.record = record
        self.replay: LoadedReplay | None = None
        self.curve: list[tuple[int, float]] = []
        self.status = "RUNNING"
        self._offset = 0
        self._stamp: Any = None

    def poll(self) -> list[tuple[int, float]]:
        """Read what changed; returns the new points of the return curve."""
        self.status = self.record.read_summary().get("status", "RUNNING")
        if self.status not in FINAL_STATUSES:
            self.record.touch_follow_marker()
        entries, self._offset = self.record.read_metrics_from(self._offset)
        points = [(int(e["iteration"]), float(e.get("return_mean", float("nan")))) for e in entries]
        self.curve += points
        self._read_replay()
        return points

    def _read_replay(self) -> None:
        for live in (False, True):  # the final replay wins over the live one
            json_path, _ = self.record.replay_paths(live)
            try:
                stamp = (live, json_path.stat().st_mtime_ns)
            except OSError:
                continue
            if stamp != self._stamp:
                loaded = self.record.read_replay(live)
                if loaded is not None:
                    version = self.replay.version + 1 if self.replay else 1
                    self.replay = LoadedReplay(loaded[0], loaded[1], version)
                    self._stamp = stamp
            return

    def run_message(self, points: list[tuple[int, float]]) -> dict[str, Any]:
        replay = self.replay.meta if self.replay else {}
        return {"type": "run", "status": self.status, "points": points,
                "replay_iteration": replay.get("iteration"), "replay_live": replay.get("live")}

    def close(self) -> None:
        """Stop following: a run nobody follows stops writing live replays."""
        with contextlib.suppress(OSError):
            self.record.follow_marker_path.unlink()


class Viewer:
    """The server's state: the target, the render thread, the tabs, the run watcher."""

    def __init__(self, target: ViewTarget):
        self.target = target
        self.render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradgym-render")
        self.tabs: dict[WebSocket, tuple[Session, asyncio.Event]] = {}
        self.watcher = RunWatcher(target.run) if target.run is not None else None

    def hello(self) -> dict[str, Any]:
        run = None
        if self.watcher is not None:
            run = self.watcher.run_message(self.watcher.curve)
            run["folder"] = str(self.target.run.folder)
        return {"type": "hello", "title": self.target.title, "env": self.target.env,
                "seed": self.target.seed, "sources": list(SOURCES) if run else ["zero", "random"],
                "grid_sizes": list(GRID_SIZES), "run": run}

    async def watch(self) -> None:
        """Poll the run folder; pass new replays to the tabs and new points to the pages."""
        loop = asyncio.get_running_loop()
        while True:
            version = self.watcher.replay.version if self.watcher.replay else 0
            points = await loop.run_in_executor(None, self.watcher.poll)
            replay = self.watcher.replay
            if points or (replay and replay.version != version):
                message = self.watcher.run_message(points)
                for tab, (session, _) in list(self.tabs.items()):
                    session.replay = replay
                    with contextlib.suppress(Exception):  # a tab that is closing
                        await tab.send_json(message)
            await asyncio.sleep(POLL_S)

    async def stream(self, tab: WebSocket) -> None:
        """One tab: frames out while it plays, commands in."""
        await tab.accept()
        replay = self.watcher.replay if self.watcher else None
        session = Session(self.target, replay)
        wake = asyncio.Event()
        self.tabs[tab] = (session, wake)
        receiver = asyncio.create_task(self._receive(tab, session, wake))
        loop = asyncio.get_running_loop()
        try:
            await tab.send_json(self.hello())
            while not receiver.done():
                if not session.wants_frame:
                    await _wait(wake, None)
                    continue
                started = loop.time()
                message = await loop.run_in_executor(self.render_pool, session.next_frame)
                await tab.send_bytes(message)
                if session.playing:
                    await _wait(wake, session.frame_interval_s() - (loop.time() - started))
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass  # the tab went away mid-send
        except Exception as err:  # noqa: BLE001 - the simulation failed: say so on the page
            with contextlib.suppress(Exception):
                await tab.send_json({"type": "error", "message": f"{type(err).__name__}: {err}"})
                await tab.close()
        finally:
            receiver.cancel()
            self.tabs.pop(tab, None)
            with contextlib.suppress(RuntimeError):  # the pool is already shut down
                await loop.run_in_executor(self.render_pool, session.close)

    async def _receive(self, tab: WebSocket, session: Session, wake: asyncio.Event) -> None:
        try:
            while True:
                message = await tab.receive_json()
                try:
                    session.command(message if isinstance(message, dict) else {})
                except ViewerError as err:
                    await tab.send_json({"type": "error", "message": str(err)})
                wake.set()
        except (WebSocketDisconnect, RuntimeError, ValueError):
            wake.set()  # lets the frame loop see that the tab is gone

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self.render_pool.shutdown(wait=False, cancel_futures=True)


async def _wait(event: asyncio.Event, timeout_s: float | None) -> None:
    """Wait for ``event`` (a command) or ``timeout_s``, whichever comes first; clear it."""
    if timeout_s is not None and timeout_s <= 0:
        await asyncio.sleep(0)
    else:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
    event.clear()


def create_app(target: ViewTarget) -> Starlette:
    """The viewer's Starlette app for ``target``."""
    viewer = Viewer(target)
    page = resources.files("gradgym.platform.viewer").joinpath("page.html").read_text()

    async def index(request: Any) -> HTMLResponse:
        return HTMLResponse(page)

    async def info(request: Any) -> JSONResponse:
        return JSONResponse(viewer.hello())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        watcher = asyncio.create_task(viewer.watch()) if viewer.watcher else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            viewer.close()

    return Starlette(routes=[Route("/", index), Route("/api/info", info),
                             WebSocketRoute("/ws", viewer.stream)], lifespan=lifespan)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: any free port).

    Raises:
        ViewerError: the port is taken or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ViewerError(f"cannot listen on {host}:{port} ({err.strerror}); choose another "
                          "port with --port N (or --port 0 for any free one)") from err
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def serve(target: ViewTarget, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the viewer of ``target`` until SIGINT/SIGTERM; prints the URL first.

    Raises:
        ViewerError: the port is taken (before anything starts).
    """
    import uvicorn

    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"gradgym view: {target.title} at http://{shown}:{sock.getsockname()[1]}/  "
          "(Ctrl+C stops it)", flush=True)
    config = uvicorn.Config(create_app(target), log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
