"""Calibration: run the model on calibration inputs and measure, per site and head, what each candidate keeps.

For each recorded forward call (a denoising step of a calibration prompt) and each sparsifiable site, a sample of
query rows is attended densely (``rows x tokens``, never the full ``tokens x tokens`` map); each candidate's
pattern then gives, per head, the attention mass it keeps (recall), the relative error of its output on those rows,
and its exact density.

With ``CalibrationConfig.sensitivity_probe`` set, each call is also run once per site with that site's attention
computed sparsely by the probe strategy (every head, the runtime's own sparse attention) and every other site dense:
the relative squared change of the model's output over the site's relative squared attention-output error is the
site's *output gain* at that call. Gains differ by an order of magnitude between layers and grow at late denoising
steps, so an error budget that treats all sites alike spends density where it buys little (see search.py).
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn
from tqdm.auto import tqdm

from vdopt.attention import additive_key_bias, sparse_site_attention
from vdopt.capture import CapturedGraph, capture, export_kwargs, forward_kwargs, replace_attention_nodes
from vdopt.runtime import denoising_time, input_signature
from vdopt.sites import AttentionSite, TokenLayout
from vdopt.strategies import PatternContext, Strategy, default_candidates, strategy_from_json

CalibrationInputs = Sequence[str] | Sequence[dict[str, Any]] | Callable[[nn.Module], Any]


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration samples the model.

    ``steps_per_input``: denoising steps recorded per calibration input (evenly spread over the run);
    ``num_inference_steps``: steps of the pipeline run for prompt strings; ``query_rows``: query rows sampled per
    site and step; ``block_size``: kernel block size (None: chosen from the token count); ``sensitivity_probe``:
    strategy whose error measures each site's output gain (None: not measured; costs one more forward per site
    and call).
    """

    steps_per_input: int = 4
    num_inference_steps: int = 20
    query_rows: int = 256
    block_size: int | None = None
    candidates: tuple[Strategy, ...] = field(default_factory=lambda: tuple(default_candidates()))
    seed: int = 0
    timestep_arg: str = "timestep"
    timestep_scale: float = 1000.0
    sensitivity_probe: Strategy | None = None


def default_block_size(video_tokens: int) -> int:
    """128 (the fast kernel tile) for production sizes, smaller for small latents so patterns stay meaningful."""
    for size in (128, 64, 32):
        if video_tokens >= 32 * size:
            return size
    return 16


@dataclass
class SiteStats:
    """Per-candidate measurements of one site: lists over samples, each entry a per-head list.

    ``output_gain[i]``: at sample ``i``, relative squared change of the model output per unit relative squared
    error of this site's attention output (empty when calibration measured no sensitivities).
    """

    site: AttentionSite
    block_size: int
    times: list[float] = field(default_factory=list)
    dense_output_norm: list[list[float]] = field(default_factory=list)
    output_gain: list[float] = field(default_factory=list)
    recall: dict[str, list[list[float]]] = field(default_factory=dict)
    rel_error: dict[str, list[list[float]]] = field(default_factory=dict)
    density: dict[str, list[list[float]]] = field(default_factory=dict)


@dataclass
class CalibrationResult:
    """Measurements of every sparsifiable site, plus what was run to get them. :func:`save_calibration` /
    :func:`load_calibration` keep it as JSON, so a search can be re-run, e.g. at other budgets, without a GPU."""

    sites: dict[str, SiteStats]
    candidates: dict[str, Strategy]
    provenance: dict[str, Any]

    FORMAT: ClassVar[str] = "vdopt-calibration"
    VERSION: ClassVar[int] = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT, "version": self.VERSION,
            "candidates": {label: strategy.to_json() for label, strategy in self.candidates.items()},
            "provenance": json.loads(json.dumps(self.provenance, default=str)),
            "sites": {name: {"site": site_to_json(stats.site),
                             "block_size": stats.block_size, "times": stats.times,
                             "dense_output_norm": stats.dense_output_norm, "output_gain": stats.output_gain,
                             "recall": stats.recall, "rel_error": stats.rel_error, "density": stats.density}
                      for name, stats in self.sites.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "calibration") -> CalibrationResult:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ValueError(f"{source}: not a vdopt calibration (format {found!r}, expected {cls.FORMAT!r}); write "
                             "one with save_calibration")
        if data.get("version") != cls.VERSION:
            raise ValueError(f"{source}: calibration format version {data.get('version')!r}, this vdopt reads "
                             f"{cls.VERSION}; re-run calibration with this version")
        sites = {}
        for name, entry in data["sites"].items():
            sites[name] = SiteStats(site_from_json(entry["site"]), entry["block_size"], entry["times"],
                                    entry["dense_output_norm"], entry["output_gain"], entry["recall"],
                                    entry["rel_error"], entry["density"])
        candidates = {label: strategy_from_json(s) for label, s in data["candidates"].items()}
        return cls(sites, candidates, data.get("provenance", {}))


def site_to_json(site: AttentionSite) -> dict[str, Any]:
    return asdict(site)  # the layout, a dataclass too, becomes its dict


def site_from_json(data: dict[str, Any]) -> AttentionSite:
    fields = dict(data)
    fields["layout"] = None if fields.get("layout") is None else TokenLayout(**fields["layout"])
    return AttentionSite(**fields)


def save_calibration(path: str | Path, calibration: CalibrationResult, sites: Sequence[AttentionSite],
                     **extra: Any) -> Path:
    """Write ``calibration`` and the model's attention ``sites`` (all of them, as :func:`calibrate` returns them) as
    JSON, plus any JSON-ready ``extra`` entries; :func:`load_calibration` reads it back."""
    path = Path(path)
    path.write_text(json.dumps({"calibration": calibration.to_json(), "sites": [site_to_json(s) for s in sites],
                                **extra}) + "\n")
    return path


def load_calibration(path: str | Path) -> tuple[CalibrationResult, list[AttentionSite], dict[str, Any]]:
    """What :func:`save_calibration` wrote: the calibration, the sites and the extra entries."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a saved calibration ({error})") from None
    if not isinstance(data, dict) or "calibration" not in data or "sites" not in data:
        raise ValueError(f"{path}: not a saved calibration (no 'calibration' and 'sites'); write one with "
                         "save_calibration or vdopt-search --save-calibration")
    extra = {k: v for k, v in data.items() if k not in ("calibration", "sites")}
    return (CalibrationResult.from_json(data["calibration"], str(path)), [site_from_json(s) for s in data["sites"]],
            extra)


def record_forward_inputs(
    model: nn.Module, inputs: CalibrationInputs, pipeline: Any = None, config: CalibrationConfig = CalibrationConfig()
) -> list[dict[str, Any]]:
    """The forward kwargs of ``model`` on the calibration inputs, ``steps_per_input`` denoising steps per input.

    ``inputs``: prompt strings (run through ``pipeline``, whose ``transformer`` is ``model``), dicts of forward
    kwargs (used as they are), or a callable that runs the model itself (called with the model).
    """
    if callable(inputs) and not isinstance(inputs, (list, tuple)):
        runs = [inputs]
    else:
        runs = list(inputs)
    if not runs:
        raise ValueError("calibration inputs are empty; give at least one prompt, kwargs dict or callable")
    recorded: list[dict[str, Any]] = []
    for item in tqdm(runs, desc="vdopt: recording calibration steps", leave=False):
        if isinstance(item, dict):
            recorded.append(dict(item))
            continue
        calls: list[dict[str, Any]] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], calls: list = calls) -> None:
            bound = forward_kwargs(model, args, kwargs)
            calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.copy(v) for k, v in bound.items()})

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                if isinstance(item, str):
                    if pipeline is None:
                        raise ValueError(
                            f"calibration prompt {item!r} needs a pipeline with a text encoder; pass the pipeline to "
                            "vdopt.optimize, or give dicts of forward kwargs instead of strings"
                        )
                    run_pipeline(pipeline, item, config.num_inference_steps, config.seed)
                elif callable(item):
                    item(model)
                else:
                    raise TypeError(f"calibration input {item!r} is not a string, a kwargs dict or a callable")
        finally:
            handle.remove()
        if not calls:
            raise RuntimeError(f"calibration input {item!r} never called the model's forward")
        picks = torch.linspace(0, len(calls) - 1, min(config.steps_per_input, len(calls))).round().long().unique()
        recorded.extend(calls[int(i)] for i in picks)
    return recorded


def run_pipeline(pipeline: Any, prompt: str, num_inference_steps: int, seed: int) -> Any:
    """One pipeline run, seeded the way the pipeline accepts (``seed=`` or a diffusers ``generator=``)."""
    parameters = inspect.signature(pipeline.__call__).parameters
    if "seed" in parameters:
        return pipeline(prompt, num_inference_steps=num_inference_steps, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompt, num_inference_steps=num_inference_steps, generator=generator)


class _SiteProbe(nn.Module):
    """Stands in for one attention call during calibration: returns the dense output, records candidate stats.

    ``clock["perturb"]`` naming this site instead returns the probe strategy's sparse output and stores its relative
    squared error over the video rows in ``clock["site_error"]`` (nothing is recorded then).
    """

    def __init__(self, stats: SiteStats, candidates: dict[str, Strategy], config: CalibrationConfig, clock: dict) -> None:
        super().__init__()
        self.stats, self.candidates, self.config, self.clock = stats, candidates, config, clock

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        perturb = self.clock.get("perturb")
        if perturb is None:
            measure_site(self.stats, self.candidates, query, key, value, attn_mask, scale, self.config, self.clock["t"])
            return out
        if perturb != self.stats.site.name:
            return out
        layout: TokenLayout = self.stats.site.layout  # type: ignore[assignment]
        probe = self.config.sensitivity_probe
        ctx = PatternContext(layout, self.stats.block_size, {}, self.config.seed)
        sparse = sparse_site_attention(query, key, value, attn_mask, scale, layout, [probe] * query.shape[1], ctx)
        v0, v1 = layout.video_span
        dense_rows, sparse_rows = out[:, :, v0:v1].float(), sparse[:, :, v0:v1].float()
        self.clock["site_error"] = float((sparse_rows - dense_rows).pow(2).sum() / dense_rows.pow(2).sum().clamp(min=1e-30))
        return sparse


def measure_site(stats: SiteStats, candidates: dict[str, Strategy], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: torch.Tensor | None, scale: float | None, config: CalibrationConfig, t: float) -> None:
    """Append one sample of per-head recall, output error and density of every candidate to ``stats``."""
    layout: TokenLayout = stats.site.layout  # type: ignore[assignment]
    v0, v1 = layout.video_span
    n = layout.video_tokens
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    generator = torch.Generator().manual_seed(config.seed + len(stats.times))
    rows = torch.randperm(n, generator=generator)[: min(config.query_rows, n)].sort().values.to(q.device)
    q_rows = q[:, :, v0 + rows].float()
    scores = torch.matmul(q_rows, k.float().transpose(-1, -2)) * scale  # [B, H, R, tokens]
    bias = additive_key_bias(attn_mask)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    dense_rows = torch.matmul(probs, v.float())
    dense_norm = dense_rows.pow(2).sum((0, 2, 3)).sqrt()
    stats.times.append(t)
    stats.dense_output_norm.append(dense_norm.tolist())
    ctx = PatternContext(layout, stats.block_size, {}, config.seed)
    qv, kv = q[:, :, v0:v1], k[:, :, v0:v1]
    for label, strategy in candidates.items():
        pattern = strategy.build(qv, kv, ctx)
        keep = torch.ones_like(probs, dtype=torch.bool)
        keep[..., v0:v1] = pattern.keep_rows(rows)
        kept = probs * keep
        recall = kept.sum(-1)  # [B, H, R]
        sparse_rows = torch.matmul(kept / recall.clamp(min=1e-30)[..., None], v.float())
        error = (sparse_rows - dense_rows).pow(2).sum((0, 2, 3)).sqrt() / dense_norm.clamp(min=1e-30)
        stats.recall.setdefault(label, []).append(recall.mean((0, 2)).tolist())
        stats.rel_error.setdefault(label, []).append(error.tolist())
        stats.density.setdefault(label, []).append(pattern.density().tolist())


def _output_tensor(output: Any) -> torch.Tensor:
    """The model output's tensors (a tensor, a tuple, or a dataclass of them) as one flat float32 vector."""
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not leaves:
        raise ValueError("the model returned no floating-point tensor; output gains need one to compare")
    return torch.cat([x.detach().float().flatten() for x in leaves])


def _measure_output_gains(graph: fx.GraphModule, kwargs: dict[str, Any], dense_output: Any,
                          stats: dict[str, SiteStats], clock: dict) -> None:
    """Append each site's output gain at this call: one forward per site with only that site sparse."""
    reference = _output_tensor(dense_output)
    norm = reference.pow(2).sum().clamp(min=1e-30)
    try:
        for name, site_stats in stats.items():
            clock["perturb"], clock["site_error"] = name, None
            changed = _output_tensor(graph(**kwargs))
            site_error = clock["site_error"]
            if site_error is None:  # the site did not run in this call (e.g. another input signature's site)
                continue
            output_error = float((changed - reference).pow(2).sum() / norm)
            # A probe that changed nothing at this site says nothing about its gain: NaN, filled in by the search.
            site_stats.output_gain.append(output_error / site_error if site_error > 1e-12 else float("nan"))
    finally:
        clock["perturb"] = None


def _probe_graph(captured: CapturedGraph, stats: dict[str, SiteStats], candidates: dict[str, Strategy],
                 config: CalibrationConfig, clock: dict) -> fx.GraphModule:
    def probe(site: AttentionSite) -> _SiteProbe | None:
        return _SiteProbe(stats[site.name], candidates, config, clock) if site.sparsifiable else None

    return replace_attention_nodes(captured.graph_module, captured.sites, probe, "vdopt_probe_")


def calibrate(model: nn.Module, forward_inputs: list[dict[str, Any]], config: CalibrationConfig = CalibrationConfig(),
              layout: TokenLayout | None = None) -> tuple[CalibrationResult, list[AttentionSite]]:
    """Measure every candidate on every sparsifiable site for each recorded forward call (progress bar shown)."""
    candidates = {s.label(): s for s in config.candidates}
    stats: dict[str, SiteStats] = {}
    graphs: dict[Any, fx.GraphModule] = {}
    sites: list[AttentionSite] = []
    clock = {"t": 0.0}
    for inputs in tqdm(forward_inputs, desc="vdopt: calibrating"):
        key = input_signature(inputs)
        if key not in graphs:
            captured = capture(model, inputs, layout)
            sites = captured.sites
            for site in captured.sites:
                if site.sparsifiable and site.name not in stats:
                    block = config.block_size or default_block_size(site.layout.video_tokens)
                    stats[site.name] = SiteStats(site, block)
            graphs[key] = _probe_graph(captured, stats, candidates, config, clock)
        clock["t"] = denoising_time(inputs, config.timestep_arg, config.timestep_scale)
        with torch.no_grad():
            dense_out = graphs[key](**export_kwargs(model, inputs))
            if config.sensitivity_probe is not None:
                _measure_output_gains(graphs[key], export_kwargs(model, inputs), dense_out, stats, clock)
    if not stats:
        raise ValueError(
            f"{type(model).__name__} has no attention site vdopt can sparsify (self-attention over a known video "
            "layout); pass layout=TokenLayout(...) if the model's token layout is not read from its config"
        )
    provenance = {
        "calls": len(forward_inputs), "steps_per_input": config.steps_per_input,
        "sensitivity_probe": None if config.sensitivity_probe is None else config.sensitivity_probe.label(),
        "num_inference_steps": config.num_inference_steps, "query_rows": config.query_rows, "seed": config.seed,
        "times": sorted({round(t, 4) for s in stats.values() for t in s.times}, reverse=True),
    }
    return CalibrationResult(stats, candidates, provenance), sites
