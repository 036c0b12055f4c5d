"""Pass: split the graph at the transformer blocks and put a step-cache node around blocks 1..L-1.

The node implements first-block residual reuse (the FirstBlockCache / TeaCache family): block 0 always runs; the
relative change of its output since the last step that ran the rest is accumulated, and while that stays under the
plan's threshold the rest of the blocks is skipped and replaced by the residual (output - input) they produced then.
The threshold, the warm-up steps and the longest run of reuses are chosen offline (``vdopt.caching``) and stored in
the plan. Or, with a schedule plan (LeMiCa), the blocks are skipped on fixed step indices chosen offline. CFG
branches called separately with the same timestep keep separate caches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from vdopt.capture import _block_key
from vdopt.plan import Plan, StepCachePlan
from vdopt.sites import AttentionSite


class CacheUnsupportedError(ValueError):
    """The model's graph has no block structure that a step cache can wrap."""


@dataclass
class CachePolicyState:
    """Where one cache (one CFG branch, one shape) stands in the reuse policy."""

    residual: torch.Tensor | None = None
    accumulated: float = 0.0
    consecutive_reuses: int = 0
    steps: int = 0
    previous_input: torch.Tensor | None = None

    def should_reuse(self, change: float, plan: StepCachePlan) -> bool:
        """The criterion: a scheduled step; or past warm-up, under the run-length limit, accumulated change under
        the threshold."""
        if plan.reuse_steps is not None:
            return self.residual is not None and plan.reuses_step(self.steps)
        return (self.residual is not None and self.steps >= plan.warmup_steps
                and self.consecutive_reuses < plan.max_consecutive_reuses and self.accumulated + change < plan.threshold)

    def record(self, change: float, reused: bool, residual: torch.Tensor | None = None) -> None:
        """Advance by one step: a reuse accumulates the change; a computed step stores its residual and resets."""
        self.steps += 1
        if reused:
            self.accumulated += change
            self.consecutive_reuses += 1
        else:
            self.residual = None if residual is None else residual.detach()
            self.accumulated = 0.0
            self.consecutive_reuses = 0


@dataclass
class CacheStats:
    """What the cache did since the last reset: steps that ran the blocks and steps that reused them."""

    computed: int = 0
    reused: int = 0
    history: list[tuple[float, bool]] = field(default_factory=list)  # (t, reused)


@dataclass
class CacheMemory:
    """What a step cache remembers across calls; shared by the copies of one cache in every phase graph."""

    states: dict[Any, CachePolicyState] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)
    probe: Any = None


class StepCache(nn.Module):
    """Runs ``blocks`` (the graph's blocks 1..L-1) or reuses their last residual, per the plan's criterion.

    ``input_index``: which argument of ``blocks`` is the hidden state entering them (the residual is taken against
    it). In ``probe`` mode the blocks always run and ``probe`` is called with (branch key, input, true residual).
    """

    def __init__(self, blocks: fx.GraphModule, input_index: int, cache_plan: StepCachePlan, clock: nn.Module,
                 memory: CacheMemory | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.input_index = input_index
        self.cache_plan = cache_plan
        self.clock = clock
        self.memory = CacheMemory() if memory is None else memory

    @property
    def states(self) -> dict[Any, CachePolicyState]:
        return self.memory.states

    @property
    def stats(self) -> CacheStats:
        return self.memory.stats

    @property
    def probe(self) -> Any:
        return self.memory.probe

    @probe.setter
    def probe(self, probe: Any) -> None:
        self.memory.probe = probe

    def with_blocks(self, blocks: fx.GraphModule) -> StepCache:
        """The same cache (plan, clock and memory shared) around other blocks, e.g. a phase's lowered graph."""
        return StepCache(blocks, self.input_index, self.cache_plan, self.clock, self.memory)

    def reset(self) -> None:
        self.memory.states.clear()
        self.memory.stats = CacheStats()

    @staticmethod
    def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
        """Mean absolute change relative to the mean magnitude (TeaCache's relative L1 indicator)."""
        return float((current.float() - previous.float()).abs().mean() / previous.float().abs().mean().clamp(min=1e-12))

    # The reuse decision is host-side control flow on measured values: it stays eager, and ``blocks`` is compiled
    # on its own when the model is compiled (vdopt.runtime).
    @torch.compiler.disable
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        hidden = args[self.input_index]
        key = (self.clock.branch, tuple(hidden.shape))
        state = self.states.setdefault(key, CachePolicyState())
        # A fixed schedule needs no measured change (which would synchronise with the device every step).
        measure = self.cache_plan.reuse_steps is None or self.probe is not None
        change = 0.0 if state.previous_input is None or not measure else self.relative_change(hidden, state.previous_input)
        state.previous_input = hidden.detach() if measure else None
        if self.probe is None and state.should_reuse(change, self.cache_plan):
            state.record(change, reused=True)
            self.stats.reused += 1
            self.stats.history.append((self.clock.t, True))
            return hidden + state.residual
        out = self.blocks(*args)
        residual = out - hidden
        if self.probe is not None:
            self.probe(key, hidden, residual, change)
        state.record(change, reused=False, residual=residual)
        self.stats.computed += 1
        self.stats.history.append((self.clock.t, False))
        return out


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values()]


def _block_keys(sites: list[AttentionSite]) -> list[str]:
    keys: list[str] = []
    for site in sites:
        if site.sparsifiable:
            key = _block_key(site.name.split("#")[0])
            if key not in keys:
                keys.append(key)
    return keys


def insert_step_cache(gm: fx.GraphModule, plan: Plan, sites: list[AttentionSite],
                      memory: CacheMemory | None = None) -> fx.GraphModule:
    """New graph module: ``head (embeddings + block 0) -> StepCache(blocks 1..L-1) -> tail``; ``gm`` if no cache.

    ``sites`` are ``gm``'s attention sites; the blocks are the modules that hold them. Idempotent: a graph that
    already holds a StepCache is returned as it is. ``gm`` itself is left unchanged. ``memory``: share the state of
    an existing cache (e.g. the same cache in another phase's graph).
    """
    if plan.cache is None or any(isinstance(m, StepCache) for m in gm.modules()):
        return gm
    keys = _block_keys(sites)
    if len(keys) < 2:
        raise CacheUnsupportedError(
            f"step caching needs at least two transformer blocks with video self-attention; found {keys or 'none'}"
        )
    nodes = list(gm.graph.nodes)

    def in_block(node: fx.Node, key: str) -> bool:
        return any(path == key or path.startswith(key + ".") for path in _module_paths(node))

    first = next(i for i, n in enumerate(nodes) if in_block(n, keys[1]))
    last = max(i for i, n in enumerate(nodes) if in_block(n, keys[-1]))
    position = {node: i for i, node in enumerate(nodes)}
    split = split_module(gm, gm, lambda n: 0 if position[n] < first else (1 if position[n] <= last else 2),
                         keep_original_order=True)
    call = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == "submod_1")
    blocks: fx.GraphModule = split.get_submodule("submod_1")
    out_node = next(n for n in blocks.graph.nodes if n.op == "output")
    outputs = out_node.args[0]
    if isinstance(outputs, (tuple, list)):
        raise CacheUnsupportedError(
            f"the model's blocks pass {len(outputs)} values to the output layers; the step cache "
            "supports one hidden state"
        )
    out_shape = tuple(outputs.meta["val"].shape) if "val" in outputs.meta else None
    placeholders = [n for n in blocks.graph.nodes if n.op == "placeholder"]
    matches = [i for i, p in enumerate(placeholders)
               if "val" in p.meta and isinstance(p.meta["val"], torch.Tensor) and tuple(p.meta["val"].shape) == out_shape]
    if not matches:
        raise CacheUnsupportedError(
            f"no input of blocks 1..{len(keys) - 1} has the shape {out_shape} of their output; cannot form a residual"
        )
    clock = gm.get_submodule("vdopt_clock") if hasattr(gm, "vdopt_clock") else None
    if clock is None:
        from vdopt.passes.sparsify_attention import DenoisingClock

        clock = DenoisingClock()
    split.add_submodule("vdopt_clock", clock)
    split.add_submodule("vdopt_step_cache", StepCache(blocks, matches[0], plan.cache, clock, memory))
    call.target = "vdopt_step_cache"
    split.delete_submodule("submod_1")
    # split_module writes a plain graph; keep the exported module's pytree calling convention (kwargs in, model's
    # output structure out).
    split.graph._codegen = copy.deepcopy(gm.graph._codegen)
    split.graph.lint()
    split.recompile()
    return split
