"""A built package (sdist, then a wheel from it) carries the C++ sources and builds the CPU op.

``python -m build --no-isolation`` (this interpreter's setuptools: the dev extra asks for the one
pyproject.toml's [build-system] needs) makes the sdist and, from the unpacked sdist, the wheel --
so MANIFEST.in (csrc/ into the sdist) and setup.py (csrc/ into the wheel's prefix_kernels/_csrc/)
are both on the path. The wheel goes into a temporary venv that has no access to this checkout and
takes torch, ninja and numpy from the running interpreter's site-packages (a .pth file; no
download, works offline and with whatever torch is installed). From a directory outside the
checkout, the installed package must build its C++ op from its own copy of the sources, in an empty
build directory, and match the reference. About 30 s on 2 cores, most of it the C++ build.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
from pathlib import Path

import build

from prefix_kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
CPP = set(cpu._SOURCES + cpu._HEADERS)

CHECK = """
    import sys
    from pathlib import Path
    import torch
    import prefix_kernels
    from prefix_kernels import cpu, prefix_attention, prefix_attention_reference

    package = Path(prefix_kernels.__file__).resolve().parent
    assert package.is_relative_to(Path(sys.prefix).resolve()), f"imported {package}, not the venv's copy"
    assert cpu.is_available(), cpu.unavailable_reason()
    assert cpu._source_dir() == package / "_csrc", cpu._source_dir()

    torch.manual_seed(0)
    B, Hq, Hkv, N, M, P, D = 2, 4, 2, 5, 7, 3, 8
    q = torch.randn(B, Hq, N, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, M, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(Hkv, P, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, :2] = False  # left padding in row 1
    out, lse = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, return_lse=True, backend="cpu")
    ref_out, ref_lse = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse.float())
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, pk, pv), grad)
    want = torch.autograd.grad(ref_out, (q, k, v, pk, pv), grad)
    for name, g, w in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"d{name}: {m}")
    print("ok", cpu.build_info())
"""


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_built_wheel_ships_and_builds_the_cpu_op():
    # --no-isolation builds with this interpreter's packages: check [build-system] requires up front
    # (an old setuptools otherwise fails deep in the build, on pyproject.toml's `license`)
    unmet = [chain[-1] for req in build.ProjectBuilder(ROOT).build_system_requires
             for chain in build.check_dependency(req)]
    assert not unmet, (f"this interpreter lacks the build requirements {unmet} of pyproject.toml's [build-system] "
                       "(pip install -e '.[dev]' installs them)")
    with tempfile.TemporaryDirectory(prefix="prefix_kernels_install_") as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", ROOT])
        (sdist,), (wheel,) = (tmp / "dist").glob("*.tar.gz"), (tmp / "dist").glob("*.whl")
        with tarfile.open(sdist) as archive:
            assert CPP <= {Path(n).name for n in archive.getnames() if Path(n).parent.name == "csrc"}
        with zipfile.ZipFile(wheel) as archive:
            assert CPP <= {Path(n).name for n in archive.namelist() if n.startswith("prefix_kernels/_csrc/")}

        venv = tmp / "venv"
        _run([sys.executable, "-m", "venv", venv])
        python = venv / "bin" / "python"
        purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout
        purelib = Path(purelib.strip())
        # torch and friends from this interpreter, after the venv's own site-packages
        (purelib / "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel])

        work = tmp / "elsewhere"
        work.mkdir()
        env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "PREFIX_KERNELS_DISABLE_CPU_EXT")}
        env["PREFIX_KERNELS_BUILD_DIR"] = str(tmp / "build")
        # ninja (the executable torch's JIT build runs) lives next to this interpreter
        path = [str(venv / "bin"), str(Path(sys.executable).parent), env.get("PATH", os.defpath)]
        env["PATH"] = os.pathsep.join(path)
        result = _run([python, "-c", textwrap.dedent(CHECK)], cwd=work, env=env)
        assert result.stdout.startswith("ok"), result.stdout
