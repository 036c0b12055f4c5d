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
    """``vdopt-search``: calibrate a model, search a plan for a target, write it and print its summary."""
    from vdopt.api import optimize
    from vdopt.calibrate import CalibrationConfig
    from vdopt.cost_models.model import available_targets
    from vdopt.search import SearchConfig

    parser = argparse.ArgumentParser(prog="vdopt-search", description=search_main.__doc__)
    parser.add_argument("--model", default="proxy", help="'proxy', 'module:factory' or a diffusers model folder")
    parser.add_argument("--calib", default=None, help="prompts .txt or .pt list of forward kwargs (proxy: built-in)")
    parser.add_argument("--target", default="h100", help=f"one of {', '.join(available_targets())}")
    parser.add_argument("--out", default="plan.json", help="where to write the plan JSON")
    parser.add_argument("--recall", type=float, default=0.95, help="attention-mass recall budget per head")
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction of the noisiest time forced dense")
    parser.add_argument("--steps", type=int, default=20, help="pipeline steps per calibration prompt")
    parser.add_argument("--steps-per-prompt", type=int, default=4, help="denoising steps measured per prompt")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        if args.target not in available_targets():
            raise UsageError(f"--target {args.target!r} is unknown; known targets: {', '.join(available_targets())}")
        try:
            search_config = SearchConfig(recall_budget=args.recall, min_dense_warmup=args.warmup)
        except ValueError as error:
            raise UsageError(str(error)) from None
        out = Path(args.out)
        if not out.parent.exists():
            raise UsageError(f"--out {args.out!r}: folder {out.parent} does not exist")
        model = _load_model(args.model, _device(args.device))
        calib = _load_calibration(args.calib, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            opt = optimize(model, calib, args.target, search_config=search_config,
                           calibration_config=CalibrationConfig(num_inference_steps=args.steps,
                                                                steps_per_input=args.steps_per_prompt))
        opt.plan.save(out)
        print(opt.plan.summary())
        print(f"plan written to {out}")
        return 0
    except UsageError as error:
        print(f"vdopt-search: error: {error}", file=sys.stderr)
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
                          calibration_prompts=prompts)
    except UsageError as error:
        print(f"vdopt-demo: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0
