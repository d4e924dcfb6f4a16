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
from . import Task, TaskContext, TaskParams, register_task


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
        if cfg.device != "cuda" or not torch.cuda.is_available():
            raise ConfigError([Problem(
                "task.name", "tune", "measures Triton kernels on a CUDA GPU; none is visible here (device="
                f"{cfg.device}). Run it on the GPU you will deploy on; on CPU the kernels run in the interpreter "
                "and their times mean nothing")])
        if cfg.quant.name != "none":
            raise ConfigError([Problem(
                "quant.name", cfg.quant.name, "task=tune tunes the unquantized kernels; quantized tables come from "
                "composer.kernels.triton.tune.tune_quant_tables or scripts/decode_probe.py --write (docs/quantization.md)")])
        from rich.progress import Progress

        from ..kernels.triton.configs import config_file_name, device_name, dtype_name
        from ..kernels.triton.tune import tune_shape

        m = cfg.model
        lines: list[str] = []
        with Progress(console=ctx.console) as progress:
            task = progress.add_task(f"tune {m.name}", total=len(p.tokens))
            table = tune_shape(m.num_experts, m.top_k, m.hidden_size, m.intermediate_size, m.torch_dtype,
                               list(p.tokens), m.activation, p.rep_ms, cfg.seed, log=lines.append,
                               on_token=lambda T: progress.advance(task))
        for line in lines:
            ctx.console.print(line)
        name = config_file_name(m.num_experts, m.intermediate_size, m.hidden_size, device_name(),
                                dtype_name(m.torch_dtype))
        text = json.dumps(table, indent=2) + "\n"
        run_dir = Path(ctx.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        written = [run_dir / name]
        if p.output_dir:
            out = Path(p.output_dir).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            written.append(out / name)
        for f in written:
            f.write_text(text)
        ctx.console.print("wrote " + ", ".join(str(f) for f in written))
        return {"config_file": name, "written": [str(f) for f in written], "table": table}


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
