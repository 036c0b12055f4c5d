"""Block-sparse attention forward: each query block attends to its own list of key blocks.

Layout and semantics are those of :func:`vdopt.kernels.reference.block_sparse_attention_reference`:
``q: [batch, heads, q_tokens, head_dim]``, ``k, v: [batch, heads, kv_tokens, head_dim]`` (any strides, so a
``[batch, tokens, heads, head_dim].transpose(1, 2)`` view needs no copy), ``kv_block_indices: int [batch, heads,
q_blocks, max_kept]`` with ``kv_block_counts: int [batch, heads, q_blocks]``; ragged last blocks; a query block
with no key block gets output 0 and log-sum-exp -inf. Returns ``(out, lse)``, ``out`` in q's dtype and memory
order, ``lse: float32 [batch, heads, q_tokens]`` in natural-log units.

Public entry points: :func:`block_sparse_attention` (the dispatcher) and the registered op
``torch.ops.vdopt.block_sparse_attention`` (one opaque node under torch.compile and torch.export).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vdopt.kernels import _backends, fa4_backend
from vdopt.kernels.reference import block_sparse_attention_reference, validate_kv_block_list

_LOG2E = 1.4426950408889634
_OP = "block_sparse_attention"

# Ragged key handling (KV_RAGGED): 0 = key count divides the tile, nothing masked; 1 = mask every tile's
# columns past the end; 2 = mask only in the tile that crosses the end (a branch in the loop).
RAGGED_MASK_EVERY_TILE = 1
RAGGED_MASK_IN_BRANCH = 2


@triton.jit
def attend_tile(
    acc, l_i, m_i, q, k, v, qk_scale, kv_start, kv_stop,
    BLOCK_N: tl.constexpr, KV_RAGGED: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One step of the exp2 online softmax: fold key tile ``k, v: [BLOCK_N, D]`` (rows from ``kv_start``;
    rows at or past ``kv_stop`` are not keys) into ``acc [BLOCK_M, D]``, row sums ``l_i`` and row maxima
    ``m_i`` (log2 units). ``DOT_UPCAST`` multiplies in float32: Triton's CPU interpreter (3.9) multiplies
    bfloat16 operands as their raw 16-bit patterns, so interpreted bf16 runs need it; GPU code never sets it."""
    if DOT_UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if KV_RAGGED == 1:
        cols = kv_start + tl.arange(0, BLOCK_N)
        qk = tl.where(cols[None, :] < kv_stop, qk, float("-inf"))
    elif KV_RAGGED == 2:  # noqa: SIM102 (the outer test is compile-time, the inner one runs per tile)
        if kv_start + BLOCK_N > kv_stop:
            cols = kv_start + tl.arange(0, BLOCK_N)
            qk = tl.where(cols[None, :] < kv_stop, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row that has seen only masked keys keeps m = -inf: subtract 0 there so exp2 gives 0 instead of NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_UPCAST:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def store_rows(
    Out, Lse, acc, l_i, m_i, out_base, lse_base, row0, row_stop, stride_on,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Normalise and write rows ``[row0, row_stop)`` of one tile; rows with no key get 0 and lse -inf."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    store_rows_at(Out, acc, l_i, m_i, out_base, lse_base, offs_m, offs_m < row_stop, stride_on, HEAD_DIM)


@triton.jit
def store_rows_at(Out, acc, l_i, m_i, out_base, lse_base, dest_rows, row_ok, stride_on, HEAD_DIM: tl.constexpr):
    """Normalise a tile and write its row ``i`` to output row ``dest_rows[i]`` where ``row_ok[i]`` (a scatter
    when the rows are permuted); rows with no key get 0 and lse -inf."""
    offs_d = tl.arange(0, HEAD_DIM)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # m is in log2 units (scores were scaled by log2(e)); lse = ln(2) * (m + log2(l)).
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(
        out_base + dest_rows[:, None] * stride_on + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_base + dest_rows, lse, mask=row_ok)


@triton.jit
def _host_tma_origin(b, h, stride_b, stride_h, stride_n, LAYOUT: tl.constexpr):
    """(first row, column) of head ``h`` of batch ``b`` in a host-made 2-D descriptor over the tensor's storage
    (rows of ``stride_n`` elements): head-major storage stacks heads as rows, token-major puts them side by side."""
    if LAYOUT == 1:
        return (b * (stride_b // stride_n) + h * (stride_h // stride_n)).to(tl.int32), 0
    return (b * (stride_b // stride_n)).to(tl.int32), (h * stride_h).to(tl.int32)


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvIndices, KvCounts, HeadIndices, WorkOrder,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    group_heads, q_tokens, kv_tokens, qk_scale, work_items,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK_M: tl.constexpr, LAYOUT_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_HEAD_INDICES: tl.constexpr, USE_TMA: tl.constexpr, KV_RAGGED: tl.constexpr, PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, HOST_TMA: tl.constexpr = 0, PERSISTENT: tl.constexpr = False,
    OUT_TMA: tl.constexpr = False,
):
    # Grid: (query tiles, batch * launched heads); query tiles vary fastest so the programs resident at one
    # time share a head and its K/V stays in L2. PERSISTENT: a 1-D grid of a few programs per SM, each taking work
    # items (query tile + batch * head index) i, i + programs, ... in the order WorkOrder lists them (longest key
    # lists first), so unequal lists do not leave a tail of idle SMs.
    if PERSISTENT:
        tiles_m = tl.cdiv(q_tokens, BLOCK_M)
        for i in tl.range(tl.program_id(0), work_items, tl.num_programs(0), num_stages=1):
            item = tl.load(WorkOrder + i)
            _attend_query_tile(
                item % tiles_m, item // tiles_m, Q, K, V, Out, Lse, KvIndices, KvCounts, HeadIndices,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_on, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                group_heads, q_tokens, kv_tokens, qk_scale,
                HEAD_DIM, LAYOUT_BLOCK_M, LAYOUT_BLOCK_N, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_HEAD_INDICES, USE_TMA,
                KV_RAGGED, PRECISION, DOT_UPCAST, HOST_TMA, OUT_TMA,
            )
    else:
        _attend_query_tile(
            tl.program_id(0), tl.program_id(1), Q, K, V, Out, Lse, KvIndices, KvCounts, HeadIndices,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_on, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
            group_heads, q_tokens, kv_tokens, qk_scale,
            HEAD_DIM, LAYOUT_BLOCK_M, LAYOUT_BLOCK_N, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_HEAD_INDICES, USE_TMA,
            KV_RAGGED, PRECISION, DOT_UPCAST, HOST_TMA, OUT_TMA,
        )


@triton.jit
def _attend_query_tile(
    tile_m, pid_bh, Q, K, V, Out, Lse, KvIndices, KvCounts, HeadIndices,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
    group_heads, q_tokens, kv_tokens, qk_scale,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK_M: tl.constexpr, LAYOUT_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_HEAD_INDICES: tl.constexpr, USE_TMA: tl.constexpr, KV_RAGGED: tl.constexpr, PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, HOST_TMA: tl.constexpr, OUT_TMA: tl.constexpr = False,
):
    """Query tile ``tile_m`` of launched (batch, head) ``pid_bh``: attend its key-block list and store its rows.
    HOST_TMA: Q, K, V are tensor descriptors made on the host (see _host_descriptors), so no program builds
    descriptors. 3 (per head, the default): 4-D, loaded as one head's [1, 1, rows, D] boxes, zeros past its rows.
    1 (head-major) and 2 (token-major): 2-D over the storage; rows past a head's last row then come from the next
    head or batch (zeros past the tensor's end): masked keys, and query rows that are not stored."""
    b = (pid_bh // group_heads).to(tl.int64)
    g = pid_bh % group_heads
    if HAS_HEAD_INDICES:
        h = tl.load(HeadIndices + g).to(tl.int64)
    else:
        h = g.to(tl.int64)
    row0 = tile_m * BLOCK_M
    q_block = row0 // LAYOUT_BLOCK_M
    count = tl.load(KvCounts + b * stride_cb + g * stride_ch + q_block)
    index_row = KvIndices + b * stride_ib + g * stride_ih + q_block * stride_iq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if HOST_TMA == 3:
        q = Q.load([b.to(tl.int32), h.to(tl.int32), row0, 0]).reshape(BLOCK_M, HEAD_DIM)
    elif HOST_TMA:
        q_row, q_col = _host_tma_origin(b, h, stride_qb, stride_qh, stride_qn, HOST_TMA)
        k_row, k_col = _host_tma_origin(b, h, stride_kb, stride_kh, stride_kn, HOST_TMA)
        v_row, v_col = _host_tma_origin(b, h, stride_vb, stride_vh, stride_vn, HOST_TMA)
        q = Q.load([q_row + row0, q_col])
    elif USE_TMA:
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        # Per-(batch, head) 2-D descriptors: bounds are that head's own rows, so a ragged tile reads zeros
        # instead of the next head, and any head stride works.
        q_desc = tl.make_tensor_descriptor(q_base, [q_tokens, HEAD_DIM], [stride_qn, 1], [BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_base, [kv_tokens, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [kv_tokens, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
        q = q_desc.load([row0, 0])
    else:
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        offs_m = row0 + tl.arange(0, BLOCK_M)
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < q_tokens, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    TILES_PER_BLOCK: tl.constexpr = LAYOUT_BLOCK_N // BLOCK_N
    for t in tl.range(0, count * TILES_PER_BLOCK, num_stages=NUM_STAGES):
        kv_block = tl.load(index_row + t // TILES_PER_BLOCK)
        kv_start = kv_block * LAYOUT_BLOCK_N + (t % TILES_PER_BLOCK) * BLOCK_N
        if HOST_TMA == 3:
            k = K.load([b.to(tl.int32), h.to(tl.int32), kv_start, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = V.load([b.to(tl.int32), h.to(tl.int32), kv_start, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif HOST_TMA:
            k = K.load([k_row + kv_start, k_col])
            v = V.load([v_row + kv_start, v_col])
        elif USE_TMA:
            k = k_desc.load([kv_start, 0])
            v = v_desc.load([kv_start, 0])
        else:
            rows = kv_start + offs_n
            k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=rows[:, None] < kv_tokens, other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=rows[:, None] < kv_tokens, other=0.0)
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, k, v, qk_scale, kv_start, kv_tokens, BLOCK_N, KV_RAGGED, PRECISION, DOT_UPCAST
        )
    if OUT_TMA:
        # Out is a host-made per-head 4-D descriptor of the launched heads' output: the copy engine writes the
        # tile from shared memory and clips rows past the head's last one, so no row mask and no address math.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        tile = (acc / l_safe[:, None]).to(Out.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM)
        Out.store([b.to(tl.int32), g.to(tl.int32), row0, 0], tile)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(Lse + pid_bh.to(tl.int64) * q_tokens + offs_m, lse, mask=offs_m < q_tokens)
    else:
        store_rows(
            Out, Lse, acc, l_i, m_i, Out + b * stride_ob + g * stride_oh, Lse + pid_bh.to(tl.int64) * q_tokens,
            row0, q_tokens, stride_on, BLOCK_M, HEAD_DIM,
        )


# Tile configurations tried by the autotuner (BLOCK_M, BLOCK_N, stages, warps); configs whose tiles do not
# divide the layout's blocks are pruned per call. Chosen from the H100 sweep (benchmarks/notes_attention_kernels.md).
TILE_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (128, 64, 2, 4),
    (128, 64, 4, 4),
    (128, 128, 3, 8),
    (64, 64, 3, 4),
)
# On H100 with Triton 3.6, tensor-descriptor loads of 32-row key tiles at head_dim 128 gave wrong results
# (rel. error 2e-2 against the reference, 2026-11-25 sweep); key tiles under 64 rows take the pointer path.
_MIN_TMA_TILE_N = 64


def _largest_pow2_divisor(n: int, cap: int) -> int:
    tile = cap
    while tile > 1 and n % tile:
        tile //= 2
    return tile


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    # Triton passes positional arguments in named_args and keyword arguments (our constexprs) in kwargs.
    layout_m = kwargs.get("LAYOUT_BLOCK_M", named_args.get("LAYOUT_BLOCK_M"))
    layout_n = kwargs.get("LAYOUT_BLOCK_N", named_args.get("LAYOUT_BLOCK_N"))
    kept = [c for c in configs if layout_m % c.kwargs["BLOCK_M"] == 0 and layout_n % c.kwargs["BLOCK_N"] == 0]
    return kept or configs[-1:]


def _set_host_descriptor_boxes(nargs: dict) -> None:
    """Autotuner pre-hook: give host-made descriptors the tile shape of the config about to run."""
    if nargs.get("HOST_TMA"):
        for name, rows in (("Q", nargs["BLOCK_M"]), ("K", nargs["BLOCK_N"]), ("V", nargs["BLOCK_N"])):
            nargs[name].block_shape = _descriptor_box(nargs["HOST_TMA"], rows, nargs["HEAD_DIM"])
    if nargs.get("OUT_TMA"):
        nargs["Out"].block_shape = _descriptor_box(_PER_HEAD, nargs["BLOCK_M"], nargs["HEAD_DIM"])


def _autotune_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "NUM_STAGES": s}, num_warps=w, num_stages=s,
                      pre_hook=_set_host_descriptor_boxes)
        for m, n, s, w in TILE_CONFIGS
    ]


_block_sparse_fwd_autotuned = triton.autotune(
    configs=_autotune_configs(),
    # Token counts are in the key: tuned once on a short sequence, 64-row tiles won and then ran 10% slower at
    # 32760 tokens (H100 run of 2026-11-25). One tuning per distinct sequence length of a model.
    key=["HEAD_DIM", "LAYOUT_BLOCK_M", "LAYOUT_BLOCK_N", "KV_RAGGED", "USE_TMA", "HOST_TMA", "q_tokens", "kv_tokens"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_fwd_kernel)


# HOST_TMA layouts of a [B, H, N, D] tensor. 1 and 2 ("storage" descriptors): one 2-D descriptor of rows of
# stride(2) elements covers its storage exactly, heads stacked as rows (1) or side by side within a row (2); a
# tile past a head's last row reads the next head's rows. 3 ("per_head"): a 4-D descriptor of the tensor's own
# shape and strides (the copy engine takes them in any order) with boxes of [1, 1, rows, D], so each box is
# bounded by its own head and reads zeros past it, as in-kernel descriptors do. A [1, rows, 1, D] box over
# [B, N, H, D] dims compiled to a different pipeline (a third less shared memory, 160 stack bytes; Triton 3.6,
# tests/hopper_codegen.py), so the box keeps the rows innermost-but-one whatever the memory order.
_HEAD_MAJOR, _TOKEN_MAJOR, _PER_HEAD = 1, 2, 3
HOST_DESCRIPTOR_KINDS = ("per_head", "storage")


def _descriptor_box(layout: int, rows: int, head_dim: int) -> list[int]:
    return [1, 1, rows, head_dim] if layout == _PER_HEAD else [rows, head_dim]


def host_descriptor_layout(*tensors: torch.Tensor) -> int:
    """The HOST_TMA layout these ``[B, H, N, D]`` tensors share: 1 for ``[B, H, N, D]`` storage (rows of D,
    possibly padded), 2 for ``[B, N, H, D]`` storage (heads side by side in a row, as projections produce, also a
    slice of a fused QKV buffer), 0 for anything else or when they differ."""
    layouts = set()
    for t in tensors:
        batch, heads, tokens, head_dim = t.shape
        sb, sh, sn, sd = t.stride()
        if sd != 1 or sn < head_dim:
            return 0
        if sh == tokens * sn and (batch == 1 or sb == heads * sh):
            layouts.add(_HEAD_MAJOR)
        elif (sh == head_dim or heads == 1) and sn >= heads * head_dim and (batch == 1 or sb == tokens * sn):
            layouts.add(_TOKEN_MAJOR)
        else:
            return 0
    return layouts.pop() if len(layouts) == 1 else 0


def _host_descriptors(layout: int, tensors: tuple[torch.Tensor, ...], rows: tuple[int, ...]) -> list:
    """Tensor descriptors of ``[B, H, N, D]`` tensors in HOST_TMA ``layout``, tiles of ``rows`` x D: per-head,
    4-D over the tensor's own shape and strides; storage layouts, 2-D over the storage (rows of stride(2)
    elements; head-major: B*H*N rows of D, token-major: B*N rows of H*D)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for t, r in zip(tensors, rows):
        batch, heads, tokens, head_dim = t.shape
        box = _descriptor_box(layout, r, head_dim)
        if layout == _PER_HEAD:
            out.append(TensorDescriptor(t, list(t.shape), list(t.stride()), box))
            continue
        if layout == _HEAD_MAJOR:
            shape = [batch * heads * tokens, head_dim]
        else:
            shape = [batch * tokens, (heads - 1) * t.stride(1) + head_dim]
        out.append(TensorDescriptor(t, shape, [t.stride(2), 1], box))
    return out


def output_like(q: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Empty ``[batch, heads, q_tokens, head_dim]`` output in q's memory order: token-major
    (``[B, N, H, D]`` storage, the usual layout before the output projection) when q is, else head-major."""
    batch, _, tokens, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty(batch, tokens, heads, head_dim).transpose(1, 2)
    return q.new_empty(batch, heads, tokens, head_dim)


def check_attention_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape, dtype and device checks shared by the ops (no device synchronisation)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be [batch, heads, tokens, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{op}: k and v must match and share batch, heads and head_dim with q; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"{op}: q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v are on {q.device}, {k.device}, {v.device}; put them on one device")


def triton_head_dim_ok(op: str, head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256:
        raise ValueError(
            f"{op}: the triton backend needs a power-of-two head_dim in [16, 256], got {head_dim}; "
            "use backend='reference' for this head size"
        )


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    head_indices: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    use_tma: bool | None = None,
    kv_ragged_mode: int = RAGGED_MASK_IN_BRANCH,
    host_descriptors: bool | str | None = None,
    persistent: bool = False,
    out_descriptor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (no validation of the index lists; see :func:`block_sparse_attention`).

    ``config = (BLOCK_M, BLOCK_N, stages, warps)`` pins the tiles (None: autotuned on GPU, (128, 64, 2, 4)
    under the interpreter); ``use_tma`` None picks tensor-descriptor loads wherever the GPU and strides allow.
    ``host_descriptors``: make the TMA descriptors once on the host instead of three per program inside the kernel.
    True or ``"per_head"``: 4-D descriptors whose boxes are one head's rows, so a tile past a head's last row reads
    zeros, as in-kernel descriptors do. ``"storage"``: 2-D descriptors over the tensors' storage; such a tile reads
    the next head's or batch's rows, which get zero weight (equal results for finite inputs; a non-finite value
    there spreads). False: descriptors built in the kernel. None (default): ``"per_head"`` wherever TMA loads run
    (two H100 runs of 2026-12-06: +3% to +13% at density 0.05, within -1.5% to +7% elsewhere;
    benchmarks/notes_attention_kernels.md), else pointer loads.
    ``persistent``: launch :data:`PERSISTENT_PROGRAMS_PER_SM` programs per SM that take the query tiles longest key
    list first (a pinned config, default ``TILE_CONFIGS[0]``); opt-in until timed.
    ``out_descriptor``: store each output tile through a host-made per-head descriptor (a TMA store from shared
    memory, rows past the head's end clipped) instead of masked pointer stores; needs per-head host descriptors.
    Opt-in: on the H100 (2026-12-06, 24 points) it ran 0.96-1.05x the default, geometric mean 1.00.
    """
    batch, heads, q_tokens, head_dim = q.shape
    kv_tokens = k.shape[2]
    triton_head_dim_ok(_OP, head_dim)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block % 16:
            raise ValueError(
                f"{_OP}: the triton backend needs {name} to be a multiple of 16, got {block}; "
                "use backend='reference' for this block size"
            )
    group = heads if head_indices is None else head_indices.numel()
    scale = head_dim**-0.5 if scale is None else float(scale)
    if scale <= 0:
        raise ValueError(f"{_OP}: scale must be positive, got {scale}")
    out = output_like(q, group, head_dim)
    lse = torch.empty(batch, group, q_tokens, dtype=torch.float32, device=q.device)
    if q_tokens == 0 or group == 0 or batch == 0:
        return out, lse
    if use_tma is None:
        use_tma = _backends.tma_compatible(q, k, v)
    host_layout = 0
    requested = host_descriptors is not None
    if host_descriptors is None:
        # A zero stride (an expanded tensor) is no copy engine stride: such calls build descriptors in the kernel.
        real_strides = all(st > 0 or n == 1 for t in (q, k, v) for st, n in zip(t.stride(), t.shape))
        host_descriptors = "per_head" if use_tma and real_strides else False
    elif host_descriptors is True:
        host_descriptors = "per_head"
    if host_descriptors:
        if host_descriptors not in HOST_DESCRIPTOR_KINDS:
            raise ValueError(f"{_OP}: host_descriptors must be False, True or one of {HOST_DESCRIPTOR_KINDS}, "
                             f"got {host_descriptors!r}")
        if host_descriptors == "per_head":
            host_layout = _PER_HEAD
            if not use_tma:
                raise ValueError(
                    f"{_OP}: host_descriptors='per_head' needs TMA-compatible q, k, v (sm90+, 16-byte aligned base "
                    f"and strides, unit last stride); got strides {q.stride()}, {k.stride()}, {v.stride()}. "
                    "Call with host_descriptors=False"
                )
        else:
            host_layout = host_descriptor_layout(q, k, v)
            if not (use_tma and host_layout):
                raise ValueError(
                    f"{_OP}: host_descriptors='storage' needs TMA-compatible q, k, v (sm90+, 16-byte aligned, unit "
                    "last stride) sharing one storage layout ([B, H, N, D] or [B, N, H, D], see "
                    f"host_descriptor_layout); got strides {q.stride()}, {k.stride()}, {v.stride()}. Call with "
                    "host_descriptors='per_head' or False"
                )
    elif use_tma:
        _backends.ensure_descriptor_allocator()
    kv_block_indices = kv_block_indices if kv_block_indices.stride(-1) == 1 else kv_block_indices.contiguous()
    if kv_block_counts.stride(-1) != 1:
        kv_block_counts = kv_block_counts.contiguous()
    # A blocking copy from host memory would wait for the GPU to finish its queue; this one is staged and returns.
    head_arg = head_indices.to(device=q.device, non_blocking=True) if head_indices is not None else kv_block_counts
    common = {
        "HEAD_DIM": head_dim,
        "LAYOUT_BLOCK_M": block_m,
        "LAYOUT_BLOCK_N": block_n,
        "HAS_HEAD_INDICES": head_indices is not None,
        "USE_TMA": bool(use_tma),
        "PRECISION": "ieee" if q.dtype == torch.float32 or _backends.interpreting() else "tf32",
        "DOT_UPCAST": q.dtype == torch.bfloat16 and _backends.interpreting(),
        "HOST_TMA": host_layout,
    }
    if config is None and (_backends.interpreting() or block_n % _MIN_TMA_TILE_N or persistent):
        config = TILE_CONFIGS[0]
    tile_m = tile_n = 0
    if config is not None:
        tile_m = _largest_pow2_divisor(block_m, config[0])
        tile_n = _largest_pow2_divisor(block_n, config[1])
        if tile_n < _MIN_TMA_TILE_N and not _backends.interpreting():
            if host_layout and requested:
                raise ValueError(f"{_OP}: host_descriptors needs key tiles of >= {_MIN_TMA_TILE_N} rows; "
                                 f"block_n {block_n} gives {tile_n}")
            host_layout = 0
            common["USE_TMA"] = False
            common["HOST_TMA"] = 0
    if out_descriptor and host_layout != _PER_HEAD:
        raise ValueError(f"{_OP}: out_descriptor=True needs per-head host descriptors (host_descriptors='per_head' "
                         f"on TMA-compatible q, k, v with key tiles of >= {_MIN_TMA_TILE_N} rows); this call uses "
                         f"{'storage' if host_layout else 'no host'} descriptors. Call with out_descriptor=False")
    common["OUT_TMA"] = bool(out_descriptor)
    # Autotuned launches set the descriptors' boxes per config (_set_host_descriptor_boxes).
    qkv = (q, k, v) if not host_layout else _host_descriptors(host_layout, (q, k, v),
                                                               (tile_m or 64, tile_n or 64, tile_n or 64))
    out_arg = out if not out_descriptor else _host_descriptors(_PER_HEAD, (out,), (tile_m or 64,))[0]
    work_items = batch * group * triton.cdiv(q_tokens, tile_m) if persistent else 0
    work_order = _longest_first(kv_block_counts, block_m // tile_m, q_tokens, tile_m) if persistent else head_arg
    args = (
        *qkv, out_arg, lse, kv_block_indices, kv_block_counts, head_arg, work_order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_block_indices.stride(0), kv_block_indices.stride(1), kv_block_indices.stride(2),
        kv_block_counts.stride(0), kv_block_counts.stride(1),
        group, q_tokens, kv_tokens, scale * _LOG2E, work_items,
    )
    if config is None:
        # The key-tile size is chosen inside the autotuner: mask when the largest tile could cross the end.
        ragged = kv_ragged_mode if kv_tokens % max(c[1] for c in TILE_CONFIGS) else 0
        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(q_tokens, meta["BLOCK_M"]), batch * group)

        _block_sparse_fwd_autotuned[grid](*args, KV_RAGGED=ragged, **common)
        return out, lse
    ragged = kv_ragged_mode if kv_tokens % tile_n else 0
    if persistent:
        slots = 3 if _backends.interpreting() else (
            PERSISTENT_PROGRAMS_PER_SM * torch.cuda.get_device_properties(q.device).multi_processor_count)
        grid = (min(work_items, slots),)
    else:
        grid = (triton.cdiv(q_tokens, tile_m), batch * group)
    _block_sparse_fwd_kernel[grid](
        *args, BLOCK_M=tile_m, BLOCK_N=tile_n, NUM_STAGES=config[2], KV_RAGGED=ragged, **common,
        PERSISTENT=persistent, num_warps=config[3], num_stages=config[2],
    )
    return out, lse


# Programs per SM of a persistent launch: 128x64 tiles with 4 warps take 255 registers a thread (sm_90 codegen,
# benchmarks/notes_attention_kernels.md), so two fit an SM's register file.
PERSISTENT_PROGRAMS_PER_SM = 2


def _longest_first(kv_block_counts: torch.Tensor, tiles_per_block: int, q_tokens: int, tile_m: int) -> torch.Tensor:
    """Work items ``(batch * head) * query_tiles + query_tile`` ordered by key-list length, longest first (ties in
    item order, so equal lists keep each head's tiles together for L2), int32 on the lists' device."""
    per_tile = kv_block_counts.repeat_interleave(tiles_per_block, dim=-1)[..., : triton.cdiv(q_tokens, tile_m)]
    return torch.argsort(per_tile.flatten(), descending=True, stable=True).to(torch.int32)


def _check_block_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    head_indices: torch.Tensor | None,
) -> None:
    batch, _, q_tokens, _ = q.shape
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"{_OP}: block_m and block_n must be positive, got {block_m} and {block_n}")
    group = launched_heads(_OP, q, head_indices)
    expected = (batch, group, -(-q_tokens // block_m))
    if tuple(kv_block_counts.shape) != expected or tuple(kv_block_indices.shape[:3]) != expected:
        raise ValueError(
            f"{_OP}: kv_block_counts {tuple(kv_block_counts.shape)} and kv_block_indices "
            f"{tuple(kv_block_indices.shape)} must be [batch, heads, q_blocks(, max_kept)] with [batch, heads, "
            f"q_blocks] = {expected} for {q_tokens} query tokens in blocks of {block_m}"
            + ("" if head_indices is None else f" and {group} heads in head_indices")
        )
    for name, t in (("kv_block_indices", kv_block_indices), ("kv_block_counts", kv_block_counts)):
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"{_OP}: {name} must be int32 (or int64) on {q.device}; got {t.dtype} on {t.device}")


def launched_heads(op: str, q: torch.Tensor, head_indices: torch.Tensor | None) -> int:
    """The heads a launch runs: all of q's, or ``head_indices`` (checked to be 1-D integers; no device sync)."""
    if head_indices is None:
        return q.shape[1]
    if head_indices.dim() != 1 or head_indices.dtype.is_floating_point:
        raise ValueError(f"{op}: head_indices must be a 1-D integer tensor, got {head_indices.dtype} "
                         f"{tuple(head_indices.shape)}")
    return head_indices.numel()


def check_head_range(op: str, q: torch.Tensor, head_indices: torch.Tensor | None) -> None:
    """``head_indices`` name heads of q (reads their values: synchronises with the device)."""
    if head_indices is not None and head_indices.numel() and (
        int(head_indices.min()) < 0 or int(head_indices.max()) >= q.shape[1]
    ):
        raise ValueError(f"{op}: head_indices must lie in [0, {q.shape[1]}), got {head_indices.tolist()}")


def _block_sparse_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None,
    head_indices: torch.Tensor | None,
    backend: str,
    validate: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_inputs(_OP, q, k, v)
    _check_block_lists(q, k, kv_block_indices, kv_block_counts, block_m, block_n, head_indices)

    def why_not(name: str) -> str | None:
        return fa4_backend.fa4_applicable(q, k, v, block_m, block_n, head_indices) if name == "fa4" else None

    chosen = _backends.resolve_backend(_OP, backend, q.device, why_not)
    _backends.record_backend(_OP, chosen)
    if chosen == "reference":
        out, lse = block_sparse_attention_reference(
            q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, head_indices
        )
        # The op's contract (and its fake, which torch.compile plans views with) is q's memory order.
        return output_like(q, out.shape[1], out.shape[-1]).copy_(out), lse
    # Validation synchronises with the device (about 0.1 ms), so on GPU it runs only when asked.
    if validate or (validate is None and q.device.type == "cpu"):
        validate_kv_block_list(kv_block_indices, kv_block_counts, -(-k.shape[2] // block_n))
        check_head_range(_OP, q, head_indices)
    if chosen == "fa4":  # resolve_backend chose FA4 only after why_not("fa4") found nothing against it
        return fa4_backend.launch_fa4(q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, head_indices)
    return block_sparse_attention_triton(
        q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, head_indices
    )


@torch.library.custom_op("vdopt::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    head_indices: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _block_sparse_attention_impl(
        q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, head_indices, backend, validate
    )


@_block_sparse_attention_op.register_fake
def _block_sparse_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    head_indices: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[1] if head_indices is None else head_indices.shape[0]
    out = output_like(q, group, v.shape[-1])
    return out, q.new_empty(q.shape[0], group, q.shape[2], dtype=torch.float32)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    head_indices: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention through the registered op ``torch.ops.vdopt.block_sparse_attention``.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides); kv_block_indices: int32 [B, G, ceil(Nq/block_m),
    max_kept]; kv_block_counts: int32 [B, G, ceil(Nq/block_m)], where G = H, or len(head_indices) for a
    head-group launch that reads only those heads (no copy; FA4 takes a group only as evenly spaced ascending
    heads in a CPU tensor, "auto" runs other groups with Triton). scale defaults to D**-0.5.
    backend: "auto" (CUDA: the fastest measured backend that can run the call, see
    ``_backends.MEASURED_ORDER`` -- FA4 where flash-attn-4 is installed and applicable, see
    ``fa4_backend.fa4_applicable``, else Triton; CPU: "reference"), "fa4", "triton" or "reference";
    ``last_backend()`` names the one that ran. validate: check index lists for range and duplicates (None: on CPU
    only, since it synchronises the GPU).
    Returns (out [B, G, Nq, D] in q's dtype and memory order, lse float32 [B, G, Nq], natural log).
    """
    return torch.ops.vdopt.block_sparse_attention(
        q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, head_indices, backend, validate
    )


def last_backend() -> str | None:
    """Backend that ran the latest block_sparse_attention call in this process ("fa4", "triton" or "reference")."""
    return _backends.last_backend(_OP)
