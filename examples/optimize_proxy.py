"""vdopt's Python API end to end on the shipped proxy: optimize, save the plan, replay it, compare with dense.

    python examples/optimize_proxy.py            # CPU: a few minutes; on a GPU, seconds
"""

from __future__ import annotations

import torch

import vdopt
from vdopt.demo import proxy_calibration_prompts
from vdopt.proxy.data import held_out_prompts
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import psnr


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = 30 if device == "cuda" else 8
    pipe = load_proxy_pipeline(device=device)
    dense_transformer = pipe.transformer

    # Calibrate on training-distribution prompts, search a plan for an H100, keep heads at >= 90% attention mass.
    opt = vdopt.optimize(pipe, proxy_calibration_prompts(2), target="h100",
                         search_config=vdopt.SearchConfig(recall_budget=0.9, min_dense_warmup=0.2),
                         calibration_config=vdopt.CalibrationConfig(num_inference_steps=steps))
    opt.plan.save("proxy_plan.json")
    print(opt.plan.summary())

    # Replay the saved plan without calibration, and compare one held-out video with dense from the same seed.
    replayed = vdopt.apply(dense_transformer, vdopt.Plan.load("proxy_plan.json"))
    prompt = held_out_prompts()[1]
    dense = pipe(prompt, num_inference_steps=steps, seed=0)
    pipe.transformer = replayed
    sparse = pipe(prompt, num_inference_steps=steps, seed=0)
    pipe.transformer = dense_transformer
    print(f"{prompt!r}: PSNR of vdopt vs dense {float(psnr(sparse[0], dense[0])):.2f} dB")


if __name__ == "__main__":
    main()
