"""vdopt: make video diffusion transformers faster with sparse attention plans, no retraining."""

from __future__ import annotations

__version__ = "0.1.0"

from vdopt.api import apply, optimize
from vdopt.caching import CacheConfig
from vdopt.calibrate import CalibrationConfig
from vdopt.plan import Plan, PlanError
from vdopt.runtime import OptimizedModel
from vdopt.search import SearchConfig
from vdopt.sites import AttentionSite, TokenLayout
from vdopt.strategies import (
    Dense,
    Diagonal,
    MultiDiagonal,
    PooledTopP,
    SemanticKMeans,
    SpatialWindow,
    TemporalWindow,
    TileWindow,
    VerticalStripe,
)

__all__ = [
    "AttentionSite", "CacheConfig", "CalibrationConfig", "Dense", "Diagonal", "MultiDiagonal", "OptimizedModel", "Plan", "PlanError",
    "PooledTopP", "SearchConfig", "SemanticKMeans", "SpatialWindow", "TemporalWindow", "TileWindow", "TokenLayout",
    "VerticalStripe", "apply", "optimize",
]
