"""The torch ops on CUDA tensors (skipped without a GPU): opcheck, torch.compile, deterministic mode,
autocast, a non-default device, tuning on first use, every gradient against the float64 reference."""

import pytest
import torch
from helpers import assert_compile_matches_eager

import dcngen.ops as ops
from dcngen import autotune, records, reference
from dcngen.config import DCNConfig
from dcngen.verify import TOLERANCE, random_problem, rel_err, run_op, verify

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ARGS = (3, 3, 1, 1, 1, 1, 1, 1, 4, 16, 2.0, False, "template")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_verify_on_cuda(op, dtype):
    cfg = DCNConfig(op=op, group=4, group_channels=16, offset_scale=2.0, dtype=dtype, target="cuda")
    errors = verify(cfg, 2, 11, 13, device="cuda")
    assert all(e < TOLERANCE[dtype] for e in errors.values()), errors


def test_opcheck_on_cuda():
    cfg = DCNConfig(group=4, group_channels=16, offset_scale=2.0, target="cuda")
    x, om = (t.requires_grad_() for t in random_problem(cfg, 2, 6, 7).op_inputs(torch.float32, "cuda"))
    torch.library.opcheck(torch.ops.dcngen.dcnv4, (x, om, *ARGS))


def test_torch_compile_on_cuda():
    cfg = DCNConfig(group=4, group_channels=16, offset_scale=2.0, target="cuda")
    tensors = random_problem(cfg, 2, 8, 9).op_inputs(torch.float32, "cuda")
    fn = lambda x, om: ops.dcnv4(x, om, group=4, group_channels=16, offset_scale=2.0).square().sum()  # noqa: E731
    assert_compile_matches_eager(fn, tensors)


def test_deterministic_mode_is_bitwise_repeatable():
    cfg = DCNConfig(group=4, group_channels=16, target="cuda")
    problem = random_problem(cfg, 2, 16, 16)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            x, om = (t.requires_grad_() for t in problem.op_inputs(torch.float32, "cuda"))
            run_op(cfg, (x, om)).backward(problem.grad_out.float().cuda())
            grads.append((x.grad, om.grad))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_autocast_fp16_on_cuda():
    cfg = DCNConfig(group=4, group_channels=16, target="cuda")
    x, om = (t.requires_grad_() for t in random_problem(cfg, 2, 8, 8).op_inputs(torch.float32, "cuda"))
    with torch.autocast("cuda", dtype=torch.float16):
        y = ops.dcnv4(x, om, group=4, group_channels=16)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    cfg = DCNConfig(group=4, group_channels=16, target="cuda")
    x, om = random_problem(cfg, 1, 8, 8).op_inputs(torch.float32, "cuda:1")
    assert ops.dcnv4(x, om, group=4, group_channels=16).device == torch.device("cuda:1")


def test_first_use_tuning_on_cuda(tmp_path, monkeypatch):
    """DCNGEN_AUTOTUNE: a call inside a CUDA graph capture does not tune (it could not time there);
    the next call outside one does, and files the record under this GPU."""
    monkeypatch.setenv("DCNGEN_RECORDS", str(tmp_path))
    monkeypatch.setattr(autotune, "_attempted", set())
    monkeypatch.setattr(autotune, "_decided", set())
    records.tuned_config.cache_clear()
    cfg = DCNConfig(group=4, group_channels=16, target="cuda")
    problem = random_problem(cfg, 2, 10, 12)
    x, om = problem.op_inputs(torch.float32, "cuda")
    ops.dcnv4(x, om, group=4, group_channels=16)  # loads the default kernel before the capture
    torch.cuda.synchronize()
    monkeypatch.setenv("DCNGEN_AUTOTUNE", "2")
    monkeypatch.setattr(autotune, "_decided", set())  # the variable is read at a config and shape's first call
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.dcnv4(x, om, group=4, group_channels=16)
    graph.replay()
    assert records.all_records() == []
    y = ops.dcnv4(x, om, group=4, group_channels=16)
    assert [tuple(rec["bucket"]) for _, rec in records.all_records()] == [records.bucket((2, 10, 12))]
    expected = reference.dcnv4(cfg, x.double().cpu(), om.double().cpu())
    assert max(rel_err(captured, expected), rel_err(y, expected)) < TOLERANCE["float32"]
    records.tuned_config.cache_clear()
