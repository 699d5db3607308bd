"""A static report of what the Triton kernels of one attention shape cost on a GPU, with no GPU.

:func:`inspect_launches` runs the real launchers (``ops.prefix_attention_forward`` and
``prefix_attention_backward``, as the autograd Function calls them) on ``meta`` tensors of the shape
(no memory, real strides), with the launch plans made for the target GPU (``device=``: its
capability and SM count as a :class:`~prefix_kernels.kernels.plan.DeviceProps`), so they pick its
block configs, grids and split counts; the report includes those plans. Each Triton launch runs
``JITFunction.run`` in warmup mode: Triton's own binder specializes the arguments exactly as a
real launch does (16-byte pointer alignment -- a meta tensor's address is 0, as aligned as a CUDA
allocation --, integers equal to 1 or divisible by 16, constexprs) and compiles for the target
instead of launching. The launches that write device memory outside Triton (fills, casts, sums,
sorts, copies; not allocations or views) are counted by a dispatch mode.

Per compiled kernel: registers and stack from ``cuobjdump -res-usage`` of the cubin Triton
built; spill stores/loads from ``ptxas -v`` on its PTX (the ptxas Triton uses, with its flags);
shared memory from the compiled metadata; static instruction counts in the PTX (wgmma,
mma.sync, cp.async and its widths, TMA bulk copies, atomics) and of the cubin's SASS (``cuobjdump
-sass``, NOPs left out); occupancy (blocks per SM, from registers, shared memory, warps and the
block limit, as the CUDA occupancy calculator does) and waves = programs / (blocks per SM x SMs).
The counts are static (a loop body counts once). Per kernel too, its hot loops (the innermost SASS
loops with matrix instructions) and the static performance model of one iteration of each
(:mod:`prefix_kernels.perf_model`: SASS per iteration, wgmma shapes, barriers, waits, warp-instructions
per useful MFLOP, issue and shared-memory time over tensor time).

The kernels must be real JIT functions: under ``TRITON_INTERPRET=1`` they are interpreted and
cannot be compiled (``prefix-kernels inspect`` re-runs itself without it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from prefix_kernels import perf_model
from prefix_kernels.benchmarking.shapes import Shape
from prefix_kernels.dtypes import resolve_dtype
from prefix_kernels.functional import validate_inputs
from prefix_kernels.kernels.plan import DeviceProps, Needs, describe, format_plan, plan_backward, plan_forward


@dataclass(frozen=True)
class Arch:
    """What the report needs to know of a GPU (per SM unless said otherwise)."""

    name: str
    capability: tuple[int, int]
    sms: int
    smem_per_sm: int
    smem_per_block: int  # the opt-in maximum of one block
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    smem_reserved_per_block: int = 1024  # the driver's share of each block's shared memory (sm_80+)

    @property
    def props(self) -> DeviceProps:
        """The device properties the launch plans are made for."""
        return DeviceProps(capability=self.capability, num_sms=self.sms)

    @property
    def arch_number(self) -> int:
        return 10 * self.capability[0] + self.capability[1]


ARCHS = {
    "sm_80": Arch("sm_80", (8, 0), sms=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),  # A100
    "sm_90": Arch("sm_90", (9, 0), sms=132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),  # H100 SXM
}
# Allocations and metadata: no kernel runs for these.
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_local_scalar_dense"}

def resolve_arch(arch: str) -> Arch:
    """The Arch of "sm_90", "sm90" or "90"."""
    number = re.fullmatch(r"(?:sm_?)?(\d+)", str(arch).lower())
    key = f"sm_{number.group(1)}" if number else None
    if key not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[key]


class _DeviceWrites(TorchDispatchMode):
    """Records the ATen ops that would launch a device kernel (not allocations, views, metadata)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        writes = func._schema.is_mutable or any(isinstance(x, torch.Tensor) for x in tree_leaves(out))
        if func.namespace == "aten" and not func.is_view and name not in _NO_LAUNCH and writes:
            self.ops.append(name)
        return out


class _TargetDriver:
    """Stands in for Triton's CUDA driver: the current target is the inspected GPU. One device id
    per arch, so each arch gets its own binder (and kernel cache) in every JIT function."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _compiling_for(arch: Arch, launches: list):
    """Triton's driver targets ``arch``; each launch ``kernel[grid](...)`` compiles as Triton's warmup does
    (the same binder and compile as a launch, without running) and appends (grid, CompiledKernel)
    to ``launches``, with the launch's constexprs and scalar arguments (:func:`_launch_values`)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    real_run = JITFunction.run

    def run(kernel, *args, grid, warmup, **kwargs):  # kernel[grid](...) and wrappers (heuristics) come here
        if warmup:
            return real_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        try:
            compiled = real_run(kernel, *args, grid=grid, warmup=True, **kwargs)  # binds, specializes, compiles
        except Exception as e:
            raise RuntimeError(f"{kernel.__name__} does not compile for {arch.name}: {e}") from e
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        shape = grid(bound) if callable(grid) else grid
        launches.append((tuple(shape) + (1,) * (3 - len(shape)), compiled, _launch_values(kernel, bound)))
        return compiled

    saved = dict(vars(driver))  # its attributes differ between Triton versions; reading .active may create one
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch.arch_number, 32)))
    try:
        with warnings.catch_warnings(), mock.patch.object(JITFunction, "run", run):
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9, on every compile
            yield
    finally:
        vars(driver).clear()
        vars(driver).update(saved)


def _launch_values(kernel, bound: dict) -> tuple[dict, dict]:
    """(constexprs with defaults filled in, scalar arguments) of a launch, JSON-ready: what the
    performance model reads the tile config from. Tensors are left out."""
    constants, scalars = {}, {}
    for param in kernel.params:
        value = bound.get(param.name, param.default if param.has_default else None)
        if param.is_constexpr:
            plain = value is None or isinstance(value, (bool, int, float, str))
            constants[param.name] = value if plain else str(value)
        elif isinstance(value, (bool, int, float)):
            scalars[param.name] = value
    return constants, scalars


GRADS = ("q", "kv", "prefix")  # the gradient subsets the backward specializes on: dq, dk/dv, the prefix's


def resolve_grads(grads: str | tuple | list | frozenset) -> tuple[str, ...]:
    """The gradients a backward computes, in GRADS order, from "all", "prefix", "prefix,q" or a
    collection of GRADS names: the subset the autograd wrapper asks ``prefix_attention_backward``
    for (``need_dq``, ``need_dkdv``, ``need_dprefix``), which compiles its own kernels. "prefix" is
    layer 0 of a frozen model (its q, k, v come from frozen weights); "all" every later layer."""
    names = GRADS if grads == "all" else grads.split(",") if isinstance(grads, str) else grads
    names = {n.strip() for n in names}
    if not names or not names <= set(GRADS):
        raise ValueError(f"grads must be 'all' or a comma-separated subset of {', '.join(GRADS)}, got {grads!r}")
    return tuple(g for g in GRADS if g in names)


def _inputs(shape: Shape, dtype: torch.dtype, key_padding_mask: bool, prefix_bank: int):
    """Meta tensors laid out as the benchmark lays them out (benchmarking.shapes.make_inputs):
    q a transposed view of [B, N, Hq, D]; k/v the same of [B, M, Hkv, D], or a contiguous
    [B, Hkv, M, D] decode cache; the prefix [Hkv, P, D], or a bank [T, Hkv, P, D] with ids [B]."""
    s = shape

    def empty(*size, dt=dtype):
        return torch.empty(*size, device="meta", dtype=dt)

    q = empty(s.B, s.N, s.Hq, s.D).transpose(1, 2)
    if s.kind == "decode":
        k, v = empty(s.B, s.Hkv, s.M, s.D), empty(s.B, s.Hkv, s.M, s.D)
    else:
        k, v = (empty(s.B, s.M, s.Hkv, s.D).transpose(1, 2) for _ in range(2))
    bank = (prefix_bank,) if prefix_bank else ()
    pk, pv = empty(*bank, s.Hkv, s.P, s.D), empty(*bank, s.Hkv, s.P, s.D)
    mask = empty(s.B, s.M, dt=torch.bool) if key_padding_mask else None
    ids = empty(s.B, dt=torch.int64) if prefix_bank else None
    return q, k, v, pk, pv, mask, ids


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@lru_cache(maxsize=None)
def _ptxas(arch_number: int) -> tuple[str, list[str]]:
    """The ptxas Triton compiles with for this arch, and the flags of its make_cubin that change
    code generation (-lineinfo; --regAllocOptLevel=2, Triton's workaround for ptxas 13)."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        path = nvidia.get_ptxas(arch_number).path
    except (AttributeError, TypeError):
        import triton

        path = triton.knobs.nvidia.ptxas.path
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    major = int(re.search(r"release (\d+)\.", version).group(1))
    return path, ["-lineinfo", *(["--regAllocOptLevel=2"] if major >= 13 else [])]


def _resources(compiled, arch: Arch, workdir: Path) -> dict:
    """Registers and stack of the cubin; spill stores/loads of a ptxas -v run on its PTX; the static
    number of SASS instructions in the cubin (cuobjdump -sass, NOPs left out: a loop body counts once)."""
    cubin = workdir / f"{compiled.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    regs, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    ptx = workdir / f"{compiled.name}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    ptxas, flags = _ptxas(arch.arch_number)
    gpu = f"sm_{arch.arch_number}{'a' if arch.arch_number >= 90 else ''}"
    log = subprocess.run([ptxas, "-v", *flags, f"--gpu-name={gpu}", str(ptx), "-o", str(workdir / "rerun.o")],
                         capture_output=True, text=True, check=True).stderr
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    rerun_regs = int(re.search(r"Used (\d+) registers", log).group(1))
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    instructions = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?!NOP\b)[A-Z@]", sass))  # static, without the NOP padding
    out = dict(registers=regs, stack_bytes=stack, spill_bytes=stores, spill_load_bytes=loads,
               sass_instructions=instructions)
    if rerun_regs != regs:  # the re-run's spills would then not be the cubin's: say so
        out["ptxas_rerun_registers"] = rerun_regs
    return out


def _ptx_counts(ptx: str) -> dict:
    """Static instruction counts in the PTX."""
    widths = sorted({int(w, 0) for w in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)",
                                                     ptx)})
    return dict(
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)),
        cp_async_widths=widths,
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        atomics=len(re.findall(r"\b(?:atom|red)\.", ptx)),
    )


def occupancy(arch: Arch, registers: int, num_warps: int, shared_bytes: int) -> tuple[int, str]:
    """(resident blocks per SM, the limit that binds), as the CUDA occupancy calculator computes
    it: registers are allocated per warp in units of 256 from 4 SM sub-partitions; shared memory
    per block is rounded up to 128 bytes plus the driver's reserve."""
    warp_regs = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (arch.regs_per_sm // 4 // warp_regs) * 4 // num_warps
    block_smem = math.ceil(shared_bytes / 128) * 128 + arch.smem_reserved_per_block
    by_smem = arch.smem_per_sm // block_smem if shared_bytes <= arch.smem_per_block else 0
    limits = {"registers": by_regs, "shared": by_smem, "warps": arch.max_warps // num_warps,
              "blocks": arch.max_blocks}
    binding = min(limits, key=limits.get)
    return limits[binding], binding


def _hot_loops(compiled, values: dict, workdir: Path) -> list[dict]:
    """:func:`perf_model.hot_loop_report` of the cubin that :func:`_resources` wrote, disassembled
    by ``nvdisasm -gi`` (branch labels, and the source line each loop comes from: Triton compiles
    with -lineinfo)."""
    cubin = workdir / f"{compiled.name}.cubin"
    sass = subprocess.run([_tool("nvdisasm"), "-gi", "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return perf_model.hot_loop_report(sass, compiled.name, compiled.metadata.num_warps, values, loop_roles())


def loop_roles() -> list[tuple[str, int, int, str]]:
    """perf_model's loop roles: the source lines of the kernel helpers whose loops do other work per
    tile than their kernel's others -- the backward's dq loops (3 matmuls per tile, where its dk/dv
    loops do 4)."""
    import inspect as pyinspect

    from prefix_kernels.kernels import backward

    lines, first = pyinspect.getsourcelines(backward._dq_blocks.fn)
    return [(Path(backward.__file__).name, first, first + len(lines), "dq")]


def _kernel_report(phase: str, grid: tuple, compiled, values: tuple[dict, dict], arch: Arch, workdir: Path) -> dict:
    meta = compiled.metadata
    programs = grid[0] * grid[1] * grid[2]
    res = _resources(compiled, arch, workdir)
    blocks, limit = occupancy(arch, res["registers"], meta.num_warps, meta.shared)
    constants, scalars = values
    return dict(
        phase=phase, name=compiled.name, grid=list(grid), programs=programs, num_warps=meta.num_warps,
        num_stages=meta.num_stages, **res, shared_bytes=meta.shared, **_ptx_counts(compiled.asm["ptx"]),
        blocks_per_sm=blocks, occupancy_limit=limit,
        waves=round(programs / (blocks * arch.sms), 2) if blocks else None,
        constants=constants, hot_loops=_hot_loops(compiled, {**scalars, **constants}, workdir),
    )


def inspect_launches(shape: str | Shape, dtype: str | torch.dtype = "bfloat16", arch: str = "sm_90", *,
                     key_padding_mask: bool = False, prefix_bank: int = 0, deterministic: bool = False,
                     sliding_window: int | None = None, softcap: float | None = None, sinks: bool = False,
                     grads: str | tuple = "all") -> dict:
    """Compiles every Triton launch of a forward and a backward of ``shape`` (``BxHqxHkvxNxMxPxD``
    or a :class:`Shape`) for ``arch`` and reports them. Causal, all gradients unless ``grads``; by default a
    shared prefix and no padding mask, as the benchmark runs it; ``sliding_window``, ``softcap`` and
    ``sinks`` (per-head sink logits, with their gradient) turn the op's features on; ``grads``
    (:func:`resolve_grads`: "all", "prefix", "prefix,q", ...) the gradients the backward computes. N = 1: the decode forward only
    (phase "decode", no backward: generation does not train).

    Returns ``{"arch", "dtype", "shape", "grads", "launches": {"forward": int, "backward": int},
    "aten_launches": {"forward": [op names], "backward": [...]}, "kernels": [{"phase", "name",
    "grid", "programs", "num_warps", "num_stages", "registers", "stack_bytes", "spill_bytes",
    "spill_load_bytes", "shared_bytes", "wgmma", "mma_sync", "cp_async", "cp_async_widths",
    "tma", "atomics", "sass_instructions", "blocks_per_sm", "occupancy_limit", "waves", "constants",
    "hot_loops"}], "perf_model": {the model's constants}}``; ``launches`` counts the Triton kernels and
    the ATen ops that launch a device kernel. ``constants``: the launch's constexprs (block sizes, head
    dims, flags). ``hot_loops``: per hot loop of the kernel's SASS, the static performance model of
    one iteration (:mod:`prefix_kernels.perf_model`: "head", "tail", "source", "sass", "mma",
    "barriers", "wgmma_waits", "wgmma_fences", "warp_instructions", "useful_flops",
    "executed_mma_flops", "smem_operand_bytes", "issue_clocks", "smem_clocks", "tensor_flop_per_clock",
    "tensor_clocks", "executed_per_useful", "warp_instructions_per_useful_mflop", "issue_per_tensor",
    "smem_per_tensor"); empty for a kernel without matrix instructions in a loop.
    """
    from triton.runtime.jit import JITFunction

    from prefix_kernels import ops
    from prefix_kernels.kernels.forward import prefix_attention_fwd_kernel

    if os.environ.get("TRITON_INTERPRET") == "1" or not isinstance(prefix_attention_fwd_kernel, JITFunction):
        raise RuntimeError("inspect compiles the real Triton kernels: run it in a process without TRITON_INTERPRET=1 "
                           "(prefix-kernels inspect re-runs itself without it)")
    shape = Shape.parse(shape) if isinstance(shape, str) else shape
    if shape.W is not None:  # "...wW": the shape's own window
        if sliding_window is not None and sliding_window != shape.W:
            raise ValueError(f"the shape's window w{shape.W} and sliding_window={sliding_window} disagree")
        sliding_window = shape.W
    target, dtype, grads = resolve_arch(arch), resolve_dtype(dtype), resolve_grads(grads)
    if prefix_bank < 0:
        raise ValueError(f"prefix_bank must be >= 0 (0: one shared prefix), got {prefix_bank}")
    q, k, v, pk, pv, mask, ids = _inputs(shape, dtype, key_padding_mask, prefix_bank)
    # The op's own checks (head dim, GQA, causal M >= N), on one prefix: prefix_ids of meta tensors have no values.
    scale, _ = validate_inputs(q, k, v, pk[0] if prefix_bank else pk, pv[0] if prefix_bank else pv, causal=True,
                               scale=None, key_padding_mask=mask, prefix_ids=None)
    phases = [("decode" if shape.N == 1 else "forward", [], _DeviceWrites())]
    if shape.N > 1:
        phases.append(("backward", [], _DeviceWrites()))
    if not prefix_bank:  # the launchers take a bank [T, Hkv, P, D]; a shared prefix is a bank of one (a view)
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)
    sink_logits = torch.empty(shape.Hq, device="meta", dtype=torch.float32) if sinks else None
    features = dict(sliding_window=sliding_window, softcap=softcap, sinks=sink_logits)
    with _compiling_for(target, phases[0][1]), phases[0][2]:
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, mask, ids, True, scale, device=target.props,
                                                **features)
    problem = ops.problem(q, k, v, pk, mask, ids, True, scale, sliding_window, softcap, sink_logits)
    plans = {"forward": plan_forward(problem, target.props)}
    if shape.N > 1:
        needs = Needs(dq="q" in grads, dkdv="kv" in grads, dprefix="prefix" in grads and shape.P > 0, dsinks=sinks,
                      deterministic=deterministic)
        plans["backward"] = plan_backward(problem, needs, target.props)
        with _compiling_for(target, phases[1][1]), phases[1][2]:
            ops.prefix_attention_backward(torch.empty_like(out), q, k, v, pk, pv, out, lse, mask, ids, True, scale,
                                          need_dq="q" in grads, need_dkdv="kv" in grads,
                                          need_dprefix="prefix" in grads, deterministic=deterministic,
                                          need_dsinks=sinks, device=target.props, **features)
    report = {"arch": target.name, "dtype": str(dtype).replace("torch.", ""), "shape": shape.name, "grads": list(grads),
              "launches": {"forward": 0, "backward": 0}, "aten_launches": {"forward": [], "backward": []},
              "perf_model": perf_model.describe(), "kernels": [],
              "plans": {phase: describe(plan) for phase, plan in plans.items()},
              "plan_text": {phase: format_plan(plan) for phase, plan in plans.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for phase, launches, writes in phases:
            key = "backward" if phase == "backward" else "forward"
            report["launches"][key] = len(launches) + len(writes.ops)
            report["aten_launches"][key] = writes.ops
            report["kernels"] += [_kernel_report(phase, grid, compiled, values, target, Path(tmp))
                                  for grid, compiled, values in launches]
    return report


def format_report(report: dict) -> str:
    """The report as a table, one row per launch, and the launch counts."""
    cols = [("phase", "phase"), ("kernel", "name"), ("grid", "grid"), ("progs", "programs"), ("warps", "num_warps"),
            ("stages", "num_stages"), ("regs", "registers"), ("spill", "spill_bytes"), ("smem KB", "shared_bytes"),
            ("blk/SM", "blocks_per_sm"), ("waves", "waves"), ("wgmma", "wgmma"), ("mma.sync", "mma_sync"),
            ("cp.async", "cp_async"), ("tma", "tma"), ("atomics", "atomics"), ("sass", "sass_instructions")]

    def cell(kernel, key):
        value = kernel[key]
        if key == "grid":
            return "x".join(map(str, value))
        if key == "shared_bytes":
            return f"{value / 1024:.1f}"
        if key == "spill_bytes":
            return f"{value}/{kernel['spill_load_bytes']}"
        if key == "blocks_per_sm":
            return f"{value} ({kernel['occupancy_limit']})"
        return str(value)

    rows = [[head for head, _ in cols]] + [[cell(k, key) for _, key in cols] for k in report["kernels"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    grads = report.get("grads", list(GRADS))
    lines = [f"{report['shape']} {report['dtype']} on {report['arch']} ({ARCHS[report['arch']].sms} SMs), "
             f"gradients: {'all' if len(grads) == len(GRADS) else ','.join(grads)}; spill = stores/loads bytes, waves at the achievable occupancy"]
    lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    for phase in ("forward", "backward") if any(k["phase"] == "backward" for k in report["kernels"]) else ("forward",):
        aten = report["aten_launches"][phase]
        triton_launches = report["launches"][phase] - len(aten)
        lines.append(f"device launches per {phase}: {report['launches'][phase]} "
                     f"({triton_launches} Triton{', ATen: ' + ', '.join(aten) if aten else ''})")
    lines += [text for text in report.get("plan_text", {}).values()]
    lines += format_hot_loops(report)
    return "\n".join(lines)


def format_hot_loops(report: dict) -> list[str]:
    """The hot-loop table: one row per hot loop of each kernel, per iteration (perf_model)."""
    cols = ["phase", "kernel", "loop", "sass", "mma (per warpgroup)", "bar", "wait", "useful MFLOP", "exec/useful",
            "wi/MFLOP", "issue/tensor", "smem/tensor"]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    rows = [cols]
    for k in report["kernels"]:
        for lp in k.get("hot_loops", []):
            rows.append([k["phase"], k["name"], perf_model.loop_label(lp["source"]), str(lp["sass"]),
                         perf_model.mma_summary(lp["mma"]), str(lp["barriers"]), str(lp["wgmma_waits"]),
                         num(lp["useful_flops"] and lp["useful_flops"] / 1e6, ".3f"),
                         num(lp["executed_per_useful"], ".2f"), num(lp["warp_instructions_per_useful_mflop"], ".0f"),
                         num(lp["issue_per_tensor"], ".2f"), num(lp["smem_per_tensor"], ".2f")])
    if len(rows) == 1:
        return []
    model = report.get("perf_model") or perf_model.describe()
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [f"hot loops, per iteration (static; per SM: {model['issue_per_clock']} warp-instr/clk, "
             f"{model['tensor_flop_per_clock']['BF16']} bf16 FLOP/clk, {model['smem_bytes_per_clock']} B/clk of "
             f"wgmma operands from shared memory; > 1: that resource, not the tensor cores, sets the pace)"]
    lines += ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return lines


def run_metadata() -> dict:
    """Where a report comes from, for a result file: no device (a static compile), the versions of
    torch, Triton and its ptxas, the package's git commit (``git_dirty``: its tree differs from it)
    and the date."""
    import datetime

    import triton

    package = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(package), *args], capture_output=True,
                                  text=True, check=True).stdout.strip()  # no index refresh: read only
        except (OSError, subprocess.CalledProcessError):
            return None

    sha = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", str(package))
    try:
        version = subprocess.run([_ptxas(90)[0], "--version"], capture_output=True, text=True).stdout
        ptxas = re.search(r"release ([\d.]+)", version).group(1)
    except (OSError, AttributeError, subprocess.CalledProcessError):
        ptxas = None
    return dict(device="none: static compile for the target on the CPU", torch=torch.__version__,
                triton=triton.__version__, ptxas=ptxas, git_sha=sha, git_dirty=bool(dirty) if sha else None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def inspect_in_subprocess(requests: list[dict], timeout: float = 1800) -> list[dict]:
    """``inspect_launches(**request)`` for each request, in one fresh interpreter without
    TRITON_INTERPRET (kernels imported under the interpreter cannot be compiled), sharing its
    compile caches. A request that raises gives ``{"error": message, "error_type": "ValueError"}``
    (the exception's type name) in its place."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "requests.json", Path(tmp) / "reports.json"
        spec.write_text(json.dumps(requests))
        code = "import sys; from prefix_kernels.inspection import _serve; _serve(sys.argv[1], sys.argv[2])"
        proc = subprocess.run([sys.executable, "-c", code, str(spec), str(out)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the inspect subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _serve(spec: str, out: str) -> None:
    """The subprocess of :func:`inspect_in_subprocess`."""
    reports = []
    for request in json.loads(Path(spec).read_text()):
        try:
            reports.append(inspect_launches(**request))
        except Exception as e:  # reported per request: the others still run
            reports.append({"error": str(e), "error_type": type(e).__name__})
    Path(out).write_text(json.dumps(reports))
