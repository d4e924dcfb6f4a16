"""ComposerConfig -> nn.Module graph. Nothing else constructs layers from config.

Every slot asks a registry for its class by the configured name (layer, quant method, experts kernel,
all2all backend); custom ops choose their platform implementation under ``build_settings``. Weights are
random and seeded per (seed, layer, expert), so any rank builds exactly its slice of the same model.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .config import ComposerConfig, layer_class_problem
from .distributed.none import EPContext
from .errors import ConfigError, Problem
from .layers.block import DecoderBlock, MoEModel, RMSNorm, SparseMoEBlock
from .layers.fused_moe import FusedMoE
from .layers.router import GateLinear, Router
from .layers.shared_experts import SharedExperts
from . import registry
from .registry import ALL2ALL, KERNELS, LAYERS, QUANT_METHODS, build_settings


def build(cfg: ComposerConfig, *, ep_rank: int | None = None, group: Any = None, init: bool = True,
          tp_rank: int | None = None, tp_group: Any = None, device: str | torch.device | None = None) -> nn.Module:
    """Build the module graph ``cfg`` describes, on ``cfg.device``, with seeded random weights.

    ``init=False`` leaves weights uninitialized for a checkpoint to be loaded (``loading.load_checkpoint``; after a
    ``load_state_dict`` or copies by hand, call ``finish_loading(model)`` so quant methods process them); the model
    refuses to run until then. ``device="meta"`` (with
    ``init=False``) allocates nothing: the graph as it would run on ``cfg.device`` (each slot resolved for that
    platform), with every tensor's shape and dtype but no storage, which is all ``task=show`` needs (a layer that
    builds its own model, such as ``layer=transformers_moe``, refuses it: its model comes with its weights).
    Under expert parallelism ``ep_rank``/``group`` default to the distributed runtime's (init_from_env),
    under tensor parallelism ``tp_rank``/``tp_group`` likewise (composer.distributed.tp).
    """
    if not isinstance(init, bool):
        raise TypeError(f"build(init={init!r}): init is True (seeded random weights) or False (for a checkpoint)")
    for name, rank in (("ep_rank", ep_rank), ("tp_rank", tp_rank)):
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise TypeError(f"build({name}={rank!r}): a rank is an int in [0, parallel.{name[:2]}_size)")
    if device is not None and torch.device(device).type != "meta":
        raise ValueError(f"build(device={device!r}): the device to run on is the config's (device=...); device= "
                         "takes 'meta' only, to build without storage")
    if init and device is not None:
        raise ValueError("build(device='meta') holds no weights to initialize: pass init=False")
    registry.load_plugins(list(cfg.plugins))  # (this config's plugins, not those a later load_config put in place)
    ep_rank, group = _ep_place(cfg, ep_rank, group)
    tp = _tp_place(cfg, tp_rank, tp_group)
    dev = cfg.device if device is None else device
    _refuse_internal_layer(cfg.layer.name)
    layer_cls = LAYERS.get(cfg.layer.name)
    custom_build = getattr(layer_cls, "build_model", None)
    with build_settings(cfg.custom_ops, cfg.device):
        if custom_build is not None:  # a layer that brings its own model (e.g. the Transformers backend)
            if device is not None:  # (its model comes with storage: a meta build would silently not be one)
                raise ValueError(f"layer={cfg.layer.name} builds its own model, with its weights, as it runs; "
                                 "build(device='meta') builds composer's own graph only: call build(cfg)")
            return custom_build(cfg, ep_rank=ep_rank, group=group, init=init)
        model = MoEModel([_block(cfg, i, ep_rank, group, tp, dev) for i in range(cfg.model.num_layers)])
    if init:
        init_weights(model, cfg.seed)
        finish_loading(model)
    else:  # uninitialized memory: load_checkpoint then requires every parameter, strict or not, and forward
        # refuses to run until weights came in (load_checkpoint, a load_state_dict with none missing, finish_loading)
        model.composer_needs_weights = True
        model.register_load_state_dict_post_hook(_weights_loaded)
    return model.eval().requires_grad_(False)


def _refuse_internal_layer(name: str) -> None:
    """A config built by hand (``model_copy``) skips validation: an internal layer class (the Transformers backend's
    swap class, which reads its arguments in another order) would run composer's blocks and compute garbage."""
    why = LAYERS.internal(name)
    if why:
        raise ConfigError([Problem("layer.name", name, f"not a layer to choose: {why}")])


def build_experts(cfg: ComposerConfig, *, ep_rank: int | None = None, group: Any = None,
                  tp: tuple[int, int, Any] | None = None, device: str | torch.device | None = None) -> FusedMoE:
    """One FusedMoE layer as configured (the layer class from ``layer.name``, swapped if out-of-tree).
    ``tp``: (tp_rank, tp_size, tp_group), by default the runtime's under tensor parallelism; ``device``: where
    its tensors live (default ``cfg.device``; ``build``'s ``device``)."""
    ep_rank, group = _ep_place(cfg, ep_rank, group)
    tp_rank, tp_size, tp_group = tp if tp is not None else _tp_place(cfg, None, None)
    m = cfg.model
    layer_cls = LAYERS.get(cfg.layer.name)
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, FusedMoE)):  # (validation refuses such a layer;
        # a config built by hand skips it): never silently build the in-tree FusedMoE in its place
        raise ConfigError([Problem("layer.name", cfg.layer.name, layer_class_problem(cfg.layer.name) or
                                   f"layer '{cfg.layer.name}' builds its own model: call build(cfg); build_experts "
                                   "builds one FusedMoE layer (choose layer=fused_moe)")])
    ep_size = cfg.parallel.ep_size
    quant = QUANT_METHODS.get(cfg.quant.name)(cfg.quant.params)
    experts = KERNELS.get(cfg.kernel.resolved)()
    try:  # reported by the name the config chose (a subclass inherits its parent's)
        experts.name = cfg.kernel.resolved
    except AttributeError:  # (a kernel whose name is a read-only property keeps its own)
        pass
    layer = layer_cls(
        m.num_experts, m.top_k, m.hidden_size, m.intermediate_size,
        activation=m.activation, has_bias=m.has_bias, dtype=m.torch_dtype, device=cfg.device if device is None else device,
        quant_method=quant, experts=experts, ep_rank=ep_rank, ep_size=ep_size,
        placement=cfg.parallel.placement, **({"tp_rank": tp_rank, "tp_size": tp_size, "tp_group": tp_group,
                                              "sequence_parallel": cfg.parallel.sequence_parallel}
                                             if tp_size > 1 else {}),
    )
    ctx = EPContext(ep_rank, ep_size, layer.expert_map, group, cfg.all2all.params)
    layer.kernel.prepare_finalize = ALL2ALL.get(cfg.all2all.name)(ctx)
    return layer


def _ep_place(cfg: ComposerConfig, ep_rank: int | None, group: Any) -> tuple[int, Any]:
    """(ep_rank, group) as given, else the distributed runtime's under expert parallelism, else (0, None)."""
    if ep_rank is not None:
        return ep_rank, group
    if cfg.parallel.ep_size > 1:
        from .distributed.runtime import current

        state = current()
        if state is not None and state.ep_size == cfg.parallel.ep_size:
            return state.ep_rank, group if group is not None else state.ep_group
        from .distributed.runtime import DistributedError

        raise DistributedError(f"parallel.ep_size = {cfg.parallel.ep_size} but this process has no expert-parallel "
                               "runtime: call composer.distributed.runtime.init_from_env(cfg) first (the CLI does), "
                               "or pass ep_rank= and group= to build()")
    return 0, group


def _tp_place(cfg: ComposerConfig, tp_rank: int | None, tp_group: Any) -> tuple[int, int, Any]:
    from .distributed.tp import tp_place

    return tp_place(cfg, tp_rank, tp_group)


def _block(cfg: ComposerConfig, index: int, ep_rank: int, group: Any,
           tp: tuple[int, int, Any] = (0, 1, None), dev: str | torch.device | None = None) -> DecoderBlock:
    m, r, dt = cfg.model, cfg.model.router, cfg.model.torch_dtype
    dev = cfg.device if dev is None else dev
    shared = None
    if m.num_shared_experts:
        size = (m.shared_expert_intermediate_size or m.intermediate_size) * m.num_shared_experts
        shared = SharedExperts(m.hidden_size, size, m.activation, m.shared_expert_gate, dt, dev,
                               **({"tp_rank": tp[0], "tp_size": tp[1], "tp_group": tp[2],
                                   "sequence_parallel": cfg.parallel.sequence_parallel} if tp[1] > 1 else {}))
    mlp = SparseMoEBlock(
        GateLinear(m.hidden_size, m.num_experts, dt, dev),
        Router(m.num_experts, m.top_k, r.scoring, r.renormalize, r.num_expert_group, r.topk_group,
               r.score_correction_bias, r.routed_scaling_factor, dev),
        build_experts(cfg, ep_rank=ep_rank, group=group, tp=tp, device=dev),
        shared,
    )
    return DecoderBlock(RMSNorm(m.hidden_size, m.rms_norm_eps, dt, dev), mlp)


def _generator(seed: int, *keys: Any) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights scaled so activations stay O(1). Expert weights are seeded per global expert id."""
    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            _init_experts(module, seed, name)
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                continue
            gen = _generator(seed, name, pname)
            shard = getattr(p, "tp_shard", None)  # tensor parallelism: draw the full tensor, keep this rank's slice
            if shard is not None:
                full = list(p.shape)
                full[shard.dim] = shard.full
                p.copy_(shard.narrow(_randn(tuple(full), full[-1] ** -0.5, gen, p)))
                continue
            if isinstance(module, RMSNorm):
                p.copy_(1.0 + _randn(tuple(p.shape), 0.1, gen, p))
            elif pname == "e_score_correction_bias":
                p.copy_(_randn(tuple(p.shape), 0.05, gen, p))
            elif p.dim() >= 2:
                p.copy_(_randn(tuple(p.shape), p.shape[-1] ** -0.5, gen, p))
            else:
                p.copy_(_randn(tuple(p.shape), 0.1, gen, p))


def _init_experts(layer: FusedMoE, seed: int, name: str) -> None:
    # Under tensor parallelism each expert's full weights are drawn and this rank keeps its slice.
    H, I = layer.hidden_size, getattr(layer, "full_intermediate_size", layer.intermediate_size)
    tp = getattr(layer, "tp_size", 1) > 1
    for local, g in enumerate(layer.local_to_global):
        gen = _generator(seed, name, "expert", g)
        for pname, shape, std in (("w13", (2 * I, H), H ** -0.5), ("w2", (H, I), I ** -0.5),
                                  ("w13_bias", (2 * I,), 0.1), ("w2_bias", (H,), 0.1)):
            p = getattr(layer, pname, None)
            if p is None:
                continue
            t = _randn(shape, std, gen, p)
            if tp:
                from .distributed.tp import shard_expert

                t = shard_expert(layer, pname, t)
            p.data[local].copy_(t)


def _weights_loaded(model: nn.Module, incompatible: Any) -> None:
    """load_state_dict's post hook on an init=False model: every parameter came in unless some were missing."""
    if not incompatible.missing_keys:
        model.composer_needs_weights = False


@torch.no_grad()
def finish_loading(model: nn.Module) -> None:
    """Let each quant method quantize/repack its layer once, after weights are initialized or loaded (by
    load_checkpoint, load_state_dict, or copied in by hand: calling it says the weights are in place)."""
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.quant_method.process_weights_after_loading(module)
    if getattr(model, "composer_needs_weights", False):
        model.composer_needs_weights = False
