"""The GPU scripts' parameter sets are ones the generator accepts (benchmarks/gpu_check.py,
benchmarks/device_check.sh). The scripts skip a check, a benchmark row or a sweep candidate whose
config the generator rejects, so a renamed or newly rejected parameter would drop it silently, and
a GPU machine is lent too rarely to find out there. Checked for sm_90 (H100 / H200), without a GPU:
only the generator's launch parameters, no build."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from dcngen.config import DCNConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check(monkeypatch_module):
    monkeypatch_module.setenv("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # what its import sets; undone after this module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    # "cuda" is the visible GPU's architecture there; here, the H100 / H200's
    monkeypatch_module.setattr(gpu_check, "cuda_cfg", lambda **kw: DCNConfig(**{"target": "cuda:sm_90", **kw}))
    return gpu_check


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_check_runs_in_some_dtype(gpu_check):
    for name, kw, _ in gpu_check.CHECKS:
        assert any(gpu_check.applies(kw, dt) for dt in gpu_check.CHECK_DTYPES), f"check {name!r}: {kw} is rejected in every dtype"


def test_every_benchmark_and_sweep_candidate_runs_in_some_dtype(gpu_check):
    for name, kw, _ in gpu_check.BENCH + [gpu_check.SMALL_OFFSETS[:3]]:
        for params in gpu_check.BENCH_PARAMS:
            assert gpu_check.applies({**kw, "params": params}, "float16"), f"benchmark {name!r} with {params} is rejected in float16"
    for name, kw, _ in gpu_check.BENCH[:2] + [b for b in gpu_check.BENCH if b[0] in gpu_check.LINE_BOUND_SWEEP]:
        for what, candidates in gpu_check.LINE_BOUND_SWEEP.get(name, gpu_check.SWEEP).items():
            for params in candidates:
                assert any(gpu_check.applies({**kw, "params": params}, dt) for dt in gpu_check.BENCH_DTYPES), \
                    f"sweep {name!r} {what}: {params} is rejected in every dtype"


def test_device_check_parameter_sets_apply(gpu_check):
    """The JSON parameter sets device_check.sh hands to gpu_profile.py (its first benchmark shape, fp16)."""
    script = (BENCHMARKS / "device_check.sh").read_text()
    sets = re.findall(r"'(\{[^']*\})'", script)
    assert len(sets) >= 10, "device_check.sh's parameter sets were not found"
    _, bench_config, _ = gpu_check.BENCH[0]
    for text in sets:
        params = json.loads(text)
        assert gpu_check.applies({**bench_config, "params": params}, "float16"), f"device_check.sh: {text} is rejected"
