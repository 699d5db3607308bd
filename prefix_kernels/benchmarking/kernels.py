"""Kernel-level benchmark of ``prefix_attention`` against the ways prefix tuning is usually done:
the runner, which turns shapes x providers x modes into rows.

The pieces, one module each:

    shapes       :class:`Shape` (with an optional sliding window ``W``), the presets, the inputs
                 of a shape and their layout
    providers    the implementations compared (ours, peft_style, cat_sdpa, sdpa_no_prefix,
                 flex_attention, flash_attn), when each can run, how each takes a window
    accounting   the FLOP and byte counts behind TFLOPS and GB/s
    correctness  the gate every provider passes on a cut-down shape before it is timed
    timing       the step each mode times, median ms, peak memory
    metadata     device, versions, git SHA, date of a run (the environment columns)

For each shape :func:`bench_shape` runs the correctness gate of every provider, then times every
mode (training shapes: fwd, bwd, fwd+bwd; decode shapes: decode) of every provider that passed:
one after the other on CUDA, interleaved on CPU. A row per shape, mode and provider, with the
columns :data:`COLUMNS` (:func:`run` adds the environment's). ``status`` is "ok", "skipped" (the
provider cannot run here; the reason in ``error``) or "error" (failed the gate, or raised while
timed). ``ratio_to_ours`` = provider ms / ours ms (> 1: ours is faster); ``ratio_to_floor`` =
provider ms / sdpa_no_prefix ms.

The names the pieces define are importable from here too (the scripts under benchmarks/ and the
tests import them from this module).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from prefix_kernels.benchmarking.accounting import flops, kv_bytes
from prefix_kernels.benchmarking.correctness import TOLERANCE, check_provider
from prefix_kernels.benchmarking.metadata import ENV_COLUMNS, cpu_name, environment
from prefix_kernels.benchmarking.providers import (
    ALIASES,
    EXTRA_PROVIDERS,
    FLOOR,
    PROVIDERS,
    Provider,
    concat_sdpa,
    flash_attn_cat,
    flex_attention_cat,
    ours,
    peft_style,
    prefix_mask,
    prefix_mask_mod,
    resolve_providers,
    sdpa_no_prefix,
    sequence_mask,
)
from prefix_kernels.benchmarking.shapes import (
    DECODE_MODES,
    MODES,
    PRESETS,
    TRAINING_MODES,
    Shape,
    layout,
    make_inputs,
    preset_shapes,
)
from prefix_kernels.benchmarking.timing import (
    free,
    interleaved_median_ms,
    interleaved_times,
    make_step,
    peak_mib,
    short_error,
    time_ms,
)
from prefix_kernels.functional import resolve_backend

__all__ = ["ALIASES", "COLUMNS", "DECODE_MODES", "ENV_COLUMNS", "EXTRA_PROVIDERS", "FLOOR", "MODES", "PRESETS",
           "PROVIDERS", "TOLERANCE", "TRAINING_MODES", "Provider", "Shape", "add_ratios", "bench_shape", "check_provider",
           "concat_sdpa", "cpu_name", "environment", "flash_attn_cat", "flex_attention_cat", "flops",
           "interleaved_median_ms", "kv_bytes", "layout", "make_inputs", "make_step", "ours", "peft_style",
           "preset_shapes", "prefix_mask", "prefix_mask_mod", "resolve_providers", "run", "sdpa_no_prefix",
           "sequence_mask", "steps", "summary_line", "time_ms"]

# the columns every row has, in this order (CSV); environment fields follow
COLUMNS = ("shape", "kind", "B", "Hq", "Hkv", "N", "M", "P", "D", "W", "dtype", "layout", "provider", "mode",
           "status", "ms", "flops", "tflops", "bytes", "gb_per_s", "peak_mib", "ratio_to_ours",
           "ratio_to_floor", "max_err", "error")


def _base_row(shape: Shape, dtype: torch.dtype, provider: str, mode: str) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(shape=shape.name, kind=shape.kind, B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, N=shape.N, M=shape.M,
               P=shape.P, D=shape.D, W=shape.W, dtype=str(dtype).replace("torch.", ""), layout=layout(shape),
               provider=provider, mode=mode, flops=flops(shape, mode),
               bytes=kv_bytes(shape, dtype) if mode == "decode" else None)
    return row


def _finish(row: dict, ms: float | None, peak_mib: float | None = None) -> dict:
    row.update(status="ok", ms=ms, peak_mib=peak_mib)
    row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12 if ms else None
    if row["bytes"] is not None and ms:
        row["gb_per_s"] = row["bytes"] / (ms * 1e-3) / 1e9
    return row


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_ours / ratio_to_floor of every timed row (same shape, dtype and mode)."""
    by_key = {(r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in rows if r.get("ms")}
    for r in rows:
        if not r.get("ms"):
            continue
        for col, ref_name in (("ratio_to_ours", "ours"), ("ratio_to_floor", FLOOR)):
            ref = by_key.get((r["shape"], r["dtype"], r["mode"], ref_name))
            r[col] = r["ms"] / ref["ms"] if ref else None


Runnable = dict[str, tuple[Provider, float]]  # provider name -> (provider, max error in the gate)


def _gate(shape: Shape, providers: Sequence[Provider], dtype: torch.dtype, device: torch.device,
          modes: Sequence[str], log: Callable[[str], None] | None) -> tuple[list[dict], Runnable]:
    """The correctness gate of every provider: rows ("skipped"/"error") of those that cannot run or
    fail it, and the others by name with their max error."""
    rows: list[dict] = []
    runnable: Runnable = {}
    for p in providers:
        reason = p.why_unavailable(device, dtype, shape.W)
        err = None
        if reason is None:
            try:
                runnable[p.name] = (p, check_provider(p, shape, dtype, device))
            except AssertionError as exc:
                err = f"correctness check failed: {exc}"
            except Exception as exc:  # noqa: BLE001 -- any failure of a provider becomes a row
                err = f"correctness check raised {short_error(exc)}"
            finally:
                free(device)
        for mode in ([] if p.name in runnable else modes):
            row = _base_row(shape, dtype, p.name, mode)
            row.update(status="skipped" if reason else "error", error=reason or err)
            rows.append(row)
        if log and p.name not in runnable:
            log(f"  {shape.name} {p.name}: {'skipped' if reason else 'ERROR'}: {reason or err}")
    return rows, runnable


def _time_one_by_one(shape: Shape, runnable: Runnable, mode: str,
                     inputs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
                     warmup: int, reps: int) -> list[dict]:
    """Rows of one mode, each provider timed on its own (then its peak memory on CUDA)."""
    rows = []
    for name, (p, max_err) in runnable.items():
        row = _base_row(shape, dtype, name, mode)
        row["max_err"] = max_err
        try:
            step = make_step(p, mode, inputs, shape.W)
            ms = time_ms(step, warmup=warmup, reps=reps, device=device)
            _finish(row, ms, peak_mib(step, device))
        except Exception as exc:  # noqa: BLE001 -- OOM or a failing baseline: an error row
            row.update(status="error", error=short_error(exc))
        finally:
            step = None
            free(device)
        rows.append(row)
    return rows


def _time_interleaved(shape: Shape, runnable: Runnable, mode: str,
                      inputs: Sequence[torch.Tensor], dtype: torch.dtype, warmup: int, reps: int) -> list[dict]:
    """Rows of one mode, the providers' runs interleaved (:func:`interleaved_times`)."""
    steps, failed = {}, {}
    for name, (p, _) in runnable.items():
        try:
            steps[name] = make_step(p, mode, inputs, shape.W)
        except Exception as exc:  # noqa: BLE001
            failed[name] = short_error(exc)
    results, run_failed = interleaved_times(steps, warmup=warmup, reps=reps)
    failed.update(run_failed)
    rows = []
    for name, (_, max_err) in runnable.items():
        row = _base_row(shape, dtype, name, mode)
        row["max_err"] = max_err
        if name in results:
            _finish(row, results[name])
        else:
            row.update(status="error", error=failed.get(name, "not timed"))
        rows.append(row)
    return rows


def summary_line(shape: Shape, mode: str, rows: Sequence[dict]) -> str:
    """One line of a shape's timed rows in one mode: each provider's ms, ratio to ours, TFLOPS/GB/s."""
    parts = []
    for r in rows:
        if r["mode"] == mode and r["status"] == "ok":
            extra = f" {r['gb_per_s']:.1f} GB/s" if r.get("gb_per_s") else f" {r['tflops']:.2f} TFLOPS"
            parts.append(f"{r['provider']} {r['ms']:.3f} ms ({r['ratio_to_ours']:.2f}x,{extra})"
                         if r.get("ratio_to_ours") else f"{r['provider']} {r['ms']:.3f} ms{extra}")
    return f"{shape.kind:8s} {shape.name:26s} {mode:7s} " + "  ".join(parts)


def steps(shapes: Sequence[Shape], modes: Sequence[str] | None = None) -> list[tuple[Shape, str]]:
    """The (shape, mode) steps a run goes through, in order; each gives a row per provider."""
    return [(s, m) for s in shapes for m in s.modes if modes is None or m in modes]


def bench_shape(shape: Shape, providers: Sequence[Provider], dtype: torch.dtype, device: torch.device,
                *, modes: Sequence[str] | None = None, warmup: int = 2, reps: int = 7,
                interleave: bool | None = None, log: Callable[[str], None] | None = print,
                on_rows: Callable[[str, list[dict]], None] | None = None) -> list[dict]:
    """Rows of one shape: the correctness gate, then every mode of every provider that passed.
    ``interleave`` (default: on CPU) times the providers' runs in turn, else one after the other.
    ``on_rows(mode, rows)`` gets each mode's rows as soon as they are timed (then ``log`` is left
    the gate's messages; without it each mode's :func:`summary_line` is logged too)."""
    modes = [m for m in shape.modes if modes is None or m in modes]
    gate_rows, runnable = _gate(shape, providers, dtype, device, modes, log)
    order = {p.name: i for i, p in enumerate(providers)}
    rows: list[dict] = []
    for mode in modes:
        needs_grad = mode in ("bwd", "fwd+bwd")
        inputs = make_inputs(shape, dtype, device, requires_grad=needs_grad)
        if not (device.type == "cpu" if interleave is None else interleave):
            timed = _time_one_by_one(shape, runnable, mode, inputs, dtype, device, warmup, reps)
        else:
            timed = _time_interleaved(shape, runnable, mode, inputs, dtype, warmup, reps)
        del inputs
        free(device)
        add_ratios(timed)  # ours and the floor are timed in the same mode: a mode's rows are complete
        group = sorted([r for r in gate_rows if r["mode"] == mode] + timed, key=lambda r: order[r["provider"]])
        rows += group
        if on_rows is not None:
            on_rows(mode, group)
        elif log:
            log(summary_line(shape, mode, group))
    return rows


def run(shapes: Sequence[Shape], providers: Sequence[Provider], dtype: torch.dtype, device: torch.device,
        *, modes: Sequence[str] | None = None, warmup: int = 2, reps: int = 7,
        log: Callable[[str], None] | None = print,
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows for every shape (environment fields added to each). Each (shape, mode) step's rows go
    to ``on_rows`` as soon as they are timed, and ``log`` gets a line per step: its number, the
    seconds since the start and the times (:func:`summary_line`)."""
    env = environment(device)
    if log:
        backend = resolve_backend("auto", device)
        log(f"device {env['device']} ({device.type}), dtype {str(dtype).replace('torch.', '')}, ours -> backend "
            f"{backend!r}, torch {env['torch']}, threads {env['threads']}"
            + (f", cpu build: {env['cpu_build']}" if env.get("cpu_build") else ""))
    total = len(steps(shapes, modes))
    done = 0
    start = time.perf_counter()
    rows: list[dict] = []
    for shape in shapes:
        def finished(mode: str, group: list[dict], shape: Shape = shape) -> None:
            nonlocal done
            done += 1
            for r in group:
                r.update(env)
            rows.extend(group)
            if on_rows is not None:
                on_rows(group)
            if log:
                width = len(str(total))
                log(f"[{done:{width}d}/{total} {time.perf_counter() - start:6.1f} s] "
                    + summary_line(shape, mode, group))

        bench_shape(shape, providers, dtype, device, modes=modes, warmup=warmup, reps=reps, log=log,
                    on_rows=finished)
    return rows
