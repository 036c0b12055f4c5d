"""vdopt on a real diffusers pipeline (Wan2.1 text-to-video), with weights from the Hugging Face Hub.

Needs a GPU and the downloaded weights (this repository's CI has neither; it tests the same calls on tiny models).

    python examples/wan_diffusers.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --out wan_plan.json
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from diffusers import AutoencoderKLWan, WanPipeline
    from diffusers.utils import export_to_video

    import vdopt

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--out", default="wan_plan.json")
    parser.add_argument("--plan", default=None, help="replay this plan instead of calibrating")
    args = parser.parse_args()

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    if args.plan:
        opt = vdopt.apply(pipe.transformer, vdopt.Plan.load(args.plan), compile=True)
    else:
        prompts = ["A cat walks on the grass, realistic", "A red car drives along a coastal road at sunset"]
        opt = vdopt.optimize(pipe, prompts, target="h100",
                             search_config=vdopt.SearchConfig(recall_budget=0.95, min_dense_warmup=0.2),
                             calibration_config=vdopt.CalibrationConfig(num_inference_steps=50, steps_per_input=6),
                             compile=True)
        opt.plan.save(args.out)
    print(opt.plan.summary())
    pipe.transformer = opt
    video = pipe("A dog running through a field of flowers", height=480, width=832, num_frames=81,
                 num_inference_steps=50, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).frames[0]
    export_to_video(video, "wan_vdopt.mp4", fps=16)


if __name__ == "__main__":
    main()
