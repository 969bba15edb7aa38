"""CUDA sources through nvcc: a self-contained .so (static cudart, no libtorch) loaded by tvm-ffi.

`compile` also records ptxas's per-kernel resource report (registers, spills, stack, shared
memory) in the artifact metadata; `ptxas_report` gets the same report from a device-only compile.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BuildError
from ..source import KernelSource
from . import LIBRARY, cpp, tvm_ffi_include_paths
from .alignment import aligned, aligned_outputs

DEFAULT_CUDA_HOME = "/usr/local/cuda"
REPORT_FLAGS = ("-Xptxas", "-v")
QUIET_FLAGS = ("-diag-suppress", "177")  # unused constexpr constants of other configurations


def cuda_home() -> str:
    """$CUDA_HOME (set to the toolkit root if unset), else the nvcc on PATH's toolkit."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        if Path(DEFAULT_CUDA_HOME, "bin", "nvcc").is_file():
            home = DEFAULT_CUDA_HOME
        elif (nvcc := shutil.which("nvcc")) is not None:
            home = str(Path(nvcc).resolve().parents[1])
        else:
            raise BuildError("no CUDA toolkit: set CUDA_HOME or put nvcc on PATH")
        os.environ["CUDA_HOME"] = home
    return home


def nvcc() -> str:
    path = Path(cuda_home(), "bin", "nvcc")
    if not path.is_file():
        raise BuildError(f"nvcc not found at {path} (CUDA_HOME={cuda_home()})")
    return str(path)


def version() -> str:
    """nvcc's release line, e.g. 'Cuda compilation tools, release 13.0, V13.0.88', and the host C++
    compiler's (cpp.version), which builds the entry points and links the library."""
    return f"{_nvcc_version(nvcc())} | host {cpp.version()}"


@functools.lru_cache(maxsize=4)
def _nvcc_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"nvcc does not run: {e}") from None
    lines = [line for line in out.splitlines() if line.strip()]
    return " | ".join(lines[-2:])


def built_for(source: KernelSource) -> str:
    """Nothing beyond source and flags: the architecture is one of the flags."""
    return ""


def _tvm_ffi_library_dir() -> str:
    from tvm_ffi import libinfo

    return str(Path(libinfo.find_libtvm_ffi()).parent)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> dict[str, str]:
    """{symbol: its demangled C++ name} (by c++filt; the symbols themselves where it is missing)."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log: str) -> list[dict]:
    """ptxas -v output -> one dict per (kernel, arch): kernel (short name), symbol, arch,
    registers, spill_stores, spill_loads, stack, shared (bytes)."""
    kernels: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"symbol": m.group(1), "arch": m.group(2), "registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 0}
            kernels.append(current)
        elif current is not None and (m := _STACK.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                current["shared"] = int(s.group(1))
    names = demangle([k["symbol"] for k in kernels])
    for k in kernels:
        name, _, template_args = names[k["symbol"]].split("(")[0].partition("<")  # "void dcn::f", "false>"
        k["kernel"] = name.rsplit("::", 1)[-1]
        k["instance"] = k["kernel"] + ("<" + template_args if template_args else "")
    return kernels


def _run(cmd: list[str], source_path: Path, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed", command=" ".join(cmd), source_path=str(source_path), log=proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def compile(source: KernelSource, out_dir: Path) -> dict:
    """out_dir/kernel.so from the one source text compiled twice, in parallel: nvcc for the
    kernels and their launchers, the host C++ compiler for the tvm-ffi entry points; linked with
    the static CUDA runtime and libtvm_ffi only (no libtorch). Returns {'ptxas': [...]}."""
    includes, libdir = tvm_ffi_include_paths(), _tvm_ffi_library_dir()
    out_dir = Path(out_dir)
    build = Path(tempfile.mkdtemp(prefix="build-", dir=out_dir))
    try:
        cu, cc = build / "kernel.cu", build / "entry.cc"
        cu.write_text(source.text)
        cc.write_text(source.text)
        nvcc_cmd = [nvcc(), *source.flags, "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", *REPORT_FLAGS, *QUIET_FLAGS, "-c", str(cu), "-o", str(build / "kernel.o")]
        cxx_cmd = [*cpp.host_cxx(), "-x", "c++", "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", f"-fmacro-prefix-map={build}=dcngen",
                   *(f"-I{p}" for p in includes), "-c", str(cc), "-o", str(build / "entry.o")]
        procs = [(cmd, path, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for cmd, path in ((nvcc_cmd, cu), (cxx_cmd, cc))]
        logs = []
        for cmd, path, proc in procs:
            log = proc.communicate()[0]
            if proc.returncode != 0:
                raise BuildError("CUDA build failed", command=" ".join(cmd), source_path=str(path), log=log)
            logs.append(log)
        link = [*cpp.host_cxx(), "-shared", str(build / "kernel.o"), str(build / "entry.o"), "-o", str(out_dir / LIBRARY),
                f"-L{Path(cuda_home(), 'lib64')}", "-lcudart_static", "-ldl", "-lpthread", "-lrt", f"-L{libdir}", "-ltvm_ffi"]
        _run(link, cu, "link")
        return {"ptxas": parse_ptxas(logs[0])}
    finally:
        shutil.rmtree(build, ignore_errors=True)


def ptxas_report(source: KernelSource, archs: tuple[str, ...] | None = None, warnings_fail: bool = False) -> list[dict]:
    """Device-only compile of the kernels for `archs` (default: the source's own -arch), with the
    same device code and flags as `compile` (warnings_fail: any compiler warning is a BuildError);
    returns parse_ptxas's list."""
    flags = [f for f in source.flags if not f.startswith("-arch=")]
    arch_flags = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs] if archs else [f for f in source.flags if f.startswith("-arch=")]
    with tempfile.TemporaryDirectory(prefix="dcngen-ptxas-") as tmp:
        src = Path(tmp) / "kernel.cu"
        src.write_text(source.text)
        strict = ("-Werror", "all-warnings") if warnings_fail else ()
        cmd = [nvcc(), *flags, *arch_flags, *REPORT_FLAGS, *QUIET_FLAGS, *strict, "-fatbin", str(src), "-o", str(Path(tmp) / "kernel.fatbin")]
        return parse_ptxas(_run(cmd, src, "nvcc (device only)"))


class _Module:
    """forward/backward of a loaded CUDA artifact, called with torch CUDA tensors.

    The kernels run on the tvm-ffi environment stream, which tvm-ffi sets to torch's current
    stream of the tensors' device for the duration of each call; backward gets its workspace from
    torch's caching allocator.
    """

    def __init__(self, path: Path):
        import tvm_ffi

        self._mod = tvm_ffi.load_module(str(path))
        self._forward = self._mod["forward"]
        self._backward = self._mod["backward_with_workspace"]
        self._workspace_size = self._mod["workspace_size"]

    def forward(self, x, offset, mask, out) -> None:
        """x (N, H, W, G*C); offset/mask (N, Ho, Wo, *); out (N, Ho, Wo, G*C), written."""
        (x,) = aligned((x,), VECTOR_ALIGN)
        with aligned_outputs((out,), VECTOR_ALIGN) as (out,):
            self._forward(x, offset, mask, out)

    def backward(self, x, offset, mask, grad_out, grad_x, grad_offset, grad_mask) -> None:
        """Writes grad_x (like x) and the group slices of grad_offset/grad_mask (like offset/mask)."""
        import torch

        nbytes = int(self._workspace_size(x.numel())) or 1
        buffer = torch.empty(nbytes + WORKSPACE_ALIGN, dtype=torch.uint8, device=x.device)
        start = -buffer.data_ptr() % WORKSPACE_ALIGN  # CUDA allocations are aligned already, host ones may not be
        ws = buffer[start : start + nbytes]
        x, grad_out = aligned((x, grad_out), VECTOR_ALIGN)
        with aligned_outputs((grad_x,), VECTOR_ALIGN) as (grad_x,):
            self._backward(x, offset, mask, grad_out, grad_x, grad_offset, grad_mask, ws)


VECTOR_ALIGN = 16  # bytes; the kernels' widest vector access of x, out, grad_out and grad_x
WORKSPACE_ALIGN = 256  # bytes; the alignment the entry points require of the workspace


def load(path: Path) -> _Module:
    return _Module(path)
