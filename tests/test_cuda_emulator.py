"""The SIMT emulator's own semantics, on small kernels written for the test: segmented butterfly
shuffles, __syncthreads() with exited threads and block-local shared memory, several blocks, the
launch errors for collectives that can never complete, the shuffled, seeded schedule under which a
read that no barrier orders after a write sees it early, and the memory traffic trace."""

from __future__ import annotations

import json
import os

import pytest
from helpers import needs_cuda_toolkit
import torch

from dcngen.compilers import cuda
from dcngen.generators.jinja import environment

pytestmark = needs_cuda_toolkit

KERNELS = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

// each lane: the sum of the lane indices of its width-lane segment
__global__ void butterfly(int* out, int width) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned seg = width == 32 ? 0xffffffffu : ((1u << width) - 1u) << (lane & ~unsigned(width - 1));
  int v = int(threadIdx.x);
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(seg, v, o, width);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// the first `alive` threads of each block publish, synchronise, read their neighbour's value
__global__ void neighbours(int* out, int alive) {
  __shared__ int s[256];
  if (int(threadIdx.x) >= alive) return;
  s[threadIdx.x] = int(blockIdx.x * 1000 + threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % unsigned(alive)];
}

// lane 1 leaves before a full-warp shuffle
__global__ void exited_lane(int* out) {
  if (threadIdx.x == 1) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

// half the warp shuffles with the full mask, the other half waits in __syncthreads()
__global__ void split_warp(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  else __syncthreads();
}

// thread 32 sets a flag that warp 0 reads after a __syncwarp() only: no barrier orders the two
__global__ void unordered_flag(int* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 32) flag = 1;
  if (threadIdx.x < 32) {
    __syncwarp();
    out[threadIdx.x] = flag;
  }
}

// traced accesses only (nothing is read or written): lane i's 16 bytes at line-aligned `base` +
// i * stride in global memory and its 4-byte word i * words_apart of shared memory; lanes 0-7 pass
// a loop twice, the others once; then wider shared accesses: 16 bytes a lane, consecutive, or a
// quarter-warp's 8 lanes on the same 4 banks; 8 bytes a lane, consecutive, or a half-warp's 16
// lanes on the same 2 banks
__global__ void traced(int* out, int stride, int words_apart) {
  __shared__ int s[32 * 32 + 1];
  const int lane = int(threadIdx.x & 31u);
  const char* base = reinterpret_cast<const char*>((reinterpret_cast<uintptr_t>(out) + 127) & ~uintptr_t(127));
  DCN_TRACE("global", false, base + lane * stride, 16, true);
  DCN_TRACE("half off", false, base + lane * stride, 16, lane < 16);
  DCN_TRACE("shared", true, s + lane * words_apart, 4, true);
  for (int i = 0; i < (lane < 8 ? 2 : 1); ++i) DCN_TRACE("loop", false, base + 4096 * i + 16 * lane, 16, true);
  DCN_TRACE("16 bytes", true, s + 4 * lane, 16, true);
  DCN_TRACE("16 bytes, quarter-warps on 4 banks", true, s + 32 * (lane & 7) + 4 * (lane >> 3), 16, true);
  DCN_TRACE("8 bytes", true, s + 2 * lane, 8, true);
  DCN_TRACE("8 bytes, half-warps on 2 banks", true, s + 32 * (lane & 15) + 2 * (lane >> 4), 8, true);
}

tvm::ffi::String run(tvm::ffi::TensorView out, int which, int blocks, int threads, int arg) {
  int* p = static_cast<int*>(out.data_ptr());
  if (which == 0) DCN_LAUNCH(butterfly, blocks, threads, 0, nullptr)(p, arg);
  if (which == 1) DCN_LAUNCH(neighbours, blocks, threads, 0, nullptr)(p, arg);
  if (which == 2) DCN_LAUNCH(exited_lane, blocks, threads, 0, nullptr)(p);
  if (which == 3) DCN_LAUNCH(split_warp, blocks, threads, 0, nullptr)(p);
  if (which == 4) DCN_LAUNCH(unordered_flag, blocks, threads, 0, nullptr)(p);
  if (which == 5) DCN_LAUNCH(traced, blocks, threads, 0, nullptr)(p, arg & 0xffff, arg >> 16);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(run, run);
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import tvm_ffi
    import tvm_ffi.cpp

    source = environment().get_template("cuda/emulator.h.j2").render() + KERNELS
    lib = tvm_ffi.cpp.build_inline(
        "emulator_test", cpp_sources=source, extra_cflags=["-O1", "-fvisibility=hidden"],
        extra_include_paths=[os.path.join(cuda.cuda_home(), "include")], build_directory=str(tmp_path_factory.mktemp("emulator")),
    )
    mod = tvm_ffi.load_module(lib)

    def call(which: int, blocks: int, threads: int, arg: int = 0):
        out = torch.full((blocks * threads,), -1, dtype=torch.int32)
        return mod["run"](out, which, blocks, threads, arg), out

    return call


@pytest.mark.parametrize("width", [2, 4, 32])
def test_segmented_butterfly_sums(run, width):
    err, out = run(0, 3, 64, width)
    assert err == ""
    lane = torch.arange(64)
    first = lane - lane % width
    expected = (first * width + width * (width - 1) // 2).repeat(3).int()
    assert torch.equal(out, expected)


def test_syncthreads_lets_exited_threads_go_and_shared_memory_is_per_block(run):
    err, out = run(1, 2, 96, 70)
    assert err == ""
    out = out.view(2, 96)
    for b in range(2):
        assert out[b, :70].tolist() == [b * 1000 + (t + 1) % 70 for t in range(70)]
        assert (out[b, 70:] == -1).all()


def test_shuffle_with_an_exited_lane_fails_the_launch(run):
    err, _ = run(2, 1, 32)
    assert "lane 1" in err and "exited" in err


def test_shuffle_that_cannot_complete_fails_the_launch(run):
    err, _ = run(3, 1, 32)
    assert "cannot complete" in err
    err, _ = run(0, 1, 32, 32)  # the emulator is usable again after a failed launch
    assert err == ""


def test_schedule_is_shuffled_by_the_seed_and_reproducible(run, monkeypatch):
    """Warp 0's __syncwarp() completes as soon as its last lane arrives, so under some seeds warp 0
    reads the flag before thread 32 has set it; the same seed gives the same schedule."""
    seen = []
    for seed in range(12):
        monkeypatch.setenv("DCN_EMULATE_SEED", str(seed))
        err, out = run(4, 1, 64)
        assert err == ""
        flags = out[:32]
        assert set(flags.tolist()) <= {0, 1}
        seen.append(flags.clone())
        assert torch.equal(run(4, 1, 64)[1][:32], flags)  # reproducible
    values = torch.stack(seen)
    assert (values == 0).any(), "no schedule let warp 0 read the flag before thread 32 set it"
    assert (values == 1).any(), "every schedule ran all of warp 0 before thread 32"


@pytest.mark.parametrize("stride, lines, sectors", [(16, 4, 16), (64, 16, 32), (128, 32, 32), (0, 1, 1)])
@pytest.mark.parametrize("words_apart, wavefronts", [(1, 1), (0, 1), (32, 32), (2, 2), (33, 1)])
def test_trace_counts_lines_sectors_and_bank_wavefronts(run, monkeypatch, tmp_path, stride, lines, sectors, words_apart, wavefronts):
    """Two warps: per warp instruction, distinct 128-byte lines and 32-byte sectors of the active
    lanes' global accesses, and the most distinct words one shared-memory bank serves; a lane
    predicated off adds nothing, and a lane's n-th pass of a site is the warp's n-th instruction
    there (lanes 0-7 pass the loop twice: 2 instructions a warp, 40 lanes)."""
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    err, _ = run(5, 1, 64, stride | words_apart << 16)
    assert err == ""
    (launch,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert (launch["kernel"], launch["blocks"], launch["threads"]) == ("kernel", 1, 64)
    traffic = {t["label"]: t for t in launch["traffic"]}
    assert traffic["global"] == {"label": "global", "space": "global", "instructions": 2, "lanes": 64, "bytes": 1024,
                                 "lines": 2 * lines, "sectors": 2 * sectors, "wavefronts": 2 * lines}
    half = traffic["half off"]
    assert (half["instructions"], half["lanes"], half["bytes"]) == (2, 32, 512)
    assert half["lines"] == 2 * -(-lines * 16 // 32) if stride else half["lines"] == 2
    assert traffic["shared"]["wavefronts"] == 2 * wavefronts and traffic["shared"]["space"] == "shared"
    loop = traffic["loop"]
    assert (loop["instructions"], loop["lanes"], loop["lines"]) == (4, 80, 2 * (4 + 1))


def test_trace_serves_wide_shared_accesses_in_phases(run, monkeypatch, tmp_path):
    """Shared accesses of 16 bytes a lane are served a quarter-warp at a time, of 8 bytes a
    half-warp at a time: each phase takes the most distinct words one bank serves in it. A
    quarter-warp whose 8 pieces share 4 banks takes 8 wavefronts, though the whole warp's 32 pieces
    spread over 16 banks (8 words each) would count 8 in all."""
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    assert run(5, 1, 64, 16 | 1 << 16)[0] == ""
    (launch,) = [json.loads(line) for line in path.read_text().splitlines()]
    wavefronts = {t["label"]: t["wavefronts"] for t in launch["traffic"]}
    assert wavefronts["16 bytes"] == 2 * 4 and wavefronts["16 bytes, quarter-warps on 4 banks"] == 2 * 4 * 8
    assert wavefronts["8 bytes"] == 2 * 2 and wavefronts["8 bytes, half-warps on 2 banks"] == 2 * 2 * 16


def test_untraced_launch_writes_nothing(run, monkeypatch, tmp_path):
    monkeypatch.delenv("DCN_EMULATE_TRACE", raising=False)
    err, _ = run(5, 1, 32, 16 | 1 << 16)
    assert err == "" and not list(tmp_path.iterdir())
