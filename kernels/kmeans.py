"""Batched k-means over the tokens of every (batch, head) at once, and the token permutation it induces.

Sparse VideoGen2's semantic permutation clusters queries and keys per head, reorders tokens so each cluster is
contiguous, runs cluster-sparse attention, and restores the order. These are its helpers:

- :func:`kmeans`: Lloyd iterations, warm-started from the previous denoising step's centroids.
- :func:`permutation_from_labels`: stable sort by label -> permutation, inverse and cluster offsets.
- :func:`gather_tokens` / :func:`scatter_tokens`: apply / undo a per-(batch, head) permutation.

Each has a pure-PyTorch ``*_reference``; the public functions dispatch as in :mod:`vdopt.kernels.selection`
(``backend="auto" | "triton" | "reference"``) and are ``torch.library`` ops in the ``vdopt`` namespace.

One Lloyd iteration on the Triton path is one pass over the tokens of every (batch, head) and a tiny finalize:
the pass assigns each token tile to its nearest centroid (the [tokens, clusters] distances never stored) and, in
the same launch, adds the tile into per-split float32 cluster sums and counts (a one-hot matmul on the tensor
cores); the finalize adds the splits in a fixed order and divides (no atomics, so the update is deterministic).
The permutation is a counting sort of the labels (two launches), not a general sort. No host sync on the way.
"""

from __future__ import annotations

import torch
from vdopt.kernels.selection import _use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU; the reference path needs only PyTorch.
    triton = None
    tl = None


def _check_tokens_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [batch, heads, tokens, head_dim]; got shape {tuple(x.shape)}")


def _check_perm(x: torch.Tensor, perm: torch.Tensor) -> None:
    _check_tokens_4d(x, "x")
    if perm.shape != x.shape[:3]:
        raise ValueError(
            f"perm has shape {tuple(perm.shape)}; expected {tuple(x.shape[:3])} ([batch, heads, tokens])"
        )
    if perm.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"perm must be int32 or int64; got {perm.dtype}")


# ---------------------------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, num_clusters: int) -> None:
    if labels.dim() != 3:
        raise ValueError(f"labels must be [batch, heads, tokens]; got shape {tuple(labels.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1; got {num_clusters}")


def permutation_from_labels_reference(
    labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`permutation_from_labels` (a stable torch.sort)."""
    _check_labels(labels, num_clusters)
    _check_label_range(labels, num_clusters)
    ordered, perm = torch.sort(labels, dim=-1, stable=True)
    # Cluster c starts where the sorted labels first reach c.
    bounds = torch.arange(num_clusters + 1, dtype=ordered.dtype, device=labels.device)
    offsets = torch.searchsorted(ordered, bounds.expand(*labels.shape[:2], -1).contiguous(), out_int32=True)
    positions = torch.arange(labels.shape[-1], device=labels.device).expand_as(perm)
    inverse = torch.empty_like(perm).scatter_(-1, perm, positions)
    return perm, inverse, offsets


def _check_label_range(labels: torch.Tensor, num_clusters: int) -> None:
    # Reads the labels on the host: done on CPU only, so a CUDA step stays free of syncs.
    if (
        labels.device.type == "cpu"
        and labels.numel()
        and (int(labels.min()) < 0 or int(labels.max()) >= num_clusters)
    ):
        raise ValueError(
            f"labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {num_clusters}); "
            "pass the num_clusters the labels were made with"
        )


# Largest cluster count the counting sort takes: a program holds a [rows, next_pow2(C)] one-hot tile and a
# [next_pow2(C)] histogram. More clusters run the reference's torch.sort.
MAX_COUNTING_SORT_CLUSTERS = 1024


def _token_splits(tokens: int, block_n: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(tokens per program, programs per row) for kernels that cut each of ``rows`` (batch, head) rows into
    chunks of whole ``block_n`` tiles: about two programs per SM over all rows on CUDA; in the interpreter up to
    three chunks per row, so the CPU tests cross chunk boundaries."""
    tiles = triton.cdiv(tokens, block_n)
    if device.type == "cuda":
        wanted = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, rows)
    else:
        wanted = 3
    chunk = triton.cdiv(tiles, max(1, min(tiles, wanted))) * block_n
    return chunk, triton.cdiv(tokens, chunk)


if triton is not None:

    @triton.jit
    def _label_histogram_kernel(
        labels_ptr, hist_ptr, tokens, num_clusters, chunk, BLOCK_N: tl.constexpr, C_PAD: tl.constexpr
    ):
        # Grid (splits, batch * head): how many tokens of the chunk carry each label.
        split = tl.program_id(0)
        pid_bh = tl.program_id(1)
        clusters = tl.arange(0, C_PAD)
        counts = tl.zeros([C_PAD], dtype=tl.int32)
        begin = split * chunk
        end = tl.minimum(begin + chunk, tokens)
        for start in range(begin, end, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            labels = tl.load(labels_ptr + pid_bh.to(tl.int64) * tokens + rows, mask=rows < end, other=-1)
            counts += tl.sum((labels[:, None] == clusters[None, :]).to(tl.int32), axis=0)
        out = hist_ptr + (pid_bh.to(tl.int64) * tl.num_programs(0) + split) * num_clusters + clusters
        tl.store(out, counts, mask=clusters < num_clusters)

    @triton.jit
    def _label_scatter_kernel(
        labels_ptr,
        hist_ptr,
        perm_ptr,
        inverse_ptr,
        offsets_ptr,
        tokens,
        num_clusters,
        chunk,
        BLOCK_N: tl.constexpr,
        C_PAD: tl.constexpr,
    ):
        # Grid (splits, batch * head): the destination of every token of the chunk is where its cluster starts,
        # plus the tokens of that cluster in earlier chunks, plus those earlier in this chunk (a stable counting
        # sort); writes perm[destination] = token and inverse[token] = destination. Split 0 writes the offsets.
        split = tl.program_id(0)
        num_splits = tl.num_programs(0)
        pid_bh = tl.program_id(1)
        clusters = tl.arange(0, C_PAD)
        cluster_ok = clusters < num_clusters
        hist = hist_ptr + pid_bh.to(tl.int64) * num_splits * num_clusters + clusters
        total = tl.zeros([C_PAD], dtype=tl.int32)
        before = tl.zeros([C_PAD], dtype=tl.int32)
        for other in range(num_splits):
            counts = tl.load(hist + other * num_clusters, mask=cluster_ok, other=0)
            total += counts
            before += tl.where(other < split, counts, 0)
        starts = tl.cumsum(total, axis=0) - total
        offsets = offsets_ptr + pid_bh.to(tl.int64) * (num_clusters + 1)
        if split == 0:
            tl.store(offsets + clusters, starts, mask=cluster_ok)
            end_of_last = tl.zeros([C_PAD], dtype=tl.int32) + tokens
            tl.store(offsets + num_clusters + clusters, end_of_last, mask=clusters == 0)
        next_slot = starts + before
        row_base = pid_bh.to(tl.int64) * tokens
        begin = split * chunk
        end = tl.minimum(begin + chunk, tokens)
        for start in range(begin, end, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_ok = rows < end
            labels = tl.load(labels_ptr + row_base + rows, mask=row_ok, other=-1)
            hit = labels[:, None] == clusters[None, :]
            hits = hit.to(tl.int32)
            rank = tl.cumsum(hits, axis=0) - 1
            destination = tl.sum(tl.where(hit, next_slot[None, :] + rank, 0), axis=1)
            next_slot += tl.sum(hits, axis=0)
            tl.store(perm_ptr + row_base + destination, rows.to(tl.int64), mask=row_ok)
            tl.store(inverse_ptr + row_base + rows, destination.to(tl.int64), mask=row_ok)


def _permutation_from_labels_triton(
    labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_labels(labels, num_clusters)
    _check_label_range(labels, num_clusters)
    batch, heads, tokens = labels.shape
    perm = torch.empty(batch, heads, tokens, dtype=torch.int64, device=labels.device)
    inverse = torch.empty_like(perm)
    offsets = torch.empty(batch, heads, num_clusters + 1, dtype=torch.int32, device=labels.device)
    if perm.numel() == 0:
        return permutation_from_labels_reference(labels, num_clusters)
    labels = labels.to(torch.int32).contiguous()
    c_pad = max(16, triton.next_power_of_2(num_clusters))
    # One-hot tiles of at most 16k entries; small tiles in the interpreter so tests cover several per chunk.
    block_n = 16 if not labels.is_cuda else max(16, min(256, 16384 // c_pad))
    chunk, splits = _token_splits(tokens, block_n, batch * heads, labels.device)
    hist = torch.empty(batch * heads, splits, num_clusters, dtype=torch.int32, device=labels.device)
    grid = (splits, batch * heads)
    _label_histogram_kernel[grid](labels, hist, tokens, num_clusters, chunk, BLOCK_N=block_n, C_PAD=c_pad)
    _label_scatter_kernel[grid](
        labels, hist, perm, inverse, offsets, tokens, num_clusters, chunk, BLOCK_N=block_n, C_PAD=c_pad
    )
    return perm, inverse, offsets


@torch.library.custom_op("vdopt::permutation_from_labels", mutates_args=())
def _permutation_from_labels_op(
    labels: torch.Tensor, num_clusters: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(labels, backend) and num_clusters <= MAX_COUNTING_SORT_CLUSTERS:
        return _permutation_from_labels_triton(labels, num_clusters)
    return permutation_from_labels_reference(labels, num_clusters)


@_permutation_from_labels_op.register_fake
def _(labels: torch.Tensor, num_clusters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    perm = labels.new_empty(labels.shape, dtype=torch.int64)
    offsets = labels.new_empty(*labels.shape[:2], num_clusters + 1, dtype=torch.int32)
    return perm, torch.empty_like(perm), offsets


def permutation_from_labels(
    labels: torch.Tensor, num_clusters: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of tokens by cluster label, per (batch, head).

    ``labels: int [B, H, N]`` in ``[0, num_clusters)`` -> ``(perm int64 [B, H, N], inverse int64 [B, H, N],
    offsets int32 [B, H, num_clusters + 1])``: ``x.gather(2, perm[..., None].expand_as(x))`` makes clusters
    contiguous (tokens of one cluster keep their order), ``inverse`` undoes it, and cluster ``c`` occupies sorted
    positions ``[offsets[..., c], offsets[..., c + 1])`` (empty clusters give equal offsets).
    The Triton path is a counting sort (per-chunk label histograms, then one pass that places every token), two
    launches and no host sync; more than :data:`MAX_COUNTING_SORT_CLUSTERS` clusters, or ``backend="reference"``,
    run torch.sort. Labels outside the range raise on CPU; on CUDA they are not checked (that would sync).
    """
    return _permutation_from_labels_op(labels, num_clusters, backend)


def gather_tokens_reference(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """PyTorch definition of :func:`gather_tokens`."""
    _check_perm(x, perm)
    return x.gather(2, perm.long()[..., None].expand(-1, -1, -1, x.shape[-1]))


def scatter_tokens_reference(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """PyTorch definition of :func:`scatter_tokens`."""
    _check_perm(x, perm)
    index = perm.long()[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).scatter_(2, index, x)


if triton is not None:

    @triton.jit
    def _permute_rows_kernel(
        src_ptr,
        perm_ptr,
        dst_ptr,
        heads,
        tokens,
        head_dim,
        src_stride_b,
        src_stride_h,
        src_stride_n,
        src_stride_d,
        SCATTER: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # dst[perm[r]] = src[r] (scatter) or dst[r] = src[perm[r]] (gather); dst is contiguous [B, H, N, D].
        pid_bh = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < tokens
        ok = row_ok[:, None] & (cols < head_dim)[None, :]
        b = pid_bh // heads
        h = pid_bh % heads
        moved = tl.load(perm_ptr + pid_bh.to(tl.int64) * tokens + rows, mask=row_ok, other=0).to(tl.int64)
        if SCATTER:
            src_rows = rows.to(tl.int64)
            dst_rows = moved
        else:
            src_rows = moved
            dst_rows = rows.to(tl.int64)
        src = src_ptr + b.to(tl.int64) * src_stride_b + h.to(tl.int64) * src_stride_h
        tile = tl.load(src + src_rows[:, None] * src_stride_n + cols[None, :] * src_stride_d, mask=ok)
        dst = dst_ptr + pid_bh.to(tl.int64) * tokens * head_dim
        tl.store(dst + dst_rows[:, None] * head_dim + cols[None, :], tile, mask=ok)


def _permute_rows_triton(x: torch.Tensor, perm: torch.Tensor, scatter: bool) -> torch.Tensor:
    _check_perm(x, perm)
    batch, heads, tokens, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    # ~16 KB of rows per program: enough bytes in flight per SM without starving the grid at small N.
    block_r = max(1, min(64, 8192 // (block_d * x.element_size()) * 2))
    _permute_rows_kernel[(batch * heads, triton.cdiv(tokens, block_r))](
        x,
        perm.contiguous(),
        out,
        heads,
        tokens,
        head_dim,
        *x.stride(),
        SCATTER=scatter,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


@torch.library.custom_op("vdopt::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, perm: torch.Tensor, backend: str) -> torch.Tensor:
    if _use_triton(x, backend):
        return _permute_rows_triton(x, perm, scatter=False)
    return gather_tokens_reference(x, perm)


@_gather_tokens_op.register_fake
def _(x: torch.Tensor, perm: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vdopt::scatter_tokens", mutates_args=())
def _scatter_tokens_op(x: torch.Tensor, perm: torch.Tensor, backend: str) -> torch.Tensor:
    if _use_triton(x, backend):
        return _permute_rows_triton(x, perm, scatter=True)
    return scatter_tokens_reference(x, perm)


@_scatter_tokens_op.register_fake
def _(x: torch.Tensor, perm: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def gather_tokens(x: torch.Tensor, perm: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Apply a per-(batch, head) permutation: ``out[b, h, i] = x[b, h, perm[b, h, i]]``.

    ``x: [B, H, N, D]`` (any strides), ``perm: int [B, H, N]`` a permutation of ``range(N)`` per (b, h) ->
    contiguous ``[B, H, N, D]`` in x's dtype.
    """
    return _gather_tokens_op(x, perm, backend)


def scatter_tokens(x: torch.Tensor, perm: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Undo :func:`gather_tokens`: ``out[b, h, perm[b, h, i]] = x[b, h, i]`` (so ``scatter(gather(x, p), p) == x``)."""
    return _scatter_tokens_op(x, perm, backend)


# ---------------------------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------------------------


def _check_kmeans_args(
    x: torch.Tensor, num_clusters: int, iterations: int, init_centroids: torch.Tensor | None
) -> None:
    _check_tokens_4d(x, "x")
    batch, heads, tokens, head_dim = x.shape
    if not 1 <= num_clusters <= tokens:
        raise ValueError(f"num_clusters={num_clusters} must lie in [1, {tokens}] (the token count)")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")
    if init_centroids is not None and tuple(init_centroids.shape) != (batch, heads, num_clusters, head_dim):
        raise ValueError(
            f"init_centroids has shape {tuple(init_centroids.shape)}; expected "
            f"{(batch, heads, num_clusters, head_dim)} ([batch, heads, num_clusters, head_dim])"
        )


def initial_centroids(x: torch.Tensor, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """float32 ``[B, H, C, D]``: ``C`` distinct tokens of each (batch, head), drawn by a CPU generator seeded with
    ``seed`` (so the draw is the same on every device)."""
    batch, heads, tokens, _ = x.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keys = torch.rand(batch, heads, tokens, generator=generator)
    chosen = keys.topk(num_clusters, dim=-1).indices.sort(dim=-1).values.to(x.device)
    return x.gather(2, chosen[..., None].expand(-1, -1, -1, x.shape[-1])).float()


def _assign_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # argmin_c ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term is the same for every c, so it is left out.
    distances = (centroids * centroids).sum(-1)[..., None, :] - 2.0 * torch.matmul(
        x, centroids.transpose(-1, -2)
    )
    return distances.argmin(dim=-1).to(torch.int32)


def _update_reference(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    head_dim = centroids.shape[-1]
    index = labels.long()
    sums = torch.zeros_like(centroids).scatter_add_(2, index[..., None].expand(-1, -1, -1, head_dim), x)
    counts = torch.zeros(centroids.shape[:-1], dtype=torch.float32, device=x.device)
    counts.scatter_add_(2, index, torch.ones_like(x[..., 0]))
    # An empty cluster keeps its previous centroid rather than collapsing to 0.
    return torch.where(counts[..., None] > 0, sums / counts.clamp(min=1.0)[..., None], centroids)


def kmeans_reference(
    x: torch.Tensor,
    num_clusters: int,
    iterations: int = 3,
    init_centroids: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`kmeans` (float32 throughout)."""
    _check_kmeans_args(x, num_clusters, iterations, init_centroids)
    xf = x.float()
    centroids = initial_centroids(x, num_clusters, seed) if init_centroids is None else init_centroids.float()
    labels = _assign_reference(xf, centroids)
    for iteration in range(iterations):
        if iteration:
            labels = _assign_reference(xf, centroids)
        centroids = _update_reference(xf, labels, centroids)
    return labels, centroids


if triton is not None:

    @triton.jit
    def _centroid_tile(c_base, c_start, num_clusters, head_dim, cols, col_ok, dtype, BLOCK_C: tl.constexpr):
        # Centroids c_start.. as x's dtype (products in x's precision: bf16/fp16 tensor cores, tf32 for fp32 x)
        # and their float32 squared norms (+inf past the last cluster, so padding is never nearest).
        clusters = c_start + tl.arange(0, BLOCK_C)
        cluster_ok = clusters < num_clusters
        c_tile = tl.load(
            c_base + clusters[:, None] * head_dim + cols[None, :], mask=cluster_ok[:, None] & col_ok[None, :], other=0.0
        )
        norms = tl.where(cluster_ok, tl.sum(c_tile * c_tile, axis=1), float("inf"))
        return c_tile.to(dtype), norms

    @triton.jit
    def _nearest_in_tile(x_tile, c_low, norms, UPCAST_DOT: tl.constexpr):
        # (min distance, argmin) over one centroid tile of ||c||^2 - 2 x.c (||x||^2 is the same for every c),
        # products accumulated in fp32; ties go to the lower index, as torch.argmin.
        if UPCAST_DOT:
            # Triton's interpreter gets bf16 dots wrong (Triton 3.9); fp32 products of the same bf16 values are
            # exact, as on the tensor cores.
            dots = tl.dot(x_tile.to(tl.float32), tl.trans(c_low.to(tl.float32)))
        else:
            dots = tl.dot(x_tile, tl.trans(c_low))
        distances = norms[None, :] - 2.0 * dots
        return tl.min(distances, axis=1, return_indices=True, return_indices_tie_break_left=True)

    @triton.jit
    def _kmeans_pass_kernel(
        x_ptr,
        centroids_ptr,
        labels_ptr,
        sums_ptr,
        counts_ptr,
        heads,
        tokens,
        num_clusters,
        head_dim,
        chunk,
        stride_b,
        stride_h,
        stride_n,
        stride_d,
        ASSIGN: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        ONE_TILE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        IEEE_SUMS: tl.constexpr,
    ):
        # Grid (cluster groups, splits, batch * head): the tokens [split * chunk, +chunk) of one (batch, head), in
        # BLOCK_N tiles. ASSIGN: each token's nearest centroid, streaming the centroids in BLOCK_C tiles with a
        # running (min, argmin), so the [tokens, clusters] distances never reach memory; group 0 stores the labels.
        # Else the labels are read. ACCUMULATE: float32 sums (one-hot^T @ x on the tensor cores) and counts of the
        # tokens of the group's BLOCK_C clusters, one partial per split, reduced in a fixed order by the finalize
        # kernel (no atomics, so the update is deterministic).
        group = tl.program_id(0)
        split = tl.program_id(1)
        pid_bh = tl.program_id(2)
        b = pid_bh // heads
        h = pid_bh % heads
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < head_dim
        x_base = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        c_base = centroids_ptr + pid_bh.to(tl.int64) * num_clusters * head_dim
        label_base = labels_ptr + pid_bh.to(tl.int64) * tokens
        own = group * BLOCK_C + tl.arange(0, BLOCK_C)
        sums = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        counts = tl.zeros([BLOCK_C], dtype=tl.int32)
        if ONE_TILE:  # every centroid fits one tile: load it (and its norms) once for all token tiles
            c_low, norms = _centroid_tile(
                c_base, 0, num_clusters, head_dim, cols, col_ok, x_ptr.dtype.element_ty, BLOCK_C
            )
        begin = split * chunk
        end = tl.minimum(begin + chunk, tokens)
        for start in range(begin, end, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_ok = rows < end
            x_tile = tl.load(
                x_base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if ASSIGN:
                if ONE_TILE:
                    labels = _nearest_in_tile(x_tile, c_low, norms, UPCAST_DOT)[1]
                else:
                    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
                    labels = tl.zeros([BLOCK_N], dtype=tl.int32)
                    for c_start in range(0, num_clusters, BLOCK_C):
                        tile_c_low, tile_norms = _centroid_tile(
                            c_base, c_start, num_clusters, head_dim, cols, col_ok, x_tile.dtype, BLOCK_C
                        )
                        tile_best, tile_label = _nearest_in_tile(x_tile, tile_c_low, tile_norms, UPCAST_DOT)
                        # Strict < keeps the earlier (lower-index) cluster on ties, as torch.argmin does.
                        better = tile_best < best
                        best = tl.where(better, tile_best, best)
                        labels = tl.where(better, tile_label + c_start, labels)
                if group == 0:
                    tl.store(label_base + rows, labels, mask=row_ok)
            else:
                labels = tl.load(label_base + rows, mask=row_ok, other=-1)
            if ACCUMULATE:
                hit = (labels[:, None] == own[None, :]) & row_ok[:, None]
                counts += tl.sum(hit.to(tl.int32), axis=0)
                if IEEE_SUMS:
                    # fp32 x (or bf16 in the interpreter): exact float32 products, no TF32 rounding of x.
                    sums = tl.dot(
                        tl.trans(hit.to(tl.float32)), x_tile.to(tl.float32), sums, input_precision="ieee"
                    )
                else:
                    # 0/1 times bf16/fp16 is exact; the tensor cores accumulate in fp32.
                    sums = tl.dot(tl.trans(hit.to(x_tile.dtype)), x_tile, sums)
        if ACCUMULATE:
            own_ok = own < num_clusters
            partial = (pid_bh.to(tl.int64) * tl.num_programs(1) + split) * num_clusters + own
            tl.store(
                sums_ptr + partial[:, None] * head_dim + cols[None, :], sums, mask=own_ok[:, None] & col_ok[None, :]
            )
            tl.store(counts_ptr + partial, counts, mask=own_ok)

    @triton.jit
    def _kmeans_finalize_kernel(
        sums_ptr,
        counts_ptr,
        previous_ptr,
        out_ptr,
        num_splits,
        num_clusters,
        head_dim,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Grid (cluster groups, batch * head): add the splits' partial sums in order, divide by the counts; an
        # empty cluster keeps its previous centroid.
        clusters = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        pid_bh = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cluster_ok = clusters < num_clusters
        ok = cluster_ok[:, None] & (cols < head_dim)[None, :]
        total = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.int32)
        for split in range(num_splits):
            partial = (pid_bh.to(tl.int64) * num_splits + split) * num_clusters + clusters
            total += tl.load(sums_ptr + partial[:, None] * head_dim + cols[None, :], mask=ok, other=0.0)
            count += tl.load(counts_ptr + partial, mask=cluster_ok, other=0)
        offset = (pid_bh.to(tl.int64) * num_clusters + clusters)[:, None] * head_dim + cols[None, :]
        previous = tl.load(previous_ptr + offset, mask=ok, other=0.0)
        mean = tl.where(count[:, None] > 0, total / tl.maximum(count, 1).to(tl.float32)[:, None], previous)
        tl.store(out_ptr + offset, mean, mask=ok)

    # Token tile and warps of the pass on CUDA, chosen per shape by timing on its first call (the chunks are
    # whole 256-token multiples, so every BLOCK_N tiles them).
    _kmeans_pass_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
            for n, w, s in ((128, 8, 2), (128, 4, 2), (64, 4, 3), (128, 8, 3), (256, 8, 2))
        ],
        key=["num_clusters", "head_dim", "tokens", "chunk", "ASSIGN", "ACCUMULATE", "ONE_TILE"],
    )(_kmeans_pass_kernel)

# Clusters per program of the k-means pass: the [BLOCK_C, head_dim] float32 sums it keeps in registers. Up to this
# many clusters one pass assigns and sums; more are summed by cluster groups after a separate assignment pass.
_KMEANS_CLUSTER_TILE = 64


def _kmeans_pass(
    x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor | None, accumulate: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One launch over every (batch, head): labels (computed from ``centroids`` unless given) and, with
    ``accumulate``, per-split float32 sums ``[B*H, splits, C, D]`` and int32 counts ``[B*H, splits, C]``."""
    batch, heads, tokens, head_dim = x.shape
    num_clusters = centroids.shape[2]
    block_c = max(16, min(_KMEANS_CLUSTER_TILE, triton.next_power_of_2(num_clusters)))
    groups = triton.cdiv(num_clusters, block_c) if accumulate else 1
    assign = labels is None
    if assign:
        labels = torch.empty(batch, heads, tokens, dtype=torch.int32, device=x.device)
    else:
        labels = labels.to(torch.int32).contiguous()
    chunk, splits = _token_splits(tokens, 256 if x.is_cuda else 32, batch * heads * groups, x.device)
    sums = counts = None
    if accumulate:
        sums = torch.empty(batch * heads, splits, num_clusters, head_dim, dtype=torch.float32, device=x.device)
        counts = torch.empty(batch * heads, splits, num_clusters, dtype=torch.int32, device=x.device)
    args = (x, centroids, labels, sums, counts, heads, tokens, num_clusters, head_dim, chunk, *x.stride())
    flags = {
        "ASSIGN": assign,
        "ACCUMULATE": accumulate,
        "ONE_TILE": assign and num_clusters <= block_c,
        "BLOCK_C": block_c,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "IEEE_SUMS": x.dtype == torch.float32 or (not x.is_cuda and x.dtype == torch.bfloat16),
    }
    grid = (groups, splits, batch * heads)
    if x.is_cuda:
        _kmeans_pass_autotuned[grid](*args, **flags, UPCAST_DOT=False)
    else:  # the interpreter: small token tiles, so tests cover several per chunk
        _kmeans_pass_kernel[grid](*args, **flags, BLOCK_N=16, UPCAST_DOT=x.dtype == torch.bfloat16)
    return labels, sums, counts


def _finalize(sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    batch, heads, num_clusters, head_dim = previous.shape
    out = torch.empty_like(previous)
    block_c = 16  # small programs, so the few-MB reduction spreads over many SMs
    _kmeans_finalize_kernel[(triton.cdiv(num_clusters, block_c), batch * heads)](
        sums,
        counts,
        previous,
        out,
        sums.shape[1],
        num_clusters,
        head_dim,
        BLOCK_C=block_c,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=4,
    )
    return out


def _assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest of ``centroids`` (float32 contiguous ``[B, H, C, D]``) for every token: int32 ``[B, H, N]``."""
    return _kmeans_pass(x, centroids.float().contiguous(), None, accumulate=False)[0]


def _update_triton(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Means of the tokens of each label (empty clusters keep ``centroids``): float32 ``[B, H, C, D]``."""
    centroids = centroids.float().contiguous()
    _, sums, counts = _kmeans_pass(x, centroids, labels, accumulate=True)
    return _finalize(sums, counts, centroids)


def _lloyd_iteration_triton(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign to ``centroids`` and move them to the means: one pass over x (two launches) when the clusters fit
    one program's sums, else an assignment pass then a summing pass over cluster groups."""
    if centroids.shape[2] <= _KMEANS_CLUSTER_TILE:
        labels, sums, counts = _kmeans_pass(x, centroids, None, accumulate=True)
        return labels, _finalize(sums, counts, centroids)
    labels = _assign_triton(x, centroids)
    return labels, _update_triton(x, labels, centroids)


@torch.library.custom_op("vdopt::kmeans", mutates_args=())
def _kmeans_op(
    x: torch.Tensor,
    num_clusters: int,
    iterations: int,
    init_centroids: torch.Tensor | None,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(x, backend):
        return kmeans_reference(x, num_clusters, iterations, init_centroids, seed)
    _check_kmeans_args(x, num_clusters, iterations, init_centroids)
    if init_centroids is None:
        centroids = initial_centroids(x, num_clusters, seed)
    else:
        centroids = init_centroids.float().contiguous()
    if not iterations:  # a fresh tensor: an op's output may not alias its input
        return _assign_triton(x, centroids), centroids.clone()
    for _ in range(iterations):
        labels, centroids = _lloyd_iteration_triton(x, centroids)
    return labels, centroids


@_kmeans_op.register_fake
def _(
    x: torch.Tensor,
    num_clusters: int,
    iterations: int,
    init_centroids: torch.Tensor | None,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, tokens, head_dim = x.shape
    labels = x.new_empty(batch, heads, tokens, dtype=torch.int32)
    return labels, x.new_empty(batch, heads, num_clusters, head_dim, dtype=torch.float32)


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    iterations: int = 3,
    init_centroids: torch.Tensor | None = None,
    seed: int = 0,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means over the tokens of every (batch, head) at once.

    ``x: [B, H, N, D]`` (any float dtype, any strides) -> ``(labels int32 [B, H, N], centroids float32
    [B, H, C, D])``. Centroids start from ``init_centroids [B, H, C, D]`` (warm start from the previous denoising
    step) or else from ``C`` distinct tokens drawn with ``seed`` (:func:`initial_centroids`). Each iteration
    assigns every token to its nearest centroid (``argmin ||x||^2 - 2 x.c + ||c||^2``, lower index on ties) and
    moves each centroid to the float32 mean of its tokens; an empty cluster keeps its previous centroid. The
    returned labels are the last assignment and the centroids the means of exactly those labels, so
    ``kmeans(x, C, 1, init_centroids=kmeans(x, C, 1)[1])`` equals ``kmeans(x, C, 2)``. ``iterations=0`` returns
    the assignment to the initial centroids.
    """
    return _kmeans_op(x, num_clusters, iterations, init_centroids, seed, backend)
