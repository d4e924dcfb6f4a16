"""composer.progress: bars on terminals only, always logged."""
from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from composer import progress as P


def test_not_drawn_off_a_terminal_but_logged(caplog, monkeypatch):
    monkeypatch.delenv("COMPOSER_PROGRESS", raising=False)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False)
    with caplog.at_level(logging.DEBUG, logger="composer.progress"):
        with P.progress("bench", total=3, console=console) as bar:
            for i in range(3):
                bar.update(f"case {i}")
                bar.advance()
    assert buf.getvalue() == ""
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "bench: started (3 steps)" and msgs[-1].startswith("bench: 3/3 steps done in ")
    assert "bench: case 1" in msgs and bar.completed == 3


def test_drawn_on_a_terminal_and_nested_bars_share_the_display(monkeypatch):
    monkeypatch.delenv("COMPOSER_PROGRESS", raising=False)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with P.progress("sweep", total=2, console=console) as outer:
        display = P._live
        assert display is not None
        for item in P.track(["a", "b"], "inner", console=console):
            assert P._live is display and len(display.tasks) == 2
        assert len(display.tasks) == 1  # the inner bar is removed when it ends
        outer.advance(2)
    assert P._live is None
    assert "sweep" in buf.getvalue() and "2/2" in buf.getvalue()


def test_env_switch_and_errors(monkeypatch, caplog):
    terminal = Console(file=io.StringIO(), force_terminal=True)
    monkeypatch.setenv("COMPOSER_PROGRESS", "0")
    assert not P.enabled(terminal)
    monkeypatch.setenv("COMPOSER_PROGRESS", "1")
    assert P.enabled(Console(file=io.StringIO(), force_terminal=False))
    monkeypatch.setenv("COMPOSER_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="composer.progress"):
        with pytest.raises(RuntimeError):
            with P.progress("tune", total=4) as bar:
                bar.advance()
                raise RuntimeError("boom")
    assert any("tune: stopped after 1/4 steps" in r.getMessage() for r in caplog.records)
    assert P._live is None
    with pytest.raises(ValueError, match="total must be >= 0"):
        with P.progress("x", total=-1):
            pass


def test_bench_bar_is_composer_progress(tmp_path, monkeypatch, caplog):
    """task=bench drew its own rich bar: COMPOSER_PROGRESS=0 did not turn it off, and nothing reached the log."""
    from composer import load_config
    from composer.tasks import TaskContext
    from composer.tasks.bench import Bench

    monkeypatch.setenv("COMPOSER_PROGRESS", "0")
    cfg = load_config(None, ["device=cpu", "kernel=torch", "model.num_layers=1", "task=bench", "task.tokens=[1]",
                             "task.peers=false", "task.iters=1", "task.min_iters=1", "task.warmup=0"])
    buf = io.StringIO()
    with caplog.at_level(logging.DEBUG, logger="composer.progress"):
        Bench().run(cfg, TaskContext(run_dir=tmp_path, console=Console(file=buf, force_terminal=True, width=200)))
    assert "\x1b[?25l" not in buf.getvalue()  # (a live display hides the cursor)
    msgs = [r.getMessage() for r in caplog.records]
    assert "bench tiny: started (1 steps)" in msgs and "bench tiny: T=1 composer torch" in msgs
