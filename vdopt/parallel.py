"""Plans under sequence parallelism: diffusers' context parallelism with Ulysses attention.

Under Ulysses each rank holds the whole sequence for a contiguous block of ``heads / degree`` heads (diffusers
reshapes heads as ``(degree, heads_per_rank)``), so per-head strategies apply unchanged; but heads of unequal
density make ranks unequal and the slowest sets the pace. vdopt balances them: it chooses a head order per site
whose contiguous blocks have near-equal predicted cost (longest-processing-time first), and realises the order by
permuting the heads of the attention module's projection weights once, which costs nothing at run time and leaves
the model's function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vdopt.plan import Plan, PlanError, SitePlan
from vdopt.sites import AttentionSite


@dataclass(frozen=True)
class UlyssesLayout:
    """This process's place in a Ulysses group: ``degree`` ranks, this one ``rank``."""

    degree: int
    rank: int


def ulysses_layout(model: nn.Module) -> UlyssesLayout | None:
    """The Ulysses layout diffusers' ``enable_parallelism`` gave ``model``, or None when it runs unsplit.

    Raises PlanError for ring attention, whose ranks see only a slice of the keys (sparse patterns need them all).
    """
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None) if config is not None else None
    if cp is None:
        return None
    if (cp.ring_degree or 1) > 1:
        raise PlanError(
            f"ring_degree={cp.ring_degree}: ring attention gives each rank a slice of the keys, which vdopt's sparse "
            "patterns cannot use; run with ContextParallelConfig(ulysses_degree=N, ring_degree=1)"
        )
    degree = cp.ulysses_degree or 1
    return UlyssesLayout(degree, int(cp._ulysses_local_rank)) if degree > 1 else None


def head_costs(site_plan: SitePlan, site: AttentionSite, target: str) -> list[float]:
    """Predicted attention seconds of each head over the schedule (ranges weighted by their width in t)."""
    from vdopt.cost_models.model import CostModel

    cost = CostModel.for_target(target)
    tokens = site.layout.video_tokens if site.layout is not None else site.q_tokens
    totals = [0.0] * site_plan.heads
    for step in site_plan.schedule:
        width = max(step.t_start - step.t_end, 0.0)
        densities = step.predicted.get("head_density") or [None] * site_plan.heads
        for head, (strategy, density) in enumerate(zip(step.heads, densities)):
            density = 1.0 if strategy.name == "dense" else (density if density is not None else 0.5)
            totals[head] += width * cost.attention_seconds(1, 1, tokens, site.head_dim, strategy, density, site_plan.block_size)
    return totals


def balance_heads(costs: list[float], degree: int) -> list[int]:
    """Head order whose ``degree`` contiguous blocks of ``len(costs) / degree`` heads have near-equal total cost.

    Longest-processing-time first (heads by falling cost, each to the least-loaded rank with room), then swaps of
    one head between the most-loaded rank and another while that lowers the maximum. Deterministic.
    """
    heads = len(costs)
    if degree < 1 or heads % degree:
        raise PlanError(f"{heads} heads cannot be split evenly over ulysses_degree={degree}; use a divisor of {heads}")
    per_rank = heads // degree
    loads = [0.0] * degree
    members: list[list[int]] = [[] for _ in range(degree)]
    for head in sorted(range(heads), key=lambda h: (-costs[h], h)):
        rank = min((r for r in range(degree) if len(members[r]) < per_rank), key=lambda r: (loads[r], r))
        members[rank].append(head)
        loads[rank] += costs[head]
    improved = True
    while improved:
        improved = False
        worst = max(range(degree), key=lambda r: (loads[r], -r))
        best_gain, best_swap = 1e-15, None
        for other in range(degree):
            if other == worst:
                continue
            for a in members[worst]:
                for b in members[other]:
                    delta = costs[a] - costs[b]
                    new_max = max(loads[worst] - delta, loads[other] + delta)
                    gain = loads[worst] - new_max
                    if delta > 0 and gain > best_gain:
                        best_gain, best_swap = gain, (other, a, b)
        if best_swap is not None:
            other, a, b = best_swap
            members[worst][members[worst].index(a)] = b
            members[other][members[other].index(b)] = a
            loads[worst] -= costs[a] - costs[b]
            loads[other] += costs[a] - costs[b]
            improved = True
    return [head for rank in members for head in sorted(rank)]


def rank_loads(costs: list[float], order: list[int], degree: int) -> list[float]:
    """Predicted cost of each rank's contiguous block of ``order``."""
    per_rank = len(order) // degree
    return [sum(costs[h] for h in order[r * per_rank:(r + 1) * per_rank]) for r in range(degree)]


def balance_plan(plan: Plan, sites: list[AttentionSite], degree: int) -> Plan:
    """Record in ``plan.parallel`` a balanced head order per site for ``degree``-way Ulysses; returns the plan."""
    by_name = {site.name: site for site in sites}
    orders: dict[str, list[int]] = {}
    imbalance: list[float] = []
    for site_plan in plan.sites:
        site = by_name.get(site_plan.site)
        if site is None:
            raise PlanError(f"plan site {site_plan.site!r} is not among the model's attention sites")
        costs = head_costs(site_plan, site, plan.target)
        order = balance_heads(costs, degree)
        orders[site_plan.site] = order
        loads = rank_loads(costs, order, degree)
        mean = sum(loads) / degree
        imbalance.append(max(loads) / mean if mean > 0 else 1.0)
    plan.parallel = {
        "ulysses_degree": degree,
        "head_order": orders,
        "max_rank_over_mean_predicted": max(imbalance, default=1.0),
    }
    return plan


def _attention_module(model: nn.Module, site: AttentionSite) -> nn.Module:
    path = site.name.split("#")[0]
    module = model.get_submodule(path)
    if not all(hasattr(module, name) for name in ("to_q", "to_k", "to_v", "to_out")):
        raise PlanError(
            f"head balancing permutes the heads of {path}'s to_q/to_k/to_v/to_out projections; "
            f"{type(module).__name__} has no such projections: search the plan without --ulysses-degree"
        )
    return module


def _permute_rows(weight: torch.Tensor, order: torch.Tensor, heads: int, dim: int = 0) -> torch.Tensor:
    """Reorder the head groups of ``weight`` along ``dim`` (length heads x head_dim)."""
    shape = list(weight.shape)
    grouped = weight.unflatten(dim, (heads, shape[dim] // heads))
    return grouped.index_select(dim, order).flatten(dim, dim + 1)


@torch.no_grad()
def permute_site_heads(model: nn.Module, site: AttentionSite, order: list[int]) -> None:
    """Reorder the heads of one attention module in place so that head position ``p`` computes original head
    ``order[p]``: rows of to_q/to_k/to_v (and per-head q/k norm weights), columns of to_out. Exact."""
    module = _attention_module(model, site)
    index = torch.tensor(order, device=module.to_q.weight.device)
    for projection in (module.to_q, module.to_k, module.to_v):
        projection.weight.copy_(_permute_rows(projection.weight, index, site.heads))
        if projection.bias is not None:
            projection.bias.copy_(_permute_rows(projection.bias, index, site.heads))
    for norm_name in ("norm_q", "norm_k"):
        norm = getattr(module, norm_name, None)
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.numel() == site.heads * site.head_dim:
            weight.copy_(_permute_rows(weight, index, site.heads))
    out = module.to_out[0] if isinstance(module.to_out, nn.ModuleList) else module.to_out
    out.weight.copy_(_permute_rows(out.weight, index, site.heads, dim=1))


def apply_head_order(model: nn.Module, plan: Plan, sites: list[AttentionSite], degree: int) -> dict[str, list[int]]:
    """Permute the model's heads to the plan's balanced order for ``degree`` (re-balanced here if the plan was
    searched for another degree); returns the order per site. Marks the model so it is permuted only once."""
    parallel: dict[str, Any] = plan.parallel or {}
    applied = getattr(model, "_vdopt_head_order", None)
    if applied is not None:
        if applied["degree"] != degree:
            raise PlanError(
                f"this model's heads were already balanced for ulysses_degree={applied['degree']}; build the model "
                f"again to run it with ulysses_degree={degree}"
            )
        return applied["orders"]
    if parallel.get("ulysses_degree") != degree:
        balance_plan(plan, sites, degree)
    orders = plan.parallel["head_order"]
    by_name = {site.name: site for site in sites}
    for name, order in orders.items():
        if order != sorted(order):
            permute_site_heads(model, by_name[name], order)
    model._vdopt_head_order = {"degree": degree, "orders": orders}
    return orders


def local_site_plan(site_plan: SitePlan, order: list[int] | None, layout: UlyssesLayout) -> SitePlan:
    """The part of ``site_plan`` this rank runs: the strategies of the heads it holds, in its local order."""
    if site_plan.heads % layout.degree:
        raise PlanError(
            f"site {site_plan.site} has {site_plan.heads} heads, not divisible by ulysses_degree={layout.degree}"
        )
    per_rank = site_plan.heads // layout.degree
    order = order or list(range(site_plan.heads))
    mine = order[layout.rank * per_rank:(layout.rank + 1) * per_rank]
    schedule = []
    for step in site_plan.schedule:
        predicted = dict(step.predicted)
        for key in ("head_density", "head_recall", "head_rel_error"):
            if isinstance(predicted.get(key), list):
                predicted[key] = [predicted[key][h] for h in mine]
        schedule.append(type(step)(step.t_start, step.t_end, [step.heads[h] for h in mine], predicted))
    return SitePlan(site_plan.site, per_rank, site_plan.block_size, schedule)
