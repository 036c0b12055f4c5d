"""Does the search's predicted model-output error rank plans the way the model's real output error does? (CPU)

The quality harness's searches minimise an additive prediction: per site, the calibrated squared attention error of
each head's strategy, weighted by the site's measured output gain, summed over sites (``predicted_quality``). On the
H100 proxy run of 2026-12-06 it ranked a mixed searched plan 17% below the Sparse-vDiT d0.1 baseline's error at
equal time, and the plan's videos measured 1.7 dB lower PSNR. This script separates the two places the ranking can
go wrong, on the harness's own calibration (``quality_calibration.json``, the trained proxy, CPU):

- one step: each plan runs the transformer on the recorded calibration forward inputs after the warm-up (the same
  inputs calibration saw), and the relative squared error of its output against dense is measured per input;
- the trajectory (``--seeds N``): each plan generates the calibration videos (calibration captions, seeds 9000+;
  the harness's time-match check now uses 8 verification captions of its own) and its PSNR against dense is
  measured. On CPU the reference attention path
  takes about 20 s a forward, so a 30-step video takes about 10 minutes a plan; on a GPU, seconds.

Result of 2026-12-06 (``predictor_check.json``, one step only): over the 10 plans at d 0.1 the predicted error ranks
the measured one-step error with rank correlation 0.98; the measured error is 0.93-1.96x the predicted, most for the
sparsest patterns. At Sparse-vDiT's time the searched plan has 29% less one-step error than the baseline (predicted:
19% less), yet the plan the same search chose in the H100 run before the calibration-video check (same strategy set,
predicted 0.0176 under that run's site costs) scored 1.7 dB lower PSNR on the held-out videos: the loss builds up over
the denoising steps, which the one-step objective does not see.

Plans: every baseline at the harness's target densities and the time-matched searched plan at each baseline's
predicted time (the first try of each search, rebuilt; the searches are deterministic).

    python benchmarks/predictor_check.py --methods sparse_vdit,pooled_draft --seeds 0   # 3.5 min a plan, 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
import warnings
from pathlib import Path

import torch

from vdopt.calibrate import CalibrationConfig, record_forward_inputs
from vdopt.demo import proxy_calibration_prompts
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import (
    VERIFY_SEED_BASE,
    _sparse_cutoff,
    generate,
    load_harness_run,
    predicted_attention_seconds,
    psnr,
    rank_correlation,
    rebuild_harness_baselines,
    with_dense_warmup,
)
from vdopt.runtime import OptimizedModel
from vdopt.search import SearchConfig, predicted_quality, search


def _output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    return out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (the harness used 30)")
    parser.add_argument("--calib-prompts", type=int, default=2, help="as the harness (its --calib-prompts)")
    parser.add_argument("--seeds", type=int, default=0,
                        help="calibration-video seeds per prompt (0: one step only; on CPU about 10 min a video)")
    parser.add_argument("--densities", default="0.1", help="comma-separated target densities of the baselines")
    parser.add_argument("--methods", default=None, help="comma-separated baselines (default: every one in the results)")
    args = parser.parse_args()
    results = Path(args.results)
    try:
        records, calibration, sites, costs = load_harness_run(results)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    pipe = load_proxy_pipeline("cpu")
    model = pipe.transformer
    densities = [float(d) for d in args.densities.split(",")]
    methods = args.methods.split(",") if args.methods else None
    baselines = [r for r in records if r["method"] not in ("dense", "searched") and r["target_density"] in densities
                 and (methods is None or r["method"] in methods)]
    if not baselines:
        raise SystemExit(f"no baseline record matches --methods {args.methods} --densities {args.densities}")
    warmup_steps = records[0]["warmup_steps"]
    t_warmup, rebuilt = rebuild_harness_baselines(baselines, calibration, costs, model)
    cutoff = _sparse_cutoff(calibration, t_warmup)
    plans: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for (method, density), base in rebuilt.items():
            name = f"{method} {density}"
            plans[name] = base.plan
            budget = predicted_attention_seconds(base.plan, calibration, costs, cutoff) * 1e3
            config = SearchConfig(budget="time", time_budget_ms=budget, min_dense_warmup=1.0 - cutoff,
                                  max_step_ranges=1, progress=False)
            plans[f"searched at {name}'s time"] = with_dense_warmup(
                search(model, calibration, sites, "h100", config, [base.plan], costs), t_warmup)

    calib_prompts = proxy_calibration_prompts(args.calib_prompts, seed=1234)
    inputs = record_forward_inputs(model, calib_prompts, pipe,
                                   CalibrationConfig(num_inference_steps=args.steps, steps_per_input=6,
                                                     query_rows=256, seed=0))
    after = [x for x in inputs if float(x["timestep"].flatten()[0]) / 1000.0 <= t_warmup + 1e-6]
    with torch.no_grad():
        dense_out = [_output(model, x) for x in after]
        pairs = [(p, VERIFY_SEED_BASE + i) for p in calib_prompts for i in range(args.seeds)]
        reference = generate(pipe, pairs, args.steps, 16) if pairs else None
        rows = []
        for name, plan in plans.items():
            start = time.perf_counter()
            opt = OptimizedModel(model, plan)
            step_errors = []
            for x, ref in zip(after, dense_out):
                out = _output(opt, x)
                step_errors.append(float(((out - ref) ** 2).sum() / (ref ** 2).sum()))
            video_psnr = None
            if reference is not None:
                pipe.transformer = opt
                try:
                    video_psnr = float(psnr(generate(pipe, pairs, args.steps, 16), reference).mean())
                finally:
                    pipe.transformer = model
            estimate = predicted_quality(plan, calibration, cutoff)
            rows.append({"plan": name, "predicted_sq_error": estimate.sq_error,
                         "predicted_attention_ms": predicted_attention_seconds(plan, calibration, costs, cutoff) * 1e3,
                         "one_step_sq_error": sum(step_errors) / len(step_errors),
                         "one_step_sq_error_per_input": step_errors, "calibration_video_psnr": video_psnr,
                         "labels": sorted({s.label() for site in plan.sites for rng in site.schedule
                                           for s in rng.heads})})
            print(f"{name:44s} predicted {estimate.sq_error:.4f}  one step {rows[-1]['one_step_sq_error']:.4f}  "
                  f"video PSNR {video_psnr if video_psnr is None else round(video_psnr, 2)}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    predicted = [r["predicted_sq_error"] for r in rows]
    summary = {
        "rank_correlation_predicted_vs_one_step": rank_correlation(predicted, [r["one_step_sq_error"] for r in rows]),
        "rank_correlation_predicted_vs_minus_video_psnr": None if reference is None else rank_correlation(
            predicted, [-r["calibration_video_psnr"] for r in rows]),
        "one_step_over_predicted": [r["one_step_sq_error"] / r["predicted_sq_error"] for r in rows
                                    if r["predicted_sq_error"] > 0],
    }
    out = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "device": "cpu", "torch": torch.__version__, "steps": args.steps, "warmup_steps": warmup_steps,
                    "t_warmup": t_warmup, "inputs_after_warmup": len(after), "video_pairs": pairs,
                    "results_from": str(results / "quality.json"),
                    "command": "python benchmarks/predictor_check.py " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                        if k not in ("results", "out") and v is not None)},
           "summary": summary, "records": rows}
    path = Path(args.out) / "predictor_check.json"
    path.write_text(json.dumps(out, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
