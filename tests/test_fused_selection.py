"""Fused pooled selection (pooled_select_top_p / pooled_select_vertical_stripes) against its reference and the
unfused path it replaces (pooled_block_scores + select_blocks_top_p + the diagonal).

Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before the kernels are imported) at tiny shapes.
Selections are compared exactly: the whole index tensor (padding included) and the counts. Both paths score in
float32 and differ only in summation order (about 1e-7 relative), so they could disagree only where two scores of
a row, or the top-p target and a partial sum of the sorted scores, lie within that of each other. On the fixed
random inputs here no row comes near (checked: :func:`_ambiguous_rows` must find none); ties are built exactly
(equal key-block means) and must follow the rule "lower block index first".
"""

from __future__ import annotations

import os

import pytest
import torch

# On a machine without a GPU, Triton kernels run in the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime.interpreter import InterpretedFunction
from vdopt.kernels import selection
from vdopt.kernels.reference import kv_block_mask, validate_kv_block_list

from vdopt.sites import TokenLayout
from vdopt.strategies import PatternContext, PooledTopP, VerticalStripe

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUSED = {
    "top_p": (selection.pooled_select_top_p, selection.pooled_select_top_p_reference),
    "stripes": (selection.pooled_select_vertical_stripes, selection.pooled_select_vertical_stripes_reference),
}
# The CPU tests of the Triton path need the interpreter (on in this process before the kernels were defined).
interpreted = pytest.mark.skipif(
    not isinstance(selection._pooled_select_top_p_kernel, InterpretedFunction),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 set before vdopt.kernels.selection is imported",
)
# Relative gap under which a row's selection is a float-rounding call (see the module docstring).
AMBIGUITY = 1e-5


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int, spread: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(shape, generator=generator) + 0.3).to(dtype)


def _means(
    batch: int, heads: int, q_tokens: int, kv_tokens: int, head_dim: int, block: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Keys spread wider than queries so scores are peaked enough for top-p to drop blocks.
    q = _random((batch, heads, q_tokens, head_dim), dtype, seed)
    k = _random((batch, heads, kv_tokens, head_dim), dtype, seed + 1, spread=4.0)
    return selection.pooled_block_means(q, block), selection.pooled_block_means(k, block)


def _ranked_scores(q_means, k_means, kv_tokens, block, stripes):
    scores = selection._scores_from_means(q_means.float(), k_means.float(), kv_tokens, block, q_means.shape[-1] ** -0.5)
    return selection._column_scores(scores) if stripes else scores


def _ambiguous_rows(scores: torch.Tensor, top_p: float) -> int:
    """Rows whose selection is a float-rounding call (float64 recompute, default clamps): a partial sum of the
    sorted scores within AMBIGUITY of the top-p target, or the last kept and first dropped score that close."""
    ordered = scores.double().sort(dim=-1, descending=True).values
    total = ordered.sum(-1, keepdim=True)
    before = ordered.cumsum(-1) - ordered
    num_blocks = ordered.shape[-1]
    if top_p < 1.0:
        near_target = ((before - top_p * total).abs() <= AMBIGUITY * total).any(-1)
        count = (before < top_p * total).sum(-1, keepdim=True).clamp(min=1)
    else:
        near_target = torch.zeros(ordered.shape[:-1], dtype=torch.bool, device=ordered.device)
        count = torch.full_like(near_target[..., None], num_blocks, dtype=torch.int64)
    last_kept = ordered.gather(-1, count - 1)
    first_dropped = ordered.gather(-1, count.clamp(max=num_blocks - 1))
    close_cut = ((last_kept - first_dropped) <= AMBIGUITY * last_kept) & (count < num_blocks)
    return int((near_target | close_cut[..., 0]).sum())


def _check_layout(indices, counts, num_kv_blocks, width):
    assert indices.dtype == counts.dtype == torch.int32
    assert indices.shape[-1] == width and indices.shape[:3] == counts.shape
    validate_kv_block_list(indices, counts, num_kv_blocks)  # in range, no repeats
    slots = torch.arange(width)
    used = slots < counts[..., None]
    assert bool(((indices[..., 1:] > indices[..., :-1]) | ~used[..., 1:]).all())  # ascending kept indices
    last = indices.gather(-1, (counts.long() - 1).clamp(min=0)[..., None])
    assert bool(torch.where(used, True, indices == last).all())  # padding repeats the last kept index


def _old_path(q_means, k_means, kv_tokens, block, top_p, min_blocks, max_blocks, keep_diagonal, stripes):
    """Kept mask of the unfused path the strategies ran before: scores, select_blocks_top_p, then the diagonal."""
    scores = _ranked_scores(q_means, k_means, kv_tokens, block, False)
    ranked = selection._column_scores(scores) if stripes else scores
    kept = kv_block_mask(*selection.select_blocks_top_p(ranked, top_p, min_blocks, max_blocks), scores.shape[-1])
    kept = kept.expand_as(scores)
    if keep_diagonal:
        kept = kept | torch.eye(*scores.shape[2:], dtype=torch.bool)
    return kept


# (batch, heads, q_tokens, kv_tokens, head_dim, block): ragged last blocks, key-block counts that are not
# powers of two (6, 21), more query blocks than key blocks, a head_dim that is not a power of two.
SHAPES = [(2, 3, 37, 45, 16, 8), (1, 2, 100, 83, 24, 4), (2, 1, 60, 21, 32, 5)]
# Every dtype on the first shape, one on each other (the dtype only changes the values the kernel reads).
CASES = [(SHAPES[0], dtype) for dtype in DTYPES] + [(SHAPES[1], torch.float16), (SHAPES[2], torch.bfloat16)]


@interpreted
@pytest.mark.parametrize("kind", sorted(FUSED))
@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=lambda c: str(c).replace(" ", "").replace("torch.", ""))
def test_fused_triton_equals_reference(kind, top_p, shape, dtype):
    fused, reference = FUSED[kind]
    batch, heads, q_tokens, kv_tokens, head_dim, block = shape
    q_means, k_means = _means(batch, heads, q_tokens, kv_tokens, head_dim, block, torch.float32, seed=100 + q_tokens)
    # Means in the test dtype: both paths read them as float32, so they see the same rounded values.
    q_means, k_means = q_means.to(dtype), k_means.to(dtype)
    assert _ambiguous_rows(_ranked_scores(q_means, k_means, kv_tokens, block, kind == "stripes"), top_p) == 0
    expected = reference(q_means, k_means, kv_tokens, block, top_p)
    got = fused(q_means, k_means, kv_tokens, block, top_p, backend="triton")
    num_kv_blocks = k_means.shape[2]
    _check_layout(*got, num_kv_blocks, num_kv_blocks)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])
    if top_p < 1.0:
        assert 0 < float(got[1].float().mean()) < num_kv_blocks  # the cut is exercised, not every block kept


@interpreted
@pytest.mark.parametrize("kind", sorted(FUSED))
@pytest.mark.parametrize(
    ("top_p", "min_blocks", "max_blocks", "keep_diagonal"),
    [(0.9, 1, 3, True), (0.5, 4, None, True), (0.3, 0, None, False), (1.0, 1, 2, False), (0.05, 2, 2, True)],
)
def test_fused_clamps_and_width(kind, top_p, min_blocks, max_blocks, keep_diagonal):
    fused, reference = FUSED[kind]
    q_means, k_means = _means(2, 2, 40, 43, 16, 4, torch.bfloat16, seed=7)
    num_kv_blocks = k_means.shape[2]
    width = selection.fused_selection_width(num_kv_blocks, min_blocks, max_blocks, keep_diagonal)
    assert width == (num_kv_blocks if max_blocks is None else max_blocks + int(keep_diagonal))
    options = {"min_blocks": min_blocks, "max_blocks": max_blocks, "keep_diagonal": keep_diagonal}
    expected = reference(q_means, k_means, 43, 4, top_p, **options)
    got = fused(q_means, k_means, 43, 4, top_p, backend="triton", **options)
    _check_layout(*got, num_kv_blocks, width)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    stripes = kind == "stripes"
    old = _old_path(q_means, k_means, 43, 4, top_p, min_blocks, max_blocks, keep_diagonal, stripes)
    assert torch.equal(kv_block_mask(*got, num_kv_blocks), old)
    assert bool((got[1] <= width).all()) and bool((got[1] >= min(min_blocks, num_kv_blocks)).all())


@interpreted
@pytest.mark.parametrize("kind", sorted(FUSED))
def test_fused_ties_keep_the_lower_block_index(kind):
    fused, reference = FUSED[kind]
    block, num_kv_blocks, head_dim = 4, 14, 16
    # Key blocks in identical pairs (2m, 2m + 1), all full: each pair scores exactly equal on both paths.
    pairs = _random((2, 2, num_kv_blocks // 2, head_dim), torch.float32, seed=21, spread=2.0)
    k_means = pairs.repeat_interleave(2, dim=2)
    q_means = _random((2, 2, 9, head_dim), torch.float32, seed=22)
    kv_tokens = num_kv_blocks * block
    scores = _ranked_scores(q_means, k_means, kv_tokens, block, kind == "stripes")
    assert torch.equal(scores[..., 0::2], scores[..., 1::2])
    for max_blocks in (1, 3, 5):  # top_p = 1 with an odd budget: the cut falls inside a tied pair
        expected = reference(q_means, k_means, kv_tokens, block, 1.0, max_blocks=max_blocks, keep_diagonal=False)
        got = fused(q_means, k_means, kv_tokens, block, 1.0, max_blocks=max_blocks, keep_diagonal=False,
                    backend="triton")
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        kept = kv_block_mask(*got, num_kv_blocks)
        # Of the pair the budget cuts, the even (lower) block is kept and its twin is not.
        assert bool((kept[..., 0::2] >= kept[..., 1::2]).all())
        assert int((kept[..., 0::2] != kept[..., 1::2]).sum(-1).max()) == 1
    # Every key block equal (one mean, full blocks): an odd count of 7 blocks puts no partial sum near the target,
    # so top_p = 0.5 keeps exactly blocks 0..3.
    flat = _random((1, 1, 1, head_dim), torch.float32, seed=23).expand(1, 1, 7, head_dim).contiguous()
    q_one = _random((1, 1, 3, head_dim), torch.float32, seed=24)
    got = fused(q_one, flat, 7 * block, block, 0.5, keep_diagonal=False, backend="triton")
    assert got[1].tolist() == [[[4, 4, 4]]]
    assert got[0][..., :4].tolist() == [[[[0, 1, 2, 3]] * 3]]


@interpreted
def test_fused_long_rows_and_strided_means():
    # 929 key blocks (HunyuanVideo at block 128): a 1024-wide padded row, means read through strided views.
    num_kv_blocks, block, head_dim = 929, 2, 8
    k_means = _random((1, num_kv_blocks, 1, head_dim), torch.float32, seed=31, spread=4.0).transpose(1, 2)
    q_means = _random((1, 2, 1, head_dim), torch.float32, seed=32).transpose(1, 2)
    kv_tokens = num_kv_blocks * block - 1
    for kind, (fused, reference) in FUSED.items():
        assert _ambiguous_rows(_ranked_scores(q_means, k_means, kv_tokens, block, kind == "stripes"), 0.9) == 0
        expected = reference(q_means, k_means, kv_tokens, block, 0.9)
        got = fused(q_means, k_means, kv_tokens, block, 0.9, backend="triton")
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", [PooledTopP(0.6), VerticalStripe(0.5)], ids=lambda s: s.name)
def test_strategy_pattern_equals_unfused_path(strategy, dtype):
    layout = TokenLayout(frames=3, rows=5, cols=7)  # 105 tokens: ragged last block of 16
    generator = torch.Generator().manual_seed(41)
    q, k = (torch.randn(2, 3, layout.video_tokens, 16, generator=generator).to(dtype) for _ in range(2))
    pattern = strategy.build(q, k, PatternContext(layout, 16, {}))
    num_kv_blocks = 7
    assert pattern.kv_block_indices.shape == (2, 3, 7, num_kv_blocks)  # fixed width, no host sync
    scores = selection.pooled_block_scores(q, k, 16, 16)
    if isinstance(strategy, PooledTopP):
        diagonal = torch.eye(7, num_kv_blocks, dtype=torch.bool).expand_as(scores)
        old = kv_block_mask(*selection.select_blocks_top_p(scores, 0.6, always_keep=diagonal), num_kv_blocks)
    else:
        column = selection._column_scores(scores)
        shared = kv_block_mask(*selection.select_blocks_top_p(column, 0.5), num_kv_blocks)
        old = shared.expand_as(scores) | torch.eye(7, num_kv_blocks, dtype=torch.bool)
    assert torch.equal(pattern.block_mask(), old)
    sizes = torch.tensor([16.0] * 6 + [9.0])
    density = torch.einsum("q,bgqk,k->bg", sizes, old.float(), sizes).mean(0) / 105.0**2
    torch.testing.assert_close(pattern.density(), density, rtol=1e-6, atol=0)


def test_fused_selection_is_one_static_node_under_export_and_compile():
    class DraftSelect(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q_means, k_means = selection.pooled_block_means(q, 8), selection.pooled_block_means(k, 8)
            return selection.pooled_select_top_p(q_means, k_means, k.shape[2], 8, 0.8)

    q, k = _random((1, 2, 24, 16), torch.float32, 51), _random((1, 2, 45, 16), torch.float32, 52)
    program = torch.export.export(DraftSelect(), (q, k))
    nodes = [node for node in program.graph.nodes if node.op == "call_function"]
    select = [node for node in nodes if str(node.target) == "vdopt.pooled_select_top_p.default"]
    assert len(select) == 1
    assert all(isinstance(size, int) for value in select[0].meta["val"] for size in value.shape)
    assert tuple(select[0].meta["val"][0].shape) == (1, 2, 3, 6)
    eager = DraftSelect()(q, k)
    for got in (program.module()(q, k), torch.compile(DraftSelect(), backend="aot_eager", fullgraph=True)(q, k)):
        assert all(torch.equal(a, b) for a, b in zip(got, eager, strict=True))
    q_means, k_means = selection.pooled_block_means(q, 8), selection.pooled_block_means(k, 8)
    for op in (torch.ops.vdopt.pooled_select_top_p.default, torch.ops.vdopt.pooled_select_vertical_stripes.default):
        torch.library.opcheck(
            op,
            (q_means, k_means, 45, 8, 0.8, None, 1, 3, True, "reference"),
            test_utils=("test_schema", "test_faketensor"),
        )


@interpreted
def test_fused_selection_argument_errors(monkeypatch):
    q_means, k_means = _means(1, 1, 16, 20, 8, 4, torch.float32, seed=61)
    with pytest.raises(ValueError, match="kv_tokens=21"):
        selection.pooled_select_top_p(q_means, k_means, 21, 4, 0.9)
    with pytest.raises(ValueError, match="top_p"):
        selection.pooled_select_top_p(q_means, k_means, 20, 4, 1.5)
    with pytest.raises(ValueError, match="head_dim"):
        selection.pooled_select_top_p(q_means, k_means[..., :4], 20, 4, 0.9)
    monkeypatch.setattr(selection, "MAX_FUSED_KV_BLOCKS", 4)
    with pytest.raises(ValueError, match="backend='reference'"):
        selection.pooled_select_top_p(q_means, k_means, 20, 4, 0.9, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("tokens", "heads", "block"), [(32760, 12, 128), (32760, 12, 64), (118800, 4, 128)])
def test_gpu_fused_selection_matches_reference(tokens, heads, block):
    # Wan2.1 (256 / 512 key blocks) and HunyuanVideo (929 key blocks) shapes; rows within rounding of a decision
    # may go either way, every other row must match exactly.
    generator = torch.Generator(device="cuda").manual_seed(71)
    q, k = (torch.randn(1, heads, tokens, 128, generator=generator, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    q_means, k_means = selection.pooled_block_means(q, block), selection.pooled_block_means(k, block)
    for kind, (fused, reference) in FUSED.items():
        got = fused(q_means, k_means, tokens, block, 0.9)
        expected = reference(q_means, k_means, tokens, block, 0.9)
        num_kv_blocks = k_means.shape[2]
        validate_kv_block_list(*got, num_kv_blocks)
        differ = (kv_block_mask(*got, num_kv_blocks) != kv_block_mask(*expected, num_kv_blocks)).any(-1)
        ranked = _ranked_scores(q_means, k_means, tokens, block, kind == "stripes")
        # A stripes head shares one selection: an ambiguous column may change every row of that head.
        rows_per_selection = q_means.shape[2] if kind == "stripes" else 1
        allowed = _ambiguous_rows(ranked, 0.9) * rows_per_selection
        assert int(differ.sum()) <= allowed, (kind, int(differ.sum()), allowed)


# --- cluster selection (SemanticKMeans): centroid scores weighted by cluster sizes -----------------------------


def _clusters(batch, heads, q_clusters, kv_clusters, head_dim, dtype, seed, empty=(1, 4)):
    """k-means-like inputs: random centroids (keys spread wider, so top-p drops clusters) and key cluster offsets
    of random sizes with the clusters in ``empty`` empty in every head."""
    generator = torch.Generator().manual_seed(seed)
    q_centroids = torch.randn(batch, heads, q_clusters, head_dim, generator=generator).to(dtype)
    k_centroids = (4.0 * torch.randn(batch, heads, kv_clusters, head_dim, generator=generator)).to(dtype)
    sizes = torch.randint(1, 40, (batch, heads, kv_clusters), generator=generator, dtype=torch.int32)
    sizes[..., [c for c in empty if c < kv_clusters]] = 0
    offsets = torch.nn.functional.pad(sizes.cumsum(-1, dtype=torch.int32), (1, 0))
    return q_centroids, k_centroids, offsets


# (batch, heads, query clusters, key clusters, head_dim): cluster counts that are not powers of two, more key
# clusters than one 16-row program of queries, head dims 64 and 128.
CLUSTER_SHAPES = [(2, 3, 5, 9, 64), (1, 2, 21, 40, 128), (2, 1, 17, 64, 64)]
CLUSTER_CASES = [(CLUSTER_SHAPES[0], dtype) for dtype in DTYPES] + [
    (CLUSTER_SHAPES[1], torch.bfloat16), (CLUSTER_SHAPES[2], torch.float16)
]


@interpreted
@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
@pytest.mark.parametrize(("shape", "dtype"), CLUSTER_CASES, ids=lambda c: str(c).replace(" ", "").replace("torch.", ""))
def test_cluster_select_triton_equals_reference(top_p, shape, dtype):
    kv_clusters = shape[3]
    q_centroids, k_centroids, offsets = _clusters(*shape, dtype, seed=200 + kv_clusters)
    scores = selection.cluster_scores_reference(q_centroids, k_centroids, offsets)
    assert _ambiguous_rows(scores, top_p) == 0
    assert bool((scores[:, :, :, 1] == 0).all())  # an empty cluster scores 0
    expected = selection.cluster_select_top_p_reference(q_centroids, k_centroids, offsets, top_p)
    got = selection.cluster_select_top_p(q_centroids, k_centroids, offsets, top_p, backend="triton")
    _check_layout(*got, kv_clusters, kv_clusters)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    # The same kept set as the unfused path SemanticKMeans ran before (scores, then select_blocks_top_p).
    old = kv_block_mask(*selection.select_blocks_top_p(scores, top_p), kv_clusters)
    kept = kv_block_mask(*got, kv_clusters)
    assert torch.equal(kept, old)
    if top_p < 1.0:
        assert not bool(kept[..., 1].any() | kept[..., 4].any())  # empty clusters are never needed
        assert 0 < float(got[1].float().mean()) < kv_clusters


@interpreted
@pytest.mark.parametrize(("min_blocks", "max_blocks"), [(3, None), (1, 4), (2, 2)])
def test_cluster_select_clamps_width_and_int64_offsets(min_blocks, max_blocks):
    q_centroids, k_centroids, offsets = _clusters(2, 2, 6, 11, 64, torch.float32, seed=210)
    args = (q_centroids, k_centroids, offsets.long(), 0.3)
    options = {"min_blocks": min_blocks, "max_blocks": max_blocks, "scale": 0.05}
    expected = selection.cluster_select_top_p_reference(*args, **options)
    got = selection.cluster_select_top_p(*args, **options, backend="triton")
    width = 11 if max_blocks is None else max_blocks
    _check_layout(*got, 11, width)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert int(got[1].min()) >= min_blocks and int(got[1].max()) <= (max_blocks or 11)


def test_cluster_select_is_one_static_node_and_checks_arguments():
    q_centroids, k_centroids, offsets = _clusters(1, 2, 4, 6, 16, torch.float32, seed=220)

    def select(a, b, o):
        return selection.cluster_select_top_p(a, b, o, 0.8)

    eager = select(q_centroids, k_centroids, offsets)
    compiled = torch.compile(select, backend="aot_eager", fullgraph=True)(q_centroids, k_centroids, offsets)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
    assert tuple(eager[0].shape) == (1, 2, 4, 6)
    torch.library.opcheck(
        torch.ops.vdopt.cluster_select_top_p.default,
        (q_centroids, k_centroids, offsets, 0.8, None, 1, None, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )
    with pytest.raises(ValueError, match="kv_offsets"):
        select(q_centroids, k_centroids, offsets[..., :-1])
    with pytest.raises(ValueError, match="head_dim"):
        select(q_centroids, k_centroids[..., :8], offsets)
