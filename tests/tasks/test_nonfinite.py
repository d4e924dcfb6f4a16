"""A NaN or inf error stays visible: results.json spells it (JSON has no NaN; null read as "not measured"), task=run
warns and records it, task=check fails it. The overflow: float16 with the router's weights scaled by 1e10."""
from __future__ import annotations

import json
import logging
import math

import pytest
from rich.console import Console

from composer import load_config
from composer.tasks import TaskContext, TaskFailed

OVERFLOW = ["kernel=torch", "device=cpu", "model.dtype=float16", "model.router.routed_scaling_factor=1e10",
            "task.iters=1", "task.warmup=0", "task.tokens=4"]


def test_results_json_spells_non_finite_floats_and_reads_them_back(tmp_path, monkeypatch):
    from composer import results

    monkeypatch.setattr(results, "git_revision", lambda: None)
    metrics = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "list": [float("nan"), 1.5],
               "text": "kept", "none": None}
    path = results.write_results(tmp_path, status="ok", task="run", metrics=metrics, config=None, config_hash=None,
                                 overrides=[])

    def refuse(token):
        raise AssertionError(f"results.json holds {token}, which is not JSON")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc["metrics"] == {"nan": "nan", "inf": "inf", "ninf": "-inf", "list": ["nan", 1.5], "text": "kept",
                              "none": None}
    back = results.revive(doc["metrics"])
    assert math.isnan(back["nan"]) and back["inf"] == math.inf and back["ninf"] == -math.inf
    assert math.isnan(back["list"][0]) and back["none"] is None and back["text"] == "kept"


def test_run_warns_about_and_records_a_nan_output(tmp_path, caplog):
    from composer.tasks.run import Run

    cfg = load_config(None, ["task=run", *OVERFLOW])
    console = Console(record=True, width=250)
    with caplog.at_level(logging.WARNING, logger="composer.checking"):
        m = Run().run(cfg, TaskContext(run_dir=tmp_path, console=console))
    assert not math.isfinite(m["output_rel_err"])
    assert m["warning"].startswith("non-finite error vs the float64 oracle (output_rel_err ")
    assert "task=check fails such a run" in m["warning"]
    assert any(r.levelno == logging.WARNING and r.getMessage() == m["warning"] for r in caplog.records)
    # the table's error column says what it holds: a relative Frobenius error vs the oracle, not a maximum
    text = console.export_text()
    assert "rel. err vs oracle" in text and "max err" not in text


def test_check_fails_a_nan_output_error(tmp_path):
    from composer.tasks.check import Check

    cfg = load_config(None, ["task=check", *OVERFLOW])
    with pytest.raises(TaskFailed, match=r"output rel. error (nan|inf) > tolerance") as err:
        Check().run(cfg, TaskContext(run_dir=tmp_path, console=Console(quiet=True)))
    assert err.value.metrics["passed"] is False and not math.isfinite(err.value.metrics["output_rel_err"])
