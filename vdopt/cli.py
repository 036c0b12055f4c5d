"""Command lines: ``vdopt-search`` (calibrate + search -> plan), ``vdopt-demo`` (the proxy end to end), ``vdopt-bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def _load_model(spec: str, device: str) -> Any:
    """``proxy`` | ``package.module:factory`` (returns a model or pipeline) | a diffusers model folder."""
    if spec == "proxy":
        from vdopt.proxy.pipeline import load_proxy_pipeline

        return load_proxy_pipeline(device=device)
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise UsageError(f"--model {spec!r}: cannot import {attr} from {module_name} ({error})") from None
        return factory()
    folder = Path(spec)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(
            f"--model {spec!r} is not 'proxy', a 'module:factory' or a diffusers model folder with config.json"
        )
    class_name = json.loads(config_file.read_text()).get("_class_name")
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise UsageError(f"--model {spec!r}: config.json names class {class_name!r}, which diffusers does not have")
    return cls.from_pretrained(folder).to(device)


def _load_calibration(spec: str | None, model: Any) -> Any:
    """A prompts file (one per line), a torch file holding a list of forward-kwargs dicts, or the proxy default."""
    if spec is None:
        if hasattr(model, "transformer") and hasattr(model, "tokenizer"):
            from vdopt.demo import proxy_calibration_prompts

            return proxy_calibration_prompts()
        raise UsageError("--calib is required for this model: a prompts .txt file or a .pt list of forward kwargs")
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--calib {spec!r}: no such file; give a prompts .txt (one per line) or a .pt of kwargs dicts")
    if path.suffix == ".pt":
        data = torch.load(path, weights_only=False)
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise UsageError(f"--calib {spec!r} must hold a list of forward-kwargs dicts")
        return data
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--calib {spec!r} holds no prompts")
    if not hasattr(model, "transformer"):
        raise UsageError(f"--calib {spec!r} holds prompts, which need a pipeline; --model gave a bare transformer")
    return prompts


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return name


def search_main(argv: list[str] | None = None) -> int:
    """``vdopt-search``: calibrate a model, search a plan for a target, write it, its heatmaps and its summary.

    ``vdopt-search profile --target T``: measure the target GPU's efficiency tables instead (see --help there).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "profile":
        return profile_main(argv[1:])
    from vdopt.cost_models.model import available_targets
    from vdopt.search import SearchConfig

    parser = argparse.ArgumentParser(prog="vdopt-search", description=search_main.__doc__)
    parser.add_argument("--model", default="proxy", help="'proxy', 'module:factory' or a diffusers model folder")
    parser.add_argument("--calib", default=None, help="prompts .txt or .pt list of forward kwargs (proxy: built-in)")
    parser.add_argument("--target", default="h100", help=f"one of {', '.join(available_targets())}")
    parser.add_argument("--out", default="plan.json", help="where to write the plan JSON (heatmap PNGs go beside it)")
    parser.add_argument("--budget", choices=("recall", "error", "density", "time"), default="recall",
                        help="quality budget: recall floor per head (default), predicted output error per site, "
                             "'density': the least predicted output error at a mean attention density (--density), or "
                             "'time': the same at a mean attention time per step priced by the target's cost model "
                             "(--time-ms)")
    parser.add_argument("--recall", type=float, default=0.95, help="attention-mass recall floor per head")
    parser.add_argument("--error", type=float, default=0.05, help="relative output-error budget per site (--budget error)")
    parser.add_argument("--density", type=float, default=0.2,
                        help="mean attention density after the warm-up (--budget density)")
    parser.add_argument("--time-ms", type=float, default=0.0,
                        help="mean attention ms per denoising call after the warm-up, all sites (--budget time)")
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction of the noisiest time forced dense")
    parser.add_argument("--max-ranges", type=int, default=4, help="most step ranges per site")
    parser.add_argument("--tokens", type=int, default=None,
                        help="video tokens the cost model prices at (default: the calibrated size)")
    parser.add_argument("--attention-share", type=float, default=None,
                        help="self-attention share of a step, for the end-to-end prediction (default 0.55, Wan2.1-1.3B)")
    parser.add_argument("--steps", type=int, default=20, help="pipeline steps per calibration prompt")
    parser.add_argument("--steps-per-prompt", type=int, default=4, help="denoising steps measured per prompt")
    parser.add_argument("--explain", action="store_true", help="print why every head of every site got its strategy")
    parser.add_argument("--ulysses-degree", type=int, default=1,
                        help="balance heads for N-way Ulysses sequence parallelism (diffusers context parallelism)")
    parser.add_argument("--save-calibration", default=None, metavar="FILE",
                        help="also write the calibration (JSON) so later searches can skip it (--from-calibration)")
    parser.add_argument("--from-calibration", default=None, metavar="FILE",
                        help="search on a calibration written by --save-calibration instead of calibrating again "
                             "(the model is still loaded: the plan is fingerprinted to it)")
    parser.add_argument("--strategy", action="append", default=None, metavar="LABEL",
                        help="restrict the search to this calibrated strategy (repeat for several; dense is always "
                             "open), e.g. --strategy 'diagonal(width=0.25)'; default: every calibrated candidate")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        if args.ulysses_degree < 1:
            raise UsageError(f"--ulysses-degree {args.ulysses_degree}: give 1 (no parallelism) or the Ulysses degree")
        if args.target not in available_targets():
            raise UsageError(f"--target {args.target!r} is unknown; known targets: {', '.join(available_targets())}")
        extra = {} if args.attention_share is None else {"attention_share": args.attention_share}
        try:
            search_config = SearchConfig(recall_budget=args.recall, min_dense_warmup=args.warmup, budget=args.budget,
                                         error_budget=args.error, density_budget=args.density,
                                         time_budget_ms=args.time_ms,
                                         max_step_ranges=args.max_ranges, tokens=args.tokens,
                                         strategies=None if args.strategy is None else tuple(args.strategy), **extra)
        except ValueError as error:
            raise UsageError(str(error)) from None
        out = Path(args.out)
        if not out.parent.exists():
            raise UsageError(f"--out {args.out!r}: folder {out.parent} does not exist")
        if args.save_calibration and not Path(args.save_calibration).parent.exists():
            raise UsageError(f"--save-calibration {args.save_calibration!r}: folder "
                             f"{Path(args.save_calibration).parent} does not exist")
        if args.from_calibration and not Path(args.from_calibration).is_file():
            raise UsageError(f"--from-calibration {args.from_calibration!r}: no such file; write one with "
                             "--save-calibration")
        model = _load_model(args.model, _device(args.device))
        calib = None if args.from_calibration else _load_calibration(args.calib, model)
        plan, report, sites = _calibrate_and_search(model, calib, args.target, search_config, args.steps,
                                                    args.steps_per_prompt, args.save_calibration,
                                                    args.from_calibration)
        from vdopt.search import write_heatmaps

        if args.ulysses_degree > 1:
            from vdopt.parallel import balance_plan
            from vdopt.plan import PlanError

            try:
                balance_plan(plan, sites, args.ulysses_degree)
            except PlanError as error:
                raise UsageError(str(error)) from None
            print(f"heads balanced for ulysses_degree={args.ulysses_degree}: slowest rank / mean predicted "
                  f"{plan.parallel['max_rank_over_mean_predicted']:.3f}")

        plan.save(out)
        print(plan.summary())
        if args.explain:
            print(report.explain())
        pictures = write_heatmaps(plan, out.with_suffix(""))
        print(f"plan written to {out}; heatmaps: {', '.join(str(p) for p in pictures)}")
        return 0
    except UsageError as error:
        print(f"vdopt-search: error: {error}", file=sys.stderr)
        return 2


def _calibrate_and_search(model: Any, calib: Any, target: str, config: Any, steps: int, steps_per_prompt: int,
                          save_to: str | None = None, load_from: str | None = None) -> Any:
    """Calibrate (progress bar), or load a saved calibration, and search; returns (plan, search report, sites)."""
    from torch import nn

    from vdopt.calibrate import (
        CalibrationConfig,
        calibrate,
        load_calibration,
        record_forward_inputs,
        save_calibration,
    )
    from vdopt.search import restrict_candidates, search_with_report

    transformer = model if isinstance(model, nn.Module) else getattr(model, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise UsageError(f"--model gave a {type(model).__name__}, neither a transformer nor a pipeline with .transformer")
    pipeline = None if transformer is model else model
    if load_from:
        try:
            calibration, sites, _ = load_calibration(load_from)
        except (ValueError, TypeError, KeyError) as error:
            raise UsageError(f"--from-calibration {load_from!r}: {error}") from None
    else:
        calibration_config = CalibrationConfig(num_inference_steps=steps, steps_per_input=steps_per_prompt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            inputs = record_forward_inputs(transformer, calib, pipeline, calibration_config)
            calibration, sites = calibrate(transformer, inputs, calibration_config)
    if save_to:
        print(f"calibration written to {save_calibration(save_to, calibration, sites)}")
    try:
        restrict_candidates(calibration, config.strategies)
    except ValueError as error:
        raise UsageError(f"--strategy: {error}") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = search_with_report(transformer, calibration, sites, target, config)
    for warning in caught:
        if "efficiency table" in str(warning.message):
            print(f"vdopt-search: warning: {warning.message}", file=sys.stderr)
    return (*result, sites)


def profile_main(argv: list[str] | None = None) -> int:
    """``vdopt-search profile``: time vdopt's kernels on this CUDA GPU and write the target's efficiency table."""
    from vdopt.cost_models.model import available_targets
    from vdopt.cost_models.profile import DENSITIES, WAN_SHAPES

    parser = argparse.ArgumentParser(prog="vdopt-search profile", description=profile_main.__doc__)
    parser.add_argument("--target", default="h100", help=f"the GPU this runs on: one of {', '.join(available_targets())}")
    parser.add_argument("--out", default=None, help="table path (default: cost_models/efficiency_<target>.json)")
    parser.add_argument("--shapes", default=",".join(WAN_SHAPES),
                        help=f"comma-separated {', '.join(WAN_SHAPES)} or BxHxNxD (batch x heads x tokens x head dim)")
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES), help="kept densities to time")
    args = parser.parse_args(argv)
    try:
        if args.target not in available_targets():
            raise UsageError(f"--target {args.target!r} is unknown; known targets: {', '.join(available_targets())}")
        shapes: dict[str, tuple[int, int, int, int]] = {}
        for item in filter(None, args.shapes.split(",")):
            if item in WAN_SHAPES:
                shapes[item] = WAN_SHAPES[item]
                continue
            try:
                b, h, n, d = (int(x) for x in item.lower().split("x"))
            except ValueError:
                raise UsageError(f"--shapes {item!r}: give one of {', '.join(WAN_SHAPES)} or BxHxNxD, e.g. 1x12x32760x128") from None
            shapes[item] = (b, h, n, d)
        try:
            densities = [float(x) for x in args.densities.split(",") if x]
        except ValueError:
            raise UsageError(f"--densities {args.densities!r}: give comma-separated numbers in (0, 1]") from None
        if not densities or not all(0 < x <= 1 for x in densities):
            raise UsageError(f"--densities {args.densities!r}: give comma-separated numbers in (0, 1]")
        from vdopt.cost_models import model as cost_model

        out = Path(args.out) if args.out else cost_model._HERE / f"efficiency_{args.target}.json"
        if not out.parent.exists():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist")
        if not torch.cuda.is_available():
            raise UsageError("profile times kernels on the target GPU, and no CUDA GPU is visible; run it on a "
                             f"machine with the {args.target} GPU")
        from vdopt.cost_models.profile import run_profile

        device_name = torch.cuda.get_device_name()
        if args.target.replace("rtx", "") not in device_name.lower().replace(" ", ""):
            print(f"vdopt-search profile: warning: profiling {device_name} for target {args.target!r}", file=sys.stderr)
        table = run_profile(args.target, "cuda", shapes, densities,
                            progress=lambda message: print(f"profiling {message}", file=sys.stderr, flush=True))
        out.write_text(json.dumps(table, indent=1) + "\n")
        print(f"efficiency table for {args.target} ({table['device']}) written to {out}")
        return 0
    except UsageError as error:
        print(f"vdopt-search profile: error: {error}", file=sys.stderr)
        return 2


def bench_main(argv: list[str] | None = None) -> int:
    """``vdopt-bench quality ...``: benchmarks; the quality harness is the one subcommand so far."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("quality",):
        print("usage: vdopt-bench quality [options]  (vdopt-bench quality --help)", file=sys.stderr)
        return 2
    from vdopt.quality import quality_main

    return quality_main(argv[1:])


def demo_main(argv: list[str] | None = None) -> int:
    """``vdopt-demo``: the shipped proxy end to end: calibrate, search, save the plan, dense vs optimized video."""
    from vdopt.demo import run_demo

    parser = argparse.ArgumentParser(prog="vdopt-demo", description=demo_main.__doc__)
    parser.add_argument("--out", default="vdopt_demo", help="output folder (plan, GIF, quality JSON)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 30 on GPU, 10 on CPU)")
    parser.add_argument("--calib-prompts", type=int, default=None, help="calibration prompts (default: 4 on GPU, 2 on CPU)")
    parser.add_argument("--recall", type=float, default=0.9, help="attention-mass recall budget per head")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=float, default=None, metavar="BUDGET",
                        help="also calibrate a step cache with this hidden-state error budget (e.g. 0.05)")
    args = parser.parse_args(argv)
    try:
        device = _device(args.device)
        on_gpu = device.startswith("cuda")
        steps = args.steps or (30 if on_gpu else 10)
        prompts = args.calib_prompts or (4 if on_gpu else 2)
        if steps < 2:
            raise UsageError(f"--steps {steps}: need at least 2 denoising steps")
        if prompts < 1:
            raise UsageError(f"--calib-prompts {prompts}: need at least one calibration prompt")
        result = run_demo(Path(args.out), device=device, steps=steps, recall_budget=args.recall, target=args.target,
                          calibration_prompts=prompts, cache_budget=args.cache)
    except UsageError as error:
        print(f"vdopt-demo: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0
