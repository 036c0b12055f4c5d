"""Pooled block means / scores and top-p / top-k key-block selection, against references and brute force.

Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before the kernels are imported) at tiny shapes.
Tolerances: the Triton and PyTorch paths both upcast to float32 and differ only in summation order, so means and
scores agree to 1e-5 relative for every input dtype; checks against float64 brute force allow 1e-5 as well
(float32 accumulation of a few dozen terms).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from vdopt.kernels import selection
from vdopt.kernels.reference import kv_block_mask, validate_kv_block_list

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, head_dim, block): ragged last blocks, one-block inputs and a non-power-of-two block.
SHAPES = [(37, 16, 8), (50, 32, 16), (7, 16, 8), (45, 16, 12)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) + 0.5).to(dtype)


def _means_float64(x: torch.Tensor, block: int) -> torch.Tensor:
    rows = [x[:, :, s : s + block].double().mean(dim=2) for s in range(0, x.shape[2], block)]
    return torch.stack(rows, dim=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "head_dim", "block"), SHAPES)
def test_pooled_block_means_triton_matches_reference(dtype, tokens, head_dim, block):
    x = _random((2, 3, tokens, head_dim), dtype, seed=tokens + head_dim)
    expected = _means_float64(x, block)
    reference = selection.pooled_block_means_reference(x, block)
    triton_out = selection.pooled_block_means(x, block, backend="triton")
    assert reference.dtype == triton_out.dtype == torch.float32
    assert reference.shape == (2, 3, -(-tokens // block), head_dim)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(triton_out, reference, rtol=1e-5, atol=1e-6)


def test_pooled_block_means_reads_strided_input():
    # q as a projection produces it: [B, N, H, D] viewed as [B, H, N, D].
    x = _random((2, 29, 3, 16), torch.bfloat16, seed=3).transpose(1, 2)
    torch.testing.assert_close(
        selection.pooled_block_means(x, 8, backend="triton"), selection.pooled_block_means_reference(x, 8)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_tokens", "kv_tokens", "block_m", "block_n"), [(37, 45, 8, 16), (16, 23, 16, 8)])
def test_pooled_block_scores(dtype, q_tokens, kv_tokens, block_m, block_n):
    q = _random((2, 3, q_tokens, 16), dtype, seed=1)
    k = _random((2, 3, kv_tokens, 16), dtype, seed=2)
    reference = selection.pooled_block_scores_reference(q, k, block_m, block_n, scale=0.3)
    triton_out = selection.pooled_block_scores(q, k, block_m, block_n, scale=0.3, backend="triton")
    assert reference.shape == (2, 3, -(-q_tokens // block_m), -(-kv_tokens // block_n))
    torch.testing.assert_close(triton_out, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.sum(-1), torch.ones(reference.shape[:-1]), rtol=0, atol=1e-5)
    # The estimator written out in float64.
    qm, km = _means_float64(q, block_m), _means_float64(k, block_n)
    sizes = torch.tensor(
        [min(block_n, kv_tokens - s) for s in range(0, kv_tokens, block_n)], dtype=torch.float64
    )
    expected = torch.softmax(qm @ km.transpose(-1, -2) * 0.3 + sizes.log(), dim=-1)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-6)


def test_pooled_block_scores_exact_when_keys_are_constant_per_block():
    # One query per block and keys equal within each key block: pooling loses nothing, so the estimate must equal
    # the true attention mass of each key block, ragged last block (5 tokens of 8) included.
    kv_tokens, block_n = 29, 8
    q = _random((2, 3, 4, 16), torch.float32, seed=4)
    per_block = _random((2, 3, 4, 16), torch.float32, seed=5)
    k = per_block.repeat_interleave(block_n, dim=2)[:, :, :kv_tokens]
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, dim=-1)
    block_of_key = torch.arange(kv_tokens) // block_n
    exact = torch.zeros(2, 3, 4, 4, dtype=torch.float64).index_add_(3, block_of_key, probs)
    scores = selection.pooled_block_scores(q, k, 1, block_n, scale=0.25)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-6)


def _scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(shape, generator=generator), dim=-1)


def _brute_force_top_p(row: list[float], top_p: float, min_blocks: int, max_blocks: int | None) -> set[int]:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    total, kept, mass = sum(row), [], 0.0
    for j in order:
        if mass >= top_p * total and top_p < 1.0:
            break
        kept.append(j)
        mass += row[j]
    count = max(len(kept), min_blocks)
    if max_blocks is not None:
        count = min(count, max_blocks)
    return set(order[:count])


def _kept_sets(indices: torch.Tensor, counts: torch.Tensor) -> list[set[int]]:
    flat_i, flat_c = indices.reshape(-1, indices.shape[-1]), counts.reshape(-1)
    return [set(flat_i[r, : int(flat_c[r])].tolist()) for r in range(flat_c.numel())]


def _check_layout(indices: torch.Tensor, counts: torch.Tensor, num_kv_blocks: int) -> None:
    assert indices.dtype == counts.dtype == torch.int32
    validate_kv_block_list(indices, counts, num_kv_blocks)  # in range, no duplicates
    used = torch.arange(indices.shape[-1]) < counts[..., None]
    ascending = (indices[..., 1:] > indices[..., :-1]) | ~used[..., 1:]
    assert bool(ascending.all())
    assert indices.shape[-1] == max(int(counts.max()), 1)


@pytest.mark.parametrize(
    ("top_p", "min_blocks", "max_blocks"), [(0.5, 1, None), (0.9, 2, None), (0.9, 1, 3), (0.7, 0, None)]
)
def test_select_top_p_matches_brute_force(top_p, min_blocks, max_blocks):
    scores = _scores((2, 3, 5, 9), seed=6)
    indices, counts = selection.select_blocks_top_p(scores, top_p, min_blocks, max_blocks)
    _check_layout(indices, counts, 9)
    rows = scores.double().reshape(-1, 9).tolist()
    for row, kept in zip(rows, _kept_sets(indices, counts), strict=True):
        assert kept == _brute_force_top_p(row, top_p, min_blocks, max_blocks)


def test_select_top_p_edge_cases():
    scores = _scores((2, 3, 4, 7), seed=7)
    indices, counts = selection.select_blocks_top_p(scores, 1.0)
    assert bool((counts == 7).all()) and bool((indices == torch.arange(7, dtype=torch.int32)).all())
    _, counts = selection.select_blocks_top_p(scores, 1e-6, min_blocks=1)
    assert bool((counts == 1).all())
    _, counts = selection.select_blocks_top_p(scores, 1e-6, min_blocks=3)
    assert bool((counts == 3).all())
    indices, counts = selection.select_blocks_top_p(scores, 1.0, max_blocks=2)
    assert bool((counts == 2).all())
    # The kept blocks are the row's highest, whatever top_p.
    kept = kv_block_mask(indices, counts, 7)
    assert bool((scores.masked_fill(~kept, 2.0).amin(-1) >= scores.masked_fill(kept, -1.0).amax(-1)).all())
    with pytest.raises(ValueError, match="top_p"):
        selection.select_blocks_top_p(scores, 0.0)
    with pytest.raises(ValueError, match="max_blocks"):
        selection.select_blocks_top_p(scores, 0.5, min_blocks=3, max_blocks=2)


@pytest.mark.parametrize("per_row", [False, True])
def test_select_always_keep(per_row):
    scores = _scores((2, 3, 4, 8), seed=8)
    if per_row:
        always = torch.rand(scores.shape, generator=torch.Generator().manual_seed(9)) < 0.25
    else:
        always = torch.tensor([True, False, False, False, False, False, False, True])
    for indices, counts in (
        selection.select_blocks_top_p(scores, 0.5, always_keep=always),
        selection.select_blocks_top_k(scores, 2, always_keep=always),
    ):
        _check_layout(indices, counts, 8)
        kept = kv_block_mask(indices, counts, 8)
        assert bool((kept | ~always.expand_as(kept)).all())
    plain = kv_block_mask(*selection.select_blocks_top_p(scores, 0.5), 8)
    with_always = kv_block_mask(*selection.select_blocks_top_p(scores, 0.5, always_keep=always), 8)
    assert torch.equal(with_always, plain | always.expand_as(plain))
    with pytest.raises(ValueError, match="always_keep"):
        selection.select_blocks_top_p(scores, 0.5, always_keep=torch.ones(5, dtype=torch.bool))


def test_select_top_k():
    scores = _scores((2, 3, 5, 9), seed=10)
    indices, counts = selection.select_blocks_top_k(scores, 4)
    _check_layout(indices, counts, 9)
    assert bool((counts == 4).all())
    expected = scores.topk(4, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    assert torch.equal(indices, expected)
    _, counts = selection.select_blocks_top_k(scores, 20)
    assert bool((counts == 9).all())
    # Ties go to the lower block index.
    tied = torch.full((1, 1, 1, 6), 1.0 / 6)
    indices, _ = selection.select_blocks_top_k(tied, 2)
    assert indices.flatten().tolist() == [0, 1]


def test_ops_are_single_nodes_under_export():
    class DraftSelect(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return selection.select_blocks_top_p(selection.pooled_block_scores(q, k, 8, 8), 0.8)

    q, k = _random((1, 2, 24, 16), torch.float32, 11), _random((1, 2, 20, 16), torch.float32, 12)
    program = torch.export.export(DraftSelect(), (q, k))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "vdopt.pooled_block_scores.default" in targets
    assert "vdopt.select_blocks_top_p.default" in targets
    exported = program.module()(q, k)
    eager = DraftSelect()(q, k)
    assert all(torch.equal(a, b) for a, b in zip(exported, eager, strict=True))
    torch.library.opcheck(
        torch.ops.vdopt.pooled_block_means.default,
        (q, 8, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        selection.pooled_block_means(torch.randn(1, 1, 8, 16), 4, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        selection.pooled_block_means(torch.randn(1, 1, 8, 16), 4, backend="cuda")
