"""Writing benchmark rows: JSON (a list of rows), CSV (one line per row) and a PNG plot.

Files are named ``<name>_<device>.json/.csv/.png`` (``<device>`` the device name with every run of
characters other than letters, digits, ``.``, ``_`` and ``-`` turned into ``_``), inside
``<out_dir>/<device>/`` or, with ``per_device_dir=False``, directly in ``out_dir``. The plot needs
matplotlib (``pip install prefix-kernels[bench]``); without it the plot is skipped with a message.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from prefix_kernels.benchmarking.kernels import COLUMNS, ENV_COLUMNS


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H200" -> "NVIDIA_H200"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "device"


def columns(rows: Sequence[dict]) -> list[str]:
    """COLUMNS, then the environment columns, then whatever else the rows carry (first seen first)."""
    cols = list(COLUMNS) + [c for c in ENV_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _replace(path: Path, write: Callable[[object], None]) -> Path:
    """Writes through a temporary file renamed over ``path``: a reader, or a run interrupted while
    it writes, sees the previous complete file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(rows: Sequence[dict], path: Path | str) -> Path:
    cols = columns(rows)
    ordered = [{c: _clean(r.get(c)) for c in cols if c in r or c in COLUMNS} for r in rows]
    return _replace(Path(path), lambda f: f.write(json.dumps(ordered, indent=1) + "\n"))


def write_csv(rows: Sequence[dict], path: Path | str) -> Path:
    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else _clean(v) for k, v in r.items()})

    return _replace(Path(path), write)


def plot(rows: Sequence[dict], path: Path | str, *, log: Callable[[str], None] | None = print) -> Path | None:
    """One panel per shape: median ms of each provider, bars grouped by mode. Rows without a time
    (errors, skipped providers) are left out. Returns the path, or None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        if log:
            log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    timed = [r for r in rows if r.get("ms")]
    shapes = list(dict.fromkeys((r["kind"], r["shape"], r["dtype"]) for r in timed))
    if not shapes:
        if log:
            log("no timed rows: no plot")
        return None
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    ncols = min(3, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    device = next((r.get("device") for r in timed if r.get("device")), "")
    fig.suptitle(f"prefix attention kernels, {device}: median ms (lower is better)")
    for i, (kind, shape, dtype) in enumerate(shapes):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        sub = [r for r in timed if (r["kind"], r["shape"], r["dtype"]) == (kind, shape, dtype)]
        modes = list(dict.fromkeys(r["mode"] for r in sub))
        here = [p for p in providers if any(r["provider"] == p for r in sub)]
        width = 0.8 / max(len(here), 1)
        for j, p in enumerate(here):
            xs, ys = [], []
            for m, mode in enumerate(modes):
                row = next((r for r in sub if r["provider"] == p and r["mode"] == mode), None)
                if row:
                    xs.append(m - 0.4 + width * (j + 0.5))
                    ys.append(row["ms"])
            ax.bar(xs, ys, width, label=p, color=colors[p])
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel("ms")
        dims = " ".join(f"{c}={sub[0][c]}" for c in ("B", "Hq", "Hkv", "N", "M", "P", "D", "W")
                        if sub[0].get(c) is not None)
        ax.set_title(f"{kind} {dtype}: {dims}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=[Patch(color=colors[p], label=p) for p in providers], loc="outside lower center",
               ncols=min(len(providers), 6))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def report_stem(out_dir: Path | str, device: str, *, name: str = "attention", per_device_dir: bool = True,
                device_suffix: bool = True) -> Path:
    """``<out_dir>[/<device>]/<name>[_<device>]``, the files' path without a suffix."""
    slug = device_slug(device)
    directory = Path(out_dir) / slug if per_device_dir else Path(out_dir)
    return directory / (f"{name}_{slug}" if device_suffix else name)


class RowWriter:
    """The results files of a run while it runs: :meth:`add` rewrites ``<stem>.json`` and
    ``<stem>.csv`` with every row so far, so an interrupted run leaves the rows that finished."""

    def __init__(self, stem: Path):
        self.stem = Path(stem)
        self.rows: list[dict] = []
        # not Path.with_suffix: device slugs may contain dots
        self.paths = {"json": self.stem.parent / f"{self.stem.name}.json",
                      "csv": self.stem.parent / f"{self.stem.name}.csv"}

    def add(self, rows: Sequence[dict]) -> None:
        self.write(self.rows + list(rows))

    def write(self, rows: Sequence[dict]) -> None:
        """Both files with exactly ``rows``."""
        self.rows = list(rows)
        write_json(self.rows, self.paths["json"])
        write_csv(self.rows, self.paths["csv"])

    def where(self) -> str:
        """Where the rows are, for messages: ``DIR/STEM.json and .csv``."""
        return f"{self.paths['json']} and .csv"


def write_report(rows: Sequence[dict], out_dir: Path | str, *, name: str = "attention", per_device_dir: bool = True,
                 device_suffix: bool = True, with_plot: bool = True,
                 log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """Writes ``<name>_<device>.json/.csv`` (``<name>.json/.csv`` with ``device_suffix=False``)
    and the ``.png`` when ``with_plot``; returns the paths by suffix."""
    device = next((r.get("device") for r in rows if r.get("device")), "device")
    writer = RowWriter(report_stem(out_dir, device, name=name, per_device_dir=per_device_dir,
                                   device_suffix=device_suffix))
    writer.add(rows)
    return finish_report(writer, with_plot=with_plot, log=log)


def finish_report(writer: RowWriter, *, with_plot: bool = True,
                  log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """The plot of a :class:`RowWriter`'s rows (when ``with_plot``), and the "wrote ..." line."""
    paths = dict(writer.paths)
    if with_plot:
        png = plot(writer.rows, writer.stem.parent / f"{writer.stem.name}.png", log=log)
        if png:
            paths["png"] = png
    if log:
        log("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths
