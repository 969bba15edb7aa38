"""Host C++ through tvm-ffi's ninja builder; loaded with tvm_ffi.load_module (no TVM needed)."""

from __future__ import annotations

import functools
import platform
import shutil
import subprocess
from pathlib import Path

from ..errors import BuildError
from ..source import KernelSource
from . import LIBRARY


@functools.lru_cache(maxsize=1)
def version() -> str:
    """The host compiler's version and the CPU model (kernels are built with -march=native)."""
    cxx = shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise BuildError(f"no working host C++ compiler ({cxx}): {e}") from None
    return f"{first} | {_cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line.split(":", 1)[1].strip()[:2000]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compile(source: KernelSource, out_dir: Path) -> dict:
    import tvm_ffi.cpp

    build_dir = out_dir / "build"
    try:
        lib = tvm_ffi.cpp.build_inline(
            "kernel",
            cpp_sources=source.text,
            extra_cflags=list(source.flags),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as e:  # tvm-ffi raises RuntimeError with ninja's output
        raise BuildError("host C++ compilation failed", command="ninja (tvm_ffi.cpp.build_inline)", source_path=str(build_dir / "main.cpp"), log=str(e)) from None
    shutil.copy2(lib, out_dir / LIBRARY)
    shutil.rmtree(build_dir, ignore_errors=True)
    return {}


class _Module:
    """forward/backward of a loaded tvm-ffi module; torch tensors go straight in (DLPack)."""

    def __init__(self, path: Path):
        import tvm_ffi

        self._mod = tvm_ffi.load_module(str(path))
        self.forward = self._mod["forward"]
        self.backward = self._mod["backward"]


def load(path: Path) -> _Module:
    return _Module(path)
