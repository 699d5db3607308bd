"""``python -m prefix_kernels``: the ``prefix-kernels`` command line (see prefix_kernels.cli)."""

from prefix_kernels.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
