"""Cluster-sparse attention (variable-size clusters): the Triton kernels and the op against the PyTorch reference.

Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before the kernels are imported) at tiny shapes on
fresh random inputs; tolerances as in test_block_sparse_attention.py (out: float32 1e-4, float16 4e-3, bfloat16
3e-2 from rounding softmax weights to the input dtype before P @ V; lse 1e-4).
"""

from __future__ import annotations

import os

import pytest
import torch

# On a machine without a GPU, Triton kernels run in the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from triton.runtime.interpreter import InterpretedFunction
from vdopt.kernels import cluster_sparse_attention as csa
from vdopt.kernels.reference import cluster_sparse_attention_reference, kv_block_list_from_mask

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
OUT_ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LSE_ATOL = 1e-4

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set when no GPU)"
)

if not torch.cuda.is_available() and not isinstance(csa._cluster_sparse_fwd_kernel, InterpretedFunction):
    pytest.skip(
        "vdopt.kernels.cluster_sparse_attention was imported before TRITON_INTERPRET=1 was set; run this file "
        "alone or export TRITON_INTERPRET=1",
        allow_module_level=True,
    )


def random_offsets(batch, heads, tokens, clusters, empty=()):
    """Ascending boundaries [B, H, clusters + 1] of random cluster sizes; clusters listed in ``empty`` are empty."""
    cuts = torch.sort(torch.randint(0, tokens + 1, (batch, heads, clusters - 1)), -1).values
    offsets = torch.cat(
        [torch.zeros(batch, heads, 1, dtype=torch.long), cuts, torch.full((batch, heads, 1), tokens)], -1
    )
    for b, h, c in empty:  # make cluster c empty by moving its end onto its start
        offsets[b, h, c + 1] = offsets[b, h, c]
    return torch.cummax(offsets, -1).values.to(torch.int32)


def random_inputs(batch, heads, q_tokens, kv_tokens, head_dim, dtype):
    q = torch.randn(batch, q_tokens, heads, head_dim).to(dtype).transpose(1, 2)
    return q, torch.randn(batch, heads, kv_tokens, head_dim).to(dtype), torch.randn(batch, heads, kv_tokens, head_dim).to(dtype)


def assert_matches(out, lse, ref, ref_lse, dtype):
    assert out.dtype == dtype and not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=OUT_ATOL[dtype], rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)


@interpreted
@pytest.mark.parametrize(
    "dtype,head_dim,batch",
    [(torch.float32, 64, 1), (torch.float16, 64, 2), (torch.bfloat16, 128, 2), (torch.float16, 128, 1)],
)
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointer"])
@pytest.mark.parametrize("kv_packing", [False, True], ids=["padded", "packed"])
def test_kernel_matches_reference(dtype, head_dim, batch, use_tma, kv_packing):
    """Random cluster sizes (some larger than a tile, some empty), unequal q/k token counts, an empty key list."""
    q, k, v = random_inputs(batch, 2, 90, 75, head_dim, dtype)
    q_off = random_offsets(batch, 2, 90, 5, empty=[(0, 1, 3)])
    kv_off = random_offsets(batch, 2, 75, 6, empty=[(0, 0, 2)])
    mask = torch.rand(batch, 2, 5, 6) < 0.5
    mask[0, 0, 1] = False
    idx, cnt = kv_block_list_from_mask(mask)
    out, lse = csa.cluster_sparse_attention_triton(
        q, k, v, q_off, kv_off, idx, cnt, config=(16, 16, 2, 4), use_tma=use_tma, kv_packing=kv_packing
    )
    ref, ref_lse = cluster_sparse_attention_reference(q, k, v, q_off, kv_off, idx, cnt)
    assert_matches(out, lse, ref, ref_lse, dtype)


@interpreted
@pytest.mark.parametrize("config", [(16, 16, 1, 4), (32, 32, 1, 4)], ids=["16x16", "32x32"])
def test_packed_keys_tiles_span_many_clusters(config):
    """Packed keys on 50 key clusters of 0..~6 tokens in 64 keys, kept in shuffled order: one key tile spans up to
    BLOCK_N clusters (empty ones skipped), some lists hold every key (64: the last tile full) and some none."""
    torch.manual_seed(5)
    q, k, v = random_inputs(2, 2, 40, 64, 16, torch.float32)
    q_off = random_offsets(2, 2, 40, 4)
    kv_off = random_offsets(2, 2, 64, 50)
    mask = torch.rand(2, 2, 4, 50) < 0.6
    mask[0, 0, 0], mask[1, 1, 2] = True, False
    idx, cnt = kv_block_list_from_mask(mask)
    order = torch.argsort(torch.rand(idx.shape) + (torch.arange(idx.shape[-1]) >= cnt[..., None]), -1)
    idx = idx.gather(-1, order)  # kept clusters in any order; unused slots stay last
    out, lse = csa.cluster_sparse_attention_triton(q, k, v, q_off, kv_off, idx, cnt, config=config, kv_packing=True)
    ref, ref_lse = cluster_sparse_attention_reference(q, k, v, q_off, kv_off, idx, cnt)
    assert_matches(out, lse, ref, ref_lse, torch.float32)


def random_permutations(batch, heads, tokens):
    return torch.argsort(torch.rand(batch, heads, tokens), -1).to(torch.int32)


def test_reference_with_permutations_is_gather_then_scatter():
    """The reference's fused-permutation form against permuting by hand (index_select / inverse index)."""
    q, k, v = random_inputs(1, 1, 30, 26, 16, torch.float32)
    q_perm, kv_perm = torch.randperm(30, dtype=torch.int32), torch.randperm(26, dtype=torch.int32)
    q_off, kv_off = random_offsets(1, 1, 30, 4), random_offsets(1, 1, 26, 3)
    idx, cnt = kv_block_list_from_mask(torch.rand(1, 1, 4, 3) < 0.7)
    out, lse = cluster_sparse_attention_reference(q, k, v, q_off, kv_off, idx, cnt, q_perm=q_perm, kv_perm=kv_perm)
    permuted, permuted_lse = cluster_sparse_attention_reference(
        q[:, :, q_perm.long()], k[:, :, kv_perm.long()], v[:, :, kv_perm.long()], q_off, kv_off, idx, cnt)
    inverse = torch.argsort(q_perm.long())
    torch.testing.assert_close(out, permuted[:, :, inverse], atol=0, rtol=0)
    torch.testing.assert_close(lse, permuted_lse[:, :, inverse], atol=0, rtol=0)


@interpreted
@pytest.mark.parametrize("q_gather", ["launch", "kernel"])
@pytest.mark.parametrize("kv_packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype,head_dim,batch", [(torch.float32, 32, 2), (torch.bfloat16, 64, 1),
                                                  (torch.float16, 16, 2)])
def test_kernel_fuses_permutations(q_gather, kv_packing, dtype, head_dim, batch):
    """q, k, v in their original order with per-head permutations (and a shared 1-D one): K/V rows gathered on load,
    Q gathered by a launch or in the kernel, out and lse scattered on store, equal to the reference that permutes
    first; ragged clusters, an empty one."""
    q, k, v = random_inputs(batch, 2, 70, 53, head_dim, dtype)
    q_off = random_offsets(batch, 2, 70, 5, empty=[(0, 1, 2)])
    kv_off = random_offsets(batch, 2, 53, 4)
    idx, cnt = kv_block_list_from_mask(torch.rand(batch, 2, 5, 4) < 0.6)
    for q_perm, kv_perm in ((random_permutations(batch, 2, 70), random_permutations(batch, 2, 53)),
                            (torch.randperm(70, dtype=torch.int32), None)):
        out, lse = csa.cluster_sparse_attention_triton(q, k, v, q_off, kv_off, idx, cnt, config=(16, 16, 1, 4),
                                                       kv_packing=kv_packing, q_perm=q_perm, kv_perm=kv_perm,
                                                       q_gather=q_gather)
        ref, ref_lse = cluster_sparse_attention_reference(q, k, v, q_off, kv_off, idx, cnt, q_perm=q_perm,
                                                          kv_perm=kv_perm)
        assert_matches(out, lse, ref, ref_lse, dtype)


@interpreted
@pytest.mark.parametrize("kv_packing", [False, True], ids=["padded", "packed"])
def test_head_group_launch_reads_only_listed_heads(kv_packing):
    """A launch over heads [3, 0] of 4, with per-launched-head lists and permutations: the other heads hold NaN,
    so a kernel that read them would produce NaN; equal to the reference on the selected heads."""
    q, k, v = random_inputs(2, 4, 60, 50, 32, torch.float16)
    for t in (q, k, v):
        t[:, [1, 2]] = float("nan")
    heads = torch.tensor([3, 0])
    q_off, kv_off = random_offsets(2, 2, 60, 4), random_offsets(2, 2, 50, 3)
    idx, cnt = kv_block_list_from_mask(torch.rand(2, 2, 4, 3) < 0.7)
    perms = {"q_perm": random_permutations(2, 2, 60), "kv_perm": random_permutations(2, 2, 50)}
    for fused in ({}, perms):
        out, lse = csa.cluster_sparse_attention(q, k, v, q_off, kv_off, idx, cnt, backend="triton", head_indices=heads,
                                                kv_packing=kv_packing, **fused)
        assert out.shape == (2, 2, 60, 32) and lse.shape == (2, 2, 60)
        ref, ref_lse = cluster_sparse_attention_reference(q[:, heads], k[:, heads], v[:, heads], q_off, kv_off, idx,
                                                          cnt, **fused)
        assert_matches(out, lse, ref, ref_lse, torch.float16)
        if fused:  # the Q tile gathered in the kernel, reading head heads[g] of q
            out, lse = csa.cluster_sparse_attention_triton(q, k, v, q_off, kv_off, idx, cnt, head_indices=heads,
                                                           kv_packing=kv_packing, q_gather="kernel", **fused)
            assert_matches(out, lse, ref, ref_lse, torch.float16)
    with pytest.raises(ValueError, match=r"head_indices must lie in \[0, 4\)"):
        csa.cluster_sparse_attention(q, k, v, q_off, kv_off, idx, cnt, head_indices=torch.tensor([3, 4]))


@interpreted
def test_op_with_permutations_checks_them():
    q, k, v = random_inputs(1, 2, 40, 40, 16, torch.float16)
    off = random_offsets(1, 2, 40, 3)
    idx, cnt = kv_block_list_from_mask(torch.rand(1, 2, 3, 3) < 0.8)
    perm = random_permutations(1, 2, 40)
    out, lse = csa.cluster_sparse_attention(q, k, v, off, off, idx, cnt, backend="triton", q_perm=perm, kv_perm=perm)
    ref, ref_lse = csa.cluster_sparse_attention(q, k, v, off, off, idx, cnt, backend="reference", q_perm=perm,
                                                kv_perm=perm)
    assert_matches(out, lse, ref, ref_lse, torch.float16)
    assert out.stride() == q.stride()  # q's memory order, as the fake says
    with pytest.raises(ValueError, match=r"q_perm must be \[tokens\] = \[40\]"):
        csa.cluster_sparse_attention(q, k, v, off, off, idx, cnt, q_perm=perm[0, 0, :39])
    repeated = perm.clone()
    repeated[0, 1, 0] = repeated[0, 1, 1]
    with pytest.raises(ValueError, match="kv_perm must hold each of 0..39 once"):
        csa.cluster_sparse_attention(q, k, v, off, off, idx, cnt, kv_perm=repeated)


@interpreted
def test_op_dispatch_one_cluster_and_layout():
    q, k, v = random_inputs(1, 2, 40, 40, 32, torch.bfloat16)
    one = torch.tensor([0, 40], dtype=torch.int32).expand(1, 2, 2).contiguous()
    idx, cnt = torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32)
    out, lse = csa.cluster_sparse_attention(q, k, v, one, one, idx, cnt, backend="triton")
    assert csa.last_backend() == "triton"
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), dense, atol=OUT_ATOL[torch.bfloat16], rtol=0)
    assert out.stride(2) > out.stride(1)
    ref, ref_lse = csa.cluster_sparse_attention(q, k, v, one, one, idx, cnt)
    assert csa.last_backend() == "reference"
    assert_matches(out, lse, ref, ref_lse, torch.bfloat16)


@interpreted
def test_empty_key_lists_give_zero_and_minus_inf():
    q, k, v = random_inputs(1, 1, 30, 30, 16, torch.float16)
    off = random_offsets(1, 1, 30, 3)
    idx, cnt = torch.zeros(1, 1, 3, 2, dtype=torch.int32), torch.zeros(1, 1, 3, dtype=torch.int32)
    for kv_packing in (False, True):
        out, lse = csa.cluster_sparse_attention(q, k, v, off, off, idx, cnt, backend="triton", kv_packing=kv_packing)
        assert (out == 0).all() and (lse == float("-inf")).all()


@interpreted
def test_bad_lists_rejected():
    q, k, v = random_inputs(1, 1, 30, 30, 16, torch.float16)
    off = torch.tensor([[[0, 10, 30]]], dtype=torch.int32)
    idx = torch.tensor([[[[1, 1], [0, 1]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 2]]], dtype=torch.int32)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="repeats"):
            csa.cluster_sparse_attention(q, k, v, off, off, idx, cnt, backend=backend)
    idx[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="end at the token count"):
        csa.cluster_sparse_attention(q, k, v, off, torch.tensor([[[0, 10, 29]]], dtype=torch.int32), idx, cnt,
                                     backend="triton")
    with pytest.raises(ValueError, match="q_offsets"):
        csa.cluster_sparse_attention(q, k, v, off[0], off, idx, cnt, backend="triton")


class _ClusterAttention(torch.nn.Module):
    def forward(self, q, k, v, q_off, kv_off, idx, cnt):
        out, lse = csa.cluster_sparse_attention(q, k, v, q_off, kv_off, idx, cnt)
        return out + 1, lse


def test_op_is_one_node_under_export_and_compile():
    q, k, v = random_inputs(1, 2, 24, 24, 16, torch.float32)
    off = random_offsets(1, 2, 24, 3)
    idx, cnt = kv_block_list_from_mask(torch.rand(1, 2, 3, 3) < 0.6)
    args = (q, k, v, off, off, idx, cnt)
    model = _ClusterAttention()
    exported = torch.export.export(model, args)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vdopt.cluster_sparse_attention.default) == 1
    ref, ref_lse = model(*args)
    torch.testing.assert_close(exported.module()(*args)[0], ref)
    out, lse = torch.compile(model, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_matches_reference(dtype, head_dim):
    q, k, v = (t.cuda() for t in random_inputs(2, 3, 1500, 1300, head_dim, dtype))
    q_off = random_offsets(2, 3, 1500, 11, empty=[(1, 1, 4)]).cuda()
    kv_off = random_offsets(2, 3, 1300, 9).cuda()
    idx, cnt = (t.cuda() for t in kv_block_list_from_mask(torch.rand(2, 3, 11, 9) < 0.4))
    ref, ref_lse = cluster_sparse_attention_reference(q, k, v, q_off, kv_off, idx, cnt)
    for kv_packing in (False, True):
        out, lse = csa.cluster_sparse_attention(q, k, v, q_off, kv_off, idx, cnt, validate=True, kv_packing=kv_packing)
        assert csa.last_backend() == "triton"
        assert_matches(out, lse, ref, ref_lse, dtype)
