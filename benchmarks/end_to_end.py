"""Seconds per video of Wan2.1 transformers over a 50-step schedule: eager, torch.compile, vdopt, FlexAttention.

Random weights in bf16, 480p / 81 frames (32,760 video tokens), CFG batch 2. Configurations, all timed in one
process with the same inputs (``--configs`` picks a subset; ``eager`` always runs first, the baseline of the call):
- ``eager``: diffusers as shipped (the baseline);
- ``compile``: ``torch.compile`` of the diffusers model;
- ``vdopt``: vdopt's plan with its own kernels, ``vdopt.apply(..., compile=True)``;
- ``vdopt_cache``: the same plan plus a fixed step-cache schedule (LeMiCa-style), calibrated in this run on the
  trained proxy model under the same plan recipe (``--cache-budget``) and resampled to ``--steps``;
- ``flex``: vdopt's plan and runtime with every block-sparse launch done by compiled FlexAttention on the same
  block masks (its ``BlockMask`` built from vdopt's key-block lists), lowered and compiled as vdopt's graph is;
- ``flex_cache``: ``flex`` plus the same step-cache schedule as ``vdopt_cache`` (the like-for-like comparison).
The plan is fixed, not calibrated (random weights have no attention structure): dense warm-up for the first
``--warmup`` of the steps, then per head 3D tile windows whose exact density is near ``--density``. The same recipe
is applied to the trained proxy model first: its cache schedule is calibrated there, and the recipe's quality
(PSNR / SSIM / relative L2 against dense, same seeds, held-out prompts) is recorded beside the speed.

Wan2.1-1.3B is run whole. For Wan2.1-14B, where a whole run of every configuration would not fit one 10-minute
device command, each distinct kind of step (dense warm-up, sparse, cached) is timed ``--repeats`` times and the
50-step total is composed from the schedule; the records say which. Each record also gives the first-call
(capture + compile) seconds. Records are written after every configuration, so a call cut short keeps what it did.

    python benchmarks/end_to_end.py --out benchmarks/results              # on one GPU
    python benchmarks/end_to_end.py --smoke                               # CPU check of the script, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

MODELS = {
    "wan1.3b": ({"num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                     "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True}, (16, 21, 60, 104), 512, "whole"),
    "wan14b": ({"num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                    "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True}, (16, 21, 60, 104), 512, "composed"),
    "smoke": ({"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "text_dim": 32,
                   "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True, "rope_max_seq_len": 32},
              (4, 4, 16, 16), 6, "whole"),
}


def fixed_plan(model: Any, inputs: dict[str, Any], block: int, density: float, warmup: float) -> Any:
    """Dense for t above ``1 - warmup``; then per head the tile window whose exact density is nearest ``density``."""
    import vdopt
    from vdopt.capture import capture
    from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepRange
    from vdopt.strategies import PatternContext

    sites = [s for s in capture(model, inputs).sites if s.sparsifiable]
    layout = sites[0].layout
    probe = torch.empty(1, 1, layout.video_tokens, 1)
    windows = [vdopt.TileWindow(f, r, r) for f in (0, 1, 2, 4) for r in (0, 1, 2, 4, 6, 8, 12, 16)]
    measured = {w: float(w.build(probe, probe, PatternContext(layout, block, {})).density()[0]) for w in windows}
    # Heads alternate between the two windows closest to the target so the site's mean density lands near it.
    ranked = sorted(windows, key=lambda w: abs(measured[w] - density))[:2]
    site_plans = []
    for site in sites:
        heads = [ranked[h % 2] for h in range(site.heads)]
        schedule = [StepRange(1.0, 1.0 - warmup, [vdopt.Dense()] * site.heads),
                    StepRange(1.0 - warmup, 0.0, heads, {"head_density": [measured[w] for w in heads]})]
        site_plans.append(SitePlan(site.name, site.heads, block, schedule))
    plan = Plan(ModelFingerprint.of(model), "h100", site_plans)
    plan.predictions["attention_density_after_warmup"] = statistics.mean(measured[w] for w in ranked)
    return plan


def flex_block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale=None,
                                head_indices=None, **_: Any):
    """vdopt's block-sparse op computed by compiled FlexAttention on the same key-block lists (for comparison)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    if head_indices is not None:
        index = head_indices.long()
        q, k, v = q.index_select(1, index), k.index_select(1, index), v.index_select(1, index)
    kv_blocks = -(-k.shape[2] // block_n)
    width = kv_block_indices.shape[-1]
    indices = torch.nn.functional.pad(kv_block_indices, (0, kv_blocks - width)).to(torch.int32).contiguous()
    # Listed blocks are "full" blocks (no mask_mod), as the FlexAttention baseline in DESIGN.md was built.
    counts = kv_block_counts.to(torch.int32).contiguous()
    mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
                                    BLOCK_SIZE=(block_m, block_n), seq_lengths=(q.shape[2], k.shape[2]))
    out, lse = _FLEX(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask, scale=scale, return_lse=True)
    return out, lse.float()


_FLEX = None


def check_flex(device: str, dtype: torch.dtype) -> float:
    """Relative L2 of the FlexAttention path against vdopt's reference on a ragged random case (run before timing)."""
    from vdopt.kernels.reference import block_sparse_attention_reference, kv_block_list_from_mask

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 1000, 128, generator=g).to(device, dtype) for _ in range(3))
    mask = torch.rand(1, 2, 8, 8, generator=g).to(device) < 0.4
    mask[..., 0] = True
    indices, counts = kv_block_list_from_mask(mask)
    out, _ = flex_block_sparse_attention(q, k, v, indices, counts, 128, 128)
    ref, _ = block_sparse_attention_reference(q.float(), k.float(), v.float(), indices, counts, 128, 128)
    return float((out.float() - ref).norm() / ref.norm())


def proxy_recipe(args: argparse.Namespace, device: str) -> tuple[Any, dict[str, Any]]:
    """The benchmark's plan recipe on the trained proxy: calibrate its cache schedule, measure its quality.

    Returns (the cache schedule, a record of the proxy-quality figures for sparse-only and sparse + cache).
    """
    import vdopt
    from vdopt.caching import calibrate_step_cache
    from vdopt.demo import proxy_calibration_prompts
    from vdopt.proxy.data import held_out_prompts
    from vdopt.proxy.pipeline import load_proxy_pipeline
    from vdopt.quality import psnr, relative_l2, ssim

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = load_proxy_pipeline(device=device, dtype=dtype)
    dense = pipe.transformer
    probe_inputs = {"hidden_states": pipe.prepare_latents(1, 0, pipe.num_frames, pipe.height, pipe.width).to(dtype),
                    "timestep": torch.tensor([1000.0], device=device),
                    "encoder_hidden_states": pipe.encode_prompt(["a red square"]).to(dtype), "return_dict": False}
    plan = fixed_plan(dense, probe_inputs, args.proxy_block, args.density, args.warmup)
    steps = args.proxy_steps
    cached = vdopt.apply(dense, vdopt.Plan.from_json(plan.to_json()))
    schedule = calibrate_step_cache(
        cached, proxy_calibration_prompts(args.proxy_prompts), pipe,
        vdopt.CacheConfig(error_budget=args.cache_budget, policy="schedule", num_inference_steps=steps,
                          max_consecutive_reuses=2))
    configs = {"vdopt": vdopt.apply(dense, plan), "vdopt_cache": cached}
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for prompt in held_out_prompts()[: args.proxy_prompts]:
        for seed in range(2):
            pipe.transformer = dense
            reference = pipe(prompt, num_inference_steps=steps, seed=seed)[0].float().cpu()
            for name, model in configs.items():
                pipe.transformer = model
                video = pipe(prompt, num_inference_steps=steps, seed=seed)[0].float().cpu()
                scores[name].append({"psnr": float(psnr(video, reference)), "ssim": float(ssim(video, reference)),
                                     "rel_l2": float(relative_l2(video, reference))})
    pipe.transformer = dense
    record = {"model": "proxy (trained, 4,608 video tokens)", "steps": steps, "prompts": args.proxy_prompts, "seeds": 2,
              "block_size": args.proxy_block, "recipe_density": plan.predictions["attention_density_after_warmup"],
              "cache": None if schedule is None else schedule.to_json()}
    for name, rows in scores.items():
        record[name] = {k: statistics.mean(r[k] for r in rows) for k in ("psnr", "ssim", "rel_l2")}
    print(f"proxy recipe: density {record['recipe_density']:.3f}; sparse PSNR {record['vdopt']['psnr']:.2f} dB; "
          f"sparse + cache PSNR {record['vdopt_cache']['psnr']:.2f} dB; "
          f"{'no schedule met the budget' if schedule is None else schedule.describe()}", flush=True)
    return schedule, record


def _timesteps(steps: int) -> list[float]:
    return [1000.0 * (1 - i / steps) for i in range(steps)]


def _run_steps(runner: Any, inputs: dict[str, Any], times: list[float], cuda: bool) -> float:
    """Seconds for one call per time in ``times`` (device-synchronised before and after: a whole-video wall time)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for t in times:
            runner(**dict(inputs, timestep=torch.full_like(inputs["timestep"], t)))
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _step_kinds(times: list[float], warmup: float, cache: Any) -> list[str]:
    """Kind of every step of the schedule: "dense" (warm-up), "sparse", or "cached" (blocks 1..L-1 reused)."""
    reused = set(cache.reuse_steps) if cache is not None else set()
    return ["cached" if i in reused else ("dense" if t / 1000 > 1 - warmup else "sparse") for i, t in enumerate(times)]


def _composed_seconds(runner: Any, inputs: dict[str, Any], times: list[float], kinds: list[str], repeats: int,
                      cuda: bool, cached: bool) -> tuple[float, str]:
    """50-step total from per-kind step times. A cached step is timed as the third call of a three-step run whose
    schedule reuses exactly that step (the runner's plan must carry ``StepCachePlan(reuse_steps=(2,), ...)``)."""
    dense_t, sparse_t = times[0], times[-1]
    per_kind = {"dense": statistics.median(_run_steps(runner, inputs, [dense_t], cuda) for _ in range(repeats)),
                "sparse": statistics.median(_run_steps(runner, inputs, [sparse_t], cuda) for _ in range(repeats))}
    if cached:
        probe = [sparse_t + 2.0, sparse_t + 1.0, sparse_t]  # a new run (t went up), two computed steps, one reused
        per_kind["cached"] = statistics.median(
            _run_steps(runner, inputs, probe, cuda) - _run_steps(runner, inputs, probe[:2], cuda) for _ in range(repeats))
    seconds = sum(per_kind[k] for k in kinds)
    counts = {k: kinds.count(k) for k in per_kind}
    how = "composed: " + " + ".join(f"{counts[k]} x {k} step ({per_kind[k] * 1000:.1f} ms)" for k in per_kind)
    return seconds, how + f", each median of {repeats}"


class _Deadline:
    """Raises TimeoutError in the main thread after ``seconds`` (so one slow configuration cannot eat the call)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def _expire(signum: int, frame: Any) -> None:
            raise TimeoutError(f"configuration exceeded its {self.seconds:.0f} s deadline")

        signal.signal(signal.SIGALRM, _expire)
        signal.alarm(max(1, int(self.seconds)))

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.alarm(0)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["records"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        order = ["eager", "compile", "flex", "flex_cache", "vdopt", "vdopt_cache"]
        rows = sorted((r for r in result["records"] if r["model"] == model and r.get("seconds")),
                      key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
        ax.bar([r["config"] for r in rows], [r["seconds"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            ax.text(i, r["seconds"], f"{r['speedup_vs_eager']:.2f}x", ha="center", va="bottom", fontsize=9)
        ax.set_title(f"{model}: {result['steps']} steps, {result['device']}", fontsize=9)
        ax.set_ylabel("seconds per video")
    fig.suptitle("Wan2.1 480p/81f, CFG batch 2, bf16: seconds per video (speedup vs eager on the bars)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from torch._dynamo.utils import counters

    import vdopt
    from vdopt import attention
    from vdopt.kernels.block_sparse_attention import last_backend
    from vdopt.passes.lower_attention import lowering_report
    from vdopt.plan import Plan, StepCachePlan

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="wan1.3b,wan14b")
    parser.add_argument("--configs", default="eager,compile,vdopt,vdopt_cache,flex")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--cache-budget", type=float, default=0.1,
                        help="hidden-state error budget of the cache schedule, calibrated on the proxy")
    parser.add_argument("--proxy-steps", type=int, default=30)
    parser.add_argument("--proxy-prompts", type=int, default=4)
    parser.add_argument("--proxy-block", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=400.0, help="seconds allowed per configuration")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny model, 4 steps, aot_eager, no flex")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("end_to_end.py times a GPU; run it on a CUDA machine (or --smoke on CPU)")
    if args.smoke:
        args.models, args.steps, args.block, args.repeats = "smoke", 4, 16, 1
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    backend = "inductor" if cuda else "aot_eager"
    configs = ["eager"] + [c for c in args.configs.split(",") if c != "eager"]
    configs = [c for c in configs if cuda or not c.startswith("flex")]  # compiled FlexAttention: a GPU comparison
    cache_plan, proxy_record = None, None
    if args.smoke:
        args.proxy_steps, args.proxy_prompts = 3, 1
    if {"vdopt", "vdopt_cache", "flex_cache"} & set(configs):
        schedule, proxy_record = proxy_recipe(args, device)
        if schedule is None:
            print("cached configurations skipped: no cache schedule met the budget on the proxy", flush=True)
            configs = [c for c in configs if not c.endswith("_cache")]
        cache_plan = None if schedule is None else schedule.resampled(args.steps)
    from diffusers import WanTransformer3DModel

    meta = {"benchmark": "end_to_end", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "vdopt": vdopt.__version__}, "steps": args.steps,
            "shape": "480p, 81 frames (21x30x52 latent tokens), CFG batch 2, random weights, " + str(dtype),
            "baseline": "eager (same process)", "command": "python benchmarks/end_to_end.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "smoke"))}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / ("end_to_end_smoke.json" if args.smoke else "end_to_end.json")
    records: list[dict[str, Any]] = []
    if json_path.exists():  # keep the records of other models/configurations from earlier calls
        this_run = {(m, c) for m in args.models.split(",") for c in configs}
        try:
            records = [r for r in json.loads(json_path.read_text()).get("records", [])
                       if (r.get("model"), r.get("config")) not in this_run]
        except (json.JSONDecodeError, AttributeError):
            records = []

    def save() -> None:
        json_path.write_text(json.dumps({**meta, "proxy_quality_of_recipe": proxy_record, "records": records},
                                        indent=1) + "\n")

    for name in args.models.split(","):
        config, latent, text_tokens, mode = MODELS[name]
        torch.manual_seed(0)
        with torch.device(device):
            model = WanTransformer3DModel(patch_size=(1, 2, 2), **config).to(dtype).eval()
        g = torch.Generator().manual_seed(1)
        inputs = {"hidden_states": torch.randn(2, *latent, generator=g).to(device, dtype),
                  "timestep": torch.tensor([1000.0, 1000.0], device=device),
                  "encoder_hidden_states": torch.randn(2, text_tokens, config["text_dim"], generator=g).to(device, dtype),
                  "return_dict": False}
        plan = fixed_plan(model, inputs, args.block, args.density, args.warmup)
        times = _timesteps(args.steps)
        eager_seconds = None
        for config_name in configs:
            cached = config_name.endswith("_cache")
            kinds = _step_kinds(times, args.warmup, cache_plan if cached else None)
            real_op = attention.block_sparse_attention
            record: dict[str, Any] = {"model": name, "config": config_name, "device": meta["device"], "date": meta["date"],
                                      "torch": torch.__version__, "steps": args.steps,
                                      "step_kinds": {k: kinds.count(k) for k in ("dense", "sparse", "cached")}}
            started = time.perf_counter()
            counters.clear()
            try:
                with _Deadline(args.deadline):
                    if config_name == "eager":
                        runner = model
                    elif config_name == "compile":
                        runner = torch.compile(model, backend=backend, dynamic=False)
                    else:
                        run_plan = Plan.from_json(plan.to_json())
                        if cached:
                            # whole runs use the resampled schedule; a composed run times one reused step in isolation
                            run_plan.cache = cache_plan if mode == "whole" else StepCachePlan(
                                reuse_steps=(2,), schedule_steps=3, warmup_steps=0)
                        runner = vdopt.apply(model, run_plan, compile=True, compile_backend=backend)
                    if config_name.startswith("flex"):
                        flex_error = check_flex(device, dtype)
                        record["flex_check_rel_l2"] = flex_error
                        if flex_error > 2e-2:
                            raise RuntimeError(f"FlexAttention path differs from the reference: rel L2 {flex_error:.3g}")
                        attention.block_sparse_attention = flex_block_sparse_attention
                    # first calls: capture and compile every kind of step (dense warm-up and sparse) once
                    record["first_call_seconds"] = _run_steps(runner, inputs, [times[0], times[-1]], cuda)
                    record["compiled_graphs_after_first_calls"] = counters["stats"]["unique_graphs"]
                    if mode == "whole":
                        seconds = _run_steps(runner, inputs, times, cuda)
                        how = f"whole {args.steps}-step run"
                    else:
                        seconds, how = _composed_seconds(runner, inputs, times, kinds, args.repeats, cuda, cached)
            except Exception as error:  # noqa: BLE001 -- a configuration that cannot run is recorded, not fatal
                record.update(seconds=None, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}",
                              elapsed_seconds=time.perf_counter() - started)
                records.append(record)
                save()
                print(f"{name} {config_name}: could not run: {record['error']}", flush=True)
                continue
            finally:
                attention.block_sparse_attention = real_op
            eager_seconds = seconds if config_name == "eager" else eager_seconds
            record.update(seconds=seconds, timing=how, speedup_vs_eager=eager_seconds / seconds,
                          eager_seconds_same_call=eager_seconds,
                          graph_breaks=sum(counters["graph_break"].values()),
                          compiled_graphs=counters["stats"]["unique_graphs"])
            if config_name.startswith("vdopt"):
                record["attention_backend"] = last_backend()
                record["sites_left_eager"] = sum(len(lowering_report(gm, t)) for gm in runner._graphs.values()
                                                 for t in (times[0], times[-1]))
                record["phases_hoisted"] = [hoisted for phase_runner in runner._runners.values()
                                            for hoisted in getattr(phase_runner, "hoisted", {}).values()]
            if config_name not in ("eager", "compile"):
                record["plan"] = {"dense_warmup_steps": kinds.count("dense"), "steps": args.steps,
                                  "block_size": args.block, "strategy": "tile3d windows, per head",
                                  "attention_density_after_warmup": plan.predictions["attention_density_after_warmup"],
                                  "cache": cache_plan.to_json() if cached else None}
            records.append(record)
            save()
            print(f"{name:<8} {config_name:<12} {seconds:9.3f} s/video  x{record['speedup_vs_eager']:.2f} vs eager  "
                  f"(first calls {record['first_call_seconds']:.1f} s; {how})", flush=True)
        del model, inputs
        if cuda:
            torch.cuda.empty_cache()
    if not args.smoke:
        _plot({**meta, "records": records}, out_dir / "end_to_end.png")


if __name__ == "__main__":
    main()
