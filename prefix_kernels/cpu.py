"""The C++ CPU op (csrc/), built with ninja on first use.

The sources ship inside the package (``prefix_kernels/_csrc/``, copied from the checkout's
``csrc/`` when a wheel is built, see setup.py); an editable install reads the checkout's ``csrc/``.
Importing this module builds nothing. The first call of :func:`is_available` (``prefix_attention``
with ``backend="auto"`` or ``"cpu"`` on CPU tensors) compiles them with
``torch.utils.cpp_extension.load`` (about 20 s on 2 cores, once; one line on stderr says so) into a
cache directory, ``$PREFIX_KERNELS_BUILD_DIR`` or
``${XDG_CACHE_HOME:-~/.cache}/prefix_kernels/<torch>_<py>/``, keyed by a hash of the sources and
their location, flags, torch and Python versions. If the build fails (no compiler, no ninja, ...)
it warns once and ``is_available()`` is False, so ``backend="auto"`` falls back to the reference.
``PREFIX_KERNELS_DISABLE_CPU_EXT=1`` skips the build altogether. Processes building at once take
turns (an flock that the OS releases when its holder dies, so a killed build never blocks the next
one); a process waits for another's build at most ``PREFIX_KERNELS_BUILD_TIMEOUT`` seconds (default
600), then falls back to the reference the same way.

The library registers ``torch.ops.prefix_kernels.fwd_cpu`` / ``bwd_cpu`` (see
csrc/prefix_attention.cpp); this module gives them fake (meta) implementations and an autograd
formula (the bookkeeping shared with the Triton path, _autograd_common.py), and wraps them in
:func:`prefix_attention_cpu`. Beyond plain prefix attention the op does sliding windows (key tiles
outside every query's window are skipped: the cost grows with the window, not the cache), a value
head dim of its own, softcapping (Gemma 2) and attention sinks (gpt-oss, differentiable).

Kernel selection at run time (no -march=native: the binary runs on any x86-64): AVX2+FMA+F16C
kernels when the CPU has them, else portable SSE2 ones; tile products use torch's own MKL when
libtorch exports it, else ATen. :func:`build_info` says which flavour runs.

Shared-prefix decode (the cascade, after Hydragen / FlashInfer): for decode-like calls (N <= 4)
whose rows share prefixes (one prefix, or a bank with several rows per prefix) the prefix part is
computed once per (prefix, kv head) as a matrix product of all those rows' queries, then each row's
own keys, merged through the softmax state; a cost model in csrc/prefix_attention.cpp decides;
:func:`cascade_calls` counts the forwards that took it.

The op's switches (:class:`CPUOptions`) are arguments of the op; the C++ code reads no environment
variable. This module reads the variables below once, when it is imported, into
:data:`ENV_OPTIONS`, the options of every call that passes none (``prefix_attention`` on CPU
tensors); a value that is not allowed raises a ValueError naming the variable.

    PREFIX_KERNELS_CPU_ISA=auto|base        isa: "base" forces the portable kernels (tests)
    PREFIX_KERNELS_CPU_GEMM=auto|aten       gemm: "aten" sends tile products through ATen, not MKL
    PREFIX_KERNELS_CPU_CASCADE=auto|0|1     cascade: 0 never, 1 whenever P > 0, auto the cost model
    PREFIX_KERNELS_CPU_ROWS=n               block_rows: stacked query rows per task (default 128)
    PREFIX_KERNELS_CPU_BLOCK_K=n            block_k: keys per tile (default 128, or 512 for
                                            few-row decode tiles)
    PREFIX_KERNELS_CPU_CASCADE_ROWS=n       cascade_rows: stacked query rows per cascade task (256)
    PREFIX_KERNELS_CPU_CASCADE_BLOCK_K=n    cascade_block_k: prefix keys per cascade tile (256)

An unset or empty variable means the default. The build itself reads ``PREFIX_KERNELS_BUILD_DIR``,
``PREFIX_KERNELS_BUILD_TIMEOUT`` and ``PREFIX_KERNELS_DISABLE_CPU_EXT`` (above) when it runs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process build lock beyond torch's own
    fcntl = None

import torch

from prefix_kernels import _autograd_common
from prefix_kernels.layout import new_out

_SOURCES = ("prefix_attention.cpp", "kernel_base.cpp", "kernel_avx2.cpp")
_HEADERS = ("kernel_common.h", "kernel_impl.h")
_CFLAGS = ["-O3", "-ffp-contract=off"]
_LDFLAGS: list[str] = []
if sys.platform.startswith("linux"):
    # at::parallel_for is header code: without -fopenmp it would run serially. libgomp resolves
    # to the copy torch already loaded (same soname), so torch.set_num_threads applies.
    _CFLAGS.append("-fopenmp")
    _LDFLAGS.append("-fopenmp")


@dataclass(frozen=True)
class CPUOptions:
    """The C++ op's switches, passed to it as arguments on every call (the op's schema: csrc/
    prefix_attention.cpp). None and "auto" leave the choice to the op.

    isa: "auto" (AVX2+FMA+F16C kernels when the CPU has them) or "base" (the portable kernels).
    gemm: "auto" (torch's own MKL when libtorch exports it) or "aten" (at::cpu::addmm_out).
    cascade: the shared-prefix cascade; None: the cost model, False: never, True: whenever P > 0.
    block_rows, block_k: stacked query rows per task (128) and keys per tile (128; 512 for
        few-row decode tiles).
    cascade_rows, cascade_block_k: stacked query rows per cascade task (256) and prefix keys per
        cascade tile (256).
    """

    isa: str = "auto"
    gemm: str = "auto"
    cascade: bool | None = None
    block_rows: int | None = None
    block_k: int | None = None
    cascade_rows: int | None = None
    cascade_block_k: int | None = None

    def __post_init__(self):
        for name, allowed in (("isa", ("auto", "base")), ("gemm", ("auto", "aten"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CPUOptions.{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.cascade not in (None, False, True):
            raise ValueError(f"CPUOptions.cascade must be None, False or True, got {self.cascade!r}")
        for name in _SIZES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"CPUOptions.{name} must be an int >= 1 or None, got {value!r}")

    def op_arg(self) -> tuple[int, ...]:
        """The op's ``options`` argument: the ints (isa, gemm, cascade, block_rows, block_k,
        cascade_rows, cascade_block_k) (csrc/prefix_attention.cpp, OptionIndex: isa 1 = "base",
        gemm 1 = "aten", cascade -1 = None, a size 0 = None), or () when every option is its
        default."""
        cascade = -1 if self.cascade is None else int(self.cascade)
        values = (int(self.isa == "base"), int(self.gemm == "aten"), cascade,
                  *(getattr(self, name) or 0 for name in _SIZES))
        return () if values == _DEFAULT_OP_VALUES else values

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "CPUOptions":
        """The options the PREFIX_KERNELS_CPU_* variables of ``environ`` set (module docstring)."""
        fields = {}
        for field, (variable, parse, expected) in _ENV_VARIABLES.items():
            text = environ.get(variable, "")
            if text:
                try:
                    fields[field] = parse(text)
                except (KeyError, ValueError):
                    raise ValueError(f"{variable} must be {expected}, got {text!r}") from None
        return cls(**fields)


_SIZES = ("block_rows", "block_k", "cascade_rows", "cascade_block_k")
_DEFAULT_OP_VALUES = (0, 0, -1, 0, 0, 0, 0)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _choice(*allowed: str):
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(text)
        return text
    return parse


# CPUOptions field: (environment variable, parser of its text, what the text must be)
_ENV_VARIABLES = {
    "isa": ("PREFIX_KERNELS_CPU_ISA", _choice("auto", "base"), "auto or base"),
    "gemm": ("PREFIX_KERNELS_CPU_GEMM", _choice("auto", "aten"), "auto or aten"),
    "cascade": ("PREFIX_KERNELS_CPU_CASCADE", {"auto": None, "0": False, "1": True}.__getitem__, "0, 1 or auto"),
    "block_rows": ("PREFIX_KERNELS_CPU_ROWS", _positive, "a positive integer"),
    "block_k": ("PREFIX_KERNELS_CPU_BLOCK_K", _positive, "a positive integer"),
    "cascade_rows": ("PREFIX_KERNELS_CPU_CASCADE_ROWS", _positive, "a positive integer"),
    "cascade_block_k": ("PREFIX_KERNELS_CPU_CASCADE_BLOCK_K", _positive, "a positive integer"),
}

ENV_OPTIONS = CPUOptions.from_env()  # read once: the options of every call that passes none
_ENV_OP_ARG = ENV_OPTIONS.op_arg()

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "reason": "the C++ CPU op has not been built yet"}


def _source_dir() -> Path | None:
    """The C++ sources: the installed package's copy, else the source checkout's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    return None


def _build_root() -> Path:
    env = os.environ.get("PREFIX_KERNELS_BUILD_DIR")
    if env:
        return Path(env).expanduser()
    version = torch.__version__.replace("+", "_")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "prefix_kernels" / f"torch{version}_{py}"


def _sources() -> Path:
    src = _source_dir()
    if src is None:
        here = Path(__file__).resolve().parent
        raise RuntimeError(
            f"no C++ sources ({_SOURCES[0]}, ...) in {here / '_csrc'} (an installed package) or "
            f"{here.parent / 'csrc'} (a source checkout); reinstall prefix_kernels"
        )
    return src


def _build_name(src: Path) -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    # The location too: the checkout's and an installed copy's builds (ninja files name the
    # source paths) must not take turns rebuilding one cache entry.
    digest.update(" ".join(_CFLAGS + _LDFLAGS + [str(src), torch.__version__, sys.version]).encode())
    return f"prefix_kernels_cpu_{digest.hexdigest()[:12]}"


def build_directory() -> Path:
    """Where the C++ op of these sources is (or would be) built: ``<build root>/<name>``."""
    return _build_root() / _build_name(_sources())


# torch's build lock (cpp_extension.load's FileBaton) is a file created with O_EXCL and removed when
# the build ends; a build killed by SIGKILL/SIGTERM/SIGHUP leaves it behind and every later load
# polls for it forever. Builds here hold an flock on BUILD_LOCK for the whole load(): the kernel
# releases it when its holder dies, so whoever holds it knows a torch lock file left in the
# directory is stale. Waiting for a live holder is bounded by the build timeout.
BUILD_LOCK = "prefix_kernels_build.flock"
TORCH_LOCK = "lock"
DEFAULT_BUILD_TIMEOUT_S = 600.0


def _build_timeout() -> float:
    value = os.environ.get("PREFIX_KERNELS_BUILD_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_BUILD_TIMEOUT_S
    except ValueError:
        raise ValueError(f"PREFIX_KERNELS_BUILD_TIMEOUT must be a number of seconds, got {value!r}") from None


def _acquire_build_lock(build_dir: Path, timeout: float) -> int | None:
    """An exclusive flock on build_dir/BUILD_LOCK (its file names the holder), waiting up to
    ``timeout`` seconds for another process's build; returns the fd to release. None without fcntl."""
    if fcntl is None:
        return None
    fd = os.open(build_dir / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):  # no flock on this file system: torch's lock only
                os.close(fd)
                return None
            # held by a live process (a dead one's lock is gone)
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if time.monotonic() >= deadline:
                os.close(fd)
                raise TimeoutError(
                    f"waited {timeout:.0f} s for the build of the C++ CPU op by {owner} in {build_dir} "
                    f"(PREFIX_KERNELS_BUILD_TIMEOUT sets the limit)") from None
            if not announced:
                print(f"prefix_kernels: waiting up to {timeout:.0f} s for the C++ CPU op build by {owner} "
                      f"in {build_dir}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def _release_build_lock(fd: int | None) -> None:
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _build() -> None:
    from torch.utils.cpp_extension import load

    src = _sources()
    name = _build_name(src)
    build_dir = _build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = _acquire_build_lock(build_dir, _build_timeout())
    try:
        if fd is not None:
            # This process holds the build lock: a torch lock file here belongs to a dead build.
            (build_dir / TORCH_LOCK).unlink(missing_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print(f"prefix_kernels: compiling the C++ CPU op (once, about 20 s on 2 cores) in {build_dir}",
                  file=sys.stderr, flush=True)
        load(
            name=name,
            sources=[str(src / s) for s in _SOURCES],
            extra_cflags=list(_CFLAGS),  # copies: load() appends its own flags to these lists
            extra_ldflags=list(_LDFLAGS),
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    finally:
        _release_build_lock(fd)
    _register_python_side()


def _summarize(exc: BaseException) -> str:
    """The exception type and its most telling line (a compiler 'error:' line when there is one)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Error building extension" not in line]
    detail = (errors or lines or [""])[0]
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


@torch.compiler.assume_constant_result  # traced as a constant: no graph break on the build lock
def is_available() -> bool:
    """True when the C++ op is built and loaded (builds it on the first call). Never raises."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        if os.environ.get("PREFIX_KERNELS_DISABLE_CPU_EXT", "") not in ("", "0"):
            _state.update(ok=False, reason="disabled by PREFIX_KERNELS_DISABLE_CPU_EXT")
        else:
            try:
                _build()
                _state.update(ok=True, reason="")
            except Exception as exc:  # noqa: BLE001 -- any build/load failure means "unavailable"
                reason = f"building the C++ CPU op failed ({_summarize(exc)})"
                _state.update(ok=False, reason=reason)
                warnings.warn(
                    f"prefix_kernels: {reason}; CPU tensors will use the (slower) PyTorch "
                    f"reference. Set PREFIX_KERNELS_DISABLE_CPU_EXT=1 to skip the build.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _state["tried"] = True
        return _state["ok"]


def unavailable_reason() -> str:
    """Why :func:`is_available` is False ("" when it is True)."""
    return _state["reason"]


def build_info(options: CPUOptions | None = None) -> str:
    """The kernel flavour calls with ``options`` (default :data:`ENV_OPTIONS`) run, e.g.
    "isa=avx2 gemm=mkl threads=2" (builds on first use)."""
    if not is_available():
        return f"unavailable: {unavailable_reason()}"
    return torch.ops.prefix_kernels.cpu_build_info(_ENV_OP_ARG if options is None else options.op_arg())


def cascade_calls() -> int:
    """How many forwards of the C++ op so far took the shared-prefix cascade (0 when unavailable).

    The cascade (csrc/prefix_attention.cpp, ``plan_cascade``) computes the prefix part of decode-like
    calls once per (prefix, kv head, chunk of up to 256 stacked query rows) as one matrix product of
    all the rows that share the prefix, then each row's own keys, merged through the softmax state.
    ``CPUOptions(cascade=True)`` forces it whenever P > 0, ``False`` turns it off, None (the
    default) leaves it to the cost model.
    """
    if not is_available():
        return 0
    return int(torch.ops.prefix_kernels.cpu_cascade_calls())


# ---------------------------------------------------------------- fake impls and autograd

_registered = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The options (CPUOptions.op_arg) change no output's layout.
def _fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
              sliding_window=None, softcap=None, sinks=None, options=()):
    lse = q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))
    return new_out(q, v.shape[-1]), lse


def _bwd_fake(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_ids,
              causal, scale, output_mask, sliding_window=None, softcap=None, sinks=None, options=()):
    like = (q, k, v, prefix_k, prefix_v, sinks)
    return [torch.empty_like(t) if need else q.new_empty((0,)) for t, need in zip(like, output_mask)]


def _backward(ctx, grad_out, _grad_lse):
    return _autograd_common.backward(ctx, grad_out, torch.ops.prefix_kernels.bwd_cpu)


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_fake("prefix_kernels::fwd_cpu")(_fwd_fake)
    torch.library.register_fake("prefix_kernels::bwd_cpu")(_bwd_fake)
    torch.library.register_autograd("prefix_kernels::fwd_cpu", _backward,
                                    setup_context=_autograd_common.save)
    _registered = True


class PrefixAttentionCPU(torch.autograd.Function):
    """out, lse = fwd_cpu(...); backward runs bwd_cpu for exactly the needed gradients (with the
    forward's options, which _autograd_common hands on among the extra arguments). A fixed
    signature: autograd binds apply's arguments to it on every call, a ``*args`` one costs more."""

    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, causal, scale,
                sliding_window, softcap, sinks, options):
        return torch.ops.prefix_kernels.fwd_cpu(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids,
                                                causal, scale, sliding_window, softcap, sinks, options)

    setup_context = staticmethod(_autograd_common.save)
    backward = staticmethod(_backward)


def prefix_attention_cpu(q, k, v, prefix_k, prefix_v, *, causal, scale, key_padding_mask, prefix_ids,
                         sliding_window=None, softcap=None, sinks=None, options: CPUOptions | None = None):
    """(out [B, Hq, N, Dv] in q's dtype, lse [B, Hq, N] fp32 natural log, detached) from the C++ op.

    Inputs are validated by ``functional.validate_inputs``; ``scale`` is a float. The semantics of
    ``sliding_window`` (int >= 1), ``softcap`` (float > 0) and ``sinks`` ([Hq], q's dtype or fp32)
    are those of :func:`prefix_kernels.reference.prefix_attention_reference`; v / prefix_v may have
    their own head dim Dv. Differentiable in q, k, v, prefix_k, prefix_v and sinks (only the
    gradients that are needed are computed). ``options``: the op's switches, default
    :data:`ENV_OPTIONS` (the environment's, read at import).
    """
    if not is_available():
        raise RuntimeError(f"the C++ CPU op is unavailable: {unavailable_reason()}")
    out, lse = PrefixAttentionCPU.apply(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_ids, bool(causal), float(scale),
        None if sliding_window is None else int(sliding_window),
        None if softcap is None else float(softcap), sinks,
        _ENV_OP_ARG if options is None else options.op_arg(),
    )
    return out, lse.detach().float()
