"""Host-side cost of the op: no host sync per layer, little Python per call,
and CUDA-graph capture (``torch.compile(mode="reduce-overhead")``) of a prefix-tuned model.

- Syncs. The range check of ``prefix_ids`` is the op's only read of tensor values (one sync on
  CUDA). ``PrefixTuningModel`` checks the ids once per model forward (``generate()``: once per call)
  and tells the layers (``prefix_ids_checked=True``), so an L-layer forward pays one sync, not 2 L.
  Without a GPU a sync is counted as a read of a tensor value (``item``, ``tolist``, ``int(t)``,
  ...) made by prefix_kernels' own code; on CUDA ``torch.cuda.set_sync_debug_mode`` counts too.
- Per-call Python. With the Triton launches stubbed out, what remains of a forward + backward call
  is our host code. ``TRITON_INTERPRET=1 PYTHONPATH=. python tests/test_host_overhead.py`` prints
  its microseconds per call (CPU tensors; the kernels do not run, so sizes cost nothing).
- CUDA graphs: compiled training steps with mode="reduce-overhead" against eager (CUDA only).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helpers import backend_device, need, requires_cuda
from prefix_kernels import autograd as pk_autograd
from prefix_kernels import ops, prefix_attention
from prefix_kernels.functional import check_prefix_ids

PACKAGE_DIR = str(Path(ops.__file__).resolve().parent)
BACKENDS = ["reference", "cpu", "triton"]
# the Python entry points through which a tensor value reaches the host (a sync on CUDA)
VALUE_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@contextmanager
def value_reads_by_package():
    """Yields a list that collects one (function, file:line) per tensor-value read whose caller is
    prefix_kernels' own code (transformers' reads are not ours to count)."""
    reads = []
    with pytest.MonkeyPatch.context() as patch:
        for name in VALUE_READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(PACKAGE_DIR):
                    reads.append((_name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield reads


def _op_inputs(dev, batch=3, n_prefixes=3, requires_grad=False):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev).requires_grad_(requires_grad)

    q, k, v = rand(batch, 4, 5, 16), rand(batch, 2, 7, 16), rand(batch, 2, 7, 16)
    pk, pv = rand(n_prefixes, 2, 3, 16), rand(n_prefixes, 2, 3, 16)
    return q, k, v, pk, pv


# ---------------------------------------------------------------- the range check of prefix_ids

def test_check_prefix_ids_refuses_what_the_op_refuses():
    ids = torch.tensor([0, 2, 1])
    assert check_prefix_ids(ids, 3) is ids
    widened = check_prefix_ids(ids.to(torch.uint32), 3)
    assert widened.dtype == torch.int64 and widened.tolist() == [0, 2, 1]
    check_prefix_ids(torch.zeros(0, dtype=torch.long), 0)  # no id: nothing to refuse
    with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=3\), got values in \[0, 3\]"):
        check_prefix_ids(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=3\), got values in \[-1, 1\]"):
        check_prefix_ids(torch.tensor([-1, 1], dtype=torch.int8), 3)
    with pytest.raises(ValueError, match=r"got values in \[0, 4294967295\]"):  # a wide unsigned id stays large
        check_prefix_ids(torch.tensor([0, 2**32 - 1], dtype=torch.uint32), 3)
    with pytest.raises(TypeError, match="prefix_ids must be an integer tensor"):
        check_prefix_ids(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(TypeError, match="prefix_ids must be an integer torch.Tensor"):
        check_prefix_ids([0, 1], 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_reads_prefix_ids_once_and_not_when_checked(backend):
    need(backend)
    dev = backend_device(backend)
    q, k, v, pk, pv = _op_inputs(dev)
    ids = torch.tensor([2, 0, 1], device=dev)
    want = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend=backend)
    with value_reads_by_package() as reads:
        prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend=backend)
    assert len(reads) == 1, reads  # min and max read back together
    with value_reads_by_package() as reads:
        got = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, prefix_ids_checked=True, backend=backend)
    assert reads == []
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # the flag skips the range check only: the checks of metadata still run
    with pytest.raises(ValueError, match=r"prefix_ids must be \[B=3\]"):
        prefix_attention(q, k, v, pk, pv, prefix_ids=ids[:2], prefix_ids_checked=True, backend=backend)
    with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=3\), got values in \[0, 5\]"):
        prefix_attention(q, k, v, pk, pv, prefix_ids=torch.tensor([5, 0, 1], device=dev), backend=backend)


# ---------------------------------------------------------------- once per model forward

def _bank_model(backend, dev):
    pytest.importorskip("transformers")
    from tiny_models import tiny_model

    from prefix_kernels import add_prefix_tuning

    return add_prefix_tuning(tiny_model("llama").to(dev), 4, num_prefixes=3, backend=backend)


@contextmanager
def counted_layers(monkeypatch):
    """Counts the calls of the op from the HF attention function (one per layer per forward)."""
    from prefix_kernels.hf import attention

    calls = []
    real = attention.prefix_attention

    def op(*args, **kwargs):
        calls.append(kwargs.get("prefix_ids_checked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "prefix_attention", op)
    yield calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_forward_reads_prefix_ids_once(backend, monkeypatch):
    """A 2-layer model with a bank: one read of the ids per forward (not one per layer), and
    every layer told that they are checked."""
    need(backend)
    from tiny_models import padded_batch

    dev = backend_device(backend)
    wrapped = _bank_model(backend, dev)
    ids, mask = (t.to(dev) for t in padded_batch())
    choice = torch.tensor([2, 0, 1], device=dev)
    with torch.no_grad():
        want = wrapped(input_ids=ids, attention_mask=mask, prefix_ids=choice).logits
        with counted_layers(monkeypatch) as layers, value_reads_by_package() as reads:
            got = wrapped(input_ids=ids, attention_mask=mask, prefix_ids=choice).logits
    assert layers == [True, True]
    assert len(reads) == 1, reads
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bad_prefix_id_is_refused_before_any_layer_runs(monkeypatch):
    from tiny_models import padded_batch

    wrapped = _bank_model("auto", torch.device("cpu"))
    ids, mask = (t.cpu() for t in padded_batch())
    with counted_layers(monkeypatch) as layers:
        with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=3\), got values in \[0, 3\]"):
            wrapped(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([0, 3, 1]))
        with pytest.raises(ValueError, match=r"prefix_ids must be in \[0, T=3\), got values in \[-2, 1\]"):
            wrapped.generate(input_ids=ids, attention_mask=mask, prefix_ids=[1, -2, 0], max_new_tokens=2,
                             do_sample=False, pad_token_id=0)
        with pytest.raises(TypeError, match="prefix_ids must be an integer tensor"):
            wrapped(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([0.0, 1.0, 2.0]))
    assert layers == []


def test_generate_reads_prefix_ids_once_per_call(monkeypatch):
    """generate() checks the ids once; its steps (and their beams' repeated ids) read nothing."""
    from tiny_models import padded_batch

    wrapped = _bank_model("auto", torch.device("cpu"))
    ids = padded_batch()[0].cpu()
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    want = wrapped.generate(input_ids=ids, attention_mask=mask, prefix_ids=[2, 0, 1], **gen)
    with counted_layers(monkeypatch) as layers, value_reads_by_package() as reads:
        got = wrapped.generate(input_ids=ids, attention_mask=mask, prefix_ids=[2, 0, 1], **gen)
    assert len(layers) == 2 * 3 and all(layers)  # 2 layers x 3 steps, each told the ids are checked
    assert len(reads) == 1, reads
    assert torch.equal(got, want)


@requires_cuda
def test_no_cuda_sync_per_layer():
    """On CUDA: the syncs that prefix_kernels' own code causes in a bank model's forward (one, the
    id check) and in checked op calls, forward and backward (none)."""
    from tiny_models import padded_batch

    dev = torch.device("cuda")
    wrapped = _bank_model("auto", dev)
    ids, mask = (t.to(dev) for t in padded_batch())
    choice = torch.tensor([2, 0, 1], device=dev)
    q, k, v, pk, pv = _op_inputs(dev, requires_grad=True)

    def ours(caught):
        return [w for w in caught if str(w.filename).startswith(PACKAGE_DIR)]

    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, prefix_ids=choice)  # warm up (compiles the kernels)
    out = prefix_attention(q, k, v, pk, pv, prefix_ids=choice, prefix_ids_checked=True)
    out.sum().backward()
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            with torch.no_grad():
                wrapped(input_ids=ids, attention_mask=mask, prefix_ids=choice)
            in_model = ours(caught)
            caught.clear()
            out = prefix_attention(q, k, v, pk, pv, prefix_ids=choice, prefix_ids_checked=True)
            torch.autograd.grad(out.sum(), (q, k, v, pk, pv))
            in_op = ours(caught)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(in_model) == 1, [str(w.message) + f" at {w.filename}:{w.lineno}" for w in in_model]
    assert in_op == [], [f"{w.filename}:{w.lineno}" for w in in_op]


# ---------------------------------------------------------------- per-call Python

class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


KERNELS = ("prefix_attention_fwd_kernel", "backward_prologue_kernel", "backward_kernel",
           "backward_epilogue_kernel", "dq_kernel")


def stub_launches(monkeypatch) -> dict:
    stubs = {name: _NoLaunch() for name in KERNELS}
    for name, stub in stubs.items():
        monkeypatch.setattr(ops, name, stub)
    return stubs


def _host_case(batch, heads, kv_heads, n, p, d, n_prefixes, dtype=torch.bfloat16):
    """CPU tensors as HF lays them out (q/k/v transposed views of [B, N, H, D]), a bank with ids
    when n_prefixes > 1, a padding mask; only the prefixes require grad (a frozen model's layer 0)."""
    q = torch.randn(batch, n, heads, d, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(batch, n, kv_heads, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    pk, pv = (torch.randn(n_prefixes, kv_heads, p, d, dtype=dtype, requires_grad=True) for _ in range(2))
    kwargs = dict(key_padding_mask=torch.ones(batch, n, dtype=torch.bool), backend="triton")
    if n_prefixes > 1:
        kwargs["prefix_ids"] = torch.arange(batch) % n_prefixes
    return (q, k, v, pk, pv), kwargs


def host_us_per_call(shape=(8, 9, 3, 1024, 64, 64), n_prefixes=1, reps=300, rounds=5):
    """(forward, backward) microseconds of host time per call with the launches stubbed (call
    :func:`stub_launches` first), the best of ``rounds``. The backward is timed through
    ``torch.autograd.grad`` (no gradient accumulation into leaves), so it includes the engine."""
    leaves, kwargs = _host_case(*shape, n_prefixes)
    best_f = best_b = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [prefix_attention(*leaves, **kwargs) for _ in range(reps)]
        best_f = min(best_f, (time.perf_counter() - t0) / reps * 1e6)
        grad = torch.empty_like(outs[0])
        t0 = time.perf_counter()
        for out in outs:
            torch.autograd.grad(out, (leaves[0], leaves[3], leaves[4]), grad)
        best_b = min(best_b, (time.perf_counter() - t0) / reps * 1e6)
    return best_f, best_b


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="stubbed launches need TRITON_INTERPRET=1")
def test_stubbed_call_launches_what_it_should(monkeypatch):
    """The host path measured by host_us_per_call: one forward launch, at most three backward ones."""
    stubs = stub_launches(monkeypatch)
    host_us_per_call(shape=(2, 9, 3, 64, 8, 64), n_prefixes=3, reps=2, rounds=1)
    launches = {name: s.launches for name, s in stubs.items()}
    assert launches.pop("prefix_attention_fwd_kernel") == 2  # 2 calls
    assert launches.pop("dq_kernel") == 0  # not deterministic
    assert launches == {"backward_prologue_kernel": 2, "backward_kernel": 2, "backward_epilogue_kernel": 2}


def test_profiler_ranges_only_while_a_profiler_runs(monkeypatch):
    """record_function costs host time even when no profiler listens: entered only under one."""
    need("triton")
    entered = []
    real = pk_autograd.record_function
    monkeypatch.setattr(pk_autograd, "record_function", lambda name: entered.append(name) or real(name))
    (q, k, v, pk, pv), kwargs = _host_case(1, 2, 1, 4, 2, 16, 1, dtype=torch.float32)
    dev = backend_device("triton")
    q, k, v, pk, pv = (t.detach().to(dev).requires_grad_() for t in (q, k, v, pk, pv))
    kwargs["key_padding_mask"] = kwargs["key_padding_mask"].to(dev)
    prefix_attention(q, k, v, pk, pv, **kwargs).sum().backward()
    assert entered == []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        prefix_attention(q, k, v, pk, pv, **kwargs).sum().backward()
    assert entered == ["prefix_kernels::forward", "prefix_kernels::backward"]
    names = {e.name for e in prof.events()}
    assert {"prefix_kernels::forward", "prefix_kernels::backward"} <= names


# ---------------------------------------------------------------- CUDA graphs

@requires_cuda
def test_reduce_overhead_training_matches_eager():
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of a prefix-tuned model with a bank and a
    padded batch: loss and prefix gradient of 3 AdamW steps equal eager's, and inductor ran every
    graph as a CUDA graph (it falls back to plain launches, with a log line, for what it cannot capture)."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    from tiny_models import padded_batch

    torch._dynamo.reset()
    dev = torch.device("cuda")
    ids, mask = (t.to(dev) for t in padded_batch())
    labels = ids.masked_fill(mask == 0, -100)
    choice = torch.tensor([2, 0, 1], device=dev)
    models = [_bank_model("auto", dev).train() for _ in range(2)]
    with torch.no_grad():
        models[1].prefix_embedding.copy_(models[0].prefix_embedding)
    runs = {"eager": models[0], "reduce-overhead": torch.compile(models[1], mode="reduce-overhead", fullgraph=True)}
    history = {}
    skips = counters["inductor"]["cudagraph_skips"]
    with torch._inductor.config.patch(force_disable_caches=True):
        for name, model in runs.items():
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-2)
            history[name] = []
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, prefix_ids=choice).loss
                loss.backward()
                history[name].append((loss.detach().clone(), params[0].grad.detach().clone()))
                opt.step()
    assert counters["inductor"]["cudagraph_skips"] == skips, "a graph ran without CUDA graphs (see the log)"
    for (loss, grad), (want_loss, want_grad) in zip(history["reduce-overhead"], history["eager"]):
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-4)


if __name__ == "__main__":  # microseconds of host time per call, launches stubbed
    if os.environ.get("TRITON_INTERPRET") != "1":  # read when the kernels are imported, above
        raise SystemExit("run as: TRITON_INTERPRET=1 PYTHONPATH=. python tests/test_host_overhead.py")
    patch = pytest.MonkeyPatch()
    stub_launches(patch)
    for label, shape in (("B=8 Hq=9 Hkv=3 N=1024 P=64 D=64", (8, 9, 3, 1024, 64, 64)),
                         ("B=2 Hq=9 Hkv=3 N=64 P=8 D=64", (2, 9, 3, 64, 8, 64))):
        for n_prefixes in (1, 3):
            fwd, bwd = host_us_per_call(shape, n_prefixes)
            what = "shared prefix" if n_prefixes == 1 else "bank T=3 + prefix_ids"
            print(f"{label}, {what}: forward {fwd:.1f} us, backward {bwd:.1f} us per call")
