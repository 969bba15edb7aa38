"""Property-based fuzzing of every available CPU backend against the float64 reference.

Each test draws random inputs (shapes, offsets from tiny fractions to far outside the image,
integer offsets, DCNv4 padding channels holding garbage) for one config of a bounded, seeded
pool, runs the loaded kernel with NaN-poisoned outputs and the torch op (forward and autograd
backward), and compares everything with dcngen.reference in float64.

CI (default): DCNGEN_FUZZ_CONFIGS=20 template configs (+ DCNGEN_FUZZ_TVM_CONFIGS=6 for the TVM
backend when dcngen/generators/tvm_gen.py exists), DCNGEN_FUZZ_CASES=320 cases over the template
pool and as many per config for TVM, derandomized (the same cases every run).
Long run (documented in benchmarks/long_fuzz.py, which also writes a JSON summary):

    DCNGEN_FUZZ_CONFIGS=120 DCNGEN_FUZZ_CASES=10000 DCNGEN_FUZZ_SEED=1 pytest tests/test_fuzz.py -q

DCNGEN_FUZZ_RANDOM=1 draws fresh examples each run instead of the derandomized ones.

The CUDA kernels run the same way on the SIMT emulator (skipped without the CUDA toolkit's
headers): the tensor-core ones (fwd_mma, mma, bwd_mma: random tiles, warps, halos, tiles per
block), DCNGEN_FUZZ_TC_CONFIGS=6 bf16 configs of DCNGEN_FUZZ_TC_CASES=6 cases each, and the
per-point ones with random launch parameters (tests/fuzzkit.py simt_pool),
DCNGEN_FUZZ_SIMT_CONFIGS=4 configs of DCNGEN_FUZZ_SIMT_CASES=6 cases each.
"""

from __future__ import annotations

import os
import random

import pytest
from helpers import needs_cuda_toolkit
from fuzzkit import EMULATED_SMS, available_backends, check_case, config_pool, describe, fuzz_cases_total, per_config, random_case, simt_pool, tensor_core_pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CONFIGS = int(os.environ.get("DCNGEN_FUZZ_CONFIGS", 20))
# TVM builds cost more (llvm codegen through TVM): a smaller pool by default, same cases per config
TVM_CONFIGS = int(os.environ.get("DCNGEN_FUZZ_TVM_CONFIGS", min(CONFIGS, 6)))
SEED = int(os.environ.get("DCNGEN_FUZZ_SEED", 0))
CASES = fuzz_cases_total(320)  # per template pool
PER_CONFIG = per_config(CASES, CONFIGS)
BACKENDS = available_backends()
POOL = [cfg for b in BACKENDS for cfg in config_pool(TVM_CONFIGS if b == "tvm" else CONFIGS, SEED, [b])]
RANDOM = os.environ.get("DCNGEN_FUZZ_RANDOM", "") not in ("", "0")


def test_ci_subset_is_large_enough():
    assert PER_CONFIG * len(POOL) >= 300
    assert {c.dtype for c in POOL} == {"float64", "float32", "float16", "bfloat16"}
    assert {c.op for c in POOL} == {"dcnv4", "dcnv3"}


@pytest.mark.parametrize("cfg", POOL, ids=[c.key for c in POOL])
def test_fuzz_against_reference(cfg):
    @settings(max_examples=PER_CONFIG, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(seed=st.integers(0, 2**62))
    def run(seed):
        case = random_case(cfg, random.Random(seed))
        problems = check_case(cfg, case)
        assert not problems, describe(cfg, case) + "\n" + "\n".join(problems)

    run()


TC_POOL = tensor_core_pool(int(os.environ.get("DCNGEN_FUZZ_TC_CONFIGS", 6)), SEED)
TC_CASES = int(os.environ.get("DCNGEN_FUZZ_TC_CASES", 6))
SIMT_POOL = simt_pool(int(os.environ.get("DCNGEN_FUZZ_SIMT_CONFIGS", 4)), SEED)
SIMT_CASES = int(os.environ.get("DCNGEN_FUZZ_SIMT_CASES", 6))


def _fuzz_on_the_emulator(cfg, cases: int, monkeypatch) -> None:
    """`cases` random cases of cfg's emulated kernel; each also runs the blocks' warps in an order of
    its own (DCN_EMULATE_SEED) on a device of 1, 132 or 4096 multiprocessors (DCN_EMULATE_SMS: the
    launchers size some grids and blocks by it)."""
    from dcngen.kernels import emulated_kernel

    kernel = emulated_kernel(cfg)

    @settings(max_examples=cases, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(seed=st.integers(0, 2**62))
    def run(seed):
        case = random_case(cfg, random.Random(seed))
        monkeypatch.setenv("DCN_EMULATE_SEED", str(seed))
        monkeypatch.setenv("DCN_EMULATE_SMS", str(random.Random(seed).choice(EMULATED_SMS)))
        problems = check_case(cfg, case, via_ops=False, kernel=kernel)
        assert not problems, describe(cfg, case) + "\n" + "\n".join(problems)

    run()


@needs_cuda_toolkit
@pytest.mark.parametrize("cfg", TC_POOL, ids=[c.key for c in TC_POOL])
def test_fuzz_tensor_core_kernels_on_the_emulator(cfg, monkeypatch):
    _fuzz_on_the_emulator(cfg, TC_CASES, monkeypatch)


@needs_cuda_toolkit
@pytest.mark.parametrize("cfg", SIMT_POOL, ids=[c.key for c in SIMT_POOL])
def test_fuzz_simt_kernels_on_the_emulator(cfg, monkeypatch):
    _fuzz_on_the_emulator(cfg, SIMT_CASES, monkeypatch)
