#!/usr/bin/env bash
# One call on a lent GPU machine (torch, nvcc and Triton, but no TVM and no network), from the
# repository root, with the tvm-ffi and ninja wheels carried in .whl/ (fetched beforehand with
#   pip download --no-deps -d .whl apache-tvm-ffi ninja --python-version <the card's> --only-binary=:all:
# ). Results go to $OUT (or ./device-out): check.log (benchmarks/gpu_check.py: correctness,
# timings, paired parameter sweep incl. fwd_tile=1 (also fwd_tile_mma=1), fwd_mma=1, mma=1, share=1, bwd_mma=1 and bwd_tile=1),
# memcheck.log (compute-sanitizer on hostile inputs for the default, tensor-core, tiled and
# shared-location kernels), ncu.log (Nsight Compute speed-of-light, occupancy, stall reasons and issue of the default, tensor-core and
# tiled kernels at the benchmark shape), racecheck.log (compute-sanitizer's shared-memory hazards of
# the default, tiled and shared-location kernels) and the tail of tests/test_gpu_ops.py. About 4 minutes on an
# H200; at most 580 s. The image's Python is python3 ('python' is not on its PATH).
set -u
out="${OUT:-device-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" TVM_FFI_DISABLE_TORCH_C_DLPACK=1 DCNGEN_CACHE=/tmp/dcache
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 280 python3 benchmarks/gpu_check.py > "$out/check.log" 2>&1
echo "gpu_check: exit $? ($(tail -1 "$out/check.log"))"
timeout 75 compute-sanitizer --tool memcheck --print-limit 20 python3 benchmarks/gpu_profile.py hostile '{}' '{"fwd_mma": 1, "bwd_mma": 1}' '{"mma": 1, "bwd_tile": 1}' '{"share": 1}' '{"fwd_tile": 1}' '{"fwd_tile": 1, "fwd_tile_mma": 1}' > "$out/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep -m1 'ERROR SUMMARY' "$out/memcheck.log"))"
# shared-memory hazards (a missing barrier) of the kernels that share tiles between warps, taps between lanes or staged rows
# between a block's threads (the default backward writes its points' gradients over them, then copies the rows out)
timeout 45 compute-sanitizer --tool racecheck --print-limit 20 python3 benchmarks/gpu_profile.py hostile '{}' '{"fwd_mma": 1, "bwd_mma": 1}' '{"mma": 1, "bwd_tile": 1}' '{"share": 1}' '{"fwd_tile": 1}' '{"fwd_tile": 1, "fwd_tile_mma": 1}' > "$out/racecheck.log" 2>&1
echo "racecheck: exit $? ($(grep -m1 'RACECHECK SUMMARY' "$out/racecheck.log"))"
# what bounds the default, the tensor-core and the tiled kernels
timeout 100 ncu --clock-control none --kernel-name regex:dcn_ --section SpeedOfLight --section LaunchStats --section Occupancy \
  --section WarpStateStats --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis \
  python3 benchmarks/gpu_profile.py run '{}' '{"fwd_mma": 1, "bwd_mma": 1}' '{"fwd_tile": 1}' '{"fwd_tile": 1, "fwd_tile_mma": 1}' '{"bwd_tile": 1}' > "$out/ncu.log" 2>&1
echo "ncu: exit $?"
timeout 80 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_ops.py 2>&1 | tail -1
