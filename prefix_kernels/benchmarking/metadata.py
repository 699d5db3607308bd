"""Where the benchmark's numbers come from: the fields every row carries (:data:`ENV_COLUMNS`)."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

ENV_COLUMNS = ("device", "device_type", "torch", "triton", "transformers", "flash_attn", "python",
               "git_sha", "date", "threads", "cpu_build")


def _git_sha() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and sha and all(c in "0123456789abcdef" for c in sha) else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device | str | None = None) -> dict:
    """Where the numbers come from: device name, versions, git SHA (None outside a checkout), UTC
    date, torch's thread count, and on CPU the C++ op's build flavour."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    env = dict(device=device_name(device),
               device_type=device.type, torch=torch.__version__, triton=_version("triton"),
               transformers=_version("transformers"), flash_attn=_version("flash-attn") or _version("flash_attn"),
               python=platform.python_version(), git_sha=_git_sha(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               threads=torch.get_num_threads(), cpu_build=None)
    if device.type == "cpu":
        from prefix_kernels import cpu

        env["cpu_build"] = cpu.build_info()
    return env


def device_name(device: torch.device | str) -> str:
    """The ``device`` column of a run on ``device`` (the GPU's name, or the CPU model)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
