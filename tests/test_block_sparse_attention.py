"""Block-sparse attention: the Triton kernel and the dispatcher/op against the PyTorch reference.

Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before the kernels are imported) at tiny shapes,
on fresh random inputs. Tolerances on ``out`` (|out - ref| against a reference computed in float32 from the same
inputs): float32 1e-4 (the kernel multiplies in IEEE float32); float16 4e-3 and bfloat16 3e-2, a few units in
the last place of outputs of magnitude <= 1, from rounding the softmax weights to the input dtype before P @ V
(as every flash-attention kernel does). lse is float32 from exact products in all dtypes: 1e-4.
"""

from __future__ import annotations

import os

import pytest
import torch

# On a machine without a GPU, Triton kernels run in the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from triton.runtime.interpreter import InterpretedFunction
from vdopt.kernels import block_sparse_attention as bsa
from vdopt.kernels.reference import (
    block_sparse_attention_reference,
    kv_block_list_from_mask,
)

# Rows with no key take log2(0) = -inf on purpose; numpy (the interpreter's arithmetic) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
OUT_ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Plus one unit in the last place of the output dtype: the kernel and the reference round the same fp32 value
# separately, and at |out| ~ 4 (randn values) one bf16 ulp is 0.031, above the absolute tolerance alone.
OUT_RTOL = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}
LSE_ATOL = 1e-4

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set when no GPU)"
)

if not torch.cuda.is_available() and not isinstance(bsa._block_sparse_fwd_kernel, InterpretedFunction):
    pytest.skip(
        "vdopt.kernels.block_sparse_attention was imported before TRITON_INTERPRET=1 was set; run this file "
        "alone or export TRITON_INTERPRET=1",
        allow_module_level=True,
    )


def random_inputs(batch, heads, q_tokens, kv_tokens, head_dim, dtype, token_major=True, seed=None):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)

    def make(tokens):
        if token_major:  # [B, N, H, D] storage viewed as [B, H, N, D], as models produce it
            return torch.randn(batch, tokens, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype)

    return make(q_tokens), make(kv_tokens), make(kv_tokens)


def random_lists(batch, heads, q_blocks, kv_blocks, density=0.5, empty_rows=()):
    mask = torch.rand(batch, heads, q_blocks, kv_blocks) < density
    for b, h, i in empty_rows:
        mask[b, h, i] = False
    return kv_block_list_from_mask(mask)


def assert_matches(out, lse, ref, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=OUT_ATOL[dtype], rtol=OUT_RTOL[dtype])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)


@interpreted
@pytest.mark.parametrize(
    "dtype,head_dim,batch",
    [
        (torch.float32, 64, 1),
        (torch.float16, 64, 2),
        (torch.bfloat16, 64, 1),
        (torch.bfloat16, 128, 2),
        (torch.float16, 128, 1),
    ],
)
@pytest.mark.parametrize("use_tma,host_descriptors", [(True, None), (True, False), (False, None)],
                         ids=["tma_default_per_head_host", "tma_in_kernel_descriptors", "pointer"])
def test_kernel_matches_reference(dtype, head_dim, batch, use_tma, host_descriptors):
    """Ragged query and key counts (70 and 90 tokens, blocks 32 and 16), unequal lengths, one empty row; TMA loads
    through the default per-head host descriptors and through descriptors built in the kernel, and pointer loads."""
    q, k, v = random_inputs(batch, 2, 70, 90, head_dim, dtype)
    idx, cnt = random_lists(batch, 2, 3, 6, empty_rows=[(0, 1, 2)])
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(32, 16, 2, 4), use_tma=use_tma,
                                                 host_descriptors=host_descriptors)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 16)
    assert_matches(out, lse, ref, ref_lse, dtype)


@interpreted
@pytest.mark.parametrize("kind", ["per_head", "storage"])
@pytest.mark.parametrize("token_major", [True, False], ids=["BNHD", "BHND"])
@pytest.mark.parametrize("dtype,head_dim,batch", [(torch.float32, 32, 2), (torch.bfloat16, 64, 1),
                                                  (torch.float16, 16, 2)])
def test_host_descriptors_match_reference(kind, token_major, dtype, head_dim, batch):
    """Host-made descriptors (4-D per head, or 2-D over the storage) in either memory order: ragged query/key
    counts (storage descriptors read the next head's or batch's rows there, which must get no weight), an empty
    row, batch 2, a head-group launch."""
    q, k, v = random_inputs(batch, 3, 70, 90, head_dim, dtype, token_major=token_major)
    assert bsa.host_descriptor_layout(q, k, v) == (2 if token_major else 1)
    idx, cnt = random_lists(batch, 3, 3, 6, empty_rows=[(0, 1, 2)])
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(32, 16, 2, 4),
                                                 host_descriptors=kind)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 16)
    assert_matches(out, lse, ref, ref_lse, dtype)
    assert_head_group_matches(q, k, v, idx, cnt, [2, 0], dtype, host_descriptors=kind)


@interpreted
@pytest.mark.parametrize("token_major", [True, False], ids=["BNHD", "BHND"])
def test_per_head_descriptors_read_zeros_past_a_heads_rows(token_major):
    """q, k, v as the first 70/90 rows of longer buffers whose other rows hold NaN: per-head descriptors bound
    each ragged tile by its own head's rows, so the NaNs never reach the output (storage descriptors cannot
    describe these padded views at all)."""
    batch, heads, head_dim, pad = 2, 3, 32, 24
    full = [random_inputs(batch, heads, n + pad, n + pad, head_dim, torch.float16, token_major=token_major)[i]
            for i, n in ((0, 70), (1, 90), (2, 90))]
    for t in full:
        t[:, :, -pad:] = float("nan")
    q, k, v = full[0][:, :, :70], full[1][:, :, :90], full[2][:, :, :90]
    assert bsa.host_descriptor_layout(q, k, v) == 0
    idx, cnt = random_lists(batch, heads, 3, 6)
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(32, 16, 2, 4),
                                                 host_descriptors=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 16)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert_matches(out, lse, ref, ref_lse, torch.float16)


@interpreted
@pytest.mark.parametrize("token_major", [True, False], ids=["BNHD", "BHND"])
@pytest.mark.parametrize("dtype,head_dim,batch", [(torch.float32, 32, 2), (torch.bfloat16, 64, 1),
                                                  (torch.float16, 16, 2)])
def test_output_descriptor_matches_reference(token_major, dtype, head_dim, batch):
    """Output tiles stored through a per-head descriptor: ragged query count (the last tile's rows past the head
    are clipped, not written into the next head), an empty row, batch 2, a head-group launch, a persistent one."""
    q, k, v = random_inputs(batch, 3, 70, 90, head_dim, dtype, token_major=token_major)
    idx, cnt = random_lists(batch, 3, 3, 6, empty_rows=[(0, 1, 2)])
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 16)
    for persistent in (False, True):
        out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(32, 16, 2, 4),
                                                     host_descriptors="per_head", out_descriptor=True,
                                                     persistent=persistent)
        assert_matches(out, lse, ref, ref_lse, dtype)
    assert_head_group_matches(q, k, v, idx, cnt, [2, 0], dtype, host_descriptors="per_head", out_descriptor=True)
    with pytest.raises(ValueError, match=r"out_descriptor=True needs per-head host descriptors .* uses storage"):
        bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(32, 16, 2, 4),
                                          host_descriptors="storage", out_descriptor=True)


def test_host_descriptors_rejects_an_unknown_kind():
    q, k, v = random_inputs(1, 2, 40, 40, 16, torch.float16)
    idx, cnt = random_lists(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"host_descriptors must be False, True or one of .*'per_head'.* got 'tma'"):
        bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 16, 16, config=(16, 16, 2, 4), host_descriptors="tma")


def assert_head_group_matches(q, k, v, idx, cnt, heads, dtype, **options):
    """A head-group launch over ``heads`` with the first len(heads) heads' lists (blocks 32 x 16, 32-row tiles)."""
    heads, group = torch.tensor(heads), len(heads)
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx[:, :group], cnt[:, :group], 32, 16, head_indices=heads,
                                                 config=(32, 16, 2, 4), **options)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx[:, :group], cnt[:, :group], 32, 16,
                                                    head_indices=heads)
    assert_matches(out, lse, ref, ref_lse, dtype)


@interpreted
@pytest.mark.parametrize("host_descriptors", [False, True], ids=["device_desc", "host_desc"])
@pytest.mark.parametrize("dtype,head_dim,batch", [(torch.float32, 32, 2), (torch.bfloat16, 64, 1)])
def test_persistent_launch_matches_reference(host_descriptors, dtype, head_dim, batch):
    """A few programs each taking several query tiles, longest key list first: unequal lists (one empty), ragged
    query and key counts, query tiles smaller than blocks, a head-group launch."""
    q, k, v = random_inputs(batch, 3, 100, 90, head_dim, dtype)
    idx, cnt = random_lists(batch, 3, 4, 6, density=0.6, empty_rows=[(0, 2, 1)])
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(16, 16, 2, 4),
                                                 host_descriptors=host_descriptors, persistent=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 16)
    assert_matches(out, lse, ref, ref_lse, dtype)
    assert_head_group_matches(q, k, v, idx, cnt, [1, 2], dtype, persistent=True)


def test_persistent_work_order_is_longest_first_and_stable():
    counts = torch.tensor([[[2, 5], [5, 0]]], dtype=torch.int32)  # [batch 1, heads 2, query blocks 2]
    # Two query tiles per block, 3 tiles of the 4 a block pair holds (ragged end): items h * 3 + tile.
    order = bsa._longest_first(counts, 2, q_tokens=80, tile_m=32)
    assert order.tolist() == [2, 3, 4, 0, 1, 5]
    assert order.dtype == torch.int32


@interpreted
def test_host_descriptors_read_slices_of_a_fused_qkv_buffer():
    """q, k, v as column slices of one [B, N, 3 * H * D] projection output (rows of 3 * H * D elements), ragged."""
    batch, tokens, heads, head_dim = 2, 75, 3, 16
    fused = torch.randn(batch, tokens, 3 * heads * head_dim).to(torch.float16)
    q, k, v = (part.unflatten(-1, (heads, head_dim)).transpose(1, 2) for part in fused.chunk(3, dim=-1))
    assert bsa.host_descriptor_layout(q, k, v) == 2
    idx, cnt = random_lists(batch, heads, 3, 5)
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 32, 16, config=(32, 16, 2, 4),
                                                 host_descriptors=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 16)
    assert_matches(out, lse, ref, ref_lse, torch.float16)


def test_host_descriptor_layout_needs_one_memory_order():
    q, k, _ = random_inputs(2, 3, 40, 40, 16, torch.float16, token_major=True)
    _, _, v = random_inputs(2, 3, 40, 40, 16, torch.float16, token_major=False)
    assert bsa.host_descriptor_layout(q, k) == 2 and bsa.host_descriptor_layout(v) == 1
    assert bsa.host_descriptor_layout(q, k, v) == 0
    # Batch not outermost ([N, B, H, D] storage): no descriptor layout.
    assert bsa.host_descriptor_layout(torch.randn(40, 2, 3, 16).permute(1, 2, 0, 3)) == 0
    idx, cnt = random_lists(2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"host_descriptors='storage' needs TMA-compatible .* one storage layout"):
        bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 16, 16, config=(16, 16, 2, 4), use_tma=True,
                                          host_descriptors="storage")
    # Per-head descriptors take each tensor's own strides, so mixed memory orders are fine.
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 16, 16, config=(16, 16, 2, 4),
                                                 host_descriptors="per_head")
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 16, 16)
    assert_matches(out, lse, ref, ref_lse, torch.float16)
    with pytest.raises(ValueError, match=r"host_descriptors='per_head' needs TMA-compatible .* Call with host_desc"):
        bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 16, 16, config=(16, 16, 2, 4), use_tma=False,
                                          host_descriptors="per_head")


@interpreted
@pytest.mark.parametrize("ragged_mode", [bsa.RAGGED_MASK_EVERY_TILE, bsa.RAGGED_MASK_IN_BRANCH])
def test_key_tiles_smaller_than_blocks(ragged_mode):
    """Key blocks of 64 walked in tiles of 16, last block 3 tokens long (most of its tiles lie past the end)."""
    q, k, v = random_inputs(1, 2, 64, 131, 32, torch.float16)
    idx, cnt = random_lists(1, 2, 2, 3, density=0.7)
    idx[0, 0, 0, 0], cnt[0, 0, 0] = 2, 1  # a row whose only block is the 3-token one
    out, lse = bsa.block_sparse_attention_triton(
        q, k, v, idx, cnt, 32, 64, config=(32, 16, 2, 4), kv_ragged_mode=ragged_mode
    )
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 32, 64)
    assert_matches(out, lse, ref, ref_lse, torch.float16)


@interpreted
def test_dispatcher_triton_backend_and_layout():
    q, k, v = random_inputs(2, 3, 48, 48, 64, torch.bfloat16)
    idx, cnt = random_lists(2, 3, 3, 3)
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, scale=0.3, backend="triton")
    assert bsa.last_backend() == "triton"
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 16, 16, scale=0.3)
    assert_matches(out, lse, ref, ref_lse, torch.bfloat16)
    assert out.stride(2) > out.stride(1)  # token-major in, token-major out: no transpose copy needed after


@interpreted
def test_empty_key_lists_give_zero_and_minus_inf():
    q, k, v = random_inputs(1, 2, 40, 40, 32, torch.float16)
    idx = torch.zeros(1, 2, 3, 1, dtype=torch.int32)
    cnt = torch.zeros(1, 2, 3, dtype=torch.int32)
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, backend="triton")
    assert (out == 0).all() and (lse == float("-inf")).all()
    ref, ref_lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, backend="reference")
    assert (ref == 0).all() and (ref_lse == float("-inf")).all()


@interpreted
def test_one_block():
    q, k, v = random_inputs(1, 1, 32, 32, 64, torch.float32, token_major=False)
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    cnt = torch.ones(1, 1, 1, dtype=torch.int32)
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 32, 32, backend="triton")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    scores = q @ k.transpose(-1, -2) / 8.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


@interpreted
def test_head_group_launch_reads_only_listed_heads():
    q, k, v = random_inputs(2, 5, 50, 50, 64, torch.float16)
    heads = torch.tensor([4, 1, 2])
    idx, cnt = random_lists(2, 3, 4, 4)
    # Poison the heads outside the group: a kernel that read them would produce NaN.
    for t in (q, k, v):
        t[:, [0, 3]] = float("nan")
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, head_indices=heads, backend="triton")
    assert out.shape == (2, 3, 50, 64) and lse.shape == (2, 3, 50)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 16, 16, head_indices=heads)
    assert_matches(out, lse, ref, ref_lse, torch.float16)


@interpreted
def test_duplicate_and_out_of_range_indices_rejected():
    q, k, v = random_inputs(1, 1, 32, 32, 32, torch.float16)
    idx = torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="repeats a key block"):
            bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, backend=backend)
    idx[0, 0, 1, 0] = 2
    with pytest.raises(ValueError, match="outside"):
        bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, backend="triton", validate=True)
    with pytest.raises(ValueError, match="kv_block_counts"):
        bsa.block_sparse_attention(q, k, v, idx, cnt[..., :1], 16, 16, backend="triton")


def test_backend_choice_and_errors(monkeypatch):
    q, k, v = random_inputs(1, 1, 16, 16, 16, torch.float32)
    idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16)
    assert bsa.last_backend() == "reference"  # "auto" on CPU tensors
    with pytest.raises(ValueError, match="backend='fast'"):
        bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16, backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        bsa.block_sparse_attention_triton(*random_inputs(1, 1, 16, 16, 24, torch.float32), idx, cnt, 16, 16)


class _SparseAttention(torch.nn.Module):
    def forward(self, q, k, v, idx, cnt):
        out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 16, 16)
        return out * 2, lse


def test_op_is_one_node_under_export_and_compile():
    q, k, v = random_inputs(1, 2, 32, 32, 16, torch.float32)
    idx, cnt = random_lists(1, 2, 2, 2)
    model = _SparseAttention()
    exported = torch.export.export(model, (q, k, v, idx, cnt))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vdopt.block_sparse_attention.default) == 1
    ref, ref_lse = model(q, k, v, idx, cnt)
    out, lse = exported.module()(q, k, v, idx, cnt)
    torch.testing.assert_close(out, ref)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, lse = compiled(q, k, v, idx, cnt)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_matches_reference(dtype, head_dim):
    q, k, v = (t.cuda() for t in random_inputs(2, 3, 1000, 1100, head_dim, dtype))
    idx, cnt = (t.cuda() for t in random_lists(2, 3, 8, 9, density=0.4, empty_rows=[(1, 2, 3)]))
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, backend="auto", validate=True)
    assert bsa.last_backend() in ("fa4", "triton")  # fa4 where flash-attn-4 is installed (tests/test_fa4_backend.py)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 128, 128)
    assert_matches(out, lse, ref, ref_lse, dtype)
    # The autotuned launch with each kind of descriptor (each config's pre-hook sets host descriptors' tile shapes).
    for kind in (None, "per_head", "storage", False):
        out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 128, 128, host_descriptors=kind)
        assert_matches(out, lse, ref, ref_lse, dtype)
    out, lse = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 128, 128, out_descriptor=True)
    assert_matches(out, lse, ref, ref_lse, dtype)
