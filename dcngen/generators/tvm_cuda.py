"""TVM backend, CUDA: TVM compiles the definitions of dcngen/tvm_defs.py for the CUDA target;
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

FLAGS = ("-O3", "-std=c++17", "-lineinfo")
DL_DTYPE = {"float32": "kDLFloat, 32, 1", "float64": "kDLFloat, 64, 1", "float16": "kDLFloat, 16, 1", "bfloat16": "kDLBfloat, 16, 1"}
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}

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

    target = {"kind": "cuda", "arch": cfg.arch}
    # CSE off: with it TVM hoists index products into extra kernel parameters computed by its
    # own host code, which our launcher does not run.
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_cse_tir": True}):
        ex = tvm.compile(ir_module(cfg, params), target=target)
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
    text = _SHELL.format(
        key=cfg.key, tvm_source=kernels_src, forward_launch=fwd, backward_launch=bwd, GC=cfg.channels,
        direct="true" if direct else "false", itemsize=ITEMSIZE[cfg.dtype], vec=vec, dl_dtype=DL_DTYPE[cfg.dtype], dtype=cfg.dtype,
    )
    return KernelSource(
        config=cfg,
        language="cuda",
        text=text,
        flags=(*FLAGS, f"-arch={cfg.arch}"),
        params=tuple(sorted(params.items())),
        extra=json.dumps({"launch": {"threads": threads, "vec": vec, "kernels": sorted(sigs)}, "tvm_target": target}),
    )


_SHELL = """\
// Generated by dcngen (TVM backend, CUDA): {key}
// Kernels emitted by TVM; launchers and tvm-ffi entry points by dcngen. Compiled twice: by nvcc
// (__CUDACC__: kernels and launchers) and by the host C++ compiler (entry points).
#include <stdint.h>
#include <string>

namespace dcn_host {{
struct Problem {{
  const void* x;
  const void* offset;
  const void* mask;
  int64_t N;
  int H, W, Ho, Wo;
  int64_t off_stride, mask_stride;
  int device;
  void* stream;  // cudaStream_t
}};
constexpr int64_t GC = {GC};
constexpr bool DIRECT_GRAD = {direct};  // fp32/fp64: grad_x is its own accumulator
// Each returns "" on success, else the error message.
std::string forward(const Problem& p, const void* out);
std::string backward(const Problem& p, const void* grad_out, const void* grad_x, const void* grad_offset, const void* grad_mask,
                     const void* workspace, int64_t workspace_bytes);
std::string backward_alloc(const Problem& p, const void* grad_out, const void* grad_x, const void* grad_offset, const void* grad_mask);
inline int64_t workspace_bytes(int64_t x_numel) {{ return DIRECT_GRAD ? 0 : (x_numel * 4 + 255) / 256 * 256; }}
}}  // namespace dcn_host

#if defined(__CUDACC__)
#include <cuda_runtime.h>
// ---- TVM-emitted kernels ----
{tvm_source}
// ---- launchers ----
namespace dcn_host {{
namespace {{
struct DeviceGuard {{
  int previous = -1, device;
  explicit DeviceGuard(int d) : device(d) {{
    if (cudaGetDevice(&previous) != cudaSuccess || previous != d) cudaSetDevice(d);
  }}
  ~DeviceGuard() {{
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
  }}
}};
// TVM's kernels index with int32.
bool fits_int32(const Problem& p) {{
  return p.N * p.H * p.W * GC < 0x7fffffff && p.N * p.Ho * p.Wo * (GC > p.off_stride ? GC : p.off_stride) < 0x7fffffff
         && p.N * p.Ho * p.Wo * p.mask_stride < 0x7fffffff;
}}
}}  // namespace

std::string forward(const Problem& p, const void* out) {{
  if (!fits_int32(p)) return "tensors too large for the TVM kernels' 32-bit indexing";
  DeviceGuard guard(p.device);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
{forward_launch}  return {{}};
}}

// Kernels on one stream run in order: zero the accumulator, scatter (atomics), convert.
std::string backward(const Problem& p, const void* grad_out, const void* grad_x, const void* grad_offset, const void* grad_mask,
                     const void* workspace, int64_t ws_bytes) {{
  if (!fits_int32(p)) return "tensors too large for the TVM kernels' 32-bit indexing";
  if (ws_bytes < workspace_bytes(p.N * p.H * p.W * GC)) return "workspace too small";
  DeviceGuard guard(p.device);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
{backward_launch}  return {{}};
}}

std::string backward_alloc(const Problem& p, const void* grad_out, const void* grad_x, const void* grad_offset, const void* grad_mask) {{
  const int64_t bytes = workspace_bytes(p.N * p.H * p.W * GC);
  if (bytes == 0) return backward(p, grad_out, grad_x, grad_offset, grad_mask, nullptr, 0);
  DeviceGuard guard(p.device);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  void* ws = nullptr;
  cudaError_t e = cudaMallocAsync(&ws, size_t(bytes), stream);
  if (e != cudaSuccess) return std::string("cudaMallocAsync (workspace): ") + cudaGetErrorString(e);
  std::string err = backward(p, grad_out, grad_x, grad_offset, grad_mask, ws, bytes);
  e = cudaFreeAsync(ws, stream);
  if (err.empty() && e != cudaSuccess) err = std::string("cudaFreeAsync (workspace): ") + cudaGetErrorString(e);
  return err;
}}
}}  // namespace dcn_host

#else  // ---- tvm-ffi entry points (host C++ pass) ----
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

namespace {{
using tvm::ffi::TensorView;
constexpr DLDataType kDType = {{{dl_dtype}}};
constexpr int64_t kAlign = {itemsize} * {vec} < 16 ? {itemsize} * {vec} : 16;  // vector loads of x / stores of out

void check_tensor(const TensorView& t, const char* name, int device, int64_t align) {{
  TVM_FFI_ICHECK(t.device().device_type == kDLCUDA) << name << " must be a CUDA tensor";
  TVM_FFI_ICHECK(t.device().device_id == device) << name << " is on cuda:" << t.device().device_id << ", x on cuda:" << device;
  TVM_FFI_ICHECK(t.ndim() == 4) << name << " must be 4-d (N, H, W, C), got " << t.ndim() << " dims";
  TVM_FFI_ICHECK(t.dtype() == kDType) << name << " has the wrong dtype for this kernel ({dtype})";
  TVM_FFI_ICHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0) << name << " must be " << align << "-byte aligned";
}}

dcn_host::Problem problem(const TensorView& x, const TensorView& offset, const TensorView& mask, const TensorView& out) {{
  const int dev = x.device().device_id;
  check_tensor(x, "x", dev, kAlign);
  check_tensor(offset, "offset", dev, 1);
  check_tensor(mask, "mask", dev, 1);
  check_tensor(out, "out", dev, kAlign);
  TVM_FFI_ICHECK(x.size(3) == dcn_host::GC && out.size(3) == dcn_host::GC) << "x and the output(-gradient) must have G*C = " << dcn_host::GC << " channels";
  TVM_FFI_ICHECK(out.size(0) == x.size(0) && offset.size(0) == x.size(0) && mask.size(0) == x.size(0)) << "batch sizes differ";
  TVM_FFI_ICHECK(offset.size(1) == out.size(1) && offset.size(2) == out.size(2) && mask.size(1) == out.size(1) && mask.size(2) == out.size(2))
      << "offset and mask must be (N, Ho, Wo, *) like the output";
  dcn_host::Problem p;
  p.x = x.data_ptr(); p.offset = offset.data_ptr(); p.mask = mask.data_ptr();
  p.N = x.size(0); p.H = int(x.size(1)); p.W = int(x.size(2)); p.Ho = int(out.size(1)); p.Wo = int(out.size(2));
  p.off_stride = offset.size(3); p.mask_stride = mask.size(3);
  p.device = dev;
  p.stream = TVMFFIEnvGetStream(kDLCUDA, dev);
  return p;
}}

void check_grads(const dcn_host::Problem& p, const TensorView& x, const TensorView& offset, const TensorView& mask, const TensorView& grad_x,
                 const TensorView& grad_offset, const TensorView& grad_mask) {{
  check_tensor(grad_x, "grad_x", p.device, 1);
  check_tensor(grad_offset, "grad_offset", p.device, 1);
  check_tensor(grad_mask, "grad_mask", p.device, 1);
  for (int i = 0; i < 4; ++i) {{
    TVM_FFI_ICHECK(grad_x.size(i) == x.size(i)) << "grad_x must have x's shape";
    TVM_FFI_ICHECK(grad_offset.size(i) == offset.size(i) && grad_mask.size(i) == mask.size(i)) << "grad_offset/grad_mask must have offset/mask's shapes";
  }}
}}

void raise_if(const std::string& err) {{ TVM_FFI_ICHECK(err.empty()) << err; }}
}}  // namespace

// x (N, H, W, G*C); offset/mask: the op's offset and mask (DCNv4: both the packed offset_mask);
// out (N, Ho, Wo, G*C), every element written.
void dcn_forward(TensorView x, TensorView offset, TensorView mask, TensorView out) {{
  raise_if(dcn_host::forward(problem(x, offset, mask, out), out.data_ptr()));
}}

// grad_x fully written; grad_offset/grad_mask alias like offset/mask, every point's gradient
// written (DCNv4 padding channels untouched). workspace: >= workspace_size(x.numel()) bytes,
// 256-byte aligned, any content.
void dcn_backward_with_workspace(TensorView x, TensorView offset, TensorView mask, TensorView grad_out, TensorView grad_x,
                                 TensorView grad_offset, TensorView grad_mask, TensorView workspace) {{
  const dcn_host::Problem p = problem(x, offset, mask, grad_out);
  check_grads(p, x, offset, mask, grad_x, grad_offset, grad_mask);
  TVM_FFI_ICHECK(workspace.device().device_type == kDLCUDA && workspace.device().device_id == p.device) << "workspace must be on x's device";
  TVM_FFI_ICHECK(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 256 == 0) << "workspace must be 256-byte aligned";
  const int64_t bytes = workspace.numel() * ((workspace.dtype().bits * workspace.dtype().lanes + 7) / 8);
  raise_if(dcn_host::backward(p, grad_out.data_ptr(), grad_x.data_ptr(), grad_offset.data_ptr(), grad_mask.data_ptr(), workspace.data_ptr(), bytes));
}}

void dcn_backward(TensorView x, TensorView offset, TensorView mask, TensorView grad_out, TensorView grad_x,
                  TensorView grad_offset, TensorView grad_mask) {{
  const dcn_host::Problem p = problem(x, offset, mask, grad_out);
  check_grads(p, x, offset, mask, grad_x, grad_offset, grad_mask);
  raise_if(dcn_host::backward_alloc(p, grad_out.data_ptr(), grad_x.data_ptr(), grad_offset.data_ptr(), grad_mask.data_ptr()));
}}

int64_t dcn_workspace_size(int64_t x_numel) {{ return dcn_host::workspace_bytes(x_numel); }}

TVM_FFI_DLL_EXPORT_TYPED_FUNC(forward, dcn_forward);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(backward, dcn_backward);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(backward_with_workspace, dcn_backward_with_workspace);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(workspace_size, dcn_workspace_size);
#endif  // __CUDACC__
"""
