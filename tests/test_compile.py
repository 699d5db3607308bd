"""Compiles the real (non-interpreted) kernels to cubin for sm_80 and sm_90 with no GPU, using the
launch configs the launchers would use, so CI catches a kernel that would not build on a GPU (or
needs more shared memory than the chip has).

The compilation runs in a subprocess without TRITON_INTERPRET (under the interpreter, @triton.jit
gives interpreted functions that cannot be compiled): ``python tests/test_compile.py 90 fp16 64``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from prefix_kernels import ops
from prefix_kernels.kernels.backward import delta_kernel, dkdv_kernel, dprefix_kernel, dq_kernel
from prefix_kernels.kernels.configs import BlockConfig, head_dim_padded, kernel_configs
from prefix_kernels.kernels.decode import (
    combine_num_warps, decode_block_rows, decode_config, prefix_attention_decode_combine_kernel,
    prefix_attention_decode_kernel,
)
from prefix_kernels.kernels.forward import prefix_attention_fwd_kernel
from prefix_kernels.ops import _dtype_flags

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover - older triton
    GPUTarget = None

SMEM_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # A100, H100 per-block opt-in maximum
TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
ELEMENT_POINTERS = {"Q", "K", "V", "PK", "PV", "Out", "DO", "DQ", "DK", "DV"}
POINTER_TYPES = {"PREFIX_IDS": "*i32", "ROW_ORDER": "*i32", "KPM": "*u8", "LSE": "*fp32",
                 "ACC_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32"}
FLOAT_SCALARS = {"scale", "qk_scale"}


def _signature(kernel, dtype):
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ELEMENT_POINTERS:
            sig[p.name] = "*" + TL_NAMES[dtype]
        elif p.name in POINTER_TYPES:
            sig[p.name] = POINTER_TYPES[p.name]
        elif p.name in ("Delta", "DPK", "DPV"):
            sig[p.name] = acc
        elif p.name in FLOAT_SCALARS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _compile(kernel, dtype, capability, cfg, block_m, block_n, head_dim, **flags):
    constexprs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_padded(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        **_dtype_flags(dtype), **flags,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, dtype), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert "cubin" in compiled.asm
    assert compiled.metadata.shared <= SMEM_BYTES[capability], (
        f"{kernel.__name__} needs {compiled.metadata.shared} B of shared memory on sm_{capability}"
    )


# Each combo costs 30-80 s of CPU on a cold cache: a spread over archs, dtypes and head dims.
# fp64 on sm_90 is here because tl.dot on fp64 hit an assertion in Triton 3.6 there (H200, 2026-11-26).
COMBOS = [(90, torch.float16, 64), (80, torch.bfloat16, 128), (90, torch.float16, 80), (90, torch.float32, 64),
          (90, torch.float64, 16)]


def compile_all(capability, dtype, head_dim):
    cfgs = kernel_configs(head_dim, dtype, (capability // 10, capability % 10))
    flags = dict(IS_CAUSAL=True, HAS_KPM=True, HAS_PREFIX_IDS=True)
    f, dq, dkdv = cfgs.forward, cfgs.dq, cfgs.dkdv
    _compile(prefix_attention_fwd_kernel, dtype, capability, f, f.block_m, f.block_n, head_dim, **flags)
    _compile(delta_kernel, dtype, capability, dq, dq.block_m, dq.block_n, head_dim)
    _compile(dq_kernel, dtype, capability, dq, dq.block_m, dq.block_n, head_dim, **flags)
    _compile(dkdv_kernel, dtype, capability, dkdv, dkdv.block_m, dkdv.block_n, head_dim, IS_CAUSAL=True, HAS_KPM=True)
    _compile(dprefix_kernel, dtype, capability, dkdv, dkdv.block_m, dkdv.block_n, head_dim,
             HAS_PREFIX_IDS=True, DETERMINISTIC=head_dim % 128 != 0)
    if dtype != torch.float64:  # fp64 stays on the general forward (ops.prefix_attention_forward)
        # The largest decode tile (N * G = 64 rows), split epilogue; the single-split epilogue is the forward's.
        rows = decode_block_rows(ops.DECODE_MAX_ROWS)
        dec = decode_config(head_dim_padded(head_dim), dtype.itemsize, rows, (capability // 10, capability % 10))
        _compile(prefix_attention_decode_kernel, dtype, capability, dec, None, dec.block_n, head_dim,
                 BLOCK_R=rows, SPLIT=True, **flags)
        combine = BlockConfig(0, 0, num_warps=combine_num_warps(64, head_dim_padded(head_dim)), num_stages=1)
        _compile(prefix_attention_decode_combine_kernel, dtype, capability, combine, None, None, head_dim, BLOCK_S=64)


@pytest.mark.skipif(GPUTarget is None, reason="triton without GPUTarget")
@pytest.mark.parametrize("capability, dtype, head_dim", COMBOS,
                         ids=[f"sm{c}-{TL_NAMES[d]}-d{h}" for c, d, h in COMBOS])
def test_kernels_compile_for_gpu(capability, dtype, head_dim):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, str(capability), TL_NAMES[dtype], str(head_dim)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


if __name__ == "__main__":
    by_name = {v: k for k, v in TL_NAMES.items()}
    compile_all(int(sys.argv[1]), by_name[sys.argv[2]], int(sys.argv[3]))
    print("compiled", *sys.argv[1:])
