"""Sparse-attention strategies: typed configs stated in layout terms, and the exact pattern each one builds.

A strategy turns the video tokens' layout (and, for dynamic ones, the queries and keys) into a
:class:`SparsePattern`: a token order (permutation) plus, for each query block of that order, the key blocks
it attends to. The pattern *is* the ground truth: kernels compute exactly it, and calibration measures exactly
its attention-mass recall. Text tokens never enter a pattern; the runtime always attends to and from them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from vdopt.kernels.reference import kv_block_list_from_mask, kv_block_mask
from vdopt.sites import TokenLayout

_UNBOUNDED = 1 << 30


@dataclass
class PatternContext:
    """What a strategy may use besides q and k: the layout, block sizes and per-site state across steps."""

    layout: TokenLayout
    block_size: int
    state: dict[str, Any]
    seed: int = 0


@dataclass
class SparsePattern:
    """Which key blocks each query block attends to, over video tokens in a possibly permuted order.

    ``kv_block_indices: int32 [B, G, q_blocks, max_kept]`` / ``kv_block_counts: int32 [B, G, q_blocks]`` index
    blocks of the permuted order. Uniform blocks of ``block_size`` unless ``q_offsets``/``kv_offsets``
    (``int32 [B, G, clusters + 1]``) give variable-size clusters. ``q_perm``/``kv_perm`` (``int64 [B, G, N]`` or
    ``[N]``): position ``p`` of the permuted order holds original video token ``perm[p]``; None = identity.
    """

    kv_block_indices: torch.Tensor
    kv_block_counts: torch.Tensor
    block_size: int
    tokens: int
    q_perm: torch.Tensor | None = None
    kv_perm: torch.Tensor | None = None
    q_offsets: torch.Tensor | None = None
    kv_offsets: torch.Tensor | None = None

    @property
    def is_clustered(self) -> bool:
        return self.q_offsets is not None

    def _sizes(self, offsets: torch.Tensor | None) -> torch.Tensor:
        if offsets is not None:
            return (offsets[..., 1:] - offsets[..., :-1]).float()
        starts = torch.arange(0, self.tokens, self.block_size, device=self.kv_block_counts.device)
        return ((starts + self.block_size).clamp(max=self.tokens) - starts).float()

    def block_mask(self) -> torch.Tensor:
        """``bool [B, G, q_blocks, kv_blocks]``."""
        kv_blocks = self.kv_offsets.shape[-1] - 1 if self.kv_offsets is not None else -(-self.tokens // self.block_size)
        return kv_block_mask(self.kv_block_indices, self.kv_block_counts, kv_blocks)

    def density(self) -> torch.Tensor:
        """Kept fraction of query-key token pairs, ``float [G]`` (averaged over the batch)."""
        mask = self.block_mask().float()
        q_sizes, kv_sizes = self._sizes(self.q_offsets), self._sizes(self.kv_offsets)
        if q_sizes.dim() == 1:
            q_sizes = q_sizes.expand(*mask.shape[:2], -1)
        if kv_sizes.dim() == 1:
            kv_sizes = kv_sizes.expand(*mask.shape[:2], -1)
        kept = torch.einsum("bgq,bgqk,bgk->bg", q_sizes, mask, kv_sizes)
        return (kept / float(self.tokens) ** 2).mean(0)

    def _block_of_position(self, offsets: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        positions = torch.arange(self.tokens, device=self.kv_block_counts.device)
        if offsets is None:
            return (positions // self.block_size).expand(*shape, -1)
        return torch.searchsorted(offsets[..., 1:].contiguous().long(), positions.expand(*shape, -1).contiguous(), right=True)

    def keep_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Kept keys of query rows ``rows: int64 [R]`` (original video order) -> ``bool [B, G, R, N]`` original order."""
        batch, groups = self.kv_block_counts.shape[:2]
        shape = (batch, groups)
        q_pos = rows.expand(batch, groups, -1)
        if self.q_perm is not None:
            inv = _inverse_permutation(self.q_perm).expand(batch, groups, -1)
            q_pos = inv.gather(-1, q_pos)
        q_block = self._block_of_position(self.q_offsets, shape).gather(-1, q_pos)
        mask = self.block_mask()
        row_mask = mask.gather(2, q_block[..., None].expand(-1, -1, -1, mask.shape[-1]))
        key_block = self._block_of_position(self.kv_offsets, shape)
        keep_permuted = row_mask.gather(3, key_block[:, :, None, :].expand(-1, -1, rows.numel(), -1))
        if self.kv_perm is None:
            return keep_permuted
        inv_kv = _inverse_permutation(self.kv_perm).expand(batch, groups, -1)
        return keep_permuted.gather(3, inv_kv[:, :, None, :].expand(-1, -1, rows.numel(), -1))


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


# ---------------------------------------------------------------------------------------------------------------
# Token orders and block geometry


def video_coordinates(layout: TokenLayout, device: torch.device | None = None) -> torch.Tensor:
    """``int64 [N, 3]`` (frame, row, col) of each video token in the native frame-major order."""
    f = torch.arange(layout.frames, device=device)
    r = torch.arange(layout.rows, device=device)
    c = torch.arange(layout.cols, device=device)
    return torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1).reshape(-1, 3)


def token_order(layout: TokenLayout, order: str, block_size: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Permutation (``perm[p]`` = original token at position ``p``) for a named order; None for frame-major.

    Memoised: every head and strategy that uses one order at one layout gets the same tensor (do not modify it),
    which is how the runtime permutes all such heads of a site with a single gather.
    """
    return _token_order(layout, order, block_size, str(device) if device is not None else "cpu")


@functools.lru_cache(maxsize=64)
def _token_order(layout: TokenLayout, order: str, block_size: int, device: str) -> torch.Tensor | None:
    coords = video_coordinates(layout, torch.device(device))
    f, r, c = coords.unbind(-1)
    if order == "frame_major":
        return None
    if order == "position_major":
        key = (r * layout.cols + c) * layout.frames + f
    elif order == "tile":
        tf, tr, tc = tile_shape(block_size, layout)
        tiles_r, tiles_c = -(-layout.rows // tr), -(-layout.cols // tc)
        tile_id = ((f // tf) * tiles_r + r // tr) * tiles_c + c // tc
        within = ((f % tf) * tr + r % tr) * tc + c % tc
        key = tile_id * (tf * tr * tc) + within
    else:
        raise ValueError(f"unknown token order {order!r}; use 'frame_major', 'position_major' or 'tile'")
    return torch.argsort(key)


def tile_shape(block_size: int, layout: TokenLayout) -> tuple[int, int, int]:
    """A frames x rows x cols tile of ``block_size`` tokens (powers of two), as cubic as the grid allows."""
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two for tile order, got {block_size}")
    dims = [1, 1, 1]
    limits = (layout.frames, layout.rows, layout.cols)
    preference = (1, 2, 0)  # rows, cols, then frames: tiles stay spatially square, like STA's
    while dims[0] * dims[1] * dims[2] < block_size:
        open_axes = [axis for axis in preference if dims[axis] < limits[axis]] or [1]
        axis = min(open_axes, key=lambda a: (dims[a], preference.index(a)))
        dims[axis] *= 2
    return dims[0], dims[1], dims[2]


def block_boxes(layout: TokenLayout, perm: torch.Tensor | None, block_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block bounding boxes in (frame, row, col): ``(lo, hi)`` each ``int64 [blocks, 3]``."""
    coords = video_coordinates(layout, device)
    if perm is not None:
        coords = coords[perm]
    n = coords.shape[0]
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    if pad:
        coords = torch.cat([coords, coords[-1:].expand(pad, 3)])
    grouped = coords.view(blocks, block_size, 3)
    return grouped.min(1).values, grouped.max(1).values


def window_block_mask(lo: torch.Tensor, hi: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """``bool [blocks, blocks]``: key block kept when its box is within ``window`` cells of the query block's box."""
    gap = (torch.maximum(lo[:, None], lo[None]) - torch.minimum(hi[:, None], hi[None])).clamp(min=0)
    limit = torch.tensor(window, device=lo.device)
    return (gap <= limit).all(-1)


def _static_pattern(mask: torch.Tensor, q: torch.Tensor, block_size: int, tokens: int, perm: torch.Tensor | None) -> SparsePattern:
    batch, groups = q.shape[:2]
    indices, counts = kv_block_list_from_mask(mask.expand(batch, groups, *mask.shape[-2:]))
    return SparsePattern(indices, counts, block_size, tokens, q_perm=perm, kv_perm=perm)


def _layout_pattern(strategy: Strategy, q: torch.Tensor, ctx: PatternContext, make: Any) -> SparsePattern:
    """A layout-only pattern, built once per (strategy, layout, block size, shape, device) and kept in the site's
    state: it does not depend on q/k values, so every later denoising step reuses it for free."""
    key = ("layout_pattern", strategy, ctx.layout, ctx.block_size, tuple(q.shape[:2]), str(q.device))
    pattern = ctx.state.get(key)
    if pattern is None:
        pattern = make()
        ctx.state[key] = pattern
    return pattern


# ---------------------------------------------------------------------------------------------------------------
# Strategy configs


_REGISTRY: dict[str, type[Strategy]] = {}


@dataclass(frozen=True)
class Strategy:
    """Base of all strategy configs. ``name`` is the strategy's key in plans."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False  # reads q/k content (needs per-call estimation work)
    # build() is tensor code that dynamo traces (no host sync, no state kept across calls): see passes/lower_attention
    traceable: ClassVar[bool] = True
    # Static patterns: the token order their block lists are in. sparse_site_attention runs every head of a site
    # whose pattern is in one such order in one fused block-sparse launch, whatever the pattern's parameters.
    launch_order: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        """Pattern for video-token ``q, k: [B, G, N, D]`` of one head group."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.name, **asdict(self)}

    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in asdict(self).items())
        return f"{self.name}({params})" if params else self.name

    def launch_group(self) -> str:
        """The launch this strategy's heads join at a site (vdopt.attention.sparse_site_attention): ``"dense"``
        (one SDPA call), ``"block:<order>"`` for patterns in one token order (heads of different such strategies
        share one block-sparse launch; a dynamic selection's lists join it too, while its estimation work stays its
        own: ``vdopt.search.LaunchCost.own``), else the strategy's own launch (k-means clusters)."""
        if self.launch_order is not None:
            return f"block:{self.launch_order}"
        return f"own:{self.label()}"


def strategy_from_json(data: dict[str, Any]) -> Strategy:
    """Inverse of :meth:`Strategy.to_json`; raises ValueError naming an unknown strategy or parameter."""
    if not isinstance(data, dict) or "strategy" not in data:
        raise ValueError(f"a head entry must be an object with a 'strategy' field, got {data!r}")
    name = data["strategy"]
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    params = {k: v for k, v in data.items() if k != "strategy"}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"strategy {name!r} has no parameter {unknown[0]!r}; its parameters: {sorted(known) or 'none'}")
    return cls(**params)


@dataclass(frozen=True)
class Dense(Strategy):
    """Full attention (what the model did originally)."""

    name: ClassVar[str] = "dense"

    def launch_group(self) -> str:
        return "dense"


@dataclass(frozen=True)
class SpatialWindow(Strategy):
    """Frame-local attention (Sparse VideoGen's spatial head): keys in frames within ``frame_window`` of the query's."""

    name: ClassVar[str] = "spatial"
    launch_order: ClassVar[str | None] = "original"
    frame_window: int = 0

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        return _layout_pattern(self, q, ctx, lambda: self._build(q, ctx))

    def _build(self, q: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        lo, hi = block_boxes(ctx.layout, None, ctx.block_size, q.device)
        mask = window_block_mask(lo, hi, (self.frame_window, _UNBOUNDED, _UNBOUNDED))
        return _static_pattern(mask, q, ctx.block_size, ctx.layout.video_tokens, None)


@dataclass(frozen=True)
class TemporalWindow(Strategy):
    """Same position across frames (Sparse VideoGen's temporal head), made contiguous by a position-major order.

    Keys within ``radius`` rows/cols of the query's position, in frames within ``frame_window`` (-1: all frames).
    """

    name: ClassVar[str] = "temporal"
    launch_order: ClassVar[str | None] = "position_major"
    radius: int = 0
    frame_window: int = -1

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        return _layout_pattern(self, q, ctx, lambda: self._build(q, ctx))

    def _build(self, q: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        perm = token_order(ctx.layout, "position_major", ctx.block_size, q.device)
        lo, hi = block_boxes(ctx.layout, perm, ctx.block_size, q.device)
        frames = _UNBOUNDED if self.frame_window < 0 else self.frame_window
        mask = window_block_mask(lo, hi, (frames, self.radius, self.radius))
        return _static_pattern(mask, q, ctx.block_size, ctx.layout.video_tokens, perm)


@dataclass(frozen=True)
class TileWindow(Strategy):
    """3D sliding-tile window (STA): tokens reordered into block-sized tiles; keys within a frames x rows x cols window."""

    name: ClassVar[str] = "tile3d"
    launch_order: ClassVar[str | None] = "tile"
    frames: int = 1
    rows: int = 4
    cols: int = 4

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        return _layout_pattern(self, q, ctx, lambda: self._build(q, ctx))

    def _build(self, q: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        perm = token_order(ctx.layout, "tile", ctx.block_size, q.device)
        lo, hi = block_boxes(ctx.layout, perm, ctx.block_size, q.device)
        mask = window_block_mask(lo, hi, (self.frames, self.rows, self.cols))
        return _static_pattern(mask, q, ctx.block_size, ctx.layout.video_tokens, perm)


def _linear_block_ranges(tokens: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, tokens, block_size, device=device)
    return starts, (starts + block_size).clamp(max=tokens) - 1


@dataclass(frozen=True)
class Diagonal(Strategy):
    """Sparse-vDiT diagonal: keys within ``width`` frames' worth of tokens of the query in frame-major order."""

    name: ClassVar[str] = "diagonal"
    launch_order: ClassVar[str | None] = "original"
    width: float = 0.25

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        return _layout_pattern(self, q, ctx, lambda: self._build(q, ctx))

    def _build(self, q: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        lay = ctx.layout
        lo, hi = _linear_block_ranges(lay.video_tokens, ctx.block_size, q.device)
        limit = math.ceil(self.width * lay.rows * lay.cols)
        gap = (torch.maximum(lo[:, None], lo[None]) - torch.minimum(hi[:, None], hi[None])).clamp(min=0)
        return _static_pattern(gap <= limit, q, ctx.block_size, lay.video_tokens, None)


@dataclass(frozen=True)
class MultiDiagonal(Strategy):
    """Sparse-vDiT multi-diagonal: the diagonal repeated at every frame offset within ``frame_window`` (-1: all)."""

    name: ClassVar[str] = "multi_diagonal"
    launch_order: ClassVar[str | None] = "original"
    width: float = 0.1
    frame_window: int = -1

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        return _layout_pattern(self, q, ctx, lambda: self._build(q, ctx))

    def _build(self, q: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        lay = ctx.layout
        frame_tokens = lay.rows * lay.cols
        lo, hi = _linear_block_ranges(lay.video_tokens, ctx.block_size, q.device)
        limit = math.ceil(self.width * frame_tokens)
        reach = lay.frames - 1 if self.frame_window < 0 else min(self.frame_window, lay.frames - 1)
        mask = torch.zeros(lo.numel(), lo.numel(), dtype=torch.bool, device=q.device)
        for offset in range(-reach, reach + 1):
            shift = offset * frame_tokens
            gap = (torch.maximum(lo[:, None], lo[None] - shift) - torch.minimum(hi[:, None], hi[None] - shift)).clamp(min=0)
            mask |= gap <= limit
        return _static_pattern(mask, q, ctx.block_size, lay.video_tokens, None)


def _pooled_means(q: torch.Tensor, k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 block means of q and k (the pooled "draft" tokens the dynamic selections score)."""
    from vdopt.kernels.selection import pooled_block_means

    return pooled_block_means(q, block_size), pooled_block_means(k, block_size)


@dataclass(frozen=True)
class VerticalStripe(Strategy):
    """Sparse-vDiT vertical stripes: the key blocks holding ``top_p`` of the pooled column mass, shared by every query
    block, plus each query block's own (diagonal) block."""

    name: ClassVar[str] = "vertical_stripe"
    dynamic: ClassVar[bool] = True
    launch_order: ClassVar[str | None] = "original"  # its lists keep the token order
    top_p: float = 0.9

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        from vdopt.kernels.selection import pooled_select_vertical_stripes

        q_means, k_means = _pooled_means(q, k, ctx.block_size)
        indices, counts = pooled_select_vertical_stripes(q_means, k_means, k.shape[2], ctx.block_size, self.top_p)
        return SparsePattern(indices, counts, ctx.block_size, ctx.layout.video_tokens)


@dataclass(frozen=True)
class PooledTopP(Strategy):
    """Dynamic block selection (DraftAttention / AdaSpa style): per query block, the key blocks holding ``top_p`` of
    the mass of the attention map between block-pooled queries and keys, plus the diagonal block."""

    name: ClassVar[str] = "pooled_top_p"
    dynamic: ClassVar[bool] = True
    launch_order: ClassVar[str | None] = "original"  # its lists keep the token order
    top_p: float = 0.9

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        from vdopt.kernels.selection import pooled_select_top_p

        q_means, k_means = _pooled_means(q, k, ctx.block_size)
        indices, counts = pooled_select_top_p(q_means, k_means, k.shape[2], ctx.block_size, self.top_p)
        return SparsePattern(indices, counts, ctx.block_size, ctx.layout.video_tokens)


@dataclass(frozen=True)
class SemanticKMeans(Strategy):
    """Sparse VideoGen2: k-means over queries and over keys, clusters made contiguous by a permutation, and per query
    cluster the key clusters holding ``top_p`` of the centroid-estimated mass. Centroids are warm-started across
    denoising steps from the site's state, so each step's ``iterations`` continue one Lloyd run.

    One iteration per step by default: on the trained proxy (benchmarks/kmeans_iterations.py, CPU, 2026-12-06) it
    kept 0.1 percentage point less attention mass than two (0.8668 vs 0.8678) at 0.5 points more density, and on
    an H100 the whole step at 32/64 clusters cost 3.65% of dense attention with one iteration against 5.66% with
    two (benchmarks/results/strategy_overheads_2026-12-06_default*.json).
    """

    name: ClassVar[str] = "kmeans"
    dynamic: ClassVar[bool] = True
    traceable: ClassVar[bool] = False  # warm-started centroids and per-head clusters
    q_clusters: int = 32
    kv_clusters: int = 64
    top_p: float = 0.9
    iterations: int = 1

    def build(self, q: torch.Tensor, k: torch.Tensor, ctx: PatternContext) -> SparsePattern:
        from vdopt.kernels.kmeans import kmeans, permutation_from_labels
        from vdopt.kernels.selection import cluster_select_top_p

        n = q.shape[2]
        cq, ck = min(self.q_clusters, n), min(self.kv_clusters, n)
        key = f"kmeans:{self.q_clusters}:{self.kv_clusters}:{tuple(q.shape)}"
        warm = ctx.state.get(key)
        q_labels, q_centroids = kmeans(q, cq, self.iterations, None if warm is None else warm[0], seed=ctx.seed)
        k_labels, k_centroids = kmeans(k, ck, self.iterations, None if warm is None else warm[1], seed=ctx.seed + 1)
        ctx.state[key] = (q_centroids, k_centroids)
        q_perm, _, q_offsets = permutation_from_labels(q_labels, cq)
        kv_perm, _, kv_offsets = permutation_from_labels(k_labels, ck)
        # Per query cluster, the key clusters holding top_p of the centroid-estimated mass (weighted by cluster size).
        indices, counts = cluster_select_top_p(q_centroids, k_centroids, kv_offsets, self.top_p)
        return SparsePattern(indices, counts, ctx.block_size, n, q_perm=q_perm, kv_perm=kv_perm,
                             q_offsets=q_offsets, kv_offsets=kv_offsets)


def default_candidates() -> list[Strategy]:
    """The candidate set calibration measures: every strategy at several budgets."""
    return [
        SpatialWindow(0), SpatialWindow(1), SpatialWindow(2),
        TemporalWindow(0), TemporalWindow(1), TemporalWindow(2),
        TileWindow(1, 2, 2), TileWindow(1, 4, 4), TileWindow(2, 6, 6), TileWindow(2, 10, 10),
        Diagonal(0.25), Diagonal(1.0), Diagonal(2.0),
        MultiDiagonal(0.05), MultiDiagonal(0.15), MultiDiagonal(0.3),
        VerticalStripe(0.5), VerticalStripe(0.8),
        PooledTopP(0.7), PooledTopP(0.85), PooledTopP(0.95),
        SemanticKMeans(top_p=0.7), SemanticKMeans(top_p=0.85), SemanticKMeans(top_p=0.95),
    ]
