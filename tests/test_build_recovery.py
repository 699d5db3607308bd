"""The C++ op's first build when another build was killed or is still running (prefix_kernels.cpu).

A build killed by SIGKILL, SIGTERM or SIGHUP leaves torch's build lock file (``<build dir>/lock``)
behind; the next process must notice that its owner is gone and build (or load) the op within a
bounded time. A process whose build waits on a live one gives up after PREFIX_KERNELS_BUILD_TIMEOUT
seconds with a one-line reason and the reference fallback.

One real compile (~20-60 s on 2 cores), in a temporary build root: a build killed mid-compile, then
the next process's. The other cases kill or keep alive a process that went through the same
``cpu.is_available()`` with torch's ``load`` replaced by a stand-in that takes torch's lock as
``load`` does and then never finishes (the compiler's place), and reuse that build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import need
from prefix_kernels import cpu

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and flock")

PROBE = ("from prefix_kernels import cpu; ok = cpu.is_available(); "
         "print('RESULT', ok, cpu.unavailable_reason(), flush=True)")

# cpu.is_available() with torch's load() replaced by a build that never ends: it takes torch's lock
# file exactly as load() does (FileBaton), says so, and sleeps (the compiler's place).
STUCK_BUILD = textwrap.dedent("""
    import os, time
    import torch.utils.cpp_extension as ext
    from torch.utils.file_baton import FileBaton

    def load(name, build_directory, **kwargs):
        assert FileBaton(os.path.join(build_directory, "lock")).try_acquire()
        print("building", flush=True)
        time.sleep(600)

    ext.load = load
    from prefix_kernels import cpu
    cpu.is_available()
""")


def _env(build_root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFIX_KERNELS_DISABLE_CPU_EXT", "PREFIX_KERNELS_BUILD_TIMEOUT")}
    return dict(env, PREFIX_KERNELS_BUILD_DIR=str(build_root), **extra)


def _probe(build_root: Path, timeout: float, **extra) -> tuple[subprocess.CompletedProcess, float]:
    """A fresh process's cpu.is_available() (killed, and the test failed, if it takes over ``timeout``)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=_env(build_root, **extra),
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


def _build_dir(build_root: Path) -> Path:
    return build_root / cpu._build_name(cpu._sources())


@pytest.fixture(scope="module")
def built_root(tmp_path_factory):
    """A build root where a first build was SIGKILLed mid-compile (the whole process group: python,
    ninja, the compiler) and the next process then built the op: (root, that process, its seconds)."""
    need("cpu")  # a compiler is there (this process built or loaded the op)
    root = tmp_path_factory.mktemp("build_root")
    build_dir = _build_dir(root)
    first = subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, env=_env(root), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((build_dir / "lock").exists() and (build_dir / "build.ninja").exists()):
            assert first.poll() is None, "the first build ended before it could be killed"
            assert time.monotonic() < deadline, "the first build never started compiling"
            time.sleep(0.1)
        time.sleep(2)  # the compiler is running
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (build_dir / "lock").exists()  # the stale state: torch's lock, its owner gone
    assert not (build_dir / f"{build_dir.name}.so").exists()
    result, seconds = _probe(root, timeout=900)
    return root, result, seconds


def test_build_killed_mid_compile_then_next_process_builds(built_root):
    root, result, seconds = built_root
    assert result.returncode == 0, result.stderr
    assert "RESULT True" in result.stdout, (result.stdout, result.stderr)
    assert (_build_dir(root) / f"{_build_dir(root).name}.so").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_stale_lock_of_a_killed_build_is_taken_over(built_root, sig):
    """A build killed by ``sig`` while holding the locks: the next process loads the op (already
    built here) in seconds instead of waiting forever for the dead owner's lock."""
    root = built_root[0]
    stuck = subprocess.Popen([sys.executable, "-c", STUCK_BUILD], cwd=ROOT, env=_env(root),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert stuck.stdout.readline().strip() == "building"
        stuck.send_signal(sig)
        assert stuck.wait(timeout=30) == -sig
    finally:
        if stuck.poll() is None:
            stuck.kill()
            stuck.wait()
    assert (_build_dir(root) / "lock").exists()
    result, seconds = _probe(root, timeout=120)
    assert "RESULT True" in result.stdout, (result.stdout, result.stderr)
    assert not (_build_dir(root) / "lock").exists()


def test_waiting_for_a_live_build_is_bounded(built_root):
    """Another process is still building: after PREFIX_KERNELS_BUILD_TIMEOUT seconds of waiting the
    op is unavailable with a one-line reason (naming the waiting and the builder) and a one-line
    warning, and the builder's lock is left alone."""
    root = built_root[0]
    stuck = subprocess.Popen([sys.executable, "-c", STUCK_BUILD], cwd=ROOT, env=_env(root),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert stuck.stdout.readline().strip() == "building"
        result, seconds = _probe(root, timeout=120, PREFIX_KERNELS_BUILD_TIMEOUT="3")
        assert stuck.poll() is None
        assert (_build_dir(root) / "lock").exists()
    finally:
        stuck.kill()
        stuck.wait()
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert line.startswith("RESULT False building the C++ CPU op failed (TimeoutError: waited 3 s")
    assert f"pid {stuck.pid}" in line
    assert 3 <= seconds < 60
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and "waited 3 s" in warnings[0] and "reference" in warnings[0]
