"""results.json: what every run writes beside Hydra's .hydra/ (a versioned schema)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS_SCHEMA = "composer.results/1"


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist, key in (("triton", "triton"), ("transformers", "transformers"), ("moe-composer", "composer"),
                      ("hydra-core", "hydra"), ("pydantic", "pydantic")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    if out["composer"] is None:
        from . import __version__

        out["composer"] = __version__
    return out


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() or None if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


NON_FINITE = ("nan", "inf", "-inf")  # how results.json spells float('nan'), float('inf'), float('-inf')


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become the strings "nan", "inf", "-inf" (JSON has no such numbers; None would read as
    "not measured", hiding a NaN output), tensors and paths become lists/strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else "inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def revive(obj: Any) -> Any:
    """The inverse of the non-finite spelling: "nan", "inf", "-inf" read back as floats (in dicts and lists)."""
    if isinstance(obj, str) and obj in NON_FINITE:
        return float(obj)
    if isinstance(obj, dict):
        return {k: revive(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [revive(v) for v in obj]
    return obj


def write_results(run_dir: Path, *, status: str, task: str | None, metrics: dict[str, Any] | None,
                  config: dict[str, Any] | None, config_hash: str | None, overrides: list[str],
                  error: str | None = None, device: str = "cpu", resolved: dict[str, Any] | None = None) -> Path:
    doc = {
        "schema": RESULTS_SCHEMA,
        "status": status,
        "error": error,
        "task": task,
        "overrides": overrides,
        "metrics": metrics or {},
        "config": config,
        "config_hash": config_hash,
        "resolved": resolved,
        "versions": versions(),
        "device_name": device_name(device),
        "git_revision": git_revision(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = run_dir / "results.json"
    path.write_text(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")  # (valid JSON: no NaN tokens)
    return path
