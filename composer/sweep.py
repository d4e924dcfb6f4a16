"""Sweeps (``composer -m ...``): a Hydra callback that logs each job as it ends and closes the sweep with a table.

Registered in conf/config.yaml under ``hydra.callbacks.sweep_summary``. Per job it logs
``sweep: job 3/8 failed (model.top_k=99): <error>`` (the total is computed from the sweep's overrides and the
sweeper's params); at the end it prints one row per job read back from the sweep directory's results.json
files, so it also works when the jobs ran elsewhere (hydra/launcher=slurm), and says how to make the report.
Turn it off with ``~hydra.callbacks.sweep_summary``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper makes: the product of the sweep lengths of the command line's overrides
    and of ``hydra.sweeper.params`` (the command line wins per key). None when it cannot be computed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        parser = OverridesParser.create()
        parsed = parser.parse_overrides([str(o) for o in task])
        keys = {o.get_key_element() for o in parsed}
        parsed += parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in keys])
        from .api import sweep_values

        n = 1
        for o in parsed:
            if o.is_sweep_override():
                n *= len(sweep_values(o))  # (glob() too: Hydra's parser cannot expand it alone)
        return n
    except Exception:  # an exotic sweeper or override: no total, never a failed sweep
        return None


def _results(job_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((job_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def _one_line(s: str | None, n: int = 100) -> str:
    text = " ".join(line.strip().lstrip("- ") for line in (s or "").splitlines() if line.strip())
    return text if len(text) <= n else text[: n - 2] + " …"


class SweepSummary(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total: int | None = None
        self.done = 0
        self.t0 = 0.0
        self.job_t0 = 0.0
        self.sweeping = False  # on_job_* are called for single runs too: stay quiet there

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total, self.done, self.t0 = sweep_size(config), 0, time.perf_counter()
        self.sweeping = True
        if self.enabled:
            log.info("sweep: %s jobs -> %s", self.total if self.total is not None else "?",
                     OmegaConf.select(config, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_t0 = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self.enabled or not self.sweeping or job_return is None or job_return.hydra_cfg is None:
            return
        self.done += 1
        job_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        doc = _results(job_dir)
        status = doc.get("status") or ("crashed" if getattr(job_return.status, "name", "") == "FAILED" else "no results.json")
        overrides = " ".join(job_return.overrides or [])
        total = self.total if self.total is not None else "?"
        took = time.perf_counter() - self.job_t0
        if status == "ok":
            log.info("sweep: job %d/%s ok in %.1f s (%s)", self.done, total, took, overrides)
        else:
            log.warning("sweep: job %d/%s %s in %.1f s (%s): %s", self.done, total, status, took, overrides,
                        _one_line(doc.get("error")))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from rich.markup import escape
        from rich.table import Table

        from .cli import _console
        from .tasks.report import collect

        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if not sweep_dir.is_dir():
            return
        records = collect(sweep_dir, show_progress=False)
        if not records:
            return
        table = Table(title=f"sweep {sweep_dir}: {len(records)} jobs in {time.perf_counter() - self.t0:.1f} s",
                      title_justify="left")
        for col in ("job", "overrides", "status", "error"):
            table.add_column(col, overflow="fold")
        for r in records:
            table.add_row(r.path, escape(" ".join(f"{k}={v}" for k, v in r.overrides.items())), r.status,
                          escape(_one_line(r.error)), style=None if r.status == "ok" else "red")
        console = _console()
        console.print(table)
        bad = sum(r.status != "ok" for r in records)
        console.print(escape(f"{len(records) - bad} ok, {bad} not ok; aggregate with: composer task=report "
                             f"report.dir={sweep_dir}"), highlight=False)
        if self.total is not None and len(records) != self.total:
            log.warning("sweep: %d of the %d jobs left a directory below %s", len(records), self.total, sweep_dir)
