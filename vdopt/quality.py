"""What vdopt costs in video quality: metrics, matched-density baselines, the harness and ``vdopt-bench quality``.

Every method generates the held-out prompts x seeds from the same noise as the dense model, and PSNR, SSIM and
relative L2 compare its videos with the dense ones. Methods are plans run through vdopt's own runtime: the searched
plan (``method="searched"``) and fixed-plan baselines in the style of Sparse VideoGen, Sparse VideoGen2, sliding
tile attention, Sparse-vDiT and DraftAttention, each with its one parameter chosen to land near a target attention
density. All methods keep the same first denoising steps dense. Density is measured from the patterns that ran.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from vdopt.calibrate import (
    CalibrationConfig,
    CalibrationResult,
    calibrate,
    default_block_size,
    load_calibration,
    record_forward_inputs,
    save_calibration,
)
from vdopt.capture import CapturedGraph, capture, export_kwargs, forward_kwargs, replace_attention_nodes
from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepRange
from vdopt.runtime import OptimizedModel, denoising_time, input_signature
from vdopt.search import (
    LaunchCost,
    SearchConfig,
    SiteCosts,
    candidate_launch_groups,
    predicted_attention_seconds,
    predicted_quality,
    search,
)
from vdopt.sites import AttentionSite, TokenLayout
from vdopt.strategies import (
    Dense,
    Diagonal,
    MultiDiagonal,
    PatternContext,
    PooledTopP,
    SemanticKMeans,
    SparsePattern,
    SpatialWindow,
    Strategy,
    TemporalWindow,
    TileWindow,
    VerticalStripe,
    default_candidates,
    tile_shape,
)

# ---------------------------------------------------------------------------------------------------------------
# Metrics. Videos are ``[F, H, W, C]`` or ``[B, F, H, W, C]`` in [0, data_range]; each metric returns one value per
# video (a 0-d tensor for one video). The second argument is the reference (the dense model's video).


def _batched(video: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if video.shape != reference.shape:
        raise ValueError(f"video {tuple(video.shape)} and reference {tuple(reference.shape)} must have one shape")
    if video.dim() not in (4, 5):
        raise ValueError(f"videos must be [F, H, W, C] or [B, F, H, W, C], got shape {tuple(video.shape)}")
    single = video.dim() == 4
    if single:
        video, reference = video[None], reference[None]
    return video.double(), reference.double(), single


def psnr(video: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB over all pixels of each video; ``inf`` for identical videos."""
    a, b, single = _batched(video, reference)
    mse = (a - b).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 gives +inf, as it should
    return out[0] if single else out


def relative_l2(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``||video - reference|| / ||reference||`` per video."""
    a, b, single = _batched(video, reference)
    out = (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp(min=1e-30)
    return out[0] if single else out


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(video: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per frame and channel, averaged over both, per video.

    Gaussian window ``window_size`` x ``window_size`` with std ``sigma``, statistics over valid positions only (no
    padding), K1 = 0.01, K2 = 0.03. Frames smaller than the window use the largest odd window that fits, with
    ``sigma`` scaled alike.
    """
    a, b, single = _batched(video, reference)
    batch, frames, height, width, channels = a.shape
    size = min(window_size, height, width)
    size -= 1 - size % 2
    sigma = sigma * size / window_size
    window = _gaussian_window(size, sigma, a.dtype).to(a.device).expand(channels, 1, size, size)
    x = a.reshape(batch * frames, height, width, channels).permute(0, 3, 1, 2)
    y = b.reshape(batch * frames, height, width, channels).permute(0, 3, 1, 2)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    out = ssim_map.mean((1, 2, 3)).view(batch, frames).mean(1)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------------------------
# Density as run


class DensityRecorder:
    """Kept fraction of video query-key pairs of every planned site, head and denoising call, as the runtime ran it.

    Use as ``with recorder.watching(optimized_model): pipe(...)``. Each call of the model is one entry (with its
    denoising time ``t``); sites or heads that ran dense, including sites the plan leaves wholly dense (they are
    never rewritten, so never observed), count as density 1. Densities stay on the device until read, so recording
    adds no host synchronisation.
    """

    def __init__(self, plan: Plan, timestep_arg: str = "timestep") -> None:
        self.heads = {site.site: site.heads for site in plan.sites}
        self.timestep_arg = timestep_arg
        self.timestep_scale = plan.timestep_scale
        self.times: list[float] = []
        self._groups: list[list[tuple[str, list[int], torch.Tensor | None]]] = []

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.times.append(denoising_time(kwargs, self.timestep_arg, self.timestep_scale))
        self._groups.append([])

    def __call__(self, site: AttentionSite, t: float, heads: list[int], strategy: Strategy,
                 pattern: SparsePattern | None) -> None:
        if self._groups and site.name in self.heads:
            self._groups[-1].append((site.name, heads, None if pattern is None else pattern.density().detach()))

    def watching(self, model: nn.Module) -> _Watch:
        """Context manager: record every forward call of ``model`` and every pattern its planned sites build."""
        return _Watch(self, model)

    def per_call(self) -> list[dict[str, list[float]]]:
        """Per model call, per site, the density of each head."""
        out = []
        for groups in self._groups:
            call = {name: [1.0] * heads for name, heads in self.heads.items()}
            for name, members, density in groups:
                values = [1.0] * len(members) if density is None else density.float().cpu().tolist()
                for head, value in zip(members, values):
                    call[name][head] = value
            out.append(call)
        return out

    def density(self, t_max: float = 1.0) -> float:
        """Mean density over calls with ``t <= t_max`` (all calls by default), sites and heads."""
        values = [v for t, call in zip(self.times, self.per_call()) if t <= t_max + 1e-9
                  for heads in call.values() for v in heads]
        return sum(values) / len(values) if values else float("nan")


class _Watch:
    def __init__(self, recorder: DensityRecorder, model: nn.Module) -> None:
        self.recorder, self.model = recorder, model
        self._handle: Any = None
        self._observing: Any = None

    def __enter__(self) -> DensityRecorder:
        from vdopt.passes.sparsify_attention import observe_patterns

        self._handle = self.model.register_forward_pre_hook(self.recorder._on_call, with_kwargs=True)
        self._observing = observe_patterns(self.recorder)
        self._observing.__enter__()
        return self.recorder

    def __exit__(self, *exc: object) -> None:
        self._observing.__exit__(*exc)
        self._handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# How structured the model's attention is: density needed for a recall target


class _RecallProbe(nn.Module):
    """Stands in for one self-attention call: returns the dense output and records the density needed for recall."""

    def __init__(self, site: AttentionSite, sink: list[dict[str, Any]], recall: float, block_size: int,
                 query_blocks: int, clock: dict[str, float]) -> None:
        super().__init__()
        self.site, self.sink, self.recall, self.block_size = site, sink, recall, block_size
        self.query_blocks, self.clock = query_blocks, clock

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        block, token = density_for_recall(query, key, self.site.layout, scale, attn_mask, self.recall,  # type: ignore[arg-type]
                                          self.block_size, self.query_blocks)
        self.sink.append({"site": self.site.name, "layer": self.site.layer, "t": self.clock["t"],
                          "block_density": block.tolist(), "token_density": token.tolist()})
        return out


def density_for_recall(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, scale: float | None,
                       attn_mask: torch.Tensor | None, recall: float = 0.95, block_size: int = 64,
                       query_blocks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle densities that keep ``recall`` of the attention mass, per head (``float [H]`` each).

    ``q, k: [B, H, tokens, D]``. ``query_blocks`` evenly spaced query blocks of ``block_size`` video tokens are
    attended densely. Block density: per query block, the fewest key blocks whose mass, averaged over the block's
    rows, reaches ``recall`` (what a block-sparse kernel must keep at best), over the number of key blocks. Token
    density: per query row, the fewest keys reaching ``recall``, over the number of video keys (a lower bound for
    any pattern). Mass on text keys counts as kept, since text is never sparsified.
    """
    from vdopt.attention import additive_key_bias

    v0, v1 = layout.video_span
    n = layout.video_tokens
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    full_blocks = max(n // block_size, 1)
    bs = min(block_size, n)
    picks = torch.linspace(0, full_blocks - 1, min(query_blocks, full_blocks)).round().long().unique()
    rows = (picks[:, None] * bs + torch.arange(bs)).flatten().to(q.device)
    scores = torch.matmul(q[:, :, v0 + rows].float(), k.float().transpose(-1, -2)) * scale
    bias = additive_key_bias(attn_mask)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    video = probs[..., v0:v1]  # [B, H, R, n]
    need = (recall - (1.0 - video.sum(-1))).clamp(min=0.0)  # text mass is always kept
    ranked = video.sort(-1, descending=True).values.cumsum(-1)
    tokens_needed = ((ranked < need[..., None]).sum(-1) + 1).clamp(max=n)
    token_density = (tokens_needed.float() / n).mean((0, 2))
    kv_blocks = -(-n // bs)
    padded = F.pad(video, (0, kv_blocks * bs - n)).unflatten(-1, (kv_blocks, bs)).sum(-1)  # [B, H, R, kv_blocks]
    per_block = padded.unflatten(2, (picks.numel(), bs)).mean(3)  # [B, H, Q, kv_blocks]
    need_block = need.unflatten(2, (picks.numel(), bs)).mean(3)
    ranked_blocks = per_block.sort(-1, descending=True).values.cumsum(-1)
    blocks_needed = ((ranked_blocks < need_block[..., None] - 1e-6).sum(-1) + 1).clamp(max=kv_blocks)
    block_density = (blocks_needed.float() / kv_blocks).mean((0, 2))
    return block_density.cpu(), token_density.cpu()


def attention_recall_report(model: nn.Module, forward_inputs: Sequence[dict[str, Any]], recall: float = 0.95,
                            block_size: int = 64, query_blocks: int = 8, layout: TokenLayout | None = None,
                            timestep_arg: str = "timestep", timestep_scale: float = 1000.0) -> dict[str, Any]:
    """Per layer and head, the attention density needed to keep ``recall`` of the mass (see density_for_recall).

    Runs ``model`` densely on each recorded forward call (e.g. calibration steps) with every sparsifiable
    self-attention site probed; values are averaged over calls. Returns a JSON-ready dict with a ``layers`` list.
    """
    samples: list[dict[str, Any]] = []
    clock = {"t": 0.0}
    graphs: dict[Any, fx.GraphModule] = {}
    for inputs in forward_inputs:
        key = input_signature(inputs)
        if key not in graphs:
            captured = capture(model, inputs, layout)

            def probe(site: AttentionSite) -> _RecallProbe | None:
                return _RecallProbe(site, samples, recall, block_size, query_blocks, clock) if site.sparsifiable else None

            graphs[key] = replace_attention_nodes(captured.graph_module, captured.sites, probe, "vdopt_recall_")
        clock["t"] = denoising_time(inputs, timestep_arg, timestep_scale)
        with torch.no_grad():
            graphs[key](**export_kwargs(model, inputs))
    by_site: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_site.setdefault(sample["site"], []).append(sample)
    layers = []
    for name, entries in by_site.items():
        heads = len(entries[0]["block_density"])
        block = [sum(e["block_density"][h] for e in entries) / len(entries) for h in range(heads)]
        token = [sum(e["token_density"][h] for e in entries) / len(entries) for h in range(heads)]
        layers.append({"site": name, "layer": entries[0]["layer"], "samples": len(entries),
                       "block_density_per_head": block, "token_density_per_head": token,
                       "block_density": sum(block) / heads, "token_density": sum(token) / heads})
    all_block = [v for layer in layers for v in layer["block_density_per_head"]]
    # Attention sharpens as noise goes down; sparse plans run after a dense warm-up, so the spread over t matters.
    by_time = []
    for t in sorted({round(s["t"], 4) for s in samples}, reverse=True):
        at_t = [s for s in samples if round(s["t"], 4) == t]
        values = [v for s in at_t for v in s["block_density"]]
        by_time.append({"t": t, "block_density": sum(values) / len(values),
                        "heads_below_half": sum(v < 0.5 for v in values), "head_samples": len(values),
                        "block_density_per_site": {s["site"]: s["block_density"] for s in at_t}})
    return {
        "recall": recall, "block_size": block_size, "query_blocks_per_call": query_blocks,
        "calls": len(forward_inputs), "times": sorted({round(s["t"], 4) for s in samples}, reverse=True),
        "method": (
            f"per sampled call and site, {query_blocks} evenly spaced query blocks of {block_size} video tokens are "
            "attended densely; block density = fewest key blocks whose mass (averaged over the query block's rows) "
            f"reaches {recall:.0%} over the number of key blocks; token density = fewest keys per query row reaching "
            f"{recall:.0%} over the number of video keys; both averaged over query blocks/rows, batch and calls"
        ),
        "heads_below_half": sum(v < 0.5 for v in all_block), "heads": len(all_block),
        "layers": sorted(layers, key=lambda layer: layer["layer"]),
        "by_time": by_time,
    }


# ---------------------------------------------------------------------------------------------------------------
# Attention time of a plan: every planned site replayed on the q/k/v of one real denoising call


class _InputRecorder(nn.Module):
    """Stands in for one self-attention call: keeps its arguments and returns the dense output."""

    def __init__(self, site: AttentionSite, sink: dict[str, tuple]) -> None:
        super().__init__()
        self.site, self.sink = site, sink

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        self.sink[self.site.name] = (query, key, value, attn_mask, scale)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def attention_input_recorder(model: nn.Module, inputs: dict[str, Any], layout: TokenLayout | None = None
                             ) -> tuple[CapturedGraph, Callable[[dict[str, Any]], dict[str, tuple]]]:
    """``model`` captured once on ``inputs``, and a function that runs one dense forward call on any inputs of the
    same signature and returns, per sparsifiable self-attention site, its ``(q, k, v, mask, scale)``."""
    captured = capture(model, inputs, layout)
    sink: dict[str, tuple] = {}
    gm = replace_attention_nodes(captured.graph_module, captured.sites,
                                 lambda site: _InputRecorder(site, sink) if site.sparsifiable else None, "vdopt_rec_")

    def record(call_inputs: dict[str, Any]) -> dict[str, tuple]:
        sink.clear()
        with torch.no_grad():
            gm(**export_kwargs(model, call_inputs))
        return dict(sink)

    return captured, record


def record_attention_inputs(model: nn.Module, inputs: dict[str, Any], layout: TokenLayout | None = None
                            ) -> tuple[list[AttentionSite], dict[str, tuple]]:
    """The sparsifiable self-attention sites of ``model`` and, per site, the ``(q, k, v, mask, scale)`` of one
    dense forward call on ``inputs``."""
    captured, record = attention_input_recorder(model, inputs, layout)
    recorded = record(inputs)
    return [s for s in captured.sites if s.name in recorded], recorded


#: Timing passes per measured site cost; the least is kept.
TIMING_PASSES = 2


#: How attention is timed on CUDA. "device": each timed call is queued behind a kernel that spins the GPU for
#: longer than the host takes to issue the call, so the events see the call's GPU work alone, as in a model whose
#: other layers keep the GPU busy while the host issues attention (host work still shows where the call waits for
#: the GPU itself). "wall": each call starts on an idle GPU, so host work the GPU waits for is included; on the
#: proxy's small sites it was of the order of the kernels (benchmarks/site_split_profile.py).
TIMING_MODES = ("device", "wall")

_SLEEP_CYCLES_PER_MS: dict[int, float] = {}


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on ``device`` (measured once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_CYCLES_PER_MS:
        with torch.cuda.device(index):
            torch.cuda._sleep(1000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(5_000_000)
            end.record()
            torch.cuda.synchronize(index)
            _SLEEP_CYCLES_PER_MS[index] = 5_000_000 / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_CYCLES_PER_MS[index]


def _median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
               timing_mode: str = "device") -> float:
    if timing_mode not in TIMING_MODES:
        raise ValueError(f"timing_mode must be one of {TIMING_MODES}, got {timing_mode!r}")
    for _ in range(warmup):
        fn()
    cycles = 0
    if device.type == "cuda" and timing_mode == "device":
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()  # how long the host takes to issue one call, the GPU being idle
        issue_ms = (time.perf_counter() - begin) * 1e3
        torch.cuda.synchronize(device)
        cycles = int((1.5 * issue_ms + 0.2) * _sleep_cycles_per_ms(device))
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if cycles:
                torch.cuda._sleep(cycles)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def site_runner(site: AttentionSite, strategies: Sequence[Strategy], block_size: int, q: torch.Tensor,
                seed: int = 0) -> Callable[..., torch.Tensor]:
    """One site's attention with head ``h`` running ``strategies[h]``, as vdopt's runtime runs it in a compiled
    phase: a :class:`~vdopt.passes.lower_attention.LoweredAttention` (patterns built once, fused selections, one
    launch per head group), or, for strategies that cannot be lowered (semantic k-means), the eager
    :class:`~vdopt.passes.sparsify_attention.PlannedAttention`. All-dense: SDPA."""
    from vdopt.passes.lower_attention import LoweredAttention, NotLowerable
    from vdopt.passes.sparsify_attention import DenoisingClock, PlannedAttention

    if all(isinstance(s, Dense) for s in strategies):
        return F.scaled_dot_product_attention
    try:
        return LoweredAttention(site, list(strategies), block_size, tuple(q.shape), q.device, seed)
    except NotLowerable:
        site_plan = SitePlan(site.name, len(strategies), block_size, [StepRange(1.0, 0.0, list(strategies))])
        return PlannedAttention(site, site_plan, DenoisingClock(), seed)


def attention_milliseconds(plan: Plan | None, sites: Sequence[AttentionSite], recorded: dict[str, tuple], t: float,
                           warmup: int = 3, repeats: int = 10, timing_mode: str = "device") -> dict[str, Any]:
    """Measured time of every sparsifiable site's attention at denoising time ``t`` under ``plan`` (None: dense).

    Each site runs through :func:`site_runner` (pattern building, selection and permutation included) on the
    recorded real inputs; the warm-up calls also warm-start stateful strategies (k-means centroids), as
    consecutive denoising steps do. CUDA events on GPU, wall clock elsewhere; the median of ``repeats`` calls per
    site. Returns ``{"total_ms", "per_site_ms"}``.
    """
    per_site: dict[str, float] = {}
    for site in sites:
        q, k, v, mask, scale = recorded[site.name]
        site_plan = None if plan is None else plan.site(site.name)
        strategies = site_plan.strategies_at(t) if site_plan is not None else [Dense()] * q.shape[1]
        block = site_plan.block_size if site_plan is not None else 64
        seed = int(plan.calibration.get("seed", 0)) if plan is not None else 0
        module = site_runner(site, strategies, block, q, seed)

        def run(module=module, q=q, k=k, v=v, mask=mask, scale=scale) -> torch.Tensor:
            return module(q, k, v, attn_mask=mask, scale=scale)
        with torch.no_grad():
            per_site[site.name] = _median_ms(run, q.device, warmup, repeats, timing_mode)
    return {"total_ms": sum(per_site.values()), "per_site_ms": per_site}


def _static_launch_groups(table: dict[str, LaunchCost], candidates: dict[str, Strategy]) -> dict[str, list[str]]:
    """Labels of the static (non-dense) candidates priced in ``table``, per launch group."""
    groups: dict[str, list[str]] = {}
    for label, s in candidates.items():
        if not s.dynamic and not isinstance(s, Dense) and label in table:
            groups.setdefault(s.launch_group(), []).append(label)
    return groups


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y`` against ``x``."""
    (intercept, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    return float(intercept), float(slope)


def fit_static_launch_costs(table: dict[str, LaunchCost], candidates: dict[str, Strategy], layout: TokenLayout,
                            block_size: int) -> dict[str, LaunchCost]:
    """``table`` with the static candidates of each launch group (three or more) priced from one fit: they run one
    block-sparse kernel on lists of their exact densities, so each gets the group's median fixed cost and the
    least-squares line of per-head cost in density (clipped at 0). Single timings of a few-head launch are noisy
    (on the H100 proxy run of 2026-12-06 a sparser diagonal measured slower than a denser one); re-pricing that
    run's 18 rebuildable plans with the fit (benchmarks/reprice_quality.py) took the median error of predicted
    attention time from 16.7% to 12.3%."""
    out = dict(table)
    for labels in _static_launch_groups(table, candidates).values():
        if len(labels) < 3:
            continue
        density = np.array([static_density(candidates[label], layout, block_size) for label in labels])
        intercept, slope = _line_fit(density, np.array([table[label].per_head for label in labels]))
        fixed = statistics.median(table[label].fixed for label in labels)
        for label, d in zip(labels, density):
            out[label] = LaunchCost(fixed, max(float(intercept + slope * d), 0.0), table[label].own)
    return out


def split_shared_launch_costs(table: dict[str, LaunchCost], candidates: dict[str, Strategy]) -> dict[str, LaunchCost]:
    """``table`` with each dynamic selection that joins a static launch (pooled top-p and stripes join the in-order
    one) priced as the runtime runs it. Timed alone, its fixed cost holds that launch's; the part beyond the launch's
    fixed cost (the median of the group's static candidates') becomes its ``own`` seconds, paid whoever shares the
    launch. Entries already split (``own`` > 0) and candidates with no static partner are kept."""
    static = _static_launch_groups(table, candidates)
    out = dict(table)
    for label, s in candidates.items():
        cost = out.get(label)
        if s.dynamic and s.launch_group() in static and cost is not None and cost.own == 0.0:
            shared_launch = min(cost.fixed, statistics.median(table[other].fixed for other in static[s.launch_group()]))
            out[label] = LaunchCost(shared_launch, cost.per_head, cost.fixed - shared_launch)
    return out


def refine_measured_costs(table: dict[str, LaunchCost], candidates: dict[str, Strategy], layout: TokenLayout,
                          block_size: int) -> dict[str, LaunchCost]:
    """A measured site-cost table as the harness prices it: :func:`fit_static_launch_costs`, then
    :func:`split_shared_launch_costs`."""
    return split_shared_launch_costs(fit_static_launch_costs(table, candidates, layout, block_size), candidates)


def _dynamic_families(candidates: dict[str, Strategy]) -> dict[tuple, list[str]]:
    """Dynamic candidates that differ only in their selection budget (``top_p``): one estimation, one kernel, so
    their per-head cost is one line in the density they keep."""
    families: dict[tuple, list[str]] = {}
    for label, s in candidates.items():
        if s.dynamic:
            params = {k: v for k, v in s.to_json().items() if k != "top_p"}
            group = s.launch_group()
            # A candidate that launches alone names itself in its group: its family shares the kind of launch.
            families.setdefault(("own" if group.startswith("own:") else group, json.dumps(params, sort_keys=True)),
                                []).append(label)
    return families


def density_scaled_costs(costs: SiteCosts, calibration: CalibrationResult, t_warmup: float,
                         measured_at: dict[str, str] | None = None) -> SiteCosts:
    """``costs`` with every dynamic candidate priced at each site's own calibrated density.

    Measured costs time one representative site per shape class (``measured_at[site]`` names it; by default the
    first site with the same table), but a dynamic selection keeps a different share of blocks at every site: on the
    trained proxy (H100, 2026-12-06) pooled top-p kept 0.89-0.98x and k-means 0.79-0.92x of the first layer's
    density on average over the layers, so pricing every layer from the first over-predicted their plans by up to
    38%. Per family of candidates that differ only in ``top_p`` (same estimation work, same kernel), the per-head
    cost is fitted as a line in the representative site's mean calibrated density (least squares, slope clipped at
    0; a family of one keeps its timing) and evaluated at each site's mean density over the calibration times after
    ``t_warmup``; fixed and own costs are kept."""
    def mean_density(site: str, label: str) -> float | None:
        stats = calibration.sites.get(site)
        if stats is None or label not in stats.density:
            return None
        values = [v for i in _sparse_samples(stats.times, t_warmup) for v in stats.density[label][i]]
        return sum(values) / len(values) if values else None

    representative: dict[str, str] = {}
    for site, table in costs.per_site.items():
        given = (measured_at or {}).get(site)
        representative[site] = given if given is not None else next(
            other for other, other_table in costs.per_site.items() if other_table == table)
    families = _dynamic_families(calibration.candidates)
    per_site = {site: dict(table) for site, table in costs.per_site.items()}
    for rep in sorted(set(representative.values())):
        table = costs.per_site[rep]
        for labels in families.values():
            points = [(mean_density(rep, label), table[label].per_head) for label in labels if label in table]
            points = [(d, c) for d, c in points if d is not None]
            if len(points) < 2 or len({d for d, _ in points}) < 2:
                continue
            x = np.array([d for d, _ in points])
            y = np.array([c for _, c in points])
            intercept, slope = _line_fit(x, y)
            if slope < 0.0:
                intercept, slope = float(np.median(y)), 0.0
            for site in (s for s, r in representative.items() if r == rep):
                for label in labels:
                    d = mean_density(site, label)
                    if label in per_site[site] and d is not None:
                        old = per_site[site][label]
                        per_site[site][label] = LaunchCost(old.fixed, max(float(intercept + slope * d), 0.0), old.own)
    return SiteCosts(per_site, dict(costs.mixing), costs.source + "; dynamic candidates at each site's calibrated "
                     "density (density_scaled_costs)", dict(costs.launch_groups), dict(costs.shared_mixing))


def _measure_shape_class(site: AttentionSite, inputs: tuple, candidates: dict[str, Strategy], block_size: int,
                         seed: int, warmup: int, repeats: int, progress: bool, timing_mode: str = "device",
                         ) -> tuple[dict[str, LaunchCost], float, float]:
    from tqdm.auto import tqdm

    q, k, v, mask, scale = inputs
    heads = q.shape[1]

    def timed(strategies: list[Strategy], n: int) -> float:
        module = site_runner(site, strategies, block_size, q[:, :n], seed)
        args = (q[:, :n], k[:, :n], v[:, :n])
        with torch.no_grad():
            # The lesser of two passes, as plans are timed (attention_milliseconds' callers): a first pass ran up to
            # 1.6x a later one on the H100, and these figures are differences of such timings.
            return min(_median_ms(lambda: module(*args, attn_mask=mask, scale=scale), q.device, warmup, repeats,
                                  timing_mode)
                       for _ in range(TIMING_PASSES)) * 1e-3

    def launch_cost(strategy: Strategy) -> LaunchCost:
        all_heads = timed([strategy] * heads, heads)
        one = timed([strategy], 1)
        slope = max((all_heads - one) / (heads - 1), 0.0) if heads > 1 else all_heads
        return LaunchCost(max(all_heads - slope * heads, 0.0), slope)

    table = {"dense": launch_cost(Dense())}
    for label, strategy in tqdm(list(candidates.items()), desc=f"vdopt: timing candidates at {site.name}",
                                disable=not progress, leave=False):
        if not isinstance(strategy, Dense):
            table[label] = launch_cost(strategy)
    table = refine_measured_costs(table, candidates, site.layout, block_size)
    mix = 0.0
    static = next(((label, s) for label, s in candidates.items() if not s.dynamic and not isinstance(s, Dense)), None)
    if static is not None and heads > 1:
        half = heads // 2
        split = timed([static[1]] * half + [Dense()] * (heads - half), heads)
        parts = (table[static[0]].fixed + table[static[0]].per_head * half + table["dense"].fixed
                 + table["dense"].per_head * (heads - half))
        mix = max(split - parts, 0.0)
    # Two static candidates of one launch group split half and half: one fused launch, priced as the larger fixed
    # cost; what the split takes beyond that is the shared mixing cost.
    shared = 0.0
    by_group: dict[str, list[tuple[str, Strategy]]] = {}
    for label, s in candidates.items():
        if not s.dynamic and not isinstance(s, Dense):
            by_group.setdefault(s.launch_group(), []).append((label, s))
    pair = next((members[:2] for members in by_group.values() if len(members) >= 2), None)
    if pair is not None and heads > 1:
        half = heads // 2
        (a, sa), (b, sb) = pair
        split = timed([sa] * half + [sb] * (heads - half), heads)
        parts = (max(table[a].fixed, table[b].fixed) + table[a].per_head * half
                 + table[b].per_head * (heads - half))
        shared = max(split - parts, 0.0)
    return table, mix, shared


def measure_site_costs(sites: Sequence[AttentionSite], recorded: dict[str, tuple], candidates: dict[str, Strategy],
                       block_size: int, seed: int = 0, warmup: int = 3, repeats: int = 10,
                       progress: bool = False, timing_mode: str = "device") -> SiteCosts:
    """:class:`~vdopt.search.SiteCosts` measured on this device: per shape class of ``sites`` (one representative
    site, its recorded q/k/v), every candidate timed (least of :data:`TIMING_PASSES` medians) through
    :func:`site_runner` on all heads and on one head (fixed = one-head time minus the per-head slope), dense
    likewise with SDPA, the mixing cost as what a site
    split between a static candidate and dense takes beyond its two launches, and the shared mixing cost as what a
    site split between two static candidates of one launch group takes beyond one launch."""
    classes: dict[tuple, list[AttentionSite]] = {}
    for site in sites:
        q = recorded[site.name][0]
        classes.setdefault((tuple(q.shape), site.layout), []).append(site)
    per_site: dict[str, dict[str, LaunchCost]] = {}
    mixing: dict[str, float] = {}
    shared_mixing: dict[str, float] = {}
    for members in classes.values():
        table, mix, shared = _measure_shape_class(members[0], recorded[members[0].name], candidates, block_size, seed,
                                                  warmup, repeats, progress, timing_mode)
        for member in members:
            per_site[member.name] = table
            mixing[member.name] = mix
            shared_mixing[member.name] = shared
    device = next(iter(recorded.values()))[0].device
    source = (f"measured on {device.type} ({timing_mode} timing) through site_runner: least of {TIMING_PASSES} "
              f"passes' median of {repeats} "
              f"calls after {warmup} warm-up calls, all heads and one head per candidate")
    return SiteCosts(per_site, mixing, source, candidate_launch_groups(candidates), shared_mixing)


# ---------------------------------------------------------------------------------------------------------------
# Plans: dense warm-up, fixed baselines at matched density, the searched plan


METHODS = ("searched", "sparse_videogen", "sparse_videogen2", "sliding_tile", "sparse_vdit", "pooled_draft")
METHOD_DESCRIPTIONS = {
    "searched": "vdopt's search at a density budget: per site, head and step range the calibrated candidate (vdopt's "
                "defaults plus every baseline's grid points) that minimises the predicted model-output error (site "
                "attention errors weighted by measured output gains), mean density after the warm-up <= the "
                "target; the baselines' plans are incumbents it must match; matched_to names the baseline whose "
                "predicted density was the budget",
    "sparse_videogen": "Sparse VideoGen: per head the spatial (frame window) or temporal (position radius) pattern "
                       "with the higher calibration recall",
    "sparse_videogen2": "Sparse VideoGen2: semantic k-means permutation with top-p cluster selection, all heads",
    "sliding_tile": "STA: 3D sliding tile window (frames x rows x cols), all heads",
    "sparse_vdit": "Sparse-vDiT: per head the diagonal, multi-diagonal or vertical-stripe pattern with the higher "
                   "calibration recall",
    "pooled_draft": "DraftAttention-like: key blocks of top-p mass of the pooled (block-mean) Q/K attention map",
}
TOP_P_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
KIND_TOLERANCE = 0.3


def _tile_window_values(tile: int, extent: int) -> list[int]:
    # Boxes of tiles k apart are k * tile - (tile - 1) cells apart, so only these windows differ.
    return [0] + [k * tile - (tile - 1) for k in range(1, -(-extent // tile))]


def baseline_grids(layout: TokenLayout, block_size: int, top_p_grid: Sequence[float] = TOP_P_GRID,
                   ) -> dict[str, list[list[Strategy]]]:
    """Per baseline, its pattern kinds, each as a parameter grid (the kinds a head chooses between by recall)."""
    reach = max(layout.rows, layout.cols)
    tile_f, tile_r, tile_c = tile_shape(block_size, layout)
    tile_frames = _tile_window_values(tile_f, layout.frames)
    tile_rows, tile_cols = _tile_window_values(tile_r, layout.rows), _tile_window_values(tile_c, layout.cols)
    return {
        "sparse_videogen": [[SpatialWindow(w) for w in range(layout.frames)],
                            [TemporalWindow(r) for r in range(reach)]],
        "sparse_videogen2": [[SemanticKMeans(top_p=p) for p in top_p_grid]],
        "sliding_tile": [[TileWindow(f, r, c) for f in tile_frames for r in tile_rows for c in tile_cols]],
        "sparse_vdit": [[Diagonal(round(w / 8, 3)) for w in range(1, 8 * layout.frames)],
                        [MultiDiagonal(round(w / 40, 3)) for w in range(1, 40)],
                        [VerticalStripe(p) for p in top_p_grid]],
        "pooled_draft": [[PooledTopP(p) for p in top_p_grid]],
    }


@functools.lru_cache(maxsize=4096)
def static_density(strategy: Strategy, layout: TokenLayout, block_size: int) -> float:
    """Exact density of a content-independent strategy on ``layout`` (cached: it depends on nothing else)."""
    q = torch.zeros(1, 1, layout.video_tokens, 1)
    return float(strategy.build(q, q, PatternContext(layout, block_size, {})).density()[0])


def dense_warmup_time(step_times: Sequence[float], warmup_steps: int) -> float:
    """Normalised time ``t_w`` that splits the first ``warmup_steps`` steps (t > t_w, dense) from the rest."""
    if warmup_steps <= 0:
        return 1.0
    if warmup_steps >= len(step_times):
        return 0.0
    return (step_times[warmup_steps - 1] + step_times[warmup_steps]) / 2


def with_dense_warmup(plan: Plan, t_warmup: float) -> Plan:
    """Copy of ``plan`` in which every site is dense for ``t > t_warmup`` and unchanged below."""
    plan = copy.deepcopy(plan)
    for site in plan.sites:
        later = [StepRange(min(r.t_start, t_warmup), r.t_end, r.heads, r.predicted) for r in site.schedule
                 if r.t_end < t_warmup - 1e-9]  # a range ending at the warm-up (to rounding) is inside it
        warm = [StepRange(1.0, t_warmup, [Dense()] * site.heads)] if t_warmup < 1.0 else []
        site.schedule = warm + later
    return plan


def fixed_plan(model: nn.Module, sites: Sequence[AttentionSite], heads: dict[str, list[Strategy]], block_size: int,
               t_warmup: float, target: str, label: str, seed: int = 0) -> Plan:
    """A plan that runs ``heads[site]`` at every step after the dense warm-up (``t <= t_warmup``)."""
    site_plans = [SitePlan(site.name, site.heads, block_size, [StepRange(t_warmup, 0.0, heads[site.name])])
                  for site in sites]
    plan = Plan(model=ModelFingerprint.of(model), target=target, sites=site_plans,
                search={"method": label}, calibration={"seed": seed})
    return with_dense_warmup(plan, t_warmup)


def _sparse_samples(times: Sequence[float], t_warmup: float) -> list[int]:
    picks = [i for i, t in enumerate(times) if t <= t_warmup + 1e-9]
    return picks or list(range(len(times)))


def predicted_density(plan: Plan, calibration: CalibrationResult, t_warmup: float) -> float:
    """Mean density of ``plan`` over calibration samples after the warm-up, sites and heads (dense = 1)."""
    return predicted_quality(plan, calibration, _sparse_cutoff(calibration, t_warmup)).density


def _sparse_cutoff(calibration: CalibrationResult, t_warmup: float) -> float:
    """``t_warmup``, or 1 when no calibration sample lies after it (then every sample counts, as before)."""
    times = [t for stats in calibration.sites.values() for t in stats.times]
    return t_warmup if any(t <= t_warmup + 1e-9 for t in times) else 1.0


def _calibrated_density(strategy: Strategy, calibration: CalibrationResult, t_warmup: float) -> float:
    label = strategy.label()
    values = [v for stats in calibration.sites.values() for i in _sparse_samples(stats.times, t_warmup)
              for v in stats.density[label][i]]
    return sum(values) / len(values)


def _mean_recall(strategy: Strategy, stats: Any, head: int, t_warmup: float) -> float:
    samples = _sparse_samples(stats.times, t_warmup)
    return sum(stats.recall[strategy.label()][i][head] for i in samples) / len(samples)


def _closest(grid: Sequence[Strategy], densities: dict[Strategy, float], target: float) -> Strategy:
    # Ties go to the denser pattern: never claim a sparser operating point than the grid gives.
    return min(grid, key=lambda s: (abs(densities[s] - target), -densities[s]))


@dataclass
class MethodPlan:
    """One method's plan at one target density, with what was chosen and why."""

    method: str
    target_density: float
    plan: Plan
    predicted_density: float
    parameters: list[str]
    predicted_sq_error: float | None = None
    matched_to: str | None = None
    matched_on: str | None = None
    predicted_attention_ms: float | None = None
    time_match: dict[str, Any] | None = None
    search: dict[str, Any] | None = None  # the searched plan's solver, optimality gap and lower bound


def _static_choices(grids: dict[str, list[list[Strategy]]], layout: TokenLayout, block_size: int,
                    targets: Sequence[float]) -> dict[Strategy, float]:
    """Exact densities of the static grid points nearest each target (the only ones worth calibrating)."""
    chosen: dict[Strategy, float] = {}
    for kinds in grids.values():
        for grid in kinds:
            if grid[0].dynamic:
                continue
            densities: dict[Strategy, float] = {}
            for strategy in grid:
                densities.setdefault(strategy, static_density(strategy, layout, block_size))
            for target in targets:
                best = _closest(list(densities), densities, target)
                chosen[best] = densities[best]
    return chosen


def calibration_candidates(grids: dict[str, list[list[Strategy]]], layout: TokenLayout, block_size: int,
                           targets: Sequence[float]) -> tuple[Strategy, ...]:
    """vdopt's default candidates, the static baseline points nearest each target and nearest half the smallest
    target, and every dynamic grid point.

    The half-target points give the search something cheaper than the sparsest baseline: without them the
    sparsest baseline's plan is often the cheapest plan there is, so at its time it is the only feasible one."""
    out: dict[str, Strategy] = {s.label(): s for s in default_candidates()}
    floor = (min(targets) / 2,) if targets else ()
    out |= {s.label(): s for s in _static_choices(grids, layout, block_size, (*targets, *floor))}
    for kinds in grids.values():
        for grid in kinds:
            if grid[0].dynamic:
                out |= {s.label(): s for s in grid}
    return tuple(out.values())


def baseline_plan(method: str, grids: dict[str, list[list[Strategy]]], calibration: CalibrationResult,
                  model: nn.Module, target_density: float, t_warmup: float, target: str, seed: int = 0) -> MethodPlan:
    """The baseline's plan nearest ``target_density``: per pattern kind, the grid point whose density (exact for
    static patterns, calibration mean for dynamic ones) is nearest; per head, the kind with the best recall among
    the kinds within ``KIND_TOLERANCE`` (relative) of the target, or the nearest kind if none is."""
    any_stats = next(iter(calibration.sites.values()))
    layout, block_size = any_stats.site.layout, any_stats.block_size
    picks: list[tuple[Strategy, float]] = []
    for grid in grids[method]:
        labels = set(calibration.candidates)
        if grid[0].dynamic:
            densities = {s: _calibrated_density(s, calibration, t_warmup) for s in grid if s.label() in labels}
        else:
            densities = {s: static_density(s, layout, block_size) for s in grid if s.label() in labels}  # type: ignore[arg-type]
        if not densities:
            raise ValueError(f"no {method} grid point was calibrated; calibrate with calibration_candidates(...)")
        best = _closest(list(densities), densities, target_density)
        picks.append((best, densities[best]))
    # A kind whose grid cannot come near the target would win every head on recall by being denser.
    near = [s for s, d in picks if abs(d - target_density) <= KIND_TOLERANCE * target_density]
    kinds = near or [min(picks, key=lambda item: abs(item[1] - target_density))[0]]
    heads = {}
    for name, stats in calibration.sites.items():
        heads[name] = [max(kinds, key=lambda s: _mean_recall(s, stats, h, t_warmup)) for h in range(stats.site.heads)]
    sites = [stats.site for stats in calibration.sites.values()]
    plan = fixed_plan(model, sites, heads, block_size, t_warmup, target, method, seed)
    used = sorted({s.label() for strategies in heads.values() for s in strategies})
    estimate = predicted_quality(plan, calibration, _sparse_cutoff(calibration, t_warmup))
    return MethodPlan(method, target_density, plan, estimate.density, used, estimate.sq_error)


#: First noise seed of the verification videos time-matched plans are chosen on (far from the held-out seeds).
VERIFY_SEED_BASE = 9000
#: Most re-searches of a time-matched plan measured slower than its baseline.
TIME_MATCH_RETRIES = 3
# Upward bisection of a time-matched budget stops once the budget that fits is within this share of one too slow.
TIME_MATCH_GAP = 0.02


def searched_plans(calibration: CalibrationResult, sites: list[AttentionSite], model: nn.Module,
                   target_density: float, t_warmup: float, target: str, baselines: Sequence[MethodPlan] = (),
                   step_ranges: int = 1, matched: bool = True, site_costs: SiteCosts | None = None,
                   match: str = "density", measure_ms: Callable[[Plan], float] | None = None,
                   time_match_retries: int = TIME_MATCH_RETRIES,
                   measure_psnr: Callable[[Plan], float | Sequence[float]] | None = None,
                   families: dict[str, tuple[str, ...]] | None = None) -> list[MethodPlan]:
    """vdopt's search over every calibrated candidate, the ``baselines`` as incumbents.

    The first plan has the density budget ``target_density``. With ``matched``, one more per baseline and ``match``
    (``"density"``, ``"time"`` or ``"both"``): at that baseline's predicted density, or at its predicted attention
    time under ``site_costs`` (``matched_to`` names the baseline, ``matched_on`` the budget), so the searched plan's
    predicted error is, by construction, at most the baseline's at the same predicted density or time.
    ``measure_ms`` (a plan's measured attention milliseconds): a time-matched plan measured slower than its
    baseline is searched again at the budget scaled by their measured ratio, at most ``time_match_retries`` times,
    since predicted times err per plan (by 4% median, 86% worst on the proxy, H100) and the comparison that counts
    is at equal measured time; ``time_match`` records every try. ``measure_psnr`` (a plan's PSNR vs dense on each
    verification video): the time-matched plan kept is the best measured of those no slower than the baseline, if
    it beats the baseline's own plan by more than the videos' spread, else the baseline's plan (see
    :func:`_match_measured_time`). ``families`` (method -> the calibrated labels of its pattern set): with
    ``measure_psnr``, a time-matched search is also run restricted to its baseline's pattern set (per head and step
    range any of the baseline's patterns, or dense), and its fitting plans compete on the verification videos too.
    Warm-up: dense for ``t > t_warmup``.
    """
    if match not in ("density", "time", "both"):
        raise ValueError(f"match must be 'density', 'time' or 'both', got {match!r}")
    if match != "density" and site_costs is None:
        raise ValueError(f"match={match!r} needs site_costs (measure_site_costs or SiteCosts.from_cost_model)")
    cutoff = _sparse_cutoff(calibration, t_warmup)

    def predicted_ms(plan: Plan) -> float | None:
        return None if site_costs is None else predicted_attention_seconds(plan, calibration, site_costs, cutoff) * 1e3

    budgets: list[tuple[str, float, MethodPlan | None]] = [("density", target_density, None)]
    if matched and match in ("density", "both"):
        budgets += [("density", b.predicted_density, b) for b in baselines]
    if matched and match in ("time", "both"):
        budgets += [("time", predicted_ms(b.plan), b) for b in baselines]  # type: ignore[misc]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no measured efficiency table"
        for kind, budget, baseline in budgets:
            if kind == "density":
                config = SearchConfig(budget="density", density_budget=min(max(budget, 1e-6), 1.0),
                                      min_dense_warmup=1.0 - cutoff, max_step_ranges=step_ranges, progress=False)
            else:
                config = SearchConfig(budget="time", time_budget_ms=budget, min_dense_warmup=1.0 - cutoff,
                                      max_step_ranges=step_ranges, progress=False)
            incumbents = [b.plan for b in baselines] if baseline is None else [baseline.plan]
            plan = with_dense_warmup(search(model, calibration, sites, target, config, incumbents, site_costs), t_warmup)
            time_match = None
            if kind == "time" and measure_ms is not None and baseline is not None:
                def search_at(ms: float, config: SearchConfig = config, incumbents: list[Plan] = incumbents) -> Plan:
                    return with_dense_warmup(search(model, calibration, sites, target,
                                                    dataclasses.replace(config, time_budget_ms=ms), incumbents,
                                                    site_costs), t_warmup)

                alternatives = []
                family = (families or {}).get(baseline.method)
                if measure_psnr is not None and family:
                    restricted = dataclasses.replace(config, strategies=family)
                    try:
                        alternatives.append((f"{baseline.method} pattern set", search_at(budget, restricted), budget,
                                             functools.partial(search_at, config=restricted)))
                    except RuntimeError:  # its patterns cannot meet the budget: nothing to add
                        pass
                plan, time_match = _match_measured_time(plan, baseline.plan, budget, measure_ms, time_match_retries,
                                                        search_at, measure_psnr, alternatives)
            estimate = predicted_quality(plan, calibration, cutoff)
            used = sorted({s.label() for site in plan.sites for r in site.schedule for s in r.heads})
            out.append(MethodPlan("searched", target_density, plan, estimate.density, used, estimate.sq_error,
                                  None if baseline is None else baseline.method, None if baseline is None else kind,
                                  predicted_ms(plan), time_match,
                                  {key: plan.predictions.get(key) for key in ("solver", "optimality_gap",
                                                                              "lower_bound_sq_error",
                                                                              "from_incumbent", "exchange_moves")}))
    return out


def _time_matched_tries(plan: Plan, budget_ms: float, target_ms: float, measure_ms: Callable[[Plan], float],
                        retries: int, search_at: Callable[[float], Plan],
                        ) -> tuple[list[dict[str, Any]], list[tuple[float, float, Plan, dict[str, Any]]],
                                   tuple[float, float, Plan] | None, tuple[float, Plan]]:
    """One search's tries toward ``target_ms`` (see :func:`_match_measured_time`): every try, the fitting ones as
    (budget, measured, plan, try), the one at the largest budget that fit (or None) and the fastest measured."""
    tries: list[dict[str, Any]] = []
    fitting: list[tuple[float, float, Plan, dict[str, Any]]] = []
    fits: tuple[float, float, Plan] | None = None  # (budget, measured, plan) at the largest budget that fit
    fastest: tuple[float, Plan] | None = None
    # Budgets at or above ``too_slow`` gave plans measured slower than the baseline; at or below ``infeasible`` no
    # plan is predicted to fit. A scaled budget that falls to or below ``infeasible`` is replaced by the geometric
    # mean of the two, so a cost model that errs both ways (its fastest plan predicted above the scaled budget)
    # still gets a plan between them measured.
    too_slow, infeasible = math.inf, 0.0
    searches = 0
    got = measure_ms(plan)
    while True:
        tries.append({"budget_ms": budget_ms, "measured_ms": got})
        if fastest is None or got < fastest[0]:
            fastest = (got, plan)
        if got <= target_ms:
            fitting.append((budget_ms, got, plan, tries[-1]))
            if fits is None or budget_ms > fits[0]:
                fits = (budget_ms, got, plan)
        else:
            too_slow = min(too_slow, budget_ms)
        if fits is not None and not math.isinf(too_slow) and too_slow <= fits[0] * (1.0 + TIME_MATCH_GAP):
            break  # nothing between the budget that fits and one too slow is left to try
        if fits is not None and math.isinf(too_slow):
            if len(fitting) > 1 or fits[1] >= target_ms / (1.0 + TIME_MATCH_GAP):
                break  # the plan uses the baseline's time (or a scaled-up search already ran)
            next_ms = fits[0] * target_ms / fits[1]  # faster than the baseline: scale the budget up
        elif fits is not None:
            next_ms = math.sqrt(fits[0] * too_slow)
        else:
            # At least TIME_MATCH_GAP below the budget that was too slow: a plan measured within timing noise of
            # the baseline would otherwise be searched again at nearly its own budget and come back unchanged (the
            # H100 proxy run of 2026-12-06: Sparse-vDiT d0.1, 1.639 ms against 1.636, three identical retries).
            next_ms = min(budget_ms * target_ms / got, too_slow / (1.0 + TIME_MATCH_GAP))
        found = None
        while searches < retries and found is None:
            if fits is None and next_ms <= infeasible:
                next_ms = math.sqrt(infeasible * too_slow)
            searches += 1
            try:
                found = search_at(next_ms)
            except RuntimeError as error:  # no plan is predicted to fit this budget
                tries.append({"budget_ms": next_ms, "measured_ms": None, "error": str(error)})
                infeasible = max(infeasible, next_ms)
                next_ms = math.sqrt(infeasible * too_slow)
        if found is None:
            break
        plan, budget_ms = found, next_ms
        got = measure_ms(plan)
    assert fastest is not None
    return tries, fitting, fits, fastest


def _as_videos(measured: float | Sequence[float]) -> list[float]:
    return [float(measured)] if isinstance(measured, (int, float)) else [float(x) for x in measured]


def _paired_gain(videos: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean per-video PSNR gain over the baseline on the same videos, and its standard error (0 for one video)."""
    if len(videos) != len(baseline):
        raise ValueError(f"PSNRs of {len(videos)} and {len(baseline)} videos cannot be paired")
    diffs = [a - b for a, b in zip(videos, baseline)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def _match_measured_time(plan: Plan, baseline: Plan, budget_ms: float, measure_ms: Callable[[Plan], float],
                         retries: int, search_at: Callable[[float], Plan],
                         measure_psnr: Callable[[Plan], float | Sequence[float]] | None = None,
                         alternatives: Sequence[tuple[str, Plan, float, Callable[[float], Plan]]] = (),
                         ) -> tuple[Plan, dict[str, Any]]:
    """The plan searched at ``budget_ms`` (predicted), re-searched until it uses the time ``baseline`` measures.

    A plan measured slower is searched again at the budget scaled by measured baseline over measured plan (a budget
    no plan fits is bisected toward the last too-slow one); a first plan faster than the baseline by more than
    :data:`TIME_MATCH_GAP` is searched again at the budget scaled up the same way, since time left unused is quality
    given away. Once a plan fits and one was too slow, the retries left bisect between the largest budget that fit
    and the smallest that measured too slow. At most ``retries`` searches.

    Which plan is kept: without ``measure_psnr``, the one no slower than the baseline searched at the largest budget,
    else the baseline's own plan. With ``measure_psnr`` (a plan's PSNR vs dense on each verification video, or
    their mean; never the evaluation's videos), every plan no slower than the baseline and the baseline's own plan
    are measured; the plan whose mean per-video gain over the baseline, less one standard error of it, is largest
    is kept if that is >= 0, else the baseline's own plan (a gain within the videos' spread is not evidence, and
    a tie is better than a loss). Why measure: the predicted error that ranks plans inside the search is additive
    over sites and can mis-rank plans of near-equal prediction (on the H100 proxy run of 2026-12-06, Sparse-vDiT
    d0.1's searched plan was predicted 17% less error than the baseline at equal time and measured 1.7 dB lower
    PSNR).

    ``alternatives`` (used only with ``measure_psnr``): more searches, each ``(name, first plan, its budget, its
    search_at)``, time-matched the same way with ``retries`` of their own; their fitting plans compete too (e.g. the
    search restricted to the baseline's own pattern set, a smaller step from the baseline whose errors are of the
    kind the baseline's are, which the one-step prediction ranks more reliably). Returns the plan and the record
    of the tries (``tries`` for the first search, ``alternative_tries`` per alternative, ``chosen_search``).
    """
    target_ms = measure_ms(baseline)
    tries, fitting, fits, fastest = _time_matched_tries(plan, budget_ms, target_ms, measure_ms, retries, search_at)
    record: dict[str, Any] = {"baseline_measured_ms": target_ms, "tries": tries, "no_slower_than_baseline": True}
    if measure_psnr is not None:
        searches = [("all candidates", fitting)]
        if alternatives:
            record["alternative_tries"] = []
        for name, first, first_ms, alternative_at in alternatives:
            alt_tries, alt_fitting, _, alt_fastest = _time_matched_tries(first, first_ms, target_ms, measure_ms,
                                                                        retries, alternative_at)
            record["alternative_tries"].append({"search": name, "tries": alt_tries})
            searches.append((name, alt_fitting))
            fastest = min(fastest, alt_fastest, key=lambda item: item[0])
        baseline_videos = _as_videos(measure_psnr(baseline))
        record["baseline_calibration_psnr"] = sum(baseline_videos) / len(baseline_videos)
        best: tuple[float, float, Plan, str] | None = None
        for name, candidates in searches:
            for _, measured, candidate, entry in candidates:
                videos = _as_videos(measure_psnr(candidate))
                gain, error = _paired_gain(videos, baseline_videos)
                entry.update(calibration_psnr=sum(videos) / len(videos), calibration_psnr_gain=gain,
                             calibration_psnr_gain_stderr=error)
                if best is None or gain - error > best[0]:
                    best = (gain - error, measured, candidate, name)
        record["chosen_by"] = "calibration_psnr"
        if best is not None and best[0] >= 0.0:
            return best[2], {**record, "measured_ms": best[1], "kept_baseline_plan": False, "chosen_search": best[3]}
        return baseline, {**record, "measured_ms": target_ms, "kept_baseline_plan": True,
                          "fastest_searched_ms": fastest[0]}
    if fits is None:
        # Nothing searched runs as fast as the baseline: keep the baseline's own plan (an incumbent of every
        # time-matched search), which a user of the search would rather have than a slower one; comparisons count
        # it as a tie, not a win.
        return baseline, {**record, "measured_ms": target_ms, "kept_baseline_plan": True,
                          "fastest_searched_ms": fastest[0]}
    return fits[2], {**record, "measured_ms": fits[1], "kept_baseline_plan": False}


# ---------------------------------------------------------------------------------------------------------------
# The harness


@dataclass(frozen=True)
class QualityConfig:
    """What the harness runs.

    ``prompts``/``seeds``: how many held-out prompts and noise seeds; ``warmup_fraction``: share of the first
    denoising steps every method keeps dense; ``block_size``: kernel block for every plan (None: the largest of
    128/64/32/16 that divides a frame's tokens, so frame-local patterns waste no partial blocks); ``batch_size``:
    (prompt, seed) pairs generated per pipeline call; ``timing_repeats``: timed single-video runs per method on
    CUDA (after one warm-up run); ``step_ranges``: most step ranges the searched plan may use after the warm-up;
    ``matched``: also search at each baseline's predicted density (so every comparison is at equal density);
    ``sensitivity_probe``: strategy calibration uses to measure each site's output gain, which weights the searched
    plan's objective (None: sites weighted alike); ``time_attention``: measure each plan's attention time on the
    q/k/v of one real denoising call after the warm-up, at the generation batch (None: on CUDA only); ``match``:
    the matched searches' budget, each baseline's predicted ``"density"``, its predicted attention ``"time"``
    (priced by candidate timings measured on that call), ``"both"``, or ``"auto"`` (time when attention is timed);
    ``attention_timing``: ``"device"`` (GPU work alone, the host hidden behind a spinning kernel) or ``"wall"`` (from
    an idle GPU, host work included), see :data:`TIMING_MODES`; ``verify_prompts`` x ``verify_seeds``: the
    verification videos (training-distribution captions drawn apart from the calibration ones, seeds from
    :data:`VERIFY_SEED_BASE`, never an evaluation pair) on which each time-matched search measures its plans and the
    baseline's own plan and keeps the best (0 of either: keep the plan searched at the largest budget that fits,
    unmeasured).
    """

    prompts: int = 14
    seeds: int = 2
    steps: int = 30
    densities: tuple[float, ...] = (0.1, 0.2, 0.3)
    warmup_fraction: float = 0.2
    methods: tuple[str, ...] = METHODS
    calib_prompts: int = 2
    calib_steps_per_input: int = 6
    calib_query_rows: int = 256
    block_size: int | None = None
    batch_size: int = 16
    timing_repeats: int = 2
    target: str = "h100"
    recall: float = 0.95
    top_p_grid: tuple[float, ...] = TOP_P_GRID
    step_ranges: int = 1
    matched: bool = True
    sensitivity_probe: Strategy | None = field(default_factory=lambda: SpatialWindow(0))
    time_attention: bool | None = None
    match: str = "auto"
    seed: int = 0
    attention_timing: str = "device"
    verify_prompts: int = 8
    verify_seeds: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.steps < 1 or self.prompts < 1 or self.seeds < 1:
            raise ValueError(f"steps, prompts and seeds must be >= 1, got {self.steps}, {self.prompts}, {self.seeds}")
        if self.match not in ("auto", "density", "time", "both"):
            raise ValueError(f"match must be 'auto', 'density', 'time' or 'both', got {self.match!r}")
        if self.verify_seeds < 0 or self.verify_prompts < 0:
            raise ValueError(f"verify_prompts and verify_seeds must be >= 0 (0 turns the check off), got "
                             f"{self.verify_prompts} and {self.verify_seeds}")
        bad = [d for d in self.densities if not 0.0 < d <= 1.0]
        if bad:
            raise ValueError(f"target densities must be in (0, 1], got {bad[0]}")


@dataclass
class QualityResult:
    """Records (one per method and target density, plus the dense reference) and the recall report."""

    records: list[dict[str, Any]]
    recall_report: dict[str, Any]
    plans: dict[str, Plan] = field(default_factory=dict)
    site_costs: SiteCosts | None = None
    calibration: CalibrationResult | None = None
    sites: list[AttentionSite] = field(default_factory=list)


def _frame_block_size(layout: TokenLayout) -> int:
    frame = layout.rows * layout.cols
    cap = default_block_size(layout.video_tokens)
    for size in (128, 64, 32, 16):
        if size <= cap and frame % size == 0:
            return size
    return cap


def evaluation_pairs(prompts: int, seeds: int) -> list[tuple[str, int]]:
    """The first ``prompts`` held-out captions, each with noise seeds ``HELD_OUT_SEEDS`` (then 4, 5, ...)."""
    from vdopt.proxy.data import HELD_OUT_SEEDS, held_out_prompts

    captions = held_out_prompts()
    if prompts > len(captions):
        raise ValueError(f"asked for {prompts} prompts but there are {len(captions)} held-out prompts")
    seed_list = list(HELD_OUT_SEEDS) + list(range(max(HELD_OUT_SEEDS) + 1, max(HELD_OUT_SEEDS) + 1 + seeds))
    return [(p, s) for p in captions[:prompts] for s in seed_list[:seeds]]


def generate(pipe: Any, pairs: Sequence[tuple[str, int]], steps: int, batch_size: int) -> torch.Tensor:
    """Videos ``[P, F, H, W, 3]`` (float32, CPU) for (prompt, seed) pairs; pair i's noise is the noise the
    pipeline draws for ``pipe(prompt_i, seed=seed_i)``, whatever the batching."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        latents = torch.cat([pipe.prepare_latents(1, seed, pipe.num_frames, pipe.height, pipe.width) for _, seed in chunk])
        out.append(pipe([p for p, _ in chunk], num_inference_steps=steps, latents=latents).float().cpu())
    return torch.cat(out)


def seconds_per_video(pipe: Any, prompt: str, seed: int, steps: int, repeats: int) -> float | None:
    """Median CUDA-event time of one video (batch 1) after one untimed warm-up run; None off CUDA."""
    if pipe.device.type != "cuda" or repeats < 1:
        return None
    pipe(prompt, num_inference_steps=steps, seed=seed)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pipe(prompt, num_inference_steps=steps, seed=seed)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return sorted(times)[len(times) // 2]


def _summary(values: torch.Tensor) -> float:
    return float(values.mean())


def _metrics(videos: torch.Tensor, reference: torch.Tensor, pairs: Sequence[tuple[str, int]]) -> dict[str, Any]:
    p, s, r = psnr(videos, reference), ssim(videos, reference), relative_l2(videos, reference)
    per_video = [{"prompt": prompt, "seed": seed, "psnr": float(p[i]), "ssim": float(s[i]), "rel_l2": float(r[i])}
                 for i, (prompt, seed) in enumerate(pairs)]
    prompts = list(dict.fromkeys(prompt for prompt, _ in pairs))
    per_prompt = []
    for prompt in prompts:
        idx = torch.tensor([i for i, (q, _) in enumerate(pairs) if q == prompt])
        per_prompt.append({"prompt": prompt, "psnr": float(p[idx].mean()), "ssim": float(s[idx].mean()),
                           "rel_l2": float(r[idx].mean())})
    return {"psnr": _summary(p), "ssim": _summary(s), "rel_l2": _summary(r), "psnr_min": float(p.min()),
            "ssim_min": float(s.min()), "per_prompt": per_prompt, "per_video": per_video}


def environment(pipe: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Device, date and versions recorded with every result."""
    import vdopt

    versions = {"vdopt": vdopt.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("diffusers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    device = pipe.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "dtype": str(dtype).replace("torch.", "")}


def plan_label(method: str, target_density: float, matched_to: str | None, matched_on: str | None) -> str:
    """A record's plan name, unique within a run: ``method@density`` and, for a matched search, ``~baseline:axis``."""
    return f"{method}@{target_density:g}" + (f"~{matched_to}:{matched_on}" if matched_to else "")


def _plan_record(mp: MethodPlan, measured: dict[str, Any], dense_seconds: float | None,
                 dense_attention_ms: float | None, block_size: int, common: dict[str, Any],
                 same_plan_as: str | None = None) -> dict[str, Any]:
    """One method's record: what was planned and predicted, and ``measured`` (the fields of _MEASURED_FIELDS)."""
    seconds, attention_ms = measured["seconds_per_video"], measured["attention_ms"]
    return {
        "method": mp.method, "target_density": mp.target_density,
        "density": measured["density"], "density_all_steps": measured["density_all_steps"],
        "predicted_density": mp.predicted_density, "predicted_sq_error": mp.predicted_sq_error,
        "matched_to": mp.matched_to, "matched_on": mp.matched_on,
        "predicted_attention_ms": mp.predicted_attention_ms, "time_match": mp.time_match, "search": mp.search,
        **{k: measured[k] for k in ("psnr", "ssim", "rel_l2", "psnr_min", "ssim_min", "per_prompt", "per_video")},
        "seconds_per_video": seconds,
        "speedup_vs_dense": dense_seconds / seconds if seconds and dense_seconds else None,
        "attention_ms": attention_ms,
        "attention_speedup_vs_dense": dense_attention_ms / attention_ms if attention_ms and dense_attention_ms else None,
        "strategies": mp.parameters, "block_size": block_size,
        "description": METHOD_DESCRIPTIONS[mp.method], "same_plan_as": same_plan_as, **common,
    }


def run_quality(pipe: Any, config: QualityConfig = QualityConfig(), proxy: str = "trained",
                progress: bool = True, on_update: Callable[[QualityResult], None] | None = None) -> QualityResult:
    """Dense vs every method on held-out prompts x seeds; returns records and the 95%-recall density report.

    ``pipe``: a vdopt proxy pipeline (``vdopt.proxy.pipeline.ProxyPipeline``); its transformer is restored on exit.
    ``proxy`` only labels the records (which weights ran). ``on_update(partial_result)`` runs after the report and
    after every record (e.g. to write results as they come). Methods run target density by target density, so a
    cut-short run still has every method at the first targets.
    """
    from tqdm.auto import tqdm

    from vdopt.demo import proxy_calibration_prompts

    if config.attention_timing not in TIMING_MODES:
        raise ValueError(f"attention_timing must be one of {TIMING_MODES}, got {config.attention_timing!r}")
    attention_ms_of = functools.partial(attention_milliseconds, timing_mode=config.attention_timing)

    original = pipe.transformer
    dtype = next(original.parameters()).dtype
    meta = environment(pipe, dtype)
    pairs = evaluation_pairs(config.prompts, config.seeds)
    warmup_steps = round(config.warmup_fraction * config.steps)
    common = {"n_prompts": config.prompts, "n_seeds": config.seeds, "steps": config.steps,
              "warmup_steps": warmup_steps, "proxy": proxy, **meta}
    try:
        step_times: list[float] = []
        # The call timed per plan: mid-way through the sparse steps of the first batch.
        timing_call = warmup_steps + (config.steps - warmup_steps) // 2
        timing_inputs: dict[str, Any] = {}

        def on_step(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if len(step_times) == timing_call:
                timing_inputs.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                      for k, v in forward_kwargs(module, args, kwargs).items()})
            step_times.append(denoising_time(kwargs, "timestep", 1000.0))

        handle = original.register_forward_pre_hook(on_step, with_kwargs=True)
        try:
            reference = generate(pipe, pairs, config.steps, config.batch_size)
        finally:
            handle.remove()
        t_warmup = dense_warmup_time(step_times[:config.steps], warmup_steps)
        time_attention = pipe.device.type == "cuda" if config.time_attention is None else config.time_attention
        timing: tuple[list[AttentionSite], dict[str, tuple], float] | None = None
        dense_attention_ms = None
        if time_attention and timing_inputs:
            timed_sites, recorded = record_attention_inputs(original, timing_inputs)
            t_timed = step_times[timing_call]
            timing = (timed_sites, recorded, t_timed)
            dense_attention_ms = attention_ms_of(None, timed_sites, recorded, t_timed)["total_ms"]
            common["attention_timing"] = (
                f"attention_ms: the {len(timed_sites)} self-attention sites of one transformer call at t={t_timed:.3f} "
                f"(after the warm-up), batch {2 * len(pairs[:config.batch_size])} (CFG), each site run through "
                "site_runner as a compiled phase runs it, uncompiled (LoweredAttention; k-means sites the eager "
                "PlannedAttention; selection and permutation included) on that call's q/k/v; per site the median of "
                f"10 timed calls (CUDA events, {config.attention_timing} timing: "
                + ("each call queued behind a spinning kernel, so the events see its GPU work alone"
                   if config.attention_timing == "device" else "each call from an idle GPU, host work included")
                + ") after 3 warm-up calls, summed over sites; every plan is timed twice "
                "(after its videos, and in a second pass over all plans) and keeps the lesser total "
                "(attention_ms_passes has both); a plan that runs like an earlier one (same_plan_as) is not run "
                "again and carries that one's videos' metrics and timings; dense = SDPA")
        timing_inputs.clear()
        dense_seconds = seconds_per_video(pipe, pairs[0][0], pairs[0][1], config.steps, config.timing_repeats)

        calib_prompts = proxy_calibration_prompts(config.calib_prompts, seed=1234 + config.seed)
        calib_config = CalibrationConfig(num_inference_steps=config.steps, steps_per_input=config.calib_steps_per_input,
                                         query_rows=config.calib_query_rows, seed=config.seed)
        inputs = record_forward_inputs(original, calib_prompts, pipe, calib_config)
        layout = capture(original, inputs[0]).layout
        if layout is None:
            raise ValueError(f"{type(original).__name__}: no video token layout; the harness needs a video DiT")
        block_size = config.block_size or _frame_block_size(layout)
        report = attention_recall_report(original, inputs, config.recall, block_size)
        grids = baseline_grids(layout, block_size, config.top_p_grid)
        grids = {m: kinds for m, kinds in grids.items() if m in config.methods}
        candidates = calibration_candidates(grids, layout, block_size, config.densities)
        calib_config = CalibrationConfig(num_inference_steps=config.steps, steps_per_input=config.calib_steps_per_input,
                                         query_rows=config.calib_query_rows, seed=config.seed, block_size=block_size,
                                         candidates=candidates, sensitivity_probe=config.sensitivity_probe)
        calibration, sites = calibrate(original, inputs, calib_config)
        match = ("time" if timing is not None else "density") if config.match == "auto" else config.match
        site_costs = None
        cutoff = _sparse_cutoff(calibration, t_warmup)
        if timing is not None:
            site_costs = density_scaled_costs(
                measure_site_costs(timing[0], timing[1], calibration.candidates, block_size, config.seed,
                                   progress=progress, timing_mode=config.attention_timing), calibration, cutoff)
        elif match != "density":
            raise ValueError(f"match={match!r} needs measured attention times; set time_attention=True")
        measure_ms = None
        if timing is not None:
            measured_by_key: dict[str, float] = {}

            def measure_ms(plan: Plan) -> float:
                key = _runtime_key(plan)
                if key not in measured_by_key:
                    # The lesser of two passes, as for the records: a plan's first pass ran up to 1.6x its later
                    # ones on the H100 (Sparse-vDiT at 0.1: 5.64 ms, then 3.51 in the records' passes).
                    measured_by_key[key] = min(attention_ms_of(plan, *timing)["total_ms"] for _ in range(2))
                return measured_by_key[key]

        measure_psnr = None
        if measure_ms is not None and config.verify_seeds > 0 and config.verify_prompts > 0:
            # Training-distribution captions and seeds no evaluation pair uses: the search's choice never sees held-out
            # videos. Captions of their own, not the calibration's: on the H100 run of 2026-12-06 the 2 calibration
            # captions x 2 seeds ranked plans against the evaluation twice (Sparse-vDiT d0.1 and d0.3: +0.3 and
            # +1.8 dB on them, -1.6 and -0.4 dB on the held-out videos).
            verify_prompts = proxy_calibration_prompts(config.verify_prompts, seed=VERIFY_SEED_BASE + config.seed)
            verify_pairs = [(prompt, VERIFY_SEED_BASE + i) for prompt in verify_prompts
                            for i in range(config.verify_seeds)]
            verify_reference = generate(pipe, verify_pairs, config.steps, config.batch_size)
            report["verification"] = {"prompts": verify_prompts,
                                      "seeds": [VERIFY_SEED_BASE + i for i in range(config.verify_seeds)]}
            psnr_by_key: dict[str, list[float]] = {}

            def measure_psnr(plan: Plan) -> list[float]:
                key = _runtime_key(plan)
                if key not in psnr_by_key:
                    pipe.transformer = OptimizedModel(original, plan)
                    try:
                        videos = generate(pipe, verify_pairs, config.steps, config.batch_size)
                    finally:
                        pipe.transformer = original
                    psnr_by_key[key] = [float(x) for x in psnr(videos, verify_reference)]
                return psnr_by_key[key]

        # Each baseline's calibrated pattern set: the search restricted to it is one more time-matched candidate.
        families = {method: tuple(s.label() for kinds in grid for s in kinds if s.label() in calibration.candidates)
                    for method, grid in grids.items()}
        method_plans: list[MethodPlan] = []
        for d in config.densities:
            baselines = [baseline_plan(method, grids, calibration, original, d, t_warmup, config.target, config.seed)
                         for method in config.methods if method != "searched"]
            if site_costs is not None:
                for b in baselines:
                    b.predicted_attention_ms = predicted_attention_seconds(b.plan, calibration, site_costs, cutoff) * 1e3
            if "searched" in config.methods:
                method_plans += searched_plans(calibration, sites, original, d, t_warmup, config.target, baselines,
                                               config.step_ranges, config.matched, site_costs, match, measure_ms,
                                               measure_psnr=measure_psnr, families=families)
            method_plans += baselines
        report["calibration"] = {"prompts": calib_prompts, **calibration.provenance}

        records = [{"method": "dense", "target_density": 1.0, "density": 1.0, "density_all_steps": 1.0,
                    "psnr": None, "ssim": 1.0, "rel_l2": 0.0, "seconds_per_video": dense_seconds,
                    "attention_ms": dense_attention_ms,
                    "note": "the reference itself (psnr is infinite, stored as null)", **common}]
        plans: dict[str, Plan] = {}
        result = QualityResult(records, report, plans, site_costs, calibration, sites)
        if on_update is not None:
            on_update(result)
        bar = tqdm(method_plans, desc="vdopt: quality", disable=not progress)
        # A plan that runs like an earlier one (a search that kept a baseline's own plan) is not run again: it takes
        # the earlier record's videos' metrics and timings, so identical plans never differ by timing noise.
        first_run: dict[str, dict[str, Any]] = {}
        keys: list[str] = []
        for mp in bar:
            bar.set_postfix_str(f"{mp.method} @ {mp.target_density:g}")
            key = _runtime_key(mp.plan)
            keys.append(key)
            plans[plan_label(mp.method, mp.target_density, mp.matched_to, mp.matched_on)] = mp.plan
            if key in first_run:
                same = first_run[key]
                records.append(_plan_record(mp, {k: same[k] for k in _MEASURED_FIELDS}, dense_seconds,
                                            dense_attention_ms, block_size, common,
                                            same_plan_as=plan_label(same["method"], same["target_density"],
                                                                    same["matched_to"], same["matched_on"])))
                if on_update is not None:
                    on_update(result)
                continue
            opt = OptimizedModel(original, mp.plan)
            recorder = DensityRecorder(mp.plan)
            pipe.transformer = opt
            with recorder.watching(opt):
                videos = generate(pipe, pairs, config.steps, config.batch_size)
            seconds = seconds_per_video(pipe, pairs[0][0], pairs[0][1], config.steps, config.timing_repeats)
            pipe.transformer = original
            attention_ms = None if timing is None else attention_ms_of(mp.plan, *timing)["total_ms"]
            measured = {"density": recorder.density(t_warmup), "density_all_steps": recorder.density(),
                        **_metrics(videos, reference, pairs), "seconds_per_video": seconds, "attention_ms": attention_ms}
            record = _plan_record(mp, measured, dense_seconds, dense_attention_ms, block_size, common)
            records.append(record)
            first_run[key] = record
            if on_update is not None:
                on_update(result)
        if timing is not None:
            # A second timing pass over every plan, in the same order: interference (host jitter, clocks) only adds
            # time, so each plan keeps the lesser of its two totals; both are recorded.
            dense_again = attention_ms_of(None, *timing)["total_ms"]
            records[0]["attention_ms_passes"] = [records[0]["attention_ms"], dense_again]
            records[0]["attention_ms"] = min(records[0]["attention_ms"], dense_again)
            for mp, record, key in zip(method_plans, records[1:], keys):
                first = first_run[key]  # always earlier in the list than the plans that run like it
                if first is record:
                    again = attention_ms_of(mp.plan, *timing)["total_ms"]
                    record["attention_ms_passes"] = [record["attention_ms"], again]
                    record["attention_ms"] = min(record["attention_ms"], again)
                else:
                    record["attention_ms_passes"] = first["attention_ms_passes"]
                    record["attention_ms"] = first["attention_ms"]
                record["attention_speedup_vs_dense"] = records[0]["attention_ms"] / record["attention_ms"]
            if on_update is not None:
                on_update(result)
        return result
    finally:
        pipe.transformer = original


# ---------------------------------------------------------------------------------------------------------------
# Output: JSON and the Pareto plot


def _runtime_key(plan: Plan) -> str:
    """What a plan makes the model run: each site's strategies per step range and the step cache, without the
    predictions and provenance that differ between plans that run alike."""
    data = plan.to_json()
    cache = data["cache"] and {k: v for k, v in data["cache"].items() if k != "predicted"}
    sites = [{**site, "schedule": [{k: v for k, v in r.items() if k != "predicted"} for r in site["schedule"]]}
             for site in data["sites"]]
    return json.dumps({"sites": sites, "cache": cache}, sort_keys=True)


# Record fields measured by running a plan: a plan that runs like an earlier one takes the earlier one's.
_MEASURED_FIELDS = ("density", "density_all_steps", "psnr", "ssim", "rel_l2", "psnr_min", "ssim_min", "per_prompt",
                    "per_video", "seconds_per_video", "attention_ms")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_pareto(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PSNR and SSIM vs measured attention density per method; and PSNR vs seconds per video when timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in records if r["method"] != "dense"]
    timed = any(r.get("seconds_per_video") for r in methods)
    attention_timed = any(r.get("attention_ms") for r in methods)
    panels = 2 + int(timed) + int(attention_timed)
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 4.2), dpi=100)
    names = list(dict.fromkeys(r["method"] for r in methods))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    panels_spec = [("density", "psnr", "measured attention density (after warm-up)", "PSNR vs dense (dB)"),
                   ("density", "ssim", "measured attention density (after warm-up)", "SSIM vs dense")]
    if attention_timed:
        panels_spec.append(("attention_ms", "psnr", "measured attention time per step (ms, all sites)",
                            "PSNR vs dense (dB)"))
    if timed:
        panels_spec.append(("seconds_per_video", "psnr", "seconds per video (batch 1, CUDA events)", "PSNR vs dense (dB)"))
    for ax, (x_key, y_key, x_label, y_label) in zip(axes, panels_spec):
        for name in names:
            points = sorted((r[x_key], r[y_key]) for r in methods if r["method"] == name
                            and r.get(x_key) is not None and r.get(y_key) is not None)
            if points:
                # Along density a method's points form a curve; along time they do not (timings are noisy).
                style = ("s" if name == "searched" else "o") + ("-" if x_key == "density" else "")
                ax.plot(*zip(*points), style, color=colours[name], label=name, lw=2.2 if name == "searched" else 1.2)
        if x_key in ("seconds_per_video", "attention_ms"):
            dense = next((r.get(x_key) for r in records if r["method"] == "dense"), None)
            if dense:
                ax.axvline(dense, color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    if names:
        axes[0].legend(fontsize=8)
    first = records[0]
    fig.suptitle(f"vdopt quality on the {first.get('proxy', '')} proxy: {first['n_prompts']} prompts x "
                 f"{first['n_seeds']} seeds, {first['steps']} steps ({first['warmup_steps']} dense), "
                 f"{first['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):  # ties share their mean rank
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of ``x`` and ``y`` (None for fewer than 3 pairs or a constant side)."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm > 0 else None


def pareto_comparison(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every baseline record against the searched plans' measured (attention time, PSNR) points.

    At equal time: the best PSNR of any searched plan no slower than the baseline; at equal PSNR: the least time of
    any searched plan at least as good. Staircase reads of the searched points, no interpolation between them, so
    a win never rests on a point that was not run. Records without ``attention_ms`` are left out.
    """
    searched = [r for r in records if r["method"] == "searched" and r.get("psnr") is not None
                and r.get("attention_ms") is not None]
    out = []
    for b in records:
        if b["method"] in ("dense", "searched") or b.get("psnr") is None or b.get("attention_ms") is None:
            continue
        no_slower = [r["psnr"] for r in searched if r["attention_ms"] <= b["attention_ms"]]
        as_good = [r["attention_ms"] for r in searched if r["psnr"] >= b["psnr"]]
        psnr_at_time = max(no_slower) if no_slower else None
        time_at_psnr = min(as_good) if as_good else None
        out.append({
            "baseline": b["method"], "target_density": b["target_density"], "baseline_attention_ms": b["attention_ms"],
            "baseline_psnr": b["psnr"], "searched_psnr_at_equal_time": psnr_at_time,
            # JSON has no infinity: a searched plan identical to dense (PSNR inf) is written as null, so say so.
            "searched_at_equal_time_equals_dense": psnr_at_time is not None and math.isinf(psnr_at_time),
            "searched_attention_ms_at_equal_psnr": time_at_psnr,
            "wins_at_equal_time": psnr_at_time is not None and psnr_at_time > b["psnr"],
            "wins_at_equal_psnr": time_at_psnr is not None and time_at_psnr < b["attention_ms"],
            "tie_at_equal_time": psnr_at_time is not None and psnr_at_time == b["psnr"],
            "tie_at_equal_psnr": time_at_psnr is not None and time_at_psnr == b["attention_ms"],
        })
    return out


def comparison(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each baseline record beside the searched plan searched at that baseline's predicted density, and how well
    the search's predicted error ranks the measured PSNR of every method's record."""
    pairs = []
    for r in records:
        if r["method"] in ("dense", "searched") or r.get("psnr") is None:
            continue
        for match in [m for m in records if m["method"] == "searched" and m.get("matched_to") == r["method"]
                      and m["target_density"] == r["target_density"] and m.get("psnr") is not None]:
            pairs.append({"baseline": r["method"], "target_density": r["target_density"],
                          "matched_on": match.get("matched_on") or "density",
                          "baseline_predicted_attention_ms": r.get("predicted_attention_ms"),
                          "searched_predicted_attention_ms": match.get("predicted_attention_ms"),
                          "baseline_attention_ms": r.get("attention_ms"),
                          "searched_attention_ms": match.get("attention_ms"),
                          "baseline_density": r["density"], "baseline_psnr": r["psnr"],
                          "searched_density": match["density"], "searched_psnr": match["psnr"],
                          "psnr_gain": match["psnr"] - r["psnr"]})
    scored = [r for r in records if r["method"] != "dense" and r.get("psnr") is not None
              and r.get("predicted_sq_error") is not None]
    pareto = pareto_comparison(records)
    both = [r for r in records if r["method"] != "dense" and r.get("attention_ms") and r.get("predicted_attention_ms")]
    errors = sorted(abs(r["predicted_attention_ms"] / r["attention_ms"] - 1.0) for r in both)
    return {
        "attention_time_prediction": {
            "records": len(both),
            "median_abs_rel_error": errors[len(errors) // 2] if errors else None,
            "worst_abs_rel_error": errors[-1] if errors else None,
            "rank_correlation": rank_correlation([r["predicted_attention_ms"] for r in both],
                                                 [r["attention_ms"] for r in both]),
        },
        "pareto": pareto,
        "pareto_wins_at_equal_time": sum(p["wins_at_equal_time"] for p in pareto),
        "pareto_wins_at_equal_psnr": sum(p["wins_at_equal_psnr"] for p in pareto),
        "pareto_ties_at_equal_time": sum(p["tie_at_equal_time"] for p in pareto),
        "pareto_ties_at_equal_psnr": sum(p["tie_at_equal_psnr"] for p in pareto),
        "pareto_baselines_compared": len(pareto),
        "pairs": pairs,
        "searched_wins": sum(p["psnr_gain"] > 0 for p in pairs), "pairs_compared": len(pairs),
        "rank_correlation_psnr_vs_predicted_error": rank_correlation(
            [r["psnr"] for r in scored], [-r["predicted_sq_error"] for r in scored]),
        "records_ranked": len(scored),
        "note": ("searched plans with matched_to were searched at that baseline's predicted density or predicted "
                 "attention time (matched_on says which; time_match lists the re-searches of a plan measured slower "
                 "than its baseline); densities here are as measured on the evaluation prompts (dynamic patterns "
                 "drift from calibration); ties_at_equal_* count points where the searched plan equals the "
                 "baseline (e.g. the search kept the baseline's own plan), which are not wins"),
    }


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ``quality.json``, with the PSNR of videos identical to dense (written as null, since JSON
    has no infinity; relative L2 0) restored to ``inf``."""
    records = json.loads(Path(path).read_text())
    for r in records:
        if r.get("psnr") is None and r.get("rel_l2") == 0.0:
            r["psnr"] = math.inf
    return records


def write_results(result: QualityResult, out: str | Path) -> dict[str, Path]:
    """Write ``quality.json`` (records), ``quality_recall95.json`` (report), ``quality_comparison.json`` (matched
    pairs, see :func:`comparison`), ``quality_pareto.png`` and, where the run calibrated, ``quality_calibration.json``
    (the calibration, sites and measured site costs, so the searches can be re-run offline:
    :func:`load_harness_calibration`)
    under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": out / "quality.json", "recall": out / "quality_recall95.json",
             "comparison": out / "quality_comparison.json", "plot": out / "quality_pareto.png"}
    paths["records"].write_text(json.dumps(_jsonable(result.records), indent=1) + "\n")
    paths["recall"].write_text(json.dumps(_jsonable(result.recall_report), indent=1) + "\n")
    summary = comparison(result.records)
    if result.site_costs is not None:
        costs = result.site_costs
        first = next(iter(costs.per_site))
        summary["site_costs"] = {"source": costs.source, "site": first, "mixing_ms": costs.mixing[first] * 1e3,
                                 "shared_mixing_ms": costs.shared_mixing.get(first, 0.0) * 1e3,
                                 "per_candidate_ms": {label: {"fixed": c.fixed * 1e3, "per_head": c.per_head * 1e3,
                                                               "own": c.own * 1e3}
                                                      for label, c in costs.per_site[first].items()}}
    paths["comparison"].write_text(json.dumps(_jsonable(summary), indent=1) + "\n")
    plot_pareto(result.records, paths["plot"])
    if result.calibration is not None:
        paths["calibration"] = save_calibration(
            out / "quality_calibration.json", result.calibration, result.sites,
            site_costs=None if result.site_costs is None else result.site_costs.to_json())
    return paths


def load_harness_calibration(path: str | Path) -> tuple[CalibrationResult, list[AttentionSite], SiteCosts | None]:
    """The calibration, attention sites and measured site costs a harness run wrote (``quality_calibration.json``):
    enough to re-run its searches offline, e.g. ``search(model, calibration, sites, config=..., site_costs=costs)``."""
    calibration, sites, extra = load_calibration(path)
    costs = extra.get("site_costs")
    return calibration, sites, None if costs is None else SiteCosts.from_json(costs)


def load_harness_run(results: str | Path) -> tuple[list[dict[str, Any]], CalibrationResult, list[AttentionSite],
                                                  SiteCosts]:
    """A harness run's records (``quality.json``), calibration, sites and measured site costs from its folder, for
    offline re-runs of its searches. Raises ValueError if the run measured no site costs (no GPU)."""
    results = Path(results)
    records = json.loads((results / "quality.json").read_text())  # as written: null PSNRs stay null
    calibration, sites, costs = load_harness_calibration(results / "quality_calibration.json")
    if costs is None:
        raise ValueError("quality_calibration.json has no measured site costs (the harness ran without a GPU)")
    return records, calibration, sites, costs


def rebuild_harness_baselines(records: Sequence[dict[str, Any]], calibration: CalibrationResult, costs: SiteCosts,
                              model: nn.Module, target: str = "h100") -> tuple[float, dict[tuple[str, float], MethodPlan]]:
    """The baseline plans of a harness run's ``records`` (baseline records only), rebuilt offline, and ``t_warmup``.

    ``t_warmup`` is not saved with a run; it is the calibration time whose rebuilt baselines reproduce the recorded
    predicted attention times best (least worst-case difference). Returns it and the plans keyed by (method,
    target density)."""
    stats = next(iter(calibration.sites.values()))
    times = sorted(set(stats.times))
    grids = baseline_grids(stats.site.layout, stats.block_size)
    keys = list(dict.fromkeys((r["method"], r["target_density"]) for r in records))

    def mismatch(t_warmup: float, built: dict[tuple[str, float], MethodPlan]) -> float:
        cutoff = _sparse_cutoff(calibration, t_warmup)
        return max(abs(predicted_attention_seconds(built[(r["method"], r["target_density"])].plan, calibration, costs,
                                                   cutoff) * 1e3 - r["predicted_attention_ms"]) for r in records)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tried = {t: {(m, d): baseline_plan(m, grids, calibration, model, d, t, target) for m, d in keys}
                 for t in times}
    t_warmup = min(times, key=lambda t: mismatch(t, tried[t]))
    return t_warmup, tried[t_warmup]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the records."""
    header = (f"{'method':<18} {'target':>6} {'density':>8} {'PSNR':>7} {'SSIM':>7} {'relL2':>7} {'s/video':>8} "
              f"{'attn ms':>8} {'pred.err':>8} matched_to")
    lines = [header]
    for r in records:
        psnr_text = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        sec = r.get("seconds_per_video")
        attn = r.get("attention_ms")
        error = r.get("predicted_sq_error")
        lines.append(f"{r['method']:<18} {r['target_density']:>6.2f} {r['density']:>8.3f} {psnr_text:>7} "
                     f"{r['ssim']:>7.4f} {r['rel_l2']:>7.4f} {'' if sec is None else f'{sec:.3f}':>8} "
                     f"{'' if attn is None else f'{attn:.3f}':>8} "
                     f"{'' if error is None else f'{error:.4f}':>8} {r.get('matched_to') or ''}")
    return "\n".join(lines)


def _verdict(point: dict[str, Any], at: str) -> str:
    return "win" if point[f"wins_at_equal_{at}"] else "tie" if point[f"tie_at_equal_{at}"] else "LOSS"


def format_comparison(records: Sequence[dict[str, Any]]) -> str:
    """Each baseline beside the searched plan searched at its predicted density (empty without matched plans)."""
    result = comparison(records)
    lines = []
    if result["pareto"]:
        lines.append(f"{'baseline':<18} {'target':>6} {'attn ms':>8} {'PSNR':>7} | searched: PSNR at <= time, "
                     "ms at >= PSNR")
        for p in result["pareto"]:
            at_time, at_psnr = p["searched_psnr_at_equal_time"], p["searched_attention_ms_at_equal_psnr"]
            lines.append(f"{p['baseline']:<18} {p['target_density']:>6.2f} {p['baseline_attention_ms']:>8.3f} "
                         f"{p['baseline_psnr']:>7.2f} | {'-' if at_time is None else f'{at_time:.2f}':>7} "
                         f"{_verdict(p, 'time'):>4}   "
                         f"{'-' if at_psnr is None else f'{at_psnr:.3f}':>8} {_verdict(p, 'psnr'):>4}")
        lines.append(f"searched ahead at equal attention time vs {result['pareto_wins_at_equal_time']} and at equal "
                     f"PSNR vs {result['pareto_wins_at_equal_psnr']} of {result['pareto_baselines_compared']} "
                     "baseline records")
    if not result["pairs"]:
        return "\n".join(lines)
    lines.append(f"{'baseline':<18} {'target':>6} {'on':>7} {'density':>8} {'attn ms':>8} {'PSNR':>7} | "
                 f"{'density':>8} {'attn ms':>8} {'PSNR':>7} {'gain':>6}")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for p in result["pairs"]:
        lines.append(f"{p['baseline']:<18} {p['target_density']:>6.2f} {p['matched_on']:>7} {p['baseline_density']:>8.3f} "
                     f"{ms(p['baseline_attention_ms']):>8} {p['baseline_psnr']:>7.2f} | {p['searched_density']:>8.3f} "
                     f"{ms(p['searched_attention_ms']):>8} {p['searched_psnr']:>7.2f} {p['psnr_gain']:>+6.2f}")
    timing = result["attention_time_prediction"]
    if timing["records"]:
        lines.append(f"attention time predicted by the measured candidate costs vs measured per plan: median error "
                     f"{timing['median_abs_rel_error']:.1%}, worst {timing['worst_abs_rel_error']:.1%} over "
                     f"{timing['records']} plans")
    rho = result["rank_correlation_psnr_vs_predicted_error"]
    lines.append(f"searched plan ahead in {result['searched_wins']} of {result['pairs_compared']} pairs; rank "
                 f"correlation of PSNR with -predicted error over {result['records_ranked']} records: "
                 + ("n/a" if rho is None else f"{rho:.3f}"))
    return "\n".join(lines)


def format_recall_report(report: dict[str, Any]) -> str:
    """Per-layer density needed for the report's recall, as text."""
    lines = [(f"density for {report['recall']:.0%} attention recall (block {report['block_size']}): "
              f"{report['heads_below_half']}/{report['heads']} heads below 0.5 (block level)")]
    for layer in report["layers"]:
        heads = " ".join(f"{v:.2f}" for v in layer["block_density_per_head"])
        lines.append(f"  {layer['site']:<20} block {layer['block_density']:.3f} [{heads}]  token {layer['token_density']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _load_pipe(proxy: str, device: str, dtype: torch.dtype, weights: str | None) -> tuple[Any, dict[str, Any]]:
    from vdopt.proxy.model import TINY_CONFIG, WEIGHTS_DIR, ProxyConfig, build_proxy
    from vdopt.proxy.pipeline import ProxyPipeline, load_proxy_pipeline

    if proxy == "trained":
        directory = Path(weights) if weights else WEIGHTS_DIR
        pipe = load_proxy_pipeline(device, dtype, directory) if dtype != torch.float32 else load_proxy_pipeline(
            device, weights_dir=directory)
        digest = hashlib.sha256()
        for path in sorted(directory.glob("proxy-*.safetensors")) + [directory / "config.json"]:
            digest.update(path.read_bytes())
        return pipe, {"weights_sha256": digest.hexdigest()[:16]}
    config = TINY_CONFIG if proxy == "tiny" else ProxyConfig()
    torch.manual_seed(0)
    transformer, text_encoder, tokenizer = build_proxy(config)
    # No dtype argument for float32: diffusers warns on any dtype given to a Wan model's .to().
    pipe = ProxyPipeline(transformer.eval(), text_encoder.eval(), tokenizer, config).to(
        device, None if dtype == torch.float32 else dtype)
    return pipe, {"weights_sha256": None}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,0.2,0.3, got {text!r}") from None


def quality_main(argv: list[str] | None = None) -> int:
    """``vdopt-bench quality``: dense vs searched plan and baselines at matched density on the proxy."""
    parser = argparse.ArgumentParser(prog="vdopt-bench quality", description=quality_main.__doc__)
    parser.add_argument("--prompts", type=int, default=14, help="held-out prompts (at most 14)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--densities", type=_floats, default=(0.1, 0.2, 0.3), help="target densities, e.g. 0.1,0.2,0.3")
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="share of first steps kept dense")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--proxy", default="trained", choices=("trained", "untrained", "tiny"),
                        help="trained weights, or a random-init proxy of full or tiny size (for smoke tests)")
    parser.add_argument("--weights", default=None, help="weights folder (default: the shipped vdopt/proxy/weights)")
    parser.add_argument("--calib-prompts", type=int, default=2, help="training-distribution calibration prompts")
    parser.add_argument("--batch-size", type=int, default=16, help="(prompt, seed) pairs per pipeline call")
    parser.add_argument("--timing-repeats", type=int, default=2, help="timed single-video runs per method (CUDA)")
    parser.add_argument("--time-attention", choices=("auto", "yes", "no"), default="auto",
                        help="time each plan's attention on one real call's q/k/v (auto: on CUDA)")
    parser.add_argument("--attention-timing", choices=TIMING_MODES, default="device",
                        help="device: a call's GPU work alone (host hidden); wall: from an idle GPU, host included")
    parser.add_argument("--match", choices=("auto", "density", "time", "both"), default="auto",
                        help="budget of the searches matched to each baseline (auto: time when attention is timed)")
    parser.add_argument("--step-ranges", type=int, default=1, help="most step ranges after the warm-up (searched plan)")
    parser.add_argument("--no-matched", dest="matched", action="store_false",
                        help="skip the searched plans at each baseline's own density (run only one per target)")
    parser.add_argument("--verify-prompts", type=int, default=8,
                        help="training-distribution captions of the videos each time-matched search keeps its best "
                             "measured plan on (0: keep the largest budget that fits, unmeasured)")
    parser.add_argument("--verify-seeds", type=int, default=1, help="noise seeds per verification caption")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        config = QualityConfig(prompts=args.prompts, seeds=args.seeds, steps=args.steps, densities=args.densities,
                               warmup_fraction=args.warmup_fraction, methods=tuple(args.methods.split(",")),
                               calib_prompts=args.calib_prompts, batch_size=args.batch_size,
                               timing_repeats=args.timing_repeats, step_ranges=args.step_ranges, matched=args.matched,
                               time_attention={"auto": None, "yes": True, "no": False}[args.time_attention],
                               match=args.match, attention_timing=args.attention_timing,
                               verify_prompts=args.verify_prompts, verify_seeds=args.verify_seeds)
        pipe, weights_meta = _load_pipe(args.proxy, device, getattr(torch, args.dtype), args.weights)
    except (ValueError, FileNotFoundError) as error:
        print(f"vdopt-bench quality: error: {error}", file=sys.stderr)
        return 2
    command = "vdopt-bench quality " + " ".join(sys.argv[1:] if argv is None else argv)

    def write(partial: QualityResult) -> None:
        for record in partial.records:
            record.update(weights_meta, command=command)
        write_results(partial, args.out)

    result = run_quality(pipe, config, proxy=args.proxy, on_update=write)
    paths = write_results(result, args.out)
    print(format_recall_report(result.recall_report))
    print(format_table(result.records))
    comparison = format_comparison(result.records)
    if comparison:
        print(comparison)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


__all__ = [
    "DensityRecorder",
    "QualityConfig",
    "QualityResult",
    "attention_input_recorder",
    "attention_milliseconds",
    "attention_recall_report",
    "baseline_plan",
    "comparison",
    "density_for_recall",
    "density_scaled_costs",
    "fixed_plan",
    "format_comparison",
    "load_harness_run",
    "pareto_comparison",
    "psnr",
    "quality_main",
    "rank_correlation",
    "rebuild_harness_baselines",
    "record_attention_inputs",
    "relative_l2",
    "run_quality",
    "searched_plans",
    "ssim",
    "with_dense_warmup",
    "write_results",
]
