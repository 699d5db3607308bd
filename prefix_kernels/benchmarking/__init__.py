"""Kernel benchmark of the fused op against PEFT-style attention, cat + SDPA, FlexAttention,
flash-attn and the no-prefix floor, on CUDA or CPU (``prefix-kernels bench``).

    prefix-kernels bench                          # CUDA: training + decode presets, bf16
                                                  # CPU: the "cpu" preset, fp32
    prefix-kernels bench --preset quick --out DIR --providers ours,cat_sdpa,sdpa_no_prefix
    prefix-kernels bench --shape 4x9x3x512x512x20x64 --shape 16x16x4x1x4096x64x128 --no-plot
    prefix-kernels bench --preset window-cpu                 # sliding windows: W = 512 vs W = M
    prefix-kernels bench --shape 1x32x8x8192x8192x128x128w1024   # "wW": a sliding window of W keys

A shape "BxHqxHkvxNxMxPxD" may end in "wW": a sliding window (query at position i sees sequence
keys i - W < j <= i, the prefix always); every provider then computes that (ours with
sliding_window=W, the SDPA ones with the window in an explicit mask, FlexAttention in its
mask_mod; flash-attn, which cannot keep the prefix visible outside its window, is "skipped").

Each provider is checked against the fp32 reference on a cut-down version of each shape before it
is timed; rows go to ``<out>/<device>/attention_<device>.json/.csv/.png``. The runner and the rows:
:mod:`~prefix_kernels.benchmarking.kernels`; the providers: :mod:`~.providers`; shapes and presets:
:mod:`~.shapes`; what is timed and how: :mod:`~.timing`; how FLOPs and bytes are counted:
:mod:`~.accounting`; the correctness gate: :mod:`~.correctness`; the files: :mod:`~.report`.
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
from prefix_kernels.benchmarking.report import write_report

__all__ = ["PRESETS", "PROVIDERS", "Provider", "Shape", "environment", "flops", "kv_bytes", "main",
           "run_kernel_bench", "time_ms"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {value!r}") from None


class _RunFolder:
    """run_kernel_bench's default ``out_dir``: a new ``runs/bench-<date>-<time>/``, as the CLI's."""

    def __repr__(self):
        return "runs/bench-<date>-<time>/"


_RUN_FOLDER = _RunFolder()


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

    preset: "auto" (CUDA: "training" + "decode"; CPU: "cpu"), "training", "decode", "quick",
        "cpu", "window", "window-cpu", "shared-prefix-cpu", several joined with ","; ignored when
        ``shapes`` is given
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
        from prefix_kernels.cli.common import run_dir

        out_dir = run_dir("bench")  # named when the run starts, as the CLI's
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device}")
    dtype = _dtype(dtype) if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if shapes is not None:
        shape_list = [Shape.parse(s) if isinstance(s, str) else s for s in shapes]
    else:
        shape_list = preset_shapes(preset, device)
    if modes is not None:
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    from prefix_kernels.benchmarking.kernels import run

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = run(shape_list, resolve_providers(providers), dtype, device, modes=modes, warmup=warmup, reps=reps,
                   log=log)
    finally:
        if threads:
            torch.set_num_threads(previous_threads)
    if out_dir is not None and rows:
        write_report(rows, out_dir, name=name, per_device_dir=per_device_dir, device_suffix=device_suffix,
                     with_plot=plot, log=log)
    return rows


def build_parser(prog: str = "prefix-kernels bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="auto",
                        help=f"auto (CUDA: training+decode, CPU: cpu), {', '.join(PRESETS)}, or several joined by ','")
    parser.add_argument("--shape", action="append", default=None, metavar="BxHqxHkvxNxMxPxD[wW]",
                        help="a custom shape instead of the preset (repeatable; N=1 < M is a decode shape; "
                             "a wW suffix adds a sliding window of W keys, e.g. 1x8x2x2048x2048x64x64w512)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
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


def main(argv: Sequence[str] | None = None, prog: str = "prefix-kernels bench") -> int:
    """``prefix-kernels bench ...``. Exit status 1 when ours failed (correctness gate or an error)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    from prefix_kernels.cli.common import run_dir

    try:
        rows = run_kernel_bench(
            args.preset, device=args.device, dtype=args.dtype, out_dir=run_dir("bench", args.out),
            providers=args.providers,
            shapes=args.shape, modes=args.modes.split(",") if args.modes else None, warmup=args.warmup,
            reps=args.reps, threads=args.threads, plot=not args.no_plot, per_device_dir=not args.flat,
            name=args.name)
    except ValueError as exc:
        parser.error(str(exc))
    bad = [r for r in rows if r["provider"] == "ours" and r["status"] == "error"]
    for r in bad:
        print(f"ours FAILED on {r['shape']} {r['mode']}: {r['error']}", file=sys.stderr)
    return 1 if bad else 0
