"""The attention kernels compile for Hopper (sm_90) on this CPU machine, and the code holds what makes them fast;
the pointer-load fallback also compiles for Ampere (sm_80).

CI has no GPU, so the interpreter tests check the kernels' arithmetic but not that Triton can lower them for the
H100: tests/hopper_codegen.py compiles each variant vdopt launches for sm_90 (in a subprocess with the interpreter
off, as this session turns it on) and counts instructions in the PTX. Asserted: every variant compiles; every one
runs its two matrix products per key tile on warpgroup tensor cores (wgmma); box-loaded variants load through TMA;
and variants that gather rows (pointer loads, packed keys, fused permutations) get asynchronous copies (cp.async),
i.e. Triton's software pipeline prefetches their gathered rows rather than waiting on plain loads. The installed
Triton may be newer than the GPU machine's (3.6): a pass here is necessary, not sufficient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError as error:  # pragma: no cover -- depends on the Triton build
    pytest.skip(f"this Triton cannot compile for CUDA targets here: {error}", allow_module_level=True)

BOX_LOADED = {"block_tma_d128", "block_tma_d64_head_group", "block_host_tma_d128", "block_host_tma_per_head_d128",
              "block_host_tma_per_head_out_tma_d128", "block_persistent_host_tma_d128",
              "cluster_padded", "cluster_padded_out_scatter"}
GATHERED = {"block_pointer_d128", "cluster_packed", "cluster_packed_permuted", "cluster_padded_permuted",
            "cluster_packed_permuted_q_in_kernel"}
# The pointer-load fallback compiled for an A100 (sm_80): warp-level mma.sync, no TMA.
AMPERE = {"block_pointer_d128_sm80", "cluster_pointer_sm80"}


@pytest.fixture(scope="module")
def records() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_codegen.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["variant"]: r for r in map(json.loads, run.stdout.splitlines())}


def test_every_variant_compiles_to_tensor_core_code(records) -> None:
    assert set(records) == BOX_LOADED | GATHERED | AMPERE
    for name, record in records.items():
        assert record["compiled"], f"{name}: {record.get('error')}"
        # Two products per key tile (Q K^T and P V), each several MMA instructions: none means no tensor cores.
        mma = "mma_sync" if name in AMPERE else "wgmma"
        assert record[mma] >= 2, f"{name} has no {mma} tensor-core instructions: {record}"
        assert record["shared_bytes"] <= 163 * 1024, f"{name} asks for more shared memory than an A100 SM has"


def test_box_loads_use_tma_and_gathers_are_prefetched(records) -> None:
    for name in BOX_LOADED:
        assert records[name]["tma"] > 0, f"{name} should load its tiles through TMA: {records[name]}"
    for name in GATHERED:
        assert records[name]["cp_async"] > 0, f"{name}'s gathered rows are not prefetched asynchronously: {records[name]}"
    # Host-made descriptors: the kernel builds none (device-side creation writes a descriptor to global scratch and
    # fences it: tensormap instructions in the PTX).
    assert records["block_host_tma_d128"]["tensormap"] == 0 < records["block_tma_d128"]["tensormap"]
    # Per-head (4-D) descriptors: the rank-reducing box load compiles to the 2-D one's pipeline, no extra copies.
    per_head, storage = records["block_host_tma_per_head_d128"], records["block_host_tma_d128"]
    assert per_head["tensormap"] == 0
    assert (per_head["tma"], per_head["wgmma"], per_head["shared_bytes"]) == (
        storage["tma"], storage["wgmma"], storage["shared_bytes"]), (per_head, storage)
    # Output through a descriptor: one more bulk tensor copy (the store), the same loop and shared memory.
    out_tma = records["block_host_tma_per_head_out_tma_d128"]
    assert (out_tma["tma"], out_tma["wgmma"], out_tma["shared_bytes"]) == (
        per_head["tma"] + 1, per_head["wgmma"], per_head["shared_bytes"]), (out_tma, per_head)
    # Fused permutations gather K/V rows: the only box load left is Q's, gone when the kernel gathers Q too.
    assert records["cluster_padded_permuted"]["tma"] > 0 and records["cluster_packed_permuted_q_in_kernel"]["tma"] == 0
    # Only the output scattered: Q, K and V all still load as boxes, as in the padded default, and nothing is gathered.
    assert records["cluster_padded_out_scatter"]["tma"] == records["cluster_padded"]["tma"]
    assert records["cluster_padded_out_scatter"]["cp_async"] == 0
