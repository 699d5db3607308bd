"""The attention problems the kernel benchmark runs: :class:`Shape`, the presets, and the inputs of
a shape.

A shape is ``B`` rows, ``Hq`` query heads over ``Hkv`` K/V heads (GQA when they differ), ``N``
queries against ``M`` sequence keys (query i at position M - N + i) and a shared prefix of ``P``
keys, head dim ``D``. ``kind`` "training" (N = M; modes fwd, bwd, fwd+bwd) or "decode" (N = 1
against an M-token KV cache; mode decode). ``W`` (default None: no window): a sliding window, the
query at position i sees sequence key j only if i - W < j <= i; the prefix stays visible to every
query. W >= M is no effective window (the same keys as W = None), but the window code paths run.

Inputs are laid out as HF hands them over: q (and k/v for training) are transposed views of
[B, S, H, D] storage; a decode KV cache is contiguous [B, Hkv, M, D]; the prefix is [Hkv, P, D].
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Sequence

import torch

TRAINING_MODES = ("fwd", "bwd", "fwd+bwd")
DECODE_MODES = ("decode",)
MODES = TRAINING_MODES + DECODE_MODES


_SHAPE_TEXT = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)x(\d+)x(\d+)x(\d+)(?:w(\d+))?")


@dataclass(frozen=True)
class Shape:
    """One attention problem. ``kind`` "training" (modes fwd/bwd/fwd+bwd) or "decode" (N = 1);
    ``W`` a sliding window (None: none)."""

    kind: str
    B: int
    Hq: int
    Hkv: int
    N: int
    M: int
    P: int
    D: int
    W: int | None = None

    def __post_init__(self):
        if self.kind not in ("training", "decode"):
            raise ValueError(f"kind must be 'training' or 'decode', got {self.kind!r}")
        if self.Hq % self.Hkv or self.M < self.N or min(self.B, self.Hq, self.N, self.D) < 1 or self.P < 0:
            raise ValueError(f"invalid shape {self}")
        if self.kind == "decode" and self.N != 1:
            raise ValueError(f"a decode shape has N = 1, got {self}")
        if self.W is not None and (isinstance(self.W, bool) or not isinstance(self.W, int) or self.W < 1):
            raise ValueError(f"the window W must be an int >= 1 (or None), got {self.W!r}")

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``BxHqxHkvxNxMxPxD[wW]`` (decode when N = 1 and M > 1), e.g. ``8x16x4x1024x1024x64x128``,
        or ``1x32x8x8192x8192x128x128w1024`` with a sliding window of 1024 keys."""
        match = _SHAPE_TEXT.fullmatch(text.strip().lower())
        if not match:
            raise ValueError(f"a shape is BxHqxHkvxNxMxPxD (7 integers), optionally followed by wW (a sliding "
                             f"window, e.g. 1x8x2x2048x2048x64x64w512), got {text!r}")
        b, hq, hkv, n, m, p, d = (int(x) for x in match.groups()[:7])
        w = match.group(8)
        return cls("decode" if n == 1 and m > 1 else "training", b, hq, hkv, n, m, p, d,
                   None if w is None else int(w))

    @property
    def name(self) -> str:
        """The text :meth:`parse` reads: ``BxHqxHkvxNxMxPxD``, with ``wW`` when there is a window."""
        dims = "x".join(str(x) for x in (self.B, self.Hq, self.Hkv, self.N, self.M, self.P, self.D))
        return dims if self.W is None else f"{dims}w{self.W}"

    @property
    def modes(self) -> tuple[str, ...]:
        return DECODE_MODES if self.kind == "decode" else TRAINING_MODES

    def cut_down(self) -> "Shape":
        """The smaller shape the correctness gate runs on: B <= 2, N <= 256, at most 512 cached keys;
        a window shorter than M shrinks with M (rounded up, and still shorter than the cut-down M,
        so it still hides keys); one of at least M is kept (it still hides none)."""
        n = min(self.N, 256)
        m = n + min(self.M - self.N, 512)
        w = self.W
        if w is not None and w < self.M:
            w = max(1, min(m - 1, -(-w * m // self.M)))
        return Shape(self.kind, min(self.B, 2), self.Hq, self.Hkv, n, m, self.P, self.D, w)


def _train(b, hq, hkv, n, p, d):
    return Shape("training", b, hq, hkv, n, n, p, d)


def _decode(b, hq, hkv, m, p, d):
    return Shape("decode", b, hq, hkv, 1, m, p, d)


def _windowed(b, hq, hkv, n, p, d, windows):
    return [Shape("training", b, hq, hkv, n, n, p, d, w) for w in windows]


@dataclass(frozen=True)
class Preset:
    """A named set of shapes and the device they are sized for ("cuda" or "cpu"); ``about`` is
    the phrase ``prefix-kernels bench --help`` shows next to the name, before the shapes;
    ``runtime`` how long a run with the default options takes on 2 cores, where known (quick-cpu
    and cpu: the CPU time of the whole process, both threads, which bounds the wall time on 2 idle
    cores; on 2 cores shared four ways each took about twice that)."""

    device: str
    about: str
    shapes: tuple[Shape, ...]
    runtime: str = ""


# --help is generated from this table (presets_help), so what it says cannot drift from what runs
PRESET_TABLE: dict[str, Preset] = {
    "training": Preset("cuda", "N 512..8192, P 16..256, D 64/128, GQA", (
        _train(16, 9, 3, 512, 20, 64), _train(8, 16, 4, 1024, 64, 128), _train(4, 32, 8, 2048, 128, 128),
        _train(4, 16, 4, 2048, 16, 64), _train(2, 32, 8, 4096, 256, 128), _train(1, 32, 8, 8192, 32, 128))),
    "decode": Preset("cuda", "KV caches 1k..32k, batch 1..64", (
        _decode(1, 32, 8, 1024, 64, 128), _decode(64, 32, 8, 4096, 64, 128), _decode(32, 9, 3, 2048, 20, 64),
        _decode(16, 16, 4, 16384, 64, 128), _decode(4, 32, 8, 32768, 128, 128))),
    "quick": Preset("cuda", "GPU smoke test (benchmarks/gpu_check.sh); on a CPU use quick-cpu", (
        _train(8, 16, 4, 1024, 64, 128), _train(4, 32, 8, 2048, 128, 128), _decode(64, 32, 8, 4096, 64, 128))),
    # two shapes of "cpu"
    "quick-cpu": Preset("cpu", "the default without CUDA, the CPU counterpart of quick", (
        _train(1, 8, 2, 1024, 64, 64), _decode(16, 16, 4, 2048, 64, 64)), runtime="about 20 s on 2 cores"),
    "cpu": Preset("cpu", "the CPU benchmark (benchmarks/bench_cpu.py)", (
        _train(2, 8, 2, 256, 16, 64), _train(4, 9, 3, 512, 20, 64), _train(1, 8, 2, 1024, 64, 64),
        _decode(16, 16, 4, 2048, 64, 64), _decode(2, 16, 4, 8192, 64, 128)), runtime="about 45 s on 2 cores"),
    # W = M: every key visible, the window code paths running
    "window": Preset("cuda", "sliding windows W = 1024 against W = M",
                     tuple(_windowed(1, 32, 8, 8192, 128, 128, (1024, 8192)))),
    "window-cpu": Preset("cpu", "sliding windows W = 512 against W = M",
                         tuple(_windowed(1, 8, 2, 2048, 64, 64, (512, 2048))), runtime="a minute or two on 2 cores"),
    # benchmarks/bench_cpu.py --preset shared-prefix-cpu times ours against ours with the
    # prefix copied into every row's cache (the same FLOPs)
    "shared-prefix-cpu": Preset("cpu", "shared-prefix decode: 64 rows share one long prefix, 64-token caches", (
        _decode(64, 32, 8, 64, 1024, 128), _decode(64, 32, 8, 64, 4096, 128))),
    "shared-prefix": Preset("cuda", "shared-prefix decode, the Triton decode cascade", (
        _decode(64, 32, 8, 64, 4096, 128), _decode(64, 32, 8, 64, 8192, 128))),
}

PRESETS: dict[str, list[Shape]] = {name: list(p.shapes) for name, p in PRESET_TABLE.items()}

# what "auto" stands for, by device type
AUTO: dict[str, list[str]] = {"cuda": ["training", "decode"], "cpu": ["quick-cpu"]}


def preset_names(preset: str, device: torch.device | str) -> list[str]:
    """The preset names a ``--preset`` value stands for: several joined with "," or "+", "auto"
    resolved for ``device`` (:data:`AUTO`)."""
    names: list[str] = []
    for name in (x for part in preset.split(",") for x in part.split("+") if x):
        if name == "auto":
            expanded = AUTO["cuda" if torch.device(device).type == "cuda" else "cpu"]
        elif name in PRESET_TABLE:
            expanded = [name]
        else:
            raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESET_TABLE)}")
        names += [n for n in expanded if n not in names]
    return names


def preset_shapes(preset: str | Sequence[Shape], device: torch.device | str) -> list[Shape]:
    """Shapes of a preset name (see :data:`PRESET_TABLE`; "auto", or several joined with "," or
    "+": :func:`preset_names`), or a list of shapes passed through."""
    if not isinstance(preset, str):
        return list(preset)
    shapes: list[Shape] = []
    for name in preset_names(preset, device):
        shapes += [s for s in PRESETS[name] if s not in shapes]
    return shapes


def gpu_sized(preset: str, device: torch.device | str) -> list[str]:
    """The presets of ``preset`` sized for a CUDA GPU when ``device`` is not one (else [])."""
    if torch.device(device).type == "cuda":
        return []
    return [n for n in preset_names(preset, device) if PRESET_TABLE[n].device == "cuda"]


def presets_help(width: int = 96) -> str:
    """The presets, the device each is for and its shapes, as ``prefix-kernels bench --help``
    lists them."""
    cuda, cpu = (" + ".join(AUTO[d]) for d in ("cuda", "cpu"))
    lines = ["presets (--preset NAME, or several joined by ','; shapes are BxHqxHkvxNxMxPxD[wW]):",
             f"  auto                 the default: {cuda} with CUDA, {cpu} without "
             f"(here: {cuda if torch.cuda.is_available() else cpu})"]
    for name, p in PRESET_TABLE.items():
        device = "CUDA GPU" if p.device == "cuda" else "CPU"
        lines.append(f"  {name:20s} {device}{f', {p.runtime}' if p.runtime else ''}: {p.about}")
        for kind in ("training", "decode"):
            names = [s.name for s in p.shapes if s.kind == kind]
            if names:
                lines += textwrap.wrap(", ".join(names), width, initial_indent=f"{'':23s}{kind:9s}",
                                       subsequent_indent=" " * 32, break_on_hyphens=False)
    return "\n".join(lines)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, requires_grad: bool,
                seed: int = 0) -> list[torch.Tensor]:
    """q, k, v, prefix_k, prefix_v (layouts: see the module docstring)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype, generator=gen)

    s = shape
    q = randn(s.B, s.N, s.Hq, s.D).transpose(1, 2)
    if s.kind == "decode":
        k, v = randn(s.B, s.Hkv, s.M, s.D), randn(s.B, s.Hkv, s.M, s.D)
    else:
        k, v = randn(s.B, s.M, s.Hkv, s.D).transpose(1, 2), randn(s.B, s.M, s.Hkv, s.D).transpose(1, 2)
    pk, pv = randn(s.Hkv, s.P, s.D), randn(s.Hkv, s.P, s.D)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv)]


def layout(shape: Shape) -> str:
    """The ``layout`` column of a shape's rows."""
    return "q bshd-view, kv cache bhsd" if shape.kind == "decode" else "bshd-view"
