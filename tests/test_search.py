"""Calibration + search on a model with real attention structure; the acceptance checks of the foundation."""

from __future__ import annotations

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
