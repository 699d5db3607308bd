"""Block-size sweep for the Triton kernels: which (BLOCK_M, BLOCK_N, num_warps, num_stages) is fastest
for the forward, the one-pass backward and the deterministic dq pass at a few training shapes.

    PYTHONPATH=. python benchmarks/tune_blocks.py --out DIR            # CUDA, bf16, a curated grid
    PYTHONPATH=. python benchmarks/tune_blocks.py --full --out DIR     # every combination
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/tune_blocks.py --device cpu --tiny   # a smoke run

The block sizes in prefix_kernels/kernels/configs.py are starting points taken from the Triton
tutorial and flash-attention, not measured. This script measures them: for each shape it times each
kernel through the launchers in prefix_kernels/ops.py, with the candidate set by
``configs.override_configs`` (coordinate descent: forward; the deterministic dq pass; the backward
with the default dq tiles: all five gradients, prologue + main kernel + epilogue). A candidate that fails to compile (shared memory, registers) is recorded as failed; one whose
results differ from the default configuration's (bf16 tolerance) is recorded as wrong and never
chosen. Rows (device, versions, git SHA, shape, kernel, config, ms, status) go to
<out>/blocks_<device>.json and .csv; the best per kernel and shape is printed against the default.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
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
CURATED = {
    "forward": [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 4)],
    "dq": [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2),
           (64, 64, 8, 3), (128, 128, 8, 1)],
    "backward": [(32, 128, 4, 3), (32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3),
                 (64, 64, 4, 3), (64, 64, 8, 3), (16, 128, 8, 3), (64, 128, 8, 3)],
}
FULL = {
    "forward": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))),
    "dq": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
    "backward": list(itertools.product((16, 32, 64), (64, 128), (4, 8), (2, 3, 4))),
}


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


def sweep(shape, dtype, device, grid, reps_cpu) -> list[dict]:
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
        candidates = [base_cfg] + [BlockConfig(*c) for c in grid[kernel] if BlockConfig(*c) != base_cfg]
        for cfg in candidates:
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


def summary(rows) -> list[str]:
    lines = []
    for (shape, kernel), group in itertools.groupby(rows, key=lambda r: (r["shape"], r["kernel"])):
        group = list(group)
        ok = [r for r in group if r["status"] == "ok"]
        base = next((r for r in group if r["default"]), None)
        if not ok or base is None or base["ms"] is None:
            lines.append(f"{shape} {kernel}: no timing")
            continue
        best = min(ok, key=lambda r: r["ms"])
        cfg = lambda r: f"({r['block_m']}, {r['block_n']}, {r['num_warps']}, {r['num_stages']})"  # noqa: E731
        lines.append(f"{shape} {kernel:8s} default {cfg(base)} {base['ms']:.3f} ms, best {cfg(best)} "
                     f"{best['ms']:.3f} ms ({base['ms'] / best['ms']:.2f}x)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--full", action="store_true", help="every combination instead of the curated list")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape, two candidates per kernel (smoke run)")
    parser.add_argument("--shape", action="append", default=None, metavar="BxHqxHkvxNxPxD")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type != "cuda" and not ops.interpreting():
        parser.error("without CUDA, set TRITON_INTERPRET=1 (and use --tiny)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape] if args.shape else (TINY if args.tiny else SHAPES)
    grid = FULL if args.full else CURATED
    if args.tiny:
        grid = {kernel: configs[:1] for kernel, configs in CURATED.items()}
        if device.type != "cuda":
            dtype = torch.float32  # the interpreter's 16-bit path is the same code upcast
    rows = []
    for shape in shapes:
        rows += sweep(shape, dtype, device, grid, reps_cpu=2 if args.tiny else 10)
    env = environment()
    for r in rows:
        r.update(env, dtype=str(dtype).replace("torch.", ""))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"blocks_{env['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(summary(rows)))
    print(f"wrote {stem}.json/.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
