"""A small trained text-to-video proxy (Wan architecture on pixels) for measuring what vdopt costs in quality.

``load_proxy_pipeline()`` returns the shipped model ready to sample; ``held_out_prompts()`` and
``HELD_OUT_SEEDS`` are the evaluation captions and noise seeds. See MODEL_CARD.md beside this file.
"""

from __future__ import annotations

from vdopt.proxy.data import HELD_OUT_SEEDS, held_out_pairs, held_out_prompts
from vdopt.proxy.pipeline import ProxyPipeline, load_proxy_pipeline

__all__ = ["HELD_OUT_SEEDS", "ProxyPipeline", "held_out_pairs", "held_out_prompts", "load_proxy_pipeline"]
