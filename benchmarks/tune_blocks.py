"""Block-size sweep for the Triton kernels: which (BLOCK_M, BLOCK_N, num_warps, num_stages) is fastest
for the forward, the backward (dk/dv + dq by stores, no atomics) and the deterministic dq pass at a few
training shapes, next to what the static performance model (prefix_kernels.perf_model) predicts for it.

    PYTHONPATH=. python benchmarks/tune_blocks.py --out DIR            # CUDA, bf16: model + timing
    PYTHONPATH=. python benchmarks/tune_blocks.py --model-only --out DIR   # any box, no GPU: the model part
                                                                   # (also DIR/blocks_model.json, for --model-from)
    PYTHONPATH=. python benchmarks/tune_blocks.py --full --out DIR     # every combination (no model)
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/tune_blocks.py --device cpu --tiny   # a smoke run

The candidates are the ones the model favours per head dim (FAVOURED: configs.py's default first, then
the runners-up it was chosen over; see the comment in prefix_kernels/kernels/configs.py). The model part
compiles each candidate for sm_90 with no GPU (prefix-kernels inspect, in a subprocess without
TRITON_INTERPRET), takes the hot loops of the tuned kernel and gives per candidate: registers, spills,
the main loops' warp-instructions per useful MFLOP and issue/tensor, smem/tensor ratios (useful FLOPs per
loop kind: dk/dv loops 4 matmuls, dq loops 3), and a modelled time = the kernel's useful FLOPs at the
H100's dense bf16 peak times the FLOP-weighted pace max(1, issue/tensor, smem/tensor) of its unmasked
loops (a lower bound: latency, memory and masked blocks are not in it). The timing part (CUDA only) times
each candidate through the launchers in prefix_kernels/ops.py with ``configs.override_configs``; a
candidate that fails to compile is recorded as failed, one whose results differ from the default's (bf16
tolerance) as wrong. Rows (device, versions, git SHA, shape, kernel, config, model columns, ms, status)
go to <out>/blocks_<device>.json and .csv; model and measured are printed side by side.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_ms  # noqa: E402

from prefix_kernels import ops  # noqa: E402
from prefix_kernels.kernels.configs import BlockConfig, kernel_configs, override_configs  # noqa: E402

# (B, Hq, Hkv, N, P, D): the kernel benchmark's training shapes and SmolLM2-135M's geometry
SHAPES = [(4, 32, 8, 2048, 128, 128), (8, 16, 4, 1024, 64, 128), (8, 9, 3, 1024, 64, 64)]
TINY = [(1, 2, 1, 16, 4, 16)]
# Per head dim, the candidates the static model favours (configs.py's choice is always timed first):
# the chosen config and the runners-up it was picked over.
FAVOURED = {
    64: {"forward": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3)],
         "dq": [(128, 64, 8, 3), (128, 32, 4, 3)],
         "backward": [(64, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3)]},
    128: {"forward": [(128, 64, 8, 3), (128, 32, 8, 3)],
          "dq": [(128, 64, 8, 2), (128, 32, 8, 2)],
          "backward": [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2)]},
}
CURATED = FAVOURED[64]  # --tiny takes its first entries
FULL = {
    "forward": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))),
    "dq": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
    "backward": list(itertools.product((16, 32, 64), (64, 128), (4, 8), (2, 3, 4))),
}


KERNEL_NAMES = {"forward": "prefix_attention_fwd_kernel", "dq": "dq_kernel", "backward": "backward_kernel"}
CLOCK_HZ = 1.83e9  # perf_model's TENSOR_FLOP_PER_CLOCK is the H100 SXM's 989 TFLOP/s dense bf16 at this clock


def candidates_for(shape, dtype, capability, kernel, full: bool) -> list:
    """The configs to time for one kernel: the default first, then FAVOURED (or FULL) without it."""
    base = getattr(kernel_configs(shape[-1], dtype, capability), kernel)
    pool = (FULL if full else FAVOURED[64 if shape[-1] <= 64 else 128])[kernel]
    return [base] + [BlockConfig(*c) for c in pool if BlockConfig(*c) != base]


def model_row(shape, kernel: str, report: dict) -> dict:
    """The model columns of one candidate from its inspect report (see the module docstring)."""
    from prefix_kernels import perf_model

    B, Hq, Hkv, N, P, D = shape
    k = next(x for x in report["kernels"] if x["name"] == KERNEL_NAMES[kernel])
    loops: dict = {}
    for lp in k["hot_loops"]:  # each loop already modelled with its own useful FLOPs (perf_model's roles)
        kind = "fwd" if kernel == "forward" else "dq" if kernel == "dq" else lp["role"] or "dkdv"
        loops.setdefault(kind, []).append((lp["sass"], lp))
    pairs = B * Hq * (N * P + N * (N + 1) / 2)  # causal, M = N
    total = {"fwd": {"fwd": 2 * pairs * (D + D)}, "dq": {"dq": 2 * pairs * 3 * D},
             "dkdv": {"dkdv": 2 * pairs * 4 * D, "dq": 2 * pairs * 3 * D}}["dkdv" if kernel == "backward" else
                                                                             "fwd" if kernel == "forward" else "dq"]
    row = dict(registers=k["registers"], spill_bytes=k["spill_bytes"])
    seconds = 0.0
    for kind, flops in total.items():
        if kind not in loops:
            continue
        sass, m = min(loops[kind], key=lambda x: x[0])  # the unmasked loop: the fewest instructions
        pace = max(1.0, m["issue_per_tensor"], m["smem_per_tensor"])
        seconds += flops * pace / (perf_model.TENSOR_FLOP_PER_CLOCK["BF16"] * 132 * CLOCK_HZ)
        row.update({f"{kind}_sass": sass, f"{kind}_wi_per_mflop": m["warp_instructions_per_useful_mflop"],
                    f"{kind}_issue_per_tensor": m["issue_per_tensor"], f"{kind}_smem_per_tensor": m["smem_per_tensor"]})
    row["model_ms"] = round(seconds * 1e3, 4)
    return row


def model_rows(shapes, dtype_name: str, full: bool, first_only: bool = False) -> list[dict]:
    """Every candidate of every shape through the model (this process must not be interpreting)."""
    from prefix_kernels import inspection

    dtype = getattr(torch, dtype_name)
    rows = []
    for shape in shapes:
        B, Hq, Hkv, N, P, D = shape
        name = f"{B}x{Hq}x{Hkv}x{N}x{N}x{P}x{D}"
        for kernel in ("forward", "dq", "backward"):
            for cfg in candidates_for(shape, dtype, (9, 0), kernel, full)[:1 if first_only else None]:
                row = dict(shape="x".join(map(str, shape)), kernel=kernel, **asdict(cfg))
                try:
                    with override_configs(**{kernel: cfg}):
                        report = inspection.inspect_launches(name, dtype_name, "sm_90", deterministic=kernel == "dq")
                    row.update(model_row(shape, kernel, report))
                except Exception as exc:  # noqa: BLE001 -- a config that does not compile is a result
                    row["model_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                print(row, flush=True)
                rows.append(row)
    return rows


def model_in_subprocess(shapes, dtype_name: str, full: bool, first_only: bool = False) -> list[dict]:
    """model_rows in a fresh process without TRITON_INTERPRET (kernels imported under the interpreter
    cannot be compiled; and the timing process keeps its own CUDA driver)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.json"
        cmd = [sys.executable, __file__, "--model-only", "--model-json", str(out), "--dtype", dtype_name]
        cmd += ["--full"] * full + ["--tiny"] * first_only + [a for s in shapes for a in ("--shape", "x".join(map(str, s)))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the model subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def inputs(shape, dtype, device):
    B, Hq, Hkv, N, P, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(size, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(B, Hq, N, D), rand(B, Hkv, N, D), rand(B, Hkv, N, D)
    pk, pv = rand(1, Hkv, P, D), rand(1, Hkv, P, D)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[: B // 2, : N // 8] = False  # left padding on half the rows
    return q, k, v, pk, pv, mask, rand(B, Hq, N, D)


def runner(kernel, tensors, scale):
    """A callable that runs one kernel's launches (with the backward's prologue/epilogue) and returns its outputs."""
    q, k, v, pk, pv, mask, grad_out = tensors
    if kernel == "forward":
        return lambda: ops.prefix_attention_forward(q, k, v, pk, pv, mask, None, True, scale)
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, mask, None, True, scale)
    need = dict(need_dq=True, need_dkdv=kernel == "backward", need_dprefix=kernel == "backward")

    def backward():
        grads = ops.prefix_attention_backward(grad_out, q, k, v, pk, pv, out, lse, mask, None, True, scale,
                                              deterministic=kernel == "dq", **need)
        return tuple(g for g in grads if g is not None)

    return backward


def max_rel_err(got, want) -> float:
    return max(float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-6)
               for a, b in zip(got, want))


def sweep(shape, dtype, device, candidates, reps_cpu) -> list[dict]:
    """Times ``candidates[kernel]`` (BlockConfigs or (block_m, block_n, warps, stages) tuples) of each
    kernel, after the default configuration (timed first, whether listed or not: the others are
    checked against its results)."""
    tensors = inputs(shape, dtype, device)
    scale = shape[-1] ** -0.5
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    default = kernel_configs(shape[-1], dtype, capability)
    rows = []
    for kernel in ("forward", "dq", "backward"):
        fn = runner(kernel, tensors, scale)
        want = fn()
        want = want if isinstance(want, tuple) else (want,)
        base_cfg = getattr(default, kernel)
        listed = [c if isinstance(c, BlockConfig) else BlockConfig(*c) for c in candidates[kernel]]
        for cfg in [base_cfg] + [c for c in listed if c != base_cfg]:
            row = dict(shape="x".join(map(str, shape)), kernel=kernel, default=cfg == base_cfg, **asdict(cfg))
            try:
                with override_configs(**{kernel: cfg}):
                    got = fn()
                    got = got if isinstance(got, tuple) else (got,)
                    n = 1 if kernel == "forward" else len(want)  # forward: out (lse is in other units' rounding)
                    err = max_rel_err(got[:n], want[:n])
                    row["max_rel_err"] = err
                    if err > 2e-2:
                        row.update(status="wrong", ms=None)
                    else:
                        row.update(status="ok", ms=time_ms(fn, device=device, warmup=1, reps=reps_cpu))
            except Exception as exc:  # noqa: BLE001 -- compile failures (resources) are results here
                row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", ms=None)
            rows.append(row)
            print(row, flush=True)
    return rows


def _cfg(r) -> str:
    return f"({r['block_m']}, {r['block_n']}, {r['num_warps']}, {r['num_stages']})"


def summary(rows) -> list[str]:
    """Per shape and kernel: each candidate's model columns and measured ms side by side, then the best."""
    lines = []
    for (shape, kernel), group in itertools.groupby(rows, key=lambda r: (r["shape"], r["kernel"])):
        group = list(group)
        lines.append(f"{shape} {kernel}:  config            regs spill  wi/MFLOP(main)  issue/t  smem/t  model ms  measured ms")
        for r in group:
            main = "dkdv" if kernel == "backward" else "fwd" if kernel == "forward" else "dq"
            wi, it, st = (r.get(f"{main}_{x}") for x in ("wi_per_mflop", "issue_per_tensor", "smem_per_tensor"))
            model = r.get("model_ms")
            ms = r.get("ms")
            lines.append(f"  {'*' if r.get('default') else ' '} {_cfg(r):18s} {r.get('registers', '-')!s:>4} "
                         f"{r.get('spill_bytes', '-')!s:>5} {wi if wi is not None else '-'!s:>15} "
                         f"{it if it is not None else '-'!s:>8} {st if st is not None else '-'!s:>7} "
                         f"{model if model is not None else '-'!s:>9} "
                         f"{f'{ms:.3f}' if ms is not None else r.get('status', 'not timed')!s:>12}")
        ok = [r for r in group if r.get("status") == "ok" and r.get("ms") is not None]
        base = next((r for r in group if r.get("default")), None)
        if ok and base is not None and base.get("ms") is not None:
            best = min(ok, key=lambda r: r["ms"])
            lines.append(f"{shape} {kernel:8s} default {_cfg(base)} {base['ms']:.3f} ms, best {_cfg(best)} "
                         f"{best['ms']:.3f} ms ({base['ms'] / best['ms']:.2f}x)")
        modelled = [r for r in group if r.get("model_ms") is not None]
        if modelled:
            lines.append(f"{shape} {kernel:8s} model favours {_cfg(min(modelled, key=lambda r: r['model_ms']))}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--full", action="store_true", help="every combination instead of the favoured list (no model)")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape, two candidates per kernel (smoke run)")
    parser.add_argument("--shape", action="append", default=None, metavar="BxHqxHkvxNxPxD")
    parser.add_argument("--model-only", action="store_true", help="the static model part alone (no GPU needed)")
    parser.add_argument("--no-model", action="store_true", help="the timing part alone")
    parser.add_argument("--model-from", type=Path, help="the model rows of an earlier --model-only run (its "
                        "blocks_model.json) instead of compiling them again: the sm_90 compiles take minutes")
    parser.add_argument("--model-json", type=Path, help=argparse.SUPPRESS)  # the model subprocess's output
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape] if args.shape else (TINY if args.tiny else SHAPES)
    if args.model_json is not None:  # the model subprocess (model_in_subprocess)
        args.model_json.write_text(json.dumps(model_rows(shapes, args.dtype, args.full, args.tiny)))
        return 0
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    timing = not args.model_only
    if timing and device.type != "cuda" and not ops.interpreting():
        if not args.tiny:
            print("no CUDA: the model part only (the timing part needs a GPU; TRITON_INTERPRET=1 --tiny smoke-runs it)")
            timing = False
        else:
            parser.error("without CUDA, set TRITON_INTERPRET=1 (and use --tiny)")
    if timing and args.tiny and device.type != "cuda":
        dtype = torch.float32  # the interpreter's 16-bit path is the same code upcast
    # without CUDA the timing runs interpreted, under the interpreter's own (small) default configs
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    rows = []
    for shape in shapes:
        cands = {kernel: candidates_for(shape, dtype, capability if timing else (9, 0), kernel, args.full)
                 for kernel in ("forward", "dq", "backward")}
        if args.tiny:
            cands = {kernel: c[:2] for kernel, c in cands.items()}  # the default and one runner-up
        if timing:
            rows += sweep(shape, dtype, device, cands, reps_cpu=2 if args.tiny else 10)
        else:
            rows += [dict(shape="x".join(map(str, shape)), kernel=kernel, default=i == 0, **asdict(cfg))
                     for kernel, cs in cands.items() for i, cfg in enumerate(cs)]
    if not args.no_model and not args.full:
        if args.model_from is not None and args.model_from.exists():
            model = json.loads(args.model_from.read_text())
        else:
            model = model_in_subprocess(shapes, "bfloat16", False, args.tiny)
        if args.model_only:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "blocks_model.json").write_text(json.dumps(model, indent=1))
        key = lambda r: (r["shape"], r["kernel"], r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])  # noqa: E731
        by_key = {key(m): m for m in model}
        for r in rows:
            r.update({k: v for k, v in by_key.get(key(r), {}).items() if k not in r})
    env = environment()
    for r in rows:
        r.update(env, dtype=str(dtype).replace("torch.", ""))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"blocks_{env['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(summary(rows)))
    print(f"wrote {stem}.json/.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
