"""CPU kernels built for a named x86-64 level ('cpu:x86-64-v3', ...), not for this machine's CPU:
the code paths of CPUs without AVX-512 (AVX2 + F16C, plain SSE2) run here against the reference,
their libraries use no wider instructions, they are found without a compiler on any machine, and
a CPU that lacks a level's features is refused before anything runs. The template's generic paths
also compile for aarch64 where a cross compiler is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import dcngen.cpu_isas as cpu_isas
import dcngen.compilers.cpp as cpp
from dcngen.build import build, load, source_key
from dcngen.config import DCNConfig
from dcngen.cpu_isas import ISAS, missing_features
from dcngen.errors import ConfigError
from dcngen.generators import generate
from dcngen.verify import TOLERANCE, verify, verify_kernel

RUNNABLE = [isa for isa in ISAS if not missing_features(isa)]
# Per level: float16 at C16 (the F16C / AVX-512 row conversion), bfloat16 at C8, float32 with a tail (C5);
# float16 and bfloat16 rows with tails, staged as zero-padded vectors of 4, 8 or 16 (AVX-512, masked loads);
# rows of 8k + 3 (C3, C11): the backward's input copy converts them whole vectors, then scalars (no block of 4;
# one would write past the row into the padded image's ring).
CASES = [
    (isa, op, dtype, c)
    for isa in ISAS
    for op, dtype, c in (("dcnv4", "float16", 16), ("dcnv3", "bfloat16", 8), ("dcnv4", "float32", 5))
    if isa in ("x86-64", "x86-64-v3") or dtype == "float16"
] + [("x86-64-v3", "dcnv4", "float16", 5), ("x86-64-v3", "dcnv3", "float16", 12), ("x86-64-v4", "dcnv4", "float16", 4),
     ("x86-64-v4", "dcnv3", "float16", 20), ("x86-64-v3", "dcnv4", "bfloat16", 4), ("x86-64-v4", "dcnv4", "bfloat16", 12),
     ("x86-64-v4", "dcnv4", "float16", 3), ("x86-64-v3", "dcnv3", "float16", 11), ("x86-64-v4", "dcnv3", "bfloat16", 11),
     ("x86-64-v3", "dcnv4", "bfloat16", 3)]
# Register names the library of each level must not use (wider vectors than the level has).
TOO_WIDE = {"x86-64": ("ymm", "zmm"), "x86-64-v2": ("ymm", "zmm"), "x86-64-v3": ("zmm",), "x86-64-v4": ()}


def test_targets_are_named_levels():
    assert DCNConfig(target="CPU:X86-64-V3").target == "cpu:x86-64-v3"
    assert DCNConfig(target="cpu:x86-64-v3").cpu_isa == "x86-64-v3"
    assert DCNConfig(target="cpu").cpu_isa is None and DCNConfig(target="cuda:sm_90").cpu_isa is None
    with pytest.raises(ConfigError, match="target.*'avx9'.*cpu:x86-64-v3"):
        DCNConfig(target="cpu:avx9")


@pytest.mark.parametrize("isa, op, dtype, c", CASES, ids=[f"{i}-{o}-{d}-c{c}" for i, o, d, c in CASES])
def test_level_kernels_match_the_reference(isa, op, dtype, c):
    if isa not in RUNNABLE:
        pytest.skip(f"this CPU lacks {', '.join(missing_features(isa))}")
    cfg = DCNConfig(op=op, group=3, group_channels=c, kernel_size=3, dtype=dtype, target=f"cpu:{isa}")
    art = build(generate(cfg))
    errors = verify_kernel(cfg, load(art), 2, 9, 11)  # outputs NaN-poisoned first
    assert max(errors.values()) < TOLERANCE[dtype], errors
    if shutil.which("objdump") and TOO_WIDE[isa]:
        code = subprocess.run(["objdump", "-d", str(art.library)], capture_output=True, text=True, check=True).stdout
        assert not [reg for reg in TOO_WIDE[isa] if f"%{reg}" in code], f"{isa} library uses wider registers"


def test_tvm_backend_builds_for_a_level():
    isa = "x86-64-v3"
    if isa not in RUNNABLE:
        pytest.skip(f"this CPU lacks {', '.join(missing_features(isa))}")
    cfg = DCNConfig(op="dcnv3", group=2, group_channels=8, dtype="float16", target=f"cpu:{isa}", backend="tvm")
    errors = verify(cfg, 2, 9, 11)  # through the ops, which keep the config's level
    assert max(errors.values()) < TOLERANCE["float16"], errors


def test_level_libraries_are_not_tied_to_this_cpu(monkeypatch):
    """A level's library has the same source key whatever CPU builds it (so a machine without a
    compiler finds it); a 'cpu' library's key names the CPU."""
    keys = lambda cfg: {backend: source_key(generate(cfg.replace(backend=backend))) for backend in ("template", "tvm")}  # noqa: E731
    level, native = DCNConfig(target="cpu:x86-64-v3"), DCNConfig(target="cpu")
    before = keys(level), keys(native)
    monkeypatch.setattr(cpp, "host_cpu", lambda: "another CPU | sse2")
    assert keys(level) == before[0]
    assert all(keys(native)[b] != before[1][b] for b in ("template", "tvm"))


def test_a_cpu_without_the_level_is_refused(monkeypatch):
    art = build(generate(DCNConfig(group=2, group_channels=4, target="cpu:x86-64-v3")))
    monkeypatch.setattr(cpu_isas, "host_features", lambda: frozenset(cpu_isas.required_features("x86-64-v2")))
    with pytest.raises(ConfigError, match=r"cpu:x86-64-v3 needs CPU features this machine lacks \(avx, avx2"):
        load(art)


CPU_TARGET_RUN = textwrap.dedent("""
    import torch, dcngen.ops
    from dcngen import kernels
    x = torch.randn(1, 6, 7, 8)
    om = torch.randn(1, 6, 7, dcngen.config.DCNConfig(group=2, group_channels=4).padded_offset_mask_channels)
    try:
        dcngen.ops.dcnv4(x, om, group=2, group_channels=4)
    except Exception as e:
        print(type(e).__name__, e)
    print(sorted({cfg.target for cfg in kernels._loaded}))
""")


@pytest.mark.parametrize("value, expected", [("cpu:x86-64-v3", "['cpu:x86-64-v3']"), ("cuda:sm_90", "DCNGenError DCNGEN_CPU_TARGET='cuda:sm_90'")])
def test_cpu_target_setting_picks_the_ops_kernels(value, expected):
    if value.startswith("cpu:") and value[4:] not in RUNNABLE:
        pytest.skip(f"this CPU lacks {', '.join(missing_features(value[4:]))}")
    run = subprocess.run([sys.executable, "-c", CPU_TARGET_RUN], env={**os.environ, "DCNGEN_CPU_TARGET": value},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert expected in run.stdout, run.stdout


VERIFY_RUN = textwrap.dedent("""
    from dcngen import kernels, verify
    from dcngen.config import DCNConfig
    errors = verify.verify(DCNConfig(group=2, group_channels=4, target="cpu"), 1, 6, 7)
    print(max(errors.values()) < 1e-5, sorted({cfg.target for cfg in kernels._loaded}))
""")


def test_verify_checks_the_configs_target_not_the_ops():
    """`dcngen verify --target cpu` checks the native kernel even where DCNGEN_CPU_TARGET gives the ops
    another level."""
    run = subprocess.run([sys.executable, "-c", VERIFY_RUN], env={**os.environ, "DCNGEN_CPU_TARGET": "cpu:x86-64"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "True ['cpu']" in run.stdout, run.stdout


ARM_CXX = "aarch64-linux-gnu-g++"


@pytest.mark.skipif(shutil.which(ARM_CXX) is None, reason=f"no {ARM_CXX} (.ci/run installs it where apt can)")
@pytest.mark.parametrize("op, dtype, c", [("dcnv4", "float16", 16), ("dcnv3", "bfloat16", 5), ("dcnv4", "float64", 8)])
def test_template_compiles_for_aarch64(tmp_path, op, dtype, c):
    """The generic (non-x86) paths of the CPU template: an ARM machine builds them with -march=native."""
    from tvm_ffi import libinfo

    source = generate(DCNConfig(op=op, group=3, group_channels=c, dtype=dtype))
    flags = [f for f in source.flags if not f.startswith(("-march", "-mprefer-vector-width"))]
    (tmp_path / "kernel.cc").write_text(source.text)
    run = subprocess.run([ARM_CXX, "-std=c++17", *flags, "-march=armv8.2-a", "-fPIC", f"-I{libinfo.find_include_path()}",
                          f"-I{libinfo.find_dlpack_include_path()}", "-c", "kernel.cc", "-o", "kernel.o"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_vector_width_follows_the_channel_row():
    """AVX-512 targets prefer 512-bit vectors, except where a group's channel row is longer than one
    512-bit vector of the accumulation type and ends in a partial one; `vector_bits` overrides it
    (`bwd_vector_bits` the backward's alone), tune searches both, and targets without AVX-512 have no
    such parameters."""
    from dcngen.search import space_for

    def width(c, dtype="float32", **kw):
        source = generate(DCNConfig(group_channels=c, dtype=dtype, target="cpu:x86-64-v4", **kw))
        assert f"-mprefer-vector-width={dict(source.params)['vector_bits']}" in source.flags
        return dict(source.params)["vector_bits"]

    assert [width(c) for c in (4, 12, 16, 20, 24, 32, 36)] == [512, 512, 512, 256, 256, 512, 256]
    assert [width(c, "float64") for c in (4, 8, 12, 16)] == [512, 512, 256, 512]
    assert width(20, params={"vector_bits": 512}) == 512
    with pytest.raises(ConfigError, match="256 or 512"):
        generate(DCNConfig(target="cpu:x86-64-v4", params={"vector_bits": 384}))
    v3 = DCNConfig(target="cpu:x86-64-v3")
    with pytest.raises(ConfigError, match="vector_bits applies to targets with AVX-512 only"):
        generate(v3.replace(params={"vector_bits": 256}))
    assert not any(f.startswith("-mprefer-vector-width") for f in generate(v3).flags)
    assert space_for(DCNConfig(target="cpu:x86-64-v4")).values["vector_bits"] == (256, 512)
    assert "vector_bits" not in space_for(v3).values
    # the backward's own width: by default (and with vector_bits alone) the unit's; else its entry's attribute
    attribute = 'target("prefer-vector-width='
    backward = lambda **params: generate(DCNConfig(target="cpu:x86-64-v4", params=params))  # noqa: E731
    assert dict(backward().params)["bwd_vector_bits"] == 512 and attribute not in backward().text
    assert dict(backward(vector_bits=256).params)["bwd_vector_bits"] == 256 and attribute not in backward(vector_bits=256).text
    source = backward(bwd_vector_bits=256)
    assert "-mprefer-vector-width=512" in source.flags and attribute + '256")))\nvoid dcn_backward(' in source.text
    with pytest.raises(ConfigError, match="bwd_vector_bits=384 must be 256 or 512"):
        backward(bwd_vector_bits=384)
    with pytest.raises(ConfigError, match="bwd_vector_bits applies to targets with AVX-512 only"):
        generate(v3.replace(params={"bwd_vector_bits": 256}))
    assert space_for(DCNConfig(target="cpu:x86-64-v4")).values["bwd_vector_bits"] == (256, 512)
    # the vector width shapes the backward too, so an AVX-512 target's candidates are timed over both passes
    assert space_for(DCNConfig(target="cpu:x86-64-v4")).passes == ("forward", "backward")
    assert space_for(v3).passes == ("forward",)


@pytest.mark.parametrize("vector_bits, bwd_vector_bits", [(512, 256), (256, 512)])
def test_the_backward_with_its_own_vector_width_matches_the_reference(vector_bits, bwd_vector_bits):
    if "x86-64-v4" not in RUNNABLE:
        pytest.skip(f"this CPU lacks {', '.join(missing_features('x86-64-v4'))}")
    for op, dtype, c in (("dcnv4", "float32", 16), ("dcnv3", "bfloat16", 20)):
        cfg = DCNConfig(op=op, group=2, group_channels=c, dtype=dtype, target="cpu:x86-64-v4",
                        params={"vector_bits": vector_bits, "bwd_vector_bits": bwd_vector_bits})
        errors = verify_kernel(cfg, load(build(generate(cfg))), 2, 9, 11)
        assert max(errors.values()) < TOLERANCE[dtype], (cfg.key, errors)


def test_default_accumulator_rows_fit_a_quarter_of_the_vector_registers():
    """As many float32 accumulator rows (4, 2 or 1) as fit a quarter of the level's register file:
    AVX2's 16 x 256 bits, AVX-512's 32 x 512 bits, half of it where 256-bit vectors are preferred
    (C20, C28, C36). Target 'cpu' plans for the best level this CPU runs (-march=native uses it)."""
    from dcngen.search import default_params

    rows = lambda c, isa: default_params(DCNConfig(group_channels=c, target=f"cpu:{isa}"))["accumulators"]  # noqa: E731
    assert [rows(c, "x86-64-v3") for c in (8, 16, 32)] == [4, 2, 1]
    assert [rows(c, "x86-64-v4") for c in (16, 20, 32, 36, 64)] == [4, 2, 4, 1, 2]
    if RUNNABLE:
        for c, dtype in ((8, "float32"), (16, "float32"), (32, "float32"), (64, "float32"), (16, "float64")):
            native, level = (DCNConfig(group_channels=c, dtype=dtype, target=t) for t in ("cpu", f"cpu:{RUNNABLE[-1]}"))
            assert default_params(native) == default_params(level), (c, dtype)
