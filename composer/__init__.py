"""composer: a declarative, config-driven composer of Mixture-of-Experts layers for PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import build, load_config  # noqa: E402
from .kernels import ops as _ops  # noqa: E402,F401  (registers torch.ops.composer.*; Triton is imported on first call)

__all__ = ["build", "load_config", "__version__"]
