// The machine a CPU kernel is timed on, for `dcngen tune` over TVM RPC (dcngen/remote_cpu.py):
// built without machine-specific flags, uploaded to the RPC server and called there.
#include <sched.h>
#include <sys/utsname.h>

#include <fstream>
#include <string>
#include <thread>

#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

namespace {

// The first processor's block of /proc/cpuinfo ("" where there is none).
tvm::ffi::String cpuinfo() {
  std::ifstream in("/proc/cpuinfo");
  std::string text, line;
  while (std::getline(in, line) && !line.empty()) text += line + "\n";
  return text;
}

// The cores this process may run on.
int64_t cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
  return std::thread::hardware_concurrency();
}

// The hardware name (uname -m), e.g. x86_64.
tvm::ffi::String hardware() {
  utsname name;
  return uname(&name) == 0 ? std::string(name.machine) : std::string();
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpuinfo, cpuinfo);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cores, cores);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(hardware, hardware);
