"""Symbolic work of every kernel a strategy runs: FLOPs and bytes as sympy expressions, printable and testable.

Symbols: ``B`` batch, ``H`` heads, ``N`` video tokens, ``T`` text tokens of a joint-attention site, ``D`` head dim,
``rho`` kept density (fraction of video query-key pairs), ``S`` block size (query and key tiles), ``C`` clusters of
one k-means, ``Cq``/``Ck`` query/key clusters, ``Sq``/``Sk`` query/key tile rows of the cluster kernel, ``E`` bytes
per element of q/k/v/o.

Every kernel kind has three expressions: ``flops``, ``hbm_bytes`` (compulsory traffic from device memory: each
tensor read or written once) and ``traffic_bytes`` (everything the kernel loads into its cores, re-reads included;
served from L2 when it exceeds the compulsory bytes). Latency = roofline of the three on the target / efficiency
(:mod:`vdopt.cost_models.model`). Overheads are sized for all ``B*H`` heads of one call; the cost model evaluates
them at ``H = 1`` for the per-head share, and counts each kernel's launch once per fused head group.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

B, H, N, T, D, rho, S, C, Cq, Ck, Sq, Sk, E = sp.symbols("B H N T D rho S C Cq Ck Sq Sk E", positive=True)
SYMBOLS = (B, H, N, T, D, rho, S, C, Cq, Ck, Sq, Sk, E)

#: Formula revision written into efficiency tables; a table's efficiencies for a kernel kind whose formula changed
#: after the table's revision are not comparable (see :data:`KERNEL_REVISIONS`).
VERSION = 2
#: Kernel kinds whose FLOPs or bytes changed, with the revision that changed them. 2: cluster_sparse counts the
#: padded tiles the kernel runs instead of the kept token pairs; block_select includes the pooled score map
#: (formerly the pool_scores kind).
KERNEL_REVISIONS = {"cluster_sparse": 2, "block_select": 2}

#: (BLOCK_M, BLOCK_N) of the cluster kernel: kernels/cluster_sparse_attention.py DEFAULT_CONFIG[:2] (a test checks).
CLUSTER_TILE = (128, 64)

#: Dense attention over all N + T tokens: QK^T and PV, one multiply-add (2 FLOPs) per element each.
DENSE_FLOPS = 4 * B * H * (N + T) ** 2 * D

#: Q read once, K and V re-read once per kept (query block, key block) pair, O written once, LSE (fp32) written.
#: Kept pairs: rho * (N/S)^2, each loading an S x D block of K and of V.
SPARSE_TRAFFIC_BYTES = (
    B * H * N * D * E  # Q
    + 2 * rho * B * H * (N / S) ** 2 * S * D * E  # K and V per kept block pair
    + B * H * N * D * E  # O
    + 4 * B * H * N  # LSE
)
#: A dense flash-style kernel is the same tiling at rho = 1 (its K/V tiles are re-read by every query tile).
DENSE_TRAFFIC_BYTES = SPARSE_TRAFFIC_BYTES.subs({rho: 1, N: N + T})
#: Compulsory bytes of an attention call: Q, K, V read once, O and LSE written once.
ATTENTION_HBM_BYTES = 4 * B * H * N * D * E + 4 * B * H * N
SPARSE_FLOPS = rho * 4 * B * H * N**2 * D

#: Text part of a sparse joint-attention site, run densely: video queries x text keys, text queries x all keys.
TEXT_FLOPS = 4 * B * H * T * N * D + 4 * B * H * T * (N + T) * D
TEXT_BYTES = 4 * B * H * (N + T) * D * E


@dataclass(frozen=True)
class KernelWork:
    """FLOPs and bytes of one kernel launch, over all ``B*H`` heads of a call."""

    flops: sp.Expr
    hbm_bytes: sp.Expr
    traffic_bytes: sp.Expr


def _streaming(flops: sp.Expr, nbytes: sp.Expr) -> KernelWork:
    """A kernel that touches its bytes once (no re-reads): traffic equals compulsory bytes."""
    return KernelWork(sp.sympify(flops), nbytes, nbytes)


_Nb = N / S  # blocks along the video sequence

#: Tiles the cluster kernel runs over the N tokens cut into Cq query clusters of Sq-row tiles: a cluster's last
#: tile is partial (half empty on average when sizes spread over more than a tile), and every cluster has at least
#: one tile. Within ~1% of the counted tiles for sizes uniform over [m/2, 3m/2], m = N / C (the profiler's
#: clusters; tests/test_cost_model_cluster.py). On k-means clusters top-p keeps the larger clusters, which have
#: fewer partial tiles per token: on random data at N = 32760 this over-counts by ~2% at 32/64 clusters and 4-10%
#: at 256/256. The kernel's grid (ceil(N / Sq) + Cq programs) bounds this count from above.
CLUSTER_Q_TILES = sp.Max(N / Sq + Cq / 2, Cq)
CLUSTER_KV_TILES = sp.Max(N / Sk + Ck / 2, Ck)
#: Tile pairs the cluster kernel computes: each kept (query cluster, key cluster) pair runs every query tile of the
#: one against every key tile of the other, so a kept fraction rho of token pairs runs ~rho of all tile pairs.
CLUSTER_TILE_PAIRS = rho * CLUSTER_Q_TILES * CLUSTER_KV_TILES
#: Q tiles read once (whole tiles: rows past a cluster's end are loaded too), K and V re-read per tile pair, O and
#: LSE written once for the real rows.
CLUSTER_TRAFFIC_BYTES = (
    B * H * CLUSTER_Q_TILES * Sq * D * E
    + 2 * B * H * CLUSTER_TILE_PAIRS * Sk * D * E
    + B * H * N * D * E
    + 4 * B * H * N
)

#: Every kernel kind vdopt launches; its efficiency on a target is measured under the same name.
KERNELS: dict[str, KernelWork] = {
    "dense": KernelWork(DENSE_FLOPS, ATTENTION_HBM_BYTES.subs(N, N + T), DENSE_TRAFFIC_BYTES),
    "block_sparse": KernelWork(SPARSE_FLOPS, ATTENTION_HBM_BYTES, SPARSE_TRAFFIC_BYTES),
    # Variable-size clusters: whole Sq x Sk tiles, the partial ones at each cluster's end included (tile waste).
    "cluster_sparse": KernelWork(4 * B * H * D * Sq * Sk * CLUSTER_TILE_PAIRS, ATTENTION_HBM_BYTES,
                                 CLUSTER_TRAFFIC_BYTES),
    "text": _streaming(TEXT_FLOPS, TEXT_BYTES),
    # Block means of one tensor: read it, write fp32 means.
    "pool_means": _streaming(B * H * N * D, B * H * N * D * E + 4 * B * H * _Nb * D),
    # Everything a pooled selection runs after the block means: the pooled score map (small GEMM + softmax over key
    # blocks, fp32) and top-p over each row (sorts of key + index, log2 levels; cumsum; the kept list). When it ends
    # by reading the kept width on the host, the GPU idles while the host issues the attention launch: profiled as
    # the selection's marginal time in front of that launch (cost_models/profile.py), which the efficiency absorbs.
    "block_select": _streaming(
        2 * B * H * _Nb**2 * D + 5 * B * H * _Nb**2 + B * H * _Nb**2 * sp.log(_Nb, 2),
        8 * B * H * _Nb * D + 8 * B * H * _Nb**2 + 8 * B * H * _Nb**2 * sp.log(_Nb, 2),
    ),
    # One Lloyd assignment of one tensor to C centroids: distance GEMM, argmin; labels written (int32).
    "kmeans_assign": _streaming(2 * B * H * N * D * C, B * H * N * D * E + 4 * B * H * C * D + 4 * B * H * N),
    # One centroid update: segment means of the tensor by label.
    "kmeans_update": _streaming(B * H * N * D, B * H * N * D * E + 4 * B * H * N + 4 * B * H * C * D),
    # Sort of int32 labels into an int64 permutation and cluster offsets.
    "label_sort": _streaming(B * H * N * sp.log(C, 2), 4 * B * H * N + 8 * B * H * N + 4 * B * H * (C + 1)),
    # Gather (or scatter) of one [B, H, N, D] tensor by a token permutation: read and write it once.
    "gather": _streaming(0, 2 * B * H * N * D * E + 8 * B * H * N),
    # SVG2 cluster scores (centroid products + log sizes, softmax) and top-p over each query cluster's row; the same
    # host read of the kept width as block_select, profiled the same way.
    "cluster_select": _streaming(
        2 * B * H * Cq * Ck * D + B * H * Cq * Ck * sp.log(Ck, 2),
        4 * B * H * (Cq + Ck) * D + 8 * B * H * Cq * Ck * sp.log(Ck, 2),
    ),
}

#: Kernel kinds that compute attention (their efficiency depends on density); the rest are overheads.
ATTENTION_KERNELS = ("dense", "block_sparse", "cluster_sparse")
#: Launches of one call of an attention kernel kind (the cluster kernel plans its key tiles in a first launch).
ATTENTION_LAUNCHES = {"dense": 1, "block_sparse": 1, "cluster_sparse": 2}


def program_flops(kernel: str) -> sp.Expr:
    """FLOPs of one program (one query tile of one head) of an attention kernel: its tail unit."""
    if kernel == "dense":
        return 4 * S * (N + T) * D
    if kernel == "cluster_sparse":
        return 4 * Sq * Sk * D * rho * CLUSTER_KV_TILES
    return 4 * S * rho * N * D


def overhead_kernels(strategy_kind: str, iterations: int) -> list[tuple[str, int, dict[sp.Symbol, sp.Expr]]]:
    """The overhead kernels a strategy kind runs per call: (kernel, launches, symbol substitutions).

    ``strategy_kind``: ``"static"`` (layout-only, token order unchanged), ``"permuted"`` (layout-only with a
    token permutation: gather Q, K, V and scatter O), ``"pooled"`` (pooled block selection), ``"kmeans"``
    (Sparse VideoGen2's semantic permutation, ``iterations`` Lloyd steps over Q and over K). The k-means counts
    follow kernels/kmeans.py: an iteration is one fused pass (assignment and per-cluster sums, then a finalize),
    priced as ``kmeans_assign`` plus ``kmeans_update`` (what the fused iteration takes beyond assigning), then one
    counting sort makes the permutation; Q, K and V are gathered by launches, and the cluster kernel scatters the
    output and its log-sum-exp as it stores them (vdopt/attention.py), which adds no pass over memory.
    """
    if strategy_kind == "static":
        return []
    if strategy_kind == "permuted":
        return [("gather", 4, {})]
    if strategy_kind == "pooled":
        return [("pool_means", 2, {}), ("block_select", 1, {})]
    if strategy_kind == "kmeans":
        per_tensor = [(Cq, "q"), (Ck, "k")]
        out: list[tuple[str, int, dict[sp.Symbol, sp.Expr]]] = []
        for clusters, _ in per_tensor:
            sub = {C: clusters}
            out += [("kmeans_assign", iterations, sub), ("kmeans_update", iterations, sub), ("label_sort", 1, sub)]
        return out + [("cluster_select", 1, {}), ("gather", 3, {})]
    raise ValueError(f"unknown strategy kind {strategy_kind!r}; use 'static', 'permuted', 'pooled' or 'kmeans'")
