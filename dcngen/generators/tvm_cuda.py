"""TVM backend, CUDA: TVM compiles the definitions of dcngen/tvm_defs/ for the CUDA target;
its kernel source plus our launcher (the template backend's tvm-ffi ABI) is a KernelSource
of language "cuda", built by dcngen/compilers/cuda.py and run without TVM.

TVM's kernels take their buffers in alphabetical order of buffer names, then the shape
variables (also alphabetical); the launcher reads each kernel's signature from the source and
passes every parameter by name, so a reordering in TVM cannot silently swap arguments.
Grid sizes are the same work-item counts tvm_defs binds to blockIdx.x * threads + threadIdx.x.
"""

from __future__ import annotations

import json
import re

from ..config import DCNConfig
from ..errors import BuildError
from ..source import KernelSource
from .jinja import render
from .template_cuda import entry_align

FLAGS = ("-O3", "-std=c++17", "-lineinfo")

# Kernel parameter name -> launcher expression (`p` is the Problem; pointers are void*).
POINTERS = {
    "x_ptr": "p.x", "om_ptr": "p.offset", "off_ptr": "p.offset", "msk_ptr": "p.mask", "out_ptr": "out",
    "gout_ptr": "grad_out", "gx_ptr": "grad_x", "gom_ptr": "grad_offset", "goff_ptr": "grad_offset",
    "gmsk_ptr": "grad_mask", "gxacc_ptr": "workspace",
}
SCALARS = {"N": "int(p.N)", "H": "p.H", "W": "p.W", "Ho": "p.Ho", "Wo": "p.Wo", "Cpad": "int(p.off_stride)"}

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(([^)]*)\)\s*;')


def kernel_signatures(cuda_source: str) -> dict[str, list[tuple[str, str]]]:
    """TVM's forward declarations -> {kernel name: [(C type, parameter name), ...]}."""
    kernels = {}
    for m in _SIGNATURE.finditer(cuda_source):
        params = []
        for decl in filter(None, (d.strip() for d in m.group(3).split(","))):
            decl = decl.replace("__restrict__", " ")
            ctype, name = decl.rsplit(None, 1)
            params.append((" ".join(ctype.split()), name))
        kernels[m.group(2)] = params
    return kernels


def _launch(kernel: str, params: list[tuple[str, str]], work: str, threads: int) -> str:
    args = []
    for ctype, name in params:
        if name in POINTERS:
            args.append(f"static_cast<{ctype}>(const_cast<void*>({POINTERS[name]}))")
        elif name in SCALARS:
            args.append(SCALARS[name])
        else:
            raise BuildError(f"TVM kernel {kernel} takes an unexpected parameter {ctype} {name}; the launcher cannot supply it")
    return f"""  {{
    const int64_t work = {work};
    if (work > 0) {{
      const int64_t blocks = (work + {threads} - 1) / {threads};
      if (blocks > 0x7fffffff) return "{kernel}: grid too large";
      {kernel}<<<unsigned(blocks), {threads}, 0, stream>>>({", ".join(args)});
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return std::string("{kernel}: ") + cudaGetErrorString(e);
    }}
  }}
"""


def generate(cfg: DCNConfig, params: dict) -> KernelSource:
    """CUDA KernelSource for cfg: TVM's kernels + launchers + tvm-ffi entry points."""
    import tvm

    from .tvm_gen import ir_module

    # only the device source is used: a C host module (not llvm) is quicker and does not warn about
    # the launch pragmas of TVM's host code
    target = {"kind": "cuda", "arch": cfg.arch, "host": {"kind": "c"}}
    # CSE off: with it TVM hoists index products into extra kernel parameters computed by its
    # own host code, which our launcher does not run.
    try:
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_cse_tir": True}):
            ex = tvm.compile(ir_module(cfg, params), target=target)
    except Exception as e:  # noqa: BLE001  (TVM raises its own error types from C++)
        raise BuildError(f"TVM could not generate CUDA code for {cfg.key} with {params}: {str(e).strip().splitlines()[-1]}") from e
    kernels_src = ex.mod.imports[0].inspect_source()
    sigs = kernel_signatures(kernels_src)
    G, C, threads, vec = cfg.group, cfg.group_channels, params["threads"], params["vec"]
    direct = cfg.dtype in ("float32", "float64")
    xs, outs, pix = "p.N * p.H * p.W * int64_t(GC)", "p.N * p.Ho * p.Wo", "p.N * p.Ho * p.Wo"
    expected = ["forward_kernel", "backward_kernel", "backward_kernel_1"] + ([] if direct else ["backward_kernel_2"])
    if sorted(sigs) != sorted(expected):
        raise BuildError(f"TVM emitted kernels {sorted(sigs)}, expected {expected}")
    fwd = _launch("forward_kernel", sigs["forward_kernel"], f"{outs} * {G * (C // vec)}", threads)
    bwd = _launch("backward_kernel", sigs["backward_kernel"], xs, threads)
    bwd += _launch("backward_kernel_1", sigs["backward_kernel_1"], f"{pix} * {G}", threads)
    if not direct:
        bwd += _launch("backward_kernel_2", sigs["backward_kernel_2"], xs, threads)
    text = render(
        "cuda/tvm_launcher.cu.j2", cfg, tvm_source=kernels_src, forward_launch=fwd, backward_launch=bwd, GC=cfg.channels,
        direct="true" if direct else "false", itemsize=cfg.itemsize, emulate=False,
        entry_align=entry_align(cfg, vec, vec, 1),  # TVM's kernels access x and out `vec` elements at a time, the gradients by element
    )
    return KernelSource(
        config=cfg,
        language="cuda",
        text=text,
        flags=(*FLAGS, f"-arch={cfg.arch}"),
        params=tuple(sorted(params.items())),
        extra=json.dumps({"launch": {"threads": threads, "vec": vec, "kernels": sorted(sigs)}, "tvm_target": target}),
    )
