"""A static performance model of a kernel's hot loops, from its SASS: the one place its constants live.

A *loop* is a backward branch in the SASS (a ``BRA`` whose target is at or before it): its body is
every instruction from the target to the branch. The *hot* loops are the innermost loops that hold
matrix instructions (``HGMMA``, sm_90's wgmma, or ``HMMA``, mma.sync): a loop holding one of them
and no smaller such loop. All counts are static (each instruction of the body once, both sides of
an ``if`` inside it included; code the compiler moved out of the [target, branch] range is not),
per iteration of the loop, per CTA. The SASS comes from ``nvdisasm -gi`` of the cubin
(prefix_kernels.inspection), whose line info names each loop's source line and its callers.

Per hot loop: SASS instructions (NOPs left out), the matrix instructions with their m x n x k shapes
(wgmma: whether A comes from shared memory -- a ``gdesc`` operand -- or from registers), CTA
barriers (``BAR.*``), wgmma waits (``WARPGROUP.DEPBAR``) and fences (``WARPGROUP.ARRIVE``). With
the kernel's *useful* FLOPs per iteration (:data:`USEFUL_FLOPS`, from its launch config) it gives,
for one SM:

- warp-instructions per iteration = SASS per iteration x warps per CTA (every warp runs the body);
- issue clocks   = warp-instructions / ISSUE_PER_CLOCK;
- tensor clocks  = useful FLOPs / TENSOR_FLOP_PER_CLOCK (the tensor cores busy with useful work only);
- smem clocks    = wgmma operand bytes read from shared memory / SMEM_BYTES_PER_CLOCK, where every
  warpgroup reads its own operands: B (n x k) always, A (m x k) when it is a descriptor;
- executed MMA FLOPs = 2 m n k per instruction x warpgroups (wgmma) or x warps (mma.sync): more than
  the useful FLOPs when warpgroups compute the same tile (``executed_per_useful`` > 1);
- ``issue_per_tensor`` and ``smem_per_tensor``: issue and smem clocks over tensor clocks. A ratio
  above 1 says that resource, not the tensor cores, sets the pace of the loop;
- ``warp_instructions_per_useful_mflop``: the instruction cost of the work, independent of the
  machine constants.

The ratios are per SM and independent of how many CTAs share it (they share all three resources
alike). The model ignores latency, global memory, mma.sync operand loads (ldmatrix: they are SASS
instructions, so they count in the issue side), bank conflicts and dual issue; it is a way to see
what a change does to a hot loop, not a timing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Per SM of sm_90 (H100): 4 schedulers issuing one warp-instruction per clock each.
ISSUE_PER_CLOCK = 4
# Dense tensor-core FLOP per clock per SM by MMA input type (H100 SXM: 989 TFLOP/s bf16 at 1.83 GHz
# over 132 SMs = 4096); tf32 half, 8-bit types twice that.
TENSOR_FLOP_PER_CLOCK = {"BF16": 4096, "F16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192, "S8": 8192,
                         "U8": 8192}
# Shared-memory bandwidth per SM that wgmma operands are read with.
SMEM_BYTES_PER_CLOCK = 128
WARPS_PER_WARPGROUP = 4
_ELEMENT_BYTES = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


def _tile(c: dict) -> int:
    return c["BLOCK_M"] * c["BLOCK_N"]


def _forward_flops(c: dict, role: str | None = None) -> int:
    """S = Q K^T and O += P V for one block of BLOCK_N keys: 2 BM BN (D + Dv)."""
    return 2 * _tile(c) * (c["HEAD_DIM"] + c["HEAD_DIM_V"])


def _backward_flops(c: dict, role: str | None = None) -> int:
    """One tile of BLOCK_N keys x BLOCK_M queries. A dk/dv loop (a sequence key block walking its
    query blocks, the prefix items): S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and
    dK += dS^T Q when dk/dv (or the prefix gradients) are asked for, and dQ += dS K where the prefix
    programs add dq themselves (no sequence programs): 2 BM BN (2 D + 2 Dv) with all gradients. A dq
    loop (role "dq", ``backward._dq_blocks``: a query block walking its keys): S, dP and
    dQ += dS K: 2 BM BN (2 D + Dv)."""
    d, dv = c["HEAD_DIM"], c["HEAD_DIM_V"]
    if role == "dq":
        return 2 * _tile(c) * (2 * d + dv)
    flops = d + dv
    if c.get("NEED_DKDV", True) or c.get("NEED_DPREFIX", False):
        flops += dv + d
    if c.get("NEED_DQ", True) and not c.get("SEQ_PROGRAMS", True):
        flops += d
    return 2 * _tile(c) * flops


def _dq_flops(c: dict, role: str | None = None) -> int:
    """The deterministic dq pass, one block of BLOCK_N keys: S, dP, dQ += dS K: 2 BM BN (2 D + Dv)."""
    return 2 * _tile(c) * (2 * c["HEAD_DIM"] + c["HEAD_DIM_V"])


def _decode_flops(c: dict, role: str | None = None) -> int:
    """One block of BLOCK_N keys against the tile's real rows (query heads of the group x queries,
    at most BLOCK_R; the rest is padding): 2 rows BN (D + Dv)."""
    rows = min(c["BLOCK_R"], c["n_queries"] * c["group"])
    return 2 * rows * c["BLOCK_N"] * (c["HEAD_DIM"] + c["HEAD_DIM_V"])


def _shared_prefix_flops(c: dict, role: str | None = None) -> int:
    """One block of BLOCK_N prefix keys against BLOCK_R stacked rows: 2 BR BN (D + Dv)."""
    rows = min(c["BLOCK_R"], c.get("n_rows_total") or c["BLOCK_R"])
    return 2 * rows * c["BLOCK_N"] * (c["HEAD_DIM"] + c["HEAD_DIM_V"])


# Kernel name -> useful FLOPs of one iteration of one of its hot loops (each walks one tile of the
# kernel's block config), from the launch's constexprs and scalar arguments and the loop's role
# (None, or "dq" for the backward's dq loops: see hot_loop_report's ``roles``).
USEFUL_FLOPS = {
    "prefix_attention_fwd_kernel": _forward_flops,
    "backward_kernel": _backward_flops,
    "dq_kernel": _dq_flops,
    "prefix_attention_decode_kernel": _decode_flops,
    "prefix_attention_shared_prefix_kernel": _shared_prefix_flops,
}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers: "HGMMA.64x8x16.F32.BF16"
    operands: str
    source: tuple = ()  # ("tiles.py:216", "tiles.py:257", "forward.py:83"): innermost location first, then
    # the lines it was inlined at (nvdisasm -gi); empty without line info
    target: int | None = None  # a branch's target address


@dataclass
class Loop:
    head: int  # address of the first instruction of the body (the back-branch target)
    tail: int  # address of the (last) back-branch
    source: tuple = ()  # the back-branch's source location (Instruction.source): the loop's line and callers
    body: list = field(default_factory=list)


_INSTRUCTION = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_SOURCE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_HEX_TARGET = re.compile(r"^\s*(0x[0-9a-fA-F]+)")
_LABEL_TARGET = re.compile(r"`?\(?(\.L\w+)\)?`?")


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` or ``nvdisasm [-gi]`` output of one kernel, NOPs left
    out; branch targets resolved (hex addresses or ``.L_x_N`` labels)."""
    raw, labels, pending_labels, source, new_block = [], {}, [], (), True
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label.group(1))
            continue
        where = _SOURCE.search(line)
        if where:  # a block of lines: the innermost location first, then each caller's "inlined at"
            chain = [] if new_block else list(source)
            new_block = False
            for file, number in (where.group(1, 2), where.group(3, 4)):
                here = f"{file.rsplit('/', 1)[-1]}:{number}" if file else None
                if here and (not chain or chain[-1] != here):
                    chain.append(here)
            source = tuple(chain)
            continue
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        new_block = True
        address = int(m.group(1), 16)
        for name in pending_labels:
            labels[name] = address
        pending_labels = []
        raw.append((address, m.group(2), m.group(3).strip(), source))
    out = []
    for address, opcode, operands, where in raw:
        target = None
        if opcode.split(".")[0] == "BRA":
            hex_target = _HEX_TARGET.match(operands)
            label_target = _LABEL_TARGET.search(operands)
            if hex_target:
                target = int(hex_target.group(1), 16)
            elif label_target and label_target.group(1) in labels:
                target = labels[label_target.group(1)]
        if opcode != "NOP":
            out.append(Instruction(address, opcode, operands, where, target))
    return out


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop: one per back-branch target (head), reaching to its last back-branch, outermost first."""
    tails: dict[int, Instruction] = {}
    for ins in instructions:
        if ins.target is not None and ins.target <= ins.address:
            if ins.target not in tails or tails[ins.target].address < ins.address:
                tails[ins.target] = ins
    loops = [Loop(head, branch.address, branch.source) for head, branch in tails.items()]
    for loop in loops:
        loop.body = [i for i in instructions if loop.head <= i.address <= loop.tail]
    return sorted(loops, key=lambda lp: (lp.head, -lp.tail))


_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.(\w+)\.(\w+)")
_HMMA = re.compile(r"^HMMA\.(\d+)\.(\w+)\.(\w+)")


def mma_shape(ins: Instruction) -> dict | None:
    """``{"kind": "wgmma"|"mma_sync", "m", "n", "k", "type", "a_shared"}`` of a matrix instruction,
    else None. ``type`` is the input type (BF16, F16, TF32, ...); ``a_shared``: wgmma's A operand is
    a shared-memory descriptor (``gdesc``) rather than registers (always False for mma.sync)."""
    m = _HGMMA.match(ins.opcode)
    if m:
        operands = [o.strip() for o in ins.operands.split(",")]
        a_shared = len(operands) > 1 and operands[1].startswith("gdesc")
        return dict(kind="wgmma", m=int(m.group(1)), n=int(m.group(2)), k=int(m.group(3)), type=m.group(5),
                    a_shared=a_shared)
    m = _HMMA.match(ins.opcode)
    if m:
        digits = m.group(1)  # 16816 -> m16 n8 k16, 1688 -> m16 n8 k8, 884 -> m8 n8 k4
        mm, rest = (16, digits[2:]) if digits.startswith("16") else (int(digits[0]), digits[1:])
        return dict(kind="mma_sync", m=mm, n=int(rest[0]), k=int(rest[1:]), type=m.group(3), a_shared=False)
    return None


def hot_loops(instructions: list[Instruction]) -> list[Loop]:
    """The innermost loops that hold matrix instructions, in address order."""
    with_mma = [lp for lp in find_loops(instructions) if any(mma_shape(i) for i in lp.body)]
    return [lp for lp in with_mma
            if not any(o is not lp and lp.head <= o.head and o.tail <= lp.tail for o in with_mma)]


def loop_counts(loop: Loop) -> dict:
    """Static counts of one iteration of ``loop``: SASS, matrix instructions by shape, barriers, waits."""
    shapes: dict[tuple, int] = {}
    for ins in loop.body:
        s = mma_shape(ins)
        if s:
            key = (s["kind"], s["m"], s["n"], s["k"], s["type"], s["a_shared"])
            shapes[key] = shapes.get(key, 0) + 1
    base = [i.opcode.split(".")[0] for i in loop.body]
    return dict(
        head=f"0x{loop.head:04x}", tail=f"0x{loop.tail:04x}", source=list(loop.source),
        sass=len(loop.body),
        mma=[dict(kind=k[0], m=k[1], n=k[2], k=k[3], type=k[4], a_shared=k[5], count=c)
             for k, c in sorted(shapes.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1], kv[0][3], kv[0][5]))],
        barriers=base.count("BAR"),
        wgmma_waits=sum(1 for i in loop.body if i.opcode.startswith("WARPGROUP.DEPBAR")),
        wgmma_fences=sum(1 for i in loop.body if i.opcode.startswith("WARPGROUP.ARRIVE")),
    )


def model(counts: dict, num_warps: int, useful_flops: int | None) -> dict:
    """The per-SM model of one iteration (module docstring) from :func:`loop_counts`, the CTA's warps
    and the useful FLOPs of the iteration (None: the ratios over useful work are None too)."""
    warpgroups = max(1, num_warps // WARPS_PER_WARPGROUP)
    executed = smem = 0
    types = set()
    for s in counts["mma"]:
        per = 2 * s["m"] * s["n"] * s["k"] * s["count"]
        types.add(s["type"])
        if s["kind"] == "wgmma":
            executed += per * warpgroups
            element = _ELEMENT_BYTES.get(s["type"], 2)
            smem += s["count"] * element * s["k"] * (s["n"] + (s["m"] if s["a_shared"] else 0)) * warpgroups
        else:
            executed += per * num_warps
    rate = min((TENSOR_FLOP_PER_CLOCK.get(t, 4096) for t in types), default=4096)
    warp_instructions = counts["sass"] * num_warps
    issue = warp_instructions / ISSUE_PER_CLOCK
    out = dict(warp_instructions=warp_instructions, useful_flops=useful_flops, executed_mma_flops=executed,
               smem_operand_bytes=smem, issue_clocks=issue, smem_clocks=smem / SMEM_BYTES_PER_CLOCK,
               tensor_flop_per_clock=rate, tensor_clocks=None, executed_per_useful=None,
               warp_instructions_per_useful_mflop=None, issue_per_tensor=None, smem_per_tensor=None)
    if useful_flops:
        tensor = useful_flops / rate
        out.update(tensor_clocks=tensor, executed_per_useful=round(executed / useful_flops, 3),
                   warp_instructions_per_useful_mflop=round(warp_instructions / (useful_flops / 1e6), 1),
                   issue_per_tensor=round(issue / tensor, 3), smem_per_tensor=round(out["smem_clocks"] / tensor, 3))
    return out


def useful_flops(kernel: str, launch: dict, role: str | None = None) -> int | None:
    """Useful FLOPs per hot-loop iteration of ``kernel`` (:data:`USEFUL_FLOPS`) for a loop of that
    ``role``, None for a kernel without an entry or a launch missing a needed argument."""
    fn = USEFUL_FLOPS.get(kernel)
    try:
        return int(fn(launch, role)) if fn else None
    except (KeyError, TypeError):
        return None


def loop_role(source, roles) -> str | None:
    """The role of a loop whose source chain (innermost first, then callers) passes through one of
    ``roles``: (file name, first line, line past the last, role) ranges of kernel helpers."""
    for frame in source:
        file, _, line = frame.rpartition(":")
        for name, first, end, role in roles:
            if file == name and line.isdigit() and first <= int(line) < end:
                return role
    return None


def hot_loop_report(sass: str, kernel: str, num_warps: int, launch: dict, roles=()) -> list[dict]:
    """Per hot loop of the kernel's SASS: :func:`loop_counts` merged with :func:`model`. ``launch``:
    the launch's constexprs and scalar arguments (BLOCK_M, BLOCK_N, HEAD_DIM, ...); ``roles``: see
    :func:`loop_role` (a loop's role picks its useful-FLOP rule)."""
    out = []
    for counts in map(loop_counts, hot_loops(parse_sass(sass))):
        role = loop_role(counts["source"], roles)
        out.append({**counts, "role": role, **model(counts, num_warps, useful_flops(kernel, launch, role))})
    return out


def mma_summary(mma: list[dict]) -> str:
    """"32x m64n8k16 + 2x m64n64k16(A:regs)" -- the table's shape column."""
    parts = []
    for s in mma:
        kind = "" if s["kind"] == "wgmma" else "mma.sync "
        a = "" if s["kind"] != "wgmma" or s["a_shared"] else "(A:regs)"
        parts.append(f"{s['count']}x {kind}m{s['m']}n{s['n']}k{s['k']}{a}")
    return " + ".join(parts)


def describe() -> dict:
    """The model's constants and each kernel's useful-FLOP rule, for a report to carry along."""
    return dict(issue_per_clock=ISSUE_PER_CLOCK, tensor_flop_per_clock=dict(TENSOR_FLOP_PER_CLOCK),
                smem_bytes_per_clock=SMEM_BYTES_PER_CLOCK,
                useful_flops_per_iteration={k: " ".join(fn.__doc__.split()) for k, fn in USEFUL_FLOPS.items()})


def loop_label(source: list | tuple) -> str:
    """"tiles.py:216<tiles.py:257": the loop's line and the line it is inlined at (its caller)."""
    return "<".join(source[:2]) if source else "?"
