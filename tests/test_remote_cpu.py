"""The CPU of an RPC server (dcngen/remote_cpu.py): the probe run on a loopback server reports this
machine, and the check that a server runs the kernels built here for a CPU target."""

from __future__ import annotations

import dataclasses

import pytest

from dcngen import records
from dcngen.cpu_isas import best_level, host_features, is_x86_64, required_features
from dcngen.errors import DCNGenError
from dcngen.remote_cpu import ServerCpu, require_runs, server_cpu


@pytest.fixture(scope="module")
def here() -> ServerCpu:
    """This machine, as the probe reports it through a loopback RPC server."""
    pytest.importorskip("tornado")
    from tvm import rpc
    from tvm.rpc.server import Server

    server = Server("127.0.0.1", port=9700, port_end=9990, silent=True)
    try:
        yield server_cpu(rpc.connect("127.0.0.1", server.port, session_timeout=120))
    finally:
        server.terminate()


def test_the_probe_reports_this_machine(here):
    assert here.machine == records.machine("cpu")  # model name and cores: what records are filed under
    assert here.features == host_features()
    assert here.hardware.lower() in ("x86_64", "amd64", "aarch64", "arm64")


@pytest.mark.skipif(not is_x86_64(), reason="named levels are x86-64 levels")
def test_servers_that_cannot_run_the_kernels_are_refused(here):
    require_runs("cpu", here)  # this machine runs what it builds
    require_runs("cpu:x86-64-v2", here)
    other = dataclasses.replace(here, model="Other CPU 9000")
    with pytest.raises(DCNGenError, match="server's CPU is 'Other CPU 9000', but target cpu builds for this machine's"):
        require_runs("cpu", other)
    require_runs("cpu:x86-64-v2", other)  # a named level runs on any CPU with its features
    without_avx2 = dataclasses.replace(other, features=here.features - {"avx2", "fma"})
    with pytest.raises(DCNGenError, match=r"lacks avx2, fma of cpu:x86-64-v3: name a level"):
        require_runs("cpu:x86-64-v3", without_avx2)
    with pytest.raises(DCNGenError, match="runs on x86-64 CPUs only, and the RPC server's is aarch64"):
        require_runs("cpu:x86-64-v2", dataclasses.replace(here, hardware="aarch64"))
    level = best_level(host_features())
    if level == "x86-64":
        pytest.skip("this CPU has no x86-64 level above the first")
    newest = required_features(level)[-1]
    hidden = dataclasses.replace(here, features=here.features - {newest})  # a virtual machine of this model that hides a feature
    with pytest.raises(DCNGenError, match=f"lacks {newest} of this machine's level, {level}, which -march=native uses"):
        require_runs("cpu", hidden)
