"""The main job end to end on the shipped proxy: calibrate, search, save the plan, dense vs optimized video."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from vdopt.api import optimize
from vdopt.caching import CacheConfig
from vdopt.calibrate import CalibrationConfig
from vdopt.search import SearchConfig


def proxy_calibration_prompts(count: int = 4, seed: int = 1234) -> list[str]:
    """Captions drawn from the proxy's training distribution (never the held-out evaluation captions)."""
    from vdopt.proxy.data import captions, sample_scenes

    return captions(sample_scenes(count, torch.Generator().manual_seed(seed)))


def write_side_by_side_gif(path: Path, videos: list[torch.Tensor], scale: int = 4, fps: int = 6) -> None:
    """Videos ``[F, H, W, 3]`` in [0, 1] side by side, upscaled by ``scale`` (nearest), as an animated GIF."""
    from PIL import Image

    strip = torch.cat([v.clamp(0, 1) for v in videos], dim=2)
    strip = strip.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    frames = [Image.fromarray((f.numpy() * 255).round().astype("uint8")) for f in strip]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def _timed(fn: Any, device: str) -> tuple[Any, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_demo(out: Path, device: str = "cpu", steps: int = 10, recall_budget: float = 0.9, target: str = "h100",
             seed: int = 0, calibration_prompts: int = 2, cache_budget: float | None = None) -> dict[str, Any]:
    """Run the proxy end to end; writes ``plan.json``, ``dense_vs_vdopt.gif`` and ``quality.json`` under ``out``.

    ``cache_budget`` (e.g. 0.05) also calibrates a step cache with that hidden-state error budget.
    """
    from vdopt.proxy.data import held_out_prompts
    from vdopt.proxy.pipeline import load_proxy_pipeline
    from vdopt.quality import psnr, relative_l2, ssim

    out.mkdir(parents=True, exist_ok=True)
    pipe = load_proxy_pipeline(device=device)
    original = pipe.transformer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = optimize(pipe, proxy_calibration_prompts(calibration_prompts), target,
                       search_config=SearchConfig(recall_budget=recall_budget, min_dense_warmup=0.2),
                       calibration_config=CalibrationConfig(num_inference_steps=steps, steps_per_input=3),
                       cache=None if cache_budget is None else CacheConfig(error_budget=cache_budget, num_inference_steps=steps))
    opt.plan.save(out / "plan.json")
    print(opt.plan.summary())
    prompt = held_out_prompts()[0]
    pipe.transformer = original
    dense, dense_s = _timed(lambda: pipe(prompt, num_inference_steps=steps, seed=seed)[0].cpu(), device)
    pipe.transformer = opt
    sparse, sparse_s = _timed(lambda: pipe(prompt, num_inference_steps=steps, seed=seed)[0].cpu(), device)
    pipe.transformer = original
    write_side_by_side_gif(out / "dense_vs_vdopt.gif", [dense, sparse, ((sparse - dense).abs() * 4).clamp(0, 1)])
    result = {
        "prompt": prompt, "seed": seed, "steps": steps, "device": device, "target": target,
        "psnr": float(psnr(sparse, dense)), "ssim": float(ssim(sparse, dense)), "rel_l2": float(relative_l2(sparse, dense)),
        "predicted": opt.plan.predictions,
        "seconds_dense": dense_s, "seconds_vdopt": sparse_s,
        "step_cache": None if opt.plan.cache is None else {
            "policy": opt.plan.cache.describe(),
            "steps_reused": sum(c.stats.reused for c in opt.step_caches()),
            "steps_computed": sum(c.stats.computed for c in opt.step_caches()),
        },
        "note": "CPU timings use vdopt's reference attention path; speed is measured on GPU by benchmarks/",
        "files": {"plan": str(out / "plan.json"), "gif": str(out / "dense_vs_vdopt.gif")},
    }
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
