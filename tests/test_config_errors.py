"""Every invalid config field raises one ConfigError naming the field, from Python and from `dcngen build`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dcngen.config import DCNConfig
from dcngen.errors import ConfigError
from dcngen.generators import generate

INVALID = [
    ("op", dict(op="dcnv5")),
    ("op", dict(op="")),
    ("group", dict(group=0)),
    ("group", dict(group=-4)),
    ("group", dict(group=2.0)),
    ("group", dict(group=True)),
    ("group", dict(group="4")),
    ("group_channels", dict(group_channels=0)),
    ("group_channels", dict(group_channels=None)),
    ("kernel_size", dict(kernel_size=0)),
    ("kernel_size", dict(kernel_size=(3, 0))),
    ("kernel_size", dict(kernel_size="3x")),
    ("kernel_size", dict(kernel_size=(3, 3, 3))),
    ("kernel_size", dict(kernel_size=3.0)),
    ("kernel_size", dict(kernel_size=True)),
    ("stride", dict(stride=0)),
    ("stride", dict(stride=(1, -1))),
    ("padding", dict(padding=-1)),
    ("padding", dict(padding="a")),
    ("dilation", dict(dilation=0)),
    ("dilation", dict(dilation=(2, 0))),
    ("offset_scale", dict(offset_scale=float("nan"))),
    ("offset_scale", dict(offset_scale=float("inf"))),
    ("offset_scale", dict(offset_scale="big")),
    ("offset_scale", dict(offset_scale=None)),
    ("offset_scale", dict(offset_scale=True)),  # as remove_center=1 and group=2.0 are refused
    ("offset_scale", dict(offset_scale=1e39)),  # inf in the float32 the kernels compute locations in
    ("offset_scale", dict(offset_scale=-1e39, dtype="bfloat16")),
    ("kernel_size", dict(kernel_size=(1, 65537))),  # more points than any kernel needs (and a huge points tuple)
    ("dilation", dict(dilation=2**30, padding=2**30)),  # the window's extent passes int32
    ("padding", dict(padding=2**30)),
    ("stride", dict(stride=2**31)),
    ("remove_center", dict(remove_center=1)),
    ("remove_center", dict(remove_center=True, kernel_size=2)),
    ("remove_center", dict(remove_center=True, kernel_size=(3, 5))),
    ("remove_center", dict(remove_center=True, kernel_size=1)),
    ("dtype", dict(dtype="float8_e4m3fn")),
    ("dtype", dict(dtype="int8")),
    ("target", dict(target="gpu")),
    ("target", dict(target="cuda:sm_10")),
    ("target", dict(target="cuda:90")),
    ("backend", dict(backend="triton")),
    ("params", dict(params=(("pixel_chunk", "many"),))),
    ("params", dict(params=5)),
    ("params", dict(params={"pixel_chunk": 2.9})),  # int() would have made it 2
    ("params", dict(params={"unroll_points": True})),
    ("params", dict(params=(("pixel_chunk", 2), ("pixel_chunk", 1)))),  # a repeated --param
]


@pytest.mark.parametrize("field, kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_field_raises_one_config_error_naming_it(field, kwargs):
    with pytest.raises(ConfigError) as info:
        DCNConfig(**kwargs)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_numpy_ints_and_signed_zero_are_the_same_config():
    np = pytest.importorskip("numpy")
    a = DCNConfig(group=np.int64(2), kernel_size=np.int64(5), stride=(np.int32(1), 2), offset_scale=-0.0, params={"pixel_chunk": np.int64(4)})
    b = DCNConfig(group=2, kernel_size=5, stride=(1, 2), offset_scale=0.0, params={"pixel_chunk": "4"})
    assert a == b and hash(a) == hash(b) and a.key == b.key and len({a, b}) == 1


# one config of every field differing from the default (params: one generator parameter)
ONE_FIELD_CHANGED = dict(op="dcnv3", group=2, group_channels=8, kernel_size=5, stride=2, padding=2, dilation=2, offset_scale=0.5,
                         remove_center=True, dtype="float16", target="cuda:sm_90", backend="tvm", params={"vec": 2})


@pytest.mark.parametrize("field", ONE_FIELD_CHANGED)
def test_every_field_is_part_of_the_key(field):
    """The key names a config (tuning records are looked up by it): configs that differ in one field
    have different keys and hashes."""
    base = DCNConfig(kernel_size=5, padding=2) if field == "remove_center" else DCNConfig()
    other = base.replace(**{field: ONE_FIELD_CHANGED[field]})
    assert other != base and other.key != base.key and hash(other) != hash(base)


def test_every_changed_field_is_covered():
    from dataclasses import fields

    assert {f.name for f in fields(DCNConfig)} == set(ONE_FIELD_CHANGED)


def test_tvm_cuda_takes_16_byte_vectors():
    """TVM's CUDA schedule emits vectors of up to 16 bytes (float4, 8 halves): they are accepted,
    and the default is the widest."""
    from dcngen.generators.tvm_gen import params_for

    for dtype, widest in (("float32", 4), ("float16", 8), ("bfloat16", 8), ("float64", 2)):
        cfg = DCNConfig(**TVM_CUDA, group_channels=16, dtype=dtype)
        assert params_for(cfg)["vec"] == widest
        assert params_for(cfg.replace(params={"vec": widest}))["vec"] == widest


def test_cuda_target_without_a_gpu_names_the_target():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="'target'"):
        DCNConfig(target="cuda")


TVM_CUDA = dict(backend="tvm", target="cuda:sm_90", group=4)


@pytest.mark.parametrize("kwargs", [dict(params={"no_such_param": 3}), dict(params={"pixel_chunk": 0}), dict(params={"pixel_chunk": 10**6}),
                                    # vector widths TVM's CUDA code generator cannot emit (wider than 16 bytes, not a power of two)
                                    dict(TVM_CUDA, group_channels=16, params={"vec": 16}),
                                    dict(TVM_CUDA, group_channels=16, dtype="float16", params={"vec": 16}),
                                    dict(TVM_CUDA, group_channels=16, dtype="float64", params={"vec": 8}),
                                    dict(TVM_CUDA, group_channels=12, params={"vec": 12}),
                                    dict(TVM_CUDA, group_channels=15, params={"vec": 5})])
def test_generator_params_are_config_errors(kwargs):
    with pytest.raises(ConfigError) as info:
        generate(DCNConfig(**kwargs))
    assert info.value.field == "params"


def test_every_field_is_covered():
    from dataclasses import fields

    assert {f.name for f in fields(DCNConfig)} == {field for field, _ in INVALID}


# ---- the CLI -----------------------------------------------------------------------------------

CLI_INVALID = [
    ("op", ["--op", "dcnv5"]),
    ("group", ["--group", "0"]),
    ("--group", ["--group", "abc"]),  # typer's own usage error names the flag
    ("group_channels", ["--group-channels", "0"]),
    ("group_channels", ["--group-channels", "-2"]),
    ("kernel_size", ["--kernel-size", "0"]),
    ("kernel_size", ["--kernel-size", "3x"]),
    ("kernel_size", ["--kernel-size", "abc"]),
    ("stride", ["--stride", "0x1"]),
    ("padding", ["--padding", "-1"]),
    ("dilation", ["--dilation", "0"]),
    ("offset_scale", ["--offset-scale", "nan"]),
    ("offset_scale", ["--offset-scale", "inf"]),
    ("--offset-scale", ["--offset-scale", "big"]),
    ("remove_center", ["--remove-center", "--kernel-size", "2"]),
    ("remove_center", ["--remove-center", "--kernel-size", "3x5"]),
    ("dtype", ["--dtype", "float8_e4m3fn"]),
    ("dtype", ["--dtype", "int8"]),
    ("target", ["--target", "gpu"]),
    ("target", ["--target", "cuda:sm_10"]),
    ("backend", ["--backend", "triton"]),
    ("params", ["--param", "pixel_chunk"]),
    ("params", ["--param", "pixel_chunk=abc"]),
    ("params", ["--param", "no_such_param=3"]),
    ("params", ["--param", "pixel_chunk=0"]),
]


def _cli():
    try:
        from dcngen.cli import app
    except ImportError as e:  # the CLI module is optional until it lands
        pytest.skip(f"dcngen.cli is not importable: {e}")
    return app


@pytest.mark.parametrize("field, args", CLI_INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CLI_INVALID)])
def test_cli_build_rejects_invalid_flags(field, args):
    from typer.testing import CliRunner

    app = _cli()
    result = CliRunner().invoke(app, ["build", *args])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    output = result.output.strip()
    assert "Traceback" not in output
    assert field in output, output
    message = [line for line in output.splitlines() if field in line]
    assert message, output
    if not field.startswith("--"):  # our own one-line message (typer's usage errors draw a small box)
        assert len(output.splitlines()) == 1, output
        assert f"'{field}'" in output


CLI_BAD_RUNS = [
    (["verify", "--kernel-size", "5", "--padding", "0", "--shape", "1x3x3"], "leaves no output pixel on a 3x3 input"),
    (["bench", "--kernel-size", "5", "--padding", "0", "--shape", "1x4x5"], "leaves no output pixel on a 4x5 input"),
    (["tune", "--kernel-size", "5", "--padding", "0", "--shape", "1x4x5"], "leaves no output pixel on a 4x5 input"),
    (["bench", "--rounds", "0"], "--rounds"),
    (["verify", "--shape", "0x9x11"], "invalid --shape '0x9x11'"),  # an empty batch: nothing to verify
    (["verify", "--shape", "\u00b2x8x8"], "invalid --shape"),  # str.isdigit() takes superscripts, int() does not
    (["verify", "--shape", "1x100000x100000"], "GiB in float64, more than this machine's"),
    (["bench", "--shape", "1x99999999999x99999999999"], "GiB in float64, more than this machine's"),
]


@pytest.mark.parametrize("args, message", CLI_BAD_RUNS, ids=[" ".join(a[:2]) for a, _ in CLI_BAD_RUNS])
def test_cli_runs_that_cannot_work_say_why(args, message):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in " ".join(result.output.split()), result.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("command", ["verify", "bench", "tune"])
def test_cli_cuda_runs_without_a_gpu_say_so(command):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli(), [command, "--target", "cuda:sm_90"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "needs a CUDA GPU and torch sees none" in " ".join(result.output.split()), result.output


def test_cli_error_in_a_real_process_has_no_traceback():
    _cli()
    proc = subprocess.run([sys.executable, "-m", "dcngen.cli", "build", "--kernel-size", "0"], capture_output=True, text=True, timeout=120)
    if "No module named dcngen.cli.__main__" in proc.stderr or "__main__" in proc.stderr and proc.returncode == 1 and not proc.stdout:
        proc = subprocess.run([sys.executable, "-c", "from dcngen.cli import app; app()", "build", "--kernel-size", "0"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "kernel_size" in lines[0], proc.stderr


@pytest.mark.parametrize("group, channels, dtype", [(33, 96, "float64"), (129, 32, "float32"), (65, 48, "float32"), (257, 16, "float32")])
def test_cuda_many_groups_take_wider_vectors_by_default(group, channels, dtype):
    """A pixel's G groups of lanes must fit one block: the default vector widens (up to 128 bytes a
    thread) rather than refusing the group count."""
    from dcngen.generators.template_cuda import launch_params

    _, geometry = launch_params(DCNConfig(group=group, group_channels=channels, dtype=dtype, target="cuda:sm_90"))
    assert geometry["fwd_threads"] <= 1024 and geometry["bwd_threads"] <= 1024


@pytest.mark.parametrize("dtype, widest", [("float32", 1024), ("float16", 2048), ("float64", 512)])
def test_cuda_group_channels_beyond_one_warp_name_the_field(dtype, widest):
    """A (pixel, group) takes at most one warp of 128-byte vectors; beyond that the default
    parameters cannot help, so the error names group_channels, not the parameters."""
    generate(DCNConfig(group=1, group_channels=widest, dtype=dtype, target="cuda:sm_90"))
    with pytest.raises(ConfigError) as info:
        generate(DCNConfig(group=1, group_channels=widest + 1, dtype=dtype, target="cuda:sm_90"))
    assert info.value.field == "group_channels" and f"at most {widest}" in str(info.value)


# ---- the limits, exactly at and one past each --------------------------------------------------

LIMIT = (1 << 31) - 1


@pytest.mark.parametrize("field, at_limit, past_limit", [
    ("kernel_size", dict(kernel_size=(1, 65536)), dict(kernel_size=(1, 65537))),  # MAX_POINTS sampling points
    ("kernel_size", dict(kernel_size=(256, 256)), dict(kernel_size=(256, 257))),
    ("dilation", dict(kernel_size=2, dilation=LIMIT - 1), dict(kernel_size=2, dilation=LIMIT)),  # a window of 2^31 - 1, then 2^31
    ("stride", dict(stride=LIMIT), dict(stride=LIMIT + 1)),
    ("padding", dict(padding=(1 << 30) - 1), dict(padding=1 << 30)),  # 2 x padding is even: 2^31 - 2 is the largest below
    ("offset_scale", dict(offset_scale=3.4028234663852886e38), dict(offset_scale=3.402823466385289e38)),  # float32's max, the next float64
    ("offset_scale", dict(offset_scale=-3.4028234663852886e38, dtype="float16"), dict(offset_scale=-3.402823466385289e38, dtype="float16")),
], ids=["points-1xN", "points-square", "dilation", "stride", "padding", "offset_scale", "offset_scale-negative-fp16"])
def test_limits_are_inclusive(field, at_limit, past_limit):
    """Each documented limit is the largest accepted value: exactly at it builds a config, one past
    it is a ConfigError naming the field."""
    DCNConfig(**at_limit)
    with pytest.raises(ConfigError) as info:
        DCNConfig(**past_limit)
    assert info.value.field == field


def test_float64_kernels_take_offset_scales_beyond_float32():
    """Only the kernels that compute locations in float32 are limited to its range: float64 takes
    any finite offset_scale."""
    assert DCNConfig(offset_scale=1e39, dtype="float64").offset_scale == 1e39
    assert DCNConfig(offset_scale=-1.7e308, dtype="float64").offset_scale == -1.7e308


def test_offset_scale_of_other_number_types_is_a_plain_float():
    """A NumPy float64, a float32 or the number's text give the config of the Python float: same
    key, same hash (tuning records are looked up by the key)."""
    np = pytest.importorskip("numpy")
    plain = DCNConfig(offset_scale=0.5)
    for value in (np.float64(0.5), np.float32(0.5), "0.5", 1 / 2):
        cfg = DCNConfig(offset_scale=value)
        assert type(cfg.offset_scale) is float and cfg == plain and cfg.key == plain.key and hash(cfg) == hash(plain), value


@pytest.mark.parametrize("text, pair", [("3x5", (3, 5)), ("3,5", (3, 5)), (" 3 , 5 ", (3, 5)), ("7", (7, 7))])
def test_spatial_text_takes_x_or_comma(text, pair):
    """Spatial fields given as text: `HxW`, `H,W` or one int."""
    assert DCNConfig(kernel_size=text, padding=0).kernel_size == pair


@pytest.mark.parametrize("text", ["3;5", "3*5", "3 5", "3x5x7", "3,5,7", "x5", "3,"])
def test_spatial_text_rejects_other_separators(text):
    with pytest.raises(ConfigError) as info:
        DCNConfig(kernel_size=text)
    assert info.value.field == "kernel_size"


def test_cli_shape_takes_commas():
    """`--shape 1,4,5` is `1x4x5` (here: too small for the kernel, which the message says by its size)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli(), ["verify", "--kernel-size", "5", "--padding", "0", "--shape", "1,4,5"])
    assert result.exit_code == 2 and "leaves no output pixel on a 4x5 input" in " ".join(result.output.split()), result.output


def test_cli_memory_bound_counts_every_float64_tensor():
    """The bound of verify/bench's --shape: input, output and the G*P*3 offset channels, 8 bytes
    each. 1x100000x100000, default config (C 64, G 4, P 9): 1e10 x (64 + 64 + 108) x 8 bytes."""
    from typer.testing import CliRunner

    need = 10**10 * (64 + 64 + 108) * 8
    result = CliRunner().invoke(_cli(), ["verify", "--shape", "1x100000x100000"])
    assert result.exit_code == 2 and f"take {need / 2**30:.3g} GiB in float64" in " ".join(result.output.split()), result.output


# ---- tensor checks (dcngen.shapes, dcngen.ops) on meta tensors: no allocation ---------------------

def _meta_dcnv4(n, h, w, **kwargs):
    import torch

    from dcngen import ops

    cfg = DCNConfig(op="dcnv4", **kwargs)
    ho, wo = cfg.output_size(h, w)
    x = torch.empty(n, h, w, cfg.channels, device="meta")
    return ops.dcnv4(x, torch.empty(n, max(ho, 0), max(wo, 0), cfg.min_offset_mask_channels, device="meta"), **cfg.op_kwargs)


def test_tensors_on_two_devices_name_both():
    import torch

    from dcngen import ops
    from dcngen.errors import InputError

    with pytest.raises(InputError, match=r"^offset_mask is on meta but input is on cpu; all tensors must share one device$"):
        ops.dcnv4(torch.zeros(1, 3, 3, 64), torch.empty(1, 3, 3, 108, device="meta"))
    with pytest.raises(InputError, match=r"^mask is on meta but input is on cpu"):
        ops.dcnv3(torch.zeros(1, 3, 3, 64), torch.zeros(1, 3, 3, 72), torch.empty(1, 3, 3, 36, device="meta"))


@pytest.mark.parametrize("h, w", [(2, 5), (5, 2), (2, 2)])
def test_a_kernel_larger_than_the_input_is_refused_on_either_axis(h, w):
    """A 3x3 kernel without padding on an input 2 high or 2 wide leaves 0 output rows or columns:
    the error says the kernel does not fit (not that offset_mask has the wrong shape)."""
    from dcngen.errors import InputError

    with pytest.raises(InputError, match=rf"^a 3x3 kernel \(dilation 1x1, padding 0x0\) does not fit an input of {h}x{w}$"):
        _meta_dcnv4(1, h, w, padding=0)
    assert _meta_dcnv4(1, 3, 3, padding=0).shape == (1, 1, 1, 64)  # one output pixel fits


@pytest.mark.parametrize("shape, kwargs", [
    ((1, LIMIT + 1, 1), dict(stride=(2, 1))),  # input height only (the output is 2^30 high)
    ((1, 1, LIMIT + 1), dict(stride=(1, 2))),  # input width only
    ((1, LIMIT, 1), dict(padding=(1, 0))),  # output height only (2^31 + 1)
    ((1, 1, LIMIT), dict(padding=(0, 1))),  # output width only
], ids=["h", "w", "ho", "wo"])
def test_heights_and_widths_past_2_31_are_refused(shape, kwargs):
    """The kernels index rows and columns in 32 bits: any of H, W, Ho, Wo past 2^31 - 1 is an
    InputError; exactly 2^31 - 1 is accepted (meta tensors: shapes only)."""
    from dcngen.errors import InputError

    geometry = {"kernel_size": 1, "padding": 0, **kwargs}
    with pytest.raises(InputError, match="must be below 2"):
        _meta_dcnv4(*shape, **geometry)
    n, h, w = shape
    at_limit = (n, min(h, LIMIT), min(w, LIMIT)) if "stride" in kwargs else (n, min(h, LIMIT - 2), min(w, LIMIT - 2))
    assert LIMIT in (*at_limit, *_meta_dcnv4(*at_limit, **geometry).shape[1:3])
