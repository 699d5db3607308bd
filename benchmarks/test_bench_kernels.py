"""pytest-benchmark: ours against the baselines per shape and mode (``benchmark.group`` = shape + mode).

    pytest benchmarks --benchmark-only [--benchmark-json out.json] [--kernel-preset quick]
    pytest benchmarks --benchmark-only --kernel-preset window-cpu    # sliding windows (CUDA: window)

Shapes: the device's default preset (CPU: "cpu", CUDA: "training" + "decode"); providers that
cannot run here are skipped with the reason; a provider that fails the correctness check against
the fp32 reference fails its tests instead of being timed. ``extra_info`` of each benchmark holds
the shape (``W``: its sliding window, None without), FLOPs (and bytes for decode) and the TFLOPS / GB/s of the median.

``test_encoder_training_step``: one prefix-tuning training step of benchmarks/bench_encoders.py's BART and BERT
models per provider (``-k encoder``; CPU: its --quick shapes, CUDA: BART-base / BERT-base geometry).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from prefix_kernels.benchmarking.accounting import flops, kv_bytes  # noqa: E402
from prefix_kernels.benchmarking.metadata import cpu_name  # noqa: E402
from prefix_kernels.benchmarking.providers import resolve_providers  # noqa: E402
from prefix_kernels.benchmarking.shapes import make_inputs, preset_shapes  # noqa: E402
from prefix_kernels.benchmarking.timing import make_step  # noqa: E402


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = preset_shapes(metafunc.config.getoption("--kernel-preset"), device)
    providers = resolve_providers(metafunc.config.getoption("--kernel-providers"))
    cases, ids = [], []
    for shape in shapes:
        for mode in shape.modes:
            for provider in providers:
                cases.append((shape, mode, provider))
                ids.append(f"{shape.kind}-{shape.name}-{mode}-{provider.name}")
    metafunc.parametrize("case", cases, ids=ids)


def test_kernel(benchmark, case, bench_device, bench_dtype, correctness_gate):
    shape, mode, provider = case
    reason = provider.why_unavailable(bench_device, bench_dtype, shape.W)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    failure = correctness_gate(provider, shape)
    if failure:
        pytest.fail(f"{provider.name} on {shape.name}: {failure}")

    inputs = make_inputs(shape, bench_dtype, bench_device, requires_grad=mode in ("bwd", "fwd+bwd"))
    step = make_step(provider, mode, inputs, shape.W)
    if bench_device.type == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize()

    step()  # compile / first-call costs stay out of the timing
    benchmark.group = f"{shape.kind} {shape.name} {mode}"
    benchmark.extra_info.update(
        provider=provider.name, shape=shape.name, kind=shape.kind, mode=mode, B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv,
        N=shape.N, M=shape.M, P=shape.P, D=shape.D, W=shape.W, dtype=str(bench_dtype).replace("torch.", ""),
        device=torch.cuda.get_device_name() if bench_device.type == "cuda" else cpu_name(), flops=flops(shape, mode),
        bytes=kv_bytes(shape, bench_dtype) if mode == "decode" else None)
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["tflops_median"] = flops(shape, mode) / median / 1e12
        if mode == "decode":
            benchmark.extra_info["gb_per_s_median"] = kv_bytes(shape, bench_dtype) / median / 1e9


# ---- whole training steps of encoder / encoder-decoder models (benchmarks/bench_encoders.py) ----

ENCODER_CASES = [("bart", "ours(placement=peft)"), ("bart", "peft"), ("bart", "ours(placement=paper)"),
                 ("bert", "ours"), ("bert", "concat_sdpa")]


@pytest.fixture(scope="module")
def encoder_steps(bench_device, bench_dtype):
    """{model: {provider: bench_encoders.Case}}, built once per model (all its providers together, their
    losses checked against each other): CPU the --quick shapes, CUDA the full ones."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "bench_encoders.py"
    spec = importlib.util.spec_from_file_location("_bench_encoders", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = "full" if bench_device.type == "cuda" else "quick"
    built: dict = {}

    def get(model):
        if model not in built:
            name, geometry, batch, tokens, target, prefix_len = bench.SHAPES[shape][model]
            if model == "bart":
                cases = bench.bart_cases(geometry, batch, tokens, target, prefix_len, bench_device, bench_dtype)
            else:
                cases = bench.bert_cases(geometry, batch, tokens, prefix_len, bench_device, bench_dtype)
            built[model] = (dict(geometry=name, B=batch, N=tokens, target=target, P=prefix_len),
                            {case.provider: case for case in cases})
        return built[model]
    return get


@pytest.mark.parametrize("model,provider", ENCODER_CASES, ids=[f"{m}-{p}" for m, p in ENCODER_CASES])
def test_encoder_training_step(benchmark, encoder_steps, model, provider, bench_device, bench_dtype):
    pytest.importorskip("transformers")
    if model == "bart":
        pytest.importorskip("peft")
    shape, cases = encoder_steps(model)
    case = cases[provider]
    case.step()  # warm-up
    benchmark.group = f"training step {shape['geometry']}"
    benchmark.extra_info.update(provider=provider, model=model, loss=case.loss, trainable_params=case.trainable,
                                dtype=str(bench_dtype).replace("torch.", ""),
                                device=torch.cuda.get_device_name() if bench_device.type == "cuda" else cpu_name(),
                                **shape)
    benchmark(case.step)
