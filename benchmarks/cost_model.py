"""Predicted vs measured latency of every strategy kind at Wan2.1 shapes (issue 5's 15% acceptance; GPU only).

For each shape (Wan2.1-1.3B: B1 H12 N32760 D128; 14B: B1 H40) and kept density 0.05-0.5, it times (do_bench
median) the whole per-call path the runtime runs for all heads of one site sharing the strategy:
  dense     cuDNN SDPA
  static    block-sparse kernel on a per-head random block list (spatial, diagonal, multi-diagonal)
  permuted  gather Q, K, V by a token order + block-sparse kernel + scatter O (temporal, tile3d)
  pooled    pooled block scores + top-k selection (k hits the density) + block-sparse kernel (pooled_top_p)
  kmeans    warm k-means of Q and K + permutations + cluster scores + top-k selection + gathers + cluster
            kernel + scatter O (SemanticKMeans defaults); the predicted density is the kept one measured
and the cost model's prediction for ``--target`` (with its efficiency table if committed, else the defaults),
then writes ``cost_model.json``: records {device, target, strategy, shape, density, predicted_ms, measured_ms,
rel_error} and per strategy the median and worst absolute relative error.

    python benchmarks/cost_model.py --target h100 --out benchmarks/results        # on the GPU
    python benchmarks/cost_model.py --smoke --out /tmp                               # CPU, tiny shape, reference ops
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from vdopt.cost_models.model import CostModel
from vdopt.kernels import kmeans as km
from vdopt.kernels import selection
from vdopt.kernels.block_sparse_attention import block_sparse_attention
from vdopt.kernels.cluster_sparse_attention import cluster_sparse_attention
from vdopt.kernels.reference import kv_block_list_from_mask

from vdopt.strategies import Dense, PooledTopP, SemanticKMeans, SpatialWindow, TemporalWindow

SHAPES = {"wan1.3b": (1, 12, 32760, 128), "wan14b": (1, 40, 32760, 128)}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
STRATEGIES = {"dense": Dense(), "static": SpatialWindow(0), "permuted": TemporalWindow(0),
              "pooled": PooledTopP(0.9), "kmeans": SemanticKMeans()}


def _timer(cuda: bool):
    if cuda:
        import triton

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def _random_blocks(batch: int, heads: int, blocks: int, density: float, device: str) -> tuple[torch.Tensor, ...]:
    keep = max(1, round(density * blocks))
    scores = torch.rand(batch, heads, blocks, blocks) + 2 * torch.eye(blocks)
    mask = torch.zeros(batch, heads, blocks, blocks, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
    indices, counts = kv_block_list_from_mask(mask)
    return indices.to(device), counts.to(device)


def measure(strategy: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, density: float, block: int,
            backend: str, timer) -> tuple[float, float]:
    """(measured ms, kept density) of one call of ``strategy`` over all heads of q/k/v."""
    batch, heads, tokens, head_dim = q.shape
    blocks = math.ceil(tokens / block)
    if strategy == "dense":
        def run():
            if q.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return timer(run), 1.0
    if strategy in ("static", "permuted"):
        indices, counts = _random_blocks(batch, heads, blocks, density, q.device.type)
        perm = torch.randperm(tokens, device=q.device).expand(batch, heads, -1).contiguous()

        def run():
            qp, kp, vp = (km.gather_tokens(x, perm) for x in (q, k, v)) if strategy == "permuted" else (q, k, v)
            out, _ = block_sparse_attention(qp, kp, vp, indices, counts, block, block, backend=backend, validate=False)
            return km.scatter_tokens(out, perm) if strategy == "permuted" else out

        return timer(run), float(counts.float().mean()) / blocks
    if strategy == "pooled":
        keep = max(1, round(density * blocks))

        def run():
            scores = selection.pooled_block_scores(q, k, block, block)
            indices, counts = selection.select_blocks_top_k(scores, keep)
            return block_sparse_attention(q, k, v, indices, counts, block, block, backend=backend, validate=False)

        return timer(run), keep / blocks
    spec = STRATEGIES["kmeans"]
    _, q_centroids = km.kmeans(q, spec.q_clusters, 3)
    _, k_centroids = km.kmeans(k, spec.kv_clusters, 3)
    keep = max(1, round(density * spec.kv_clusters))
    state: dict = {}

    def run():
        q_labels, qc = km.kmeans(q, spec.q_clusters, spec.iterations, q_centroids)
        k_labels, kc = km.kmeans(k, spec.kv_clusters, spec.iterations, k_centroids)
        q_perm, _, q_offsets = km.permutation_from_labels(q_labels, spec.q_clusters)
        kv_perm, _, kv_offsets = km.permutation_from_labels(k_labels, spec.kv_clusters)
        sizes = (kv_offsets[..., 1:] - kv_offsets[..., :-1]).float()
        logits = torch.einsum("bhqd,bhkd->bhqk", qc, kc) * head_dim**-0.5 + sizes.clamp(min=1e-6).log()[:, :, None]
        indices, counts = selection.select_blocks_top_k(torch.softmax(logits, -1), keep)
        qp, kp, vp = km.gather_tokens(q, q_perm), km.gather_tokens(k, kv_perm), km.gather_tokens(v, kv_perm)
        out, _ = cluster_sparse_attention(qp, kp, vp, q_offsets, kv_offsets, indices, counts, backend=backend,
                                          validate=False)
        state.update(q_offsets=q_offsets, kv_offsets=kv_offsets, indices=indices, counts=counts)
        return km.scatter_tokens(out, q_perm)

    ms = timer(run)
    q_sizes = (state["q_offsets"][..., 1:] - state["q_offsets"][..., :-1]).float()
    kv_sizes = (state["kv_offsets"][..., 1:] - state["kv_offsets"][..., :-1]).float()
    mask = torch.zeros(*state["indices"].shape[:3], spec.kv_clusters, dtype=torch.float32, device=q.device)
    valid = torch.arange(state["indices"].shape[-1], device=q.device) < state["counts"][..., None]
    mask.scatter_(-1, state["indices"].long().clamp(min=0), valid.float())
    kept = torch.einsum("bhq,bhqk,bhk->", q_sizes, mask, kv_sizes) / (batch * heads * tokens**2)
    return ms, float(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="h100")
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent / "results")))
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny shape, reference ops")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("cost_model.py times GPU kernels; run it on a CUDA machine (or --smoke on CPU)")
    shapes = SHAPES if not args.smoke else {"smoke": (1, 2, 512, 32)}
    densities = DENSITIES if not args.smoke else (0.1, 0.5)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    backend, block = ("triton" if cuda else "reference"), (128 if not args.smoke else 32)
    timer = _timer(cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        cost = CostModel.for_target(args.target)
    torch.manual_seed(0)
    records = []
    for name, (batch, heads, tokens, head_dim) in shapes.items():
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        for strategy, config in STRATEGIES.items():
            for density in densities if strategy != "dense" else (1.0,):
                measured_ms, kept = measure(strategy, q, k, v, density, block, backend, timer)
                predicted_ms = 1e3 * cost.attention_seconds(batch, heads, tokens, head_dim, config, kept, block)
                records.append({
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "target": args.target,
                    "strategy": strategy, "strategy_config": config.label(), "shape": name,
                    "batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim,
                    "density": kept, "requested_density": density, "predicted_ms": predicted_ms,
                    "measured_ms": measured_ms, "rel_error": (predicted_ms - measured_ms) / measured_ms,
                })
                print(f"{name} {strategy} d={kept:.3f}: predicted {predicted_ms:.3f} ms, measured {measured_ms:.3f} ms",
                      flush=True)
    summary = {}
    for strategy in STRATEGIES:
        errors = [abs(r["rel_error"]) for r in records if r["strategy"] == strategy]
        summary[strategy] = {"median_abs_rel_error": statistics.median(errors), "worst_abs_rel_error": max(errors)}
    all_errors = [abs(r["rel_error"]) for r in records]
    result = {
        "benchmark": "cost_model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
        "cost_model": cost.table.source if cost.measured else f"defaults ({cost.defaults.source})",
        "warnings": [str(w.message) for w in caught],
        "timing": "triton.testing.do_bench median" if cuda else "wall clock (smoke)",
        "acceptance": "median abs rel error <= 0.15 per strategy",
        "summary": {**summary, "all": {"median_abs_rel_error": statistics.median(all_errors),
                                       "worst_abs_rel_error": max(all_errors)}},
        "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
