"""The Transformers backend: keep a Hugging Face MoE model, run its experts through composer.

``layer=transformers_moe model=hf model.path=DIR`` (or ``model.arch=qwen3_moe``) loads the Hugging Face model
and swaps, in every sparse block,

- ``layer.replace=experts`` (default): the experts module for :class:`TransformersFusedMoE`, a
  PluggableLayer (``transformers_fused_moe``, a FusedMoE) that takes the HF router's output (top-k ids and
  weights) and runs composer's quant method and experts kernel. transformers 5's packed weights
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) are adopted without a copy (the same Parameter);
  transposed/interleaved (GPT-OSS) and per-expert ``nn.ModuleList`` layouts are packed once.
- ``layer.replace=block``: the whole sparse block (router + experts + shared experts) for composer's
  ``SparseMoEBlock`` (GateLinear -> Router -> FusedMoE + SharedExperts), for routers composer reproduces.

Model code is never edited: modules are replaced by attribute on their parent.

The state dict of a swapped model keeps the Hugging Face names and layouts of the modules it replaced
(``gate_up_proj``/``down_proj``, GPT-OSS's transposed interleaved layout, per-expert ``{e}.gate_proj``; the
block's ``shared_expert``/``e_score_correction_bias`` names), so ``swapped.save_pretrained(dir)`` writes a
checkpoint that an unmodified ``AutoModelForCausalLM.from_pretrained(dir)`` reads, and ``load_state_dict``
takes a Hugging Face state dict. Quantized experts have no Hugging Face format: their ``state_dict()`` raises
:class:`HFFormatError` (see "The Hugging Face state dict" below).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from pydantic import ConfigDict
from safetensors import SafetensorError
from torch import nn

from ..errors import ComposerError, ConfigError, Problem, WeightLoadError
from ..layers.fused_moe import FusedMoE
from ..layers.router import Router
from ..params import Params
from ..registry import PluggableLayer
from .hf_config import ARCHS, HFConfigError, hf_config, supported_text

log = logging.getLogger(__name__)


class UnsupportedModelError(ComposerError):
    """A Hugging Face model whose experts composer cannot take over."""


class HFFormatError(ComposerError):
    """A swapped module whose state cannot be written under Hugging Face names (quantized experts, or a block
    whose parameters do not map one to one onto the block it replaced)."""


# ----------------------------------------------------------------------------------------------
# The experts layer


@PluggableLayer.register("transformers_fused_moe")
class TransformersFusedMoE(FusedMoE):
    """A FusedMoE with the call convention of a transformers 5 experts module:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    Built by :func:`swap`, its ``state_dict()`` names and lays out the weights as the replaced ``hf_class`` did
    (``gate_up_proj``, ``down_proj``, ...; quantized layers raise :class:`HFFormatError`), and
    ``load_state_dict`` takes those names as well as composer's (``w13``, ``w2``, ...)."""

    hf_class: str = ""  # the Hugging Face experts class this layer replaced

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(hidden_states, top_k_weights.to(torch.float32), top_k_index.to(torch.int32))
        return out.to(hidden_states.dtype)

    def implementation(self) -> str:
        return super().implementation() + (f" (replaces {self.hf_class})" if self.hf_class else "")


def _experts_layout(module: nn.Module) -> str | None:
    """'packed' (transformers 5: gate_up_proj [E, 2I, H]), 'packed_transposed_interleaved' (GPT-OSS),
    'per_expert' (nn.ModuleList of gate/up/down projections), or None (not an experts module)."""
    gup, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gup, torch.Tensor) and isinstance(down, torch.Tensor) and gup.dim() == 3:
        transposed = bool(getattr(module, "is_transposed", False))
        # older transformers 5 releases lack the flag; GPT-OSS interleaves gate/up there too
        concatenated = bool(getattr(module, "is_concatenated", not type(module).__name__.startswith("GptOss")))
        if transposed and not concatenated:
            return "packed_transposed_interleaved"
        if not transposed and concatenated:
            return "packed"
        return f"unsupported(is_transposed={transposed}, is_concatenated={concatenated})"
    if isinstance(module, nn.ModuleList) and len(module) and all(_per_expert_names(m) for m in module):
        return "per_expert"
    return None


def _per_expert_names(m: nn.Module) -> tuple[str, str, str] | None:
    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
            return names  # type: ignore[return-value]
    return None


def hf_expert_tensors(module: nn.Module) -> dict[str, Callable[[int], torch.Tensor]]:
    """Per-expert tensors of an HF experts module in composer's orientation, by shard:
    ``{"w1": e -> gate [I, H], "w3": up [I, H], "w2": down [H, I], "w1_bias", "w3_bias", "w2_bias"}``."""
    layout = _experts_layout(module)
    if layout == "packed":
        I = module.gate_up_proj.shape[1] // 2
        out = {"w1": lambda e: module.gate_up_proj[e, :I], "w3": lambda e: module.gate_up_proj[e, I:],
               "w2": lambda e: module.down_proj[e]}
        if getattr(module, "gate_up_proj_bias", None) is not None:
            out.update(w1_bias=lambda e: module.gate_up_proj_bias[e, :I], w3_bias=lambda e: module.gate_up_proj_bias[e, I:],
                       w2_bias=lambda e: module.down_proj_bias[e])
        return out
    if layout == "packed_transposed_interleaved":  # [E, H, 2I] with gate/up interleaved; down [E, I, H]
        out = {"w1": lambda e: module.gate_up_proj[e, :, 0::2].t(), "w3": lambda e: module.gate_up_proj[e, :, 1::2].t(),
               "w2": lambda e: module.down_proj[e].t()}
        if getattr(module, "gate_up_proj_bias", None) is not None:
            out.update(w1_bias=lambda e: module.gate_up_proj_bias[e, 0::2], w3_bias=lambda e: module.gate_up_proj_bias[e, 1::2],
                       w2_bias=lambda e: module.down_proj_bias[e])
        return out
    if layout == "per_expert":
        g, u, d = _per_expert_names(module[0])  # type: ignore[misc]
        out = {"w1": lambda e: getattr(module[e], g).weight, "w3": lambda e: getattr(module[e], u).weight,
               "w2": lambda e: getattr(module[e], d).weight}
        if getattr(module[0], g).bias is not None:
            out.update(w1_bias=lambda e: getattr(module[e], g).bias, w3_bias=lambda e: getattr(module[e], u).bias,
                       w2_bias=lambda e: getattr(module[e], d).bias)
        return out
    raise UnsupportedModelError(f"{type(module).__name__}: expert weight layout {layout} is not supported")


def weight_name_map(prefix: str, module: nn.Module) -> dict[str, str]:
    """Hugging Face parameter name -> composer parameter name (e.g. ``...experts.gate_up_proj`` ->
    ``...experts.w13``) for one experts module at ``prefix``; per-expert tensors map to a slice of w13/w2."""
    layout = _experts_layout(module)
    p = f"{prefix}." if prefix else ""
    if layout in ("packed", "packed_transposed_interleaved"):
        m = {f"{p}gate_up_proj": f"{p}w13", f"{p}down_proj": f"{p}w2"}
        if getattr(module, "gate_up_proj_bias", None) is not None:
            m.update({f"{p}gate_up_proj_bias": f"{p}w13_bias", f"{p}down_proj_bias": f"{p}w2_bias"})
        return m
    if layout == "per_expert":
        g, u, d = _per_expert_names(module[0])  # type: ignore[misc]
        out = {}
        for e in range(len(module)):
            for kind, w13, w2 in (("weight", "w13", "w2"), ("bias", "w13_bias", "w2_bias")):
                if kind == "bias" and getattr(module[e], g).bias is None:
                    continue
                out.update({f"{p}{e}.{g}.{kind}": f"{p}{w13}[{e}, :I]", f"{p}{e}.{u}.{kind}": f"{p}{w13}[{e}, I:]",
                            f"{p}{e}.{d}.{kind}": f"{p}{w2}[{e}]"})
        return out
    return {}


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every experts module in ``model`` (outermost only)."""
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, FusedMoE) or any(name.startswith(f + ".") for f, _ in found):
            continue
        if name.rsplit(".", 1)[-1] == "experts" and _experts_layout(mod) is not None:
            found.append((name, mod))
    return found


def _activation_for(module: nn.Module, arch: str) -> str:
    if arch == "gpt_oss":
        from ..layers.activation import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT

        alpha, limit = float(getattr(module, "alpha", 1.702)), float(getattr(module, "limit", 7.0))
        if (alpha, limit) != (SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT):
            raise UnsupportedModelError(
                f"{type(module).__name__}: swiglu alpha={alpha}, limit={limit}; composer's swigluoai uses "
                f"alpha={SWIGLUOAI_ALPHA}, limit={SWIGLUOAI_LIMIT}. Keep the published constants "
                "(model.hf_overrides.swiglu_alpha / swiglu_limit)")
        return "swigluoai"
    act = getattr(module, "act_fn", None)
    name = type(act).__name__ if act is not None else "SiLU"
    table = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "GELU": "gelu"}
    if name not in table:
        raise UnsupportedModelError(f"{type(module).__name__}: activation {name} has no composer equivalent "
                                    "(silu, gelu, swigluoai)")
    return table[name]


# ----------------------------------------------------------------------------------------------
# Building one composer experts layer from an HF experts module


def _new_experts_layer(cfg: Any, hf_experts: nn.Module, arch: str, device: Any,
                       layer_name: str = "transformers_fused_moe") -> FusedMoE:
    """``transformers_fused_moe`` takes HF's call convention (experts swap); ``fused_moe`` composer's (block swap)."""
    from ..factory import build_experts
    from ..config import Named

    tensors = hf_expert_tensors(hf_experts)
    E = _num_experts(hf_experts)
    I, H = tensors["w1"](0).shape
    m = cfg.model
    if (E, H, I) != (m.num_experts, m.hidden_size, m.intermediate_size):
        raise UnsupportedModelError(
            f"{type(hf_experts).__name__}: experts (E={E}, H={H}, I={I}) differ from the model config "
            f"(E={m.num_experts}, H={m.hidden_size}, I={m.intermediate_size})")
    activation = _activation_for(hf_experts, arch)
    has_bias = "w1_bias" in tensors
    sub = cfg.model_copy(update={
        "layer": Named(name=layer_name),
        "model": m.model_copy(update={"activation": activation, "has_bias": has_bias}),
    })
    layer = build_experts(sub)  # the factory: quant method, experts kernel, all2all, out-of-tree swaps
    if layer_name == "transformers_fused_moe" and not isinstance(layer, TransformersFusedMoE):
        raise UnsupportedModelError("the layer registered as 'transformers_fused_moe' is not a TransformersFusedMoE")
    layer.hf_class = type(hf_experts).__name__
    _load_experts(layer, hf_experts, tensors)
    _keep_hf_names(layer, hf_experts)
    return layer


def _num_experts(module: nn.Module) -> int:
    return len(module) if isinstance(module, nn.ModuleList) else int(module.gate_up_proj.shape[0])


@torch.no_grad()
def _load_experts(layer: FusedMoE, hf: nn.Module, tensors: dict[str, Callable[[int], torch.Tensor]]) -> None:
    """Adopt packed weights without a copy where the quant method stores them as they are; otherwise pack
    once through the layer's weight loaders (vLLM's contract), then let the quant method process them."""
    adoptable = (_experts_layout(hf) == "packed" and layer.quant_method.name == "none"
                 and layer.local_num_experts == layer.global_num_experts
                 and hf.gate_up_proj.dtype == layer.w13.dtype and hf.gate_up_proj.device == layer.w13.device)
    if adoptable:
        for ours, theirs in (("w13", "gate_up_proj"), ("w2", "down_proj"), ("w13_bias", "gate_up_proj_bias"),
                             ("w2_bias", "down_proj_bias")):
            p = getattr(hf, theirs, None)
            if p is None or getattr(layer, ours, None) is None:
                continue
            if tuple(p.shape) != tuple(getattr(layer, ours).shape):
                raise WeightLoadError(f"{type(hf).__name__}.{theirs}: shape {tuple(p.shape)}, composer's {ours} "
                                      f"expects {tuple(getattr(layer, ours).shape)}")
            p.requires_grad_(False)
            p.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
            setattr(layer, ours, p)  # the same Parameter: no copy
    else:
        for e in range(layer.global_num_experts):
            for shard, pname in (("w1", "w13"), ("w3", "w13"), ("w2", "w2")):
                param = getattr(layer, pname)
                param.weight_loader(param, tensors[shard](e), shard, e)
                if f"{shard}_bias" in tensors:
                    bparam = getattr(layer, f"{pname}_bias")
                    bparam.weight_loader(bparam, tensors[f"{shard}_bias"](e), shard, e)
    layer.quant_method.process_weights_after_loading(layer)


# ----------------------------------------------------------------------------------------------
# The Hugging Face state dict: hooks that rename (and re-lay out) a swapped module's entries (_keep_hf_names)

_OURS = ("w13", "w2", "w13_bias", "w2_bias")


@dataclass
class _HFFormat:
    shell: nn.Module | None = None   # experts: the replaced HF module on the meta device
    names: dict[str, tuple[str, torch.dtype]] = field(default_factory=dict)  # block: ours -> (HF name, dtype)
    problem: str = ""                # why there is no HF state dict ("": there is one)


def _rebind(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are ``tensors`` (by state-dict name; no data copied)."""
    own = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    return copy.deepcopy(module, {id(t): tensors[n] for n, t in own.items() if n in tensors})


def _composer_shards(t: dict[str, torch.Tensor]) -> dict[str, Callable[[int], torch.Tensor]]:
    """Per-expert views of composer's tensors (``w13`` = gate rows | up rows, ``w2``), keyed as hf_expert_tensors."""
    I = t["w13"].shape[1] // 2
    out = {"w1": lambda e: t["w13"][e, :I], "w3": lambda e: t["w13"][e, I:], "w2": lambda e: t["w2"][e]}
    if "w13_bias" in t:
        out.update(w1_bias=lambda e: t["w13_bias"][e, :I], w3_bias=lambda e: t["w13_bias"][e, I:],
                   w2_bias=lambda e: t["w2_bias"][e])
    return out


@torch.no_grad()
def _copy_shards(src: dict[str, Callable[[int], torch.Tensor]], dst: dict[str, Callable[[int], torch.Tensor]],
                 num_experts: int) -> None:
    for shard, view in dst.items():
        for e in range(num_experts):
            view(e).copy_(src[shard](e))


def _experts_to_hf(shell: nn.Module, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Composer's ``w13``/``w2``(/biases) -> the HF experts module's state dict (local names)."""
    if _experts_layout(shell) == "packed":  # composer's own layout: the same tensors under the HF names, no copy
        dtypes = {n: t.dtype for n, t in shell.state_dict().items()}
        return {hf: ours[c].to(dtypes[hf]) for hf, c in weight_name_map("", shell).items()}
    device = ours["w13"].device
    theirs = {n: torch.empty(t.shape, dtype=t.dtype, device=device) for n, t in shell.state_dict().items()}
    _copy_shards(_composer_shards(ours), hf_expert_tensors(_rebind(shell, theirs)), _num_experts(shell))
    return theirs


def _experts_from_hf(shell: nn.Module, theirs: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """The inverse of _experts_to_hf; ``like``: the layer's own tensors (shapes and dtypes)."""
    if _experts_layout(shell) == "packed":
        return {c: theirs[hf] for hf, c in weight_name_map("", shell).items()}
    ours = {n: torch.empty_like(t.detach()) for n, t in like.items()}
    _copy_shards(hf_expert_tensors(_rebind(shell, theirs)), _composer_shards(ours), _num_experts(shell))
    return ours


def _keep_hf_names(layer: FusedMoE, hf: nn.Module) -> None:
    """Register the hooks that give ``layer`` the state dict of the HF experts module ``hf`` it replaces.

    A state-dict post-hook renames composer's entries (``w13``, ``w2``, biases) to ``hf``'s -- the same tensors
    for transformers 5's packed layout, re-laid-out copies for GPT-OSS's and per-expert ones -- and a load
    pre-hook takes those names back (composer's still load). Hooks, rather than an overridden
    ``save_pretrained``: they hold for every path that writes or reads a state dict (save_pretrained,
    safetensors' save_model, torch.save, load_state_dict) and serve the plain FusedMoE of a block swap as well.
    The layout knowledge stays in hf_expert_tensors / weight_name_map, run on a storage-less copy of ``hf`` (a
    meta-device "shell") rebound to the tensors being converted. Where no faithful HF state exists (quantized
    tensors, a partial rank, state composer does not keep) ``state_dict()`` raises HFFormatError instead of
    writing a checkpoint transformers would silently misread.
    """
    shell = _rebind(hf, {n: t.to("meta") for n, t in hf.state_dict(keep_vars=True).items()})
    problem = ""
    if layer.quant_method.name != "none":
        name = layer.quant_method.name
        problem = (f"composer's {name} experts hold quantized tensors, which transformers cannot read: a "
                   "save_pretrained checkpoint would load wrong or random experts. Save the unquantized model "
                   "instead (the reference model, or one swapped with quant=none) and quantize it when loading "
                   f"(layer=transformers_moe model.path=DIR quant={name}); composer.loading.save_checkpoint(model, "
                   "path) writes the quantized tensors under vLLM's names, for vLLM and for composer's own stack where "
                   "every layer is MoE (model=hf layer=fused_moe, built with init=False, load_checkpoint(..., "
                   "prefix=\"model.\")), not for transformers or a layer=transformers_moe model, which loads "
                   "model.path only")
    elif layer.local_num_experts != layer.global_num_experts or layer.tp_size > 1:
        problem = "this rank holds part of the experts; save the whole model (one rank, parallel sizes 1)"
    else:
        own, hf_names = set(layer.state_dict()), set(shell.state_dict())
        if own - set(_OURS) or hf_names != set(weight_name_map("", shell)):
            problem = (f"{type(hf).__name__}'s state ({', '.join(sorted(hf_names))}) does not map one to one onto "
                       f"composer's ({', '.join(sorted(own))}); save the reference model instead")
    layer.hf_format = _HFFormat(shell=shell, problem=problem)
    layer.register_state_dict_post_hook(_experts_state_dict_hook)
    layer.register_load_state_dict_pre_hook(_experts_load_hook)


def _no_hf_state(where: str, problem: str) -> HFFormatError:
    """The one refusal of a swapped module's Hugging Face state dict (state-dict hooks, save_pretrained)."""
    return HFFormatError(f"{where} has no Hugging Face state dict: {problem}")


def _experts_state_dict_hook(layer: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    fmt: _HFFormat = layer.hf_format
    if fmt.problem:
        raise _no_hf_state(prefix.rstrip('.') or type(layer).__name__, fmt.problem)
    ours = {n: state_dict.pop(prefix + n) for n in _OURS if prefix + n in state_dict}
    state_dict.update({prefix + n: t for n, t in _experts_to_hf(fmt.shell, ours).items()})


def _experts_load_hook(layer: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                       missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """HF-named entries -> composer's (composer-named ones load as they are)."""
    fmt: _HFFormat = layer.hf_format
    want = fmt.shell.state_dict()
    theirs = {n: state_dict[prefix + n] for n in want if prefix + n in state_dict}
    if not theirs:
        return
    if fmt.problem:
        error_msgs.append(f"{prefix.rstrip('.')}: Hugging Face experts tensors cannot load here: {fmt.problem}")
        return
    bad = [n for n, t in theirs.items() if tuple(t.shape) != tuple(want[n].shape)]
    for n in bad:
        error_msgs.append(f"size mismatch for {prefix}{n}: copying a param with shape {tuple(theirs[n].shape)} from "
                          f"checkpoint, the shape in current model is {tuple(want[n].shape)}.")
    if bad or len(theirs) < len(want):  # a partial state dict: left as it is (missing / unexpected keys)
        return
    like = {n: getattr(layer, n) for n in _OURS if getattr(layer, n, None) is not None}
    for n in theirs:
        del state_dict[prefix + n]
    state_dict.update({prefix + n: t for n, t in _experts_from_hf(fmt.shell, theirs, like).items()})


def _keep_hf_block_names(new: nn.Module, hf_block: nn.Module) -> None:
    """Register the hooks that give composer's SparseMoEBlock ``new`` the state dict of the HF block it replaces.
    Its gate and shared experts are the HF modules' own tensors (matched by identity); the router's score
    correction bias is a float32 copy (matched by name); the experts carry their own hooks."""
    hf_sd = hf_block.state_dict(keep_vars=True)
    by_id = {id(t): n for n, t in hf_sd.items()}
    bias = [n for n in hf_sd if n.endswith("e_score_correction_bias")]
    names, unmatched = {}, []
    for child, mod in new.named_children():
        if child == "experts":
            continue
        for n, t in mod.state_dict(prefix=f"{child}.", keep_vars=True).items():
            hf = by_id.get(id(t)) or (bias[0] if n.endswith("e_score_correction_bias") and len(bias) == 1 else None)
            if hf is None:
                unmatched.append(n)
            else:
                names[n] = (hf, hf_sd[hf].dtype)
    experts = new.experts.hf_format
    covered = {hf for hf, _ in names.values()} | {f"experts.{n}" for n in experts.shell.state_dict()}
    problem = ""
    if unmatched or covered != set(hf_sd):
        parts = ([f"composer's {', '.join(unmatched)} have no {type(hf_block).__name__} counterpart"] if unmatched else [])
        if set(hf_sd) - covered:
            parts.append(f"{type(hf_block).__name__}'s {', '.join(sorted(set(hf_sd) - covered))} are not kept")
        problem = ("; ".join(parts) + ". Use layer.replace=experts (its state dict keeps the HF names), or save the "
                   "reference model")
    new.hf_format = _HFFormat(names=names, problem=problem)
    new.register_state_dict_post_hook(_block_state_dict_hook)
    new.register_load_state_dict_pre_hook(_block_load_hook)


def _block_state_dict_hook(block: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    fmt: _HFFormat = block.hf_format
    if fmt.problem:
        raise _no_hf_state(f"{prefix.rstrip('.') or type(block).__name__} (layer.replace=block)", fmt.problem)
    moved = {hf: state_dict.pop(prefix + ours).to(dtype) for ours, (hf, dtype) in fmt.names.items()}
    state_dict.update({prefix + hf: t for hf, t in moved.items()})


def _block_load_hook(block: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                     missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    fmt: _HFFormat = block.hf_format
    moved = {ours: state_dict.pop(prefix + hf) for ours, (hf, _) in fmt.names.items()
             if prefix + hf in state_dict and prefix + ours not in state_dict}
    state_dict.update({prefix + ours: t for ours, t in moved.items()})


# ----------------------------------------------------------------------------------------------
# Whole-block replacement


class _HFGate(nn.Module):
    """Router logits like the Hugging Face gate computes them, returned in float32: ``linear`` in ``dtype``, the
    weight's own or float32 where the model's router computes in float32 (DeepSeek-V3, whose weight transformers
    keeps in float32 since 5.2x and in the model's dtype before). The logits pass, as computed (before the float32
    cast), through ``tap``, which transformers records as its router's: ``output_router_logits`` and the
    load-balancing loss."""

    def __init__(self, weight: nn.Parameter, tap: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = weight
        self.tap = tap
        self.compute_dtype = dtype or weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))
        return self.tap(logits).float()


class _RouterLogitsTap(nn.Module):
    """The identity on router logits, made an instance of the replaced router's class (:func:`_logits_tap`):
    transformers records ``router_logits`` with forward hooks on the modules of its router class
    (``_can_record_outputs``), and the swapped block has none of those left."""

    def __init__(self) -> None:
        nn.Module.__init__(self)  # (not the router's __init__: the tap holds no weights)
        # Nothing to initialise: transformers' init_weights() (which skips modules so marked) would otherwise run the
        # router class's _init_weights on it, which sets a `weight` the tap has not.
        self._is_hf_initialized = True

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickled through the router class it stands for (its own class is made at run time, so pickle could not
        find it by name): torch.save of a block-swapped model, multiprocessing."""
        return _tap_of, (type(self).router_class,), self.__dict__.copy()


_TAPS: dict[type, type] = {}  # HF router class -> its tap class


def _tap_of(base: type) -> nn.Module:
    """A new, hook-free tap that is an instance of the router class ``base``."""
    if base not in _TAPS:
        _TAPS[base] = type(f"{base.__name__}LogitsTap", (_RouterLogitsTap, base), {"router_class": base})
    return _TAPS[base]()


def _logits_tap(hf_gate: nn.Module) -> nn.Module:
    """A :class:`_RouterLogitsTap` that is an instance of ``type(hf_gate)``. Where transformers has hooked the
    model already (it hooks once, at the first forward that records outputs), its recording hooks on ``hf_gate``
    move to the tap."""
    tap = _tap_of(type(hf_gate))
    for hook in hf_gate._forward_hooks.values():
        if getattr(hook, "__name__", "") == "output_capturing_hook":
            tap.register_forward_hook(hook)
    return tap


class _RoundingRouter(Router):
    """composer's Router returning its weights rounded to the gate's dtype (and back to float32), as the Hugging Face
    routers of qwen2_moe, qwen3_moe and olmoe return theirs (``router_top_value.to(router_logits.dtype)``): in
    bfloat16 a block swap's experts then get the model's routing weights to the bit."""

    def __init__(self, *args: Any, round_to: torch.dtype, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.round_to = round_to

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = super().forward(logits)
        return weights.to(self.round_to).to(weights.dtype), ids

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weights rounded to {str(self.round_to).removeprefix('torch.')}"


def _gate_of(block: nn.Module) -> nn.Module:
    for name in ("gate", "router"):
        g = getattr(block, name, None)
        if g is not None and isinstance(getattr(g, "weight", None), torch.Tensor):
            return g
    raise UnsupportedModelError(f"{type(block).__name__}: no router found (looked for .gate / .router)")


def _new_block(cfg: Any, block: nn.Module, arch: str) -> nn.Module:
    from ..layers.block import SparseMoEBlock
    from ..layers.shared_experts import SharedExperts

    m, r = cfg.model, cfg.model.router
    gate = _gate_of(block)
    if getattr(gate, "bias", None) is not None:
        raise UnsupportedModelError(f"{type(gate).__name__} adds a bias to the router logits, which composer's router "
                                    "does not; use layer.replace=experts")
    experts = _new_experts_layer(cfg, block.experts, arch, cfg.device, layer_name="fused_moe")
    rounding = {"round_to": gate.weight.dtype} if ARCHS[arch].round_router_weights else {}
    router = (_RoundingRouter if rounding else Router)(
        m.num_experts, m.top_k, r.scoring, r.renormalize, r.num_expert_group, r.topk_group, r.score_correction_bias,
        r.routed_scaling_factor, cfg.device, **rounding)
    if r.score_correction_bias:
        with torch.no_grad():
            router.e_score_correction_bias.copy_(gate.e_score_correction_bias.float())
    shared = None
    hf_shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if hf_shared is not None:
        size = hf_shared.gate_proj.weight.shape[0]
        with torch.device("meta"):
            shared = SharedExperts(m.hidden_size, size, experts.activation, m.shared_expert_gate,
                                   hf_shared.gate_proj.weight.dtype)
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(shared, n, getattr(hf_shared, n))  # the same Linear modules: no copy
        if m.shared_expert_gate:
            shared.gate = block.shared_expert_gate
    gate_dtype = torch.float32 if ARCHS[arch].gate_float32 else None
    new = SparseMoEBlock(_HFGate(gate.weight, _logits_tap(gate), gate_dtype), router, experts, shared)
    _keep_hf_block_names(new, block)
    return new


# ----------------------------------------------------------------------------------------------
# The `transformers_moe` layer: build_model, config checks, task hooks


class TransformersMoEParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # (inf / nan: never a setting)
    replace: Literal["experts", "block"] = "experts"


def swap(model: nn.Module, cfg: Any, replace: str = "experts") -> list[str]:
    """Replace the experts (or sparse blocks) of the Hugging Face ``model`` in place; returns the swapped paths."""
    arch = getattr(getattr(model, "config", None), "model_type", None)
    found = find_experts(model)
    if arch not in ARCHS:
        what = ", ".join(sorted({type(m).__name__ for _, m in found})) or "no experts module (no '.experts' with expert weights)"
        raise UnsupportedModelError(
            f"model type '{arch}' ({type(model).__name__}; experts class found: {what}) is not supported by "
            f"layer=transformers_moe; supported architectures: {supported_text()}")
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__}: found no experts module to replace")
    if replace == "block" and not ARCHS[arch].block_router:
        raise UnsupportedModelError(f"{arch}: composer's router does not reproduce this model's router (it adds a "
                                    "bias to the logits); use layer.replace=experts")
    if replace == "block":
        _check_routing_matches(model.config, cfg)
    theirs = hf_expert_tensors(found[0][1])["w1"](0).dtype
    if theirs != cfg.model.torch_dtype:  # composer's experts compute in model.dtype, on the model's hidden states
        name = str(theirs).removeprefix("torch.")
        raise ConfigError([Problem("model.dtype", cfg.model.dtype, f"the model's expert weights are {name}: set "
                                   f"model.dtype={name} (its hidden states reach the experts in that dtype, and an "
                                   "unquantized swap then adopts the weights without a copy)")])
    swapped = []
    for path, experts in found:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if replace == "block":
            owner_path, _, owner_attr = parent_path.rpartition(".")
            new: nn.Module = _new_block(cfg, parent, arch)
            setattr(model.get_submodule(owner_path), owner_attr, new)
            swapped.append(parent_path)
        else:
            if _experts_layout(experts) == "per_expert":
                raise UnsupportedModelError(f"{path}: per-expert nn.ModuleList experts are called one by one by their "
                                            "block; use layer.replace=block")
            setattr(parent, attr, _new_experts_layer(cfg, experts, arch, cfg.device))
            swapped.append(path)
    _refuse_save_pretrained_upfront(model, swapped)
    return swapped


def _check_routing_matches(hf_cfg: Any, cfg: Any) -> None:
    """A block swap routes with composer's router, built from ``cfg``: its settings must be the model's own
    (``derive_fields`` of its config), else every token may go elsewhere, silently (an experts swap keeps the
    model's router and needs only the expert sizes, checked per layer)."""
    from .hf_config import derive_fields

    want = derive_fields(hf_cfg)
    m = cfg.model
    got = {"top_k": m.top_k, "num_experts": m.num_experts, "router": m.router.model_dump(),
           "num_shared_experts": m.num_shared_experts, "shared_expert_gate": m.shared_expert_gate}
    problems = []
    for key in ("top_k", "num_experts", "num_shared_experts", "shared_expert_gate"):
        if key in want and want[key] != got[key]:
            problems.append(Problem(f"model.{key}", got[key], f"the model's config has {want[key]}"))
    defaults = type(m.router)().model_dump()
    for key, value in {**defaults, **want.get("router", {})}.items():
        if got["router"].get(key) != value:
            problems.append(Problem(f"model.router.{key}", got["router"].get(key), f"the model's config has {value}"))
    if problems:
        raise ConfigError(problems, f"layer.replace=block of a {hf_cfg.model_type} model (its router would route "
                          "differently; derive the config from the model: model=hf with its model.path, or "
                          "layer.replace=experts, which keeps the model's router)")


def _refuse_save_pretrained_upfront(model: nn.Module, swapped: list[str]) -> None:
    """Where a swapped module has no Hugging Face state dict, ``save_pretrained`` raises before it writes anything:
    transformers writes config.json (and a generation config) before it asks for the state dict, so the state-dict
    hook alone would leave a directory with a config and no weights."""
    formats = []
    for p in swapped:  # (a swapped block's own format, and its experts': quantized ones have no HF state dict)
        m = model.get_submodule(p)
        formats += [(p, getattr(m, "hf_format", None)), (f"{p}.experts", getattr(getattr(m, "experts", None),
                                                                                "hf_format", None))]
    problems = [(p, fmt.problem) for p, fmt in formats if fmt is not None and fmt.problem]
    if not problems or not hasattr(model, "save_pretrained"):
        return
    path, problem = problems[0]

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        raise _no_hf_state(f"{path} (save_pretrained wrote nothing)", problem)

    model.save_pretrained = save_pretrained  # this instance only; its state_dict() raises the same way


def load_hf_model(cfg: Any, experts_implementation: str = "eager") -> nn.Module:
    """The unmodified Hugging Face model of ``cfg.model`` (path or arch), in ``cfg.model.dtype`` on ``cfg.device``."""
    from transformers import AutoModelForCausalLM

    m = cfg.model
    try:
        hc = hf_config(m.path, m.arch, m.hf_overrides)
    except HFConfigError as exc:
        raise ConfigError([Problem(k, v, msg) for k, v, msg in exc.problems]) from None
    kw = dict(dtype=m.torch_dtype, experts_implementation=experts_implementation)
    if m.path is not None:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(m.path, config=hc, local_files_only=True,
                                                               output_loading_info=True, **kw)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # no weights file, a shape transformers
            # cannot convert, a truncated or corrupt safetensors file, ...
            bad = _unreadable_safetensors(m.path)
            if bad:
                raise WeightLoadError(f"model.path={m.path}: {', '.join(bad)} cannot be read as safetensors (truncated "
                                      "or corrupt: an interrupted copy or download?); copy the file again, or write "
                                      "the folder again with save_pretrained") from None
            text = " ".join(str(exc).split())
            raise WeightLoadError(f"model.path={m.path}: transformers could not load the weights ({text[:400]}"
                                  f"{' ...' if len(text) > 400 else ''}). The folder needs the checkpoint of its "
                                  "config.json (save_pretrained writes both), and model.hf_overrides must not change "
                                  "the sizes of a checkpoint") from None
        # transformers fills a missing or mismatched tensor with fresh random values and only logs it; every check
        # would then compare random weights with themselves
        problems = [f"{what}: {', '.join(sorted(map(str, keys))[:6])}{' ...' if len(keys) > 6 else ''}"
                    for what, keys in (("missing", info.get("missing_keys") or ()),
                                       ("of another shape", info.get("mismatched_keys") or ())) if keys]
        if problems:
            raise WeightLoadError(f"model.path={m.path}: the checkpoint does not match its model (tensors "
                                  f"{'; '.join(problems)}); transformers would initialize those at random. Check the "
                                  "folder's safetensors against its config.json and model.hf_overrides")
    else:
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(hc, **kw)
        _randomize_zero_buffers(model, cfg.seed)
    return model.to(cfg.device).eval().requires_grad_(False)


def _unreadable_safetensors(folder: str) -> list[str]:
    """The ``*.safetensors`` files in ``folder`` whose header safetensors cannot read, each with the reason (its
    error names no file, and a sharded checkpoint has many)."""
    from pathlib import Path

    from safetensors import safe_open

    bad = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            bad.append(f"{f} ({' '.join(str(exc).split())[:200]})")
    return bad


@torch.no_grad()
def _randomize_zero_buffers(model: nn.Module, seed: int) -> None:
    """Random tiny models: give zero-initialized router state (DeepSeek-V3's score-correction bias) seeded
    values so that the checks exercise it."""
    gen = torch.Generator().manual_seed((seed + 1) % 2**64)  # (a seed of 2**64 - 1 is valid: wrap, not overflow)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_((torch.randn(buf.shape, generator=gen) * 0.05).to(buf.dtype))


@PluggableLayer.register("transformers_moe")
class TransformersMoE(PluggableLayer):
    """The `transformers_moe` layer choice: not a module itself, it builds a Hugging Face model whose experts
    (or sparse blocks) are composer layers. ``layer.replace``: experts | block."""

    Params = TransformersMoEParams

    @classmethod
    def check_config(cls, params: TransformersMoEParams, model: Any) -> list[tuple[str, Any, str]]:
        if model.name != "hf":
            return [("", "transformers_moe", f"needs a Hugging Face model: add model=hf with model.arch=<{supported_text()}> "
                     f"or model.path=<local dir> (model is '{model.name}')")]
        arch = model.arch
        if arch is None and model.path is not None:
            try:
                arch = hf_config(model.path, None, model.hf_overrides).model_type
            except HFConfigError:
                return []  # reported under model.path already
        if params.replace == "block" and arch in ARCHS and not ARCHS[arch].block_router:
            return [("replace", "block", f"{arch}'s router adds a bias to the logits, which composer's router does not; "
                     "use layer.replace=experts")]
        return []

    @classmethod
    def build_model(cls, cfg: Any, *, ep_rank: int = 0, group: Any = None, init: bool = True) -> nn.Module:
        if cfg.parallel.ep_size != 1:
            raise ConfigError([Problem("parallel.ep_size", cfg.parallel.ep_size,
                                       "layer=transformers_moe runs on one rank for now; use parallel.ep_size=1")])
        if not init:  # (not ignored: a caller would then load a checkpoint over weights it thinks are not there)
            raise ValueError("build(cfg, init=False): layer=transformers_moe builds the Hugging Face model with its "
                             "weights (model.path's checkpoint, or seeded random ones for model.arch); to run a "
                             "checkpoint set model.path=<folder> and call build(cfg)")
        model = load_hf_model(cfg)
        return swap_model(model, cfg)

    @classmethod
    def layer_task(cls, task: str) -> Callable[..., dict[str, Any]] | None:
        """The task implementations this layer brings (tasks dispatch here instead of branching on the layer)."""
        from . import bench as hf_bench, check as hf_check

        return {"check": hf_check.check, "run": hf_check.run, "bench": hf_bench.task_bench}.get(task)


def refuse_modes(cfg: Any, task: str, compile_ok: bool = False) -> None:
    """``compile`` / ``cuda_graph`` say how composer's own stack runs (layer=fused_moe). Here task=check and task=run
    compile the Hugging Face model (``compile_ok``); nothing captures it in a CUDA graph. A mode a task would not
    apply is refused (ConfigError), not ignored."""
    problems = []
    if cfg.cuda_graph:
        problems.append(Problem("cuda_graph", True, f"layer=transformers_moe task={task} does not capture the Hugging "
                                "Face model in CUDA graphs; cuda_graph=true applies to layer=fused_moe (drop it)"))
    if cfg.compile and not compile_ok:
        problems.append(Problem("compile", True, f"layer=transformers_moe task={task} runs the Hugging Face model "
                                "eagerly; compile=true applies to task=check and task=run here, and to "
                                "layer=fused_moe (drop it)"))
    if problems:
        raise ConfigError(problems)


def swap_model(model: nn.Module, cfg: Any) -> nn.Module:
    """Swap ``model`` in place as ``cfg.layer.replace`` says; records the swapped paths on the model."""
    refuse_modes(cfg, getattr(cfg.task, "name", "?"), compile_ok=True)  # (cuda_graph, whatever the caller)
    replace = cfg.layer.params.replace if cfg.layer.params is not None else "experts"
    try:
        model.composer_swapped = swap(model, cfg, replace)
    except UnsupportedModelError:
        raise
    return model.eval().requires_grad_(False)


def reference_and_swapped(cfg: Any) -> tuple[nn.Module, nn.Module]:
    """The unmodified model (experts_implementation='eager') and a swapped copy with the same weights."""
    ref = load_hf_model(cfg, "eager")
    model = swap_model(copy.deepcopy(ref), cfg)
    return ref, model
