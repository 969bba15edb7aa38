"""Shared test helpers: configs from the golden vectors, random inputs, relative errors."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from dcngen import records, reference, search
from dcngen.compilers import cuda
from dcngen.config import DCNConfig
from dcngen.errors import BuildError
from dcngen.verify import rel_err  # noqa: F401  (re-exported for the tests)

VECTORS = Path(__file__).resolve().parent / "data" / "dcnv4_torchvision.npz"  # golden vectors computed by torchvision


def _cuda_toolkit() -> bool:
    try:
        return Path(cuda.nvcc()).is_file() and Path(cuda.cuda_home(), "include", "cuda_fp16.h").is_file()
    except BuildError:
        return False


# nvcc and the CUDA headers: the CUDA compile tests and the SIMT emulator's host builds need them
needs_cuda_toolkit = pytest.mark.skipif(not _cuda_toolkit(), reason="needs the CUDA toolkit (nvcc and its headers)")


def golden_cases() -> list[tuple[str, dict]]:
    """[(case name, {config, input, offset_mask, output, grad_output, grad_input, grad_offset_mask})]."""
    data = np.load(VECTORS)
    names = sorted({k.split("/")[0] for k in data.files})
    return [(n, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(n + "/")}) for n in names]


def golden_config(case: dict, **overrides) -> DCNConfig:
    c = json.loads(str(case["config"]))
    fields = dict(
        kernel_size=(c["kernel_h"], c["kernel_w"]), stride=(c["stride_h"], c["stride_w"]), padding=(c["pad_h"], c["pad_w"]),
        dilation=(c["dilation_h"], c["dilation_w"]), group=c["group"], group_channels=c["group_channels"],
        offset_scale=c["offset_scale"], remove_center=bool(c["remove_center"]),
    )
    fields.update(overrides)
    return DCNConfig(**fields)


def random_inputs(cfg: DCNConfig, n: int, h: int, w: int, *, dtype=torch.float64, offset_range: float = 2.5, generator=None, device="cpu"):
    """Random x (N, H, W, G*C), offset (N, Ho, Wo, G, P, 2) and mask (N, Ho, Wo, G, P).

    Offsets are fractional (never near integers) and reach `offset_range` pixels past the
    dilation grid, so samples cross the image borders.
    """
    g, p = cfg.group, cfg.num_points
    ho, wo = cfg.output_size(h, w)
    kw = dict(dtype=torch.float64, generator=generator)
    x = torch.randn(n, h, w, g * cfg.group_channels, **kw)
    whole = torch.randint(-int(offset_range), int(offset_range) + 1, (n, ho, wo, g, p, 2), generator=generator).double()
    frac = 0.1 + 0.8 * torch.rand(n, ho, wo, g, p, 2, **kw)  # keeps clear of integer grid lines
    offset = whole + frac
    mask = torch.randn(n, ho, wo, g, p, **kw)
    return tuple(t.to(dtype=dtype, device=device) for t in (x, offset, mask))


def dcnv4_packed(cfg: DCNConfig, offset: torch.Tensor, mask: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
    """offset (N, Ho, Wo, G, P, 2), mask (N, Ho, Wo, G, P) -> packed offset_mask (N, Ho, Wo, Cpad)."""
    n, ho, wo = offset.shape[:3]
    packed = torch.cat((offset.flatten(-2), mask), dim=-1).reshape(n, ho, wo, -1)
    pad = (pad_to or cfg.padded_offset_mask_channels) - packed.shape[-1]
    return torch.nn.functional.pad(packed, (0, pad)).contiguous()


def dcnv3_split(offset: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """offset (N, Ho, Wo, G, P, 2), mask (N, Ho, Wo, G, P) -> (N, Ho, Wo, G*P*2), (N, Ho, Wo, G*P)."""
    n, ho, wo = offset.shape[:3]
    return offset.reshape(n, ho, wo, -1).contiguous(), mask.reshape(n, ho, wo, -1).contiguous()


def assert_compile_matches_eager(fn, inputs, tol: float = 1e-5) -> None:
    """fn(*inputs) -> scalar: the gradients under torch.compile(fullgraph=True) match eager mode."""
    eager = [t.clone().requires_grad_() for t in inputs]
    compiled = [t.clone().requires_grad_() for t in inputs]
    fn(*eager).backward()
    torch.compile(fn, fullgraph=True)(*compiled).backward()
    for a, b in zip(eager, compiled):
        assert rel_err(b.grad, a.grad) < tol


def offset_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t that starts one element into its storage (not vector-aligned)."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


def assert_offset_views_served(mod, cfg: DCNConfig) -> None:
    """A loaded kernel's forward and backward, called with every tensor (inputs, grad_out and the
    NaN-poisoned outputs) an offset view, write into the views what they write for aligned
    tensors, bit for bit. DCNv4's packed offset/mask and its gradient stay one tensor each."""
    gen = torch.Generator().manual_seed(5)
    dtype = getattr(torch, cfg.dtype)
    x, offset, mask = random_inputs(cfg, 1, 7, 9, generator=gen)
    offset, mask = (dcnv4_packed(cfg, offset, mask),) * 2 if cfg.op == "dcnv4" else dcnv3_split(offset, mask)
    x, offset, mask = (t.to(dtype) for t in (x, offset, mask))
    ho, wo = cfg.output_size(7, 9)
    grad_out = torch.randn(1, ho, wo, cfg.channels, generator=gen).to(dtype)

    def run(view):
        xs, os_, gs = view(x), view(offset), view(grad_out)
        ms = os_ if cfg.op == "dcnv4" else view(mask)
        out, grad_x = (view(torch.full(s, float("nan"), dtype=dtype)) for s in ((1, ho, wo, cfg.channels), x.shape))
        goff = view(torch.full_like(offset, float("nan")))
        gmask = goff if cfg.op == "dcnv4" else view(torch.full_like(mask, float("nan")))
        if cfg.op == "dcnv4":
            goff[..., cfg.min_offset_mask_channels :] = 0  # the caller zeroes the padding channels
        mod.forward(xs, os_, ms, out)
        mod.backward(xs, os_, ms, gs, grad_x, goff, gmask)
        return (out, grad_x, goff) if cfg.op == "dcnv4" else (out, grad_x, goff, gmask)

    for got, want in zip(run(offset_view), run(lambda t: t.clone())):
        assert got.data_ptr() % 16 != 0 and torch.equal(got, want)


def check_library_forward(cfg: DCNConfig, module) -> None:
    """One forward call of a loaded DCNv4 library on float64 CPU tensors, checked against the
    reference (proves the library works)."""
    gen = torch.Generator().manual_seed(0)
    n, h, w = 1, 5, 6
    ho, wo = cfg.output_size(h, w)
    x = torch.randn(n, h, w, cfg.channels, generator=gen, dtype=torch.float64)
    om = torch.randn(n, ho, wo, cfg.padded_offset_mask_channels, generator=gen, dtype=torch.float64)
    out = torch.full((n, ho, wo, cfg.channels), float("nan"), dtype=torch.float64)
    module.forward(x, om, om, out)
    torch.testing.assert_close(out, reference.dcnv4(cfg, x, om), rtol=1e-10, atol=1e-10)


_fresh = itertools.count()


def fresh_config(**kw) -> DCNConfig:
    """A config no other test (or earlier run) has built, so that its build compiles: its
    offset_scale is unique. DCNv4, 2 groups of 4 channels, float64, CPU, unless `kw` says otherwise."""
    scale = 1.0 + (uuid.uuid4().int % 10**9) / 10**12 + next(_fresh) * 1e-3
    return DCNConfig(**{"group": 2, "group_channels": 4, "dtype": "float64", **kw}, offset_scale=scale)


def finished_record(cfg: DCNConfig, bkt, best: dict, ms: float = 1.0) -> dict:
    """A finished tune's record of cfg at shape bucket `bkt` whose best parameters are `best` (as
    `dcngen tune` writes it; the default half as fast)."""
    default = search.default_params(cfg)
    return {"config": records.config_key(cfg), "generator_version": records.generator_version(), "bucket": list(bkt),
            "shape": [bkt[0], 8, 8], "best": {"params": best, "ms": ms}, "default": {"params": default, "ms": 2 * ms},
            "candidates": {records.params_name(best): ms, records.params_name(default): 2 * ms},
            "confirm": {"candidate_ms": ms, "default_ms": 2 * ms, "ratio": 0.5, "faster_rounds": [14, 14]}}
