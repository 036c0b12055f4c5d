"""Batched k-means, label permutations and token gather/scatter, against references and brute force.

Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before the kernels are imported) at tiny shapes.
Tolerances: centroid means are float32 sums of at most ~100 rows in a different order, so 1e-5 relative. The
assignment kernel takes its products in x's precision (centroids rounded to bf16/fp16 for 16-bit x, as on the
tensor cores), so a token may pick a different cluster than the float32 reference only where the two float32
distances are within that rounding: 1e-5 relative for fp32 x, 2e-2 for 16-bit x (scaled by ||x|| ||c||).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from vdopt.kernels import kmeans as km

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["reference", "triton"]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def _mixture(
    batch: int, heads: int, tokens: int, head_dim: int, clusters: int, seed: int, empty: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian clusters and their centers. Started from the centers, no token is near a tie, so
    every implementation must agree exactly. Cluster ``empty`` (if given) gets no token."""
    generator = torch.Generator().manual_seed(seed)
    centers = 8.0 * torch.randn(batch, heads, clusters, head_dim, generator=generator)
    which = torch.randint(0, clusters, (batch, heads, tokens), generator=generator)
    if empty is not None:
        which = torch.where(which == empty, (empty + 1) % clusters, which)
    noise = 0.3 * torch.randn(batch, heads, tokens, head_dim, generator=generator)
    return centers.gather(2, which[..., None].expand(-1, -1, -1, head_dim)) + noise, centers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "head_dim", "clusters"), [(77, 16, 5), (150, 32, 70)])
def test_assign_matches_reference_except_near_ties(dtype, tokens, head_dim, clusters):
    x = _random((2, 3, tokens, head_dim), dtype, seed=tokens)
    centroids = km.initial_centroids(x, clusters, seed=1) + 0.1 * _random(
        (2, 3, clusters, head_dim), torch.float32, 2
    )
    labels = km._assign_triton(x, centroids)
    expected = km._assign_reference(x.float(), centroids)
    distances = (x.float()[..., :, None, :] - centroids[..., None, :, :]).pow(2).sum(-1)  # [B, H, N, C]
    picked = distances.gather(-1, labels.long()[..., None])[..., 0]
    best = distances.gather(-1, expected.long()[..., None])[..., 0]
    scale = x.float().norm(dim=-1) * centroids.norm(dim=-1).amax(-1)[..., None]
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert bool(((labels == expected) | (picked - best <= rel * scale)).all())
    assert float((labels == expected).float().mean()) > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_matches_reference(dtype):
    x = _random((2, 3, 61, 16), dtype, seed=3)
    previous = _random((2, 3, 6, 16), torch.float32, seed=4)
    labels = torch.randint(0, 5, (2, 3, 61), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    updated = km._update_triton(x, labels, previous)
    torch.testing.assert_close(
        updated, km._update_reference(x.float(), labels, previous), rtol=1e-5, atol=1e-6
    )
    # Brute force: each centroid is the float64 mean of its tokens; cluster 5 is empty and keeps its value.
    for c in range(5):
        chosen = (labels == c)[..., None]
        mean = (x.double() * chosen).sum(2) / chosen.sum(2)
        torch.testing.assert_close(updated[:, :, c].double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(updated[:, :, 5], previous[:, :, 5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "clusters"), [(93, 6), (140, 67)])
def test_kmeans_triton_matches_reference(dtype, tokens, clusters):
    x, centers = _mixture(2, 3, tokens, 16, clusters, seed=tokens)
    x = x.to(dtype)
    labels, centroids = km.kmeans(x, clusters, iterations=2, init_centroids=centers, backend="triton")
    ref_labels, ref_centroids = km.kmeans_reference(x, clusters, iterations=2, init_centroids=centers)
    assert labels.dtype == torch.int32 and labels.shape == (2, 3, tokens)
    assert centroids.dtype == torch.float32 and centroids.shape == (2, 3, clusters, 16)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_warm_start_and_determinism(backend):
    x = _random((2, 3, 70, 16), torch.bfloat16, seed=8)
    two = km.kmeans(x, 7, iterations=2, seed=3, backend=backend)
    one = km.kmeans(x, 7, iterations=1, seed=3, backend=backend)
    resumed = km.kmeans(x, 7, iterations=1, init_centroids=one[1], backend=backend)
    assert torch.equal(resumed[0], two[0]) and torch.equal(resumed[1], two[1])
    again = km.kmeans(x, 7, iterations=2, seed=3, backend=backend)
    assert torch.equal(again[0], two[0]) and torch.equal(again[1], two[1])
    other_seed = km.kmeans(x, 7, iterations=0, seed=4, backend=backend)
    assert not torch.equal(other_seed[1], km.kmeans(x, 7, iterations=0, seed=3, backend=backend)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_centroids_are_means_of_labels_and_empty_clusters_stay(backend):
    x = _random((2, 3, 50, 16), torch.float32, seed=9)
    init = km.initial_centroids(x, 4, seed=0)
    init[:, :, 3] = 1e3  # far from every token: this cluster stays empty
    labels, centroids = km.kmeans(x, 4, iterations=3, init_centroids=init, backend=backend)
    assert not bool((labels == 3).any())
    assert torch.equal(centroids[:, :, 3], init[:, :, 3])
    for c in range(3):
        chosen = (labels == c)[..., None]
        mean = (x.double() * chosen).sum(2) / chosen.sum(2).clamp(min=1)
        torch.testing.assert_close(centroids[:, :, c].double(), mean, rtol=1e-5, atol=1e-6)


def test_initial_centroids_are_distinct_tokens():
    x = _random((2, 3, 40, 16), torch.float16, seed=10)
    init = km.initial_centroids(x, 12, seed=5)
    assert init.dtype == torch.float32
    for b in range(2):
        for h in range(3):
            hits = (init[b, h, :, None, :] == x[b, h, None, :, :].float()).all(-1)  # [C, N]
            assert bool((hits.sum(-1) >= 1).all())
            assert len({int(hits[c].nonzero()[0]) for c in range(12)}) == 12
    with pytest.raises(ValueError, match="num_clusters"):
        km.kmeans(x, 41)
    with pytest.raises(ValueError, match="init_centroids"):
        km.kmeans(x, 4, init_centroids=torch.zeros(2, 3, 5, 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("tokens", "clusters"), [(93, 6), (150, 70)])
def test_fused_lloyd_iterations_match_reference(dtype, head_dim, tokens, clusters):
    # One pass assigns and sums (6 clusters); past one program's 64 clusters (70) an assignment pass comes first
    # and cluster groups sum. Cluster 1 gets no token and must keep its centroid.
    x, centers = _mixture(2, 3, tokens, head_dim, clusters, seed=tokens + head_dim, empty=1)
    x = x.to(dtype)
    labels, centroids = km.kmeans(x, clusters, iterations=2, init_centroids=centers, backend="triton")
    ref_labels, ref_centroids = km.kmeans_reference(x, clusters, iterations=2, init_centroids=centers)
    assert torch.equal(labels, ref_labels)
    assert not bool((labels == 1).any())
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)
    assert torch.equal(centroids[:, :, 1], centers[:, :, 1])
    # Sums read through strides: a [B, N, H, D] projection viewed as [B, H, N, D].
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(km._update_triton(strided, labels, centers), km._update_triton(x, labels, centers))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("tokens", "clusters"), [(53, 6), (300, 70), (17, 1)])
def test_counting_sort_equals_stable_sort(label_dtype, tokens, clusters):
    generator = torch.Generator().manual_seed(tokens)
    labels = torch.randint(0, clusters, (2, 3, tokens), generator=generator, dtype=label_dtype)
    labels[0, 1] = labels[0, 1].clamp(max=max(clusters - 3, 0))  # the last clusters empty in one head
    got = km.permutation_from_labels(labels, clusters, backend="triton")
    expected = km.permutation_from_labels_reference(labels, clusters)
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == reference.dtype and torch.equal(value, reference)
    labels[1, 2, tokens // 2] = clusters
    with pytest.raises(ValueError, match="num_clusters"):
        km.permutation_from_labels(labels, clusters, backend="triton")


def test_counting_sort_falls_back_past_its_cluster_limit(monkeypatch):
    labels = torch.randint(0, 9, (1, 2, 40), generator=torch.Generator().manual_seed(15), dtype=torch.int32)
    monkeypatch.setattr(km, "MAX_COUNTING_SORT_CLUSTERS", 8)
    got = km.permutation_from_labels(labels, 9, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, km.permutation_from_labels_reference(labels, 9), strict=True))


def test_permutation_from_labels():
    labels = torch.randint(0, 6, (2, 3, 53), generator=torch.Generator().manual_seed(11), dtype=torch.int32)
    labels[0, 0] = labels[0, 0].clamp(max=3)  # clusters 4 and 5 empty in one head
    perm, inverse, offsets = km.permutation_from_labels(labels, 6)
    assert perm.dtype == inverse.dtype == torch.int64 and offsets.dtype == torch.int32
    assert offsets.shape == (2, 3, 7)
    sorted_labels = labels.gather(2, perm)
    assert bool((sorted_labels[..., 1:] >= sorted_labels[..., :-1]).all())
    # Stable: inside one cluster the original order is kept.
    same = sorted_labels[..., 1:] == sorted_labels[..., :-1]
    assert bool((perm[..., 1:] > perm[..., :-1])[same].all())
    assert torch.equal(perm.gather(2, inverse), torch.arange(53).expand(2, 3, -1))
    counts = torch.stack([(labels == c).sum(-1) for c in range(6)], dim=-1)
    assert torch.equal(offsets[..., 1:] - offsets[..., :-1], counts.to(torch.int32))
    assert int(offsets[0, 0, 4]) == int(offsets[0, 0, 6]) == 53
    with pytest.raises(ValueError, match="num_clusters"):
        km.permutation_from_labels(labels, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_gather_scatter_round_trip(dtype, transposed):
    tokens, head_dim = 45, 32
    if transposed:  # [B, N, H, D] viewed as [B, H, N, D], as a projection produces it
        x = _random((2, tokens, 3, head_dim), dtype, seed=12).transpose(1, 2)
    else:
        x = _random((2, 3, tokens, head_dim), dtype, seed=12)
    perm = torch.rand(2, 3, tokens, generator=torch.Generator().manual_seed(13)).argsort(-1)
    gathered = km.gather_tokens(x, perm, backend="triton")
    assert gathered.is_contiguous()
    assert torch.equal(gathered, km.gather_tokens_reference(x, perm))
    assert torch.equal(gathered, x.gather(2, perm[..., None].expand(-1, -1, -1, head_dim)))
    restored = km.scatter_tokens(gathered, perm.to(torch.int32), backend="triton")
    assert torch.equal(restored, x)
    assert torch.equal(km.scatter_tokens_reference(gathered, perm), x)
    _, inverse, _ = km.permutation_from_labels(torch.zeros(2, 3, tokens, dtype=torch.int32), 1)
    assert torch.equal(km.gather_tokens(x, perm.argsort(-1)), km.scatter_tokens(x, perm))
    assert torch.equal(inverse, torch.arange(tokens).expand(2, 3, -1))


def test_ops_are_single_nodes_under_export():
    class SemanticPermute(torch.nn.Module):
        def forward(self, q: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            labels, centroids = km.kmeans(q, 4, iterations=1, init_centroids=centroids)
            perm, _, offsets = km.permutation_from_labels(labels, 4)
            return km.scatter_tokens(km.gather_tokens(q, perm), perm), offsets, centroids

    q = _random((1, 2, 24, 16), torch.float32, seed=14)
    init = km.initial_centroids(q, 4)
    program = torch.export.export(SemanticPermute(), (q, init))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    for op in ("kmeans", "permutation_from_labels", "gather_tokens", "scatter_tokens"):
        assert f"vdopt.{op}.default" in targets
    out, _, _ = program.module()(q, init)
    assert torch.equal(out, q)
    for backend in ("reference", "triton"):
        torch.library.opcheck(
            torch.ops.vdopt.kmeans.default,
            (q, 4, 2, init, 0, backend),
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            torch.ops.vdopt.permutation_from_labels.default,
            (km.kmeans(q, 4, 1, init_centroids=init)[0], 4, backend),
            test_utils=("test_schema", "test_faketensor"),
        )
