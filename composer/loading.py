"""Load Hugging Face-named safetensors checkpoints into a built graph (and save them, for round trips).

Expert tensors are recognised under each FusedMoE's module path ``P`` (e.g. ``layers.0.mlp.experts``):
per-expert ``P.{e}.{gate_proj|up_proj|down_proj}.{weight|bias}`` (also ``w1``/``w3``/``w2``) and packed
``P.gate_up_proj [E, 2I, H]``, ``P.down_proj [E, H, I]``, ``P.gate_up_proj_bias``, ``P.down_proj_bias``.
Every other tensor loads by exact name. Under expert parallelism a rank reads only its own experts
(packed tensors through ``safe_open(...).get_slice``); under tensor parallelism only its slice of each
expert's (and shared expert's) intermediate dim, after the full shape is checked (composer.distributed.tp). Shapes are checked; a mismatch names the
parameter and both shapes. ``prefix`` strips a leading ``model.`` (as in HF checkpoints).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import WeightLoadError
from .layers.fused_moe import FusedMoE
from .quant import loading as quant_loading

PER_EXPERT = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.(weight|bias)$")
SHARD = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}
PACKED = {"gate_up_proj": "w13", "down_proj": "w2", "gate_up_proj_bias": "w13_bias", "down_proj_bias": "w2_bias"}
# Hugging Face names of the MoE block's other tensors where composer's differ (qwen2_moe's singular shared expert
# and its gate, deepseek_v3's router bias on the gate, the pre-MLP norm), tried for a key that matches nothing
HF_ALIASES = [(re.compile(p), r) for p, r in (
    (r"^(.*\.mlp)\.shared_expert\.(.*)$", r"\1.shared_experts.\2"),
    (r"^(.*\.mlp)\.shared_expert_gate\.weight$", r"\1.shared_experts.gate.weight"),
    (r"^(.*\.mlp)\.gate\.e_score_correction_bias$", r"\1.router.e_score_correction_bias"),
    (r"^(.*layers\.\d+)\.post_attention_layernorm\.weight$", r"\1.norm.weight"),
)]


BLOCK_ALIAS = re.compile(r"^(.*layers\.\d+)\.block_sparse_moe\.(.*)$")  # mixtral's sparse block in transformers


def _block_alias(name: str, experts: dict[str, Any]) -> str:
    """Mixtral checkpoints name the sparse block ``block_sparse_moe`` where composer's is ``mlp``: the name under
    ``mlp`` when that is one of the model's experts layers (or their block's gate)."""
    alias = BLOCK_ALIAS.sub(r"\1.mlp.\2", name)
    if alias != name and any(alias.startswith(n.rsplit(".", 1)[0] + ".") for n in experts):
        return alias
    return name


def _alias(name: str, params: dict[str, Any]) -> str:
    """``name``, or composer's name for the Hugging Face one (``HF_ALIASES``) where that is a parameter."""
    if name in params:
        return name
    for pattern, repl in HF_ALIASES:
        alias = pattern.sub(repl, name)
        if alias != name and alias in params:
            return alias
    return name


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)      # checkpoint keys read (or sliced)
    skipped_experts: list[str] = field(default_factory=list)  # per-expert keys of other ranks' experts
    bytes_read: int = 0


def _files(source: Any) -> list[Path]:
    """The checkpoint files of ``source``: a file, a folder (its ``*.safetensors.index.json`` when it has one, else
    every ``*.safetensors``), an index json, or a list of files. Anything else is refused here, by name, rather than
    as a TypeError deep in pathlib."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            indexes = sorted(p.glob("*.safetensors.index.json"))
            if len(indexes) > 1:
                raise WeightLoadError(f"{p} holds {len(indexes)} index files ({', '.join(i.name for i in indexes)}); "
                                      "pass the one to load (its path) instead of the folder")
            if indexes:
                return _index_files(indexes[0])
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise WeightLoadError(f"no *.safetensors files in {p}")
            return files
        if not p.is_file():
            raise WeightLoadError(f"checkpoint {p} does not exist")
        return _index_files(p) if p.name.endswith(".index.json") else [p]
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise TypeError(f"load_checkpoint takes a checkpoint path (str or os.PathLike: a file, a folder or an index "
                        f"json) or a list of them, got {type(source).__name__}"
                        + (" (decode a bytes path with os.fsdecode)" if isinstance(source, (bytes, bytearray)) else ""))
    files = list(source)
    bad = [f"{f!r} ({type(f).__name__})" for f in files if not isinstance(f, (str, os.PathLike))]
    if bad:
        raise TypeError(f"load_checkpoint takes a list of checkpoint file paths (str or os.PathLike); these are not: "
                        f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    if not files:
        raise WeightLoadError("load_checkpoint got an empty list of checkpoint files; pass the files (or their folder)")
    return [Path(f) for f in files]


def _index_files(index: Path) -> list[Path]:
    """The shards a sharded checkpoint's index lists (``weight_map``: key -> file), in order. Without it a missing
    shard went unnoticed (strict=False loaded the rest) and a stray old file in the folder was read too. Every listed
    shard must exist and hold the keys listed for it."""
    import json

    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightLoadError(f"{index}: not a readable checkpoint index ({exc}); pass the *.safetensors files "
                              "as a list instead") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise WeightLoadError(f"{index}: has no weight_map of tensor names to shard files; pass the *.safetensors "
                              "files as a list instead")
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    files = [index.parent / name for name in by_file]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise WeightLoadError(f"{index} lists shard files that are not in {index.parent}: {', '.join(absent[:8])}"
                              f"{' ...' if len(absent) > 8 else ''} ({len(absent)} of {len(files)}); the checkpoint is "
                              "incomplete: download or copy the missing shards there. Nothing was loaded.")
    for f, keys in zip(files, by_file.values()):
        with _open(f) as h:
            held = set(h.keys())
        lacking = [k for k in keys if k not in held]
        if lacking:
            more = " ..." if len(lacking) > 8 else ""
            raise WeightLoadError(f"{f}: {index.name} lists {', '.join(lacking[:8])}{more} "
                                  f"in this shard, but it does not hold {'them' if len(lacking) > 1 else 'it'}; the "
                                  "shard and the index are from different versions of the checkpoint (or the shard "
                                  "is damaged): download the shard again. Nothing was loaded.")
    return files


@torch.no_grad()
def load_checkpoint(model: nn.Module, source: str | Path | Iterable[str | Path], *, prefix: str = "",
                    strict: bool = True) -> LoadReport:
    """Load safetensors files into ``model``; with ``strict``, every parameter must be filled and every
    key used. Quant methods then process the loaded weights (``finish_loading``).

    A quantized model takes checkpoints only before its weights are processed (``build(cfg, init=False)``): a
    processed one is refused before anything is read. If loading fails, the experts layers get back the
    parameters and quantization state they had, so a corrected checkpoint loads into the same model (tensors
    already copied are overwritten by that load). Shapes, dtypes, duplicates, (with strict or init=False) the key
    set, and pre-quantized layouts with their scales' values are checked before the first copy, so a checkpoint
    refused for those changes nothing."""
    _refuse_meta(model)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, FusedMoE)}
    files = _files(source)
    _refuse_processed(experts, prefix, files)
    _precheck(model, experts, files, prefix, strict)
    saved = {n: (dict(m._parameters), getattr(m, "quant_state", None), getattr(m, "quant_loaded", None))
             for n, m in experts.items()}
    try:
        return _load(model, experts, files, prefix, strict)
    except BaseException:
        for n, (params_before, state, loaded) in saved.items():  # undo set_param / the pre-quantized state
            m = experts[n]
            m._parameters.clear()
            m._parameters.update(params_before)
            if state is not None:
                m.quant_state = state
            if loaded is not None or hasattr(m, "quant_loaded"):
                m.quant_loaded = loaded
        raise


def _refuse_meta(model: nn.Module) -> None:
    """A model built with ``device="meta"`` has no storage: copies into it do nothing, and the load reported keys
    loaded while the model still held no weights."""
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise WeightLoadError(f"the model's tensors are on the meta device ({', '.join(meta[:3])}"
                              f"{' ...' if len(meta) > 3 else ''}): they have no storage to load weights into. Build "
                              "the model on the config's device to load a checkpoint (composer.build(cfg, init=False), "
                              "without device='meta'). Nothing was loaded.")


def _target(key: str, prefix: str, experts: dict[str, FusedMoE], params: dict[str, Any]) -> tuple[str | None, str]:
    """(experts layer path, key under it) for a key in an experts layer, else (None, parameter name or the key)."""
    name = key[len(prefix):] if prefix and key.startswith(prefix) else key
    name = _block_alias(name, experts)
    owner = next((n for n in experts if name.startswith(n + ".")), None)
    if owner is None:
        return None, _alias(name, params)
    return owner, name[len(owner) + 1:]


# safetensors header dtypes (get_slice(...).get_dtype()), for checks before any tensor is read
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _entries(files: list[Path], prefix: str, experts: dict[str, FusedMoE], params: dict[str, Any]) -> Iterator[Any]:
    """(open file, key, experts layer path or None, name under it or parameter name) for every checkpoint key, in the
    order ``_precheck`` and ``_load`` both walk them."""
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                yield (f, key, *_target(key, prefix, experts, params))


def _precheck(model: nn.Module, experts: dict[str, FusedMoE], files: list[Path], prefix: str, strict: bool) -> None:
    """The checks of ``_load`` on the files' headers alone (shapes, dtypes, expert ids, duplicates, the key set), in
    the same order: a late bad tensor used to fail after earlier ones were copied, leaving the model half one
    checkpoint and half another. Pre-quantized tensors too: their headers, the whole layout of each layer, float
    copies beside them, and their scales' values (composer.quant.loading.precheck)."""
    params = dict(model.named_parameters())
    filled: dict[str, set] = {}
    unexpected: list[str] = []
    matched, quantized = False, {}  # experts layer -> its pre-quantized names so far
    for f, key, owner, name in _entries(files, prefix, experts, params):
        if owner is None:
            if name not in params:
                unexpected.append(key)
                continue
            _once(filled, name, "all", key)
            _check_param(params[name], name, key, f.get_slice(key))
            filled.setdefault(name, set()).add("all")
            matched = True
            continue
        layer = experts[owner]
        if quant_loading.handles(layer, name, key, f):
            quant_loading.precheck(layer, owner, name, key, f, quantized.setdefault(owner, set()), filled)
            matched = True
            continue
        part = _check_expert_tensor(layer, owner, name, key, f)
        if part is None:
            unexpected.append(key)
        elif part != "skip":
            pname, got = part
            if pname in ("w13", "w2") and quantized.get(owner):
                raise WeightLoadError(f"{key}: {owner} already took pre-quantized tensors from this checkpoint "
                                      f"({', '.join(sorted(quantized[owner]))}); it holds both float and quantized "
                                      "copies: keep one")
            _once(filled, f"{owner}.{pname}", got, key)
            filled.setdefault(f"{owner}.{pname}", set()).add(got)
        matched = True
    quant_loading.finish_precheck(experts, quantized, unexpected)
    for owner in quantized:  # (as quant_loading.finish does once the layout is complete)
        for attr in ("w13", "w2"):
            filled.setdefault(f"{owner}.{attr}", set()).add("all")
    _check_complete(model, params, experts, filled, unexpected, matched, prefix, strict)


def _check_param(param: torch.Tensor, name: str, key: str, sl: Any) -> None:
    """A non-expert tensor's header against its parameter (the full shape under tensor parallelism)."""
    shape, dtype = tuple(sl.get_shape()), ST_DTYPES.get(sl.get_dtype())
    s = getattr(param, "tp_shard", None)
    if s is not None:
        from .distributed.tp import _size_error

        want = tuple(s.full if i == s.dim else d for i, d in enumerate(param.shape))
        if shape != want:
            raise _size_error(key, shape, want, s.dim, s.full, s.size)
    elif shape != tuple(param.shape):
        raise WeightLoadError(f"{name}: checkpoint tensor has shape {shape}, the parameter expects "
                              f"{tuple(param.shape)}")
    if dtype is not None:
        _check_float(dtype, key, name, param.dtype)


def _expert_target(layer: FusedMoE, rest: str, key: str) -> tuple[str, torch.Tensor, int | None, str | None] | str | None:
    """Where a float expert key goes: (parameter name, parameter, expert id, shard), expert and shard None for a
    packed tensor of all experts; "skip" for another expert-parallel rank's expert; None for a key that matches no
    parameter. (One reading of the names for the header pre-check and the load.)"""
    m = PER_EXPERT.match(rest)
    if m:
        e, shard, kind = int(m.group(1)), SHARD[m.group(2)], m.group(3)
        if e not in layer.local_to_global:
            if not 0 <= e < layer.global_num_experts:
                raise WeightLoadError(f"{key}: expert {e} is out of range [0, {layer.global_num_experts})")
            return "skip"
        pname = ("w13" if shard in ("w1", "w3") else "w2") + ("_bias" if kind == "bias" else "")
    elif rest in PACKED:
        e, shard, pname = None, None, PACKED[rest]
    else:
        return None
    param = getattr(layer, pname, None)
    return None if param is None else (pname, param, e, shard)


def _check_expert_tensor(layer: FusedMoE, owner: str, rest: str, key: str, f: Any) -> tuple[str, Any] | str | None:
    """A float expert tensor's header against its parameter: (parameter, the part it fills), "skip" for another
    expert-parallel rank's expert, None for a key that matches no parameter."""
    target = _expert_target(layer, rest, key)
    if target is None or target == "skip":
        return target
    pname, param, e, shard = target
    sl = f.get_slice(key)
    shape, dtype = tuple(sl.get_shape()), ST_DTYPES.get(sl.get_dtype())
    if dtype is not None:
        _check_float(dtype, key, f"{owner}.{pname}", param.dtype, experts=True)
    tp = getattr(layer, "tp_size", 1) > 1
    if e is None:  # packed: every expert
        if tp:
            from .distributed.tp import check_packed_shape

            check_packed_shape(layer, key, pname, shape)
        elif shape != (want := (layer.global_num_experts, *param.shape[1:])):
            raise WeightLoadError(f"{key}: checkpoint tensor has shape {shape}, parameter "
                                  f"{owner}.{pname} expects {want} (all {layer.global_num_experts} experts)")
        return pname, "all"
    if tp:
        from .distributed.tp import _size_error

        H, I = layer.hidden_size, layer.full_intermediate_size
        want, dim = {"w13": ((I, H), 0), "w13_bias": ((I,), 0), "w2": ((H, I), 1), "w2_bias": ((H,), None)}[pname]
        if shape != want:
            raise _size_error(key, shape, want, dim, I, layer.tp_size)
    else:
        want = param.shape[1:]
        if pname.startswith("w13"):
            want = (want[0] // 2, *want[1:])
        if shape != tuple(want):
            raise WeightLoadError(f"{key}: {owner}.{pname} (expert {e}, shard {shard}): checkpoint tensor has shape "
                                  f"{shape}, the parameter expects {tuple(want)}")
    return pname, (e, shard)


def _once(filled: dict[str, set], param: str, part: Any, key: str) -> None:
    """Refuse a second copy of the same weights (packed and per expert, under composer's name and the HF one, or in
    two files): the later key would win, silently."""
    got = filled.get(param, set())
    if part in got or (part == "all" and got) or (part != "all" and "all" in got):
        raise WeightLoadError(f"{key}: the checkpoint holds {param} {'' if part == 'all' else f'(expert {part[0]}, shard {part[1]}) '}"
                              "twice (packed and per expert, under two names, or in two files); keep one copy")


def _open(path: Path) -> Any:
    """``safe_open`` of a checkpoint file, with the file named when it is not one."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # (SafetensorError: header too small / invalid JSON / ...)
        raise WeightLoadError(f"{path}: not a readable safetensors file ({exc}); composer reads *.safetensors "
                              "(save_pretrained(..., safe_serialization=True) or save_checkpoint write them)") from None


def _refuse_processed(experts: dict[str, FusedMoE], prefix: str, files: list[Path]) -> None:
    """A quantized experts layer whose weights are already processed cannot take checkpoint weights: float ones
    would be truncated into its int8 / fp8 / packed tensors beside the old scales. Checked on the keys alone."""
    ready = {n: m for n, m in experts.items() if getattr(m, "quant_state", None) == "ready"}
    if not ready:
        return
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                name = key[len(prefix):] if prefix and key.startswith(prefix) else key
                owner = next((n for n in ready if name.startswith(n + ".")), None)
                if owner is not None:
                    method = ready[owner].quant_method.name
                    raise WeightLoadError(
                        f"{key}: {owner} already holds processed {method} weights (quantized when the model was built "
                        "with init=True, or by an earlier load_checkpoint), so checkpoint weights cannot go into it; "
                        "build a fresh model with init=False (composer.build(cfg, init=False)) and load the whole "
                        "checkpoint into it in one call (a folder or a list of files): load_checkpoint quantizes once, "
                        "after loading. Nothing was loaded.")


def _load(model: nn.Module, experts: dict[str, FusedMoE], files: list[Path], prefix: str, strict: bool) -> LoadReport:
    from .factory import finish_loading

    params = dict(model.named_parameters())
    filled: dict[str, set] = {}  # param name -> filled (expert, shard) pairs or {"all"}
    unexpected: list[str] = []
    report = LoadReport()

    for f, key, owner, name in _entries(files, prefix, experts, params):
        if owner is None:
            if name not in params:
                unexpected.append(key)
                continue
            _once(filled, name, "all", key)  # (e.g. under its own name and the HF one, or in two files)
            if getattr(params[name], "tp_shard", None) is not None:  # tensor parallelism: read the slice
                from .distributed.tp import read_sharded

                t = read_sharded(params[name], f, key)
            else:
                t = f.get_tensor(key)
            _copy(params[name], t, name, key)
            filled.setdefault(name, set()).add("all")
            report.loaded.append(key)
            report.bytes_read += t.numel() * t.element_size()
            continue
        layer, rest = experts[owner], name
        if quant_loading.handles(layer, rest, key, f):  # pre-quantized tensors (composer.quant.loading)
            quant_loading.load(layer, owner, rest, key, f, report)
            continue
        target = _expert_target(layer, rest, key)
        if target is None:
            unexpected.append(key)
            continue
        if target == "skip":
            report.skipped_experts.append(key)
            continue
        pname, param, e, shard = target
        if e is not None:  # one expert's shard
            _once(filled, f"{owner}.{pname}", (e, shard), key)
            tp = getattr(layer, "tp_size", 1) > 1
            nbytes = None
            if tp:  # tensor parallelism: read only this rank's slice
                from .distributed.tp import read_per_expert

                t = read_per_expert(layer, f, key, pname, shard)
                if t is None:  # w2_bias off tensor-parallel rank 0 (added once, by rank 0): not read
                    t, nbytes = torch.zeros_like(param.data[layer.local_id(e)]), 0
            else:
                t = f.get_tensor(key)
            _check_float(t.dtype, key, f"{owner}.{pname}", param.dtype, experts=True)
            try:
                layer.weight_loader(param, t, shard, e, **({"narrowed": True} if tp else {}))
            except WeightLoadError as exc:
                raise WeightLoadError(f"{key}: {owner}.{exc}") from None
            filled.setdefault(f"{owner}.{pname}", set()).add((e, shard))
            report.loaded.append(key)
            report.bytes_read += t.numel() * t.element_size() if nbytes is None else nbytes
        else:  # packed: every expert (float beside pre-quantized copies was refused by the pre-check)
            _once(filled, f"{owner}.{pname}", "all", key)
            sl = f.get_slice(key)  # (its shape and dtype passed _check_expert_tensor on the header)
            if getattr(layer, "tp_size", 1) > 1:  # tensor parallelism: narrow each expert before reading
                from .distributed.tp import read_packed

                for local, g in enumerate(layer.local_to_global):
                    t = read_packed(layer, sl, key, pname, g)
                    if t is None:  # w2_bias off tensor-parallel rank 0 (added once, by rank 0)
                        param.data[local].zero_()
                        continue
                    param.data[local].copy_(t.to(param.dtype))
                    report.bytes_read += t.numel() * t.element_size()
                filled.setdefault(f"{owner}.{pname}", set()).add("all")
                report.loaded.append(key)
                continue
            for local, g in enumerate(layer.local_to_global):
                t = sl[g:g + 1][0]
                param.data[local].copy_(t.to(param.dtype))
                report.bytes_read += t.numel() * t.element_size()
            filled.setdefault(f"{owner}.{pname}", set()).add("all")
            report.loaded.append(key)

    quant_loading.finish(experts, filled, unexpected)
    _check_complete(model, params, experts, filled, unexpected, bool(report.loaded or report.skipped_experts),
                    prefix, strict)
    needs_all = getattr(model, "composer_needs_weights", False)
    finish_loading(model)
    if needs_all:
        model.composer_needs_weights = False
    return report


# a checkpoint's MoE-block parts a composer block was configured without, how to tell it lacks one, and the setting
# that adds it (strict=False lets keys outside composer's graph through, such as attention; these would be dropped and
# the block compute another model than the checkpoint's)
_MOE_PARTS = (
    (re.compile(r"experts\.(.+\.)?\w*bias$"), lambda b: b.experts.w13_bias is None,
     "the experts' biases: model.has_bias=true"),
    (re.compile(r"shared_experts?_gate\.|shared_experts\.gate\."),
     lambda b: b.shared_experts is None or b.shared_experts.gate is None,
     "the shared experts' gate: model.shared_expert_gate=true (with model.num_shared_experts)"),
    (re.compile(r"shared_experts?\."), lambda b: b.shared_experts is None, "shared experts: model.num_shared_experts"),
    (re.compile(r"(gate|router)\.e_score_correction_bias$"), lambda b: b.router.e_score_correction_bias is None,
     "the router's score-correction bias: model.router.score_correction_bias=true"),
    (re.compile(r"(gate|router)\.bias$"), lambda b: getattr(b.gate, "bias", None) is None,
     "a bias on the router's logits, which composer's router does not have (gpt_oss: layer=transformers_moe runs "
     "the model's own router)"))


def _refuse_moe_parts(model: nn.Module, unexpected: list[str], experts: dict[str, FusedMoE], prefix: str) -> None:
    """Unmatched keys inside one of composer's MoE blocks naming a part the block lacks: refused even with
    strict=False. (A block of another library's model, with composer's experts swapped in, is not judged here.)"""
    from .layers.block import SparseMoEBlock

    blocks = {}
    for n in experts:
        path = n.rsplit(".", 1)[0]
        block = model.get_submodule(path) if path != n else None
        if isinstance(block, SparseMoEBlock):
            blocks[path + "."] = block
    found: dict[str, list[str]] = {}
    for key in unexpected:
        name = _block_alias(key[len(prefix):] if prefix and key.startswith(prefix) else key, experts)
        at = next((b for b in blocks if name.startswith(b)), None)
        if at is None:
            continue
        for pattern, lacks, what in _MOE_PARTS:
            if pattern.match(name[len(at):]):
                if lacks(blocks[at]):
                    found.setdefault(what, []).append(key)
                break
    if found:
        parts = "; ".join(f"{what} ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})"
                          for what, keys in found.items())
        raise WeightLoadError(f"the checkpoint's MoE blocks have parts this model was configured without: {parts}. "
                              "Set those model.* keys to match the checkpoint (strict=False lets through keys outside "
                              "the MoE blocks, such as attention, not parts of the blocks composer computes). Nothing "
                              "was loaded.")


def _check_complete(model: nn.Module, params: dict[str, Any], experts: dict[str, FusedMoE], filled: dict[str, set],
                    unexpected: list[str], matched: bool, prefix: str, strict: bool) -> None:
    """Refuse a checkpoint that matched nothing, or (with ``strict``, or into an ``init=False`` model, which must get
    every weight) one that leaves parameters unfilled or, with ``strict``, has keys that match no parameter."""
    needs_all = getattr(model, "composer_needs_weights", False)
    expert_params = {f"{n}.{p}" for n, m in experts.items() for p, _ in m.named_parameters(recurse=False)}
    if not matched:
        hint = "" if prefix else '; a Hugging Face checkpoint needs prefix="model."'
        raise WeightLoadError(f"no checkpoint key matched a parameter of the model (keys such as "
                              f"{', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}){hint}. "
                              "Nothing was loaded.")
    _refuse_moe_parts(model, unexpected, experts, prefix)
    if strict or needs_all:
        missing = []
        for name, p in params.items():
            got = filled.get(name, set())
            if "all" in got:
                continue
            if name in expert_params:
                layer = experts[name.rsplit(".", 1)[0]]
                shards = ("w1", "w3") if name.rsplit(".", 1)[1].startswith("w13") else ("w2",)
                lacking = [(g, s) for g in layer.local_to_global for s in shards if (g, s) not in got]
                if not lacking:
                    continue
                if got:  # some experts came per expert: say which did not
                    which = sorted({g for g, _ in lacking})
                    shown = ", ".join(map(str, which[:8])) + (" ..." if len(which) > 8 else "")
                    missing.append(f"{name} (expert{'s' if len(which) > 1 else ''} {shown}: "
                                   f"{'/'.join(sorted({s for _, s in lacking}))})")
                    continue
            missing.append(name)
        if missing or (unexpected and strict):
            parts = []
            if missing:
                parts.append(f"parameters not in the checkpoint: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
            if unexpected:
                parts.append(f"checkpoint keys that match no parameter: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
            hint = (". Check model.* sizes and num_layers, or pass strict=False." if strict else
                    ". The model was built with init=False, so those parameters would keep uninitialized memory: "
                    "strict=False tolerates checkpoint keys that match no parameter, not missing weights. Pass every "
                    "file of a sharded checkpoint in one call (its folder or a list), check prefix= and model.* "
                    "sizes, or build with init=True to keep seeded weights where the checkpoint has none.")
            raise WeightLoadError("checkpoint does not match the model: " + "; ".join(parts) + hint)


QUANTIZED_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}


def _check_float(got: torch.dtype, key: str, target: str, dtype: torch.dtype, experts: bool = False) -> None:
    """A floating-point parameter takes floating-point values only (``got``: the checkpoint tensor's dtype): casting
    fp8 / int8 / packed int4 values would drop their scales and load numbers hundreds of times off, silently."""
    if not dtype.is_floating_point or (got.is_floating_point and got not in QUANTIZED_DTYPES):
        return
    if got not in QUANTIZED_DTYPES | {torch.int8, torch.uint8, torch.int32}:
        raise WeightLoadError(f"{key}: checkpoint tensor has dtype {got}, but {target} is a {dtype} parameter; "
                              "save the weights in a floating-point dtype")
    if experts:
        hint = ("routed experts quantized this way load with the matching quant= method under vLLM's packed names "
                "(w13_weight, w13_weight_scale, ...; docs/quantization.md); per-expert quantized names are not read, "
                "so dequantize them with their scales (e.g. weight_scale_inv) into the model dtype, or repack them")
    else:
        hint = ("composer quantizes the routed experts only (quant=...); dequantize this tensor with its scales "
                "(e.g. its weight_scale_inv) into the model dtype before loading")
    raise WeightLoadError(f"{key}: checkpoint tensor has the quantized dtype {got}, but {target} is a {dtype} "
                          f"parameter. {hint}")


def _copy(param: torch.Tensor, t: torch.Tensor, name: str, key: str | None = None) -> None:
    if tuple(t.shape) != tuple(param.shape):
        raise WeightLoadError(f"{name}: checkpoint tensor has shape {tuple(t.shape)}, the parameter expects {tuple(param.shape)}")
    _check_float(t.dtype, key or name, name, param.dtype)
    param.data.copy_(t.to(param.dtype))


@torch.no_grad()
def save_checkpoint(model: nn.Module, path: str | Path, *, layout: str = "packed") -> Path:
    """Write ``model`` as one safetensors file in Hugging Face naming: experts ``packed``
    (``gate_up_proj``/``down_proj``) or ``per_expert`` (``{e}.gate_proj/up_proj/down_proj``)."""
    from safetensors.torch import save_file

    if layout not in ("packed", "per_expert"):
        raise ValueError(f"layout must be 'packed' or 'per_expert', got {layout!r}")
    out: dict[str, torch.Tensor] = {}
    experts = {n: m for n, m in model.named_modules() if isinstance(m, FusedMoE)}
    if any(getattr(m, "tp_size", 1) > 1 for m in experts.values()):
        raise ValueError("save_checkpoint writes whole models; a tensor-parallel rank holds only slices "
                         "(save the single-rank model of the same seed instead)")
    for name, p in model.named_parameters():
        owner = next((n for n in experts if name.startswith(n + ".")), None)
        if owner is None:
            out[name] = p.detach().cpu().contiguous()
            continue
        layer, pname = experts[owner], name[len(owner) + 1:]
        qname = quant_loading.checkpoint_name(layer, pname)  # quantized tensors keep their vLLM names
        if qname is not None and layer.ep_size == 1:
            out[f"{owner}.{qname}"] = p.detach().cpu().contiguous()
            continue
        if layer.ep_size != 1:
            raise ValueError("save_checkpoint writes whole models; gather expert-parallel layers first")
        if layout == "packed":
            key = {v: k for k, v in PACKED.items()}[pname]
            out[f"{owner}.{key}"] = p.detach().cpu().contiguous()
            continue
        I = layer.intermediate_size
        kind = "bias" if pname.endswith("_bias") else "weight"
        for e in range(layer.global_num_experts):
            t = p.detach()[e].cpu()
            if pname.startswith("w13"):
                out[f"{owner}.{e}.gate_proj.{kind}"] = t[:I].contiguous()
                out[f"{owner}.{e}.up_proj.{kind}"] = t[I:].contiguous()
            else:
                out[f"{owner}.{e}.down_proj.{kind}"] = t.contiguous()
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "model.safetensors"
    save_file(out, str(path))
    return path
