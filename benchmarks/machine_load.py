"""The machine's load average, as every benchmark prints it beside its timings."""

from __future__ import annotations

import os


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"0.85 1.18 1.79"``."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())
