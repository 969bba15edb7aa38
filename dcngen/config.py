"""DCNConfig: the validated, hashable description of one deformable-convolution kernel."""

from __future__ import annotations

import functools
import math
import operator
import re
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .cpu_isas import ISAS as CPU_ISAS
from .cuda_archs import LIMITS
from .errors import ConfigError

OPS = ("dcnv4", "dcnv3")
BACKENDS = ("template", "tvm")
DTYPES = ("float32", "float64", "float16", "bfloat16")  # on every target
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}  # bytes per element
SPATIAL_MAX = (1 << 31) - 1  # the kernels compute window extents and padded sizes in 32-bit ints
MAX_POINTS = 1 << 16  # sampling points per group (kh * kw)
FLOAT32_MAX = 3.4028234663852886e38  # 16-bit and float32 kernels compute locations in float32
CUDA_ARCHS = tuple(LIMITS)

Pair = tuple[int, int]


def as_pair(name: str, value: Any) -> Pair:
    """`3`, `(3, 5)`, `"3"` or `"3x5"` (Python or NumPy ints) -> (3, 5); anything else is a
    ConfigError for `name`."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:[x,]\s*(-?\d+)\s*)?", value)
        if not m:
            raise ConfigError(name, f"expected an int or 'HxW', got {value!r}")
        a = int(m.group(1))
        return (a, int(m.group(2)) if m.group(2) is not None else a)
    try:
        if isinstance(value, (tuple, list)):
            if len(value) == 2:
                return (as_int(name, value[0]), as_int(name, value[1]))
        else:
            return (as_int(name, value),) * 2
    except ConfigError:
        pass
    raise ConfigError(name, f"expected an int or a pair of ints, got {value!r}")


def as_int(name: str, value: Any) -> int:
    """A Python or NumPy integer (not a bool) -> int; anything else is a ConfigError for `name`."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ConfigError(name, f"must be an int, got {value!r}")


def _param_value(value: Any) -> int:
    """A generator parameter's value: an int (not a bool, not a float) or its decimal text (the CLI's
    NAME=INT); raises ValueError otherwise."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return as_int("params", value)


def as_number(name: str, value: Any) -> float:
    """A real number (or its text), not a bool -> float; anything else is a ConfigError for `name`."""
    try:
        if not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(name, f"must be a number, got {value!r}")


def as_bool(name: str, value: Any) -> bool:
    """True or False; anything else (1, "yes") is a ConfigError for `name`."""
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be a bool, got {value!r}")
    return value


def canonical_target(target: str) -> str:
    """'cpu' (this machine's CPU), 'cpu:x86-64-v3' (a named instruction set, dcngen/cpu_isas.py),
    'cuda:sm_90' or 'cuda' (the visible GPU's architecture) -> canonical target string."""
    t = str(target).strip().lower()
    if t == "cpu":
        return "cpu"
    if t.startswith("cpu:"):
        if t[4:] not in CPU_ISAS:
            raise ConfigError("target", f"CPU instruction set {t[4:]!r} is not supported; choose 'cpu' (this machine's CPU) or one of "
                              + ", ".join(f"cpu:{isa}" for isa in CPU_ISAS))
        return t
    if t == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("target", "'cuda' means the visible GPU's architecture, but no GPU is visible; name one, e.g. 'cuda:sm_90'")
        major, minor = torch.cuda.get_device_capability()
        t = f"cuda:sm_{major}{minor}"
    m = re.fullmatch(r"cuda:(sm_\d+)", t)
    if not m:
        raise ConfigError("target", f"expected 'cpu', 'cpu:<isa>', 'cuda' or 'cuda:sm_XY', got {target!r}")
    if m.group(1) not in CUDA_ARCHS:
        raise ConfigError("target", f"architecture {m.group(1)} is not supported; choose one of {', '.join(CUDA_ARCHS)}")
    return t


@dataclass(frozen=True)
class DCNConfig:
    """One kernel configuration. Spatial fields accept an int or an (h, w) pair and are stored as pairs.

    `params` holds generator parameters (vector width, threads per block, ...); empty means the
    generator's heuristic (or a tuning record) decides.
    """

    op: str = "dcnv4"
    group: int = 4
    group_channels: int = 16
    kernel_size: Pair = (3, 3)
    stride: Pair = (1, 1)
    padding: Pair = (1, 1)
    dilation: Pair = (1, 1)
    offset_scale: float = 1.0
    remove_center: bool = False
    dtype: str = "float32"
    target: str = "cpu"
    backend: str = "template"
    params: tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        if self.op not in OPS:
            raise ConfigError("op", f"expected one of {', '.join(OPS)}, got {self.op!r}")
        for name in ("group", "group_channels"):
            v = as_int(name, getattr(self, name))
            if v < 1:
                raise ConfigError(name, f"must be a positive int, got {v!r}")
            set_(name, v)
        for name, low in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            pair = as_pair(name, getattr(self, name))
            if min(pair) < low:
                raise ConfigError(name, f"must be >= {low}, got {pair[0]}x{pair[1]}")
            set_(name, pair)
        if self.kernel_size[0] * self.kernel_size[1] > MAX_POINTS:
            raise ConfigError("kernel_size", f"{self.kernel_size[0]}x{self.kernel_size[1]} has more than {MAX_POINTS} sampling points")
        for (k, d, p, axis) in zip(self.kernel_size, self.dilation, self.padding, ("height", "width")):
            if d * (k - 1) + 1 > SPATIAL_MAX:
                raise ConfigError("dilation", f"the window's {axis}, dilation x (kernel - 1) + 1 = {d * (k - 1) + 1}, passes 2^31 - 1")
            if 2 * p > SPATIAL_MAX:
                raise ConfigError("padding", f"2 x padding = {2 * p} passes 2^31 - 1")
        if max(self.stride) > SPATIAL_MAX:
            raise ConfigError("stride", f"must be below 2^31, got {self.stride[0]}x{self.stride[1]}")
        scale = as_number("offset_scale", self.offset_scale)
        if not math.isfinite(scale):
            raise ConfigError("offset_scale", f"must be finite, got {scale}")
        set_("offset_scale", scale + 0.0)  # -0.0 -> 0.0: equal configs have one key
        as_bool("remove_center", self.remove_center)
        kh, kw = self.kernel_size
        if self.remove_center and (kh != kw or kh % 2 == 0 or kh == 1):
            raise ConfigError("remove_center", f"needs an odd square kernel larger than 1x1, got {kh}x{kw}")
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        set_("target", canonical_target(self.target))
        dtype = str(self.dtype).replace("torch.", "")
        dtype = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32", "double": "float64"}.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        set_("dtype", dtype)
        if dtype != "float64" and abs(self.offset_scale) > FLOAT32_MAX:
            raise ConfigError("offset_scale", f"{self.offset_scale} is beyond float32's range, in which {dtype} kernels compute")
        params = self.params.items() if isinstance(self.params, Mapping) else self.params
        try:
            items = tuple(sorted((str(k), _param_value(v)) for k, v in params))
        except (TypeError, ValueError):
            raise ConfigError("params", f"must map names to ints (or their text), got {self.params!r}") from None
        names = [k for k, _ in items]
        if len(set(names)) != len(names):
            twice = sorted({k for k in names if names.count(k) > 1})
            raise ConfigError("params", f"{', '.join(twice)} given more than once")
        set_("params", items)

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property  # in the instance's __dict__, like `points`
    def _hash(self) -> int:
        """Of the canonical key, computed once: configs key the caches that every op call consults.
        crc32 rather than hash(): a pickled copy carries it, and str hashes differ between processes."""
        return zlib.crc32(self.key.encode())

    # ---- derived quantities -------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @functools.cached_property  # kept in the instance's __dict__: not a field, so not in eq / hash
    def points(self) -> tuple[Pair, ...]:
        """The sampling points (i, j) in kernel order: width index i outer, height index j inner."""
        kh, kw = self.kernel_size
        pts = tuple((i, j) for i in range(kw) for j in range(kh))
        if self.remove_center:
            pts = tuple(p for p in pts if p != (kw // 2, kh // 2))
        return pts

    @property
    def num_points(self) -> int:
        return len(self.points)

    @property
    def half_window(self) -> Pair:
        """(Dh, Dw) = ((dh * (kh - 1)) >> 1, (dw * (kw - 1)) >> 1): how far the window's centre lies
        below and right of its first point (docs/SPEC.md section 1)."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        return (dh * (kh - 1)) >> 1, (dw * (kw - 1)) >> 1

    @property
    def itemsize(self) -> int:
        """Bytes per element of the dtype."""
        return ITEMSIZE[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return self.target.startswith("cuda")

    @property
    def arch(self) -> str | None:
        return self.target.split(":", 1)[1] if self.is_cuda else None

    @property
    def cpu_isa(self) -> str | None:
        """The named instruction set of a 'cpu:<isa>' target; None for 'cpu' (this machine's CPU) and CUDA."""
        return self.target.split(":", 1)[1] if self.target.startswith("cpu:") else None

    @property
    def param_dict(self) -> dict[str, int]:
        return dict(self.params)

    def output_size(self, height: int, width: int) -> Pair:
        """(Ho, Wo) for an input of (height, width); may be <= 0 when the kernel does not fit."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return ((height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)

    @property
    def min_offset_mask_channels(self) -> int:
        """DCNv4: the packed offset_mask needs at least G*P*3 channels."""
        return self.group * self.num_points * 3

    @property
    def padded_offset_mask_channels(self) -> int:
        """The official module's packed width: ceil(3*G*P / 8) * 8."""
        return -(-self.min_offset_mask_channels // 8) * 8

    @property
    def op_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the public ops (`dcngen.ops.dcnv4/dcnv3`) that select this kernel."""
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
                    group=self.group, group_channels=self.group_channels, offset_scale=self.offset_scale,
                    remove_center=self.remove_center, backend=self.backend)

    def replace(self, **changes: Any) -> "DCNConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return DCNConfig(**values)

    @property
    def key(self) -> str:
        """Canonical, human-readable key: equal configs have equal keys."""
        pair = lambda p: f"{p[0]}x{p[1]}"  # noqa: E731
        scale = repr(self.offset_scale).replace(".", "p").replace("-", "m")
        key = (
            f"{self.op}_g{self.group}_c{self.group_channels}_k{pair(self.kernel_size)}_s{pair(self.stride)}"
            f"_p{pair(self.padding)}_d{pair(self.dilation)}_os{scale}{'_rc' if self.remove_center else ''}"
            f"_{self.dtype}_{self.target.replace(':', '-')}_{self.backend}"
        )
        if self.params:
            key += "_" + "_".join(f"{k}{v}" for k, v in self.params)
        return key
