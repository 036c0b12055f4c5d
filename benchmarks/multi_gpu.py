"""Time per step of a Wan transformer under diffusers' Ulysses context parallelism: dense vs vdopt vs vdopt balanced.

For each GPU count (1 and every power of two up to the GPUs present), one process per GPU (NCCL) builds the model
with random weights in bf16, enables ``ContextParallelConfig(ulysses_degree=N)`` and times one denoising step
(CFG batch 2) for: ``dense`` (the model itself), ``vdopt`` (a mixed-density plan, heads in their natural order) and
``vdopt_balanced`` (the same plan, heads balanced across ranks by predicted cost). Each rank also times its own
sparse-attention calls (CUDA events around every planned site), so the slowest rank over the mean is measured.
The plan is fixed, not calibrated (random weights have no attention structure): per site, a quarter of the heads
dense and the rest 3D tile windows of several sizes, contiguous so that natural order is unbalanced.

    python benchmarks/multi_gpu.py --model wan14b --out benchmarks/results      # on a machine with 2+ GPUs
    python benchmarks/multi_gpu.py --smoke                                        # CPU check: tiny model, gloo
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODELS = {
    # name: (WanTransformer3DModel config, latent [C, F, H, W] at 480p 81 frames, text tokens)
    "wan1.3b": ({"num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                     "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True}, (16, 21, 60, 104), 512),
    "wan14b": ({"num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                    "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True}, (16, 21, 60, 104), 512),
    "smoke": ({"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "text_dim": 32,
                   "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True, "rope_max_seq_len": 32}, (4, 4, 16, 16), 6),
}


def _mixed_plan(model, inputs, block: int):
    import vdopt
    from vdopt.capture import capture
    from vdopt.plan import ModelFingerprint, Plan, SitePlan, StepRange
    from vdopt.strategies import PatternContext

    sites = [s for s in capture(model, inputs).sites if s.sparsifiable]
    site_plans = []
    for site in sites:
        heads = site.heads
        dense = max(1, heads // 4)
        windows = [vdopt.TileWindow(1, 2, 2), vdopt.TileWindow(1, 4, 4), vdopt.TileWindow(2, 6, 6)]
        strategies = [vdopt.Dense()] * dense + [windows[i * len(windows) // (heads - dense)] for i in range(heads - dense)]
        q = torch.empty(1, 1, site.layout.video_tokens, 1)
        densities = [1.0 if s.name == "dense" else float(s.build(q, q, PatternContext(site.layout, block, {})).density()[0])
                     for s in strategies]
        site_plans.append(SitePlan(site.name, heads, block, [StepRange(1.0, 0.0, strategies, {"head_density": densities})]))
    return Plan(ModelFingerprint.of(model), "h100", site_plans), sites


class _AttentionTimer:
    """Times every planned site's forward on this rank (CUDA events, or the host clock on CPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.pending, self.seconds = cuda, [], 0.0

    def install(self, optimized) -> None:
        from vdopt.passes.sparsify_attention import PlannedAttention

        for gm in optimized._graphs.values():
            for module in gm.modules():
                if isinstance(module, PlannedAttention) and not getattr(module, "_timed", False):
                    module.register_forward_pre_hook(self._start)
                    module.register_forward_hook(self._stop)
                    module._timed = True

    def _start(self, module, args) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pending.append([event, None])
        else:
            self.pending.append([time.perf_counter(), None])

    def _stop(self, module, args, output) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pending[-1][1] = event
        else:
            self.pending[-1][1] = time.perf_counter()

    def collect(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) / 1000 for a, b in self.pending)
        else:
            total = sum(b - a for a, b in self.pending)
        self.pending.clear()
        return total


def _time_step(fn, repeats: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    import logging

    from diffusers import ContextParallelConfig, WanTransformer3DModel
    from torch.distributed.device_mesh import init_device_mesh

    import vdopt
    from vdopt.parallel import balance_plan
    from vdopt.plan import Plan

    cuda = not args.smoke
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the lent hosts keep NVLink multicast off
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # diffusers on a CPU-only host: rank % accelerator count (0) and a logger without warning_once
        torch.accelerator.device_count = lambda: 1
        logging.Logger.warning_once = logging.Logger.warning
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    config, latent, text_tokens = MODELS[args.model]
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), **config).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, *latent, generator=g).to(device, dtype), "timestep": torch.tensor([300, 300], device=device),
                  "encoder_hidden_states": torch.randn(2, text_tokens, config["text_dim"], generator=g).to(device, dtype),
                  "return_dict": False}
    plan, sites = _mixed_plan(model, inputs, args.block)
    if world > 1:
        mesh = init_device_mesh(device.type, (1, world), mesh_dim_names=("ring", "ulysses"))
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    records = []
    variants = {"dense": None, "vdopt": "natural", "vdopt_balanced": "balanced"}
    for name, order in variants.items():
        timer = _AttentionTimer(cuda)
        if order is None:
            runner = model
        else:
            variant = Plan.from_json(plan.to_json())
            if world > 1:
                balance_plan(variant, sites, world)
                if order == "natural":
                    variant.parallel["head_order"] = {k: sorted(v) for k, v in variant.parallel["head_order"].items()}
            if order == "balanced" and world == 1:
                continue
            runner = vdopt.apply(model, variant)
        with torch.no_grad():
            runner(**inputs)
            if order is not None:
                timer.install(runner)
            seconds = _time_step(lambda r=runner: r(**inputs), args.repeats, cuda)
        attention = timer.collect() / (args.repeats + 1) if order is not None else 0.0
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"step_s": seconds, "attention_s": attention})
        step_ms = max(g["step_s"] for g in gathered) * 1000
        per_rank = [g["attention_s"] * 1000 for g in gathered]
        mean = sum(per_rank) / world
        records.append({"config": name, "step_ms": step_ms, "rank_attention_ms": per_rank,
                        "max_rank_over_mean_rank_attention": max(per_rank) / mean if mean > 0 else None})
        if hasattr(model, "_vdopt_head_order"):
            del model._vdopt_head_order  # permuted weights stay valid; a fresh apply may permute again
        torch.manual_seed(0)
    if rank == 0:
        Path(out_file).write_text(json.dumps(records))
    dist.barrier()  # both ranks done before the group is torn down
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wan14b", choices=sorted(MODELS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny Wan, 1 and 2 gloo processes")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.block, args.repeats = "smoke", 16, 1
        counts = [1, 2]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("multi_gpu.py needs CUDA GPUs (or --smoke on CPU)")
        gpus = torch.cuda.device_count()
        counts = [n for n in (1, 2, 4, 8) if n <= gpus]
    results = []
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    for world in counts:
        out_file = f"/tmp/vdopt_multi_gpu_{world}.json"
        mp.spawn(_worker, args=(world, _free_port(), args, out_file), nprocs=world, join=True)
        for record in json.loads(Path(out_file).read_text()):
            results.append({"device": device, "gpus": world, "model": args.model, **record})
            print(f"{world} GPU {record['config']:<15} {record['step_ms']:9.1f} ms/step  "
                  f"slowest/mean rank attention {record['max_rank_over_mean_rank_attention']}", flush=True)
    for record in results:
        dense = next(r for r in results if r["gpus"] == record["gpus"] and r["config"] == "dense")
        record["speedup_vs_dense_parallel"] = dense["step_ms"] / record["step_ms"]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__}, "shape": f"{args.model} 480p 81 frames, CFG batch 2, random weights",
            "baseline": "dense under the same Ulysses degree"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "multi_gpu_smoke.json" if args.smoke else "multi_gpu.json"
    (Path(args.out) / name).write_text(json.dumps({**meta, "records": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
