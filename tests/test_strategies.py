"""Strategy patterns: exact semantics against brute-force token masks, and the site runtime against a masked reference."""

from __future__ import annotations

import pytest
import torch

from vdopt.attention import sparse_site_attention
from vdopt.sites import TokenLayout
from vdopt.strategies import (
    Dense,
    Diagonal,
    MultiDiagonal,
    PatternContext,
    PooledTopP,
    SemanticKMeans,
    SpatialWindow,
    TemporalWindow,
    TileWindow,
    VerticalStripe,
    strategy_from_json,
    token_order,
    video_coordinates,
)

LAYOUT = TokenLayout(frames=3, rows=5, cols=7)  # 105 tokens: ragged for every block size
SPARSE = [SpatialWindow(0), TemporalWindow(1), TileWindow(1, 2, 2), Diagonal(0.5), MultiDiagonal(0.2),
          VerticalStripe(0.5), PooledTopP(0.6), SemanticKMeans(q_clusters=6, kv_clusters=9, top_p=0.7)]


def _qk(batch: int = 2, heads: int = 3, tokens: int = LAYOUT.video_tokens, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3))


@pytest.mark.parametrize("strategy", SPARSE, ids=lambda s: s.name)
def test_keep_rows_agrees_with_block_mask_and_density(strategy) -> None:
    q, k, _ = _qk()
    pattern = strategy.build(q, k, PatternContext(LAYOUT, 16, {}))
    keep = pattern.keep_rows(torch.arange(LAYOUT.video_tokens))  # [B, H, N, N] original order
    # density from the block list equals the fraction of kept token pairs
    torch.testing.assert_close(pattern.density(), keep.float().mean((0, 2, 3)), atol=1e-6, rtol=0)
    # every query keeps at least one key, and permuted patterns keep the query's own block
    assert bool(keep.any(-1).all())
    assert 0 < float(pattern.density().max()) <= 1


def test_static_windows_follow_their_definition() -> None:
    q, k, _ = _qk(1, 1)
    coords = video_coordinates(LAYOUT)
    rows = torch.arange(LAYOUT.video_tokens)
    spatial = SpatialWindow(0).build(q, k, PatternContext(LAYOUT, 16, {})).keep_rows(rows)[0, 0]
    same_frame = coords[:, None, 0] == coords[None, :, 0]
    assert bool(spatial[same_frame].all())  # block granularity may keep more, never less
    temporal = TemporalWindow(0).build(q, k, PatternContext(LAYOUT, 16, {})).keep_rows(rows)[0, 0]
    same_position = (coords[:, None, 1:] == coords[None, :, 1:]).all(-1)
    assert bool(temporal[same_position].all())
    # On a grid the 16-token tiles (1x4x4) divide exactly, a 1-cell window keeps the 3x3 neighbouring tiles
    # of the query's frame: at most 9 of the 32 tiles.
    aligned = TokenLayout(2, 16, 16)
    qa, ka, _ = _qk(1, 1, aligned.video_tokens)
    coords = video_coordinates(aligned)
    tile = TileWindow(0, 1, 1).build(qa, ka, PatternContext(aligned, 16, {})).keep_rows(torch.arange(aligned.video_tokens))[0, 0]
    near = ((coords[:, None] - coords[None]).abs() <= torch.tensor([0, 1, 1])).all(-1)
    assert bool(tile[near].all())
    assert float(tile.float().mean()) <= 9 / 32


@pytest.mark.parametrize("order", ["position_major", "tile"])
def test_token_orders_are_permutations(order) -> None:
    perm = token_order(LAYOUT, order, 16)
    assert torch.equal(perm.sort().values, torch.arange(LAYOUT.video_tokens))


def _masked_reference(q, k, v, keep_video, layout, key_bias=None):
    """float64 softmax attention with an explicit token mask: text rows and columns always kept."""
    n = q.shape[2]
    keep = torch.ones(*q.shape[:2], n, n, dtype=torch.bool)
    v0, v1 = layout.video_span
    keep[:, :, v0:v1, v0:v1] = keep_video
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_bias is not None:
        scores = scores + key_bias.double()
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v.double()


@pytest.mark.parametrize("interleaved", [False, True], ids=["three_launches", "one_launch_heads_reordered"])
@pytest.mark.parametrize("text_position", ["none", "before", "after"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_site_attention_equals_masked_reference(text_position, dtype, tol, interleaved) -> None:
    text = 0 if text_position == "none" else 5
    layout = TokenLayout(3, 5, 7, text, text_position)
    q, k, v = _qk(2, 3, layout.total_tokens, 16, seed=1)
    # Interleaved: one fused launch runs every head, listed as heads 0, 2, 1 (its groups in turn), so the text
    # merge must take the heads in that order too.
    heads = ([PooledTopP(0.6), SpatialWindow(0), PooledTopP(0.6)] if interleaved
             else [SpatialWindow(0), PooledTopP(0.6), TemporalWindow(1)])
    state: dict = {}
    ctx = PatternContext(layout, 16, state)
    # Rebuild the same patterns the runtime builds (static + deterministic dynamic) for the reference mask.
    v0, v1 = layout.video_span
    keep = torch.zeros(2, 3, layout.video_tokens, layout.video_tokens, dtype=torch.bool)
    for h, strategy in enumerate(heads):
        pattern = strategy.build(q[:, h:h + 1, v0:v1].to(dtype), k[:, h:h + 1, v0:v1].to(dtype), PatternContext(layout, 16, {}))
        keep[:, h] = pattern.keep_rows(torch.arange(layout.video_tokens))[:, 0]
    mask = None
    bias = None
    if text:
        mask = torch.ones(2, 1, 1, layout.total_tokens, dtype=torch.bool)
        mask[1, ..., (v1 if text_position == "after" else 0) + 1] = False  # one padded text token in batch 1
        bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out = sparse_site_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, None, layout, heads, ctx)
    ref = _masked_reference(q.to(dtype), k.to(dtype), v.to(dtype), keep, layout, bias)
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < tol, rel


def test_all_dense_heads_equal_sdpa() -> None:
    q, k, v = _qk(1, 2, LAYOUT.video_tokens, 16)
    out = sparse_site_attention(q, k, v, None, None, LAYOUT, [Dense(), Dense()], PatternContext(LAYOUT, 16, {}))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_kmeans_warm_starts_from_state() -> None:
    from vdopt.kernels.kmeans import kmeans

    q, k, _ = _qk(1, 2)
    state: dict = {}
    strategy = SemanticKMeans(q_clusters=6, kv_clusters=9, top_p=0.8, iterations=1)
    strategy.build(q, k, PatternContext(LAYOUT, 16, state))
    strategy.build(q, k, PatternContext(LAYOUT, 16, state))
    # Two warm-started single iterations continue the same Lloyd run as one cold run of two iterations.
    q_centroids, k_centroids = next(iter(state.values()))
    torch.testing.assert_close(q_centroids, kmeans(q, 6, 2, seed=0)[1])
    torch.testing.assert_close(k_centroids, kmeans(k, 9, 2, seed=1)[1])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cluster_query_permutation_in_kernel_equals_launches(dtype, tol) -> None:
    from vdopt.attention import pattern_attention

    q, k, v = (x.to(dtype) for x in _qk(2, 3, LAYOUT.video_tokens, 16, seed=3))
    pattern = SemanticKMeans(q_clusters=6, kv_clusters=9, top_p=0.7).build(q, k, PatternContext(LAYOUT, 16, {}))
    fused_out, fused_lse = pattern_attention(q, k, v, pattern, 0.25, query_permutation="kernel")
    out, lse = pattern_attention(q, k, v, pattern, 0.25, query_permutation="launches")
    torch.testing.assert_close(fused_out.float(), out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(fused_lse, lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="query_permutation must be 'kernel' or 'launches', got 'gpu'"):
        pattern_attention(q, k, v, pattern, 0.25, query_permutation="gpu")


def test_strategy_json_round_trip_and_errors() -> None:
    for strategy in SPARSE + [Dense()]:
        assert strategy_from_json(strategy.to_json()) == strategy
    with pytest.raises(ValueError, match="unknown strategy 'wavelet'"):
        strategy_from_json({"strategy": "wavelet"})
    with pytest.raises(ValueError, match="no parameter 'radius'"):
        strategy_from_json({"strategy": "spatial", "radius": 2})


def test_one_plan_serves_several_resolutions() -> None:
    for layout in (TokenLayout(2, 4, 4), TokenLayout(5, 9, 11)):
        q, k, _v = _qk(1, 1, layout.video_tokens)
        for strategy in SPARSE:
            pattern = strategy.build(q, k, PatternContext(layout, 16, {}))
            assert pattern.tokens == layout.video_tokens
            assert pattern.keep_rows(torch.tensor([0, layout.video_tokens - 1])).shape[-1] == layout.video_tokens


@pytest.fixture()
def launches(monkeypatch) -> list[int]:
    """Heads per block-sparse launch made by the site runtime during the test."""
    from vdopt import attention

    heads_per_launch: list[int] = []
    real = attention.block_sparse_attention

    def counting(*args, **kwargs):
        index = kwargs.get("head_indices")
        heads_per_launch.append(len(index) if index is not None else args[0].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "block_sparse_attention", counting)
    return heads_per_launch


def _per_head_reference(q, k, v, heads) -> torch.Tensor:
    """Masked float64 attention with each head's own pattern, built head by head (no fusion, no sharing)."""
    keep = torch.zeros(*q.shape[:2], LAYOUT.video_tokens, LAYOUT.video_tokens, dtype=torch.bool)
    for h, strategy in enumerate(heads):
        if isinstance(strategy, Dense):
            keep[:, h] = True
            continue
        pattern = strategy.build(q[:, h:h + 1], k[:, h:h + 1], PatternContext(LAYOUT, 16, {}))
        keep[:, h] = pattern.keep_rows(torch.arange(LAYOUT.video_tokens))[:, 0]
    return _masked_reference(q, k, v, keep, LAYOUT)


def test_heads_sharing_a_kernel_run_in_one_launch(launches) -> None:
    """Spatial, diagonal and pooled heads keep the token order: one fused block-sparse launch, reading heads in place."""
    q, k, v = _qk(2, 5, LAYOUT.video_tokens, 16, seed=3)
    heads = [SpatialWindow(0), Diagonal(0.5), Dense(), PooledTopP(0.6), TemporalWindow(1)]
    out = sparse_site_attention(q, k, v, None, None, LAYOUT, heads, PatternContext(LAYOUT, 16, {}))
    # one fused launch for the three order-keeping heads, one for the permuted temporal head
    assert sorted(launches) == [1, 3]
    ref = _per_head_reference(q, k, v, heads)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_heads_sharing_a_token_order_are_permuted_and_launched_together(launches) -> None:
    """Two temporal heads with different radii share the position-major order: one gather, one launch."""
    q, k, v = _qk(2, 4, LAYOUT.video_tokens, 16, seed=4)
    heads = [TemporalWindow(0), TileWindow(1, 2, 2), TemporalWindow(1), SpatialWindow(1)]
    out = sparse_site_attention(q, k, v, None, None, LAYOUT, heads, PatternContext(LAYOUT, 16, {}))
    assert sorted(launches) == [1, 1, 2]  # spatial (native order), tile (tile order), both temporal heads
    ref = _per_head_reference(q, k, v, heads)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
