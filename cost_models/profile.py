"""Measure efficiency tables: time vdopt's kernels over shapes and densities, divide the roofline by the time.

``vdopt-search profile --target h100 --out cost_models/efficiency_h100.json`` runs :func:`run_profile` on the
current CUDA GPU (triton.testing.do_bench, median) and writes the table :class:`model.EfficiencyTable` reads.
:func:`default_table` turns the committed H100 measurements (benchmarks/results/strategy_overheads.json and
attention_kernels.json) into ``default_efficiency.json``.

Efficiency of a measurement = ideal roofline seconds on the target's spec / (measured seconds - launches x launch
gap), the launch part floored at half the measurement so a latency-bound kernel keeps a positive work time.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from vdopt.cost_models import formulas as f
from vdopt.cost_models.model import DEFAULT_TABLE, AttentionShape, CostModel

#: Wan2.1 self-attention shapes at 480p, 81 frames (DESIGN.md): (batch, heads, tokens, head_dim).
WAN_SHAPES = {"wan1.3b": (1, 12, 32760, 128), "wan14b": (1, 40, 32760, 128)}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
CLUSTERS = (64, 128, 256)
Timer = Callable[[Callable[[], Any]], float]


def efficiency_point(cost: CostModel, kernel: str, shape: AttentionShape, measured_ms: float,
                     density: float | None = None, launches: int = 1, clusters: int | None = None,
                     **record: Any) -> dict[str, Any]:
    """One table point: the shape, density, measured time and the efficiency they imply on ``cost``'s spec."""
    values = {**shape.subs(), f.rho: density or 1.0}
    if clusters is not None:
        values.update({f.C: clusters, f.Cq: clusters, f.Ck: clusters})
    ideal = cost.ideal_seconds(kernel, values)
    measured = measured_ms * 1e-3
    work = max(measured - launches * cost.launch_us * 1e-6, 0.5 * measured)
    point_shape: dict[str, Any] = {"batch_heads": shape.batch * shape.heads, "tokens": shape.tokens,
                                   "head_dim": shape.head_dim, "block_size": shape.block_size}
    if clusters is not None:
        point_shape["clusters"] = clusters
    return {"shape": point_shape, "density": density, "measured_ms": measured_ms, "ideal_ms": ideal * 1e3,
            "efficiency": min(ideal / work, 1.5), **record}


def default_table(overheads: dict[str, Any], attention: dict[str, Any]) -> dict[str, Any]:
    """``default_efficiency.json`` from the committed H100 records: strategy_overheads.json (helper kernels) and
    attention_kernels.json (cuDNN dense, vdopt's block-sparse op as dispatched, the cluster kernel)."""
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
            full = 4 * r["batch"] * r["heads"] * r["tokens"] ** 2 * r["head_dim"]
            kernels["cluster_sparse"].append(efficiency_point(
                cost, "cluster_sparse", at, r["cluster_ms"], r["cluster_kept_tflop"] * 1e12 / full, **case))
    kernels["text"].append({**kernels["dense"][0], "source": "not measured: dense SDPA's efficiency"})
    draft = next(r for r in overheads["draft_selection"] if r["block"] == shape.block_size)
    means = draft["pooled_means_q_ms"]
    kernels["pool_means"].append(efficiency_point(cost, "pool_means", shape, means, source="pooled_means_q_ms"))
    kernels["pool_scores"].append(efficiency_point(cost, "pool_scores", shape, draft["scores_ms"] - 2 * means,
                                                   source="scores_ms - 2 x pooled_means_q_ms"))
    kernels["block_select"].append(efficiency_point(cost, "block_select", shape, draft["select_top_p_ms"],
                                                    source="select_top_p_ms"))
    for row in overheads["kmeans"]:
        c = row["clusters"]
        kernels["kmeans_assign"].append(efficiency_point(cost, "kmeans_assign", shape, row["assign_ms"], clusters=c,
                                                         source="assign_ms"))
        kernels["kmeans_update"].append(efficiency_point(cost, "kmeans_update", shape, row["update_ms"], clusters=c,
                                                         source="update_ms"))
        for key in ("sort_offsets_ms", "permutation_from_labels_ms"):
            kernels["label_sort"].append(efficiency_point(cost, "label_sort", shape, row[key], clusters=c, source=key))
        for key in ("gather_one_tensor_ms", "scatter_out_ms"):
            kernels["gather"].append(efficiency_point(cost, "gather", shape, row[key], clusters=c, source=key))
        kernels["cluster_select"].append(efficiency_point(cost, "cluster_select", shape, row["cluster_select_ms"],
                                                          clusters=c, source="cluster_select_ms"))
    return {
        "device": f"{overheads['device']} (defaults)",
        "date": overheads["date"],
        "versions": overheads["versions"],
        "target": "h100",
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


def _random_block_lists(batch: int, heads: int, blocks: int, density: float, generator: torch.Generator,
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


def _random_clusters(batch: int, heads: int, tokens: int, mean_size: int, density: float,
                     generator: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
    """Cluster offsets of sizes uniform in [mean/2, 3 mean/2] (the notes' spread) and kept cluster lists."""
    from vdopt.kernels.reference import kv_block_list_from_mask

    count = max(1, tokens // mean_size)
    sizes = torch.randint(mean_size // 2, mean_size * 3 // 2 + 1, (batch, heads, count), generator=generator).float()
    sizes = (sizes / sizes.sum(-1, keepdim=True) * tokens).floor().long()
    sizes[..., -1] += tokens - sizes.sum(-1)
    offsets = torch.nn.functional.pad(sizes.cumsum(-1), (1, 0)).int()
    keep = max(1, round(density * count))
    order = torch.rand(batch, heads, count, count, generator=generator).argsort(-1)[..., :keep]
    mask = torch.zeros(batch, heads, count, count, dtype=torch.bool).scatter_(-1, order, True)
    indices, counts = kv_block_list_from_mask(mask)
    kept = torch.einsum("bhq,bhqk,bhk->bh", sizes.float(), mask.float(), sizes.float()).mean() / tokens**2
    return offsets.to(device), offsets.clone().to(device), indices.to(device), counts.to(device), float(kept)


def run_profile(target: str, device: str = "cuda", shapes: dict[str, tuple[int, int, int, int]] | None = None,
                densities: Sequence[float] = DENSITIES, clusters: Sequence[int] = CLUSTERS, timer: Timer | None = None,
                block_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every kernel kind at ``shapes`` x ``densities`` on ``device`` and return the efficiency table.

    On CUDA the Triton kernels run (``backend="triton"``) and dense attention is cuDNN SDPA; elsewhere the
    reference backends run (only useful to test this function). ``timer(fn) -> ms`` defaults to do_bench's median.
    """
    from vdopt.kernels import kmeans as km
    from vdopt.kernels import selection
    from vdopt.kernels.block_sparse_attention import block_sparse_attention
    from vdopt.kernels.cluster_sparse_attention import cluster_sparse_attention

    cuda = device.startswith("cuda")
    backend = "triton" if cuda else "reference"
    timer = timer or do_bench_median
    cost = CostModel.from_spec(target, json.loads((Path(__file__).parent / "specs.json").read_text())[target])
    shapes = shapes or WAN_SHAPES
    generator = torch.Generator().manual_seed(0)
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
            blocks = math.ceil(tokens / block_size)
            note(f"{name}: dense")
            kernels["dense"].append(efficiency_point(cost, "dense", shape, timer(lambda: dense_sdpa(q, k, v)), 1.0, case=name))
            for density in densities:
                note(f"{name}: block_sparse d={density}")
                indices, counts, kept = _random_block_lists(batch, heads, blocks, density, generator, device)
                ms = timer(lambda i=indices, c=counts: block_sparse_attention(q, k, v, i, c, block_size, block_size,
                                                                               backend=backend, validate=False))
                kernels["block_sparse"].append(efficiency_point(cost, "block_sparse", shape, ms, kept, case=name))
                note(f"{name}: cluster_sparse d={density}")
                qo, ko, ci, cc, kept = _random_clusters(batch, heads, tokens, block_size, density, generator, device)
                ms = timer(lambda a=qo, b=ko, i=ci, c=cc: cluster_sparse_attention(q, k, v, a, b, i, c, backend=backend,
                                                                                   validate=False))
                kernels["cluster_sparse"].append(efficiency_point(cost, "cluster_sparse", shape, ms, kept, case=name))
            note(f"{name}: pooled selection")
            means_ms = timer(lambda: selection.pooled_block_means(q, block_size, backend=backend))
            kernels["pool_means"].append(efficiency_point(cost, "pool_means", shape, means_ms, case=name))
            scores_ms = timer(lambda: selection.pooled_block_scores(q, k, block_size, block_size, backend=backend))
            kernels["pool_scores"].append(efficiency_point(cost, "pool_scores", shape, max(scores_ms - 2 * means_ms, 1e-4),
                                                           case=name))
            scores = selection.pooled_block_scores(q, k, block_size, block_size, backend=backend)
            kernels["block_select"].append(efficiency_point(
                cost, "block_select", shape, timer(lambda: selection.select_blocks_top_p(scores, 0.9)), case=name))
            for c in clusters:
                note(f"{name}: k-means C={c}")
                labels, centroids = km.kmeans(q, c, 2, backend="auto")
                xq = q if cuda else q.float()
                kernels["kmeans_assign"].append(efficiency_point(
                    cost, "kmeans_assign", shape, timer(lambda x=xq, m=centroids: assign(x, m)), clusters=c, case=name))
                kernels["kmeans_update"].append(efficiency_point(
                    cost, "kmeans_update", shape, timer(lambda x=xq, lab=labels, m=centroids: update(x, lab, m)),
                    clusters=c, case=name))
                kernels["label_sort"].append(efficiency_point(
                    cost, "label_sort", shape, timer(lambda lab=labels, n=c: km.permutation_from_labels(lab, n)),
                    clusters=c, case=name))
                perm = km.permutation_from_labels(labels, c)[0]
                kernels["gather"].append(efficiency_point(
                    cost, "gather", shape, timer(lambda p=perm: km.gather_tokens(q, p)), clusters=c, case=name))
                sizes = torch.full((batch, heads, c), tokens / c, device=device)
                logits = torch.einsum("bhqd,bhkd->bhqk", centroids, centroids) * head_dim**-0.5 + sizes.log()[:, :, None]

                def cluster_select(x: torch.Tensor = logits) -> Any:
                    return selection.select_blocks_top_p(torch.softmax(x, -1), 0.9)

                kernels["cluster_select"].append(efficiency_point(cost, "cluster_select", shape, timer(cluster_select),
                                                                  clusters=c, case=name))

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
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms" if timer is do_bench_median else "custom",
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": kernels,
    }
