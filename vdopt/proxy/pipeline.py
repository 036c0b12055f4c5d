"""Text-to-video sampling with the proxy: flow-matching Euler steps with classifier-free guidance.

Each denoising step calls ``self.transformer(hidden_states=..., timestep=..., encoder_hidden_states=...,
return_dict=False)[0]`` once on the CFG batch ``[conditional; unconditional]``, exactly as diffusers'
WanPipeline does, so vdopt can swap ``pipe.transformer`` for an optimized module and hook its calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vdopt.proxy.model import WEIGHTS_DIR, ProxyConfig, load_weights
from vdopt.proxy.text import TextEncoder, WordTokenizer


def flow_sigmas(num_inference_steps: int, shift: float) -> torch.Tensor:
    """Noise levels ``[steps + 1]`` from 1 down to 0, warped by ``shift`` toward high noise (as in Wan/SD3)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
    return (shift * sigmas / (1.0 + (shift - 1.0) * sigmas)).float()


class ProxyPipeline:
    """Prompt -> video ``[B, F, H, W, 3]`` in ``[0, 1]`` with the trained proxy DiT.

    Video tensors inside the sampler are ``[B, 3, F, H, W]`` pixels scaled to ``[-1, 1]``; the transformer
    predicts the flow velocity ``noise - clean`` at ``timestep = 1000 * sigma``.
    """

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, tokenizer: WordTokenizer,
                 config: ProxyConfig | None = None) -> None:
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        config = config or ProxyConfig()
        self.config = config
        self.num_frames = config.video.num_frames
        self.height = config.video.height
        self.width = config.video.width

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoder.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ProxyPipeline:
        """Move both networks; returns self."""
        # Only pass what changes: diffusers warns on any dtype argument to a Wan model's .to().
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.transformer.to(**kwargs)
        self.text_encoder.to(**kwargs)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``encoder_hidden_states [B, max_text_length, text_dim]``; '' is the unconditional."""
        ids, mask = self.tokenizer(list(prompts))
        return self.text_encoder(ids.to(self.device), mask.to(self.device))

    def prepare_latents(self, batch_size: int, seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Initial noise ``[B, 3, F, H, W]`` drawn on the CPU from ``seed``, so it is the same on any device."""
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch_size, 3, num_frames, height, width, generator=generator)
        return noise.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 30,
        guidance_scale: float | None = None,
        seed: int = 0,
        latents: torch.Tensor | None = None,
        negative_prompt: str = "",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        flow_shift: float | None = None,
        callback_on_step_end: Callable[[ProxyPipeline, int, torch.Tensor, dict], dict | None] | None = None,
    ) -> torch.Tensor:
        """Generate videos ``[B, F, H, W, 3]`` (float32, ``[0, 1]``), one per prompt.

        ``latents`` (``[B, 3, F, H, W]``) replaces the seeded noise. ``guidance_scale`` and ``flow_shift``
        default to the values in the model's config. ``callback_on_step_end(pipe, step, timestep, {"latents"})``
        runs after every step, as in diffusers; a returned dict may replace ``latents``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        flow_shift = self.config.flow_shift if flow_shift is None else flow_shift
        num_frames = num_frames or self.num_frames
        height, width = height or self.height, width or self.width
        if height % 2 or width % 2:
            raise ValueError(f"height and width must be even for the 1x2x2 patch, got {height}x{width}.")
        if latents is None:
            latents = self.prepare_latents(len(prompts), seed, num_frames, height, width)
        elif latents.shape[0] != len(prompts) or latents.shape[1] != 3:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [{len(prompts)}, 3, F, H, W] "
                             "(one noise video per prompt).")
        latents = latents.to(self.device, torch.float32)
        # vdopt's optimized drop-in keeps `.dtype`; fall back to the parameters for plain modules.
        model_dtype = getattr(self.transformer, "dtype", None) or next(self.transformer.parameters()).dtype
        # Conditional rows first, then unconditional: one CFG batch of 2B per step.
        text = self.encode_prompt(prompts + [negative_prompt] * len(prompts)).to(model_dtype)
        sigmas = flow_sigmas(num_inference_steps, flow_shift).to(self.device)
        for step in range(num_inference_steps):
            sigma, sigma_next = sigmas[step], sigmas[step + 1]
            model_input = torch.cat([latents, latents]).to(model_dtype)
            timestep = (sigma * 1000.0).expand(model_input.shape[0])
            velocity = self.transformer(hidden_states=model_input, timestep=timestep,
                                        encoder_hidden_states=text, return_dict=False)[0]
            cond, uncond = velocity.float().chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
            latents = latents + (sigma_next - sigma) * velocity
            if callback_on_step_end is not None:
                update = callback_on_step_end(self, step, timestep[0], {"latents": latents})
                if update and "latents" in update:
                    latents = update["latents"]
        return ((latents.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 4, 1).contiguous()


def load_proxy_pipeline(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        weights_dir: str | Path = WEIGHTS_DIR) -> ProxyPipeline:
    """The shipped trained proxy (or the one in ``weights_dir``), ready to sample on ``device`` in ``dtype``."""
    transformer, text_encoder, tokenizer, config = load_weights(weights_dir)
    pipe = ProxyPipeline(transformer, text_encoder, tokenizer, config)
    # Weights load in float32; casting only when asked keeps diffusers' float32-modules warning away.
    return pipe.to(device, None if dtype == torch.float32 else dtype)
