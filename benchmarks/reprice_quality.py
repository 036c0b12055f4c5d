"""Re-price the committed quality harness's plans under changed site-cost pricing, offline (CPU, no GPU needed).

The harness (``vdopt-bench quality``) saves its calibration and measured site costs (quality_calibration.json) and
each plan's measured attention time (quality.json), including every plan its time-matched searches tried
(``time_match.tries``: the budget searched at and the time measured). The searches are deterministic, so every one
of those plans is rebuilt here: each baseline, the searched plan at each target density, and each try (searched
again at its recorded budget, its baseline the incumbent). Each is priced two ways and compared with its measured
time: with the site costs as the harness recorded them (which must reproduce the recorded predictions), and with
every dynamic candidate priced at each site's own calibrated density (:func:`vdopt.quality.density_scaled_costs`,
what the harness now does). Then each baseline's time-matched search is re-run under the new pricing (no measured
retries: those need the GPU) and its predicted error compared with the baseline's. Per plan it also counts the
all-sparse sites whose in-order launch the runtime before 2026-12-06 fed in strategy order rather than head order
(``reordered_sites``: a head list and a copy of the output back into place, which no site cost priced) and fits the
measured-minus-predicted time of the tries against that count.

    python benchmarks/reprice_quality.py --out benchmarks/results     # about a minute on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import warnings
from pathlib import Path

import numpy as np

from vdopt.proxy.pipeline import load_proxy_pipeline
from vdopt.quality import (
    _sparse_cutoff,
    density_scaled_costs,
    load_harness_run,
    predicted_attention_seconds,
    rebuild_harness_baselines,
    with_dense_warmup,
)
from vdopt.search import SearchConfig, predicted_quality, search
from vdopt.strategies import Dense


def reordered_sites(plan, t: float = 0.5) -> int:
    """Sites with every head sparse whose in-order heads the earlier runtime launched grouped by strategy (static
    groups, then dynamic ones) in an order other than the heads' own."""
    count = 0
    for site_plan in plan.sites:
        strategies = site_plan.strategies_at(t)
        if any(isinstance(s, Dense) for s in strategies):
            continue
        groups: dict = {}
        for head, strategy in enumerate(strategies):
            groups.setdefault(strategy, []).append(head)
        order = [h for s, m in groups.items() if not s.dynamic for h in m] + [
            h for s, m in groups.items() if s.dynamic for h in m]
        count += order != sorted(order)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    results = Path(args.results)
    try:
        records, calibration, sites, costs = load_harness_run(results)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    model = load_proxy_pipeline("cpu").transformer
    baselines = [r for r in records if r["method"] not in ("dense", "searched")]

    rows: list[tuple[str, float, object]] = []  # (name, measured ms, plan)
    t_warmup, rebuilt = rebuild_harness_baselines(baselines, calibration, costs, model)
    plans = {key: mp.plan for key, mp in rebuilt.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cutoff = _sparse_cutoff(calibration, t_warmup)
        scaled = density_scaled_costs(costs, calibration, cutoff)

        def searched_at(budget: str, value: float, incumbents: list) -> object:
            config = SearchConfig(budget=budget, min_dense_warmup=1.0 - cutoff, max_step_ranges=1, progress=False,
                                  **({"density_budget": value} if budget == "density" else {"time_budget_ms": value}))
            return with_dense_warmup(search(model, calibration, sites, "h100", config, incumbents, costs), t_warmup)

        for r in baselines:
            rows.append((f"{r['method']} {r['target_density']}", r["attention_ms"],
                         plans[(r["method"], r["target_density"])]))
        for r in records:
            if r["method"] == "searched" and r.get("matched_to") is None:
                incumbents = [plans[(m, r["target_density"])] for m in sorted({b["method"] for b in baselines})]
                rows.append((f"searched {r['target_density']}", r["attention_ms"],
                             searched_at("density", r["target_density"], incumbents)))
            elif r["method"] == "searched" and r.get("time_match"):
                base = plans[(r["matched_to"], r["target_density"])]
                for i, attempt in enumerate(r["time_match"]["tries"]):
                    if attempt.get("measured_ms") is not None:
                        rows.append((f"try {i} for {r['matched_to']} {r['target_density']}", attempt["measured_ms"],
                                     searched_at("time", attempt["budget_ms"], [base])))
        # What the time-matched search would now pick (no measured retries: those need the GPU): per baseline, the
        # search at the baseline's predicted time under the new pricing.
        matched = []
        for r in baselines:
            base = plans[(r["method"], r["target_density"])]
            budget = predicted_attention_seconds(base, calibration, scaled, cutoff) * 1e3
            config = SearchConfig(budget="time", time_budget_ms=budget, min_dense_warmup=1.0 - cutoff,
                                  max_step_ranges=1, progress=False)
            plan = with_dense_warmup(search(model, calibration, sites, "h100", config, [base], scaled), t_warmup)
            matched.append({
                "baseline": r["method"], "target_density": r["target_density"], "budget_ms": budget,
                "searched_predicted_ms": predicted_attention_seconds(plan, calibration, scaled, cutoff) * 1e3,
                "searched_predicted_sq_error": predicted_quality(plan, calibration, cutoff).sq_error,
                "baseline_predicted_sq_error": predicted_quality(base, calibration, cutoff).sq_error,
                "searched_labels": sorted({s.label() for site in plan.sites for rng in site.schedule for s in rng.heads}),
            })
    out = []
    for name, measured, plan in rows:
        recorded = predicted_attention_seconds(plan, calibration, costs, cutoff) * 1e3
        rescaled = predicted_attention_seconds(plan, calibration, scaled, cutoff) * 1e3
        out.append({"plan": name, "measured_ms": measured, "reordered_sites": reordered_sites(plan),
                    "predicted_as_recorded_ms": recorded,
                    "predicted_density_scaled_ms": rescaled, "error_as_recorded": recorded / measured - 1.0,
                    "error_density_scaled": rescaled / measured - 1.0})

    def summary(key: str, subset: list[dict]) -> dict[str, float]:
        errors = sorted(abs(o[key]) for o in subset)
        return {"plans": len(errors), "median_abs": statistics.median(errors), "worst_abs": errors[-1],
                "median_signed": statistics.median(o[key] for o in subset)}

    untried = [o for o in out if not o["plan"].startswith("try")]
    tries = [o for o in out if o["plan"].startswith("try")]
    x = np.array([o["reordered_sites"] for o in tries], dtype=float)
    y = np.array([o["measured_ms"] - o["predicted_as_recorded_ms"] for o in tries])
    (intercept, per_site), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": "benchmarks/results/quality.json and quality_calibration.json (their device and date)",
        "device_of_measurements": records[0].get("device"), "date_of_measurements": records[0].get("date"),
        "t_warmup": t_warmup,
        "reproduction_worst_abs_ms": max(abs(predicted_attention_seconds(plans[(r["method"], r["target_density"])],
                                                                         calibration, costs, cutoff) * 1e3
                                             - r["predicted_attention_ms"]) for r in baselines),
        "summary": {pricing: {"baselines_and_density_searched": summary(key, untried),
                              "time_match_tries": summary(key, tries), "all": summary(key, out)}
                    for pricing, key in (("as_recorded", "error_as_recorded"),
                                         ("density_scaled", "error_density_scaled"))},
        "tries_under_prediction_vs_reordered_sites": {
            "fit": "measured - predicted (as recorded) ms = intercept + ms_per_site * reordered_sites, least squares",
            "intercept_ms": float(intercept), "ms_per_site": float(per_site),
            "correlation": float(np.corrcoef(x, y)[0, 1])},
        "records": out,
        "time_matched_offline": matched,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality_repriced.json").write_text(json.dumps(result, indent=1) + "\n")
    for o in out:
        print(f"{o['plan']:36s} measured {o['measured_ms']:6.2f}  as recorded {o['predicted_as_recorded_ms']:6.2f} "
              f"({o['error_as_recorded']:+.0%})  density-scaled {o['predicted_density_scaled_ms']:6.2f} "
              f"({o['error_density_scaled']:+.0%})")
    for m in matched:
        print(f"time-matched offline: {m['baseline']:17s} {m['target_density']:.2f}  budget {m['budget_ms']:6.2f} ms  "
              f"searched {m['searched_predicted_ms']:6.2f} ms  predicted error {m['searched_predicted_sq_error']:.5f} "
              f"vs baseline {m['baseline_predicted_sq_error']:.5f}")
    fit = result["tries_under_prediction_vs_reordered_sites"]
    print(f"tries: measured - predicted = {fit['intercept_ms']:.3f} + {fit['ms_per_site']:.3f} ms x reordered sites "
          f"(correlation {fit['correlation']:.2f})")
    print(f"t_warmup {t_warmup}; reproduction worst {result['reproduction_worst_abs_ms']:.4f} ms")
    for pricing, parts in result["summary"].items():
        print(pricing + ": " + "; ".join(f"{part} median {s['median_abs']:.1%} (signed {s['median_signed']:+.1%}), "
                                         f"worst {s['worst_abs']:.1%} over {s['plans']}" for part, s in parts.items()))


if __name__ == "__main__":
    main()
