"""Where the commands and the benchmarks write by default: one folder per run under ``runs/``."""

from __future__ import annotations

import time
from pathlib import Path

RUNS = Path("runs")


def run_dir(command: str, out: str | Path | None = None) -> Path:
    """``out`` when given, else ``runs/<command>-<YYYYmmdd-HHMMSS>/`` under the current directory."""
    return Path(out) if out is not None else RUNS / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
