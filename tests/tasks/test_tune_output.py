"""task=tune's output folder is checked before tuning (a file there lost the finished tuning), a failed write keeps the
table in results.json, and its bar is composer.progress's. CPU: the tuning itself is faked (it needs CUDA)."""
from __future__ import annotations

import io
import logging

import pytest
import torch
from rich.console import Console

from composer import load_config
from composer.errors import ConfigError
from composer.tasks import TaskContext, TaskFailed
from composer.tasks.tune import Tune, output_folder, write_table

TABLE = {"_capability": "9.0", "1": {"BLOCK_SIZE_M": 16}}


def test_an_output_dir_that_is_a_file_is_refused_before_tuning(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    cfg = load_config(None, ["task=tune", "device=cpu", f"task.output_dir={taken}"])
    with pytest.raises(ConfigError) as err:
        Tune().run(cfg, TaskContext(run_dir=tmp_path / "run", console=Console(quiet=True)))
    problems = {p.key: p for p in err.value.problems}
    assert set(problems) == {"task.name", "task.output_dir"}  # every problem at once
    assert str(problems["task.output_dir"]).startswith(f"task.output_dir = '{taken}': is a file: give a writable folder")


def test_output_folder_is_made_or_named_as_the_problem(tmp_path):
    out, problem = output_folder(str(tmp_path / "a" / "b"))
    assert problem is None and out.is_dir()
    (tmp_path / "f").write_text("")
    _, problem = output_folder(str(tmp_path / "f" / "sub"))
    assert problem.key == "task.output_dir" and "cannot be created (Not a directory)" in problem.message


def test_a_failed_write_keeps_the_table_and_the_run_folder_copy(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(TaskFailed, match=r"could not write .*f/sub/x.json .*the tuned table is in results.json") as err:
        write_table(TABLE, "x.json", [tmp_path / "run", tmp_path / "f" / "sub"])
    assert err.value.metrics["table"] == TABLE
    assert err.value.metrics["written"] == [str(tmp_path / "run" / "x.json")]
    assert (tmp_path / "run" / "x.json").is_file()  # the run folder's copy is written first


def test_tune_bar_is_composer_progress(tmp_path, monkeypatch, caplog):
    """COMPOSER_PROGRESS=0 left task=tune's rich bar on, and nothing reached the log."""
    import composer.kernels.triton.configs as configs
    import composer.kernels.triton.tune as kernel_tune

    def fake_tune(*args, on_token=None, **kw):
        for T in args[5]:
            on_token(T)
        return TABLE

    monkeypatch.setattr(kernel_tune, "tune_shape", fake_tune)
    monkeypatch.setattr(configs, "device_name", lambda: "FAKE_GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("COMPOSER_PROGRESS", "0")
    cfg = load_config(None, ["task=tune", "device=cpu", "task.tokens=[1,2]", f"task.output_dir={tmp_path / 'out'}"])
    cfg = cfg.model_copy(update={"device": "cuda"})
    buf = io.StringIO()
    with caplog.at_level(logging.INFO, logger="composer.progress"):
        m = Tune().run(cfg, TaskContext(run_dir=tmp_path / "run", console=Console(file=buf, force_terminal=True)))
    assert m["table"] == TABLE and len(m["written"]) == 2
    assert "\x1b[?25l" not in buf.getvalue()  # (a live display hides the cursor)
    msgs = [r.getMessage() for r in caplog.records]
    assert "tune tiny: started (2 steps)" in msgs and any(s.startswith("tune tiny: 2/2 steps done") for s in msgs)
