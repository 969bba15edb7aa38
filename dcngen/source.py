"""KernelSource: what a generator produces (text and how to compile it), before any disk or compiler."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .config import DCNConfig


@dataclass(frozen=True)
class KernelSource:
    """Generated kernel text plus everything the builder needs to turn it into an artifact.

    language selects the compiler module (`dcngen/compilers/<language>.py`): "cpp" (host C++
    through tvm-ffi), "cuda" (nvcc), "cuda_emulated" (CUDA kernels on the SIMT emulator, host
    C++), "tvm" (TVMScript compiled by TVM for llvm).
    Every artifact exports `forward(x, offset, mask, out)` and
    `backward(x, offset, mask, grad_out, grad_x, grad_offset, grad_mask)` (see ops.py); host C++
    ones also `forward_new(x, offset, mask) -> out`, which allocates the output.
    """

    config: DCNConfig
    language: str
    text: str
    flags: tuple[str, ...] = ()
    params: tuple[tuple[str, int], ...] = ()  # the generator parameters actually used
    extra: str = field(default="{}")  # JSON: language-specific metadata (launch geometry, ...)

    @property
    def name(self) -> str:
        """Readable artifact-name prefix, e.g. dcnv4_float32_cpu_template, dcnv4_float16_sm_90_template."""
        c = self.config
        emulated = "_emulated" if self.language == "cuda_emulated" else ""
        return f"{c.op}_{c.dtype}_{c.target.replace('cuda:', '').replace(':', '-')}_{c.backend}{emulated}"

    @property
    def kernel_text(self) -> str:
        """The text without the config key it names (the key spells out explicit parameters, so
        parameters that equal the defaults would otherwise give the same kernel another text)."""
        return self.text.replace(self.config.key, "")

    @property
    def extra_meta(self) -> dict:
        return json.loads(self.extra)

    @property
    def suffix(self) -> str:
        return {"cpp": ".cc", "cuda": ".cu", "cuda_emulated": ".cc", "tvm": ".py"}.get(self.language, ".txt")
