"""vdopt's sparse-attention kernels vs cuDNN dense, FlexAttention and FlashAttention-4 on one GPU (issue 9).

One process: first every kernel is checked against the PyTorch reference on small shapes with fresh random inputs
(ragged token counts, head dims 64 and 128), then each is timed (triton.testing.do_bench, median) at video-model
self-attention shapes on the same random per-head block masks:
  cudnn_dense   torch SDPA, cuDNN backend, dense (the reference rate)
  flex          torch.compile(flex_attention) with BlockMask.from_kv_blocks of the same 128-token block lists
  triton        vdopt's Triton kernel called directly (block_sparse_attention_triton; its default since 2026-12-06:
                per-head 4-D TMA descriptors made once on the host); triton_host_desc_* the same with
                host_descriptors="per_head" named, triton_in_kernel_desc_* with host_descriptors=False (three
                descriptors built per program, the default before), triton_host_desc_storage_* with
                host_descriptors="storage" (2-D over the storage; tiles past a head's end read the next head),
                triton_out_desc_* with out_descriptor=True too (output tiles stored by TMA), all autotuned;
                triton_persistent_* with per-head ones and persistent=True (two programs per SM, longest lists first,
                128x64 tiles) on the same equal-length lists; triton_unequal_* and triton_persistent_unequal_*: the
                default and the persistent launch on lists of unequal lengths (1 .. 2 * kept - 1 blocks per row,
                a dynamic selection's shape) at about the same density
  fa4           FlashAttention-4's block-sparse forward called directly, as a peer would: flash_attn.cute's
                _flash_attn_fwd with its block-sparse tensors built once before timing and its output and
                log-sum-exp preallocated (vdopt's adapter not involved), where flash_attn.cute imports in this run
                (benchmarks/device_env.sh)
  op            torch.ops.vdopt.block_sparse_attention as dispatched (backend="auto": FA4 where it runs, else
                Triton; op overhead included) on the same list tensors every call, as a static pattern is passed
                every denoising step; the record names the backend that ran
  op_unmemoized the op with the lists' version counter bumped before every call, so its conversion of the lists
                for FA4 runs every time (what freshly built lists, e.g. a dynamic selection's, cost)
  cluster       vdopt's variable-size cluster kernel on random cluster sizes, at (close to) equal kept FLOPs,
                through the op: padded key tiles (cluster_*), packed key tiles (cluster_packed_*), and packed with
                64-row query tiles called directly (cluster_packed_m64_*), and packed or padded with random
                per-head permutations fused into the kernel's loads and stores (cluster_packed_permuted_*,
                cluster_padded_permuted_*: q, k, v in original order, Q gathered by one launch, K/V gathered and
                out scattered in the kernel; cluster_packed_permuted_q_in_kernel_*: Q gathered in the kernel too);
                *_w8: the same with 8 warps, called directly;
                cluster_*tile_tflop are the FLOPs of the tiles each mode computes, padding included
FA4 and the op are timed in alternating rounds (``--rounds``, the median kept; ``vdopt_vs_fa4`` is the median of
the rounds' ratios; the order reversed every other round), so drift of the GPU's clocks between them, or the position
in a round, does not read as op overhead (the runs committed up to 2026-12-06 timed FA4 first in every round). Host
time per call (``*_host_us``: enqueueing 10 calls, no synchronisation) is recorded beside, to show how far the host runs ahead.
FA4, when it runs, is also recorded as the measured peer. Peers this run cannot run (FlashInfer always, FA4 when
not installed) keep their H100 figures from shared/measurements/peer-kernels-h100.txt, labelled as such.
TFLOP/s are counted on kept blocks only: 4 * D * sum over (batch, head, query block) of rows * kept key tokens.

Usage: python benchmarks/attention_kernels.py [--mode full|sweep|smoke] [--shapes wan1.3b_n32760,...]
       [--densities 0.05,...] [--deadline S] [--rounds R] [--out DIR]
Writes DIR/attention_kernels.json after every (shape, density) cell, so a run cut short keeps what it measured,
and DIR/attention_kernels.png at the end (DIR: --out, else $OUT, else .); DIR/attention_sweep.json in sweep mode.
Cells not started by --deadline seconds after the start are skipped and listed under "skipped". ``--mode smoke``
runs the full mode's code on CPU at tiny shapes (set TRITON_INTERPRET=1), FA4's interface served by a stand-in
that computes with the PyTorch reference, wall-clock timings: a check of the script, not a measurement.
``--merge A.json B.json ...`` (no GPU) joins full runs cut by their deadline into DIR/attention_kernels.json and
its plot: a later file's (shape, density) cell replaces an earlier one's, each record names the run it came from
(``run``), and ``meta.runs`` keeps every run's meta.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
from vdopt.kernels import _backends, fa4_backend
from vdopt.kernels import block_sparse_attention as bsa
from vdopt.kernels import cluster_sparse_attention as csa
from vdopt.kernels.reference import (
    block_sparse_attention_reference,
    cluster_sparse_attention_reference,
)

from vdopt.strategies import SemanticKMeans

OUT = os.environ.get("OUT", ".")
DENSITIES = (0.05, 0.1, 0.15, 0.25, 0.5)
SWEEP_DENSITIES = (0.05, 0.1, 0.5)
SHAPES = {  # name: (batch, heads, tokens, head_dim)
    "wan1.3b_n32760": (1, 12, 32760, 128),
    "wan1.3b_n32768": (1, 12, 32768, 128),
    "wan14b_n32760": (1, 40, 32760, 128),
    "hunyuan_n119056": (1, 24, 119056, 128),
}
# --mode smoke: the same code on CPU, one ragged and one exact token count, batch 2 on the second.
SMOKE_SHAPES = {"smoke_n1000": (1, 2, 1000, 64), "smoke_n1024": (2, 2, 1024, 64)}
SMOKE_DENSITIES = (0.25, 0.5)
# Peers measured on the same kind of H100 (shared/measurements/peer-kernels-h100.txt, 2026-11-25, N=32768,
# TFLOP/s on kept blocks: FA4 = median of its four timings, FlashInfer variable-block fa3-128 per-head masks =
# mean of two runs). Not run here; converted to ms at each shape's kept FLOPs, assuming the same rate.
PEER_TFLOPS = {
    "wan1.3b": {
        "fa4_128": {0.5: 668, 0.25: 644, 0.15: 610, 0.1: 591, 0.05: 545},
        "flashinfer_var_fa3_128": {0.5: 508.5, 0.25: 500, 0.15: 488, 0.1: 470, 0.05: 430},
    },
    "wan14b": {
        "fa4_128": {0.5: 661, 0.25: 634, 0.15: 621, 0.1: 604, 0.05: 557},
        "flashinfer_var_fa3_128": {0.5: 521.5, 0.25: 509.5, 0.15: 490.5, 0.1: 469, 0.05: 428},
    },
}
PEER_FILE_SOURCE = "not run here, from shared/measurements/peer-kernels-h100.txt (N=32768)"
MEASURED_SOURCE = "measured in this run"
T0 = time.time()


def log(*args: object) -> None:
    print(*args, flush=True)


def bench(fn, rep_ms: float = 200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


class Clock(NamedTuple):
    """How the full mode times: do_bench on the GPU; wall clock on CPU (--mode smoke, a check of the script)."""

    cuda: bool

    def ms(self, fn, rep_ms: float = 200) -> float:
        if self.cuda:
            return bench(fn, rep_ms)
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    def host_us(self, fn, calls: int = 10) -> float:
        """Microseconds the host spends per call enqueueing ``calls`` back-to-back calls (no sync between them;
        few enough that the launch queue never fills, so the GPU's pace does not enter)."""
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - start) / calls * 1e6
        self.sync()
        return host

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def random_qkv(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: str):
    """q, k, v as [B, H, N, D] views of token-major [B, N, H, D] storage (the layout models produce)."""
    return [
        torch.randn(batch, tokens, heads, head_dim, dtype=dtype, device=device).transpose(1, 2) for _ in range(3)
    ]


def random_block_lists(batch, heads, q_blocks, kv_blocks, kept, seed, device):
    """For every (batch, head, query block) a uniformly random set of ``kept`` key blocks, ascending."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    order = torch.rand(batch, heads, q_blocks, kv_blocks, device=device, generator=gen).argsort(-1)
    indices = order[..., :kept].sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((batch, heads, q_blocks), kept, dtype=torch.int32, device=device)
    return indices, counts


def time_variant(rec: dict, name: str, run, kept_flops: float, check: float, clock, rep) -> bool:
    """Time ``run`` into ``rec[name_ms]`` and its TFLOP/s on ``kept_flops``, unless its correctness check failed
    (``check`` not finite); a failure is recorded as ``rec[name_error]``, not raised, so the other kernels still
    run. Returns whether it was timed."""
    if not math.isfinite(check):
        rec[f"{name}_error"] = "failed its correctness check; not timed"
        return False
    try:
        rec[f"{name}_ms"] = clock.ms(run, rep)
    except Exception as e:  # noqa: BLE001 -- recorded, the other kernels still run
        rec[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return False
    rec[f"{name}_effective_tflops"] = kept_flops / rec[f"{name}_ms"] / 1e9
    return True


def unequal_block_lists(batch, heads, q_blocks, kv_blocks, kept, seed, device):
    """Random ascending key-block lists of a random length per (batch, head, query block), uniform in
    [1, 2 * kept - 1] capped at ``kv_blocks`` (mean ~kept): the unequal lists a dynamic selection gives."""
    indices, _ = random_block_lists(batch, heads, q_blocks, kv_blocks, min(kv_blocks, 2 * kept - 1), seed, device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    lengths = torch.randint(1, 2 * kept, (batch, heads, q_blocks), device=device, generator=gen)
    # The first `length` of a row's ascending list: a prefix, so pick it from a shuffled order instead.
    order = torch.rand(indices.shape, device=device, generator=gen).argsort(-1)
    shuffled = indices.gather(-1, order)
    used = torch.arange(indices.shape[-1], device=device) < lengths.clamp(max=indices.shape[-1])[..., None]
    big = torch.iinfo(torch.int32).max
    ascending = torch.where(used, shuffled, big).sort(-1).values
    return torch.where(ascending == big, 0, ascending).to(torch.int32).contiguous(), \
        lengths.clamp(max=indices.shape[-1]).to(torch.int32)


def kept_flops_blocks(indices, counts, q_tokens, kv_tokens, block, head_dim) -> float:
    rows = torch.full((-(-q_tokens // block),), block, dtype=torch.float64, device=indices.device)
    rows[-1] = q_tokens - block * (rows.numel() - 1)
    cols = torch.full((-(-kv_tokens // block),), block, dtype=torch.float64, device=indices.device)
    cols[-1] = kv_tokens - block * (cols.numel() - 1)
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept_cols = torch.where(used, cols[indices.long()], 0).sum(-1)
    return float(4 * head_dim * (kept_cols * rows).sum())


#: SemanticKMeans' default cluster counts.
DEFAULT_Q_CLUSTERS, DEFAULT_KV_CLUSTERS = SemanticKMeans().q_clusters, SemanticKMeans().kv_clusters


def random_clusters(batch, heads, tokens, clusters, seed, device, spread=0.5):
    """Offsets [B, H, C+1] of clusters with sizes (1 +- spread) * tokens / C, in random order."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weights = 1 + spread * (2 * torch.rand(batch, heads, clusters, device=device, generator=gen) - 1)
    cuts = torch.round(torch.cumsum(weights, -1) / weights.sum(-1, keepdim=True) * tokens).to(torch.int32)
    zero = torch.zeros(batch, heads, 1, dtype=torch.int32, device=device)
    return torch.cat([zero, cuts], -1).contiguous()


def kept_flops_clusters(q_offsets, kv_offsets, indices, counts, head_dim) -> float:
    q_sizes = (q_offsets[..., 1:] - q_offsets[..., :-1]).double()
    kv_sizes = (kv_offsets[..., 1:] - kv_offsets[..., :-1]).double()
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept = torch.where(used, kv_sizes.gather(-1, indices.long().flatten(2)).view_as(indices.double()), 0).sum(-1)
    return float(4 * head_dim * (kept * q_sizes).sum())


def computed_flops_clusters(q_offsets, kv_offsets, indices, counts, head_dim, block_m=128, block_n=64,
                            kv_packing=False) -> float:
    """FLOPs the cluster kernel actually runs: whole BLOCK_M x BLOCK_N tiles, partial ones included. Key tiles
    per query cluster: padded, the sum over kept clusters of ceil(size / BLOCK_N); packed, ceil(kept keys / BLOCK_N)."""
    q_tiles = torch.div(q_offsets[..., 1:] - q_offsets[..., :-1] + block_m - 1, block_m, rounding_mode="floor")
    sizes = kv_offsets[..., 1:] - kv_offsets[..., :-1]
    per_cluster = sizes if kv_packing else torch.div(sizes + block_n - 1, block_n, rounding_mode="floor")
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept = torch.where(used, per_cluster.gather(-1, indices.long().flatten(2)).view_as(indices), 0).sum(-1)
    if kv_packing:
        kept = torch.div(kept + block_n - 1, block_n, rounding_mode="floor")
    return float(4 * head_dim * block_m * block_n * (kept.double() * q_tiles.double()).sum())


def rel_l2(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- correctness
def check_block(fn, name, device, dtype=torch.bfloat16, shapes=((1, 2, 4000, 128), (2, 3, 1000, 64)), **kw):
    """Run ``fn`` like block_sparse_attention_triton on fresh random inputs vs the reference; returns worst rel_l2."""
    worst = 0.0
    for seed, (batch, heads, tokens, head_dim) in enumerate(shapes):
        torch.manual_seed(1000 + seed)
        q, k, v = random_qkv(batch, heads, tokens, head_dim, dtype, device)
        nb = -(-tokens // 128)
        idx, cnt = random_block_lists(batch, heads, nb, nb, max(1, nb // 3), seed, device)
        cnt[0, 0, 0] = 0  # one empty query block
        out, lse = fn(q, k, v, idx, cnt, 128, 128, **kw)
        ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, 128, 128)
        err = rel_l2(out, ref)
        finite = torch.isfinite(ref_lse)
        lse_err = float((lse[finite] - ref_lse[finite]).abs().max())
        ok = err < 2e-2 and lse_err < 1e-2 and bool(torch.isinf(lse[~finite]).all()) and not out.isnan().any()
        worst = max(worst, err if ok else float("inf"))
        log(f"  check {name} {tuple(q.shape)}: rel_l2 {err:.2e} lse_err {lse_err:.1e} {'ok' if ok else 'FAIL'}")
    return worst


def random_permutations(batch, heads, tokens, seed, device):
    """Random per-head token permutations, int32 [batch, heads, tokens] (as a k-means permutation scatters rows)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.argsort(torch.rand(batch, heads, tokens, generator=g), -1).to(torch.int32).to(device)


def check_cluster(name, device, dtype=torch.bfloat16, shapes=((1, 2, 3000, 128, 24), (2, 2, 777, 64, 9)),
                  permuted=False, **kw):
    """Worst relative L2 of the cluster kernel (``kw``: its options) against the reference; ``permuted``: q, k, v
    in original order with random permutations fused into the kernel (``"q"``: only q's, k and v in cluster
    order)."""
    worst = 0.0
    for seed, (batch, heads, tokens, head_dim, clusters) in enumerate(shapes):
        torch.manual_seed(2000 + seed)
        q, k, v = random_qkv(batch, heads, tokens, head_dim, dtype, device)
        q_off = random_clusters(batch, heads, tokens, clusters, seed, device, spread=0.9)
        kv_off = random_clusters(batch, heads, tokens, clusters + 3, seed + 7, device, spread=0.9)
        idx, cnt = random_block_lists(batch, heads, clusters, clusters + 3, max(1, clusters // 3), seed, device)
        cnt[0, 0, 0] = 0
        perms = {"q_perm": random_permutations(batch, heads, tokens, seed, device),
                 "kv_perm": random_permutations(batch, heads, tokens, seed + 1, device)} if permuted else {}
        if permuted == "q":
            del perms["kv_perm"]
        out, lse = csa.cluster_sparse_attention_triton(q, k, v, q_off, kv_off, idx, cnt, **kw, **perms)
        ref, ref_lse = cluster_sparse_attention_reference(q.float(), k.float(), v.float(), q_off, kv_off, idx, cnt,
                                                          **perms)
        err = rel_l2(out, ref)
        finite = torch.isfinite(ref_lse)
        lse_err = float((lse[finite] - ref_lse[finite]).abs().max())
        ok = err < 2e-2 and lse_err < 1e-2 and bool(torch.isinf(lse[~finite]).all()) and not out.isnan().any()
        worst = max(worst, err if ok else float("inf"))
        log(f"  check {name} {tuple(q.shape)} C={clusters}: rel_l2 {err:.2e} lse_err {lse_err:.1e} {'ok' if ok else 'FAIL'}")
    return worst


# ----------------------------------------------------------------------------------------------- timers
def cudnn_dense_ms(q, k, v, clock: Clock | None = None) -> float:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if clock is not None and not clock.cuda:
        return clock.ms(partial(F.scaled_dot_product_attention, q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench(partial(F.scaled_dot_product_attention, q, k, v))


_FLEX = {}


def flex_runner(q, k, v, idx, cnt, block):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        # Compiled on the GPU (what FlexAttention is for); eager on CPU (smoke), where it only checks the script.
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    tokens = q.shape[2]
    nk = -(-k.shape[2] // block)
    # Pad the lists to all key blocks so every density reuses one compiled graph.
    full = torch.zeros(*idx.shape[:3], nk, dtype=torch.int32, device=q.device)
    full[..., : idx.shape[-1]] = idx
    mask = BlockMask.from_kv_blocks(cnt, full, BLOCK_SIZE=block, seq_lengths=(tokens, k.shape[2]))
    return lambda: _FLEX["fn"](q, k, v, block_mask=mask)


def fa4_direct_runner(q, k, v, idx, cnt, block):
    """FA4's block-sparse forward called directly, as a peer: block-sparse tensors built once here (from vdopt's
    lists by the reference conversion), output and log-sum-exp allocated once and written by every call.
    Returns (run, out [B, H, N, D] view, lse)."""
    block_sparse_tensors_cls, flash_attn_fwd = fa4_backend._import_fa4()
    lists = fa4_backend.to_fa4_block_sparse_reference(idx, cnt, k.shape[2], block)
    tensors = block_sparse_tensors_cls(*lists, block_size=(block, block))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.empty_like(qt)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)

    def run():
        flash_attn_fwd(qt, kt, vt, softmax_scale=None, causal=False, block_sparse_tensors=tensors, return_lse=True,
                       out=out, lse=lse)

    return run, out.transpose(1, 2), lse


class _StandInBlockSparseTensors(NamedTuple):
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor
    block_size: tuple[int, int]


def _stand_in_fa4_forward(q, k, v, softmax_scale=None, causal=False, block_sparse_tensors=None, return_lse=True,
                          out=None, lse=None):
    """FA4's ``_flash_attn_fwd`` as vdopt calls it ([B, N, H, D] views, full blocks only, out and lse given),
    computed by the PyTorch reference; like FA4 it needs a ragged last key block to be listed last."""
    lists = block_sparse_tensors
    block_m, block_n = lists.block_size
    kv_blocks = -(-k.shape[1] // block_n)
    if k.shape[1] % block_n:
        counts = lists.full_block_cnt.long()
        used = torch.arange(lists.full_block_idx.shape[-1]) < counts[..., None]
        listed = used & (lists.full_block_idx == kv_blocks - 1)
        last = listed.gather(-1, (counts - 1).clamp(min=0)[..., None])[..., 0] & (counts > 0)
        if not torch.equal(listed.any(-1), last):
            raise AssertionError("the ragged last key block is listed before the end of a row: FA4 would read past the keys")
    ref, ref_lse = block_sparse_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                    lists.full_block_idx, lists.full_block_cnt, block_m, block_n,
                                                    softmax_scale)
    out.copy_(ref.transpose(1, 2))
    lse.copy_(ref_lse)


def use_stand_in_fa4() -> None:
    """--mode smoke: FA4's interface served by :func:`_stand_in_fa4_forward` on CPU, so this script's FA4 paths (the
    direct calls, the op's dispatch to FA4, the conversion of the lists) run without a GPU."""
    fa4_backend._import_fa4 = lambda: (_StandInBlockSparseTensors, _stand_in_fa4_forward)
    fa4_backend.fa4_applicable = lambda *args, **kwargs: None


def fa4_version() -> str:
    """flash-attn-4's installed version, or why FA4 does not import."""
    import importlib.metadata

    error = fa4_backend.fa4_import_error()
    if error is not None:
        return f"not importable: {error}"
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return "importable, version unknown (no package metadata)"


def record_peers(rec: dict, model: str, density: float, flops: float) -> None:
    """Peer figures of one cell: FA4 as measured in this run where it ran, else (and FlashInfer always) the peer
    file's rate at the same density, converted to ms at this cell's kept FLOPs; each labelled with its source."""
    tflops = {p: rates[density] for p, rates in PEER_TFLOPS.get(model, {}).items()}
    sources = dict.fromkeys(tflops, PEER_FILE_SOURCE)
    ms = {p: flops / tf / 1e9 for p, tf in tflops.items()}
    if "fa4_ms" in rec:
        tflops["fa4_128"], sources["fa4_128"], ms["fa4_128"] = rec["fa4_effective_tflops"], MEASURED_SOURCE, rec["fa4_ms"]
    if not tflops:
        rec["best_peer"], rec["best_peer_ms"] = None, None
        rec["best_peer_source"] = "no peer measured at this shape"
        return
    best = min(ms, key=ms.get)
    rec["best_peer"], rec["best_peer_ms"], rec["best_peer_source"] = best, ms[best], sources[best]
    rec["peer_tflops"], rec["peer_sources"] = tflops, sources


# ----------------------------------------------------------------------------------------------- modes
SWEEP_BLOCK = {  # name: (config (BLOCK_M, BLOCK_N, stages, warps), use_tma, ragged mode)
    "tma_128x64_s2_w4_br": ((128, 64, 2, 4), True, 2),
    "tma_128x64_s2_w4_all": ((128, 64, 2, 4), True, 1),
    "tma_128x64_s3_w4_br": ((128, 64, 3, 4), True, 2),
    "tma_128x64_s2_w8_br": ((128, 64, 2, 8), True, 2),
    "tma_128x64_s3_w8_br": ((128, 64, 3, 8), True, 2),
    "tma_128x64_s4_w4_br": ((128, 64, 4, 4), True, 2),
    "tma_128x128_s2_w8_br": ((128, 128, 2, 8), True, 2),
    "tma_128x128_s3_w8_br": ((128, 128, 3, 8), True, 2),
    "tma_64x64_s3_w4_br": ((64, 64, 3, 4), True, 2),
    "ptr_128x64_s3_w8_br": ((128, 64, 3, 8), False, 2),
    "ptr_128x64_s2_w4_br": ((128, 64, 2, 4), False, 2),
}
SWEEP_CLUSTER = {  # name: (config, use_tma, ragged mode, kv_packing); packed tiles gather K and V (TMA for Q only)
    "tma_128x64_s2_w4_br": ((128, 64, 2, 4), True, 2, False),
    "tma_128x64_s2_w4_all": ((128, 64, 2, 4), True, 1, False),
    "tma_64x64_s2_w4_br": ((64, 64, 2, 4), True, 2, False),
    "tma_128x128_s2_w8_br": ((128, 128, 2, 8), True, 2, False),
    "tma_128x64_s3_w4_br": ((128, 64, 3, 4), True, 2, False),
    "packed_128x64_s2_w4_br": ((128, 64, 2, 4), True, 2, True),
    "packed_128x64_s3_w8_br": ((128, 64, 3, 8), True, 2, True),
    "packed_64x64_s2_w4_br": ((64, 64, 2, 4), True, 2, True),
    "packed_128x128_s2_w8_br": ((128, 128, 2, 8), True, 2, True),
}


def sweep(args) -> None:
    device = "cuda"
    results = []
    log("== correctness")
    bad = set()
    for name, (config, tma, mode) in SWEEP_BLOCK.items():
        try:
            worst = check_block(bsa.block_sparse_attention_triton, name, device, config=config, use_tma=tma,
                                kv_ragged_mode=mode)
        except Exception as e:  # noqa: BLE001 -- a variant that fails to compile is reported, the rest run
            log(f"  {name}: ERROR {type(e).__name__}: {str(e)[:400]}")
            worst = float("inf")
        if not math.isfinite(worst):
            bad.add(name)
    for name, (config, tma, mode, packing) in SWEEP_CLUSTER.items():
        try:
            worst = check_cluster("cluster_" + name, device, config=config, use_tma=tma, kv_ragged_mode=mode,
                                  kv_packing=packing)
        except Exception as e:  # noqa: BLE001
            log(f"  cluster_{name}: ERROR {type(e).__name__}: {str(e)[:400]}")
            worst = float("inf")
        if not math.isfinite(worst):
            bad.add("cluster_" + name)
    log("== timing")
    for shape_name in args.shapes.split(","):
        batch, heads, tokens, head_dim = SHAPES[shape_name]
        q, k, v = random_qkv(batch, heads, tokens, head_dim, torch.bfloat16, device)
        nb = -(-tokens // 128)
        dense = cudnn_dense_ms(q, k, v)
        dense_flops = 4.0 * batch * heads * tokens * tokens * head_dim
        log(f"{shape_name}: cudnn dense {dense:.3f} ms = {dense_flops / dense / 1e9:.0f} TFLOP/s")
        results.append({"shape": shape_name, "kernel": "cudnn_dense", "ms": dense, "tflops": dense_flops / dense / 1e9})
        for density in [float(d) for d in args.densities.split(",")]:
            kept = max(1, round(density * nb))
            idx, cnt = random_block_lists(batch, heads, nb, nb, kept, 7, device)
            flops = kept_flops_blocks(idx, cnt, tokens, tokens, 128, head_dim)
            for name, (config, tma, mode) in SWEEP_BLOCK.items():
                if name in bad or time.time() - T0 > args.deadline:
                    continue
                try:
                    ms = bench(partial(bsa.block_sparse_attention_triton,
                                       q, k, v, idx, cnt, 128, 128, config=config, use_tma=tma, kv_ragged_mode=mode))
                except Exception as e:  # noqa: BLE001
                    log(f"  {name}: ERROR {type(e).__name__}: {str(e)[:300]}")
                    bad.add(name)
                    continue
                tf = flops / ms / 1e9
                results.append({"shape": shape_name, "density": density, "kernel": name, "ms": ms, "tflops": tf})
                log(f"  d={density:<5} {name:24s} {ms:8.3f} ms {tf:6.0f} TF")
            if density in (0.1, 0.5) and time.time() - T0 < args.deadline:
                ms = bench(partial(bsa.block_sparse_attention_triton, q, k, v, idx, cnt, 128, 128))
                tf = flops / ms / 1e9
                results.append({"shape": shape_name, "density": density, "kernel": "autotuned", "ms": ms, "tflops": tf})
                log(f"  d={density:<5} {'autotuned':24s} {ms:8.3f} ms {tf:6.0f} TF")
                # Cluster kernel on as many clusters as blocks, sizes 64..192 tokens.
                q_off = random_clusters(batch, heads, tokens, nb, 11, device)
                kv_off = random_clusters(batch, heads, tokens, nb, 12, device)
                cidx, ccnt = random_block_lists(batch, heads, nb, nb, kept, 13, device)
                cflops = kept_flops_clusters(q_off, kv_off, cidx, ccnt, head_dim)
                for name, (config, tma, mode, packing) in SWEEP_CLUSTER.items():
                    if "cluster_" + name in bad:
                        continue
                    ms = bench(partial(csa.cluster_sparse_attention_triton, q, k, v, q_off, kv_off, cidx, ccnt,
                                       config=config, use_tma=tma, kv_ragged_mode=mode, kv_packing=packing))
                    tf = cflops / ms / 1e9
                    results.append({"shape": shape_name, "density": density, "kernel": "cluster_" + name,
                                    "ms": ms, "tflops": tf})
                    log(f"  d={density:<5} {'cluster_' + name:24s} {ms:8.3f} ms {tf:6.0f} TF")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_sweep.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "results": results, "failed": sorted(bad)}, f, indent=1)
    log("== summary (TFLOP/s on kept blocks)")
    kernels = sorted({r["kernel"] for r in results if "density" in r})
    for shape_name in args.shapes.split(","):
        cells = {(r["kernel"], r["density"]): r["tflops"] for r in results if r["shape"] == shape_name and "density" in r}
        dens = sorted({d for _, d in cells})
        log(f"{shape_name:16s} " + " ".join(f"{d:>6}" for d in dens))
        for kname in kernels:
            log(f"  {kname:28s} " + " ".join(f"{cells.get((kname, d), float('nan')):6.0f}" for d in dens))


def paired_rounds(clock: Clock, runners: dict[str, Any], rounds: int, rep_ms: float) -> dict[str, list[float]]:
    """Time each runner once per round, the runners alternating within a round and their order reversed every
    other round (so a runner is not always timed after the same one): ``{name: [ms per round]}``."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        order = list(runners.items())
        for name, fn in (reversed(order) if r % 2 else order):
            times[name].append(clock.ms(fn, rep_ms))
    return times


def full(args) -> None:
    smoke = args.mode == "smoke"
    clock = Clock(cuda=not smoke)
    device = "cuda" if clock.cuda else "cpu"
    shape_table = SMOKE_SHAPES if smoke else SHAPES
    shapes = args.shapes.split(",") if args.shapes else list(shape_table)
    densities = tuple(float(d) for d in args.densities.split(",")) if args.densities else (
        SMOKE_DENSITIES if smoke else DENSITIES)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    if smoke:
        use_stand_in_fa4()
    meta = {"device": torch.cuda.get_device_name() if clock.cuda else "cpu (smoke: wall clock, not a measurement)",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if clock.cuda else None, "date": date,
            "command": " ".join(sys.argv), "flash_attn_4": fa4_version() if not smoke else "stand-in (smoke)",
            "deadline_s": args.deadline, "rounds": args.rounds,
            "timing": ("triton.testing.do_bench median (L2 flushed between calls); fa4, op and op_unmemoized in "
                       f"{args.rounds} alternating rounds, median of the rounds" if clock.cuda else "wall clock")}
    check_shapes = ((1, 2, 4000, 128), (2, 3, 1000, 64)) if clock.cuda else ((1, 1, 300, 64), (2, 1, 260, 32))
    log("== correctness vs reference (bf16, fresh random inputs)")
    checks = {
        "triton": check_block(bsa.block_sparse_attention_triton, "triton", device, shapes=check_shapes),
        "op": check_block(lambda *a: bsa.block_sparse_attention(*a, backend="auto", validate=True), "op", device,
                          shapes=check_shapes),
        "triton_fp16": check_block(bsa.block_sparse_attention_triton, "triton_fp16", device, dtype=torch.float16,
                                   shapes=check_shapes),
    }
    # Opt-in Triton variants: host-made TMA descriptors, and those in a persistent launch (longest lists first).
    # Each is checked, then timed beside the default path where it passed.
    triton_variants = {"triton_host_desc": {"host_descriptors": "per_head"},
                       "triton_in_kernel_desc": {"host_descriptors": False},
                       "triton_out_desc": {"host_descriptors": "per_head", "out_descriptor": True},
                       "triton_host_desc_storage": {"host_descriptors": "storage"},
                       "triton_persistent": {"host_descriptors": "per_head", "persistent": True}}
    for name, options in triton_variants.items():
        try:
            checks[name] = check_block(bsa.block_sparse_attention_triton, name, device, shapes=check_shapes, **options)
        except Exception as e:  # noqa: BLE001 -- recorded, the other kernels still run
            log(f"  check {name}: ERROR {type(e).__name__}: {str(e)[:400]}")
            checks[name] = float("inf")
    cluster_check_shapes = ((1, 2, 3000, 128, 24), (2, 2, 777, 64, 9)) if clock.cuda else (
        (1, 1, 300, 64, 5), (2, 1, 200, 32, 4))
    # Cluster modes: name -> keywords of cluster_sparse_attention_triton. A mode that fails its check (or to
    # compile) is recorded as such and not timed; the other kernels still run.
    # Modes with a config run the kernel directly (the op has none); 8 warps halve the gathered tiles' addresses per
    # thread, which spill at 4 (notes_attention_kernels.md, codegen table).
    cluster_modes = {"cluster": {"kv_packing": False}, "cluster_packed": {"kv_packing": True},
                     "cluster_packed_m64": {"kv_packing": True, "config": (64, 64, 2, 4)},
                     "cluster_packed_w8": {"kv_packing": True, "config": (128, 64, 2, 8)},
                     "cluster_packed_permuted": {"kv_packing": True, "permuted": True},
                     "cluster_packed_permuted_w8": {"kv_packing": True, "permuted": True, "config": (128, 64, 2, 8)},
                     "cluster_packed_permuted_q_in_kernel": {"kv_packing": True, "permuted": True, "q_gather": "kernel",
                                                             "config": (128, 64, 2, 4)},
                     "cluster_padded_permuted": {"kv_packing": False, "permuted": True},
                     "cluster_padded_permuted_w8": {"kv_packing": False, "permuted": True, "config": (128, 64, 2, 8)},
                     # Only the output scatter fused (Q gathered by one launch; K, V permuted by launches outside, so
                     # their tiles keep TMA boxes): spills 312 bytes at 4 warps in the sm_90 code (16 without).
                     "cluster_padded_out_scatter": {"kv_packing": False, "permuted": "q"}}
    for name, kw in cluster_modes.items():
        try:
            checks[name] = check_cluster(name, device, shapes=cluster_check_shapes, **kw)
        except Exception as e:  # noqa: BLE001
            log(f"  check {name}: ERROR {type(e).__name__}: {str(e)[:400]}")
            checks[name] = float("inf")
    # FA4 is timed only where it imports and matched the reference.
    run_fa4 = fa4_backend.fa4_available()
    if run_fa4:
        try:
            checks["fa4"] = check_block(fa4_backend.block_sparse_attention_fa4, "fa4", device, shapes=check_shapes)
            checks["fa4_fp16"] = check_block(fa4_backend.block_sparse_attention_fa4, "fa4_fp16", device,
                                             dtype=torch.float16, shapes=check_shapes)
        except Exception as e:  # noqa: BLE001 -- reported; Triton and the rest still run
            log(f"  check fa4: ERROR {type(e).__name__}: {str(e)[:400]}")
            checks["fa4"] = float("inf")
        run_fa4 = all(math.isfinite(checks[c]) for c in ("fa4", "fa4_fp16") if c in checks)
        meta["fa4_timed"] = run_fa4
    records: list[dict] = []
    skipped: list[str] = []
    result = {"meta": meta, "checks_worst_rel_l2": checks, "records": records, "skipped": skipped, "complete": False}
    path = out_dir / "attention_kernels.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=1) + "\n")

    save()
    for shape_name in shapes:
        if time.time() - T0 > args.deadline:
            skipped.extend(f"{shape_name} d={d}" for d in densities)
            log(f"{shape_name}: skipped, past the {args.deadline} s deadline")
            continue
        batch, heads, tokens, head_dim = shape_table[shape_name]
        model = shape_name.split("_")[0]
        q, k, v = random_qkv(batch, heads, tokens, head_dim, torch.bfloat16, device)
        nb = -(-tokens // 128)
        dense_flops = 4.0 * batch * heads * tokens * tokens * head_dim
        rep = 200 if tokens < 65536 else 1000
        dense = cudnn_dense_ms(q, k, v, clock)
        log(f"{shape_name}: cudnn dense {dense:.3f} ms = {dense_flops / dense / 1e9:.0f} TFLOP/s")
        for density in densities:
            if time.time() - T0 > args.deadline:
                skipped.append(f"{shape_name} d={density}")
                log(f"  d={density}: skipped, past the {args.deadline} s deadline")
                continue
            kept = max(1, round(density * nb))
            idx, cnt = random_block_lists(batch, heads, nb, nb, kept, 7, device)
            flops = kept_flops_blocks(idx, cnt, tokens, tokens, 128, head_dim)
            rec = {**meta, "shape": shape_name, "batch": batch, "heads": heads, "tokens": tokens,
                   "head_dim": head_dim, "density": density, "kept_fraction": kept / nb, "block": 128,
                   "kept_tflop": flops / 1e12, "cudnn_dense_ms": dense,
                   "cudnn_dense_tflops": dense_flops / dense / 1e9}
            # Spot check at full size: 3 query blocks of head 0 against the reference on those rows.
            out, _ = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, 128, 128)
            rows = slice(128 * (nb // 2), 128 * (nb // 2 + 3))
            ref, _ = block_sparse_attention_reference(
                q[:1, :1, rows].float(), k[:1, :1].float(), v[:1, :1].float(),
                idx[:1, :1, nb // 2: nb // 2 + 3], cnt[:1, :1, nb // 2: nb // 2 + 3], 128, 128)
            rec["spot_rel_l2"] = rel_l2(out[:1, :1, rows], ref)
            rec["triton_ms"] = clock.ms(partial(bsa.block_sparse_attention_triton, q, k, v, idx, cnt, 128, 128), rep)
            rec["triton_effective_tflops"] = flops / rec["triton_ms"] / 1e9
            rec["triton_config"] = str(getattr(bsa._block_sparse_fwd_autotuned, "best_config", None))
            # Unequal list lengths (a dynamic selection's): where a persistent launch should pay.
            uneq_idx, uneq_cnt = unequal_block_lists(batch, heads, nb, nb, kept, 16, device)
            uneq_flops = kept_flops_blocks(uneq_idx, uneq_cnt, tokens, tokens, 128, head_dim)
            for name, check, options in (("triton_unequal", "triton", {}),
                                         ("triton_persistent_unequal", "triton_persistent",
                                          triton_variants["triton_persistent"])):
                time_variant(rec, name, partial(bsa.block_sparse_attention_triton, q, k, v, uneq_idx, uneq_cnt, 128,
                                                128, **options), uneq_flops, checks[check], clock, rep)
            for name, options in triton_variants.items():
                time_variant(rec, name, partial(bsa.block_sparse_attention_triton, q, k, v, idx, cnt, 128, 128,
                                                **options), flops, checks[name], clock, rep)
            # On CPU "auto" means the reference: the smoke run sends the op to the stand-in FA4 by name instead.
            op = partial(bsa.block_sparse_attention, q, k, v, idx, cnt, 128, 128, backend="auto" if clock.cuda else "fa4")
            out, _ = op()
            rec["vdopt_backend"] = bsa.last_backend()
            rec["vdopt_spot_rel_l2"] = rel_l2(out[:1, :1, rows], ref)

            def op_unmemoized(op=op, idx=idx):
                torch.autograd.graph.increment_version(idx)  # no device work; the op's memo no longer matches
                return op()

            runners = {"vdopt": op}
            if rec["vdopt_backend"] == "fa4":
                runners["vdopt_unmemoized"] = op_unmemoized
            fa4_reason = fa4_backend.fa4_applicable(q, k, v, 128, 128) if run_fa4 else None
            if fa4_reason is not None:
                rec["fa4_error"] = fa4_reason
            elif run_fa4:
                fa4_run, fa4_out, _ = fa4_direct_runner(q, k, v, idx, cnt, 128)
                fa4_run()
                rec["fa4_spot_rel_l2"] = rel_l2(fa4_out[:1, :1, rows], ref)
                runners = {"fa4": fa4_run, **runners}
            rounds = paired_rounds(clock, runners, args.rounds, rep / args.rounds)
            for name, times in rounds.items():
                rec[f"{name}_ms"] = statistics.median(times)
                rec[f"{name}_rounds_ms"] = times
                # Host time matters where a call is short; a few calls suffice at HunyuanVideo's length.
                rec[f"{name}_host_us"] = clock.host_us(runners[name], calls=10 if tokens < 65536 else 3)
            rec["effective_tflops"] = flops / rec["vdopt_ms"] / 1e9
            if "fa4" in rounds:
                rec["fa4_effective_tflops"] = flops / rec["fa4_ms"] / 1e9
                rec["vdopt_vs_fa4"] = statistics.median(o / f for o, f in zip(rounds["vdopt"], rounds["fa4"]))
            try:
                rec["flex_ms"] = clock.ms(flex_runner(q, k, v, idx, cnt, 128), rep)
                rec["flex_effective_tflops"] = flops / rec["flex_ms"] / 1e9
            except Exception as e:  # noqa: BLE001 -- recorded, the other kernels still run
                rec["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            # Cluster kernel: as many clusters as blocks, sizes 64..192, same number of kept clusters; padded key
            # tiles and packed ones through the op, packed with 64-row query tiles directly (the op has no config).
            q_off = random_clusters(batch, heads, tokens, nb, 11, device)
            kv_off = random_clusters(batch, heads, tokens, nb, 12, device)
            cidx, ccnt = random_block_lists(batch, heads, nb, nb, kept, 13, device)
            cflops = kept_flops_clusters(q_off, kv_off, cidx, ccnt, head_dim)
            rec["cluster_kept_tflop"] = cflops / 1e12
            # Permuted modes: q, k, v in their original order, random per-head permutations applied by the kernel
            # as it loads rows and stores outputs (what the k-means strategy runs: no gather or scatter launches).
            perms = {"q_perm": random_permutations(batch, heads, tokens, 14, device),
                     "kv_perm": random_permutations(batch, heads, tokens, 15, device)}
            for name, kw in cluster_modes.items():
                options = {key: value for key, value in kw.items() if key != "permuted"}
                if kw.get("permuted"):
                    options.update(perms if kw["permuted"] is True else {"q_perm": perms["q_perm"]})
                run = partial(csa.cluster_sparse_attention_triton if "config" in options else csa.cluster_sparse_attention,
                              q, k, v, q_off, kv_off, cidx, ccnt, **options)
                block_m, block_n = kw.get("config", csa.DEFAULT_CONFIG)[:2]
                # FLOPs of the tiles this mode computes, padding included: separates tile waste from kernel speed.
                tile_flops = computed_flops_clusters(q_off, kv_off, cidx, ccnt, head_dim, block_m, block_n,
                                                     kv_packing=kw["kv_packing"])
                rec[f"{name}_tile_tflop"] = tile_flops / 1e12
                if not time_variant(rec, name, run, cflops, checks[name], clock, rep):
                    continue
                rec[f"{name}_vs_block_rate"] = rec[f"{name}_effective_tflops"] / rec["triton_effective_tflops"]
                rec[f"{name}_tile_tflops"] = tile_flops / rec[f"{name}_ms"] / 1e9
            # The same padded kernel at SemanticKMeans' default cluster counts (32 query, 64 key clusters: ~1,024 and
            # ~512 tokens each at N=32760), where partial tiles weigh less than at the 64..192-token clusters above
            # (kept / computed tile FLOPs ~0.89 against ~0.53): the clusters vdopt's strategy makes by default.
            dq_off = random_clusters(batch, heads, tokens, DEFAULT_Q_CLUSTERS, 21, device)
            dkv_off = random_clusters(batch, heads, tokens, DEFAULT_KV_CLUSTERS, 22, device)
            didx, dcnt = random_block_lists(batch, heads, DEFAULT_Q_CLUSTERS, DEFAULT_KV_CLUSTERS,
                                            max(1, round(density * DEFAULT_KV_CLUSTERS)), 23, device)
            dflops = kept_flops_clusters(dq_off, dkv_off, didx, dcnt, head_dim)
            rec["cluster_default_counts_kept_tflop"] = dflops / 1e12
            rec["cluster_default_counts_tile_tflop"] = computed_flops_clusters(dq_off, dkv_off, didx, dcnt,
                                                                               head_dim) / 1e12
            if time_variant(rec, "cluster_default_counts", partial(csa.cluster_sparse_attention, q, k, v, dq_off,
                                                                    dkv_off, didx, dcnt),
                            dflops, checks["cluster"], clock, rep):
                rec["cluster_default_counts_vs_block_rate"] = (rec["cluster_default_counts_effective_tflops"]
                                                               / rec["triton_effective_tflops"])
            record_peers(rec, model, density, flops)
            records.append(rec)
            save()
            log(f"  d={density:<5} triton {rec['triton_ms']:.3f} ms {rec['triton_effective_tflops']:.0f} TF (host "
                f"descriptors {rec.get('triton_host_desc_effective_tflops', float('nan')):.0f}, storage descriptors "
                f"{rec.get('triton_host_desc_storage_effective_tflops', float('nan')):.0f}, in-kernel descriptors "
                f"{rec.get('triton_in_kernel_desc_effective_tflops', float('nan')):.0f}, TMA out "
                f"{rec.get('triton_out_desc_effective_tflops', float('nan')):.0f}, persistent "
                f"{rec.get('triton_persistent_effective_tflops', float('nan')):.0f}) | fa4 "
                f"{rec.get('fa4_ms', float('nan')):.3f} ms {rec.get('fa4_effective_tflops', float('nan')):.0f} TF | op "
                f"({rec['vdopt_backend']}) {rec['vdopt_ms']:.3f} ms {rec['effective_tflops']:.0f} TF, x"
                f"{rec.get('vdopt_vs_fa4', float('nan')):.3f} of fa4, unmemoized "
                f"{rec.get('vdopt_unmemoized_ms', float('nan')):.3f} | host us fa4 "
                f"{rec.get('fa4_host_us', float('nan')):.0f} op {rec['vdopt_host_us']:.0f} | flex "
                f"{rec.get('flex_ms', float('nan')):.3f} | cluster {rec.get('cluster_effective_tflops', float('nan')):.0f}"
                f" packed {rec.get('cluster_packed_effective_tflops', float('nan')):.0f} packed_m64 "
                f"{rec.get('cluster_packed_m64_effective_tflops', float('nan')):.0f} TF | spot "
                f"{rec['spot_rel_l2']:.1e}")
        del q, k, v
        if clock.cuda:
            torch.cuda.empty_cache()
    result["complete"] = not skipped
    save()
    plot(records, str(out_dir / "attention_kernels.png"))
    log("== summary: TFLOP/s on kept blocks (x = speedup of the op vs cuDNN dense; op/fa4 = median ratio of the "
        "rounds' times; peer* = from the peer file)")
    log(f"{'shape':16s} {'dens':>5} {'cudnn':>6} {'triton':>6} {'fa4':>6} {'op':>6} {'op ran':>7} {'op/fa4':>7} "
        f"{'flex':>6} {'cluster':>7} {'packed':>7} {'best peer':>20}")
    for r in records:
        peer = "-"
        if r.get("best_peer"):
            mark = "" if r["best_peer_source"] == MEASURED_SOURCE else "*"
            peer = f"{r['best_peer']}{mark}:{r['peer_tflops'][r['best_peer']]:.0f}"
        log(f"{r['shape']:16s} {r['density']:5.2f} {r['cudnn_dense_tflops']:6.0f} {r['triton_effective_tflops']:6.0f} "
            f"{r.get('fa4_effective_tflops', float('nan')):6.0f} {r['effective_tflops']:6.0f} {r['vdopt_backend']:>7s} "
            f"{r.get('vdopt_vs_fa4', float('nan')):7.3f} {r.get('flex_effective_tflops', float('nan')):6.0f} "
            f"{r.get('cluster_effective_tflops', float('nan')):7.0f} "
            f"{r.get('cluster_packed_effective_tflops', float('nan')):7.0f} {peer:>20s}  "
            f"x{r['cudnn_dense_ms'] / r['vdopt_ms']:.2f}")
    if skipped:
        log(f"skipped (deadline): {', '.join(skipped)}")


def plot(records, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in records))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in records if r["shape"] == shape]
        d = [r["density"] for r in rs]
        ax.plot(d, [1 / x for x in d], "k--", label="ideal 1/density")
        ran = "/".join(sorted({r["vdopt_backend"] for r in rs}))
        ax.plot(d, [r["cudnn_dense_ms"] / r["vdopt_ms"] for r in rs], "o-", label=f"vdopt op (auto: {ran})")
        ax.plot(d, [r["cudnn_dense_ms"] / r["triton_ms"] for r in rs], "s-", label="vdopt triton")
        for key, style, label in (("triton_host_desc", "s--", "vdopt triton, host descriptors (per head)"),
                                  ("triton_host_desc_storage", "s-.", "vdopt triton, host descriptors (storage)"),
                                  ("triton_in_kernel_desc", "s-", "vdopt triton, in-kernel descriptors"),
                                  ("triton_out_desc", "D--", "vdopt triton, TMA output stores"),
                                  ("triton_persistent", "s:", "vdopt triton, host descriptors + persistent")):
            if all(f"{key}_ms" in r for r in rs):
                ax.plot(d, [r["cudnn_dense_ms"] / r[f"{key}_ms"] for r in rs], style, label=label)
        if all("fa4_ms" in r for r in rs):
            ax.plot(d, [r["cudnn_dense_ms"] / r["fa4_ms"] for r in rs], "d-", label="FA4 called directly (run here)")
        for key, label in (("cluster", "vdopt cluster, padded keys"), ("cluster_packed", "vdopt cluster, packed keys")):
            if all(f"{key}_effective_tflops" in r for r in rs):
                ax.plot(d, [r["cudnn_dense_ms"] * r[f"{key}_effective_tflops"] * 1e9 / (r["kept_tflop"] * 1e12)
                            for r in rs], "^-" if key == "cluster" else "v-", label=f"{label} (same kept FLOPs)")
        if all("flex_ms" in r for r in rs):
            ax.plot(d, [r["cudnn_dense_ms"] / r["flex_ms"] for r in rs], "x-", label="FlexAttention")
        if all(r.get("best_peer_ms") and r["best_peer_source"] == PEER_FILE_SOURCE for r in rs):
            best = "/".join(sorted({r["best_peer"] for r in rs}))
            ax.plot(d, [r["cudnn_dense_ms"] / r["best_peer_ms"] for r in rs], ":",
                    label=f"best peer {best} (peer file, not run here)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (kept blocks)")
        ax.set_ylabel("speedup vs cuDNN dense")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{records[0]['device']}, {records[0]['date']}, bf16 D128", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str], out_dir: Path) -> dict[str, Any]:
    """Full-mode results of several device runs as one: cells by (shape, density), later runs winning; the checks
    keep each kernel's worst error over the runs. Writes out_dir/attention_kernels.json and .png."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for path, run in zip(paths, runs):
        if "records" not in run or "meta" not in run:
            raise SystemExit(f"--merge: {path} is not a full-mode attention_kernels.json (no records/meta)")
    cells: dict[tuple[str, float], dict] = {}
    for i, run in enumerate(runs):
        for record in run["records"]:
            cells[(record["shape"], record["density"])] = {**record, "run": i}
    shape_order = list(SHAPES)
    records = sorted(cells.values(), key=lambda r: (shape_order.index(r["shape"]) if r["shape"] in shape_order
                                                    else len(shape_order), r["density"]))
    checks: dict[str, float] = {}
    for run in runs:
        for name, value in run.get("checks_worst_rel_l2", {}).items():
            checks[name] = max(checks.get(name, 0.0), value)
    done = {f"{shape} d={density}" for shape, density in cells}
    skipped = sorted({s for run in runs for s in run.get("skipped", []) if s not in done})
    result = {"meta": {"merged_from": [Path(p).name for p in paths], "runs": [run["meta"] for run in runs],
                       "device": runs[-1]["meta"]["device"], "date": runs[-1]["meta"]["date"]},
              "checks_worst_rel_l2": checks, "records": records, "skipped": skipped, "complete": not skipped}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(records, str(out_dir / "attention_kernels.png"))
    return result


def smoke(args) -> None:
    """CPU run of the full mode's code (TRITON_INTERPRET=1) at tiny sizes, then the sweep's peer bookkeeping:
    catches errors before device time is spent."""
    if not _backends.interpreting():
        raise SystemExit("--mode smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1 before running it")
    full(args)
    rec = {"fa4_ms": 1.0, "fa4_effective_tflops": 600.0}
    record_peers(rec, "wan1.3b", 0.1, 6e14)
    log("peers:", rec["best_peer"], rec["best_peer_source"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="full", choices=("full", "sweep", "smoke"))
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated, of {', '.join(SHAPES)} (smoke: {', '.join(SMOKE_SHAPES)}); default all")
    ap.add_argument("--densities", default=None,
                    help=f"comma-separated kept densities (full: {DENSITIES}; sweep: {SWEEP_DENSITIES})")
    ap.add_argument("--deadline", type=float, default=420.0,
                    help="seconds after the start; cells not started by then are skipped (one started may run on)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of fa4 / op timings (median kept)")
    ap.add_argument("--out", default=OUT, help="folder for the JSON and the plot (default $OUT, else .)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="join these full-mode results (later cells win) into --out; runs nothing on the GPU")
    args = ap.parse_args()
    if args.merge:
        result = merge(args.merge, Path(args.out))
        log(f"merged {len(result['records'])} cells from {len(args.merge)} runs into {args.out}; "
            f"skipped: {', '.join(result['skipped']) or 'none'}")
        return
    if args.mode == "sweep" and args.densities is None:
        args.densities = ",".join(map(str, SWEEP_DENSITIES))
    if args.mode == "sweep" and args.shapes is None:
        args.shapes = ",".join(SHAPES)
    known = SMOKE_SHAPES if args.mode == "smoke" else SHAPES
    unknown = [name for name in (args.shapes or "").split(",") if name and name not in known]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; use some of {', '.join(known)}")
    try:
        {"full": full, "sweep": sweep, "smoke": smoke}[args.mode](args)
    except Exception:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    main()
