"""TVM backend: CPU kernels (generate -> build -> load -> forward/backward) against the golden
vectors and the float64 reference, the ops path, and CUDA artifacts (compile, no spills)."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch
from helpers import assert_offset_views_served, dcnv3_split, dcnv4_packed, golden_cases, golden_config, random_inputs, rel_err

from dcngen import build, reference
from dcngen.config import DCNConfig
from dcngen.generators import generate

CASES = golden_cases()
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
_DTYPE = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}


def kernel(cfg: DCNConfig):
    return build.load(build.build(generate(cfg)))


def run_kernel(cfg: DCNConfig, x, offset, mask, grad_out):
    """Forward and backward of cfg's TVM kernel on NaN-poisoned outputs.

    DCNv4: `offset` is the packed offset_mask (mask ignored); returns (out, grad_x, grad_offset
    [, grad_mask]) with the DCNv4 gradient being one packed tensor."""
    mod = kernel(cfg)
    n, h, w, _ = x.shape
    ho, wo = cfg.output_size(h, w)
    out = torch.full((n, ho, wo, cfg.channels), float("nan"), dtype=x.dtype)
    grad_x = torch.full_like(x, float("nan"))
    if cfg.op == "dcnv4":
        mod.forward(x, offset, offset, out)
        gom = torch.full_like(offset, float("nan"))
        gom[..., cfg.min_offset_mask_channels :] = 0  # the caller zeroes the padding channels
        mod.backward(x, offset, offset, grad_out, grad_x, gom, gom)
        return out, grad_x, gom
    mod.forward(x, offset, mask, out)
    goff, gmask = torch.full_like(offset, float("nan")), torch.full_like(mask, float("nan"))
    mod.backward(x, offset, mask, grad_out, grad_x, goff, gmask)
    return out, grad_x, goff, gmask


def reference_grads(cfg: DCNConfig, inputs, grad_out):
    """Reference output and autograd gradients (float64) for the op's input tensors."""
    leaves = [t.detach().double().clone().requires_grad_() for t in inputs]
    fn = reference.dcnv4 if cfg.op == "dcnv4" else reference.dcnv3
    out = fn(cfg, *leaves)
    out.backward(grad_out.double())
    return [out.detach()] + [t.grad for t in leaves]


# ---- golden vectors (torchvision, float64) -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_golden_vectors(name, case, op, dtype):
    cfg = golden_config(case, op=op, backend="tvm", dtype=_DTYPE[dtype])
    t = lambda key: torch.tensor(case[key]).to(dtype).contiguous()  # noqa: E731
    x, om, grad_out = t("input"), t("offset_mask"), t("grad_output")
    expected = [case["output"], case["grad_input"]]
    if op == "dcnv4":
        got = run_kernel(cfg, x, om, om, grad_out)
        expected.append(case["grad_offset_mask"])
    else:
        offset, mask = reference.unpack_offset_mask(cfg, om)
        got = run_kernel(cfg, x, offset.contiguous(), mask.contiguous(), grad_out)
        goff, gmask = reference.unpack_offset_mask(cfg, torch.tensor(case["grad_offset_mask"]))
        expected += [goff, gmask]
    for what, a, e in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, expected):
        assert rel_err(a, torch.as_tensor(e)) < TOL[dtype], what


# ---- random configurations against the float64 reference -----------------------------------------
CONFIGS = {
    "3x3_c16": dict(group=2, group_channels=16),
    "k3x5_s2_d2_os0.5_c3": dict(group=3, group_channels=3, kernel_size=(3, 5), stride=2, padding=(1, 3), dilation=2, offset_scale=0.5),
    "k5x3_pad0_os1.7_c5": dict(group=2, group_channels=5, kernel_size=(5, 3), padding=0, offset_scale=1.7),
    "rc_c1": dict(group=4, group_channels=1, remove_center=True),
    "rc5_s2_c16": dict(group=1, group_channels=16, kernel_size=5, padding=2, stride=(2, 1), remove_center=True),
}


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_float64(name, op):
    cfg = DCNConfig(op=op, backend="tvm", dtype="float64", **CONFIGS[name])
    gen = torch.Generator().manual_seed(7)
    x, offset, mask = random_inputs(cfg, 2, 9, 7, generator=gen)
    ho, wo = cfg.output_size(9, 7)
    grad_out = torch.randn(2, ho, wo, cfg.channels, dtype=torch.float64, generator=gen)
    if op == "dcnv4":
        om = dcnv4_packed(cfg, offset, mask, pad_to=cfg.min_offset_mask_channels + 3)  # odd runtime Cpad
        got = run_kernel(cfg, x, om, om, grad_out)
        expected = reference_grads(cfg, (x, om), grad_out)
        assert (got[2][..., cfg.min_offset_mask_channels :] == 0).all(), "padding channels must stay untouched"
    else:
        off, msk = dcnv3_split(offset, mask)
        got = run_kernel(cfg, x, off, msk, grad_out)
        expected = reference_grads(cfg, (x, off, msk), grad_out)
    for what, a, e in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, expected):
        assert rel_err(a, e) < 1e-10, what


def test_shapes_are_symbolic():
    """One artifact serves several (N, H, W)."""
    cfg = DCNConfig(op="dcnv4", backend="tvm", dtype="float64", group=2, group_channels=3)
    gen = torch.Generator().manual_seed(3)
    for n, h, w in ((1, 1, 1), (3, 5, 12), (1, 17, 4)):
        x, offset, mask = random_inputs(cfg, n, h, w, generator=gen)
        om = dcnv4_packed(cfg, offset, mask)
        grad_out = torch.randn(n, h, w, cfg.channels, dtype=torch.float64, generator=gen)
        got = run_kernel(cfg, x, om, om, grad_out)
        for a, e in zip(got, reference_grads(cfg, (x, om), grad_out)):
            assert rel_err(a, e) < 1e-10


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_bfloat16(op):
    """bf16 storage, fp32 accumulation: compared with the float64 reference of the bf16-rounded inputs."""
    cfg = DCNConfig(op=op, backend="tvm", dtype="bfloat16", group=2, group_channels=8)
    gen = torch.Generator().manual_seed(5)
    x, offset, mask = random_inputs(cfg, 2, 8, 8, generator=gen)
    grad_out = torch.randn(2, 8, 8, cfg.channels, dtype=torch.float64, generator=gen)
    bf = lambda t: t.to(torch.bfloat16).contiguous()  # noqa: E731
    if op == "dcnv4":
        inputs = (bf(x), bf(dcnv4_packed(cfg, offset, mask)))
        got = run_kernel(cfg, *inputs, inputs[1], bf(grad_out))
    else:
        inputs = (bf(x), *map(bf, dcnv3_split(offset, mask)))
        got = run_kernel(cfg, *inputs, bf(grad_out))
    expected = reference_grads(cfg, inputs, bf(grad_out))
    for what, a, e in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, expected):
        assert rel_err(a, e) < 3e-2, what


def test_generator_returns_tvmscript_text():
    from tvm.script import from_source

    src = generate(DCNConfig(op="dcnv3", backend="tvm", group=2, group_channels=4))
    assert src.language == "tvm" and "def forward" in src.text and "def backward" in src.text
    mod = from_source(src.text)
    assert {gv.name_hint for gv in mod.get_global_vars()} == {"forward", "backward"}
    assert json.loads(src.extra)["tvm_target"]["kind"] == "llvm"


def test_through_ops():
    """dcngen.ops with backend='tvm': forward and all gradients against the reference."""
    import dcngen.ops as ops

    cfg = DCNConfig(op="dcnv4", backend="tvm", dtype="float64", group=2, group_channels=5, kernel_size=(3, 5), padding=(1, 2), offset_scale=0.8)
    kw = cfg.op_kwargs  # backend="tvm" comes from cfg
    gen = torch.Generator().manual_seed(11)
    x, offset, mask = random_inputs(cfg, 2, 6, 7, generator=gen)
    om = dcnv4_packed(cfg, offset, mask)
    grad_out = torch.randn(2, 6, 7, cfg.channels, dtype=torch.float64, generator=gen)
    xs, oms = x.clone().requires_grad_(), om.clone().requires_grad_()
    out = ops.dcnv4(xs, oms, **kw)
    out.backward(grad_out)
    expected = reference_grads(cfg, (x, om), grad_out)
    for a, e in zip((out, xs.grad, oms.grad), expected):
        assert rel_err(a, e) < 1e-10
    off, msk = dcnv3_split(offset, mask)
    cfg3 = cfg.replace(op="dcnv3")
    leaves = [t.clone().requires_grad_() for t in (x, off, msk)]
    out3 = ops.dcnv3(*leaves, **kw)
    out3.backward(grad_out)
    for a, e in zip([out3] + [t.grad for t in leaves], reference_grads(cfg3, (x, off, msk), grad_out)):
        assert rel_err(a, e) < 1e-10


# ---- hostile values (SPEC semantics of test_hostile.py, run on the TVM kernels) -----------------------
HOSTILE_CHECKS = ("hostile_offsets_contribute_nothing", "all_offsets_hostile", "nan_weights", "inf_weights", "nan_input_pixel", "random_cases")


@pytest.mark.parametrize("check", HOSTILE_CHECKS)
@pytest.mark.parametrize("index", range(4))
def test_hostile_values(check, index):
    """NaN / inf / huge offsets and weights and NaN input pixels: exact zeros for dead points, NaN
    exactly where the reference has it (the plan's unread corners are never dereferenced)."""
    import test_hostile

    cfg = test_hostile.CONFIGS[index].replace(backend="tvm")
    seed = (0,) if check == "hostile_offsets_contribute_nothing" else ()
    getattr(test_hostile, f"test_{check}")(cfg, *seed)


def test_small_images_take_the_checked_path():
    """Images smaller than the kernel reach: nearly every pixel has unread corners."""
    cfg = DCNConfig(op="dcnv4", backend="tvm", dtype="float64", group=4, group_channels=16)
    gen = torch.Generator().manual_seed(17)
    x, offset, mask = random_inputs(cfg, 3, 3, 4, generator=gen)
    om = dcnv4_packed(cfg, offset * 3, mask)
    grad_out = torch.randn(3, 3, 4, cfg.channels, dtype=torch.float64, generator=gen)
    for a, e in zip(run_kernel(cfg, x, om, om, grad_out), reference_grads(cfg, (x, om), grad_out)):
        assert rel_err(a, e) < 1e-10


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_first_pixel(bad):
    """The forward's border path reads x's first pixel for unread corners (weight 0) and redoes a
    non-finite sum exactly: inf / NaN there reaches exactly the samples that read it."""
    cfg = DCNConfig(op="dcnv4", backend="tvm", dtype="float64", group=2, group_channels=16)
    gen = torch.Generator().manual_seed(19)
    x, offset, mask = random_inputs(cfg, 2, 6, 7, generator=gen)
    x[:, 0, 0, :] = bad
    om = dcnv4_packed(cfg, offset * 2, mask)
    grad_out = torch.randn(2, 6, 7, cfg.channels, dtype=torch.float64, generator=gen)
    for a, e in zip(run_kernel(cfg, x, om, om, grad_out), reference_grads(cfg, (x, om), grad_out)):
        assert torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(torch.isinf(a), torch.isinf(e))
        finite = torch.isfinite(e)
        assert rel_err(a[finite], e[finite]) < 1e-10


# ---- CUDA: TVM-emitted kernels + our launcher, compiled without a GPU --------------------------------
CUDA_CASES = [(op, dt, k, c) for op in ("dcnv4", "dcnv3") for dt in ("float32", "float16", "bfloat16") for k in (3, 5) for c in (16, 24)]


def _cuda_source(op, dtype, k, c, arch="sm_90"):
    return generate(DCNConfig(op=op, dtype=dtype, kernel_size=k, padding=k // 2, group=4, group_channels=c, target=f"cuda:{arch}", backend="tvm"))


def test_cuda_kernels_compile_without_spills():
    """Every TVM CUDA kernel builds for sm_80 and sm_90 without a compiler warning and with no
    local-memory spills or stack."""
    from dcngen.compilers import cuda

    sources = [_cuda_source(*case) for case in CUDA_CASES]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda s: cuda.ptxas_report(s, ("sm_80", "sm_90"), warnings_fail=True), sources))
    for case, src, report in zip(CUDA_CASES, sources, reports):
        direct = case[1] == "float32"
        assert len(report) == 2 * (3 if direct else 4), (case, report)
        assert {r["arch"] for r in report} == {"sm_80", "sm_90"}
        for r in report:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, (case, r)
        assert src.language == "cuda" and '#include <tvm/ffi/function.h>' in src.text


def test_cuda_artifact_builds():
    """The whole artifact (kernels, launchers, tvm-ffi entry points) links and loads without a GPU."""
    art = build.build(_cuda_source("dcnv4", "bfloat16", 3, 16, "sm_80"))
    assert art.meta["language"] == "cuda" and art.meta["ptxas"]
    mod = build.load(art)
    assert int(mod._workspace_size(2 * 5 * 5 * 64)) >= 2 * 5 * 5 * 64 * 4


def test_direct_calls_check_the_offset_rows():
    """TVM's own argument checks leave the rows' channel count free: a row shorter than the groups'
    span would be read past (the next pixel's channels, then past the tensor)."""
    from dcngen.errors import InputError
    from dcngen.kernels import kernel_for

    cfg = DCNConfig(op="dcnv4", group=1, group_channels=4, kernel_size=1, padding=0, backend="tvm")
    om = torch.tensor([[[[0.0, 0.0], [5.0, 0.0]]]])
    with pytest.raises(InputError, match="rows must hold at least 3 and 3 channels"):
        kernel_for(cfg).forward(torch.ones(1, 1, 2, 4), om, om, torch.empty(1, 1, 2, 4))



@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_offset_views_are_served(op):
    """TVM's llvm code issues aligned vector accesses on every buffer: tensors that start part-way
    into their storage (inputs, grad_out and the outputs written) once made the backward fault."""
    cfg = DCNConfig(op=op, backend="tvm", dtype="float32", group=2, group_channels=16)
    assert_offset_views_served(kernel(cfg), cfg)
