"""task=check: the built graph vs the float64 oracle on fresh random inputs; non-zero exit on failure."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from ..checking import TOLERANCE, exceeds
from ..registry import LAYERS
from . import Task, TaskContext, TaskFailed, TaskParams, register_task
from .run import RunParams, run_and_report


class CheckParams(RunParams):
    tolerance: float | None = Field(None, gt=0, description="max relative Frobenius error; default per dtype")
    choice_margin: float = Field(1e-2, ge=0, description="max float64 score gap of a chosen expert below the k-th best")
    iters: int = Field(1, ge=1)
    warmup: int = Field(0, ge=0)
    unquantized_oracle: bool = Field(True, description="quantized methods: also compare with the unquantized "
                                     "float64 oracle (rebuilds the model with quant=none from the same seed)")


@register_task("check")
class Check(Task):
    Params = CheckParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        p: CheckParams = cfg.task.params
        own = getattr(LAYERS.get(cfg.layer.name), "layer_task", lambda task: None)("check")
        if own is not None:  # a layer that brings its own model checks it (the Transformers backend)
            return own(cfg, ctx, p)
        tol = p.tolerance if p.tolerance is not None else TOLERANCE[cfg.model.dtype]
        from ..quant.checking import failures as quant_failures, tolerances as quant_tolerances

        layer_tol, out_tol, quant_bound = quant_tolerances(cfg, p.tolerance, tol)  # quantized: docs/quantization.md
        m = run_and_report(cfg, ctx, p, f"composer check: {cfg.model.name}", tolerance=out_tol)
        failures = []
        for name, s in m["layers"].items():
            if exceeds(s["experts_rel_err"], layer_tol):
                failures.append(f"{name}: experts rel. error {s['experts_rel_err']:.3e} > {layer_tol:.3g}")
            if exceeds(s.get("ep_vs_single_rel_err"), tol):  # expert parallelism: vs the single-rank layer, same inputs
                failures.append(f"{name}: expert-parallel output differs from the single-rank output by "
                                f"{s['ep_vs_single_rel_err']:.3e} > {tol:.3g}")
            if exceeds(s.get("tp_vs_single_rel_err"), tol):  # tensor parallelism: vs the single-rank layer, same inputs
                failures.append(f"{name}: tensor-parallel output differs from the single-rank output by "
                                f"{s['tp_vs_single_rel_err']:.3e} > {tol:.3g}")
            if exceeds(s.get("router_choice_gap"), p.choice_margin):
                failures.append(f"{name}: router chose an expert {s['router_choice_gap']:.3e} below the k-th best score")
            if exceeds(s.get("router_weight_err"), max(tol, 1e-6) * 10):
                failures.append(f"{name}: router weights differ from float64 by {s['router_weight_err']:.3e}")
        if exceeds(m["output_rel_err"], out_tol):
            failures.append(f"output rel. error {m['output_rel_err']:.3e} > tolerance {out_tol:.3g}")
        failures += quant_failures(m, quant_bound, ctx.console, cfg.quant.name)
        if "mode" in m:  # compile / cuda_graph: that run vs the oracle replaying its own routing
            if exceeds(m["mode_output_rel_err"], out_tol):
                failures.append(f"{m['mode']}: output rel. error {m['mode_output_rel_err']:.3e} > tolerance {out_tol:.3g}")
            for name, s in m["mode_layers"].items():
                if exceeds(s["experts_rel_err"], layer_tol):
                    failures.append(f"{m['mode']}: {name}: experts rel. error {s['experts_rel_err']:.3e} > {layer_tol:.3g}")
                if exceeds(s.get("router_choice_gap"), p.choice_margin):
                    failures.append(f"{m['mode']}: {name}: router chose an expert {s['router_choice_gap']:.3e} "
                                    "below the k-th best score")
        m["tolerance"], m["layer_tolerance"] = out_tol, layer_tol  # what the output and each layer were held to
        m["passed"] = not failures
        if failures:
            raise TaskFailed("check failed:\n  " + "\n  ".join(failures), m)
        ctx.console.print(f"[green]check passed[/green] (output tolerance {out_tol:.3g}, per layer {layer_tol:.3g}"
                          + (f", vs the unquantized oracle {quant_bound:.3g})" if "unquantized_bound" in m else
                             ", vs the unquantized oracle not judged)" if m.get("unquantized_not_judged") else ")"))
        return m

