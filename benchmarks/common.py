"""Shared pieces of the benchmark scripts: the baselines, timing, and result metadata."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time

import torch
import torch.nn.functional as F


def concat_sdpa(q, k, v, prefix_k, prefix_v, lower_right=True):
    """torch.cat of the per-row prefix in front of k/v, then SDPA with bottom-right causal
    (``causal_lower_right``) -- the concat baseline."""
    from torch.nn.attention.bias import causal_lower_right

    batch = q.shape[0]
    keys = torch.cat([prefix_k.expand(batch, *prefix_k.shape), k], dim=2)
    values = torch.cat([prefix_v.expand(batch, *prefix_v.shape), v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def peft_style(q, k, v, prefix_k, prefix_v):
    """What PEFT's prefix tuning amounts to: expand + cat + repeat_kv + a materialized mask + SDPA."""
    batch, n_heads, n_queries, _ = q.shape
    group = n_heads // k.shape[1]
    keys = torch.cat([prefix_k.expand(batch, *prefix_k.shape), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([prefix_v.expand(batch, *prefix_v.shape), v], dim=2).repeat_interleave(group, dim=1)
    n_keys, n_prefix = k.shape[2], prefix_k.shape[1]
    pos = torch.arange(n_keys, device=q.device)
    causal = pos[None, :] <= (pos[-n_queries:] if n_queries else pos[:0])[:, None]
    mask = torch.cat([torch.ones(n_queries, n_prefix, dtype=torch.bool, device=q.device), causal], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(batch, 1, -1, -1))


def sdpa_no_prefix(q, k, v, prefix_k=None, prefix_v=None):
    """The floor: causal SDPA with no prefix at all."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def time_ms(fn, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of fn() in ms (CUDA: triton.testing.do_bench)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return dict(device=device, torch=torch.__version__, triton=triton_version, git_sha=sha,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                threads=torch.get_num_threads())
