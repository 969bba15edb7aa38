"""Host C++ through tvm-ffi's ninja builder; loaded with tvm_ffi.load_module (no TVM needed)."""

from __future__ import annotations

import functools
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import torch

from .. import settings
from ..cpu_isas import cpuinfo
from ..errors import BuildError
from ..source import KernelSource
from . import LIBRARY, precompiled_header


def host_cxx() -> tuple[str, ...]:
    """The host C++ compiler's command words: $CXX (which may carry a launcher or flags, as in
    'ccache c++'), else c++; what tvm-ffi's ninja builder runs. A set but empty CXX is refused:
    ninja would run it."""
    words = tuple(shlex.split(os.environ.get("CXX", "c++")))
    if not words:
        raise BuildError("no working host C++ compiler: CXX is set but empty (unset it, or name a compiler)")
    return words


def version() -> str:
    """The host compiler's path and version line (both: a wrapper script that adds flags reports
    the version of the compiler it wraps)."""
    return _version_of(host_cxx())


@functools.lru_cache(maxsize=8)
def _version_of(cxx: tuple[str, ...]) -> str:
    program, *args = cxx
    command = [shutil.which(program) or program, *args]
    try:
        return f"{shlex.join(command)}: " + subprocess.run([*command, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise BuildError(f"no working host C++ compiler ({shlex.join(cxx)}): {e}") from None


def built_for(source: KernelSource) -> str:
    """What a library built here is specific to beyond its source and flags: this CPU where the
    flags say -march=native; nothing for a named instruction set (-march=x86-64-v3)."""
    return host_cpu() if "-march=native" in source.flags else ""


def host_cpu() -> str:
    """This CPU's model name and feature flags: what -march=native compiles for."""
    found = [cpuinfo()[k] for k in ("model name", "flags") if cpuinfo().get(k)]
    return " | ".join(found) if found else platform.processor() or platform.machine()


# DCNGEN_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer (float-cast-overflow too: an
# out-of-range float -> int conversion of a sampling location is exactly the bug to catch), every
# report fatal. Loading such a library needs the ASan runtime first: LD_PRELOAD="$(gcc
# -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)" (libstdc++ too, or ASan's
# __cxa_throw interceptor aborts on the first C++ exception torch throws) and
# ASAN_OPTIONS=detect_leaks=0 (Python leaks by design).
# -O1: an -O3 sanitized build takes ~20 s; -g1 (line tables, all a report's stack needs): -g takes 1.5x
SANITIZE_FLAGS = ("-fsanitize=address,undefined,float-cast-overflow", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g1", "-O1")
SANITIZE_LDFLAGS = ("-fsanitize=address,undefined,float-cast-overflow",)


def compile(source: KernelSource, out_dir: Path, include_paths: tuple[str, ...] = (), sanitize_flags: tuple[str, ...] = SANITIZE_FLAGS) -> dict:
    """out_dir/kernel.so from the source through tvm-ffi's builder, taking the tvm-ffi headers
    precompiled where the compiler can (precompiled_header.py); returns the flags it used."""
    build_dir = out_dir / "build"
    sanitize = settings.sanitize()
    flags = [*source.flags, *(sanitize_flags if sanitize else ())]
    # the entry points' checks name their file (__FILE__): the same name in every build directory
    # keeps libraries of one source bit-identical
    prefix_map = f"-fmacro-prefix-map={build_dir}=dcngen"
    ldflags = ["-fopenmp", *(SANITIZE_LDFLAGS if sanitize else ())]
    pch = precompiled_header.include_flags(host_cxx(), version(), flags)
    try:
        lib = _build_inline(source, build_dir, [*flags, prefix_map, *pch], ldflags, include_paths)
    except BuildError:
        if not pch:
            raise
        pch = []  # its folder went meanwhile (dcngen clean): parse the headers
        lib = _build_inline(source, build_dir, [*flags, prefix_map], ldflags, include_paths)
    shutil.copy2(lib, out_dir / LIBRARY)
    shutil.rmtree(build_dir, ignore_errors=True)
    return {"sanitize": sanitize, "cflags": [*flags, prefix_map, *pch], "ldflags": ldflags}


def _build_inline(source: KernelSource, build_dir: Path, cflags: list[str], ldflags: list[str], include_paths: tuple[str, ...]) -> str:
    import tvm_ffi.cpp

    try:
        return tvm_ffi.cpp.build_inline(
            "kernel",
            cpp_sources=source.text,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=list(include_paths),
            build_directory=str(build_dir),
        )
    except Exception as e:  # tvm-ffi raises RuntimeError with ninja's output
        command = f"ninja (tvm_ffi.cpp.build_inline) c++ {' '.join(cflags)} ... {' '.join(ldflags)}"
        raise BuildError("host C++ compilation failed", command=command, source_path=str(build_dir / "main.cpp"), log=str(e)) from None


def asan_runtime_loaded() -> bool:
    """Whether this process runs with the AddressSanitizer runtime (needed to load a sanitized library)."""
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


class _Module:
    """forward/backward of a loaded tvm-ffi module; torch tensors go straight in (DLPack).

    The kernels run on their own OpenMP threads; their number follows torch.get_num_threads(),
    passed to the library whenever it changed since the last call."""

    def __init__(self, path: Path):
        import tvm_ffi

        self._mod = tvm_ffi.load_module(str(path))
        self._forward, self._forward_new, self._backward = self._mod["forward"], self._mod["forward_new"], self._mod["backward"]
        self._set_num_threads = self._mod["set_num_threads"]
        self._threads = 0

    def _follow_torch_threads(self) -> None:
        threads = torch.get_num_threads()
        if threads != self._threads:
            self._set_num_threads(threads)
            self._threads = threads

    def forward(self, *tensors) -> None:
        self._follow_torch_threads()
        self._forward(*tensors)

    def forward_new(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """forward into a new (N, Ho, Wo, G*C) tensor that the library allocates through torch's allocator."""
        self._follow_torch_threads()
        return self._forward_new(x, offset, mask)

    def backward(self, *tensors) -> None:
        self._follow_torch_threads()
        self._backward(*tensors)


def load(path: Path, sanitized: bool = False) -> _Module:
    """Load a built library. A sanitized one without the ASan runtime in the process would abort
    the interpreter, so that is refused with a clear error instead."""
    if sanitized:
        require_asan_runtime(path)
    return _Module(path)


def require_asan_runtime(path: Path) -> None:
    """Raise BuildError unless this process can load the sanitized library at `path`."""
    if not asan_runtime_loaded():
        raise BuildError(
            f"{path} was built with DCNGEN_SANITIZE=1 and needs the AddressSanitizer runtime: run Python with "
            "LD_PRELOAD=\"$(gcc -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)\" "
            "ASAN_OPTIONS=detect_leaks=0, or unset DCNGEN_SANITIZE"
        )
