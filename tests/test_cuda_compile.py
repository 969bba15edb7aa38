"""CUDA template kernels compile (no GPU needed): the full DCNv4/DCNv3 x dtype x kernel size x
group-channels sweep for sm_80 and sm_90 without a compiler warning and with zero register spills,
parameter variants, every other supported architecture, the real builder's artifact and metadata,
register caps relaxed where they spill, and build-time rejection of impossible parameters and of
layouts the target cannot hold."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import needs_cuda_toolkit

from dcngen.config import CUDA_ARCHS, DCNConfig
from dcngen.errors import ConfigError
from dcngen.generators import generate

pytestmark = needs_cuda_toolkit

ARCHS = ("sm_80", "sm_90")


def config(op, dtype, k, c, **kw) -> DCNConfig:
    return DCNConfig(op=op, dtype=dtype, kernel_size=k, padding=k // 2, group=4, group_channels=c, target="cuda:sm_90", **kw)


SWEEP = {
    f"{op}-{dtype}-{k}x{k}-c{c}": config(op, dtype, k, c)
    for op, dtype, k, c in itertools.product(("dcnv4", "dcnv3"), ("float32", "float16", "bfloat16"), (3, 5, 7), (8, 16, 24, 32, 64))
}
VARIANTS = {
    "vec2": config("dcnv4", "float16", 3, 32, params={"vec": 2, "bwd_vec": 2}),
    "vec4": config("dcnv4", "float16", 3, 32, params={"vec": 4, "pixels": 32}),
    "vec16": config("dcnv4", "float16", 3, 32, params={"vec": 16, "bwd_vec": 16}),
    "vec32-fp32": config("dcnv4", "float32", 3, 64, params={"vec": 32, "bwd_vec": 32}),
    "tail-c20": config("dcnv4", "float16", 3, 20, params={"vec": 8, "bwd_vec": 8}),
    "tail-c12-fp32": config("dcnv3", "float32", 3, 12, params={"vec": 8, "bwd_vec": 8}),
    "unroll1": config("dcnv4", "float16", 3, 16, params={"unroll": 1}),
    "share-fp16": config("dcnv4", "float16", 3, 32, params={"share": 1}),
    "share-fp32-unroll9": config("dcnv4", "float32", 3, 32, params={"share": 1, "unroll": 9}),
    "share-bf16-v3-7x7-c24-staged": config("dcnv3", "bfloat16", 7, 24, params={"share": 1, "stage": 1}),
    "share-fp64": config("dcnv3", "float64", 5, 32, params={"share": 1}),
    "half-blend-fp16": config("dcnv4", "float16", 3, 32, params={"half_blend": 1}),
    "half-blend-bf16-v3-5x5-c20-share-staged": config("dcnv3", "bfloat16", 5, 20, params={"half_blend": 1, "share": 1, "stage": 1, "vec": 8}),
    "det-fp32": config("dcnv4", "float32", 3, 16, params={"deterministic": 1}),
    "det-fp16": config("dcnv4", "float16", 3, 32, params={"deterministic": 1}),
    "det-bf16-7x7-fwd-tile-mma": config("dcnv3", "bfloat16", 7, 16, params={"deterministic": 1, "fwd_tile": 1, "fwd_tile_mma": 1}),
    "fp64": config("dcnv4", "float64", 3, 16),
    "fp64-det-fwd-tile": config("dcnv3", "float64", 5, 32, params={"deterministic": 1, "fwd_tile": 1}),
    "rc-stride2-dil2": DCNConfig(group=8, group_channels=16, kernel_size=3, stride=2, padding=2, dilation=2, remove_center=True, offset_scale=0.5, dtype="float16", target="cuda:sm_90"),
    "g80-c16": DCNConfig(group=80, group_channels=16, dtype="float16", target="cuda:sm_90"),
    "rect-3x5": DCNConfig(op="dcnv3", group=2, group_channels=8, kernel_size=(3, 5), padding=(1, 2), dtype="bfloat16", target="cuda:sm_90"),
    "bwd-tile-fwd-tile-mma-fp16": DCNConfig(group=4, group_channels=32, offset_scale=2.0, dtype="float16", target="cuda:sm_90",
                                            params={"bwd_tile": 1, "fwd_tile": 1, "fwd_tile_mma": 1}),
    "bwd-tile-fp32-v3-5x5": config("dcnv3", "float32", 5, 16, params={"bwd_tile": 1, "bwd_tile_threads": 512}),
    "bwd-tile-bf16-7x7-tail": config("dcnv4", "bfloat16", 7, 24, params={"bwd_tile": 1, "bwd_tile_h": 4, "bwd_tile_w": 8, "bwd_halo": 2, "fwd_tile": 1}),
    "mma-fp16": config("dcnv4", "float16", 3, 32, params={"mma": 1}),
    "mma-bf16-v3-7x7-c24": config("dcnv3", "bfloat16", 7, 24, params={"mma": 1, "mma_warps": 8}),
    "mma-fp16-c64-5x5": config("dcnv4", "float16", 5, 64, params={"mma": 1}),
    "mma-bf16-c8-rc": DCNConfig(group=8, group_channels=8, stride=2, padding=2, dilation=2, remove_center=True, dtype="bfloat16", target="cuda:sm_90", params={"mma": 1}),
    "mma-tiled-fp16": config("dcnv4", "float16", 3, 32, params={"fwd_mma": 1, "bwd_mma": 1}),
    "mma-tiled-bf16-v3-7x7-c16-4x8": config("dcnv3", "bfloat16", 7, 16, params={"fwd_mma": 1, "fwd_mma_h": 4, "fwd_mma_w": 8, "bwd_mma": 1,
                                                                                 "bwd_mma_h": 4, "bwd_mma_w": 8, "bwd_mma_warps": 8}),
    "fwd-mma-fp16-c64-5x5-16x8-4-warps": config("dcnv4", "float16", 5, 64, params={"fwd_mma": 1, "fwd_mma_h": 16, "fwd_mma_warps": 4}),
    "bwd-mma-fwd-tile-mma-fp16-c64-5x5-fp32-accumulator": config("dcnv4", "float16", 5, 64, params={"bwd_mma": 1, "atomic_dtype": 0, "fwd_tile": 1,
                                                                                                   "fwd_tile_mma": 1}),
    "fwd-tile-fp16": DCNConfig(group=4, group_channels=32, offset_scale=2.0, dtype="float16", target="cuda:sm_90", params={"fwd_tile": 1}),
    "fwd-tile-fp16-c16-16x16-512": config("dcnv4", "float16", 3, 16, params={"fwd_tile": 1, "fwd_tile_h": 16, "fwd_tile_threads": 512}),
    "fwd-tile-fp32-v3-7x7-c16": config("dcnv3", "float32", 7, 16, params={"fwd_tile": 1}),
    "fwd-tile-fp16-c64-rc": DCNConfig(group=2, group_channels=64, stride=2, padding=2, dilation=2, remove_center=True, dtype="float16", target="cuda:sm_90",
                                      params={"fwd_tile": 1, "bwd_tile": 1}),
    "bwd-tile-fp16-c8-rc": DCNConfig(group=8, group_channels=8, stride=2, padding=2, dilation=2, remove_center=True, dtype="float16", target="cuda:sm_90", params={"bwd_tile": 1}),
}
ALL = {**SWEEP, **VARIANTS}


@pytest.fixture(scope="module")
def reports() -> dict[str, list[dict] | Exception]:
    """ptxas reports of every config for sm_80 and sm_90, compiled in parallel (one nvcc each)."""
    from dcngen.compilers import cuda

    def one(cfg):
        try:
            return cuda.ptxas_report(generate(cfg), ARCHS, warnings_fail=True)
        except Exception as e:  # reported per test
            return e

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(one, ALL.values()))
    return dict(zip(ALL, results))


def expected_kernels(cfg: DCNConfig) -> set[str]:
    """The kernels every artifact of `cfg` must hold."""
    params = cfg.param_dict
    forward = ("dcn_forward_mma_kernel" if params.get("mma") else "dcn_forward_tiled_mma_kernel" if params.get("fwd_mma")
               else "dcn_forward_tile_mma_kernel" if params.get("fwd_tile_mma") else "dcn_forward_tiled_kernel" if params.get("fwd_tile")
               else "dcn_forward_kernel")
    backward = "dcn_backward_tiled_kernel" if params.get("bwd_tile") else "dcn_backward_mma_kernel" if params.get("bwd_mma") else "dcn_backward_kernel"
    return {forward, backward}


def check_report(report, cfg: DCNConfig, archs: tuple[str, ...] = ARCHS, spill_free: bool = True) -> None:
    """Every kernel of `cfg` in the ptxas `report` for each of `archs`, within 255 registers, and
    (spill_free) without spills or a stack frame."""
    if isinstance(report, Exception):
        raise report
    seen = {(k["kernel"], k["arch"]) for k in report}
    for kernel, arch in itertools.product(expected_kernels(cfg), archs):
        assert (kernel, arch) in seen, f"{kernel} missing for {arch}"
    for k in report:
        if spill_free:
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{k['kernel']} spills on {k['arch']}: {k}"
            assert k["stack"] == 0, f"{k['kernel']} uses a stack frame on {k['arch']}: {k}"
        assert 0 < k["registers"] <= 255


@pytest.mark.parametrize("name", list(SWEEP))
def test_sweep_compiles_without_spills(reports, name):
    check_report(reports[name], ALL[name])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_compiles_without_spills(reports, name):
    check_report(reports[name], ALL[name])
    if ALL[name].param_dict.get("deterministic"):
        assert any(k["kernel"] == "dcn_bounds_kernel" for k in reports[name])


def test_builder_artifact(tmp_path, monkeypatch):
    """The real builder: a .so with the four entry points, the ptxas report in meta.json."""
    import tvm_ffi

    from dcngen.build import build, load

    monkeypatch.setenv("DCNGEN_CACHE", str(tmp_path))
    art = build(generate(DCNConfig(group=4, group_channels=16, dtype="bfloat16", target="cuda:sm_80")))
    kernels = {k["kernel"]: k for k in art.meta["ptxas"]}
    assert {"dcn_forward_kernel", "dcn_backward_kernel"} <= set(kernels) and all(k["arch"] == "sm_80" and k["spill_stores"] == 0 for k in kernels.values())
    assert art.meta["launch"]["fwd_threads"] <= 1024 and art.meta["params"]["vec"] == 8
    mod = tvm_ffi.load_module(str(art.library))  # loads without a GPU
    for name in ("forward", "backward", "backward_with_workspace", "workspace_size"):
        assert mod[name] is not None
    assert mod["workspace_size"](1000) == (1000 * 4 + 255) // 256 * 256 + 256  # fp32 accumulator for bf16
    assert load(art)._workspace_size(10) > 0
    # the artifact needs no libtorch and no shared CUDA runtime
    import subprocess

    deps = subprocess.run(["ldd", str(art.library)], capture_output=True, text=True).stdout
    assert "libtorch" not in deps and "libcudart" not in deps


def test_cli_build_prints_the_register_report(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dcngen import cli
    from dcngen.cli import app

    monkeypatch.setenv("DCNGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(cli.console, "_width", 300)  # the table's cells whole, whatever the terminal (pytest-xdist's workers have none)
    result = CliRunner().invoke(app, ["build", "--target", "cuda:sm_80", "--dtype", "bfloat16", "--group-channels", "16"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│") and "sm_80" in line]
    assert any("dcn_forward_kernel<true>" in r for r in rows) and any("dcn_backward_kernel" in r for r in rows), result.output
    assert all(" 0/0 " in r for r in rows), result.output  # spill stores / loads
    forward = next(r for r in rows if "dcn_forward_kernel<true>" in r)
    assert "(registers)" in forward or "(threads)" in forward, result.output  # its theoretical occupancy and what limits it


def test_default_geometry():
    src = generate(config("dcnv4", "float16", 3, 32))
    p = dict(src.params)
    assert p["vec"] == 8 and src.extra_meta["launch"]["fwd_lanes"] == 4
    assert generate(DCNConfig(group=80, group_channels=16, dtype="float16", target="cuda:sm_90")).extra_meta["launch"]["bwd_threads"] <= 1024
    assert dict(generate(config("dcnv4", "float32", 3, 24)).params)["vec"] == 4  # 16 bytes dividing C
    assert dict(generate(DCNConfig(group_channels=1024, target="cuda:sm_90")).params)["vec"] == 32  # <= 32 lanes


@pytest.mark.parametrize("fields,match", [({"dtype": "float32"}, "16-bit inputs"), ({"group_channels": 8}, "multiple of 16"),
                                          ({"group_channels": 48}, "16, 32 or a multiple of 64"), ({"target": "cuda:sm_75"}, "sm_80")])
def test_tiled_forward_on_tensor_cores_rejects_what_it_cannot_run(fields, match):
    """fwd_tile_mma multiplies 16-bit 16-channel m-tiles (sm_80+), pairing a row's pieces in halves of the banks."""
    with pytest.raises(ConfigError, match=match) as e:
        generate(config("dcnv4", "float16", 3, 32, params={"fwd_tile": 1, "fwd_tile_mma": 1}).replace(**fields))
    assert e.value.field == "params"


@pytest.mark.parametrize(
    "params,match",
    [
        ({"vec": 3}, "power of two"),
        ({"vec": 1}, "at most 32"),  # 64 channels / 1 = 64 lanes
        ({"bwd_vec": 64}, "bytes"),
        ({"pixels": 100}, "1024"),
        ({"bwd_pixels": 33}, "1024"),
        ({"deterministic": 2}, "outside"),
        ({"threads_per_block": 128}, "unknown parameter"),
        ({"pixels": 16, "vec": 4, "min_blocks": 4}, "min_blocks=4 blocks of 1024 threads .* 2048 threads an sm_90 SM holds"),
        ({"bwd_pixels": 16, "bwd_vec": 4, "bwd_min_blocks": 4}, "bwd_min_blocks=4 .* at most 2"),
    ],
)
def test_invalid_params_rejected(params, match):
    with pytest.raises(ConfigError, match=match) as e:
        generate(config("dcnv4", "float32", 3, 64, params=params))
    assert e.value.field == "params"


def test_blocks_of_exactly_1024_threads_are_accepted():
    """The limit is inclusive: 64 pixels x 4 groups x 4 lanes (C=16, vec=4) = 1024 threads per block."""
    from dcngen.generators.template_cuda import launch_params

    cfg = DCNConfig(group=4, group_channels=16, target="cuda:sm_90", params={"vec": 4, "bwd_vec": 4, "pixels": 64, "bwd_pixels": 64})
    geometry = launch_params(cfg)[1]
    assert geometry["fwd_threads"] == geometry["bwd_threads"] == 1024
    generate(cfg)


def test_too_many_threads_per_pixel_rejected():
    """More groups than a block holds lanes for, even at the widest vector (128 bytes: one lane per group)."""
    with pytest.raises(ConfigError) as e:
        generate(DCNConfig(group=1100, group_channels=32, dtype="float32", target="cuda:sm_90"))
    assert e.value.field == "group"


@pytest.mark.parametrize(
    "params,match",
    [
        ({"deterministic": 1}, "not deterministic"),
        ({"bwd_tile_threads": 100}, "multiple of 32"),
        ({"bwd_tile_h": 64, "bwd_tile_w": 64, "bwd_halo": 32}, "shared memory"),
    ],
)
def test_invalid_bwd_tile_rejected(params, match):
    with pytest.raises(ConfigError, match=match) as e:
        generate(config("dcnv4", "float16", 3, 64, params={"bwd_tile": 1, **params}))
    assert e.value.field == "params"
    with pytest.raises(ConfigError, match="float64"):
        generate(config("dcnv4", "float64", 3, 64, params={"bwd_tile": 1}))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (config("dcnv4", "float32", 3, 32, params={"mma": 1}), "float16/bfloat16"),
        (config("dcnv4", "float16", 3, 20, params={"mma": 1}), "multiple of 8"),
        (config("dcnv4", "float16", 3, 32, params={"mma": 1}).replace(target="cuda:sm_75"), "sm_80"),
        (config("dcnv4", "float16", 3, 128, params={"mma": 1, "mma_warps": 8}), "fewer mma_warps"),
    ],
)
def test_invalid_mma_rejected(cfg, match):
    with pytest.raises(ConfigError, match=match) as e:
        generate(cfg)
    assert e.value.field == "params"


@pytest.mark.parametrize("kernel", ["bwd_mma", "fwd_mma"])
@pytest.mark.parametrize("fields,match", [({"dtype": "float32"}, "float16/bfloat16"), ({"group_channels": 24}, "multiple of 16"),
                                          ({"target": "cuda:sm_75"}, "sm_80")])
def test_tiled_tensor_core_kernels_reject_what_they_cannot_run(kernel, fields, match):
    cfg = config("dcnv4", "float16", 3, 32, params={kernel: 1}).replace(**fields)
    with pytest.raises(ConfigError, match=match) as e:
        generate(cfg)
    assert e.value.field == "params"


@pytest.mark.parametrize("fields,match", [({"group_channels": 12}, "multiple of 16"), ({"dtype": "float32", "group_channels": 2}, "multiple of 16"),
                                          ({"target": "cuda:sm_75"}, "sm_80"), ({"dtype": "float32", "group_channels": 264}, "at most 32")])
def test_tiled_forward_rejects_what_it_cannot_run(fields, match):
    """fwd_tile copies and reads 16-byte pieces of rows (cp.async: sm_80+), a lane a piece."""
    with pytest.raises(ConfigError, match=match) as e:
        generate(config("dcnv4", "float16", 3, 32, params={"fwd_tile": 1}).replace(**fields))
    assert e.value.field == "params"


@pytest.mark.parametrize(
    "params,match",
    [
        ({"bwd_mma": 1, "deterministic": 1}, "drop deterministic"),
        ({"bwd_mma": 1, "bwd_mma_h": 5, "bwd_mma_w": 5}, "multiple of 16"),
        ({"bwd_mma": 1, "bwd_mma_h": 32, "bwd_mma_w": 32}, "KB of shared memory"),
        ({"fwd_mma": 1, "mma": 1}, "drop one of them"),
        ({"fwd_mma": 1, "fwd_mma_h": 5, "fwd_mma_w": 5}, "whole 16-pixel m-tiles"),
        ({"fwd_mma": 1, "fwd_mma_warps": 3}, "whole 16-pixel m-tiles"),
        ({"fwd_mma": 1, "fwd_mma_h": 32, "fwd_mma_w": 32}, "KB of shared memory"),
        ({"fwd_tile": 1, "fwd_mma": 1}, "keep one of them"),
        ({"fwd_tile": 1, "fwd_tile_threads": 48}, "multiple of 32"),
        ({"fwd_tile": 1, "fwd_tile_h": 64, "fwd_tile_w": 64}, "KB of shared memory"),
        ({"fwd_tile_mma": 1}, "set fwd_tile=1 too"),
    ],
)
def test_invalid_tiled_params_rejected(params, match):
    with pytest.raises(ConfigError, match=match) as e:
        generate(config("dcnv4", "float16", 3, 32, params=params))
    assert e.value.field == "params"


@pytest.mark.parametrize("name", ["mma-tiled-fp16", "mma-tiled-bf16-v3-7x7-c16-4x8", "bwd-tile-fwd-tile-mma-fp16", "bwd-tile-bf16-7x7-tail",
                                  "fwd-tile-fp16"])
def test_layouts_count_the_static_shared_memory_ptxas_reports(reports, name):
    """The layout checks add each tiled kernel's static __shared__ arrays to its dynamic layout:
    the CUDA runtime refuses a launch whose sum passes the limit."""
    from dcngen.generators.template_cuda import launch_params

    geometry = launch_params(ALL[name])[1]
    kernels = {"fwd_mma": "dcn_forward_tiled_mma_kernel", "fwd_tile": "dcn_forward_tile_mma_kernel" if ALL[name].param_dict.get("fwd_tile_mma")
               else "dcn_forward_tiled_kernel", "bwd_mma": "dcn_backward_mma_kernel", "bwd_tile": "dcn_backward_tiled_kernel"}
    checked = 0
    for layout, kernel in kernels.items():
        if layout in geometry:
            shared = {k["shared"] for k in reports[name] if k["kernel"] == kernel}
            assert shared == {geometry[layout]["static_bytes"]}, (layout, shared)
            checked += 1
    assert checked


def test_a_layout_that_fits_only_without_its_static_arrays_is_refused():
    """sm_86, fwd_mma 2x32 at C32: halo 2's dynamic layout (98.75 KB) is within the 99 KB limit, but
    not with the kernel's 272 static bytes, so the default halo drops to 1, and an explicit halo 2
    is refused."""
    from dcngen.generators.template_cuda import launch_params

    cfg = DCNConfig(group=2, group_channels=32, dtype="float16", offset_scale=2.0, target="cuda:sm_86", params={"fwd_mma": 1, "fwd_mma_h": 2, "fwd_mma_w": 32})
    params, geometry = launch_params(cfg)
    assert params["fwd_halo"] == 1 and geometry["fwd_mma"]["smem_bytes"] + geometry["fwd_mma"]["static_bytes"] <= 99 * 1024
    with pytest.raises(ConfigError, match="sm_86 allows at most 99 KB"):
        launch_params(cfg.replace(params={**cfg.param_dict, "fwd_halo": 2}))


def test_huge_offset_scale_is_refused_at_once():
    """The default halo grows with offset_scale; the largest fitting one is found by bisection."""
    import time

    start = time.monotonic()
    with pytest.raises(ConfigError, match="shared memory"):
        generate(config("dcnv4", "float16", 3, 32, params={"bwd_mma": 1}).replace(offset_scale=1e9))
    assert time.monotonic() - start < 5


def test_shared_memory_limits_follow_the_target():
    """A layout too large for the target's shared memory per block is rejected when it is built,
    naming the architecture and its limit; register caps (blocks per SM) follow its SM."""
    from dcngen.generators.template_cuda import launch_params

    big = dict(op="dcnv4", group=4, group_channels=48, dtype="float16", offset_scale=2.0)  # default halo 4: a 21x21 region
    assert launch_params(DCNConfig(**big, target="cuda:sm_90", params={"fwd_mma": 1}))[1]["fwd_mma"]["smem_bytes"] > 99 * 1024
    for arch in ("sm_86", "sm_89", "sm_120"):
        with pytest.raises(ConfigError, match=f"{arch} allows at most 99 KB") as e:
            generate(DCNConfig(**big, target=f"cuda:{arch}", params={"fwd_mma": 1, "fwd_halo": 4}))
        assert e.value.field == "params" and "fwd_halo" in str(e.value)
        # left to the default, the halo shrinks until the layout fits
        params, geometry = launch_params(DCNConfig(**big, target=f"cuda:{arch}", params={"fwd_mma": 1, "bwd_mma": 1}))
        assert 1 <= params["fwd_halo"] < 4 and geometry["fwd_mma"]["smem_bytes"] <= 99 * 1024 and geometry["bwd_mma"]["smem_bytes"] <= 99 * 1024
    small = dict(big, offset_scale=1.0, params={"fwd_mma": 1})  # halo 2
    blocks = {arch: launch_params(DCNConfig(**small, target=f"cuda:{arch}"))[1]["fwd_mma"]["min_blocks"] for arch in ("sm_86", "sm_90")}
    assert blocks == {"sm_86": 1, "sm_90": 2}


def test_automatic_register_cap_is_relaxed_where_it_spills(tmp_path, monkeypatch):
    """This forward (2 channels a thread, 6 points a batch) spills under its automatic 64-register
    cap on sm_90: the built artifact has the cap lower (fewer resident blocks per SM) and no spills.
    A cap the config sets stays as it is."""
    from dcngen.build import build
    from dcngen.generators.template_cuda import forward_spills, launch_params
    from dcngen.kernels import build_config

    monkeypatch.setenv("DCNGEN_CACHE", str(tmp_path))
    cfg = DCNConfig(group=4, group_channels=8, dtype="float32", target="cuda:sm_90", params={"vec": 2, "pixels": 8, "unroll": 6})
    automatic = launch_params(cfg)[0]["min_blocks"]
    assert forward_spills(build(generate(cfg)).meta["ptxas"])
    art = build_config(cfg)
    assert not forward_spills(art.meta["ptxas"]) and 1 <= art.meta["params"]["min_blocks"] < automatic
    explicit = cfg.replace(params={"min_blocks": automatic})
    assert build_config(explicit).meta["params"]["min_blocks"] == automatic


# Every other supported architecture: a few configs of each kernel family compile, without spills
# (sm_80 and sm_90 run the whole sweep above). mma=1 is only compiled: on sm_120 ptxas caps it at
# 128 registers and spills 4 bytes; it is opt-in, and fwd_mma is the tiled forward that replaces it.
OTHER_ARCHS = tuple(a for a in CUDA_ARCHS if a not in ARCHS)
ARCH_CASES = {
    "default-fp16": (config("dcnv4", "float16", 3, 32), True),
    "default-bf16-v3-5x5-c16": (config("dcnv3", "bfloat16", 5, 16), True),
    "bwd-tile-fp32": (config("dcnv4", "float32", 3, 16, params={"bwd_tile": 1}), True),
    "tiled-tensor-cores-fp16": (config("dcnv4", "float16", 3, 32, params={"fwd_mma": 1, "bwd_mma": 1}), True),
    "mma-bf16": (config("dcnv4", "bfloat16", 3, 32, params={"mma": 1}), False),
}


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_other_architectures_compile(name):
    from dcngen.compilers import cuda

    cfg, spill_free = ARCH_CASES[name]
    tensor_cores = any(cfg.param_dict.get(p) for p in ("mma", "fwd_mma", "bwd_mma"))
    archs = tuple(a for a in OTHER_ARCHS if not tensor_cores or int(a[3:]) >= 80)
    check_report(cuda.ptxas_report(generate(cfg.replace(target=f"cuda:{archs[0]}")), archs, warnings_fail=True), cfg, archs, spill_free)


def test_float32_tiled_backward_keeps_enough_fixed_point_bits():
    """bwd_tile's fixed-point sums lose float32 accuracy in large tiles of many points: an explicit
    such tile is rejected, naming the limit; the default tile shrinks for float32 (16-bit dtypes
    keep 8x16)."""
    from dcngen.generators.template_cuda import launch_params

    with pytest.raises(ConfigError, match="float32 needs 21") as e:
        generate(config("dcnv4", "float32", 7, 16, params={"bwd_tile": 1, "bwd_tile_h": 8, "bwd_tile_w": 16}))
    assert e.value.field == "params" and "bwd_tile_h" in str(e.value)
    for k in (3, 5, 7):
        params, geometry = launch_params(config("dcnv4", "float32", k, 16, params={"bwd_tile": 1}))
        assert geometry["bwd_tile"]["fixed_bits"] >= 21 and params["bwd_tile_h"] * params["bwd_tile_w"] * k * k <= 512
    assert launch_params(config("dcnv4", "float16", 7, 16, params={"bwd_tile": 1}))[0]["bwd_tile_w"] == 16
    # a thread per pixel and lane, up to 256: a 2x4 tile of 4 lanes per pixel is one warp
    params, geometry = launch_params(config("dcnv4", "float32", 7, 16, params={"bwd_tile": 1}))
    assert (params["bwd_tile_h"], params["bwd_tile_w"], geometry["bwd_lanes"], params["bwd_tile_threads"]) == (2, 4, 4, 32)
