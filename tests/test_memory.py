"""Peak memory: no hidden O(B * P) copy of the prefix and no O(N * M) tensor, forward or backward.

How memory is measured on CPU (both trackers are calibrated in the first tests):

* ``trace_memory`` -- torch.profiler with ``profile_memory=True``. Every block that c10's CPU
  allocator hands out or takes back while the profiler runs is an Allocation event (pointer,
  signed size, time), wherever it was requested: Python, ATen, or ``at::empty`` inside our C++ op
  (csrc/prefix_attention.cpp allocates out/lse/gradients that way). We replay the events in time
  order and count only blocks allocated inside the window (matched by pointer), so live bytes and
  their peak are exact, relative to the start of the window. Ranges (ops, ``record_function``
  labels) come from the same event tree, so we also get the peak *inside* one op call.
  Blind spot: memory not from c10's allocator -- the op's per-thread scratch tiles
  (``std::aligned_alloc`` in csrc/kernel_impl.h, ``Scratch``) and MKL's packing buffers.
* ``rss_peak`` -- the kernel's resident-set high-water mark: ``malloc_trim(0)`` (freed heap
  pages go back, so new allocations must touch fresh pages), ``/proc/self/clear_refs`` <- "5"
  (resets VmHWM to the current RSS), run, read VmHWM - VmRSS_before. It sees everything that is
  touched (scratch tiles included) but is only good to about a MiB, so it is used as a
  cross-check with a slack, never for the O(B * P)-sized bounds.

Footprints (fp32, e = 4 bytes, inputs allocated before the window and not counted):
  forward           out [B, Hq, N, D] + lse [B, Hq, N] fp32                          (tracked)
  forward+backward  the above + dq, dk, dv, dprefix_k, dprefix_v (input sizes)
                    + bwd_cpu's fp32 prefix-gradient partials, one [Hkv, P, D] pair per chunk
                    of rows when a prefix's rows are split into chunks: at most
                    C = clamp(ceil(64 / Hkv), 8, B) chunks (csrc make_chunks), so they stop
                    growing with B once B > C (tracked)
  both              + per-thread scratch tiles, O((G*BQ + BK) * BK + M * D) per thread (RSS only)
and never a score/probability tensor [B, Hq, N, P + M] nor a per-row prefix [B, Hkv, P, D]
(no zero gradient for lse either: the autograd functions do not materialize it).

The Triton path cannot be measured on CPU (see ``test_triton_peak_memory``).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import prefix_kernels
from helpers import Case, need
from prefix_kernels import cpu as pk_cpu

KiB, MiB = 2**10, 2**20
SLACK = 16 * KiB  # a few scalar tensors; everything else is accounted for byte by byte
RSS_SLACK = 6 * MiB  # page granularity, per-thread RSS counter batching, profiler buffers


# ------------------------------------------------------------------------------------ trackers

@dataclass
class MemoryTrace:
    """Allocator events of one profiled window: blocks allocated in the window, as (t_ns, +/-bytes)."""

    events: list = field(default_factory=list)
    ranges: dict = field(default_factory=dict)  # event name -> [(start_ns, end_ns), ...]
    blocks: list = field(default_factory=list)  # sizes of the blocks allocated in the window

    def _walk(self, start=None, end=None):
        live = base = peak = 0
        started = start is None
        for t, n in self.events:
            if end is not None and t > end:
                break
            if not started and t >= start:
                started, base, peak = True, live, live
            live += n
            if started:
                peak = max(peak, live)
        if not started:
            base = peak = live
        return peak - base, live - base

    @property
    def peak(self) -> int:
        """Most bytes live at once, counting only blocks allocated in the window."""
        return self._walk()[0]

    @property
    def final(self) -> int:
        """Bytes still live at the end of the window (allocated in it)."""
        return self._walk()[1]

    def within(self, start: int, end: int) -> tuple[int, int]:
        """(peak, net) of what was allocated between start and end ns, relative to the start."""
        return self._walk(start, end)

    def live_at(self, t: int) -> int:
        return sum(n for s, n in self.events if s <= t)

    @property
    def max_block(self) -> int:
        return max(self.blocks, default=0)

    def windows(self, name: str) -> list[tuple[int, int]]:
        return self.ranges.get(name, [])


def trace_memory(fn):
    """(fn(), MemoryTrace) -- see the module docstring."""
    from torch._C._profiler import _EventType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    allocs, ranges = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu" and f.alloc_size != 0:
                allocs.append((e.start_time_ns, f.alloc_size, f.ptr))
        else:
            ranges.setdefault(e.name, []).append((e.start_time_ns, e.end_time_ns))
    # Time order; on a tie a free goes first (a pointer can be freed and handed out again).
    allocs.sort(key=lambda a: (a[0], a[1] > 0))
    trace, open_blocks = MemoryTrace(ranges={k: sorted(v) for k, v in ranges.items()}), {}
    for t, size, ptr in allocs:
        if size > 0:
            open_blocks[ptr] = size
            trace.events.append((t, size))
            trace.blocks.append(size)
        elif ptr in open_blocks:  # frees of blocks from before the window are not ours to count
            trace.events.append((t, -open_blocks.pop(ptr)))
    return result, trace


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * KiB


def rss_available() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_bytes("VmHWM")
        return hasattr(_LIBC, "malloc_trim")
    except (OSError, AttributeError):
        return False


needs_rss = pytest.mark.skipif(not rss_available(), reason="needs Linux /proc/self/clear_refs and glibc")


def rss_peak(fn):
    """(fn(), peak resident bytes above the start) -- see the module docstring."""
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    result = fn()
    return result, _status_bytes("VmHWM") - before


def measure(fn, warmup=True):
    """(MemoryTrace, RSS peak bytes or None) of fn(); results are dropped before returning."""
    if warmup:  # first calls initialize MKL, OpenMP threads, the profiler, ...
        fn()
        trace_memory(fn)
    result, trace = trace_memory(fn)
    del result
    rss = None
    if rss_available():
        result, rss = rss_peak(fn)
        del result
    return trace, rss


# ---------------------------------------------------------------------------------- calibration

def test_tracker_sees_a_torch_allocation_of_known_size():
    n = 3 * MiB + 4 * 1000

    def fn():
        x = torch.empty(n, dtype=torch.uint8)
        y = torch.empty(1000, dtype=torch.float32)
        del x
        return y

    y, trace = trace_memory(fn)
    assert trace.peak == n + 4000
    assert trace.final == 4000  # x freed inside the window, y still live
    assert trace.max_block == n
    del y


def test_tracker_ignores_frees_of_older_blocks():
    old = torch.empty(MiB, dtype=torch.uint8)

    def fn():
        nonlocal old
        old = None  # freed in the window, allocated before it: not counted
        return torch.empty(1000, dtype=torch.uint8)

    x, trace = trace_memory(fn)
    assert trace.peak == 1000 and trace.final == 1000
    del x


def test_tracker_sees_buffers_allocated_inside_the_cpp_op():
    """fwd_cpu allocates out and lse with at::empty in C++ (csrc/prefix_attention.cpp)."""
    need("cpu")
    s = Shape(batch=2, heads=4, kv_heads=2, n_queries=64, n_keys=64, n_prefix=8, head_dim=32)
    q, k, v, pk, pv = s.make(torch.float32, "cpu", requires_grad=False).tensors

    def fn():
        return torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, None, None, True, 0.125)

    fn()
    out, trace = trace_memory(fn)
    (start, end), = trace.windows("prefix_kernels::fwd_cpu")
    expected = s.out + s.lse
    assert trace.within(start, end) == (expected, expected)
    assert sorted(trace.blocks) == sorted([s.out, s.lse])
    del out


@needs_rss
def test_rss_tracker_sees_what_the_profiler_cannot():
    """RSS sees torch buffers and raw malloc (like the op's scratch tiles); the profiler only the former."""
    n = 32 * MiB

    def touched():
        torch.empty(n, dtype=torch.uint8).fill_(1)  # untouched pages would not be resident

    _, rss = rss_peak(touched)
    assert n - MiB <= rss <= n + RSS_SLACK, rss  # RSS is good to about a MiB

    def raw():
        ptr = _LIBC.malloc(ctypes.c_size_t(16 * MiB))
        ctypes.memset(ptr, 1, 16 * MiB)
        _LIBC.free(ctypes.c_void_p(ptr))

    _LIBC.malloc.restype = ctypes.c_void_p
    _, rss = rss_peak(raw)
    assert 15 * MiB <= rss <= 16 * MiB + RSS_SLACK, rss
    _, trace = trace_memory(raw)
    assert trace.peak == 0


# ------------------------------------------------------------------------- the op (CPU backends)

@dataclass(frozen=True)
class Shape(Case):
    """An attention problem (a :class:`helpers.Case`, shared prefix, no mask) and the byte sizes of
    the op's tensors for it."""

    batch: int = 4
    heads: int = 8
    kv_heads: int = 2
    n_queries: int = 1024
    n_keys: int = 1024
    n_prefix: int = 256
    head_dim: int = 64
    e: int = 4  # fp32

    @property
    def out(self):  # out (or dq): [B, Hq, N, D]
        return self.B * self.Hq * self.N * self.D * self.e

    @property
    def lse(self):  # [B, Hq, N] fp32
        return self.B * self.Hq * self.N * 4

    @property
    def grads(self):  # dq + dk + dv + dprefix_k + dprefix_v
        return self.out + 2 * self.B * self.Hkv * self.M * self.D * self.e + 2 * self.Hkv * self.P * self.D * self.e

    @property
    def scores(self):  # one [B, Hq, N, M] fp32 score tensor
        return self.B * self.Hq * self.N * self.M * 4

    @property
    def prefix_copy(self):  # one per-row prefix [B, Hkv, P, D]
        return self.B * self.Hkv * self.P * self.D * self.e

    @property
    def chunks(self):  # bwd_cpu's row chunks for the prefix-gradient reduction (csrc make_chunks)
        return min(self.B, max(8, -(-64 // self.Hkv)))

    @property
    def prefix_partials(self):  # bwd_cpu's partials for a shared prefix: 2 x fp32 [chunks, Hkv, P, D]
        return 2 * self.chunks * self.Hkv * self.P * self.D * 4 if self.chunks > 1 else 0

    def scratch_per_thread(self, threads_rows=128, block_k=512):
        """Upper bound of one thread's scratch in kernel_impl.h (backward > forward): Qs/dO/dQ
        [R, D], S/dP [R, BK], K/V tiles [BK, D], dK/dV rows [M, D], prefix reduction [P, D]."""
        R = max(threads_rows, self.Hq // self.Hkv)
        floats = 3 * R * self.D + 2 * R * block_k + 2 * block_k * self.D + 2 * self.M * self.D + 2 * R + self.D
        return 4 * (floats + self.P * self.D) + 4 * block_k


SHAPE = Shape()


def _op_inputs(s: Shape):
    """q, k, v, prefix_k, prefix_v (fp32 CPU leaves), the mask, grad_out."""
    x = s.make(torch.float32, "cpu")
    mask = torch.ones(s.B, s.M, dtype=torch.bool)
    mask[: s.B // 2, : s.M // 8] = False  # left padding on half the rows
    return (*x.tensors, mask, x.grad_out)


@pytest.fixture(scope="module")
def op_measurements():
    """{(backend, mode): (MemoryTrace, rss)} at SHAPE; inputs exist before every window."""
    s = SHAPE
    q, k, v, pk, pv, mask, grad_out = _op_inputs(s)
    results = {}
    backends = ["reference"] + (["cpu"] if pk_cpu.is_available() else [])
    for backend in backends:
        def forward(backend=backend):
            with torch.no_grad():
                return prefix_kernels.prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask,
                                                       backend=backend)

        def forward_backward(backend=backend):
            out = prefix_kernels.prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask,
                                                  backend=backend)
            return torch.autograd.grad(out, (q, k, v, pk, pv), grad_out)

        results[backend, "forward"] = measure(forward, warmup=backend == "cpu")
        results[backend, "forward+backward"] = measure(forward_backward, warmup=backend == "cpu")
    for (backend, mode), (trace, rss) in results.items():
        rss_text = "n/a" if rss is None else f"{rss / MiB:.3f}"
        print(f"\n[memory] op {backend:9s} {mode:16s} tracked peak {trace.peak / MiB:8.3f} MiB, "
              f"RSS peak {rss_text} MiB (scores {s.scores / MiB:.1f}, prefix copy {s.prefix_copy / MiB:.3f} MiB)")
    return results


def _extra(trace: MemoryTrace, mode: str, s: Shape = SHAPE) -> int:
    """Tracked peak beyond the outputs (out, lse) and, for training, the five gradients."""
    expected = s.out + s.lse + (s.grads if mode == "forward+backward" else 0)
    return trace.peak - expected


def test_op_forward_allocates_only_out_and_lse(op_measurements):
    need("cpu")
    s = SHAPE
    trace, _ = op_measurements["cpu", "forward"]
    extra = _extra(trace, "forward")
    assert extra <= SLACK, f"forward allocated {extra} bytes beyond out + lse"
    assert trace.peak < s.scores and extra < s.prefix_copy
    assert trace.final == s.out  # lse is dropped (return_lse=False)


def test_op_forward_backward_has_no_score_tensor(op_measurements):
    need("cpu")
    s = SHAPE
    trace, _ = op_measurements["cpu", "forward+backward"]
    extra = _extra(trace, "forward+backward")
    # The footprint: the prefix partials (bounded by the chunk count), nothing else.
    assert extra <= s.prefix_partials + SLACK, extra
    assert extra < s.scores // 16
    assert trace.final == s.grads


def test_op_forward_backward_keeps_no_lse_gradient(op_measurements):
    """No zero tensor for the gradient of the non-differentiable lse (set_materialize_grads(False))."""
    need("cpu")
    s = SHAPE
    trace, _ = op_measurements["cpu", "forward+backward"]
    assert _extra(trace, "forward+backward") - s.prefix_partials < s.lse


def test_cpu_backward_prefix_partials_do_not_grow_with_batch():
    """bwd_cpu's only transient: the prefix-gradient partials of its row chunks, at most C chunks
    whatever B -- B = 64 and B = 256 allocate the same bytes inside bwd_cpu, and far less than one
    per-row prefix copy [B, Hkv, P, D]."""
    need("cpu")
    transient = {}
    for B in (64, 256):
        s = Shape(batch=B, heads=4, kv_heads=2, n_queries=4, n_keys=4, n_prefix=64, head_dim=64)
        q, k, v, pk, pv, mask, grad_out = _op_inputs(s)

        def forward_backward():
            out = prefix_kernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="cpu")
            return torch.autograd.grad(out, (q, k, v, pk, pv), grad_out)

        forward_backward()  # warm up
        _, trace = trace_memory(forward_backward)
        (start, end), = trace.windows("prefix_kernels::bwd_cpu")
        peak, net = trace.within(start, end)
        transient[B] = peak - net
        assert transient[B] <= s.prefix_partials + SLACK, (B, transient[B], s.prefix_partials)
    assert transient[64] == transient[256] > 0, transient
    assert transient[256] <= s.prefix_copy // 4  # s: B = 256


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_op_bwd_and_fwd_calls_allocate_nothing_transient(op_measurements, mode):
    """Inside each fwd_cpu / bwd_cpu call: what is allocated and freed again before it returns."""
    need("cpu")
    s = SHAPE
    trace, _ = op_measurements["cpu", mode]
    for name in ("prefix_kernels::fwd_cpu", "prefix_kernels::bwd_cpu")[: 1 + (mode != "forward")]:
        (start, end), = trace.windows(name)
        peak, net = trace.within(start, end)
        allowance = SLACK + (s.prefix_partials if name.endswith("bwd_cpu") else 0)
        assert peak - net <= allowance, f"{name}: {peak - net} transient bytes"


@needs_rss
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_op_rss_cross_check_includes_scratch(op_measurements, mode):
    """Everything resident (scratch tiles, MKL buffers included) stays near the tracked peak."""
    need("cpu")
    s = SHAPE
    trace, rss = op_measurements["cpu", mode]
    scratch = torch.get_num_threads() * s.scratch_per_thread()
    assert rss <= trace.peak + scratch + RSS_SLACK, (rss, trace.peak, scratch)
    assert rss < s.scores // 4


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_reference_exceeds_the_bounds(op_measurements, mode):
    """The reference concatenates and masks: the same checks catch it (they can fail)."""
    s = SHAPE
    trace, rss = op_measurements["reference", mode]
    extra = _extra(trace, mode)
    assert extra > s.scores and extra > s.prefix_copy
    if rss is not None:
        assert rss > s.scores


# ------------------------------------------------------------------------------ the HF wrapper

HF_B, HF_N, HF_P = 4, 1024, 128


@pytest.fixture(scope="module")
def hf_measurements():
    """{(impl, P): MemoryTrace} of one training step (forward with labels, backward) of a tiny
    Llama (2 layers, Hq 4, Hkv 2, D 16), B=4, N=1024, left padding on half the rows."""
    pytest.importorskip("transformers")
    need("cpu")
    from tiny_models import VOCAB, tiny_model

    from prefix_kernels import add_prefix_tuning

    try:
        import peft
    except ImportError:
        peft = None
    base = tiny_model("llama", max_position_embeddings=4 * HF_N)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (HF_B, HF_N), generator=g)
    mask = torch.ones_like(ids)
    mask[: HF_B // 2, : HF_N // 8] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                  position_ids=(mask.cumsum(-1) - 1).clamp_min(0))

    def step(model):
        def fn():
            with record_function("FORWARD"):
                loss = model(**inputs).loss
            loss.backward()
        return fn

    results = {"config": base.config}
    for P in (1, HF_P):  # P = 0 is not allowed: P = 1 is the no-prefix baseline
        models = {"ours": lambda: add_prefix_tuning(copy.deepcopy(base), P, backend="cpu")}
        if peft is not None:
            models["peft"] = lambda: peft.get_peft_model(
                copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        for impl, make in models.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = make()
                step(model)()
                model.zero_grad(set_to_none=True)
                _, trace = trace_memory(step(model))
                model.zero_grad(set_to_none=True)
            (fwd_start, fwd_end), = trace.windows("FORWARD")
            trace.after_forward = trace.within(fwd_start, fwd_end)[1]  # what forward keeps for backward
            results[impl, P] = trace
            print(f"\n[memory] HF {impl:4s} P={P:3d} peak {trace.peak / MiB:8.3f} MiB, live after forward "
                  f"{trace.after_forward / MiB:8.3f} MiB, largest block {trace.max_block / MiB:.3f} MiB")
    return results


def _hf_sizes(config):
    L, Hq, Hkv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // Hq
    table = HF_P * L * 2 * Hkv * D * 4  # the prefix parameter [1, P, L * 2 * Hkv * D] fp32
    return dict(
        L=L, Hq=Hq, Hkv=Hkv, D=D, table=table,
        batch_copy=HF_B * table,  # per-row K/V prefix copies, all layers
        layer_copy=2 * HF_B * Hkv * HF_P * D * 4,  # one layer's per-row K and V prefix
        mask=HF_B * HF_N * (HF_N + HF_P),  # the smallest [B, N, M + P] mask: bool
        activation=HF_B * HF_N * max(config.hidden_size, config.intermediate_size, config.vocab_size, Hq * D) * 4,
        out=HF_B * Hq * HF_N * D * 4, lse=HF_B * Hq * HF_N * 4,
    )


def test_hf_forward_keeps_no_prefix_copy_and_no_mask(hf_measurements):
    z = _hf_sizes(hf_measurements["config"])
    ours, base = hf_measurements["ours", HF_P], hf_measurements["ours", 1]
    kept = ours.after_forward - base.after_forward
    # Saved for backward because of the prefix: at most one copy of the table (O(P * L * Hkv * D)),
    # which is less than a single layer's per-row prefix.
    assert z["table"] < z["layer_copy"]
    assert kept <= z["table"], f"the forward keeps {kept} more bytes with P={HF_P} than with P=1"
    # No block as large as the smallest [B, N, M + P] mask: the largest is a model activation.
    assert z["activation"] < z["mask"]
    assert ours.max_block <= z["activation"], ours.max_block
    # Each fwd_cpu call allocates out and lse and nothing else.
    windows = ours.windows("prefix_kernels::fwd_cpu")
    assert len(windows) == z["L"]
    for start, end in windows:
        assert ours.within(start, end) == (z["out"] + z["lse"],) * 2


def test_hf_training_peak_grows_by_o_of_p_layers_hkv_d(hf_measurements):
    """The model's activations dominate; the prefix may add O(P * L * Hkv * D) (its gradient and
    one stacked gradient buffer), which with B = 4 is half of the batch-expanded copies."""
    z = _hf_sizes(hf_measurements["config"])
    grown = hf_measurements["ours", HF_P].peak - hf_measurements["ours", 1].peak
    assert 2 * z["table"] < z["batch_copy"]
    assert grown <= 2 * z["table"], f"peak grew by {grown} bytes from P=1 to P={HF_P}"


def test_hf_backward_calls_allocate_only_bounded_prefix_partials(hf_measurements):
    z = _hf_sizes(hf_measurements["config"])
    ours = hf_measurements["ours", HF_P]
    windows = ours.windows("prefix_kernels::bwd_cpu")
    assert len(windows) == z["L"]
    # bounded by the chunk count
    partials = Shape(batch=HF_B, kv_heads=z["Hkv"], n_prefix=HF_P, head_dim=z["D"]).prefix_partials
    transient = max(p - n for p, n in (ours.within(s, e) for s, e in windows))
    assert transient <= partials + SLACK, f"a bwd_cpu call allocated {transient} transient bytes"


def test_hf_peft_exceeds_the_bounds(hf_measurements):
    """PEFT expands the prefix per row into the cache and builds a [B, 1, N, P + N] mask: the
    same checks fail for it."""
    if ("peft", HF_P) not in hf_measurements:
        pytest.skip("needs peft")
    z = _hf_sizes(hf_measurements["config"])
    peft_p, peft_1 = hf_measurements["peft", HF_P], hf_measurements["peft", 1]
    assert peft_p.after_forward - peft_1.after_forward > z["batch_copy"]
    assert peft_p.max_block >= z["mask"]
    assert peft_p.peak > hf_measurements["ours", HF_P].peak


LONG_P = 4096  # a cartridge


def test_hf_cartridge_training_peak_grows_by_at_most_two_tables():
    """P = 4096 with a frozen first token (a cartridge), B = 4: the training step's peak grows over
    P = 1 by at most two copies of the prefix table (the frozen/trainable concatenation and the
    gradient), never by the batch-expanded copy PEFT's CARTRIDGE makes (B tables per layer pass)."""
    pytest.importorskip("transformers")
    need("cpu")
    from tiny_models import VOCAB, tiny_model

    from prefix_kernels import add_prefix_tuning

    base = tiny_model("llama", max_position_embeddings=4 * HF_N)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (HF_B, HF_N), generator=g)
    mask = torch.ones_like(ids)
    mask[: HF_B // 2, : HF_N // 8] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def peak(model, **extra):
        def fn():
            model(**inputs, **extra).loss.backward()
        fn()
        model.zero_grad(set_to_none=True)
        return trace_memory(fn)[1].peak

    def ours(p, k):
        return add_prefix_tuning(copy.deepcopy(base), p, backend="cpu", num_frozen_tokens=k)

    long = ours(LONG_P, 1)
    table = LONG_P * long.spec.width * 4
    grown = peak(long) - peak(ours(1, 0))
    print(f"\n[memory] cartridge P={LONG_P}: peak grew {grown / MiB:.3f} MiB, table {table / MiB:.3f} MiB")
    assert grown <= 2 * table + SLACK, f"peak grew by {grown} bytes from P=1 to P={LONG_P}"
    peft = pytest.importorskip("peft")
    if hasattr(peft, "CartridgeConfig"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.CartridgeConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=LONG_P, num_frozen_tokens=1))
            grown_peft = peak(theirs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)) - peak(ours(1, 0))
        print(f"[memory] PEFT CARTRIDGE P={LONG_P}: peak grew {grown_peft / MiB:.3f} MiB")
        assert grown_peft > HF_B * table  # the bound is not loose: PEFT breaks it


# ------------------------------------------------------------------------------------- Triton

def test_triton_peak_memory():
    if not torch.cuda.is_available():
        pytest.skip(
            "Triton peak memory is only meaningful on a GPU: on CPU the kernels run in the interpreter "
            "(TRITON_INTERPRET=1), whose block values are numpy arrays outside torch's allocator. On a GPU, "
            "`prefix-kernels bench` reports torch.cuda.max_memory_allocated per provider "
            "(prefix_kernels/benchmarking/timing.py) and benchmarks/bench_hf.py reports peak_mib the same way"
        )
    s = SHAPE
    dev = torch.device("cuda")
    q, k, v, pk, pv, mask, grad_out = (t.detach().to(dev) for t in _op_inputs(s))
    for t in (q, k, v, pk, pv):
        t.requires_grad_()

    def forward_backward():
        out = prefix_kernels.prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="triton")
        return torch.autograd.grad(out, (q, k, v, pk, pv), grad_out)

    forward_backward()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = forward_backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start - (s.out + s.lse + s.grads)
    del grads
    # lse's zero gradient, delta [B, Hq, N], fp32 prefix partials [Hkv, P, D] x 2 (non-deterministic).
    assert extra < s.prefix_copy, extra
    assert extra < s.scores
