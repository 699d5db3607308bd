"""Kernel benchmark of the fused op against PyTorch SDPA on concatenated K/V (GPU).

    PYTHONPATH=. python benchmarks/bench_attention.py --out benchmarks/results/

fwd, bwd (prefix + activation gradients) and fwd+bwd for training shapes, and decode forward. Each
shape is checked against the fp32 reference before anything is timed. FLOPs follow
flash-attention's convention: 4 * B * Hq * N * (P + visible keys per query) * D for the forward,
2.5x that for the backward. Rows go to <out>/attention_<device>.json and .csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import concat_sdpa, environment, peft_style, sdpa_no_prefix, time_ms  # noqa: E402

from prefix_kernels import prefix_attention, prefix_attention_reference  # noqa: E402

# (B, Hq, Hkv, N, M, P, D)
TRAIN_SHAPES = [(8, 16, 4, 1024, 1024, 64, 128), (4, 32, 8, 2048, 2048, 128, 128), (16, 9, 3, 512, 512, 20, 64),
                (2, 32, 8, 4096, 4096, 256, 128)]
DECODE_SHAPES = [(64, 32, 8, 1, 4096, 64, 128), (16, 16, 4, 1, 16384, 64, 128)]
QUICK_TRAIN = TRAIN_SHAPES[:2]
QUICK_DECODE = DECODE_SHAPES[:1]


def make(shape, dtype, device, requires_grad):
    b, hq, hkv, n, m, p, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, m, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, m, d, device=device, dtype=dtype, generator=g)
    pk = torch.randn(hkv, p, d, device=device, dtype=dtype, generator=g)
    pv = torch.randn(hkv, p, d, device=device, dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv)]


def flops(shape, mode):
    b, hq, _, n, m, p, d = shape
    visible = n * (m - n) + n * (n + 1) // 2  # causal: query i sees M - N + i + 1 keys
    fwd = 4 * b * hq * d * (n * p + visible)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def providers(decode: bool):
    ours = lambda *t: prefix_attention(*t, backend="triton")  # noqa: E731
    rows = {"ours": ours, "cat+sdpa(lower_right)": concat_sdpa, "peft_style": peft_style}
    if not decode:
        rows["sdpa_no_prefix(floor)"] = sdpa_no_prefix
    return rows


def check(shape, dtype, device):
    small = (min(shape[0], 2),) + shape[1:3] + (min(shape[3], 256), min(shape[4], 256)) + shape[5:]
    q, k, v, pk, pv = make(small, dtype, device, True)
    out = prefix_attention(q, k, v, pk, pv, backend="triton")
    ref, _ = prefix_attention_reference(q, k, v, pk, pv)
    err = (out.float() - ref.float()).abs().max().item()
    assert err < 2e-2, f"{small}: forward error {err} against the reference"
    return err


def bench_shape(shape, dtype, device, decode):
    rows = []
    check(shape, dtype, device)
    modes = ["fwd"] if decode else ["fwd", "bwd", "fwd+bwd"]
    for name, fn in providers(decode).items():
        for mode in modes:
            tensors = make(shape, dtype, device, mode != "fwd")
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        ms = time_ms(lambda: fn(*tensors))
                else:
                    out = fn(*tensors)
                    grad = torch.randn_like(out)
                    if mode == "bwd":
                        ms = time_ms(lambda: torch.autograd.grad(out, tensors, grad, retain_graph=True, allow_unused=True))
                    else:
                        ms = time_ms(lambda: torch.autograd.grad(fn(*tensors), tensors, grad, allow_unused=True))
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    fn(*tensors).sum().backward() if mode != "fwd" else fn(*tensors)
                    peak = torch.cuda.max_memory_allocated() / 2**20
                else:
                    peak = None
                error = None
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. OOM of a concat baseline
                ms, peak, error = None, None, str(exc).splitlines()[0][:200]
            row = dict(shape="x".join(map(str, shape)), B=shape[0], Hq=shape[1], Hkv=shape[2], N=shape[3],
                       M=shape[4], P=shape[5], D=shape[6], dtype=str(dtype).replace("torch.", ""),
                       provider=name, mode=mode, ms=ms, peak_mib=peak, error=error)
            if ms:
                row["tflops"] = flops(shape, mode) / ms / 1e9
                if decode:
                    kv_bytes = 2 * tensors[1].numel() * tensors[1].element_size() + 2 * tensors[3].numel() * tensors[3].element_size()
                    row["gb_per_s"] = kv_bytes / ms / 1e6
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def add_ratios(rows):
    by_key = {(r["shape"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        ours = by_key.get((r["shape"], r["mode"], "ours"))
        if r["provider"] != "ours" and r["ms"] and ours and ours["ms"]:
            r["speedup_of_ours"] = r["ms"] / ours["ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="two training shapes and one decode shape")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark times the Triton kernels and needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in QUICK_TRAIN if args.quick else TRAIN_SHAPES:
        rows += bench_shape(shape, dtype, "cuda", decode=False)
    for shape in QUICK_DECODE if args.quick else DECODE_SHAPES:
        rows += bench_shape(shape, dtype, "cuda", decode=True)
    add_ratios(rows)
    env = environment()
    for r in rows:
        r.update(env)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"attention_{env['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {stem}.json/.csv")


if __name__ == "__main__":
    main()
