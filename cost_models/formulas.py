"""Symbolic work of each strategy: FLOPs and bytes as sympy expressions, printable and testable.

Symbols: ``B`` batch, ``H`` heads, ``N`` video tokens, ``D`` head dim, ``rho`` kept density, ``S`` block size,
``Cq``/``Ck`` k-means clusters, ``I`` k-means iterations, ``E`` bytes per element.
"""

from __future__ import annotations

import sympy as sp

B, H, N, D, rho, S, Cq, Ck, I, E = sp.symbols("B H N D rho S Cq Ck I E", positive=True)

#: Dense attention: QK^T and PV, two multiply-adds per element each.
DENSE_FLOPS = 4 * B * H * N**2 * D
#: Q, K, V read once and O written once.
DENSE_BYTES = 4 * B * H * N * D * E
#: A block-sparse kernel computes only kept blocks; K/V are re-read per query block that keeps them.
SPARSE_FLOPS = rho * DENSE_FLOPS
SPARSE_BYTES = 2 * B * H * N * D * E + 2 * rho * B * H * N * D * E * (N / S) / sp.Max(1, N / S) + B * H * N * 4

#: Extra work a strategy does before attention, per call.
OVERHEAD_FLOPS = {
    "static": sp.Integer(0),
    # block-mean pooling of Q and K, then the pooled score map and a sort per row
    "pooled": 2 * B * H * N * D + 2 * B * H * (N / S) ** 2 * D + B * H * (N / S) ** 2 * sp.log(N / S, 2),
    # I Lloyd iterations over Q and K (distance GEMM + update), the centroid score map, the permutation gathers
    "kmeans": I * 2 * B * H * N * D * (Cq + Ck) * 2 + 2 * B * H * Cq * Ck * D,
}
OVERHEAD_BYTES = {
    "static": sp.Integer(0),
    "pooled": 2 * B * H * N * D * E,
    # k-means reads Q and K once per iteration; the permutation moves Q, K, V in and O out
    "kmeans": I * 2 * B * H * N * D * E + 8 * B * H * N * D * E,
}
#: Extra kernel launches per call (pooled: pool + score + select; k-means: per iteration assign + update, gathers).
OVERHEAD_LAUNCHES = {"static": sp.Integer(1), "pooled": sp.Integer(4), "kmeans": 2 * 2 * I + 6}
