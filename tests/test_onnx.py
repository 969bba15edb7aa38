"""ONNX export: models with DCNv4 / DCNv3 become standard DeformConv (opset 19) graphs that run
in onnxruntime and match PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dcngen.nn  # noqa: E402
import dcngen.onnx  # noqa: E402
from dcngen import ops, reference  # noqa: E402
from dcngen.config import DCNConfig  # noqa: E402

G, C = 2, 8


def _run_onnx(model_bytes: bytes, inputs) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, [t.numpy() for t in inputs])))[0]


def _check_graph(proto):
    types = [n.op_type for n in proto.graph.node]
    assert types.count("DeformConv") == 1
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert {o.domain: o.version for o in proto.opset_import}.get("", 0) >= 19


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    b = b.detach().numpy()
    return float(np.abs(a - b).max() / np.abs(b).max())


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


CASES = [(3, 1.0, False), (3, 2.0, True), (5, 2.0, False), (5, 1.0, True)]
IDS = ["k3_s1", "k3_s2_rc", "k5_s2", "k5_s1_rc"]


@pytest.mark.parametrize("k,scale,rc", CASES, ids=IDS)
def test_dcnv4_module(k, scale, rc):
    m = _randomise(dcngen.nn.DCNv4(G * C, kernel_size=k, pad=k // 2, group=G, offset_scale=scale, remove_center=rc, dw_kernel_size=3, center_feature_scale=True))
    x = torch.randn(2, 30, G * C)
    prog = dcngen.onnx.export(m, (x,), kwargs={"shape": (5, 6)})
    _check_graph(prog.model_proto)
    out = _run_onnx(prog.model_proto.SerializeToString(), (x,))
    assert _rel(out, m(x, (5, 6))) < 1e-5


@pytest.mark.parametrize("k,scale,rc", CASES, ids=IDS)
def test_dcnv3_module(k, scale, rc):
    m = _randomise(dcngen.nn.DCNv3(G * C, kernel_size=k, pad=k // 2, group=G, offset_scale=scale, remove_center=rc, center_feature_scale=True))
    x = torch.randn(2, 5, 6, G * C)
    prog = dcngen.onnx.export(m, (x,))
    _check_graph(prog.model_proto)
    out = _run_onnx(prog.model_proto.SerializeToString(), (x,))
    assert _rel(out, m(x)) < 1e-5


class _Op(torch.nn.Module):
    def __init__(self, op, **kw):
        super().__init__()
        self.op, self.kw = op, kw

    def forward(self, x, *rest):
        return (ops.dcnv4 if self.op == "dcnv4" else ops.dcnv3)(x, *rest, **self.kw)


def test_op_stride_dilation_non_square_kernel_matches_reference():
    """Geometry the modules cannot reach (stride, dilation, kh != kw), checked against the reference."""
    kw = dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 3), dilation=(2, 1), group=G, group_channels=C, offset_scale=1.5)
    cfg = DCNConfig(op="dcnv4", **{k: v for k, v in kw.items()})
    x = torch.randn(1, 9, 7, G * C)
    ho, wo = cfg.output_size(9, 7)
    om = torch.randn(1, ho, wo, cfg.padded_offset_mask_channels) * 1.5
    prog = torch.onnx.export(_Op("dcnv4", **kw).eval(), (x, om), dynamo=True, opset_version=19, custom_translation_table=dcngen.onnx.translation_table())
    _check_graph(prog.model_proto)
    assert _rel(_run_onnx(prog.model_proto.SerializeToString(), (x, om)), reference.dcnv4(cfg, x, om)) < 1e-5


def test_op_offset_scale_with_unequal_half_windows_matches_reference():
    """offset_scale != 1 on a window whose half extents differ ((Dh, Dw) = (1, 2)): the additive
    terms use Dh for dy and Dw for dx (the other geometry test's halves are equal)."""
    kw = dict(kernel_size=(3, 5), padding=(1, 2), group=G, group_channels=C, offset_scale=0.5)
    cfg = DCNConfig(op="dcnv3", **kw)
    assert cfg.half_window == (1, 2)
    x = torch.randn(1, 6, 7, G * C)
    off, mask = torch.randn(1, 6, 7, 2 * G * cfg.num_points) * 1.5, torch.rand(1, 6, 7, G * cfg.num_points)
    prog = torch.onnx.export(_Op("dcnv3", **kw).eval(), (x, off, mask), dynamo=True, opset_version=19, custom_translation_table=dcngen.onnx.translation_table())
    _check_graph(prog.model_proto)
    assert _rel(_run_onnx(prog.model_proto.SerializeToString(), (x, off, mask)), reference.dcnv3(cfg, x, off, mask)) < 1e-5


def test_torchscript_exporter(tmp_path):
    dcngen.onnx.register_torchscript_symbolics()
    kw = dict(kernel_size=3, group=G, group_channels=C, offset_scale=2.0, remove_center=True)
    x, off, mask = torch.randn(1, 5, 6, G * C), torch.randn(1, 5, 6, 2 * G * 8), torch.rand(1, 5, 6, G * 8)
    path = tmp_path / "dcnv3.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(_Op("dcnv3", **kw), (x, off, mask), str(path), dynamo=False, opset_version=19)
    import onnx

    _check_graph(onnx.load(str(path)))
    assert _rel(_run_onnx(path.read_bytes(), (x, off, mask)), ops.dcnv3(x, off, mask, **kw)) < 1e-5


def test_export_rejects_old_opset():
    with pytest.raises(ValueError, match="opset"):
        dcngen.onnx.export(torch.nn.Identity(), (torch.zeros(1),), opset_version=18)


def test_export_keeps_a_users_translations_beside_dcngens():
    """custom_translation_table= adds to dcngen's table: the user's translation of another op
    (here aten.relu as ONNX Abs) and dcngen's DeformConv are both in the graph."""
    from onnxscript import opset19

    def relu_as_abs(x):
        return opset19.Abs(x)

    class Model(torch.nn.Module):
        def forward(self, x, offset_mask):
            return torch.relu(ops.dcnv4(x, offset_mask, group=G, group_channels=C))

    x, offset_mask = torch.randn(1, 4, 4, G * C), torch.randn(1, 4, 4, G * 9 * 3)
    prog = dcngen.onnx.export(Model().eval(), (x, offset_mask), custom_translation_table={torch.ops.aten.relu.default: relu_as_abs})
    _check_graph(prog.model_proto)
    assert "Abs" in [n.op_type for n in prog.model_proto.graph.node] and "Relu" not in [n.op_type for n in prog.model_proto.graph.node]
    out = _run_onnx(prog.model_proto.SerializeToString(), (x, offset_mask))
    assert _rel(out, ops.dcnv4(x, offset_mask, group=G, group_channels=C).abs()) < 1e-5
