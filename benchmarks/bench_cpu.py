"""CPU benchmark of the C++ op against the concat baselines and the no-prefix floor.

    python benchmarks/bench_cpu.py --out benchmarks/results/

Training shapes (fp32, forward + backward, every input requiring grad -- prefix and activations):
    ours    prefix_attention(..., backend="cpu")
    peft    what PEFT's prefix tuning amounts to: expand the prefix per row, torch.cat, repeat_kv,
            an explicit [B, 1, N, P + M] bool mask, F.scaled_dot_product_attention
    concat  torch.cat of the prefix + SDPA with causal_lower_right (bottom-right causal), enable_gqa
    floor   SDPA with no prefix at all (is_causal=True, enable_gqa=True): the cost of the attention
            the model would do anyway
Decode (forward only, N = 1 against an M-token cache): the same four; the floor is non-causal
SDPA there (with one query, SDPA's top-left is_causal would hide all but the first key, while
bottom-right causal sees every key).

Every timing is the median of --reps runs after --warmup runs, on --threads threads (default 2);
the runs of the implementations are interleaved, so background load affects them alike.
Each shape is checked against prefix_attention_reference before it is timed.
Results: <out>/cpu_bench.json and <out>/cpu_bench.csv (one row per shape and implementation).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_kernels import cpu, prefix_attention, prefix_attention_reference  # noqa: E402

TRAIN_SHAPES = [  # (B, Hq, Hkv, N, P, D); M = N
    (4, 9, 3, 512, 20, 64),
    (4, 9, 3, 512, 128, 64),
    (8, 16, 4, 1024, 64, 128),
]
DECODE_SHAPES = [  # (B, Hq, Hkv, N, M, P, D)
    (16, 16, 4, 1, 2048, 64, 64),
]


# ---------------------------------------------------------------- implementations

def ours(q, k, v, pk, pv):
    return prefix_attention(q, k, v, pk, pv, causal=True, backend="cpu")


def peft_style(q, k, v, pk, pv):
    batch, n_heads, n_queries, _ = q.shape
    group = n_heads // k.shape[1]
    keys = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2).repeat_interleave(group, dim=1)
    n_keys, n_prefix = k.shape[2], pk.shape[1]
    query_pos = torch.arange(n_keys - n_queries, n_keys)
    causal = torch.arange(n_keys)[None, :] <= query_pos[:, None]
    mask = torch.cat([torch.ones(n_queries, n_prefix, dtype=torch.bool), causal], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(batch, 1, -1, -1))


def concat_sdpa(q, k, v, pk, pv):
    from torch.nn.attention.bias import causal_lower_right

    batch = q.shape[0]
    keys = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def floor_sdpa(q, k, v, pk, pv):
    causal = q.shape[2] == k.shape[2]  # training: square causal; decode (N=1): every key visible
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


IMPLS = {"ours": ours, "peft": peft_style, "concat": concat_sdpa, "floor": floor_sdpa}


# ---------------------------------------------------------------- helpers

def make_inputs(B, Hq, Hkv, N, M, P, D, requires_grad, seed=0):
    """q/k/v as HF hands them over: transposed views of [B, S, H, D] storage."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=gen).transpose(1, 2)
    k = torch.randn(B, M, Hkv, D, generator=gen).transpose(1, 2)
    v = torch.randn(B, M, Hkv, D, generator=gen).transpose(1, 2)
    pk = torch.randn(Hkv, P, D, generator=gen)
    pv = torch.randn(Hkv, P, D, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv)]


def median_ms(fns: dict, warmup: int, reps: int) -> dict:
    """Median wall time (ms) of each fn. The reps are interleaved (one run of each in turn), so
    background load on a shared machine hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def check(B, Hq, Hkv, N, M, P, D, train):
    """Max abs error of ours vs the fp32 reference (out and, for training, the five grads) on the
    first two rows of the shape."""
    inputs = make_inputs(min(B, 2), Hq, Hkv, N, M, P, D, requires_grad=train, seed=1)
    out = ours(*inputs)
    leaves = [t.detach().clone().requires_grad_(train) for t in inputs]
    ref, _ = prefix_attention_reference(*leaves, causal=True)
    errs = {"out": (out - ref).abs().max().item()}
    if train:
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, inputs, grad)
        want = torch.autograd.grad(ref, leaves, grad)
        for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
            errs[name] = (g - w).abs().max().item() / max(1.0, w.abs().max().item())
    worst = max(errs.values())
    if not worst < 1e-3:
        raise SystemExit(f"correctness check failed for {(B, Hq, Hkv, N, M, P, D)}: {errs}")
    return worst


def environment(threads):
    sha = ""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
        if proc.returncode == 0 and all(c in "0123456789abcdef" for c in proc.stdout.strip()):
            sha = proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(torch=torch.__version__, cpu=cpu_model, threads=threads, git_sha=sha or None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                build=cpu.build_info(), python=platform.python_version())


# ---------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/", help="directory for cpu_bench.json/.csv")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--quick", action="store_true", help="only the first training and decode shape")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not cpu.is_available():
        raise SystemExit(f"the C++ CPU op is unavailable: {cpu.unavailable_reason()}")
    impls = [name for name in args.impls.split(",") if name]
    env = environment(args.threads)
    print(json.dumps(env), flush=True)

    jobs = [("fwd+bwd", (B, Hq, Hkv, N, N, P, D)) for B, Hq, Hkv, N, P, D in TRAIN_SHAPES]
    jobs += [("decode fwd", shape) for shape in DECODE_SHAPES]
    if args.quick:
        jobs = [jobs[0], jobs[-1]]

    rows = []
    for mode, (B, Hq, Hkv, N, M, P, D) in jobs:
        train = mode == "fwd+bwd"
        err = check(B, Hq, Hkv, N, M, P, D, train)
        inputs = make_inputs(B, Hq, Hkv, N, M, P, D, requires_grad=train)
        grad = torch.randn(B, Hq, N, D)
        steps = {}
        for name in impls:
            fn = IMPLS[name]
            if train:
                def step(fn=fn):
                    for t in inputs:
                        t.grad = None
                    fn(*inputs).backward(grad)
            else:
                def step(fn=fn):
                    with torch.no_grad():
                        fn(*inputs)
            steps[name] = step
        results = median_ms(steps, args.warmup, args.reps)
        floor = results.get("floor")
        kv_bytes = (B * Hkv * M + Hkv * P) * D * 2 * 4
        for name, ms in results.items():
            row = dict(mode=mode, B=B, Hq=Hq, Hkv=Hkv, N=N, M=M, P=P, D=D, dtype="float32", impl=name,
                       ms=round(ms, 3), ratio_to_floor=round(ms / floor, 3) if floor else None,
                       max_err_vs_reference=err if name == "ours" else None, **env)
            if mode == "decode fwd":
                row["kv_gb_per_s"] = round(kv_bytes / (ms * 1e-3) / 1e9, 2)
            rows.append(row)
        line = "  ".join(f"{n} {ms:8.2f} ms" + (f" ({ms / floor:.2f}x)" if floor else "") for n, ms in results.items())
        print(f"{mode:10s} B={B} Hq={Hq} Hkv={Hkv} N={N} M={M} P={P} D={D}:  {line}", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cpu_bench.json").write_text(json.dumps(dict(environment=env, results=rows), indent=2) + "\n")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(out_dir / "cpu_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out_dir / 'cpu_bench.json'} and {out_dir / 'cpu_bench.csv'}")


if __name__ == "__main__":
    main()
