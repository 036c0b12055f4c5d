"""Batched k-means over the tokens of every (batch, head) at once, and the token permutation it induces.

Sparse VideoGen2's semantic permutation clusters queries and keys per head, reorders tokens so each cluster is
contiguous, runs cluster-sparse attention, and restores the order. These are its helpers:

- :func:`kmeans`: Lloyd iterations, warm-started from the previous denoising step's centroids.
- :func:`permutation_from_labels`: stable sort by label -> permutation, inverse and cluster offsets.
- :func:`gather_tokens` / :func:`scatter_tokens`: apply / undo a per-(batch, head) permutation.

Each has a pure-PyTorch ``*_reference``; the public functions dispatch as in :mod:`vdopt.kernels.selection`
(``backend="auto" | "triton" | "reference"``) and are ``torch.library`` ops in the ``vdopt`` namespace.

One Lloyd iteration on the Triton path is: a fused assignment kernel (distances to all centroids and their argmin
per token tile, the [tokens, clusters] matrix never stored), a stable sort of the labels, and a segment-mean
kernel that sums each cluster's rows in sorted order (no atomics, so the update is deterministic).
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
    """PyTorch definition of :func:`permutation_from_labels`."""
    _check_labels(labels, num_clusters)
    # The range check reads the labels on the host: done on CPU only, so a CUDA step stays free of syncs.
    if (
        labels.device.type == "cpu"
        and labels.numel()
        and (int(labels.min()) < 0 or int(labels.max()) >= num_clusters)
    ):
        raise ValueError(
            f"labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {num_clusters}); "
            "pass the num_clusters the labels were made with"
        )
    return _sort_by_label(labels, num_clusters)


def _sort_by_label(
    labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Unchecked core of permutation_from_labels: no host sync.
    perm, offsets = _sorted_order(labels, num_clusters)
    positions = torch.arange(labels.shape[-1], device=labels.device).expand_as(perm)
    inverse = torch.empty_like(perm).scatter_(-1, perm, positions)
    return perm, inverse, offsets


def _sorted_order(labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stable sort permutation int64, cluster offsets int32) of ``labels [B, H, N]``; no checks, no host sync."""
    ordered, perm = torch.sort(labels, dim=-1, stable=True)
    # Cluster c starts where the sorted labels first reach c: a binary search, no atomics.
    bounds = torch.arange(num_clusters + 1, dtype=ordered.dtype, device=labels.device)
    offsets = torch.searchsorted(ordered, bounds.expand(*labels.shape[:2], -1).contiguous(), out_int32=True)
    return perm, offsets


@torch.library.custom_op("vdopt::permutation_from_labels", mutates_args=())
def _permutation_from_labels_op(
    labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return permutation_from_labels_reference(labels, num_clusters)


@_permutation_from_labels_op.register_fake
def _(labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    perm = labels.new_empty(labels.shape, dtype=torch.int64)
    offsets = labels.new_empty(*labels.shape[:2], num_clusters + 1, dtype=torch.int32)
    return perm, torch.empty_like(perm), offsets


def permutation_from_labels(
    labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of tokens by cluster label, per (batch, head).

    ``labels: int [B, H, N]`` in ``[0, num_clusters)`` -> ``(perm int64 [B, H, N], inverse int64 [B, H, N],
    offsets int32 [B, H, num_clusters + 1])``: ``x.gather(2, perm[..., None].expand_as(x))`` makes clusters
    contiguous (tokens of one cluster keep their order), ``inverse`` undoes it, and cluster ``c`` occupies sorted
    positions ``[offsets[..., c], offsets[..., c + 1])`` (empty clusters give equal offsets).
    Runs as torch.sort on every device (a segmented radix sort on CUDA).
    """
    return _permutation_from_labels_op(labels, num_clusters)


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
    def _kmeans_assign_kernel(
        x_ptr,
        centroids_ptr,
        centroid_norms_ptr,
        labels_ptr,
        heads,
        tokens,
        num_clusters,
        head_dim,
        stride_b,
        stride_h,
        stride_n,
        stride_d,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        # One program per (batch * head, token tile): stream the centroids in BLOCK_C tiles and keep a running
        # (min distance, argmin) per token, so the [tokens, clusters] distance matrix never reaches memory.
        pid_bh = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < tokens
        col_ok = cols < head_dim
        b = pid_bh // heads
        h = pid_bh % heads
        x_base = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        x_tile = tl.load(
            x_base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_label = tl.zeros([BLOCK_N], dtype=tl.int32)
        c_base = centroids_ptr + pid_bh.to(tl.int64) * num_clusters * head_dim
        for start in range(0, num_clusters, BLOCK_C):
            clusters = start + tl.arange(0, BLOCK_C)
            cluster_ok = clusters < num_clusters
            c_tile = tl.load(
                c_base + clusters[:, None] * head_dim + cols[None, :],
                mask=cluster_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            # Products in x's precision (bf16/fp16 tensor cores; tf32 for fp32 x), accumulated in fp32.
            c_tile = c_tile.to(x_tile.dtype)
            if UPCAST_DOT:
                # Triton's interpreter gets bf16 dots wrong (Triton 3.9); fp32 products of the same bf16 values
                # are exact, as on the tensor cores.
                dots = tl.dot(x_tile.to(tl.float32), tl.trans(c_tile.to(tl.float32)))
            else:
                dots = tl.dot(x_tile, tl.trans(c_tile))
            norms = tl.load(
                centroid_norms_ptr + pid_bh * num_clusters + clusters, mask=cluster_ok, other=float("inf")
            )
            distances = norms[None, :] - 2.0 * dots
            tile_best, tile_label = tl.min(
                distances, axis=1, return_indices=True, return_indices_tie_break_left=True
            )
            # Strict < keeps the earlier (lower-index) cluster on ties, as torch.argmin does.
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_label = tl.where(better, tile_label + start, best_label)
        tl.store(labels_ptr + pid_bh.to(tl.int64) * tokens + rows, best_label, mask=row_ok)

    @triton.jit
    def _segment_mean_kernel(
        x_ptr,
        perm_ptr,
        offsets_ptr,
        previous_ptr,
        out_ptr,
        heads,
        tokens,
        num_clusters,
        head_dim,
        stride_b,
        stride_h,
        stride_n,
        stride_d,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (batch * head, cluster): sum the cluster's rows, found contiguously in sorted order.
        pid_bh = tl.program_id(0)
        cluster = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < head_dim
        offsets = offsets_ptr + pid_bh.to(tl.int64) * (num_clusters + 1) + cluster
        begin = tl.load(offsets)
        end = tl.load(offsets + 1)
        x_base = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        perm_base = perm_ptr + pid_bh.to(tl.int64) * tokens
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for start in range(begin, end, BLOCK_R):
            slots = start + tl.arange(0, BLOCK_R)
            slot_ok = slots < end
            rows = tl.load(perm_base + slots, mask=slot_ok, other=0).to(tl.int64)
            ptrs = x_base + rows[:, None] * stride_n + cols[None, :] * stride_d
            acc += tl.load(ptrs, mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        count = end - begin
        total = tl.sum(acc, axis=0)
        centroid_offset = (pid_bh.to(tl.int64) * num_clusters + cluster) * head_dim + cols
        previous = tl.load(previous_ptr + centroid_offset, mask=col_ok, other=0.0)
        mean = tl.where(count > 0, total / tl.maximum(count, 1).to(tl.float32), previous)
        tl.store(out_ptr + centroid_offset, mean, mask=col_ok)


if triton is not None:
    # Tile shapes for CUDA, chosen per (clusters, head_dim, tokens) by timing on the first call of each shape.
    _kmeans_assign_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=s)
            for n, c, w, s in (
                (128, 64, 8, 2),
                (128, 128, 8, 2),
                (128, 32, 4, 3),
                (64, 64, 4, 2),
                (64, 128, 4, 2),
                (256, 64, 8, 2),
            )
        ],
        key=["num_clusters", "head_dim", "tokens"],
    )(_kmeans_assign_kernel)


def _assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    num_clusters = centroids.shape[2]
    labels = torch.empty(batch, heads, tokens, dtype=torch.int32, device=x.device)
    norms = (centroids * centroids).sum(-1).contiguous()
    args = (x, centroids, norms, labels, heads, tokens, num_clusters, head_dim, *x.stride())
    block_d = max(16, triton.next_power_of_2(head_dim))
    if x.is_cuda:
        grid = lambda meta: (batch * heads, triton.cdiv(tokens, meta["BLOCK_N"]))
        _kmeans_assign_autotuned[grid](*args, BLOCK_D=block_d, UPCAST_DOT=False)
        return labels
    # The interpreter: one fixed tile shape, small enough to stay quick.
    block_n = 128 if tokens >= 128 else max(16, triton.next_power_of_2(tokens))
    block_c = min(64, max(16, triton.next_power_of_2(num_clusters)))
    _kmeans_assign_kernel[(batch * heads, triton.cdiv(tokens, block_n))](
        *args,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        UPCAST_DOT=x.dtype == torch.bfloat16,
    )
    return labels


def _update_triton(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    num_clusters = centroids.shape[2]
    perm, offsets = _sorted_order(labels, num_clusters)
    out = torch.empty_like(centroids)
    _segment_mean_kernel[(batch * heads, num_clusters)](
        x,
        perm,
        offsets,
        centroids,
        out,
        heads,
        tokens,
        num_clusters,
        head_dim,
        *x.stride(),
        BLOCK_R=32,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return out


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
    labels = _assign_triton(x, centroids)
    for iteration in range(iterations):
        if iteration:
            labels = _assign_triton(x, centroids)
        centroids = _update_triton(x, labels, centroids)
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
