"""The optimized module: a drop-in for the original transformer that runs a plan, re-capturing per input signature."""

from __future__ import annotations

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
        """The callable that runs a captured graph: the graph itself, or with ``compile=True`` its torch.compile.

        Planned attention and step-cache decisions run outside the compiled graphs (they are
        ``torch.compiler.disable``-d), so the dense parts between them (norms, RoPE, modulation, MLP) compile once
        per input signature and are not recompiled as the denoising time moves; the cached blocks compile apart.
        """
        from vdopt.passes.insert_step_cache import StepCache

        if key not in self._runners:
            if not self.compile:
                self._runners[key] = gm
            else:
                for cache in (m for m in gm.modules() if isinstance(m, StepCache)):
                    cache.blocks = torch.compile(cache.blocks, backend=self.compile_backend, dynamic=False)
                self._runners[key] = torch.compile(gm, backend=self.compile_backend, dynamic=False)
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
