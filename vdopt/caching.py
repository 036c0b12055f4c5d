"""Offline choice of the step-cache criterion: simulate every candidate threshold on real denoising runs.

The calibration runs go through the optimized model with the cache node in probe mode (blocks always run, the true
residual of every step is known). Each candidate threshold's reuse policy is replayed on those runs; the error it
would make on a reused step is the relative L2 distance between the reused and the true hidden state after the
blocks. The plan keeps the threshold that reuses most steps with its worst error inside the budget.
"""

from __future__ import annotations

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
    on any reused calibration step; ``thresholds``: candidate limits on the accumulated first-block change."""

    error_budget: float = 0.05
    warmup_steps: int = 2
    max_consecutive_reuses: int = 2
    thresholds: tuple[float, ...] = (0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32)
    num_inference_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.error_budget < 1:
            raise ValueError(f"error_budget must be in (0, 1), got {self.error_budget}")
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
            cache.probe = probe

    handle = optimized.register_forward_pre_hook(install, with_kwargs=True)
    swapped = pipeline is not None and getattr(pipeline, "transformer", None) is not optimized
    original = getattr(pipeline, "transformer", None)
    try:
        if swapped:
            pipeline.transformer = optimized
        for run in tqdm(runs, desc="vdopt: calibrating step cache"):
            replays.clear()
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
