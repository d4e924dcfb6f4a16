"""Rich progress bars for long tasks (bench, tune, report, sweeps), logged through Python logging as well.

    from composer.progress import progress, track

    with progress("bench", total=len(cases), console=ctx.console) as bar:
        for case in cases:
            bar.update(f"T={case.T} {case.impl}")   # what is running now
            ...
            bar.advance()

    for path in track(paths, "reading results"):
        ...

The bar is drawn on the task's console (stdout by default) only when that console is a terminal and
``COMPOSER_PROGRESS`` is not ``0``; a bar opened while another is shown becomes a second line of the
same display (rich allows one live display at a time). Whether drawn or not, the start and the end
(with the elapsed time) go to the logger ``composer.progress`` at INFO, and every step at DEBUG, so a
Hydra run directory's ``*.log`` says what a long task did.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)
T = TypeVar("T")

_live: Progress | None = None  # the display currently shown, shared by nested bars


def enabled(console: Console | None = None) -> bool:
    """Bars are drawn on terminals only; ``COMPOSER_PROGRESS=0`` turns them off, ``=1`` forces them on."""
    env = os.environ.get("COMPOSER_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return (console or Console()).is_terminal


class Bar:
    """One line of progress: ``advance()`` after each step, ``update(description)`` to say what runs now."""

    def __init__(self, name: str, total: int | None, progress: Progress | None):
        self.name = name
        self.total = total
        self.completed = 0
        self._progress = progress
        self._task = progress.add_task(name, total=total) if progress is not None else None
        self._t0 = time.perf_counter()

    def update(self, description: str) -> None:
        log.debug("%s: %s", self.name, description)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.name}: {description}")

    def advance(self, steps: int = 1) -> None:
        self.completed += steps
        log.debug("%s: %d/%s done", self.name, self.completed, self.total if self.total is not None else "?")
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._t0


def _new_display(console: Console | None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


@contextmanager
def progress(name: str, total: int | None = None, console: Console | None = None) -> Iterator[Bar]:
    """A progress bar for ``total`` steps (None: unknown) named ``name``; see the module docstring."""
    global _live
    if total is not None and total < 0:
        raise ValueError(f"progress total must be >= 0 or None, not {total}")
    log.info("%s: started%s", name, f" ({total} steps)" if total is not None else "")
    owner = False
    display = _live
    if display is None and enabled(console):
        display = _live = _new_display(console)
        display.start()
        owner = True
    bar = Bar(name, total, display)
    try:
        yield bar
    except BaseException:
        log.info("%s: stopped after %d/%s steps, %.1f s", name, bar.completed, total if total is not None else "?",
                 bar.elapsed_s)
        raise
    else:
        log.info("%s: %d/%s steps done in %.1f s", name, bar.completed, total if total is not None else "?", bar.elapsed_s)
    finally:
        if display is not None and not owner and bar._task is not None:
            display.remove_task(bar._task)
        if owner:
            display.stop()  # type: ignore[union-attr]
            _live = None


def track(items: Iterable[T], name: str, total: int | None = None, console: Console | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (total from ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(name, total=total, console=console) as bar:
        for item in items:
            yield item
            bar.advance()
