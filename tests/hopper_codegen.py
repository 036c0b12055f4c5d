"""Compile vdopt's attention kernels for Hopper (sm_90) on a machine without a GPU and report what the code holds.

Run as a script with Triton's interpreter off (tests/test_hopper_codegen.py starts it in a subprocess, since the
test session turns the interpreter on before the kernels are imported). Prints one JSON object per variant:
its name, whether it compiled, and counts of Hopper instructions in its PTX: ``wgmma`` (warpgroup tensor-core
MMAs), ``tma`` (bulk tensor copies, the TMA loads), ``cp_async`` (asynchronous copies: gathered rows that the
software pipeline prefetches), ``tensormap`` (descriptors built in the kernel), the shared memory it asks for,
and, where the Triton install ships cuobjdump, registers per thread and stack bytes per thread (stack beyond a few
bytes is spilled registers). To see what the GPU machine's compiler makes, put its Triton first on the path:
``pip install --no-deps --target /tmp/triton36 triton==3.6.0; PYTHONPATH=/tmp/triton36 python tests/hopper_codegen.py``
(with vdopt importable, e.g. installed in editable mode).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vdopt.kernels import block_sparse_attention as bsa
from vdopt.kernels import cluster_sparse_attention as csa

_DATA_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32"}


def compile_for_hopper(kernel, constexprs: dict, num_warps: int, num_stages: int,
                       descriptors: dict[str, str] | None = None, capability: int = 90) -> dict:
    """Compile one ``@triton.jit`` kernel for sm_``capability`` (90: Hopper; 80: Ampere, for the pointer-load
    fallback): parameters named in capitals are pointers (bf16 tensors, fp32 lse, int32 lists) unless
    ``descriptors`` gives them a host tensor-descriptor type, ``qk_scale`` is fp32 and the other scalars int32."""
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in params:
        if name in constexprs:
            signature[name] = "constexpr"
        elif descriptors and name in descriptors:
            signature[name] = descriptors[name]
        elif name[0].isupper():
            signature[name] = _DATA_POINTERS.get(name, "*i32")
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return {
        **_resource_usage(compiled.asm["cubin"]),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"mma\.sync", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "tensormap": len(re.findall(r"tensormap\.(?:replace|cp_fenceproxy)|fence\.proxy\.tensormap", ptx)),
        "shared_bytes": compiled.metadata.shared,
        "cubin_bytes": len(compiled.asm["cubin"]),
    }


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack per thread from ``cuobjdump --dump-resource-usage`` (shipped with Triton's CUDA
    backend); empty where it is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=False).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(found[1]), "stack_bytes": int(found[2])} if found else {}


def variants() -> dict[str, tuple]:
    """name -> (kernel, constexprs, warps, stages, host descriptor types, compute capability): the configurations
    vdopt launches on H100, and its pointer-load fallback on an A100 (sm_80: no TMA, no wgmma)."""
    block_m, block_n, stages, warps = bsa.TILE_CONFIGS[0]
    block = {"LAYOUT_BLOCK_M": 128, "LAYOUT_BLOCK_N": 128, "BLOCK_M": block_m, "BLOCK_N": block_n,
             "NUM_STAGES": stages, "HAS_HEAD_INDICES": False, "USE_TMA": True, "KV_RAGGED": bsa.RAGGED_MASK_IN_BRANCH,
             "PRECISION": "tf32", "DOT_UPCAST": False, "HOST_TMA": 0, "PERSISTENT": False,
             "OUT_TMA": False}
    # Host-made 2-D descriptors over [B, N, H, D] storage (token-major, the layout projections produce).
    boxes = {"Q": f"tensordesc<bf16[{block_m}, 128]>", "K": f"tensordesc<bf16[{block_n}, 128]>",
             "V": f"tensordesc<bf16[{block_n}, 128]>"}
    out = {
        "block_tma_d128": (bsa._block_sparse_fwd_kernel, {**block, "HEAD_DIM": 128}, warps, stages, None, 90),
        "block_tma_d64_head_group": (bsa._block_sparse_fwd_kernel,
                                     {**block, "HEAD_DIM": 64, "HAS_HEAD_INDICES": True}, warps, stages, None, 90),
        "block_pointer_d128": (bsa._block_sparse_fwd_kernel, {**block, "HEAD_DIM": 128, "USE_TMA": False}, warps,
                               stages, None, 90),
        "block_host_tma_d128": (bsa._block_sparse_fwd_kernel, {**block, "HEAD_DIM": 128, "HOST_TMA": 2}, warps,
                                stages, boxes, 90),
        # Per-head 4-D descriptors ([B, H, N, D] dims with the tensor's strides, boxes of one head's rows).
        "block_host_tma_per_head_d128": (bsa._block_sparse_fwd_kernel, {**block, "HEAD_DIM": 128, "HOST_TMA": 3},
                                         warps, stages, {n: f"tensordesc<bf16[1, 1, {r}, 128]>" for n, r in
                                                         (("Q", block_m), ("K", block_n), ("V", block_n))}, 90),
        # The same, with output tiles stored through a per-head descriptor (TMA store).
        "block_host_tma_per_head_out_tma_d128": (
            bsa._block_sparse_fwd_kernel, {**block, "HEAD_DIM": 128, "HOST_TMA": 3, "OUT_TMA": True}, warps, stages,
            {n: f"tensordesc<bf16[1, 1, {r}, 128]>" for n, r in
             (("Q", block_m), ("K", block_n), ("V", block_n), ("Out", block_m))}, 90),
        "block_persistent_host_tma_d128": (bsa._block_sparse_fwd_kernel,
                                           {**block, "HEAD_DIM": 128, "HOST_TMA": 2, "PERSISTENT": True}, warps,
                                           stages, boxes, 90),
    }
    block_m, block_n, stages, warps = csa.DEFAULT_CONFIG
    cluster = {"HEAD_DIM": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": stages, "CLUSTERS_P": 512,
               "USE_TMA": True, "KV_RAGGED": bsa.RAGGED_MASK_IN_BRANCH, "PRECISION": "tf32", "DOT_UPCAST": False,
               "LENGTH_BITS": 8, "KV_PACKED": False, "WINDOW": 64, "Q_GATHER": False, "OUT_SCATTER": False,
               "KV_PERMUTED": False, "HAS_HEAD_INDICES": False, "Q_LAUNCHED_HEADS": False}
    # Fused permutations as launched: Q gathered by a launch before the kernel (a TMA box load in it), K/V rows
    # gathered and out rows scattered in the kernel; "_q_in_kernel": the Q tile gathered in the kernel too.
    for name, extra in {
        "cluster_padded": {},
        "cluster_packed": {"KV_PACKED": True},
        "cluster_packed_permuted": {"KV_PACKED": True, "OUT_SCATTER": True, "KV_PERMUTED": True},
        "cluster_padded_permuted": {"OUT_SCATTER": True, "KV_PERMUTED": True},
        # Only the output scattered in the kernel: K/V permuted by launches, so they keep their TMA boxes.
        "cluster_padded_out_scatter": {"OUT_SCATTER": True},
        "cluster_packed_permuted_q_in_kernel": {"KV_PACKED": True, "Q_GATHER": True, "OUT_SCATTER": True,
                                                "KV_PERMUTED": True},
    }.items():
        out[name] = (csa._cluster_sparse_fwd_kernel, {**cluster, **extra}, warps, stages, None, 90)
    out["block_pointer_d128_sm80"] = (bsa._block_sparse_fwd_kernel, {**block, "HEAD_DIM": 128, "USE_TMA": False},
                                      warps, stages, None, 80)
    out["cluster_pointer_sm80"] = (csa._cluster_sparse_fwd_kernel, {**cluster, "USE_TMA": False}, warps, stages,
                                   None, 80)
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("hopper_codegen.py compiles real GPU code: run it with TRITON_INTERPRET unset")
    for name, (kernel, constexprs, warps, stages, descriptors, capability) in variants().items():
        try:
            record = {"variant": name, "compiled": True,
                      **compile_for_hopper(kernel, constexprs, warps, stages, descriptors, capability)}
        except Exception as error:  # noqa: BLE001 -- reported per variant, the test names the failure
            record = {"variant": name, "compiled": False, "error": f"{type(error).__name__}: {str(error)[:600]}"}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
