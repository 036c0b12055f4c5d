"""Semantic k-means iterations per denoising step vs attention recall on the trained proxy (CPU or GPU).

``SemanticKMeans`` warm-starts its centroids from the previous step, so each step continues one Lloyd run. This
compares, on held-out prompts, every post-warm-up step of the proxy's 30-step sampler (steps 6-29) at every third
self-attention site: the recall of the true attention mass and the kept density on 512 random query rows, for
``iterations`` = 2 every step, 2 on the first (cold) step then 1, and 1 every step (32/64 clusters, top-p 0.9,
64-token layout blocks). Each mode keeps its own warm state per site. Writes OUT/kmeans_iterations.json: per
(prompt, step, site, mode) records and per-mode means, with the paired differences against 2 every step.

    python benchmarks/kmeans_iterations.py --out benchmarks/results       # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vdopt.calibrate import CalibrationConfig, record_forward_inputs
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import attention_input_recorder
from vdopt.strategies import PatternContext, SemanticKMeans

PROMPTS = ("a large red circle moves right on a black background",
           "a blue triangle moves left on a striped background")
MODES = {"2_every_step": (2, 2), "2_cold_1_warm": (2, 1), "1_every_step": (1, 1)}  # (cold, warm) iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent / "results")))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_proxy_pipeline(device)
    model = pipe.transformer
    records = []
    start = time.time()
    for prompt in PROMPTS:
        config = CalibrationConfig(num_inference_steps=args.steps, steps_per_input=args.steps, seed=1)
        inputs = record_forward_inputs(model, [prompt], pipe, config)
        captured, record = attention_input_recorder(model, inputs[0])
        layout = captured.layout
        states: dict[str, dict] = {mode: {} for mode in MODES}
        for step in tqdm(range(args.warmup_steps, len(inputs)), desc=f"vdopt: k-means iterations, {prompt[:24]}"):
            recorded = record(inputs[step])
            for name in list(recorded)[::3]:
                q, k = recorded[name][0], recorded[name][1]
                v0, v1 = layout.video_span
                qv, kv = q[:, :, v0:v1].float(), k[:, :, v0:v1].float()
                rows = torch.randperm(qv.shape[2])[: args.rows]
                probs = torch.softmax((qv[:, :, rows] @ kv.transpose(-1, -2)) * qv.shape[-1] ** -0.5, -1)
                for mode, (cold, warm) in MODES.items():
                    site_state = states[mode].setdefault(name, {})
                    strategy = SemanticKMeans(iterations=warm if site_state else cold)
                    keep = strategy.build(qv, kv, PatternContext(layout, 64, site_state, 0)).keep_rows(rows)
                    records.append({"prompt": prompt, "step": step, "site": name, "mode": mode,
                                    "recall": float((probs * keep).sum(-1).mean()),
                                    "density": float(keep.float().mean())})
    summary = {}
    by_case = collections.defaultdict(dict)
    for r in records:
        by_case[(r["prompt"], r["step"], r["site"])][r["mode"]] = r
    for mode in MODES:
        mine = [r for r in records if r["mode"] == mode]
        diffs = [(c[mode]["recall"] - c["2_every_step"]["recall"], c[mode]["density"] - c["2_every_step"]["density"])
                 for c in by_case.values()]
        summary[mode] = {"recall": statistics.mean(r["recall"] for r in mine),
                         "density": statistics.mean(r["density"] for r in mine), "cases": len(mine),
                         "recall_diff_vs_2_every_step": {"mean": statistics.mean(d[0] for d in diffs),
                                                         "min": min(d[0] for d in diffs),
                                                         "max": max(d[0] for d in diffs)},
                         "density_diff_vs_2_every_step": {"mean": statistics.mean(d[1] for d in diffs),
                                                          "max": max(d[1] for d in diffs)}}
        print(f"{mode:14s} recall {summary[mode]['recall']:.4f} density {summary[mode]['density']:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "kmeans_iterations", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__}, "prompts": list(PROMPTS), "steps": args.steps,
              "warmup_steps": args.warmup_steps, "rows": args.rows, "clusters": [32, 64], "top_p": 0.9,
              "block_size": 64, "seconds": time.time() - start, "summary": summary, "records": records}
    (out / "kmeans_iterations.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
