"""The Jinja environment over `templates/`, shared by the CPU and CUDA template generators."""

from __future__ import annotations

import functools
from dataclasses import asdict

import jinja2

from ..config import DCNConfig
from ..errors import ConfigError
from ..layout import offset_layout
from ..settings import TEMPLATE_DIR

ACC_TYPE = {"float64": "double"}  # everything else accumulates in float
DL_DTYPE = {"float32": "kDLFloat, 32, 1", "float64": "kDLFloat, 64, 1", "float16": "kDLFloat, 16, 1", "bfloat16": "kDLBfloat, 16, 1"}  # DLPack's


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, cfg: DCNConfig, **context) -> str:
    """Render `templates/<template>` with the config, its offset layout, its accumulation type and
    its DLPack dtype."""
    return environment().get_template(template).render(
        cfg=cfg, layout=asdict(offset_layout(cfg)), acc_type=ACC_TYPE.get(cfg.dtype, "float"), dl_dtype=DL_DTYPE[cfg.dtype], **context
    )


def resolve_params(cfg: DCNConfig, defaults: dict[str, int], allowed: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Merge cfg.params over `defaults`; reject unknown names and values outside [lo, hi]."""
    params = dict(defaults)
    for name, value in cfg.params:
        if name not in allowed:
            raise ConfigError("params", f"unknown parameter {name!r} for this generator; known: {', '.join(sorted(allowed))}")
        lo, hi = allowed[name]
        if not lo <= value <= hi:
            raise ConfigError("params", f"{name}={value} is outside [{lo}, {hi}]")
        params[name] = value
    return params
