"""Predicted vs measured latency of every strategy kind at Wan2.1 shapes (issue 5's 15% acceptance; GPU only).

For each shape (Wan2.1-1.3B: B1 H12 N32760 D128; 14B: B1 H40) and density 0.05-0.5, it times (do_bench median;
the median over ``--repeats`` rounds, each round visiting every case once) the per-call path the runtime runs for
all heads of one site sharing the strategy:
  dense        cuDNN SDPA
  static       block-sparse op on a per-head random block list (spatial, diagonal, multi-diagonal), through
               vdopt.attention.pattern_attention
  permuted     gather Q, K, V by a per-head token order + block-sparse op + scatter O (temporal, tile3d)
  pooled       PooledTopP(top_p=density): its own build (block means, scores, top-p + diagonal) + pattern_attention
  kmeans       SemanticKMeans(top_p=density), the strategies' 32 query / 64 key clusters: its own build (warm
               k-means of Q and K, permutations, cluster top-p) + pattern_attention (gathers, cluster kernel,
               scatters of O and of the log-sum-exp)
  kmeans_c256  the same at 256 / 256 clusters (~128 tokens, where partial tiles waste the most); an extra check of
               the cluster kernel's tile model, not an acceptance strategy
The dynamic strategies keep what top-p keeps on random data (close to top_p); every prediction is made at the
kept density measured (pattern.density()). For the k-means cases the record also holds the tile pairs the cluster
kernel executed and the count the formula predicts at that density, to separate formula error from efficiency.

In or out of sample: the efficiency table (vdopt-search profile, cost_models/profile.py) records its seed,
densities and cluster configurations under "profile"; this script draws q/k/v and masks from ``--seed`` (default
1, the profile's default is 0) at the acceptance densities, which the profile's default densities avoid. Each
record says whether the table has a point of its attention kernel at the same shape, density (and clusters)
(``profiled_point``) and which kind of sample it is (``sample``).

    vdopt-search profile --target h100                                         # on the GPU: the table first
    python benchmarks/cost_model.py --target h100 --out benchmarks/results     # then this
    python benchmarks/cost_model.py --profile --out /tmp                       # or both in one process
    python benchmarks/cost_model.py --smoke --profile --out /tmp               # CPU, tiny shape, reference ops
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vdopt.cost_models import formulas as f
from vdopt.cost_models import profile
from vdopt.cost_models.model import (
    AttentionShape,
    CostModel,
    EfficiencyTable,
    attention_kernel,
    cluster_values,
)
from vdopt.kernels import kmeans as km
from vdopt.kernels.block_sparse_attention import block_sparse_attention

from vdopt.attention import pattern_attention
from vdopt.sites import TokenLayout
from vdopt.strategies import (
    Dense,
    PatternContext,
    PooledTopP,
    SemanticKMeans,
    SparsePattern,
    SpatialWindow,
    Strategy,
    TemporalWindow,
)

SHAPES = {"wan1.3b": (1, 12, 32760, 128), "wan14b": (1, 40, 32760, 128)}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
#: The strategy kinds the issue's acceptance covers, and one extra tile-waste check.
ACCEPTANCE = ("dense", "static", "permuted", "pooled", "kmeans")
STRATEGIES = (*ACCEPTANCE, "kmeans_c256")
#: Two points of a table are the same density if they differ by less than this.
_SAME_DENSITY = 0.005


def _strategy(name: str, density: float) -> Strategy:
    """The strategy config a case runs and the cost model prices."""
    if name == "dense":
        return Dense()
    if name == "static":
        return SpatialWindow(0)
    if name == "permuted":
        return TemporalWindow(0)
    if name == "pooled":
        return PooledTopP(top_p=density)
    if name == "kmeans":
        return SemanticKMeans(top_p=density)
    if name == "kmeans_c256":
        return SemanticKMeans(q_clusters=256, kv_clusters=256, top_p=density)
    raise ValueError(f"unknown strategy kind {name!r}; use one of {', '.join(STRATEGIES)}")


def _timer(cuda: bool) -> Callable[[Callable[[], Any]], float]:
    if cuda:
        return profile.do_bench_median

    def wall(fn: Callable[[], Any]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


@dataclass
class Case:
    """One (shape, strategy, density) point: what to run and what it keeps."""

    shape: str
    dims: tuple[int, int, int, int]
    strategy: str
    config: Strategy
    requested: float
    run: Callable[[], Any]
    kept: float
    detail: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)


def make_case(shape: str, name: str, density: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
              generator: torch.Generator, seed: int) -> Case:
    """Build the inputs of one case (masks, warm k-means state) and its timed closure."""
    batch, heads, tokens, head_dim = q.shape
    scale = head_dim**-0.5
    config = _strategy(name, density)
    dims = (batch, heads, tokens, head_dim)
    if name == "dense":
        def run_dense() -> torch.Tensor:
            if q.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return Case(shape, dims, name, config, 1.0, run_dense, 1.0)
    if name in ("static", "permuted"):
        blocks = math.ceil(tokens / block)
        indices, counts, kept = profile.random_block_lists(batch, heads, blocks, density, generator, q.device.type)
        if name == "static":
            pattern = SparsePattern(indices, counts, block, tokens)
            return Case(shape, dims, name, config, density, lambda: pattern_attention(q, k, v, pattern, scale), kept)
        perm = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch * heads)])
        perm = perm.view(batch, heads, tokens).to(q.device)

        def run_permuted() -> torch.Tensor:
            qp, kp, vp = (km.gather_tokens(x, perm) for x in (q, k, v))
            out, _ = block_sparse_attention(qp, kp, vp, indices, counts, block, block, scale=scale)
            return km.scatter_tokens(out, perm)

        return Case(shape, dims, name, config, density, run_permuted, kept)
    ctx = PatternContext(TokenLayout(1, 1, tokens), block, {}, seed)
    config.build(q, k, ctx)  # k-means: the cold start; the runtime warm-starts from the previous step's centroids
    pattern = config.build(q, k, ctx)
    detail: dict[str, Any] = {"max_kept": int(pattern.kv_block_indices.shape[-1])}
    if pattern.is_clustered:
        values = {**AttentionShape(*dims, block_size=block).subs(1), **cluster_values(config, tokens),
                  f.rho: float(pattern.density().mean())}
        detail["tile_pairs_per_head"] = {
            "executed": profile.executed_tile_pairs(pattern.q_offsets, pattern.kv_offsets, pattern.kv_block_indices,
                                                    pattern.kv_block_counts) / (batch * heads),
            "formula": float(f.CLUSTER_TILE_PAIRS.subs(values)),
        }
    return Case(shape, dims, name, config, density, lambda: pattern_attention(q, k, v, config.build(q, k, ctx), scale),
                float(pattern.density().mean()), detail)


def profiled_point(table: EfficiencyTable, case: Case) -> bool:
    """Whether the table has a point of the case's attention kernel at its shape and density (and clusters)."""
    batch, heads, tokens, head_dim = case.dims
    kernel = attention_kernel(case.config)
    extra = cluster_values(case.config, tokens)
    want = {"batch_heads": batch * heads, "tokens": tokens, "head_dim": head_dim}
    if extra:
        want.update(q_cluster_tokens=tokens / extra[f.Cq], kv_cluster_tokens=tokens / extra[f.Ck])
    for point in table.kernels.get(kernel, []):
        shape = point.get("shape", {})
        same_shape = all(k in shape and math.isclose(shape[k], v, rel_tol=1e-6) for k, v in want.items())
        if same_shape and abs((point.get("density") or 1.0) - case.kept) < _SAME_DENSITY:
            return True
    return False


def _load_cost(args: argparse.Namespace, cuda: bool, out: Path) -> tuple[CostModel, dict[str, Any], list[str]]:
    """The cost model to evaluate, the raw table it reads (for its provenance), and the warnings on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if args.profile:
            shapes = SHAPES if not args.smoke else {"smoke": (1, 2, 512, 32)}
            densities = profile.DENSITIES if not args.smoke else (0.07, 0.25)
            configs = profile.CLUSTER_CONFIGS if not args.smoke else ((32, 64), (128, 128))
            raw = profile.run_profile(args.target, "cuda" if cuda else "cpu", shapes, densities, configs,
                                      _timer(cuda), block_size=128 if not args.smoke else 32,
                                      dtype=torch.bfloat16 if cuda else torch.float32,
                                      progress=lambda m: print(f"profiling {m}", flush=True), seed=args.profile_seed)
            path = out / f"efficiency_{args.target}.json"
            path.write_text(json.dumps(raw, indent=1) + "\n")
            spec = json.loads((Path(profile.__file__).parent / "specs.json").read_text())[args.target]
            cost = CostModel.from_spec(args.target, spec, EfficiencyTable.load(path), measured=True)
            raw["path"] = str(path)
        else:
            cost = CostModel.for_target(args.target)
            path = Path(profile.__file__).parent / f"efficiency_{args.target}.json"
            raw = json.loads(path.read_text()) if cost.measured else {}
            raw["path"] = str(path) if cost.measured else None
    return cost, raw, [str(w.message) for w in caught]


def _sample(profiled: bool, same_seed: bool | None) -> str:
    if not profiled:
        return "out of sample: no table point at this shape and density"
    if same_seed:
        return "in sample: a table point at this shape and density, same seed"
    return "same shape and density as a table point, other random data" + (
        "" if same_seed is False else " (the table does not record its seed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="h100")
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent / "results")))
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny shape, reference ops")
    parser.add_argument("--seed", type=int, default=1, help="seed of q/k/v and the masks evaluated (profile: 0)")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds, median kept (default 3; smoke 1)")
    parser.add_argument("--profile", action="store_true",
                        help="profile first (cost_models.profile.run_profile) and evaluate against that table, "
                             "written to OUT/efficiency_<target>.json, instead of the committed one")
    parser.add_argument("--profile-seed", type=int, default=0, help="seed of the --profile run")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("cost_model.py times GPU kernels; run it on a CUDA machine (or --smoke on CPU)")
    if args.profile and args.profile_seed == args.seed:
        raise SystemExit(f"--profile-seed {args.profile_seed} equals --seed: evaluate on other random data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES if not args.smoke else {"smoke": (1, 2, 512, 32)}
    densities = DENSITIES if not args.smoke else (0.1, 0.5)
    repeats = args.repeats or (3 if cuda else 1)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    block = 128 if not args.smoke else 32
    timer = _timer(cuda)
    cost, table_raw, caught = _load_cost(args, cuda, out)
    table_profile = table_raw.get("profile")
    table_seed = table_profile.get("seed") if table_profile else None
    same_seed = None if table_seed is None else table_seed == args.seed

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    cases: list[Case] = []
    for name, (batch, heads, tokens, head_dim) in shapes.items():
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        for strategy in STRATEGIES:
            for density in densities if strategy != "dense" else (1.0,):
                print(f"preparing {name} {strategy} d={density}", flush=True)
                cases.append(make_case(name, strategy, density, q, k, v, block, generator, args.seed))
    for round_ in range(repeats):
        for case in cases:
            case.times.append(timer(case.run))
            if round_ == repeats - 1:
                print(f"{case.shape} {case.strategy} d={case.kept:.3f}: "
                      f"{', '.join(f'{t:.3f}' for t in case.times)} ms", flush=True)

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    records = []
    for case in cases:
        batch, heads, tokens, head_dim = case.dims
        shape = AttentionShape(batch, heads, tokens, head_dim, block_size=block)
        predicted = cost.strategy_cost(case.config, shape, case.kept)
        predicted_ms = 1e3 * (heads * predicted.per_head + sum(predicted.groups.values()))
        measured_ms = statistics.median(case.times)
        in_table = profiled_point(cost.table, case)
        records.append({
            "device": device_name, "target": args.target, "strategy": case.strategy,
            "strategy_config": case.config.label(), "acceptance": case.strategy in ACCEPTANCE, "shape": case.shape,
            "batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim,
            "density": case.kept, "requested_density": case.requested, "predicted_ms": predicted_ms,
            "measured_ms": measured_ms, "measured_rounds_ms": case.times,
            "rel_error": (predicted_ms - measured_ms) / measured_ms,
            "predicted_breakdown_ms": {**{k: 1e3 * heads * s for k, s in predicted.breakdown.items()},
                                       "launches_and_tails": 1e3 * sum(predicted.groups.values())},
            "profiled_point": in_table, "sample": _sample(in_table, same_seed), **case.detail,
        })
    summary: dict[str, Any] = {}
    for strategy in STRATEGIES:
        errors = [abs(r["rel_error"]) for r in records if r["strategy"] == strategy]
        worst = max((r for r in records if r["strategy"] == strategy), key=lambda r: abs(r["rel_error"]))
        summary[strategy] = {"median_abs_rel_error": statistics.median(errors), "worst_abs_rel_error": max(errors),
                             "worst_at": f"{worst['shape']} d={worst['density']:.3f}",
                             "passes": statistics.median(errors) <= 0.15, "acceptance": strategy in ACCEPTANCE}
    accepted = [abs(r["rel_error"]) for r in records if r["acceptance"]]
    summary["all"] = {"median_abs_rel_error": statistics.median(accepted), "worst_abs_rel_error": max(accepted),
                      "passes": all(summary[s]["passes"] for s in ACCEPTANCE)}
    versions = {"torch": torch.__version__}
    if cuda:
        import triton

        versions.update(triton=triton.__version__, cuda=str(torch.version.cuda))
    result = {
        "benchmark": "cost_model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "cost_model": cost.table.source if cost.measured else f"defaults ({cost.defaults.source})",
        "efficiency_table": {"path": table_raw.get("path"), "date": table_raw.get("date"),
                             "formulas_version": table_raw.get("formulas_version", 1 if table_raw else None),
                             "profile": table_profile or "not recorded by the table"},
        "evaluation": {"seed": args.seed, "densities": list(densities), "shapes": {n: list(s) for n, s in shapes.items()},
                       "repeats": repeats, "block_size": block,
                       "note": "pooled/kmeans keep what top_p = density keeps on random data; predictions use the "
                               "kept density"},
        "warnings": caught,
        "timing": (f"triton.testing.do_bench median, warmup 25 ms, rep 100 ms; median of {repeats} rounds" if cuda
                   else "wall clock (smoke)"),
        "acceptance": "median abs rel error <= 0.15 per strategy (" + ", ".join(ACCEPTANCE) + ")",
        "summary": summary,
        "records": records,
    }
    (out / "cost_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
