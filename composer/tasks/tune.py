"""task=tune: measure candidate Triton tile configs for the model's expert shape on this GPU.

Writes ``E={E},N={I},K={H},device_name={gpu},dtype={dtype}.json`` into the run directory and, when
``task.output_dir`` is set, into that folder too; point ``COMPOSER_KERNEL_CONFIGS`` at the folder (or copy
the file into ``composer/kernels/configs/``) and ``kernel=triton`` uses it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from ..errors import ConfigError, Problem
from ..progress import progress
from . import Task, TaskContext, TaskFailed, TaskParams, register_task


class TuneParams(TaskParams):
    tokens: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    rep_ms: int = Field(20, ge=1, description="milliseconds of timed runs per candidate (triton do_bench)")
    output_dir: str | None = Field(None, description="also write the config file into this folder")


@register_task("tune")
class Tune(Task):
    Params = TuneParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        p: TuneParams = cfg.task.params
        problems = setup_problems(cfg)
        out = None
        if p.output_dir:  # (before tuning: a folder that cannot be made lost the finished tuning)
            out, problem = output_folder(p.output_dir)
            problems += [problem] if problem else []
        if problems:
            raise ConfigError(problems)
        from ..kernels.triton.configs import config_file_name, device_name, dtype_name

        m = cfg.model
        table = tune_table(cfg, p, ctx)
        name = config_file_name(m.num_experts, m.intermediate_size, m.hidden_size, device_name(),
                                dtype_name(m.torch_dtype))
        written = write_table(table, name, [Path(ctx.run_dir), *([out] if out is not None else [])])
        ctx.console.print("wrote " + ", ".join(str(f) for f in written))
        return {"config_file": name, "written": [str(f) for f in written], "table": table}


def setup_problems(cfg: Any) -> list[Problem]:
    """What stops task=tune from measuring anything meaningful here."""
    problems = []
    if cfg.device != "cuda" or not torch.cuda.is_available():
        problems.append(Problem(
            "task.name", "tune", "measures Triton kernels on a CUDA GPU; none is visible here (device="
            f"{cfg.device}). Run it on the GPU you will deploy on; on CPU the kernels run in the interpreter "
            "and their times mean nothing"))
    if cfg.quant.name != "none":
        problems.append(Problem(
            "quant.name", cfg.quant.name, "task=tune tunes the unquantized kernels; quantized tables come from "
            "composer.kernels.triton.tune.tune_quant_tables or scripts/decode_probe.py --write (docs/quantization.md)"))
    return problems


def output_folder(value: str) -> tuple[Path, Problem | None]:
    """``task.output_dir`` made (if missing) and checked writable before tuning starts, or the problem with it."""
    import os

    out = Path(value).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "is a file" if out.is_file() else f"cannot be created ({exc.strerror or exc})"
        return out, Problem("task.output_dir", value, f"{why}: give a writable folder (made if missing) for the "
                            "tuned config file, or leave task.output_dir unset (the run folder gets it anyway)")
    if not os.access(out, os.W_OK | os.X_OK):
        return out, Problem("task.output_dir", value, "is not writable: give a writable folder (made if missing), "
                            "or leave task.output_dir unset (the run folder gets the file anyway)")
    return out, None


def tune_table(cfg: Any, p: TuneParams, ctx: TaskContext) -> dict[str, Any]:
    """Tune every ``task.tokens`` with a composer.progress bar (COMPOSER_PROGRESS=0 turns it off; logged either way)."""
    from ..kernels.triton.tune import tune_shape

    m = cfg.model
    lines: list[str] = []
    with progress(f"tune {m.name}", total=len(p.tokens), console=ctx.console) as bar:
        def done(T: int) -> None:
            bar.update(f"T={T} tuned")
            bar.advance()

        table = tune_shape(m.num_experts, m.top_k, m.hidden_size, m.intermediate_size, m.torch_dtype,
                           list(p.tokens), m.activation, p.rep_ms, cfg.seed, log=lines.append, on_token=done)
    for line in lines:
        ctx.console.print(line)
    return table


def write_table(table: dict[str, Any], name: str, folders: list[Path]) -> list[Path]:
    """The config file into each folder, the run folder first; a write that fails keeps the table (results.json)."""
    text = json.dumps(table, indent=2) + "\n"
    written: list[Path] = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        except OSError as exc:
            done = f"; written: {', '.join(map(str, written))}" if written else ""
            raise TaskFailed(f"could not write {folder / name} ({exc.strerror or exc}); the tuned table is in "
                             f"results.json (metrics.table){done}",
                             {"config_file": name, "written": [str(f) for f in written], "table": table}) from None
        written.append(folder / name)
    return written


def _main(argv: list[str] | None = None) -> None:
    """Standalone driver (no Hydra): ``python -c "from composer.tasks.tune import _main; _main()" --model M --out DIR``."""
    import argparse

    import yaml

    from ..kernels.triton.configs import config_file_name, device_name
    from ..kernels.triton.tune import tune_shape

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", default="1,16,128,1024,4096")
    ap.add_argument("--rep-ms", type=int, default=20)
    ap.add_argument("--out", default=".")
    ap.add_argument("--no-tma", action="store_true")
    args = ap.parse_args(argv)
    m = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf" / "model" / f"{args.model}.yaml").read_text())
    dtype = m.get("dtype", "bfloat16")
    table = tune_shape(m["num_experts"], m["top_k"], m["hidden_size"], m["intermediate_size"], getattr(torch, dtype),
                       [int(t) for t in args.tokens.split(",")], m.get("activation", "silu"), args.rep_ms,
                       log=lambda s: print(s, flush=True), tma=not args.no_tma)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = config_file_name(m["num_experts"], m["intermediate_size"], m["hidden_size"], device_name(), dtype)
    (out / name).write_text(json.dumps(table, indent=2) + "\n")
    print("wrote", out / name)
    print("CONFIG", name, json.dumps(table))
