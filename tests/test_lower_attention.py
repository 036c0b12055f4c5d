"""passes/lower_attention: a phase's lowered site equals the eager runtime, and the pass is a proper graph pass."""

from __future__ import annotations

import pytest
import torch

import vdopt
from vdopt.attention import head_runs, select_heads, sparse_site_attention, write_heads
from vdopt.passes.lower_attention import LoweredAttention, NotLowerable, lower_for_phase, lowering_report
from vdopt.sites import AttentionSite, TokenLayout
from vdopt.strategies import PatternContext

LAYOUTS = {
    "video only": TokenLayout(3, 5, 6),
    "text before": TokenLayout(3, 5, 6, text_tokens=7, text_position="before"),  # CogVideoX-style joint attention
    "text after": TokenLayout(2, 4, 9, text_tokens=5, text_position="after"),  # HunyuanVideo-style
}
HEAD_MIXES = {
    "all in order": [vdopt.SpatialWindow(0), vdopt.PooledTopP(0.7), vdopt.VerticalStripe(0.8), vdopt.Diagonal(1)],
    "dense + permuted": [vdopt.Dense(), vdopt.TemporalWindow(0), vdopt.TileWindow(1, 1, 1), vdopt.TemporalWindow(1)],
    "all permuted": [vdopt.TileWindow(1, 1, 1)] * 4,
    "everything": [vdopt.PooledTopP(0.6), vdopt.Dense(), vdopt.TemporalWindow(0), vdopt.SpatialWindow(1)],
    "all dense": [vdopt.Dense()] * 4,
    # Dense and sparse heads interleaved: every head subset is several runs of consecutive heads.
    "interleaved": [vdopt.Dense(), vdopt.SpatialWindow(0), vdopt.Dense(), vdopt.TemporalWindow(0), vdopt.Dense(),
                    vdopt.Diagonal(1)],
}


def _site(layout: TokenLayout, heads: int, head_dim: int) -> AttentionSite:
    tokens = layout.video_tokens + layout.text_tokens
    return AttentionSite("blocks.0.attn1#0", 0, "self", heads, head_dim, tokens, tokens, "float32", layout)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("mix", list(HEAD_MIXES))
def test_lowered_site_equals_eager_runtime(layout_name: str, mix: str) -> None:
    layout, strategies = LAYOUTS[layout_name], HEAD_MIXES[mix]
    batch, heads, head_dim, block = 2, len(strategies), 16, 8  # block 8: ragged last blocks on every layout
    tokens = layout.video_tokens + layout.text_tokens
    g = torch.Generator().manual_seed(7)
    # Token-major storage, as models produce q/k/v ([B, N, H, D] transposed to [B, H, N, D]).
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=g).transpose(1, 2) for _ in range(3))
    lowered = LoweredAttention(_site(layout, heads, head_dim), strategies, block, tuple(q.shape), q.device)
    expected = sparse_site_attention(q, k, v, None, None, layout, strategies, PatternContext(layout, block, {}))
    got = lowered(q, k, v)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def test_kmeans_heads_are_not_lowered_and_say_why() -> None:
    layout = LAYOUTS["video only"]
    with pytest.raises(NotLowerable, match="kmeans"):
        LoweredAttention(_site(layout, 2, 16), [vdopt.SemanticKMeans(4, 4), vdopt.Dense()], 8, (1, 2, 90, 16),
                         torch.device("cpu"))


def _wan_graph(strategies_of):
    from conftest import tiny_wan

    from vdopt.capture import capture
    from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepRange

    model, kwargs = tiny_wan()
    sites = [s for s in capture(model, kwargs).sites if s.sparsifiable]
    plan = Plan(ModelFingerprint.of(model), "h100",
                [SitePlan(s.name, s.heads, 16, [StepRange(1.0, 0.7, [vdopt.Dense()] * s.heads),
                                                StepRange(0.7, 0.0, strategies_of(s))]) for s in sites])
    optimized = vdopt.apply(model, plan)
    step = dict(kwargs, timestep=torch.tensor([500]), return_dict=False)
    with torch.no_grad():
        reference = optimized(**step)[0]
    return model, optimized, next(iter(optimized._graphs.values())), step, reference


def test_lower_for_phase_is_a_pure_idempotent_pass_with_equal_outputs() -> None:
    from conftest import relative_l2

    from vdopt.capture import export_kwargs, forward_kwargs
    from vdopt.passes.lower_attention import LoweredAttention as Lowered
    from vdopt.passes.sparsify_attention import PlannedAttention

    model, _, gm, step, reference = _wan_graph(lambda s: [vdopt.TileWindow(1, 1, 1), vdopt.PooledTopP(0.6)][: s.heads])
    before = gm.code
    lowered = lower_for_phase(gm, 0.5)
    assert gm.code == before and any(isinstance(m, PlannedAttention) for m in gm.modules())  # input unchanged
    assert not any(isinstance(m, PlannedAttention) for m in lowered.modules())
    assert sum(isinstance(m, Lowered) for m in lowered.modules()) == 2
    again = lower_for_phase(lowered, 0.5)
    assert again.code == lowered.code  # nothing left to lower
    inputs = forward_kwargs(model, (), step)
    inputs.pop("return_dict")
    with torch.no_grad():
        out = again(**export_kwargs(model, inputs))[0]
    assert relative_l2(out, reference) <= 1e-6


def test_lowering_report_names_sites_left_eager() -> None:
    _, _, gm, _, _ = _wan_graph(lambda s: [vdopt.SemanticKMeans(4, 4), vdopt.Dense()][: s.heads])
    report = lowering_report(gm, 0.5)
    assert len(report) == 2 and all("kmeans" in reason for _, reason in report)
    assert lowering_report(gm, 0.9) == []  # the dense warm-up phase lowers completely


def _top_level_permutations(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is torch.index_select)


def test_hoisting_cancels_the_per_layer_permutations_and_keeps_outputs_equal() -> None:
    from conftest import relative_l2

    from vdopt.capture import export_kwargs, forward_kwargs
    from vdopt.passes.lower_attention import hoist_token_order

    model, _, gm, step, reference = _wan_graph(lambda s: [vdopt.TileWindow(1, 1, 1)] * s.heads)
    lowered = lower_for_phase(gm, 0.5)
    hoisted = hoist_token_order(lowered)
    assert hoisted is not lowered and _top_level_permutations(lowered) == 0
    # hidden states and the two rotary tables permuted once on the way in, the output once on the way out
    assert _top_level_permutations(hoisted) == 4
    sites = [m for m in hoisted.modules() if isinstance(m, LoweredAttention)]
    assert len(sites) == 2 and all(m.hoisted for m in sites)
    assert not any(m.hoisted for m in lowered.modules() if isinstance(m, LoweredAttention))  # input unchanged
    assert hoist_token_order(hoisted) is hoisted  # idempotent
    inputs = forward_kwargs(model, (), step)
    inputs.pop("return_dict")
    with torch.no_grad():
        out = hoisted(**export_kwargs(model, inputs))[0]
    assert relative_l2(out, reference) <= 1e-6


def test_hoisting_needs_one_shared_order() -> None:
    from vdopt.passes.lower_attention import hoist_token_order

    # tile heads beside heads in the original order: each layer's permutation stays in the layer
    _, _, gm, _, _ = _wan_graph(lambda s: [vdopt.TileWindow(1, 1, 1), vdopt.SpatialWindow(0)][: s.heads])
    lowered = lower_for_phase(gm, 0.5)
    assert hoist_token_order(lowered) is lowered
    dense_phase = lower_for_phase(gm, 0.9)
    assert hoist_token_order(dense_phase) is dense_phase


def test_hoisted_compiled_run_with_step_cache_matches_eager() -> None:
    from conftest import relative_l2, tiny_wan

    from vdopt.capture import capture
    from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepCachePlan, StepRange

    model, kwargs = tiny_wan()
    sites = [s for s in capture(model, kwargs).sites if s.sparsifiable]
    plan = Plan(ModelFingerprint.of(model), "h100",
                [SitePlan(s.name, s.heads, 16, [StepRange(1.0, 0.7, [vdopt.Dense()] * s.heads),
                                                StepRange(0.7, 0.0, [vdopt.TemporalWindow(0), vdopt.Dense()][: s.heads])])
                 for s in sites], cache=StepCachePlan(reuse_steps=(3, 5), schedule_steps=7, warmup_steps=0))
    steps = [dict(kwargs, timestep=torch.tensor([t]), return_dict=False) for t in (950, 800, 650, 500, 350, 200, 50)]
    eager, compiled = vdopt.apply(model, Plan.from_json(plan.to_json())), \
        vdopt.apply(model, Plan.from_json(plan.to_json()), compile=True, compile_backend="aot_eager")
    with torch.no_grad():
        for step in steps:
            assert relative_l2(compiled(**step)[0], eager(**step)[0]) <= 1e-5
    runner = next(iter(compiled._runners.values()))
    assert sorted(runner.hoisted.values()) == [False, True]  # dense warm-up: nothing to hoist; sparse: hoisted
    reused = [c.stats.reused for c in compiled.step_caches()]
    assert reused == [c.stats.reused for c in eager.step_caches()] and sum(reused) == 2


def test_hoisting_refuses_a_graph_the_step_cache_pass_already_split() -> None:
    from vdopt.passes.insert_step_cache import insert_step_cache
    from vdopt.passes.lower_attention import hoist_token_order
    from vdopt.plan import StepCachePlan

    _, optimized, gm, _, _ = _wan_graph(lambda s: [vdopt.TileWindow(1, 1, 1)] * s.heads)
    plan = optimized.plan
    plan.cache = StepCachePlan(reuse_steps=(2,), schedule_steps=3, warmup_steps=0)
    sparsified, _, sites = next(iter(optimized._sparsified.values()))
    cached = lower_for_phase(insert_step_cache(sparsified, plan, sites), 0.5)
    assert hoist_token_order(cached) is cached


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("mix", ["interleaved", "dense + permuted", "everything"])
def test_each_head_equals_that_head_run_alone(layout_name: str, mix: str) -> None:
    """Head bookkeeping (runs of consecutive heads in and out) checked against one-head calls, which split nothing."""
    layout, strategies = LAYOUTS[layout_name], HEAD_MIXES[mix]
    batch, heads, head_dim, block = 2, len(strategies), 16, 8
    tokens = layout.video_tokens + layout.text_tokens
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=g).transpose(1, 2) for _ in range(3))
    ctx = PatternContext(layout, block, {})
    eager = sparse_site_attention(q, k, v, None, None, layout, strategies, ctx)
    lowered = LoweredAttention(_site(layout, heads, head_dim), strategies, block, tuple(q.shape), q.device)(q, k, v)
    assert eager.stride() == q.stride() and lowered.stride() == q.stride()  # the model's token-major layout is kept
    for h, strategy in enumerate(strategies):
        sl = slice(h, h + 1)
        alone = sparse_site_attention(q[:, sl], k[:, sl], v[:, sl], None, None, layout, [strategy], ctx)
        torch.testing.assert_close(eager[:, sl], alone, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lowered[:, sl], alone, atol=2e-6, rtol=2e-6)


def test_head_runs_select_and_write() -> None:
    assert head_runs([0, 1, 2]) == [(0, 0, 3)]
    assert head_runs([2, 3, 0, 5, 6]) == [(0, 2, 2), (2, 0, 1), (3, 5, 2)]
    assert head_runs([]) == []
    x = torch.randn(2, 7, 5, 3).transpose(1, 2)  # [2, 5, 7, 3], token-major
    members = [3, 4, 0, 2]
    assert select_heads(x, [1, 2])._base is x._base  # one run: a view, no copy
    torch.testing.assert_close(select_heads(x, members), x[:, members])
    out = torch.zeros_like(x)
    value = torch.randn(2, 4, 7, 3)
    write_heads(out, members, value)
    expected = torch.zeros_like(x)
    expected[:, members] = value
    torch.testing.assert_close(out, expected)


def test_dynamic_and_static_in_order_heads_share_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the search's launch groups assume (Strategy.launch_group): pooled top-p, stripes and in-order static heads
    run in one block-sparse launch, in the eager runtime and lowered."""
    import vdopt.attention as attention_module

    layout = TokenLayout(3, 5, 6)
    strategies = [vdopt.PooledTopP(0.6), vdopt.Diagonal(1), vdopt.VerticalStripe(0.8), vdopt.Dense()]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 90, 4, 16, generator=g).transpose(1, 2) for _ in range(3))
    launches = []
    original = attention_module.block_sparse_attention

    def counting(*args, **kwargs):
        launches.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, "block_sparse_attention", counting)
    sparse_site_attention(q, k, v, None, None, layout, strategies, PatternContext(layout, 8, {}))
    assert len(launches) == 1
    launches.clear()
    LoweredAttention(_site(layout, 4, 16), strategies, 8, tuple(q.shape), q.device)(q, k, v)
    assert len(launches) == 1
    assert {s.launch_group() for s in strategies[:3]} == {"block:original"}


@pytest.mark.parametrize("strategies", [
    [vdopt.SpatialWindow(0), vdopt.Diagonal(1), vdopt.SpatialWindow(0), vdopt.Diagonal(1)],
    [vdopt.Diagonal(1), vdopt.PooledTopP(0.6), vdopt.SpatialWindow(0), vdopt.PooledTopP(0.6), vdopt.Diagonal(1)],
    [vdopt.VerticalStripe(0.8), vdopt.SpatialWindow(1), vdopt.PooledTopP(0.6), vdopt.VerticalStripe(0.8)],
], ids=["two static alternating", "dynamic between static", "two dynamic around static"])
def test_alternating_in_order_heads_launch_in_head_order_with_no_copy(
        strategies: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads of several in-order strategies on alternate heads go to the one launch in head order, so a site with
    every head sparse passes no head list and copies no output back into place (the search prices such a site as
    one launch); the result equals the eager runtime's, per head too."""
    import vdopt.attention as attention_module

    layout = TokenLayout(3, 5, 6)
    heads, block = len(strategies), 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 90, heads, 16, generator=g).transpose(1, 2) for _ in range(3))
    calls: list[dict] = []
    writes: list[list[int]] = []
    launch, write = attention_module.block_sparse_attention, attention_module.write_heads

    def counting_launch(*args, **kwargs):
        calls.append(kwargs)
        return launch(*args, **kwargs)

    def counting_write(out, members, value):
        writes.append(list(members))
        return write(out, members, value)

    lowered = LoweredAttention(_site(layout, heads, 16), strategies, block, tuple(q.shape), q.device)
    assert lowered.in_order_heads == list(range(heads))
    monkeypatch.setattr(attention_module, "block_sparse_attention", counting_launch)
    monkeypatch.setattr(attention_module, "write_heads", counting_write)
    got = lowered(q, k, v)
    assert len(calls) == 1 and calls[0]["head_indices"] is None
    assert writes == []
    monkeypatch.setattr(attention_module, "block_sparse_attention", launch)
    monkeypatch.setattr(attention_module, "write_heads", write)
    ctx = PatternContext(layout, block, {})
    torch.testing.assert_close(got, sparse_site_attention(q, k, v, None, None, layout, strategies, ctx),
                               atol=2e-6, rtol=2e-6)
    for h, strategy in enumerate(strategies):
        sl = slice(h, h + 1)
        alone = sparse_site_attention(q[:, sl], k[:, sl], v[:, sl], None, None, layout, [strategy], ctx)
        torch.testing.assert_close(got[:, sl], alone, atol=2e-6, rtol=2e-6)
