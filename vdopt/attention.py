"""Runtime of one attention site under a plan: sparse video-video attention, exact text attention, merged.

Text tokens never enter a sparse pattern: video queries attend to text keys densely (merged with the sparse
video part through their log-sum-exps, which is exact), and text queries attend to every key densely.
"""

from __future__ import annotations

from collections.abc import Callable

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


def pattern_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of video tokens ``q, k, v: [B, G, N, D]`` under ``pattern`` -> (out, lse float32), original order."""
    qp, kp, vp = _permute(q, pattern.q_perm), _permute(k, pattern.kv_perm), _permute(v, pattern.kv_perm)
    if pattern.is_clustered:
        from vdopt.kernels.cluster_sparse_attention import cluster_sparse_attention

        out, lse = cluster_sparse_attention(
            qp, kp, vp, pattern.q_offsets, pattern.kv_offsets, pattern.kv_block_indices, pattern.kv_block_counts,
            scale=scale,
        )
    else:
        out, lse = block_sparse_attention(
            qp, kp, vp, pattern.kv_block_indices, pattern.kv_block_counts, pattern.block_size, pattern.block_size,
            scale=scale,
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


def _select_heads(x: torch.Tensor | None, heads: torch.Tensor) -> torch.Tensor | None:
    if x is None or x.shape[1] == 1:
        return x
    return x.index_select(1, heads)


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
    text = [(0, v0), (v1, q.shape[2])]
    text = [(a, b) for a, b in text if b > a]
    for strategy, members in groups.items():
        idx = torch.tensor(members, device=q.device)
        qg, kg, vg = (x.index_select(1, idx) if len(members) < heads else x for x in (q, k, v))
        mask_g = _select_heads(attn_mask, idx) if len(members) < heads else attn_mask
        if isinstance(strategy, Dense):
            result = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask_g, scale=scale)
            if observe is not None:
                observe(members, strategy, None)
        else:
            qv, kv, vv = qg[:, :, v0:v1], kg[:, :, v0:v1], vg[:, :, v0:v1]
            pattern = strategy.build(qv, kv, ctx)
            if observe is not None:
                observe(members, strategy, pattern)
            video_out, video_lse = pattern_attention(qv, kv, vv, pattern, scale)
            if text:
                kt = torch.cat([kg[:, :, a:b] for a, b in text], dim=2)
                vt = torch.cat([vg[:, :, a:b] for a, b in text], dim=2)
                bias_t = None
                if bias is not None:
                    bias_g = _select_heads(bias, idx) if len(members) < heads else bias
                    bias_t = torch.cat([bias_g[..., a:b] for a, b in text], dim=-1)
                text_out, text_lse = _attention_with_lse(qv, kt, vt, bias_t, scale)
                video_out = merge_partial_attention(video_out, video_lse, text_out, text_lse)
            result = torch.empty_like(qg)
            result[:, :, v0:v1] = video_out.to(q.dtype)
            for a, b in text:
                result[:, :, a:b] = F.scaled_dot_product_attention(qg[:, :, a:b], kg, vg, attn_mask=mask_g, scale=scale)
        if len(members) < heads:
            out.index_copy_(1, idx, result)
        else:
            out = result
    return out
