"""Loop bodies of a CUDA template kernel's SASS: the instructions of each loop and its commonest
opcodes. These are the static counts benchmarks/RESULTS.md quotes for changes no GPU has timed yet.

    python benchmarks/sass_loops.py --dtype float16 --group 4 --group-channels 32 --param share=1
    python benchmarks/sass_loops.py --kernel dcn_backward_kernel --arch sm_80

A loop is a backward branch: its body is every instruction from the branch target to the branch
(nested loops are listed on their own and inside their parents). Divergent-warp copies of a loop
(around warp-synchronising instructions) show up as loops of their own.

Needs cuobjdump and nvdisasm, from a CUDA toolkit on PATH or from the `nvidia-cuda-cuobjdump` and
`nvidia-cuda-nvdisasm` wheels (pip install both; this finds them in site-packages).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcngen.build import build  # noqa: E402
from dcngen.compilers import LIBRARY  # noqa: E402
from dcngen.compilers.cuda import demangle  # noqa: E402
from dcngen.generators import generate  # noqa: E402

from config_flags import add_config_flags, config_from_flags  # noqa: E402

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BACKWARD = re.compile(r"\bBRA\s+(?:\S+,\s*)?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def tool(name: str) -> str:
    """The path of a CUDA binary tool: on PATH, else in a pip wheel (site-packages/nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for bin_dir in sorted(Path(sysconfig.get_paths()["purelib"], "nvidia").glob("cu*/bin")):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    sys.exit(f"{name} not found: install a CUDA toolkit or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass output -> {mangled function name: [(address, instruction)]}."""
    out = {}
    for part in sass.split("Function : ")[1:]:
        out[part.split()[0]] = [(int(a, 16), text) for a, text in INSTRUCTION.findall(part)]
    return out


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int, list[str]]]:
    """(start, end, opcodes) of every backward branch's body, predicates dropped."""
    found = []
    for address, text in instructions:
        m = BACKWARD.search(text)
        if m and m.group(1) and int(m.group(1), 16) < address:
            start = int(m.group(1), 16)
            body = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in instructions if start <= a <= address]
            found.append((start, address, body))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(ap)
    ap.add_argument("--kernel", default="dcn_forward_kernel", help="kernels whose demangled name contains this")
    ap.add_argument("--min-body", type=int, default=8, help="loops of fewer instructions are not listed")
    args = ap.parse_args()

    cfg = config_from_flags(args)
    artifact = build(generate(cfg))
    env = {**os.environ, "PATH": f"{Path(tool('nvdisasm')).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # cuobjdump runs nvdisasm
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(Path(artifact.path) / LIBRARY)], capture_output=True, text=True, check=True, env=env).stdout
    found = functions(sass)
    names = demangle(list(found))
    print(f"{cfg.key}: params {artifact.meta['params']}")
    for symbol, instructions in found.items():
        if args.kernel not in names[symbol]:
            continue
        print(f"\n{names[symbol].split('(')[0]}: {len(instructions)} instructions")
        for start, end, body in loops(instructions):
            if len(body) >= args.min_body:
                top = ", ".join(f"{op} {n}" for op, n in collections.Counter(body).most_common(8))
                print(f"  loop {start:#06x}-{end:#06x}: {len(body)} instructions ({top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
