"""The proxy model: diffusers' WanTransformer3DModel on pixels plus a tiny text encoder, and its weight files.

Weights are stored as fp16 safetensors shards (at most ``MAX_SHARD_BYTES`` each) with keys prefixed
``transformer.`` / ``text_encoder.``, next to a ``config.json`` that holds everything needed to rebuild the
model, tokenizer and sampler defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vdopt.proxy.data import VideoSpec, vocabulary
from vdopt.proxy.text import TextEncoder, WordTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
MAX_SHARD_BYTES = 15 * 2**20  # under the repository's 16 MiB per-file limit, with room for the header
MAX_PARAMETERS = 10_000_000


@dataclass(frozen=True)
class ProxyConfig:
    """Sizes of the proxy: video geometry, Wan transformer and text encoder, and sampler defaults."""

    video: VideoSpec = field(default_factory=VideoSpec)
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 768
    freq_dim: int = 256
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ffn_dim: int = 384
    max_text_length: int = 40
    flow_shift: float = 2.0
    guidance_scale: float = 5.0
    training: dict = field(default_factory=dict, compare=False)

    def wan_config(self) -> dict:
        """Keyword arguments for ``WanTransformer3DModel``: pixels in, patch 1x2x2."""
        return {
            "patch_size": (1, 2, 2), "num_attention_heads": self.num_heads, "attention_head_dim": self.head_dim,
            "in_channels": 3, "out_channels": 3, "text_dim": self.text_dim, "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim, "num_layers": self.num_layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data["wan_transformer"] = self.wan_config()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ProxyConfig:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["video"] = VideoSpec(**fields.get("video", {}))
        return cls(**fields)


TINY_CONFIG = ProxyConfig(video=VideoSpec(4, 16, 16), num_layers=2, num_heads=2, head_dim=64, ffn_dim=128,
                          freq_dim=64, text_dim=32, text_layers=1, text_heads=2, text_ffn_dim=64)


def build_proxy(config: ProxyConfig | None = None, tokenizer: WordTokenizer | None = None,
                ) -> tuple[nn.Module, TextEncoder, WordTokenizer]:
    """Fresh (randomly initialised) transformer, text encoder and tokenizer (the grammar's, if not given)."""
    from diffusers import WanTransformer3DModel

    config = config or ProxyConfig()
    tokenizer = tokenizer or WordTokenizer(vocabulary(), config.max_text_length)
    transformer = WanTransformer3DModel(**config.wan_config())
    text_encoder = TextEncoder(len(tokenizer), config.text_dim, config.text_layers, config.text_heads,
                               config.text_ffn_dim, config.max_text_length)
    total = count_parameters(transformer) + count_parameters(text_encoder)
    if total > MAX_PARAMETERS:
        raise ValueError(f"Proxy has {total:,} parameters, over the {MAX_PARAMETERS:,} limit; shrink num_layers "
                         "or ffn_dim in ProxyConfig.")
    return transformer, text_encoder, tokenizer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_weights(directory: str | Path, transformer: nn.Module, text_encoder: nn.Module,
                 tokenizer: WordTokenizer, config: ProxyConfig) -> list[Path]:
    """Write fp16 shards ``proxy-0000i-of-0000n.safetensors`` and ``config.json``; returns the shard paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu", torch.float16).contiguous()
        nbytes = tensor.numel() * 2
        if nbytes > MAX_SHARD_BYTES:
            raise ValueError(f"Tensor {name} is {nbytes} bytes, larger than one shard ({MAX_SHARD_BYTES}).")
        if used + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += nbytes
    for old in directory.glob("proxy-*.safetensors"):
        old.unlink()
    paths = []
    for i, shard in enumerate(shards):
        path = directory / f"proxy-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    meta = {"config": config.to_dict(), "tokenizer": tokenizer.to_dict(),
            "parameters": {"transformer": count_parameters(transformer),
                           "text_encoder": count_parameters(text_encoder)}}
    (directory / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def load_weights(directory: str | Path = WEIGHTS_DIR) -> tuple[nn.Module, TextEncoder, WordTokenizer, ProxyConfig]:
    """Rebuild the proxy from ``config.json`` and its shards, in float32 on the CPU."""
    directory = Path(directory)
    config_path = directory / "config.json"
    shards = sorted(directory.glob("proxy-*.safetensors"))
    if not config_path.exists() or not shards:
        raise FileNotFoundError(
            f"No proxy weights in {directory} (need config.json and proxy-*.safetensors); train them with "
            "`python -m vdopt.proxy.train --out DIR` or reinstall vdopt with its package data."
        )
    meta = json.loads(config_path.read_text())
    config = ProxyConfig.from_dict(meta["config"])
    transformer, text_encoder, tokenizer = build_proxy(config, WordTokenizer.from_dict(meta["tokenizer"]))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state |= load_file(str(shard))
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        part = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    return transformer.eval(), text_encoder.eval(), tokenizer, config
