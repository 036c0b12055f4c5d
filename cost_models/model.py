"""Latency prediction of attention strategies on a target GPU: roofline of the spec times measured efficiency."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import sympy as sp
from vdopt.cost_models import formulas as f

from vdopt.strategies import Dense, SemanticKMeans, Strategy

_HERE = Path(__file__).parent
#: Fraction of peak a kernel reaches when no measured table exists (DESIGN.md: cuDNN dense ~590-630 TFLOP/s and
#: a TMA Triton block-sparse forward ~526 on kept blocks, against 989 peak on H100).
DEFAULT_EFFICIENCY = {"dense": 0.62, "sparse": 0.53, "overhead": 0.10}


def available_targets() -> list[str]:
    return sorted(k for k in json.loads((_HERE / "specs.json").read_text()) if not k.startswith("_"))


@cache
def _lambdas() -> dict[str, object]:
    args = (f.B, f.H, f.N, f.D, f.rho, f.S, f.Cq, f.Ck, f.I, f.E)
    out = {
        "dense_flops": f.DENSE_FLOPS, "dense_bytes": f.DENSE_BYTES,
        "sparse_flops": f.SPARSE_FLOPS, "sparse_bytes": f.SPARSE_BYTES,
    }
    for kind in f.OVERHEAD_FLOPS:
        out[f"{kind}_flops"] = f.OVERHEAD_FLOPS[kind]
        out[f"{kind}_bytes"] = f.OVERHEAD_BYTES[kind]
        out[f"{kind}_launches"] = f.OVERHEAD_LAUNCHES[kind]
    return {name: sp.lambdify(args, expr, "math") for name, expr in out.items()}


def overhead_kind(strategy: Strategy) -> str:
    if isinstance(strategy, SemanticKMeans):
        return "kmeans"
    return "pooled" if strategy.dynamic else "static"


@dataclass(frozen=True)
class CostModel:
    """Predicts attention latency (seconds) of a strategy at a shape on ``target``."""

    target: str
    bf16_tflops: float
    memory_tbs: float
    launch_us: float
    efficiency: dict[str, float]
    measured: bool

    @classmethod
    def for_target(cls, target: str) -> CostModel:
        specs = json.loads((_HERE / "specs.json").read_text())
        if target not in specs or target.startswith("_"):
            raise ValueError(f"unknown target {target!r}; known targets: {', '.join(available_targets())}")
        spec = specs[target]
        table = _HERE / f"efficiency_{target}.json"
        if table.is_file():
            efficiency = {**DEFAULT_EFFICIENCY, **json.loads(table.read_text())["efficiency"]}
            measured = True
        else:
            warnings.warn(
                f"no measured efficiency table for target {target!r} (cost_models/efficiency_{target}.json): "
                "predictions use its datasheet peaks times default efficiencies",
                stacklevel=2,
            )
            efficiency, measured = dict(DEFAULT_EFFICIENCY), False
        return cls(target, spec["bf16_tflops"], spec["memory_tbs"], spec["launch_us"], efficiency, measured)

    def _roofline(self, flops: float, nbytes: float, efficiency: float) -> float:
        return max(flops / (self.bf16_tflops * 1e12 * efficiency), nbytes / (self.memory_tbs * 1e12))

    def attention_seconds(
        self, batch: int, heads: int, tokens: int, head_dim: int, strategy: Strategy, density: float,
        block_size: int = 128, element_bytes: int = 2,
    ) -> float:
        """Predicted time of ``heads`` heads running ``strategy`` at kept ``density``, including its overheads."""
        fns = _lambdas()
        clusters = (strategy.q_clusters, strategy.kv_clusters, strategy.iterations) if isinstance(strategy, SemanticKMeans) else (1, 1, 1)
        args = (batch, heads, tokens, head_dim, max(density, 1e-6), block_size, *clusters, element_bytes)
        if isinstance(strategy, Dense):
            return self._roofline(fns["dense_flops"](*args), fns["dense_bytes"](*args), self.efficiency["dense"]) + self.launch_us * 1e-6
        kind = overhead_kind(strategy)
        attention = self._roofline(fns["sparse_flops"](*args), fns["sparse_bytes"](*args), self.efficiency["sparse"])
        overhead = self._roofline(fns[f"{kind}_flops"](*args), fns[f"{kind}_bytes"](*args), self.efficiency["overhead"])
        return attention + overhead + fns[f"{kind}_launches"](*args) * self.launch_us * 1e-6
