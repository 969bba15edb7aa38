"""dcngen.nn.DCNv4 / DCNv3: official state_dicts load strictly, outputs equal the docs/SPEC.md
composition (written here from the formulas, on the reference op), gradients reach every
parameter, init, errors, reference fallback, torch.compile of a block, torch.export of a module."""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dcngen.nn
from dcngen import reference
from dcngen.config import DCNConfig
from dcngen.errors import ConfigError, InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rand(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * std


def official_dcnv4_state(channels, group, k, remove_center, dw_kernel_size, center_feature_scale, output_bias, without_pointwise, seed=0):
    """Random weights under the official DCNv4 module's parameter names and shapes (docs/SPEC.md 3)."""
    gen = torch.Generator().manual_seed(seed)
    c, g, p = channels, group, k * k - int(remove_center)
    sd = {}
    if dw_kernel_size is not None:
        sd["offset_mask_dw.weight"] = _rand(gen, c, 1, dw_kernel_size, dw_kernel_size, std=0.3)
        sd["offset_mask_dw.bias"] = _rand(gen, c, std=0.1)
    width = math.ceil(3 * g * p / 8) * 8
    sd["offset_mask.weight"] = _rand(gen, width, c, std=0.3)
    sd["offset_mask.bias"] = _rand(gen, width, std=0.3)
    if not without_pointwise:
        sd["value_proj.weight"] = _rand(gen, c, c, std=c**-0.5)
        sd["value_proj.bias"] = _rand(gen, c, std=0.1)
        sd["output_proj.weight"] = _rand(gen, c, c, std=c**-0.5)
        if output_bias:
            sd["output_proj.bias"] = _rand(gen, c, std=0.1)
    if center_feature_scale:
        sd["center_feature_scale_proj_weight"] = _rand(gen, g, c, std=0.3)
        sd["center_feature_scale_proj_bias"] = _rand(gen, g, std=0.3)
    return sd


def official_dcnv3_state(channels, group, k, remove_center, dw_kernel_size, center_feature_scale, seed=0):
    """Random weights under the official DCNv3 module's parameter names and shapes (docs/SPEC.md 2, LN norm)."""
    gen = torch.Generator().manual_seed(seed)
    c, g, p = channels, group, k * k - int(remove_center)
    sd = {
        "dw_conv.0.weight": _rand(gen, c, 1, dw_kernel_size, dw_kernel_size, std=0.3),
        "dw_conv.0.bias": _rand(gen, c, std=0.1),
        "dw_conv.1.1.weight": 1 + _rand(gen, c, std=0.1),
        "dw_conv.1.1.bias": _rand(gen, c, std=0.1),
        "offset.weight": _rand(gen, g * p * 2, c, std=0.3),
        "offset.bias": _rand(gen, g * p * 2, std=0.3),
        "mask.weight": _rand(gen, g * p, c, std=0.5),
        "mask.bias": _rand(gen, g * p, std=0.5),
        "input_proj.weight": _rand(gen, c, c, std=c**-0.5),
        "input_proj.bias": _rand(gen, c, std=0.1),
        "output_proj.weight": _rand(gen, c, c, std=c**-0.5),
        "output_proj.bias": _rand(gen, c, std=0.1),
    }
    if center_feature_scale:
        sd["center_feature_scale_proj_weight"] = _rand(gen, g, c, std=0.3)
        sd["center_feature_scale_proj_bias"] = _rand(gen, g, std=0.3)
    return sd


def _cfg(op, channels, group, k, offset_scale, remove_center):
    return DCNConfig(op=op, group=group, group_channels=channels // group, kernel_size=k, padding=k // 2, offset_scale=offset_scale, remove_center=remove_center, dtype="float64")


def spec_dcnv4(sd, cfg, dw_kernel_size, inp, h, w):
    """docs/SPEC.md section 3 module forward, from the formulas: input (N, L, C) -> (N, L, C)."""
    n, length, c = inp.shape
    x = F.linear(inp, sd["value_proj.weight"], sd["value_proj.bias"]) if "value_proj.weight" in sd else inp
    x = x.reshape(n, h, w, c)
    om_in = inp.reshape(n, h, w, c)
    if dw_kernel_size is not None:
        om_in = F.conv2d(om_in.permute(0, 3, 1, 2), sd["offset_mask_dw.weight"], sd["offset_mask_dw.bias"], padding=(dw_kernel_size - 1) // 2, groups=c).permute(0, 2, 3, 1)
    om = F.linear(om_in, sd["offset_mask.weight"], sd["offset_mask.bias"])
    y = reference.dcnv4(cfg, x, om)
    if "center_feature_scale_proj_weight" in sd:
        a = torch.sigmoid(y @ sd["center_feature_scale_proj_weight"].T + sd["center_feature_scale_proj_bias"])
        a = a.repeat_interleave(cfg.group_channels, dim=-1)
        y = y * (1 - a) + x * a
    y = y.reshape(n, length, c)
    if "output_proj.weight" in sd:
        y = F.linear(y, sd["output_proj.weight"], sd.get("output_proj.bias"))
    return y


def spec_dcnv3(sd, cfg, dw_kernel_size, inp):
    """docs/SPEC.md section 2 module forward, from the formulas: input (N, H, W, C) -> (N, H, W, C)."""
    n, h, w, c = inp.shape
    g, p = cfg.group, cfg.num_points
    x = F.linear(inp, sd["input_proj.weight"], sd["input_proj.bias"])
    x1 = F.conv2d(inp.permute(0, 3, 1, 2), sd["dw_conv.0.weight"], sd["dw_conv.0.bias"], padding=(dw_kernel_size - 1) // 2, groups=c)
    x1 = F.gelu(F.layer_norm(x1.permute(0, 2, 3, 1), (c,), sd["dw_conv.1.1.weight"], sd["dw_conv.1.1.bias"], eps=1e-6))
    offset = F.linear(x1, sd["offset.weight"], sd["offset.bias"])
    mask = torch.softmax(F.linear(x1, sd["mask.weight"], sd["mask.bias"]).reshape(n, h, w, g, p), dim=-1).reshape(n, h, w, g * p)
    y = reference.dcnv3(cfg, x, offset, mask)
    if "center_feature_scale_proj_weight" in sd:
        a = torch.sigmoid(x1 @ sd["center_feature_scale_proj_weight"].T + sd["center_feature_scale_proj_bias"])
        y = y * (1 - a.repeat_interleave(cfg.group_channels, dim=-1)) + x * a.repeat_interleave(cfg.group_channels, dim=-1)
    return F.linear(y, sd["output_proj.weight"], sd["output_proj.bias"])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# (channels, group, k, offset_scale, remove_center, dw_kernel_size, center_feature_scale, output_bias, without_pointwise, (H, W))
DCNV4_CASES = [
    (16, 2, 3, 1.0, False, 3, True, True, False, (5, 6)),  # group_channels 8: no %16 restriction
    (16, 2, 5, 2.0, True, None, False, False, False, None),
    (16, 2, 3, 1.0, False, 5, False, True, True, (4, 4)),
]


@pytest.mark.parametrize("case", DCNV4_CASES, ids=["k3_cfs_dw", "k5_rc_s2", "without_pointwise"])
def test_dcnv4_official_state_dict_output_and_gradients(case):
    c, g, k, s, rc, dwk, cfs, ob, wp, shape = case
    sd = official_dcnv4_state(c, g, k, rc, dwk, cfs, ob, wp)
    m = dcngen.nn.DCNv4(c, kernel_size=k, pad=k // 2, group=g, offset_scale=s, dw_kernel_size=dwk, center_feature_scale=cfs, remove_center=rc, output_bias=ob, without_pointwise=wp).double()
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, strict=True)
    h, w = shape or (5, 5)
    inp = torch.randn(2, h * w, c, dtype=torch.float64, requires_grad=True)
    out = m(inp, shape)
    leaves = {k_: v.clone().requires_grad_() for k_, v in sd.items()}
    inp2 = inp.detach().clone().requires_grad_()
    expect = spec_dcnv4(leaves, _cfg("dcnv4", c, g, k, s, rc), dwk, inp2, h, w)
    assert out.shape == (2, h * w, c)
    assert _rel(out, expect) < 1e-10

    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expect * weight).sum().backward()
    assert _rel(inp.grad, inp2.grad) < 1e-9
    for name, param in m.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert _rel(param.grad, leaves[name].grad) < 1e-9, name


DCNV3_CASES = [
    (16, 2, 3, 1.0, False, None, True),
    (16, 2, 5, 2.0, True, 3, False),
]


@pytest.mark.parametrize("case", DCNV3_CASES, ids=["k3_cfs", "k5_rc_s2_dw3"])
def test_dcnv3_official_state_dict_output_and_gradients(case):
    c, g, k, s, rc, dwk, cfs = case
    sd = official_dcnv3_state(c, g, k, rc, dwk or k, cfs)
    m = dcngen.nn.DCNv3(c, kernel_size=k, dw_kernel_size=dwk, pad=k // 2, group=g, offset_scale=s, center_feature_scale=cfs, remove_center=rc).double()
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, strict=True)
    inp = torch.randn(2, 5, 6, c, dtype=torch.float64, requires_grad=True)
    out = m(inp)
    leaves = {k_: v.clone().requires_grad_() for k_, v in sd.items()}
    inp2 = inp.detach().clone().requires_grad_()
    expect = spec_dcnv3(leaves, _cfg("dcnv3", c, g, k, s, rc), dwk or k, inp2)
    assert _rel(out, expect) < 1e-10

    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expect * weight).sum().backward()
    assert _rel(inp.grad, inp2.grad) < 1e-9
    for name, param in m.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert _rel(param.grad, leaves[name].grad) < 1e-9, name


def test_dcnv3_batchnorm_keys_and_defaults():
    m = dcngen.nn.DCNv3(32, group=2, norm_layer="BN", act_layer="ReLU")
    assert {k for k in m.state_dict() if k.startswith("dw_conv")} == {
        "dw_conv.0.weight", "dw_conv.0.bias", "dw_conv.1.0.weight", "dw_conv.1.0.bias",
        "dw_conv.1.0.running_mean", "dw_conv.1.0.running_var", "dw_conv.1.0.num_batches_tracked",
    }
    d = dcngen.nn.DCNv3()
    assert (d.channels, d.kernel_size, d.dw_kernel_size, d.group, d.group_channels, d.offset_scale) == (64, 3, 3, 4, 16, 1.0)
    assert d.offset.out_features == 72 and d.mask.out_features == 36
    for layer in (d.offset, d.mask):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0
    for layer in (d.input_proj, d.output_proj):
        bound = math.sqrt(6 / (2 * 64))
        assert layer.bias.abs().sum() == 0 and 0 < layer.weight.abs().max() <= bound


def test_dcnv4_defaults_init_and_zero_output():
    d = dcngen.nn.DCNv4()
    assert (d.channels, d.kernel_size, d.stride, d.pad, d.dilation, d.group, d.offset_scale) == (64, 3, 1, 1, 1, 4, 1.0)
    assert d.offset_mask.out_features == 112 and d.K == 36
    assert set(d.state_dict()) == {"offset_mask.weight", "offset_mask.bias", "value_proj.weight", "value_proj.bias", "output_proj.weight", "output_proj.bias"}
    m = dcngen.nn.DCNv4(32, group=2)  # the example block's kernel config
    out = m(torch.randn(2, 36, 32))
    assert out.shape == (2, 36, 32) and out.abs().max() == 0  # zero offset_mask => zero weights
    assert dcngen.nn.DCNv4(64, group=4, remove_center=True).offset_mask.out_features == 96


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        dcngen.nn.DCNv4(30, group=4)
    for module, kwargs, field in ((dcngen.nn.DCNv4, dict(group=0), "group"), (dcngen.nn.DCNv3, dict(channels=0), "channels"),
                                  (dcngen.nn.DCNv3, dict(group=2.0), "group")):
        with pytest.raises(ConfigError) as info:
            module(**{"channels": 16, **kwargs})
        assert info.value.field == field
    with pytest.raises(ValueError, match="odd kernel"):
        dcngen.nn.DCNv3(16, kernel_size=4, group=2, remove_center=True)
    m = dcngen.nn.DCNv4(16, group=2, stride=2)
    with pytest.raises(ValueError, match="output must keep"):
        m(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="shape="):
        dcngen.nn.DCNv4(16, group=2)(torch.randn(1, 12, 16))
    for module, bad in ((dcngen.nn.DCNv4(16, group=2), (1, 4, 4, 16)), (dcngen.nn.DCNv4(16, group=2), (1, 16, 8)),
                        (dcngen.nn.DCNv3(16, group=2), (1, 16, 16)), (dcngen.nn.DCNv3(16, group=2), (1, 4, 4, 8))):
        with pytest.raises(InputError, match=r"input must be \(N, .*C = 16, got shape"):
            module(torch.randn(bad))
    # the depthwise convolution must keep the image size: positive, odd
    for module, value in ((dcngen.nn.DCNv4, 0), (dcngen.nn.DCNv4, -1), (dcngen.nn.DCNv4, 2), (dcngen.nn.DCNv3, (3, 2))):
        with pytest.raises(ConfigError) as info:
            module(16, group=2, dw_kernel_size=value)
        assert info.value.field == "dw_kernel_size"
    m = dcngen.nn.DCNv4(16, group=2, dw_kernel_size=(3, 5))
    assert m.offset_mask_dw.padding == (1, 2) and m(torch.randn(1, 36, 16)).shape == (1, 36, 16)


FALLBACK = textwrap.dedent(
    """
    import sys, warnings, torch, dcngen.nn
    state, x, expect = torch.load(sys.argv[1])
    m = dcngen.nn.DCNv4(32, group=2)
    m.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, again = m(x), m(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "PyTorch reference" in messages[0], messages
    assert caught[0].filename == "<string>" and caught[0].lineno == 8, (caught[0].filename, caught[0].lineno)  # m(x) above, not dcngen or torch
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expect, rtol=1e-4, atol=1e-5)
    """
)


def test_reference_fallback_warns_once(tmp_path):
    """Where no kernel can be had (here: no C++ compiler, and none built in the cache), the module
    warns once and computes with the reference."""
    torch.manual_seed(0)
    m = dcngen.nn.DCNv4(32, group=2)
    with torch.no_grad():
        m.offset_mask.weight.normal_(std=0.1)
    x = torch.randn(1, 36, 32)
    torch.save((m.state_dict(), x, m(x).detach()), tmp_path / "case.pt")
    env = {**os.environ, "PATH": str(tmp_path / "no-compiler"), "DCNGEN_CACHE": str(tmp_path / "empty-cache")}
    run = subprocess.run([sys.executable, "-c", FALLBACK, str(tmp_path / "case.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_module_errors_that_a_fallback_would_hide_are_raised(monkeypatch):
    """Only "no kernel can be had here" falls back to the reference; a bad setting or record (a
    ConfigError from the op) is raised, not turned into a silent slowdown."""
    import dcngen.ops

    m = dcngen.nn.DCNv4(16, group=2)
    x = torch.randn(1, 16, 16)

    def bad_setting(*args, **kwargs):
        raise ConfigError("params", "a malformed tuning record")

    monkeypatch.setattr(dcngen.ops, "dcnv4", bad_setting)
    with pytest.raises(ConfigError, match="malformed"):
        m(x)


@pytest.mark.parametrize("make, shape", [(lambda: dcngen.nn.DCNv4(16, group=2), (0, 16, 16)), (lambda: dcngen.nn.DCNv3(16, group=2), (0, 4, 4, 16))])
def test_modules_take_an_empty_batch(make, shape):
    x = torch.randn(*shape, requires_grad=True)
    y = make()(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape


def test_dcnv4_module_compiles_without_a_shape_for_several_lengths():
    """shape=None: the side is the square root of the token count, traced symbolically."""
    torch.manual_seed(0)
    m = dcngen.nn.DCNv4(16, group=2)
    compiled = torch.compile(m, fullgraph=True)
    for n, length in ((2, 64), (3, 64), (3, 100)):
        x = torch.randn(n, length, 16)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not H\\*W"):
        m(torch.randn(1, 60, 16))


@pytest.mark.parametrize("make,options", [
    (lambda: dcngen.nn.DCNv3(16, kernel_size=3, group=2, center_feature_scale=True), {}),
    (lambda: dcngen.nn.DCNv4(16, group=2, dw_kernel_size=3), {"layout_optimization": False}),
], ids=["dcnv3", "dcnv4-dw"])
def test_compiled_module_trains_as_the_image_size_changes(make, options):
    """The second size recompiles with dynamic H and W. On the CPU, Inductor's layout optimization
    (torch 2.13) could not lay out DCNv3's projection, traced between the graph's input and its
    depthwise convolution: the module traces that branch first. DCNv4's value projection shares
    the convolution's size arguments, so it needs the optimization off (as the README says; Inductor
    turns it off for dynamic convolutions on GPUs). Outputs and every gradient equal eager's."""
    torch.manual_seed(0)
    module = make()
    compiled = torch.compile(module, fullgraph=True, options=options)
    is_v3 = isinstance(module, dcngen.nn.DCNv3)
    for h, w in ((6, 6), (7, 5), (8, 9)):
        x = torch.randn(*((2, h, w, 16) if is_v3 else (2, h * w, 16)), requires_grad=True)
        args = () if is_v3 else ((h, w),)
        eager = module(x, *args)
        eager.square().sum().backward()
        grads = [x.grad] + [p.grad for p in module.parameters()]
        module.zero_grad()
        x2 = x.detach().clone().requires_grad_()
        out = compiled(x2, *args)
        out.square().sum().backward()
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
        for got, want in zip([x2.grad] + [p.grad for p in module.parameters()], grads):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        module.zero_grad()


def _example():
    spec = importlib.util.spec_from_file_location("train_block", ROOT / "examples" / "train_block.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compile_fullgraph_block_forward_backward():
    torch.manual_seed(0)
    block = _example().Block(32, group=2)
    with torch.no_grad():
        block.dcn.offset_mask.weight.normal_(std=0.1)
    x = torch.randn(2, 6, 6, 32, requires_grad=True)
    eager = block(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    compiled = torch.compile(block, fullgraph=True)(x2)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
    for p, g in zip(block.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)


def test_export_with_dynamic_batch_saves_and_loads(tmp_path):
    """torch.export keeps the op as one dcngen node; the saved program runs other batch sizes."""
    torch.manual_seed(0)
    module = dcngen.nn.DCNv4(channels=32, group=4).eval()
    with torch.no_grad():
        module.offset_mask.weight.normal_(std=0.1)
    x = torch.randn(2, 10 * 12, 32)
    program = torch.export.export(module, (x, (10, 12)), dynamic_shapes=({0: torch.export.Dim("n")}, (None, None)))
    assert [n.target for n in program.graph.nodes if n.op == "call_function"].count(torch.ops.dcngen.dcnv4.default) == 1
    torch.export.save(program, tmp_path / "dcnv4.pt2")
    loaded = torch.export.load(tmp_path / "dcnv4.pt2").module()
    x3 = torch.randn(3, 10 * 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x3, (10, 12)), module(x3, (10, 12)), rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda **f: dcngen.nn.DCNv4(channels=16, group=2, dw_kernel_size=3, center_feature_scale=True, **f),
    lambda **f: dcngen.nn.DCNv3(channels=16, group=2, center_feature_scale=True, norm_layer="BN", **f),
], ids=["DCNv4", "DCNv3"])
def test_modules_take_device_and_dtype_like_torch_nn(make):
    """`dtype=` and `device=` create every parameter and buffer there (not silently ignored)."""
    torch.manual_seed(0)
    wide = make(dtype=torch.float64)
    assert {t.dtype for t in [*wide.parameters(), *wide.buffers()] if t.is_floating_point()} == {torch.float64}
    narrow = make()
    narrow.load_state_dict({k: v.float() for k, v in wide.state_dict().items()})
    shape = (2, 36, 16) if isinstance(wide, dcngen.nn.DCNv4) else (2, 6, 6, 16)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(wide(x).float(), narrow(x.float()), rtol=1e-4, atol=1e-5)
    meta = make(device="meta")
    assert {t.device.type for t in meta.parameters()} == {"meta"}
    assert meta(torch.empty(shape, device="meta")).shape == shape


def test_dcnv3_depthwise_kernel_defaults_to_the_kernel_size_and_keeps_the_image_size():
    """dw_kernel_size=None takes kernel_size (as the official module); the depthwise convolution is
    padded (kh // 2, kw // 2) so a rectangular one keeps H and W."""
    m = dcngen.nn.DCNv3(16, kernel_size=(5, 3), pad=(2, 1), group=2, device="meta")
    assert m.dw_kernel_size == (5, 3) and m.dw_conv[0].kernel_size == (5, 3) and m.dw_conv[0].padding == (2, 1)
    m = dcngen.nn.DCNv3(16, kernel_size=5, pad=2, group=2, device="meta")
    assert m.dw_kernel_size == 5 and m.dw_conv[0].kernel_size == (5, 5) and m.dw_conv[0].padding == (2, 2)
    m = dcngen.nn.DCNv3(16, kernel_size=3, dw_kernel_size=(3, 5), group=2)
    assert m.dw_conv[0].kernel_size == (3, 5) and m.dw_conv[0].padding == (1, 2)
    assert m.dw_conv(torch.zeros(2, 16, 6, 7)).shape == (2, 6, 7, 16)  # channels-first in, channels-last out


@pytest.mark.parametrize("kernel_size", [(3, 4), (4, 3), 4])
def test_dcnv3_remove_center_needs_an_odd_kernel_on_both_axes(kernel_size):
    """The official module's own message, for an even height or width."""
    with pytest.raises(ValueError, match=r"^remove_center is only compatible with odd kernel size\.$"):
        dcngen.nn.DCNv3(16, kernel_size=kernel_size, group=2, remove_center=True)


@pytest.mark.parametrize("kernel_size, remove_center, points", [(5, False, 25), (5, True, 24), ((3, 5), False, 15), (1, False, 1), (7, True, 48)])
def test_modules_size_their_point_layers_by_the_kernel(kernel_size, remove_center, points):
    """K = group x points, and the offset/mask layers, for kernels other than 3x3 (meta: no init cost)."""
    pad = tuple(k // 2 for k in (kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 2))
    v4 = dcngen.nn.DCNv4(16, kernel_size=kernel_size, pad=pad, group=2, remove_center=remove_center, device="meta")
    assert v4.K == 2 * points and v4.offset_mask.out_features == math.ceil(3 * 2 * points / 8) * 8
    if remove_center or kernel_size == 1 or isinstance(kernel_size, tuple):
        return
    v3 = dcngen.nn.DCNv3(16, kernel_size=kernel_size, pad=pad, group=2, remove_center=remove_center, device="meta")
    assert v3.offset.out_features == 2 * 2 * points and v3.mask.out_features == 2 * points
