"""Quality metrics against hand-checkable values and an independent SSIM; the harness end to end on a tiny proxy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vdopt.quality import (
    QualityConfig,
    density_for_recall,
    fixed_plan,
    plan_label,
    psnr,
    rank_correlation,
    relative_l2,
    run_quality,
    ssim,
    with_dense_warmup,
    write_results,
)
from vdopt.sites import AttentionSite, TokenLayout
from vdopt.strategies import Dense, SpatialWindow


def _video(seed: int, shape: tuple[int, ...] = (2, 3, 20, 24, 3), low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def test_identical_videos() -> None:
    video = _video(0)
    assert torch.isinf(psnr(video, video)).all()
    assert torch.allclose(ssim(video, video), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.equal(relative_l2(video, video), torch.zeros(2, dtype=torch.float64))


def test_psnr_and_relative_l2_hand_values() -> None:
    reference = _video(1, low=0.2, high=0.8)
    # A constant offset of 0.1: MSE 0.01 -> exactly 20 dB; relative L2 = 0.1 * sqrt(n) / ||reference||.
    shifted = reference + 0.1
    assert torch.allclose(psnr(shifted, reference), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)
    expected = 0.1 * math.sqrt(reference[0].numel()) / reference[0].norm()
    assert float(relative_l2(shifted[0], reference[0])) == pytest.approx(float(expected), rel=1e-12)
    assert float(relative_l2(1.1 * reference, reference)[1]) == pytest.approx(0.1, rel=1e-12)


def test_psnr_of_known_noise_level() -> None:
    reference = _video(2, shape=(1, 4, 32, 32, 3), low=0.2, high=0.8)
    generator = torch.Generator().manual_seed(3)
    noisy = reference + 0.05 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    # MSE = 0.05**2 -> 26.02 dB; with 12k pixels the MSE's relative spread is ~1.3%, i.e. ~0.06 dB: allow 0.2 dB.
    assert float(psnr(noisy, reference)[0]) == pytest.approx(20 * math.log10(1 / 0.05), abs=0.2)


def _ssim_by_loops(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two [H, W, C] images from its definition: weighted local statistics at every valid position."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    height, width, channels = x.shape
    for c in range(channels):
        for i in range(height - size + 1):
            for j in range(width - size + 1):
                px, py = x[i:i + size, j:j + size, c], y[i:i + size, j:j + size, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_definition_on_random_frames() -> None:
    reference = _video(4, shape=(2, 2, 16, 18, 3))
    generator = torch.Generator().manual_seed(5)
    video = (reference + 0.15 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(video, reference)
    for b in range(2):
        frames = [_ssim_by_loops(video[b, f].numpy(), reference[b, f].numpy()) for f in range(2)]
        # float64 throughout; the two differ only in summation order.
        assert float(ours[b]) == pytest.approx(float(np.mean(frames)), abs=1e-10)
    assert 0.0 < float(ours.max()) < 1.0
    assert torch.allclose(ssim(reference, video), ours, atol=1e-12)  # symmetric


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        psnr(_video(0), _video(0, shape=(2, 3, 20, 24, 1)))


def test_density_for_recall_concentrated_and_uniform() -> None:
    layout = TokenLayout(2, 8, 8)  # 128 video tokens, 8 key blocks of 16
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 128, 16, generator=generator)
    k = torch.zeros(1, 2, 128, 16)
    # Head 0: every query's mass sits on key block 3 (q.k = 40 there, 0 elsewhere).
    k[:, 0, 48:64] = 40.0 * q[:, 0].mean(1, keepdim=True) / q[:, 0].mean(1).norm() ** 2 * 16**0.5
    q[:, 0] = q[:, 0].mean(1, keepdim=True)
    # Head 1: q = 0, so attention is uniform over all 128 keys.
    q[:, 1] = 0.0
    block, token = density_for_recall(q, k, layout, None, None, recall=0.95, block_size=16, query_blocks=4)
    assert float(block[0]) == pytest.approx(1 / 8)
    assert float(token[0]) <= 16 / 128
    assert float(block[1]) == pytest.approx(8 / 8)  # 7 blocks hold 87.5% < 95%
    assert float(token[1]) == pytest.approx(math.ceil(0.95 * 128) / 128)


def test_dense_warmup_schedule() -> None:
    from conftest import tiny_wan

    model, _ = tiny_wan()
    site = AttentionSite("blocks.0.attn1#0", 0, "self", 2, 16, 96, 96, "float32", TokenLayout(4, 4, 6))
    plan = fixed_plan(model, [site], {site.name: [SpatialWindow(0)] * 2}, 16, 0.8, "h100", "test")
    schedule = plan.sites[0]
    assert schedule.strategies_at(0.9) == [Dense(), Dense()]
    assert schedule.strategies_at(0.8) == [SpatialWindow(0)] * 2
    assert schedule.strategies_at(0.01) == [SpatialWindow(0)] * 2
    no_warmup = fixed_plan(model, [site], {site.name: [SpatialWindow(0)] * 2}, 16, 1.0, "h100", "test")
    assert no_warmup.sites[0].strategies_at(1.0) == [SpatialWindow(0)] * 2
    assert with_dense_warmup(no_warmup, 0.5).sites[0].strategies_at(0.6) == [Dense(), Dense()]
    assert with_dense_warmup(no_warmup, 0.5).sites[0].strategies_at(0.5) == [SpatialWindow(0)] * 2


def test_runtime_key_ignores_predictions_not_strategies() -> None:
    """Plans that run alike share a key (the harness runs them once); other strategies, warm-up or labels differ."""
    from conftest import tiny_wan
    from vdopt.quality import _runtime_key

    model, _ = tiny_wan()
    site = AttentionSite("blocks.0.attn1#0", 0, "self", 2, 16, 96, 96, "float32", TokenLayout(4, 4, 6))
    first = fixed_plan(model, [site], {site.name: [SpatialWindow(0)] * 2}, 16, 0.8, "h100", "baseline")
    second = fixed_plan(model, [site], {site.name: [SpatialWindow(0)] * 2}, 16, 0.8, "h100", "searched")
    second.predictions = {"attention_rel_error": 0.5}
    second.sites[0].schedule[-1].predicted = {"density": 0.3}
    assert _runtime_key(first) == _runtime_key(second)
    other = fixed_plan(model, [site], {site.name: [SpatialWindow(1), SpatialWindow(0)]}, 16, 0.8, "h100", "b")
    later = fixed_plan(model, [site], {site.name: [SpatialWindow(0)] * 2}, 16, 0.6, "h100", "b")
    assert len({_runtime_key(p) for p in (first, other, later)}) == 3


def _strict_json(text: str) -> object:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_harness_end_to_end_on_tiny_untrained_proxy(tmp_path) -> None:
    from vdopt.quality import _load_pipe

    pipe, _ = _load_pipe("tiny", "cpu", torch.float32, None)
    config = QualityConfig(prompts=1, seeds=1, steps=2, densities=(0.3,), warmup_fraction=0.0, calib_prompts=1,
                           calib_steps_per_input=1, calib_query_rows=32, top_p_grid=(0.6, 0.9), timing_repeats=0,
                           time_attention=True)
    original = pipe.transformer
    result = run_quality(pipe, config, proxy="tiny", progress=False)
    assert pipe.transformer is original
    paths = write_results(result, tmp_path)
    records = _strict_json(paths["records"].read_text())
    methods = [r["method"] for r in records]
    baselines = [m for m in config.methods if m != "searched"]
    # One searched plan at the target and one at each baseline's predicted density (matched), then the baselines.
    assert methods == ["dense", "searched", *["searched"] * len(baselines), *baselines]
    assert [r["matched_to"] for r in records[1:2 + len(baselines)]] == [None, *baselines]
    for record in records[1:]:
        for key in ("method", "density", "psnr", "ssim", "rel_l2", "n_prompts", "n_seeds", "target_density",
                    "device", "date", "versions"):
            assert key in record, key
        assert record["n_prompts"] == 1 and record["n_seeds"] == 1 and record["target_density"] == 0.3
        assert 0.0 < record["density"] <= 1.0
        assert record["density"] == pytest.approx(record["predicted_density"], abs=0.15)
        assert -1.0 <= record["ssim"] <= 1.0 and record["rel_l2"] >= 0.0
        assert len(record["per_video"]) == 1
        assert record["predicted_sq_error"] >= 0.0
    for record in records[2:2 + len(baselines)]:  # by construction: no more predicted error at the same time
        baseline = next(r for r in records if r["method"] == record["matched_to"])
        assert record["matched_on"] == "time"
        assert record["predicted_attention_ms"] <= baseline["predicted_attention_ms"] * (1 + 1e-6)
        tries = record["time_match"]["tries"]
        assert tries[0]["budget_ms"] == pytest.approx(baseline["predicted_attention_ms"], rel=1e-9)
        assert record["time_match"]["no_slower_than_baseline"]
        assert record["time_match"]["measured_ms"] <= record["time_match"]["baseline_measured_ms"]
        if record["time_match"]["kept_baseline_plan"]:  # nothing searched measured as fast: the baseline's plan
            assert record["time_match"]["measured_ms"] == record["time_match"]["baseline_measured_ms"]
            assert record["predicted_sq_error"] == pytest.approx(baseline["predicted_sq_error"])
            continue
        every_try = tries + [t for alt in record["time_match"].get("alternative_tries", []) for t in alt["tries"]]
        assert record["time_match"]["measured_ms"] in [t["measured_ms"] for t in every_try]
        if record["time_match"].get("chosen_search", "all candidates") != "all candidates":
            continue  # a search restricted to the baseline's pattern set: its bounds are its own
        if len(tries) == 1:  # searched at the baseline's own predicted time, not re-searched tighter
            assert record["predicted_sq_error"] <= baseline["predicted_sq_error"] + 1e-12
        # Two head groups per site (the default): the exact DP, whose bound sits below the plan's predicted error.
        assert record["search"]["solver"] in ("exact DP", "lagrangian")
        assert 0.0 <= record["search"]["optimality_gap"] < 0.05
        assert record["search"]["lower_bound_sq_error"] <= record["predicted_sq_error"] + 1e-12
    assert all(r["attention_ms"] > 0.0 for r in records) and "attention_timing" in records[0]
    # A plan that runs like an earlier one was not run again: it carries that record's measurements exactly.
    for record in records[1:]:
        if record["same_plan_as"]:
            first = next(r for r in records[1:] if not r["same_plan_as"] and plan_label(
                r["method"], r["target_density"], r["matched_to"], r["matched_on"]) == record["same_plan_as"])
            assert (record["psnr"], record["attention_ms"], record["density"]) == (
                first["psnr"], first["attention_ms"], first["density"])
    assert all(r["attention_ms"] == min(r["attention_ms_passes"]) and len(r["attention_ms_passes"]) == 2
               for r in records)
    summary = _strict_json(paths["comparison"].read_text())
    assert [p["baseline"] for p in summary["pareto"]] == baselines
    assert summary["attention_time_prediction"]["records"] == len(records) - 1
    costs = summary["site_costs"]["per_candidate_ms"]
    assert "dense" in costs and all(c["fixed"] >= 0 and c["per_head"] >= 0 for c in costs.values())
    assert summary["site_costs"]["shared_mixing_ms"] >= 0.0 and summary["site_costs"]["mixing_ms"] >= 0.0
    # Static candidates of one token order share a launch in the runtime, and the measured costs say so.
    groups = result.site_costs.launch_groups
    assert groups["dense"] == "dense" and any(g == "block:original" for g in groups.values())
    # Dynamic selections that join the in-order launch carry at most that launch's fixed cost (the static
    # candidates' median); the rest of what they measured is their own.
    import statistics

    for table in result.site_costs.per_site.values():
        static = [table[label].fixed for label, s in result.calibration.candidates.items()
                  if not s.dynamic and s.launch_group() == "block:original" and label in table]
        for label, s in result.calibration.candidates.items():
            if s.dynamic and s.launch_group() == "block:original" and label in table and static:
                assert table[label].own >= 0.0 and table[label].fixed <= statistics.median(static) + 1e-12
    assert [pair["baseline"] for pair in summary["pairs"]] == baselines
    assert summary["pairs_compared"] == len(baselines) and summary["records_ranked"] == len(records) - 1
    report = _strict_json(paths["recall"].read_text())
    assert len(report["layers"]) == 2
    assert all(0.0 < v <= 1.0 for layer in report["layers"] for v in layer["block_density_per_head"])
    assert [entry["t"] for entry in report["by_time"]] == report["times"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The calibration and site costs come back from JSON equal, and a search on them gives the same plan.
    from vdopt.quality import load_harness_calibration
    from vdopt.search import SearchConfig, search

    calibration, sites, costs = load_harness_calibration(paths["calibration"])
    assert calibration.candidates == result.calibration.candidates and sites == result.sites
    assert calibration.sites == result.calibration.sites and costs == result.site_costs
    budget = next(r for r in records if r.get("matched_on") == "time")["predicted_attention_ms"]
    config = SearchConfig(budget="time", time_budget_ms=budget, min_dense_warmup=0.0, max_step_ranges=1,
                          progress=False)
    again, first = (search(pipe.transformer, c, sites, "h100", config, site_costs=k).to_json()
                    for c, k in ((calibration, costs), (result.calibration, result.site_costs)))
    assert again["sites"] == first["sites"] and again["predictions"] == first["predictions"]


def test_rank_correlation_hand_values() -> None:
    # Spearman without ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 24.
    assert rank_correlation([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5, abs=1e-12)
    # A tie shares the mean rank: ranks (0.5, 0.5, 2, 3) vs (0, 1, 2, 3): 4.5 / sqrt(4.5 * 5).
    assert rank_correlation([1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert rank_correlation([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(-1.0, abs=1e-12)
    assert rank_correlation([1.0, 2.0], [2.0, 1.0]) is None and rank_correlation([1.0] * 3, [1.0, 2.0, 3.0]) is None


def test_pareto_comparison_staircase() -> None:
    from vdopt.quality import pareto_comparison

    def rec(method: str, ms: float, db: float) -> dict:
        return {"method": method, "target_density": 0.2, "attention_ms": ms, "psnr": db}

    records = [{"method": "dense", "target_density": 1.0, "attention_ms": 10.0, "psnr": None},
               rec("searched", 2.0, 20.0), rec("searched", 3.0, 24.0),
               rec("a", 2.5, 21.0),   # searched at 2.0 ms has 20 dB (loss at equal time); 24 dB needs 3.0 ms (loss)
               rec("b", 3.0, 23.0),   # 24 dB at 3.0 ms: win at equal time; but 23 dB also needs 3.0 ms: not faster
               rec("c", 4.0, 19.0),   # both wins
               rec("d", 1.0, 10.0),   # no searched plan is that fast; the fastest as good takes 2.0 ms
               {"method": "e", "target_density": 0.2, "attention_ms": None, "psnr": 30.0}]  # untimed: left out
    out = {p["baseline"]: p for p in pareto_comparison(records)}
    assert sorted(out) == ["a", "b", "c", "d"]
    assert (out["a"]["searched_psnr_at_equal_time"], out["a"]["searched_attention_ms_at_equal_psnr"]) == (20.0, 3.0)
    assert not out["a"]["wins_at_equal_time"] and not out["a"]["wins_at_equal_psnr"]
    assert out["b"]["wins_at_equal_time"] and not out["b"]["wins_at_equal_psnr"]
    assert out["c"]["wins_at_equal_time"] and out["c"]["wins_at_equal_psnr"]
    assert out["c"]["searched_attention_ms_at_equal_psnr"] == 2.0
    assert out["d"]["searched_psnr_at_equal_time"] is None and not out["d"]["wins_at_equal_time"]
    assert out["d"]["searched_attention_ms_at_equal_psnr"] == 2.0 and not out["d"]["wins_at_equal_psnr"]
    # b at equal PSNR: the searched plan needs b's own 3.0 ms: a tie, not a win; nothing else ties.
    assert [(k, p["tie_at_equal_time"], p["tie_at_equal_psnr"]) for k, p in sorted(out.items())] == [
        ("a", False, False), ("b", False, True), ("c", False, False), ("d", False, False)]
    tied = pareto_comparison([*records[:3], rec("same", 3.0, 24.0)])
    assert tied[0]["tie_at_equal_time"] and tied[0]["tie_at_equal_psnr"] and not tied[0]["wins_at_equal_time"]


def test_attention_milliseconds_runs_each_site_as_planned() -> None:
    from vdopt.quality import _load_pipe, attention_milliseconds, record_attention_inputs

    pipe, _ = _load_pipe("tiny", "cpu", torch.float32, None)
    model = pipe.transformer
    cfg = model.config
    torch.manual_seed(3)
    inputs = {"hidden_states": torch.randn(2, cfg.in_channels, 3, 8, 8),
              "timestep": torch.tensor([500.0, 500.0]),
              "encoder_hidden_states": torch.randn(2, 5, cfg.text_dim), "return_dict": False}
    sites, recorded = record_attention_inputs(model, inputs)
    assert sites and all(s.kind == "self" for s in sites)
    for site in sites:
        q, k, v, _, _ = recorded[site.name]
        assert q.shape[1] == site.heads and q.shape[-1] == site.head_dim and q.std() > 0
    plan = fixed_plan(model, sites, {s.name: [SpatialWindow(0)] * s.heads for s in sites}, 16, 1.0, "h100", "t")
    sparse = attention_milliseconds(plan, sites, recorded, t=0.5, warmup=1, repeats=2)
    dense = attention_milliseconds(None, sites, recorded, t=0.5, warmup=1, repeats=2)
    assert set(sparse["per_site_ms"]) == set(dense["per_site_ms"]) == {s.name for s in sites}
    assert sparse["total_ms"] > 0 and dense["total_ms"] > 0

    # What is timed is what the runtime computes: the lowered site (or eager k-means) equals the eager PlannedAttention.
    from vdopt.passes.lower_attention import LoweredAttention
    from vdopt.passes.sparsify_attention import DenoisingClock, PlannedAttention

    from vdopt.plan import SitePlan, StepRange
    from vdopt.quality import site_runner
    from vdopt.strategies import SemanticKMeans

    site = sites[0]
    q, k, v, mask, scale = recorded[site.name]
    from vdopt.strategies import TemporalWindow

    for strategies, kind in (([SpatialWindow(0), Dense()] * (site.heads // 2), LoweredAttention),
                             # every head sparse, permuted heads launched after in-order ones: a head reorder
                             ([SpatialWindow(0), TemporalWindow(1)] * (site.heads // 2), LoweredAttention),
                             ([SemanticKMeans(4, 4, 0.9)] * site.heads, PlannedAttention)):
        runner = site_runner(site, strategies, 16, q)
        assert isinstance(runner, kind)
        eager = PlannedAttention(site, SitePlan(site.name, site.heads, 16, [StepRange(1.0, 0.0, strategies)]),
                                 DenoisingClock())
        torch.testing.assert_close(runner(q, k, v, attn_mask=mask, scale=scale),
                                   eager(q, k, v, attn_mask=mask, scale=scale), rtol=1e-4, atol=1e-5)
    assert site_runner(site, [Dense()] * site.heads, 16, q) is torch.nn.functional.scaled_dot_product_attention


def test_load_records_restores_infinite_psnr(tmp_path) -> None:
    import math

    from vdopt.quality import QualityResult, load_records, pareto_comparison

    run = {"n_prompts": 1, "n_seeds": 1, "steps": 4, "warmup_steps": 1, "device": "cpu"}
    records = [{"method": "dense", "target_density": 1.0, "density": 1.0, "psnr": math.inf, "ssim": 1.0,
                "rel_l2": 0.0, "attention_ms": 10.0, **run},
               {"method": "searched", "target_density": 0.2, "density": 1.0, "psnr": math.inf, "ssim": 1.0,
                "rel_l2": 0.0, "attention_ms": 9.0, **run},
               {"method": "a", "target_density": 0.2, "density": 0.2, "psnr": 20.0, "ssim": 0.8, "rel_l2": 0.1,
                "attention_ms": 12.0, **run}]
    write_results(QualityResult(records, {"layers": []}), tmp_path)
    text = (tmp_path / "quality.json").read_text()
    assert "Infinity" not in text and _strict_json(text)[1]["psnr"] is None
    loaded = load_records(tmp_path / "quality.json")
    assert loaded[1]["psnr"] == math.inf and loaded[2]["psnr"] == 20.0
    (entry,) = pareto_comparison(loaded)
    assert entry["wins_at_equal_time"] and entry["searched_at_equal_time_equals_dense"]


def test_time_match_searches_again_while_the_plan_measures_slower_than_its_baseline() -> None:
    from vdopt.quality import _match_measured_time

    # Stand-ins: a "plan" is the budget it was searched at; it measures 1.3x its budget (the prediction errs), the
    # baseline measures 10 ms.
    def measure(plan):
        return 10.0 if plan == "baseline" else 1.3 * plan

    searched_at = []

    def search_at(ms):
        searched_at.append(ms)
        return ms

    plan, record = _match_measured_time(10.0, "baseline", 10.0, measure, 3, search_at)
    # 13 ms > 10: budget x 10/13; that plan measures exactly 10 ms and fits. The two searches left bisect upward
    # between 10/1.3 (fits) and 10 (too slow); both plans measure slower, so the one that fit is kept.
    fit = 10.0 / 1.3
    up = (fit * 10.0) ** 0.5
    assert searched_at == [pytest.approx(fit), pytest.approx(up), pytest.approx((fit * up) ** 0.5)]
    assert plan == pytest.approx(fit)
    assert record["no_slower_than_baseline"] and record["measured_ms"] == pytest.approx(10.0)
    assert [t["budget_ms"] for t in record["tries"]][:2] == [10.0, pytest.approx(fit)]

    # Where a plan between them fits too, the one searched at the largest budget that fit is kept: the time the
    # baseline takes is used, not given away by a scaled budget that overshot.
    def kinked(plan):
        return 10.0 if plan == "baseline" else (1.3 if plan > 8.5 else 1.1) * plan

    searched_at.clear()
    plan, record = _match_measured_time(10.0, "baseline", 10.0, kinked, 3, search_at)
    assert searched_at[-1] == pytest.approx((fit * up) ** 0.5) and plan == pytest.approx(searched_at[-1])
    assert kinked(plan) <= 10.0 and plan > fit and not record["kept_baseline_plan"]
    # Already within TIME_MATCH_GAP of the baseline: no search.
    searched_at.clear()
    plan, record = _match_measured_time(7.6, "baseline", 7.6, measure, 3, search_at)
    assert plan == 7.6 and searched_at == [] and len(record["tries"]) == 1
    # Faster than the baseline by more: one search at the budget scaled up by the measured ratio; it fits, so the
    # larger budget is kept.
    plan, record = _match_measured_time(7.0, "baseline", 7.0, measure, 3, search_at)
    assert searched_at == [pytest.approx(7.0 * 10.0 / 9.1)] and plan == pytest.approx(searched_at[0])
    assert measure(plan) <= 10.0 and len(record["tries"]) == 2 and not record["kept_baseline_plan"]
    searched_at.clear()
    plan, record = _match_measured_time(7.0, "baseline", 7.0, lambda p: 10.0 if p == "baseline" else 9.1 * p / 7.0
                                        if p == 7.0 else 11.0, 3, search_at)
    # The scaled-up plan measured too slow: the retries left bisect between 7.0 (fits) and it, and none fits.
    assert plan == 7.0 and searched_at[1] == pytest.approx((7.0 * searched_at[0]) ** 0.5)
    assert len(searched_at) == 3 and [t["measured_ms"] for t in record["tries"][1:]] == [11.0] * 3

    # A plan that stays slower whatever the budget: after the retries, the baseline's own plan, flagged.
    def never(plan):
        return 10.0 if plan == "baseline" else 20.0 + plan

    plan, record = _match_measured_time(10.0, "baseline", 10.0, never, 2, search_at)
    assert plan == "baseline" and record["kept_baseline_plan"] and len(record["tries"]) == 3
    assert record["measured_ms"] == 10.0
    assert record["fastest_searched_ms"] == min(t["measured_ms"] for t in record["tries"])

    # No plan fits the smaller budget: the search's error is recorded and the try loop ends.
    def fails(ms):
        raise RuntimeError("no plan meets the time budget")

    plan, record = _match_measured_time(10.0, "baseline", 10.0, measure, 3, fails)
    assert plan == "baseline" and record["kept_baseline_plan"] and "error" in record["tries"][-1]
    assert len(record["tries"]) == 4  # the first plan, then three budgets no plan fits

    # The proxy's Sparse-vDiT d0.1 case (H100, 2026-12-06): the cost model over-predicts the baseline and
    # under-predicts the searched plan, so the scaled budget falls below the fastest plan (here 3.2 ms). The
    # infeasible budget is bisected toward the too-slow one, and a plan between them is measured and kept.
    def fastest_3_2(ms):
        if ms < 3.2:
            raise RuntimeError("no plan meets the time budget")
        return ms

    def skewed(plan):
        return 3.5 if plan == "baseline" else 1.6 * plan - 2.0

    plan, record = _match_measured_time(5.5, "baseline", 5.5, skewed, 3, fastest_3_2)
    budgets = [t["budget_ms"] for t in record["tries"]]
    assert budgets[0] == 5.5 and "error" in record["tries"][1] and budgets[1] < 3.2
    assert budgets[2] == pytest.approx((budgets[1] * 5.5) ** 0.5)  # bisected between infeasible and too slow
    assert record["no_slower_than_baseline"] and skewed(plan) <= 3.5 and plan >= 3.2


def test_time_match_steps_at_least_the_gap_below_a_plan_slower_by_noise() -> None:
    from vdopt.quality import TIME_MATCH_GAP, _match_measured_time

    searched_at = []

    def search_at(ms):
        searched_at.append(ms)
        return ms

    # 0.2% slower than the baseline: the next budget is TIME_MATCH_GAP below, not 0.2% below.
    plan, record = _match_measured_time(10.0, "baseline", 10.0, lambda p: 10.0 if p == "baseline" else 1.002 * p, 3,
                                        search_at)
    assert searched_at[0] == pytest.approx(10.0 / (1.0 + TIME_MATCH_GAP))
    assert plan == searched_at[0] and not record["kept_baseline_plan"]


def test_time_match_keeps_the_best_measured_plan_on_calibration_videos() -> None:
    from vdopt.quality import _match_measured_time

    def measure(plan):  # the plans searched at 10/1.3 and at the second bisection point both fit
        return 10.0 if plan == "baseline" else (1.3 if plan > 8.5 else 1.1) * plan

    def search_at(ms):
        return ms

    # Every plan that fits and the baseline are measured; the larger budget that fit is not kept when a smaller
    # one measures a higher calibration PSNR.
    psnr_of = {"baseline": 20.0}
    measured = []

    def measure_psnr(plan):
        measured.append(plan)
        if plan in psnr_of:
            return psnr_of[plan]
        return 25.0 if plan < 7.8 else 22.0

    plan, record = _match_measured_time(10.0, "baseline", 10.0, measure, 3, search_at, measure_psnr)
    fits = [t for t in record["tries"] if t["measured_ms"] is not None and t["measured_ms"] <= 10.0]
    assert len(fits) == 2 and "baseline" in measured and len(measured) == 3
    assert plan == pytest.approx(10.0 / 1.3) and record["chosen_by"] == "calibration_psnr"
    assert record["measured_ms"] == pytest.approx(1.1 * 10.0 / 1.3) and not record["kept_baseline_plan"]
    assert all("calibration_psnr" in t for t in fits) and record["baseline_calibration_psnr"] == 20.0

    # The baseline's own plan measures best: it is kept, as a tie.
    psnr_of["baseline"] = 30.0
    plan, record = _match_measured_time(10.0, "baseline", 10.0, measure, 3, search_at, measure_psnr)
    assert plan == "baseline" and record["kept_baseline_plan"] and record["measured_ms"] == 10.0

    # Nothing fits: the baseline's plan, measured only as the comparison.
    plan, record = _match_measured_time(10.0, "baseline", 10.0, lambda p: 10.0 if p == "baseline" else 30.0, 2,
                                        search_at, measure_psnr)
    assert plan == "baseline" and record["kept_baseline_plan"]


def test_time_match_alternative_searches_compete_on_calibration_videos() -> None:
    from vdopt.quality import _match_measured_time

    # Plans are (search, budget) pairs; both searches' plans measure 1.1x their budget, the baseline 10 ms.
    def measure(plan):
        return 10.0 if plan == "baseline" else 1.1 * plan[1]

    def search_at(name):
        return lambda ms: (name, ms)

    def measure_psnr(plan):
        if plan == "baseline":
            return 20.0
        return {"all": 19.0, "family": 21.0}[plan[0]] + plan[1] / 100.0

    first_all, first_family = ("all", 10.0), ("family", 10.0)
    plan, record = _match_measured_time(first_all, "baseline", 10.0, measure, 3, search_at("all"), measure_psnr,
                                        [("family", first_family, 10.0, search_at("family"))])
    # Each search is time-matched on its own (10 ms measures 11: one step down to 10/1.1, which fits, and so on);
    # the family's fitting plan at the largest budget measures best.
    assert plan[0] == "family" and record["chosen_search"] == "family" and not record["kept_baseline_plan"]
    assert measure(plan) <= 10.0
    (alt,) = record["alternative_tries"]
    assert alt["search"] == "family" and alt["tries"][0]["budget_ms"] == 10.0
    assert all("calibration_psnr" in t for t in alt["tries"] if t["measured_ms"] <= 10.0)
    assert all("calibration_psnr" in t for t in record["tries"] if t["measured_ms"] <= 10.0)
    fits = [t for t in alt["tries"] if t["measured_ms"] <= 10.0]
    assert plan[1] == max(t["budget_ms"] for t in fits)

    # When the baseline measures best, it is kept (a tie) whatever the alternatives found.
    plan, record = _match_measured_time(first_all, "baseline", 10.0, measure, 3, search_at("all"),
                                        lambda p: 30.0 if p == "baseline" else measure_psnr(p),
                                        [("family", first_family, 10.0, search_at("family"))])
    assert plan == "baseline" and record["kept_baseline_plan"] and "chosen_search" not in record


def test_time_match_keeps_a_searched_plan_only_for_a_gain_beyond_one_standard_error() -> None:
    from vdopt.quality import _match_measured_time, _paired_gain

    assert _paired_gain([21.0, 23.0], [20.0, 20.0]) == (pytest.approx(2.0), pytest.approx(1.0))
    with pytest.raises(ValueError, match="cannot be paired"):
        _paired_gain([1.0], [1.0, 2.0])

    def measure(plan):  # every searched plan fits at once
        return 10.0 if plan == "baseline" else 0.99 * plan

    baseline = [20.0, 22.0, 18.0, 21.0]
    # +0.5 dB on average, but -3 to +4 dB per video: within the spread, so the baseline's plan is kept (a tie).
    noisy = [24.0, 19.0, 19.0, 21.0]
    plan, record = _match_measured_time(10.0, "baseline", 10.0, measure, 0, lambda ms: ms,
                                        lambda p: baseline if p == "baseline" else noisy)
    assert plan == "baseline" and record["kept_baseline_plan"]
    (entry,) = record["tries"]
    assert entry["calibration_psnr_gain"] == pytest.approx(0.5) and entry["calibration_psnr_gain_stderr"] > 0.5
    assert record["baseline_calibration_psnr"] == pytest.approx(20.25)
    # +0.5 dB on every video: kept.
    steady = [x + 0.5 for x in baseline]
    plan, record = _match_measured_time(10.0, "baseline", 10.0, measure, 0, lambda ms: ms,
                                        lambda p: baseline if p == "baseline" else steady)
    assert plan == 10.0 and not record["kept_baseline_plan"]
    assert record["tries"][0]["calibration_psnr_gain_stderr"] == pytest.approx(0.0, abs=1e-9)


def test_calibration_candidates_include_a_point_below_the_sparsest_target() -> None:
    from vdopt.quality import baseline_grids, calibration_candidates, static_density

    layout, block = TokenLayout(frames=8, rows=24, cols=24), 64
    grids = baseline_grids(layout, block)
    labels = {s.label() for s in calibration_candidates(grids, layout, block, (0.1, 0.2, 0.3))}
    diagonals = [s for s in grids["sparse_vdit"][0] if s.label() in labels]
    densities = sorted(static_density(s, layout, block) for s in diagonals)
    # The diagonal nearest 0.1 (Sparse-vDiT's own point there) and a sparser one nearest 0.05.
    assert densities[0] < 0.075 < densities[1]
    assert abs(densities[1] - 0.1) < 0.02


def test_static_launch_costs_fit_and_dynamic_split() -> None:
    """Static candidates of one launch group get the group's median fixed cost and a per-head line in their exact
    density; a dynamic selection that joins that launch keeps at most the launch's fixed cost, the rest is its own."""
    from vdopt.quality import fit_static_launch_costs, split_shared_launch_costs, static_density
    from vdopt.search import LaunchCost
    from vdopt.sites import TokenLayout
    from vdopt.strategies import Dense, Diagonal, PooledTopP, SpatialWindow, TemporalWindow

    layout, block = TokenLayout(4, 8, 8), 32
    statics = {"s0": SpatialWindow(0), "s1": SpatialWindow(1), "d1": Diagonal(1.0), "d2": Diagonal(2.0)}
    candidates = {**statics, "t": TemporalWindow(1), "p": PooledTopP(0.8)}
    density = {label: static_density(s, layout, block) for label, s in statics.items()}
    true_per_head = {label: 0.1 + 2.0 * d for label, d in density.items()}
    noise = {"s0": 0.03, "s1": -0.02, "d1": 0.01, "d2": -0.02}
    table = {"dense": LaunchCost(0.05, 3.0), "t": LaunchCost(0.7, 0.4), "p": LaunchCost(0.9, 0.5),
             **{label: LaunchCost(f, true_per_head[label] + noise[label])
                for label, f in zip(statics, (0.2, 0.4, 0.3, 0.9))}}
    fitted = fit_static_launch_costs(table, candidates, layout, block)
    assert {fitted[label].fixed for label in statics} == {0.35}  # median of 0.2, 0.4, 0.3, 0.9
    d = [density[label] for label in statics]
    slope, intercept = np.polyfit(d, [table[label].per_head for label in statics], 1)
    for label in statics:
        assert fitted[label].per_head == pytest.approx(intercept + slope * density[label])
    assert fitted["t"] == table["t"] and fitted["p"] == table["p"] and fitted["dense"] == table["dense"]
    split = split_shared_launch_costs(fitted, candidates)
    assert split["p"] == LaunchCost(0.35, 0.5, pytest.approx(0.55))  # joins the in-order launch, 0.55 its own
    assert split["t"] == table["t"] and split["dense"] == table["dense"]  # no static partner / not dynamic
    assert split_shared_launch_costs(split, candidates) == split  # already split: kept
    assert Dense().launch_group() == "dense"


def test_dynamic_costs_are_priced_at_each_sites_own_density() -> None:
    """Measured costs time one site per shape class; a dynamic selection keeps another share of blocks at every
    site, so its family's per-head cost (a line in density, fitted at the timed site) is read at each site's own
    calibrated density after the warm-up. Static candidates, fixed and own costs are kept."""
    from vdopt.calibrate import CalibrationResult, SiteStats
    from vdopt.quality import density_scaled_costs
    from vdopt.search import LaunchCost, SiteCosts
    from vdopt.strategies import PooledTopP, SemanticKMeans

    layout = TokenLayout(4, 8, 8)
    candidates = {"p5": PooledTopP(0.5), "p9": PooledTopP(0.9), "s0": SpatialWindow(0),
                  "k5": SemanticKMeans(4, 4, 0.5, iterations=1), "k9": SemanticKMeans(4, 4, 0.9, iterations=1)}
    times = [1.0, 0.6, 0.2]  # the first sample lies in the warm-up (t_warmup 0.8) and must not count
    heads = 2

    def stats(name: str, scale: float) -> SiteStats:
        site = AttentionSite(name, 0, "self", heads, 16, 256, 256, "float32", layout)
        base = {"p5": 0.2, "p9": 0.6, "s0": 0.25, "k5": 0.3, "k9": 0.7}
        # Warm-up samples are dense-ish (0.99): counting them would move every mean.
        return SiteStats(site, 32, list(times), density={
            label: [[0.99] * heads] + [[d * scale] * heads for _ in times[1:]] for label, d in base.items()})

    calibration = CalibrationResult({"a": stats("a", 1.0), "b": stats("b", 0.5)}, candidates, {})
    line = {"p": (0.01, 0.1), "k": (0.05, 0.2)}  # (intercept, slope) per family, per head, at the timed site "a"
    dens = {"p5": 0.2, "p9": 0.6, "k5": 0.3, "k9": 0.7}
    table = {"dense": LaunchCost(0.02, 0.3), "s0": LaunchCost(0.02, 0.04),
             **{label: LaunchCost(0.0 if label[0] == "p" else 0.03, line[label[0]][0] + line[label[0]][1] * d,
                                  0.005) for label, d in dens.items()}}
    costs = SiteCosts({"a": table, "b": table}, {"a": 0.001, "b": 0.001}, "test")
    scaled = density_scaled_costs(costs, calibration, 0.8)
    for label, d in dens.items():
        intercept, slope = line[label[0]]
        assert scaled.per_site["a"][label].per_head == pytest.approx(intercept + slope * d)
        assert scaled.per_site["b"][label].per_head == pytest.approx(intercept + slope * d * 0.5)
        assert scaled.per_site["b"][label].fixed == table[label].fixed
        assert scaled.per_site["b"][label].own == table[label].own
    assert scaled.per_site["b"]["s0"] == table["s0"] and scaled.per_site["b"]["dense"] == table["dense"]
    again = density_scaled_costs(scaled, calibration, 0.8)  # saved scaled costs re-read: no second scaling
    for site in ("a", "b"):
        for label, cost in scaled.per_site[site].items():
            assert again.per_site[site][label].per_head == pytest.approx(cost.per_head)
    # A site named as timed elsewhere is read from that site's line.
    other = density_scaled_costs(costs, calibration, 0.8, measured_at={"a": "b", "b": "b"})
    assert other.per_site["b"]["p9"].per_head == pytest.approx(table["p9"].per_head)


def test_timing_mode_is_checked() -> None:
    from vdopt.quality import _median_ms

    with pytest.raises(ValueError, match="timing_mode must be one of"):
        _median_ms(lambda: None, torch.device("cpu"), 0, 1, timing_mode="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_timing_hides_the_host_work_of_many_small_launches() -> None:
    """A call that issues many tiny kernels is host-bound from an idle GPU; queued behind the spinning kernel its
    events see only the kernels, so device timing is the smaller, and about the kernels' own time."""
    from vdopt.quality import _median_ms

    x = torch.randn(64, device="cuda")

    def many_launches() -> None:
        y = x
        for _ in range(200):
            y = y + 1.0

    wall = _median_ms(many_launches, torch.device("cuda"), 3, 10, "wall")
    device = _median_ms(many_launches, torch.device("cuda"), 3, 10, "device")
    assert device < 0.7 * wall, (device, wall)
