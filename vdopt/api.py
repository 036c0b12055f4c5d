"""Public entry points: optimize (calibrate -> search -> apply) and apply (replay a saved plan)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vdopt.caching import CacheConfig, calibrate_step_cache
from vdopt.calibrate import CalibrationConfig, CalibrationInputs, calibrate, record_forward_inputs
from vdopt.plan import Plan
from vdopt.runtime import OptimizedModel
from vdopt.search import SearchConfig, search
from vdopt.sites import TokenLayout


def _split_pipeline(model_or_pipeline: Any) -> tuple[nn.Module, Any]:
    if isinstance(model_or_pipeline, OptimizedModel):
        raise TypeError("this model is already optimized; pass the original transformer (opt.model)")
    if isinstance(model_or_pipeline, nn.Module):
        return model_or_pipeline, None
    transformer = getattr(model_or_pipeline, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, model_or_pipeline
    raise TypeError(
        f"vdopt.optimize needs an nn.Module transformer or a pipeline with a .transformer, got {type(model_or_pipeline).__name__}"
    )


def optimize(
    model: Any,
    calib_prompts: CalibrationInputs,
    target: str = "h100",
    *,
    search_config: SearchConfig | None = None,
    calibration_config: CalibrationConfig | None = None,
    layout: TokenLayout | None = None,
    cache: CacheConfig | None = None,
    compile: bool = False,
) -> OptimizedModel:
    """Calibrate ``model`` on ``calib_prompts``, search a plan for ``target`` and return the optimized module.

    ``model``: a video transformer (any nn.Module whose attention calls scaled_dot_product_attention) or a
    pipeline with ``.transformer`` (then prompt strings are run through the pipeline). ``calib_prompts``: prompt
    strings (pipeline given), dicts of forward kwargs, or a callable that runs the model. The returned module is a
    drop-in for the transformer (``pipe.transformer = opt``); its plan is ``opt.plan``. With ``cache``, a step cache
    (first-block residual reuse) is calibrated on the same prompts/callables, with the sparse plan applied.
    ``compile=True`` compiles the graph between planned attention calls (see :func:`apply`).
    """
    search_config = search_config or SearchConfig()
    calibration_config = calibration_config or CalibrationConfig()
    transformer, pipeline = _split_pipeline(model)
    inputs = record_forward_inputs(transformer, calib_prompts, pipeline, calibration_config)
    calibration, sites = calibrate(transformer, inputs, calibration_config, layout)
    plan = search(transformer, calibration, sites, target, search_config)
    optimized = OptimizedModel(transformer, plan, layout=layout, timestep_arg=calibration_config.timestep_arg)
    if cache is not None:
        runs = [calib_prompts] if callable(calib_prompts) and not isinstance(calib_prompts, (list, tuple)) else list(calib_prompts)
        calibrate_step_cache(optimized, runs, pipeline, cache)
    optimized.compile = compile
    return optimized


def apply(model: Any, plan: Plan, *, layout: TokenLayout | None = None, timestep_arg: str = "timestep",
          compile: bool = False, compile_backend: str = "inductor") -> OptimizedModel:
    """Replay a saved ``plan`` on ``model`` (or a pipeline's transformer) without calibration.

    ``compile=True`` runs the graph between planned attention calls through ``torch.compile(backend=...)``.

    Raises :class:`vdopt.plan.PlanError` before changing anything if the plan was made for another model.
    """
    transformer, _ = _split_pipeline(model)
    return OptimizedModel(transformer, plan, layout=layout, timestep_arg=timestep_arg, compile=compile,
                          compile_backend=compile_backend)
