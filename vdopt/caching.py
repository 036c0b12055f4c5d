"""Offline choice of the step-cache policy from real denoising runs.

The calibration runs go through the optimized model with the cache node in probe mode (blocks always run, the true
residual of every step is known). The error of reusing step j's residual at step k is the relative L2 distance
between the reused and the true hidden state after the blocks.
- ``policy="threshold"`` (TeaCache family): each candidate threshold's reuse rule is replayed on those runs; the plan
  keeps the threshold that reuses most steps with its worst error inside the budget.
- ``policy="schedule"`` (LeMiCa): a fixed set of reused steps, found as the shortest path through a graph whose
  edge j -> i means "compute j, reuse j+1..i-1, compute i" and exists when every reuse on it stays inside the budget
  on every run and CFG branch: the fewest computed steps, exactly, with no run-time measurement.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from vdopt.calibrate import run_pipeline
from vdopt.passes.insert_step_cache import CachePolicyState
from vdopt.plan import StepCachePlan


@dataclass(frozen=True)
class CacheConfig:
    """Step caching options. ``error_budget``: worst relative L2 error of the hidden state after the cached blocks
    on any reused calibration step; ``policy``: "schedule" (fixed reused steps; the default: on the proxy it reuses
    more steps at better quality, benchmarks/results/step_cache.json) or "threshold" (decided at run time from the
    first block's change); ``thresholds``: candidate limits on the accumulated first-block change."""

    error_budget: float = 0.05
    policy: str = "schedule"
    warmup_steps: int = 2
    max_consecutive_reuses: int = 2
    thresholds: tuple[float, ...] = (0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32)
    num_inference_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.error_budget < 1:
            raise ValueError(f"error_budget must be in (0, 1), got {self.error_budget}")
        if self.policy not in ("threshold", "schedule"):
            raise ValueError(f"policy must be 'threshold' or 'schedule', got {self.policy!r}")
        if not self.thresholds or min(self.thresholds) <= 0:
            raise ValueError(f"thresholds must be positive, got {self.thresholds}")


@dataclass
class _Outcome:
    reused: int = 0
    computed: int = 0
    errors: list[float] = field(default_factory=list)


def _replay_step(policy: StepCachePlan, replay: CachePolicyState, outcome: _Outcome, hidden: torch.Tensor,
                 residual: torch.Tensor, change: float) -> None:
    """One probed step under a candidate policy: the same criterion the cache node applies at run time."""
    if replay.should_reuse(change, policy):
        truth = (hidden + residual).float()
        outcome.errors.append(float((replay.residual.float() - residual.float()).norm() / truth.norm().clamp(min=1e-12)))
        outcome.reused += 1
        replay.record(change, reused=True)
    else:
        outcome.computed += 1
        replay.record(change, reused=False, residual=residual)


class _ScheduleProbe:
    """Collects, over calibration runs, the worst error of reusing step j's residual at step k (k - j <= window)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.errors: dict[tuple[int, int], float] = {}
        self.steps: set[int] = set()
        self.recent: dict[Any, list[tuple[int, torch.Tensor]]] = {}

    def new_run(self) -> None:
        self.recent.clear()

    def __call__(self, key: Any, hidden: torch.Tensor, residual: torch.Tensor, change: float) -> None:
        recent = self.recent.setdefault(key, [])
        step = recent[-1][0] + 1 if recent else 0
        truth = (hidden + residual).float().norm().clamp(min=1e-12)
        for j, old in recent:
            error = float((old.float() - residual.float()).norm() / truth)
            self.errors[(j, step)] = max(error, self.errors.get((j, step), 0.0))
        recent.append((step, residual.detach()))
        del recent[: max(0, len(recent) - self.window)]
        self.steps.add(step)

    def best_schedule(self, config: CacheConfig) -> tuple[list[int], list[float]] | None:
        """Fewest computed steps (shortest path, ties to the smaller summed error); None if nothing is reused."""
        import networkx as nx

        n = max(self.steps) + 1
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n + 1))
        for j in range(n):
            for i in range(j + 1, min(n, j + config.max_consecutive_reuses + 1) + 1):
                skipped = range(j + 1, i)
                if any(k < config.warmup_steps for k in skipped):
                    continue
                errors = [self.errors.get((j, k), float("inf")) for k in skipped]
                if all(e <= config.error_budget for e in errors):
                    graph.add_edge(j, i, weight=1.0 + 1e-6 * sum(errors))
        path = nx.dijkstra_path(graph, 0, n)
        reused = [k for j, i in itertools.pairwise(path) for k in range(j + 1, i)]
        if not reused:
            return None
        return reused, [self.errors[(max(p for p in path if p < k), k)] for k in reused]


def calibrate_step_cache(
    optimized: Any, runs: Sequence[str] | Sequence[Callable[[Any], Any]], pipeline: Any = None,
    config: CacheConfig = CacheConfig(),
) -> StepCachePlan | None:
    """Choose and store ``optimized.plan.cache``; returns it, or None when no threshold meets the budget.

    ``runs``: prompt strings (run through ``pipeline``, whose transformer must be ``optimized``) or callables that
    run ``optimized`` through a whole denoising loop.
    """
    if not runs:
        raise ValueError("step-cache calibration needs at least one run (a prompt with a pipeline, or a callable)")
    if any(isinstance(run, dict) for run in runs):
        raise ValueError(
            "step caching is calibrated on whole denoising runs: give prompt strings with a pipeline or callables "
            "that run the model, not single forward-kwargs dicts"
        )
    plan = optimized.plan
    plan.cache = StepCachePlan(threshold=0.0, warmup_steps=config.warmup_steps,
                               max_consecutive_reuses=config.max_consecutive_reuses)
    optimized.forget_graphs()
    outcomes = {t: _Outcome() for t in config.thresholds}
    policies = {t: StepCachePlan(t, config.warmup_steps, config.max_consecutive_reuses) for t in config.thresholds}
    replays: dict[tuple[float, Any], CachePolicyState] = {}

    def probe(key: Any, hidden: torch.Tensor, residual: torch.Tensor, change: float) -> None:
        for threshold in config.thresholds:
            replay = replays.setdefault((threshold, key), CachePolicyState())
            _replay_step(policies[threshold], replay, outcomes[threshold], hidden, residual, change)

    def install(module: Any, args: tuple, kwargs: dict) -> None:
        for cache in optimized.step_caches():
            cache.probe = collector

    schedule = _ScheduleProbe(config.max_consecutive_reuses + 1) if config.policy == "schedule" else None
    collector = probe if schedule is None else schedule
    handle = optimized.register_forward_pre_hook(install, with_kwargs=True)
    swapped = pipeline is not None and getattr(pipeline, "transformer", None) is not optimized
    original = getattr(pipeline, "transformer", None)
    try:
        if swapped:
            pipeline.transformer = optimized
        for run in tqdm(runs, desc="vdopt: calibrating step cache"):
            replays.clear()
            if schedule is not None:
                schedule.new_run()
            with torch.no_grad():
                if isinstance(run, str):
                    if pipeline is None:
                        raise ValueError(f"prompt {run!r} needs a pipeline to run")
                    run_pipeline(pipeline, run, config.num_inference_steps, config.seed)
                else:
                    run(optimized)
    finally:
        handle.remove()
        if swapped:
            pipeline.transformer = original
        for cache in optimized.step_caches():
            cache.probe = None
    if schedule is not None:
        optimized.forget_graphs()
        found = schedule.best_schedule(config) if schedule.steps else None
        if found is None:
            plan.cache = None
            return None
        reused, errors = found
        steps = max(schedule.steps) + 1
        plan.cache = StepCachePlan(
            warmup_steps=config.warmup_steps, max_consecutive_reuses=config.max_consecutive_reuses,
            reuse_steps=tuple(reused), schedule_steps=steps,
            predicted={"reused_fraction": len(reused) / steps, "max_hidden_rel_error": max(errors),
                       "mean_hidden_rel_error": sum(errors) / len(errors), "error_budget": config.error_budget,
                       "calibration_steps": steps, "runs": len(runs), "policy": "schedule"})
        return plan.cache
    feasible = [t for t in config.thresholds
                if outcomes[t].reused and max(outcomes[t].errors) <= config.error_budget]
    optimized.forget_graphs()
    if not feasible:
        plan.cache = None
        return None
    best = max(feasible, key=lambda t: (outcomes[t].reused, -t))
    chosen = outcomes[best]
    plan.cache = StepCachePlan(
        threshold=best, warmup_steps=config.warmup_steps, max_consecutive_reuses=config.max_consecutive_reuses,
        predicted={
            "reused_fraction": chosen.reused / (chosen.reused + chosen.computed),
            "max_hidden_rel_error": max(chosen.errors), "mean_hidden_rel_error": sum(chosen.errors) / len(chosen.errors),
            "error_budget": config.error_budget, "calibration_steps": config.num_inference_steps, "runs": len(runs),
            "candidates": {str(t): {"reused": o.reused, "computed": o.computed,
                                    "max_error": max(o.errors) if o.errors else 0.0} for t, o in outcomes.items()},
        },
    )
    return plan.cache
