"""Tasks: what a run does with the built graph. One module per task, each registered by name.

A task is a class with a ``Params`` pydantic model (its keys under ``task.``) and a ``run`` method
taking the validated config and a ``TaskContext``; it returns a JSON-able dict of metrics that the CLI
writes into ``results.json``. A task that finds a failure raises ``TaskFailed`` (exit code 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict
from rich.console import Console

from ..errors import ComposerError
from ..params import Params
from ..registry import TASKS


class TaskParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # (inf / nan: never a setting)


class TaskFailed(ComposerError):
    """The task ran and found a failure (a tolerance exceeded, say); its metrics are still written."""

    def __init__(self, message: str, metrics: dict[str, Any] | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


@dataclass
class TaskContext:
    run_dir: Path
    console: Console = field(default_factory=Console)


class Task:
    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = TaskParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS.register(name, cls)
        return cls

    return deco
