"""Token layout of a model's self-attention, read from known diffusers configs or inferred from the inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vdopt.sites import TokenLayout


def _as_triple(patch: Any, patch_t: Any = None) -> tuple[int, int, int]:
    if isinstance(patch, (tuple, list)):
        return int(patch[0]), int(patch[1]), int(patch[2])
    return int(patch_t or 1), int(patch), int(patch)


def _grid(frames: int, rows: int, cols: int, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    pt, ph, pw = patch
    return frames // pt, rows // ph, cols // pw


def layout_for_model(model: nn.Module, inputs: dict[str, Any]) -> TokenLayout | None:
    """Layout of ``model``'s video self-attention for the forward kwargs ``inputs``, or None if unknown.

    Known diffusers classes are read from their config; other models are inferred from a 5-D ``hidden_states``
    ``[batch, channels, frames, rows, cols]`` with a patch size found in ``model.config`` or ``model.patch_size``.
    """
    cls = type(model).__name__
    config = getattr(model, "config", None)
    hidden = inputs.get("hidden_states")
    text = inputs.get("encoder_hidden_states")
    text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
    if cls == "WanTransformer3DModel":
        _, _, f, h, w = hidden.shape
        return TokenLayout(*_grid(f, h, w, _as_triple(config.patch_size)))
    if cls == "CogVideoXTransformer3DModel":
        _, f, _, h, w = hidden.shape
        grid = _grid(f, h, w, _as_triple(config.patch_size, config.patch_size_t))
        return TokenLayout(*grid, text_tokens=text_tokens, text_position="before" if text_tokens else "none")
    if cls == "HunyuanVideoTransformer3DModel":
        _, _, f, h, w = hidden.shape
        grid = _grid(f, h, w, _as_triple(config.patch_size, config.patch_size_t))
        return TokenLayout(*grid, text_tokens=text_tokens, text_position="after" if text_tokens else "none")
    if cls == "LTXVideoTransformer3DModel":
        frames, height, width = inputs.get("num_frames"), inputs.get("height"), inputs.get("width")
        if frames is None or height is None or width is None:
            return None
        return TokenLayout(*_grid(int(frames), int(height), int(width), _as_triple(config.patch_size, config.patch_size_t)))
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 5:
        patch = getattr(config, "patch_size", None) if config is not None else None
        patch = patch if patch is not None else getattr(model, "patch_size", None)
        if patch is None:
            patch = _find_conv3d_stride(model)
        if patch is None:
            return None
        _, _, f, h, w = hidden.shape
        return TokenLayout(*_grid(f, h, w, _as_triple(patch)))
    return None


def _find_conv3d_stride(model: nn.Module) -> tuple[int, int, int] | None:
    """Patch size of a plain DiT: the stride of its first Conv3d (the patch embedding)."""
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            return tuple(int(s) for s in module.stride)  # type: ignore[return-value]
    return None
