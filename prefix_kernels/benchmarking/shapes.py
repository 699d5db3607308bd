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


PRESETS: dict[str, list[Shape]] = {
    # CUDA: N 512..8192, P 16..256, D 64/128, GQA
    "training": [_train(16, 9, 3, 512, 20, 64), _train(8, 16, 4, 1024, 64, 128), _train(4, 32, 8, 2048, 128, 128),
                 _train(4, 16, 4, 2048, 16, 64), _train(2, 32, 8, 4096, 256, 128), _train(1, 32, 8, 8192, 32, 128)],
    # CUDA: KV caches 1k..32k, batch 1..64
    "decode": [_decode(1, 32, 8, 1024, 64, 128), _decode(64, 32, 8, 4096, 64, 128), _decode(32, 9, 3, 2048, 20, 64),
               _decode(16, 16, 4, 16384, 64, 128), _decode(4, 32, 8, 32768, 128, 128)],
    # CUDA smoke (benchmarks/gpu_check.sh): two training shapes, one decode shape
    "quick": [_train(8, 16, 4, 1024, 64, 128), _train(4, 32, 8, 2048, 128, 128), _decode(64, 32, 8, 4096, 64, 128)],
    # CPU (seconds on 2 cores)
    "cpu": [_train(2, 8, 2, 256, 16, 64), _train(4, 9, 3, 512, 20, 64), _train(1, 8, 2, 1024, 64, 64),
            _decode(16, 16, 4, 2048, 64, 64), _decode(2, 16, 4, 8192, 64, 128)],
    # sliding windows, CUDA (benchmarks/gpu_check.sh): W = 1024 against W = M (every key visible)
    "window": _windowed(1, 32, 8, 8192, 128, 128, (1024, 8192)),
    # sliding windows, CPU (a minute or two on 2 cores): W = 512 against W = M
    "window-cpu": _windowed(1, 8, 2, 2048, 64, 64, (512, 2048)),
    # shared-prefix decode, CPU (issue 16): 64 rows sharing one long prefix, a 64-token cache each
    # (benchmarks/bench_cpu.py --preset shared-prefix-cpu: ours against ours with the prefix
    # copied into every row's cache, the same FLOPs)
    "shared-prefix-cpu": [_decode(64, 32, 8, 64, 1024, 128), _decode(64, 32, 8, 64, 4096, 128)],
    # the same on CUDA (benchmarks/gpu_check.sh), the Triton decode cascade: P 4096 and 8192
    "shared-prefix": [_decode(64, 32, 8, 64, 4096, 128), _decode(64, 32, 8, 64, 8192, 128)],
}


def preset_shapes(preset: str | Sequence[Shape], device: torch.device | str) -> list[Shape]:
    """Shapes of a preset name ("auto", "training", "decode", "quick", "cpu", "window",
    "window-cpu", "shared-prefix-cpu", or several joined with "," or "+"), or a list of shapes
    passed through. "auto":
    training + decode on CUDA, cpu on CPU."""
    if not isinstance(preset, str):
        return list(preset)
    names = [x for part in preset.split(",") for x in part.split("+") if x]
    shapes: list[Shape] = []
    for name in names:
        if name == "auto":
            name_list = ["training", "decode"] if torch.device(device).type == "cuda" else ["cpu"]
        elif name in PRESETS:
            name_list = [name]
        else:
            raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
        for n in name_list:
            shapes += [s for s in PRESETS[n] if s not in shapes]
    return shapes


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
