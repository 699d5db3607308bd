"""Ships the C++ sources of the CPU op inside the package (configuration: pyproject.toml).

The sources stay in the checkout's top-level csrc/ (MANIFEST.in puts them in the sdist); building
a wheel copies them to prefix_kernels/_csrc/, where prefix_kernels/cpu.py compiles them on first
use against the torch the user has (why not a prebuilt extension: README.md). An editable install
copies nothing: cpu.py reads the checkout's csrc/.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path("csrc")  # setuptools runs this file from the project root (or the unpacked sdist)


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))
        if not sources:
            raise FileNotFoundError(f"no C++ sources (*.cpp, *.h) in {CSRC.resolve()}: the package "
                                    "would lack its CPU op (an sdist must include csrc/, see MANIFEST.in)")
        target = Path(self.build_lib) / "prefix_kernels" / "_csrc"
        self.mkpath(str(target))
        for source in sources:
            self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildPyWithCsrc})
