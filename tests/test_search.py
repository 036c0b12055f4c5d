"""Calibration + search on a model with real attention structure; the acceptance checks of the foundation."""

from __future__ import annotations

import math

import pytest
import torch

import vdopt
from vdopt.attention import sparse_site_attention
from vdopt.calibrate import CalibrationConfig, calibrate
from vdopt.capture import SDPA, capture
from vdopt.strategies import PatternContext

BUDGET = 0.9


@pytest.fixture(scope="module")
def searched():
    from conftest import LocalAttentionDiT, local_dit_inputs

    torch.manual_seed(0)
    model = LocalAttentionDiT().eval()
    calib = [local_dit_inputs(seed, timestep=t) for seed in range(3) for t in (900, 500, 200)]
    opt = vdopt.optimize(model, calib, target="h100", search_config=vdopt.SearchConfig(recall_budget=BUDGET))
    return model, opt


def _site_inputs(model, inputs):
    """q, k, v of every self-attention site for one forward call (recorded by replacing the SDPA nodes)."""
    captured = capture(model, inputs)
    records: dict[str, tuple] = {}
    gm = captured.graph_module
    for site, node in zip(captured.sites, captured.site_nodes().values()):
        if not site.sparsifiable:
            continue

        def record(q, k, v, *args, _name=site.name, **kwargs):
            records[_name] = (q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)

        node.target = record
    gm.recompile()
    with torch.no_grad():
        gm(**inputs)
    return captured.sites, records


def test_searched_plan_is_sparse_and_predicts_a_speedup(searched) -> None:
    _, opt = searched
    plan = opt.plan
    assert plan.predictions["attention_speedup"] > 1.0
    assert plan.predictions["attention_density"] < 0.9
    assert plan.predictions["min_recall"] >= BUDGET
    assert any(not s.is_dense for s in plan.sites)


def test_recall_budget_holds_on_unseen_inputs(searched) -> None:
    from conftest import local_dit_inputs

    model, opt = searched
    unseen = [local_dit_inputs(seed, timestep=t) for seed in (11, 12) for t in (700, 300)]
    chosen = {h for site in opt.plan.sites for r in site.schedule for h in r.heads}
    config = CalibrationConfig(candidates=tuple(chosen), query_rows=256, seed=5)
    measured, _ = calibrate(model, unseen, config)
    for site_plan in opt.plan.sites:
        stats = measured.sites[site_plan.site]
        for i, t in enumerate(stats.times):
            for head, strategy in enumerate(site_plan.strategies_at(t)):
                recall = stats.recall[strategy.label()][i][head]
                assert recall >= BUDGET - 0.02, (site_plan.site, t, head, strategy.label(), recall)


def test_predicted_error_within_2x_of_measured(searched) -> None:
    from conftest import local_dit_inputs

    model, opt = searched
    inputs = local_dit_inputs(21, timestep=300)
    sites, records = _site_inputs(model, inputs)
    for site in sites:
        if site.name not in records:
            continue
        site_plan = opt.plan.site(site.name)
        step = next(r for r in site_plan.schedule if r.contains(0.3))
        if all(h.name == "dense" for h in step.heads):
            continue
        q, k, v = records[site.name]
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        sparse = sparse_site_attention(q, k, v, None, None, site.layout, step.heads, PatternContext(site.layout, site_plan.block_size, {}))
        measured = float((sparse - dense).norm() / dense.norm())
        predicted = step.predicted["rel_error"]
        assert predicted / 2 <= measured <= predicted * 2, (site.name, predicted, measured)


def test_search_is_deterministic(searched) -> None:
    from conftest import local_dit_inputs

    model, opt = searched
    calib = [local_dit_inputs(seed, timestep=t) for seed in range(3) for t in (900, 500, 200)]
    again = vdopt.optimize(model, calib, target="h100", search_config=vdopt.SearchConfig(recall_budget=BUDGET))
    assert again.plan.to_json()["sites"] == opt.plan.to_json()["sites"]


def test_optimized_output_close_to_dense(searched) -> None:
    from conftest import local_dit_inputs, relative_l2

    model, opt = searched
    inputs = local_dit_inputs(33, timestep=300)
    with torch.no_grad():
        assert relative_l2(opt(**inputs), model(**inputs)) < 0.05
    assert SDPA is torch.ops.aten.scaled_dot_product_attention.default


# ---------------------------------------------------------------------------------------------------------------
# The density budget: the least predicted error at a mean density, never worse than a single-strategy baseline


def _sq_error_by_hand(plan, calibration, t_warmup: float) -> tuple[float, float]:
    """Sum over sites of the mean over samples (t <= t_warmup) of g_i sum_h (e_h n_h)^2 / sum_h n_h^2 (g_i the
    site's output gain at sample i where calibration measured one, else 1); and the mean density."""
    total, densities = 0.0, []
    for name, stats in calibration.sites.items():
        samples = [i for i, t in enumerate(stats.times) if t <= t_warmup + 1e-9]
        gains = stats.output_gain or [1.0] * len(stats.times)
        assert all(math.isfinite(g) for g in gains)  # no NaN here: the NaN fill is tested on its own
        site = 0.0
        for i in samples:
            norms = stats.dense_output_norm[i]
            for h, strategy in enumerate(plan.site(name).strategies_at(stats.times[i])):
                if strategy.name == "dense":
                    densities.append(1.0)
                    continue
                site += gains[i] * (stats.rel_error[strategy.label()][i][h] * norms[h]) ** 2 / sum(n * n for n in norms)
                densities.append(stats.density[strategy.label()][i][h])
        total += site / len(samples)
    return total, sum(densities) / len(densities)


def _random_calibration(seed: int, sites: int = 2, heads: int = 3, times=(0.95, 0.6, 0.3, 0.1)):
    import random

    from vdopt.calibrate import CalibrationResult, SiteStats
    from vdopt.sites import AttentionSite, TokenLayout
    from vdopt.strategies import Diagonal, PooledTopP, SpatialWindow, TemporalWindow

    rng = random.Random(seed)
    candidates = {s.label(): s for s in (SpatialWindow(0), TemporalWindow(1), Diagonal(0.5), PooledTopP(0.6))}
    out = {}
    for s in range(sites):
        layout = TokenLayout(4, 8, 8)
        site = AttentionSite(f"blocks.{s}.attn1#0", s, "self", heads, 16, 256, 256, "float32", layout=layout)
        stats = SiteStats(site, 32)
        for t in times:
            stats.times.append(t)
            stats.dense_output_norm.append([rng.uniform(0.5, 2.0) for _ in range(heads)])
            for label in candidates:
                stats.recall.setdefault(label, []).append([rng.uniform(0.3, 1.0) for _ in range(heads)])
                stats.rel_error.setdefault(label, []).append([rng.uniform(0.0, 0.6) for _ in range(heads)])
                stats.density.setdefault(label, []).append([rng.uniform(0.05, 0.5) for _ in range(heads)])
        out[site.name] = stats
    return CalibrationResult(out, candidates, {"times": sorted(times, reverse=True), "seed": 0})


@pytest.mark.parametrize("seed", range(4))
def test_density_search_is_optimal_against_brute_force(seed: int) -> None:
    import itertools
    import warnings

    from conftest import tiny_dit

    from vdopt.quality import fixed_plan
    from vdopt.search import SearchConfig, search
    from vdopt.strategies import Dense

    calibration = _random_calibration(seed)
    model, _ = tiny_dit()
    sites = [stats.site for stats in calibration.sites.values()]
    choices = [Dense(), *calibration.candidates.values()]
    t_warmup, budget = 0.8, 0.3
    best, best_heads = float("inf"), None
    for combo in itertools.product(range(len(choices)), repeat=sum(s.heads for s in sites)):
        picks = iter(combo)
        heads = {s.name: [choices[next(picks)] for _ in range(s.heads)] for s in sites}
        plan = fixed_plan(model, sites, heads, 32, t_warmup, "h100", "brute force")
        error, density = _sq_error_by_hand(plan, calibration, t_warmup)
        if density <= budget and error < best:
            best, best_heads = error, heads
    config = SearchConfig(budget="density", density_budget=budget, min_dense_warmup=1 - t_warmup,
                          max_step_ranges=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = search(model, calibration, sites, "h100", config)
        error, density = _sq_error_by_hand(plan, calibration, t_warmup)
        # Rounding densities up to 1/8192 of the budget can only cost optimality, never feasibility.
        assert density <= budget + 1e-12
        assert plan.predictions["predicted_sq_error"] == pytest.approx(error, rel=1e-9)
        assert plan.predictions["lower_bound_sq_error"] <= best + 1e-12 <= error + 1e-12
        assert error <= best * (1 + plan.predictions["optimality_gap"]) + 1e-12
        # Given the optimum as an incumbent, the search returns a plan at least that good.
        incumbent = fixed_plan(model, sites, best_heads, 32, t_warmup, "h100", "optimum")
        again = search(model, calibration, sites, "h100", config, incumbents=[incumbent])
    assert _sq_error_by_hand(again, calibration, t_warmup)[0] <= best + 1e-12
    assert search(model, calibration, sites, "h100", config).to_json() == plan.to_json()  # deterministic


@pytest.fixture(scope="module")
def harness_calibration():
    """The LocalAttentionDiT calibrated the way the quality harness calibrates: defaults plus baseline grid points."""
    from conftest import LocalAttentionDiT, local_dit_inputs

    from vdopt.quality import baseline_grids, calibration_candidates
    from vdopt.strategies import SpatialWindow

    torch.manual_seed(0)
    model = LocalAttentionDiT().eval()
    calib = [local_dit_inputs(seed, timestep=t) for seed in range(2) for t in (950, 700, 400, 100)]
    layout = capture(model, calib[0]).layout
    grids = baseline_grids(layout, 32, top_p_grid=(0.3, 0.5, 0.7, 0.9))
    candidates = calibration_candidates(grids, layout, 32, (0.1, 0.2, 0.3))
    config = CalibrationConfig(query_rows=128, block_size=32, candidates=candidates, sensitivity_probe=SpatialWindow(0))
    calibration, sites = calibrate(model, calib, config)
    assert all(len(s.output_gain) == len(s.times) for s in calibration.sites.values())
    return model, calibration, sites, grids


@pytest.mark.parametrize("density", [0.1, 0.2, 0.3])
def test_searched_plan_predicts_no_more_error_than_any_baseline_at_its_density(harness_calibration, density) -> None:
    from vdopt.quality import METHODS, baseline_plan, searched_plans

    model, calibration, sites, grids = harness_calibration
    t_warmup = 0.8  # the 950 samples are warm-up; 700, 400, 100 are after it
    baselines = [baseline_plan(m, grids, calibration, model, density, t_warmup, "h100") for m in METHODS[1:]]
    plans = searched_plans(calibration, sites, model, density, t_warmup, "h100", baselines)
    assert [p.matched_to for p in plans] == [None, *METHODS[1:]]
    for baseline in baselines:
        matched = next(p for p in plans if p.matched_to == baseline.method)
        base_error, base_density = _sq_error_by_hand(baseline.plan, calibration, t_warmup)
        error, searched_density = _sq_error_by_hand(matched.plan, calibration, t_warmup)
        assert base_error > 0.0
        assert searched_density <= base_density + 1e-9, (baseline.method, searched_density, base_density)
        assert error <= base_error + 1e-12, (baseline.method, density, error, base_error)
        assert matched.predicted_sq_error == pytest.approx(error, rel=1e-9)
        assert baseline.predicted_sq_error == pytest.approx(base_error, rel=1e-9)
        assert all(s.name == "dense" for site in matched.plan.sites for s in site.strategies_at(0.95))
    headline, headline_density = plans[0], _sq_error_by_hand(plans[0].plan, calibration, t_warmup)[1]
    assert headline_density <= density + 1e-9
    for baseline in baselines:  # every baseline within the target density predicts at least as much error
        base_error, base_density = _sq_error_by_hand(baseline.plan, calibration, t_warmup)
        if base_density <= density:
            assert headline.predicted_sq_error <= base_error + 1e-12, (baseline.method, density)


def test_output_gain_matches_the_model_run_with_one_site_sparse() -> None:
    """Calibration's gain of a site = output change / site error, both re-measured here through the runtime."""
    from conftest import LocalAttentionDiT, local_dit_inputs

    from vdopt.quality import fixed_plan
    from vdopt.runtime import OptimizedModel
    from vdopt.strategies import Dense, SpatialWindow

    torch.manual_seed(0)
    model = LocalAttentionDiT().eval()
    inputs = local_dit_inputs(7, timestep=400)
    probe = SpatialWindow(0)
    config = CalibrationConfig(query_rows=64, candidates=(probe,), sensitivity_probe=probe)
    calibration, sites = calibrate(model, [inputs], config)
    _, records = _site_inputs(model, inputs)
    with torch.no_grad():
        dense = model(**inputs)
    assert calibration.provenance["sensitivity_probe"] == probe.label()
    for name, stats in calibration.sites.items():
        heads = {s.name: [Dense()] * s.heads for s in sites if s.sparsifiable}
        heads[name] = [probe] * stats.site.heads
        plan = fixed_plan(model, [s for s in sites if s.sparsifiable], heads, stats.block_size, 1.0, "h100", "probe")
        with torch.no_grad():
            changed = OptimizedModel(model, plan)(**inputs)
        output_error = float((changed - dense).pow(2).sum() / dense.pow(2).sum())
        q, k, v = records[name]
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        sparse = sparse_site_attention(q, k, v, None, None, stats.site.layout, [probe] * stats.site.heads,
                                       PatternContext(stats.site.layout, stats.block_size, {}))
        site_error = float((sparse - exact).pow(2).sum() / exact.pow(2).sum())
        assert output_error > 0.0 and site_error > 0.0
        # float32 throughout, the same kernels: only summation order differs.
        assert stats.output_gain == [pytest.approx(output_error / site_error, rel=1e-4)]


def test_output_gains_weight_the_density_objective() -> None:
    """With gains, the objective is sum_s g_s e_s^2; a sample without a gain (NaN) takes its site's mean."""
    import warnings

    from conftest import tiny_dit

    from vdopt.search import SearchConfig, predicted_quality, search

    calibration = _random_calibration(5)
    model, _ = tiny_dit()
    sites = [stats.site for stats in calibration.sites.values()]
    config = SearchConfig(budget="density", density_budget=0.3, min_dense_warmup=0.2, max_step_ranges=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = search(model, calibration, sites, "h100", config)
    unweighted = predicted_quality(plan, calibration, 0.8)
    assert not unweighted.output_gains
    assert unweighted.sq_error == pytest.approx(_sq_error_by_hand(plan, calibration, 0.8)[0], rel=1e-12)
    gains = {"blocks.0.attn1#0": [0.5, 2.0, float("nan"), 4.0], "blocks.1.attn1#0": [3.0, 1.0, 1.0, 1.0]}
    for name, stats in calibration.sites.items():
        stats.output_gain = gains[name]
    weighted = predicted_quality(plan, calibration, 0.8)
    expected = 0.0
    for name, stats in calibration.sites.items():
        filled = [g if math.isfinite(g) else (0.5 + 2.0 + 4.0) / 3 for g in gains[name]]
        samples = [i for i, t in enumerate(stats.times) if t <= 0.8]
        site = plan.site(name)
        total = 0.0
        for i in samples:
            norms = stats.dense_output_norm[i]
            total += filled[i] * sum((stats.rel_error[s.label()][i][h] * norms[h]) ** 2 for h, s in
                                     enumerate(site.strategies_at(stats.times[i])) if s.name != "dense") / sum(
                                         n * n for n in norms)
        expected += total / len(samples)
    assert weighted.output_gains
    assert weighted.sq_error == pytest.approx(expected, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reweighted = search(model, calibration, sites, "h100", config)
    # The search optimises the weighted objective: its plan is at least as good there as the unweighted one's.
    assert predicted_quality(reweighted, calibration, 0.8).sq_error <= weighted.sq_error + 1e-12
    assert "output gains" in reweighted.predictions["objective"]


def _random_costs(calibration, seed: int, shared_launches: bool = False):
    """Random costs; ``shared_launches``: the candidates fall into two launch groups (each group one launch) and
    every other candidate has own seconds (estimation work paid whoever shares its launch)."""
    import random

    from vdopt.search import LaunchCost, SiteCosts

    rng = random.Random(100 + seed)
    per_site, mixing = {}, {}
    for name in calibration.sites:
        table = {"dense": LaunchCost(rng.uniform(0.0, 2e-4), 1e-3)}
        for i, label in enumerate(calibration.candidates):
            own = rng.uniform(0.0, 3e-4) if shared_launches and i % 2 == 0 else 0.0
            table[label] = LaunchCost(rng.uniform(0.0, 5e-4), rng.uniform(5e-5, 5e-4), own)
        per_site[name], mixing[name] = table, rng.uniform(0.0, 2e-4)
    groups = {label: f"block:{i % 2}" for i, label in enumerate(calibration.candidates)} if shared_launches else {}
    shared = {name: rng.uniform(0.0, 1e-4) for name in calibration.sites} if shared_launches else {}
    return SiteCosts(per_site, mixing, "random test costs", groups, shared)


def _seconds_by_hand(plan, calibration, costs, t_warmup: float) -> float:
    """Mean over post-warm-up calibration times of the sum over sites of: per head its per-head cost; per launch
    (labels of one launch group share one) the largest fixed cost of its labels in use, plus the shared mixing cost
    where it holds several; per label in use its own seconds; plus the mixing cost where a site runs more than one
    launch."""
    times = sorted({t for st in calibration.sites.values() for t in st.times if t <= t_warmup + 1e-9})
    total = 0.0
    for t in times:
        for name in calibration.sites:
            labels = [s.label() for s in plan.site(name).strategies_at(t)]
            table = costs.per_site[name]
            launches, members = {}, {}
            for label in set(labels):
                total += table[label].per_head * labels.count(label) + table[label].own
                key = costs.launch_groups.get(label, label)
                launches[key] = max(launches.get(key, 0.0), table[label].fixed)
                members[key] = members.get(key, 0) + 1
            total += sum(launches.values()) + (costs.mixing[name] if len(launches) > 1 else 0.0)
            total += costs.shared_mixing.get(name, 0.0) * sum(1 for n in members.values() if n > 1)
    return total / len(times)


def test_site_costs_hand_values() -> None:
    from vdopt.search import LaunchCost, SiteCosts

    costs = SiteCosts({"s": {"dense": LaunchCost(1.0, 10.0), "a": LaunchCost(2.0, 3.0)}}, {"s": 0.5}, "hand")
    assert costs.seconds("s", ["dense"] * 4) == 1.0 + 40.0
    assert costs.seconds("s", ["a", "dense", "a"]) == (2.0 + 6.0) + (1.0 + 10.0) + 0.5
    with pytest.raises(ValueError, match="no cost for 'b'"):
        costs.seconds("s", ["b"])
    # Labels of one launch group run as one launch: the larger fixed cost once, no mixing between them.
    shared = SiteCosts({"s": {"dense": LaunchCost(1.0, 10.0), "a": LaunchCost(2.0, 3.0), "b": LaunchCost(4.0, 1.0)}},
                       {"s": 0.5}, "hand", {"a": "block:original", "b": "block:original"}, {"s": 0.25})
    assert shared.seconds("s", ["a", "b", "a"]) == 4.0 + 0.25 + (3.0 * 2 + 1.0)
    assert shared.seconds("s", ["a", "a", "a"]) == 2.0 + 3.0 * 3
    assert shared.seconds("s", ["a", "b", "dense"]) == (4.0 + 0.25 + 3.0 + 1.0) + (1.0 + 10.0) + 0.5
    assert shared.launch_group_indices(["dense", "a", "b"]) == [0, 1, 1]
    assert SiteCosts.from_json(shared.to_json()) == shared
    # A dynamic selection "p" joins the launch of "a" and "b" and pays its own estimation seconds on top.
    own = SiteCosts({"s": {"dense": LaunchCost(1.0, 10.0), "a": LaunchCost(2.0, 3.0),
                           "p": LaunchCost(1.5, 2.0, own=7.0), "q": LaunchCost(1.0, 2.0, own=5.0)}},
                    {"s": 0.5}, "hand", {"a": "block:original", "p": "block:original", "q": "block:original"},
                    {"s": 0.25})
    assert own.seconds("s", ["p", "p"]) == 1.5 + 7.0 + 2.0 * 2
    assert own.seconds("s", ["a", "p", "q"]) == 2.0 + 0.25 + 7.0 + 5.0 + (3.0 + 2.0 + 2.0)
    assert SiteCosts.from_json(own.to_json()) == own


def test_launch_groups_follow_the_runtime_fusion() -> None:
    from vdopt.search import candidate_launch_groups
    from vdopt.strategies import (
        Dense,
        Diagonal,
        MultiDiagonal,
        PooledTopP,
        SemanticKMeans,
        SpatialWindow,
        TemporalWindow,
        TileWindow,
        VerticalStripe,
    )

    # Heads of patterns in one token order share sparse_site_attention's fused launch, the in-order one also with
    # the dynamic selections' lists (their estimation is priced apart, LaunchCost.own); k-means clusters run their
    # own launch; dense heads share one SDPA call.
    assert Diagonal(0.25).launch_group() == Diagonal(0.5).launch_group() == SpatialWindow(1).launch_group()
    assert MultiDiagonal().launch_group() == Diagonal(0.25).launch_group() == "block:original"
    assert TemporalWindow(1).launch_group() == TemporalWindow(2, 3).launch_group() == "block:position_major"
    assert TileWindow().launch_group() == "block:tile"
    assert PooledTopP(0.5).launch_group() == PooledTopP(0.7).launch_group() == VerticalStripe(0.8).launch_group() \
        == "block:original"
    assert SemanticKMeans().launch_group().startswith("own:")
    assert Dense().launch_group() == "dense"
    groups = candidate_launch_groups({"d": Diagonal(0.25), "t": TemporalWindow(1)})
    assert groups == {"dense": "dense", "d": "block:original", "t": "block:position_major"}


def _time_brute_force(seed: int, max_site_groups: int | None = None, shared_launches: bool = False):
    """A random time-budget instance (budget: 0.45 of dense) and its optimum over every plan with at most
    ``max_site_groups`` candidates per site (None: any): (calibration, costs, model, sites, t_warmup, budget, best
    error, best heads)."""
    import itertools

    from conftest import tiny_dit

    from vdopt.quality import fixed_plan
    from vdopt.strategies import Dense

    calibration = _random_calibration(seed)
    costs = _random_costs(calibration, seed, shared_launches)
    model, _ = tiny_dit()
    sites = [stats.site for stats in calibration.sites.values()]
    choices = [Dense(), *calibration.candidates.values()]
    t_warmup = 0.8
    dense_plan = fixed_plan(model, sites, {s.name: [Dense()] * s.heads for s in sites}, 32, t_warmup, "h100", "d")
    budget = 0.45 * _seconds_by_hand(dense_plan, calibration, costs, t_warmup)
    best, best_heads = float("inf"), None
    for combo in itertools.product(range(len(choices)), repeat=sum(s.heads for s in sites)):
        picks = iter(combo)
        heads = {s.name: [choices[next(picks)] for _ in range(s.heads)] for s in sites}
        if max_site_groups is not None and any(len({h.label() for h in strategies}) > max_site_groups
                                               for strategies in heads.values()):
            continue
        plan = fixed_plan(model, sites, heads, 32, t_warmup, "h100", "brute force")
        if _seconds_by_hand(plan, calibration, costs, t_warmup) <= budget:
            error = _sq_error_by_hand(plan, calibration, t_warmup)[0]
            if error < best:
                best, best_heads = error, heads
    assert best_heads is not None
    return calibration, costs, model, sites, t_warmup, budget, best, best_heads


@pytest.mark.parametrize("seed", range(4))
def test_time_search_meets_its_budget_and_matches_brute_force_with_the_optimum_as_incumbent(seed: int) -> None:
    import warnings

    from vdopt.quality import fixed_plan
    from vdopt.search import SearchConfig, predicted_attention_seconds, search

    calibration, costs, model, sites, t_warmup, budget, best, best_heads = _time_brute_force(seed)
    config = SearchConfig(budget="time", time_budget_ms=budget * 1e3, min_dense_warmup=1 - t_warmup,
                          max_step_ranges=1, max_site_groups=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = search(model, calibration, sites, "h100", config, site_costs=costs)
        seconds = _seconds_by_hand(plan, calibration, costs, t_warmup)
        error = _sq_error_by_hand(plan, calibration, t_warmup)[0]
        assert seconds <= budget * (1 + 1e-9)
        assert predicted_attention_seconds(plan, calibration, costs, t_warmup) == pytest.approx(seconds, rel=1e-9)
        assert plan.predictions["predicted_attention_ms"] == pytest.approx(seconds * 1e3, rel=1e-9)
        assert plan.predictions["predicted_sq_error"] == pytest.approx(error, rel=1e-9)
        assert plan.predictions["optimality_gap"] is None and "not bounded" in plan.summary()
        assert best <= error + 1e-12
        # The Lagrangian bisection alone reaches the convex hull of (time, error), not always the optimum (1.21x and
        # 1.06x of it at seeds 1 and 3); the exchange moves after it reach the optimum on these instances.
        assert error <= best * (1 + 1e-9)
        incumbent = fixed_plan(model, sites, best_heads, 32, t_warmup, "h100", "optimum")
        again = search(model, calibration, sites, "h100", config, incumbents=[incumbent], site_costs=costs)
        assert _sq_error_by_hand(again, calibration, t_warmup)[0] == pytest.approx(best, rel=1e-9)
        # More time never buys more error.
        errors = []
        for scale in (0.3, 0.45, 0.7, 1.0):
            looser = SearchConfig(budget="time", time_budget_ms=scale * budget * 1e3 / 0.45, min_dense_warmup=1 - t_warmup,
                                  max_step_ranges=1, max_site_groups=3, progress=False)
            try:
                errors.append(_sq_error_by_hand(search(model, calibration, sites, "h100", looser, site_costs=costs),
                                                calibration, t_warmup)[0])
            except RuntimeError:
                errors.append(float("inf"))
        assert errors == sorted(errors, reverse=True)
        # One group per site: every head of a site runs the same candidate (or all are dense).
        single = SearchConfig(budget="time", time_budget_ms=budget * 1e3, min_dense_warmup=1 - t_warmup,
                              max_step_ranges=1, max_site_groups=1, progress=False)
        one = search(model, calibration, sites, "h100", single, site_costs=costs)
        assert all(len({h.label() for h in site.strategies_at(0.1)}) == 1 for site in one.sites)
        assert _seconds_by_hand(one, calibration, costs, t_warmup) <= budget * (1 + 1e-9)
        with pytest.raises(RuntimeError, match="no plan meets the time budget"):
            search(model, calibration, sites, "h100", SearchConfig(budget="time", time_budget_ms=1e-6,
                                                                    min_dense_warmup=1 - t_warmup, progress=False),
                   site_costs=costs)


def test_time_budget_needs_costs_and_a_positive_budget() -> None:
    from conftest import tiny_dit

    from vdopt.search import SearchConfig, SiteCosts, search

    with pytest.raises(ValueError, match="time_budget_ms > 0"):
        SearchConfig(budget="time")
    calibration = _random_calibration(0)
    model, _ = tiny_dit()
    sites = [stats.site for stats in calibration.sites.values()]
    from vdopt.cost_models.model import CostModel

    from vdopt.search import _density_schedules

    with pytest.raises(ValueError, match="needs site_costs"):
        _density_schedules(calibration, CostModel.for_target("h100"), SearchConfig(budget="time", time_budget_ms=1.0,
                                                                                   progress=False), [])
    # Without measured timings, search prices with the target's cost model.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        costs = SiteCosts.from_cost_model(calibration, "h100")
        dense = costs.seconds(sites[0].name, ["dense"] * sites[0].heads) * len(sites) * 1e3
        plan = search(model, calibration, sites, "h100", SearchConfig(budget="time", time_budget_ms=dense,
                                                                      min_dense_warmup=0.2, progress=False))
    assert plan.predictions["predicted_attention_ms"] <= dense * (1 + 1e-9)
    assert "cost model for h100" in plan.predictions["site_costs"]


def test_exchange_moves_pair_a_time_saving_change_with_an_error_reducing_one() -> None:
    import numpy as np

    from vdopt.search import _exchange_moves

    # Two sites of one head each; option 0 dense (error 0, 10 s), option 1 sparse (site A: error 5, site B: error
    # 1; 2 s each). At 12 s the optimum is A dense, B sparse (error 1); starting from the reverse (error 5), no
    # single change fits the budget, one pair does.
    def block(member: int, sparse_error: float):
        return ([member], np.array([[0.0, sparse_error]]), np.array([10.0, 2.0]), np.zeros(2), 0.0)

    blocks = [block(0, 5.0), block(1, 1.0)]
    choice, moves = _exchange_moves(blocks, [1, 0], budget=12.0, max_site_groups=2)
    assert (choice, moves) == ([0, 1], 1)
    # Already optimal: nothing to do.
    assert _exchange_moves(blocks, [0, 1], budget=12.0, max_site_groups=2) == ([0, 1], 0)
    # A looser budget: a single change suffices, then both dense (error 0, 20 s).
    assert _exchange_moves(blocks, [1, 1], budget=20.0, max_site_groups=2) == ([0, 0], 2)
    # Too tight for any change: the start is kept, even over the budget (the caller checks feasibility).
    assert _exchange_moves(blocks, [1, 1], budget=4.0, max_site_groups=2) == ([1, 1], 0)


def test_time_search_at_an_incumbents_own_time_beats_it() -> None:
    import warnings

    from conftest import tiny_dit

    from vdopt.quality import fixed_plan
    from vdopt.search import SearchConfig, search
    from vdopt.strategies import Dense

    calibration = _random_calibration(0)
    costs = _random_costs(calibration, 0)
    model, _ = tiny_dit()
    sites = [stats.site for stats in calibration.sites.values()]
    t_warmup = 0.8
    sparse = list(calibration.candidates.values())
    # Incumbent: the first site's heads dense, the rest on the sparsest-priced candidate; the budget its own time.
    cheapest = min(sparse, key=lambda s: costs.per_site[sites[1].name][s.label()].per_head)
    heads = {s.name: [Dense()] * s.heads if i == 0 else [cheapest] * s.heads for i, s in enumerate(sites)}
    incumbent = fixed_plan(model, sites, heads, 32, t_warmup, "h100", "incumbent")
    budget = _seconds_by_hand(incumbent, calibration, costs, t_warmup)
    config = SearchConfig(budget="time", time_budget_ms=budget * 1e3, min_dense_warmup=1 - t_warmup,
                          max_step_ranges=1, max_site_groups=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = search(model, calibration, sites, "h100", config, incumbents=[incumbent], site_costs=costs)
    incumbent_error = _sq_error_by_hand(incumbent, calibration, t_warmup)[0]
    error = _sq_error_by_hand(plan, calibration, t_warmup)[0]
    assert _seconds_by_hand(plan, calibration, costs, t_warmup) <= budget * (1 + 1e-9)
    assert error <= incumbent_error + 1e-15
    assert plan.predictions["predicted_sq_error"] == pytest.approx(error, rel=1e-9)
    # Here the Lagrangian's point beats the incumbent (0.052 vs 0.097 predicted) and one exchange improves on it.
    assert error < 0.6 * incumbent_error and plan.predictions["exchange_moves"] >= 1
    assert plan.predictions["from_incumbent"] is None


def test_block_moves_match_recomputed_block_seconds() -> None:
    import numpy as np

    from vdopt.search import Launches, _block_moves, _prepared_block_seconds

    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(100):
        heads, labels, groups = int(rng.integers(1, 6)), int(rng.integers(2, 7)), int(rng.integers(1, 4))
        error, per_head, fixed = rng.random((heads, labels)), rng.random(labels), rng.random(labels)
        mixing = rng.random()
        group_of = None if rng.random() < 0.5 else Launches([int(x) for x in rng.integers(0, 2, labels)], rng.random())
        picks = [int(x) for x in rng.integers(0, labels, heads)]
        if len(set(picks)) > groups:
            continue
        d_sec, d_err = _block_moves(error, per_head, fixed, mixing, picks, groups, group_of)
        base = _prepared_block_seconds(per_head, fixed, mixing, picks, group_of)
        for h in range(heads):
            for i in range(labels):
                trial = picks[:h] + [i] + picks[h + 1:]
                if i == picks[h] or len(set(trial)) > groups:
                    assert d_sec[h, i] == np.inf
                else:
                    assert d_sec[h, i] == pytest.approx(
                        _prepared_block_seconds(per_head, fixed, mixing, trial, group_of) - base, abs=1e-12)
                    assert d_err[h, i] == pytest.approx(error[h, i] - error[h, picks[h]], abs=1e-12)
                    checked += 1
    assert checked > 200


@pytest.mark.parametrize("shared_launches", [False, True], ids=["own_launches", "shared_launches"])
@pytest.mark.parametrize("seed", range(4))
def test_time_search_with_two_groups_is_the_exact_dp_optimum_with_a_gap_bound(seed: int, shared_launches: bool) -> None:
    import warnings

    from vdopt.search import SearchConfig, search

    calibration, costs, model, sites, t_warmup, budget, best, _ = _time_brute_force(seed, max_site_groups=2,
                                                                                   shared_launches=shared_launches)
    config = SearchConfig(budget="time", time_budget_ms=budget * 1e3, min_dense_warmup=1 - t_warmup,
                          max_step_ranges=1, max_site_groups=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = search(model, calibration, sites, "h100", config, site_costs=costs)
    error = _sq_error_by_hand(plan, calibration, t_warmup)[0]
    assert _seconds_by_hand(plan, calibration, costs, t_warmup) <= budget * (1 + 1e-9)
    assert all(len({h.label() for h in site.strategies_at(0.1)}) <= 2 for site in plan.sites)
    # Seconds rounded up to 1/4096 of the budget can only cost a hair of the optimum; the bound brackets it.
    predictions = plan.predictions
    assert best <= error <= best * (1 + 1e-6) + 1e-15
    assert predictions["lower_bound_sq_error"] <= best + 1e-12
    assert predictions["optimality_gap"] == pytest.approx((error - predictions["lower_bound_sq_error"]) / error,
                                                          abs=1e-12)
    assert predictions["optimality_gap"] < 0.05


@pytest.mark.parametrize("shared", [False, True], ids=["own_launches", "shared_launches"])
def test_block_frontier_is_every_undominated_two_group_assignment(shared: bool) -> None:
    import itertools

    import numpy as np

    from vdopt.search import Launches, _block_frontier, _prepared_block_seconds

    group_of = Launches([0, 1, 1, 0], 0.2) if shared else None

    rng = np.random.default_rng(3)
    heads, labels = 4, 4
    error, per_head, fixed, mixing = rng.random((heads, labels)), rng.random(labels), rng.random(labels), 0.3
    secs, errs, picks = _block_frontier(error, per_head, fixed, mixing, 2, group_of)
    points = []
    for assignment in itertools.product(range(labels), repeat=heads):
        if len(set(assignment)) <= 2:
            points.append((_prepared_block_seconds(per_head, fixed, mixing, list(assignment), group_of),
                           float(error[np.arange(heads), list(assignment)].sum())))
    undominated = sorted({p for p in points if not any(q[0] <= p[0] and q[1] < p[1] - 1e-12 or
                                                       q[0] < p[0] - 1e-12 and q[1] <= p[1] for q in points)})
    assert np.allclose(secs, [p[0] for p in undominated]) and np.allclose(errs, [p[1] for p in undominated])
    for sec, err, assignment in zip(secs, errs, picks):
        assert _prepared_block_seconds(per_head, fixed, mixing, list(assignment), group_of) == pytest.approx(sec)
        assert error[np.arange(heads), assignment].sum() == pytest.approx(err)


@pytest.mark.parametrize("budget", ["density", "time"])
def test_search_restricted_to_named_strategies_uses_only_them(budget: str) -> None:
    import warnings

    from conftest import tiny_dit

    from vdopt.search import SearchConfig, search
    from vdopt.strategies import Diagonal, SpatialWindow

    calibration = _random_calibration(1)
    costs = _random_costs(calibration, 1)
    model, _ = tiny_dit()
    sites = [stats.site for stats in calibration.sites.values()]
    allowed = (SpatialWindow(0).label(), Diagonal(0.5).label())
    common = {"min_dense_warmup": 0.2, "max_step_ranges": 1, "progress": False}
    if budget == "density":
        config = SearchConfig(budget="density", density_budget=0.3, **common)
    else:
        dense_ms = sum(costs.seconds(s.name, ["dense"] * s.heads) for s in sites) * 1e3
        config = SearchConfig(budget="time", time_budget_ms=0.6 * dense_ms, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        free = search(model, calibration, sites, "h100", config, site_costs=costs)
        restricted = search(model, calibration, sites, "h100",
                            SearchConfig(**{**config.__dict__, "strategies": allowed}), site_costs=costs)
    used = {s.label() for site in restricted.sites for r in site.schedule for s in r.heads}
    free_used = {s.label() for site in free.sites for r in site.schedule for s in r.heads}
    assert used <= {"dense", *allowed} and used & set(allowed)
    assert free_used - {"dense", *allowed}  # the restriction changed what this search could pick
    # Fewer choices can only predict as much error or more.
    assert restricted.predictions["predicted_sq_error"] >= free.predictions["predicted_sq_error"] - 1e-12
    assert restricted.search["strategies"] == allowed
    with pytest.raises(ValueError, match=r"strategies \['diagonal\(width=9.0\)'\] were not calibrated"):
        search(model, calibration, sites, "h100", SearchConfig(**{**config.__dict__, "strategies": ("diagonal(width=9.0)",)}),
               site_costs=costs)
    with pytest.raises(ValueError, match="at least one"):
        SearchConfig(strategies=())
