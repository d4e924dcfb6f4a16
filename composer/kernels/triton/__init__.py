"""composer's Triton MoE kernels: align (sort pairs by expert), grouped GEMMs with fused activation and
top-k reduction, and tile-config selection. Kernels are jitted lazily so ``TRITON_INTERPRET=1`` set at
any time before the first launch runs them in the interpreter (CPU)."""
from .align import max_blocks, moe_align
from .configs import get_config, heuristic_config
from .fused import fused_experts

__all__ = ["fused_experts", "get_config", "heuristic_config", "max_blocks", "moe_align"]
