"""FlashAttention-4 backend of block-sparse attention: list conversion, dispatch, errors (CPU); FA4 vs the
PyTorch reference (GPU with flash-attn-4 installed).

GPU tolerances on ``out`` (|out - ref| against the float32 reference from the same inputs) are those of the Triton
kernel's tests: float16 4e-3 and bfloat16 3e-2, a few units in the last place of outputs of magnitude <= 1, from
rounding the softmax weights to the input dtype before P @ V, as every flash-attention kernel does; lse is float32
from exact products: 1e-4.
"""

from __future__ import annotations

import os

import pytest
import torch

# Same rule as the other kernel tests: without a GPU, Triton must be in interpreter mode before it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch._subclasses.fake_tensor import FakeTensorMode
from vdopt.kernels import _backends, fa4_backend
from vdopt.kernels import block_sparse_attention as bsa
from vdopt.kernels.reference import block_sparse_attention_reference, kv_block_list_from_mask

OUT_ATOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
LSE_ATOL = 1e-4
# fa4_applicable reads data_ptr() for its alignment check; on the fake CUDA tensors below that is 0 and warns.
fake_cuda_warning = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor:UserWarning")


def fake_cuda_qkv(heads, head_dim, row, dtype=torch.bfloat16):
    """A fake (no memory) CUDA tensor [2, heads, 1000, head_dim] viewing token-major storage whose rows hold
    ``row >= head_dim`` elements per head; call under FakeTensorMode (works without a GPU)."""
    return torch.empty_strided((2, heads, 1000, head_dim), (1000 * heads * row, row, heads * row, 1), dtype=dtype,
                               device="cuda")


def random_lists(batch, heads, q_blocks, kv_blocks, density=0.5, empty_rows=(), seed=None):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)
    mask = torch.rand(batch, heads, q_blocks, kv_blocks, generator=gen) < density
    for b, h, i in empty_rows:
        mask[b, h, i] = False
    return kv_block_list_from_mask(mask)


def shuffle_used(indices, counts, seed=0):
    """The same lists with each row's used entries in random order (the op does not require ascending lists)."""
    gen = torch.Generator().manual_seed(seed)
    out = indices.clone()
    for row, count in zip(out.view(-1, out.shape[-1]), counts.flatten().tolist()):
        row[:count] = row[:count][torch.randperm(count, generator=gen)]
    return out


# ----------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("kv_tokens", [1100, 1152])  # ragged (9 blocks, the last 76 tokens) and exact (9 blocks)
@pytest.mark.parametrize("shuffled", [False, True])
def test_conversion_matches_brute_force(kv_tokens, shuffled):
    block_n, kv_blocks = 128, 9
    indices, counts = random_lists(2, 3, 8, kv_blocks, density=0.4, empty_rows=[(1, 2, 3), (0, 0, 7)])
    counts[0, 1, 2] = 1
    indices[0, 1, 2, 0] = kv_blocks - 1  # a row whose only block is the last one
    if shuffled:
        indices = shuffle_used(indices, counts)
    # Wider than the key-block count, with junk padding: FA4 rejects index widths above the block count.
    wide = torch.cat([indices, torch.full((*indices.shape[:3], 3), 77, dtype=torch.int32)], dim=-1).long()
    lists = fa4_backend.to_fa4_block_sparse(wide, counts.long(), kv_tokens, block_n)
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in lists)
    assert lists.full_block_cnt.shape == lists.mask_block_cnt.shape == (2, 3, 8)
    assert lists.mask_block_idx.shape == (2, 3, 8, 1)
    assert lists.full_block_idx.shape[:3] == (2, 3, 8) and 1 <= lists.full_block_idx.shape[-1] <= kv_blocks
    assert (lists.mask_block_cnt == 0).all()
    assert torch.equal(lists.full_block_cnt, counts)
    ragged = kv_tokens % block_n != 0
    for b in range(2):
        for h in range(3):
            for i in range(8):
                count = int(counts[b, h, i])
                given = indices[b, h, i, :count].tolist()
                got = lists.full_block_idx[b, h, i, :count].tolist()
                assert sorted(got) == sorted(given)
                if ragged:
                    if kv_blocks - 1 in given:
                        assert got[-1] == kv_blocks - 1  # FA4 bounds by the key length only the last listed block
                    assert all(0 <= x < kv_blocks for x in lists.full_block_idx[b, h, i].tolist())  # padding too
                else:
                    assert got == given  # order kept when nothing is ragged


def test_conversion_of_empty_lists():
    indices = torch.zeros(1, 2, 3, 0, dtype=torch.int32)
    counts = torch.zeros(1, 2, 3, dtype=torch.int32)
    lists = fa4_backend.to_fa4_block_sparse(indices, counts, 300, 128)
    assert lists.full_block_idx.shape == (1, 2, 3, 1) and (lists.full_block_cnt == 0).all()


def assert_same_lists(got, expected):
    """Equal values, int32, contiguous: what FA4 reads is the same."""
    for name, a, b in zip(fa4_backend.Fa4BlockSparse._fields, got, expected):
        assert a.dtype == torch.int32 and a.is_contiguous(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kv_tokens", [1100, 1152], ids=["ragged", "exact"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["ascending", "shuffled", "wide", "strided", "empty"])
def test_fast_conversion_equals_reference(kv_tokens, dtype, layout):
    """to_fa4_block_sparse (a Triton sort under the interpreter where the last key block is ragged) gives exactly
    the reference's tensors, batch 2, empty rows, a row holding only the ragged block."""
    kv_blocks = 9
    indices, counts = random_lists(2, 3, 8, kv_blocks, density=0.4, empty_rows=[(1, 2, 3)], seed=5)
    indices[0, 1, 2, 0], counts[0, 1, 2] = kv_blocks - 1, 1
    if layout == "shuffled":
        indices = shuffle_used(indices, counts, seed=1)
    elif layout == "wide":  # junk padding past the key-block count
        indices = torch.cat([indices, torch.full((2, 3, 8, 4), 77, dtype=torch.int32)], dim=-1)
    elif layout == "strided":  # [B, Q, H, W] storage viewed as [B, H, Q, W]
        indices = indices.transpose(1, 2).contiguous().transpose(1, 2)
        counts = counts.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "empty":
        indices, counts = indices[..., :0], torch.zeros_like(counts)
    indices, counts = indices.to(dtype), counts.to(dtype)
    expected = fa4_backend.to_fa4_block_sparse_reference(indices, counts, kv_tokens, 128)
    assert_same_lists(fa4_backend.to_fa4_block_sparse(indices, counts, kv_tokens, 128), expected)
    assert_same_lists(fa4_backend.to_fa4_block_sparse(indices, counts, kv_tokens, 128), expected)  # the memo


def test_ragged_sort_kernel_at_a_wide_row():
    """Rows wider than one 16-column tile and a list of Wan2.1's 256 key blocks, all orders, under the interpreter."""
    gen = torch.Generator().manual_seed(3)
    order = torch.rand(1, 2, 5, 256, generator=gen).argsort(-1)
    counts = torch.tensor([[[0, 1, 37, 255, 256], [256, 200, 3, 2, 128]]], dtype=torch.int32)
    expected = fa4_backend._sorted_block_list_reference(order, counts, 256)
    assert torch.equal(fa4_backend._sorted_block_list(order, counts, 256), expected)


def test_lists_fa4_reads_as_they_are_pass_through():
    indices, counts = random_lists(1, 2, 9, 9, seed=2)
    lists = fa4_backend.to_fa4_block_sparse(indices, counts, 1152, 128)
    assert lists.full_block_idx is indices and lists.full_block_cnt is counts
    again = fa4_backend.to_fa4_block_sparse(indices, counts, 1152, 128)
    assert again.mask_block_cnt is lists.mask_block_cnt  # one zero tensor per shape, not one per call
    assert again.mask_block_idx.shape == (1, 2, 9, 1) and not again.mask_block_cnt.any()


def test_memo_reuses_a_conversion_until_a_list_changes_in_place():
    indices, counts = random_lists(1, 2, 9, 9, density=0.5, seed=4)
    indices = shuffle_used(indices, counts, seed=2)
    first = fa4_backend.to_fa4_block_sparse(indices, counts, 1100, 128)
    assert fa4_backend.to_fa4_block_sparse(indices, counts, 1100, 128).full_block_idx is first.full_block_idx
    # The same lists at another key length are another conversion.
    assert fa4_backend.to_fa4_block_sparse(indices, counts, 1152, 128).full_block_idx is indices

    def check(idx, cnt):
        got = fa4_backend.to_fa4_block_sparse(idx, cnt, 1100, 128)
        assert_same_lists(got, fa4_backend.to_fa4_block_sparse_reference(idx, cnt, 1100, 128))
        return got

    row = int((counts[0, 0] > 0).nonzero()[0])
    indices[0, 0, row, 0] = 8 if int(indices[0, 0, row, 0]) != 8 else 0  # one entry rewritten in place
    indices[0, 0, row, : counts[0, 0, row]] = indices[0, 0, row, : counts[0, 0, row]].flip(-1)
    check(indices, counts)
    counts[0, 1, 3] = 0  # the counts, in place
    check(indices, counts)
    indices.view(-1)[:5].fill_(0)  # through a view of the indices
    counts.view(-1)[:5].fill_(1)
    check(indices, counts)
    check(indices, counts.clone())  # other counts with the same indices
    torch.autograd.graph.increment_version(indices)  # what a write PyTorch does not see must be followed by
    assert check(indices, counts).full_block_idx is not first.full_block_idx


def test_memo_keeps_no_list_alive_and_skips_inference_tensors():
    import gc
    import weakref

    indices, counts = random_lists(1, 2, 9, 9, seed=6)
    indices = indices.long()
    fa4_backend.to_fa4_block_sparse(indices, counts, 1100, 128)
    alive = weakref.ref(indices), weakref.ref(counts)
    assert indices in fa4_backend._CONVERTED
    del indices, counts
    gc.collect()
    assert alive[0]() is None and alive[1]() is None
    with torch.inference_mode():
        indices, counts = random_lists(1, 2, 9, 9, seed=7)
        indices = shuffle_used(indices, counts)
        lists = fa4_backend.to_fa4_block_sparse(indices, counts, 1100, 128)
        assert indices not in fa4_backend._CONVERTED  # no version counter: a conversion could not be invalidated
        indices[0, 0].zero_()
        counts[0, 0] = 1
        assert_same_lists(fa4_backend.to_fa4_block_sparse(indices, counts, 1100, 128),
                          fa4_backend.to_fa4_block_sparse_reference(indices, counts, 1100, 128))
    assert not torch.equal(lists.full_block_idx[0, 0], indices[0, 0])


def test_op_dispatched_to_fa4_checks_once_and_reuses_the_lists(monkeypatch):
    """The op as dispatched to (a stand-in for) FA4 on CPU tensors: one applicability check per call, the caller's
    list tensors reach the conversion (so its memo serves a static pattern every step), no work on the lists after
    the first call."""
    calls = {"applicable": 0, "lists": []}

    def applicable(*args) -> None:
        calls["applicable"] += 1

    def flash_attn_fwd(q, k, v, *, block_sparse_tensors, out, lse, **kwargs):
        calls["lists"].append(block_sparse_tensors)
        out.zero_()
        lse.fill_(float("-inf"))

    monkeypatch.setattr(fa4_backend, "fa4_applicable", applicable)
    monkeypatch.setattr(fa4_backend, "_import_fa4", lambda: (lambda *lists, block_size: lists, flash_attn_fwd))
    q, k, v = (torch.randn(1, 2, 1100, 64, dtype=torch.bfloat16) for _ in range(3))
    indices, counts = random_lists(1, 2, 9, 9, density=0.5, seed=8)
    indices = shuffle_used(indices, counts, seed=3)
    for _ in range(2):
        out, lse = bsa.block_sparse_attention(q, k, v, indices, counts, 128, 128, backend="fa4")
        assert bsa.last_backend() == "fa4" and out.shape == q.shape and lse.shape == q.shape[:3]
    assert calls["applicable"] == 2
    first, second = calls["lists"]
    assert all(a is b for a, b in zip(first, second))
    assert_same_lists(first, fa4_backend.to_fa4_block_sparse_reference(indices, counts, 1100, 128))


def test_auto_on_cpu_is_reference_and_never_imports_fa4():
    fa4_backend._import_fa4.cache_clear()
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    idx, cnt = random_lists(1, 2, 3, 3, seed=1)
    bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128)
    assert bsa.last_backend() == "reference"
    assert fa4_backend._import_fa4.cache_info().currsize == 0


def test_explicit_fa4_on_cpu_raises_one_line_with_the_fix():
    q, k, v = (torch.randn(1, 2, 300, 64, dtype=torch.bfloat16) for _ in range(3))
    idx, cnt = random_lists(1, 2, 3, 3, seed=2)
    with pytest.raises(RuntimeError, match="backend='fa4' cannot run this call: FA4 needs CUDA tensors") as err:
        bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, backend="fa4")
    assert "\n" not in str(err.value) and "backend='auto'" in str(err.value)
    with pytest.raises(RuntimeError, match="FA4 needs CUDA tensors"):
        fa4_backend.block_sparse_attention_fa4(q, k, v, idx, cnt, 128, 128)


def test_other_ops_have_no_fa4_backend():
    with pytest.raises(ValueError, match="cluster_sparse_attention has no backend='fa4'"):
        _backends.resolve_backend("cluster_sparse_attention", "fa4", torch.device("cpu"))


@fake_cuda_warning
def test_auto_falls_back_to_triton_when_fa4_is_absent(monkeypatch):
    """Dispatch on (fake) CUDA tensors of an H100 where flash_attn.cute does not import."""
    monkeypatch.setattr(fa4_backend, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(fa4_backend, "_import_fa4", lambda: "ModuleNotFoundError: No module named 'flash_attn'")
    with FakeTensorMode():
        q, k, v = (fake_cuda_qkv(3, 128, 128) for _ in range(3))

        def why_not(name):
            return fa4_backend.fa4_applicable(q, k, v, 128, 128, None) if name == "fa4" else None

        assert _backends.resolve_backend("block_sparse_attention", "auto", q.device, why_not) == "triton"
        with pytest.raises(RuntimeError, match=r'flash-attn-4 does not import .*pip install "vdopt\[fa4\]"') as err:
            _backends.resolve_backend("block_sparse_attention", "fa4", q.device, why_not)
        assert "\n" not in str(err.value)


@fake_cuda_warning
def test_applicability_reasons(monkeypatch):
    """What sends "auto" to Triton even with FA4 installed (FA4 import pretended to succeed)."""
    capability = [(9, 0)]
    monkeypatch.setattr(fa4_backend, "_capability", lambda index: capability[0])
    monkeypatch.setattr(fa4_backend, "_import_fa4", lambda: (object, object))
    groups = {name: torch.tensor(heads) for name, heads in
              (("run", [1, 2, 3]), ("strided", [0, 2, 4]), ("gap", [0, 1, 3]), ("descending", [3, 2]),
               ("out_of_range", [2, 5]))}
    with FakeTensorMode():
        def qkv(dtype=torch.bfloat16, head_dim=128, row=None):
            return [fake_cuda_qkv(5, head_dim, row or head_dim, dtype) for _ in range(3)]

        def reason(*tensors, block_m=128, block_n=128, head_indices=None):
            return fa4_backend.fa4_applicable(*tensors, block_m, block_n, head_indices)

        assert reason(*qkv()) is None
        assert reason(*qkv(), head_indices=groups["run"]) is None
        assert reason(*qkv(), head_indices=groups["strided"]) is None  # a strided view, no copy
        for name in ("gap", "descending", "out_of_range"):
            assert "evenly spaced" in reason(*qkv(), head_indices=groups[name])
        assert "CPU tensor" in reason(*qkv(), head_indices=torch.tensor([1, 2], device="cuda"))
        assert "float16 and bfloat16" in reason(*qkv(torch.float32))
        assert "head_dim" in reason(*qkv(head_dim=96))
        assert "128x128 blocks" in reason(*qkv(), block_m=64, block_n=64)
        assert "16-byte aligned" in reason(*qkv(head_dim=64, row=65))  # token stride of 65 elements
        capability[0] = (10, 0)
        assert "sm90" in reason(*qkv()) and "sm100" in reason(*qkv())


# ----------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def fa4_gpu():
    error = fa4_backend.fa4_import_error()
    if error is not None:
        pytest.skip(f"flash_attn.cute does not import ({error}); install vdopt[fa4] on a GPU machine")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        pytest.skip(f"vdopt runs FA4 on sm90 only; this GPU is sm{major}{minor}")


def random_inputs(batch, heads, q_tokens, kv_tokens, head_dim, dtype, token_major=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def make(tokens):
        if token_major:  # [B, N, H, D] storage viewed as [B, H, N, D], as models produce it
            return torch.randn(batch, tokens, heads, head_dim, generator=gen, device="cuda").to(dtype).transpose(1, 2)
        return torch.randn(batch, heads, tokens, head_dim, generator=gen, device="cuda").to(dtype)

    return make(q_tokens), make(kv_tokens), make(kv_tokens)


def assert_matches(out, lse, ref, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=OUT_ATOL[dtype], rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("token_major", [True, False])
def test_gpu_fa4_matches_reference(fa4_gpu, dtype, head_dim, token_major):
    """Ragged on both sides (1000 queries = 7 blocks + 104, 1100 keys = 8 blocks + 76), batch 2, empty rows,
    a row whose only block is the ragged one, rows listed out of order."""
    q, k, v = random_inputs(2, 3, 1000, 1100, head_dim, dtype, token_major, seed=head_dim)
    idx, cnt = random_lists(2, 3, 8, 9, density=0.4, empty_rows=[(1, 2, 3), (0, 0, 7)], seed=head_dim)
    idx[0, 1, 2, 0], cnt[0, 1, 2] = 8, 1
    idx = shuffle_used(idx, cnt)
    idx, cnt = idx.cuda(), cnt.cuda()
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, backend="fa4", validate=True)
    assert bsa.last_backend() == "fa4"
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 128, 128)
    assert_matches(out, lse, ref, ref_lse, dtype)
    assert (out[1, 2, 384:512] == 0).all() and (lse[1, 2, 384:512] == float("-inf")).all()
    assert (out.stride(2) > out.stride(1)) == token_major  # out keeps q's memory order
    auto_out, auto_lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, scale=0.05)
    assert bsa.last_backend() == "fa4"
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 128, 128, scale=0.05)
    assert_matches(auto_out, auto_lse, ref, ref_lse, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [[1, 2, 3], [0, 2, 4], [3]])
def test_gpu_fa4_head_group_reads_only_listed_heads(fa4_gpu, heads):
    q, k, v = random_inputs(2, 5, 700, 700, 128, torch.bfloat16, seed=7)
    for t in (q, k, v):  # a kernel that read the heads outside the group would produce NaN
        t[:, [h for h in range(5) if h not in heads]] = float("nan")
    idx, cnt = random_lists(2, len(heads), 6, 6, density=0.5, seed=len(heads))
    idx, cnt = idx.cuda(), cnt.cuda()
    head_indices = torch.tensor(heads, dtype=torch.int32)
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, head_indices=head_indices)
    assert bsa.last_backend() == "fa4" and out.shape == (2, len(heads), 700, 128)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 128, 128, head_indices=head_indices)
    assert_matches(out, lse, ref, ref_lse, torch.bfloat16)
    # Head indices on the GPU would need a synchronising read: "auto" runs Triton instead.
    bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, head_indices=head_indices.cuda())
    assert bsa.last_backend() == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fa4_at_wan_length(fa4_gpu):
    """Wan2.1's 32760 tokens (255 blocks + 120), density 0.1, checked on every row."""
    q, k, v = random_inputs(1, 2, 32760, 32760, 128, torch.bfloat16, seed=3)
    idx, cnt = random_lists(1, 2, 256, 256, density=0.1, seed=3)
    idx, cnt = idx.cuda(), cnt.cuda()
    out, lse = bsa.block_sparse_attention(q, k, v, idx, cnt, 128, 128, backend="fa4")
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, 128, 128)
    assert_matches(out, lse, ref, ref_lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_tokens", [32760, 119056])  # Wan2.1 (256 key blocks), HunyuanVideo (931), both ragged
def test_gpu_list_conversion_equals_reference(kv_tokens):
    """The Triton sort of ragged lists on the GPU (no FA4 needed): exactly the reference's lists, rows in any order."""
    kv_blocks = -(-kv_tokens // 128)
    gen = torch.Generator(device="cuda").manual_seed(kv_blocks)
    order = torch.rand(1, 3, kv_blocks, kv_blocks, generator=gen, device="cuda").argsort(-1).to(torch.int32)
    counts = torch.randint(0, kv_blocks + 1, (1, 3, kv_blocks), generator=gen, device="cuda", dtype=torch.int32)
    expected = fa4_backend.to_fa4_block_sparse_reference(order, counts, kv_tokens, 128)
    assert_same_lists(fa4_backend.to_fa4_block_sparse(order, counts, kv_tokens, 128), expected)
