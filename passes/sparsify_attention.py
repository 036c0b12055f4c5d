"""Pass: replace each planned attention node with a module that runs the plan's strategies for that site."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from vdopt.attention import sparse_site_attention
from vdopt.capture import replace_attention_nodes
from vdopt.plan import Plan, SitePlan
from vdopt.sites import AttentionSite
from vdopt.strategies import Dense, PatternContext, SparsePattern, Strategy

PatternObserver = Callable[[AttentionSite, float, list[int], Strategy, SparsePattern | None], None]
_PATTERN_OBSERVERS: list[PatternObserver] = []


@contextlib.contextmanager
def observe_patterns(observer: PatternObserver) -> Iterator[None]:
    """Within the block, call ``observer(site, t, heads, strategy, pattern)`` for every head group that a planned
    site runs (``pattern`` None where the group runs dense), e.g. to measure the attention density a plan really
    keeps. Sites the plan leaves wholly dense are not rewritten and so are not observed."""
    _PATTERN_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _PATTERN_OBSERVERS.remove(observer)


class DenoisingClock(nn.Module):
    """Where the current forward call is in denoising, shared by every node that depends on it.

    ``t``: normalised time (1 = pure noise); ``branch``: index of this call among calls at the same ``t`` (CFG
    branches run as separate calls); ``video``: count of denoising runs started (``t`` went up).
    """

    def __init__(self) -> None:
        super().__init__()
        self.t = 0.0
        self.branch = 0
        self.video = 0

    def advance(self, t: float) -> bool:
        """Record a new call at time ``t``; True when it starts a new denoising run."""
        new_run = t > self.t + 1e-9 or self.video == 0
        self.branch = self.branch + 1 if (abs(t - self.t) <= 1e-9 and not new_run) else 0
        self.t = t
        if new_run:
            self.video += 1
        return new_run


class PlannedAttention(nn.Module):
    """Drop-in for one ``scaled_dot_product_attention`` call: dense or sparse per head, per the site's schedule."""

    def __init__(self, site: AttentionSite, site_plan: SitePlan, clock: DenoisingClock, seed: int = 0) -> None:
        super().__init__()
        if site.layout is None:
            raise ValueError(f"site {site.name} has no token layout; it cannot run a sparse plan")
        self.site = site
        self.site_plan = site_plan
        self.clock = clock
        # Warm-start state (e.g. k-means centroids) carried from one denoising step to the next.
        self.state: dict = {}
        self.seed = seed

    # Runs outside torch.compile: it reads the denoising clock and builds data-dependent patterns, which would
    # make dynamo specialise on every step; the dense graph around it compiles (see vdopt.runtime).
    @torch.compiler.disable
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        strategies = self.site_plan.strategies_at(self.clock.t)
        if all(s.name == "dense" for s in strategies) or is_causal or dropout_p > 0 or enable_gqa:
            for observer in _PATTERN_OBSERVERS:
                observer(self.site, self.clock.t, list(range(query.shape[1])), Dense(), None)
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa,
            )
        ctx = PatternContext(self.site.layout, self.site_plan.block_size, self.state, self.seed)
        observe = self._notify if _PATTERN_OBSERVERS else None
        return sparse_site_attention(query, key, value, attn_mask, scale, self.site.layout, strategies, ctx, observe)

    def _notify(self, heads: list[int], strategy: Strategy, pattern: SparsePattern | None) -> None:
        for observer in _PATTERN_OBSERVERS:
            observer(self.site, self.clock.t, heads, strategy, pattern)


def sparsify_attention(gm: fx.GraphModule, plan: Plan, sites: list[AttentionSite]) -> fx.GraphModule:
    """New graph module in which every attention node with a non-dense plan entry calls a PlannedAttention module.

    ``sites`` are ``gm``'s attention sites from capture. Idempotent: nodes already replaced are no longer SDPA
    nodes, so a second application changes nothing. Parameters are shared with ``gm``, which is left unchanged.
    """
    clock = gm.get_submodule("vdopt_clock") if hasattr(gm, "vdopt_clock") else DenoisingClock()
    seed = int(plan.calibration.get("seed", 0))

    def planned(site: AttentionSite) -> PlannedAttention | None:
        site_plan = plan.site(site.name)
        if site_plan is None or site_plan.is_dense or not site.sparsifiable:
            return None
        return PlannedAttention(site, site_plan, clock, seed)

    new_gm = replace_attention_nodes(gm, sites, planned, "vdopt_site_")
    if not hasattr(new_gm, "vdopt_clock"):
        new_gm.add_submodule("vdopt_clock", clock)
    return new_gm
