"""The plan: a versioned, human-readable JSON record of which strategy each head of each site uses, and when."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vdopt.strategies import Dense, Strategy, strategy_from_json

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan that cannot be loaded or applied; the message names the field and the fix."""


def _version() -> str:
    from vdopt import __version__

    return __version__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


@dataclass(frozen=True)
class ModelFingerprint:
    """What a plan was made for: the model class, its config and its parameter count."""

    class_name: str
    config: dict[str, Any]
    num_parameters: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelFingerprint:
        config = getattr(model, "config", None)
        config_dict = dict(config) if config is not None and hasattr(config, "items") else {}
        return cls(type(model).__name__, _jsonable(config_dict), sum(p.numel() for p in model.parameters()))

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """A sentence naming the first difference, or None when ``other`` is the same model."""
        if self.class_name != other.class_name:
            return f"the plan was made for {self.class_name} but the model is {other.class_name}"
        for key in sorted(set(self.config) | set(other.config)):
            if self.config.get(key) != other.config.get(key):
                return (
                    f"the plan was made for {self.class_name}({key}={self.config.get(key)!r}) but the model has "
                    f"{key}={other.config.get(key)!r}"
                )
        if self.num_parameters != other.num_parameters:
            return f"the plan was made for a model of {self.num_parameters} parameters, this one has {other.num_parameters}"
        return None


@dataclass
class StepRange:
    """Head strategies for denoising times ``t`` in ``(t_end, t_start]``; ``t`` = timestep / timestep scale, 1 = noise."""

    t_start: float
    t_end: float
    heads: list[Strategy]
    predicted: dict[str, Any] = field(default_factory=dict)

    def contains(self, t: float) -> bool:
        return self.t_end < t <= self.t_start or (self.t_end <= 0.0 and t <= 0.0)


@dataclass
class SitePlan:
    """The schedule of one attention site (matched by name), with the block size its kernels use."""

    site: str
    heads: int
    block_size: int
    schedule: list[StepRange]

    def strategies_at(self, t: float) -> list[Strategy]:
        for step_range in self.schedule:
            if step_range.contains(t):
                return step_range.heads
        return [Dense()] * self.heads

    @property
    def is_dense(self) -> bool:
        return all(isinstance(s, Dense) for r in self.schedule for s in r.heads)


@dataclass
class StepCachePlan:
    """Reuse of blocks 1..L-1 across denoising steps (see passes/insert_step_cache.py), in one of two kinds.

    - ``first_block_residual`` (``reuse_steps`` None): the blocks after the first are skipped while the accumulated
      relative change of the first block's output stays under ``threshold``, never in the first ``warmup_steps``
      steps of a run, and never more than ``max_consecutive_reuses`` steps in a row (TeaCache / FirstBlockCache).
    - ``schedule``: a fixed set of step indices of a ``schedule_steps``-step run on which the blocks are skipped,
      chosen offline from calibration runs (LeMiCa): no run-time measurement, so no device synchronisation.
      :meth:`resampled` maps it to a run of another length.
    """

    threshold: float = 0.0
    warmup_steps: int = 2
    max_consecutive_reuses: int = 2
    predicted: dict[str, Any] = field(default_factory=dict)
    reuse_steps: tuple[int, ...] | None = None
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise PlanError(f"cache.threshold must be >= 0, got {self.threshold}")
        if self.warmup_steps < 0 or self.max_consecutive_reuses < 0:
            raise PlanError("cache.warmup_steps and cache.max_consecutive_reuses must be >= 0")
        if self.reuse_steps is not None:
            self.reuse_steps = tuple(sorted({int(i) for i in self.reuse_steps}))
            if self.schedule_steps is None or self.schedule_steps < 1:
                raise PlanError(f"cache.schedule_steps must be a step count >= 1 for a reuse schedule, got "
                                f"{self.schedule_steps}")
            bad = [i for i in self.reuse_steps if not 0 < i < self.schedule_steps]
            if bad:
                raise PlanError(f"cache.reuse_steps {bad} lie outside 1..{self.schedule_steps - 1} (step 0 always runs)")

    @property
    def kind(self) -> str:
        return "first_block_residual" if self.reuse_steps is None else "schedule"

    def reuses_step(self, step: int) -> bool:
        """For a schedule: whether step ``step`` (0-based, counted per branch within a run) reuses the blocks."""
        return self.reuse_steps is not None and step in self.reuse_steps

    def resampled(self, steps: int) -> StepCachePlan:
        """The same schedule for a ``steps``-step run: step i reuses when the schedule's step at the same fraction of
        the run does, with runs of reuses capped at ``max_consecutive_reuses``. A threshold plan is returned
        unchanged (it does not depend on the run length)."""
        if self.reuse_steps is None or steps == self.schedule_steps:
            return self
        n = self.schedule_steps or 1
        mapped, run = [], 0
        for i in range(1, steps):
            # Stretching a schedule lengthens its runs of reuses; cap them at the calibrated limit.
            run = run + 1 if round(i * (n - 1) / max(steps - 1, 1)) in self.reuse_steps else 0
            if run > self.max_consecutive_reuses:
                run = 0
            elif run:
                mapped.append(i)
        return StepCachePlan(self.threshold, self.warmup_steps, self.max_consecutive_reuses,
                             {**self.predicted, "resampled_from_steps": n}, tuple(mapped), steps)

    def describe(self) -> str:
        """One line for plan summaries."""
        if self.reuse_steps is not None:
            return (f"step cache: fixed schedule, blocks 1..L-1 reused on {len(self.reuse_steps)} of "
                    f"{self.schedule_steps} steps (steps {list(self.reuse_steps)})")
        return (f"step cache: reuse blocks 1..L-1 while first-block change < {self.threshold:.3g} (after "
                f"{self.warmup_steps} steps, at most {self.max_consecutive_reuses} in a row)")

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "threshold": self.threshold, "warmup_steps": self.warmup_steps,
                                 "max_consecutive_reuses": self.max_consecutive_reuses}
        if self.reuse_steps is not None:
            entry.update(reuse_steps=list(self.reuse_steps), schedule_steps=self.schedule_steps)
        return {**entry, "predicted": _jsonable(self.predicted)}


@dataclass
class Plan:
    """Which strategy every head of every attention site uses over the denoising schedule.

    Save with :meth:`save`, reload with :meth:`load`; :func:`vdopt.apply` replays it on a model without calibration.
    """

    model: ModelFingerprint
    target: str
    sites: list[SitePlan]
    search: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    timestep_scale: float = 1000.0
    cache: StepCachePlan | None = None
    parallel: dict[str, Any] | None = None  # {"ulysses_degree": N, "head_order": {site: [heads]}, ...}
    vdopt_version: str = field(default_factory=_version)
    schema_version: int = SCHEMA_VERSION

    def site(self, name: str) -> SitePlan | None:
        for site in self.sites:
            if site.site == name:
                return site
        return None

    def check_model(self, model: nn.Module) -> None:
        """Raise PlanError unless ``model`` is the model this plan was made for."""
        problem = self.model.mismatch(ModelFingerprint.of(model))
        if problem:
            raise PlanError(f"{problem}; run vdopt-search again for this model.")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "vdopt_version": self.vdopt_version,
            "model": {"class": self.model.class_name, "config": self.model.config, "num_parameters": self.model.num_parameters},
            "target": self.target,
            "timestep_scale": self.timestep_scale,
            "cache": None if self.cache is None else self.cache.to_json(),
            "parallel": None if self.parallel is None else _jsonable(self.parallel),
            "search": _jsonable(self.search),
            "predictions": _jsonable(self.predictions),
            "calibration": _jsonable(self.calibration),
            "sites": [
                {
                    "site": s.site,
                    "heads": s.heads,
                    "block_size": s.block_size,
                    "schedule": [
                        {"t_start": r.t_start, "t_end": r.t_end, "heads": [h.to_json() for h in r.heads],
                         "predicted": _jsonable(r.predicted)}
                        for r in s.schedule
                    ],
                }
                for s in self.sites
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"no plan file at {path}; give the path of a JSON plan written by vdopt-search or Plan.save")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanError(f"{path} is not valid JSON ({error}); the file is damaged: re-save it or run vdopt-search again") from None
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> Plan:
        """Validate and build a plan; every error names the bad field."""

        def need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise PlanError(f"{source}: field {where}{key} is missing")
            value = obj[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise PlanError(f"{source}: field {where}{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
            return value

        version = need(data, "schema_version", int, "")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"{source}: schema_version {version} is not supported by vdopt {_version()} (reads version "
                f"{SCHEMA_VERSION}); upgrade vdopt or run vdopt-search again"
            )
        model = need(data, "model", dict, "")
        fingerprint = ModelFingerprint(
            need(model, "class", str, "model."), need(model, "config", dict, "model."),
            need(model, "num_parameters", int, "model."),
        )
        sites = []
        for i, site in enumerate(need(data, "sites", list, "")):
            where = f"sites[{i}]."
            heads = need(site, "heads", int, where)
            schedule = []
            for j, step in enumerate(need(site, "schedule", list, where)):
                swhere = f"{where}schedule[{j}]."
                strategies = []
                for h, head in enumerate(need(step, "heads", list, swhere)):
                    try:
                        strategies.append(strategy_from_json(head))
                    except (TypeError, ValueError) as error:
                        raise PlanError(f"{source}: field {swhere}heads[{h}]: {error}") from None
                if len(strategies) != heads:
                    raise PlanError(f"{source}: field {swhere}heads lists {len(strategies)} heads but the site has {heads}")
                schedule.append(StepRange(float(need(step, "t_start", (int, float), swhere)),
                                          float(need(step, "t_end", (int, float), swhere)), strategies,
                                          dict(step.get("predicted", {}))))
            block = need(site, "block_size", int, where)
            if block < 1 or block & (block - 1):
                raise PlanError(f"{source}: field {where}block_size must be a power of two, got {block}")
            sites.append(SitePlan(need(site, "site", str, where), heads, block, schedule))
        cache = None
        if data.get("cache") is not None:
            entry = need(data, "cache", dict, "")
            kind = entry.get("kind")
            if kind not in ("first_block_residual", "schedule"):
                raise PlanError(f"{source}: field cache.kind {kind!r} is unknown; vdopt knows 'first_block_residual' "
                                "and 'schedule'")
            reuse = None
            if kind == "schedule":
                reuse = tuple(need(entry, "reuse_steps", list, "cache."))
            cache = StepCachePlan(float(need(entry, "threshold", (int, float), "cache.")),
                                  need(entry, "warmup_steps", int, "cache."),
                                  need(entry, "max_consecutive_reuses", int, "cache."), dict(entry.get("predicted", {})),
                                  reuse, entry.get("schedule_steps") if kind == "schedule" else None)
        parallel = data.get("parallel")
        if parallel is not None:
            degree = need(parallel, "ulysses_degree", int, "parallel.")
            orders = need(parallel, "head_order", dict, "parallel.")
            heads_of = {s.site: s.heads for s in sites}
            for name, order in orders.items():
                if name not in heads_of or sorted(order) != list(range(heads_of[name])):
                    raise PlanError(f"{source}: field parallel.head_order[{name!r}] must be a permutation of the site's heads")
                if heads_of[name] % degree:
                    raise PlanError(f"{source}: site {name} has {heads_of[name]} heads, not divisible by ulysses_degree {degree}")
            parallel = dict(parallel)
        return cls(
            model=fingerprint, target=need(data, "target", str, ""), sites=sites, cache=cache, parallel=parallel,
            search=dict(data.get("search", {})), predictions=dict(data.get("predictions", {})),
            calibration=dict(data.get("calibration", {})), timestep_scale=float(data.get("timestep_scale", 1000.0)),
            vdopt_version=str(data.get("vdopt_version", "")), schema_version=version,
        )

    def summary(self) -> str:
        """Predicted speedups and quality, the step cache, then one row per site and step range: heads per
        strategy, density, speedup, error."""
        p = self.predictions

        def num(key: str, fmt: str) -> str:
            value = p.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else "?"

        lines = [
            f"vdopt plan for {self.model.class_name} on {self.target} ({p.get('cost_model', 'cost model unknown')})",
            (f"predicted attention speedup: {num('attention_speedup', '.2f')}x; end to end: "
             f"{num('end_to_end_speedup', '.2f')}x (self-attention {num('attention_share', '.0%')} of a step: "
             f"{p.get('attention_share_source', '?')})"),
            (f"predicted quality ({p.get('quality_budget', '?')}): site error mean {num('attention_rel_error', '.3f')}, "
             f"max {num('max_rel_error', '.3f')}; min head recall {num('min_recall', '.3f')}; density "
             f"{num('attention_density', '.3f')}; dense warm-up {num('dense_warmup_fraction', '.0%')} of t; "
             + (f"optimality gap <= {num('optimality_gap', '.1%')}" if p.get("optimality_gap", 0.0) is not None
                else "optimality gap not bounded (Lagrangian search)")),
        ]
        if self.cache is not None:
            skip = self.cache.predicted.get("reused_fraction")
            lines.append(self.cache.describe() + (f"; predicted {skip:.0%} of steps reused" if isinstance(skip, float) else ""))
        rows = [("site", "t range", "density", "speedup", "error", "heads")]
        for site in self.sites:
            for r in site.schedule:
                counts: dict[str, int] = {}
                for h in r.heads:
                    counts[h.label()] = counts.get(h.label(), 0) + 1

                def cell(key: str, fmt: str, predicted: dict = r.predicted) -> str:
                    value = predicted.get(key)
                    return format(value, fmt) if isinstance(value, (int, float)) else "-"

                rows.append((site.site, f"({r.t_end:.2f}, {r.t_start:.2f}]", cell("density", ".3f"),
                             cell("speedup", ".2f") + "x", cell("rel_error", ".3f"),
                             ", ".join(f"{n}x {label}" for label, n in counts.items())))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        return "\n".join(lines)
