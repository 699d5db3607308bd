"""Kernel benchmark of the fused op on CUDA (a wrapper of ``prefix-kernels bench``).

    PYTHONPATH=. python benchmarks/bench_attention.py --out benchmarks/results/
    PYTHONPATH=. python benchmarks/bench_attention.py --quick --out DIR
    PYTHONPATH=. python benchmarks/bench_attention.py --window --out DIR   # attention_window_<device>.*

Presets "training" + "decode" (``--quick``: "quick", two training shapes and one decode shape),
bf16 by default; fwd, bwd and fwd+bwd for training shapes, decode for decode shapes; ours against
PEFT-style attention, cat + SDPA (lower-right causal), FlexAttention, flash-attn (when installed)
and SDPA without a prefix (the floor). ``--quick`` leaves FlexAttention out unless --providers
names it (its torch.compile runs take minutes). ``--window``: the "window" preset instead (N = M =
8192, sliding windows W = 1024 and W = M; flash-attn's rows are "skipped": its window would hide the
prefix), to attention_window_<device>.*. Every provider is checked
against the fp32 reference on a cut-down shape before it is timed. Rows go to
<out>/attention_<device>.json and .csv (and .png with matplotlib). Details:
prefix_kernels/benchmarking/kernels.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_kernels.benchmarking import PROVIDERS, run_kernel_bench  # noqa: E402

QUICK_PROVIDERS = [name for name in PROVIDERS if name != "flex_attention"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="two training shapes and one decode shape")
    parser.add_argument("--window", action="store_true", help="the sliding-window preset (N = M = 8192)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark times the Triton kernels and needs a CUDA GPU "
                     "(on CPU: python -m prefix_kernels bench, or benchmarks/bench_cpu.py)")
    if args.quick and args.window:
        parser.error("--quick and --window are different presets: pass one")
    providers = args.providers or (QUICK_PROVIDERS if args.quick else None)
    preset = "window" if args.window else "quick" if args.quick else "training,decode"
    rows = run_kernel_bench(preset, device="cuda", dtype=args.dtype, out_dir=args.out, providers=providers,
                            plot=not args.no_plot, per_device_dir=False,
                            name="attention_window" if args.window else "attention")
    return 1 if any(r["provider"] == "ours" and r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
