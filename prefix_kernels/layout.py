"""The memory layout of the attention output, stated once.

``out [B, Hq, N, Dv]`` is laid out like ``q``: HF's attention hands the op ``q`` as a transposed
view of ``[B, N, H, D]`` storage, and an output in that same order transposes back to
``[B, N, H, Dv]`` for the output projection without a copy. The C++ op allocates its output by this
rule (csrc/prefix_attention.cpp, ``empty_out``) and the fake implementations (cpu.py) state it
without running the op; tests/test_cpu_layout.py checks that the two agree.
"""

from __future__ import annotations

import torch


def new_out(q: torch.Tensor, head_dim_v: int, contiguous: bool = False) -> torch.Tensor:
    """An uninitialized ``[B, Hq, N, head_dim_v]`` tensor of q's dtype and device.

    ``contiguous=False``: laid out like q -- ``torch.empty_like(q)`` when ``head_dim_v`` is q's
    head dim, else q's dims ordered by stride, largest first (ties keep the dims' order), with the
    head dim of size ``head_dim_v``. ``contiguous=True``: row-major, whatever q's layout (a layout a
    fake implementation can state without seeing real strides).
    """
    shape = (*q.shape[:3], head_dim_v)
    if contiguous:
        return q.new_empty(shape)
    if head_dim_v == q.shape[3]:
        return torch.empty_like(q)
    order = sorted(range(4), key=lambda d: -q.stride(d))  # stable: ties keep the dims' order
    return q.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(4)])
