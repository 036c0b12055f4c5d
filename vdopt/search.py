"""Search: per site, a strategy per head and a step-range schedule that minimise predicted latency under a budget.

The problem, per site:
- **Per step range** (a run of consecutive calibration times), each head picks one candidate (or dense). Quality is
  either a recall floor per head (the minimum attention-mass recall over the range's samples, default) or a site
  output-error budget: the site's predicted relative error ``sqrt(sum_h (e_h n_h)^2 / sum_h n_h^2) <= budget``
  (``e_h`` the head's worst calibrated error, ``n_h`` its dense output norm), i.e. the additive constraint
  ``sum_h (e_h n_h)^2 <= budget^2 sum_h n_h^2``: a multiple-choice knapsack.
- **Latency** = sum of per-head work + a fixed cost per fused head group (one launch, and one tail, for every
  head of the site that shares a kernel or an overhead kernel): the cost model's :class:`StrategyCost`.
- **Exact solution**: group keys that always occur together are merged into classes; the classes a solution may
  use are enumerated (branch and bound on their fixed cost), and for each the knapsack is solved by DP over the
  error budget discretised into ``error_bins`` units, weights rounded up (so every solution is feasible). The same
  DP with weights rounded down solves a relaxation, whose optimum is a lower bound: the reported gap bounds how
  far the chosen plan can be from the true optimum (0 under the recall floor, where nothing is discretised).
- **Step ranges and dense warm-up**: the schedule is a shortest path over calibration times (networkx), an edge
  per candidate range weighted by its time width x its optimal latency, with at most ``max_step_ranges`` ranges; a
  range whose heads are all dense is a dense warm-up chosen by the data. ``min_dense_warmup`` forces it.

**Density budget** (``budget="density"``): the dual problem, used to compare plans at equal attention density.
Minimise the predicted relative squared error of the model's output, ``sum_s g_s e_s^2`` averaged over the
calibration samples after the dense warm-up (``e_s^2 = sum_h (e_h n_h)^2 / sum_h n_h^2`` the site's squared
relative attention-output error, ``g_s`` its output gain at that sample as calibration measured it, 1 where it did
not), subject to a mean density over every site, head and those samples of at most ``density_budget``. On the
proxy the gains differ ~10x between layers, and this objective ranks plans' measured single-step output error
better than unweighted site error or recall. It is one multiple-choice
knapsack over all sites and heads together (density goes to the layers where it removes the most error), solved
exactly by DP over the budget in ``density_bins`` units (weights rounded up; down for the lower bound); the time
after ``min_dense_warmup`` is split into at most ``max_step_ranges`` ranges of calibration times. Plans passed as
``incumbents`` (e.g. single-strategy baselines) are scored by the same objective and win when the discretised DP
does worse, so the result's predicted error is never above that of any incumbent within the budget.

**Time budget** (``budget="time"``): the same objective at a mean attention time per step after the warm-up of at
most ``time_budget_ms`` (all sites), the time of a site's head assignment priced by :class:`SiteCosts`: per head
group a fixed cost (launch, selection, permutation) plus a per-head cost, and a mixing cost when a site runs more
than one group. The costs come from the target's cost model, or from timings of the runtime on the actual shapes
(the quality harness measures them on the GPU it runs on). Per site and step group, every set of at most
``max_site_groups`` groups is priced exactly; across sites a Lagrange multiplier on time is bisected to the budget.
Incumbents are scored by the same time model and win when they are better within the budget.

No randomness: ties go to the candidate listed first (calibration's order) and to fewer ranges, so a fixed
calibration (fixed seed) gives the same plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from torch import nn
from tqdm.auto import tqdm

from vdopt.calibrate import CalibrationResult, SiteStats
from vdopt.cost_models.model import AttentionShape, CostModel, StrategyCost, attention_kernel
from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepRange
from vdopt.sites import AttentionSite
from vdopt.strategies import Dense, Strategy

#: Share of a denoising step spent in self-attention: Wan2.1-1.3B, diffusers eager, 480p 81 frames, CFG batch 2,
#: H100 (DESIGN.md, "Numbers measured so far": 1249 ms step, self-attention 55% of it).
WAN_1_3B_ATTENTION_SHARE = 0.55


@dataclass(frozen=True)
class SearchConfig:
    """Quality budget and search options.

    ``budget``: ``"recall"`` (each sparse head keeps at least ``recall_budget`` of the attention mass at every
    calibration sample of its range: the minimum over samples, not the mean, so it holds on unseen inputs) or
    ``"error"`` (each site's predicted output relative error <= ``error_budget`` at every range, heads traded
    against each other by the knapsack) or ``"density"`` (the least predicted output error, summed over sites,
    at a mean attention density <= ``density_budget`` after the dense warm-up; see the module docstring) or
    ``"time"`` (the same objective at a mean attention time per step <= ``time_budget_ms``, priced by
    :class:`SiteCosts`; ``max_site_groups``: most head groups, dense included, one site may run; up to 2, an exact
    DP over ``time_bins`` steps of the budget, with a bound on its gap; more, a Lagrangian and local search).
    ``error_bins`` / ``density_bins``: discretisation of the error / density budget for the DP.
    ``min_dense_warmup``: fraction of the noisiest denoising time kept dense whatever the data says.
    ``max_step_ranges``: most step ranges per site (each range is another pattern set to build and cache).
    ``batch``: batch the cost model assumes (2 for CFG). ``tokens``: video tokens the cost model prices at (None:
    the calibrated site's own; set the deployment size, e.g. 32760 for Wan2.1 480p 81 frames, when calibrating
    smaller). ``attention_share``: fraction of an eager denoising step that self-attention takes, for the
    end-to-end prediction (default: Wan2.1-1.3B's measured 55%, DESIGN.md). ``progress``: bar over sites.
    ``strategies``: labels of the calibrated candidates the search may choose (dense always may); None: all of them.
    """

    recall_budget: float = 0.95
    min_dense_warmup: float = 0.0
    batch: int = 2
    budget: str = "recall"
    error_budget: float = 0.05
    error_bins: int = 256
    density_budget: float = 0.2
    density_bins: int = 8192
    max_step_ranges: int = 4
    time_budget_ms: float = 0.0
    max_site_groups: int = 2
    time_bins: int = 4096
    tokens: int | None = None
    attention_share: float = WAN_1_3B_ATTENTION_SHARE
    progress: bool = True
    strategies: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.recall_budget <= 1.0:
            raise ValueError(f"recall_budget must be in (0, 1], got {self.recall_budget}")
        if not 0.0 <= self.min_dense_warmup <= 1.0:
            raise ValueError(f"min_dense_warmup must be in [0, 1], got {self.min_dense_warmup}")
        if self.budget not in ("recall", "error", "density", "time"):
            raise ValueError(f"budget must be 'recall' (per-head recall floor), 'error' (site error), 'density' "
                             f"(least error at a mean density) or 'time' (least error at a mean attention time), "
                             f"got {self.budget!r}")
        if self.budget == "time" and not self.time_budget_ms > 0.0:
            raise ValueError(f"budget='time' needs time_budget_ms > 0 (mean attention ms per step after the warm-up, "
                             f"all sites), got {self.time_budget_ms}")
        if self.max_site_groups < 1:
            raise ValueError(f"max_site_groups must be >= 1, got {self.max_site_groups}")
        if self.time_bins < 1:
            raise ValueError(f"time_bins must be >= 1, got {self.time_bins}")
        if not 0.0 < self.density_budget <= 1.0:
            raise ValueError(f"density_budget must be in (0, 1] (mean kept fraction, e.g. 0.2), got {self.density_budget}")
        if self.density_bins < 1:
            raise ValueError(f"density_bins must be >= 1, got {self.density_bins}")
        if not self.error_budget > 0.0:
            raise ValueError(f"error_budget must be > 0 (relative output error, e.g. 0.05), got {self.error_budget}")
        if self.error_bins < 1:
            raise ValueError(f"error_bins must be >= 1, got {self.error_bins}")
        if self.max_step_ranges < 1:
            raise ValueError(f"max_step_ranges must be >= 1, got {self.max_step_ranges}")
        if self.batch < 1 or (self.tokens is not None and self.tokens < 1):
            raise ValueError(f"batch and tokens must be >= 1, got batch={self.batch}, tokens={self.tokens}")
        if not 0.0 < self.attention_share <= 1.0:
            raise ValueError(f"attention_share must be in (0, 1], got {self.attention_share}")
        if self.strategies is not None and not self.strategies:
            raise ValueError("strategies must name at least one calibrated strategy label (or be None for all)")


def restrict_candidates(calibration: CalibrationResult, labels: Sequence[str] | None) -> CalibrationResult:
    """``calibration`` with only the candidates ``labels`` names (and dense) open to a search; None: unchanged.

    Raises ValueError naming any label calibration did not measure."""
    if labels is None:
        return calibration
    unknown = sorted(set(labels) - set(calibration.candidates) - {"dense"})
    if unknown:
        raise ValueError(f"strategies {unknown} were not calibrated; choose among {sorted(calibration.candidates)} "
                         "or calibrate with them among CalibrationConfig.candidates")
    keep = set(labels)
    return dataclasses.replace(calibration, candidates={label: s for label, s in calibration.candidates.items()
                                                        if label in keep or isinstance(s, Dense)})


# ---------------------------------------------------------------------------------------------------------------
# The knapsack with fused-group fixed costs


@dataclass(frozen=True)
class Option:
    """One candidate for one head: the cost a knapsack minimises, fused groups, knapsack weight and calibrated
    figures.

    ``cost``: per-head seconds in the per-site latency search (:func:`solve_site`), the head's share of predicted
    squared error in the plan-wide density and time searches (their items, see ``_density_items``). ``weight``:
    share of the capacity it uses (error capacity per site; density in the density search); ``reason``: why it is
    infeasible (empty when feasible).
    """

    label: str
    cost: float
    groups: frozenset[str]
    weight: float = 0.0
    recall: float = 1.0
    rel_error: float = 0.0
    density: float = 1.0
    reason: str = ""


@dataclass
class Solution:
    """Chosen option index per head; its predicted seconds (work + fixed) and the optimality gap bound."""

    choice: list[int]
    seconds: float
    lower_bound: float
    used_groups: frozenset[str] = frozenset()

    @property
    def gap(self) -> float:
        return max(0.0, (self.seconds - self.lower_bound) / self.seconds) if self.seconds > 0 else 0.0


def _dp(options: list[list[Option]], allowed: list[list[int]], weights: list[list[int]], capacity: int
        ) -> tuple[float, list[int]] | None:
    """Minimum total cost with total weight <= capacity, one allowed option per head; None if infeasible."""
    best = np.zeros(capacity + 1)
    picks: list[np.ndarray] = []
    # One pick array per item: the narrowest integer type keeps thousands of items (the density search over every
    # site and head of a large model) in tens of MB.
    pick_type = np.int16 if max((len(o) for o in options), default=0) < 2**15 else np.int64
    for head, idx in enumerate(allowed):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=pick_type)
        for i in idx:
            w = weights[head][i]
            if w > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w:] = best[: capacity + 1 - w] + options[head][i].cost
            better = cand < new  # strict: the earlier-listed option keeps ties
            new[better], pick[better] = cand[better], i
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):
        return None
    choice, w = [], capacity
    for head in reversed(range(len(options))):
        i = int(picks[head][w])
        choice.append(i)
        w -= weights[head][i]
    return float(best[capacity]), choice[::-1]


def _group_classes(options: list[list[Option]]) -> dict[frozenset[str], frozenset[str]]:
    """Group keys merged by co-occurrence: keys carried by exactly the same options form one class."""
    carriers: dict[str, set[tuple[int, int]]] = {}
    for h, opts in enumerate(options):
        for i, opt in enumerate(opts):
            if not opt.reason:
                for key in opt.groups:
                    carriers.setdefault(key, set()).add((h, i))
    classes: dict[frozenset, set[str]] = {}
    for key, where in carriers.items():
        classes.setdefault(frozenset(where), set()).add(key)
    return {frozenset(keys): frozenset(keys) for keys in classes.values()}


def solve_site(options: list[list[Option]], fixed: dict[str, float], capacity: int) -> Solution:
    """Exact minimum of sum of chosen seconds + fixed seconds of every group used, total weight <= capacity bins.

    ``options[h]``: head ``h``'s candidates (infeasible ones, with a ``reason``, are skipped); weights are in
    units of the capacity, rounded up for the solution and down for the lower bound.
    """
    classes = sorted(_group_classes(options), key=lambda c: sorted(c))

    def true_cost(choice: list[int]) -> tuple[float, frozenset[str]]:
        used = frozenset().union(*(options[h][i].groups for h, i in enumerate(choice)))
        return sum(options[h][i].cost for h, i in enumerate(choice)) + sum(fixed.get(k, 0.0) for k in used), used

    def enumerate_best(weights: list[list[int]]) -> tuple[float, list[int] | None]:
        feasible = [[i for i, o in enumerate(opts) if not o.reason] for opts in options]
        found = _dp(options, feasible, weights, capacity)
        if found is None:
            return math.inf, None
        unconstrained, choice = found
        best, _ = true_cost(choice)
        best_choice = choice
        subsets = []
        for r in range(len(classes) + 1):
            for combo in itertools.combinations(range(len(classes)), r):
                keys = frozenset().union(*(classes[c] for c in combo)) if combo else frozenset()
                subsets.append((sum(fixed.get(k, 0.0) for k in keys), combo, keys))
        subsets.sort(key=lambda s: (s[0], s[1]))
        for fixed_cost, _, keys in subsets:
            if fixed_cost + unconstrained >= best:  # the DP over fewer options cannot beat the unrestricted one
                break
            allowed = [[i for i in idx if options[h][i].groups <= keys] for h, idx in enumerate(feasible)]
            if any(not a for a in allowed):
                continue
            found = _dp(options, allowed, weights, capacity)
            if found is None:
                continue
            cost, _used = true_cost(found[1])
            if cost < best - 1e-15:
                best, best_choice = cost, found[1]
        return best, best_choice

    up = [[math.ceil(o.weight * capacity - 1e-9) for o in opts] for opts in options]
    down = [[math.floor(o.weight * capacity + 1e-9) for o in opts] for opts in options]
    best, choice = enumerate_best(up)
    if choice is None:
        raise RuntimeError("no feasible assignment: every head needs a feasible option (dense always is)")
    lower = best if up == down else enumerate_best(down)[0]
    _, used = true_cost(choice)
    return Solution(choice, best, min(lower, best), used)


# ---------------------------------------------------------------------------------------------------------------
# Building the options of a site from calibration


@dataclass
class HeadExplanation:
    """Why one head of one range got its strategy."""

    chosen: Option
    runner_up: Option | None
    infeasible: list[Option]


@dataclass
class RangeReport:
    t_start: float
    t_end: float
    heads: list[HeadExplanation]
    seconds: float
    dense_seconds: float
    gap: float
    rel_error: float
    groups: dict[str, int]


@dataclass
class SearchReport:
    """What the search saw and decided, per site and range, for ``vdopt-search --explain``."""

    config: SearchConfig
    target: str
    sites: dict[str, list[RangeReport]] = field(default_factory=dict)

    def explain(self) -> str:
        if self.config.budget == "density":
            goal = (f"minimise predicted output error (summed over sites) at mean attention density <= "
                    f"{self.config.density_budget:g} after the dense warm-up")
            lines = [f"search for {self.target}: {goal}"]
        else:
            mode = (f"recall floor {self.config.recall_budget:g} per head" if self.config.budget == "recall"
                    else f"site output-error budget {self.config.error_budget:g}")
            lines = [f"search for {self.target}: minimise predicted latency under a {mode}"]
        why_by_budget = {"recall": "cheapest feasible", "density": "density knapsack over all sites and heads"}
        for site, ranges in self.sites.items():
            for r in ranges:
                groups = ", ".join(f"{k} x{n}" for k, n in sorted(r.groups.items()))
                gap = f", optimality gap <= {r.gap:.1%}" if r.gap > 0 else ""
                lines.append(f"{site}  t in ({r.t_end:.2f}, {r.t_start:.2f}]: {r.seconds * 1e3:.3f} ms vs dense "
                             f"{r.dense_seconds * 1e3:.3f} ms, predicted error {r.rel_error:.3f}{gap}; "
                             f"fused launches: {groups}")
                for h, e in enumerate(r.heads):
                    c = e.chosen
                    why = why_by_budget.get(self.config.budget, f"site DP, uses {c.weight:.0%} of the error budget")
                    if c.reason:
                        why = c.reason
                    lines.append(f"  head {h}: {c.label} ({why}; {c.cost * 1e3:.4f} ms/head, recall {c.recall:.3f}, "
                                 f"density {c.density:.3f}, error {c.rel_error:.3f})")
                    if e.runner_up is not None:
                        u = e.runner_up
                        lines.append(f"    runner-up: {u.label} ({u.cost * 1e3:.4f} ms/head, recall {u.recall:.3f}, "
                                     f"density {u.density:.3f})")
                    if e.infeasible:
                        shown = "; ".join(f"{o.label}: {o.reason}" for o in e.infeasible[:4])
                        more = f"; and {len(e.infeasible) - 4} more" if len(e.infeasible) > 4 else ""
                        lines.append(f"    infeasible: {shown}{more}")
        return "\n".join(lines)


def _time_ranges(times: list[float]) -> tuple[list[float], list[float]]:
    """Distinct calibration times, noisiest first, and the range bounds (midpoints) that cover [0, 1]."""
    ordered = sorted(set(times), reverse=True)
    bounds = [1.0] + [(a + b) / 2 for a, b in itertools.pairwise(ordered)] + [0.0]
    return ordered, bounds


class _SiteProblem:
    """Options and costs of one site, for any run of its calibration times."""

    def __init__(self, stats: SiteStats, candidates: dict[str, Strategy], cost: CostModel, config: SearchConfig) -> None:
        self.stats, self.candidates, self.cost, self.config = stats, candidates, cost, config
        site = stats.site
        layout = site.layout
        tokens = config.tokens or layout.video_tokens  # type: ignore[union-attr]
        text = layout.text_tokens if layout is not None else 0
        if config.tokens and layout is not None:
            text = round(text * config.tokens / max(layout.video_tokens, 1))
        self.shape = AttentionShape(config.batch, site.heads, tokens, site.head_dim, text, stats.block_size)
        self.times, self.bounds = _time_ranges(stats.times)
        # The tail of a fused launch is priced at one density per kernel kind and site, so a group's fixed cost
        # does not depend on which heads join it (keeps the objective separable for the knapsack).
        per_kind: dict[str, list[float]] = {}
        for label, strategy in candidates.items():
            values = [d for sample in stats.density.get(label, []) for d in sample]
            per_kind.setdefault(attention_kernel(strategy), []).extend(values)
        self.tail_density = {k: sum(v) / len(v) for k, v in per_kind.items() if v}
        self._costs: dict[tuple[str, float], StrategyCost] = {}

    def strategy_cost(self, label: str, strategy: Strategy, density: float) -> StrategyCost:
        key = (label, round(density, 4))
        if key not in self._costs:
            tail = self.tail_density.get(attention_kernel(strategy))
            self._costs[key] = self.cost.strategy_cost(strategy, self.shape, key[1], tail)
        return self._costs[key]

    def dense_option(self) -> Option:
        cost = self.strategy_cost("dense", Dense(), 1.0)
        return Option("dense", cost.per_head, frozenset(cost.groups))

    def fixed(self) -> dict[str, float]:
        fixed: dict[str, float] = {}
        for cost in self._costs.values():
            for key, seconds in cost.groups.items():
                fixed[key] = seconds  # the same for every density: tails are priced per kernel kind
        return fixed

    def options(self, lo: int, hi: int) -> tuple[list[list[Option]], list[float]]:
        """Per head, every candidate's option over calibration times ``times[lo:hi]``; the heads' dense norms."""
        stats, config = self.stats, self.config
        wanted = set(self.times[lo:hi])
        samples = [i for i, t in enumerate(stats.times) if t in wanted]
        heads = stats.site.heads
        norms = [sum(stats.dense_output_norm[i][h] for i in samples) / len(samples) for h in range(heads)]
        capacity = config.error_budget**2 * sum(n * n for n in norms)
        per_head: list[list[Option]] = []
        for h in range(heads):
            opts = [self.dense_option()]
            for label, strategy in self.candidates.items():
                if isinstance(strategy, Dense) or label not in stats.recall:
                    continue
                recall = min(stats.recall[label][i][h] for i in samples)
                error = max(stats.rel_error[label][i][h] for i in samples)
                density = max(stats.density[label][i][h] for i in samples)
                cost = self.strategy_cost(label, strategy, density)
                weight = 0.0
                reason = ""
                if config.budget == "recall":
                    if recall < config.recall_budget:
                        reason = f"recall {recall:.3f} < floor {config.recall_budget:g}"
                else:
                    weight = (error * norms[h]) ** 2 / capacity if capacity > 0 else math.inf
                    if weight > 1.0:
                        reason = f"error {error:.3f} alone exceeds the site budget {config.error_budget:g}"
                opts.append(Option(label, cost.per_head, frozenset(cost.groups), weight, recall, error, density, reason))
            per_head.append(opts)
        return per_head, norms


def _site_error(chosen: list[Option], norms: list[float]) -> float:
    """Relative error of the whole site's output: heads' errors weighted by their output norms."""
    num = sum((c.rel_error * n) ** 2 for c, n in zip(chosen, norms))
    den = sum(n**2 for n in norms)
    return math.sqrt(num / den) if den > 0 else 0.0


@dataclass
class _RangeResult:
    lo: int
    hi: int
    chosen: list[Option]
    strategies: list[Strategy]
    seconds: float
    dense_seconds: float
    gap: float
    rel_error: float
    report: RangeReport


def _solve_range(problem: _SiteProblem, lo: int, hi: int, force_dense: bool) -> _RangeResult:
    config = problem.config
    options, norms = problem.options(lo, hi)
    if force_dense:
        options = [[o if o.label == "dense" else Option(**{**asdict(o), "reason": "forced dense warm-up"})
                    for o in opts] for opts in options]
    capacity = 0 if config.budget == "recall" else config.error_bins
    fixed = problem.fixed()
    solution = solve_site(options, fixed, capacity)
    chosen = [options[h][i] for h, i in enumerate(solution.choice)]
    dense = problem.dense_option()
    dense_seconds = len(options) * dense.cost + sum(fixed.get(k, 0.0) for k in dense.groups)
    groups: dict[str, int] = {}
    explanations = []
    for h, opts in enumerate(options):
        c = chosen[h]
        groups[attention_kernel(problem.candidates.get(c.label, Dense()))] = groups.get(
            attention_kernel(problem.candidates.get(c.label, Dense())), 0) + 1
        feasible = sorted((o for o in opts if not o.reason and o.label != c.label), key=lambda o: o.cost)
        explanations.append(HeadExplanation(c, feasible[0] if feasible else None, [o for o in opts if o.reason]))
    lo_t, hi_t = problem.bounds[lo], problem.bounds[hi]
    error = _site_error(chosen, norms)
    report = RangeReport(lo_t, hi_t, explanations, solution.seconds, dense_seconds, solution.gap, error, groups)
    strategies = [problem.candidates.get(c.label, Dense()) for c in chosen]
    return _RangeResult(lo, hi, chosen, strategies, solution.seconds, dense_seconds, solution.gap, error, report)


def _schedule(problem: _SiteProblem) -> list[_RangeResult]:
    """Shortest path over calibration times: at most ``max_step_ranges`` ranges, minimum width-weighted latency."""
    config = problem.config
    m = len(problem.times)
    bounds = problem.bounds
    forced = sum(1 for i in range(m) if config.min_dense_warmup > 0 and bounds[i] > 1.0 - config.min_dense_warmup + 1e-9)
    results: dict[tuple[int, int], _RangeResult] = {}
    graph = nx.DiGraph()
    budget = config.max_step_ranges - (1 if forced else 0)
    start = (forced, 0)
    if forced:
        results[(0, forced)] = _solve_range(problem, 0, forced, True)
    if forced == m:
        return [results[(0, m)]]
    tie = 1e-9 * problem.dense_option().cost  # prefer fewer ranges when they cost the same
    for lo in range(forced, m):
        for hi in range(lo + 1, m + 1):
            results[(lo, hi)] = _solve_range(problem, lo, hi, False)
            width = bounds[lo] - bounds[hi]
            for k in range(max(budget, 1)):
                graph.add_edge((lo, k), (hi, k + 1), weight=width * results[(lo, hi)].seconds + tie, span=(lo, hi))
    for k in range(1, max(budget, 1) + 1):
        if graph.has_node((m, k)):
            graph.add_edge((m, k), "end", weight=0.0)
    path = nx.shortest_path(graph, start, "end", weight="weight")
    spans = [graph.edges[a, b]["span"] for a, b in itertools.pairwise(path) if b != "end"]
    return ([results[(0, forced)]] if forced else []) + [results[s] for s in spans]


# ---------------------------------------------------------------------------------------------------------------
# Density budget: the least predicted output error at a mean density, one knapsack over every site and head


@dataclass(frozen=True)
class QualityEstimate:
    """A plan's predicted quality and density on the calibration samples after its dense warm-up.

    ``sq_error``: the density search's objective, averaged over the samples: with measured output gains, the
    predicted relative squared error of the model's output, ``sum_s g_s e_s^2`` (first order: sites' errors add
    independently, each scaled by the site's gain at that sample); without, the plain sum over sites of ``e_s^2``.
    ``e_s^2 = sum_h (e_h n_h)^2 / sum_h n_h^2`` is site ``s``'s squared relative attention-output error.
    ``site_rel_error``: root mean square of ``e_s`` over sites and samples; ``density``: mean kept fraction over
    sites, heads and samples (dense heads count 1); ``min_recall``: the least recall of any sparse head at any sample
    (1 if none); ``output_gains``: whether calibration measured the gains.
    """

    sq_error: float
    site_rel_error: float
    density: float
    min_recall: float
    output_gains: bool


def _post_warmup_samples(stats: SiteStats, t_warmup: float) -> list[int]:
    return [i for i, t in enumerate(stats.times) if t <= t_warmup + 1e-9]


def _output_gains(calibration: CalibrationResult) -> dict[str, list[float]] | None:
    """Per site and sample, the output gain; a sample without one (NaN) takes its site's mean, a site without any
    the mean of all sites. None when calibration measured no gains."""
    if not all(len(stats.output_gain) == len(stats.times) for stats in calibration.sites.values()):
        return None
    finite = {name: [g for g in stats.output_gain if math.isfinite(g)] for name, stats in calibration.sites.items()}
    overall = [g for values in finite.values() for g in values]
    if not overall:
        return None
    default = sum(overall) / len(overall)
    out = {}
    for name, stats in calibration.sites.items():
        site_default = sum(finite[name]) / len(finite[name]) if finite[name] else default
        out[name] = [g if math.isfinite(g) else site_default for g in stats.output_gain]
    return out


def _site_sample_terms(stats: SiteStats, i: int, labels: list[str]) -> tuple[list[float], list[float], list[float]]:
    """Per head, at sample ``i``: share of the site's squared relative error, density and recall of ``labels``."""
    norms = stats.dense_output_norm[i]
    total = sum(n * n for n in norms)
    errors, densities, recalls = [], [], []
    for h, label in enumerate(labels):
        if label == "dense":
            errors.append(0.0)
            densities.append(1.0)
            recalls.append(1.0)
            continue
        if label not in stats.rel_error:
            raise ValueError(f"strategy {label} was not calibrated at site {stats.site.name}; calibrate with it "
                             "among CalibrationConfig.candidates")
        e = stats.rel_error[label][i][h] * norms[h]
        errors.append(e * e / total if total > 0 else 0.0)
        densities.append(stats.density[label][i][h])
        recalls.append(stats.recall[label][i][h])
    return errors, densities, recalls


def predicted_quality(plan: Plan, calibration: CalibrationResult, t_warmup: float) -> QualityEstimate:
    """The density search's objective and density for any ``plan``, on calibration samples with ``t <= t_warmup``.

    Sites the plan does not name run dense. Raises ValueError if the plan uses a strategy calibration did not measure.
    """
    gains = _output_gains(calibration)
    sq_error, site_sq, densities, min_recall, count = 0.0, 0.0, [], 1.0, 0
    for name, stats in calibration.sites.items():
        site_plan = plan.site(name)
        samples = _post_warmup_samples(stats, t_warmup)
        if not samples:
            raise ValueError(f"site {name} has no calibration sample with t <= {t_warmup:g}; record later steps")
        weighted = 0.0
        for i in samples:
            strategies = site_plan.strategies_at(stats.times[i]) if site_plan else [Dense()] * stats.site.heads
            errors, dens, recalls = _site_sample_terms(stats, i, [s.label() for s in strategies])
            weighted += sum(errors) * (gains[name][i] if gains else 1.0)
            site_sq += sum(errors)
            count += 1
            densities += dens
            min_recall = min(min_recall, *(r for r, s in zip(recalls, strategies) if not isinstance(s, Dense)), 1.0)
        sq_error += weighted / len(samples)
    return QualityEstimate(sq_error, math.sqrt(site_sq / max(count, 1)), sum(densities) / len(densities), min_recall,
                           gains is not None)


def _step_groups(times: list[float], count: int) -> list[list[float]]:
    """``times`` (noisiest first) split into at most ``count`` contiguous runs of near-equal length."""
    count = max(1, min(count, len(times)))
    edges = [round(i * len(times) / count) for i in range(count + 1)]
    return [times[a:b] for a, b in itertools.pairwise(edges)]


@dataclass
class _DensityItem:
    """One (site, head, step group) of the density knapsack: per option its objective share and density share."""

    site: str
    head: int
    group: int
    options: list[Option]


def _density_items(calibration: CalibrationResult, groups: list[list[float]], t_warmup: float) -> list[_DensityItem]:
    """Per site, head and step group, every option with its objective share (``cost``: predicted squared error)
    and density share (``weight``); recall, error and density are the means over the group's samples."""
    heads_total = sum(stats.site.heads for stats in calibration.sites.values())
    gains = _output_gains(calibration)
    labels = ["dense"] + [label for label, s in calibration.candidates.items() if not isinstance(s, Dense)]
    items = []
    for name, stats in calibration.sites.items():
        samples = _post_warmup_samples(stats, t_warmup)
        if not samples:
            raise ValueError(f"site {name} has no calibration sample with t <= {t_warmup:g}; lower min_dense_warmup "
                             "or record later denoising steps")
        present = [label for label in labels if label == "dense" or label in stats.rel_error]
        per_label = {label: [_site_sample_terms(stats, i, [label] * stats.site.heads) for i in samples]
                     for label in present}
        for g, group in enumerate(groups):
            members = [k for k, i in enumerate(samples) if any(abs(stats.times[i] - t) < 1e-9 for t in group)]
            for h in range(stats.site.heads):
                options = []
                scale = [gains[name][samples[k]] if gains else 1.0 for k in members]
                for label in present:
                    terms = [per_label[label][k] for k in members]
                    error = sum(g * t[0][h] for g, t in zip(scale, terms)) / len(samples)
                    density = sum(t[1][h] for t in terms) / len(samples) / heads_total
                    mean = max(len(members), 1)
                    options.append(Option(label, error, frozenset(), density, sum(t[2][h] for t in terms) / mean,
                                          math.sqrt(sum(t[0][h] for t in terms) / mean), sum(t[1][h] for t in terms) / mean))
                items.append(_DensityItem(name, h, g, options))
    return items


def _incumbent_choice(plan: Plan, items: list[_DensityItem], calibration: CalibrationResult,
                      groups: list[list[float]], t_warmup: float) -> list[int] | None:
    """The incumbent's option index per item, or None if it changes strategy inside a step group or uses an
    uncalibrated strategy (then it is not a point of this search space)."""
    choice = []
    for item in items:
        site_plan = plan.site(item.site)
        stats = calibration.sites[item.site]
        times = [stats.times[i] for i in _post_warmup_samples(stats, t_warmup)
                 if any(abs(stats.times[i] - t) < 1e-9 for t in groups[item.group])]
        picked = {(site_plan.strategies_at(t)[item.head] if site_plan else Dense()).label() for t in times}
        if len(picked) != 1:
            return None
        label = picked.pop()
        index = next((k for k, o in enumerate(item.options) if o.label == label), None)
        if index is None:
            return None
        choice.append(index)
    return choice


def _post_warmup_items(calibration: CalibrationResult, config: SearchConfig,
                       ) -> tuple[float, list[float], list[list[float]], list[_DensityItem]]:
    """The warm-up cut, the calibration times after it (noisiest first), their step groups and the knapsack items."""
    t_warmup = 1.0 - config.min_dense_warmup
    times = sorted({t for stats in calibration.sites.values() for t in stats.times if t <= t_warmup + 1e-9}, reverse=True)
    if not times:
        raise ValueError(f"no calibration sample after the dense warm-up (t <= {t_warmup:g}); lower min_dense_warmup "
                         "or record later denoising steps")
    groups = _step_groups(times, config.max_step_ranges)
    return t_warmup, times, groups, _density_items(calibration, groups, t_warmup)


def _density_choice(calibration: CalibrationResult, config: SearchConfig, incumbents: list[Plan],
                    ) -> tuple[list[_DensityItem], list[int], list[list[float]], float, dict[str, Any]]:
    """Solve the density knapsack; returns the items, the chosen option per item, the step groups, the warm-up time
    and what the predictions should record (objective, lower bound, winning incumbent)."""
    t_warmup, _, groups, items = _post_warmup_items(calibration, config)
    options = [item.options for item in items]
    capacity = config.density_bins
    unit = config.density_budget / capacity

    def weights(rounding: Any) -> list[list[int]]:
        return [[int(rounding(o.weight / unit + (-1e-9 if rounding is math.ceil else 1e-9))) for o in opts]
                for opts in options]

    allowed = [list(range(len(opts))) for opts in options]
    found = _dp(options, allowed, weights(math.ceil), capacity)
    if found is None:
        raise RuntimeError("no plan meets the density budget even with every head at its sparsest candidate")
    objective, choice = found
    lower = _dp(options, allowed, weights(math.floor), capacity)
    lower_bound = min(objective, lower[0]) if lower is not None else 0.0
    winner = None
    for plan in incumbents:
        picked = _incumbent_choice(plan, items, calibration, groups, t_warmup)
        if picked is None:
            continue
        density = sum(options[k][i].weight for k, i in enumerate(picked))
        value = sum(options[k][i].cost for k, i in enumerate(picked))
        if density <= config.density_budget * (1 + 1e-9) and value < objective - 1e-15:
            objective, choice, winner = value, picked, plan.search.get("method", "incumbent")
    record = {"predicted_sq_error": objective, "lower_bound_sq_error": lower_bound,
              "objective": ("model-output relative squared error, sites weighted by measured output gains"
                            if _output_gains(calibration) else "sum over sites of squared relative attention error "
                            "(calibration measured no output gains)"),
              "density_after_warmup": sum(options[k][i].weight for k, i in enumerate(choice)),
              "density_budget": config.density_budget, "from_incumbent": winner,
              "optimality_gap": (objective - lower_bound) / objective if objective > 0 else 0.0}
    return items, choice, groups, t_warmup, record


# ---------------------------------------------------------------------------------------------------------------
# Time budget: the same objective at a mean attention time, head groups priced by SiteCosts


@dataclass(frozen=True)
class LaunchCost:
    """Seconds of one head group at a site: ``fixed`` once per launch (shared, as the largest, by the candidates of
    one launch group), ``per_head`` for each head in it, ``own`` once per candidate in use even where it shares its
    launch (a dynamic selection's estimation work, whose lists join the launch of its token order)."""

    fixed: float
    per_head: float
    own: float = 0.0


@dataclass
class SiteCosts:
    """Attention seconds of any head assignment at each site.

    ``per_site[site][label]``: the :class:`LaunchCost` of a group running candidate ``label`` (``"dense"``
    included); ``mixing[site]``: added once when the site runs more than one launch (selecting head subsets and
    assembling the output); ``source``: where the figures come from; ``launch_groups[label]``: the launch the
    candidate's heads join (:meth:`Strategy.launch_group`): candidates of one launch group run as one launch, so
    together they pay the largest of their fixed costs once (labels not listed run their own launch);
    ``shared_mixing[site]``: added per launch that holds several candidates (joining their lists, heads back in
    order).
    """

    per_site: dict[str, dict[str, LaunchCost]]
    mixing: dict[str, float]
    source: str
    launch_groups: dict[str, str] = field(default_factory=dict)
    shared_mixing: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "mixing": self.mixing, "launch_groups": self.launch_groups,
                "shared_mixing": self.shared_mixing,
                "per_site": {site: {label: {"fixed": c.fixed, "per_head": c.per_head, "own": c.own}
                                    for label, c in table.items()}
                             for site, table in self.per_site.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteCosts:
        return cls({site: {label: LaunchCost(c["fixed"], c["per_head"], c.get("own", 0.0)) for label, c in table.items()}
                    for site, table in data["per_site"].items()}, dict(data["mixing"]), data["source"],
                   dict(data.get("launch_groups", {})), dict(data.get("shared_mixing", {})))

    def launch_group_indices(self, labels: Sequence[str]) -> list[int]:
        """Per label, the index of its launch group among ``labels``' groups (equal index: one launch)."""
        keys: dict[str, int] = {}
        return [keys.setdefault(self.launch_groups.get(label, f"own:{label}"), len(keys)) for label in labels]

    def seconds(self, site: str, labels: Sequence[str]) -> float:
        """Seconds of one call of ``site`` with head ``h`` running ``labels[h]``."""
        table = self.per_site[site]
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        missing = [label for label in counts if label not in table]
        if missing:
            raise ValueError(f"no cost for {missing[0]!r} at site {site}; measure or price every calibrated candidate")
        used = list(counts)
        fixed = np.array([table[label].fixed for label in used])
        launches = Launches(self.launch_group_indices(used), self.shared_mixing.get(site, 0.0),
                            [table[label].own for label in used])
        return (sum(table[label].per_head * n for label, n in counts.items())
                + _launch_fixed(fixed, self.mixing.get(site, 0.0), range(len(used)), launches))

    @classmethod
    def from_cost_model(cls, calibration: CalibrationResult, target: str = "h100",
                        config: SearchConfig = SearchConfig()) -> SiteCosts:
        """Prices from the target's cost model at each candidate's mean calibrated density (no mixing cost)."""
        cost = CostModel.for_target(target)
        per_site: dict[str, dict[str, LaunchCost]] = {}
        for name, stats in calibration.sites.items():
            problem = _SiteProblem(stats, calibration.candidates, cost, config)
            table = {}
            for label, strategy in [("dense", Dense()), *calibration.candidates.items()]:
                if label != "dense" and label not in stats.density:
                    continue
                values = [d for sample in stats.density.get(label, [[1.0]]) for d in sample]
                priced = problem.strategy_cost(label, strategy, sum(values) / len(values))
                # The attention kernel's launch is what a launch group shares; selection and clustering launches
                # are each candidate's own.
                launch = sum(v for key, v in priced.groups.items() if key.startswith("kernel:"))
                table[label] = LaunchCost(launch, priced.per_head, sum(priced.groups.values()) - launch)
            per_site[name] = table
        return cls(per_site, {name: 0.0 for name in per_site}, f"cost model for {target}",
                   candidate_launch_groups(calibration.candidates))


def candidate_launch_groups(candidates: dict[str, Strategy]) -> dict[str, str]:
    """``SiteCosts.launch_groups`` of calibration candidates (and ``"dense"``)."""
    return {"dense": "dense", **{label: strategy.launch_group() for label, strategy in candidates.items()}}


def _blocks(items: list[_DensityItem]) -> dict[tuple[str, int], list[int]]:
    """Item indices per (site, step group), in head order."""
    out: dict[tuple[str, int], list[int]] = {}
    for k, item in enumerate(items):
        out.setdefault((item.site, item.group), []).append(k)
    return out


def _block_seconds(costs: SiteCosts, items: list[_DensityItem], members: list[int], picks: list[int]) -> float:
    site = items[members[0]].site
    return costs.seconds(site, [items[k].options[i].label for k, i in zip(members, picks)])


def predicted_attention_seconds(plan: Plan, calibration: CalibrationResult, costs: SiteCosts,
                                t_warmup: float) -> float:
    """Mean attention seconds per call after the warm-up (all calibrated sites) of ``plan``, priced by ``costs``
    at every calibration time with ``t <= t_warmup``."""
    total, times = 0.0, sorted({t for st in calibration.sites.values() for t in st.times if t <= t_warmup + 1e-9})
    if not times:
        raise ValueError(f"no calibration sample with t <= {t_warmup:g}")
    for t in times:
        for name, stats in calibration.sites.items():
            site_plan = plan.site(name)
            labels = [s.label() for s in site_plan.strategies_at(t)] if site_plan else ["dense"] * stats.site.heads
            total += costs.seconds(name, labels)
    return total / len(times)


def _time_choice(calibration: CalibrationResult, config: SearchConfig, costs: SiteCosts, incumbents: list[Plan],
                 ) -> tuple[list[_DensityItem], list[int], list[list[float]], float, dict[str, Any]]:
    """Least predicted error at mean attention seconds per step <= the budget; same returns as _density_choice."""
    t_warmup, times, groups, items = _post_warmup_items(calibration, config)
    budget = config.time_budget_ms * 1e-3
    blocks = _blocks(items)
    # Per block: the error of every option per head, and every allowed group set with its seconds.
    prepared = []
    for (site, g), members in blocks.items():
        weight = len(groups[g]) / len(times)  # share of the post-warm-up steps this step group covers
        error = np.array([[o.cost for o in items[k].options] for k in members])  # [heads, labels]
        labels = [o.label for o in items[members[0]].options]
        table = costs.per_site.get(site)
        if table is None or any(label not in table for label in labels):
            raise ValueError(f"SiteCosts has no price for every calibrated candidate at site {site}")
        per_head = np.array([table[label].per_head for label in labels]) * weight
        fixed = np.array([table[label].fixed for label in labels]) * weight
        mixing = costs.mixing.get(site, 0.0) * weight
        launches = Launches(costs.launch_group_indices(labels), costs.shared_mixing.get(site, 0.0) * weight,
                            np.array([table[label].own for label in labels]) * weight)
        # Every set of 1..max_site_groups options, by size then lexicographically (ties go to the first listed).
        sets = []
        for r in range(1, min(config.max_site_groups, len(labels)) + 1):
            combos = np.array(list(itertools.combinations(range(len(labels)), r)), dtype=np.int64)
            sets.append((combos, np.array([_launch_fixed(fixed, mixing, combo, launches) for combo in combos])))
        prepared.append((members, error, per_head, fixed, mixing, launches, sets))

    def solve(lam: float) -> tuple[float, float, list[int]]:
        err_total, sec_total = 0.0, 0.0
        choice = [0] * len(items)
        heads_axis = None
        for members, error, per_head, fixed, mixing, launches, sets in prepared:
            value = error + lam * per_head[None, :]  # [heads, labels]
            best: tuple[float, np.ndarray] | None = None
            for combos, combo_fixed in sets:
                local = value[:, combos]  # [heads, sets, r]
                totals = local.min(2).sum(0) + lam * combo_fixed
                s = int(totals.argmin())
                if best is None or totals[s] < best[0] - 1e-18:
                    heads_axis = np.arange(len(members))
                    best = (float(totals[s]), combos[s][local[:, s, :].argmin(1)])
            picks = [int(i) for i in best[1]]  # type: ignore[index]
            err_total += float(error[heads_axis, picks].sum())
            sec_total += _prepared_block_seconds(per_head, fixed, mixing, picks, launches)
            for k, i in zip(members, picks):
                choice[k] = i
        return err_total, sec_total, choice

    lo, hi = 0.0, 1.0
    error, seconds, choice = solve(hi)
    while seconds > budget * (1 + 1e-9):
        if hi > 1e15:
            raise RuntimeError(f"no plan meets the time budget {config.time_budget_ms:g} ms per step even at the "
                               f"fastest option of every head (fastest found: {seconds * 1e3:.3f} ms)")
        lo, hi = hi, hi * 16
        error, seconds, choice = solve(hi)
    for _ in range(60):  # the least multiplier (least error) that still meets the budget
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        e, sec, c = solve(mid)
        if sec <= budget * (1 + 1e-9):
            hi, error, seconds, choice = mid, e, sec, c
        else:
            lo = mid
        if lo > 0 and hi / lo < 1 + 1e-6:
            break
    # Per block: its heads' item indices, error table, per-head and group seconds, mixing cost, the options'
    # launches (sets dropped).
    blocks_table = [entry[:6] for entry in prepared]
    solver, lower_bound = "lagrangian", None
    if config.max_site_groups <= 2:
        exact = _exact_time_dp([entry[1:] for entry in blocks_table], budget, config.time_bins, config.max_site_groups)
        if exact is not None:
            exact_error, exact_seconds, exact_picks, lower_bound = exact
            if exact_error < error - 1e-15:
                error, seconds, solver = exact_error, exact_seconds, "exact DP"
                for (members, *_), picks in zip(blocks_table, exact_picks):
                    for k, i in zip(members, picks):
                        choice[k] = int(i)
    winner = None
    for plan in incumbents:
        picked = _incumbent_choice(plan, items, calibration, groups, t_warmup)
        if picked is None:
            continue
        inc_error = sum(items[k].options[i].cost for k, i in enumerate(picked))
        inc_seconds = sum(_block_seconds(costs, items, members, [picked[k] for k in members])
                          * len(groups[g]) / len(times) for (_, g), members in blocks.items())
        if inc_seconds <= budget * (1 + 1e-9) and inc_error < error - 1e-15:
            error, seconds, choice, winner = inc_error, inc_seconds, picked, plan.search.get("method", "incumbent")
    choice, moves = _exchange_moves(blocks_table, choice, budget, config.max_site_groups)
    if moves:
        error = sum(items[k].options[i].cost for k, i in enumerate(choice))
        seconds = sum(_prepared_block_seconds(per_head, fixed, mixing, [choice[k] for k in members], launches)
                      for members, _, per_head, fixed, mixing, launches in blocks_table)
    record = {"predicted_sq_error": error,
              "objective": ("model-output relative squared error, sites weighted by measured output gains"
                            if _output_gains(calibration) else "sum over sites of squared relative attention error "
                            "(calibration measured no output gains)"),
              "predicted_attention_ms": seconds * 1e3, "time_budget_ms": config.time_budget_ms,
              "site_costs": costs.source, "max_site_groups": config.max_site_groups,
              "density_after_warmup": sum(items[k].options[i].weight for k, i in enumerate(choice)),
              "from_incumbent": winner if not moves else None,
              "started_from_incumbent": winner, "exchange_moves": moves, "solver": solver,
              "lower_bound_sq_error": lower_bound,
              # The Lagrangian alone (more than 2 groups per site) gives no bound; the DP's floor-rounded twin does.
              "optimality_gap": None if lower_bound is None else (
                  max(0.0, (error - lower_bound) / error) if error > 0 else 0.0)}
    return items, choice, groups, t_warmup, record


def _block_frontier(error: np.ndarray, per_head: np.ndarray, fixed: np.ndarray, mixing: float, max_groups: int = 2,
                    launches: Launches | None = None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Every assignment of one block's heads to at most ``max_groups`` (1 or 2) options that no other beats on both
    time and error: (seconds, error, per-head options), fastest first. With one option every head runs it; with
    two, a and b, the time depends only on how many heads run b (per-head cost is the option's), so for each count
    the heads whose error gains most from b take it: the list is exact, not a heuristic. Options of one launch
    group (``launches``) share their launch: a and b together pay the larger fixed cost and the shared mixing cost
    instead of both fixed costs and the mixing cost."""
    heads, labels = error.shape
    secs, errs, picks = [], [], []
    for a in range(labels):
        secs.append(per_head[a] * heads + _launch_fixed(fixed, mixing, (a,), launches))
        errs.append(float(error[:, a].sum()))
        picks.append(np.full(heads, a))
    for a, b in itertools.combinations(range(labels), 2) if max_groups >= 2 else ():
        pair_fixed = _launch_fixed(fixed, mixing, (a, b), launches)
        gain = error[:, b] - error[:, a]
        order = np.argsort(gain, kind="stable")
        running = float(error[:, a].sum()) + np.cumsum(gain[order])
        for count in range(1, heads):
            secs.append(per_head[a] * (heads - count) + per_head[b] * count + pair_fixed)
            errs.append(float(running[count - 1]))
            assignment = np.full(heads, a)
            assignment[order[:count]] = b
            picks.append(assignment)
    order = sorted(range(len(secs)), key=lambda j: (secs[j], errs[j]))
    keep, best = [], math.inf
    for j in order:
        if errs[j] < best - 1e-18:
            keep.append(j)
            best = errs[j]
    return np.array([secs[j] for j in keep]), np.array([errs[j] for j in keep]), [picks[j] for j in keep]


def _exact_time_dp(blocks: list[tuple], budget: float, bins: int,
                   max_groups: int = 2) -> tuple[float, float, list[np.ndarray], float] | None:
    """Least total error at total seconds <= ``budget`` with at most ``max_groups`` (1 or 2) groups per block: a
    multiple-choice knapsack over each block's frontier, seconds rounded up to ``budget / bins`` (so the result
    meets the budget), and again rounded down for a lower bound on the true optimum. Returns (error, seconds,
    per-block head options, lower bound), or None when even the fastest frontier points overrun the budget once
    rounded up."""
    # blocks: (error, per_head, fixed, mixing[, launches]) each.
    frontiers = [_block_frontier(*block[:4], max_groups, *block[4:]) for block in blocks]
    options = [[Option(str(j), float(e), frozenset()) for j, e in enumerate(errs)] for _, errs, _ in frontiers]
    allowed = [list(range(len(o))) for o in options]
    unit = budget / bins

    def weights(rounding: Any) -> list[list[int]]:
        return [[int(rounding(x / unit + (-1e-9 if rounding is math.ceil else 1e-9))) for x in secs]
                for secs, _, _ in frontiers]

    found = _dp(options, allowed, weights(math.ceil), bins)
    if found is None:
        return None
    error, picked = found
    lower = _dp(options, allowed, weights(math.floor), bins)
    seconds = float(sum(frontiers[b][0][i] for b, i in enumerate(picked)))
    return error, seconds, [frontiers[b][2][i] for b, i in enumerate(picked)], (
        min(error, lower[0]) if lower is not None else 0.0)


@dataclass(frozen=True)
class Launches:
    """How a block's options run: ``group_of[i]``, the launch group of option ``i`` (options of one group run as
    one launch); ``shared_mixing``: seconds added per launch that holds more than one option (joining their lists
    and putting heads back in order); ``own[i]``: seconds option ``i`` adds once when used, whoever shares its
    launch (:attr:`LaunchCost.own`; empty: none)."""

    group_of: Sequence[int]
    shared_mixing: float = 0.0
    own: Sequence[float] = ()


def _launch_fixed(fixed: np.ndarray, mixing: float, used: Iterable[int], launches: Launches | None) -> float:
    """Fixed seconds of a block running options ``used``: per launch (``launches``; None: every option its own) the
    largest fixed cost of its options in use plus, where it holds several, the shared mixing cost; plus ``mixing``
    when more than one launch runs; plus each used option's own seconds (``launches.own``)."""
    used = list(used)
    largest: dict[int, float] = {}
    options: dict[int, int] = {}
    for i in used:
        key = int(i) if launches is None else int(launches.group_of[i])
        largest[key] = max(largest.get(key, 0.0), float(fixed[i]))
        options[key] = options.get(key, 0) + 1
    shared = 0.0 if launches is None else launches.shared_mixing * sum(1 for n in options.values() if n > 1)
    own = 0.0 if launches is None or not len(launches.own) else float(sum(launches.own[i] for i in used))
    return sum(largest.values()) + shared + own + (mixing if len(largest) > 1 else 0.0)


def _prepared_block_seconds(per_head: np.ndarray, fixed: np.ndarray, mixing: float, picks: Sequence[int],
                            launches: Launches | None = None) -> float:
    """Seconds of one (site, step group) block with head ``h`` on option ``picks[h]`` (step-group weight included);
    options in one launch group (``launches``) share their launch."""
    return float(per_head[list(picks)].sum()) + _launch_fixed(fixed, mixing, set(picks), launches)


#: Most improving moves considered per side when pairing a time-saving change with an error-reducing one.
EXCHANGE_CANDIDATES = 384


def _block_moves(error: np.ndarray, per_head: np.ndarray, fixed: np.ndarray, mixing: float, picks: list[int],
                 max_site_groups: int, launches: Launches | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every single-head change at one block: seconds and error change, ``[heads, options]`` (``inf`` seconds where
    the change is no move or would exceed ``max_site_groups`` options)."""
    heads, labels = error.shape
    current = np.asarray(picks)
    counts = np.bincount(current, minlength=labels)
    used = {int(i) for i in np.flatnonzero(counts)}
    base = _launch_fixed(fixed, mixing, used, launches)
    # The fixed seconds after a move depend only on which option empties (if any) and which one is joined.
    after_fixed: dict[tuple[int, int], float] = {}
    d_sec = np.full((heads, labels), np.inf)
    for h in range(heads):
        c = int(current[h])
        leaving = c if counts[c] == 1 else -1
        for i in range(labels):
            if i == c:
                continue
            after = (used - {leaving}) | {i}
            if len(after) > max_site_groups:
                continue
            if (leaving, i) not in after_fixed:
                after_fixed[(leaving, i)] = _launch_fixed(fixed, mixing, after, launches)
            d_sec[h, i] = per_head[i] - per_head[c] + after_fixed[(leaving, i)] - base
    d_err = error - error[np.arange(heads), current][:, None]
    return d_sec, d_err


def _exchange_moves(blocks: list[tuple[list[int], np.ndarray, np.ndarray, np.ndarray, float]], choice: list[int],
                    budget: float, max_site_groups: int, max_rounds: int | None = None) -> tuple[list[int], int]:
    """Local search after the Lagrangian: apply, while one exists, the move that lowers the predicted error most
    within the time budget, a move being one head's change of option or two such changes at different blocks (one
    that frees time, one that spends it). The Lagrangian only reaches points on the convex hull of (time, error),
    and an incumbent kept because it beats that point may still be one exchange away from a better plan; each move
    lowers the error strictly, so the search ends (``max_rounds`` caps it, default 2 x heads + 16). Returns the new
    choice and the number of moves applied."""
    choice = list(choice)
    blocks = [(*block, None) if len(block) == 5 else block for block in blocks]
    picks = [[choice[k] for k in members] for members, *_ in blocks]
    block_sec = [_prepared_block_seconds(per_head, fixed, mixing, p, launches)
                 for (_, _, per_head, fixed, mixing, launches), p in zip(blocks, picks)]
    moves_of = [_block_moves(error, per_head, fixed, mixing, p, max_site_groups, launches)
                for (_, error, per_head, fixed, mixing, launches), p in zip(blocks, picks)]
    shapes = [m[0].shape for m in moves_of]
    block_of = np.concatenate([np.full(h * w, b) for b, (h, w) in enumerate(shapes)]) if shapes else np.zeros(0)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    total = sum(block_sec)
    moves = 0
    limit = max_rounds if max_rounds is not None else 2 * sum(len(m) for m, *_ in blocks) + 16
    for _ in range(limit):
        slack = budget * (1 + 1e-9) - total
        sec = np.concatenate([m[0].ravel() for m in moves_of])
        err = np.concatenate([m[1].ravel() for m in moves_of])
        valid = np.isfinite(sec)
        best_gain, best = -1e-15, None
        single = np.flatnonzero(valid & (sec <= slack))
        if single.size:
            j = int(single[np.argmin(err[single])])
            if err[j] < best_gain:
                best_gain, best = float(err[j]), (j,)
        # Pairs: a change that frees time (least error added per second saved first) with one that lowers the error.
        savers = np.flatnonzero(valid & (sec < 0))
        savers = savers[np.argsort(err[savers] / -sec[savers], kind="stable")][:EXCHANGE_CANDIDATES]
        spenders = np.flatnonzero(valid & (err < 0))
        spenders = spenders[np.argsort(err[spenders], kind="stable")][:EXCHANGE_CANDIDATES]
        if savers.size and spenders.size:
            fits = ((sec[savers][:, None] + sec[spenders][None, :]) <= slack) & (
                block_of[savers][:, None] != block_of[spenders][None, :])
            gain = np.where(fits, err[savers][:, None] + err[spenders][None, :], np.inf)
            a, c = np.unravel_index(int(np.argmin(gain)), gain.shape)
            if gain[a, c] < best_gain:
                best_gain, best = float(gain[a, c]), (int(savers[a]), int(spenders[c]))
        if best is None:
            break
        for j in best:
            b = int(block_of[j])
            h, i = divmod(int(j - starts[b]), shapes[b][1])
            members, error, per_head, fixed, mixing, launches = blocks[b]
            picks[b][h] = i
            choice[members[h]] = i
            new_sec = _prepared_block_seconds(per_head, fixed, mixing, picks[b], launches)
            total += new_sec - block_sec[b]
            block_sec[b] = new_sec
            moves_of[b] = _block_moves(error, per_head, fixed, mixing, picks[b], max_site_groups, launches)
        moves += 1
    return choice, moves


def _density_schedules(calibration: CalibrationResult, cost: CostModel, config: SearchConfig, incumbents: list[Plan],
                       site_costs: SiteCosts | None = None,
                       ) -> tuple[dict[str, list[tuple[float, float, _RangeResult]]], dict[str, Any]]:
    """Per site, its ranges (t_start, t_end, result) under the density (or time) budget; plus the search-wide record."""
    if config.budget == "time":
        if site_costs is None:
            raise ValueError("budget='time' needs site_costs (SiteCosts.from_cost_model or measured timings)")
        items, choice, groups, t_warmup, record = _time_choice(calibration, config, site_costs, incumbents)
    else:
        items, choice, groups, t_warmup, record = _density_choice(calibration, config, incumbents)
    picked: dict[tuple[str, int], list[Option]] = {}
    for item, i in zip(items, choice):
        picked.setdefault((item.site, item.group), []).append(item.options[i])
    bounds = [t_warmup] + [(a[-1] + b[0]) / 2 for a, b in itertools.pairwise(groups)] + [0.0]
    out: dict[str, list[tuple[float, float, _RangeResult]]] = {}
    for name, stats in calibration.sites.items():
        problem = _SiteProblem(stats, calibration.candidates, cost, config)
        dense = problem.dense_option()
        ranges: list[tuple[float, float, _RangeResult]] = []
        if t_warmup < 1.0:
            warm = [Option("dense", dense.cost, dense.groups, reason="forced dense warm-up")] * stats.site.heads
            ranges.append((1.0, t_warmup, _range_result(problem, warm, 0.0, "dense warm-up")))
        g = 0
        while g < len(groups):
            last = g  # adjacent groups with the same strategies become one range
            labels = [o.label for o in picked[(name, g)]]
            while last + 1 < len(groups) and [o.label for o in picked[(name, last + 1)]] == labels:
                last += 1
            chosen = [_merged_option(picked, name, h, g, last, groups) for h in range(stats.site.heads)]
            samples = [i for i in _post_warmup_samples(stats, t_warmup)
                       if any(abs(stats.times[i] - t) < 1e-9 for grp in groups[g:last + 1] for t in grp)]
            site_error = sum(sum(_site_sample_terms(stats, i, labels)[0]) for i in samples) / len(samples)
            for_seconds = [Option(o.label, *_priced(problem, o), o.weight, o.recall, o.rel_error, o.density)
                           for o in chosen]
            result = _range_result(problem, for_seconds, math.sqrt(site_error), "density knapsack")
            ranges.append((bounds[g], bounds[last + 1], result))
            g = last + 1
        out[name] = ranges
    return out, record


def _merged_option(picked: dict[tuple[str, int], list[Option]], site: str, head: int, first: int, last: int,
                   groups: list[list[float]]) -> Option:
    """One head's option over step groups ``first..last`` (same label): recall, error and density averaged by size."""
    parts = [(picked[(site, g)][head], len(groups[g])) for g in range(first, last + 1)]
    size = sum(n for _, n in parts)
    head_option = parts[0][0]
    return Option(head_option.label, head_option.cost, head_option.groups, sum(o.weight for o, _ in parts),
                  sum(o.recall * n for o, n in parts) / size,
                  math.sqrt(sum(o.rel_error**2 * n for o, n in parts) / size), sum(o.density * n for o, n in parts) / size)


def _priced(problem: _SiteProblem, option: Option) -> tuple[float, frozenset[str]]:
    """Per-head seconds and fused groups of ``option`` at its density (dense: the site's dense option)."""
    if option.label == "dense":
        dense = problem.dense_option()
        return dense.cost, dense.groups
    cost = problem.strategy_cost(option.label, problem.candidates[option.label], option.density)
    return cost.per_head, frozenset(cost.groups)


def _range_result(problem: _SiteProblem, chosen: list[Option], rel_error: float, why: str) -> _RangeResult:
    """Seconds (per-head work + fixed cost of every fused group used) and report of one range's head choices."""
    dense = problem.dense_option()
    fixed = problem.fixed()
    used = frozenset().union(*(c.groups for c in chosen))
    seconds = sum(c.cost for c in chosen) + sum(fixed.get(k, 0.0) for k in used)
    dense_seconds = len(chosen) * dense.cost + sum(fixed.get(k, 0.0) for k in dense.groups)
    kinds: dict[str, int] = {}
    for c in chosen:
        kind = attention_kernel(problem.candidates.get(c.label, Dense()))
        kinds[kind] = kinds.get(kind, 0) + 1
    explanations = [HeadExplanation(c, None, []) for c in chosen]
    report = RangeReport(0.0, 0.0, explanations, seconds, dense_seconds, 0.0, rel_error, kinds)
    strategies = [problem.candidates.get(c.label, Dense()) for c in chosen]
    return _RangeResult(0, 0, chosen, strategies, seconds, dense_seconds, 0.0, rel_error, report)


def search_with_report(model: nn.Module, calibration: CalibrationResult, sites: list[AttentionSite],
                       target: str = "h100", config: SearchConfig = SearchConfig(),
                       incumbents: Sequence[Plan] = (), site_costs: SiteCosts | None = None,
                       ) -> tuple[Plan, SearchReport]:
    """:func:`search`, also returning what it decided and why (for ``--explain``)."""
    calibration = restrict_candidates(calibration, config.strategies)
    cost = CostModel.for_target(target)
    report = SearchReport(config, target)
    per_site: dict[str, list[tuple[float, float, _RangeResult]]] = {}
    record: dict[str, Any] = {}
    if config.budget in ("density", "time"):
        if config.budget == "time" and site_costs is None:
            site_costs = SiteCosts.from_cost_model(calibration, target, config)
        per_site, record = _density_schedules(calibration, cost, config, list(incumbents), site_costs)
    else:
        stats_list = list(calibration.sites.values())
        for stats in tqdm(stats_list, desc="vdopt: searching sites", leave=False, disable=not config.progress or None):
            problem = _SiteProblem(stats, calibration.candidates, cost, config)
            per_site[stats.site.name] = [(problem.bounds[r.lo], problem.bounds[r.hi], r) for r in _schedule(problem)]
    site_plans: list[SitePlan] = []
    dense_total = chosen_total = 0.0
    weighted_error = weighted_density = total_width = 0.0
    max_error, min_recall, max_gap = 0.0, 1.0, 0.0
    for name, ranges in per_site.items():
        stats = calibration.sites[name]
        schedule = []
        for t_start, t_end, r in ranges:
            width = t_start - t_end
            density = sum(c.density for c in r.chosen) / len(r.chosen)
            predicted = {
                "density": density, "speedup": r.dense_seconds / r.seconds, "rel_error": r.rel_error,
                "min_recall": min(c.recall for c in r.chosen), "predicted_ms": r.seconds * 1e3,
                "dense_ms": r.dense_seconds * 1e3, "optimality_gap": r.gap,
                "head_density": [c.density for c in r.chosen], "head_recall": [c.recall for c in r.chosen],
                "head_rel_error": [c.rel_error for c in r.chosen],
            }
            schedule.append(StepRange(t_start, t_end, r.strategies, predicted))
            r.report.t_start, r.report.t_end = t_start, t_end
            dense_total += width * r.dense_seconds
            chosen_total += width * r.seconds
            weighted_error += width * r.rel_error
            weighted_density += width * density
            total_width += width
            max_error, max_gap = max(max_error, r.rel_error), max(max_gap, r.gap)
            min_recall = min(min_recall, *(c.recall for c in r.chosen))
        site_plans.append(SitePlan(name, stats.site.heads, stats.block_size, schedule))
        report.sites[name] = [r.report for _, _, r in ranges]
    attention_speedup = dense_total / chosen_total if chosen_total else 1.0
    share = config.attention_share
    starts = [r.t_start for s in site_plans for r in s.schedule if not all(isinstance(h, Dense) for h in r.heads)]
    budgets = {"recall": f"recall >= {config.recall_budget:g} per head",
               "error": f"site relative error <= {config.error_budget:g}",
               "density": f"least predicted error at mean density <= {config.density_budget:g} after the warm-up",
               "time": f"least predicted error at mean attention time <= {config.time_budget_ms:g} ms per step after "
                       "the warm-up"}
    predictions: dict[str, Any] = {
        "attention_speedup": attention_speedup,
        "end_to_end_speedup": 1.0 / ((1.0 - share) + share / attention_speedup),
        "attention_share": share,
        "attention_share_source": ("SearchConfig.attention_share" if share != WAN_1_3B_ATTENTION_SHARE else
                                   "DESIGN.md: Wan2.1-1.3B eager step on H100, self-attention 55% of 1249 ms"),
        "attention_density": weighted_density / total_width if total_width else 1.0,
        "attention_rel_error": weighted_error / total_width if total_width else 0.0,
        "max_rel_error": max_error,
        "min_recall": min_recall,
        "dense_warmup_fraction": 1.0 - max(starts) if starts else 1.0,
        "optimality_gap": record.get("optimality_gap", max_gap),
        "quality_budget": budgets[config.budget],
        "cost_model": (f"measured efficiency table ({cost.table.source})" if cost.measured else
                       f"spec peaks x default efficiencies ({cost.defaults.source}); no measured table for {target}"),
        **{k: v for k, v in record.items() if k != "optimality_gap"},
    }
    plan = Plan(
        model=ModelFingerprint.of(model), target=target, sites=site_plans, search=asdict(config),
        predictions=predictions, calibration={**calibration.provenance, "candidates": sorted(calibration.candidates)},
    )
    return plan, report


def search(model: nn.Module, calibration: CalibrationResult, sites: list[AttentionSite], target: str = "h100",
           config: SearchConfig = SearchConfig(), incumbents: Sequence[Plan] = (),
           site_costs: SiteCosts | None = None) -> Plan:
    """Choose a strategy per head, step range and site that minimises predicted latency under the budget (or, with
    ``budget="density"`` / ``"time"``, the predicted error under a density / attention-time budget, the latter priced
    by ``site_costs`` or the target's cost model; ``incumbents`` are plans it must match)."""
    return search_with_report(model, calibration, sites, target, config, incumbents, site_costs)[0]


# ---------------------------------------------------------------------------------------------------------------
# Summary table and heatmaps


def write_heatmaps(plan: Plan, prefix: str | Path) -> list[Path]:
    """Per-site x head maps of strategy, density and recall, one panel per calibration time, as PNGs.

    Writes ``<prefix>_strategy.png``, ``<prefix>_density.png`` and ``<prefix>_recall.png``; returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    prefix = Path(prefix)
    times = plan.calibration.get("times") or sorted({(r.t_start + r.t_end) / 2 for s in plan.sites for r in s.schedule},
                                                    reverse=True)
    times = list(times)[:6]
    heads = max((s.heads for s in plan.sites), default=1)
    names = sorted({h.name for s in plan.sites for r in s.schedule for h in r.heads} | {"dense"})
    code = {n: i for i, n in enumerate(names)}

    def grid(t: float, what: str) -> np.ndarray:
        out = np.full((len(plan.sites), heads), np.nan)
        for i, site in enumerate(plan.sites):
            step = next((r for r in site.schedule if r.contains(t)), None)
            if step is None:
                continue
            for h, strategy in enumerate(step.heads):
                if what == "strategy":
                    out[i, h] = code[strategy.name]
                else:
                    values = step.predicted.get(f"head_{what}")
                    out[i, h] = values[h] if values else (1.0 if isinstance(strategy, Dense) else np.nan)
        return out

    written = []
    for what in ("strategy", "density", "recall"):
        fig, axes = plt.subplots(1, len(times), figsize=(2 + 1.6 * len(times) + 0.15 * heads, 1.5 + 0.25 * len(plan.sites)),
                                 squeeze=False, layout="constrained")
        for ax, t in zip(axes[0], times):
            if what == "strategy":
                cmap = ListedColormap(plt.get_cmap("tab10").colors[: len(names)])
                image = ax.imshow(grid(t, what), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
            else:
                image = ax.imshow(grid(t, what), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_title(f"t = {t:.2f}", fontsize=8)
            ax.set_xlabel("head", fontsize=8)
            ax.set_yticks(range(len(plan.sites)))
            ax.set_yticklabels([s.site for s in plan.sites] if ax is axes[0][0] else [], fontsize=6)
        bar = fig.colorbar(image, ax=list(axes[0]))
        if what == "strategy":
            bar.set_ticks(range(len(names)))
            bar.set_ticklabels(names)
        fig.suptitle(f"{plan.model.class_name} on {plan.target}: {what} per site and head", fontsize=9)
        path = prefix.with_name(f"{prefix.name}_{what}.png")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
