"""Kernel benchmark of the fused op against PEFT-style attention, cat + SDPA, FlexAttention,
flash-attn and the no-prefix floor, on CUDA or CPU (prefix-kernels bench).

    prefix-kernels bench                          # CUDA: training + decode presets, bf16
                                                  # CPU: the "quick-cpu" preset, fp32
    prefix-kernels bench --preset quick --out DIR --providers ours,cat_sdpa,sdpa_no_prefix
    prefix-kernels bench --shape 4x9x3x512x512x20x64 --shape 16x16x4x1x4096x64x128 --no-plot
    prefix-kernels bench --preset window-cpu                 # sliding windows: W = 512 vs W = M
    prefix-kernels bench --shape 1x32x8x8192x8192x128x128w1024   # "wW": a sliding window of W keys

A shape "BxHqxHkvxNxMxPxD" may end in "wW": a sliding window (query at position i sees sequence
keys i - W < j <= i, the prefix always); every provider then computes that (ours with
sliding_window=W, the SDPA ones with the window in an explicit mask, FlexAttention in its
mask_mod; flash-attn, which cannot keep the prefix visible outside its window, is "skipped").

Each provider is checked against the fp32 reference on a cut-down version of each shape before it
is timed. A run goes through steps, one per shape and mode (fwd, bwd, fwd+bwd; decode), each
giving a row per provider; a line per finished step shows its number, the seconds so far and the
times. Rows go to OUT/<device>/attention_<device>.json and .csv as each step finishes (Ctrl-C
keeps them: exit status 130), the plot (.png) at the end. A preset sized for a CUDA GPU is refused
on a CPU (exit status 2) unless --force is given.

The code: the runner and the rows in prefix_kernels/benchmarking/kernels.py; next to it
providers.py (what is compared), shapes.py (shapes and presets), timing.py (what is timed and
how), accounting.py (FLOP and byte counts), correctness.py (the gate), report.py (the files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from prefix_kernels.benchmarking.kernels import (
    MODES,
    PRESETS,
    PROVIDERS,
    Provider,
    Shape,
    environment,
    flops,
    kv_bytes,
    preset_shapes,
    resolve_providers,
    time_ms,
)
from prefix_kernels.benchmarking.metadata import device_name
from prefix_kernels.benchmarking.report import RowWriter, finish_report, report_stem
from prefix_kernels.benchmarking.shapes import AUTO, PRESET_TABLE, gpu_sized, presets_help
from prefix_kernels.dtypes import KERNEL_DTYPES, resolve_dtype
from prefix_kernels.runs import run_dir

__all__ = ["PRESETS", "PRESET_TABLE", "PROVIDERS", "BenchInterrupted", "Provider", "Shape", "environment", "flops",
           "kv_bytes", "main", "run_kernel_bench", "time_ms"]

class _RunFolder:
    """run_kernel_bench's default ``out_dir``: a new ``runs/bench-<date>-<time>/``, as the CLI's."""

    def __repr__(self):
        return "runs/bench-<date>-<time>/"


_RUN_FOLDER = _RunFolder()


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_kernel_bench`: ``rows`` are those of the steps that finished
    (already in ``writer``'s files when there is one), ``done`` of ``total`` steps."""

    def __init__(self, rows: list[dict], writer: RowWriter | None, done: int, total: int):
        super().__init__(f"interrupted after {done} of {total} steps")
        self.rows, self.writer, self.done, self.total = rows, writer, done, total


def run_kernel_bench(
    preset: str | Sequence[Shape] = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    out_dir: str | Path | _RunFolder | None = _RUN_FOLDER,
    providers: str | Sequence[str | Provider] | None = None,
    *,
    shapes: Sequence[Shape | str] | None = None,
    modes: Sequence[str] | None = None,
    warmup: int = 2,
    reps: int = 7,
    threads: int | None = None,
    plot: bool = True,
    per_device_dir: bool = True,
    device_suffix: bool = True,
    name: str = "attention",
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Runs the kernel benchmark and returns its rows (one per shape, mode and provider).

    preset: "auto" (CUDA: "training" + "decode"; CPU: "quick-cpu"), a name of ``PRESET_TABLE``
        ("training", "decode", "quick", "quick-cpu", "cpu", "window", "window-cpu",
        "shared-prefix-cpu", "shared-prefix"), several joined with ","; ignored when ``shapes`` is given
        (Shape objects or "BxHqxHkvxNxMxPxD[wW]" strings, wW a sliding window).
    device: "cuda" / "cpu" (default: CUDA when available). dtype: default bf16 on CUDA, fp32 on CPU.
    out_dir: where ``<name>_<device>.json/.csv/.png`` go (``<out_dir>/<device>/`` unless
        ``per_device_dir=False``; no ``_<device>`` with ``device_suffix=False``); default a new
        ``runs/bench-<date>-<time>/`` under the current directory, as ``prefix-kernels bench``;
        None writes nothing.
    providers: names (see ``PROVIDERS`` and ``EXTRA_PROVIDERS``; comma-separated string or list)
        or Provider objects; default all of ``PROVIDERS`` (those that cannot run here give
        "skipped" rows).
    modes: subset of fwd, bwd, fwd+bwd, decode. warmup/reps: CPU timing (CUDA uses do_bench).
    threads: torch.set_num_threads for the run (CPU).
    """
    if out_dir is _RUN_FOLDER:
        out_dir = run_dir("bench")  # named when the run starts, as the CLI's
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device}")
    dtype = resolve_dtype(dtype) if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if shapes is not None:
        shape_list = [Shape.parse(s) if isinstance(s, str) else s for s in shapes]
    else:
        shape_list = preset_shapes(preset, device)
    if modes is not None:
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    from prefix_kernels.benchmarking.kernels import run, steps

    provider_list = resolve_providers(providers)
    writer = None
    if out_dir is not None:
        writer = RowWriter(report_stem(out_dir, device_name(device), name=name, per_device_dir=per_device_dir,
                                       device_suffix=device_suffix))
    total = len(steps(shape_list, modes))
    if log:
        log(f"{total} steps ({len(shape_list)} shapes x modes), a row per provider each"
            + (f"; rows go to {writer.where()} as each step finishes" if writer else ""))
    groups: list[list[dict]] = []  # each finished step's rows

    def finished(group: list[dict]) -> None:
        groups.append(group)
        if writer is not None:
            writer.add(group)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        run(shape_list, provider_list, dtype, device, modes=modes, warmup=warmup, reps=reps,
            log=log, on_rows=finished)
    except KeyboardInterrupt:
        rows = [r for group in groups for r in group]
        if writer is not None and rows:
            writer.write(rows)  # the interrupt may have come while the last step's rows were written
        raise BenchInterrupted(rows, writer if writer is not None and rows else None, len(groups), total) from None
    finally:
        if threads:
            torch.set_num_threads(previous_threads)
    rows = [r for group in groups for r in group]
    if writer is not None and rows:
        finish_report(writer, with_plot=plot, log=log)
    return rows


def build_parser(prog: str = "prefix-kernels bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=presets_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="auto",
                        help="a preset listed below, or several joined by ',' (default: auto, the device's own)")
    parser.add_argument("--force", action="store_true",
                        help="run a preset sized for a CUDA GPU on a CPU anyway (minutes to hours)")
    parser.add_argument("--shape", action="append", default=None, metavar="BxHqxHkvxNxMxPxD[wW]",
                        help="a custom shape instead of the preset (repeatable; N=1 < M is a decode shape; "
                             "a wW suffix adds a sliding window of W keys, e.g. 1x8x2x2048x2048x64x64w512)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=KERNEL_DTYPES, default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (files go to OUT/<device>/; default runs/bench-<date>-<time>/)")
    parser.add_argument("--flat", action="store_true", help="write into OUT itself, not OUT/<device>/")
    parser.add_argument("--name", default="attention", help="file stem: NAME_<device>.json/.csv/.png")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all; also "
                             "peft, concat, floor, flex, flash)")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="CPU: runs before timing")
    parser.add_argument("--reps", type=int, default=7, help="CPU: timed runs (median)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser


def _cpu_way_out() -> str:
    """The CPU presets, the first (the default) with its measured run time."""
    cpu = AUTO["cpu"] + [name for name, p in PRESET_TABLE.items() if p.device == "cpu" and name not in AUTO["cpu"]]
    first = PRESET_TABLE[cpu[0]]
    others = f"; the other CPU presets: {', '.join(cpu[1:])}" if cpu[1:] else ""
    return f"--preset {cpu[0]} ({first.runtime or 'CPU-sized'}{others})"


def main(argv: Sequence[str] | None = None, prog: str = "prefix-kernels bench") -> int:
    """prefix-kernels bench ... Exit status 1 when ours failed (correctness gate or an error), 2 for a
    usage error or a GPU-sized preset on a CPU without --force, 130 on Ctrl-C (the finished rows
    are kept)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape is None:
        try:
            too_big = gpu_sized(args.preset, device)
        except ValueError as exc:
            parser.error(str(exc))
        if too_big and not args.force:
            print(f"{prog}: error: preset {', '.join(too_big)} is sized for a CUDA GPU and would take minutes "
                  f"to hours on this CPU: use {_cpu_way_out()}, or add --force to run it anyway",
                  file=sys.stderr)
            return 2
        if too_big:
            print(f"{prog}: warning: preset {', '.join(too_big)} is sized for a CUDA GPU; running it on the CPU "
                  "(--force)", file=sys.stderr)
    try:
        rows = run_kernel_bench(
            args.preset, device=device, dtype=args.dtype, out_dir=run_dir("bench", args.out),
            providers=args.providers,
            shapes=args.shape, modes=args.modes.split(",") if args.modes else None, warmup=args.warmup,
            reps=args.reps, threads=args.threads, plot=not args.no_plot, per_device_dir=not args.flat,
            name=args.name)
    except ValueError as exc:
        parser.error(str(exc))
    except BenchInterrupted as stop:
        kept = (f"{len(stop.rows)} rows of the finished steps are in {stop.writer.where()}" if stop.writer
                else "no step had finished: nothing written")
        print(f"{prog}: interrupted after {stop.done} of {stop.total} steps; {kept}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the steps (while plotting, say): the files are already complete
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    bad = [r for r in rows if r["provider"] == "ours" and r["status"] == "error"]
    for r in bad:
        print(f"ours FAILED on {r['shape']} {r['mode']}: {r['error']}", file=sys.stderr)
    return 1 if bad else 0
