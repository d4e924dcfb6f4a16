"""Run ``task=check`` of the Transformers backend with the swapped model perturbed first (routing replay tests)."""
from __future__ import annotations

from rich.console import Console

from composer.integrations.transformers_moe import reference_and_swapped
from composer.tasks import TaskContext
from composer.integrations import check as hf_check


def run_check(cfg, tmp_path, monkeypatch, perturb=lambda model: None):
    made = reference_and_swapped

    def patched(c):
        ref, model = made(c)
        perturb(model)
        return ref, model

    monkeypatch.setattr("composer.integrations.transformers_moe.reference_and_swapped", patched)
    return hf_check.check(cfg, TaskContext(run_dir=tmp_path, console=Console(quiet=True)), cfg.task.params)
