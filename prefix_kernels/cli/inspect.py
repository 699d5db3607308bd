"""``prefix-kernels inspect``: compiles every Triton launch of a forward and a backward of one shape
for a GPU target, with no GPU, and prints per kernel the grid, waves, warps/stages, registers,
spills, shared memory and instruction counts, the device launches per forward/backward
(:mod:`prefix_kernels.inspection`), and a table of the kernels' hot loops under the static
performance model (:mod:`prefix_kernels.perf_model`). ``--json`` writes all of it, with the
versions and git commit it was made with.

    prefix-kernels inspect --arch sm_90 --dtype bfloat16 --shape 4x32x8x2048x2048x128x128 --json report.json
"""

from __future__ import annotations

import json
import os
import sys


def run(args) -> int:
    from prefix_kernels import inspection

    request = dict(shape=args.shape, dtype=args.dtype, arch=args.arch, key_padding_mask=args.mask,
                   prefix_bank=args.bank, deterministic=args.deterministic, sliding_window=args.window,
                   softcap=args.softcap, sinks=args.sinks, grads=args.grads)
    try:
        inspection.resolve_arch(args.arch), inspection.resolve_dtype(args.dtype)
        inspection.Shape.parse(args.shape), inspection.resolve_grads(args.grads)
    except ValueError as e:
        print(f"prefix-kernels inspect: {e}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels cannot be compiled: a fresh process
        report = inspection.inspect_in_subprocess([request])[0]
    else:
        try:
            report = inspection.inspect_launches(**request)
        except (ValueError, RuntimeError) as e:
            report = {"error": str(e), "error_type": type(e).__name__}
    if "error" in report:
        print(f"prefix-kernels inspect: {report['error']}", file=sys.stderr)
        return 2 if report["error_type"] == "ValueError" else 1
    print(inspection.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, **inspection.run_metadata()}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="static report of the Triton launches of a shape, compiled for a GPU target "
                                       "(no GPU needed)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, help="BxHqxHkvxNxMxPxD[wW], e.g. 8x16x4x1024x1024x64x128 (N=1: decode; "
                                                  "wW: a sliding window of W keys, as --window W)")
    p.add_argument("--arch", default="sm_90", help="sm_80 or sm_90 (default sm_90)")
    p.add_argument("--dtype", default="bfloat16", help="float16, bfloat16, float32 or float64 (default bfloat16)")
    p.add_argument("--mask", action="store_true", help="with a key padding mask (default: none, as the benchmark)")
    p.add_argument("--bank", type=int, default=0, metavar="T",
                   help="a bank of T prefixes chosen by prefix_ids (default 0: one shared prefix)")
    p.add_argument("--deterministic", action="store_true", help="the deterministic prefix-gradient reduction")
    p.add_argument("--window", type=int, default=None, metavar="W", help="with a sliding window of W keys")
    p.add_argument("--softcap", type=float, default=None, metavar="C", help="with logit softcapping at C")
    p.add_argument("--sinks", action="store_true", help="with per-head attention sinks (and their gradient)")
    p.add_argument("--grads", default="all", metavar="G",
                   help="the gradients the backward computes: all, or a comma-separated subset of q, kv, prefix "
                        "(prefix: layer 0 of a frozen model, whose q, k, v need none); each subset compiles its own "
                        "kernels")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(run=run)
