"""Re-price the committed quality harness's plans under changed site-cost pricing, offline (CPU, no GPU needed).

The harness (``vdopt-bench quality``) saves its calibration and measured site costs (quality_calibration.json) and
each plan's measured attention time (quality.json). This rebuilds the plans that need no GPU timing to rebuild (every
baseline, and the searched plan at each target density) and prices them three ways: with the site costs as the
harness used them, which must reproduce the recorded predictions; with the dynamic selections' fixed costs split into
the launch they share and their own estimation work (:func:`vdopt.quality.split_shared_launch_costs`, with the
launch groups of today's :meth:`Strategy.launch_group`); and as the harness now prices them, that split after the
static candidates of each launch group are priced from one fit (:func:`vdopt.quality.refine_measured_costs`). Each
is compared with the measured times. The time-matched searched plans are left out: rebuilding them needs the GPU's timings;
instead, each baseline's time-matched search is re-run under the current pricing (no measured retries) and its
predicted error compared with the baseline's.

    python benchmarks/reprice_quality.py --out benchmarks/results     # about a minute on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import warnings
from pathlib import Path

from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import (
    _sparse_cutoff,
    baseline_grids,
    baseline_plan,
    load_harness_calibration,
    predicted_attention_seconds,
    refine_measured_costs,
    split_shared_launch_costs,
    with_dense_warmup,
)
from vdopt.search import SearchConfig, SiteCosts, candidate_launch_groups, predicted_quality, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    results = Path(args.results)
    records = json.loads((results / "quality.json").read_text())
    calibration, sites, costs = load_harness_calibration(results / "quality_calibration.json")
    if costs is None:
        raise SystemExit("quality_calibration.json has no measured site costs (the harness ran without a GPU)")
    split = SiteCosts({site: split_shared_launch_costs(table, calibration.candidates)
                       for site, table in costs.per_site.items()},
                      costs.mixing, costs.source + "; dynamic selections split (split_shared_launch_costs)",
                      candidate_launch_groups(calibration.candidates), costs.shared_mixing)
    stats = next(iter(calibration.sites.values()))
    refined = SiteCosts({site: refine_measured_costs(table, calibration.candidates, stats.site.layout, stats.block_size)
                         for site, table in costs.per_site.items()},
                        costs.mixing, costs.source + "; static fit and dynamic split (as the harness now prices)",
                        candidate_launch_groups(calibration.candidates), costs.shared_mixing)
    model = load_proxy_pipeline("cpu").transformer
    grids = baseline_grids(stats.site.layout, stats.block_size)
    baselines = [r for r in records if r["method"] not in ("dense", "searched")]
    densities = sorted({r["target_density"] for r in baselines})

    # t_warmup is not saved; it is the calibration time that reproduces the recorded baseline predictions.
    def baseline_plans(t_warmup: float) -> dict[tuple[str, float], object]:
        return {(m, d): baseline_plan(m, grids, calibration, model, d, t_warmup, "h100")
                for m in sorted({r["method"] for r in baselines}) for d in densities}

    def reproduction_error(t_warmup: float, plans: dict) -> float:
        cutoff = _sparse_cutoff(calibration, t_warmup)
        return max(abs(predicted_attention_seconds(plans[(r["method"], r["target_density"])].plan, calibration, costs,
                                                   cutoff) * 1e3 - r["predicted_attention_ms"])
                   for r in baselines)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        candidates_t = sorted(set(stats.times))
        tried = {t: baseline_plans(t) for t in candidates_t}
        t_warmup = min(candidates_t, key=lambda t: reproduction_error(t, tried[t]))
        plans = tried[t_warmup]
        cutoff = _sparse_cutoff(calibration, t_warmup)
        rows = []
        for r in baselines:
            rows.append((r, plans[(r["method"], r["target_density"])].plan))
        for r in records:
            if r["method"] == "searched" and r.get("matched_to") is None:
                config = SearchConfig(budget="density", density_budget=r["target_density"],
                                      min_dense_warmup=1.0 - cutoff, max_step_ranges=1, progress=False)
                incumbents = [plans[(m, r["target_density"])].plan for m in sorted({b["method"] for b in baselines})]
                plan = with_dense_warmup(search(model, calibration, sites, "h100", config, incumbents, costs), t_warmup)
                rows.append((r, plan))
    # What the time-matched search would now pick (no measured retries: those need the GPU): per baseline, the
    # search at the baseline's predicted time under the harness's current pricing.
    matched = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for r in baselines:
            base = plans[(r["method"], r["target_density"])]
            budget = predicted_attention_seconds(base.plan, calibration, refined, cutoff) * 1e3
            config = SearchConfig(budget="time", time_budget_ms=budget, min_dense_warmup=1.0 - cutoff,
                                  max_step_ranges=1, progress=False)
            plan = with_dense_warmup(search(model, calibration, sites, "h100", config, [base.plan], refined), t_warmup)
            matched.append({
                "baseline": r["method"], "target_density": r["target_density"], "budget_ms": budget,
                "searched_predicted_ms": predicted_attention_seconds(plan, calibration, refined, cutoff) * 1e3,
                "searched_predicted_sq_error": predicted_quality(plan, calibration, cutoff).sq_error,
                "baseline_predicted_sq_error": predicted_quality(base.plan, calibration, cutoff).sq_error,
                "searched_labels": sorted({s.label() for site in plan.sites for rng in site.schedule for s in rng.heads}),
            })
    out = []
    for r, plan in rows:
        old = predicted_attention_seconds(plan, calibration, costs, cutoff) * 1e3
        new = predicted_attention_seconds(plan, calibration, split, cutoff) * 1e3
        now = predicted_attention_seconds(plan, calibration, refined, cutoff) * 1e3
        out.append({"method": r["method"], "target_density": r["target_density"], "measured_ms": r["attention_ms"],
                    "recorded_predicted_ms": r["predicted_attention_ms"], "repriced_as_recorded_ms": old,
                    "repriced_split_ms": new, "repriced_fit_and_split_ms": now, "error_as_recorded": old / r["attention_ms"] - 1.0,
                    "error_split": new / r["attention_ms"] - 1.0,
                    "error_fit_and_split": now / r["attention_ms"] - 1.0})

    def summary(key: str) -> dict[str, float]:
        errors = sorted(abs(o[key]) for o in out)
        return {"median_abs": statistics.median(errors), "worst_abs": errors[-1]}

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": "benchmarks/results/quality.json and quality_calibration.json (their device and date)",
        "device_of_measurements": records[0].get("device"), "date_of_measurements": records[0].get("date"),
        "t_warmup": t_warmup, "reproduction_worst_abs_ms": max(abs(o["repriced_as_recorded_ms"]
                                                                   - o["recorded_predicted_ms"]) for o in out),
        "plans": len(out), "as_recorded": summary("error_as_recorded"), "split": summary("error_split"), "fit_and_split": summary("error_fit_and_split"),
        "records": out,
        "time_matched_offline": matched,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality_repriced.json").write_text(json.dumps(result, indent=1) + "\n")
    for o in out:
        print(f"{o['method']:17s} {o['target_density']:.2f}  measured {o['measured_ms']:6.2f}  as recorded "
              f"{o['repriced_as_recorded_ms']:6.2f} ({o['error_as_recorded']:+.0%})  split {o['repriced_split_ms']:6.2f} "
              f"({o['error_split']:+.0%})  fit+split {o['repriced_fit_and_split_ms']:6.2f} ({o['error_fit_and_split']:+.0%})")
    for m in matched:
        print(f"time-matched offline: {m['baseline']:17s} {m['target_density']:.2f}  budget {m['budget_ms']:6.2f} ms  "
              f"searched {m['searched_predicted_ms']:6.2f} ms  predicted error {m['searched_predicted_sq_error']:.5f} "
              f"vs baseline {m['baseline_predicted_sq_error']:.5f}")
    print(f"t_warmup {t_warmup}; reproduction worst {result['reproduction_worst_abs_ms']:.4f} ms")
    print(f"abs error, as recorded: median {result['as_recorded']['median_abs']:.1%}, worst "
          f"{result['as_recorded']['worst_abs']:.1%}; split: median {result['split']['median_abs']:.1%}, worst "
          f"{result['split']['worst_abs']:.1%}; fit and split: median {result['fit_and_split']['median_abs']:.1%}, worst "
          f"{result['fit_and_split']['worst_abs']:.1%} over {len(out)} plans")


if __name__ == "__main__":
    main()
