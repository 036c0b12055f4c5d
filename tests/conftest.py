"""Tiny fixture models, one per architecture, built from configs with random weights."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Without a GPU the kernel tests run Triton's interpreter, which must be on before anything imports triton (its
# @jit functions, tl.cumsum included, are made interpreted or compiled when triton is imported): whichever test
# module is collected first, and whatever it imports, sees it set.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class TinyDiTBlock(nn.Module):
    """Plain video DiT block: self-attention over video tokens, cross-attention to text, MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_cross, self.kv_cross = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.proj, self.proj_cross = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        x = x + self.proj(attn.transpose(1, 2).flatten(2))
        kc, vc = self.kv_cross(text).chunk(2, dim=-1)
        cross = F.scaled_dot_product_attention(self._split(self.q_cross(self.norm2(x))), self._split(kc), self._split(vc))
        x = x + self.proj_cross(cross.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm3(x))


class TinyVideoDiT(nn.Module):
    """A plain PyTorch video DiT: [B, C, F, H, W] latents, patch 1x2x2, text tokens via cross-attention."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, layers: int = 2, text_dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.time = nn.Linear(1, dim)
        self.text = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(TinyDiTBlock(dim, heads) for _ in range(layers))
        self.out = nn.Linear(dim, channels * 4)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = hidden_states.shape
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)
        x = x + self.time(timestep.float().view(-1, 1, 1) / 1000.0)
        text = self.text(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, text)
        x = self.out(x).view(b, f, h // 2, w // 2, c, 2, 2)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


def _position_features(frames: int, rows: int, cols: int, dim: int) -> torch.Tensor:
    """Sinusoidal features of (frame, row, col): their dot products fall off with distance in the grid."""
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    grid = grid.reshape(-1, 3).float()
    per_axis = dim // 6
    freqs = torch.linspace(0.15, 0.9, per_axis)
    angles = grid[:, :, None] * freqs  # [N, 3, per_axis]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


class LocalAttentionBlock(nn.Module):
    """Attention whose queries and keys are sharp position features plus a small content term."""

    def __init__(self, heads: int, head_dim: int, sharpness: tuple[float, ...]) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim, self.sharpness = heads, head_dim, sharpness
        self.content = nn.Linear(dim, 2 * dim)
        self.values = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.sharpness, dtype=x.dtype).view(1, -1, 1, 1)
        qc, kc = self.content(x).unflatten(-1, (2, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        v = self.values(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        attn = F.scaled_dot_product_attention(pos * scale + 0.1 * qc, pos * scale + 0.1 * kc, v)
        return x + attn.transpose(1, 2).flatten(2)


class LocalAttentionDiT(nn.Module):
    """A DiT whose self-attention is local in (frame, row, col) by construction, like trained video models' heads.

    Queries and keys are sharp position features plus a small content term, so attention has real structure
    (random weights alone give near-uniform attention, where no sparse pattern can keep the mass).
    """

    def __init__(self, channels: int = 4, heads: int = 2, head_dim: int = 24, layers: int = 2, text_dim: int = 16,
                 sharpness: tuple[float, ...] = (3.0, 1.5)) -> None:
        super().__init__()
        dim = heads * head_dim
        self.head_dim = head_dim
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList(LocalAttentionBlock(heads, head_dim, sharpness) for _ in range(layers))
        self.text = nn.Linear(text_dim, dim)
        self.out = nn.Linear(dim, channels * 4)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = hidden_states.shape
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)
        x = x * (timestep.float().view(-1, 1, 1) / 1000.0 + 0.5)
        pos = _position_features(f, h // 2, w // 2, self.head_dim).to(x.dtype)
        for block in self.blocks:
            x = block(x, pos)
        x = x + self.text(encoder_hidden_states).mean(1, keepdim=True)
        x = self.out(x).view(b, f, h // 2, w // 2, c, 2, 2)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


def local_dit_inputs(seed: int, frames: int = 4, height: int = 32, width: int = 32, timestep: int = 500) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, frames, height, width, generator=g), "timestep": torch.tensor([timestep]),
                "encoder_hidden_states": torch.randn(1, 3, 16, generator=g)}


def tiny_dit() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = TinyVideoDiT().eval()
    kwargs = {"hidden_states": torch.randn(2, 4, 4, 8, 12), "timestep": torch.tensor([700, 700]),
                  "encoder_hidden_states": torch.randn(2, 5, 16)}
    return model, kwargs


def tiny_wan() -> tuple[nn.Module, dict]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    kwargs = {"hidden_states": torch.randn(1, 4, 4, 8, 12), "timestep": torch.tensor([700]),
                  "encoder_hidden_states": torch.randn(1, 6, 32)}
    return model, kwargs


def tiny_cogvideox() -> tuple[nn.Module, dict]:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=7,
    ).eval()
    kwargs = {"hidden_states": torch.randn(1, 3, 4, 8, 12), "encoder_hidden_states": torch.randn(1, 7, 32),
                  "timestep": torch.tensor([700])}
    return model, kwargs


def tiny_hunyuan() -> tuple[nn.Module, dict]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    kwargs = {"hidden_states": torch.randn(1, 4, 3, 8, 12), "timestep": torch.tensor([700]),
                  "encoder_hidden_states": torch.randn(1, 6, 32), "encoder_attention_mask": torch.ones(1, 6),
                  "pooled_projections": torch.randn(1, 16), "guidance": torch.tensor([3500.0])}
    return model, kwargs


def tiny_ltx() -> tuple[nn.Module, dict]:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=16,
    ).eval()
    frames, height, width = 3, 4, 6
    kwargs = {"hidden_states": torch.randn(1, frames * height * width, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
                  "timestep": torch.tensor([700]), "encoder_attention_mask": torch.ones(1, 5),
                  "num_frames": frames, "height": height, "width": width}
    return model, kwargs


FIXTURE_MODELS = {"dit": tiny_dit, "wan": tiny_wan, "cogvideox": tiny_cogvideox, "hunyuan": tiny_hunyuan, "ltx": tiny_ltx}


@pytest.fixture(params=sorted(FIXTURE_MODELS))
def any_model(request) -> tuple[str, nn.Module, dict]:
    name = request.param
    model, kwargs = FIXTURE_MODELS[name]()
    return name, model, kwargs


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def is_power_of_two(n: int) -> bool:
    return n > 0 and math.log2(n).is_integer()
