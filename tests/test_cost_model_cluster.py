"""Cost model of the cluster kernel (padded tiles), the k-means and pooled overhead counts, stale tables, and the
in/out-of-sample bookkeeping of benchmarks/cost_model.py (CPU)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import sympy as sp
import torch
from vdopt.cost_models import formulas as f
from vdopt.cost_models import model as cost_model
from vdopt.cost_models.model import AttentionShape, CostModel, EfficiencyTable
from vdopt.cost_models.profile import executed_tile_pairs, random_clusters

from vdopt.strategies import PooledTopP, SemanticKMeans, SpatialWindow

ROOT = Path(__file__).parent.parent


def _tiles(n: float, cq: float, ck: float, rho: float = 1.0, tile: tuple[int, int] = (128, 64)) -> float:
    return float(f.CLUSTER_TILE_PAIRS.subs({f.N: n, f.Cq: cq, f.Ck: ck, f.rho: rho, f.Sq: tile[0], f.Sk: tile[1]}))


def test_cluster_tile_matches_the_kernels_default_config() -> None:
    from vdopt.kernels.cluster_sparse_attention import DEFAULT_CONFIG

    assert f.CLUSTER_TILE == DEFAULT_CONFIG[:2]
    assert AttentionShape(1, 1, 64, 64).cluster_tile == f.CLUSTER_TILE


def test_executed_tile_pairs_counts_whole_tiles_by_hand() -> None:
    # Query clusters of 100, 256, 256 tokens -> 1, 2, 2 tiles of 128 rows; key clusters of 64, 1, 135, 412 tokens
    # -> 1, 1, 3, 7 tiles of 64 rows. Query cluster 0 keeps key clusters {1, 3}: 1 x (1 + 7) = 8 tile pairs;
    # cluster 1 keeps {0}: 2 x 1 = 2; cluster 2 keeps all four: 2 x 12 = 24. Total 34.
    q_offsets = torch.tensor([[[0, 100, 356, 612]]], dtype=torch.int32)
    kv_offsets = torch.tensor([[[0, 64, 65, 200, 612]]], dtype=torch.int32)
    indices = torch.tensor([[[[1, 3, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3]]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 1, 4]]], dtype=torch.int32)
    assert executed_tile_pairs(q_offsets, kv_offsets, indices, counts, (128, 64)) == 34
    # The same lists at 64 x 64 tiles: query tiles 2, 4, 4 -> 2 x 8 + 4 x 1 + 4 x 12 = 68.
    assert executed_tile_pairs(q_offsets, kv_offsets, indices, counts, (64, 64)) == 68


def test_cluster_formula_by_hand() -> None:
    # N = 4096 in 16 query clusters of 256 tokens: 4096/128 + 16/2 = 40 query tiles; 32 key clusters of 128 tokens:
    # 4096/64 + 32/2 = 80 key tiles; at rho = 1/4, 800 tile pairs of 128 x 64 rows.
    assert _tiles(4096, 16, 32, 0.25) == 800
    values = {f.B: 1, f.H: 2, f.N: 4096, f.D: 64, f.rho: sp.Rational(1, 4), f.Cq: 16, f.Ck: 32, f.Sq: 128, f.Sk: 64,
              f.E: 2}
    assert f.KERNELS["cluster_sparse"].flops.subs(values) == 4 * 2 * 64 * 128 * 64 * 800
    # Traffic: Q tiles 2*40*128*64*2; K, V per tile pair 2*2*800*64*64*2; O 2*4096*64*2; LSE 4*2*4096.
    expected = 2 * 40 * 128 * 64 * 2 + 2 * 2 * 800 * 64 * 64 * 2 + 2 * 4096 * 64 * 2 + 4 * 2 * 4096
    assert f.KERNELS["cluster_sparse"].traffic_bytes.subs(values) == expected
    # Clusters of at most half a tile take one tile each: 64 query clusters of 64 tokens -> 64 tiles; 256 key
    # clusters of 16 tokens -> 256 tiles (where N / Sk + Ck / 2 would say 192).
    assert _tiles(4096, 64, 256) == 64 * 256
    # Tail unit: one query tile against rho of the key tiles.
    assert f.program_flops("cluster_sparse").subs(values) == 4 * 128 * 64 * 64 * sp.Rational(1, 4) * 80


@pytest.mark.parametrize(("tokens", "q_clusters", "kv_clusters", "density"),
                         [(32760, 32, 64, 0.1), (32760, 64, 128, 0.3), (32760, 255, 255, 0.2), (8192, 16, 64, 0.5)])
def test_cluster_formula_matches_counted_tiles_on_random_clusters(tokens: int, q_clusters: int, kv_clusters: int,
                                                                   density: float) -> None:
    """Cluster sizes uniform in [m/2, 3m/2] (the profiler's): the expected-tile formula within 2% of the count."""
    generator = torch.Generator().manual_seed(tokens + q_clusters)
    q_off, kv_off, indices, counts, kept = random_clusters(1, 8, tokens, q_clusters, kv_clusters, density, generator,
                                                           "cpu")
    counted = executed_tile_pairs(q_off, kv_off, indices, counts) / 8
    assert _tiles(tokens, q_clusters, kv_clusters, kept) == pytest.approx(counted, rel=0.02)


def test_tile_waste_is_monotone_and_vanishes_for_large_clusters() -> None:
    n = 32760
    useful = n * n / (128 * 64)  # tile pairs of a tile-aligned dense map
    waste = [_tiles(n, c, c) / useful for c in (16, 32, 64, 128, 256, 512)]
    assert all(1.0 < a < b for a, b in itertools.pairwise(waste))
    # 16 clusters of ~2048 tokens: half a tile wasted per cluster, (1 + 16*128/2N)(1 + 16*64/2N) ~ 1.047;
    # 256 clusters of ~128 tokens: 1.5 query tiles and 2.5 key tiles where 1 and 2 would do, 1.5 x 1.25.
    assert waste[0] == pytest.approx((1 + 16 * 128 / (2 * n)) * (1 + 16 * 64 / (2 * n)), rel=1e-9)
    assert waste[4] == pytest.approx(1.5 * 1.25, rel=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cost = CostModel.for_target("h100")
    shape = AttentionShape(1, 12, n, 128)
    small, large = SemanticKMeans(q_clusters=256, kv_clusters=256), SemanticKMeans(q_clusters=32, kv_clusters=64)
    times = [cost.kernel_seconds("cluster_sparse", shape, d, heads=1, extra=cost_model.cluster_values(large, n))
             for d in (0.05, 0.1, 0.2, 0.5)]
    assert all(a < b for a, b in itertools.pairwise(times))
    for d in (0.05, 0.2, 0.5):
        per_head = {s: cost.strategy_cost(s, shape, d).breakdown["cluster_sparse"] for s in (small, large)}
        assert per_head[small] > 1.4 * per_head[large]  # 1.875 vs 1.13 tile waste, same measured tile rate
        block = cost.strategy_cost(SpatialWindow(0), shape, d).breakdown["block_sparse"]
        # the same tiles, a little waste: near the block kernel (0.79 at d=0.05 on the 2026-11-25 H100 table)
        assert 0.7 < per_head[large] / block < 1.6


def test_kmeans_and_pooled_overhead_counts() -> None:
    kmeans = f.overhead_kernels("kmeans", 2)
    counts: dict[str, int] = {}
    for kernel, launches, _ in kmeans:
        counts[kernel] = counts.get(kernel, 0) + launches
    # Per tensor (q, k): 2 assignments, 2 updates (each sorting its labels inside), 1 sort for the permutation;
    # then the cluster selection and the Q, K, V gathers (the cluster kernel scatters out and lse as it stores).
    assert counts == {"kmeans_assign": 4, "kmeans_update": 4, "label_sort": 2, "cluster_select": 1, "gather": 3}
    assert all(not subs for kernel, _, subs in kmeans if kernel == "gather")
    assert f.overhead_kernels("pooled", 0) == [("pool_means", 2, {}), ("block_select", 1, {})]


def test_cluster_kernel_launch_and_group_cost() -> None:
    spec = {"bf16_tflops": 100.0, "memory_tbs": 1.0, "l2_tbs": 2.0, "sms": 10, "launch_us": 5.0}
    point = {"shape": {"batch_heads": 2, "tokens": 4096, "head_dim": 64}, "density": None, "efficiency": 0.5}
    table = EfficiencyTable({k: [point] for k in f.KERNELS}, "hand")
    cost = CostModel.from_spec("hand", spec, table, table)
    shape = AttentionShape(1, 2, 4096, 64, block_size=128)
    strategy = SemanticKMeans(q_clusters=16, kv_clusters=32)
    c = cost.strategy_cost(strategy, shape, 0.25)
    # Compute-bound: 4*64*128*64*800 FLOPs per head at 100 TFLOP/s x 0.5.
    assert c.breakdown["cluster_sparse"] == pytest.approx(4 * 64 * 128 * 64 * 800 / 50e12, rel=1e-12)
    tail = 0.5 * 4 * 128 * 64 * 64 * 0.25 * 80 / (100e12 / 10 * 0.5)
    assert c.groups["kernel:cluster_sparse:16,32"] == pytest.approx(2 * 5e-6 + tail, rel=1e-12)


def test_stale_table_kinds_fall_back_to_defaults_with_a_warning(tmp_path, monkeypatch) -> None:
    defaults = json.loads(cost_model.DEFAULT_TABLE.read_text())
    stale = {**defaults, "formulas_version": 1, "device": "stale GPU"}
    stale["kernels"] = {k: [{**p, "efficiency": 0.01} for p in v] for k, v in defaults["kernels"].items()}
    shutil.copy(cost_model._HERE / "specs.json", tmp_path / "specs.json")
    (tmp_path / "efficiency_a100.json").write_text(json.dumps(stale))
    monkeypatch.setattr(cost_model, "_HERE", tmp_path)
    with pytest.warns(UserWarning, match=r"block_select, cluster_sparse were measured against cost formulas version 1"):
        cost = CostModel.for_target("a100")
    shape = AttentionShape(1, 12, 32760, 128)
    clusters = {f.Cq: 32, f.Ck: 64}
    key = cost_model.efficiency_key(12, 32760, 128, clusters)
    assert cost.efficiency("cluster_sparse", shape, 0.2, clusters) == cost.defaults.lookup("cluster_sparse", key, 0.2)
    plain = cost_model.efficiency_key(12, 32760, 128)
    assert cost.efficiency("block_select", shape, None) == cost.defaults.lookup("block_select", plain, None)
    assert cost.efficiency("gather", shape, None) == 0.01  # unchanged formula: the stale table's own value


def test_committed_tables_are_current() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost = CostModel.for_target("h100")
    assert cost.measured
    for path in (cost_model.DEFAULT_TABLE, cost_model._HERE / "efficiency_h100.json"):
        data = json.loads(path.read_text())
        assert data["formulas_version"] == f.VERSION
        assert set(data["kernels"]) <= set(f.KERNELS)
        for point in data["kernels"]["cluster_sparse"]:
            assert {"q_cluster_tokens", "kv_cluster_tokens"} <= set(point["shape"])


def test_efficiency_lookup_keys_on_mean_cluster_size() -> None:
    def point(q_tokens: float, efficiency: float) -> dict:
        shape = {"batch_heads": 12, "tokens": 32760, "head_dim": 128, "q_cluster_tokens": q_tokens,
                 "kv_cluster_tokens": q_tokens / 2}
        return {"shape": shape, "density": 0.1, "efficiency": efficiency}

    table = EfficiencyTable({"cluster_sparse": [point(1024, 0.7), point(128, 0.6)]}, "hand")
    cost = CostModel.from_spec("hand", {"bf16_tflops": 1, "memory_tbs": 1, "l2_tbs": 1, "sms": 1, "launch_us": 1},
                               table, table)
    shape = AttentionShape(1, 12, 32760, 128)
    assert cost.efficiency("cluster_sparse", shape, 0.1, {f.Cq: 32, f.Ck: 64}) == 0.7
    assert cost.efficiency("cluster_sparse", shape, 0.1, {f.Cq: 256, f.Ck: 512}) == 0.6


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("cost_model_benchmark", ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_benchmark_cases_run_and_say_whether_they_are_in_sample() -> None:
    bench = _benchmark_module()
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    generator = torch.Generator().manual_seed(1)
    cases = {name: bench.make_case("tiny", name, 0.25, q, k, v, 32, generator, 1) for name in bench.STRATEGIES}
    for case in cases.values():
        out = case.run()
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == q.shape and torch.isfinite(out).all()
        assert 0 < case.kept <= 1
    assert cases["static"].kept == pytest.approx(2 / 8)  # round(0.25 * 8 blocks) of 32 tokens
    tiles = cases["kmeans"].detail["tile_pairs_per_head"]
    assert tiles["executed"] > 0 and tiles["formula"] > 0
    block = {"shape": {"batch_heads": 2, "tokens": 256, "head_dim": 32}, "density": cases["static"].kept,
             "efficiency": 0.5}
    cluster = {"shape": {"batch_heads": 2, "tokens": 256, "head_dim": 32, "q_cluster_tokens": 8,
                         "kv_cluster_tokens": 4}, "density": cases["kmeans"].kept, "efficiency": 0.5}
    table = EfficiencyTable({"block_sparse": [block], "cluster_sparse": [cluster]}, "hand")
    assert bench.profiled_point(table, cases["static"]) and bench.profiled_point(table, cases["kmeans"])
    assert not bench.profiled_point(table, cases["kmeans_c256"])  # other cluster sizes
    other = EfficiencyTable({"block_sparse": [{**block, "density": 0.5}]}, "hand")
    assert not bench.profiled_point(other, cases["static"]) and not bench.profiled_point(other, cases["pooled"])
    assert bench._sample(False, False).startswith("out of sample")
    assert bench._sample(True, True).startswith("in sample")
    assert "other random data" in bench._sample(True, False)
    assert isinstance(cases["pooled"].config, PooledTopP) and math.isclose(cases["pooled"].config.top_p, 0.25)
