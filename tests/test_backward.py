"""The one-pass Triton backward (kernels/backward.py): which launches run for which gradients, how
many device writes a backward makes, and the prefix reduction's chunking. Accuracy over the whole
input matrix is in test_prefix_attention.py / test_properties.py / test_edge_inputs.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import prefix_kernels.ops as ops
from helpers import DEVICE, ON_GPU, Case, check_against_reference, requires_triton
from prefix_kernels import prefix_attention, prefix_attention_reference
from prefix_kernels.kernels.configs import BlockConfig, override_configs, prefix_grad_chunks

KERNELS = ("backward_prologue_kernel", "dq_kernel", "backward_kernel", "backward_epilogue_kernel")
# ATen ops that only allocate or describe memory: not device work.
_NO_WRITE = {"empty", "empty_like", "empty_strided", "view", "as_strided", "t", "transpose", "permute",
             "unsqueeze", "squeeze", "select", "slice", "expand", "detach", "alias", "_unsafe_view",
             "is_contiguous", "stride", "size", "sym_size", "sym_stride", "dim", "contiguous"}


class _Recorder:
    """Stands in for a Triton kernel in ops: records each launch's grid and constexpr flags."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, grid, {k: v for k, v in kwargs.items() if k.isupper()}))
            with _disable_current_modes():  # the interpreter's own copies are not the launcher's work
                return self.kernel[grid](*args, **kwargs)
        return launch


class _DeviceWrites(TorchDispatchMode):
    """Counts ATen ops that write device memory (fills, copies, casts, reductions, ...)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        out = func(*args, **(kwargs or {}))
        if name not in _NO_WRITE:
            # contiguous() of a contiguous tensor and .to() of the same dtype return the input: no work
            self.ops.append(name)
        return out


def _record(monkeypatch):
    launches = []
    for name in KERNELS:
        monkeypatch.setattr(ops, name, _Recorder(name, getattr(ops, name), launches))
    return launches


def _problem(dtype, n_prefixes=None, padding="left"):
    case = Case(batch=3, heads=4, kv_heads=2, n_queries=40, n_keys=56, n_prefix=9, n_prefixes=n_prefixes,
                padding=padding).on_device()
    q, k, v, pk, pv, mask, ids = case.make(dtype)
    if pk.dim() == 3:
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)  # the launchers take banks
    return q, k, v, pk, pv, mask, ids


@requires_triton
@pytest.mark.parametrize(
    "trainable, flags",
    [
        (("pk", "pv"), dict(NEED_DQ=False, NEED_DKDV=False, NEED_DPREFIX=True)),  # layer 0 of a frozen model
        (("q", "pk", "pv"), dict(NEED_DQ=True, NEED_DKDV=False, NEED_DPREFIX=True)),  # frozen k/v
        (("q", "k", "v"), dict(NEED_DQ=True, NEED_DKDV=True, NEED_DPREFIX=False)),  # frozen prefix
        (("k",), dict(NEED_DQ=False, NEED_DKDV=True, NEED_DPREFIX=False)),
        (("q",), dict(NEED_DQ=True, NEED_DKDV=False, NEED_DPREFIX=False)),
    ],
)
def test_only_needed_gradients_are_computed(monkeypatch, trainable, flags):
    """The main kernel is specialized to the gradients asked for (no dk/dv matmuls for a frozen
    layer, no dq atomics for layer 0), the others come back None, the asked-for ones are right."""
    case = Case(n_prefixes=2, batch=3, padding="left").on_device()
    q, k, v, pk, pv, mask, ids = case.make(torch.float32)
    named = dict(q=q, k=k, v=v, pk=pk, pv=pv)
    for name, t in named.items():
        t.requires_grad_(name in trainable)
    out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_ids=ids, backend="triton")
    launches = _record(monkeypatch)
    out.square().sum().backward()
    main = [flags_ for name, _, flags_ in launches if name == "backward_kernel"]
    assert len(main) == 1 and {k: main[0][k] for k in flags} == flags
    assert "dq_kernel" not in [name for name, _, _ in launches]  # dq by atomics unless deterministic
    leaves64 = {n: t.detach().double().requires_grad_() for n, t in named.items()}
    ref, _ = prefix_attention_reference(*leaves64.values(), key_padding_mask=mask, prefix_ids=ids)
    ref.square().sum().backward()
    for name, t in named.items():
        if name in trainable:
            torch.testing.assert_close(t.grad.double(), leaves64[name].grad, rtol=1e-4, atol=1e-4)
        else:
            assert t.grad is None, name


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n_prefixes", [None, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_device_launches(monkeypatch, dtype, n_prefixes, deterministic):
    """Every device write of a backward with all five gradients: prologue, main kernel and (16-bit,
    or deterministic partials) the epilogue -- no fill, cast, sum or sort of its own. Deterministic
    mode adds its dq pass."""
    q, k, v, pk, pv, mask, ids = _problem(dtype, n_prefixes)
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, mask, ids, True, 0.25)
    grad_out = torch.randn_like(out)
    launches = _record(monkeypatch)
    with _DeviceWrites() as writes:
        ops.prefix_attention_backward(grad_out, q, k, v, pk, pv, out, lse, mask, ids, True, 0.25, need_dq=True,
                                      need_dkdv=True, need_dprefix=True, deterministic=deterministic)
    names = [name for name, _, _ in launches]
    epilogue = dtype != torch.float32 or deterministic
    want = ["backward_prologue_kernel"] + ["dq_kernel"] * deterministic + ["backward_kernel"]
    assert names == want + ["backward_epilogue_kernel"] * epilogue
    assert writes.ops == [], f"ATen ops writing device memory in the backward: {writes.ops}"
    assert len(names) <= 3 + deterministic


@requires_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n_sms", [1, 3, 64])
def test_prefix_only_chunks_cross_rows_and_prefixes(monkeypatch, deterministic, n_sms):
    """With the prefix gradients alone (layer 0 of a frozen model) the chunk count follows the SM
    count: 1 SM -> long chunks that cross rows and prefixes (flushes inside the loop, a prefix met
    twice by one chunk when rows are not sorted by prefix); 64 -> one item per chunk."""
    monkeypatch.setattr(ops, "_num_sms", lambda device: n_sms)
    case = Case(batch=6, heads=4, kv_heads=2, n_prefixes=3, n_queries=20, n_keys=20, n_prefix=5)
    q, k, v, pk, pv, mask, _ = case.on_device().make(torch.float32)
    ids = torch.tensor([0, 2, 0, 1, 1, 2], device=q.device)  # unsorted: row 0 and 2 share prefix 0
    pk.requires_grad_(True)
    pv.requires_grad_(True)
    grad = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend="triton", deterministic=deterministic)
    got = torch.autograd.grad(out, (pk, pv), grad)
    leaves = [t.detach().double().requires_grad_() for t in (pk, pv)]
    ref, _ = prefix_attention_reference(q.double(), k.double(), v.double(), *leaves, prefix_ids=ids)
    want = torch.autograd.grad(ref, leaves, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_small_tiles_many_programs(deterministic):
    """16-wide tiles: several prefix blocks and chunks, key blocks across the diagonal and ragged
    tails, dq atomics from both kinds of programs (CUDA runs the real configs instead)."""
    if ON_GPU:
        pytest.skip("config override is an interpreter check; CUDA runs the real configs")
    case = Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=37, n_prefixes=2, padding="left")

    def op(*args, **kwargs):
        return prefix_attention(*args, backend="triton", deterministic=deterministic, **kwargs)

    with override_configs(backward=BlockConfig(16, 32), dq=BlockConfig(32, 16)):
        check_against_reference(op, case, torch.float32)


def test_prefix_grad_chunks_policy():
    # alongside sequence programs: no chunk heavier than the heaviest of them (here 8 items)
    assert prefix_grad_chunks(n_items=64, n_tiles=4, n_sms=132, heaviest_program_items=8,
                              partial_bytes_per_chunk=0) == 8
    # alone: ~4 waves of programs, never more chunks than items, none empty
    assert prefix_grad_chunks(64, 4, 132, 0, 0) == 64
    assert prefix_grad_chunks(1000, 4, 10, 0, 0) == 10
    chunks = prefix_grad_chunks(10, 1, 2, 0, 0)
    per = -(-10 // chunks)
    assert (chunks - 1) * per < 10  # the last chunk has at least one item
    # deterministic partials stay within the budget
    assert prefix_grad_chunks(10**6, 1, 132, 1, 2**27) == 2


def test_override_configs_is_scoped_and_checked():
    from prefix_kernels.kernels.configs import kernel_configs

    before = kernel_configs(64, torch.float16, (9, 0))
    with override_configs(backward=BlockConfig(16, 16)):
        assert kernel_configs(64, torch.float16, (9, 0)).backward == BlockConfig(16, 16)
        assert kernel_configs(64, torch.float16, (9, 0)).forward == before.forward
    assert kernel_configs(64, torch.float16, (9, 0)) == before
    with pytest.raises(ValueError, match="unknown kernel"):
        with override_configs(dkdv=BlockConfig(16, 16)):
            pass


@requires_triton
def test_atomic_and_deterministic_agree():
    case = Case(batch=3, heads=4, kv_heads=2, n_queries=33, n_keys=50, n_prefix=7, n_prefixes=2,
                padding="right").on_device()
    q, k, v, pk, pv, mask, ids = case.make(torch.float32)
    grad = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    leaves = [t.requires_grad_(True) for t in (q, k, v, pk, pv)]
    runs = []
    for det in (False, True):
        out = prefix_attention(*leaves, key_padding_mask=mask, prefix_ids=ids, backend="triton", deterministic=det)
        runs.append(torch.autograd.grad(out, leaves, grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# Small tiles under the interpreter for the walks of issue 12: the forward's merged loop over the whole
# prefix blocks and the unmasked sequence blocks (D <= 64: each block picks its base pointer, strides
# and padding mask), the backward's one masked loop per key block and its transposed dq, and a bank's
# segments of rows per prefix. Layouts where prefix and sequence strides differ (inner stride 2 on one
# side only), GQA / MQA, caches, padding, non-causal, D = 80 (the separate loops), the features.
SMALL_TILE_CASES = {
    "bank_d_strided_left": (Case(batch=3, heads=4, kv_heads=2, n_queries=40, n_keys=56, n_prefix=37, n_prefixes=2,
                                 padding="left", kv_layout="d_strided", prefix_layout="p_sliced"), {}),
    "mqa_cache_random_pad": (Case(batch=2, heads=4, kv_heads=1, n_queries=19, n_keys=64, n_prefix=33,
                                  padding="random", q_layout="bshd", prefix_layout="p_sliced"), {}),
    "noncausal_right_p16": (Case(batch=2, heads=2, kv_heads=2, n_queries=33, n_keys=48, n_prefix=16, causal=False,
                                 padding="right"), {}),
    "no_prefix_dead_rows": (Case(batch=2, heads=2, kv_heads=1, n_queries=24, n_keys=24, n_prefix=0,
                                 padding="dead_rows"), {}),
    "features": (Case(batch=2, heads=4, kv_heads=2, n_queries=45, n_keys=77, n_prefix=35, padding="left",
                      kv_layout="bshd"), dict(sliding_window=20, softcap=3.0, sinks=True)),
    "d80_bank": (Case(batch=2, heads=2, kv_heads=1, n_queries=30, n_keys=30, n_prefix=20, n_prefixes=3,
                      head_dim=80), {}),
}


@requires_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("name", list(SMALL_TILE_CASES))
def test_small_tile_walks_match_reference(name, deterministic):
    if ON_GPU:
        pytest.skip("config override is an interpreter check; CUDA runs the real configs")
    case, features = SMALL_TILE_CASES[name]

    def op(*args, **kwargs):
        return prefix_attention(*args, backend="triton", deterministic=deterministic, **kwargs)

    with override_configs(forward=BlockConfig(16, 16), backward=BlockConfig(16, 16), dq=BlockConfig(16, 16)):
        check_against_reference(op, case, torch.float32, **features)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefix_gradient_of_a_permuted_prefix(dtype, deterministic):
    """A dense but permuted prefix (a transposed [P, Hkv, D] view): its gradient buffers are contiguous
    whatever the prefix's strides (they were allocated with the prefix's strides while the epilogue
    writes flat offsets: dprefix was wrong in 16-bit and deterministic runs)."""
    def op(*args, **kwargs):
        return prefix_attention(*args, backend="triton", deterministic=deterministic, **kwargs)

    case = Case(batch=2, heads=4, kv_heads=2, n_queries=24, n_keys=24, n_prefix=8, prefix_layout="phd")
    check_against_reference(op, case, dtype)
