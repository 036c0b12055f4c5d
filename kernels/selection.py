"""Dynamic key-block selection from pooled ("draft") Q/K estimates: block means, block scores, top-p / top-k lists.

This is the DraftAttention / AdaSpa-style estimator: pool queries and keys per block, form the small attention map
of the pooled tokens, and keep for every query block the key blocks that carry most of its estimated mass. The
lists come out in the layout of :mod:`vdopt.kernels.reference` (int32 ascending key-block indices + counts).

Each function has a pure-PyTorch ``*_reference`` beside it. The public functions dispatch: ``backend="auto"`` runs
Triton on CUDA tensors and the reference elsewhere; ``backend="triton"`` forces Triton (on CPU only under
``TRITON_INTERPRET=1``, set before this module is imported); ``backend="reference"`` forces PyTorch. Every public
function is a ``torch.library`` op (namespace ``vdopt``) with a fake implementation, so torch.compile and
torch.export keep each as one node.

The pooling has a Triton kernel, and so has the fused selection the strategies run: :func:`pooled_select_top_p`
(and :func:`pooled_select_vertical_stripes`) go from the block means to a fixed-width key-block list in one launch
(two for the stripes), with no sort and no host sync, so torch.compile sees static shapes. The unfused
:func:`pooled_block_scores` + :func:`select_blocks_top_p` (a torch sort + cumsum + scatter, and a list as wide as
the largest count, which needs a device-to-host sync) stay for other callers such as the k-means clusters' top-p.
benchmarks/strategy_overheads.py times both against dense attention.
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


# ---------------------------------------------------------------------------------------------------------------
# Fused pooled selection: block scores + top-p + diagonal + fixed-width list, one kernel
# ---------------------------------------------------------------------------------------------------------------

# Largest key-block count the fused kernels take: a program holds a [16, next_pow2(nKB)] float32 tile of scores in
# registers (64 KB at 1024 blocks), and past 4096 blocks it would spill to local memory. Longer rows run the
# reference under backend="auto". 4096 blocks are 524k tokens at block 128.
MAX_FUSED_KV_BLOCKS = 4096
# Query blocks per program of the fused kernels: the smallest M of tl.dot, and 16 rows share each key-mean load.
_FUSED_ROWS = 16


def fused_selection_width(
    num_kv_blocks: int, min_blocks: int = 1, max_blocks: int | None = None, keep_diagonal: bool = True
) -> int:
    """Last dim of the fused selections' index lists: the most blocks a row can keep, known before the scores.

    ``num_kv_blocks`` without ``max_blocks``; else ``min(num_kv_blocks, max_blocks + 1)`` with the diagonal
    (``max_blocks`` without it).
    """
    if max_blocks is None:
        return num_kv_blocks
    return min(num_kv_blocks, max_blocks + int(keep_diagonal))


def _fixed_width_block_list(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bool [B, H, nQB, nKB]`` -> ``(int32 [B, H, nQB, width] ascending indices, int32 counts)``, no host sync.

    Like :func:`kv_block_list_from_mask` but ``width`` is given (it must be >= every row's count); padding
    repeats the row's last kept index (0 for an empty row).
    """
    counts = keep.sum(-1).to(torch.int32)
    # Stable descending sort of the 0/1 mask puts kept blocks first, in ascending index order.
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    used = torch.arange(width, device=keep.device) < counts[..., None]
    last = order.gather(-1, (counts.long() - 1).clamp(min=0)[..., None])
    return torch.where(used, order, last).to(torch.int32).contiguous(), counts.contiguous()


def _check_means(q_means: torch.Tensor, k_means: torch.Tensor, kv_tokens: int, block_n: int) -> None:
    if q_means.dim() != 4 or k_means.dim() != 4:
        raise ValueError(
            "q_means and k_means must be [batch, heads, blocks, head_dim] (pooled_block_means output); got "
            f"{tuple(q_means.shape)} and {tuple(k_means.shape)}"
        )
    if q_means.shape[:2] != k_means.shape[:2] or q_means.shape[3] != k_means.shape[3]:
        raise ValueError(
            f"q_means {tuple(q_means.shape)} and k_means {tuple(k_means.shape)} must agree on batch, heads and "
            "head_dim"
        )
    if not q_means.is_floating_point() or not k_means.is_floating_point():
        raise ValueError(f"block means must be floating point; got {q_means.dtype} and {k_means.dtype}")
    if block_n < 1 or _num_blocks(kv_tokens, block_n) != k_means.shape[2] or kv_tokens < 1:
        raise ValueError(
            f"k_means has {k_means.shape[2]} key blocks but kv_tokens={kv_tokens} in blocks of {block_n} make "
            f"{_num_blocks(kv_tokens, block_n) if block_n >= 1 else 'no'}; pass the key token count and block size "
            "the means were pooled with"
        )


def _column_scores(scores: torch.Tensor) -> torch.Tensor:
    """Mass each key block draws from all query blocks: ``[B, H, nQB, nKB]`` -> ``[B, H, 1, nKB]``, sums to 1."""
    column = scores.mean(2, keepdim=True)
    return column / column.sum(-1, keepdim=True)


def _fused_selection_reference(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    shared_columns: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_means(q_means, k_means, kv_tokens, block_n)
    _check_selection_args(top_p, min_blocks, max_blocks)
    scale = q_means.shape[-1] ** -0.5 if scale is None else scale
    scores = _scores_from_means(q_means.float(), k_means.float(), kv_tokens, block_n, scale)
    ranked = _column_scores(scores) if shared_columns else scores
    keep = _rank_keep(ranked, _top_p_counts(ranked, top_p, min_blocks, max_blocks)).expand_as(scores)
    if keep_diagonal:
        keep = keep | torch.eye(*scores.shape[2:], dtype=torch.bool, device=scores.device)
    width = fused_selection_width(scores.shape[-1], min_blocks, max_blocks, keep_diagonal)
    return _fixed_width_block_list(keep, width)


def pooled_select_top_p_reference(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    *,
    scale: float | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    keep_diagonal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`pooled_select_top_p`: the scores of :func:`pooled_block_scores`, the kept
    set of :func:`select_blocks_top_p_reference` with the diagonal as ``always_keep``, in a fixed width."""
    return _fused_selection_reference(
        q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, False
    )


def pooled_select_vertical_stripes_reference(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    *,
    scale: float | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    keep_diagonal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`pooled_select_vertical_stripes`."""
    return _fused_selection_reference(
        q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, True
    )


if triton is not None:

    @triton.jit
    def _mean_products(
        q_base,
        k_base,
        rows,
        row_ok,
        cols,
        col_ok,
        stride_qm,
        stride_qd,
        stride_kn,
        stride_kd,
        head_dim,
        D_CHUNK: tl.constexpr,
    ):
        # float32 [ROWS, KV_PAD] dot products of query rows with key rows (0 where either is masked), as an IEEE
        # float32 dot (no TF32 rounding), head_dim in chunks of D_CHUNK.
        logits = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
        for d_start in range(0, head_dim, D_CHUNK):
            d = d_start + tl.arange(0, D_CHUNK)
            d_ok = d < head_dim
            q_tile = tl.load(
                q_base + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            k_tile = tl.load(
                k_base + cols[None, :] * stride_kn + d[:, None] * stride_kd,
                mask=col_ok[None, :] & d_ok[:, None],
                other=0.0,
            ).to(tl.float32)
            logits = tl.dot(q_tile, k_tile, logits, input_precision="ieee")
        return logits

    @triton.jit
    def _softmax_block_scores(
        q_base,
        k_base,
        rows,
        row_ok,
        cols,
        col_ok,
        stride_qm,
        stride_qd,
        stride_kn,
        stride_kd,
        head_dim,
        kv_tokens,
        block_n,
        scale,
        D_CHUNK: tl.constexpr,
    ):
        # float32 [ROWS, KV_PAD]: softmax_j(scale * q̄_i · k̄_j + log n_j) over the real key blocks, 0 past them.
        logits = _mean_products(
            q_base, k_base, rows, row_ok, cols, col_ok, stride_qm, stride_qd, stride_kn, stride_kd, head_dim, D_CHUNK
        )
        sizes = tl.maximum(tl.minimum(kv_tokens - cols * block_n, block_n), 1).to(tl.float32)
        logits = logits * scale + tl.log(sizes)[None, :]
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        peak = tl.max(logits, axis=1)
        weights = tl.exp(logits - peak[:, None])
        return weights / tl.sum(weights, axis=1)[:, None]

    @triton.jit
    def _score_above_count(bits, count):
        # Per row, the bit pattern of the count-th highest score: the smallest t with fewer than `count` scores
        # above it (bisection over the order-preserving int32 patterns of non-negative floats; padding is -1).
        lo = tl.zeros([bits.shape[0]], dtype=tl.int32)
        hi = lo + 0x7F800000
        for _ in range(31):  # 0x7F800000 (+inf) < 2**31
            mid = lo + (hi - lo) // 2
            fewer = tl.sum((bits > mid[:, None]).to(tl.int32), axis=1) < count
            hi = tl.where(fewer, mid, hi)
            lo = tl.where(fewer, lo, mid + 1)
        return lo

    @triton.jit
    def _top_p_keep(scores, cols, num_kv_blocks, top_p, min_count, max_count, ALL_BLOCKS: tl.constexpr):
        # bool [ROWS, KV_PAD]: per row the `count` highest scores (ties: lower block index), where `count` is
        # the fewest top blocks whose mass reaches top_p of the row total, clamped to [min_count, max_count].
        # No sort: bisections over the scores' bit patterns find the cut, each step one masked row reduction.
        col_ok = (cols < num_kv_blocks)[None, :]
        mass = tl.where(col_ok, scores, 0.0)
        bits = tl.where(col_ok, mass.to(tl.int32, bitcast=True), -1)
        if ALL_BLOCKS:
            count = tl.zeros([scores.shape[0]], dtype=tl.int32) + num_kv_blocks
        else:
            target = top_p * tl.sum(mass, axis=1)
            # The cut score t: the smallest score whose strictly higher scores still hold less than the target.
            # Every block above t is needed, none below it; of the blocks tied at t (ranked by index) those whose
            # mass ranked above them is still short of the target.
            lo = tl.zeros([scores.shape[0]], dtype=tl.int32)
            hi = lo + 0x7F800000
            for _ in range(31):
                mid = lo + (hi - lo) // 2
                short = tl.sum(tl.where(bits > mid[:, None], mass, 0.0), axis=1) < target
                hi = tl.where(short, mid, hi)
                lo = tl.where(short, lo, mid + 1)
            above = bits > lo[:, None]
            mass_above = tl.sum(tl.where(above, mass, 0.0), axis=1)
            tied = tl.sum((bits == lo[:, None]).to(tl.int32), axis=1)
            cut = lo.to(tl.float32, bitcast=True)
            nth = cols[None, :].to(tl.float32)
            tied_needed = (mass_above[:, None] + nth * cut[:, None] < target[:, None]) & (nth < tied[:, None])
            count = tl.sum(above.to(tl.int32), axis=1) + tl.sum(tied_needed.to(tl.int32), axis=1)
        count = tl.minimum(tl.maximum(count, min_count), max_count)
        # Keep every score above the count-th highest, and of the scores equal to it the lowest-indexed ones.
        threshold = _score_above_count(bits, count)
        above = bits > threshold[:, None]
        tied = bits == threshold[:, None]
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=1)
        room = count - tl.sum(above.to(tl.int32), axis=1)
        return above | (tied & (tie_rank <= room[:, None]))

    @triton.jit
    def _store_block_list(keep, rows, row_ok, cols, idx_base, cnt_base, width):
        # Ascending kept indices at slots [0, count) of each row, the last kept index (0: none) in [count, width).
        kept = keep.to(tl.int32)
        slot = tl.cumsum(kept, axis=1) - 1
        count = tl.sum(kept, axis=1)
        last = tl.max(tl.where(keep, cols[None, :], 0), axis=1)
        row_ptr = idx_base + rows.to(tl.int64)[:, None] * width
        tl.store(row_ptr + slot, tl.broadcast_to(cols[None, :], keep.shape), mask=keep & row_ok[:, None])
        padding = (cols[None, :] >= count[:, None]) & (cols[None, :] < width) & row_ok[:, None]
        tl.store(row_ptr + cols[None, :], tl.broadcast_to(last[:, None], keep.shape), mask=padding)
        tl.store(cnt_base + rows, count, mask=row_ok)

    @triton.jit
    def _pooled_select_top_p_kernel(
        q_ptr,
        k_ptr,
        idx_ptr,
        cnt_ptr,
        heads,
        num_q_blocks,
        num_kv_blocks,
        kv_tokens,
        block_n,
        head_dim,
        width,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        scale,
        top_p,
        min_count,
        max_count,
        ROWS: tl.constexpr,
        KV_PAD: tl.constexpr,
        D_CHUNK: tl.constexpr,
        ALL_BLOCKS: tl.constexpr,
        KEEP_DIAGONAL: tl.constexpr,
    ):
        # One program per (batch * head, ROWS query blocks): score the rows against every key block, select,
        # write the rows' lists. The whole padded row of KV_PAD key blocks lives in registers.
        pid_bh = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < num_q_blocks
        cols = tl.arange(0, KV_PAD)
        col_ok = cols < num_kv_blocks
        b = pid_bh // heads
        h = pid_bh % heads
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        scores = _softmax_block_scores(
            q_base, k_base, rows, row_ok, cols, col_ok, stride_qm, stride_qd, stride_kn, stride_kd,
            head_dim, kv_tokens, block_n, scale, D_CHUNK,
        )
        keep = _top_p_keep(scores, cols, num_kv_blocks, top_p, min_count, max_count, ALL_BLOCKS)
        if KEEP_DIAGONAL:
            keep = keep | ((cols[None, :] == rows[:, None]) & col_ok[None, :])
        row_base = pid_bh.to(tl.int64) * num_q_blocks
        _store_block_list(keep, rows, row_ok, cols, idx_ptr + row_base * width, cnt_ptr + row_base, width)

    @triton.jit
    def _pooled_column_mass_kernel(
        q_ptr,
        k_ptr,
        partial_ptr,
        heads,
        num_q_blocks,
        num_kv_blocks,
        kv_tokens,
        block_n,
        head_dim,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        scale,
        ROWS: tl.constexpr,
        STEPS: tl.constexpr,
        KV_PAD: tl.constexpr,
        D_CHUNK: tl.constexpr,
    ):
        # One program per (batch * head, ROWS * STEPS query blocks): the column sums of those rows' scores.
        pid_bh = tl.program_id(0)
        tile = tl.program_id(1)
        cols = tl.arange(0, KV_PAD)
        col_ok = cols < num_kv_blocks
        b = pid_bh // heads
        h = pid_bh % heads
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        column = tl.zeros([KV_PAD], dtype=tl.float32)
        for step in tl.static_range(STEPS):
            rows = (tile * STEPS + step) * ROWS + tl.arange(0, ROWS)
            row_ok = rows < num_q_blocks
            scores = _softmax_block_scores(
                q_base, k_base, rows, row_ok, cols, col_ok, stride_qm, stride_qd, stride_kn, stride_kd,
                head_dim, kv_tokens, block_n, scale, D_CHUNK,
            )
            column += tl.sum(tl.where(row_ok[:, None], scores, 0.0), axis=0)
        out = partial_ptr + (pid_bh.to(tl.int64) * tl.num_programs(1) + tile) * num_kv_blocks + cols
        tl.store(out, column, mask=col_ok)

    @triton.jit
    def _vertical_stripes_kernel(
        partial_ptr,
        idx_ptr,
        cnt_ptr,
        num_tiles,
        num_q_blocks,
        num_kv_blocks,
        width,
        top_p,
        min_count,
        max_count,
        ROWS: tl.constexpr,
        KV_PAD: tl.constexpr,
        ALL_BLOCKS: tl.constexpr,
        KEEP_DIAGONAL: tl.constexpr,
    ):
        # One program per (batch * head, ROWS query blocks): the shared stripes from the column sums (every
        # program of a head recomputes the same few-KB selection), plus each row's diagonal block.
        pid_bh = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < num_q_blocks
        cols = tl.arange(0, KV_PAD)
        col_ok = cols < num_kv_blocks
        column = tl.zeros([KV_PAD], dtype=tl.float32)
        partial = partial_ptr + pid_bh.to(tl.int64) * num_tiles * num_kv_blocks + cols
        for tile in range(num_tiles):
            column += tl.load(partial + tile * num_kv_blocks, mask=col_ok, other=0.0)
        column = column / num_q_blocks
        column = column / tl.sum(column, axis=0)
        shared = _top_p_keep(column[None, :], cols, num_kv_blocks, top_p, min_count, max_count, ALL_BLOCKS)
        keep = tl.broadcast_to(shared, [ROWS, KV_PAD])
        if KEEP_DIAGONAL:
            keep = keep | ((cols[None, :] == rows[:, None]) & col_ok[None, :])
        row_base = pid_bh.to(tl.int64) * num_q_blocks
        _store_block_list(keep, rows, row_ok, cols, idx_ptr + row_base * width, cnt_ptr + row_base, width)


def _fused_launch_shape(num_kv_blocks: int, head_dim: int) -> tuple[int, int, int]:
    """(padded row, head_dim chunk, warps) of the fused kernels' [16, padded row] tiles."""
    kv_pad = max(16, triton.next_power_of_2(num_kv_blocks))
    d_chunk = max(16, min(64, triton.next_power_of_2(head_dim), 8192 // kv_pad))  # key tile: 8k floats up to 512
    # About 32 floats per thread for each [16, kv_pad] tile the selection keeps live.
    num_warps = 4 if kv_pad <= 256 else 8 if kv_pad <= 512 else 16
    return kv_pad, d_chunk, num_warps


def _fused_selection_triton(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    shared_columns: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_means(q_means, k_means, kv_tokens, block_n)
    _check_selection_args(top_p, min_blocks, max_blocks)
    batch, heads, num_q_blocks, head_dim = q_means.shape
    num_kv_blocks = k_means.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    upper = num_kv_blocks if max_blocks is None else min(max_blocks, num_kv_blocks)
    width = fused_selection_width(num_kv_blocks, min_blocks, max_blocks, keep_diagonal)
    indices = torch.empty(batch, heads, num_q_blocks, width, dtype=torch.int32, device=q_means.device)
    counts = torch.empty(batch, heads, num_q_blocks, dtype=torch.int32, device=q_means.device)
    kv_pad, d_chunk, num_warps = _fused_launch_shape(num_kv_blocks, head_dim)
    rows = _FUSED_ROWS
    select = {"top_p": top_p, "min_count": min(min_blocks, upper), "max_count": upper}
    flags = {"ALL_BLOCKS": top_p >= 1.0, "KEEP_DIAGONAL": keep_diagonal, "KV_PAD": kv_pad}
    shape = (heads, num_q_blocks, num_kv_blocks, kv_tokens, block_n, head_dim)
    if not shared_columns:
        _pooled_select_top_p_kernel[(batch * heads, triton.cdiv(num_q_blocks, rows))](
            q_means, k_means, indices, counts, *shape, width, *q_means.stride(), *k_means.stride(), scale,
            **select, ROWS=rows, D_CHUNK=d_chunk, **flags, num_warps=num_warps,
        )
        return indices, counts
    # Column sums of up to 4 row tiles per program, so the select-and-write programs read few partial rows.
    steps = min(4, triton.cdiv(num_q_blocks, rows))
    num_tiles = triton.cdiv(num_q_blocks, rows * steps)
    partial = torch.empty(batch * heads, num_tiles, num_kv_blocks, dtype=torch.float32, device=q_means.device)
    _pooled_column_mass_kernel[(batch * heads, num_tiles)](
        q_means, k_means, partial, *shape, *q_means.stride(), *k_means.stride(), scale,
        ROWS=rows, STEPS=steps, KV_PAD=kv_pad, D_CHUNK=d_chunk, num_warps=num_warps,
    )
    _vertical_stripes_kernel[(batch * heads, triton.cdiv(num_q_blocks, rows))](
        partial, indices, counts, num_tiles, num_q_blocks, num_kv_blocks, width, **select,
        ROWS=rows, **flags, num_warps=num_warps,
    )
    return indices, counts


def _fused_selection(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    shared_columns: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, shared_columns)
    if not _use_triton(q_means, backend):
        return _fused_selection_reference(*args)
    if k_means.shape[2] > MAX_FUSED_KV_BLOCKS:
        if backend == "triton":
            raise ValueError(
                f"{k_means.shape[2]} key blocks exceed the fused kernel's row of {MAX_FUSED_KV_BLOCKS} (one "
                "program sorts a whole row in registers); use larger blocks or backend='reference'"
            )
        return _fused_selection_reference(*args)
    return _fused_selection_triton(*args)


def _fused_selection_fake(
    q_means: torch.Tensor, k_means: torch.Tensor, min_blocks: int, max_blocks: int | None, keep_diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = fused_selection_width(k_means.shape[2], min_blocks, max_blocks, keep_diagonal)
    rows = q_means.shape[:3]
    return q_means.new_empty(*rows, width, dtype=torch.int32), q_means.new_empty(rows, dtype=torch.int32)


@torch.library.custom_op("vdopt::pooled_select_top_p", mutates_args=())
def _pooled_select_top_p_op(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_selection(
        q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, False, backend
    )


@_pooled_select_top_p_op.register_fake
def _(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_selection_fake(q_means, k_means, min_blocks, max_blocks, keep_diagonal)


def pooled_select_top_p(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    *,
    scale: float | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    keep_diagonal: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the key blocks holding ``top_p`` of the pooled attention mass, plus the diagonal block.

    ``q_means: [B, H, nQB, D]`` and ``k_means: [B, H, nKB, D]`` are block means (:func:`pooled_block_means`,
    any float dtype, read as float32); ``kv_tokens`` and ``block_n`` are the key token count and block size
    they were pooled with (they give the ragged last block its ``log n_j`` weight). The kept set equals
    ``select_blocks_top_p(pooled_block_scores(...), top_p, min_blocks, max_blocks, always_keep=diagonal)``
    (the diagonal is key block ``i`` for query block ``i``; ``keep_diagonal=False`` drops it), computed in one
    Triton launch with no host sync. Returns ``(kv_block_indices int32 [B, H, nQB, W], kv_block_counts int32
    [B, H, nQB])``: ascending indices in the first ``count`` slots, then the row's last kept index as padding
    (never read by the attention kernels). The width ``W`` is fixed by the arguments alone
    (:func:`fused_selection_width`: ``nKB``, or ``min(nKB, max_blocks + 1)``), so the op has static shapes
    under torch.compile and torch.export. Rows of more than :data:`MAX_FUSED_KV_BLOCKS` key blocks run the
    reference.
    """
    return _pooled_select_top_p_op(
        q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, backend
    )


@torch.library.custom_op("vdopt::pooled_select_vertical_stripes", mutates_args=())
def _pooled_select_vertical_stripes_op(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_selection(
        q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, True, backend
    )


@_pooled_select_vertical_stripes_op.register_fake
def _(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    keep_diagonal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_selection_fake(q_means, k_means, min_blocks, max_blocks, keep_diagonal)


def pooled_select_vertical_stripes(
    q_means: torch.Tensor,
    k_means: torch.Tensor,
    kv_tokens: int,
    block_n: int,
    top_p: float,
    *,
    scale: float | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    keep_diagonal: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks shared by every query block of a head (vertical stripes), plus each query block's diagonal.

    The stripes are the top-p selection (same tie rule and clamps as :func:`select_blocks_top_p`) of the
    column mass: the pooled block scores of :func:`pooled_block_scores` averaged over query blocks and
    renormalised. Arguments, output layout and width as :func:`pooled_select_top_p`; two Triton launches
    (per-tile column sums, then select and write), no host sync.
    """
    return _pooled_select_vertical_stripes_op(
        q_means, k_means, kv_tokens, block_n, top_p, scale, min_blocks, max_blocks, keep_diagonal, backend
    )


# ---------------------------------------------------------------------------------------------------------------
# Cluster selection (semantic k-means): centroid scores weighted by cluster sizes + top-p + fixed-width list
# ---------------------------------------------------------------------------------------------------------------


def _check_cluster_selection(q_centroids: torch.Tensor, k_centroids: torch.Tensor, kv_offsets: torch.Tensor) -> None:
    if q_centroids.dim() != 4 or k_centroids.dim() != 4:
        raise ValueError(
            "q_centroids and k_centroids must be [batch, heads, clusters, head_dim] (kmeans output); got "
            f"{tuple(q_centroids.shape)} and {tuple(k_centroids.shape)}"
        )
    if q_centroids.shape[:2] != k_centroids.shape[:2] or q_centroids.shape[3] != k_centroids.shape[3]:
        raise ValueError(
            f"q_centroids {tuple(q_centroids.shape)} and k_centroids {tuple(k_centroids.shape)} must agree on batch, "
            "heads and head_dim"
        )
    if k_centroids.shape[2] == 0:
        raise ValueError("k_centroids holds no key cluster; k-means needs at least one")
    expected = (*k_centroids.shape[:2], k_centroids.shape[2] + 1)
    if tuple(kv_offsets.shape) != expected or kv_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"kv_offsets must be int32/int64 {expected} (permutation_from_labels' key cluster offsets); got "
            f"{kv_offsets.dtype} {tuple(kv_offsets.shape)}"
        )


def cluster_scores_reference(
    q_centroids: torch.Tensor, k_centroids: torch.Tensor, kv_offsets: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Estimated attention mass of each key cluster for each query cluster: float32 ``[B, H, Cq, Ck]``, rows sum to 1.

    ``score[i, j] = softmax_j(scale * q̄_i · k̄_j + log n_j)`` with ``q̄_i``, ``k̄_j`` the centroids and ``n_j`` the
    size of key cluster ``j`` (from ``kv_offsets``); an empty key cluster scores 0. ``scale`` defaults to
    ``head_dim ** -0.5``.
    """
    _check_cluster_selection(q_centroids, k_centroids, kv_offsets)
    scale = q_centroids.shape[-1] ** -0.5 if scale is None else scale
    sizes = (kv_offsets[..., 1:] - kv_offsets[..., :-1]).float()[:, :, None, :]
    logits = torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2)) * scale
    logits = (logits + torch.log(sizes.clamp(min=1e-6))).masked_fill(sizes == 0, float("-inf"))
    return torch.softmax(logits, dim=-1)


def cluster_select_top_p_reference(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    kv_offsets: torch.Tensor,
    top_p: float,
    *,
    scale: float | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`cluster_select_top_p`: the kept set of
    ``select_blocks_top_p(cluster_scores_reference(...), top_p, min_blocks, max_blocks)`` in a fixed width."""
    _check_selection_args(top_p, min_blocks, max_blocks)
    scores = cluster_scores_reference(q_centroids, k_centroids, kv_offsets, scale)
    keep = _rank_keep(scores, _top_p_counts(scores, top_p, min_blocks, max_blocks))
    return _fixed_width_block_list(keep, fused_selection_width(scores.shape[-1], min_blocks, max_blocks, False))


if triton is not None:

    @triton.jit
    def _cluster_select_top_p_kernel(
        q_ptr,
        k_ptr,
        offsets_ptr,
        idx_ptr,
        cnt_ptr,
        heads,
        q_clusters,
        kv_clusters,
        head_dim,
        width,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_ob,
        stride_oh,
        stride_oc,
        scale,
        top_p,
        min_count,
        max_count,
        ROWS: tl.constexpr,
        KV_PAD: tl.constexpr,
        D_CHUNK: tl.constexpr,
        ALL_BLOCKS: tl.constexpr,
    ):
        # One program per (batch * head, ROWS query clusters): score them against every key cluster (centroid
        # products plus log cluster size, empty clusters -inf), select, write the rows' lists.
        pid_bh = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < q_clusters
        cols = tl.arange(0, KV_PAD)
        col_ok = cols < kv_clusters
        b = pid_bh // heads
        h = pid_bh % heads
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        logits = _mean_products(
            q_base, k_base, rows, row_ok, cols, col_ok, stride_qm, stride_qd, stride_kn, stride_kd, head_dim, D_CHUNK
        )
        offsets = offsets_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + cols * stride_oc
        sizes = (tl.load(offsets + stride_oc, mask=col_ok, other=0) - tl.load(offsets, mask=col_ok, other=0)).to(
            tl.float32
        )
        logits = logits * scale + tl.log(tl.maximum(sizes, 1e-6))[None, :]
        logits = tl.where((col_ok & (sizes > 0))[None, :], logits, float("-inf"))
        peak = tl.max(logits, axis=1)
        weights = tl.exp(logits - peak[:, None])
        scores = weights / tl.sum(weights, axis=1)[:, None]
        keep = _top_p_keep(scores, cols, kv_clusters, top_p, min_count, max_count, ALL_BLOCKS)
        row_base = pid_bh.to(tl.int64) * q_clusters
        _store_block_list(keep, rows, row_ok, cols, idx_ptr + row_base * width, cnt_ptr + row_base, width)


def _cluster_select_top_p_triton(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    kv_offsets: torch.Tensor,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cluster_selection(q_centroids, k_centroids, kv_offsets)
    _check_selection_args(top_p, min_blocks, max_blocks)
    batch, heads, q_clusters, head_dim = q_centroids.shape
    kv_clusters = k_centroids.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    upper = kv_clusters if max_blocks is None else min(max_blocks, kv_clusters)
    width = fused_selection_width(kv_clusters, min_blocks, max_blocks, False)
    indices = torch.empty(batch, heads, q_clusters, width, dtype=torch.int32, device=q_centroids.device)
    counts = torch.empty(batch, heads, q_clusters, dtype=torch.int32, device=q_centroids.device)
    kv_pad, d_chunk, num_warps = _fused_launch_shape(kv_clusters, head_dim)
    _cluster_select_top_p_kernel[(batch * heads, triton.cdiv(q_clusters, _FUSED_ROWS))](
        q_centroids, k_centroids, kv_offsets, indices, counts, heads, q_clusters, kv_clusters, head_dim, width,
        *q_centroids.stride(), *k_centroids.stride(), *kv_offsets.stride(), scale, top_p,
        min(min_blocks, upper), upper, ROWS=_FUSED_ROWS, KV_PAD=kv_pad, D_CHUNK=d_chunk, ALL_BLOCKS=top_p >= 1.0,
        num_warps=num_warps,
    )
    return indices, counts


@torch.library.custom_op("vdopt::cluster_select_top_p", mutates_args=())
def _cluster_select_top_p_op(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    kv_offsets: torch.Tensor,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q_centroids, k_centroids, kv_offsets, top_p)
    options = {"scale": scale, "min_blocks": min_blocks, "max_blocks": max_blocks}
    if not _use_triton(q_centroids, backend):
        return cluster_select_top_p_reference(*args, **options)
    if k_centroids.shape[2] > MAX_FUSED_KV_BLOCKS:
        if backend == "triton":
            raise ValueError(
                f"{k_centroids.shape[2]} key clusters exceed the fused kernel's row of {MAX_FUSED_KV_BLOCKS}; use "
                "fewer clusters or backend='reference'"
            )
        return cluster_select_top_p_reference(*args, **options)
    return _cluster_select_top_p_triton(*args, scale, min_blocks, max_blocks)


@_cluster_select_top_p_op.register_fake
def _(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    kv_offsets: torch.Tensor,
    top_p: float,
    scale: float | None,
    min_blocks: int,
    max_blocks: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_selection_fake(q_centroids, k_centroids, min_blocks, max_blocks, False)


def cluster_select_top_p(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    kv_offsets: torch.Tensor,
    top_p: float,
    *,
    scale: float | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query cluster, the key clusters holding ``top_p`` of the centroid-estimated attention mass (SVG2).

    ``q_centroids: [B, H, Cq, D]`` and ``k_centroids: [B, H, Ck, D]`` (k-means centroids, read as float32),
    ``kv_offsets: int [B, H, Ck + 1]`` the key clusters' boundaries in the permuted order (their sizes weight the
    scores; :func:`cluster_scores_reference` defines them, an empty cluster scores 0). The kept set equals
    ``select_blocks_top_p(cluster_scores_reference(...), top_p, min_blocks, max_blocks)``, computed in one Triton
    launch with no host sync. Returns ``(kv_cluster_indices int32 [B, H, Cq, W], kv_cluster_counts int32
    [B, H, Cq])`` laid out as :func:`pooled_select_top_p`'s lists, ``W = Ck`` (``min(Ck, max_blocks)`` with
    ``max_blocks``), a width fixed by the arguments alone.
    """
    return _cluster_select_top_p_op(q_centroids, k_centroids, kv_offsets, top_p, scale, min_blocks, max_blocks, backend)
