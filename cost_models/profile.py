"""Measure efficiency tables: time vdopt's kernels over shapes and densities, divide the roofline by the time.

``vdopt-search profile --target h100 --out cost_models/efficiency_h100.json`` runs :func:`run_profile` on the
current CUDA GPU (triton.testing.do_bench, median) and writes the table :class:`model.EfficiencyTable` reads.
:func:`default_table` turns the committed H100 measurements (benchmarks/results/strategy_overheads.json and
attention_kernels.json) into ``default_efficiency.json``.

Efficiency of a measurement = ideal roofline seconds on the target's spec / (measured seconds - launches x launch
gap), the launch part floored at half the measurement so a latency-bound kernel keeps a positive work time.

Kernels that run on the GPU alone are timed alone. The selections are priced by their marginal time as the
strategies run them:
- ``block_select``: the fused pooled selections (kernels/selection.py ``pooled_select_top_p`` for PooledTopP,
  ``pooled_select_vertical_stripes`` for VerticalStripe, the two strategies this kernel kind prices): the
  strategy's own ``build`` (block means of q and k, then the selection) minus the two block means. The fused
  selection has no host sync, so this is also its marginal time in front of the attention it feeds; each point
  records that path's marginal time (``path_marginal_ms``) as a check.
- ``cluster_select``: the k-means path's cluster top-p ends by reading the kept width on the host (the GPU then
  idles until the host has issued the attention launch), so it is timed as the marginal time of the strategy's
  ``build`` in front of its attention (vdopt/attention.py ``pattern_attention``), minus the k-means kernels of that
  build, which are timed alone (assignments, updates and sorts).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sympy as sp
import torch
from vdopt.cost_models import formulas as f
from vdopt.cost_models.model import DEFAULT_TABLE, AttentionShape, CostModel, efficiency_key

#: Wan2.1 self-attention shapes at 480p, 81 frames (DESIGN.md): (batch, heads, tokens, head_dim).
WAN_SHAPES = {"wan1.3b": (1, 12, 32760, 128), "wan14b": (1, 40, 32760, 128)}
#: Kept densities timed: around and between benchmarks/cost_model.py's acceptance densities (0.05-0.5), so that
#: the benchmark's evaluation there is out of sample (interpolated, on other random masks).
DENSITIES = (0.03, 0.07, 0.15, 0.25, 0.4, 0.6)
#: (query clusters, key clusters) the cluster kernel and the k-means path are timed at: SemanticKMeans' default
#: (32, 64), twice as many, and ~128-token clusters, where the partial tiles waste the most.
CLUSTER_CONFIGS = ((32, 64), (64, 128), (256, 256))
#: Lloyd iterations of the timed k-means path (SemanticKMeans' default).
KMEANS_ITERATIONS = 2
#: Floor of a marginal time (ms): a selection is never free.
_MIN_MARGINAL_MS = 1e-3
Timer = Callable[[Callable[[], Any]], float]


def efficiency_point(cost: CostModel, kernel: str, shape: AttentionShape, measured_ms: float,
                     density: float | None = None, launches: int = 1,
                     extra: dict[sp.Symbol, float] | None = None, **record: Any) -> dict[str, Any]:
    """One table point: the shape, density, measured time and the efficiency they imply on ``cost``'s spec.

    ``extra``: cluster counts of the kernel (``{C: ...}`` for one k-means tensor, ``{Cq: ..., Ck: ...}`` for the
    cluster kernel and the k-means path), which enter both its formulas and the point's lookup shape.
    """
    values = {**shape.subs(), f.rho: density or 1.0, **(extra or {})}
    ideal = cost.ideal_seconds(kernel, values)
    measured = measured_ms * 1e-3
    work = max(measured - launches * cost.launch_us * 1e-6, 0.5 * measured)
    point_shape: dict[str, Any] = {**efficiency_key(shape.batch * shape.heads, shape.tokens, shape.head_dim, extra),
                                   "block_size": shape.block_size}
    return {"shape": point_shape, "density": density, "measured_ms": measured_ms, "ideal_ms": ideal * 1e3,
            "efficiency": min(ideal / work, 1.5), **record}


def default_table(overheads: dict[str, Any], attention: dict[str, Any]) -> dict[str, Any]:
    """``default_efficiency.json`` from the committed H100 records: strategy_overheads.json (helper kernels) and
    attention_kernels.json (cuDNN dense, vdopt's block-sparse op as dispatched, the cluster kernel).

    ``block_select`` comes from the fused selections' paths (``pooled_top_p_fused_ms`` and
    ``vertical_stripe_fused_ms`` less two block means) where the records have them, else from the unfused
    scores + top-p that older records time. These helpers were timed alone, so the k-means path's host round trip
    in front of attention is not in ``cluster_select`` (see the module docstring); a profiled table measures it."""
    cost = CostModel.from_spec("h100", json.loads((Path(__file__).parent / "specs.json").read_text())["h100"])
    s = overheads["shape"]
    shape = AttentionShape(s["batch"], s["heads"], s["tokens"], s["head_dim"], block_size=128)
    kernels: dict[str, list[dict[str, Any]]] = {k: [] for k in f.KERNELS}
    dense_seen = set()
    for r in attention["records"]:
        at = AttentionShape(r["batch"], r["heads"], r["tokens"], r["head_dim"], block_size=r["block"])
        case = {"case": r["shape"], "source": "attention_kernels.json"}
        if r["shape"] not in dense_seen:
            dense_seen.add(r["shape"])
            kernels["dense"].append(efficiency_point(cost, "dense", at, r["cudnn_dense_ms"], 1.0, **case))
        kernels["block_sparse"].append(efficiency_point(cost, "block_sparse", at, r["vdopt_ms"], r["kept_fraction"],
                                                        **case))
        if r.get("cluster_ms"):
            # attention_kernels.py times the cluster kernel on as many clusters as 128-token blocks, for q and kv.
            full = 4 * r["batch"] * r["heads"] * r["tokens"] ** 2 * r["head_dim"]
            clusters = -(-r["tokens"] // r["block"])
            kernels["cluster_sparse"].append(efficiency_point(
                cost, "cluster_sparse", at, r["cluster_ms"], r["cluster_kept_tflop"] * 1e12 / full,
                launches=f.ATTENTION_LAUNCHES["cluster_sparse"], extra={f.Cq: clusters, f.Ck: clusters}, **case))
    kernels["text"].append({**kernels["dense"][0], "source": "not measured: dense SDPA's efficiency"})
    draft = next(r for r in overheads["draft_selection"] if r["block"] == shape.block_size)
    means = draft["pooled_means_q_ms"]
    kernels["pool_means"].append(efficiency_point(cost, "pool_means", shape, means, source="pooled_means_q_ms"))
    if "pooled_top_p_fused_ms" in draft:  # the fused selections the strategies run, after the two block means
        for key in ("pooled_top_p_fused_ms", "vertical_stripe_fused_ms"):
            kernels["block_select"].append(efficiency_point(cost, "block_select", shape, draft[key] - 2 * means,
                                                            source=f"{key} - 2 x pooled_means_q_ms"))
    else:  # records from before the fused selection: scores and the sort-based top-p
        kernels["block_select"].append(efficiency_point(
            cost, "block_select", shape, draft["scores_ms"] - 2 * means + draft["select_top_p_ms"],
            source="scores_ms - 2 x pooled_means_q_ms + select_top_p_ms"))
    for row in overheads["kmeans"]:
        c = row["clusters"]
        one = {f.C: c}
        kernels["kmeans_assign"].append(efficiency_point(cost, "kmeans_assign", shape, row["assign_ms"], extra=one,
                                                         source="assign_ms"))
        # kmeans() runs one Lloyd iteration as one fused pass (assignment and per-cluster sums) and a finalize, so
        # where the records time that iteration the update is priced as what it adds beyond the assignment
        # (assign + update = the measured iteration); older records time a separate sort-based update.
        if "lloyd_iteration_ms" in row:
            update_ms, source = max(row["lloyd_iteration_ms"] - row["assign_ms"], _MIN_MARGINAL_MS), \
                "lloyd_iteration_ms - assign_ms"
        else:
            update_ms, source = row["update_ms"], "update_ms"
        kernels["kmeans_update"].append(efficiency_point(cost, "kmeans_update", shape, update_ms, extra=one,
                                                         source=source))
        kernels["label_sort"].append(efficiency_point(cost, "label_sort", shape, row["permutation_from_labels_ms"],
                                                      extra=one, source="permutation_from_labels_ms"))
        for key in ("gather_one_tensor_ms", "scatter_out_ms"):
            kernels["gather"].append(efficiency_point(cost, "gather", shape, row[key], extra=one, source=key))
        kernels["cluster_select"].append(efficiency_point(cost, "cluster_select", shape, row["cluster_select_ms"],
                                                          extra={f.Cq: c, f.Ck: c}, source="cluster_select_ms"))
    return {
        "device": f"{overheads['device']} (defaults)",
        "date": overheads["date"],
        "versions": overheads["versions"],
        "target": "h100",
        "formulas_version": f.VERSION,
        "about": "Default efficiencies for targets without a measured table: H100 measurements divided into the "
                 "H100 spec's roofline. Regenerate with cost_models.profile.default_table.",
        "sources": ["benchmarks/results/strategy_overheads.json", "benchmarks/results/attention_kernels.json"],
        "kernels": kernels,
    }


def write_default_table(results: Path, out: Path = DEFAULT_TABLE) -> dict[str, Any]:
    """Regenerate ``default_efficiency.json`` from the records in the ``results`` folder (benchmarks/results)."""
    table = default_table(json.loads((results / "strategy_overheads.json").read_text()),
                          json.loads((results / "attention_kernels.json").read_text()))
    out.write_text(json.dumps(table, indent=1) + "\n")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Profiling on a device


def do_bench_median(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` after warm-up (CUDA events; L2 flushed between runs)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def random_block_lists(batch: int, heads: int, blocks: int, density: float, generator: torch.Generator,
                       device: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-(head, query block) random kept key blocks, the diagonal always among them; the kept density."""
    from vdopt.kernels.reference import kv_block_list_from_mask

    keep = max(1, round(density * blocks))
    scores = torch.rand(batch, heads, blocks, blocks, generator=generator)
    scores += torch.eye(blocks) * 2  # the diagonal ranks first
    order = scores.argsort(-1, descending=True)[..., :keep]
    mask = torch.zeros(batch, heads, blocks, blocks, dtype=torch.bool).scatter_(-1, order, True)
    indices, counts = kv_block_list_from_mask(mask)
    return indices.to(device), counts.to(device), keep / blocks


def random_cluster_offsets(batch: int, heads: int, tokens: int, clusters: int,
                           generator: torch.Generator) -> torch.Tensor:
    """int32 ``[B, H, clusters + 1]`` offsets of clusters with sizes uniform in [m/2, 3m/2], m = tokens / clusters."""
    mean = tokens / clusters
    sizes = mean * (0.5 + torch.rand(batch, heads, clusters, generator=generator, dtype=torch.float64))
    cuts = torch.round(sizes.cumsum(-1) / sizes.sum(-1, keepdim=True) * tokens).to(torch.int32)
    return torch.nn.functional.pad(cuts, (1, 0)).contiguous()


def random_clusters(batch: int, heads: int, tokens: int, q_clusters: int, kv_clusters: int, density: float,
                    generator: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
    """Random query and key cluster offsets and, per query cluster, ``round(density * kv_clusters)`` random kept
    key clusters: ``(q_offsets, kv_offsets, indices, counts, kept density of token pairs)``."""
    from vdopt.kernels.reference import kv_block_list_from_mask

    q_offsets = random_cluster_offsets(batch, heads, tokens, q_clusters, generator)
    kv_offsets = random_cluster_offsets(batch, heads, tokens, kv_clusters, generator)
    keep = max(1, round(density * kv_clusters))
    order = torch.rand(batch, heads, q_clusters, kv_clusters, generator=generator).argsort(-1)[..., :keep]
    mask = torch.zeros(batch, heads, q_clusters, kv_clusters, dtype=torch.bool).scatter_(-1, order, True)
    indices, counts = kv_block_list_from_mask(mask)
    q_sizes, kv_sizes = (o[..., 1:] - o[..., :-1] for o in (q_offsets, kv_offsets))
    kept = torch.einsum("bhq,bhqk,bhk->", q_sizes.double(), mask.double(), kv_sizes.double()) / (batch * heads * tokens**2)
    return (q_offsets.to(device), kv_offsets.to(device), indices.to(device), counts.to(device), float(kept))


def executed_tile_pairs(q_offsets: torch.Tensor, kv_offsets: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                        tile: tuple[int, int] = f.CLUSTER_TILE) -> float:
    """Tile pairs the cluster kernel computes for these lists, summed over batch and heads: for each kept (query
    cluster, key cluster), ceil(query size / tile[0]) x ceil(key size / tile[1])."""
    q_tiles = (q_offsets[..., 1:] - q_offsets[..., :-1]).long().add(tile[0] - 1).div(tile[0], rounding_mode="floor")
    kv_tiles = (kv_offsets[..., 1:] - kv_offsets[..., :-1]).long().add(tile[1] - 1).div(tile[1], rounding_mode="floor")
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept = kv_tiles.gather(-1, indices.long().flatten(2)).view(indices.shape)
    return float((torch.where(used, kept, 0).sum(-1) * q_tiles).sum())


def _path_densities(densities: Sequence[float]) -> list[float]:
    """Where the dynamic strategies' whole paths are timed: the lowest density (the selection's share of the path
    is largest there) and the one nearest 0.25."""
    ordered = sorted(densities)
    return sorted({ordered[0], min(ordered, key=lambda d: abs(d - 0.25))})


def run_profile(target: str, device: str = "cuda", shapes: dict[str, tuple[int, int, int, int]] | None = None,
                densities: Sequence[float] = DENSITIES,
                cluster_configs: Sequence[tuple[int, int]] = CLUSTER_CONFIGS, timer: Timer | None = None,
                block_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                progress: Callable[[str], None] | None = None, seed: int = 0) -> dict[str, Any]:
    """Time every kernel kind at ``shapes`` x ``densities`` (and ``cluster_configs``) on ``device``; return the table.

    On CUDA the attention ops dispatch as at run time (``backend="auto"``: vdopt's Triton kernels unless a faster
    installed backend applies; each point records the backend that ran) and dense attention is cuDNN SDPA;
    elsewhere the reference backends run (only useful to test this function). ``timer(fn) -> ms`` defaults to
    do_bench's median. ``seed`` draws q/k/v and the random masks; the table records it (under ``profile``, with
    the densities and cluster configurations), so an evaluation can use other data (benchmarks/cost_model.py).
    """
    from vdopt.kernels import _backends, selection
    from vdopt.kernels import kmeans as km
    from vdopt.kernels.block_sparse_attention import block_sparse_attention
    from vdopt.kernels.cluster_sparse_attention import cluster_sparse_attention

    from vdopt.attention import pattern_attention
    from vdopt.sites import TokenLayout
    from vdopt.strategies import PatternContext, PooledTopP, SemanticKMeans, VerticalStripe

    cuda = device.startswith("cuda")
    # The attention ops dispatch as at run time (the fastest installed backend on CUDA); the k-means helpers are
    # called by their Triton entry points on CUDA, as kmeans() runs them.
    backend = "auto" if cuda else "reference"
    timer = timer or do_bench_median
    cost = CostModel.from_spec(target, json.loads((Path(__file__).parent / "specs.json").read_text())[target])
    shapes = shapes or WAN_SHAPES
    path_densities = _path_densities(densities)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    kernels: dict[str, list[dict[str, Any]]] = {k: [] for k in f.KERNELS if k != "text"}
    assign = km._assign_triton if cuda else km._assign_reference
    update = km._update_triton if cuda else km._update_reference

    def note(message: str) -> None:
        if progress is not None:
            progress(message)

    def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not cuda:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def profile_shape(name: str, batch: int, heads: int, tokens: int, head_dim: int) -> None:
        shape = AttentionShape(batch, heads, tokens, head_dim, block_size=block_size)
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        x = q if cuda else q.float()
        scale = head_dim**-0.5
        blocks = math.ceil(tokens / block_size)
        configs = [(min(cq, tokens), min(ck, tokens)) for cq, ck in cluster_configs]

        def context() -> PatternContext:
            return PatternContext(TokenLayout(1, 1, tokens), block_size, {}, seed)

        def path_times(strategy: Any) -> tuple[float, float, float]:
            """(whole path ms, attention ms on a fixed pattern, kept density): the strategy's build in front of
            the attention it feeds, as vdopt/attention.py runs it, and that attention alone."""
            ctx = context()
            strategy.build(q, k, ctx)  # k-means: cold start; the runtime warm-starts from the previous step
            pattern = strategy.build(q, k, ctx)
            attention_ms = timer(lambda: pattern_attention(q, k, v, pattern, scale))
            path_ms = timer(lambda: pattern_attention(q, k, v, strategy.build(q, k, ctx), scale))
            return path_ms, attention_ms, float(pattern.density().mean())

        note(f"{name}: dense")
        kernels["dense"].append(efficiency_point(cost, "dense", shape, timer(lambda: dense_sdpa(q, k, v)), 1.0,
                                                 case=name))
        for density in densities:
            note(f"{name}: block_sparse d={density}")
            indices, counts, kept = random_block_lists(batch, heads, blocks, density, generator, device)
            ms = timer(lambda i=indices, c=counts: block_sparse_attention(q, k, v, i, c, block_size, block_size,
                                                                           backend=backend, validate=False))
            kernels["block_sparse"].append(efficiency_point(cost, "block_sparse", shape, ms, kept, case=name,
                                                            backend=_backends.last_backend("block_sparse_attention")))
            for cq, ck in configs:
                note(f"{name}: cluster_sparse Cq={cq} Ck={ck} d={density}")
                qo, ko, ci, cc, kept = random_clusters(batch, heads, tokens, cq, ck, density, generator, device)
                ms = timer(lambda a=qo, b=ko, i=ci, c=cc: cluster_sparse_attention(q, k, v, a, b, i, c, backend=backend,
                                                                                   validate=False))
                kernels["cluster_sparse"].append(efficiency_point(
                    cost, "cluster_sparse", shape, ms, kept, launches=f.ATTENTION_LAUNCHES["cluster_sparse"],
                    extra={f.Cq: cq, f.Ck: ck}, case=name, backend=_backends.last_backend("cluster_sparse_attention"),
                    tile_pairs=executed_tile_pairs(qo, ko, ci, cc, shape.cluster_tile)))
        note(f"{name}: pooled selection")
        means_ms = timer(lambda: selection.pooled_block_means(q, block_size, backend=backend))
        kernels["pool_means"].append(efficiency_point(cost, "pool_means", shape, means_ms, case=name))
        for density in path_densities:
            for strategy in (PooledTopP(top_p=density), VerticalStripe(top_p=density)):
                note(f"{name}: {strategy.label()}")
                ctx = context()
                build_ms = timer(lambda s=strategy, c=ctx: s.build(q, k, c))
                path_ms, attention_ms, kept = path_times(strategy)
                kernels["block_select"].append(efficiency_point(
                    cost, "block_select", shape, max(build_ms - 2 * means_ms, _MIN_MARGINAL_MS), kept, case=name,
                    strategy=strategy.label(), build_ms=build_ms, path_ms=path_ms, attention_ms=attention_ms,
                    path_marginal_ms=path_ms - attention_ms - 2 * means_ms,
                    source="build_ms - 2 x pool_means (the fused selection after the block means)"))
        kmeans_ms: dict[int, float] = {}
        for c in sorted({c for config in configs for c in config}):
            note(f"{name}: k-means C={c}")
            one = {f.C: c}
            labels, centroids = km.kmeans(q, c, KMEANS_ITERATIONS, backend="auto")
            assign_ms = timer(lambda m=centroids: assign(x, m))
            if cuda:  # kmeans() runs an iteration as one fused pass; the update is what it adds beyond assigning
                iteration_ms = timer(lambda m=centroids: km._lloyd_iteration_triton(x, m))
                update_ms = max(iteration_ms - assign_ms, _MIN_MARGINAL_MS)
            else:
                update_ms = timer(lambda lab=labels, m=centroids: update(x, lab, m))
            sort_ms = timer(lambda lab=labels, n=c: km.permutation_from_labels(lab, n))
            perm = km.permutation_from_labels(labels, c)[0]
            gather_ms = timer(lambda p=perm: km.gather_tokens(q, p))
            for kind, ms in (("kmeans_assign", assign_ms), ("kmeans_update", update_ms), ("label_sort", sort_ms),
                             ("gather", gather_ms)):
                kernels[kind].append(efficiency_point(cost, kind, shape, ms, extra=one, case=name))
            kmeans_ms[c] = KMEANS_ITERATIONS * (assign_ms + update_ms) + sort_ms
        for cq, ck in configs:
            for density in path_densities:
                note(f"{name}: k-means path Cq={cq} Ck={ck} d={density}")
                strategy = SemanticKMeans(q_clusters=cq, kv_clusters=ck, top_p=density, iterations=KMEANS_ITERATIONS)
                path_ms, attention_ms, kept = path_times(strategy)
                select_ms = max(path_ms - attention_ms - kmeans_ms[cq] - kmeans_ms[ck], _MIN_MARGINAL_MS)
                kernels["cluster_select"].append(efficiency_point(
                    cost, "cluster_select", shape, select_ms, kept, extra={f.Cq: cq, f.Ck: ck}, case=name,
                    strategy=strategy.label(), path_ms=path_ms, attention_ms=attention_ms,
                    source="path_ms - attention_ms - k-means of q and k (assign, update, sort; timed alone)"))

    for name, (batch, heads, tokens, head_dim) in shapes.items():
        profile_shape(name, batch, heads, tokens, head_dim)
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if cuda:
        versions["cuda"] = str(torch.version.cuda)
        versions["cudnn"] = str(torch.backends.cudnn.version())
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu (reference backends)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "target": target,
        "formulas_version": f.VERSION,
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms" if timer is do_bench_median else "custom",
        "dtype": str(dtype).removeprefix("torch."),
        "profile": {"seed": seed, "shapes": {n: list(s) for n, s in shapes.items()}, "densities": list(densities),
                    "path_densities": path_densities, "cluster_configs": [list(c) for c in cluster_configs],
                    "kmeans_iterations": KMEANS_ITERATIONS, "block_size": block_size,
                    "cluster_tile": list(f.CLUSTER_TILE)},
        "kernels": kernels,
    }
