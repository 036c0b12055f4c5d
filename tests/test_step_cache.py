"""Step-cache pass and its offline threshold choice."""

from __future__ import annotations

import pytest
import torch
from vdopt.passes.insert_step_cache import CacheUnsupportedError, StepCache, insert_step_cache
from vdopt.passes.sparsify_attention import sparsify_attention

import vdopt
from vdopt.caching import CacheConfig, calibrate_step_cache
from vdopt.capture import capture
from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepCachePlan, StepRange


def _model_and_plan(layers: int = 4, cache: StepCachePlan | None = None):
    from conftest import LocalAttentionDiT, local_dit_inputs

    torch.manual_seed(0)
    model = LocalAttentionDiT(layers=layers).eval()
    sites = capture(model, local_dit_inputs(0)).sites
    plans = [SitePlan(s.name, s.heads, 32, [StepRange(1.0, 0.0, [vdopt.TileWindow(1, 2, 2)] * s.heads)])
             for s in sites if s.sparsifiable]
    return model, Plan(ModelFingerprint.of(model), "h100", plans, cache=cache)


def _sample(model, seed: int, steps: int = 12, cfg_as_two_calls: bool = False) -> torch.Tensor:
    """A flow-matching Euler loop; with ``cfg_as_two_calls`` each step calls the model twice (cond, uncond)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 32, 32, generator=g)
    cond, uncond = torch.randn(1, 3, 16, generator=g), torch.zeros(1, 3, 16)
    times = torch.linspace(1000, 0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = model(hidden_states=x, timestep=times[i:i + 1], encoder_hidden_states=cond)
            if cfg_as_two_calls:
                v = v + 0.5 * (v - model(hidden_states=x, timestep=times[i:i + 1], encoder_hidden_states=uncond))
            x = x + (times[i + 1] - times[i]) / 1000 * v
    return x


def test_cache_that_never_reuses_is_exact() -> None:
    from conftest import relative_l2

    model, plan = _model_and_plan(cache=StepCachePlan(threshold=0.0))
    no_cache = Plan.from_json({**plan.to_json(), "cache": None})
    with_cache = _sample(vdopt.apply(model, plan), 3)
    without = _sample(vdopt.apply(model, no_cache), 3)
    assert relative_l2(with_cache, without) <= 1e-6


def test_pass_is_idempotent_and_leaves_input_unchanged() -> None:
    from conftest import local_dit_inputs

    model, plan = _model_and_plan(cache=StepCachePlan(threshold=0.1))
    captured = capture(model, local_dit_inputs(0))
    gm = sparsify_attention(captured.graph_module, plan, captured.sites)
    code_before = gm.code
    once = insert_step_cache(gm, plan, captured.sites)
    assert gm.code == code_before
    assert sum(isinstance(m, StepCache) for m in once.modules()) == 1
    assert insert_step_cache(once, plan, captured.sites) is once


def test_reuse_follows_the_criterion_and_resets_per_video() -> None:
    model, plan = _model_and_plan(cache=StepCachePlan(threshold=1e9, warmup_steps=2, max_consecutive_reuses=2))
    opt = vdopt.apply(model, plan)
    _sample(opt, 1, steps=12)
    (cache,) = opt.step_caches()
    reused = [r for _, r in cache.stats.history]
    # two warm-up steps compute, then (reuse, reuse, compute) repeats: a huge threshold hits the run-length limit
    assert reused == [False, False, True, True, False, True, True, False, True, True, False, True]
    _sample(opt, 2, steps=12)
    assert [r for _, r in cache.stats.history][:3] == [False, False, True]  # a new video starts a fresh cache


def test_cfg_branches_called_separately_keep_separate_caches() -> None:
    model, plan = _model_and_plan(cache=StepCachePlan(threshold=1e9, warmup_steps=1, max_consecutive_reuses=1))
    opt = vdopt.apply(model, plan)
    _sample(opt, 1, steps=4, cfg_as_two_calls=True)
    (cache,) = opt.step_caches()
    assert sorted(key[0] for key in cache.states) == [0, 1]
    # per branch: compute, reuse, compute, reuse -> 4 reuses of 8 calls
    assert (cache.stats.computed, cache.stats.reused) == (4, 4)


def test_calibrated_threshold_meets_its_budget_on_a_new_video() -> None:
    from conftest import relative_l2

    model, plan = _model_and_plan()
    opt = vdopt.apply(model, plan)
    budget = 0.1
    chosen = calibrate_step_cache(opt, [lambda m, s=s: _sample(m, s) for s in range(2)], None,
                                  CacheConfig(error_budget=budget, policy="threshold"))
    assert chosen is not None and opt.plan.cache is chosen
    assert chosen.predicted["max_hidden_rel_error"] <= budget
    assert 0 < chosen.predicted["reused_fraction"] < 1
    no_cache = vdopt.apply(model, Plan.from_json({**plan.to_json(), "cache": None}))
    cached_video, reference = _sample(opt, 7), _sample(no_cache, 7)
    (cache,) = opt.step_caches()
    assert cache.stats.reused > 0
    assert relative_l2(cached_video, reference) < budget
    again = Plan.from_json(opt.plan.to_json())
    assert again.cache == opt.plan.cache


def test_single_block_model_is_refused_with_reason() -> None:
    from conftest import local_dit_inputs

    model, plan = _model_and_plan(layers=1, cache=StepCachePlan(threshold=0.1))
    with pytest.raises(CacheUnsupportedError, match="at least two transformer blocks"):
        vdopt.apply(model, plan)(**local_dit_inputs(0))


def test_step_cache_needs_whole_runs() -> None:
    from conftest import local_dit_inputs

    model, plan = _model_and_plan()
    with pytest.raises(ValueError, match="whole denoising runs"):
        calibrate_step_cache(vdopt.apply(model, plan), [local_dit_inputs(0)])


def test_cache_follows_a_new_resolution_and_batch_two() -> None:
    """After a run at one size, a run at another size and batch 2 gets its own graph and cache, still exact at
    threshold 0 against the same plan without a cache."""
    from conftest import relative_l2

    model, plan = _model_and_plan(cache=StepCachePlan(threshold=0.0))
    no_cache = vdopt.apply(model, Plan.from_json({**plan.to_json(), "cache": None}))
    opt = vdopt.apply(model, plan)
    _sample(opt, 1, steps=3)
    g = torch.Generator().manual_seed(9)
    bigger = {"hidden_states": torch.randn(2, 4, 3, 24, 40, generator=g), "encoder_hidden_states": torch.randn(2, 3, 16, generator=g)}
    with torch.no_grad():
        for t in (900.0, 500.0, 100.0):
            step = dict(bigger, timestep=torch.tensor([t, t]))
            assert relative_l2(opt(**step), no_cache(**step)) <= 1e-6
    assert len(opt._graphs) == 2 and len(opt.step_caches()) == 2


def test_calibrated_schedule_meets_its_budget_and_round_trips() -> None:
    """The schedule policy (LeMiCa): fixed reused steps, chosen as the fewest computed steps under the budget."""
    from conftest import relative_l2

    model, plan = _model_and_plan()
    opt = vdopt.apply(model, plan)
    budget = 0.1
    chosen = calibrate_step_cache(opt, [lambda m, s=s: _sample(m, s) for s in range(2)], None,
                                  CacheConfig(error_budget=budget, policy="schedule", max_consecutive_reuses=2))
    assert chosen is not None and chosen.kind == "schedule" and chosen.schedule_steps == 12
    assert chosen.predicted["max_hidden_rel_error"] <= budget
    assert all(i >= 2 for i in chosen.reuse_steps)  # warm-up steps always compute
    no_cache = vdopt.apply(model, Plan.from_json({**plan.to_json(), "cache": None}))
    cached_video, reference = _sample(opt, 7), _sample(no_cache, 7)
    (cache,) = opt.step_caches()
    assert [i for i, (_, reused) in enumerate(cache.stats.history) if reused] == list(chosen.reuse_steps)
    assert relative_l2(cached_video, reference) < budget
    assert Plan.from_json(opt.plan.to_json()).cache == opt.plan.cache


def test_schedule_is_the_fewest_computed_steps_under_the_budget() -> None:
    """Against brute force over every reuse set on a small error table."""
    import itertools

    from vdopt.caching import _ScheduleProbe

    g = torch.Generator().manual_seed(3)
    probe = _ScheduleProbe(window=3)
    n = 9
    probe.steps = set(range(n))
    probe.errors = {(j, k): float(torch.rand(1, generator=g)) * 0.2 for j in range(n) for k in range(j + 1, min(n, j + 3))}
    config = CacheConfig(error_budget=0.1, max_consecutive_reuses=2, warmup_steps=1)
    reused, errors = probe.best_schedule(config)

    def feasible(subset: set[int]) -> bool:
        last, run = 0, 0
        for k in range(1, n):
            if k in subset:
                run += 1
                if k < 1 or run > 2 or probe.errors.get((last, k), 1.0) > 0.1:
                    return False
            else:
                last, run = k, 0
        return True

    best = max(len(c) for r in range(n) for c in itertools.combinations(range(1, n), r) if feasible(set(c)))
    assert len(reused) == best and feasible(set(reused)) and max(errors) <= 0.1


def test_schedule_resamples_to_another_step_count_and_rejects_bad_steps() -> None:
    from vdopt.plan import PlanError

    plan = StepCachePlan(reuse_steps=(3, 5, 7), schedule_steps=10)
    assert plan.resampled(10) is plan
    longer = plan.resampled(19)
    assert longer.schedule_steps == 19 and set(longer.reuse_steps) == {6, 10, 14}
    # stretched runs of reuses stay within max_consecutive_reuses
    dense_runs = StepCachePlan(reuse_steps=(4, 5, 7, 8, 10, 11), schedule_steps=13, max_consecutive_reuses=2).resampled(40)
    runs, run = [], 0
    for i in range(40):
        run = run + 1 if i in dense_runs.reuse_steps else 0
        runs.append(run)
    assert max(runs) <= 2 and len(dense_runs.reuse_steps) >= 6
    with pytest.raises(PlanError, match="outside"):
        StepCachePlan(reuse_steps=(0, 3), schedule_steps=10)
    with pytest.raises(PlanError, match="schedule_steps"):
        StepCachePlan(reuse_steps=(3,))
