"""Step caching on the trained proxy: reused steps vs video quality for each policy and error budget.

For each policy ("threshold": TeaCache-style run-time criterion; "schedule": LeMiCa-style fixed reused steps) and
each hidden-state error budget, the cache is calibrated on training-distribution prompts and then judged on
held-out prompts x seeds against dense videos from the same noise (PSNR, SSIM, relative L2). No sparse attention
here: this isolates what caching costs. Writes ``step_cache.json`` and ``step_cache.png`` under ``--out``.

    python benchmarks/step_cache.py --out benchmarks/results     # GPU: about a minute
    python benchmarks/step_cache.py --smoke                       # CPU check of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vdopt
from vdopt.caching import CacheConfig, calibrate_step_cache
from vdopt.demo import proxy_calibration_prompts
from vdopt.plan import ModelFingerprint, Plan
from vdopt.proxy.data import held_out_prompts
from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import psnr, relative_l2, ssim


def _plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for policy, marker in (("threshold", "o"), ("schedule", "s")):
        rows = sorted((r for r in records if r["policy"] == policy and r.get("psnr")), key=lambda r: r["reused_fraction"])
        ax.plot([r["reused_fraction"] for r in rows], [r["psnr"] for r in rows], marker=marker, label=policy)
        for r in rows:
            ax.annotate(f"{r['error_budget']:g}", (r["reused_fraction"], r["psnr"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("fraction of steps whose blocks 1..L-1 are reused")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(title, fontsize=8)
    ax.legend(title="policy (labels: error budget)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budgets", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--smoke", action="store_true", help="CPU check: 3 steps, 1 prompt, 1 seed, one budget")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.steps, args.prompts, args.seeds, args.budgets = 3, 1, 1, "0.3"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    pipe = load_proxy_pipeline(device=device, dtype=dtype)
    dense = pipe.transformer
    cases = [(p, s) for p in held_out_prompts()[: args.prompts] for s in range(args.seeds)]
    references = {case: pipe(case[0], num_inference_steps=args.steps, seed=case[1])[0].float().cpu() for case in cases}
    records = []
    for policy in ("threshold", "schedule"):
        for budget in (float(b) for b in args.budgets.split(",")):
            opt = vdopt.apply(dense, Plan(ModelFingerprint.of(dense), "any", []))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                cache = calibrate_step_cache(opt, proxy_calibration_prompts(1 if args.smoke else 4), pipe,
                                             CacheConfig(error_budget=budget, policy=policy,
                                                         num_inference_steps=args.steps))
            record = {"policy": policy, "error_budget": budget, "cache": None if cache is None else cache.to_json()}
            if cache is None:
                records.append({**record, "reused_fraction": 0.0})
                continue
            pipe.transformer = opt
            rows = []
            for case in tqdm(cases, desc=f"{policy} {budget:g}", leave=False):
                video = pipe(case[0], num_inference_steps=args.steps, seed=case[1])[0].float().cpu()
                rows.append((psnr(video, references[case]), ssim(video, references[case]),
                             relative_l2(video, references[case])))
            pipe.transformer = dense
            stats = [c.stats for c in opt.step_caches()]
            reused, computed = sum(s.reused for s in stats), sum(s.computed for s in stats)
            record.update(reused_fraction=reused / (reused + computed),
                          psnr=statistics.mean(float(r[0]) for r in rows), ssim=statistics.mean(float(r[1]) for r in rows),
                          rel_l2=statistics.mean(float(r[2]) for r in rows))
            records.append(record)
            print(f"{policy:<9} budget {budget:<5g} reused {record['reused_fraction']:.0%}  PSNR {record['psnr']:.2f}  "
                  f"SSIM {record['ssim']:.3f}", flush=True)
    result = {"benchmark": "step_cache", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "vdopt": vdopt.__version__}, "dtype": str(dtype),
              "steps": args.steps, "n_prompts": args.prompts, "n_seeds": args.seeds,
              "baseline": "dense proxy, same prompt and seed", "records": records}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "step_cache_smoke" if args.smoke else "step_cache"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.smoke:
        _plot(records, out / f"{name}.png", f"proxy, {args.steps} steps, {args.prompts} prompts x {args.seeds} seeds, "
              f"{result['device']}")


if __name__ == "__main__":
    main()
