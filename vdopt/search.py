"""Search, first version: per site, step range and head, the cheapest candidate that meets the recall budget.

Step ranges come from the calibration times (one range per distinct time, split at midpoints); a head with no
candidate meeting the budget at a time stays dense there, which is how dense warm-up steps arise from the data.
``min_dense_warmup`` forces dense attention for ``t`` above ``1 - min_dense_warmup`` regardless.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from vdopt.calibrate import CalibrationResult, SiteStats
from vdopt.cost_models.model import CostModel
from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepRange
from vdopt.sites import AttentionSite
from vdopt.strategies import Dense, Strategy


@dataclass(frozen=True)
class SearchConfig:
    """Quality budget and search options.

    ``recall_budget``: attention mass every sparse head must keep at every calibration sample (the minimum over
    samples, not the mean, so the budget holds on unseen inputs); ``min_dense_warmup``: fraction of the noisiest
    denoising time kept dense whatever the data says; ``batch``: batch size the cost model assumes (2 for CFG).
    """

    recall_budget: float = 0.95
    min_dense_warmup: float = 0.0
    batch: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.recall_budget <= 1.0:
            raise ValueError(f"recall_budget must be in (0, 1], got {self.recall_budget}")
        if not 0.0 <= self.min_dense_warmup <= 1.0:
            raise ValueError(f"min_dense_warmup must be in [0, 1], got {self.min_dense_warmup}")


@dataclass
class HeadChoice:
    strategy: Strategy
    recall: float
    rel_error: float
    density: float
    seconds: float


def _ranges(times: list[float]) -> list[tuple[float, float, float]]:
    """(t_start, t_end, representative t) per distinct calibration time, noisiest first, covering [0, 1]."""
    ordered = sorted(set(times), reverse=True)
    bounds = [1.0] + [(a + b) / 2 for a, b in itertools.pairwise(ordered)] + [0.0]
    return [(max(bounds[i], ordered[i]), bounds[i + 1], ordered[i]) for i in range(len(ordered))]


def _choose_heads(stats: SiteStats, candidates: dict[str, Strategy], t: float, cost: CostModel, config: SearchConfig,
                  force_dense: bool) -> list[HeadChoice]:
    site = stats.site
    samples = [i for i, ti in enumerate(stats.times) if abs(ti - t) < 1e-6]
    tokens = site.layout.video_tokens  # type: ignore[union-attr]

    def seconds(strategy: Strategy, density: float) -> float:
        return cost.attention_seconds(config.batch, 1, tokens, site.head_dim, strategy, density, stats.block_size)

    choices = []
    for head in range(site.heads):
        best = HeadChoice(Dense(), 1.0, 0.0, 1.0, seconds(Dense(), 1.0))
        if not force_dense:
            for label, strategy in candidates.items():
                recall = min(stats.recall[label][i][head] for i in samples)
                if recall < config.recall_budget:
                    continue
                density = max(stats.density[label][i][head] for i in samples)
                time = seconds(strategy, density)
                if time < best.seconds:
                    error = max(stats.rel_error[label][i][head] for i in samples)
                    best = HeadChoice(strategy, recall, error, density, time)
        choices.append(best)
    return choices


def _site_error(choices: list[HeadChoice], norms: list[float]) -> float:
    """Relative error of the whole site's output: heads' errors weighted by their output norms."""
    num = sum((c.rel_error * n) ** 2 for c, n in zip(choices, norms))
    den = sum(n**2 for n in norms)
    return math.sqrt(num / den) if den > 0 else 0.0


def search(model: nn.Module, calibration: CalibrationResult, sites: list[AttentionSite], target: str = "h100",
           config: SearchConfig = SearchConfig()) -> Plan:
    """Choose a strategy per head, step range and site; returns the plan with its predictions."""
    cost = CostModel.for_target(target)
    site_plans: list[SitePlan] = []
    dense_total = chosen_total = 0.0
    errors: list[float] = []
    densities: list[float] = []
    min_recall = 1.0
    for stats in calibration.sites.values():
        schedule: list[StepRange] = []
        for t_start, t_end, t in _ranges(stats.times):
            force = t_start > 1.0 - config.min_dense_warmup + 1e-9 and config.min_dense_warmup > 0
            choices = _choose_heads(stats, calibration.candidates, t, cost, config, force)
            samples = [i for i, ti in enumerate(stats.times) if abs(ti - t) < 1e-6]
            norms = [sum(stats.dense_output_norm[i][h] for i in samples) / len(samples) for h in range(stats.site.heads)]
            dense_s = sum(cost.attention_seconds(config.batch, 1, stats.site.layout.video_tokens, stats.site.head_dim,
                                                 Dense(), 1.0, stats.block_size) for _ in choices)
            chosen_s = sum(c.seconds for c in choices)
            width = t_start - t_end
            dense_total += dense_s * width
            chosen_total += chosen_s * width
            error = _site_error(choices, norms)
            density = sum(c.density for c in choices) / len(choices)
            errors.append(error)
            densities.append(density * width)
            min_recall = min(min_recall, *(c.recall for c in choices))
            predicted = {"density": density, "speedup": dense_s / chosen_s, "rel_error": error,
                         "min_recall": min(c.recall for c in choices)}
            heads = [c.strategy for c in choices]
            if schedule and schedule[-1].heads == heads:
                merged = schedule[-1]
                merged.t_end = t_end
                merged.predicted = {k: max(merged.predicted[k], predicted[k]) if k == "rel_error" else merged.predicted[k]
                                    for k in merged.predicted}
            else:
                schedule.append(StepRange(t_start, t_end, heads, predicted))
        schedule[0].t_start = 1.0
        site_plans.append(SitePlan(stats.site.name, stats.site.heads, stats.block_size, schedule))
    predictions: dict[str, Any] = {
        "attention_speedup": dense_total / chosen_total if chosen_total else 1.0,
        "attention_density": sum(densities) / max(len(calibration.sites), 1),
        "attention_rel_error": sum(errors) / max(len(errors), 1),
        "min_recall": min_recall,
        "cost_model": "measured" if cost.measured else "datasheet (no measured efficiency table)",
    }
    return Plan(
        model=ModelFingerprint.of(model), target=target, sites=site_plans, search=asdict(config),
        predictions=predictions,
        calibration={**calibration.provenance, "candidates": sorted(calibration.candidates)},
    )
