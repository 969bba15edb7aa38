#!/usr/bin/env bash
# A second call on a lent GPU machine, after benchmarks/device_check.sh and with the same carry
# (.whl/ holding the tvm-ffi and ninja wheels): `dcngen tune` on the card for the issue's benchmark
# config (DCNv4 G4 C32 3x3, N64 56x56) in fp16, fp32 and bf16. Candidates build 16 at a time, then
# each is checked against the float64 reference and timed, paired, against the defaults. The
# records go to $OUT/records (or ./device-out/records): copy them into schedules/records/ to ship
# the card's tuned parameters. About 4.5 minutes; at most 290 s.
set -u
out="${OUT:-device-out}"
mkdir -p "$out/records"
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" TVM_FFI_DISABLE_TORCH_C_DLPACK=1 DCNGEN_CACHE=/tmp/dcache DCNGEN_RECORDS="$out/records"
for dtype in float16 float32 bfloat16; do
  timeout 95 python -m dcngen.cli tune --target cuda --dtype "$dtype" --group 4 --group-channels 32 \
    --shape 64x56x56 --trials 64 --time-budget 85 --jobs 16 > "$out/tune-$dtype.log" 2>&1
  echo "tune $dtype: exit $? ($(grep -m1 -E '^64x56x56:' "$out/tune-$dtype.log"))"
done
