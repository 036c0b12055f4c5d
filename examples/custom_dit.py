"""vdopt on a model it does not know: any nn.Module whose attention calls scaled_dot_product_attention.

Give the token layout of its self-attention (frames x rows x cols after patchify, plus text tokens if they are
part of the same sequence); calibrate on forward-kwargs dicts, one per denoising step you want measured.

    python examples/custom_dit.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vdopt


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class TokenDiT(nn.Module):
    """Takes already-patchified tokens [batch, frames*rows*cols, dim]: nothing tells vdopt the grid."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = tokens * (1 + timestep.float().view(-1, 1, 1) / 1000)
        for block in self.blocks:
            x = block(x)
        return x


def main() -> None:
    torch.manual_seed(0)
    model = TokenDiT().eval()
    layout = vdopt.TokenLayout(frames=4, rows=8, cols=8)
    calib = [{"tokens": torch.randn(1, layout.video_tokens, 64), "timestep": torch.tensor([t])} for t in (900, 500, 100)]
    opt = vdopt.optimize(model, calib, target="h100", layout=layout,
                         search_config=vdopt.SearchConfig(recall_budget=0.5))
    print(opt.plan.summary())
    x = {"tokens": torch.randn(1, layout.video_tokens, 64), "timestep": torch.tensor([300])}
    with torch.no_grad():
        dense, sparse = model(**x), opt(**x)
    print(f"relative L2 vs dense: {float((sparse - dense).norm() / dense.norm()):.4f}")


if __name__ == "__main__":
    main()
