"""``gradgym view``: an env, or a run's best plan or policy, live in the browser.

The server (Starlette on uvicorn, bound to 127.0.0.1 by default) steps its own numpy copy
of the env per browser tab, renders frames with the task's renderer and streams them as JPEG
over a websocket. A run folder is replayed from the files the run saved
(:mod:`gradgym.platform.replays`); a run still going is followed through its folder alone.
"""

from gradgym.platform.viewer.app import create_app, serve
from gradgym.platform.viewer.target import ViewerError, ViewTarget, resolve_target

__all__ = ["ViewTarget", "ViewerError", "create_app", "resolve_target", "serve"]
