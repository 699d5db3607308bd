"""``prefix-kernels`` (also ``python -m prefix_kernels``): the package's command line.

    prefix-kernels demo      prefix-tune SmolLM2-135M-Instruct on the packaged task (minutes on a CPU)
    prefix-kernels train     the same loop on your model and JSONL data
    prefix-kernels bench     kernel benchmark: ours against PEFT-style, cat+SDPA, the no-prefix floor
    prefix-kernels profile   torch.profiler traces + top kernels of a training step and a decode loop
    prefix-kernels check     each fast backend against the fp32 reference, plus timing
    prefix-kernels inspect   static report of the Triton launches of a shape, compiled for a GPU target (no GPU needed)

Start with `prefix-kernels demo` (`prefix-kernels demo --tiny`: a smoke run in seconds);
`prefix-kernels <command> --help` lists a command's options and their defaults.
"""

from __future__ import annotations

import argparse
import sys

from prefix_kernels.cli import check, demo, inspect, profile, train
from prefix_kernels.cli.common import HelpFormatter


def _bench(argv) -> int:
    from prefix_kernels.benchmarking import main as bench_main

    return bench_main(argv) or 0


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser shows its options' defaults (see HelpFormatter)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def main(argv=None) -> int:
    """A bare ``prefix-kernels`` prints the help and exits 0: it is how one discovers the commands,
    not a mistake (a demo that trains for minutes is no answer to it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own argparse, in prefix_kernels.benchmarking
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="prefix-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser, required=True)
    for module in (demo, train, profile, check, inspect):
        module.add_parser(sub)
    sub.add_parser("bench", help="kernel benchmark: ours against PEFT-style, cat+SDPA, the no-prefix floor "
                                 "(prefix-kernels bench --help)")
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)
