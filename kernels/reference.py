"""Pure-PyTorch definitions of vdopt's sparse-attention ops: the ground truth every kernel must equal.

Layouts shared by all ops:
- ``q: [batch, heads, q_tokens, head_dim]``, ``k, v: [batch, heads, kv_tokens, head_dim]`` (any strides).
- Query block ``i`` covers tokens ``[i * block_m, min((i + 1) * block_m, q_tokens))``; key block ``j`` likewise
  with ``block_n``. The last block of either may be ragged.
- ``kv_block_indices: int32 [batch, heads, q_blocks, max_kept]``: the key blocks each query block attends to;
  only the first ``kv_block_counts[b, h, i]`` entries are read, the rest is padding of any value.
- A query row with no key block gets output 0 and log-sum-exp ``-inf`` (it attends to nothing).
- Returns ``(out, lse)``: ``out`` in q's dtype, ``lse: float32 [batch, heads, q_tokens]`` in natural log units.
All arithmetic is float32, whatever the input dtype.
"""

from __future__ import annotations

import torch

# Query rows per chunk of the reference loop: bounds the [rows, kv_tokens] score matrix it materialises.
_REFERENCE_ROWS_PER_CHUNK = 1024


def validate_kv_block_list(
    kv_block_indices: torch.Tensor, kv_block_counts: torch.Tensor, num_kv_blocks: int
) -> None:
    """Raise ValueError unless every used index is in ``[0, num_kv_blocks)`` and no row repeats a block."""
    if kv_block_indices.dim() != 4 or kv_block_counts.dim() != 3:
        raise ValueError(
            "kv_block_indices must be [batch, heads, q_blocks, max_kept] and kv_block_counts "
            f"[batch, heads, q_blocks]; got {tuple(kv_block_indices.shape)} and {tuple(kv_block_counts.shape)}"
        )
    if kv_block_indices.shape[:3] != kv_block_counts.shape:
        raise ValueError(
            f"kv_block_indices {tuple(kv_block_indices.shape)} and kv_block_counts "
            f"{tuple(kv_block_counts.shape)} disagree on [batch, heads, q_blocks]"
        )
    max_kept = kv_block_indices.shape[-1]
    if bool((kv_block_counts < 0).any()) or bool((kv_block_counts > max_kept).any()):
        raise ValueError(f"kv_block_counts must lie in [0, {max_kept}] (the last dim of kv_block_indices)")
    used = torch.arange(max_kept, device=kv_block_indices.device) < kv_block_counts[..., None]
    idx = kv_block_indices.long()
    bad = used & ((idx < 0) | (idx >= num_kv_blocks))
    if bool(bad.any()):
        raise ValueError(
            f"kv_block_indices holds {int(idx[bad][0])}, outside [0, {num_kv_blocks}) key blocks; "
            "rebuild the block list for this token count"
        )
    # Sort the used entries (padding pushed to the end with distinct sentinels) and look for equal neighbours.
    sentinel = num_kv_blocks + torch.arange(max_kept, device=idx.device)
    ordered = torch.where(used, idx, sentinel).sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("kv_block_indices repeats a key block within one query block; each block may appear once")


def kv_block_mask(
    kv_block_indices: torch.Tensor, kv_block_counts: torch.Tensor, num_kv_blocks: int
) -> torch.Tensor:
    """Dense ``bool [batch, heads, q_blocks, num_kv_blocks]`` view of a key-block list."""
    max_kept = kv_block_indices.shape[-1]
    used = torch.arange(max_kept, device=kv_block_indices.device) < kv_block_counts[..., None]
    idx = torch.where(used, kv_block_indices.long(), num_kv_blocks)
    mask = torch.zeros(*idx.shape[:3], num_kv_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_kv_blocks]


def kv_block_list_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`kv_block_mask`: ``bool [B, H, q_blocks, kv_blocks]`` -> (int32 indices, int32 counts).

    Indices of each row are ascending; padding repeats the row's last kept index (or 0), which kernels never read.
    """
    counts = mask.sum(-1).to(torch.int32)
    max_kept = max(int(counts.max()) if counts.numel() else 0, 1)
    # Stable descending sort of the 0/1 mask puts kept blocks first, in ascending index order.
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :max_kept]
    used = torch.arange(max_kept, device=mask.device) < counts[..., None]
    last = order.gather(-1, (counts.long() - 1).clamp(min=0)[..., None])
    indices = torch.where(used, order, last).to(torch.int32)
    return indices.contiguous(), counts.contiguous()


def _masked_attention_rows(
    q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 attention of ``q_rows [B,H,R,D]`` over ``k, v [B,H,N,D]`` restricted to ``keep [B,H,R,N]``."""
    scores = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
    probs = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return torch.matmul(probs, v.float()), lse


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    head_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query block over its listed key blocks.

    ``head_indices: int [group]`` (optional) restricts the call to those heads of q/k/v (a head-group launch);
    then ``kv_block_indices``/``counts`` and the outputs have ``group`` heads instead of ``heads``.
    """
    if head_indices is not None:
        head_indices = head_indices.long().to(q.device)
        q, k, v = q.index_select(1, head_indices), k.index_select(1, head_indices), v.index_select(1, head_indices)
    batch, heads, q_tokens, head_dim = q.shape
    kv_tokens = k.shape[2]
    num_q_blocks = -(-q_tokens // block_m)
    num_kv_blocks = -(-kv_tokens // block_n)
    expected = (batch, heads, num_q_blocks)
    if tuple(kv_block_counts.shape) != expected:
        raise ValueError(
            f"kv_block_counts has shape {tuple(kv_block_counts.shape)}, expected {expected} for "
            f"{q_tokens} query tokens in blocks of {block_m}"
        )
    validate_kv_block_list(kv_block_indices, kv_block_counts, num_kv_blocks)
    scale = head_dim**-0.5 if scale is None else scale
    block_keep = kv_block_mask(kv_block_indices, kv_block_counts, num_kv_blocks)
    key_block_of_token = torch.arange(kv_tokens, device=q.device) // block_n
    out = torch.empty(batch, heads, q_tokens, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, q_tokens, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(block_m, (_REFERENCE_ROWS_PER_CHUNK // block_m) * block_m)
    for start in range(0, q_tokens, rows_per_chunk):
        stop = min(start + rows_per_chunk, q_tokens)
        query_block_of_row = torch.arange(start, stop, device=q.device) // block_m
        keep = block_keep[:, :, query_block_of_row][..., key_block_of_token]
        out[:, :, start:stop], lse[:, :, start:stop] = _masked_attention_rows(q[:, :, start:stop], k, v, keep, scale)
    return out.to(q.dtype), lse


def cluster_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_cluster_indices: torch.Tensor,
    kv_cluster_counts: torch.Tensor,
    scale: float | None = None,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over variable-size clusters (the layout after a semantic k-means permutation).

    q/k/v are already permuted so each cluster is contiguous, unless ``q_perm`` / ``kv_perm`` (int ``[tokens]`` or
    ``[B, H, tokens]``; position p of the permuted order holds original token ``perm[p]``) are given: then q and
    k/v are in their original order, are permuted first, and out and lse come back in q's original order.
    ``q_offsets: int32 [B, H, q_clusters + 1]`` and ``kv_offsets: int32 [B, H, kv_clusters + 1]`` are ascending cluster boundaries, first 0 and last the token
    count; clusters may be empty. ``kv_cluster_indices/counts`` list the key clusters of each query cluster, as in
    the block op.
    """
    if q_perm is not None or kv_perm is not None:
        from vdopt.kernels.kmeans import gather_tokens_reference, scatter_tokens_reference

        def gather(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
            return x if perm is None else gather_tokens_reference(x, perm.expand(*x.shape[:2], -1))

        out, lse = cluster_sparse_attention_reference(
            gather(q, q_perm), gather(k, kv_perm), gather(v, kv_perm), q_offsets, kv_offsets, kv_cluster_indices,
            kv_cluster_counts, scale,
        )
        if q_perm is None:
            return out, lse
        perm = q_perm.expand(*q.shape[:2], -1)
        return scatter_tokens_reference(out, perm), scatter_tokens_reference(lse[..., None], perm)[..., 0]
    batch, heads, q_tokens, head_dim = q.shape
    kv_tokens = k.shape[2]
    num_kv_clusters = kv_offsets.shape[-1] - 1
    validate_kv_block_list(kv_cluster_indices, kv_cluster_counts, num_kv_clusters)
    for name, offsets, tokens in (("q_offsets", q_offsets, q_tokens), ("kv_offsets", kv_offsets, kv_tokens)):
        if bool((offsets[..., 0] != 0).any()) or bool((offsets[..., -1] != tokens).any()):
            raise ValueError(f"{name} must start at 0 and end at the token count {tokens}")
        if bool((offsets[..., 1:] < offsets[..., :-1]).any()):
            raise ValueError(f"{name} must be non-decreasing")
    scale = head_dim**-0.5 if scale is None else scale
    cluster_keep = kv_block_mask(kv_cluster_indices, kv_cluster_counts, num_kv_clusters)
    positions = torch.arange(max(q_tokens, kv_tokens), device=q.device)
    # Cluster id of every token position, per (batch, head): count of boundaries at or below the position.
    q_cluster = torch.searchsorted(q_offsets[..., 1:].contiguous().long(), positions[:q_tokens].expand(batch, heads, -1).contiguous(), right=True)
    kv_cluster = torch.searchsorted(kv_offsets[..., 1:].contiguous().long(), positions[:kv_tokens].expand(batch, heads, -1).contiguous(), right=True)
    out = torch.empty(batch, heads, q_tokens, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, q_tokens, dtype=torch.float32, device=q.device)
    for start in range(0, q_tokens, _REFERENCE_ROWS_PER_CHUNK):
        stop = min(start + _REFERENCE_ROWS_PER_CHUNK, q_tokens)
        rows_keep = cluster_keep.gather(
            2, q_cluster[:, :, start:stop, None].expand(-1, -1, -1, num_kv_clusters)
        )  # [B, H, rows, kv_clusters]
        keep = rows_keep.gather(3, kv_cluster[:, :, None, :].expand(-1, -1, stop - start, -1))
        out[:, :, start:stop], lse[:, :, start:stop] = _masked_attention_rows(q[:, :, start:stop], k, v, keep, scale)
    return out.to(q.dtype), lse
