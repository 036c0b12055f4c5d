"""Symbolic work of every kernel a strategy runs: FLOPs and bytes as sympy expressions, printable and testable.

Symbols: ``B`` batch, ``H`` heads, ``N`` video tokens, ``T`` text tokens of a joint-attention site, ``D`` head dim,
``rho`` kept density (fraction of video query-key pairs), ``S`` block size (query and key tiles), ``C`` clusters of
one k-means, ``Cq``/``Ck`` query/key clusters, ``E`` bytes per element of q/k/v/o.

Every kernel kind has three expressions: ``flops``, ``hbm_bytes`` (compulsory traffic from device memory: each
tensor read or written once) and ``traffic_bytes`` (everything the kernel loads into its cores, re-reads included;
served from L2 when it exceeds the compulsory bytes). Latency = roofline of the three on the target / efficiency
(:mod:`vdopt.cost_models.model`). Overheads are sized for all ``B*H`` heads of one call; the cost model evaluates
them at ``H = 1`` for the per-head share, and counts each kernel's launch once per fused head group.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

B, H, N, T, D, rho, S, C, Cq, Ck, E = sp.symbols("B H N T D rho S C Cq Ck E", positive=True)
SYMBOLS = (B, H, N, T, D, rho, S, C, Cq, Ck, E)

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

#: Every kernel kind vdopt launches; its efficiency on a target is measured under the same name.
KERNELS: dict[str, KernelWork] = {
    "dense": KernelWork(DENSE_FLOPS, ATTENTION_HBM_BYTES.subs(N, N + T), DENSE_TRAFFIC_BYTES),
    "block_sparse": KernelWork(SPARSE_FLOPS, ATTENTION_HBM_BYTES, SPARSE_TRAFFIC_BYTES),
    # Variable-size clusters: same count of kept pairs at cluster granularity; tile padding shows up as efficiency.
    "cluster_sparse": KernelWork(SPARSE_FLOPS, ATTENTION_HBM_BYTES, SPARSE_TRAFFIC_BYTES),
    "text": _streaming(TEXT_FLOPS, TEXT_BYTES),
    # Block means of one tensor: read it, write fp32 means.
    "pool_means": _streaming(B * H * N * D, B * H * N * D * E + 4 * B * H * _Nb * D),
    # Pooled score map (small GEMM + softmax over key blocks), fp32.
    "pool_scores": _streaming(2 * B * H * _Nb**2 * D + 5 * B * H * _Nb**2, 8 * B * H * _Nb * D + 8 * B * H * _Nb**2),
    # Top-p over each row of the block map: a sort (key + index, log2 levels), cumsum, scatter back.
    "block_select": _streaming(B * H * _Nb**2 * sp.log(_Nb, 2), 8 * B * H * _Nb**2 * sp.log(_Nb, 2)),
    # One Lloyd assignment of one tensor to C centroids: distance GEMM, argmin; labels written (int32).
    "kmeans_assign": _streaming(2 * B * H * N * D * C, B * H * N * D * E + 4 * B * H * C * D + 4 * B * H * N),
    # One centroid update: segment means of the tensor by label.
    "kmeans_update": _streaming(B * H * N * D, B * H * N * D * E + 4 * B * H * N + 4 * B * H * C * D),
    # Sort of int32 labels into an int64 permutation and cluster offsets.
    "label_sort": _streaming(B * H * N * sp.log(C, 2), 4 * B * H * N + 8 * B * H * N + 4 * B * H * (C + 1)),
    # Gather (or scatter) of one [B, H, N, D] tensor by a token permutation: read and write it once.
    "gather": _streaming(0, 2 * B * H * N * D * E + 8 * B * H * N),
    # SVG2 cluster scores (centroid products + log sizes, softmax) and top-p over each query cluster's row.
    "cluster_select": _streaming(
        2 * B * H * Cq * Ck * D + B * H * Cq * Ck * sp.log(Ck, 2),
        4 * B * H * (Cq + Ck) * D + 8 * B * H * Cq * Ck * sp.log(Ck, 2),
    ),
}

#: Kernel kinds that compute attention (their efficiency depends on density); the rest are overheads.
ATTENTION_KERNELS = ("dense", "block_sparse", "cluster_sparse")


def program_flops(kernel: str) -> sp.Expr:
    """FLOPs of one program (one query tile of S rows of one head) of an attention kernel: its tail unit."""
    if kernel == "dense":
        return 4 * S * (N + T) * D
    return 4 * S * rho * N * D


def overhead_kernels(strategy_kind: str, iterations: int) -> list[tuple[str, int, dict[sp.Symbol, sp.Expr]]]:
    """The overhead kernels a strategy kind runs per call: (kernel, launches, symbol substitutions).

    ``strategy_kind``: ``"static"`` (layout-only, token order unchanged), ``"permuted"`` (layout-only with a
    token permutation: gather Q, K, V and scatter O), ``"pooled"`` (pooled block selection), ``"kmeans"``
    (Sparse VideoGen2's semantic permutation, ``iterations`` Lloyd steps over Q and over K).
    """
    if strategy_kind == "static":
        return []
    if strategy_kind == "permuted":
        return [("gather", 4, {})]
    if strategy_kind == "pooled":
        return [("pool_means", 2, {}), ("pool_scores", 1, {}), ("block_select", 1, {})]
    if strategy_kind == "kmeans":
        per_tensor = [(Cq, "q"), (Ck, "k")]
        out: list[tuple[str, int, dict[sp.Symbol, sp.Expr]]] = []
        for clusters, _ in per_tensor:
            sub = {C: clusters}
            out += [("kmeans_assign", iterations, sub), ("kmeans_update", iterations, sub),
                    ("label_sort", iterations + 1, sub)]  # offsets each iteration + the final permutation
        return out + [("cluster_select", 1, {}), ("gather", 4, {})]
    raise ValueError(f"unknown strategy kind {strategy_kind!r}; use 'static', 'permuted', 'pooled' or 'kmeans'")
