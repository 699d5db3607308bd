"""``prefix-kernels check``: runs each fast backend of the fused op on this machine (CUDA: the Triton
kernels, bf16; CPU: the C++ op, fp32) on a small prefix-tuning attention problem, checks its output
and all five gradients against the fp32 reference (plain PyTorch: concatenated K/V, an explicit
mask, prefix_kernels/reference.py), and times forward+backward against PyTorch SDPA on
concatenated K/V. It says which backends ran; with none available (no CUDA, the C++ op not built)
there is nothing to check, and it says so and exits 1.

``--backends triton`` on a CPU with TRITON_INTERPRET=1 checks the Triton kernels under the
interpreter (correctness only: the interpreter is not timed).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from prefix_kernels import prefix_attention, prefix_attention_reference
from prefix_kernels.cli.common import require, user_errors

FAST_BACKENDS = ("triton", "cpu")
GRAD_NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _median_ms(fn, reps: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _concat_sdpa(q, k, v, pk, pv):
    from torch.nn.attention.bias import causal_lower_right

    keys = torch.cat([pk.expand(q.shape[0], *pk.shape), k], dim=2)
    values = torch.cat([pv.expand(q.shape[0], *pv.shape), v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def backend_status(name: str) -> tuple[str | None, str]:
    """(device it runs on, description) when ``name`` can run here, else (None, why not)."""
    if name == "triton":
        if torch.cuda.is_available():
            return "cuda", f"Triton kernels on {torch.cuda.get_device_name()}"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "cpu", "Triton kernels under the interpreter (TRITON_INTERPRET=1)"
        return None, "needs CUDA (none here; TRITON_INTERPRET=1 runs the kernels under the CPU interpreter)"
    from prefix_kernels import cpu

    if cpu.is_available():
        return "cpu", f"the C++ CPU op ({cpu.build_info()})"
    return None, cpu.unavailable_reason()


def default_backends() -> list[str]:
    """The fast backends ``backend="auto"`` picks here: Triton with CUDA, the C++ op on CPU."""
    return ["triton"] if torch.cuda.is_available() else ["cpu"]


def _backend_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAST_BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(FAST_BACKENDS)}, "
                                         f"got {text!r}")
    return list(dict.fromkeys(names))


def check_backend(name: str, device: str, leaves32, mask, grad32, reps: int) -> tuple[bool, dict]:
    """Output and gradients of ``name`` against the fp32 reference on the same (rounded) inputs;
    then fwd+bwd timing against cat+SDPA (not under the Triton interpreter)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    leaves = [t.to(device, dtype).requires_grad_() for t in leaves32]
    mask_d, grad = mask.to(device), grad32.to(device, dtype)
    out = prefix_attention(*leaves, key_padding_mask=mask_d, backend=name)
    got = (out, *torch.autograd.grad(out, leaves, grad))
    ref_leaves = [t.detach().float().cpu().requires_grad_() for t in leaves]  # the inputs the backend saw
    ref, _ = prefix_attention_reference(*ref_leaves, key_padding_mask=mask)
    want = (ref, *torch.autograd.grad(ref, ref_leaves, grad.float().cpu()))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    errors = {}
    for label, g, w in zip(GRAD_NAMES, got, want):
        if w.numel():  # (P = 0: no prefix gradients)
            errors[label] = (g.float().cpu() - w).abs().max().item() / max(w.abs().max().item(), 1e-6)
    ok = all(err < tol for err in errors.values())
    result = {"dtype": str(dtype).replace("torch.", ""), "tol": tol, "errors": errors}
    if not (name == "triton" and device == "cpu"):
        q, k, v, pk, pv = leaves
        cuda = device == "cuda"
        result["ours_ms"] = _median_ms(
            lambda: torch.autograd.grad(prefix_attention(q, k, v, pk, pv, backend=name), leaves, grad), reps, cuda)
        result["sdpa_ms"] = _median_ms(
            lambda: torch.autograd.grad(_concat_sdpa(q, k, v, pk, pv), leaves, grad), reps, cuda)
    return ok, result


def check(batch: int, heads: int, kv_heads: int, seq: int, prefix: int, head_dim: int, reps: int,
          backends: list[str] | None = None) -> int:
    backends = backends or default_backends()
    print(f"prefix_kernels check: B={batch} Hq={heads} Hkv={kv_heads} N=M={seq} P={prefix} D={head_dim}, "
          f"causal, left-padded rows, prefix trained; every gradient against the fp32 reference")
    runnable = {}
    for name in backends:
        device, about = backend_status(name)
        print(f"  {name:<7} {'runs: ' + about if device else 'unavailable: ' + about}")
        if device:
            runnable[name] = device
    if not runnable:
        print("check FAILED: no fast backend can run on this machine, so there is nothing to check "
              "(prefix_attention falls back to the plain PyTorch reference here)")
        return 1

    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim), (batch, kv_heads, seq, head_dim),
              (kv_heads, prefix, head_dim), (kv_heads, prefix, head_dim)]
    leaves32 = [torch.randn(*s, generator=gen) for s in shapes]
    grad32 = torch.randn(batch, heads, seq, head_dim, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, : seq // 4] = False
    ok_all = len(runnable) == len(backends)  # a backend asked for by name must run
    for name, device in runnable.items():
        ok, result = check_backend(name, device, leaves32, mask, grad32, reps)
        ok_all &= ok
        print(f"\n{name} on {device}, {result['dtype']}: max relative error vs the fp32 reference "
              f"(tolerance {result['tol']:.0e})")
        for label, err in result["errors"].items():
            print(f"  {label:<10} {err:.2e} {'ok' if err < result['tol'] else 'FAIL'}")
        if "ours_ms" in result:
            print(f"  fwd+bwd: {name} {result['ours_ms']:.2f} ms, cat+SDPA(lower-right) {result['sdpa_ms']:.2f} ms, "
                  f"ratio {result['sdpa_ms'] / result['ours_ms']:.2f}x")
        else:
            print("  (not timed: the Triton interpreter is for correctness only)")
    missing = [name for name in backends if name not in runnable]
    print(f"\ncheck {'passed' if ok_all else 'FAILED'} ({', '.join(runnable)} checked"
          f"{'; unavailable: ' + ', '.join(missing) if missing else ''})")
    return 0 if ok_all else 1


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="correctness + timing of the fused op's backends on this machine")
    for name, default, text in (
            ("batch", 4, "batch size B of the test problem"),
            ("heads", 9, "query heads Hq (a multiple of --kv-heads)"),
            ("kv-heads", 3, "key/value heads Hkv (fewer than --heads: grouped-query attention)"),
            ("seq", 256, "sequence length N (queries and keys)"),
            ("prefix", 20, "prefix length P, virtual tokens (0: none)"),
            ("head-dim", 64, "head dimension D (at most 256)"),
            ("reps", 5, "timed repetitions of forward+backward (the median is printed)")):
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    p.add_argument("--backends", type=_backend_list, default=None,
                   help="comma-separated subset of triton,cpu (default: the one backend='auto' picks here: "
                        "triton with CUDA, else cpu)")
    p.set_defaults(run=run)


@user_errors("check")
def run(a) -> int:
    for name in ("batch", "heads", "kv_heads", "seq", "head_dim", "reps"):
        require(getattr(a, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    require(a.prefix >= 0, f"--prefix must be >= 0, got {a.prefix}")
    require(a.heads % a.kv_heads == 0, f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
    require(a.head_dim <= 256, f"--head-dim must be <= 256, got {a.head_dim}")
    return check(a.batch, a.heads, a.kv_heads, a.seq, a.prefix, a.head_dim, a.reps, a.backends)
