"""``prefix-kernels`` (also ``python -m prefix_kernels``): the package's command line.

    prefix-kernels demo      prefix-tune SmolLM2-135M-Instruct on the packaged task (the default)
    prefix-kernels train     the same loop on your model and JSONL data
    prefix-kernels bench     kernel benchmark: ours against PEFT-style, cat+SDPA, the no-prefix floor
    prefix-kernels profile   torch.profiler traces + top kernels of a training step and a decode loop
    prefix-kernels check     each fast backend against the fp32 reference, plus timing
    prefix-kernels inspect   static report of the Triton launches of a shape, compiled for a GPU target (no GPU needed)
"""

from __future__ import annotations

import argparse
import sys

from prefix_kernels.cli import check, demo, inspect, profile, train


def _bench(argv) -> int:
    from prefix_kernels.benchmarking import main as bench_main

    return bench_main(argv) or 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own argparse, in prefix_kernels.benchmarking
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="prefix-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    for module in (demo, train, profile, check, inspect):
        module.add_parser(sub)
    sub.add_parser("bench", help="kernel benchmark (prefix-kernels bench --help)")
    if not argv or (argv[0] not in sub.choices and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]  # demo is the default command
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)
