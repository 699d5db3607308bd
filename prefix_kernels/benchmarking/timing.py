"""What the kernel benchmark times, and how.

Modes (:func:`make_step`): ``fwd`` (no autograd), ``bwd`` (backward only, graph retained, gradients
of q, k, v and the prefix), ``fwd+bwd`` -- for training shapes; ``decode`` (N = 1 against an
M-token KV cache, forward without autograd) for decode shapes.

Timing: median ms. CUDA: ``triton.testing.do_bench`` (warmup 25 ms, rep 100 ms); peak memory =
``torch.cuda.max_memory_allocated`` of one more run (inputs included), MiB (:func:`peak_mib`). CPU:
``time.perf_counter`` medians of ``reps`` runs after ``warmup`` runs, the runs of the providers
interleaved so background load hits them alike (:func:`interleaved_times`); no peak memory (None).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from prefix_kernels.benchmarking.providers import Provider


def time_ms(fn: Callable, *, warmup: int = 3, reps: int = 10, device: torch.device | str | None = None) -> float:
    """Median wall time of fn() in ms: ``triton.testing.do_bench`` on CUDA (when ``device`` is CUDA,
    or None and CUDA is available), else perf_counter medians of ``reps`` runs after ``warmup``."""
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return interleaved_median_ms({"fn": fn}, warmup=warmup, reps=reps)["fn"]


def interleaved_median_ms(fns: dict[str, Callable], *, warmup: int, reps: int) -> dict[str, float]:
    """Median wall time (ms) of each fn, one run of each in turn (CPU)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(reps, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def interleaved_times(steps: dict[str, Callable], *, warmup: int, reps: int) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`interleaved_median_ms` of the steps that run, and the errors of those that do not: when
    the interleaved run raises, each step runs once on its own, the ones that raise are dropped and
    the rest are timed again; when none fails on its own, all get the interleaved run's error."""
    steps, failed = dict(steps), {}
    while steps:
        try:
            return interleaved_median_ms(steps, warmup=warmup, reps=reps), failed
        except Exception as exc:  # noqa: BLE001 -- find the culprit, drop it, rerun the rest
            culprits = 0
            for name, step in list(steps.items()):
                try:
                    step()
                except Exception as inner:  # noqa: BLE001
                    failed[name] = short_error(inner)
                    del steps[name]
                    culprits += 1
            if not culprits:  # no step fails on its own: record the error for all of them
                failed.update({name: short_error(exc) for name in steps})
                steps = {}
    return {}, failed


def peak_mib(step: Callable, device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` (MiB) of one more run of step, inputs included; None
    off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def make_step(provider: Provider, mode: str, inputs: Sequence[torch.Tensor],
              window: int | None = None) -> Callable[[], object]:
    """The callable that ``mode`` times (the forward of ``bwd`` runs here, once); ``window``: the
    shape's sliding window, passed to the provider."""

    def fn(*args):
        return provider.call(args, window)

    if mode in ("fwd", "decode"):
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    leaves = list(inputs) if provider.uses_prefix else list(inputs[:3])
    if mode == "bwd":
        out = fn(*inputs)
        grad = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True, allow_unused=True)
    if mode == "fwd+bwd":
        grad = torch.randn(inputs[0].shape, dtype=inputs[0].dtype, device=inputs[0].device)
        return lambda: torch.autograd.grad(fn(*inputs), leaves, grad, allow_unused=True)
    raise ValueError(f"unknown mode {mode!r}")


def short_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it), for a row's error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def free(device: torch.device) -> None:
    """Returns the caching allocator's free blocks (CUDA), between providers and modes."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
