"""CPU benchmark of the C++ op against the concat baselines and the no-prefix floor (a wrapper of
``prefix-kernels bench`` on CPU).

    python benchmarks/bench_cpu.py --out benchmarks/results/
    python benchmarks/bench_cpu.py --preset window-cpu --out benchmarks/results/   # window_cpu.json/.csv

The "cpu" preset (fp32): training shapes in fwd, bwd and fwd+bwd (every input requiring grad --
prefix and activations), decode shapes (N = 1 against an M-token cache, forward only).
    ours            prefix_attention(..., backend="auto"): the C++ op
    peft_style      expand + torch.cat + repeat_kv + an explicit [B, 1, N, P + M] bool mask + SDPA
    cat_sdpa        torch.cat of the prefix + SDPA with causal_lower_right (bottom-right), enable_gqa
    sdpa_no_prefix  SDPA with no prefix at all: the floor
(--impls also takes the earlier names ours, peft, concat, floor.) Every timing is the median of
--reps runs after --warmup runs on --threads threads (default 2), the runs of the implementations
interleaved so background load affects them alike. Each implementation is checked against
prefix_attention_reference (fp32) before it is timed. Results: <out>/cpu_bench.json and
<out>/cpu_bench.csv, one row per shape, mode and implementation (ratio_to_ours, ratio_to_floor).
--preset window-cpu: sliding windows instead (N = M = 2048, W = 512 and W = M; every implementation
computes the window: ours with sliding_window=W, the SDPA ones with it in their explicit mask), to
<out>/window_cpu.json and .csv.
--preset shared-prefix-cpu: shared-prefix decode: B = 64 rows, Hq = 32, Hkv = 8, N = 1, a
64-token cache per row, D = 128, one prefix of P = 1024 or 4096 shared by every row; by default
    ours                  the C++ op: the prefix part once per kv head for all rows (the cascade)
    ours_prefix_in_cache  the C++ op with the prefix copied into every row's cache (built outside the
                          timing) and no prefix: the same FLOPs, 64 x the prefix's bytes
    ours_no_cascade       the C++ op with CPUOptions(cascade=False) (the per-row path)
    cat_sdpa              torch.cat of the prefix + SDPA
to <out>/shared_prefix_cpu.json and .csv; it prints ours / ours_prefix_in_cache per shape (the
cascade pays off when it is <= 0.5: half the time of reading the prefix once per row).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_kernels import cpu  # noqa: E402
from prefix_kernels.benchmarking import PRESETS, run_kernel_bench  # noqa: E402

IMPLS = "ours,peft_style,cat_sdpa,sdpa_no_prefix"
# preset -> <out>/<stem>.json/.csv
FILE_STEMS = {"cpu": "cpu_bench", "window-cpu": "window_cpu", "shared-prefix-cpu": "shared_prefix_cpu"}
PRESET_IMPLS = {"shared-prefix-cpu": "ours,ours_prefix_in_cache,ours_no_cascade,cat_sdpa"}  # else IMPLS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/",
                        help="directory for cpu_bench.json/.csv (window-cpu: window_cpu.json/.csv)")
    parser.add_argument("--preset", choices=sorted(FILE_STEMS), default="cpu", help="the shapes (default: cpu)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated implementations (default {IMPLS}; shared-prefix-cpu: "
                             f"{PRESET_IMPLS['shared-prefix-cpu']})")
    parser.add_argument("--quick", action="store_true", help="only the preset's first training and decode shape")
    parser.add_argument("--shape", action="append", default=None, metavar="BxHqxHkvxNxMxPxD[wW]",
                        help="custom shapes instead of the preset (repeatable)")
    parser.add_argument("--plot", action="store_true", help="also write the .png (needs matplotlib)")
    args = parser.parse_args(argv)
    if not cpu.is_available():
        raise SystemExit(f"the C++ CPU op is unavailable: {cpu.unavailable_reason()}")
    shapes = args.shape
    if shapes is None and args.quick:
        preset = PRESETS[args.preset]
        shapes = [next(s for s in preset if s.kind == kind) for kind in ("training", "decode")
                  if any(s.kind == kind for s in preset)]
    impls = args.impls or PRESET_IMPLS.get(args.preset, IMPLS)
    rows = run_kernel_bench(args.preset, device="cpu", dtype=torch.float32, out_dir=args.out, providers=impls,
                            shapes=shapes, warmup=args.warmup, reps=args.reps, threads=args.threads,
                            plot=args.plot, per_device_dir=False, device_suffix=False,
                            name=FILE_STEMS[args.preset])
    for r in rows:  # shared-prefix-cpu: shared prefix against the prefix copied into every row
        if r["provider"] == "ours_prefix_in_cache" and r.get("ratio_to_ours"):
            print(f"{r['shape']}: ours (shared prefix) / ours_prefix_in_cache = {1 / r['ratio_to_ours']:.3f}")
    return 1 if any(r["provider"] == "ours" and r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
