"""Shared drawing helpers for the classic tasks: an off-screen matplotlib Agg canvas.

Each task defines a :class:`CanvasRenderer` subclass in its own module. The renderer
builds its figure once: *static* artists (track, reach circle, ...) are drawn into a cached
background, *moving* artists (cart, arm, fish, reward label, ...) are created with
``animated=True`` and updated in place every frame. A frame then costs restoring the
cached background and drawing the moving artists (blitting), not a full redraw.

No pyplot: figures are plain :class:`matplotlib.figure.Figure` objects with their own
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so rendering needs no display,
keeps no global state and is safe in worker processes.

matplotlib is imported lazily (on the first renderer), so ``import gradgym`` stays fast.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import numpy as np

from gradgym.envs.core import Renderer

FRAME_SIZE = 256
"""Default frame width and height in pixels."""

FIGURE_INCHES = FRAME_SIZE / 100
"""Figure width and height in inches at every frame size: a smaller frame gets a lower dpi,
so line widths, marker and font sizes (in points) shrink with it and the picture is the same
scene, scaled."""

BACKGROUNDS_KEPT = 16
"""Cached backgrounds per renderer (one per window page; least recently used dropped)."""

BACKGROUND = "#f7f7f2"
INK = "#303030"
REWARD_COLORMAP = "RdYlGn"
"""Colormap of :func:`reward_color`: red at reward 0, yellow at 0.5, green at 1."""

View = tuple[tuple[float, float], tuple[float, float]]
"""World window ``((xmin, xmax), (ymin, ymax))`` shown by a renderer."""


@functools.lru_cache(maxsize=1)
def _reward_colors() -> np.ndarray:
    # matplotlib.colormaps[...] returns a fresh copy on every lookup: sample it once.
    import matplotlib

    return matplotlib.colormaps[REWARD_COLORMAP](np.linspace(0.0, 1.0, 256))


def reward_color(reward: float, low: float = 0.0, high: float = 1.0) -> tuple[float, ...]:
    """RGBA color of ``reward`` on :data:`REWARD_COLORMAP`, clipped to ``[low, high]``."""
    fraction = (float(reward) - low) / (high - low)
    if not np.isfinite(fraction):
        fraction = 0.0
    colors = _reward_colors()
    return tuple(colors[round(min(max(fraction, 0.0), 1.0) * (len(colors) - 1))])


def page_center(position: float, step: float, origin: float = 0.0) -> float:
    """Center of the window page that shows ``position``: ``origin + k * step``.

    The world is cut into pages ``step`` apart; an object is drawn in the page whose center
    is nearest, so it stays within ``step / 2`` of the window's center (a window wider than
    ``step`` keeps a margin). A pure function of the position: a state draws the same frame
    whatever was drawn before, and the cached background changes only with the page.
    """
    if not np.isfinite(position):
        return origin
    return origin + step * round((position - origin) / step)


class CanvasRenderer(Renderer):
    """A :class:`~gradgym.envs.core.Renderer` on an off-screen Agg canvas, with blitting.

    Subclasses implement :meth:`build` (create artists once), :meth:`update` (move the
    animated artists to a state) and optionally :meth:`view` (the world window for a state,
    for objects that can leave the default window; see :func:`page_center`) and
    :meth:`on_view_change`.

    Backgrounds are cached per window (up to :data:`BACKGROUNDS_KEPT`), so one renderer
    drawing states that sit in different pages in turn (the members of a batch, in a grid)
    redraws the static artists only the first time it sees a page.

    Args:
        view: the initial world window ``((xmin, xmax), (ymin, ymax))``.
        size: frame width and height in pixels (``None``: :data:`FRAME_SIZE`); the scene is
            the same at every size (see :data:`FIGURE_INCHES`).
    """

    blit = True
    """Draw frames by blitting (the default); ``False`` redraws the whole figure each frame,
    which gives the same picture more slowly (the peer in ``benchmarks/render_speed.py``)."""

    def __init__(self, view: View, size: int | None = None):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        size = FRAME_SIZE if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"frame size must be an int >= 16 pixels, got {size!r}")
        self.size = size
        self.figure = Figure(figsize=(FIGURE_INCHES, FIGURE_INCHES), dpi=size / FIGURE_INCHES,
                             facecolor=BACKGROUND)
        self.canvas = FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_axes((0.0, 0.0, 1.0, 1.0))
        self.ax.set_axis_off()
        self.ax.set_facecolor(BACKGROUND)
        self._view = view
        self._static_view = view  # the window the static artists are fitted to
        self._apply_view(view)
        self.animated: list[Any] = []
        self.build(self.ax)
        self._build_reward_bar()
        self._backgrounds: OrderedDict[View, Any] = OrderedDict()

    # ------------------------------------------------------------------ subclass API
    def build(self, ax: Any) -> None:
        """Create the artists; append the moving ones (``animated=True``) to ``self.animated``."""
        raise NotImplementedError

    def update(self, state: Any, reward: float, color: tuple[float, ...]) -> None:
        """Move the animated artists to ``state``; ``color`` is the reward's color."""
        raise NotImplementedError

    def view(self, state: Any) -> View:
        """The world window for ``state`` (a pure function of it); the default never moves."""
        return self._view

    def on_view_change(self, view: View) -> None:
        """Hook to refit static artists (e.g. a track) to a new window; called just before
        the static artists are drawn in a window other than the last one they were drawn in."""

    # ------------------------------------------------------------------ drawing
    def draw(self, state: Any, reward: float) -> np.ndarray:
        """``H x W x 3`` uint8 frame of one (unbatched, numpy) state."""
        view = self.view(state)
        if view != self._view:
            self._view = view
            self._apply_view(view)
        color = reward_color(reward)
        self.update(state, reward, color)
        self._update_reward_bar(reward, color)
        if self.blit:
            self._blit()
        else:
            self._redraw_all()
        return frame_of(self.canvas)

    def _blit(self) -> None:
        background = self._backgrounds.get(self._view)
        if background is None:
            self._fit_static_artists()
            self.canvas.draw()  # static artists only: the animated ones are skipped
            background = self.canvas.copy_from_bbox(self.figure.bbox)
            self._backgrounds[self._view] = background
            if len(self._backgrounds) > BACKGROUNDS_KEPT:
                self._backgrounds.popitem(last=False)
        else:
            self._backgrounds.move_to_end(self._view)
        self.canvas.restore_region(background)
        for artist in self.animated:
            self.ax.draw_artist(artist)

    def _fit_static_artists(self) -> None:
        if self._static_view != self._view:
            self._static_view = self._view
            self.on_view_change(self._view)

    def _redraw_all(self) -> None:
        self._fit_static_artists()
        for artist in self.animated:
            artist.set_animated(False)
        self.canvas.draw()
        for artist in self.animated:
            artist.set_animated(True)

    def _build_reward_bar(self) -> None:
        # A gauge in the top-left corner (axes coordinates): its fill is the reward in
        # [0, 1]. A bar instead of a number: text costs more to draw than the whole scene.
        from matplotlib.patches import Rectangle

        x0, y0, width, height = 0.03, 0.91, 0.3, 0.035
        self._bar_width = width
        self.ax.text(x0, y0 + height + 0.005, "reward", transform=self.ax.transAxes,
                     ha="left", va="bottom", fontsize=6, color=INK)
        self.ax.add_patch(Rectangle((x0, y0), width, height, transform=self.ax.transAxes,
                                    fc="none", ec=INK, lw=0.6))
        self.reward_bar = Rectangle((x0, y0), 0.0, height, transform=self.ax.transAxes,
                                    lw=0, animated=True)
        self.ax.add_patch(self.reward_bar)
        self.animated.append(self.reward_bar)

    def _update_reward_bar(self, reward: float, color: tuple[float, ...]) -> None:
        fill = min(max(float(reward), 0.0), 1.0) if np.isfinite(reward) else 0.0
        self.reward_bar.set_width(self._bar_width * fill)
        self.reward_bar.set_facecolor(color)

    def _apply_view(self, view: View) -> None:
        (xmin, xmax), (ymin, ymax) = view
        self.ax.set_xlim(xmin, xmax)
        self.ax.set_ylim(ymin, ymax)


def frame_of(canvas: Any) -> np.ndarray:
    """The canvas' current pixels as an ``H x W x 3`` uint8 array (a copy).

    The RGBA buffer is read as little-endian 32-bit words (red in the low byte) and each
    color byte is shifted out of them: 3-6x faster than numpy's copy of ``rgba[..., :3]``,
    whose 3-byte inner loop cost as much as drawing a small frame.
    """
    width, height = canvas.get_width_height()
    words = np.frombuffer(canvas.buffer_rgba(), dtype="<u4")
    frame = np.empty((height * width, 3), np.uint8)
    for channel in range(3):
        np.copyto(frame[:, channel], words >> (8 * channel), casting="unsafe")  # low byte
    return frame.reshape(height, width, 3)


def square_view(half_width: float, center: tuple[float, float] = (0.0, 0.0)) -> View:
    """A square window of half-width ``half_width`` around ``center``."""
    cx, cy = center
    return ((cx - half_width, cx + half_width), (cy - half_width, cy + half_width))
