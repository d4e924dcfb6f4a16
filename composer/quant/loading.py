"""Pre-quantized checkpoints: load and save the quantized tensors under the names vLLM and
compressed-tensors use, each checked for shape and dtype.

Under a FusedMoE at path ``P`` a checkpoint holds, per method (see ``checkpoint_layout`` of each method
and docs/quantization.md): ``P.w13_weight``, ``P.w2_weight`` (fp8 / int8), their ``*_weight_scale``
(``*_weight_scale_inv`` for fp8 block), ``P.w13_input_scale``/``P.w2_input_scale`` (fp8 static), or for
int4 ``P.w13_qweight``, ``P.w13_scales``, ``P.w13_qzeros``. The first such tensor switches the layer from
online quantization to pre-quantized loading; ``finish`` then requires the whole layout.
``composer.loading`` calls ``handles``/``load``/``finish`` and, when saving, ``checkpoint_name``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import WeightLoadError
from .utils import QuantizedMethod, set_param

# Names of the quantized layouts, for a clear error when the checkpoint and quant.* disagree.
KNOWN = {
    "w13_weight_scale_inv": "fp8 block scales: set quant=fp8_w8a8 quant.granularity=block (and its block_shape)",
    "w2_weight_scale_inv": "fp8 block scales: set quant=fp8_w8a8 quant.granularity=block (and its block_shape)",
    "w13_input_scale": "static activation scales: set quant=fp8_w8a8 quant.granularity=per_tensor "
                       "quant.activation_scheme=static",
    "w2_input_scale": "static activation scales: set quant=fp8_w8a8 quant.granularity=per_tensor "
                      "quant.activation_scheme=static",
    "w13_weight_scale": "per-tensor or per-channel weight scales: set quant=fp8_w8a8 (granularity per_tensor or "
                        "per_token_channel), quant=int8_w8a16 or quant=int8_w8a8",
    "w2_weight_scale": "per-tensor or per-channel weight scales: set quant=fp8_w8a8 (granularity per_tensor or "
                       "per_token_channel), quant=int8_w8a16 or quant=int8_w8a8",
    "w13_weight": "quantized weights: set the quant method the checkpoint was made with",
    "w2_weight": "quantized weights: set the quant method the checkpoint was made with",
    "w13_qweight": "int4 weights: set quant=int4_w4a16", "w2_qweight": "int4 weights: set quant=int4_w4a16",
    "w13_scales": "int4 scales: set quant=int4_w4a16", "w2_scales": "int4 scales: set quant=int4_w4a16",
    "w13_qzeros": "int4 zero points: set quant=int4_w4a16 quant.zero_point=true",
    "w2_qzeros": "int4 zero points: set quant=int4_w4a16 quant.zero_point=true",
}


def _method(layer) -> QuantizedMethod | None:
    qm = getattr(layer, "quant_method", None)
    return qm if isinstance(qm, QuantizedMethod) else None


# What a quantized weight's dtype says about the method that made it (safetensors dtype names and torch dtypes)
METHOD_OF_DTYPE = {"F8_E4M3": "quant=fp8_w8a8", "I8": "quant=int8_w8a16 or quant=int8_w8a8", "U8": "quant=int4_w4a16",
                   torch.float8_e4m3fn: "quant=fp8_w8a8", torch.int8: "quant=int8_w8a16 or quant=int8_w8a8",
                   torch.uint8: "quant=int4_w4a16"}


def _made_with(dtype: Any) -> str:
    """' (its dtype says quant=...)' for a quantized weight dtype, else ''."""
    m = METHOD_OF_DTYPE.get(dtype)
    return f" (its dtype {dtype} says the checkpoint was made with {m})" if m else ""


def handles(layer, rest: str, key: str, f: Any = None) -> bool:
    """True when ``rest`` (the key under the layer path) is a quantized tensor this layer's method loads.
    Raises a WeightLoadError naming the quant setting to use when it is a quantized name of another layout
    (for ``w13_weight`` / ``w2_weight``, read from the tensor's dtype in the open file ``f``)."""
    qm = _method(layer)
    if qm is not None and rest in qm.checkpoint_layout(layer):
        return True
    if rest in KNOWN:
        hint = KNOWN[rest]
        if rest in ("w13_weight", "w2_weight") and f is not None:
            hint += _made_with(f.get_slice(key).get_dtype())
        raise WeightLoadError(f"{key}: this checkpoint is quantized but the layer uses quant="
                              f"{getattr(layer.quant_method, 'name', '?')}"
                              f"{_params(layer)}; {hint}")
    return False


def _params(layer) -> str:
    """The quant.* settings that decide the checkpoint layout, as a user writes them (unset and unused ones left out:
    a per-tensor fp8 layer does not show a block_shape)."""
    p = getattr(layer.quant_method, "params", None)
    items = p.model_dump() if p is not None else {}
    if items.get("granularity") not in (None, "block"):
        items.pop("block_shape", None)
    return "".join(f" quant.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in items.items() if v is not None)


def _mixed(owner: str, key: str, filled: dict[str, set] | None) -> None:
    """Refuse float and quantized copies of the same experts (either order): one would silently win."""
    floats = [a for a in ("w13", "w2") if filled and filled.get(f"{owner}.{a}")]
    if floats:
        raise WeightLoadError(f"{key}: the checkpoint also holds float {' and '.join(floats)} weights of {owner} "
                              "(packed or per expert); it holds both float and quantized copies: keep one")


def _twice(owner: str, rest: str, key: str, seen: set[str]) -> None:
    if rest in seen:  # (as composer.loading refuses float copies: the later one would win, silently)
        raise WeightLoadError(f"{key}: the checkpoint holds {owner}.{rest} twice (in two files, or under two names); "
                              "keep one copy")


def _check_header(layer, qm: QuantizedMethod, spec: Any, rest: str, sl: Any, name: str) -> tuple[int, ...]:
    """A pre-quantized tensor's header (shape, dtype) against the method's layout; returns the shape. Under tensor
    parallelism the checkpoint holds the full tensor (distributed.tp.check_quantized_shape)."""
    from .. import loading as base

    shape = tuple(sl.get_shape())
    method = f"{qm.name}{_params(layer)}"
    if getattr(layer, "tp_size", 1) > 1:
        from ..distributed.tp import check_quantized_shape

        check_quantized_shape(layer, spec, shape, name, method)
    elif shape not in spec.shapes:
        want = " or ".join(str(s) for s in spec.shapes)
        raise WeightLoadError(f"{name}: checkpoint tensor has shape {shape}, {method} expects "
                              f"{want} (all {layer.global_num_experts} experts); check model.* sizes and quant.*")
    dtype = base.ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
    if dtype not in spec.dtypes:
        raise WeightLoadError(f"{name}: checkpoint tensor has dtype {dtype}, {method} expects "
                              f"{' or '.join(str(d) for d in spec.dtypes)}"
                              + (_made_with(dtype) if rest.endswith(("_weight", "_qweight")) else ""))
    return shape


def _read(layer, qm: QuantizedMethod, spec: Any, rest: str, key: str, f: Any, name: str) -> torch.Tensor:
    """This rank's part of pre-quantized tensor ``key``, its header checked first (``_check_header``): under expert
    parallelism only the local experts, under tensor parallelism only this rank's slice."""
    sl = f.get_slice(key)
    shape = _check_header(layer, qm, spec, rest, sl, name)
    if getattr(layer, "tp_size", 1) > 1:
        from ..distributed.tp import read_quantized

        return read_quantized(layer, spec, sl, shape, name, f"{qm.name}{_params(layer)}")
    if spec.slice_experts and layer.ep_size > 1:
        return torch.cat([sl[g:g + 1] for g in layer.local_to_global])
    return f.get_tensor(key)


def _check_scales(t: torch.Tensor, rest: str, name: str) -> None:
    """Scales must be finite, and positive (activation scales) or non-negative (weight scales)."""
    if t.dtype.is_floating_point and t.dtype not in (torch.float8_e4m3fn,) and "scale" in rest:
        bad = ~torch.isfinite(t) | (t <= 0 if "input" in rest else t < 0)
        if bool(bad.any()):
            raise WeightLoadError(f"{name}: {int(bad.sum())} of its {t.numel()} scales are "
                                  f"{'not finite or not positive' if 'input' in rest else 'not finite or negative'} "
                                  "(first at index "
                                  f"{tuple(int(i) for i in torch.nonzero(bad)[0])}); the checkpoint is damaged or was "
                                  "written with another scale convention")


def precheck(layer, owner: str, rest: str, key: str, f: Any, seen: set[str], filled: dict[str, set]) -> None:
    """``load``'s checks made before anything is copied (composer.loading's header pre-check): the header's shape
    and dtype, a second copy, float weights of the same experts met before; and the scales' values, which are read
    for it (a few percent of the weights' bytes), so a damaged scale refuses the checkpoint with the model
    untouched. ``seen``: the layer's quantized names so far; ``finish_precheck`` then wants the whole layout."""
    _mixed(owner, key, filled)
    _twice(owner, rest, key, seen)
    qm = _method(layer)
    spec = qm.checkpoint_layout(layer)[rest]
    name = f"{owner}.{rest}"
    if "scale" in rest:
        _check_scales(_read(layer, qm, spec, rest, key, f, name), rest, name)
    else:  # (weights: the header alone)
        _check_header(layer, qm, spec, rest, f.get_slice(key), name)
    seen.add(rest)


@torch.no_grad()
def load(layer, owner: str, rest: str, key: str, f: Any, report: Any) -> None:
    """Load checkpoint tensor ``key`` (``owner.rest``) from the open safetensors file ``f`` into ``layer``, after
    ``precheck`` passed for every tensor of the checkpoint (composer.loading runs it first)."""
    qm = _method(layer)
    spec = qm.checkpoint_layout(layer)[rest]
    if layer.quant_state == "unprocessed":
        layer.quant_state = "prequantized"
        layer.quant_loaded = set()
    t = _read(layer, qm, spec, rest, key, f, f"{owner}.{rest}")
    report.bytes_read += t.numel() * t.element_size()
    report.loaded.append(key)
    device = layer.expert_map.device
    set_param(layer, spec.attr, t.to(device=device, dtype=spec.dtypes[0]))
    layer.quant_loaded.add(rest)


def _missing(owner: str, layer, loaded: set[str], unexpected: list[str] | None) -> None:
    """Refuse a pre-quantized layer whose checkpoint lacks part of the method's layout."""
    qm = _method(layer)
    missing = [n for n, s in qm.checkpoint_layout(layer).items() if s.required and n not in loaded]
    if missing:
        raise WeightLoadError(
            f"{owner}: the checkpoint is pre-quantized ({', '.join(sorted(loaded))}) but lacks "
            f"{', '.join(f'{owner}.{n}' for n in missing)}, which {qm.name}{_params(layer)} needs; "
            "check quant.* against the checkpoint's quantization config"
            + (f" (checkpoint keys that matched nothing: {', '.join(unexpected[:4])}"
               f"{' ...' if len(unexpected) > 4 else ''})" if unexpected else ""))


def finish_precheck(experts: dict[str, Any], seen: dict[str, set[str]], unexpected: list[str]) -> None:
    """After the header pre-check of all files: each layer with pre-quantized tensors has its whole layout."""
    for owner, names in seen.items():
        _missing(owner, experts[owner], names, unexpected)


def finish(experts: dict[str, Any], filled: dict[str, set], unexpected: list[str] | None = None) -> None:
    """After all files: every pre-quantized layer must have its whole layout (else WeightLoadError, which also names
    the checkpoint keys that matched nothing: a misnamed scale shows up there)."""
    for owner, layer in experts.items():
        if _method(layer) is None or getattr(layer, "quant_state", None) != "prequantized":
            continue
        _missing(owner, layer, layer.quant_loaded, unexpected)
        for attr in ("w13", "w2"):
            filled.setdefault(f"{owner}.{attr}", set()).add("all")


def checkpoint_name(layer, pname: str) -> str | None:
    """The checkpoint name of layer parameter ``pname`` for a quantized method (None: not a quantized tensor)."""
    qm = _method(layer)
    if qm is None:
        return None
    if getattr(layer, "quant_state", None) != "ready":
        raise ValueError("save_checkpoint: quantized layers must be processed first (finish_loading)")
    for name, spec in qm.checkpoint_layout(layer).items():
        if spec.attr == pname:
            return name
    return None
