"""The template CPU kernels through the torch ops: golden vectors, gradcheck, opcheck, torch.compile, bad input."""

import os
import pickle
import random
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from fuzzkit import check_case, random_case
from helpers import assert_compile_matches_eager, dcnv3_split, dcnv4_packed, golden_cases, golden_config, random_inputs, rel_err

import dcngen.ops as ops
from dcngen import reference
from dcngen.config import DCNConfig
from dcngen.errors import ConfigError, InputError
from dcngen.generators import generate

CASES = golden_cases()
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# every case in float64 and float32 against its golden values; in 16 bits (compared with the
# reference on the same rounded inputs) float16 for every other case, bfloat16 for the rest
GOLDEN_RUNS = [(name, case, dtype) for i, (name, case) in enumerate(CASES) for dtype in (torch.float64, torch.float32, (torch.float16, torch.bfloat16)[i % 2])]


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
@pytest.mark.parametrize("name,case,dtype", GOLDEN_RUNS, ids=[f"{n}-{d}" for n, _, d in GOLDEN_RUNS])
def test_golden_vectors(name, case, op, dtype):
    cfg = golden_config(case)
    t = lambda key: torch.tensor(case[key]).to(dtype)  # noqa: E731
    x, om, grad_out = t("input").requires_grad_(), t("offset_mask"), t("grad_output")
    if op == "dcnv4":
        om.requires_grad_()
        out = ops.dcnv4(x, om, **cfg.op_kwargs)
        out.backward(grad_out)
        grads = {"grad_offset_mask": om.grad}
    else:
        offset, mask = (v.detach().contiguous().requires_grad_() for v in reference.unpack_offset_mask(cfg, om))
        out = ops.dcnv3(x, offset, mask, **cfg.op_kwargs)
        out.backward(grad_out)
        grads = {"grad_offset_mask": reference.pack_offset_mask(cfg, offset.grad, mask.grad, om.shape[-1])}
    assert out.dtype == dtype and x.grad.dtype == dtype
    expected = {k: torch.tensor(case[k]) for k in ("output", "grad_input", "grad_offset_mask")}
    if dtype in (torch.float16, torch.bfloat16):  # rounding the offsets moves the samples: compare with the same inputs
        x64, om64 = x.detach().double().requires_grad_(), om.detach().double().requires_grad_()
        ref = reference.dcnv4(cfg, x64, om64)
        ref.backward(grad_out.double())
        expected = {"output": ref.detach(), "grad_input": x64.grad, "grad_offset_mask": om64.grad}
    tol = TOL[dtype]
    assert rel_err(out, expected["output"]) < tol
    assert rel_err(x.grad, expected["grad_input"]) < tol
    # 16-bit offsets land many samples exactly on pixel lines, where the offset gradient is one-sided:
    # the kernels and the reference take it from the same side (docs/SPEC.md section 1)
    assert rel_err(grads["grad_offset_mask"], expected["grad_offset_mask"]) < tol


# 8: rows converted 8 at a time before they are summed; 12 and 17: a vector's tail (AVX-512: 16 lanes)
@pytest.mark.parametrize("channels", [16, 8, 12, 17])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)], ids=["bfloat16", "float16"])
def test_16_bit_outputs_and_gradients(dtype, tol, channels):
    """16-bit output and gradients against the float64 reference on offsets exact in the dtype and clear of pixel lines."""
    cfg = DCNConfig(group=2, group_channels=channels, kernel_size=3, dtype=str(dtype).replace("torch.", ""))
    gen = torch.Generator().manual_seed(3)
    x, offset, mask = random_inputs(cfg, 2, 7, 6, generator=gen)
    offset = (offset * 8).round() / 8  # multiples of 1/8 with fractions in [0.125, 0.875]: exact in 16 bits
    om = dcnv4_packed(cfg, offset, mask).to(dtype)
    x = x.to(dtype)
    grad_out = torch.randn(2, 7, 6, 2 * channels, generator=gen).to(dtype)
    x1, om1 = x.clone().requires_grad_(), om.clone().requires_grad_()
    y1 = ops.dcnv4(x1, om1, group=2, group_channels=channels)
    y1.backward(grad_out)
    x2, om2 = x.double().requires_grad_(), om.double().requires_grad_()
    y2 = reference.dcnv4(cfg, x2, om2)
    y2.backward(grad_out.double())
    assert rel_err(y1, y2) < tol
    assert rel_err(x1.grad, x2.grad) < tol
    assert rel_err(om1.grad, om2.grad) < tol


GRADCHECK_CONFIGS = [
    dict(kernel_size=(3, 5), group=2, group_channels=3),
    dict(kernel_size=3, stride=2, group=1, group_channels=5),
    dict(kernel_size=3, dilation=2, padding=2, group=2, group_channels=1),
    dict(kernel_size=3, offset_scale=0.5, group=1, group_channels=16),
    dict(kernel_size=5, padding=2, remove_center=True, group=2, group_channels=3, offset_scale=2.0),
    dict(kernel_size=(1, 3), padding=(0, 1), stride=(1, 2), dilation=(1, 3), group=1, group_channels=64),
]


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
@pytest.mark.parametrize("fields", GRADCHECK_CONFIGS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_gradcheck(fields, op):
    cfg = DCNConfig(dtype="float64", **fields)
    gen = torch.Generator().manual_seed(7)
    x, offset, mask = random_inputs(cfg, 2, 4, 5, generator=gen)
    if op == "dcnv4":
        om = dcnv4_packed(cfg, offset, mask).requires_grad_()
        inputs, fn = (x.requires_grad_(), om), lambda x, om: ops.dcnv4(x, om, **cfg.op_kwargs)
        expected = reference.dcnv4(cfg, x, om)
    else:
        off, m = (t.requires_grad_() for t in dcnv3_split(offset, mask))
        inputs, fn = (x.requires_grad_(), off, m), lambda x, o, m: ops.dcnv3(x, o, m, **cfg.op_kwargs)
        expected = reference.dcnv3(cfg, x, off, m)
    assert rel_err(fn(*inputs), expected) < 1e-10
    # Full Jacobians for the small configs; random projections (fast mode) for the wide ones.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=cfg.channels > 8)


def test_offset_mask_padding_is_ignored_and_gets_zero_grad():
    cfg = DCNConfig(group=2, group_channels=4, dtype="float64")
    x, offset, mask = random_inputs(cfg, 1, 5, 5)
    om = dcnv4_packed(cfg, offset, mask, pad_to=cfg.min_offset_mask_channels + 5)
    om[..., cfg.min_offset_mask_channels :] = float("nan")
    om.requires_grad_()
    out = ops.dcnv4(x, om, group=2, group_channels=4)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert (om.grad[..., cfg.min_offset_mask_channels :] == 0).all()


def test_non_contiguous_inputs_are_accepted():
    cfg = DCNConfig(group=2, group_channels=4, dtype="float64")
    x, offset, mask = random_inputs(cfg, 2, 6, 5)
    om = dcnv4_packed(cfg, offset, mask)
    x_nc = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    om_nc = torch.cat((om, om), dim=-1)[..., : om.shape[-1]]
    assert not x_nc.is_contiguous() and not om_nc.is_contiguous()
    assert rel_err(ops.dcnv4(x_nc, om_nc, group=2, group_channels=4), reference.dcnv4(cfg, x, om)) < 1e-12


def test_opcheck():
    cfg = DCNConfig(group=2, group_channels=4, kernel_size=(3, 5), padding=(1, 2), dtype="float64")
    x, offset, mask = random_inputs(cfg, 2, 5, 6)
    args = (3, 5, 1, 1, 1, 2, 1, 1, 2, 4, 1.0, False, "template")
    om = dcnv4_packed(cfg, offset, mask)
    torch.library.opcheck(torch.ops.dcngen.dcnv4, (x.requires_grad_(), om.requires_grad_(), *args))
    off, m = dcnv3_split(offset, mask)
    torch.library.opcheck(torch.ops.dcngen.dcnv3, (x, off.requires_grad_(), m.requires_grad_(), *args))


def test_backward_op_on_permuted_inputs_gives_contiguous_gradients_like_its_fake():
    """An NCHW tensor permuted to channels-last is the usual way in: the backward op's fake must
    promise the strides the real op returns, or compiled training fails its stride assertions."""
    cfg = DCNConfig(group=2, group_channels=4, kernel_size=(3, 5), padding=(1, 2), dtype="float64")
    x, offset, mask = random_inputs(cfg, 2, 5, 6)
    x_nchw = x.permute(0, 3, 1, 2).contiguous()
    om = dcnv4_packed(cfg, offset, mask)
    args = (3, 5, 1, 1, 1, 2, 1, 1, 2, 4, 1.0, False, "template")
    grad_out = torch.randn(2, 5, 6, 8, dtype=torch.float64).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    torch.library.opcheck(torch.ops.dcngen.dcnv4_backward, (grad_out, x_nchw.permute(0, 2, 3, 1), om, *args))
    off, m = dcnv3_split(offset, mask)
    torch.library.opcheck(torch.ops.dcngen.dcnv3_backward, (grad_out, x_nchw.permute(0, 2, 3, 1), off, m, *args))

    def loss(x_nchw, om):
        return ops.dcnv4(x_nchw.permute(0, 2, 3, 1), om, group=2, group_channels=4, kernel_size=(3, 5), padding=(1, 2)).square().sum()

    assert_compile_matches_eager(loss, (x_nchw, om))


def test_the_library_entry_points_check_their_tensors():
    """Called directly (as verify, tune and the benchmarks do), a CPU library refuses tensors that
    would make it read or write out of bounds or the wrong pixels, naming what is wrong."""
    from dcngen.kernels import kernel_for

    cfg = DCNConfig(group=2, group_channels=4)
    kernel = kernel_for(cfg)
    x, om, out = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 6, cfg.padded_offset_mask_channels), torch.empty(1, 5, 6, 8)
    bad_calls = {
        "rows must hold at least 54 and 54 channels": (x, om[..., :50].contiguous(), om[..., :50].contiguous(), out),
        "x must be contiguous": (torch.randn(1, 5, 12, 8)[:, :, ::2], om, om, out),
        r"must be \(N, Ho, Wo, G\*C\) = \(1, 5, 6, 8\)": (x, om, om, torch.empty(1, 7, 6, 8)),
        "wrong dtype": (x.double(), om, om, out),
    }
    for message, args in bad_calls.items():
        with pytest.raises(Exception, match=message):
            kernel.forward(*args)
    with pytest.raises(Exception, match="grad_x must have x's shape"):
        kernel.backward(x, om, om, out, torch.empty(1, 5, 5, 8), torch.empty_like(om), torch.empty_like(om))
    v3 = kernel_for(cfg.replace(op="dcnv3"))  # separate rows: G*P*2 offsets, G*P weights
    offset, mask = torch.randn(1, 5, 6, 36), torch.randn(1, 5, 6, 18)
    for narrow in ((offset[..., :35].contiguous(), mask), (offset, mask[..., :9].contiguous())):
        with pytest.raises(Exception, match="rows must hold at least 36 and 18 channels"):
            v3.forward(x, *narrow, out)


@pytest.mark.parametrize("backend", ["template", "tvm"])
@pytest.mark.parametrize("h, w", [(0, 0), (0, 3)])
def test_an_empty_image_with_padding_gives_zeros(backend, h, w):
    """Padding gives an empty image output pixels, all of whose points sample outside: zero output
    and zero gradients (both backends crashed on it)."""
    cfg = DCNConfig(group=1, group_channels=16, padding=2)
    ho, wo = cfg.output_size(h, w)
    x = torch.randn(1, h, w, 16, requires_grad=True)
    om = torch.randn(1, ho, wo, cfg.padded_offset_mask_channels, requires_grad=True)
    y = ops.dcnv4(x, om, group=1, group_channels=16, padding=2, backend=backend)
    y.square().sum().backward()
    assert y.shape == (1, ho, wo, 16) and (y == 0).all() and (om.grad == 0).all() and x.grad.shape == x.shape
    if backend == "template":  # the library called directly, outputs poisoned
        from dcngen.kernels import kernel_for

        out = torch.full((1, ho, wo, 16), float("nan"))
        kernel_for(cfg).forward(x.detach(), om.detach(), om.detach(), out)
        assert (out == 0).all()


def test_large_kernels_and_channel_counts_fit_the_backward():
    """7x7 x 8192 channels of float64: the backward's per-thread partial sums (9.6 MB) overflowed
    the stack."""
    cfg = DCNConfig(group=1, group_channels=8192, kernel_size=7, padding=3, dtype="float64")
    x, offset, mask = random_inputs(cfg, 1, 7, 7)
    om = dcnv4_packed(cfg, offset, mask)
    got, want = [t.clone().requires_grad_() for t in (x, om)], [t.clone().requires_grad_() for t in (x, om)]
    ops.dcnv4(*got, **cfg.op_kwargs).square().sum().backward()
    reference.dcnv4(cfg, *want).square().sum().backward()
    assert rel_err(got[0].grad, want[0].grad) < 1e-12 and rel_err(got[1].grad, want[1].grad) < 1e-12


BAD_GRAD_OUTPUTS = [
    ("spatial", lambda g: g[:, :2], r"grad_output must be the output's shape .* = \(2, 5, 5, 8\)"),
    ("batch", lambda g: torch.cat((g, g)), "grad_output must be the output's shape"),
    ("dtype", lambda g: g.double(), "grad_output must be torch.float32"),
    ("sparse", lambda g: g.to_sparse(), "dense"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_GRAD_OUTPUTS, ids=[b[0] for b in BAD_GRAD_OUTPUTS])
def test_backward_ops_check_grad_output(name, mutate, message):
    """The public backward ops validate grad_output like the inputs (the kernel reads it by the
    output's shape), in the real op and in its fake."""
    x, om, g = torch.randn(2, 5, 5, 8), torch.randn(2, 5, 5, 56), torch.randn(2, 5, 5, 8)
    args = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False, "template")
    with pytest.raises(InputError, match=message):
        torch.ops.dcngen.dcnv4_backward(mutate(g), x, om, *args)
    with pytest.raises(InputError, match=message):
        torch.ops.dcngen.dcnv3_backward(mutate(g), x, om[..., :36], om[..., 36:54], *args)
    if name != "sparse":  # meta tensors are strided
        with pytest.raises(InputError, match=message):
            torch.ops.dcngen.dcnv4_backward(mutate(g).to("meta"), x.to("meta"), om.to("meta"), *args)


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_torch_compile_fullgraph(op):
    cfg = DCNConfig(group=2, group_channels=4, dtype="float32")
    x, offset, mask = random_inputs(cfg, 2, 6, 6, dtype=torch.float32)
    if op == "dcnv4":
        inputs = (x, dcnv4_packed(cfg, offset, mask))
        fn = lambda x, om: ops.dcnv4(x, om, group=2, group_channels=4).square().sum()  # noqa: E731
    else:
        inputs = dcnv3_split(offset, mask)
        inputs = (x, *inputs)
        fn = lambda x, o, m: ops.dcnv3(x, o, m, group=2, group_channels=4).square().sum()  # noqa: E731
    assert_compile_matches_eager(fn, inputs)


def test_empty_batch():
    cfg = DCNConfig(group=2, group_channels=4)
    x = torch.randn(0, 5, 5, 8, requires_grad=True)
    om = torch.randn(0, 5, 5, cfg.padded_offset_mask_channels, requires_grad=True)
    out = ops.dcnv4(x, om, group=2, group_channels=4)
    assert out.shape == (0, 5, 5, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and om.grad.shape == om.shape


class OpRecorder(TorchDispatchMode):
    """Passes every op through and records its name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inference_inputs(op: str):
    """(public function, registered op, inputs, public keyword arguments) of a small fp32 problem."""
    cfg = DCNConfig(op=op, group=2, group_channels=8)
    x, offset, mask = random_inputs(cfg, 2, 6, 7, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    tensors = (x, dcnv4_packed(cfg, offset, mask)) if op == "dcnv4" else (x, *dcnv3_split(offset, mask))
    return getattr(ops, op), getattr(torch.ops.dcngen, op), tensors, dict(group=2, group_channels=8)


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_inference_skips_the_dispatcher_with_the_same_result(op, monkeypatch):
    """Eager inference runs the kernel without the dispatcher's Python kernels: same bits as the op."""
    public, registered, tensors, kwargs = _inference_inputs(op)
    args = ops._op_args(3, 1, 1, 1, 2, 8, 1.0, False, "template")
    expected = registered(*tensors, *args)
    monkeypatch.setattr(torch.ops.dcngen, op, None)  # the direct path does not touch the registered op
    with torch.no_grad():
        assert torch.equal(public(*tensors, **kwargs), expected)
    with torch.inference_mode():
        assert torch.equal(public(*tensors, **kwargs), expected)


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_dispatch_is_kept_where_something_acts_on_it(op):
    """Dispatch modes and the profiler see the registered op, with or without gradients."""
    public, _, tensors, kwargs = _inference_inputs(op)

    with torch.no_grad(), OpRecorder() as recorder:
        public(*tensors, **kwargs)
    assert f"dcngen.{op}.default" in recorder.ops
    with torch.no_grad(), torch.profiler.profile() as prof:
        public(*tensors, **kwargs)
    assert any(e.name == f"dcngen::{op}" for e in prof.events())
    leaves = [t.clone().requires_grad_() for t in tensors]
    with OpRecorder() as recorder:
        assert public(*leaves, **kwargs).grad_fn is not None
    assert f"dcngen.{op}.default" in recorder.ops


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_eager_autograd_skips_the_dispatcher_with_the_same_result(op, monkeypatch):
    """Eager calls on inputs that need gradients run under an autograd.Function with the op's
    formula: same output and gradients, bit for bit, as through the registered op."""
    public, registered, tensors, kwargs = _inference_inputs(op)
    args = ops._op_args(3, 1, 1, 1, 2, 8, 1.0, False, "template")
    grad_out = torch.randn(public(*tensors, **kwargs).shape, generator=torch.Generator().manual_seed(7))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = fn(leaves)
        out.backward(grad_out)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    expected = run(lambda leaves: registered(*leaves, *args))
    monkeypatch.setattr(torch.ops.dcngen, op, None)  # the eager route does not touch the registered op
    got = run(lambda leaves: public(*leaves, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_eager_backward_matches_the_backward_op(op):
    """The eager backward runs the backward implementation directly; under a mode, the backward op
    runs (and is seen): both give the same bits."""
    public, _, tensors, kwargs = _inference_inputs(op)
    grad_out = torch.randn(public(*tensors, **kwargs).shape, generator=torch.Generator().manual_seed(6))

    def grads(mode=None):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = public(*leaves, **kwargs)
        if mode is None:
            out.backward(grad_out)
        else:
            with mode:
                out.backward(grad_out)
        return [leaf.grad for leaf in leaves]

    recorder = OpRecorder()
    through_op = grads(recorder)
    assert f"dcngen.{op}_backward.default" in recorder.ops
    assert all(torch.equal(a, b) for a, b in zip(grads(), through_op))

BAD_INPUTS = [
    ("rank", lambda x, om: (x[0], om), "input must be 4-D"),
    ("channels", lambda x, om: (x[..., :7], om), r"\(N, H, W, 8\)"),
    ("offset_mask too few channels", lambda x, om: (x, om[..., :10]), "offset_mask must be"),
    ("offset_mask spatial", lambda x, om: (x, om[:, :4]), "offset_mask must be"),
    ("mixed dtypes", lambda x, om: (x, om.double()), "dtype"),
    ("integer dtype", lambda x, om: (x.int(), om.int()), "dtype"),
    ("sparse", lambda x, om: (x.to_sparse(), om), "dense"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, mutate, message):
    x = torch.randn(2, 5, 5, 8)
    om = torch.randn(2, 5, 5, 56)
    with pytest.raises(InputError, match=message):
        ops.dcnv4(*mutate(x, om), group=2, group_channels=4)


def test_bad_dcnv3_mask_shape():
    x, off, mask = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 36), torch.randn(1, 4, 4, 17)
    with pytest.raises(InputError, match="mask must be"):
        ops.dcnv3(x, off, mask, group=2, group_channels=4)


BAD_ARGUMENTS = [
    ("group", dict(group=2.5)),  # int() would have made it 2
    ("group_channels", dict(group_channels="4")),
    ("remove_center", dict(remove_center="no")),  # bool() would have made it True
    ("offset_scale", dict(offset_scale="x")),
]


@pytest.mark.parametrize("field, bad", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_scalar_arguments_name_the_field(field, bad):
    x, om = torch.randn(2, 5, 5, 8), torch.randn(2, 5, 5, 56)
    with pytest.raises(ConfigError) as info:
        ops.dcnv4(x, om, **{"group": 2, "group_channels": 4, **bad})
    assert info.value.field == field


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    x, om = torch.randn(2, 5, 5, 8), torch.randn(2, 5, 5, 56)
    torch.testing.assert_close(ops.dcnv4(x, om, group=np.int64(2), group_channels=np.int32(4)), ops.dcnv4(x, om, group=2, group_channels=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_meta_tensors_give_shapes_and_gradient_shapes(dtype):
    """Meta tensors (shape inference, models built under torch.device("meta")) run no kernel:
    the output and the gradients come out with the right shapes, and bad shapes still raise."""
    meta = dict(device="meta", dtype=dtype)
    x, om = torch.empty(2, 7, 9, 8, **meta, requires_grad=True), torch.empty(2, 4, 5, 56, **meta, requires_grad=True)
    y = ops.dcnv4(x, om, group=2, group_channels=4, stride=2)
    assert (y.shape, y.device, y.dtype) == ((2, 4, 5, 8), torch.device("meta"), dtype)
    y.sum().backward()
    assert x.grad.shape == x.shape and om.grad.shape == om.shape
    offset, mask = torch.empty(2, 7, 9, 36, **meta), torch.empty(2, 7, 9, 18, **meta)
    assert ops.dcnv3(x.detach(), offset, mask, group=2, group_channels=4).shape == (2, 7, 9, 8)
    with pytest.raises(InputError, match="mask must be"):
        ops.dcnv3(x.detach(), offset, mask[..., :5], group=2, group_channels=4)


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_second_order_gradients_are_a_clear_error(op):
    """First-order gradients with create_graph=True work; differentiating them raises (it used to
    give zeros with a warning), through the public function and through the registered op."""
    public, registered, tensors, kwargs = _inference_inputs(op)
    args = ops._op_args(3, 1, 1, 1, 2, 8, 1.0, False, "template")
    for call in (lambda leaves: public(*leaves, **kwargs), lambda leaves: registered(*leaves, *args)):
        leaves = [t.double().requires_grad_() for t in tensors]
        grads = torch.autograd.grad(call(leaves).sin().sum(), leaves, create_graph=True)
        assert all(g.requires_grad for g in grads)
        with pytest.raises(NotImplementedError, match="second-order gradients"):
            sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_forward_mode_ad_and_torch_func_differentiation_are_clear_errors(op):
    """Dual tensors (through the public function and the registered op) and torch.func's
    differentiating transforms raise, instead of giving an output without tangent or zero tangents;
    a dual level whose tangents do not reach the op, and vmap, still work."""
    import torch.autograd.forward_ad as forward_ad
    from torch import func

    public, registered, tensors, kwargs = _inference_inputs(op)
    args = ops._op_args(3, 1, 1, 1, 2, 8, 1.0, False, "template")
    x, rest = tensors[0].double(), [t.double() for t in tensors[1:]]
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        for call in (lambda: public(dual, *rest, **kwargs), lambda: registered(dual, *rest, *args)):
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                call()
        assert forward_ad.unpack_dual(public(x, *rest, **kwargs)).tangent is None
    f = lambda a: public(a, *rest, **kwargs)  # noqa: E731
    for transform in (lambda: func.jvp(f, (x,), (x,)), lambda: func.grad(lambda a: f(a).sum())(x), lambda: func.jacrev(f)(x)):
        with pytest.raises(NotImplementedError, match="cannot differentiate dcngen's ops"):
            transform()
    batched = func.vmap(f)(torch.stack((x, 2 * x)))
    assert torch.equal(batched[1], f(2 * x))


def test_remembered_checks_still_reject_bad_inputs():
    """The checks' outcome is remembered per (arguments, shapes, dtypes, devices): a repeated call
    skips them, and a call that differs in any of those is checked afresh."""
    x, om = torch.randn(2, 5, 5, 8), torch.randn(2, 5, 5, 56)
    ops.dcnv4(x, om, group=2, group_channels=4)
    hits = ops._check_remembered.cache_info().hits
    ops.dcnv4(x.clone(), om.clone(), group=2, group_channels=4)
    assert ops._check_remembered.cache_info().hits == hits + 1
    for _, mutate, message in BAD_INPUTS:
        with pytest.raises(InputError, match=message):
            ops.dcnv4(*mutate(x, om), group=2, group_channels=4)
    with pytest.raises(InputError, match=r"\(N, H, W, 16\)"):
        ops.dcnv4(x, om, group=2, group_channels=8)


def test_config_hash_is_the_same_in_every_process():
    """Configs hash once, from their key (not salted str hashes): a pickled config is found in the
    tables of another process."""
    code = "from dcngen.config import DCNConfig; print(hash(DCNConfig(op='dcnv3', kernel_size=(3, 5))))"
    hashes = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                             text=True, check=True).stdout for seed in ("1", "2")}
    cfg = DCNConfig(op="dcnv3", kernel_size=(3, 5))
    assert hashes == {f"{hash(cfg)}\n"}
    assert hash(pickle.loads(pickle.dumps(cfg))) == hash(cfg) and cfg == DCNConfig(op="dcnv3", kernel_size=(3, 5), stride=1)


def test_bad_config_raises_config_error():
    x, om = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 56)
    with pytest.raises(ConfigError, match="remove_center"):
        ops.dcnv4(x, om, kernel_size=4, remove_center=True, group=2, group_channels=4)
    with pytest.raises(ConfigError, match="kernel_size"):
        ops.dcnv4(x, om, kernel_size="3x", group=2, group_channels=4)


def test_kernel_larger_than_input():
    x, om = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 56)
    with pytest.raises(InputError, match="does not fit"):
        ops.dcnv4(x, om, kernel_size=7, padding=0, group=2, group_channels=4)



def test_image_extents_past_32_bits_are_refused():
    """The kernels index rows and columns in 32 bits: a height or width of 2^31 (an input of 2^31 rows
    of one pixel, or an output that padding makes that large) is refused by name, not wrapped."""
    x, om = torch.empty(1, 2**31, 1, 4, device="meta"), torch.empty(1, 2**31, 1, 27, device="meta")
    with pytest.raises(InputError, match="below 2\\^31"):
        ops.dcnv4(x, om, group=1, group_channels=4)
    x, om = torch.empty(1, 3, 1, 4, device="meta"), torch.empty(1, 2**31 + 1, 1, 3, device="meta")
    with pytest.raises(InputError, match="below 2\\^31"):
        ops.dcnv4(x, om, kernel_size=1, padding=(2**30 - 1, 0), group=1, group_channels=4)

def test_errors_under_torch_compile_match_eager():
    x, om = torch.randn(2, 5, 5, 8), torch.randn(2, 5, 5, 10)
    fn = torch.compile(lambda x, om: ops.dcnv4(x, om, group=2, group_channels=4), fullgraph=True)
    with pytest.raises(Exception, match="offset_mask must be"):
        fn(x, om)


def test_explicit_params_run_that_kernel():
    """verify()/bench go through ops.run_config when params are given: that exact kernel runs."""
    from dcngen.kernels import _loaded
    from dcngen.verify import TOLERANCE, verify

    cfg = DCNConfig(group=2, group_channels=4, params={"pixel_chunk": 3, "unroll_points": 2})
    errors = verify(cfg, 2, 6, 7)
    assert all(e < TOLERANCE["float32"] for e in errors.values()), errors
    assert cfg in _loaded


@pytest.mark.parametrize("offset_scale", [2.0, 0.5, 0.0])
def test_verify_inputs_avoid_pixel_lines_at_any_offset_scale(offset_scale):
    """`dcngen verify` draws samples 1/8 px clear of pixel lines for every offset scale (at a line the
    offset gradient is one-sided and the comparison would be meaningless)."""
    from dcngen.verify import TOLERANCE, verify

    cfg = DCNConfig(group=2, group_channels=4, offset_scale=offset_scale, dtype="float64")
    errors = verify(cfg, 2, 7, 8)
    assert all(e < TOLERANCE["float64"] for e in errors.values()), errors


def test_results_do_not_depend_on_the_thread_count():
    """The CPU kernels follow torch.set_num_threads(); forward (per pixel) and backward (per
    (image, group) task or band of its rows, no atomics) give bitwise the same results on 1 and 2
    threads."""
    cfg = DCNConfig(group=3, group_channels=8, dtype="float32")
    n, h, w = 3, 24, 24
    # enough sampling points that the kernels use both threads (one thread below 8192 per thread)
    assert n * h * w * cfg.group * cfg.num_points >= 2 * 8192
    x, offset, mask = random_inputs(cfg, n, h, w, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    om = dcnv4_packed(cfg, offset, mask)
    grad_out = torch.randn(n, h, w, cfg.channels, generator=torch.Generator().manual_seed(6))
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in (x, om)]
            out = ops.dcnv4(leaves[0], leaves[1], **cfg.op_kwargs)
            out.backward(grad_out)
            results.append([out.detach(), *(t.grad for t in leaves)])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)



@pytest.mark.parametrize("stride, dilation, offset_scale", [(1, 1, 1.0), (2, 2, -0.7)])
def test_backward_in_row_bands_reaching_anywhere(stride, dilation, offset_scale):
    """One (image, group) task is too few for the cores, so the backward splits its output rows into
    bands (at least two here on any machine: 8 rows or more each), each scattering into its own window
    of the input gradient, then sums the windows. A fifth of the samples reach 10-30 px up or down,
    far past a band's first window, which grows to hold them. Float64, against the reference."""
    cfg = DCNConfig(group=1, group_channels=8, stride=stride, dilation=dilation, padding=dilation, offset_scale=offset_scale,
                    dtype="float64")
    gen = torch.Generator().manual_seed(11)
    n, h, w = 1, 40, 13
    assert cfg.output_size(h, w)[0] >= 16
    x, offset, mask = random_inputs(cfg, n, h, w, generator=gen)
    far = torch.rand(offset.shape[:-1], generator=gen, dtype=torch.float64) < 0.2
    reach = (10 + 20 * torch.rand(far.shape, generator=gen, dtype=torch.float64)) * torch.randn(far.shape, generator=gen).sign()
    offset[..., 1] += torch.where(far, reach / abs(offset_scale), 0.0)
    om = dcnv4_packed(cfg, offset, mask)
    grad_out = torch.randn(n, *cfg.output_size(h, w), cfg.channels, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda a, b: ops.dcnv4(a, b, **cfg.op_kwargs), lambda a, b: reference.dcnv4(cfg, a, b)):
        leaves = [x.clone().requires_grad_(), om.clone().requires_grad_()]
        fn(*leaves).backward(grad_out)
        results.append([t.grad for t in leaves])
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-12

TSAN_DRIVER = r"""
// One dcn_forward or dcn_backward call (argv[1]: f or b) of the included kernel, DCNv3 layout, on the 4
// threads asked for with dcn_set_num_threads; prints how many threads the process gained in the call.
#include "kernel.cc"
#include <dirent.h>
#include <cstdio>
#include <random>
#include <vector>

static DLTensor tensor(scalar_t* data, std::vector<int64_t>& shape) {
  DLTensor t{};
  t.data = data; t.device = {kDLCPU, 0}; t.ndim = 4; t.dtype = dcn_ffi::kDType; t.shape = shape.data();
  return t;
}

static int os_threads() {
  DIR* dir = opendir("/proc/self/task");
  int n = 0;
  while (dirent* e = readdir(dir)) n += e->d_name[0] != '.';
  closedir(dir);
  return n;
}

int main(int argc, char** argv) {
  const int N = 4, H = 16, W = 16;
  const int Ho = int(dcn_ffi::output_extent(H, KH, SH, PH, DH)), Wo = int(dcn_ffi::output_extent(W, KW, SW, PW, DW));
  std::vector<int64_t> sx{N, H, W, GC}, so{N, Ho, Wo, G * P * 2}, sm{N, Ho, Wo, G * P}, sy{N, Ho, Wo, GC};
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f), frac(0.1f, 0.9f);
  std::uniform_int_distribution<int> whole(-2, 2);
  // Never freed: a free on this thread after the region would race (for TSan) with the workers' writes,
  // since it cannot see libgomp's barriers. Inputs are written before the region, whose threads are
  // created there (pthread_create orders them).
  std::vector<scalar_t*> t;
  for (auto* s : {&sx, &so, &sm, &sy, &sx, &so, &sm, &sy}) t.push_back(new scalar_t[(*s)[0] * (*s)[1] * (*s)[2] * (*s)[3]]);
  for (int64_t i = 0; i < N * H * W * GC; ++i) t[0][i] = from_acc<scalar_t>(u(rng));
  for (int64_t i = 0; i < N * Ho * Wo * G * P * 2; ++i) t[1][i] = from_acc<scalar_t>(whole(rng) + frac(rng));
  for (int64_t i = 0; i < N * Ho * Wo * G * P; ++i) t[2][i] = from_acc<scalar_t>(u(rng));
  for (int64_t i = 0; i < N * Ho * Wo * GC; ++i) t[3][i] = from_acc<scalar_t>(u(rng));
  DLTensor x = tensor(t[0], sx), off = tensor(t[1], so), mask = tensor(t[2], sm), go = tensor(t[3], sy);
  DLTensor gx = tensor(t[4], sx), goff = tensor(t[5], so), gmask = tensor(t[6], sm), out = tensor(t[7], sy);
  dcn_set_num_threads(4);
  const int before = os_threads();
  if (argv[1][0] == 'f') dcn_forward(&x, &off, &mask, &out);
  else dcn_backward(&x, &off, &mask, &go, &gx, &goff, &gmask);
  std::printf("done, %d new threads\n", os_threads() - before);
  std::fflush(stdout);
  std::_Exit(0);  // no destructors or frees after the region
}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None, reason="needs g++ with ThreadSanitizer (Linux)")
def test_threads_share_no_scratch_under_thread_sanitizer(tmp_path):
    """Each thread of the forward and backward regions keeps its own scratch (the forward's point
    inputs and plan; the backward's padded images and channel terms): a standalone driver of the
    generated source, built with -fsanitize=thread, runs one parallel region per process on 4
    threads, and TSan reports no race. The region must have run on the 4 threads that
    dcn_set_num_threads asked for (3 new ones at least), not OpenMP's default (OMP_NUM_THREADS=1
    here). Scratch shared by the threads is reported on every run, as TSan needs no overlap in time:
    libgomp is not instrumented, so accesses of two threads to the same address within one region
    are never ordered for it. (For the same reason the driver runs one
    region per process: its threads are reused by the next region without an order TSan can see.)"""
    from tvm_ffi import libinfo

    libtsan = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libtsan):
        pytest.skip("libtsan is not installed")
    cfg = DCNConfig(op="dcnv3", group=4, group_channels=8, kernel_size=3, dtype="float32")
    source = generate(cfg)
    (tmp_path / "kernel.cc").write_text(source.text)
    (tmp_path / "driver.cc").write_text(TSAN_DRIVER)
    lib = libinfo.find_libtvm_ffi()
    flags = [f for f in source.flags if f != "-O3"]
    build = subprocess.run(["g++", "-std=c++17", *flags, "-O1", "-g", "-fsanitize=thread", "-w", f"-I{libinfo.find_include_path()}",
                            f"-I{libinfo.find_dlpack_include_path()}", "driver.cc", "-o", "driver", lib, f"-Wl,-rpath,{os.path.dirname(lib)}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    for mode in ("forward", "backward"):
        run = subprocess.run([str(tmp_path / "driver"), mode], capture_output=True, text=True, timeout=120,
                             env={**{k: v for k, v in os.environ.items() if k != "OMP_THREAD_LIMIT"}, "OMP_NUM_THREADS": "1", "OMP_DYNAMIC": "false"})
        output = run.stdout + run.stderr
        if "FATAL: ThreadSanitizer" in output:  # e.g. a kernel whose mmap randomisation TSan cannot map around
            pytest.skip(output.strip().splitlines()[0])
        assert "WARNING: ThreadSanitizer" not in output, f"{mode}:\n{output[-6000:]}"
        assert run.returncode == 0 and "done" in run.stdout, f"{mode}:\n{output[-3000:]}"  # the driver ends with _Exit(0): races show only in the output
        # at least libgomp's 3 workers (TSan may start a thread of its own with the first one)
        assert int(run.stdout.split()[1]) >= 3, f"{mode}: {run.stdout}"


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_outputs_past_the_caches(op):
    """Outputs of 4 MiB or more (here the forward output and the input gradient) are written with
    streaming stores: NaN-poisoned kernel outputs and the op against the float64 reference."""
    cfg = DCNConfig(op=op, group=4, group_channels=16, dtype="float32")
    case = random_case(cfg, random.Random(11), size=(1, 128, 128))
    assert case.grad_out.numel() * 4 >= 4 << 20
    assert check_case(cfg, case) == []


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_streamed_outputs_of_groups_narrower_than_a_vector(op):
    """Outputs past the caches whose group rows (8 float32 values) are narrower than a streaming
    store (16): written with plain stores, each group's row and no more, NaN-poisoned kernel
    outputs against the float64 reference."""
    cfg = DCNConfig(op=op, group=3, group_channels=8, dtype="float32")
    case = random_case(cfg, random.Random(12), size=(1, 128, 352))
    assert case.grad_out.numel() * 4 >= 4 << 20
    assert check_case(cfg, case) == []


@pytest.mark.parametrize("backend", ["template", "tvm"])
def test_samples_exactly_on_the_window_edge_contribute_nothing(backend):
    """docs/SPEC.md section 1: the window is strict, -1 < px and -1 < py. A sample exactly at px = -1
    (or py = -1) has one corner column (row) on the image with weight 0, so only the window test
    decides that its offset gradient is 0 rather than m * (corner value): output and every gradient
    of such points must be exactly 0."""
    cfg = DCNConfig(group=2, group_channels=3, kernel_size=1, padding=0, dtype="float64", backend=backend)
    n, h, w = 1, 4, 5
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(n, h, w, cfg.channels, dtype=torch.float64, generator=gen)
    ho, wo = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    offset = torch.zeros(n, h, w, cfg.group, 1, 2, dtype=torch.float64)
    left = (ho + wo) % 2 == 0  # half the pixels sample at px = -1, the others at py = -1
    offset[0, ..., 0, 0] = torch.where(left, -1 - wo, torch.zeros_like(wo)).unsqueeze(-1)
    offset[0, ..., 0, 1] = torch.where(left, torch.zeros_like(ho), -1 - ho).unsqueeze(-1)
    mask = torch.randn(n, h, w, cfg.group, 1, dtype=torch.float64, generator=gen)
    grad_out = torch.randn(n, h, w, cfg.channels, dtype=torch.float64, generator=gen)
    for run in (lambda a, b: ops.dcnv4(a, b, **cfg.op_kwargs), lambda a, b: reference.dcnv4(cfg, a, b)):
        xs, om = x.clone().requires_grad_(), dcnv4_packed(cfg, offset, mask).requires_grad_()
        out = run(xs, om)
        out.backward(grad_out)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(xs.grad, torch.zeros_like(x)) and torch.equal(om.grad, torch.zeros_like(om))


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3"])  # v3: the AVX2 + F16C conversions, where AVX-512 is native
@pytest.mark.parametrize("channels", [5, 8, 16])  # 5: element by element; 8 and 16: the vector conversions
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_outputs_round_to_nearest_even(dtype, channels, target):
    """Outputs and input gradients whose float32 values are exact ties are stored rounded to the
    nearest, ties to even, like torch's own conversion: a one-ulp rounding slip passes any tolerance,
    not this test. A 1x1 kernel with zero offsets and weight 1.5 gives out = 1.5 x and
    grad_x = 1.5 grad_out, both exact in float32."""
    from dcngen.cpu_isas import missing_features

    if target != "cpu" and missing_features(target[4:]):
        pytest.skip(f"this CPU lacks {', '.join(missing_features(target[4:]))}")
    cfg = DCNConfig(group=1, group_channels=channels, kernel_size=1, padding=0, dtype=str(dtype).replace("torch.", ""), target=target)
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7  # in [1, 2)
    gen = torch.Generator().manual_seed(11)
    # 1.5 * (1 + k ulp) is an exact tie for odd k below 2 and for k = 2 mod 4 above; the others are
    # a quarter ulp or exactly on a value
    x = (1 + torch.randint(0, 64, (1, 3, 4, channels), generator=gen) * ulp).to(dtype)
    grad_out = (1 + torch.randint(0, 64, (1, 3, 4, channels), generator=gen) * ulp).to(dtype)
    om = dcnv4_packed(cfg, torch.zeros(1, 3, 4, 1, 1, 2, dtype=torch.float64), torch.full((1, 3, 4, 1, 1), 1.5)).to(dtype)
    xs = x.clone().requires_grad_()
    out = ops.run_config(cfg, xs, om)  # exactly cfg's kernel, for either target
    out.backward(grad_out)
    for got, v in ((out, x), (xs.grad, grad_out)):
        exact = v.double() * 1.5
        assert (exact.to(dtype).double() - exact).abs().eq(ulp / 2 * (1 + (exact >= 2).double())).any()  # ties occur
        assert torch.equal(got, exact.to(dtype))  # double -> dtype: round to nearest, ties to even
