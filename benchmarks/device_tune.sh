#!/usr/bin/env bash
# A second call on a lent GPU machine, after benchmarks/device_check.sh and with the same carry
# (.whl/ holding the tvm-ffi and ninja wheels): `dcngen tune` on the card for the issue's benchmark
# config (DCNv4 G4 C32 3x3, N64 56x56) in fp16, fp32 and bf16 at offset_scale 1, and in fp16 at the
# official benchmark's offset_scale 2. Candidates build 16 at a time, then each is checked against
# the float64 reference and timed, paired, against the defaults. The records go to $OUT/records (or
# ./device-out/records): copy them into schedules/records/ to ship the card's tuned parameters. About
# 6 minutes; at most 385 s.
set -u
out="${OUT:-device-out}"
mkdir -p "$out/records"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" TVM_FFI_DISABLE_TORCH_C_DLPACK=1 DCNGEN_CACHE=/tmp/dcache DCNGEN_RECORDS="$out/records"
# the Python API rather than the CLI: the machine need not have typer and rich
for run in float16:1 float32:1 bfloat16:1 float16:2; do
  dtype=${run%:*} scale=${run#*:}
  timeout 95 python3 - "$dtype" "$scale" > "$out/tune-$dtype-os$scale.log" 2>&1 <<'EOF'
import sys
from dcngen import records
from dcngen.config import DCNConfig
from dcngen.tune import process_age, tune

cfg = DCNConfig(op="dcnv4", group=4, group_channels=32, kernel_size=3, padding=1, offset_scale=float(sys.argv[2]), dtype=sys.argv[1], target="cuda")
result = tune(cfg, (64, 56, 56), trials=64, time_budget=85 - process_age(), jobs=16)
r = result.record
print(f"64x56x56: best {records.best_changes(r)} {r['best']['ms']:.3f} ms, "
      f"default {r['default']['ms']:.3f} ms, {len(result.trials)} new candidates ({r['failed']} failed) -> {result.path}")
EOF
  echo "tune $dtype offset_scale $scale: exit $? ($(grep -m1 -E '^64x56x56:' "$out/tune-$dtype-os$scale.log"))"
done
