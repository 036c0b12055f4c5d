"""Where a site split between dense and sparse heads spends its time (the quality harness's "mixing cost").

The harness measured, on the trained proxy at batch 32 (16 prompt/seed pairs with CFG), that a site running two
heads dense and two heads with one static sparse strategy took 1.27 ms more than its two launches timed alone
(a dense site: about 1.4 ms). This script rebuilds that case on one recorded site and times each part, then
profiles the split call's CUDA kernels:

    python benchmarks/site_split_profile.py --out $OUT      # GPU; about a minute with the proxy's sampling

Writes OUT/site_split_profile.json: per variant the median of 20 CUDA-event timings after 5 warm-up calls (the
lesser of two passes), the inputs' shape and strides, and the split call's top CUDA kernels by total time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vdopt.calibrate import CalibrationConfig, record_forward_inputs
from vdopt.demo import proxy_calibration_prompts
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import _median_ms, attention_input_recorder, site_runner
from vdopt.strategies import Dense, Diagonal, SpatialWindow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--pairs", type=int, default=16, help="prompt/seed pairs in the batch (doubled by CFG)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--timing", choices=("wall", "device"), default="wall",
                        help="wall: each call from an idle GPU, host work included (what the 2026-12-06 run used); "
                             "device: GPU work alone (vdopt.quality.TIMING_MODES)")
    args = parser.parse_args()
    # On CPU it runs as a smoke test (float32, wall clock); the figures mean something only on a GPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_proxy_pipeline(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = pipe.transformer
    prompt = proxy_calibration_prompts(1)[0]
    calls = record_forward_inputs(model, [prompt], pipe,
                                  CalibrationConfig(num_inference_steps=30, steps_per_input=3, seed=0))
    one = calls[1]  # mid-way through sampling
    batch = {k: (torch.cat([v] * args.pairs) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2
                 else v) for k, v in one.items()}
    captured, record = attention_input_recorder(model, batch)
    recorded = record(batch)
    site = next(s for s in captured.sites if s.name in recorded)
    q, k, v, mask, scale = recorded[site.name]
    heads = q.shape[1]
    half = heads // 2
    static = SpatialWindow(frame_window=1)

    def runner(strategies: list, n: int | None = None):
        n = heads if n is None else n
        module = site_runner(site, strategies, args.block_size, q[:, :n], 0)
        qs, ks, vs = q[:, :n], k[:, :n], v[:, :n]
        return lambda: module(qs, ks, vs, attn_mask=mask, scale=scale)

    dense_index = torch.arange(half, heads, device=device)
    variants = {
        "dense_all_heads_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
        "dense_half_heads_sdpa_views": lambda: F.scaled_dot_product_attention(
            q[:, half:], k[:, half:], v[:, half:], attn_mask=mask, scale=scale),
        "dense_half_heads_sdpa_index_select": lambda: F.scaled_dot_product_attention(
            q.index_select(1, dense_index), k.index_select(1, dense_index), v.index_select(1, dense_index),
            attn_mask=mask, scale=scale),
        "static_all_heads": runner([static] * heads),
        "static_half_heads_alone": runner([static] * half, half),
        "split_static_then_dense": runner([static] * half + [Dense()] * (heads - half)),
        "split_dense_then_static": runner([Dense()] * (heads - half) + [static] * half),
        "split_static_and_diagonal": runner([static] * half + [Diagonal(width=1.0)] * (heads - half)),
        "empty_like_and_index_put": lambda: torch.empty_like(q).index_copy_(1, dense_index, q[:, half:]),
    }
    results = {}
    with torch.no_grad():
        for name, fn in variants.items():
            results[name] = min(_median_ms(fn, device, 5, 20, args.timing) for _ in range(2))
            print(f"{name:40s} {results[name]:8.3f} ms", flush=True)
        parts = results["static_half_heads_alone"] + results["dense_half_heads_sdpa_views"]
        print(f"split beyond its parts: {results['split_static_then_dense'] - parts:.3f} ms", flush=True)
        from torch.profiler import ProfilerActivity, profile

        split = variants["split_static_then_dense"]
        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(10):
                split()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25,
                                          max_name_column_width=70)
        print(table, flush=True)
    record_out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__, "site": site.name, "q_shape": list(q.shape), "q_stride": list(q.stride()),
        "mask": None if mask is None else list(mask.shape), "block_size": args.block_size,
        "timing": f"median of 20 CUDA-event timed calls after 5 warm-up calls, lesser of 2 passes, {args.timing} timing",
        "static_strategy": repr(static), "ms": results,
        "split_beyond_parts_ms": results["split_static_then_dense"] - parts,
        "split_profile_top_kernels_10_calls": table,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_split_profile.json").write_text(json.dumps(record_out, indent=1) + "\n")


if __name__ == "__main__":
    main()
