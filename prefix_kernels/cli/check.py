"""``prefix-kernels check``: runs the fused op on a small prefix-tuning attention problem on this
machine (CUDA: the Triton kernels; CPU: the C++ op when it builds, else the reference), checks the
output and all five gradients against the fp32 reference, and times forward+backward against
PyTorch SDPA on concatenated K/V.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from prefix_kernels import prefix_attention, prefix_attention_reference
from prefix_kernels.functional import resolve_backend


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _concat_sdpa(q, k, v, pk, pv):
    from torch.nn.attention.bias import causal_lower_right

    keys = torch.cat([pk.expand(q.shape[0], *pk.shape), k], dim=2)
    values = torch.cat([pv.expand(q.shape[0], *pv.shape), v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def check(batch: int, heads: int, kv_heads: int, seq: int, prefix: int, head_dim: int, reps: int) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend = resolve_backend("auto", torch.device(device))
    print(f"prefix_kernels check on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"backend={backend}, dtype={str(dtype).replace('torch.', '')}")
    print(f"shape: B={batch} Hq={heads} Hkv={kv_heads} N=M={seq} P={prefix} D={head_dim}, causal, "
          f"left-padded rows, prefix trained")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = rand(batch, heads, seq, head_dim), rand(batch, kv_heads, seq, head_dim), rand(batch, kv_heads, seq, head_dim)
    pk, pv = rand(kv_heads, prefix, head_dim), rand(kv_heads, prefix, head_dim)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask[0, : seq // 4] = False
    leaves = (q, k, v, pk, pv)

    out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    ref, _ = prefix_attention_reference(*leaves32, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, leaves32, grad.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = True
    for name, got, want in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), (out, *grads), (ref, *ref_grads)):
        err = (got.float() - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        ok &= err < tol
        print(f"  {name:<10} max rel error vs fp32 reference {err:.2e} {'ok' if err < tol else 'FAIL'}")

    def ours():
        torch.autograd.grad(prefix_attention(q, k, v, pk, pv), leaves, grad)

    def baseline():
        torch.autograd.grad(_concat_sdpa(q, k, v, pk, pv), leaves, grad)

    t_ours, t_base = _median_ms(ours, reps), _median_ms(baseline, reps)
    print(f"  fwd+bwd: ours {t_ours:.2f} ms, cat+SDPA(lower-right) {t_base:.2f} ms, ratio {t_base / t_ours:.2f}x")
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="correctness + timing of the fused op on this machine")
    for name, default in (("batch", 4), ("heads", 9), ("kv-heads", 3), ("seq", 256), ("prefix", 20),
                          ("head-dim", 64), ("reps", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.set_defaults(run=lambda a: check(a.batch, a.heads, a.kv_heads, a.seq, a.prefix, a.head_dim, a.reps))
