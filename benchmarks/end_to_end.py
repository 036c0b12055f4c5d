"""Seconds per video of Wan2.1 transformers over a 50-step schedule: eager, torch.compile, FlexAttention, vdopt.

Random weights in bf16, 480p / 81 frames (32,760 video tokens), CFG batch 2. Configurations, all timed in one
process with the same inputs:
- ``eager``: diffusers as shipped (the baseline);
- ``compile``: ``torch.compile`` of the diffusers model;
- ``flex``: vdopt's plan and runtime with every block-sparse launch done by compiled FlexAttention on the same
  block masks (its ``BlockMask`` built from vdopt's key-block lists), the graph around it compiled;
- ``vdopt``: vdopt's plan with its own kernels, ``vdopt.apply(..., compile=True)``.
The plan is fixed, not calibrated (random weights have no attention structure): dense warm-up for the first
``--warmup`` of the steps, then per head 3D tile windows whose exact density is near ``--density``.

Wan2.1-1.3B is run whole. For Wan2.1-14B, where a whole run of every configuration would not fit one 10-minute
device command, each distinct kind of step (dense warm-up, sparse) is timed ``--repeats`` times and the 50-step
total is composed from the schedule; the records say which. Step caching is not timed here: its reuse schedule
comes from calibration on a trained model (see vdopt.caching), which random weights cannot provide.

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


def _timesteps(steps: int) -> list[float]:
    return [1000.0 * (1 - i / steps) for i in range(steps)]


def _run_steps(runner: Any, inputs: dict[str, Any], times: list[float], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for t in times:
            runner(**dict(inputs, timestep=torch.full_like(inputs["timestep"], t)))
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    import vdopt
    from vdopt import attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="wan1.3b,wan14b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=128)
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
    from diffusers import WanTransformer3DModel

    records = []
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
        warm_steps = sum(t / 1000 > 1 - args.warmup for t in times)
        runners = {"eager": model, "compile": torch.compile(model, backend=backend, dynamic=False),
                   "flex": vdopt.apply(model, plan, compile=True, compile_backend=backend),
                   "vdopt": vdopt.apply(model, plan, compile=True, compile_backend=backend)}
        if not cuda:
            runners.pop("flex")  # compiled FlexAttention is a GPU comparison
        for config_name, runner in runners.items():
            real_op = attention.block_sparse_attention
            try:
                if config_name == "flex":
                    flex_error = check_flex(device, dtype)
                    if flex_error > 2e-2:
                        raise RuntimeError(f"FlexAttention path differs from the reference: rel L2 {flex_error:.3g}")
                    attention.block_sparse_attention = flex_block_sparse_attention
                # warm-up: capture and compile every kind of step (dense warm-up and sparse) once
                _run_steps(runner, inputs, [times[0], times[-1]], cuda)
                if mode == "whole":
                    seconds = statistics.median(_run_steps(runner, inputs, times, cuda) for _ in range(max(1, args.repeats // 3)))
                    how = f"whole {args.steps}-step run"
                else:
                    dense_step = statistics.median(_run_steps(runner, inputs, [times[0]], cuda) for _ in range(args.repeats))
                    sparse_step = statistics.median(_run_steps(runner, inputs, [times[-1]], cuda) for _ in range(args.repeats))
                    seconds = warm_steps * dense_step + (args.steps - warm_steps) * sparse_step
                    how = (f"composed: {warm_steps} x dense-warm-up step ({dense_step * 1000:.1f} ms) + "
                           f"{args.steps - warm_steps} x sparse step ({sparse_step * 1000:.1f} ms), each median of {args.repeats}")
            except Exception as error:  # noqa: BLE001 -- a peer path that cannot run is recorded, not fatal
                records.append({"model": name, "config": config_name, "seconds": None,
                                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
                print(f"{name} {config_name}: could not run: {records[-1]['error']}", flush=True)
                continue
            finally:
                attention.block_sparse_attention = real_op
            records.append({"model": name, "config": config_name, "seconds": seconds, "timing": how})
            print(f"{name:<8} {config_name:<8} {seconds:9.3f} s/video ({how})", flush=True)
        eager = next(r["seconds"] for r in records if r["model"] == name and r["config"] == "eager")
        for record in records:
            if record["model"] == name and record.get("seconds"):
                record["speedup_vs_eager"] = eager / record["seconds"]
                record["plan"] = {"dense_warmup_steps": warm_steps, "steps": args.steps, "block_size": args.block,
                                  "attention_density_after_warmup": plan.predictions["attention_density_after_warmup"],
                                  "cache": "none (not calibratable on random weights)"}
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__}, "steps": args.steps,
            "shape": "480p, 81 frames (21x30x52 latent tokens), CFG batch 2, random weights, " + str(dtype),
            "baseline": "eager"}
    for record in records:
        record.update(device=meta["device"], steps=args.steps)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "end_to_end_smoke.json" if args.smoke else "end_to_end.json"
    (Path(args.out) / name).write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
