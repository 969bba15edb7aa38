// The tvm-ffi headers of every host entry point (CPU kernels, the host pass of CUDA artifacts,
// emulated CUDA kernels). Parsing them is a large part of a host compile, so host builds with
// GCC also take them precompiled from this file (dcngen/compilers/precompiled_header.py).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
