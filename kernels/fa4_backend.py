"""FlashAttention-4 (package flash-attn-4, CuTe DSL) as a backend of vdopt's block-sparse attention forward.

FA4 is optional (``pip install "vdopt[fa4]"``) and imported only when a CUDA call asks for it. The op contract is
vdopt's (:func:`vdopt.kernels.reference.block_sparse_attention_reference`); how it maps onto FA4 4.0.0b36
(flash_attn/cute/interface.py ``_flash_attn_fwd``, block_sparsity.py, block_sparse_utils.py):

- Layout: FA4 takes ``[batch, tokens, heads, head_dim]`` with any 16-byte-aligned strides, so q/k/v go in as
  ``x.transpose(1, 2)`` views (no copy for the token-major tensors models produce), and a head group that is an
  ascending arithmetic progression of heads as a strided slice of that view. FA4 writes into our ``out`` (allocated
  in q's memory order, passed transposed) and ``lse`` (``float32 [batch, heads, q_tokens]``, natural log: FA4's
  softmax finalisation multiplies its base-2 row statistics by ln 2).
- Key-block lists: FA4's "full" blocks (no mask function) are exactly vdopt's kept blocks, so the lists go in as
  ``full_block_cnt/full_block_idx`` ([batch, heads, q_blocks(, width)], int32; FA4 accepts index widths up to the
  key-block count and reads only the first ``count`` entries) with empty "mask" lists.
- Ragged ends: FA4 walks each list from its last entry and applies the key-length bound only to that first block;
  the ragged last key block must therefore be listed last, which :func:`to_fa4_block_sparse` ensures by sorting
  each row's used entries. Query rows past the end are never stored.
- Per-call work: lists FA4 can read as they are (int32, unit stride, no ragged key block) pass through untouched;
  a ragged list is sorted by one Triton launch; the converted lists of a list tensor that is passed again (a static
  pattern, every denoising step) come from a memo keyed by the tensor's identity and version, so a reused list
  costs no device work at all; the empty "mask" lists are zero tensors made once per shape. Nothing reads device
  memory on the host.
- Empty lists: FA4 writes output 0 and lse -inf for a query block with no key block (the reference's definition).
- Where it runs: sm90 (H100, H200) with 128x128 blocks, the tile FA4 picks there for head_dim <= 128. On sm100 FA4
  processes queries in two 128-row stages (``q_stage=2``), which needs 256-token query blocks, and it has not been
  run on one; there ``"auto"`` uses Triton.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary
from vdopt.kernels import _backends

FA4_INSTALL_HINT = 'pip install "vdopt[fa4]"'
FA4_DTYPES = (torch.float16, torch.bfloat16)
FA4_HEAD_DIMS = (64, 128)  # the head sizes the GPU tests cover (Wan, HunyuanVideo: 128; CogVideoX, LTX: 64)
FA4_BLOCK = 128  # query and key block size: FA4's sm90 tile for head_dim <= 128
_OP = "block_sparse_attention"


class Fa4BlockSparse(NamedTuple):
    """FA4's block-sparse forward tensors (``BlockSparseTensorsTorch`` fields), all int32 and contiguous.

    ``*_cnt: [batch, heads, q_blocks]``, ``*_idx: [batch, heads, q_blocks, width]`` with ``width <= kv_blocks``.
    "mask" blocks would run FA4's mask function; vdopt's kept blocks are all "full" blocks.
    """

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor


@functools.cache
def _import_fa4() -> tuple[Any, Any] | str:
    """(BlockSparseTensorsTorch, _flash_attn_fwd), or why they cannot be imported."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from flash_attn.cute.interface import _flash_attn_fwd
    except Exception as e:  # noqa: BLE001 -- ImportError, or CuTe DSL failing to load its CUDA libraries
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return BlockSparseTensorsTorch, _flash_attn_fwd


def fa4_import_error() -> str | None:
    """Why FA4's CuTe interface (``flash_attn.cute``) does not import in this process; None when it does.
    Tried once, then cached."""
    imported = _import_fa4()
    return imported if isinstance(imported, str) else None


def fa4_available() -> bool:
    """Whether FA4's CuTe interface (``flash_attn.cute``) imports in this process (tried once, then cached)."""
    return fa4_import_error() is None


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _head_slice(head_indices: torch.Tensor | None, heads: int) -> slice | str:
    """The heads of a head-group launch as a slice of the head axis (a view), or why they are not one."""
    if head_indices is None:
        return slice(None)
    if head_indices.device.type != "cpu":
        return (f"head_indices are on {head_indices.device.type}, and reading them would synchronise with the GPU; "
                "pass head_indices as a CPU tensor")
    listed = head_indices.tolist()
    if not listed:
        return slice(0, 0)
    step = listed[1] - listed[0] if len(listed) > 1 else 1
    if step <= 0 or listed != list(range(listed[0], listed[-1] + 1, step)) or listed[0] < 0 or listed[-1] >= heads:
        return (f"head_indices {listed} are not an ascending, evenly spaced run of heads in [0, {heads}) "
                "(FA4 would need a copy of q, k, v)")
    return slice(listed[0], listed[-1] + 1, step)


def _aligned(t: torch.Tensor, heads: slice) -> bool:
    """Whether ``t[:, heads]`` has a unit last stride and 16-byte aligned address and strides; FA4 copies any
    input that has not. Computed from the strides, without making the view."""
    size = t.element_size()
    strides, address = t.stride(), t.data_ptr()
    if heads != slice(None):
        start, _, step = heads.indices(t.shape[1])
        address += start * strides[1] * size
        strides = (strides[0], strides[1] * step, *strides[2:])
    return strides[-1] == 1 and address % 16 == 0 and all((s * size) % 16 == 0 for s in strides[:-1])


def fa4_applicable(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_m: int,
    block_n: int,
    head_indices: torch.Tensor | None = None,
) -> str | None:
    """None when FA4 can run this block-sparse call, else the reason (with the fix where there is one).

    q, k, v: ``[batch, heads, tokens, head_dim]`` as given to the op. Checks device, GPU generation, dtype, head
    size, block sizes, the head group and strides first, and imports FA4 last (never on CPU).
    """
    if q.device.type != "cuda":
        return f"FA4 needs CUDA tensors, got {q.device.type} (use backend='auto' or 'reference' on CPU)"
    major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major != 9:
        return (f"vdopt uses FA4's block-sparse forward on sm90 (H100, H200) only; this GPU is sm{major}{minor} "
                "(use backend='triton')")
    if q.dtype not in FA4_DTYPES:
        return f"FA4 runs float16 and bfloat16, got {q.dtype} (use backend='triton')"
    if q.shape[-1] not in FA4_HEAD_DIMS:
        return f"the FA4 backend runs head_dim {FA4_HEAD_DIMS}, got {q.shape[-1]} (use backend='triton')"
    if block_m != FA4_BLOCK or block_n != FA4_BLOCK:
        return (f"the FA4 backend runs {FA4_BLOCK}x{FA4_BLOCK} blocks (its sm90 tile), got block_m={block_m}, "
                f"block_n={block_n} (use backend='triton')")
    heads = _head_slice(head_indices, q.shape[1])
    if isinstance(heads, str):
        return heads + " (or use backend='triton')"
    if not all(_aligned(x, heads) for x in (q, k, v)):
        return ("q, k, v need a unit last stride and 16-byte aligned address and strides, or FA4 copies them "
                "(use backend='triton')")
    error = fa4_import_error()
    if error is not None:
        return f"flash-attn-4 does not import ({error}); {FA4_INSTALL_HINT} (or use backend='triton')"
    return None


def to_fa4_block_sparse_reference(
    kv_block_indices: torch.Tensor, kv_block_counts: torch.Tensor, kv_tokens: int, block_n: int
) -> Fa4BlockSparse:
    """vdopt's key-block lists -> FA4's block-sparse forward tensors: the definition (pure PyTorch, any device).

    kv_block_indices: int ``[batch, heads, q_blocks, max_kept]``, the first ``kv_block_counts[b, h, i]`` entries
    of each row used (distinct, any order); kv_block_counts: int ``[batch, heads, q_blocks]``. Every kept block
    becomes a "full" block; index columns past the key-block count are dropped (FA4 rejects wider lists). When
    ``kv_tokens`` is not a multiple of ``block_n``, each row's used entries are sorted ascending so the ragged last
    key block, where listed, is the last entry: the one block FA4 bounds by the key length; the padding after them
    becomes the last key block (FA4 never reads it).
    """
    num_kv_blocks = -(-kv_tokens // block_n)
    counts = kv_block_counts.to(torch.int32).contiguous()
    indices = kv_block_indices[..., :num_kv_blocks].to(torch.int32)
    if indices.shape[-1] == 0:  # FA4 needs at least one index column even when nothing is kept
        indices = indices.new_zeros(*indices.shape[:3], 1)
    if kv_tokens % block_n:
        indices = _sorted_block_list_reference(indices, counts, num_kv_blocks)
    return Fa4BlockSparse(
        mask_block_cnt=torch.zeros_like(counts),
        mask_block_idx=counts.new_zeros(*counts.shape, 1),
        full_block_cnt=counts,
        full_block_idx=indices.contiguous(),
    )


def _sorted_block_list_reference(indices: torch.Tensor, counts: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Each row's used entries sorted ascending, its padding set to ``num_kv_blocks - 1``: int32, same shape."""
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    # Padding sorts after every used index; clamped back into range, and FA4 never reads it.
    ordered = torch.where(used, indices.to(torch.int32), num_kv_blocks).sort(dim=-1).values
    return ordered.clamp_(max=num_kv_blocks - 1)


@triton.jit
def _sorted_block_list_kernel(
    Indices, Counts, Out,
    rows, heads, q_blocks, width, num_kv_blocks,
    stride_ib, stride_ih, stride_iq, stride_in,
    stride_cb, stride_ch, stride_cq,
    ROWS: tl.constexpr, WIDTH: tl.constexpr,
):
    # ROWS list rows per program, each sorted in registers: used entries ascending, then the padding, loaded as
    # num_kv_blocks (so it sorts last) and stored as num_kv_blocks - 1. Out is int32 [rows, width], contiguous.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < rows
    q_block = row % q_blocks
    head = (row // q_blocks) % heads
    batch = (row // q_blocks // heads).to(tl.int64)
    count = tl.load(Counts + batch * stride_cb + head * stride_ch + q_block * stride_cq, mask=row_ok, other=0)
    col = tl.arange(0, WIDTH)
    used = row_ok[:, None] & (col[None, :] < count[:, None]) & (col[None, :] < width)
    base = batch * stride_ib + head.to(tl.int64) * stride_ih + q_block.to(tl.int64) * stride_iq
    listed = tl.load(Indices + base[:, None] + col[None, :] * stride_in, mask=used, other=num_kv_blocks)
    ordered = tl.minimum(tl.sort(listed.to(tl.int32), dim=1), num_kv_blocks - 1)
    out = Out + row.to(tl.int64)[:, None] * width + col[None, :]
    tl.store(out, ordered, mask=row_ok[:, None] & (col[None, :] < width))


def _sorted_block_list(indices: torch.Tensor, counts: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """The ragged case of :func:`to_fa4_block_sparse_reference` in one Triton launch: ``indices [B, H, Q, W]``
    (any int dtype and strides, ``W <= num_kv_blocks``, ``W >= 1``) -> int32 ``[B, H, Q, W]``, each row's used
    entries sorted ascending and its padding set to ``num_kv_blocks - 1``."""
    batch, heads, q_blocks, width = indices.shape
    out = torch.empty(batch, heads, q_blocks, width, dtype=torch.int32, device=indices.device)
    rows = batch * heads * q_blocks
    if rows == 0:
        return out
    padded = max(16, triton.next_power_of_2(width))
    per_program = max(1, 4096 // padded)  # a [rows, padded] tile of <= 4096 entries: 32 registers per thread
    _sorted_block_list_kernel[(triton.cdiv(rows, per_program),)](
        indices, counts, out, rows, heads, q_blocks, width, num_kv_blocks,
        *indices.stride(), *counts.stride(), ROWS=per_program, WIDTH=padded, num_warps=4,
    )
    return out


# FA4's empty "mask" lists (zero int32 counts [batch, heads, q_blocks] and their one-column index view), one pair
# per (device, shape), shared by every call: FA4 only reads them. A few shapes per process (one per sequence length
# and head count).
_EMPTY_LISTS: OrderedDict[tuple[torch.device, torch.Size], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_EMPTY_LISTS_KEPT = 16


class _Converted(NamedTuple):
    """What :func:`to_fa4_block_sparse` made for one list tensor, and the state of the inputs it made it from."""

    counts: weakref.ReferenceType
    inputs: tuple[Any, ...]
    full_block_cnt: torch.Tensor | None  # None: the caller's counts, which FA4 reads as they are
    full_block_idx: torch.Tensor | None  # None: the caller's indices, likewise


# Keyed by the index tensor's identity; an entry goes when that tensor does (weak keys, and entries hold the
# caller's counts only weakly), so the memo never keeps a pattern alive.
_CONVERTED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _capturing(device: torch.device) -> bool:
    """Whether work issued now is recorded into a CUDA graph instead of run: what it makes holds no values yet,
    so it must not be kept for later calls."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _empty_lists(shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_block_cnt, mask_block_idx) of FA4's lists for ``shape = [batch, heads, q_blocks]``: all zero."""
    lists = _EMPTY_LISTS.get((device, shape))
    if lists is None:
        zeros = torch.zeros(shape, dtype=torch.int32, device=device)
        lists = zeros, zeros[..., None]
        if not _capturing(device):
            _EMPTY_LISTS[(device, shape)] = lists
            if len(_EMPTY_LISTS) > _EMPTY_LISTS_KEPT:
                _EMPTY_LISTS.popitem(last=False)
    return lists


def _input_state(
    kv_block_indices: torch.Tensor, kv_block_counts: torch.Tensor, kv_tokens: int, block_n: int
) -> tuple[Any, ...] | None:
    """Everything the conversion of these lists depends on besides their values, plus their version counters
    (bumped by every in-place write PyTorch makes, through any view); None for inference tensors, which keep no
    version counter, so a conversion of them is never reused."""
    if kv_block_indices.is_inference() or kv_block_counts.is_inference():
        return None
    return tuple(
        (t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
        for t in (kv_block_indices, kv_block_counts)
    ) + (kv_tokens, block_n)


def to_fa4_block_sparse(
    kv_block_indices: torch.Tensor, kv_block_counts: torch.Tensor, kv_tokens: int, block_n: int
) -> Fa4BlockSparse:
    """:func:`to_fa4_block_sparse_reference`'s result (equal values, no host sync) with the least per-call work.

    Lists FA4 reads as they are (int32, contiguous, at most as wide as the key-block count, no ragged key block)
    pass through without a copy; ragged lists are sorted in one Triton launch (CUDA, or CPU under
    ``TRITON_INTERPRET=1``; PyTorch elsewhere). A conversion that made new tensors is kept for the same list
    tensors: while both are alive and PyTorch has not written to them in place (their version counters), passing
    them again costs no device work. Writes PyTorch does not see (through ``.data``, DLPack, a raw kernel) must be
    followed by ``torch.autograd.graph.increment_version`` on the list tensor. The returned tensors are shared:
    read them, never write them.
    """
    state = _input_state(kv_block_indices, kv_block_counts, kv_tokens, block_n)
    kept = _CONVERTED.get(kv_block_indices) if state is not None else None
    if kept is not None and kept.inputs == state and kept.counts() is kv_block_counts:
        counts = kv_block_counts if kept.full_block_cnt is None else kept.full_block_cnt
        indices = kv_block_indices if kept.full_block_idx is None else kept.full_block_idx
        return Fa4BlockSparse(*_empty_lists(counts.shape, counts.device), counts, indices)

    num_kv_blocks = -(-kv_tokens // block_n)
    counts = kv_block_counts
    if counts.dtype != torch.int32 or not counts.is_contiguous():
        counts = counts.to(torch.int32).contiguous()
    empty_counts, empty_indices = _empty_lists(counts.shape, counts.device)
    width = min(kv_block_indices.shape[-1], num_kv_blocks)
    indices = kv_block_indices if width == kv_block_indices.shape[-1] else kv_block_indices[..., :width]
    if width == 0:  # FA4 needs at least one index column even when nothing is kept; padding, as below
        indices = empty_indices if kv_tokens % block_n == 0 else torch.full_like(empty_indices, num_kv_blocks - 1)
    elif kv_tokens % block_n:
        if indices.is_cuda or _backends.interpreting():
            indices = _sorted_block_list(indices, kv_block_counts, num_kv_blocks)
        else:
            indices = _sorted_block_list_reference(indices, counts, num_kv_blocks)
    elif indices.dtype != torch.int32 or not indices.is_contiguous():
        indices = indices.to(torch.int32).contiguous()
    made_counts = counts is not kv_block_counts
    made_indices = indices is not kv_block_indices
    # Kept only when something was made, and never when the indices are a view of the caller's (a column slice
    # that needed no copy): that costs nothing to redo, and kept here it would keep the caller's tensor alive.
    shares_storage = made_indices and indices.untyped_storage().data_ptr() == kv_block_indices.untyped_storage().data_ptr()
    if state is not None and (made_counts or made_indices) and not shares_storage and not _capturing(counts.device):
        _CONVERTED[kv_block_indices] = _Converted(
            weakref.ref(kv_block_counts), state, counts if made_counts else None, indices if made_indices else None
        )
    return Fa4BlockSparse(empty_counts, empty_indices, counts, indices)


def block_sparse_attention_fa4(
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
    """Run FA4's block-sparse forward under vdopt's op contract (no validation of the index lists; see
    :func:`vdopt.kernels.block_sparse_attention.block_sparse_attention`).

    q: [B, H, Nq, D], k, v: [B, H, Nk, D] (any 16-byte aligned strides); head_indices, if given, a CPU tensor of
    evenly spaced ascending heads. Returns (out [B, G, Nq, D] in q's dtype and memory order, lse float32
    [B, G, Nq], natural log). Raises RuntimeError naming the reason when FA4 cannot run the call.
    """
    reason = fa4_applicable(q, k, v, block_m, block_n, head_indices)
    if reason is not None:
        raise RuntimeError(f"{_OP}: backend='fa4' cannot run this call: {reason}")
    return launch_fa4(q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, head_indices)


def launch_fa4(
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
    """:func:`block_sparse_attention_fa4` without its applicability check, for a caller that has just run
    :func:`fa4_applicable` on these arguments (the dispatcher): the least host work per call."""
    # Imported here, not at the top: block_sparse_attention imports this module.
    from vdopt.kernels.block_sparse_attention import output_like

    heads = _head_slice(head_indices, q.shape[1])
    batch, _, q_tokens, head_dim = q.shape
    if heads != slice(None):
        q, k, v = (x[:, heads] for x in (q, k, v))
    group = q.shape[1]
    out = output_like(q, group, head_dim)
    lse = torch.empty(batch, group, q_tokens, dtype=torch.float32, device=q.device)
    if batch == 0 or group == 0 or q_tokens == 0:
        return out, lse
    block_sparse_tensors_cls, flash_attn_fwd = _import_fa4()
    lists = to_fa4_block_sparse(kv_block_indices, kv_block_counts, k.shape[2], block_n)
    flash_attn_fwd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=None if scale is None else float(scale),
        causal=False,
        block_sparse_tensors=block_sparse_tensors_cls(*lists, block_size=(block_m, block_n)),
        return_lse=True,
        out=out.transpose(1, 2),
        lse=lse,
    )
    return out, lse
