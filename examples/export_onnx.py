"""Export a network with DCNv4 blocks to ONNX (standard DeformConv, opset 19) and run it in onnxruntime.

    pip install 'dcngen[onnx]'
    python examples/export_onnx.py [--out dcnv4_net.onnx]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

import dcngen.onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_block import Net  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dcnv4_net.onnx")
    opts = parser.parse_args()

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-zero offsets, so the export is exercised beyond the zero init
        for block in net.blocks:
            block.dcn.offset_mask.weight.normal_(std=0.1)
    images = torch.randn(2, 3, 16, 16)
    program = dcngen.onnx.export(net, (images,), opts.out, input_names=["images"], output_names=["logits"])
    nodes = [n.op_type for n in program.model_proto.graph.node]
    print(f"wrote {opts.out}: {len(nodes)} nodes, {nodes.count('DeformConv')} DeformConv")

    import onnxruntime as ort

    session = ort.InferenceSession(opts.out, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    expect = net(images).detach().numpy()
    print(f"onnxruntime vs PyTorch: max abs difference {np.abs(logits - expect).max():.2e}")


if __name__ == "__main__":
    main()
