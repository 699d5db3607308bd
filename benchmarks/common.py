"""Shared pieces of the benchmark scripts, now living in the package
(:mod:`prefix_kernels.benchmarking.kernels`): the baselines, timing, and result metadata.

bench_hf.py and profile_step.py import ``time_ms`` and ``environment`` from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, without an install

from prefix_kernels.benchmarking.kernels import (  # noqa: E402,F401
    concat_sdpa,
    environment,
    flash_attn_cat,
    flex_attention_cat,
    interleaved_median_ms,
    peft_style,
    sdpa_no_prefix,
    time_ms,
)

__all__ = ["concat_sdpa", "environment", "flash_attn_cat", "flex_attention_cat", "interleaved_median_ms",
           "peft_style", "sdpa_no_prefix", "time_ms"]
