"""Backend choice for vdopt's sparse-attention ops: which implementation runs a call, and a record of it.

Backends of an op:
- ``"reference"``: the PyTorch definition in :mod:`vdopt.kernels.reference` (any device; slow; exact in fp32).
- ``"triton"``: vdopt's Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``).
``backend="auto"`` picks, for CUDA tensors, the first applicable backend of :data:`MEASURED_ORDER` (the order
follows the committed benchmark, benchmarks/results/attention_kernels.json), and ``"reference"`` on CPU.
"""

from __future__ import annotations

import os

import torch

# Fastest first, per op, as measured on H100 by benchmarks/attention_kernels.py. Only backends vdopt ships an
# adapter for appear here; the user overrides the choice per call with ``backend=``.
MEASURED_ORDER: dict[str, tuple[str, ...]] = {
    "block_sparse_attention": ("triton",),
    "cluster_sparse_attention": ("triton",),
    "strategy_helpers": ("triton",),  # pooled selection, k-means, token permutation
}
KNOWN_BACKENDS = ("auto", "triton", "reference")

_last_backend: dict[str, str] = {}


def last_backend(op: str = "block_sparse_attention") -> str | None:
    """Name of the backend that ran the most recent call of ``op`` in this process (None before any call)."""
    return _last_backend.get(op)


def record_backend(op: str, backend: str) -> None:
    _last_backend[op] = backend


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Turn the user's ``backend`` argument into the backend that will run, or raise naming the fix."""
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {KNOWN_BACKENDS} for {op}")
    if backend == "auto":
        if device.type == "cuda":
            return MEASURED_ORDER[op][0]
        return "reference"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 set before "
            "triton is imported; on CPU call it with backend='reference' (or 'auto')"
        )
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
