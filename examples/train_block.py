"""Train a small FlashInternImage-style network (DCNv4 blocks) for a few steps on synthetic data.

Each block is x + DCNv4(LN(x)) then x + MLP(LN(x)), channels-last (N, H, W, C). The data is a
fixed batch of random images with random labels, so a falling loss shows that gradients reach
every layer through the generated kernels.

    python examples/train_block.py [--steps 30] [--compile] [--bf16]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import dcngen.nn


class Block(nn.Module):
    """x (N, H, W, C) -> (N, H, W, C): DCNv4 token mixer and MLP, each pre-norm with a residual."""

    def __init__(self, channels: int = 32, group: int = 2, mlp_ratio: float = 2.0, offset_scale: float = 1.0, dw_kernel_size: int | None = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.dcn = dcngen.nn.DCNv4(channels, group=group, offset_scale=offset_scale, dw_kernel_size=dw_kernel_size)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        t = x.reshape(n, h * w, c)
        t = t + self.dcn(self.norm1(t), (h, w))
        t = t + self.mlp(self.norm2(t))
        return t.reshape(n, h, w, c)


class Net(nn.Module):
    """images (N, 3, H, W) -> logits (N, classes)."""

    def __init__(self, channels: int = 32, group: int = 2, depth: int = 2, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*(Block(channels, group) for _ in range(depth)))
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(images).permute(0, 2, 3, 1))
        return self.head(self.norm(x.mean(dim=(1, 2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the network")
    parser.add_argument("--bf16", action="store_true", help="train under torch.autocast('cpu', bfloat16)")
    opts = parser.parse_args()

    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    net = Net()
    step_fn = torch.compile(net, fullgraph=True) if opts.compile else net
    optim = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for step in range(opts.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.bf16):
            loss = nn.functional.cross_entropy(step_fn(images), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 5 == 0 or step == opts.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
