"""torch.compile of the rewritten graph: same outputs, and no recompilation as the denoising time moves."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import vdopt
from vdopt.capture import capture
from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepCachePlan, StepRange

TIMESTEPS = (950, 800, 650, 500, 350, 200, 50)


def _plan(model, kwargs, cache: StepCachePlan | None = None) -> Plan:
    heads = [vdopt.SpatialWindow(0), vdopt.PooledTopP(0.6)]
    sites = [s for s in capture(model, kwargs).sites if s.sparsifiable]
    return Plan(ModelFingerprint.of(model), "h100",
                [SitePlan(s.name, s.heads, 16, [StepRange(1.0, 0.7, [vdopt.Dense()] * s.heads), StepRange(0.7, 0.0, heads)])
                 for s in sites], cache=cache)


def _run(model, kwargs) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            outs.append(model(**dict(kwargs, timestep=torch.tensor([t]), return_dict=False))[0])
    return outs


@pytest.mark.parametrize("cache", [None, StepCachePlan(threshold=1e9, warmup_steps=2, max_consecutive_reuses=1)],
                         ids=["sparse", "sparse+step-cache"])
def test_compiled_graph_matches_eager_has_no_graph_break_and_compiles_once_per_phase(cache) -> None:
    from conftest import relative_l2, tiny_wan

    model, kwargs = tiny_wan()
    plan = _plan(model, kwargs, cache)
    eager = _run(vdopt.apply(model, Plan.from_json(plan.to_json())), kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled_model = vdopt.apply(model, Plan.from_json(plan.to_json()), compile=True, compile_backend="aot_eager")
    graphs_per_phase = []
    with torch.no_grad():
        for t in (TIMESTEPS[0], TIMESTEPS[-1]):  # one call in the dense warm-up phase, one in the sparse phase
            compiled_model(**dict(kwargs, timestep=torch.tensor([t]), return_dict=False))
            graphs_per_phase.append(counters["stats"]["unique_graphs"])
    assert 0 < graphs_per_phase[0] < graphs_per_phase[1]
    compiled = _run(compiled_model, kwargs)  # a new video: crosses the warm-up boundary, alternates cache reuse
    assert counters["stats"]["unique_graphs"] == graphs_per_phase[1]  # nothing recompiled
    assert not counters["graph_break"], dict(counters["graph_break"])  # every stretch is one graph (fullgraph)
    for a, b in zip(compiled, eager):
        assert relative_l2(a, b) <= 1e-5


def test_compiled_model_at_a_new_resolution_and_batch_two() -> None:
    from conftest import relative_l2, tiny_wan

    model, kwargs = tiny_wan()
    plan = _plan(model, kwargs)
    eager = vdopt.apply(model, Plan.from_json(plan.to_json()))
    compiled = vdopt.apply(model, Plan.from_json(plan.to_json()), compile=True, compile_backend="aot_eager")
    _run(compiled, kwargs)
    g = torch.Generator().manual_seed(3)
    bigger = {"hidden_states": torch.randn(2, 4, 6, 10, 14, generator=g), "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
                  "return_dict": False}
    with torch.no_grad():
        for t in (900, 300):
            step = dict(bigger, timestep=torch.tensor([t, t]))
            assert relative_l2(compiled(**step)[0], eager(**step)[0]) <= 1e-5


def test_compiled_segments_share_one_compilation_per_block_structure() -> None:
    """compile=True cuts each phase's graph between transformer blocks; the blocks have identical code after
    canonical renaming, so inductor's FX-graph cache compiles one and reuses it (misses <= distinct structures)."""
    from conftest import LocalAttentionDiT, local_dit_inputs

    torch.manual_seed(0)
    model = LocalAttentionDiT(layers=5).eval()
    inputs = local_dit_inputs(0)
    sites = [s for s in capture(model, inputs).sites if s.sparsifiable]
    plan = Plan(ModelFingerprint.of(model), "h100",
                [SitePlan(s.name, s.heads, 32, [StepRange(1.0, 0.0, [vdopt.TileWindow(1, 2, 2)] * s.heads)]) for s in sites])
    torch._dynamo.reset()
    counters.clear()
    compiled = vdopt.apply(model, plan, compile=True, compile_backend="inductor")
    with torch.no_grad():
        out = compiled(**inputs)
        ref = vdopt.apply(model, plan)(**inputs)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    misses = counters["inductor"]["fxgraph_cache_miss"]
    assert graphs >= len(sites) and not counters["graph_break"]
    # Distinct stretches: before the blocks, the hoisted token permutation, the first block, a block, the inverse
    # permutation, after the blocks; the other blocks reuse a compiled one (cold cache: 6 of 10 compiled).
    assert misses <= 6, f"{misses} of {graphs} stretches compiled anew; identical blocks should share one"
    assert all(compiled._runners[key].hoisted.values() for key in compiled._runners)
