"""Dynamic key-block selection from pooled ("draft") Q/K estimates: block means, block scores, top-p / top-k lists.

This is the DraftAttention / AdaSpa-style estimator: pool queries and keys per block, form the small attention map
of the pooled tokens, and keep for every query block the key blocks that carry most of its estimated mass. The
lists come out in the layout of :mod:`vdopt.kernels.reference` (int32 ascending key-block indices + counts).

Each function has a pure-PyTorch ``*_reference`` beside it. The public functions dispatch: ``backend="auto"`` runs
Triton on CUDA tensors and the reference elsewhere; ``backend="triton"`` forces Triton (on CPU only under
``TRITON_INTERPRET=1``, set before this module is imported); ``backend="reference"`` forces PyTorch. Every public
function is a ``torch.library`` op (namespace ``vdopt``) with a fake implementation, so torch.compile and
torch.export keep each as one node.

Only the pooling has a Triton kernel. Scores are a [q_blocks, head_dim] x [head_dim, kv_blocks] product plus a
softmax, and selection a sort + cumsum, over at most a few hundred blocks a row: a few small launches of tensors of
a few MB at the Wan2.1 shape, measured in benchmarks/strategy_overheads.py against dense attention.
"""

from __future__ import annotations

import torch
from vdopt.kernels._backends import resolve_backend
from vdopt.kernels.reference import kv_block_list_from_mask

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU; the reference path needs only PyTorch.
    triton = None
    tl = None

def _use_triton(x: torch.Tensor, backend: str) -> bool:
    """Resolve ``backend`` for a tensor on ``x.device`` (see kernels/_backends.py); raise with the fix when Triton
    cannot run there."""
    if triton is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='reference'")
        return False
    return resolve_backend("strategy_helpers", backend, x.device) == "triton"


def _num_blocks(tokens: int, block: int) -> int:
    return -(-tokens // block)


def _check_tokens(x: torch.Tensor, name: str, block: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [batch, heads, tokens, head_dim]; got shape {tuple(x.shape)}")
    if block < 1:
        raise ValueError(f"block size must be a positive number of tokens; got {block}")
    if x.shape[2] == 0:
        raise ValueError(f"{name} has 0 tokens; pooled blocks need at least one token")


# ---------------------------------------------------------------------------------------------------------------
# Pooled block means
# ---------------------------------------------------------------------------------------------------------------


def pooled_block_means_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """float32 mean of each block of ``block`` tokens: ``x [B, H, N, D]`` -> ``[B, H, ceil(N / block), D]``.

    The ragged last block averages only its real tokens.
    """
    _check_tokens(x, "x", block)
    batch, heads, tokens, head_dim = x.shape
    num_blocks = _num_blocks(tokens, block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, num_blocks * block - tokens))
    sums = padded.reshape(batch, heads, num_blocks, block, head_dim).sum(dim=3)
    starts = torch.arange(num_blocks, device=x.device) * block
    counts = (tokens - starts).clamp(max=block).to(torch.float32)
    return sums / counts[:, None]


if triton is not None:

    @triton.jit
    def _pooled_block_means_kernel(
        x_ptr,
        out_ptr,
        heads,
        tokens,
        head_dim,
        num_blocks,
        stride_b,
        stride_h,
        stride_n,
        stride_d,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (batch * head, token block): sum the block's rows in CHUNK-row tiles, divide by its size.
        pid_bh = tl.program_id(0)
        block_id = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        start = block_id * BLOCK
        stop = tl.minimum(start + BLOCK, tokens)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < head_dim
        base = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for offset in tl.static_range(0, BLOCK, CHUNK):
            rows = start + offset + tl.arange(0, CHUNK)
            ok = (rows < stop)[:, None] & col_ok[None, :]
            ptrs = base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
            acc += tl.sum(tl.load(ptrs, mask=ok, other=0.0).to(tl.float32), axis=0)
        mean = acc / (stop - start).to(tl.float32)
        out = out_ptr + (pid_bh.to(tl.int64) * num_blocks + block_id) * head_dim + cols
        tl.store(out, mean, mask=col_ok)


def _pooled_block_means_triton(x: torch.Tensor, block: int) -> torch.Tensor:
    _check_tokens(x, "x", block)
    batch, heads, tokens, head_dim = x.shape
    num_blocks = _num_blocks(tokens, block)
    out = torch.empty(batch, heads, num_blocks, head_dim, dtype=torch.float32, device=x.device)
    # Rows per tile: the whole block when it is a power of two up to 128, else 64-row tiles masked at the end.
    chunk = min(triton.next_power_of_2(block), 128 if block <= 128 else 64)
    _pooled_block_means_kernel[(batch * heads, num_blocks)](
        x,
        out,
        heads,
        tokens,
        head_dim,
        num_blocks,
        *x.stride(),
        BLOCK=block,
        CHUNK=chunk,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return out


@torch.library.custom_op("vdopt::pooled_block_means", mutates_args=())
def _pooled_block_means_op(x: torch.Tensor, block: int, backend: str) -> torch.Tensor:
    if _use_triton(x, backend):
        return _pooled_block_means_triton(x, block)
    return pooled_block_means_reference(x, block)


@_pooled_block_means_op.register_fake
def _(x: torch.Tensor, block: int, backend: str) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.new_empty(batch, heads, _num_blocks(tokens, block), head_dim, dtype=torch.float32)


def pooled_block_means(x: torch.Tensor, block: int, *, backend: str = "auto") -> torch.Tensor:
    """float32 mean of each block of ``block`` tokens: ``x [B, H, N, D]`` -> ``[B, H, ceil(N / block), D]``.

    The ragged last block averages only its real tokens.
    """
    return _pooled_block_means_op(x, block, backend)


# ---------------------------------------------------------------------------------------------------------------
# Pooled block scores
# ---------------------------------------------------------------------------------------------------------------


def _scores_from_means(
    q_means: torch.Tensor, k_means: torch.Tensor, kv_tokens: int, block_n: int, scale: float
) -> torch.Tensor:
    num_kv_blocks = k_means.shape[2]
    sizes = (kv_tokens - torch.arange(num_kv_blocks, device=k_means.device) * block_n).clamp(max=block_n)
    logits = torch.matmul(q_means, k_means.transpose(-1, -2)) * scale + torch.log(sizes.to(torch.float32))
    return torch.softmax(logits, dim=-1)


def _check_qk(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int) -> None:
    _check_tokens(q, "q", block_m)
    _check_tokens(k, "k", block_n)
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim")


def pooled_block_scores_reference(
    q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, scale: float | None = None
) -> torch.Tensor:
    """PyTorch definition of :func:`pooled_block_scores`."""
    _check_qk(q, k, block_m, block_n)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_means = pooled_block_means_reference(q, block_m)
    k_means = pooled_block_means_reference(k, block_n)
    return _scores_from_means(q_means, k_means, k.shape[2], block_n, scale)


@torch.library.custom_op("vdopt::pooled_block_scores", mutates_args=())
def _pooled_block_scores_op(
    q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, scale: float | None, backend: str
) -> torch.Tensor:
    if not _use_triton(q, backend):
        return pooled_block_scores_reference(q, k, block_m, block_n, scale)
    _check_qk(q, k, block_m, block_n)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_means = _pooled_block_means_triton(q, block_m)
    k_means = _pooled_block_means_triton(k, block_n)
    return _scores_from_means(q_means, k_means, k.shape[2], block_n, scale)


@_pooled_block_scores_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, scale: float | None, backend: str
) -> torch.Tensor:
    shape = (q.shape[0], q.shape[1], _num_blocks(q.shape[2], block_m), _num_blocks(k.shape[2], block_n))
    return q.new_empty(shape, dtype=torch.float32)


def pooled_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Estimated attention mass of each key block for each query block: float32 ``[B, H, nQB, nKB]``, rows sum to 1.

    With ``q̄_i``, ``k̄_j`` the means of query block ``i`` and key block ``j`` (:func:`pooled_block_means`) and
    ``n_j`` the token count of key block ``j``::

        score[i, j] = softmax_j(scale * q̄_i · k̄_j + log n_j)

    i.e. every token of key block ``j`` is taken to score like the block mean, so the block's unnormalised mass is
    ``n_j * exp(scale * q̄_i · k̄_j)``; the ``log n_j`` term keeps a ragged last block from being overweighted.
    ``scale`` defaults to ``head_dim ** -0.5``. ``q: [B, H, Nq, D]``, ``k: [B, H, Nk, D]``, any float dtype.
    """
    return _pooled_block_scores_op(q, k, block_m, block_n, scale, backend)


# ---------------------------------------------------------------------------------------------------------------
# Top-p / top-k selection
# ---------------------------------------------------------------------------------------------------------------


def _always_keep_mask(always_keep: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor | None:
    if always_keep is None:
        return None
    if always_keep.dtype != torch.bool:
        raise ValueError(f"always_keep must be a bool mask; got dtype {always_keep.dtype}")
    num_kv_blocks = scores.shape[-1]
    if always_keep.shape not in ((num_kv_blocks,), tuple(scores.shape)):
        raise ValueError(
            f"always_keep has shape {tuple(always_keep.shape)}; expected ({num_kv_blocks},) or "
            f"{tuple(scores.shape)} (one flag per key block, shared or per [B, H, q_block])"
        )
    return always_keep.to(scores.device).expand(scores.shape)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 4 or scores.shape[-1] == 0:
        raise ValueError(
            f"scores must be [batch, heads, q_blocks, kv_blocks] with kv_blocks >= 1; got {tuple(scores.shape)}"
        )


def _rank_keep(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool mask of the ``counts`` highest scores of each row (ties: the lower block index first)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < counts[..., None]
    return torch.zeros_like(rank_kept).scatter_(-1, order, rank_kept)


def _top_p_counts(
    scores: torch.Tensor, top_p: float, min_blocks: int, max_blocks: int | None
) -> torch.Tensor:
    """Per row, the fewest top blocks whose summed score reaches ``top_p`` of the row total, clamped."""
    num_kv_blocks = scores.shape[-1]
    upper = num_kv_blocks if max_blocks is None else min(max_blocks, num_kv_blocks)
    if top_p >= 1.0:
        counts = torch.full(scores.shape[:-1], num_kv_blocks, dtype=torch.int64, device=scores.device)
    else:
        ordered = torch.sort(scores.float(), dim=-1, descending=True, stable=True).values
        inclusive = ordered.cumsum(dim=-1)
        target = top_p * inclusive[..., -1:]
        # A block is needed while the mass of the blocks ranked above it is still short of the target.
        before = torch.nn.functional.pad(inclusive[..., :-1], (1, 0))
        counts = (before < target).sum(dim=-1)
    return counts.clamp(min=min(min_blocks, upper), max=upper)


def _check_selection_args(top_p: float, min_blocks: int, max_blocks: int | None) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p}")
    if min_blocks < 0:
        raise ValueError(f"min_blocks must be >= 0; got {min_blocks}")
    if max_blocks is not None and max_blocks < max(min_blocks, 1):
        raise ValueError(f"max_blocks={max_blocks} must be >= max(min_blocks={min_blocks}, 1), or None")


def select_blocks_top_p_reference(
    scores: torch.Tensor,
    top_p: float,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    always_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`select_blocks_top_p`."""
    _check_scores(scores)
    _check_selection_args(top_p, min_blocks, max_blocks)
    keep = _rank_keep(scores, _top_p_counts(scores, top_p, min_blocks, max_blocks))
    extra = _always_keep_mask(always_keep, scores)
    if extra is not None:
        keep = keep | extra
    return kv_block_list_from_mask(keep)


def _selection_fake(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The kept width is the largest count over all rows, known only once the scores are: a dynamic size.
    width = torch.library.get_ctx().new_dynamic_size(min=1, max=scores.shape[-1])
    indices = scores.new_empty(*scores.shape[:-1], width, dtype=torch.int32)
    return indices, scores.new_empty(scores.shape[:-1], dtype=torch.int32)


@torch.library.custom_op("vdopt::select_blocks_top_p", mutates_args=())
def _select_blocks_top_p_op(
    scores: torch.Tensor,
    top_p: float,
    min_blocks: int,
    max_blocks: int | None,
    always_keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return select_blocks_top_p_reference(scores, top_p, min_blocks, max_blocks, always_keep)


@_select_blocks_top_p_op.register_fake
def _(
    scores: torch.Tensor,
    top_p: float,
    min_blocks: int,
    max_blocks: int | None,
    always_keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _selection_fake(scores)


def select_blocks_top_p(
    scores: torch.Tensor,
    top_p: float,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    always_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-block list keeping, per row of ``scores [B, H, nQB, nKB]``, the top-p blocks plus ``always_keep``.

    Per row: the fewest highest-scoring blocks whose summed score reaches ``top_p`` times the row total (ties
    ranked by lower block index), at least ``min_blocks`` and at most ``max_blocks``; ``top_p = 1`` keeps every
    block (up to ``max_blocks``). Then the blocks flagged in ``always_keep`` (bool ``[nKB]`` or
    ``[B, H, nQB, nKB]``; e.g. text-token blocks, the diagonal) are added on top of that budget.
    Returns ``(kv_block_indices int32 [B, H, nQB, max_kept], kv_block_counts int32 [B, H, nQB])`` in the layout
    of :mod:`vdopt.kernels.reference`: ascending indices, no duplicates, ``max_kept`` the largest count (>= 1).
    Runs as sort + cumsum in PyTorch on every device (see the module docstring).
    """
    return _select_blocks_top_p_op(scores, top_p, min_blocks, max_blocks, always_keep)


def select_blocks_top_k_reference(
    scores: torch.Tensor, k: int, always_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`select_blocks_top_k`."""
    _check_scores(scores)
    if k < 1:
        raise ValueError(f"k must be >= 1 key block; got {k}")
    counts = torch.full(scores.shape[:-1], min(k, scores.shape[-1]), dtype=torch.int64, device=scores.device)
    keep = _rank_keep(scores, counts)
    extra = _always_keep_mask(always_keep, scores)
    if extra is not None:
        keep = keep | extra
    return kv_block_list_from_mask(keep)


@torch.library.custom_op("vdopt::select_blocks_top_k", mutates_args=())
def _select_blocks_top_k_op(
    scores: torch.Tensor, k: int, always_keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return select_blocks_top_k_reference(scores, k, always_keep)


@_select_blocks_top_k_op.register_fake
def _(scores: torch.Tensor, k: int, always_keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _selection_fake(scores)


def select_blocks_top_k(
    scores: torch.Tensor, k: int, always_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-block list keeping the ``k`` highest-scoring blocks of each row (ties: lower index) plus ``always_keep``.

    Same layout and ``always_keep`` forms as :func:`select_blocks_top_p`; ``k`` larger than the number of key
    blocks keeps them all.
    """
    return _select_blocks_top_k_op(scores, k, always_keep)
