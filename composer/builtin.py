"""Imports every in-tree implementation so that its registry names exist.

Optional modules (those needing triton, or added by later features) are skipped when the module
itself is absent or its optional dependency is not installed; any other import error is raised.
"""
from __future__ import annotations

import importlib
import logging

from .registry import LAYERS

log = logging.getLogger(__name__)

REQUIRED = (
    "composer.layers.activation",
    "composer.layers.router",
    "composer.layers.fused_moe",
    "composer.quant.unquantized",
    "composer.quant.fp8",
    "composer.quant.int8",
    "composer.quant.int4",
    "composer.distributed.none",
    "composer.distributed.naive",
    "composer.distributed.allgather_reducescatter",
    "composer.distributed.all_to_all",
    "composer.kernels.torch_backend",
    "composer.tasks.run",
    "composer.tasks.check",
    "composer.tasks.show",
)
OPTIONAL = (
    "composer.kernels.triton_backend",
    "composer.kernels.grouped_mm",
    "composer.tasks.bench",
    "composer.tasks.tune",
    "composer.integrations.transformers_moe",
    "composer.tasks.generate",
    "composer.tasks.report",
)

for _mod in REQUIRED:
    importlib.import_module(_mod)
for _mod in OPTIONAL:
    try:
        importlib.import_module(_mod)
    except ModuleNotFoundError as exc:  # the module itself, or an optional dependency, is not installed
        if exc.name != _mod and (exc.name or "").split(".")[0] not in ("triton", "transformers", "matplotlib"):
            raise
        log.debug("optional %s not loaded: %s", _mod, exc)

# Registered for the code that builds them, not for configs: each takes another caller's arguments.
_INTERNAL_LAYERS = {
    "transformers_fused_moe": "the Transformers backend's internal swap class (it takes a Hugging Face model's "
                              "arguments, not composer's); choose layer=transformers_moe to run a Hugging Face model's "
                              "experts through composer",
}
for _name, _why in _INTERNAL_LAYERS.items():
    LAYERS.mark_internal(_name, _why)
