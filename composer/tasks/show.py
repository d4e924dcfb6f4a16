"""task=show: the built module graph, with the implementation in each slot and why it was chosen."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from ..describe import describe
from ..factory import build
from . import Task, TaskContext, register_task


@register_task("show")
class Show(Task):
    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        model = build(cfg)
        table = Table(title=f"composer graph: {cfg.model.name} ({cfg.model.num_layers} layers, {cfg.device})",
                      title_justify="left")
        for col in ("module", "registry name", "implementation", "why", "params"):
            table.add_column(col, justify="right" if col == "params" else "left")
        slots = describe(model, cfg)
        for s in slots:
            table.add_row(s.path, s.registry_name, s.implementation, s.why, f"{s.params:,}")
        ctx.console.print(table)
        return {"slots": [s.__dict__ for s in slots]}
