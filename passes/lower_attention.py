"""Pass: specialise a rewritten graph to one denoising phase, so torch.compile sees whole stretches of it.

A :class:`~vdopt.passes.sparsify_attention.PlannedAttention` node reads the denoising clock on every call and picks
its strategies then, so dynamo cannot trace it (it is ``torch.compiler.disable``-d: a graph break per site). A plan,
though, has few *phases*: the distinct combinations of strategies its sites run as ``t`` moves (typically a dense
warm-up and one sparse phase). :func:`lower_for_phase` builds, for one phase, a copy of the graph in which each
planned site is a :class:`LoweredAttention`: straight-line tensor code over the registered ``vdopt::`` ops, with
the phase's layout-only patterns (token orders, key-block lists) built once as buffers and its dynamic selections
(pooled top-p, vertical stripes) computed by the fused selection ops. Dynamo traces that without a break, so a
phase graph compiles with ``fullgraph=True``; :class:`PhaseRunner` keeps one compiled graph per phase and picks it
by the clock, outside any graph, so nothing recompiles as the denoising time moves.

:func:`hoist_token_order` then moves a token order that every sparse head of the phase shares out of the blocks, so
the per-layer permutations of q, k, v and the output cancel to one before the first block and one after the last.

Sites whose strategies cannot be traced (semantic k-means: per-head clusters and centroids carried across steps)
or whose call has an attention mask stay PlannedAttention nodes, and the graph is split there (reported by
:func:`lowering_report`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from vdopt import attention as _attention
from vdopt.passes.sparsify_attention import _PATTERN_OBSERVERS, PlannedAttention
from vdopt.sites import AttentionSite
from vdopt.strategies import Dense, PatternContext, SparsePattern, Strategy


class NotLowerable(ValueError):
    """A planned site that cannot become straight-line code for this phase (the reason is the message)."""


def _pad_width(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[-1]))


def _head_index(heads: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, dtype=torch.long, device=device)


class LoweredAttention(nn.Module):
    """One site's attention for one phase, as traceable tensor code (same call signature as SDPA).

    Heads are launched as :func:`vdopt.attention.sparse_site_attention` launches them (dense heads in one SDPA
    call, every head that keeps the token order in one block-sparse launch, each shared static token order in one
    gather, launch and scatter), and the result equals it; what differs is that every decision is taken here, at
    construction, from the phase's strategies and the call's shapes.
    """

    def __init__(self, site: AttentionSite, strategies: list[Strategy], block_size: int, q_shape: tuple[int, ...],
                 device: torch.device, seed: int = 0) -> None:
        super().__init__()
        if site.layout is None:
            raise NotLowerable(f"site {site.name} has no token layout")
        batch, heads, tokens, head_dim = q_shape
        if len(strategies) != heads:
            raise NotLowerable(f"site {site.name}: {len(strategies)} strategies for {heads} heads")
        self.site_name = site.name
        self.heads = heads
        self.block_size = block_size
        self.video_span = site.layout.video_span
        v0, v1 = self.video_span
        self.text_spans = [(a, b) for a, b in ((0, v0), (v1, tokens)) if b > a]
        self.ctx = PatternContext(site.layout, block_size, {}, seed)
        groups: dict[Strategy, list[int]] = {}
        for head, strategy in enumerate(strategies):
            groups.setdefault(strategy, []).append(head)
        probe = torch.empty(batch, heads, v1 - v0, head_dim, device=device)

        self.dense_heads: list[int] = groups.pop(Dense(), [])
        static_in_order: list[tuple[list[int], SparsePattern]] = []
        self.dynamic: list[tuple[Strategy, list[int]]] = []
        permuted: dict[int, tuple[torch.Tensor, list[SparsePattern], list[int]]] = {}
        for strategy, members in groups.items():
            if strategy.dynamic:
                if not strategy.traceable:
                    raise NotLowerable(f"{strategy.name} keeps state across steps and builds per-head clusters")
                self.dynamic.append((strategy, members))
                continue
            pattern = strategy.build(probe[:, : len(members)], probe[:, : len(members)], self.ctx)
            if pattern.q_perm is None and pattern.kv_perm is None and not pattern.is_clustered:
                static_in_order.append((members, pattern))
            elif (not pattern.is_clustered and pattern.q_perm is pattern.kv_perm and pattern.q_perm is not None
                  and pattern.q_perm.dim() == 1):
                entry = permuted.setdefault(id(pattern.q_perm), (pattern.q_perm, [], []))
                entry[1].append(pattern)
                entry[2].extend(members)
            else:
                raise NotLowerable(f"{strategy.name} builds per-head token orders")

        # The launch that keeps the token order lists its heads in head order, whatever strategy each runs: then a
        # site whose heads are all sparse launches on q/k/v as they are and returns the launch's output, where
        # heads grouped by strategy ([0, 3, 1, 2] for two strategies on alternate heads) would pass a head list
        # and copy every head's output back into place. Static lists are one buffer (in head order), a dynamic
        # selection's are made per call, and ``in_order_segments`` joins runs of them in head order.
        kv_blocks = -(-(v1 - v0) // block_size)
        self.in_order_width = kv_blocks
        static_rows = {h: (p, j) for members, p in static_in_order for j, h in enumerate(members)}
        static_heads = sorted(static_rows)
        source = {h: (-1, j) for j, h in enumerate(static_heads)}
        source.update({h: (i, j) for i, (_, members) in enumerate(self.dynamic) for j, h in enumerate(members)})
        self.in_order_heads = sorted(source)
        # (source, first, stop): rows first..stop-1 of the static buffer (source -1) or of dynamic selection i.
        self.in_order_segments: list[tuple[int, int, int]] = []
        for h in self.in_order_heads:
            src, j = source[h]
            last = self.in_order_segments[-1] if self.in_order_segments else None
            if last is not None and last[0] == src and last[2] == j:
                self.in_order_segments[-1] = (src, last[1], j + 1)
            else:
                self.in_order_segments.append((src, j, j + 1))
        if static_heads:
            rows = [static_rows[h] for h in static_heads]
            self.register_buffer("static_indices", torch.cat(
                [_pad_width(p.kv_block_indices[:, j:j + 1], kv_blocks) for p, j in rows], dim=1).to(torch.int32),
                persistent=False)
            self.register_buffer("static_counts", torch.cat(
                [p.kv_block_counts[:, j:j + 1] for p, j in rows], dim=1).to(torch.int32), persistent=False)
        else:
            self.static_indices = self.static_counts = None
        self.in_order_all_heads = self.in_order_heads == list(range(heads))
        self.register_buffer("in_order_index", _head_index(self.in_order_heads, device), persistent=False)

        # One gather, launch and scatter per shared static token order.
        self.permuted: list[tuple[str, list[int], bool]] = []
        for i, (perm, patterns, members) in enumerate(permuted.values()):
            width = max(p.kv_block_indices.shape[-1] for p in patterns)
            self.register_buffer(f"perm_{i}", perm, persistent=False)
            self.register_buffer(f"inverse_perm_{i}", torch.argsort(perm), persistent=False)
            self.register_buffer(f"perm_indices_{i}", torch.cat(
                [_pad_width(p.kv_block_indices, width) for p in patterns], dim=1).to(torch.int32), persistent=False)
            self.register_buffer(f"perm_counts_{i}", torch.cat(
                [p.kv_block_counts for p in patterns], dim=1).to(torch.int32), persistent=False)
            self.permuted.append((str(i), members, members == list(range(heads))))

        self.sparse_heads = self.in_order_heads + [h for _, members, _ in self.permuted for h in members]
        self.sparse_all_heads = self.sparse_heads == list(range(heads))
        # Set by hoist_token_order: q/k/v already arrive in the (one) permuted order, so no gather or scatter here.
        self.hoisted = False

    def _launch(self, q, k, v, indices, counts, scale, head_indices=None):
        # Looked up on the module at call time, so a benchmark may swap the kernel (vdopt.attention's name).
        return _attention.block_sparse_attention(q, k, v, indices, counts, self.block_size, self.block_size,
                                                 scale=scale, head_indices=head_indices)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        if not self.sparse_heads:
            return F.scaled_dot_product_attention(query, key, value, scale=scale)
        v0, v1 = self.video_span
        qv, kv, vv = query[:, :, v0:v1], key[:, :, v0:v1], value[:, :, v0:v1]
        outs: list[torch.Tensor] = []
        lses: list[torch.Tensor] = []
        if self.in_order_heads:
            lists: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            if self.static_indices is not None:
                lists[-1] = (self.static_indices, self.static_counts)
            for i, (strategy, members) in enumerate(self.dynamic):
                # The selections read strided views: a run of consecutive heads is not copied.
                pattern = strategy.build(_attention.select_heads(qv, members), _attention.select_heads(kv, members),
                                         self.ctx)
                lists[i] = (_pad_width(pattern.kv_block_indices.to(torch.int32), self.in_order_width),
                            pattern.kv_block_counts.to(torch.int32))

            def rows(which: int, src: int, first: int, stop: int) -> torch.Tensor:
                whole = lists[src][which]
                return whole if (first, stop) == (0, whole.shape[1]) else whole[:, first:stop]
            # One list as it is (the static one is the same tensor every step, which the FA4 backend converts
            # once), several joined in head order.
            segments = self.in_order_segments
            indices, counts = [rows(w, *segments[0]) if len(segments) == 1 else
                               torch.cat([rows(w, *seg) for seg in segments], dim=1) for w in (0, 1)]
            out, lse = self._launch(qv, kv, vv, indices, counts, scale,
                                    None if self.in_order_all_heads else self.in_order_index)
            outs.append(out)
            lses.append(lse)
        for name, members, all_heads in self.permuted:
            perm = getattr(self, f"perm_{name}")
            inverse = getattr(self, f"inverse_perm_{name}")
            q, k, v = [x if all_heads else _attention.select_heads(x, members) for x in (qv, kv, vv)]
            if not self.hoisted:
                q, k, v = [x.index_select(2, perm) for x in (q, k, v)]
            out, lse = self._launch(q, k, v, getattr(self, f"perm_indices_{name}"), getattr(self, f"perm_counts_{name}"),
                                    scale)
            outs.append(out if self.hoisted else out.index_select(2, inverse))
            if self.text_spans:  # the log-sum-exp is read only to merge the text keys in
                lses.append(lse if self.hoisted else lse.index_select(2, inverse))
        video_out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self.text_spans:
            # The sparse heads' full q/k/v are read only for the text rows and keys (copies when heads are mixed).
            q_s, k_s, v_s = [x if self.sparse_all_heads else _attention.select_heads(x, self.sparse_heads)
                             for x in (query, key, value)]
            video_lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
            k_text = torch.cat([k_s[:, :, a:b] for a, b in self.text_spans], dim=2)
            v_text = torch.cat([v_s[:, :, a:b] for a, b in self.text_spans], dim=2)
            text_out, text_lse = _attention._attention_with_lse(q_s[:, :, v0:v1], k_text, v_text, None, scale)
            video_out = _attention.merge_partial_attention(video_out, video_lse, text_out, text_lse)
            parts = []
            for a, b in [(0, v0), (v0, v1), (v1, query.shape[2])]:
                if b <= a:
                    continue
                parts.append(video_out.to(query.dtype) if a == v0 else
                             F.scaled_dot_product_attention(q_s[:, :, a:b], k_s, v_s, scale=scale))
            sparse_out = torch.cat(parts, dim=2)
        else:
            sparse_out = video_out.to(query.dtype)
        if self.sparse_all_heads:
            return sparse_out
        # Heads go in and out as slices per run of consecutive heads (see vdopt.attention.select_heads for why).
        out = torch.empty_like(query)
        _attention.write_heads(out, self.sparse_heads, sparse_out)
        _attention.dense_heads_attention(out, self.dense_heads, query, key, value, None, scale)
        return out


def _lowerable_call(node: fx.Node) -> str | None:
    """Why the attention call itself (not its strategies) cannot be lowered, or None."""
    args = list(node.args) + [None] * (4 - len(node.args))
    kwargs = node.kwargs
    if args[3] is not None or kwargs.get("attn_mask") is not None:
        return "the call passes an attention mask (key padding is checked per call in the eager path)"
    if (len(node.args) > 4 and node.args[4]) or kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal", False) \
            or (len(node.args) > 5 and node.args[5]) or kwargs.get("enable_gqa", False):
        return "dropout, causal or GQA attention runs dense"
    if "val" not in node.args[0].meta:
        return "the query's shape was not recorded at capture"
    return None


def _rewrite_modules(gm: fx.GraphModule, replace: Any) -> fx.GraphModule:
    """Copy of ``gm`` (parameters shared) in which every called module ``m`` becomes ``replace(node, m)`` where that is
    not None, also inside step caches (memory shared) and nested graph modules; ``gm`` is unchanged."""
    from vdopt.passes.insert_step_cache import StepCache

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.graph._codegen = copy.deepcopy(gm.graph._codegen)
    for node in new.graph.nodes:
        if node.op != "call_module":
            continue
        module = new.get_submodule(node.target)
        if isinstance(module, StepCache):
            replacement = module.with_blocks(_rewrite_modules(module.blocks, replace))
        elif isinstance(module, fx.GraphModule):
            replacement = _rewrite_modules(module, replace)
        else:
            replacement = replace(node, module)
        if replacement is not None:
            new.add_submodule(node.target, replacement)
    new.recompile()
    return new


def _lower_module(gm: fx.GraphModule, t: float, report: list[tuple[str, str]]) -> fx.GraphModule:
    def lower(node: fx.Node, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, PlannedAttention):
            return None
        reason = _lowerable_call(node)
        if reason is None:
            query = node.args[0].meta["val"]
            try:
                return LoweredAttention(module.site, list(module.site_plan.strategies_at(t)),
                                        module.site_plan.block_size, tuple(query.shape), query.device, module.seed)
            except NotLowerable as e:
                reason = str(e)
        report.append((module.site.name, reason))
        return None

    return _rewrite_modules(gm, lower)


def lower_for_phase(gm: fx.GraphModule, t: float) -> fx.GraphModule:
    """Copy of ``gm`` (parameters, clock and step-cache memory shared) with every planned site that can be lowered
    replaced by a :class:`LoweredAttention` of the strategies it runs at denoising time ``t``. ``gm`` is unchanged;
    applying it again finds no PlannedAttention left to lower."""
    return _lower_module(gm, t, [])


def lowering_report(gm: fx.GraphModule, t: float) -> list[tuple[str, str]]:
    """(site, reason) for every planned site that :func:`lower_for_phase` would leave as a graph break at ``t``."""
    report: list[tuple[str, str]] = []
    _lower_module(gm, t, report)
    return report


def planned_sites(gm: fx.GraphModule) -> list[PlannedAttention]:
    """Every PlannedAttention of ``gm``, step-cache blocks included, in graph order."""
    return [m for m in gm.modules() if isinstance(m, PlannedAttention)]


def shared_token_order(gm: fx.GraphModule) -> torch.Tensor | None:
    """The one static token order that every sparse head of every lowered site of ``gm`` runs in, or None (some
    head keeps the original order, sites use different orders, or nothing is sparse). Dense heads are
    indifferent to token order."""
    perms: list[torch.Tensor] = []
    for module in gm.modules():
        if isinstance(module, PlannedAttention):
            return None
        if isinstance(module, LoweredAttention):
            if module.in_order_heads or module.hoisted:  # hoisted already: applying the pass again changes nothing
                return None
            perms += [getattr(module, f"perm_{name}") for name, _, _ in module.permuted]
    if not perms or any(p.shape != perms[0].shape or not torch.equal(p, perms[0]) for p in perms[1:]):
        return None
    return perms[0]


def _with_hoisted_sites(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy of ``gm`` whose LoweredAttention modules (step-cache blocks included) take q/k/v in the hoisted order."""

    def hoisted(node: fx.Node, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, LoweredAttention):
            return None
        twin = copy.copy(module)  # buffers shared; only the flag differs
        twin.hoisted = True
        return twin

    return _rewrite_modules(gm, hoisted)


def hoist_token_order(gm: fx.GraphModule) -> fx.GraphModule:
    """Hoist a phase's shared token order out of the transformer blocks: permute once before the first block and
    once after the last, instead of a gather of q, k, v and a scatter of the output in every layer.

    Where every sparse head of every site runs in one static order ``P`` (e.g. all tile3d or all temporal heads),
    each layer's ``scatter(P^-1)`` of its output and the next layer's ``gather(P)`` are inverse permutations separated
    only by token-wise work (projections, norms, modulation, MLP, cross-attention queries) and by RoPE, whose
    per-token tables can be permuted too. So the pass permutes, along their token axis, the values that enter the
    blocks from outside (hidden states, rotary tables), un-permutes the values that leave them, and marks every
    site as hoisted (no per-layer gather/scatter): the per-layer pairs cancel. The token axis of a value is the one
    dimension whose size is the video token count. Returns ``gm`` itself, unchanged, when it does not apply: no
    shared order, a value with no unique token axis, or work outside the blocks that runs between them. Assumes,
    as diffusion transformers do, that blocks mix tokens only through attention; tests check the result equal.
    """
    from vdopt.passes.insert_step_cache import StepCache
    from vdopt.runtime import _block_of

    order = shared_token_order(gm)
    if order is None or any(isinstance(m, StepCache) for m in gm.modules()):
        return gm  # (the step-cache pass splits the blocks into submodules: hoist before it, as PhaseRunner does)
    tokens = order.numel()
    new = _with_hoisted_sites(gm)
    graph = new.graph

    def in_block(node: fx.Node) -> bool:
        key = _block_of(node)
        return key is not None and re.search(r"\.\d+$", key) is not None

    nodes = list(graph.nodes)
    block_positions = [i for i, n in enumerate(nodes) if in_block(n)]
    if not block_positions:
        return gm
    first, last = block_positions[0], block_positions[-1]
    if any(not in_block(n) and any(in_block(a) for a in n.all_input_nodes) for n in nodes[first:last + 1]):
        return gm  # work between blocks on their outputs (e.g. a concat with text): not hoisted

    def token_axis(node: fx.Node) -> int | None | str:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        axes = [d for d, size in enumerate(value.shape) if size == tokens]
        return axes[0] if len(axes) == 1 else ("ambiguous" if axes else None)

    entering = {a for n in nodes[first:last + 1] if in_block(n) for a in n.all_input_nodes
                if not in_block(a) and a.op != "get_attr"}
    leaving = {n for n in nodes[first:last + 1] if in_block(n) and any(not in_block(u) for u in n.users)}
    axes = {n: token_axis(n) for n in entering | leaving}
    if any(axis == "ambiguous" for axis in axes.values()) or not any(isinstance(a, int) for a in axes.values()):
        return gm
    new.register_buffer("vdopt_token_order", order.clone(), persistent=False)
    new.register_buffer("vdopt_token_order_inverse", torch.argsort(order), persistent=False)
    with graph.inserting_before(nodes[first]):
        forward = graph.get_attr("vdopt_token_order")
        inverse = graph.get_attr("vdopt_token_order_inverse")
    for value in sorted(entering, key=nodes.index):
        if isinstance(axes[value], int):
            where = graph.inserting_before(nodes[first]) if nodes.index(value) < first else graph.inserting_after(value)
            with where:
                permuted = graph.call_function(torch.index_select, (value, axes[value], forward))
            permuted.meta["vdopt_outside_blocks"] = True
            value.replace_all_uses_with(permuted, delete_user_cb=in_block)
    for value in sorted(leaving, key=nodes.index):
        if isinstance(axes[value], int):
            with graph.inserting_after(nodes[last]):
                restored = graph.call_function(torch.index_select, (value, axes[value], inverse))
            restored.meta["vdopt_outside_blocks"] = True
            value.replace_all_uses_with(restored, delete_user_cb=lambda user, r=restored: user is not r and not in_block(user))
    graph.lint()
    new.recompile()
    return new


class PhaseRunner:
    """Runs a rewritten graph with one compiled graph per plan phase, chosen by the denoising clock.

    The phase of a call is the tuple of strategies every planned site runs at the clock's ``t``; the first call in
    a phase lowers and compiles that phase's graph (:func:`lower_for_phase`, :func:`vdopt.runtime.compile_segments`
    with ``fullgraph=True``), later calls reuse it. While pattern observers are active (quality measurement) the
    eager graph runs instead, since lowered sites do not report their patterns.
    """

    def __init__(self, gm: fx.GraphModule, backend: str = "inductor", segment_blocks: bool = True,
                 uncached: tuple[fx.GraphModule, Any, list[AttentionSite]] | None = None) -> None:
        self.gm = gm
        # (graph before the step-cache pass, plan, sites): a phase is then lowered and hoisted before the cache is
        # inserted (the cache's split would otherwise hide the block boundaries the hoisting needs).
        self.uncached = uncached
        self.backend = backend
        self.segment_blocks = segment_blocks
        self.sites = planned_sites(gm)
        self.clock = gm.get_submodule("vdopt_clock")
        self.graphs: dict[Any, Any] = {}
        self.hoisted: dict[Any, bool] = {}  # per phase: whether its token order was hoisted out of the blocks

    def phase(self, t: float) -> tuple:
        return tuple(tuple(site.site_plan.strategies_at(t)) for site in self.sites)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from vdopt.runtime import compile_segments

        if _PATTERN_OBSERVERS:
            return self.gm(*args, **kwargs)
        key = self.phase(self.clock.t)
        runner = self.graphs.get(key)
        if runner is None:
            from vdopt.passes.insert_step_cache import StepCache, insert_step_cache

            caches = [m for m in self.gm.modules() if isinstance(m, StepCache)]
            base = self.gm if self.uncached is None or not caches else self.uncached[0]
            lowered = lower_for_phase(base, self.clock.t)
            hoisted = hoist_token_order(lowered)
            self.hoisted[key] = hoisted is not lowered
            if base is not self.gm:
                _, plan, sites = self.uncached
                hoisted = insert_step_cache(hoisted, plan, sites, memory=caches[0].memory)
            runner = self.graphs[key] = compile_segments(hoisted, self.backend, fullgraph=True,
                                                         segment_blocks=self.segment_blocks)
        return runner(*args, **kwargs)
