"""Capture: export a transformer to an FX graph and find every attention site in it."""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from vdopt.layout import layout_for_model
from vdopt.sites import AttentionSite, TokenLayout

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass
class CapturedGraph:
    """An exported transformer: its graph module, its attention sites (graph order) and the node of each."""

    graph_module: fx.GraphModule
    sites: list[AttentionSite]
    layout: TokenLayout | None

    def site_nodes(self) -> dict[str, fx.Node]:
        by_name = {node.name: node for node in self.graph_module.graph.nodes}
        return {site.name: by_name[site.node_name] for site in self.sites}


def forward_kwargs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind positional and keyword arguments of ``model.forward`` to a kwargs dict (defaults left out)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return dict(bound.arguments)


def export_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs used to export: ``return_dict=False`` where the model takes it (tuples export, dataclasses not)."""
    out = dict(kwargs)
    if "return_dict" in inspect.signature(model.forward).parameters:
        out["return_dict"] = False
    return out


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    # torch.export may prefix paths with "L['self']." style qualifiers in some versions.
    return re.sub(r"^L\['self'\]\.", "", path) or "<top>"


def _block_key(path: str) -> str:
    match = re.match(r"^(.*?\.\d+)(\.|$)", path)
    return match.group(1) if match else path


def _tensor_meta(node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def _classify_mask(mask: torch.Tensor | None, kv_tokens: int) -> str:
    if mask is None:
        return "none"
    if mask.dim() == 4 and mask.shape[-2] == 1 and mask.shape[-1] == kv_tokens:
        return "key_padding"
    return "other"


def find_attention_sites(gm: fx.GraphModule, layout: TokenLayout | None) -> list[AttentionSite]:
    """Every ``aten.scaled_dot_product_attention`` node of ``gm`` as an AttentionSite, in graph order."""
    sites: list[AttentionSite] = []
    calls_per_module: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        q, k = _tensor_meta(node.args[0]), _tensor_meta(node.args[1])
        if q is None or k is None or q.dim() != 4:
            raise RuntimeError(f"attention node {node.name} has no 4-D tensor metadata; capture it with torch.export")
        mask = _tensor_meta(node.args[3]) if len(node.args) > 3 else _tensor_meta(node.kwargs.get("attn_mask"))
        is_causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
        path = _module_path(node)
        index = calls_per_module.get(path, 0)
        calls_per_module[path] = index + 1
        layer = blocks.setdefault(_block_key(path), len(blocks))
        _batch, heads, q_tokens, head_dim = q.shape
        kv_tokens = k.shape[2]
        kind = "self" if q_tokens == kv_tokens else "cross"
        mask_kind = _classify_mask(mask, kv_tokens)
        site_layout = layout if (layout is not None and kind == "self" and q_tokens == layout.total_tokens) else None
        reason = ""
        if kind == "self":
            if is_causal:
                reason = "causal attention"
            elif mask_kind == "other":
                reason = f"attn_mask of shape {tuple(mask.shape)} is not a key-padding mask"
            elif site_layout is None:
                reason = (
                    f"{q_tokens} tokens do not match the video layout"
                    + (f" ({layout.total_tokens} tokens)" if layout is not None else " (no layout known; pass layout=)")
                )
        sites.append(
            AttentionSite(
                name=f"{path}#{index}", layer=layer, kind=kind, heads=int(heads), head_dim=int(head_dim),
                q_tokens=int(q_tokens), kv_tokens=int(kv_tokens), dtype=str(q.dtype).replace("torch.", ""),
                layout=site_layout, mask=mask_kind, unsupported_reason=reason, node_name=node.name,
            )
        )
    return sites


def capture(model: nn.Module, inputs: dict[str, Any], layout: TokenLayout | None = None) -> CapturedGraph:
    """Export ``model`` (non-strict) at forward kwargs ``inputs`` and list its attention sites.

    ``layout`` overrides the token layout read from the model's config (needed for models vdopt does not know).
    """
    kwargs = export_kwargs(model, inputs)
    with torch.no_grad():
        try:
            program = torch.export.export(model, (), kwargs, strict=False)
        except Exception as error:  # export failures are long; keep the cause and say what to try
            raise RuntimeError(
                f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}. vdopt needs a model that torch.export "
                "(strict=False) can trace at these inputs."
            ) from error
    gm = program.module()
    resolved = layout if layout is not None else layout_for_model(model, inputs)
    return CapturedGraph(graph_module=gm, sites=find_attention_sites(gm, resolved), layout=resolved)


def replace_attention_nodes(
    gm: fx.GraphModule, sites: list[AttentionSite], make_module: Callable[[AttentionSite], nn.Module | None], prefix: str
) -> fx.GraphModule:
    """New graph module (parameters shared, ``gm`` unchanged) in which each SDPA node of ``sites`` calls the module
    ``make_module(site)`` with the node's arguments; sites for which it returns None keep their SDPA node."""
    graph = copy.deepcopy(gm.graph)
    new_gm = fx.GraphModule(gm, graph)
    nodes = {node.name: node for node in graph.nodes}
    for site in sites:
        node = nodes.get(site.node_name)
        if node is None or node.target is not SDPA:
            continue
        module = make_module(site)
        if module is None:
            continue
        name = prefix + site.name.replace(".", "_").replace("#", "_")
        new_gm.add_submodule(name, module)
        with graph.inserting_before(node):
            replacement = graph.call_module(name, args=node.args, kwargs=dict(node.kwargs))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    new_gm.recompile()
    return new_gm
