"""Autocast of dcngen::dcnv4 / dcnv3: the op runs in the autocast dtype where a kernel exists,
forward and backward alike, and stays close to the fp32 result."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dcngen.autocast  # noqa: F401
import dcngen.nn
from dcngen import ops

G, C = 2, 16  # one kernel config shared with test_nn's DCNv4(32, group=2)


class _Record(TorchDispatchMode):
    """Records (op name, input dtypes, output dtypes) of the dcngen ops that run."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "dcngen":
            outs = out if isinstance(out, tuple) else (out,)
            self.calls.append((func._opname, [a.dtype for a in args if isinstance(a, torch.Tensor)], [o.dtype for o in outs]))
        return out


def _inputs(op):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, G * C, requires_grad=True)
    if op == "dcnv4":
        return x, (torch.randn(2, 6, 6, 3 * G * 9 + 2, requires_grad=True),)
    return x, (torch.randn(2, 6, 6, 2 * G * 9, requires_grad=True), torch.rand(2, 6, 6, G * 9, requires_grad=True))


def _call(op, x, rest):
    fn = ops.dcnv4 if op == "dcnv4" else ops.dcnv3
    return fn(x, *rest, group=G, group_channels=C)


def _rel(a, b):
    return ((a.float() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_cpu_bf16_forward_and_backward(op):
    x, rest = _inputs(op)
    ref = _call(op, x, rest)
    weight = torch.randn_like(ref)
    # gradients are compared with fp32 at the bf16-rounded inputs: an offset gradient jumps where
    # rounding moves a sample across a pixel edge, which is the input's precision, not the kernel's
    rounded = [t.detach().bfloat16().float().requires_grad_() for t in (x, *rest)]
    ref_grads = torch.autograd.grad((_call(op, rounded[0], rounded[1:]) * weight).sum(), rounded)

    rec = _Record()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _call(op, x, rest)
        grads = torch.autograd.grad((out.float() * weight).sum(), (x, *rest))
    assert out.dtype == torch.bfloat16
    names = [c[0] for c in rec.calls]
    assert names == [op, f"{op}_backward"]
    for _, in_dtypes, out_dtypes in rec.calls:
        assert set(in_dtypes) == {torch.bfloat16} and set(out_dtypes) == {torch.bfloat16}
    assert _rel(out, ref) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32  # cast back to the leaves' dtype by autograd
        assert _rel(g, r) < 3e-2


def test_float64_is_left_alone_and_float16_runs_in_float16():
    x, rest = _inputs("dcnv4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _call("dcnv4", x.double(), [r.double() for r in rest]).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.float16):
        out = _call("dcnv4", x, rest)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), _call("dcnv4", x, rest), rtol=5e-3, atol=5e-3)


def test_float16_and_mixed_inputs_run_in_the_autocast_dtype():
    """float16 inputs, or a mix of float32 and float16, all run in the autocast dtype (bfloat16 here)."""
    x, (om,) = _inputs("dcnv4")
    for inputs in ((x.half(), om.half()), (x, om.half())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _call("dcnv4", inputs[0], inputs[1:])
        assert out.dtype == torch.bfloat16
        assert _rel(out, _call("dcnv4", x, (om,))) < 2e-2


def test_modules_under_autocast():
    torch.manual_seed(0)
    m4 = dcngen.nn.DCNv4(G * C, group=G, center_feature_scale=True)
    m3 = dcngen.nn.DCNv3(G * C, group=G)
    for m in (m4, m3):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    x4, x3 = torch.randn(2, 36, G * C), torch.randn(2, 6, 6, G * C)
    for m, x in ((m4, x4), (m3, x3)):
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        assert _rel(out, ref) < 5e-2
        out.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
