"""Cluster-sparse attention forward: variable-size query clusters attend to lists of variable-size key clusters.

Layout and semantics are those of :func:`vdopt.kernels.reference.cluster_sparse_attention_reference` (the layout
after a semantic k-means permutation, no padding): ``q: [batch, heads, q_tokens, head_dim]``, ``k, v: [batch,
heads, kv_tokens, head_dim]`` (any strides), ``q_offsets: int [batch, heads, q_clusters + 1]`` and
``kv_offsets: int [batch, heads, kv_clusters + 1]`` ascending cluster boundaries (clusters may be empty),
``kv_cluster_indices: int [batch, heads, q_clusters, max_kept]`` with ``kv_cluster_counts``. A query cluster with
no key cluster gets output 0 and log-sum-exp -inf. Returns ``(out, lse)`` as the block op does.

Two launches: a planning kernel lists each query cluster's key tiles, then the attention kernel walks that flat
tile list with the same pipelined loop as the block kernel. Query tiles start at each cluster's first row; rows past
the cluster's end are computed but not stored. Key tiles come in two modes (``kv_packing``):

- padded: each kept key cluster is cut into tiles of ``BLOCK_N`` consecutive rows, so every cluster's last tile is
  partial and masked; K and V load as one box per tile (TMA where it applies).
- packed: the kept key clusters are laid end to end and that list is cut into full ``BLOCK_N`` tiles that may span
  several clusters; only the list's last tile is partial. Each tile's rows are found from the clusters' ranges
  (a window of at most ``BLOCK_N`` segment ends, compared against the tile's packed positions) and K and V are
  gathered row by row with pointer loads. Q keeps its TMA load.

Packed mode runs fewer key tiles whenever key clusters are not multiples of ``BLOCK_N`` (at 64..192-token clusters and
``BLOCK_N`` 64, ~20% fewer), but gathers each tile row by row where padded mode loads one TMA box. Permutations
(``q_perm``, ``kv_perm``) can be fused the same way: K and V rows are gathered from k, v in their original order
and out and lse rows scattered back, with Q gathered by one launch (or in the kernel, ``q_gather``), in place of
the runtime's separate gather and scatter launches. Timed on an H100 (benchmarks/notes_attention_kernels.md):
packed keys and in-kernel K/V gathers run their tiles at about 60% of the TMA-box rate, so the defaults are padded
keys, and vdopt's runtime (vdopt/attention.py) gathers K and V with separate launches but passes ``q_perm``: Q
gathered by one launch, out and lse scattered by the kernel as it stores them, which made the whole SVG2 step
cheaper than scattering them with launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vdopt.kernels import _backends
from vdopt.kernels.block_sparse_attention import (
    RAGGED_MASK_IN_BRANCH,
    attend_tile,
    check_attention_inputs,
    check_head_range,
    launched_heads,
    output_like,
    store_rows,
    store_rows_at,
    triton_head_dim_ok,
)
from vdopt.kernels.reference import cluster_sparse_attention_reference, validate_kv_block_list

_LOG2E = 1.4426950408889634
_OP = "cluster_sparse_attention"
# Padded mode: a schedule entry encodes a key tile as start * 256 + valid rows (1..BLOCK_N <= 128), one int32 per tile.
_LENGTH_BITS = 8


@triton.jit
def _kept_key_clusters(
    KvOffsets, KvIndices, KvCounts, c, bh, heads,
    stride_ob, stride_oh, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, KEPT_P: tl.constexpr,
):
    """Query cluster ``c`` of (batch, head) ``bh``: list positions, which are used, and each kept key cluster's
    ``[start, stop)`` rows (0 for unused positions)."""
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    count = tl.load(KvCounts + b * stride_cb + h * stride_ch + c)
    pos = tl.arange(0, KEPT_P)
    used = pos < count
    kept = tl.load(KvIndices + b * stride_ib + h * stride_ih + c * stride_iq + pos, mask=used, other=0)
    offsets = KvOffsets + b * stride_ob + h * stride_oh
    start = tl.load(offsets + kept, mask=used, other=0)
    stop = tl.load(offsets + kept + 1, mask=used, other=0)
    return pos, used, start, stop


@triton.jit
def _cluster_tile_plan_kernel(
    KvOffsets, KvIndices, KvCounts, Schedule, TileCounts,
    stride_ob, stride_oh, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
    heads, q_clusters, schedule_stride,
    KEPT_P: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, LENGTH_BITS: tl.constexpr,
):
    """For query cluster ``program_id(0)`` of (batch, head) ``program_id(1)``: list its key tiles."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    pos, used, start, stop = _kept_key_clusters(
        KvOffsets, KvIndices, KvCounts, c, bh, heads, stride_ob, stride_oh, stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch, KEPT_P,
    )
    tiles = tl.where(used, (stop - start + BLOCK_N - 1) // BLOCK_N, 0)
    ends = tl.cumsum(tiles, 0)
    total = tl.sum(tiles, 0)
    firsts = ends - tiles
    row = bh.to(tl.int64) * q_clusters + c
    tl.store(TileCounts + row, total)
    for chunk in range(0, total, CHUNK):
        slots = chunk + tl.arange(0, CHUNK)
        # Kept position of each slot: how many clusters end at or before it (each non-empty one has >= 1 tile).
        which = tl.sum((ends[None, :] <= slots[:, None]).to(tl.int32), 1)
        pick = pos[None, :] == which[:, None]
        tile_start = tl.sum(tl.where(pick, start[None, :], 0), 1)
        tile_stop = tl.sum(tl.where(pick, stop[None, :], 0), 1)
        tile_first = tl.sum(tl.where(pick, firsts[None, :], 0), 1)
        kv_start = tile_start + (slots - tile_first) * BLOCK_N
        length = tl.minimum(tile_stop - kv_start, BLOCK_N)
        tl.store(
            Schedule + row * schedule_stride + slots,
            (kv_start << LENGTH_BITS) + length,
            mask=slots < total,
        )


@triton.jit
def _cluster_packed_plan_kernel(
    KvOffsets, KvIndices, KvCounts, SegEnds, SegShifts, KeyCounts, Schedule,
    stride_ob, stride_oh, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
    heads, q_clusters, max_kept, schedule_stride,
    KEPT_P: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Packed keys, for query cluster ``program_id(0)`` of (batch, head) ``program_id(1)``: its kept key clusters
    laid end to end. Writes the non-empty ones' packed ends and shifts (key row = packed position + shift), their
    number and the kept key count, and for each BLOCK_N tile of the packed list the segment its first row is in."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    _, used, start, stop = _kept_key_clusters(
        KvOffsets, KvIndices, KvCounts, c, bh, heads, stride_ob, stride_oh, stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch, KEPT_P,
    )
    sizes = tl.where(used, stop - start, 0)
    nonempty = sizes > 0
    ends = tl.cumsum(sizes, 0)
    # Empty clusters are dropped, so a tile of BLOCK_N packed rows meets at most BLOCK_N segments.
    slot = tl.cumsum(nonempty.to(tl.int32), 0) - 1
    row = bh.to(tl.int64) * q_clusters + c
    tl.store(SegEnds + row * max_kept + slot, ends, mask=nonempty)
    tl.store(SegShifts + row * max_kept + slot, start - (ends - sizes), mask=nonempty)
    total = tl.sum(sizes, 0)
    tl.store(KeyCounts + 2 * row, total)
    tl.store(KeyCounts + 2 * row + 1, tl.sum(nonempty.to(tl.int32), 0))
    for chunk in range(0, (total + BLOCK_N - 1) // BLOCK_N, CHUNK):
        tiles = chunk + tl.arange(0, CHUNK)
        first = tl.sum((nonempty[None, :] & (ends[None, :] <= tiles[:, None] * BLOCK_N)).to(tl.int32), 1)
        tl.store(Schedule + row * schedule_stride + tiles, first, mask=tiles * BLOCK_N < total)


@triton.jit
def _cluster_sparse_fwd_kernel(
    Q, K, V, Out, Lse, QOffsets, Schedule, Counts, SegEnds, SegShifts, QPerm, KvPerm, HeadIndices,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_qob, stride_qoh,
    heads, q_clusters, q_tokens, kv_tokens, schedule_stride, max_kept, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    CLUSTERS_P: tl.constexpr, USE_TMA: tl.constexpr, KV_RAGGED: tl.constexpr, PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, LENGTH_BITS: tl.constexpr, KV_PACKED: tl.constexpr, WINDOW: tl.constexpr,
    Q_GATHER: tl.constexpr, OUT_SCATTER: tl.constexpr, KV_PERMUTED: tl.constexpr, HAS_HEAD_INDICES: tl.constexpr,
    Q_LAUNCHED_HEADS: tl.constexpr,
):
    # Padded mode: Schedule holds key tiles as start << LENGTH_BITS | rows, Counts[plan row] their number. Packed
    # mode: Schedule holds each tile's first segment, Counts[2 * plan row] the kept keys and [+ 1] the segments, SegEnds
    # and SegShifts the segments (see _cluster_packed_plan_kernel).
    # Permutations (QPerm/KvPerm: int32 [batch * heads, tokens], position -> original row): KV_PERMUTED gathers K/V
    # rows on load, Q_GATHER the Q tile's rows, OUT_SCATTER stores out and lse rows at their original positions; the
    # tensors they apply to stay in original order, so no permuted copy is made. Q_LAUNCHED_HEADS: Q holds only the
    # launched heads (a head-group launch whose Q was gathered beforehand), indexed by g rather than h.
    # Grid: (query-tile slots, batch * heads). A head has at most ceil(q_tokens / BLOCK_M) + q_clusters query
    # tiles; slot p finds its cluster from the running tile count, slots past the last tile exit.
    p = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    # g: the launched head (lists, offsets, permutations, out and lse are per launched head); h: the head of q, k, v
    # it reads (head_indices[g] for a head-group launch).
    g = (bh % heads).to(tl.int64)
    if HAS_HEAD_INDICES:
        h = tl.load(HeadIndices + g).to(tl.int64)
    else:
        h = g
    cl = tl.arange(0, CLUSTERS_P)
    offsets = QOffsets + b * stride_qob + g * stride_qoh
    starts = tl.load(offsets + cl, mask=cl < q_clusters, other=0)
    stops = tl.load(offsets + cl + 1, mask=cl < q_clusters, other=0)
    tiles = tl.where(cl < q_clusters, (stops - starts + BLOCK_M - 1) // BLOCK_M, 0)
    ends = tl.cumsum(tiles, 0)
    c = tl.sum((ends <= p).to(tl.int32), 0)
    if c >= q_clusters:
        return
    pick = cl == c
    row0 = tl.sum(tl.where(pick, starts + (p - (ends - tiles)) * BLOCK_M, 0), 0)
    row_stop = tl.sum(tl.where(pick, stops, 0), 0)
    plan_row = bh.to(tl.int64) * q_clusters + c
    schedule_row = Schedule + plan_row * schedule_stride
    if KV_PACKED:
        kv_total = tl.load(Counts + 2 * plan_row)
        segments = tl.load(Counts + 2 * plan_row + 1)
        total = (kv_total + BLOCK_N - 1) // BLOCK_N
        seg_ends = SegEnds + plan_row * max_kept
        seg_shifts = SegShifts + plan_row * max_kept
        offs_w = tl.arange(0, WINDOW)
    else:
        total = tl.load(Counts + plan_row)
    if Q_LAUNCHED_HEADS:
        q_base = Q + b * stride_qb + g * stride_qh
    else:
        q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kv_perm_row = KvPerm + bh.to(tl.int64) * kv_tokens
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # A packed or permuted key tile is not one box of consecutive rows (Hopper's TMA has no row gather), and
    # switching per tile between a box load and a gather would leave the loop two load forms to pipeline: such
    # tiles always gather. Likewise a query tile the kernel gathers (Q_GATHER).
    KV_TMA: tl.constexpr = USE_TMA and not KV_PACKED and not KV_PERMUTED
    if KV_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, [kv_tokens, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [kv_tokens, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
    offs_m = row0 + tl.arange(0, BLOCK_M)
    if USE_TMA and not Q_GATHER:
        q_desc = tl.make_tensor_descriptor(q_base, [q_tokens, HEAD_DIM], [stride_qn, 1], [BLOCK_M, HEAD_DIM])
        q = q_desc.load([row0, 0])
    elif Q_GATHER:
        q_rows = tl.load(QPerm + bh.to(tl.int64) * q_tokens + offs_m, mask=offs_m < q_tokens, other=0)
        q = tl.load(q_base + q_rows[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < q_tokens, other=0.0)
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < q_tokens, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in tl.range(0, total, num_stages=NUM_STAGES):
        if KV_PACKED:
            # Positions in the packed list; the segment of each is its tile's first segment plus the number of
            # segment ends at or before it (all within BLOCK_N segments of the first, as none is empty).
            kv_start = t * BLOCK_N
            kv_stop = kv_total
            packed = kv_start + offs_n
            first = tl.load(schedule_row + t)
            window = first + offs_w
            window_ends = tl.load(seg_ends + window, mask=window < segments, other=kv_total)
            seg = first + tl.sum((window_ends[None, :] <= packed[:, None]).to(tl.int32), 1)
            live = packed < kv_total
            rows = packed + tl.load(seg_shifts + seg, mask=live, other=0)
            if KV_PERMUTED:
                rows = tl.load(kv_perm_row + rows, mask=live, other=0)
            k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=live[:, None], other=0.0)
        else:
            entry = tl.load(schedule_row + t)
            kv_start = entry >> LENGTH_BITS
            kv_stop = kv_start + (entry & ((1 << LENGTH_BITS) - 1))
            if KV_TMA:
                k = k_desc.load([kv_start, 0])
                v = v_desc.load([kv_start, 0])
            else:
                rows = kv_start + offs_n
                live = rows < kv_tokens
                if KV_PERMUTED:
                    rows = tl.load(kv_perm_row + rows, mask=live, other=0)
                k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=live[:, None], other=0.0)
                v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=live[:, None], other=0.0)
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, k, v, qk_scale, kv_start, kv_stop, BLOCK_N, KV_RAGGED, PRECISION, DOT_UPCAST
        )
    if OUT_SCATTER:
        store_rows_at(
            Out, acc, l_i, m_i, Out + b * stride_ob + g * stride_oh, Lse + bh.to(tl.int64) * q_tokens,
            # Read the rows' destinations again rather than hold them across the loop (register pressure).
            tl.load(QPerm + bh.to(tl.int64) * q_tokens + offs_m, mask=offs_m < row_stop, other=0),
            offs_m < row_stop, stride_on, HEAD_DIM,
        )
    else:
        store_rows(
            Out, Lse, acc, l_i, m_i, Out + b * stride_ob + g * stride_oh, Lse + bh.to(tl.int64) * q_tokens,
            row0, row_stop, stride_on, BLOCK_M, HEAD_DIM,
        )


# (BLOCK_M, BLOCK_N, stages, warps) used when the caller pins none; from the H100 sweep
# (benchmarks/notes_attention_kernels.md).
DEFAULT_CONFIG: tuple[int, int, int, int] = (128, 64, 2, 4)


def cluster_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_cluster_indices: torch.Tensor,
    kv_cluster_counts: torch.Tensor,
    scale: float | None = None,
    config: tuple[int, int, int, int] | None = None,
    use_tma: bool | None = None,
    kv_ragged_mode: int = RAGGED_MASK_IN_BRANCH,
    kv_packing: bool = False,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    head_indices: torch.Tensor | None = None,
    q_gather: str = "launch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan and launch the Triton kernels (no validation; see :func:`cluster_sparse_attention`).

    ``config = (BLOCK_M, BLOCK_N, stages, warps)``, BLOCK_N <= 128. ``kv_packing``: True packs the kept key
    clusters into full tiles, False pads each cluster to whole tiles (see the module docstring). The plan's buffers
    hold per query cluster ``ceil(kv_tokens / BLOCK_N) + max_kept`` int32 entries (padded) or
    ``ceil(kv_tokens / BLOCK_N) + 2 * max_kept`` (packed): enough when every key is kept. ``q_perm`` /
    ``kv_perm`` (``[tokens]`` or ``[batch, heads, tokens]``) fuse the permutation, as in
    :func:`cluster_sparse_attention`, as is ``head_indices``. With ``q_perm``, ``q_gather`` says who gathers the Q
    tiles: ``"launch"`` (one gather launch before the kernel, whose Q tiles then load as TMA boxes into shared
    memory) or ``"kernel"`` (pointer gathers in the kernel: no launch, but the tile is held in registers through the
    key loop, which spills on sm_90; benchmarks/notes_attention_kernels.md). The output is scattered by the kernel
    either way.
    """
    batch, _, q_tokens, head_dim = q.shape
    heads = launched_heads(_OP, q, head_indices)
    kv_tokens = k.shape[2]
    triton_head_dim_ok(_OP, head_dim)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if scale <= 0:
        raise ValueError(f"{_OP}: scale must be positive, got {scale}")
    block_m, block_n, stages, warps = config or DEFAULT_CONFIG
    if block_n > 128:
        raise ValueError(f"{_OP}: BLOCK_N must be <= 128 (schedule entries keep the tile length in 8 bits), got {block_n}")
    q_clusters = q_offsets.shape[-1] - 1
    max_kept = kv_cluster_indices.shape[-1]
    out = output_like(q, heads, head_dim)
    lse = torch.empty(batch, heads, q_tokens, dtype=torch.float32, device=q.device)
    if q_tokens == 0 or batch * heads == 0 or q_clusters == 0:
        return out, lse
    if q_gather not in ("launch", "kernel"):
        raise ValueError(f"{_OP}: q_gather must be 'launch' or 'kernel', got {q_gather!r}")
    q_perm = None if q_perm is None else q_perm.expand(batch, heads, -1).to(torch.int32).contiguous()
    q_in = q
    if q_perm is not None and q_gather == "launch":
        from vdopt.kernels.kmeans import gather_tokens

        q_in = gather_tokens(q if head_indices is None else q.index_select(1, head_indices.to(q.device).long()), q_perm)
    if use_tma is None:
        # Short key tiles avoid tensor descriptors, as in the block kernel (see _MIN_TMA_TILE_N there).
        use_tma = _backends.tma_compatible(q_in, k, v) and (block_n >= 64 or _backends.interpreting())
    if use_tma:
        _backends.ensure_descriptor_allocator()
    q_offsets, kv_offsets, kv_cluster_counts = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q_offsets, kv_offsets, kv_cluster_counts)
    )
    if kv_cluster_indices.stride(-1) != 1:
        kv_cluster_indices = kv_cluster_indices.contiguous()
    kv_perm = None if kv_perm is None else kv_perm.expand(batch, heads, -1).to(torch.int32).contiguous()
    rows = batch * heads * q_clusters
    kept_p = max(16, triton.next_power_of_2(max_kept))
    list_strides = (
        kv_offsets.stride(0), kv_offsets.stride(1),
        kv_cluster_indices.stride(0), kv_cluster_indices.stride(1), kv_cluster_indices.stride(2),
        kv_cluster_counts.stride(0), kv_cluster_counts.stride(1),
    )
    if kv_packing:
        schedule_stride = triton.cdiv(kv_tokens, block_n)
        seg_stride = max(max_kept, 1)
        schedule = torch.empty(rows, schedule_stride, dtype=torch.int32, device=q.device)
        counts = torch.empty(rows, 2, dtype=torch.int32, device=q.device)
        seg_ends = torch.empty(rows, seg_stride, dtype=torch.int32, device=q.device)
        seg_shifts = torch.empty(rows, seg_stride, dtype=torch.int32, device=q.device)
        _cluster_packed_plan_kernel[(q_clusters, batch * heads)](
            kv_offsets, kv_cluster_indices, kv_cluster_counts, seg_ends, seg_shifts, counts, schedule,
            *list_strides, heads, q_clusters, seg_stride, schedule_stride,
            KEPT_P=kept_p, BLOCK_N=block_n, CHUNK=max(16, 4096 // kept_p), num_warps=4,
        )
    else:
        schedule_stride = triton.cdiv(kv_tokens, block_n) + max_kept
        seg_stride = 0
        schedule = torch.empty(rows, schedule_stride, dtype=torch.int32, device=q.device)
        counts = torch.empty(rows, dtype=torch.int32, device=q.device)
        seg_ends = seg_shifts = schedule  # not read in padded mode
        _cluster_tile_plan_kernel[(q_clusters, batch * heads)](
            kv_offsets, kv_cluster_indices, kv_cluster_counts, schedule, counts,
            *list_strides, heads, q_clusters, schedule_stride,
            KEPT_P=kept_p, BLOCK_N=block_n, CHUNK=max(16, 4096 // kept_p), LENGTH_BITS=_LENGTH_BITS,
            num_warps=4,
        )
    grid = (triton.cdiv(q_tokens, block_m) + q_clusters, batch * heads)
    _cluster_sparse_fwd_kernel[grid](
        q_in, k, v, out, lse, q_offsets, schedule, counts, seg_ends, seg_shifts,
        counts if q_perm is None else q_perm, counts if kv_perm is None else kv_perm,
        counts if head_indices is None else head_indices.to(device=q.device, dtype=torch.int32, non_blocking=True),
        q_in.stride(0), q_in.stride(1), q_in.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_offsets.stride(0), q_offsets.stride(1),
        heads, q_clusters, q_tokens, kv_tokens, schedule_stride, seg_stride, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages,
        CLUSTERS_P=max(16, triton.next_power_of_2(q_clusters + 1)),
        USE_TMA=bool(use_tma), KV_RAGGED=kv_ragged_mode,
        PRECISION="ieee" if q.dtype == torch.float32 or _backends.interpreting() else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and _backends.interpreting(),
        LENGTH_BITS=_LENGTH_BITS, KV_PACKED=bool(kv_packing), WINDOW=min(block_n, kept_p),
        Q_GATHER=q_perm is not None and q_gather == "kernel", OUT_SCATTER=q_perm is not None,
        KV_PERMUTED=kv_perm is not None, HAS_HEAD_INDICES=head_indices is not None,
        Q_LAUNCHED_HEADS=q_in is not q and head_indices is not None,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _check_cluster_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_cluster_indices: torch.Tensor,
    kv_cluster_counts: torch.Tensor,
    heads: int,
) -> None:
    batch = q.shape[0]
    q_clusters = q_offsets.shape[-1] - 1
    for name, t in (("q_offsets", q_offsets), ("kv_offsets", kv_offsets)):
        if t.dim() != 3 or tuple(t.shape[:2]) != (batch, heads) or t.shape[-1] < 1:
            raise ValueError(
                f"{_OP}: {name} must be [batch, heads, clusters + 1] = [{batch}, {heads}, ...], got {tuple(t.shape)}"
            )
    expected = (batch, heads, q_clusters)
    if tuple(kv_cluster_counts.shape) != expected or tuple(kv_cluster_indices.shape[:3]) != expected:
        raise ValueError(
            f"{_OP}: kv_cluster_counts {tuple(kv_cluster_counts.shape)} and kv_cluster_indices "
            f"{tuple(kv_cluster_indices.shape)} must be [batch, heads, q_clusters(, max_kept)] with "
            f"[batch, heads, q_clusters] = {expected} (q_offsets has {q_clusters + 1} boundaries)"
        )
    for name, t in (
        ("q_offsets", q_offsets), ("kv_offsets", kv_offsets),
        ("kv_cluster_indices", kv_cluster_indices), ("kv_cluster_counts", kv_cluster_counts),
    ):
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"{_OP}: {name} must be int32 (or int64) on {q.device}; got {t.dtype} on {t.device}")


def _check_perms(q: torch.Tensor, k: torch.Tensor, q_perm: torch.Tensor | None, kv_perm: torch.Tensor | None,
                 heads: int) -> None:
    for name, perm, x in (("q_perm", q_perm, q), ("kv_perm", kv_perm, k)):
        if perm is None:
            continue
        if perm.dtype not in (torch.int32, torch.int64) or perm.device != q.device:
            raise ValueError(f"{_OP}: {name} must be int32 (or int64) on {q.device}; got {perm.dtype} on {perm.device}")
        full = [x.shape[0], heads, x.shape[2]]
        if list(perm.shape) not in ([x.shape[2]], full):
            raise ValueError(
                f"{_OP}: {name} must be [tokens] = [{x.shape[2]}] or [batch, launched heads, tokens] = {full}, "
                f"got {tuple(perm.shape)}"
            )


def _validate_offsets(q: torch.Tensor, k: torch.Tensor, q_offsets: torch.Tensor, kv_offsets: torch.Tensor) -> None:
    for name, offsets, tokens in (("q_offsets", q_offsets, q.shape[2]), ("kv_offsets", kv_offsets, k.shape[2])):
        if bool((offsets[..., 0] != 0).any()) or bool((offsets[..., -1] != tokens).any()):
            raise ValueError(f"{_OP}: {name} must start at 0 and end at the token count {tokens}")
        if bool((offsets[..., 1:] < offsets[..., :-1]).any()):
            raise ValueError(f"{_OP}: {name} must be non-decreasing")


@torch.library.custom_op("vdopt::cluster_sparse_attention", mutates_args=())
def _cluster_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_cluster_indices: torch.Tensor,
    kv_cluster_counts: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    kv_packing: bool = False,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    head_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_inputs(_OP, q, k, v)
    # Validation synchronises with the device, so on GPU it runs only when asked.
    validating = bool(validate or (validate is None and q.device.type == "cpu"))
    heads = launched_heads(_OP, q, head_indices)
    if validating:
        check_head_range(_OP, q, head_indices)
    _check_cluster_lists(q, k, q_offsets, kv_offsets, kv_cluster_indices, kv_cluster_counts, heads)
    _check_perms(q, k, q_perm, kv_perm, heads)
    chosen = _backends.resolve_backend(_OP, backend, q.device)
    _backends.record_backend(_OP, chosen)
    if validating:
        for name, perm, tokens in (("q_perm", q_perm, q.shape[2]), ("kv_perm", kv_perm, k.shape[2])):
            if perm is not None and not torch.equal(perm.sort(-1).values.long(),
                                                    torch.arange(tokens, device=perm.device).expand_as(perm)):
                raise ValueError(f"{_OP}: {name} must hold each of 0..{tokens - 1} once (a permutation of the tokens)")
    if chosen == "reference":
        qg, kg, vg = (x if head_indices is None else x.index_select(1, head_indices.to(x.device).long())
                      for x in (q, k, v))
        out, lse = cluster_sparse_attention_reference(
            qg, kg, vg, q_offsets, kv_offsets, kv_cluster_indices, kv_cluster_counts, scale, q_perm, kv_perm
        )
        # The op's contract (and its fake) is q's memory order.
        return output_like(q, out.shape[1], out.shape[-1]).copy_(out), lse
    if validating:
        validate_kv_block_list(kv_cluster_indices, kv_cluster_counts, kv_offsets.shape[-1] - 1)
        _validate_offsets(q, k, q_offsets, kv_offsets)
    return cluster_sparse_attention_triton(
        q, k, v, q_offsets, kv_offsets, kv_cluster_indices, kv_cluster_counts, scale, kv_packing=kv_packing,
        q_perm=q_perm, kv_perm=kv_perm, head_indices=head_indices,
    )


@_cluster_sparse_attention_op.register_fake
def _cluster_sparse_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_cluster_indices: torch.Tensor,
    kv_cluster_counts: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    kv_packing: bool = False,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    head_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    heads = q.shape[1] if head_indices is None else head_indices.shape[0]
    out = output_like(q, heads, v.shape[-1])
    return out, q.new_empty(q.shape[0], heads, q.shape[2], dtype=torch.float32)


def cluster_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_cluster_indices: torch.Tensor,
    kv_cluster_counts: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    kv_packing: bool = False,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    head_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster-sparse attention through the registered op ``torch.ops.vdopt.cluster_sparse_attention``.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides), permuted so clusters are contiguous -- or in their
    original order with ``q_perm`` / ``kv_perm`` (int32 ``[N]`` or ``[B, H, N]``: position p of the clustered order
    holds original token ``perm[p]``), which the kernel applies as it loads rows and stores outputs, so no permuted
    copy of k, v or out is made (Q is gathered by one launch); out and lse then come back in q's original order.
    The runtime passes ``q_perm`` only (see the module docstring for why).
    q_offsets: int32 [B, H, Cq + 1]; kv_offsets: int32 [B, H, Ck + 1]; kv_cluster_indices: int32
    [B, H, Cq, max_kept]; kv_cluster_counts: int32 [B, H, Cq]. backend/validate as in block_sparse_attention;
    kv_packing as in :func:`cluster_sparse_attention_triton` (the reference ignores it). ``head_indices``: a
    head-group launch that reads only those heads of q, k, v (no copy); the lists, offsets, permutations and outputs
    then have one entry per listed head (G = len(head_indices) in place of H).
    Returns (out [B, G, Nq, D] in q's dtype and memory order, lse float32 [B, G, Nq], natural log).
    """
    return torch.ops.vdopt.cluster_sparse_attention(
        q, k, v, q_offsets, kv_offsets, kv_cluster_indices, kv_cluster_counts, scale, backend, validate, kv_packing,
        q_perm, kv_perm, head_indices,
    )


def last_backend() -> str | None:
    """Backend that ran the latest cluster_sparse_attention call in this process."""
    return _backends.last_backend(_OP)
