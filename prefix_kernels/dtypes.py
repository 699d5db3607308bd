"""The floating-point dtypes the kernels take, by name: one table for every command-line flag and
argument that names a dtype ("bfloat16", "bf16", "torch.bfloat16" or torch.bfloat16)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
}
# the half- and single-precision dtypes the GPU benchmarks and the kernel report run
KERNEL_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")


def dtype_name(dtype: torch.dtype) -> str:
    """The long name of a dtype of :data:`DTYPES`: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


def resolve_dtype(value: str | torch.dtype, allowed: tuple[str, ...] | None = None) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPES` (short or long, with or without "torch.") or of a
    torch.dtype, limited to the long names in ``allowed`` (default: every dtype of the table). A
    ValueError names the value and the allowed dtypes."""
    allowed = allowed or tuple(dict.fromkeys(dtype_name(d) for d in DTYPES.values()))
    dtype = value if isinstance(value, torch.dtype) else DTYPES.get(str(value).replace("torch.", ""))
    if dtype is None or dtype_name(dtype) not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {value!r}")
    return dtype
