"""task=check for quantized methods: the error against both float64 oracles.

* the dequantized-weights oracle (``composer.checking.oracle_layer``: the quantized weights dequantized,
  activations quantize-dequantized as the w8a8 kernels do) must match to kernel rounding;
* the unquantized oracle (the same model built with ``quant=none`` from the same seed: weights are seeded
  per (seed, layer path, expert), so it holds exactly the weights before quantization) must be within the
  method's documented bound (docs/quantization.md).
"""
from __future__ import annotations

from typing import Any

import torch

from ..checking import TOLERANCE, add_warning, exceeds, oracle_layer, oracle_model, rel_error


def _unquantized_cfg(cfg: Any) -> Any:
    from ..config import Named
    from ..registry import QUANT_METHODS

    return cfg.model_copy(update={"quant": Named(name="none", params=QUANT_METHODS.get("none").Params())})


def wants_unquantized(cfg: Any) -> bool:
    """Whether a check of ``cfg`` also compares with the unquantized float64 oracle (``task.unquantized_oracle``)."""
    return cfg.quant.name != "none" and getattr(cfg.task.params, "unquantized_oracle", False)


@torch.no_grad()
def compare_unquantized(result: dict[str, Any], x: torch.Tensor, caps: dict[str, Any], out: torch.Tensor,
                        cfg: Any, build_kwargs: dict[str, Any] | None = None) -> None:
    """Add ``experts_rel_err_unquantized`` per layer and ``output_rel_err_unquantized`` to ``result``: the
    recorded forward (``caps``, ``out``) against the oracle of ``cfg``'s model built with ``quant=none``. Under
    expert or tensor parallelism ``cfg`` is the single-rank config (``build_kwargs`` as its reference is built)."""
    from ..factory import build

    ref = build(_unquantized_cfg(cfg), **(build_kwargs or {}))
    for name, cap in caps.items():
        result["layers"][name]["experts_rel_err_unquantized"] = rel_error(cap.out, oracle_layer(ref.get_submodule(name), cap))
    if hasattr(ref, "layers") and all(f"layers.{i}.mlp.experts" in caps for i in range(len(ref.layers))):
        ref_out, _ = oracle_model(ref, x, caps)
        result["output_rel_err_unquantized"] = rel_error(out, ref_out)
    del ref


def tolerances(cfg: Any, given: float | None, tol: float) -> tuple[float, float, float | None]:
    """(per-layer experts tolerance and model-output tolerance vs the dequantized oracle, bound vs the
    unquantized oracle or None for quant=none).

    Each layer's experts must match the dequantized oracle to kernel rounding: the dtype's tolerance, except
    in float32 for methods that quantize activations, where fp32-vs-fp64 accumulation differences rarely move
    one activation across a quantization boundary (one quantum: up to 6.8e-4 relative for int8_w8a8 and 2.6e-3 for
    fp8 per_tensor in 1000 input draws of a small layer). The model output of such a
    method gets the method's output tolerance: the non-expert layers (norm, gate, residual) round differently
    from float64, and the quantizer turns some of those last-bit differences into one-quantum steps.
    """
    from ..registry import QUANT_METHODS

    if cfg.quant.name == "none":
        return tol, tol, None
    method = QUANT_METHODS.get(cfg.quant.name)
    if not hasattr(method, "tolerances"):
        return tol, tol, None
    out_tol, bound = method.tolerances(cfg.quant.params, cfg.model.dtype)
    layer_tol = max(tol, method.LAYER_TOL.get(cfg.model.dtype, 0.0))
    if given is not None:
        return given, given, bound
    return layer_tol, max(tol, out_tol), bound


def output_tolerance(cfg: Any, given: float | None = None) -> float:
    """The tolerance ``task=check`` holds the model output to against the (dequantized) float64 oracle: ``given``,
    else the dtype's, raised to the method's output tolerance for quantized methods (``tolerances``)."""
    return tolerances(cfg, given, given if given is not None else TOLERANCE[cfg.model.dtype])[1]


def failures(m: dict[str, Any], bound: float | None, console: Any = None, quant: str = "") -> list[str]:
    """Failures of the unquantized-oracle bound; prints the two errors of a quantized check. A method that documents
    no bound (a plugin's, with no UNQUANT_BOUND) has its errors printed and warned about, not judged."""
    if bound is None:
        _not_judged(m, quant, console)
        return []
    out = []
    for name, s in m["layers"].items():
        e = s.get("experts_rel_err_unquantized")
        if exceeds(e, bound):
            out.append(f"{name}: experts rel. error vs the unquantized oracle {e:.3e} > documented bound {bound:.3g}")
    e = m.get("output_rel_err_unquantized")
    if exceeds(e, bound):
        out.append(f"output rel. error vs the unquantized oracle {e:.3e} > documented bound {bound:.3g}")
    if e is None and not any("experts_rel_err_unquantized" in s for s in m["layers"].values()):
        return out  # (not compared: task.unquantized_oracle=false)
    if console is not None and e is not None:
        console.print(f"quantized: output rel. error vs the dequantized oracle {m.get('output_rel_err', float('nan')):.2e}, "
                      f"vs the unquantized float64 oracle {e:.2e} (bound {bound:.3g})")
    m["unquantized_bound"] = bound
    return out


def _not_judged(m: dict[str, Any], quant: str, console: Any) -> None:
    """Errors vs the unquantized oracle measured for a method with no documented bound: composer cannot judge them,
    so they are printed and warned about (``metrics["warning"]``, ``unquantized_not_judged``): a pass hides nothing."""
    e = m.get("output_rel_err_unquantized")
    worst = max((s["experts_rel_err_unquantized"] for s in m["layers"].values() if "experts_rel_err_unquantized" in s),
                default=None)
    if e is None and worst is None:  # quant=none, or task.unquantized_oracle=false
        return
    mark = f"not judged: quant={quant} documents no bound (UNQUANT_BOUND)"
    said = ", ".join(f"{what} {v:.2e}" for what, v in (("output", e), ("worst layer's experts", worst)) if v is not None)
    if console is not None:
        console.print(f"quantized: output rel. error vs the dequantized oracle "
                      f"{m.get('output_rel_err', float('nan')):.2e}, vs the unquantized float64 oracle {said} ({mark})")
    add_warning(m, f"error vs the unquantized float64 oracle ({said}) {mark}: composer cannot tell whether it is "
                "quantization noise or a bug; document the method's bound (UNQUANT_BOUND with tolerances(), "
                "docs/quantization.md) to have task=check judge it")
    m["unquantized_not_judged"] = True
