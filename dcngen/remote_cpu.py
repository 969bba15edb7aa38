"""The CPU of a TVM RPC server that times CPU kernels for `dcngen tune --rpc-tracker`.

A small library (templates/cpu/machine_probe.cc), built here without machine-specific flags, is
uploaded to the server and reports its /proc/cpuinfo, its cores and its hardware name. Tuning then
checks that the server runs the kernels built here, and files the timings under the server's CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import records
from .cpu_isas import best_level, host_features, is_x86_64, lacking, parse_cpuinfo
from .errors import BuildError, DCNGenError
from .settings import TEMPLATE_DIR

PROBE_SOURCE = TEMPLATE_DIR / "cpu" / "machine_probe.cc"


@dataclass(frozen=True)
class ServerCpu:
    model: str  # /proc/cpuinfo's model name, else the hardware name
    cores: int  # the cores the server process may run on
    features: frozenset[str]  # /proc/cpuinfo's flags
    hardware: str  # uname -m

    @property
    def machine(self) -> dict:
        """The records.machine() dict of the server."""
        return {"cpu": self.model, "cores": self.cores}


def probe_library() -> Path:
    """The probe, built once into tvm-ffi's cache (keyed by its source and flags)."""
    import tvm_ffi.cpp

    try:
        return Path(tvm_ffi.cpp.build_inline("dcngen_machine_probe", cpp_sources=PROBE_SOURCE.read_text(), extra_cflags=["-O1"]))
    except Exception as e:  # tvm-ffi raises RuntimeError with ninja's output
        raise BuildError("the RPC server's CPU probe did not build", source_path=str(PROBE_SOURCE), log=str(e)) from None


def server_cpu(session) -> ServerCpu:
    """The CPU of the server behind a tvm.rpc session: the probe runs there."""
    session.upload(str(probe_library()), "dcngen_machine_probe.so")
    probe = session.load_module("dcngen_machine_probe.so")
    fields, hardware = parse_cpuinfo(str(probe["cpuinfo"]())), str(probe["hardware"]())
    return ServerCpu(model=fields.get("model name") or hardware, cores=int(probe["cores"]()),
                     features=frozenset(fields.get("flags", "").split()), hardware=hardware)


def require_runs(target: str, server: ServerCpu) -> None:
    """DCNGenError unless `server` runs CPU kernels built here for `target`: for 'cpu'
    (-march=native) a server of this machine's CPU model with every feature of this CPU's x86-64
    level (a virtual machine may hide some); for 'cpu:<level>' an x86-64 server with the level's features."""
    level = target.partition(":")[2]
    if not level:
        here = records.cpu_model()
        if server.model != here:
            raise DCNGenError(f"the RPC server's CPU is {server.model!r}, but target cpu builds for this machine's "
                              f"{here!r} (-march=native): tune on servers of this CPU model, or name an "
                              "x86-64 level the servers have (--target cpu:x86-64-v3)")
        if not is_x86_64():
            return
        level = best_level(host_features())
    elif not is_x86_64(server.hardware):
        raise DCNGenError(f"a kernel built for cpu:{level} runs on x86-64 CPUs only, and the RPC server's is {server.hardware or 'unknown'}")
    missing = lacking(level, server.features)
    if missing:
        built = f"this machine's level, {level}, which -march=native uses" if target == "cpu" else target
        raise DCNGenError(f"the RPC server's CPU ({server.model}) lacks {', '.join(missing)} of {built}: "
                          "name a level the servers have (--target cpu:x86-64-v3), or tune on other servers")
