"""Runtime of one attention site under a plan: sparse video-video attention, exact text attention, merged.

Text tokens never enter a sparse pattern: video queries attend to text keys densely (merged with the sparse
video part through their log-sum-exps, which is exact), and text queries attend to every key densely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vdopt.kernels.block_sparse_attention import block_sparse_attention
from vdopt.kernels.kmeans import gather_tokens, scatter_tokens
from vdopt.sites import TokenLayout
from vdopt.strategies import Dense, PatternContext, SparsePattern, Strategy


def _permute(x: torch.Tensor, perm: torch.Tensor | None, inverse: bool = False) -> torch.Tensor:
    if perm is None:
        return x
    if perm.dim() == 1:
        if inverse:
            return torch.empty_like(x).index_copy_(2, perm, x)
        return x.index_select(2, perm)
    perm = perm.expand(*x.shape[:2], -1)
    return scatter_tokens(x, perm) if inverse else gather_tokens(x, perm)


def head_runs(members: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive head numbers in ``members``: ``(position in members, first head, length)``."""
    runs: list[tuple[int, int, int]] = []
    for position, head in enumerate(members):
        if runs and runs[-1][1] + runs[-1][2] == head:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, head, 1))
    return runs


# Head subsets are taken as slices, not with index_select / index_put: on the H100 (benchmarks/site_split_profile.py,
# site_split_profile.json: the trained proxy's token-major q/k/v, [32, 4, 4608, 64] bf16) index_select of two heads
# ran 0.17 ms per tensor (about 0.2 TB/s) and index_put of two heads' output 0.10 ms, which together were the whole
# 0.65 ms a dense/sparse split took beyond its two launches.
def select_heads(x: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    """``x[:, members]``: a view where the heads are consecutive, else one concatenation of views (a copy)."""
    runs = head_runs(members)
    if len(runs) == 1:
        _, first, count = runs[0]
        return x[:, first:first + count]
    return torch.cat([x[:, first:first + count] for _, first, count in runs], dim=1)


def write_heads(out: torch.Tensor, members: Sequence[int], value: torch.Tensor) -> None:
    """``out[:, members] = value`` as one slice copy per run of consecutive heads."""
    for position, first, count in head_runs(members):
        out[:, first:first + count] = value[:, position:position + count]


def dense_heads_attention(out: torch.Tensor, members: Sequence[int], q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float) -> None:
    """SDPA of the heads ``members`` written into ``out``: one call per run of consecutive heads, on views (no copy
    of q/k/v; a run's output is copied into ``out`` once)."""
    for _, first, count in head_runs(members):
        heads = slice(first, first + count)
        mask = attn_mask if attn_mask is None or attn_mask.shape[1] == 1 else attn_mask[:, heads]
        out[:, heads] = F.scaled_dot_product_attention(q[:, heads], k[:, heads], v[:, heads], attn_mask=mask,
                                                       scale=scale)


_HEAD_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _head_index_tensor(heads: Sequence[int], device: torch.device) -> torch.Tensor:
    """The int32 head list on ``device``, made once per (list, device): no host-to-device copy per call."""
    key = (tuple(heads), device)
    index = _HEAD_INDEX_CACHE.get(key)
    if index is None:
        if len(_HEAD_INDEX_CACHE) > 4096:
            _HEAD_INDEX_CACHE.clear()
        index = _HEAD_INDEX_CACHE[key] = torch.tensor(heads, device=device, dtype=torch.int32)
    return index


# Who applies a clustered pattern's query permutation: "kernel" has the cluster op gather Q (one launch, so its tiles
# still load as TMA boxes) and scatter out and lse as it stores them; "launches" gathers Q and scatters out and lse
# with separate launches. On the H100 (strategy_overheads_2026-12-05_rounds.json, Wan2.1-1.3B) "kernel" made the whole
# SVG2 step 0.10-0.16 ms (about 1% of dense attention) cheaper at 64 clusters and at 128 with 1 iteration, and was
# within the timing noise at 128 clusters with 3 iterations and at 256. Keys and values are always gathered by
# launches: gathered in the kernel they lose their TMA boxes, which costs more than the launches.
CLUSTER_QUERY_PERMUTATION = "kernel"


def pattern_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, scale: float,
    *, query_permutation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of video tokens ``q, k, v: [B, G, N, D]`` under ``pattern`` -> (out, lse float32), original order.

    ``query_permutation`` ("kernel" or "launches", default :data:`CLUSTER_QUERY_PERMUTATION`) says how a clustered
    pattern's query permutation is applied; both give the same result."""
    mode = CLUSTER_QUERY_PERMUTATION if query_permutation is None else query_permutation
    if mode not in ("kernel", "launches"):
        raise ValueError(f"query_permutation must be 'kernel' or 'launches', got {mode!r}")
    kp, vp = _permute(k, pattern.kv_perm), _permute(v, pattern.kv_perm)
    if pattern.is_clustered:
        from vdopt.kernels.cluster_sparse_attention import cluster_sparse_attention

        lists = (pattern.q_offsets, pattern.kv_offsets, pattern.kv_block_indices, pattern.kv_block_counts)
        if mode == "kernel" and pattern.q_perm is not None:
            return cluster_sparse_attention(q, kp, vp, *lists, scale=scale, q_perm=pattern.q_perm)
        out, lse = cluster_sparse_attention(_permute(q, pattern.q_perm), kp, vp, *lists, scale=scale)
    else:
        out, lse = block_sparse_attention(
            _permute(q, pattern.q_perm), kp, vp, pattern.kv_block_indices, pattern.kv_block_counts,
            pattern.block_size, pattern.block_size, scale=scale,
        )
    out = _permute(out, pattern.q_perm, inverse=True)
    lse = _permute(lse[..., None], pattern.q_perm, inverse=True)[..., 0]
    return out, lse


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float32 attention over few keys (text), with an additive key bias ``[B, 1|G, 1, Nk]``."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
    return torch.matmul(probs, v.float()), lse


def merge_partial_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Softmax-exact combination of attention over two disjoint key sets from their outputs and log-sum-exps."""
    top = torch.maximum(lse_a, lse_b).clamp(min=torch.finfo(torch.float32).min)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    return (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / (wa + wb).clamp(min=1e-30)[..., None]


def additive_key_bias(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` (bool keep-mask or additive float) as an additive float32 bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _fused_block_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: list[SparsePattern], scale: float,
    heads: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block-sparse launch for several head groups that share a token order (head fusion).

    With ``heads``, ``q, k, v: [B, H, N, D]`` are the whole site's tokens (views, not copied) and the kernel reads
    the listed heads in place; without, they hold exactly the patterns' heads. Each head brings its own key-block
    lists, padded to a common width (padding is never read).
    """
    width = max(p.kv_block_indices.shape[-1] for p in patterns)
    indices = torch.cat([F.pad(p.kv_block_indices, (0, width - p.kv_block_indices.shape[-1])) for p in patterns], dim=1)
    counts = torch.cat([p.kv_block_counts for p in patterns], dim=1)
    block = patterns[0].block_size
    head_index = None if heads is None else _head_index_tensor(heads, q.device)
    return block_sparse_attention(q, k, v, indices, counts, block, block, scale=scale, head_indices=head_index)


def _keeps_token_order(pattern: SparsePattern) -> bool:
    return pattern.q_perm is None and pattern.kv_perm is None and not pattern.is_clustered


def _shares_static_order(pattern: SparsePattern) -> bool:
    """One token order for every query and key of every head (a layout order, not per-head clusters)."""
    return (not pattern.is_clustered and pattern.q_perm is not None and pattern.q_perm is pattern.kv_perm
            and pattern.q_perm.dim() == 1)


def sparse_site_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    layout: TokenLayout,
    head_strategies: list[Strategy],
    ctx: PatternContext,
    observe: Callable[[list[int], Strategy, SparsePattern | None], None] | None = None,
) -> torch.Tensor:
    """Self-attention ``q, k, v: [B, H, N, D]`` with one strategy per head; same result layout as SDPA.

    Heads are launched by kernel, not by strategy: dense heads in one SDPA call, every head whose pattern keeps the
    token order in one fused block-sparse launch, and each permuted (temporal, tile, k-means) group in its own.
    ``attn_mask`` may only be a key-padding mask ``[B, 1|H, 1, N]``; where it masks a video key the call runs
    dense (patterns assume every video key exists). ``observe(heads, strategy, pattern)``, if given, is called
    for every head group with the pattern it ran (None: dense), e.g. to measure the density actually kept.
    """
    heads = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = additive_key_bias(attn_mask)
    v0, v1 = layout.video_span
    if bias is not None and bool((bias[..., v0:v1] != 0).any()):
        if observe is not None:
            observe(list(range(heads)), Dense(), None)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    groups: dict[Strategy, list[int]] = {}
    for head, strategy in enumerate(head_strategies):
        groups.setdefault(strategy, []).append(head)
    out = torch.empty_like(q)
    text = [(a, b) for a, b in ((0, v0), (v1, q.shape[2])) if b > a]
    qv, kv, vv = q[:, :, v0:v1], k[:, :, v0:v1], v[:, :, v0:v1]

    def heads_of(x: torch.Tensor | None, members: list[int]) -> torch.Tensor | None:
        # Every head in another order (a fused launch lists its groups' heads one group after another) is a copy.
        if x is None or x.shape[1] == 1 or members == list(range(heads)):
            return x
        return select_heads(x, members)

    def finish(members: list[int], video_out: torch.Tensor, video_lse: torch.Tensor) -> None:
        """Merge the text keys into the video rows, attend the text rows densely, write the heads' output."""
        if not text:  # the video rows are every row
            write_heads(out, members, video_out.to(q.dtype))
            return
        kg, vg, qg = heads_of(k, members), heads_of(v, members), heads_of(q, members)
        kt = torch.cat([kg[:, :, a:b] for a, b in text], dim=2)
        vt = torch.cat([vg[:, :, a:b] for a, b in text], dim=2)
        bias_g = heads_of(bias, members)
        bias_t = None if bias_g is None else torch.cat([bias_g[..., a:b] for a, b in text], dim=-1)
        text_out, text_lse = _attention_with_lse(qg[:, :, v0:v1], kt, vt, bias_t, scale)
        video_out = merge_partial_attention(video_out, video_lse, text_out, text_lse)
        result = torch.empty_like(qg)
        result[:, :, v0:v1] = video_out.to(q.dtype)
        for a, b in text:
            result[:, :, a:b] = F.scaled_dot_product_attention(qg[:, :, a:b], kg, vg, attn_mask=heads_of(attn_mask, members), scale=scale)
        write_heads(out, members, result)

    fused_patterns: list[SparsePattern] = []
    fused_heads: list[int] = []
    # Heads whose patterns share one static token order (e.g. every temporal head, every tile head): one gather
    # of their q/k/v into that order, one fused launch, one scatter back, whatever their windows.
    permuted: dict[int, tuple[torch.Tensor, list[SparsePattern], list[int]]] = {}
    for strategy, members in groups.items():
        if isinstance(strategy, Dense):
            dense_heads_attention(out, members, q, k, v, attn_mask, scale)
            if observe is not None:
                observe(members, strategy, None)
            continue
        if strategy.dynamic:
            pattern = strategy.build(heads_of(qv, members), heads_of(kv, members), ctx)
        else:  # layout-only patterns read q/k's shape, not their values: a view of the right shape, no copy
            pattern = strategy.build(qv[:, : len(members)], kv[:, : len(members)], ctx)
        if observe is not None:
            observe(members, strategy, pattern)
        if _keeps_token_order(pattern):
            fused_patterns.append(pattern)
            fused_heads.extend(members)
        elif _shares_static_order(pattern):
            perm = pattern.q_perm
            entry = permuted.setdefault(id(perm), (perm, [], []))
            entry[1].append(pattern)
            entry[2].extend(members)
        else:
            video_out, video_lse = pattern_attention(heads_of(qv, members), heads_of(kv, members), heads_of(vv, members), pattern, scale)
            finish(members, video_out, video_lse)
    if fused_patterns:
        video_out, video_lse = _fused_block_launch(qv, kv, vv, fused_patterns, scale, fused_heads)
        finish(fused_heads, video_out, video_lse)
    for perm, patterns, members in permuted.values():
        qp, kp, vp = (heads_of(x, members).index_select(2, perm) for x in (qv, kv, vv))
        video_out, video_lse = _fused_block_launch(qp, kp, vp, patterns, scale)
        video_out = _permute(video_out, perm, inverse=True)
        video_lse = _permute(video_lse[..., None], perm, inverse=True)[..., 0]
        finish(members, video_out, video_lse)
    return out
