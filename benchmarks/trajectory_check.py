"""Where along the denoising trajectory does a plan with less one-step error lose video quality? (CPU)

``predictor_check.py`` found that at Sparse-vDiT d0.1's predicted time the searched plan has 29% less one-step
model-output error than the baseline (uniform 0.25-wide diagonals) on the calibration inputs, which lie on the dense
trajectory, yet on the H100 its videos measured 1.2-1.6 dB lower PSNR (harness runs of 2026-12-06). This script
follows both plans' own trajectories from the same noise as dense and records, per denoising step:

- ``latent_rel_dev``: ``||x_t(plan) - x_t(dense)|| / ||x_t(dense)||``, how far the plan's trajectory has drifted;
- ``closed_loop_sq_error``: the relative squared error of the plan's model output against the dense model's output
  on the plan's own input ``x_t(plan)`` (the one-step error where the plan actually is, not where dense is);
- ``open_loop_sq_error`` (with ``--open-loop``, twice the time): the same on the dense trajectory's input
  ``x_t(dense)`` (what calibration measures; ``predictor_check.py`` has it on the calibration inputs);

and the final video PSNR against dense. Plans are rebuilt from the committed harness calibration as in
``predictor_check.py`` (the baseline, and the time-matched search's first plan at its predicted time). Videos use the
harness's verification captions (``proxy_calibration_prompts(n, seed=VERIFY_SEED_BASE)``, seed 9000), never the
evaluation's. On 2 CPU cores a sparse forward of the proxy takes about 50 s (the reference attention path), so
this takes about 20 minutes a plan per caption (40 with ``--open-loop``).

    python benchmarks/trajectory_check.py --method sparse_vdit --density 0.1 --captions 1

Result of 2026-12-06 (``trajectory_check_sparse_vdit_d0.1.json``, one verification caption, fp32, 23 min): the
searched plan's one-step error is lower than the baseline's at the first two sparse steps (0.054 vs 0.059, 0.066 vs
0.068), where both are still on the dense path. From the fourth sparse step on, each runs on its own drifted
path, and there the searched plan's error is higher (0.100-0.102 vs 0.093 at steps 11-14). The mean over the 24 sparse
steps is 0.0473 vs 0.0451. Its drift ends at 0.485 vs 0.444, and its video PSNR is 13.26 vs 14.06 dB. So the
error on the plan's own path ranks the two plans the way the videos do, and the error on the dense path (what
calibration measures) does not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from vdopt.demo import proxy_calibration_prompts
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import (
    VERIFY_SEED_BASE,
    _sparse_cutoff,
    load_harness_run,
    predicted_attention_seconds,
    psnr,
    rebuild_harness_baselines,
    with_dense_warmup,
)
from vdopt.runtime import OptimizedModel
from vdopt.search import SearchConfig, predicted_quality, search


def _output(out: Any) -> torch.Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    return out.float()


def _rel_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def follow(pipe: Any, dense_model: torch.nn.Module, plan: Any | None, prompts: list[str], seed: int, steps: int,
           dense_path: list[tuple[torch.Tensor, tuple, dict]] | None, open_loop_too: bool = False) -> dict[str, Any]:
    """Generate ``prompts`` from seed ``seed``'s noise with ``plan`` (None: dense), recording per step the latents
    after the step and the transformer's inputs; with ``dense_path`` (the dense run's recorded inputs), also the
    closed- and open-loop one-step errors of the plan's model."""
    model = dense_model if plan is None else OptimizedModel(dense_model, plan)
    inputs: list[tuple[torch.Tensor, tuple, dict]] = []
    closed: list[float] = []
    open_loop: list[float] = []
    busy = [False]  # the open-loop call below runs the hooked model again: it must not be recorded

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if busy[0]:
            return
        call = len(inputs)
        keep = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        inputs.append((_output(out), tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), keep))
        if dense_path is None:
            return
        busy[0] = True
        try:
            with torch.no_grad():
                closed.append(_rel_sq(_output(out), _output(dense_model(*args, **kwargs))))
                if open_loop_too:
                    dense_out, dense_args, dense_kwargs = dense_path[call]
                    open_loop.append(_rel_sq(_output(model(*dense_args, **dense_kwargs)), dense_out))
        finally:
            busy[0] = False

    latents_per_step: list[torch.Tensor] = []

    def on_step(pipe_: Any, step: int, timestep: Any, state: dict) -> None:
        latents_per_step.append(state["latents"].detach().float().clone())

    handle = model.register_forward_hook(hook, with_kwargs=True)
    pipe.transformer = model
    try:
        noise = torch.cat([pipe.prepare_latents(1, seed, pipe.num_frames, pipe.height, pipe.width) for _ in prompts])
        with torch.no_grad():
            video = pipe(prompts, num_inference_steps=steps, latents=noise, callback_on_step_end=on_step).float()
    finally:
        handle.remove()
        pipe.transformer = dense_model
    return {"video": video, "latents": latents_per_step, "inputs": inputs, "closed": closed, "open": open_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (the harness used 30)")
    parser.add_argument("--method", default="sparse_vdit", help="the baseline whose predicted time the search matches")
    parser.add_argument("--density", type=float, default=0.1, help="the baseline's target density")
    parser.add_argument("--captions", type=int, default=1, help="verification captions (one video each, seed 9000)")
    parser.add_argument("--open-loop", action="store_true",
                        help="also the one-step error on the dense trajectory's inputs (twice the time)")
    args = parser.parse_args()
    started = time.perf_counter()
    results = Path(args.results)
    try:
        records, calibration, sites, costs = load_harness_run(results)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    baseline_records = [r for r in records if r["method"] == args.method and r["target_density"] == args.density]
    if not baseline_records:
        raise SystemExit(f"no {args.method} record at target density {args.density} in {results / 'quality.json'}")
    pipe = load_proxy_pipeline("cpu")
    model = pipe.transformer
    # Every baseline record, not only this one: t_warmup is recovered as the calibration time that reproduces their
    # recorded predicted times best, and one record alone can fit several.
    every_baseline = [r for r in records if r["method"] not in ("dense", "searched")]
    t_warmup, rebuilt = rebuild_harness_baselines(every_baseline, calibration, costs, model)
    cutoff = _sparse_cutoff(calibration, t_warmup)
    base = rebuilt[(args.method, args.density)]
    budget = predicted_attention_seconds(base.plan, calibration, costs, cutoff) * 1e3
    config = SearchConfig(budget="time", time_budget_ms=budget, min_dense_warmup=1.0 - cutoff, max_step_ranges=1,
                          progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        searched = with_dense_warmup(search(model, calibration, sites, "h100", config, [base.plan], costs), t_warmup)
    plans = {f"{args.method} {args.density}": base.plan, f"searched at {args.method} {args.density}'s time": searched}

    prompts = proxy_calibration_prompts(max(args.captions, 1), seed=VERIFY_SEED_BASE)[:args.captions]
    dense = follow(pipe, model, None, prompts, VERIFY_SEED_BASE, args.steps, None)
    print(f"dense: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for name, plan in plans.items():
        start = time.perf_counter()
        run = follow(pipe, model, plan, prompts, VERIFY_SEED_BASE, args.steps, dense["inputs"], args.open_loop)
        dev = [float((a - b).norm() / b.norm()) for a, b in zip(run["latents"], dense["latents"])]
        estimate = predicted_quality(plan, calibration, cutoff)
        rows.append({"plan": name, "predicted_sq_error": estimate.sq_error,
                     "predicted_attention_ms": predicted_attention_seconds(plan, calibration, costs, cutoff) * 1e3,
                     "video_psnr": [float(x) for x in psnr(run["video"], dense["video"])],
                     "latent_rel_dev": dev, "closed_loop_sq_error": run["closed"],
                     "open_loop_sq_error": run["open"],
                     "labels": sorted({s.label() for site in plan.sites for r in site.schedule for s in r.heads})})
        print(f"{name:40s} PSNR {rows[-1]['video_psnr']}  final drift {dev[-1]:.4f}  "
              f"closed-loop error {sum(run['closed']) / len(run['closed']):.4f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    out = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "device": "cpu", "torch": torch.__version__, "dtype": "float32", "steps": args.steps,
                    "t_warmup": t_warmup, "captions": prompts, "seed": VERIFY_SEED_BASE,
                    "step_times": [float(kw["timestep"].flatten()[0]) / 1000.0 for _, _, kw in dense["inputs"]
                                   if isinstance(kw.get("timestep"), torch.Tensor)],
                    "results_from": str(results / "quality.json"),
                    "wall_s": round(time.perf_counter() - started),
                    "command": (f"python benchmarks/trajectory_check.py --method {args.method} --density {args.density} "
                                f"--captions {args.captions} --steps {args.steps}"
                                + (" --open-loop" if args.open_loop else ""))},
           "records": rows}
    path = Path(args.out) / f"trajectory_check_{args.method}_d{args.density:g}.json"
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(result: dict[str, Any], path: Path) -> None:
    """Per step: trajectory drift and closed- vs open-loop one-step error, one line per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(result["records"][0]["latent_rel_dev"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, row in enumerate(result["records"]):
        colour = f"C{i}"
        mean_psnr = sum(row["video_psnr"]) / len(row["video_psnr"])
        axes[0].plot(steps, row["latent_rel_dev"], color=colour, label=f"{row['plan']} ({mean_psnr:.2f} dB)")
        # Dense warm-up steps have no error: left out of the log-scaled panel.
        for key, style, label in (("closed_loop_sq_error", "-", f"{row['plan']}: on its own path"),
                                  ("open_loop_sq_error", "--", "on the dense path")):
            shown = [(step, e) for step, e in zip(steps, row[key]) if e > 0]
            if shown:
                axes[1].plot(*zip(*shown), color=colour, linestyle=style, label=label)
    axes[0].set(xlabel="denoising step", ylabel="||x_t - x_t(dense)|| / ||x_t(dense)||", title="trajectory drift")
    axes[1].set(xlabel="denoising step", ylabel="relative squared output error", yscale="log",
                title="one-step model-output error")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['meta']['captions'][0][:40]}... ({len(result['meta']['captions'])} captions, CPU)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
