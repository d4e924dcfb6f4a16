"""task=check fails a non-finite error: ``nan > tol`` is False, so a check written that way passed an all-NaN output."""
from __future__ import annotations

import pytest
import torch
from rich.console import Console

from composer import load_config
from composer.checking import exceeds
from composer.quant import base
from composer.tasks import TaskContext, TaskFailed
from composer.tasks.check import Check


def test_exceeds():
    assert exceeds(float("nan"), 1.0) and exceeds(2.0, 1.0) and exceeds(float("inf"), 1.0)
    assert not exceeds(0.5, 1.0) and not exceeds(None, 1.0) and not exceeds(1.0, 1.0)


@pytest.mark.parametrize("quant", ["none", "int8_w8a16"])
def test_check_fails_an_all_nan_output(quant, tmp_path, monkeypatch):
    real = base.QuantMethod.apply
    monkeypatch.setattr(base.QuantMethod, "apply",
                        lambda self, *a, **kw: torch.full_like(real(self, *a, **kw), float("nan")))
    cfg = load_config(None, ["task=check", "kernel=torch", "model.num_layers=1", f"quant={quant}", "device=cpu"])
    with pytest.raises(TaskFailed, match=r"experts rel. error nan >"):
        Check().run(cfg, TaskContext(run_dir=tmp_path, console=Console(quiet=True)))
