"""Kernel-level benchmark of ``prefix_attention`` against the ways prefix tuning is usually done.

Providers (every one computes causal attention over a shared prefix [Hkv, P, D] followed by the
sequence keys/values, query i at position M - N + i, the prefix always visible):

    ours            prefix_attention(..., backend="auto"): Triton on CUDA, the C++ op on CPU
                    (the reference when the C++ op could not be built)
    peft_style      what PEFT's prefix tuning amounts to: expand the prefix per row, torch.cat,
                    repeat_kv (repeat_interleave of the K/V heads), an explicit [B, 1, N, P + M]
                    bool mask, F.scaled_dot_product_attention
    cat_sdpa        torch.cat of the prefix + SDPA with ``causal_lower_right`` and enable_gqa
    sdpa_no_prefix  the floor: SDPA with no prefix at all (bottom-right causal: is_causal when
                    N = M, no mask when N = 1, else causal_lower_right) -- the attention the
                    model does anyway
    flex_attention  torch.cat + torch.compile'd FlexAttention with a mask_mod that keeps the
                    prefix columns visible and is bottom-right causal on the rest (block mask built
                    once per shape, outside the timing). CUDA only.
    flash_attn      flash-attn's flash_attn_func(causal=True) on the concatenated K/V (bottom-right
                    causal since flash-attn 2.1, so the prefix is visible). CUDA, fp16/bf16, when
                    the ``flash_attn`` package is importable.
A provider that is not available (CPU, package missing, dtype) gives rows with status "skipped"
and the reason in ``error``.

Modes: ``fwd`` (no autograd), ``bwd`` (backward only, graph retained, gradients of q, k, v and the
prefix), ``fwd+bwd`` -- for training shapes; ``decode`` (N = 1 against an M-token KV cache,
forward without autograd) for decode shapes. Inputs are laid out as HF hands them over: q (and
k/v for training) are transposed views of [B, S, H, D] storage; a decode KV cache is contiguous
[B, Hkv, M, D].

FLOPs (stored per row as ``flops``), flash-attention's convention (two matmuls, 2 FLOPs per MAC,
only visible keys counted)::

    fwd     = 4 * B * Hq * D * (N * P + sum over queries of the visible sequence keys)
            = 4 * B * Hq * D * (N * P + N * (M - N) + N * (N + 1) / 2)      (causal, bottom-right)
    bwd     = 2.5 * fwd
    fwd+bwd = 3.5 * fwd
    decode  = fwd with N = 1, i.e. 4 * B * Hq * D * (P + M)

TFLOPS = flops / time. Decode rows also give GB/s = bytes / time with
``bytes = 2 * (B * Hkv * M + Hkv * P) * D * element_size`` (K and V of the cache plus the shared
prefix, each read once; q and the output are negligible).

Correctness gate: before a provider is timed on a shape, its output (and, for training shapes,
the gradients of q, k, v, prefix_k, prefix_v) on a cut-down version of the shape (B <= 2, N <= 256,
at most 512 cached keys; heads, P and D kept) is compared with ``prefix_attention_reference`` in
fp32 (for the floor: the reference with an empty prefix). Error = max |got - want| / max(1, max
|want|), per tensor; tolerance ``TOLERANCE[dtype]`` (gradients: twice that). A provider that fails
the check gives error rows for that shape and is not timed.

Timing: median ms. CUDA: ``triton.testing.do_bench`` (warmup 25 ms, rep 100 ms); peak memory =
``torch.cuda.max_memory_allocated`` of one more run (inputs included), MiB. CPU:
``time.perf_counter`` medians of ``reps`` runs after ``warmup`` runs, the runs of the providers
interleaved so background load hits them alike; no peak memory (None). ``ratio_to_ours`` =
provider ms / ours ms (> 1: ours is faster); ``ratio_to_floor`` = provider ms / sdpa_no_prefix ms.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from prefix_kernels.functional import prefix_attention, resolve_backend
from prefix_kernels.reference import prefix_attention_reference

TRAINING_MODES = ("fwd", "bwd", "fwd+bwd")
DECODE_MODES = ("decode",)
MODES = TRAINING_MODES + DECODE_MODES

# max relative error of the output (gradients: 2x) against the fp32 reference, by input dtype
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# the columns every row has, in this order (CSV); environment fields follow
COLUMNS = ("shape", "kind", "B", "Hq", "Hkv", "N", "M", "P", "D", "dtype", "layout", "provider", "mode",
           "status", "ms", "flops", "tflops", "bytes", "gb_per_s", "peak_mib", "ratio_to_ours",
           "ratio_to_floor", "max_err", "error")
ENV_COLUMNS = ("device", "device_type", "torch", "triton", "transformers", "flash_attn", "python",
               "git_sha", "date", "threads", "cpu_build")


# ---------------------------------------------------------------- shapes and presets

@dataclass(frozen=True)
class Shape:
    """One attention problem. ``kind`` "training" (modes fwd/bwd/fwd+bwd) or "decode" (N = 1)."""

    kind: str
    B: int
    Hq: int
    Hkv: int
    N: int
    M: int
    P: int
    D: int

    def __post_init__(self):
        if self.kind not in ("training", "decode"):
            raise ValueError(f"kind must be 'training' or 'decode', got {self.kind!r}")
        if self.Hq % self.Hkv or self.M < self.N or min(self.B, self.Hq, self.N, self.D) < 1 or self.P < 0:
            raise ValueError(f"invalid shape {self}")
        if self.kind == "decode" and self.N != 1:
            raise ValueError(f"a decode shape has N = 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``BxHqxHkvxNxMxPxD`` (decode when N = 1 and M > 1), e.g. ``8x16x4x1024x1024x64x128``."""
        try:
            b, hq, hkv, n, m, p, d = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"a shape is BxHqxHkvxNxMxPxD (7 integers), got {text!r}") from None
        return cls("decode" if n == 1 and m > 1 else "training", b, hq, hkv, n, m, p, d)

    @property
    def name(self) -> str:
        return "x".join(str(x) for x in (self.B, self.Hq, self.Hkv, self.N, self.M, self.P, self.D))

    @property
    def modes(self) -> tuple[str, ...]:
        return DECODE_MODES if self.kind == "decode" else TRAINING_MODES

    def cut_down(self) -> "Shape":
        """The smaller shape the correctness gate runs on."""
        n = min(self.N, 256)
        return Shape(self.kind, min(self.B, 2), self.Hq, self.Hkv, n, n + min(self.M - self.N, 512), self.P, self.D)


def _train(b, hq, hkv, n, p, d):
    return Shape("training", b, hq, hkv, n, n, p, d)


def _decode(b, hq, hkv, m, p, d):
    return Shape("decode", b, hq, hkv, 1, m, p, d)


PRESETS: dict[str, list[Shape]] = {
    # CUDA: N 512..8192, P 16..256, D 64/128, GQA
    "training": [_train(16, 9, 3, 512, 20, 64), _train(8, 16, 4, 1024, 64, 128), _train(4, 32, 8, 2048, 128, 128),
                 _train(4, 16, 4, 2048, 16, 64), _train(2, 32, 8, 4096, 256, 128), _train(1, 32, 8, 8192, 32, 128)],
    # CUDA: KV caches 1k..32k, batch 1..64
    "decode": [_decode(1, 32, 8, 1024, 64, 128), _decode(64, 32, 8, 4096, 64, 128), _decode(32, 9, 3, 2048, 20, 64),
               _decode(16, 16, 4, 16384, 64, 128), _decode(4, 32, 8, 32768, 128, 128)],
    # CUDA smoke (benchmarks/gpu_check.sh): two training shapes, one decode shape
    "quick": [_train(8, 16, 4, 1024, 64, 128), _train(4, 32, 8, 2048, 128, 128), _decode(64, 32, 8, 4096, 64, 128)],
    # CPU (seconds on 2 cores)
    "cpu": [_train(2, 8, 2, 256, 16, 64), _train(4, 9, 3, 512, 20, 64), _train(1, 8, 2, 1024, 64, 64),
            _decode(16, 16, 4, 2048, 64, 64), _decode(2, 16, 4, 8192, 64, 128)],
}


def preset_shapes(preset: str | Sequence[Shape], device: torch.device | str) -> list[Shape]:
    """Shapes of a preset name ("auto", "training", "decode", "quick", "cpu", or several joined
    with "," or "+"), or a list of shapes passed through. "auto": training + decode on CUDA, cpu
    on CPU."""
    if not isinstance(preset, str):
        return list(preset)
    names = [x for part in preset.split(",") for x in part.split("+") if x]
    shapes: list[Shape] = []
    for name in names:
        if name == "auto":
            name_list = ["training", "decode"] if torch.device(device).type == "cuda" else ["cpu"]
        elif name in PRESETS:
            name_list = [name]
        else:
            raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
        for n in name_list:
            shapes += [s for s in PRESETS[n] if s not in shapes]
    return shapes


# ---------------------------------------------------------------- FLOPs and bytes

def flops(shape: Shape, mode: str) -> float:
    """FLOPs of one call (see the module docstring)."""
    n, m = shape.N, shape.M
    visible = n * (m - n) + n * (n + 1) // 2  # causal, bottom-right: query i sees M - N + i + 1 keys
    fwd = 4 * shape.B * shape.Hq * shape.D * (n * shape.P + visible)
    return float({"fwd": fwd, "decode": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode])


def kv_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of K/V read by a decode step: the cache and the shared prefix, once each."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * (shape.B * shape.Hkv * shape.M + shape.Hkv * shape.P) * shape.D * size


# ---------------------------------------------------------------- providers

def _expand_prefix(prefix, batch):
    return prefix.unsqueeze(0).expand(batch, -1, -1, -1)


def ours(q, k, v, prefix_k, prefix_v):
    return prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend="auto")


def peft_style(q, k, v, prefix_k, prefix_v):
    """expand + cat + repeat_kv + a materialized [B, 1, N, P + M] mask + SDPA."""
    batch, n_heads, n_queries, _ = q.shape
    group = n_heads // k.shape[1]
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2).repeat_interleave(group, dim=1)
    n_keys, n_prefix = k.shape[2], prefix_k.shape[1]
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=q.device)
    causal = torch.arange(n_keys, device=q.device)[None, :] <= query_pos[:, None]
    mask = torch.cat([torch.ones(n_queries, n_prefix, dtype=torch.bool, device=q.device), causal], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(batch, 1, -1, -1))


def concat_sdpa(q, k, v, prefix_k, prefix_v):
    """torch.cat of the prefix + SDPA with bottom-right causal (``causal_lower_right``)."""
    from torch.nn.attention.bias import causal_lower_right

    batch = q.shape[0]
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_no_prefix(q, k, v, prefix_k=None, prefix_v=None):
    """The floor: bottom-right causal SDPA over the sequence keys only."""
    n, m = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if n == m:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if n == 1:  # one query at the last position sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, m), enable_gqa=gqa)


_flex_state: dict = {"compiled": None, "masks": {}}


def prefix_mask_mod(n_prefix: int, offset: int):
    """FlexAttention mask_mod over [prefix | sequence] keys: the prefix columns always visible, the
    sequence bottom-right causal (``offset`` = M - N)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < n_prefix) | (kv_idx - n_prefix <= q_idx + offset)

    return mask_mod


def flex_attention_cat(q, k, v, prefix_k, prefix_v):
    """torch.cat + compiled FlexAttention with :func:`prefix_mask_mod` (block mask cached per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_state["compiled"] is None:
        try:  # every shape and grad mode is a recompile; the default limit (8) would fall back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        except AttributeError:  # older torch
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _flex_state["compiled"] = torch.compile(flex_attention, dynamic=False)
    batch, n_prefix, n, m = q.shape[0], prefix_k.shape[1], q.shape[2], k.shape[2]
    key = (n, m, n_prefix, str(q.device))
    block_mask = _flex_state["masks"].get(key)
    if block_mask is None:
        block_mask = create_block_mask(prefix_mask_mod(n_prefix, m - n), None, None, n, n_prefix + m,
                                       device=q.device)
        _flex_state["masks"][key] = block_mask
    keys = torch.cat([_expand_prefix(prefix_k, batch), k], dim=2)
    values = torch.cat([_expand_prefix(prefix_v, batch), v], dim=2)
    return _flex_state["compiled"](q, keys, values, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def flash_attn_cat(q, k, v, prefix_k, prefix_v):
    """flash_attn_func(causal=True) on [B, S, H, D] K/V with the prefix concatenated in front."""
    from flash_attn import flash_attn_func

    batch = q.shape[0]
    keys = torch.cat([_expand_prefix(prefix_k.transpose(0, 1), batch), k.transpose(1, 2)], dim=1)
    values = torch.cat([_expand_prefix(prefix_v.transpose(0, 1), batch), v.transpose(1, 2)], dim=1)
    out = flash_attn_func(q.transpose(1, 2), keys, values, causal=True)
    return out.transpose(1, 2)


def _need_cuda(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if device.type == "cuda" else "benchmarked on CUDA only"


def _flex_available(device, dtype):
    reason = _need_cuda(device, dtype)
    if reason:
        return reason
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention unavailable: {exc}"
    return None


def _flash_available(device, dtype):
    reason = _need_cuda(device, dtype)
    if reason:
        return reason
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a build that does not match this torch
        return f"flash_attn not importable: {type(exc).__name__}: {str(exc)[:200]}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn supports fp16/bf16 only, not {str(dtype).replace('torch.', '')}"
    return None


@dataclass(frozen=True)
class Provider:
    """An implementation to time. ``fn(q, k, v, prefix_k, prefix_v) -> out [B, Hq, N, D]``;
    ``uses_prefix`` False: checked against the reference with an empty prefix (the floor);
    ``unavailable(device, dtype)`` returns why it cannot run there, or None."""

    name: str
    fn: Callable
    uses_prefix: bool = True
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = field(default=None, compare=False)
    description: str = ""

    def why_unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return self.unavailable(device, dtype) if self.unavailable else None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("ours", ours, description="prefix_attention (Triton on CUDA, C++ op on CPU)"),
    Provider("peft_style", peft_style, description="expand + cat + repeat_kv + explicit mask + SDPA"),
    Provider("cat_sdpa", concat_sdpa, description="cat + SDPA with causal_lower_right"),
    Provider("sdpa_no_prefix", sdpa_no_prefix, uses_prefix=False, description="SDPA without a prefix (floor)"),
    Provider("flex_attention", flex_attention_cat, unavailable=_flex_available,
             description="cat + compiled FlexAttention, prefix-visible mask_mod"),
    Provider("flash_attn", flash_attn_cat, unavailable=_flash_available,
             description="cat + flash_attn_func(causal=True)"),
)}
# names used by the earlier scripts
ALIASES = {"peft": "peft_style", "concat": "cat_sdpa", "cat+sdpa(lower_right)": "cat_sdpa", "floor": "sdpa_no_prefix",
           "sdpa_no_prefix(floor)": "sdpa_no_prefix", "flex": "flex_attention", "fa2": "flash_attn",
           "flash": "flash_attn"}
FLOOR = "sdpa_no_prefix"


def resolve_providers(providers: Iterable[str | Provider] | str | None) -> list[Provider]:
    """Provider objects from names (comma-separated string or list; aliases accepted) or Provider
    instances; None: all of :data:`PROVIDERS`."""
    if providers is None:
        return list(PROVIDERS.values())
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    out: list[Provider] = []
    for p in providers:
        if isinstance(p, str):
            name = ALIASES.get(p, p)
            if name not in PROVIDERS:
                raise ValueError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
            p = PROVIDERS[name]
        if p.name in [x.name for x in out]:
            continue
        out.append(p)
    return out


# ---------------------------------------------------------------- environment and timing

def _git_sha() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and sha and all(c in "0123456789abcdef" for c in sha) else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device | str | None = None) -> dict:
    """Where the numbers come from: device name, versions, git SHA (None outside a checkout), UTC
    date, torch's thread count, and on CPU the C++ op's build flavour."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
               device_type=device.type, torch=torch.__version__, triton=_version("triton"),
               transformers=_version("transformers"), flash_attn=_version("flash-attn") or _version("flash_attn"),
               python=platform.python_version(), git_sha=_git_sha(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               threads=torch.get_num_threads(), cpu_build=None)
    if device.type == "cpu":
        from prefix_kernels import cpu

        env["cpu_build"] = cpu.build_info()
    return env


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


# ---------------------------------------------------------------- inputs, steps, correctness

def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, requires_grad: bool,
                seed: int = 0) -> list[torch.Tensor]:
    """q, k, v, prefix_k, prefix_v (layouts: see the module docstring)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype, generator=gen)

    s = shape
    q = randn(s.B, s.N, s.Hq, s.D).transpose(1, 2)
    if s.kind == "decode":
        k, v = randn(s.B, s.Hkv, s.M, s.D), randn(s.B, s.Hkv, s.M, s.D)
    else:
        k, v = randn(s.B, s.M, s.Hkv, s.D).transpose(1, 2), randn(s.B, s.M, s.Hkv, s.D).transpose(1, 2)
    pk, pv = randn(s.Hkv, s.P, s.D), randn(s.Hkv, s.P, s.D)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv)]


def layout(shape: Shape) -> str:
    return "q bshd-view, kv cache bhsd" if shape.kind == "decode" else "bshd-view"


def make_step(provider: Provider, mode: str, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """The callable that ``mode`` times (the forward of ``bwd`` runs here, once)."""
    fn = provider.fn
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


def check_provider(provider: Provider, shape: Shape, dtype: torch.dtype, device: torch.device | str,
                   *, cut_down: bool = True) -> float:
    """Worst relative error against the fp32 reference on the cut-down shape (output, and the five
    gradients for training shapes); raises AssertionError above tolerance."""
    small = shape.cut_down() if cut_down else shape
    train = small.kind == "training"
    inputs = make_inputs(small, dtype, device, requires_grad=train, seed=1)
    ref_inputs = [t.detach().float().requires_grad_(train) for t in inputs]
    if not provider.uses_prefix:  # the floor: no prefix at all
        ref_inputs[3] = ref_inputs[3][:, :0].detach().requires_grad_(train)
        ref_inputs[4] = ref_inputs[4][:, :0].detach().requires_grad_(train)
    out = provider.fn(*inputs)
    ref, _ = prefix_attention_reference(*ref_inputs, causal=True)
    tol = TOLERANCE.get(dtype, 3e-2)

    def rel(got, want):
        want = want.float()
        return (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item()) if want.numel() else 0.0

    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    errs = {"out": rel(out, ref)}
    failed = [] if errs["out"] <= tol else [f"out {errs['out']:.2e} > {tol:.0e}"]
    if train:
        grad = torch.randn(out.shape, dtype=dtype, device=out.device, generator=torch.Generator(out.device).manual_seed(2))
        names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")
        n = 5 if provider.uses_prefix else 3
        got = torch.autograd.grad(out, inputs[:n], grad, allow_unused=True)
        want = torch.autograd.grad(ref, ref_inputs[:n], grad.float(), allow_unused=True)
        for name, g, w in zip(names, got, want):
            if g is None:
                failed.append(f"{name} missing")
                continue
            errs[name] = rel(g, w)
            if not errs[name] <= 2 * tol:
                failed.append(f"{name} {errs[name]:.2e} > {2 * tol:.0e}")
    if failed:
        raise AssertionError(f"{small.name}: " + ", ".join(failed))
    return max(errs.values())


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the run

def _base_row(shape: Shape, dtype: torch.dtype, provider: str, mode: str) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(shape=shape.name, kind=shape.kind, B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, N=shape.N, M=shape.M,
               P=shape.P, D=shape.D, dtype=str(dtype).replace("torch.", ""), layout=layout(shape),
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


def bench_shape(shape: Shape, providers: Sequence[Provider], dtype: torch.dtype, device: torch.device,
                *, modes: Sequence[str] | None = None, warmup: int = 2, reps: int = 7,
                interleave: bool | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """Rows of one shape: the correctness gate, then every mode of every provider that passed.
    ``interleave`` (default: on CPU) times the providers' runs in turn, else one after the other."""
    modes = [m for m in shape.modes if modes is None or m in modes]
    rows: list[dict] = []
    runnable: dict[str, tuple[Provider, float]] = {}
    for p in providers:
        reason = p.why_unavailable(device, dtype)
        err = None
        if reason is None:
            try:
                runnable[p.name] = (p, check_provider(p, shape, dtype, device))
            except AssertionError as exc:
                err = f"correctness check failed: {exc}"
            except Exception as exc:  # noqa: BLE001 -- any failure of a provider becomes a row
                err = f"correctness check raised {_short(exc)}"
            finally:
                _free(device)
        for mode in ([] if p.name in runnable else modes):
            row = _base_row(shape, dtype, p.name, mode)
            row.update(status="skipped" if reason else "error", error=reason or err)
            rows.append(row)
        if log and p.name not in runnable:
            log(f"  {shape.name} {p.name}: {'skipped' if reason else 'ERROR'}: {reason or err}")

    for mode in modes:
        needs_grad = mode in ("bwd", "fwd+bwd")
        inputs = make_inputs(shape, dtype, device, requires_grad=needs_grad)
        if not (device.type == "cpu" if interleave is None else interleave):
            for name, (p, max_err) in runnable.items():
                row = _base_row(shape, dtype, name, mode)
                row["max_err"] = max_err
                try:
                    step = make_step(p, mode, inputs)
                    ms = time_ms(step, warmup=warmup, reps=reps, device=device)
                    peak = None
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        step()
                        torch.cuda.synchronize(device)
                        peak = torch.cuda.max_memory_allocated(device) / 2**20
                    _finish(row, ms, peak)
                except Exception as exc:  # noqa: BLE001 -- OOM or a failing baseline: an error row
                    row.update(status="error", error=_short(exc))
                finally:
                    step = None
                    _free(device)
                rows.append(row)
        else:
            steps, failed = {}, {}
            for name, (p, _) in runnable.items():
                try:
                    steps[name] = make_step(p, mode, inputs)
                except Exception as exc:  # noqa: BLE001
                    failed[name] = _short(exc)
            results: dict[str, float] = {}
            while steps:
                try:
                    results = interleaved_median_ms(steps, warmup=warmup, reps=reps)
                    break
                except Exception as exc:  # noqa: BLE001 -- find the culprit, drop it, rerun the rest
                    culprits = 0
                    for name, step in list(steps.items()):
                        try:
                            step()
                        except Exception as inner:  # noqa: BLE001
                            failed[name] = _short(inner)
                            del steps[name]
                            culprits += 1
                    if not culprits:  # no step fails on its own: record the error for all of them
                        failed.update({name: _short(exc) for name in steps})
                        steps = {}
            for name, (_, max_err) in runnable.items():
                row = _base_row(shape, dtype, name, mode)
                row["max_err"] = max_err
                if name in results:
                    _finish(row, results[name])
                else:
                    row.update(status="error", error=failed.get(name, "not timed"))
                rows.append(row)
        del inputs
        _free(device)
    add_ratios(rows)
    order = {p.name: i for i, p in enumerate(providers)}
    rows.sort(key=lambda r: (modes.index(r["mode"]), order[r["provider"]]))
    if log:
        for mode in modes:
            parts = []
            for r in rows:
                if r["mode"] == mode and r["status"] == "ok":
                    extra = f" {r['gb_per_s']:.1f} GB/s" if r.get("gb_per_s") else f" {r['tflops']:.2f} TFLOPS"
                    parts.append(f"{r['provider']} {r['ms']:.3f} ms ({r['ratio_to_ours']:.2f}x,{extra})"
                                 if r.get("ratio_to_ours") else f"{r['provider']} {r['ms']:.3f} ms{extra}")
            log(f"{shape.kind:8s} {shape.name:26s} {mode:7s} " + "  ".join(parts))
    return rows


def run(shapes: Sequence[Shape], providers: Sequence[Provider], dtype: torch.dtype, device: torch.device,
        *, modes: Sequence[str] | None = None, warmup: int = 2, reps: int = 7,
        log: Callable[[str], None] | None = print) -> list[dict]:
    """Rows for every shape (environment fields added to each)."""
    env = environment(device)
    if log:
        backend = resolve_backend("auto", device)
        log(f"device {env['device']} ({device.type}), dtype {str(dtype).replace('torch.', '')}, ours -> backend "
            f"{backend!r}, torch {env['torch']}, threads {env['threads']}"
            + (f", cpu build: {env['cpu_build']}" if env.get("cpu_build") else ""))
    rows: list[dict] = []
    for shape in shapes:
        rows += bench_shape(shape, providers, dtype, device, modes=modes, warmup=warmup, reps=reps, log=log)
    for r in rows:
        r.update(env)
    return rows
