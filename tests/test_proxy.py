"""The trained proxy: procedural data, grammar, held-out split, model size, shipped weights and the sampler."""

from __future__ import annotations

import pytest
import torch

from vdopt.proxy import data
from vdopt.proxy.model import (
    MAX_PARAMETERS,
    TINY_CONFIG,
    WEIGHTS_DIR,
    ProxyConfig,
    build_proxy,
    count_parameters,
)
from vdopt.proxy.pipeline import ProxyPipeline, load_proxy_pipeline

SMALL = data.VideoSpec(num_frames=4, height=16, width=16)


def test_training_batch_is_deterministic_in_seed_and_step() -> None:
    video_a, captions_a = data.training_batch(6, seed=3, step=11, spec=SMALL)
    video_b, captions_b = data.training_batch(6, seed=3, step=11, spec=SMALL)
    video_c, captions_c = data.training_batch(6, seed=3, step=12, spec=SMALL)
    assert video_a.shape == (6, 4, 16, 16, 3)
    assert captions_a == captions_b and torch.equal(video_a, video_b)
    assert captions_a != captions_c and not torch.equal(video_a, video_c)
    assert 0.0 <= float(video_a.min()) and float(video_a.max()) <= 1.0


def test_captions_parse_back_to_the_attributes_that_made_them() -> None:
    scenes = data.sample_scenes(200, torch.Generator().manual_seed(0))
    for i, text in enumerate(data.captions(scenes)):
        parsed = data.parse_caption(text)
        k = int(scenes.active[i].sum())
        expected = tuple(
            (data.SIZE_NAMES[int(scenes.size[i, j])], data.COLOUR_NAMES[int(scenes.colour[i, j])],
             data.SHAPES[int(scenes.shape[i, j])], data.MOTIONS[int(scenes.motion[i, j])])
            for j in range(k)
        )
        assert parsed.objects == expected
        assert parsed.background == data.BACKGROUNDS[int(scenes.background[i])]
        assert set(text.split()) <= set(data.vocabulary())
    with pytest.raises(ValueError, match="not in the proxy grammar"):
        data.parse_caption("a red square dances on a black background")


def test_held_out_prompts_are_never_sampled_for_training() -> None:
    held_out = data.held_out_prompts()
    assert len(held_out) == len(set(held_out)) >= 10
    triples = set(data.HELD_OUT_TRIPLES)
    for prompt in held_out:
        objects = data.parse_caption(prompt).objects
        assert any((c, s, m) in triples for _, c, s, m in objects), prompt
    scenes = data.sample_scenes(20_000, torch.Generator().manual_seed(1))
    for text in data.captions(scenes):
        assert text not in held_out
        assert not any((c, s, m) in triples for _, c, s, m in data.parse_caption(text).objects), text


def test_proxy_is_within_its_parameter_and_size_limits() -> None:
    transformer, text_encoder, _ = build_proxy(ProxyConfig())
    total = count_parameters(transformer) + count_parameters(text_encoder)
    assert total <= MAX_PARAMETERS
    assert total * 2 <= 20 * 2**20  # fp16 bytes
    assert type(transformer).__name__ == "WanTransformer3DModel"
    assert transformer.config.attention_head_dim == 64 and transformer.config.in_channels == 3
    video = ProxyConfig().video
    assert video.num_frames >= 8 and video.num_frames * (video.height // 2) * (video.width // 2) >= 4096


def _shipped_pipeline() -> ProxyPipeline:
    if not (WEIGHTS_DIR / "config.json").exists():
        pytest.skip(f"no trained proxy weights shipped in {WEIGHTS_DIR} yet (run python -m vdopt.proxy.train)")
    return load_proxy_pipeline()


def test_shipped_weights_load_and_respect_shard_limits() -> None:
    pipe = _shipped_pipeline()
    shards = sorted(WEIGHTS_DIR.glob("proxy-*.safetensors"))
    assert all(path.stat().st_size <= 16 * 2**20 for path in shards)
    assert sum(path.stat().st_size for path in shards) <= 20 * 2**20
    assert pipe.config.training.get("step", 0) > 0
    assert (pipe.num_frames, pipe.height, pipe.width) == (8, 48, 48)


def test_pipeline_call_shape_and_seed_determinism() -> None:
    torch.manual_seed(0)
    pipe = ProxyPipeline(*build_proxy(TINY_CONFIG), TINY_CONFIG)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    prompts = ["a red square moves left on a black background", "a blue circle bounces on a gray background"]
    first = pipe(prompts, num_inference_steps=2, seed=5)
    again = pipe(prompts, num_inference_steps=2, seed=5)
    other = pipe(prompts, num_inference_steps=2, seed=6)
    assert first.shape == (2, 4, 16, 16, 3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    # One transformer call per step on the CFG batch, with WanPipeline's keyword arguments.
    assert len(calls) == 6
    assert set(calls[0]) == {"hidden_states", "timestep", "encoder_hidden_states", "return_dict"}
    assert calls[0]["hidden_states"].shape[0] == 4 and calls[0]["timestep"].shape == (4,)
    noise = pipe.prepare_latents(2, 5, 4, 16, 16)
    assert torch.equal(pipe(prompts, num_inference_steps=2, latents=noise), first)


def test_shipped_pipeline_generates_at_full_size() -> None:
    pipe = _shipped_pipeline()
    video = pipe(data.held_out_prompts()[0], num_inference_steps=1, seed=0)
    assert video.shape == (1, 8, 48, 48, 3)
    assert torch.isfinite(video).all()
