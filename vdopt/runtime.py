"""The optimized module: a drop-in for the original transformer that runs a plan, re-capturing per input signature."""

from __future__ import annotations

import copy
import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from vdopt.capture import capture, export_kwargs, forward_kwargs
from vdopt.plan import Plan, PlanError
from vdopt.sites import AttentionSite, TokenLayout


def input_signature(value: Any) -> Any:
    """Hashable key of forward inputs: shapes/dtypes/devices of tensors, values of everything else."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, dict):
        return tuple(sorted((k, input_signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(input_signature(v) for v in value)
    return repr(value)


def denoising_time(inputs: dict[str, Any], timestep_arg: str, timestep_scale: float) -> float:
    """Normalised time of a forward call (1 = pure noise) from its timestep argument; 0 when it has none."""
    timestep = inputs.get(timestep_arg)
    if timestep is None:
        return 0.0
    value = float(timestep.float().max()) if isinstance(timestep, torch.Tensor) else float(timestep)
    return value / timestep_scale


def check_plan_sites(plan: Plan, sites: list[AttentionSite]) -> None:
    """Raise PlanError unless every planned site exists in the captured graph with the planned head count."""
    by_name = {site.name: site for site in sites}
    for site_plan in plan.sites:
        site = by_name.get(site_plan.site)
        if site is None:
            raise PlanError(
                f"plan site {site_plan.site!r} is not an attention call of this model (its sites: "
                f"{', '.join(list(by_name)[:4])}...); run vdopt-search again for this model"
            )
        if site.heads != site_plan.heads:
            raise PlanError(f"plan site {site_plan.site!r} has {site_plan.heads} heads but the model's has {site.heads}")
        if not site.sparsifiable and not site_plan.is_dense:
            raise PlanError(f"plan gives sparse heads to {site.name}, which must stay dense: {site.unsupported_reason}")


def _is_boundary(module: nn.Module) -> bool:
    from vdopt.passes.insert_step_cache import StepCache
    from vdopt.passes.sparsify_attention import PlannedAttention

    return isinstance(module, (PlannedAttention, StepCache))


def canonicalize_names(gm: fx.GraphModule) -> fx.GraphModule:
    """Rename every node of ``gm`` by its position (``a0, a1, ...``), in place.

    Structurally identical segments (one per transformer block) then have identical code, so torch.compile's
    FX-graph cache compiles the first and reuses it for the rest, instead of compiling every block anew.
    """
    for i, node in enumerate(gm.graph.nodes):
        if node.op != "output":
            node._rename(f"a{i}")
    gm.recompile()
    return gm


def _block_of(node: fx.Node) -> str | None:
    """The transformer block (``blocks.3``) or top-level module a node belongs to; None for nodes outside any."""
    from vdopt.capture import _block_key

    stack = node.meta.get("nn_module_stack") or {}
    paths = [value[0] for value in stack.values() if value[0]]
    return _block_key(paths[0]) if paths else None


def compile_segments(gm: fx.GraphModule, backend: str = "inductor", fullgraph: bool = False,
                     segment_blocks: bool = False) -> fx.GraphModule:
    """``gm`` split at its planned-attention and step-cache nodes, each stretch in between ``torch.compile``-d.

    The top level runs eagerly: it calls the compiled stretches and the eager nodes in order. A step cache's blocks
    are split and compiled the same way. Outputs equal ``gm``'s; ``gm`` itself is left unchanged. ``fullgraph``:
    each stretch must compile as one graph (dynamo raises on a break). ``segment_blocks``: also cut where one
    transformer block ends and the next begins, so identical blocks compile once (FX-graph cache) instead of as
    one large graph; each cut is a plain call between compiled graphs, not a graph break inside one.
    """
    from torch.fx.passes.split_module import split_module

    from vdopt.passes.insert_step_cache import StepCache

    boundary = {n for n in gm.graph.nodes if n.op == "call_module" and _is_boundary(gm.get_submodule(n.target))}
    if not boundary and not segment_blocks:
        return torch.compile(gm, backend=backend, dynamic=False, fullgraph=fullgraph)
    part, index, block = {}, 0, None
    for node in gm.graph.nodes:
        if node in boundary:
            index += 1
            part[node] = index
            index += 1
            continue
        if segment_blocks and node.op not in ("placeholder", "get_attr", "output"):
            # Nodes a pass put outside the blocks (hoisted permutations) are their own stretch, so identical blocks
            # stay identical segments; other nodes without a module path belong with their neighbours.
            here = "" if node.meta.get("vdopt_outside_blocks") else _block_of(node)
            if here is not None and block is not None and here != block:
                index += 1
            block = here if here is not None else block
        part[node] = index
    split = split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    split.graph._codegen = copy.deepcopy(gm.graph._codegen)
    split.recompile()
    for name, child in list(split.named_children()):
        if not isinstance(child, fx.GraphModule):
            continue
        inner = [m for m in child.modules() if _is_boundary(m)]
        if inner:
            for cache in (m for m in inner if isinstance(m, StepCache)):
                cache.blocks = compile_segments(cache.blocks, backend, fullgraph, segment_blocks)
            continue
        setattr(split, name, torch.compile(canonicalize_names(child), backend=backend, dynamic=False,
                                           fullgraph=fullgraph))
    return split


class OptimizedModel(nn.Module):
    """Runs ``model`` with its attention rewritten by ``plan``; same forward signature and outputs as ``model``.

    Attribute reads it does not define (``config``, ``dtype``, ``device``, ...) go to the wrapped model, so it works
    as ``pipe.transformer``. Each new input signature (shapes, dtypes, non-tensor arguments) is captured once and
    cached; the denoising time is read from the ``timestep`` argument on every call.
    """

    def __init__(self, model: nn.Module, plan: Plan, layout: TokenLayout | None = None, timestep_arg: str = "timestep",
                 compile: bool = False, compile_backend: str = "inductor") -> None:
        super().__init__()
        plan.check_model(model)
        self.model = model
        self.plan = plan
        self.layout = layout
        self.timestep_arg = timestep_arg
        self._graphs: dict[Any, fx.GraphModule] = {}
        self._runners: dict[Any, Any] = {}
        self._sparsified: dict[Any, tuple[fx.GraphModule, Plan, list[AttentionSite]]] = {}
        self.compile = compile
        self.compile_backend = compile_backend
        self._takes_return_dict = "return_dict" in inspect.signature(model.forward).parameters

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forget_graphs(self) -> None:
        """Drop every captured (and compiled) graph, e.g. after the plan changed; the next call captures again."""
        self._graphs.clear()
        self._runners.clear()
        self._sparsified.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> OptimizedModel:
        # Captured graphs hold constants of the old device/dtype: capture again after .to()/.half().
        self.forget_graphs()
        return super()._apply(fn, recurse)

    def _graph_for(self, inputs: dict[str, Any], key: Any) -> fx.GraphModule:
        """The rewritten graph for inputs of signature ``key``, captured on first use (it always has a clock)."""
        from vdopt.passes.insert_step_cache import insert_step_cache
        from vdopt.passes.sparsify_attention import sparsify_attention

        if key not in self._graphs:
            captured = capture(self.model, inputs, self.layout)
            plan = self._plan_for_this_rank(captured.sites)
            check_plan_sites(plan, captured.sites)
            gm = sparsify_attention(captured.graph_module, plan, captured.sites)
            self._sparsified[key] = (gm, plan, captured.sites)
            self._graphs[key] = insert_step_cache(gm, plan, captured.sites)
        return self._graphs[key]

    def _plan_for_this_rank(self, sites: list[AttentionSite]) -> Plan:
        """The plan itself, or under Ulysses the heads this rank holds (after balancing the model's head order)."""
        from vdopt.parallel import apply_head_order, local_site_plan, ulysses_layout

        layout = ulysses_layout(self.model)
        if layout is None:
            return self.plan
        planned = {s.site for s in self.plan.sites}
        global_sites = [replace(s, heads=s.heads * layout.degree) for s in sites if s.name in planned]
        orders = apply_head_order(self.model, self.plan, global_sites, layout.degree)
        local = [local_site_plan(s, orders.get(s.site), layout) for s in self.plan.sites]
        return replace(self.plan, sites=local)

    def _runner_for(self, key: Any, gm: fx.GraphModule) -> Any:
        """The callable that runs a captured graph: the graph itself, or with ``compile=True`` one compiled graph
        per plan phase (:class:`vdopt.passes.lower_attention.PhaseRunner`).

        In each phase's graph the planned sites are straight-line code over vdopt's registered ops, so every stretch
        between step-cache decisions compiles with ``fullgraph=True``; the phase is chosen from the denoising clock
        outside the graphs, so nothing recompiles as the denoising time moves. Sites that cannot be lowered
        (k-means, masked calls) stay eager calls between compiled stretches.
        """
        from vdopt.passes.lower_attention import PhaseRunner

        if key not in self._runners:
            self._runners[key] = PhaseRunner(gm, self.compile_backend, uncached=self._sparsified[key]) \
                if self.compile else gm
        return self._runners[key]

    def step_caches(self) -> list[nn.Module]:
        """The step-cache nodes of every captured graph (empty without a cache plan)."""
        from vdopt.passes.insert_step_cache import StepCache

        return [m for gm in self._graphs.values() for m in gm.modules() if isinstance(m, StepCache)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = forward_kwargs(self.model, args, kwargs)
        want_dict = bool(inputs.pop("return_dict", True)) and self._takes_return_dict
        key = input_signature(inputs)
        gm = self._graph_for(inputs, key)
        if gm.vdopt_clock.advance(denoising_time(inputs, self.timestep_arg, self.plan.timestep_scale)):
            for cache in self.step_caches():
                cache.reset()
        with torch.no_grad():
            out = self._runner_for(key, gm)(**export_kwargs(self.model, inputs))
        if want_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out[0])
        return out
