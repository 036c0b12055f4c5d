"""Seconds per video on the trained proxy: dense vs vdopt's searched plan vs the plan plus its step cache.

One process: calibrate and search on training-distribution prompts, then for held-out prompts time each
configuration with CUDA events after a warm-up video (median over repeats) and compare each video with the dense
one from the same seed (PSNR, SSIM, relative L2). Writes ``proxy_end_to_end.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import vdopt
from vdopt.caching import calibrate_step_cache
from vdopt.demo import proxy_calibration_prompts
from vdopt.proxy.data import held_out_prompts
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import psnr, relative_l2, ssim


def _time(fn, repeats: int, cuda: bool) -> tuple[torch.Tensor, float]:
    fn()  # warm-up: captures, autotuning, pattern caches
    times, out = [], None
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - begin)
    return out, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recall", type=float, default=0.9)
    parser.add_argument("--cache-budget", type=float, default=0.05)
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script (2 steps, 1 prompt, 1 repeat)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("proxy_end_to_end.py times a GPU; run it on a CUDA machine (or --smoke on CPU)")
    if args.smoke:
        args.steps, args.prompts, args.repeats = 2, 1, 1
    pipe = load_proxy_pipeline(device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    dense_model = pipe.transformer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = vdopt.optimize(pipe, proxy_calibration_prompts(1 if args.smoke else 4), "h100",
                             search_config=vdopt.SearchConfig(recall_budget=args.recall, min_dense_warmup=0.2),
                             calibration_config=vdopt.CalibrationConfig(num_inference_steps=args.steps,
                                                                        steps_per_input=2 if args.smoke else 4))
        sparse_plan = vdopt.Plan.from_json(opt.plan.to_json())
        calibrate_step_cache(opt, proxy_calibration_prompts(1 if args.smoke else 4), pipe,
                                           vdopt.CacheConfig(error_budget=args.cache_budget, num_inference_steps=args.steps))
    sparse = vdopt.apply(dense_model, sparse_plan)
    configs = {"dense": dense_model, "vdopt_sparse": sparse, "vdopt_sparse_cache": opt}
    records = []
    for prompt in held_out_prompts()[: args.prompts]:
        reference = None
        for name, model in configs.items():
            pipe.transformer = model
            video, seconds = _time(lambda p=prompt: pipe(p, num_inference_steps=args.steps, seed=0)[0].float().cpu(),
                                   args.repeats, cuda)
            reference = video if name == "dense" else reference
            records.append({"prompt": prompt, "config": name, "seconds": seconds,
                            "psnr": float(psnr(video, reference)), "ssim": float(ssim(video, reference)),
                            "rel_l2": float(relative_l2(video, reference))})
            print(f"{name:<20} {seconds * 1000:8.1f} ms/video  PSNR {records[-1]['psnr']:.2f}  {prompt}", flush=True)
    pipe.transformer = dense_model
    summary = {}
    for name in configs:
        rows = [r for r in records if r["config"] == name]
        summary[name] = {"seconds": statistics.mean(r["seconds"] for r in rows)}
        if name != "dense":
            summary[name].update({k: statistics.mean(r[k] for r in rows) for k in ("psnr", "ssim", "rel_l2")})
    for name in configs:
        summary[name]["speedup_vs_dense"] = summary["dense"]["seconds"] / summary[name]["seconds"]
    result = {
        "benchmark": "proxy_end_to_end", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "vdopt": vdopt.__version__},
        "shape": "proxy: WanTransformer3DModel 8 layers, 4 heads x 64, 4,608 video tokens, CFG batch 2, bf16",
        "steps": args.steps, "baseline": "dense (same pipeline, same seed)",
        "plan": {"predictions": sparse_plan.predictions, "cache": None if opt.plan.cache is None else opt.plan.cache.to_json()},
        "summary": summary, "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy_end_to_end.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
