"""Train the proxy on streamed procedural clips: rectified flow, CFG caption dropout, AdamW, bf16, EMA.

    python -m vdopt.proxy.train --minutes 8 --out DIR [--ckpt CKPT_DIR] [--init-weights WEIGHTS_DIR]

``DIR`` receives fp16 EMA weights (``DIR/weights``), ``DIR/loss.json`` and, with ``--render``, a sample
grid of held-out captions and a loss-curve plot. ``--ckpt`` holds a full checkpoint (fp32 weights, EMA,
optimizer, step); training resumes from it when it exists. ``--init-weights`` warm-starts from fp16 weights
(and continues their step count and schedule) when no full checkpoint is available.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vdopt.proxy.data import held_out_prompts, training_batch
from vdopt.proxy.model import (
    TINY_CONFIG,
    ProxyConfig,
    build_proxy,
    count_parameters,
    load_weights,
    save_weights,
)
from vdopt.proxy.pipeline import ProxyPipeline
from vdopt.proxy.text import TextEncoder, WordTokenizer

CAPTION_DROPOUT = 0.1
WARMUP_STEPS = 300


def _shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_matching_loss(transformer: nn.Module, text_encoder: TextEncoder, tokenizer: WordTokenizer,
                       video: torch.Tensor, prompts: list[str], shift: float, generator: torch.Generator,
                       ) -> torch.Tensor:
    """Rectified-flow loss on clips ``video [B, F, H, W, 3]`` in ``[0, 1]`` with their (dropped) captions.

    ``x_t = (1 - t) x_0 + t noise`` with ``t`` logit-normal, warped by the sampler's ``shift`` so training
    spends its effort on the noise levels the sampler visits; the target is the velocity ``noise - x_0``.
    """
    device = video.device
    clean = video.permute(0, 4, 1, 2, 3) * 2.0 - 1.0  # [B, 3, F, H, W] in [-1, 1]
    b = clean.shape[0]
    ids, mask = tokenizer(prompts)
    sigma = _shifted(torch.sigmoid(torch.randn(b, generator=generator, device=device)), shift)
    noise = torch.randn(clean.shape, generator=generator, device=device)
    s = sigma.view(b, 1, 1, 1, 1)
    noisy = (1.0 - s) * clean + s * noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        text = text_encoder(ids.to(device), mask.to(device))
        velocity = transformer(hidden_states=noisy, timestep=sigma * 1000.0, encoder_hidden_states=text,
                               return_dict=False)[0]
    return F.mse_loss(velocity.float(), noise - clean)


def _learning_rate(step: int, elapsed_s: float, base_lr: float, horizon_s: float) -> float:
    """Linear warm-up, then cosine decay to a tenth over the planned training time (wall-clock horizon)."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    progress = min(1.0, elapsed_s / max(horizon_s, 1.0))
    return base_lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def drop_captions(prompts: list[str], seed: int, step: int) -> list[str]:
    """Replace ``CAPTION_DROPOUT`` of the captions by '' (the unconditional prompt), drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 17)
    drop = (torch.rand(len(prompts), generator=generator) < CAPTION_DROPOUT).tolist()
    return ["" if d else p for d, p in zip(drop, prompts)]


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def save_sample_grid(videos: torch.Tensor, prompts: list[str], path: str | Path, scale: int = 2) -> None:
    """PNG grid: one row per video (``[B, F, H, W, 3]``), frames left to right, caption above each row."""
    from PIL import Image, ImageDraw

    b, f, h, w, _ = videos.shape
    caption_h = 11
    frames = (videos.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    canvas = Image.new("RGB", (f * w * scale + (f - 1) * 2, b * (h * scale + caption_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        top = i * (h * scale + caption_h + 4)
        draw.text((1, top), prompts[i], fill=(0, 0, 0))
        for j in range(f):
            image = Image.fromarray(frames[i, j].numpy()).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(image, (j * (w * scale + 2), top + caption_h + 2))
    canvas.save(path, optimize=True)


def save_loss_plot(log: list[dict], path: str | Path) -> None:
    """Training loss (mean per logging interval) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("proxy training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training time of this run")
    parser.add_argument("--out", type=Path, required=True, help="fp16 weights, loss.json, samples go here")
    parser.add_argument("--ckpt", type=Path, default=None, help="full checkpoint dir (resumed if present)")
    parser.add_argument("--init-weights", type=Path, default=None, help="warm-start from fp16 weights")
    parser.add_argument("--total-minutes", type=float, default=None,
                        help="training time over all runs, for the LR schedule (default: --minutes)")
    parser.add_argument("--preset", choices=("full", "tiny"), default="full", help="tiny: CPU smoke test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--render", action="store_true", help="after training, render held-out samples")
    parser.add_argument("--render-steps", type=int, default=30)
    parser.add_argument("--render-guidance", type=float, nargs="+", default=[5.0], help="CFG scales to render")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    config = TINY_CONFIG if args.preset == "tiny" else ProxyConfig()
    torch.manual_seed(args.seed)
    state: dict = {"step": 0, "elapsed_s": 0.0, "samples": 0, "log": []}
    ckpt_file = args.ckpt / "state.pt" if args.ckpt else None
    if ckpt_file is not None and ckpt_file.exists():
        saved = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        config = ProxyConfig.from_dict(saved["config"])
        transformer, text_encoder, tokenizer = build_proxy(config)
        transformer.load_state_dict(saved["transformer"])
        text_encoder.load_state_dict(saved["text_encoder"])
        state = saved["state"]
        print(f"resumed full checkpoint {ckpt_file} at step {state['step']}", flush=True)
    elif args.init_weights is not None:
        transformer, text_encoder, tokenizer, config = load_weights(args.init_weights)
        state.update({k: config.training[k] for k in ("step", "elapsed_s", "samples") if k in config.training})
        log_file = args.init_weights.parent / "loss.json"
        if log_file.exists():
            state["log"] = json.loads(log_file.read_text())["log"]
        print(f"warm start from fp16 weights {args.init_weights} at step {state['step']}", flush=True)
        saved = None
    else:
        transformer, text_encoder, tokenizer = build_proxy(config)
        saved = None
    transformer.to(device).train()
    text_encoder.to(device).train()
    ema = nn.ModuleDict({"transformer": copy.deepcopy(transformer), "text_encoder": copy.deepcopy(text_encoder)})
    ema.float().eval().requires_grad_(False)
    live = nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    params = list(live.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                  fused=device.type == "cuda")
    if saved is not None:
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
    n_params = count_parameters(transformer) + count_parameters(text_encoder)
    print(f"device {device}; parameters {n_params:,} (transformer {count_parameters(transformer):,}); "
          f"video {config.video}; batch {args.batch_size}", flush=True)

    compiled_ok = False
    if args.compile:
        for block in transformer.blocks:
            block.compile()
    horizon_s = 60.0 * (args.total_minutes or args.minutes)
    budget_s = 60.0 * args.minutes
    generator = torch.Generator(device).manual_seed(args.seed * 7919 + state["step"])
    start = time.perf_counter()
    window: list[float] = []
    while True:
        run_s = time.perf_counter() - start
        if run_s >= budget_s or (args.max_steps is not None and state["step"] >= args.max_steps):
            break
        lr = _learning_rate(state["step"], state["elapsed_s"] + run_s, args.lr, horizon_s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        video, prompts = training_batch(args.batch_size, args.seed, state["step"], config.video, device)
        prompts = drop_captions(prompts, args.seed, state["step"])
        try:
            loss = flow_matching_loss(transformer, text_encoder, tokenizer, video, prompts, config.flow_shift,
                                      generator)
        except Exception as error:  # a compile failure must not cost the GPU run: fall back to eager
            if not args.compile or compiled_ok:
                raise
            print(f"torch.compile failed ({type(error).__name__}: {error}); continuing in eager mode", flush=True)
            for block in transformer.blocks:
                block._compiled_call_impl = None
            torch._dynamo.reset()
            args.compile = False
            continue
        compiled_ok = True
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + state["step"]) / (10 + state["step"]))
        _update_ema(ema, live, decay)
        state["step"] += 1
        state["samples"] += args.batch_size
        window.append(loss.item() if state["step"] % args.log_every == 0 else loss.detach())
        if state["step"] % args.log_every == 0:
            mean = float(torch.stack([torch.as_tensor(x, device=device) for x in window]).mean())
            window = []
            elapsed = state["elapsed_s"] + time.perf_counter() - start
            state["log"].append({"step": state["step"], "loss": mean, "lr": lr, "grad_norm": float(grad_norm),
                                 "elapsed_s": round(elapsed, 1)})
            rate = state["samples"] / max(elapsed, 1e-9)
            print(f"step {state['step']:6d}  loss {mean:.4f}  lr {lr:.2e}  |g| {float(grad_norm):.2f}  "
                  f"{elapsed:7.1f}s  {rate:.0f} clips/s", flush=True)
    state["elapsed_s"] += time.perf_counter() - start
    final_loss = state["log"][-1]["loss"] if state["log"] else float("nan")
    print(f"done: {state['step']} steps, {state['samples']} clips, {state['elapsed_s']:.0f}s, "
          f"last logged loss {final_loss:.4f}", flush=True)

    training = {"step": state["step"], "samples": state["samples"], "elapsed_s": round(state["elapsed_s"], 1),
                "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "caption_dropout": CAPTION_DROPOUT,
                "final_loss": final_loss, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__}
    config = ProxyConfig.from_dict({**config.to_dict(), "training": training})
    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(args.out / "weights", ema["transformer"], ema["text_encoder"], tokenizer, config)
    (args.out / "loss.json").write_text(json.dumps({"training": training, "log": state["log"]}, indent=1) + "\n")
    if args.ckpt is not None:
        args.ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config.to_dict(), "transformer": transformer.state_dict(),
                    "text_encoder": text_encoder.state_dict(), "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(), "state": state}, ckpt_file)
    if args.render:
        render_samples(args.out / "weights", args.out, steps=args.render_steps, device=device,
                       guidance_scales=tuple(args.render_guidance))
        save_loss_plot(state["log"], args.out / "loss_curve.png")


def render_samples(weights: Path, out: Path, steps: int = 30, device: torch.device | str = "cpu",
                   guidance_scales: tuple[float, ...] = (5.0,)) -> None:
    """Held-out prompts through the fp16 weights: ``samples_cfg{g}.png`` per guidance scale.

    Prompts go in chunks of 8; chunk ``i`` (starting at prompt ``i``) uses noise seed ``i``.
    """
    transformer, text_encoder, tokenizer, config = load_weights(weights)
    pipe = ProxyPipeline(transformer, text_encoder, tokenizer, config).to(device)
    prompts = held_out_prompts()
    for g in guidance_scales:
        videos = torch.cat([pipe(prompts[i:i + 8], num_inference_steps=steps, guidance_scale=g, seed=i)
                            for i in range(0, len(prompts), 8)])
        save_sample_grid(videos, prompts, out / f"samples_cfg{g:g}.png")
        print(f"rendered {len(prompts)} held-out prompts at guidance {g} ({steps} steps)", flush=True)


if __name__ == "__main__":
    main()
