"""Cost model formulas and tables, the exact knapsack search, target sensitivity, --explain and heatmaps (CPU)."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import subprocess
import sys
import warnings

import pytest
import sympy as sp
from torch import nn
from vdopt.cost_models import formulas as f
from vdopt.cost_models import model as cost_model
from vdopt.cost_models.model import AttentionShape, CostModel, EfficiencyTable

from vdopt.calibrate import CalibrationResult, SiteStats
from vdopt.search import Option, SearchConfig, search, search_with_report, solve_site, write_heatmaps
from vdopt.sites import AttentionSite, TokenLayout
from vdopt.strategies import SemanticKMeans, SpatialWindow, TemporalWindow

VALUES = {f.B: 1, f.H: 2, f.N: 256, f.T: 0, f.D: 64, f.rho: sp.Rational(1, 4), f.S: 64, f.E: 2}


def test_formulas_print_and_evaluate_to_hand_computed_numbers() -> None:
    assert "rho" in str(f.SPARSE_TRAFFIC_BYTES) and "S" in str(f.SPARSE_TRAFFIC_BYTES)
    # Q: 1*2*256*64*2 = 65536; K+V per kept pair: 2 * (1/4 * (256/64)^2 = 4 pairs) * 2 heads * 64*64*2 = 131072;
    # O: 65536; LSE: 4*2*256 = 2048.
    assert f.SPARSE_TRAFFIC_BYTES.subs(VALUES) == 65536 + 131072 + 65536 + 2048
    assert f.DENSE_TRAFFIC_BYTES.subs(VALUES) == 65536 + 4 * 131072 + 65536 + 2048  # rho = 1
    assert f.DENSE_FLOPS.subs(VALUES) == 4 * 2 * 256**2 * 64
    assert f.SPARSE_FLOPS.subs(VALUES) == 4 * 2 * 256**2 * 64 // 4
    assert f.KERNELS["gather"].hbm_bytes.subs(VALUES) == 2 * 2 * 256 * 64 * 2 + 8 * 2 * 256


def test_roofline_times_efficiency_matches_hand_computation() -> None:
    spec = {"bf16_tflops": 100.0, "memory_tbs": 1.0, "l2_tbs": 2.0, "sms": 10, "launch_us": 5.0}
    point = {"shape": {"batch_heads": 2, "tokens": 256, "head_dim": 64}, "density": None, "efficiency": 0.5}
    table = EfficiencyTable({k: [point] for k in f.KERNELS}, "hand")
    cost = CostModel.from_spec("hand", spec, table, table)
    shape = AttentionShape(1, 2, 256, 64, block_size=64)
    # block_sparse at rho 1/4: flops 2^21 -> 2.097e-8 s; hbm 4*1*2*256*64*2 + 2048 = 264192 B -> 2.642e-7 s;
    # traffic 264192 B at 2 TB/s -> 1.321e-7 s. Memory-bound: 2.642e-7 / 0.5 = 5.284e-7 s.
    assert cost.kernel_seconds("block_sparse", shape, 0.25) == pytest.approx(264192 / 1e12 / 0.5, rel=1e-12)
    # tail: half a program (4*64*0.25*256*64 FLOPs) on one SM (100/10 TFLOP/s * 0.5).
    assert cost.tail_seconds("block_sparse", shape, 0.25) == pytest.approx(0.5 * 4 * 64 * 64 * 64 / 5e12, rel=1e-12)
    both = cost.attention_seconds(1, 2, 256, 64, SpatialWindow(0), 0.25, block_size=64)
    assert both == pytest.approx(264192 / 1e12 / 0.5 + 5e-6 + 0.5 * 4 * 64**3 / 5e12, rel=1e-9)


def test_missing_table_falls_back_to_spec_with_a_warning(tmp_path, monkeypatch) -> None:
    with pytest.warns(UserWarning, match=r"no measured efficiency table for target 'a100'.*default efficiencies"):
        cost = CostModel.for_target("a100")
    assert not cost.measured
    shutil.copy(cost_model._HERE / "specs.json", tmp_path / "specs.json")
    table = json.loads(cost_model.DEFAULT_TABLE.read_text())
    (tmp_path / "efficiency_a100.json").write_text(json.dumps(table))
    monkeypatch.setattr(cost_model, "_HERE", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CostModel.for_target("a100").measured


def test_default_table_is_derived_from_the_committed_measurements() -> None:
    from pathlib import Path

    from vdopt.cost_models.profile import default_table

    results = Path(__file__).parent.parent / "benchmarks" / "results"
    derived = default_table(json.loads((results / "strategy_overheads.json").read_text()),
                            json.loads((results / "attention_kernels.json").read_text()))
    committed = json.loads(cost_model.DEFAULT_TABLE.read_text())
    for kind, points in derived["kernels"].items():
        assert [p["efficiency"] for p in points] == pytest.approx([p["efficiency"] for p in committed["kernels"][kind]])


@pytest.mark.parametrize("seed", range(6))
def test_site_dp_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    keys = ["kernel:a", "kernel:b", "overhead:c"]
    fixed = {k: rng.uniform(0.0, 2.0) for k in keys}
    heads, capacity = 4, 20
    options = []
    for _ in range(heads):
        opts = [Option("dense", rng.uniform(3, 4), frozenset({"kernel:a"}))]
        for i in range(3):
            groups = frozenset(rng.sample(keys, rng.randint(1, 2)))
            opts.append(Option(f"c{i}", rng.uniform(0.2, 3), groups, weight=rng.uniform(0, 0.6)))
        options.append(opts)
    solution = solve_site(options, fixed, capacity)

    def cost(choice) -> float:
        used = frozenset().union(*(options[h][i].groups for h, i in enumerate(choice)))
        return sum(options[h][i].cost for h, i in enumerate(choice)) + sum(fixed[k] for k in used)

    def load(choice, rounding) -> int:
        return sum(rounding(options[h][i].weight * capacity) for h, i in enumerate(choice))

    combos = list(itertools.product(range(4), repeat=heads))
    best = min(cost(c) for c in combos if load(c, math.ceil) <= capacity)  # the discretised problem
    true_best = min(cost(c) for c in combos if sum(options[h][i].weight for h, i in enumerate(c)) <= 1.0)
    assert solution.seconds == pytest.approx(best, rel=1e-12)
    assert cost(solution.choice) == pytest.approx(solution.seconds, rel=1e-12)
    assert load(solution.choice, math.ceil) <= capacity
    assert solution.lower_bound <= true_best + 1e-12 <= solution.seconds + 1e-12


def _site(name: str, heads: int, frames: int = 21, rows: int = 30, cols: int = 52) -> AttentionSite:
    layout = TokenLayout(frames, rows, cols)
    n = layout.video_tokens
    return AttentionSite(name, int(name.split(".")[1]), "self", heads, 128, n, n, "bfloat16", layout=layout)


def _calibration(per_head: dict[str, list[tuple[float, float, float]]], heads: int, times=(0.9, 0.5, 0.2),
                 candidates=None, sites: int = 2) -> CalibrationResult:
    """Stats where candidate ``label`` has (recall, rel_error, density) per head, the same at every time."""
    candidates = candidates or {}
    out = {}
    for s in range(sites):
        site = _site(f"blocks.{s}.attn1#0", heads)
        stats = SiteStats(site, 128)
        for t in times:
            stats.times.append(t)
            stats.dense_output_norm.append([1.0 + 0.1 * h for h in range(heads)])
            for label, values in per_head.items():
                stats.recall.setdefault(label, []).append([v[0] for v in values])
                stats.rel_error.setdefault(label, []).append([v[1] for v in values])
                stats.density.setdefault(label, []).append([v[2] for v in values])
        out[site.name] = stats
    return CalibrationResult(out, candidates, {"times": sorted(times, reverse=True), "seed": 0})


def _mixed_calibration() -> CalibrationResult:
    strategies = [SpatialWindow(0), SpatialWindow(1), TemporalWindow(1), SemanticKMeans(top_p=0.9)]
    candidates = {s.label(): s for s in strategies}
    rng = random.Random(3)
    per_head = {label: [(rng.uniform(0.85, 1.0), rng.uniform(0.01, 0.2), rng.uniform(0.05, 0.5)) for _ in range(4)]
                for label in candidates}
    return _calibration(per_head, 4, candidates=candidates)


@pytest.mark.parametrize("budget", ["recall", "error"])
def test_search_is_deterministic(budget: str) -> None:
    config = SearchConfig(recall_budget=0.9, budget=budget, error_budget=0.08, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plans = [search(nn.Linear(2, 2), _mixed_calibration(), [], "h100", config) for _ in range(2)]
    assert plans[0].to_json() == plans[1].to_json()
    assert plans[0].predictions["min_recall"] >= (0.9 if budget == "recall" else 0.0)
    if budget == "error":
        assert plans[0].predictions["max_rel_error"] <= 0.08 + 1e-9


def _site_seconds(cost: CostModel, strategy, density: float, heads: int) -> float:
    shape = AttentionShape(2, heads, 32760, 128, block_size=128)
    c = cost.strategy_cost(strategy, shape, density, density)
    return heads * c.per_head + sum(c.groups.values())


def test_plan_follows_the_targets_compute_bandwidth_balance() -> None:
    """k-means keeps fewer pairs but pays memory-bound overheads (gathers, sorts); a window keeps more pairs with
    none. Find, from the cost model alone, a window density where h100 and a bandwidth-poorer target disagree,
    and check the search picks, on each, what the cost model says is cheaper there."""
    heads, kmeans_density = 4, 0.03
    window, kmeans = SpatialWindow(1), SemanticKMeans(top_p=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        models = {t: CostModel.for_target(t) for t in ("h100", "l40s")}

        def expected(target: str, window_density: float) -> str:
            cost = models[target]
            options = {window.label(): _site_seconds(cost, window, window_density, heads),
                       kmeans.label(): _site_seconds(cost, kmeans, kmeans_density, heads)}
            return min(options, key=options.get)

        grid = [d / 100 for d in range(4, 100)]
        split = next((d for d in grid if expected("h100", d) != expected("l40s", d)), None)
        assert split is not None, "the cost model sees no difference between h100 and l40s for these candidates"
        candidates = {window.label(): window, kmeans.label(): kmeans}
        per_head = {window.label(): [(0.99, 0.01, split)] * heads, kmeans.label(): [(0.99, 0.01, kmeans_density)] * heads}
        calibration = _calibration(per_head, heads, candidates=candidates, sites=1)
        config = SearchConfig(recall_budget=0.95, tokens=32760, progress=False)
        plans = {t: search(nn.Linear(2, 2), calibration, [], t, config) for t in models}
    for target, plan in plans.items():
        chosen = {h.label() for r in plan.sites[0].schedule for h in r.heads}
        assert chosen == {expected(target, split)}, (target, split, chosen)
    assert plans["h100"].to_json()["sites"] != plans["l40s"].to_json()["sites"]


def test_explain_and_heatmaps(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan, report = search_with_report(nn.Linear(2, 2), _mixed_calibration(), [], "h100",
                                          SearchConfig(recall_budget=0.95, progress=False))
    text = report.explain()
    assert "head 0:" in text and "runner-up:" in text and "infeasible:" in text and "< floor 0.95" in text
    assert "fused launches:" in text
    paths = write_heatmaps(plan, tmp_path / "plan")
    assert [p.name for p in paths] == ["plan_strategy.png", "plan_density.png", "plan_recall.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 1.0 <= plan.predictions["end_to_end_speedup"] <= plan.predictions["attention_speedup"]


def test_profile_on_cpu_exits_2_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-c", ("import sys; from vdopt.cli import search_main; "
                           "sys.exit(search_main(['profile', '--target', 'h100']))")],
                          capture_output=True, text=True, check=False, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible" in lines[0], proc.stderr


def test_profile_runs_its_kernels_end_to_end_on_cpu() -> None:
    import time

    import torch
    from vdopt.cost_models.profile import run_profile

    def timer(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    table = run_profile("cpu", "cpu", {"tiny": (1, 2, 256, 32)}, (0.25,), ((8, 16),), timer, block_size=32,
                        dtype=torch.float32, seed=3)
    loaded = EfficiencyTable(table["kernels"], table["device"])
    assert {k for k, v in table["kernels"].items() if v} == set(f.KERNELS) - {"text"}
    assert loaded.lookup("block_sparse", {"batch_heads": 2, "tokens": 256, "head_dim": 32}, 0.25) > 0
    assert table["formulas_version"] == f.VERSION
    assert table["profile"]["seed"] == 3 and table["profile"]["cluster_configs"] == [[8, 16]]
    cluster = table["kernels"]["cluster_sparse"][0]
    assert cluster["shape"]["q_cluster_tokens"] == 32 and cluster["shape"]["kv_cluster_tokens"] == 16
    assert cluster["tile_pairs"] > 0
    # The k-means selection is priced by its marginal time in front of the attention it feeds; the fused pooled
    # selections of both strategies that block_select prices by their build less the block means, with the path's
    # marginal time beside it.
    assert {"path_ms", "attention_ms", "strategy"} <= set(table["kernels"]["cluster_select"][0])
    pooled = table["kernels"]["block_select"]
    assert sorted(p["strategy"].split("(")[0] for p in pooled) == ["pooled_top_p", "vertical_stripe"]
    for point in pooled:
        assert {"build_ms", "path_ms", "attention_ms", "path_marginal_ms"} <= set(point)
        assert point["measured_ms"] == pytest.approx(max(point["build_ms"] - 2 * table["kernels"]["pool_means"][0]["measured_ms"], 1e-3))


def test_default_table_prices_the_fused_selection_where_recorded() -> None:
    """block_select of the default table comes from the fused selections' paths when the overheads record them
    (less two block means), and from the unfused scores + top-p in older records."""
    from pathlib import Path

    from vdopt.cost_models.profile import default_table

    results = Path(__file__).parent.parent / "benchmarks" / "results"
    overheads = json.loads((results / "strategy_overheads.json").read_text())
    attention = json.loads((results / "attention_kernels.json").read_text())
    draft = next(r for r in overheads["draft_selection"] if r["block"] == 128)
    draft.pop("pooled_top_p_fused_ms", None)
    draft.pop("vertical_stripe_fused_ms", None)
    unfused = default_table(overheads, attention)["kernels"]["block_select"]
    expected = draft["scores_ms"] - 2 * draft["pooled_means_q_ms"] + draft["select_top_p_ms"]
    assert [p["measured_ms"] for p in unfused] == pytest.approx([expected])
    draft.update(pooled_top_p_fused_ms=0.395, vertical_stripe_fused_ms=0.557)
    fused = default_table(overheads, attention)["kernels"]["block_select"]
    means = draft["pooled_means_q_ms"]
    assert [p["measured_ms"] for p in fused] == pytest.approx([0.395 - 2 * means, 0.557 - 2 * means])
    assert [p["source"] for p in fused] == ["pooled_top_p_fused_ms - 2 x pooled_means_q_ms",
                                            "vertical_stripe_fused_ms - 2 x pooled_means_q_ms"]
