"""pytest-benchmark suite of the attention kernels (not part of ``python -m pytest tests``):

    pytest benchmarks --benchmark-only                      # CPU: the "quick-cpu" preset; CUDA: training + decode
    pytest benchmarks --benchmark-only --kernel-preset quick --benchmark-json out.json
    pytest benchmarks --benchmark-only --kernel-providers ours,cat_sdpa -k decode

Options: --kernel-preset (a preset of prefix_kernels.benchmarking.shapes.PRESETS, "auto" = the
device's default), --kernel-providers (comma-separated provider names), --kernel-dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_kernels.benchmarking.correctness import check_provider  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("prefix-kernels benchmarks")
    group.addoption("--kernel-preset", default="auto", help="shape preset (auto: training+decode on CUDA, quick-cpu on CPU)")
    group.addoption("--kernel-providers", default=None, help="comma-separated providers (default: all)")
    group.addoption("--kernel-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_dtype(request, bench_device) -> torch.dtype:
    name = request.config.getoption("--kernel-dtype")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if bench_device.type == "cuda" else torch.float32


@pytest.fixture(scope="session")
def correctness_gate(bench_device, bench_dtype):
    """gate(provider, shape) -> None, or why the provider failed the check against the reference
    (run once per provider and shape)."""
    results: dict = {}

    def gate(provider, shape):
        key = (provider.name, shape)
        if key not in results:
            try:
                check_provider(provider, shape, bench_dtype, bench_device)
                results[key] = None
            except AssertionError as exc:
                results[key] = f"correctness check failed: {exc}"
            except Exception as exc:  # noqa: BLE001
                results[key] = f"correctness check raised {type(exc).__name__}: {exc}"
        return results[key]

    return gate
