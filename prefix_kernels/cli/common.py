"""What the subcommands share: the help for the run folder every output goes under (named by
prefix_kernels.runs), user errors (bad arguments, data or paths) printed as one line
``prefix-kernels <command>: error: ...`` with exit status 2 -- tracebacks are left for bugs -- and
the generations listing of demo and train."""

from __future__ import annotations

import argparse
import functools
import sys

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each option's default, where it has one worth showing: not a flag's False, not
    None (its help says what happens then), not where the help already names the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not text or not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class UserError(Exception):
    """A mistake of the user's (an argument, the data, a path): one line, exit status 2."""


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str | None) -> str:
    """``--device``: cpu, cuda, cuda:N or mps, and present on this machine (None: cuda when there
    is a GPU, else cpu). A UserError says which part does not hold."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    require(device is not None and device.type in DEVICE_TYPES,
            f"--device {name!r}: not a device (expected cpu, cuda, cuda:N or mps)")
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {name}: no CUDA GPU is available here (torch "
                                           f"{torch.__version__}{'' if torch.version.cuda else ', built without CUDA'})")
        count = torch.cuda.device_count()
        require(device.index is None or device.index < count,
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps":
        require(torch.backends.mps.is_available(), f"--device {name}: no Apple MPS device is available here")
    return name


def add_threads_argument(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads torch uses (default: torch's, which OMP_NUM_THREADS sets; on a loaded machine "
                        "--threads 1 can be several times faster)")


def apply_threads(threads: int | None) -> None:
    """``--threads``: torch.set_num_threads (None: leave torch's choice)."""
    import torch

    if threads is None:
        return
    require(threads >= 1, f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def out_help(command: str) -> str:
    return f"folder for everything this writes (default: runs/{command}-<date>-<time>/)"


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def user_errors(command: str):
    """Decorates a subcommand's ``run(args)``: a UserError becomes one line on stderr and status 2."""
    def wrap(run):
        @functools.wraps(run)
        def guarded(args):
            try:
                return run(args)
            except UserError as exc:
                print(f"prefix-kernels {command}: error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:  # Ctrl-C where the command does not handle it itself
                print(f"prefix-kernels {command}: interrupted", file=sys.stderr)
                return 130
        return guarded
    return wrap


def print_generations(title: str, prompts: list[str], texts: list[str]) -> None:
    """Each prompt's first line and its completion."""
    print(f"\n{title}")
    for prompt, text in zip(prompts, texts):
        print(f"  {prompt.splitlines()[0] if prompt.strip() else repr(prompt)}\n    -> {text!r}")


def print_side_by_side(title: str, prompts: list[str], texts: dict[str, list[str]]) -> None:
    """Each prompt's first line and, under it, one completion per model (``texts``: name -> completions)."""
    print(f"\n{title}")
    width = max(map(len, texts), default=0)
    for i, prompt in enumerate(prompts):
        print(f"  {prompt.splitlines()[0] if prompt.strip() else repr(prompt)}")
        for name, completions in texts.items():
            print(f"    {name:<{width}} -> {completions[i]!r}")
