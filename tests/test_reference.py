"""The reference against things it is not built from: torchvision's golden vectors, F.conv2d, exact
shifts, F.grid_sample, one-sided differences."""

import pytest
import torch
import torch.nn.functional as F
from helpers import golden_cases, golden_config, random_inputs, rel_err

from dcngen import baseline, reference, verify
from dcngen.config import DCNConfig

CASES = golden_cases()


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_matches_torchvision_vectors(name, case):
    cfg = golden_config(case, dtype="float64")
    x = torch.tensor(case["input"], requires_grad=True)
    om = torch.tensor(case["offset_mask"], requires_grad=True)
    out = reference.dcnv4(cfg, x, om)
    out.backward(torch.tensor(case["grad_output"]))
    assert rel_err(out, torch.tensor(case["output"])) < 1e-12
    assert rel_err(x.grad, torch.tensor(case["grad_input"])) < 1e-12
    assert rel_err(om.grad, torch.tensor(case["grad_offset_mask"])) < 1e-12


@pytest.mark.parametrize("kernel,stride,padding,dilation", [((3, 3), 1, 1, 1), ((3, 5), 2, (1, 2), (2, 1)), ((1, 1), 1, 0, 1)])
def test_zero_offsets_constant_weights_is_depthwise_conv(kernel, stride, padding, dilation):
    """Zero offsets and a weight w_k per point == depthwise conv2d whose kernel holds w_k (same for all channels)."""
    cfg = DCNConfig(group=2, group_channels=3, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, dtype="float64")
    n, h, w = 2, 9, 11
    x = torch.randn(n, h, w, cfg.channels, dtype=torch.float64)
    ho, wo = cfg.output_size(h, w)
    weights = torch.randn(cfg.num_points, dtype=torch.float64)
    offset = torch.zeros(n, ho, wo, cfg.group, cfg.num_points, 2, dtype=torch.float64)
    mask = weights.expand(n, ho, wo, cfg.group, cfg.num_points)
    out = reference.dcn_core(cfg, x, offset, mask)
    kh, kw = cfg.kernel_size
    kernel_hw = torch.zeros(kh, kw, dtype=torch.float64)
    for k, (i, j) in enumerate(cfg.points):
        kernel_hw[j, i] = weights[k]
    conv = F.conv2d(x.permute(0, 3, 1, 2), kernel_hw.expand(cfg.channels, 1, kh, kw), stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, groups=cfg.channels)
    assert rel_err(out, conv.permute(0, 2, 3, 1)) < 1e-13


def test_integer_offsets_are_exact_shifts():
    """A 1x1 kernel with integer offsets (dx, dy) reads x[ho + dy, wo + dx] (zero outside)."""
    cfg = DCNConfig(group=1, group_channels=4, kernel_size=1, padding=0, dtype="float64")
    x = torch.randn(1, 6, 7, 4, dtype=torch.float64)
    for dx, dy in [(0, 0), (1, 0), (0, -2), (3, 2), (-7, 0)]:
        offset = torch.tensor([float(dx), float(dy)], dtype=torch.float64).expand(1, 6, 7, 1, 1, 2)
        out = reference.dcn_core(cfg, x, offset, torch.ones(1, 6, 7, 1, 1, dtype=torch.float64))
        expected = torch.zeros_like(x)
        for ho in range(6):
            for wo in range(7):
                if 0 <= ho + dy < 6 and 0 <= wo + dx < 7:
                    expected[0, ho, wo] = x[0, ho + dy, wo + dx]
        assert (out - expected).abs().max() < 1e-14  # grid normalisation rounds at ~1e-16


def test_offset_scale_scales_the_grid_and_offsets():
    """s multiplies the dilation-grid term too: 3x3 with s=2, padding 1 samples where dilation 2, padding 2 does
    (px = wo - 1 + 2i either way; zero offsets)."""
    base = dict(group=1, group_channels=2, kernel_size=3, dtype="float64")
    a, b = DCNConfig(offset_scale=2.0, padding=1, **base), DCNConfig(dilation=2, padding=2, **base)
    x, offset, mask = random_inputs(a, 1, 8, 8)
    offset = torch.zeros_like(offset)
    assert rel_err(reference.dcn_core(a, x, offset, mask), reference.dcn_core(b, x, offset, mask)) < 1e-14


def test_gradcheck_float64():
    cfg = DCNConfig(group=2, group_channels=2, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dtype="float64", offset_scale=1.5)
    x, offset, mask = (t.requires_grad_() for t in random_inputs(cfg, 1, 5, 6, generator=torch.Generator().manual_seed(2)))
    assert torch.autograd.gradcheck(lambda *a: reference.dcn_core(cfg, *a), (x, offset, mask))


def test_points_outside_the_window_contribute_nothing_whatever_their_values():
    """SPEC section 1: a point outside the strict window (NaN and inf offsets fail the test) adds 0
    and gets zero gradients, even with a NaN or inf weight. Same results as moving those points far
    off the image with weight 0 (what grid_sample alone handles)."""
    cfg = DCNConfig(group=2, group_channels=3, kernel_size=3, dtype="float64")
    x, offset, mask = random_inputs(cfg, 2, 5, 6, generator=torch.Generator().manual_seed(3))
    dead = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) < 0.3
    hostile = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 7.0], dtype=torch.float64)
    picks = hostile[torch.randint(0, len(hostile), offset.shape, generator=torch.Generator().manual_seed(5))]
    offset = torch.where(dead.unsqueeze(-1), picks, offset)
    dead = ~reference.in_window(reference.sampling_locations(cfg, offset), 5, 6)  # 7.0 may still land inside
    mask = torch.where(dead & (torch.arange(mask.numel()).reshape(mask.shape) % 2 == 0), torch.full_like(mask, float("nan")), mask)
    far_offset = torch.where(dead.unsqueeze(-1), torch.full_like(offset, 1e4), offset)
    far_mask = torch.where(dead, torch.zeros_like(mask), mask)
    grad_out = torch.randn(2, 5, 6, cfg.channels, dtype=torch.float64)

    def results(*inputs):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = reference.dcn_core(cfg, *leaves)
        out.backward(grad_out)
        return out, *(t.grad for t in leaves)

    got, want = results(x, offset, mask), results(x, far_offset, far_mask)
    assert dead.any() and (~dead).any()
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-14
    assert (got[2][dead] == 0).all() and (got[3][dead] == 0).all()


def test_matches_grid_sample_off_pixel_lines():
    """Values and all gradients agree with the F.grid_sample formulation (dcngen.baseline); samples
    cross the borders, none on a pixel line, where grid_sample may take the offset gradient from
    either side."""
    cfg = DCNConfig(group=3, group_channels=4, kernel_size=(3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                    offset_scale=1.5, dtype="float64")
    x, offset, mask = random_inputs(cfg, 2, 7, 9, generator=torch.Generator().manual_seed(7))
    offset = offset * 2
    grad_out = torch.randn(2, *cfg.output_size(7, 9), cfg.channels, dtype=torch.float64)
    results = []
    for core in (reference.dcn_core, baseline.dcn_core):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
        out = core(cfg, *leaves)
        out.backward(grad_out)
        results.append([out, *(t.grad for t in leaves)])
    loc = reference.sampling_locations(cfg, offset)
    assert (loc.frac().abs() > 1e-6).all() and not reference.in_window(loc, 7, 9).all()
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-13


def test_offset_gradient_on_pixel_lines_is_taken_from_the_floor_corner():
    """docs/SPEC.md section 1: at an integer px (or py) the sample's corners are floor(p) and floor(p) + 1,
    so the offset gradient is the one-sided difference towards larger p. Bilinear sampling is linear in
    each coordinate within a cell, so that difference over 1/1024 px is exact."""
    cfg = DCNConfig(group=2, group_channels=3, kernel_size=3, dtype="float64")
    x, offset, mask = random_inputs(cfg, 1, 6, 7, generator=torch.Generator().manual_seed(8))
    offset = offset.round()  # every sample on a pixel corner
    grad_out = torch.randn(1, 6, 7, cfg.channels, dtype=torch.float64)
    leaf = offset.clone().requires_grad_()
    loss = lambda off: (reference.dcn_core(cfg, x, off, mask) * grad_out).sum()  # noqa: E731
    loss(leaf).backward()
    live = reference.in_window(reference.sampling_locations(cfg, offset), 6, 7)
    step = 2.0**-10
    for axis in (0, 1):
        onehot = torch.zeros_like(offset)
        for index in live.nonzero()[:12].tolist():
            onehot.zero_()
            onehot[(*index, axis)] = step
            expected = (loss(offset + onehot) - loss(offset)) / step
            assert abs(leaf.grad[(*index, axis)] - expected) < 1e-9 * max(1.0, abs(expected))


@pytest.mark.parametrize("scale, kernel, stride, dilation", [(1.0, 3, 1, 1), (0.37, 3, 2, 2), (2.5, (3, 5), 1, (2, 1))])
def test_verify_problems_sample_clear_of_pixel_lines(scale, kernel, stride, dilation):
    """verify.random_problem (the inputs of `dcngen verify` and of tune's gate) puts every sample
    k/8 px past a pixel line, k in 1..7, whatever the offset scale, so no offset gradient is taken
    where it jumps; some samples fall outside the image."""
    cfg = DCNConfig(group=2, group_channels=3, kernel_size=kernel, stride=stride, dilation=dilation, offset_scale=scale, dtype="float64")
    problem = verify.random_problem(cfg, 2, 9, 11, seed=3)
    loc = reference.sampling_locations(cfg, problem.offset)
    eighths = (loc - loc.floor()) * 8
    assert (eighths - eighths.round()).abs().max() < 1e-6
    assert eighths.round().min() >= 1 and eighths.round().max() <= 7
    assert not reference.in_window(loc, 9, 11).all()


@pytest.mark.parametrize("module", [reference, baseline], ids=["reference", "baseline"])
def test_wrong_tensors_are_refused_as_the_ops_refuse_them(module):
    """The public reference and baseline check their tensors like dcngen.ops (the same InputError
    text), rather than return an output of the offset's size or fail deep in a reshape."""
    import dcngen.ops as ops
    from dcngen.errors import InputError

    cfg = DCNConfig(group=2, group_channels=4, stride=2)  # 8x8 -> 4x4; 54 offset_mask channels
    x = torch.randn(1, 8, 8, 8)
    bad = {
        "dcnv4": [(x, torch.randn(1, 8, 8, 54)), (x, torch.randn(1, 4, 4, 50)), (x, torch.randn(1, 4, 4, 54).double()),
                  (x[0], torch.randn(1, 4, 4, 54)), (torch.randn(1, 8, 8, 6), torch.randn(1, 4, 4, 54))],
        "dcnv3": [(x, torch.randn(1, 4, 4, 36), torch.randn(1, 4, 5, 18)), (x, torch.randn(1, 4, 4, 35), torch.randn(1, 4, 4, 18))],
    }
    for op, cases in bad.items():
        for tensors in cases:
            with pytest.raises(InputError) as ours:
                getattr(module, op)(cfg, *tensors)
            with pytest.raises(InputError) as theirs:
                getattr(ops, op)(*tensors, **cfg.op_kwargs)
            assert str(ours.value) == str(theirs.value)
    assert module.dcnv3(cfg, x, torch.randn(1, 4, 4, 36), torch.randn(1, 4, 4, 18)).shape == (1, 4, 4, 8)
