"""Latency prediction on a target GPU: roofline of the spec (compute, device memory, L2) / measured efficiency.

For a kernel of ``flops`` FLOPs, ``hbm`` compulsory bytes and ``traffic`` bytes loaded into the cores::

    ideal = max(flops / peak, hbm / memory_bandwidth, traffic / l2_bandwidth)
    predicted = ideal / efficiency(kernel, shape, density) + launches * launch_overhead

Efficiencies come from ``efficiency_<target>.json`` (written by ``vdopt-search profile`` on that GPU); kernel kinds
a target's table lacks, kinds whose formula changed since the table was written (``formulas.KERNEL_REVISIONS``),
and targets with no table, use ``default_efficiency.json`` (derived from H100 measurements, see its ``sources``)
with a warning. A fused launch runs every head of a site that shares a kernel: its launch and its tail (half a
program's time, on average, while the last wave drains) are paid once per group, not per head.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import sympy as sp
from vdopt.cost_models import formulas as f

from vdopt.strategies import Dense, SemanticKMeans, Strategy

_HERE = Path(__file__).parent
DEFAULT_TABLE = _HERE / "default_efficiency.json"


def available_targets() -> list[str]:
    return sorted(k for k in json.loads((_HERE / "specs.json").read_text()) if not k.startswith("_"))


@dataclass(frozen=True)
class AttentionShape:
    """Shape of one attention call: ``batch`` x ``heads`` x (``tokens`` video + ``text_tokens``) x ``head_dim``."""

    batch: int
    heads: int
    tokens: int
    head_dim: int
    text_tokens: int = 0
    block_size: int = 128
    element_bytes: int = 2
    cluster_tile: tuple[int, int] = f.CLUSTER_TILE

    def subs(self, heads: int | None = None) -> dict[sp.Symbol, float]:
        """Symbol values for the formulas (``heads`` overrides the head count, e.g. 1 for a per-head share)."""
        return {f.B: self.batch, f.H: self.heads if heads is None else heads, f.N: self.tokens,
                f.T: self.text_tokens, f.D: self.head_dim, f.S: self.block_size, f.E: self.element_bytes,
                f.Sq: self.cluster_tile[0], f.Sk: self.cluster_tile[1]}


@cache
def _lambda(kernel: str, part: str) -> Any:
    return sp.lambdify(f.SYMBOLS, getattr(f.KERNELS[kernel], part), "math")


@cache
def _program_lambda(kernel: str) -> Any:
    return sp.lambdify(f.SYMBOLS, f.program_flops(kernel), "math")


def _evaluate(fn: Any, values: dict[sp.Symbol, float]) -> float:
    return float(fn(*(values.get(s, 1) for s in f.SYMBOLS)))


def strategy_kind(strategy: Strategy) -> str:
    """Which overhead family a strategy belongs to (see :func:`formulas.overhead_kernels`)."""
    if isinstance(strategy, SemanticKMeans):
        return "kmeans"
    if strategy.dynamic:
        return "pooled"
    return "permuted" if strategy.name in ("temporal", "tile3d") else "static"


def attention_kernel(strategy: Strategy) -> str:
    if isinstance(strategy, Dense):
        return "dense"
    return "cluster_sparse" if isinstance(strategy, SemanticKMeans) else "block_sparse"


def cluster_values(strategy: Strategy, tokens: int) -> dict[sp.Symbol, float]:
    """``Cq``/``Ck`` of a k-means strategy at ``tokens`` video tokens (no more clusters than tokens); else empty."""
    if not isinstance(strategy, SemanticKMeans):
        return {}
    return {f.Cq: min(strategy.q_clusters, tokens), f.Ck: min(strategy.kv_clusters, tokens)}


def efficiency_key(batch_heads: int, tokens: int, head_dim: int,
                   values: dict[sp.Symbol, float] | None = None) -> dict[str, float]:
    """The shape an efficiency is looked up (and profiled) at: batch*heads, tokens, head dim and, where the kernel
    has clusters, ``clusters`` (``C``, else ``Ck``) and the mean query/key cluster sizes in tokens."""
    key: dict[str, float] = {"batch_heads": batch_heads, "tokens": tokens, "head_dim": head_dim}
    values = values or {}
    clusters = values.get(f.C, values.get(f.Ck))
    if clusters is not None:
        key["clusters"] = clusters
    if f.Cq in values and f.Ck in values:
        key["q_cluster_tokens"] = tokens / values[f.Cq]
        key["kv_cluster_tokens"] = tokens / values[f.Ck]
    return key


@dataclass(frozen=True)
class EfficiencyTable:
    """Measured efficiency (ideal roofline time / measured time) per kernel kind, at measured shapes and densities.

    Lookup: the measured shape nearest in log space (the keys of :func:`efficiency_key` both sides have: batch*heads,
    tokens, head_dim, clusters, mean cluster sizes), then linear in density between that shape's points (clamped
    at the ends).
    """

    kernels: dict[str, list[dict[str, Any]]]
    source: str

    @classmethod
    def load(cls, path: Path) -> EfficiencyTable:
        """Read a table; kernel kinds whose formula changed after the table's ``formulas_version`` (1 if absent)
        are dropped with a warning, so their lookups fall back to the defaults."""
        data = json.loads(path.read_text())
        kernels = data.get("kernels")
        if not isinstance(kernels, dict):
            raise TypeError(f"{path}: field 'kernels' must map kernel kinds to lists of points; run vdopt-search profile again")
        for kind, points in kernels.items():
            for i, point in enumerate(points):
                eff = point.get("efficiency")
                if not isinstance(eff, (int, float)) or not 0 < eff <= 1.5:
                    raise ValueError(f"{path}: kernels.{kind}[{i}].efficiency must be in (0, 1.5], got {eff!r}")
        version = data.get("formulas_version", 1)
        stale = sorted(k for k, revision in f.KERNEL_REVISIONS.items() if revision > version and kernels.get(k))
        if stale:
            warnings.warn(
                f"{path}: efficiencies of {', '.join(stale)} were measured against cost formulas version {version}, "
                f"and these formulas are version {f.VERSION}; they are ignored (default efficiencies used instead). "
                f"Run `vdopt-search profile --target {data.get('target', '<target>')}` again to measure them",
                stacklevel=2,
            )
            kernels = {k: v for k, v in kernels.items() if k not in stale}
        return cls(kernels, str(data.get("device", path.name)))

    def lookup(self, kernel: str, shape: dict[str, float], density: float | None) -> float | None:
        points = self.kernels.get(kernel)
        if not points:
            return None

        def distance(point: dict[str, Any]) -> float:
            keys = [k for k in shape if k in point.get("shape", {})]
            return sum(abs(math.log2(max(point["shape"][k], 1e-9) / max(shape[k], 1e-9))) for k in keys)

        best = min(distance(p) for p in points)
        group = [p for p in points if distance(p) <= best + 1e-9]
        with_density = sorted((p["density"], p["efficiency"]) for p in group if p.get("density") is not None)
        if density is None or len(with_density) < 2:
            return sum(p["efficiency"] for p in group) / len(group)
        xs = [d for d, _ in with_density]
        if density <= xs[0]:
            return with_density[0][1]
        if density >= xs[-1]:
            return with_density[-1][1]
        for (d0, e0), (d1, e1) in itertools.pairwise(with_density):
            if d0 <= density <= d1:
                return e0 if d1 == d0 else e0 + (e1 - e0) * (density - d0) / (d1 - d0)
        return with_density[-1][1]


@dataclass(frozen=True)
class StrategyCost:
    """Predicted time of one strategy at a site: per-head seconds, plus fixed seconds per fused group it joins.

    ``groups`` maps a group key (kernel kind, or overhead kernel with its parameters) to the seconds that group
    costs once however many heads share it: its launches and the attention kernel's tail.
    """

    per_head: float
    groups: dict[str, float] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CostModel:
    """Predicts attention latency (seconds) of strategies at a shape on ``target``."""

    target: str
    bf16_tflops: float
    memory_tbs: float
    l2_tbs: float
    sms: int
    launch_us: float
    table: EfficiencyTable
    defaults: EfficiencyTable
    measured: bool

    @classmethod
    def for_target(cls, target: str) -> CostModel:
        specs = json.loads((_HERE / "specs.json").read_text())
        if target not in specs or target.startswith("_"):
            raise ValueError(f"unknown target {target!r}; known targets: {', '.join(available_targets())}")
        defaults = EfficiencyTable.load(DEFAULT_TABLE)
        path = _HERE / f"efficiency_{target}.json"
        if path.is_file():
            table, measured = EfficiencyTable.load(path), True
        else:
            warnings.warn(
                f"no measured efficiency table for target {target!r} (cost_models/efficiency_{target}.json): "
                f"predictions use its spec peaks times default efficiencies measured on {defaults.source}; "
                f"run `vdopt-search profile --target {target}` on that GPU to measure them",
                stacklevel=2,
            )
            table, measured = defaults, False
        return cls.from_spec(target, specs[target], table, defaults, measured)

    @classmethod
    def from_spec(cls, target: str, spec: dict[str, float], table: EfficiencyTable | None = None,
                  defaults: EfficiencyTable | None = None, measured: bool = False) -> CostModel:
        """A model from a spec dict (``bf16_tflops``, ``memory_tbs``, ``l2_tbs``, ``sms``, ``launch_us``)."""
        if defaults is None:
            defaults = EfficiencyTable.load(DEFAULT_TABLE) if DEFAULT_TABLE.is_file() else EfficiencyTable({}, "none")
        return cls(target, float(spec["bf16_tflops"]), float(spec["memory_tbs"]), float(spec["l2_tbs"]),
                   int(spec["sms"]), float(spec["launch_us"]), table or defaults, defaults, measured)

    # -- one kernel ---------------------------------------------------------------------------------------------

    def ideal_seconds(self, kernel: str, values: dict[sp.Symbol, float]) -> float:
        """Roofline time at 100% efficiency: the slowest of compute, device memory and L2 traffic."""
        flops = _evaluate(_lambda(kernel, "flops"), values)
        hbm = _evaluate(_lambda(kernel, "hbm_bytes"), values)
        traffic = _evaluate(_lambda(kernel, "traffic_bytes"), values)
        return max(flops / (self.bf16_tflops * 1e12), hbm / (self.memory_tbs * 1e12), traffic / (self.l2_tbs * 1e12))

    def efficiency(self, kernel: str, shape: AttentionShape, density: float | None,
                   values: dict[sp.Symbol, float] | None = None) -> float:
        key = efficiency_key(shape.batch * shape.heads, shape.tokens, shape.head_dim, values)
        found = self.table.lookup(kernel, key, density)
        if found is None:
            found = self.defaults.lookup(kernel, key, density)
        if found is None:
            raise KeyError(f"no efficiency for kernel kind {kernel!r} in {self.table.source} or the defaults")
        return found

    def kernel_seconds(self, kernel: str, shape: AttentionShape, density: float | None = None,
                       heads: int | None = None, extra: dict[sp.Symbol, float] | None = None) -> float:
        """Predicted time of ``kernel`` over ``heads`` heads (default: all of ``shape``), launch excluded."""
        values = {**shape.subs(heads), f.rho: max(density or 1.0, 1e-6), **(extra or {})}
        return self.ideal_seconds(kernel, values) / self.efficiency(kernel, shape, density, extra)

    def tail_seconds(self, kernel: str, shape: AttentionShape, density: float,
                     extra: dict[sp.Symbol, float] | None = None) -> float:
        """Expected idle time of a launch's last wave: half of one program's time on one SM."""
        values = {**shape.subs(1), f.rho: max(density, 1e-6), **(extra or {})}
        per_sm = self.bf16_tflops * 1e12 / self.sms * self.efficiency(kernel, shape, density, extra)
        return 0.5 * _evaluate(_program_lambda(kernel), values) / per_sm

    # -- one strategy ---------------------------------------------------------------------------------------------

    def strategy_cost(self, strategy: Strategy, shape: AttentionShape, density: float,
                      tail_density: float | None = None) -> StrategyCost:
        """Per-head seconds and fused-group fixed seconds of ``strategy`` at kept ``density``.

        ``tail_density``: the density the group's tail is priced at (default ``density``); the search passes one
        value per kernel kind and site so that the fixed cost of a group does not depend on who joins it.
        """
        launch = self.launch_us * 1e-6
        kernel = attention_kernel(strategy)
        if kernel == "dense":
            per_head = self.kernel_seconds("dense", shape, 1.0, heads=1)
            tail = self.tail_seconds("dense", shape, 1.0)
            return StrategyCost(per_head, {"kernel:dense": launch + tail}, {"dense": per_head})
        extra = cluster_values(strategy, shape.tokens)
        breakdown = {kernel: self.kernel_seconds(kernel, shape, density, heads=1, extra=extra)}
        tail = self.tail_seconds(kernel, shape, density if tail_density is None else tail_density, extra)
        group = f"kernel:{kernel}" if not extra else f"kernel:{kernel}:{strategy.q_clusters},{strategy.kv_clusters}"
        groups = {group: f.ATTENTION_LAUNCHES[kernel] * launch + tail}
        if shape.text_tokens:
            breakdown["text"] = self.kernel_seconds("text", shape, None, heads=1)
            groups["kernel:text"] = 2 * launch
        kind = strategy_kind(strategy)
        iterations = strategy.iterations if isinstance(strategy, SemanticKMeans) else 0
        for overhead, launches, subs in f.overhead_kernels(kind, iterations):
            values = {**extra, **{k: float(v.subs(extra)) if isinstance(v, sp.Expr) else v for k, v in subs.items()}}
            seconds = launches * self.kernel_seconds(overhead, shape, None, heads=1, extra=values)
            breakdown[overhead] = breakdown.get(overhead, 0.0) + seconds
            group = f"{overhead}:{kind}" if kind != "kmeans" else f"{overhead}:{strategy.q_clusters},{strategy.kv_clusters},{iterations}"
            groups[group] = groups.get(group, 0.0) + launches * launch
        return StrategyCost(sum(breakdown.values()), groups, breakdown)

    def attention_seconds(
        self, batch: int, heads: int, tokens: int, head_dim: int, strategy: Strategy, density: float,
        block_size: int = 128, element_bytes: int = 2, text_tokens: int = 0,
    ) -> float:
        """Predicted time of ``heads`` heads all running ``strategy`` at kept ``density``, in one fused launch."""
        shape = AttentionShape(batch, heads, tokens, head_dim, text_tokens, block_size, element_bytes)
        cost = self.strategy_cost(strategy, shape, density)
        return heads * cost.per_head + sum(cost.groups.values())
