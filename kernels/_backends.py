"""Backend choice for vdopt's sparse-attention ops: which implementation runs a call, and a record of it.

Backends of an op:
- ``"reference"``: the PyTorch definition in :mod:`vdopt.kernels.reference` (any device; slow; exact in fp32).
- ``"triton"``: vdopt's Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``).
- ``"fa4"``: FlashAttention-4's block-sparse forward (block-sparse attention only; optional package
  flash-attn-4, see :mod:`vdopt.kernels.fa4_backend`).
``backend="auto"`` picks, for CUDA tensors, the first backend of :data:`MEASURED_ORDER` that can run the call,
and ``"reference"`` on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# Fastest first, per op, as measured on H100 by benchmarks/attention_kernels.py. Only backends vdopt ships an
# adapter for appear here; the user overrides the choice per call with ``backend=``. Block-sparse: FA4 (through
# fa4_backend) ran 577 TFLOP/s on kept blocks against Triton's 495 at Wan2.1-1.3B, 32760 tokens, density 0.1, in one
# run (2026-11-25; 529-646 vs 445-539 over densities 0.05-0.5 and Wan2.1-14B).
MEASURED_ORDER: dict[str, tuple[str, ...]] = {
    "block_sparse_attention": ("fa4", "triton"),
    "cluster_sparse_attention": ("triton",),
    "strategy_helpers": ("triton",),  # pooled selection, k-means, token permutation
}
KNOWN_BACKENDS = ("auto", "fa4", "triton", "reference")

_last_backend: dict[str, str] = {}


def last_backend(op: str = "block_sparse_attention") -> str | None:
    """Name of the backend that ran the most recent call of ``op`` in this process (None before any call)."""
    return _last_backend.get(op)


def record_backend(op: str, backend: str) -> None:
    _last_backend[op] = backend


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(
    op: str, backend: str, device: torch.device, why_not: Callable[[str], str | None] | None = None
) -> str:
    """Turn the user's ``backend`` argument into the backend that will run, or raise naming the fix.

    ``why_not(name)`` says why backend ``name`` cannot run this call (None: it can): ``"auto"`` passes over such
    backends to the next of :data:`MEASURED_ORDER`, an explicit request for one raises with the reason.
    """
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {KNOWN_BACKENDS} for {op}")
    if backend == "auto":
        if device.type == "cuda":
            for name in MEASURED_ORDER[op]:
                if why_not is None or why_not(name) is None:
                    return name
        return "reference"
    offered = ("auto", *MEASURED_ORDER[op], "reference")
    if backend not in offered:
        raise ValueError(f"{op} has no backend={backend!r}; use one of {offered}")
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 set before "
            "triton is imported; on CPU call it with backend='reference' (or 'auto')"
        )
    reason = why_not(backend) if why_not is not None else None
    if reason is not None:
        raise RuntimeError(f"{op}: backend={backend!r} cannot run this call: {reason}")
    return backend


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether tensor-descriptor (TMA) loads may read these [B, H, N, D] tensors: sm90+, unit last stride,
    16-byte aligned base and strides (the copy engine's rules)."""
    if interpreting():
        return True
    for t in tensors:
        if t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _alloc_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_descriptor_allocator() -> None:
    """Give Triton a scratch allocator for tensor descriptors built inside kernels, unless one is set already
    (Triton keeps it in a context variable, so this is checked on every launch)."""
    if interpreting():
        return
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc_scratch)
