"""Which implementation fills each slot of a built graph, and why (for tables and ``task=show``)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ComposerConfig
from .layers.fused_moe import FusedMoE
from .registry import CustomOp, PluggableLayer


@dataclass
class Slot:
    path: str
    registry_name: str
    implementation: str
    why: str
    params: int


def describe(model: nn.Module, cfg: ComposerConfig) -> list[Slot]:
    slots = []
    for path, mod in model.named_modules():
        if not path:
            continue
        n_params = sum(p.numel() for p in mod.parameters(recurse=True))
        if isinstance(mod, PluggableLayer):
            why = "out-of-tree" if mod.is_oot else f"configured (layer={cfg.layer.name})"
            if isinstance(mod, FusedMoE):
                k = cfg.kernel
                kwhy = f"auto-selected for {cfg.device}" if k.auto_selected else "configured"
                why += f"; kernel={k.resolved} ({kwhy}); quant={cfg.quant.name}; all2all={cfg.all2all.name}"
            slots.append(Slot(path, f"layer {type(mod).layer_name}", mod.implementation(), why, n_params))
        elif isinstance(mod, CustomOp):
            state = "enabled" if mod.enabled else "disabled by custom_ops"
            slots.append(Slot(path, f"custom op {mod.op_name}", mod.implementation(),
                              f"{state}; platform {mod.platform}", n_params))
        elif len(list(mod.children())) == 0 or type(mod).__name__ in ("SharedExperts",):
            if path.count(".") and any(path.startswith(s.path + ".") for s in slots if s.registry_name.startswith(("layer", "custom"))):
                continue
            slots.append(Slot(path, "module", type(mod).__name__, "fixed", n_params))
    return slots
