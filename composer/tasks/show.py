"""task=show: the built module graph, with the implementation in each slot and why it was chosen."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from ..describe import describe
from ..factory import build, finish_loading
from ..registry import LAYERS
from . import Task, TaskContext, register_task


@register_task("show")
class Show(Task):
    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        # composer's own graph is built on the meta device: every slot resolved for cfg.device, the tensors' shapes
        # and dtypes, no storage (deepseek_v3's 671B parameters would not fit); a layer that builds its own model
        # (the Transformers backend) is built as it runs
        own_model = getattr(LAYERS.get(cfg.layer.name), "build_model", None) is not None
        model = build(cfg) if own_model else build(cfg, init=False, device="meta")
        if not own_model:
            finish_loading(model)  # the quant methods' processed layout (packed int4, scales)
        table = Table(title=f"composer graph: {cfg.model.name} ({cfg.model.num_layers} layers, {cfg.device})",
                      title_justify="left")
        for col in ("module", "registry name", "implementation", "why", "params"):
            table.add_column(col, justify="right" if col == "params" else "left")
        slots = describe(model, cfg)
        for s in slots:
            table.add_row(s.path, s.registry_name, s.implementation, s.why, f"{s.params:,}")
        ctx.console.print(table)
        return {"slots": [s.__dict__ for s in slots]}
