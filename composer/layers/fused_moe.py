"""FusedMoE: the experts of one MoE block, a PluggableLayer named ``fused_moe``.

Weights ``w13 [E_local, 2I, H]`` (gate rows, then up rows) and ``w2 [E_local, H, I]``, optional
``w13_bias [E, 2I]`` and ``w2_bias [E, H]``: vLLM's layout and transformers 5's ``gate_up_proj`` /
``down_proj``, so a Hugging Face checkpoint is adopted without a copy. The quant method decides how
they are stored and run; the modular kernel (all2all prepare/finalize x experts kernel) runs them.
"""
from __future__ import annotations

from typing import Any

import torch

from ..distributed.none import EPContext, NoAll2All
from ..distributed.placement import expert_map, local_experts
from ..errors import WeightLoadError
from ..registry import PluggableLayer
from .modular_kernel import Experts, ModularKernel, PrepareFinalize

SHARDS = ("w1", "w2", "w3")


def check_on_device(t: Any, what: str, var: str, device: torch.device, owner: str) -> None:
    """One tensor argument of a module, metadata only: a tensor, on the device of the module's weights. A user's
    mistake is named here, not as an AttributeError or a RuntimeError from inside torch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner} takes {what} as a torch.Tensor on {device}, got {type(t).__name__}; convert it, e.g. "
                        f"torch.as_tensor({var}, device='{device}')")
    if t.device != device:
        raise ValueError(f"{owner} got {what} on {t.device}, its weights are on {device}: put {what} on {device}, "
                         f"e.g. {var}.to('{device}')")


@PluggableLayer.register("fused_moe")
class FusedMoE(PluggableLayer):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "silu",
        has_bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
        quant_method: Any = None,
        experts: Experts | None = None,
        prepare_finalize: PrepareFinalize | None = None,
        ep_rank: int = 0,
        ep_size: int = 1,
        placement: str = "linear",
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: Any = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        from ..kernels.torch_backend import TorchExperts
        from ..quant.unquantized import Unquantized

        self.global_num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        # Tensor parallelism (composer.distributed.tp): every expert keeps intermediate_size / tp_size rows;
        # ``intermediate_size`` is the size the weights have on this rank, ``full_intermediate_size`` the model's.
        if intermediate_size % tp_size:
            raise ValueError(f"tp_size {tp_size} must divide intermediate_size {intermediate_size}")
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.sequence_parallel = sequence_parallel and tp_size > 1  # tokens split across the TP ranks
        self.full_intermediate_size = intermediate_size
        intermediate_size //= tp_size
        self.intermediate_size = intermediate_size
        if tp_size > 1:  # online quantization: scales spanning the sharded dim use the max over the ranks
            from ..distributed.tp import amax_reducer

            self.tp_amax_reduce = amax_reducer(tp_group)
        self.activation = activation
        self.has_bias = has_bias
        self.ep_rank, self.ep_size, self.placement = ep_rank, ep_size, placement
        self.local_to_global = local_experts(num_experts, ep_size, ep_rank, placement)
        self.local_num_experts = len(self.local_to_global)
        self.register_buffer("expert_map", expert_map(num_experts, ep_size, ep_rank, placement).to(device), persistent=False)

        self.quant_method = quant_method if quant_method is not None else Unquantized()
        self.quant_method.create_weights(self, self.local_num_experts, hidden_size, intermediate_size, dtype, has_bias, device)
        if prepare_finalize is None:
            prepare_finalize = NoAll2All(EPContext(ep_rank, ep_size, self.expert_map))
        self.kernel = ModularKernel(prepare_finalize, experts if experts is not None else TorchExperts())

    def local_id(self, expert_id: int) -> int | None:
        """This rank's index of global expert ``expert_id``, or None where another rank owns it."""
        return self.local_to_global.index(expert_id) if expert_id in self.local_to_global else None

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]``, routing ``[T, k]`` (global expert ids) -> ``[T, H]``."""
        if getattr(self, "quant_state", "ready") != "ready":  # (the method's tensors do not exist yet)
            raise WeightLoadError(f"this layer's {self.quant_method.name} weights are not processed yet (built with "
                                  "init=False): load a checkpoint with composer.loading.load_checkpoint(model, path), "
                                  "or copy the float weights in and call composer.factory.finish_loading(model), "
                                  "before running it")
        self._check_inputs(hidden_states, topk_weights, topk_ids)
        if self.sequence_parallel:  # this rank's tokens: gather the group's, reduce-scatter the partial outputs
            from ..distributed.tp import sp_gather, sp_scatter

            (x, w, ids), ctx = sp_gather([hidden_states, topk_weights.float(), topk_ids.to(torch.int32)],
                                         self.tp_group, self.tp_size)
            return sp_scatter(self.quant_method.apply(self, x, w, ids), ctx, self.tp_group)
        out = self.quant_method.apply(self, hidden_states, topk_weights, topk_ids)
        if self.tp_size > 1:  # each rank computed its slice of the intermediate dim: sum the partial outputs
            from ..distributed.tp import all_reduce

            out = all_reduce(out, self.tp_group)
        return out

    def _check_inputs(self, *tensors: Any) -> None:
        """Tensors on the weights' device (the kernels check shapes and dtypes)."""
        for name, t in zip(("hidden_states", "topk_weights", "topk_ids"), tensors):
            check_on_device(t, name, name, self.w13.device, "FusedMoE")

    # ------------------------------------------------------------------------------------------
    # Weight loading (vLLM's contract): one checkpoint tensor for one expert and one shard.

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id: str, expert_id: int,
                      *, narrowed: bool = False) -> bool:
        """Copy ``loaded_weight`` into ``param`` for global expert ``expert_id``.

        ``shard_id``: ``w1`` (gate) and ``w3`` (up) go to the two halves of ``w13``/``w13_bias``;
        ``w2`` (down) to ``w2``/``w2_bias``. Returns False (and copies nothing) when another rank owns
        the expert. A wrong shape raises WeightLoadError naming the parameter and both shapes.
        Under tensor parallelism ``loaded_weight`` is the full tensor (narrowed here to this rank's slice after
        its intermediate size is checked), or with ``narrowed=True`` already this rank's slice.
        """
        name = self._param_name(param)
        if shard_id not in SHARDS:
            raise WeightLoadError(f"{name}: shard_id must be one of {', '.join(SHARDS)}, got {shard_id!r}")
        if not 0 <= expert_id < self.global_num_experts:
            raise WeightLoadError(f"{name}: expert_id {expert_id} is out of range [0, {self.global_num_experts})")
        state = getattr(self, "quant_state", None)
        if state in ("ready", "prequantized") and name in ("w13", "w2"):  # (float weights into quantized tensors)
            if state == "prequantized":
                raise WeightLoadError(f"{name}: this layer already took pre-quantized {self.quant_method.name} "
                                      "tensors from this checkpoint, which also holds float copies of them: keep one")
            raise WeightLoadError(f"{name}: this layer holds processed {self.quant_method.name} weights; float "
                                  "weights load into a layer built with init=False, before finish_loading quantizes "
                                  "them")
        local = self.local_id(int(expert_id))
        if local is None:
            return False
        target = param.data[local]
        is_w13 = name.startswith("w13")
        if is_w13 != (shard_id in ("w1", "w3")):
            raise WeightLoadError(f"{name}: shard '{shard_id}' does not belong to this parameter "
                                  f"(w1/w3 load into w13*, w2 into w2*)")
        if is_w13:
            half = target.shape[0] // 2
            target = target[:half] if shard_id == "w1" else target[half:]
        if self.tp_size > 1 and not narrowed:  # a full checkpoint tensor: keep this rank's slice (checked first)
            loaded_weight = self._tp_narrow(name, loaded_weight, shard_id, expert_id)
        if tuple(loaded_weight.shape) != tuple(target.shape):
            raise WeightLoadError(
                f"{name} (expert {expert_id}, shard {shard_id}): checkpoint tensor has shape "
                f"{tuple(loaded_weight.shape)}, the parameter expects {tuple(target.shape)}"
            )
        target.copy_(loaded_weight.to(target.dtype))
        return True

    def _tp_narrow(self, name: str, t: torch.Tensor, shard_id: str, expert_id: int) -> torch.Tensor:
        from ..distributed.tp import TPShard

        H, I, tp, r = self.hidden_size, self.full_intermediate_size, self.tp_size, self.tp_rank
        if name == "w2_bias":
            return t if r == 0 else torch.zeros_like(t)
        dim = 1 if name == "w2" else 0
        want = {"w13": (I, H), "w13_bias": (I,), "w2": (H, I)}[name]
        if tuple(t.shape) != want:
            raise WeightLoadError(f"{name} (expert {expert_id}, shard {shard_id}): checkpoint tensor has shape "
                                  f"{tuple(t.shape)}, expected the full {want} (model.intermediate_size = {I}) "
                                  f"to slice for parallel.tp_size={tp}")
        return TPShard(dim, I, r, tp).narrow(t)

    def _param_name(self, param: torch.nn.Parameter) -> str:
        for n, p in self.named_parameters(recurse=False):
            if p is param:
                return n
        raise WeightLoadError("weight_loader got a parameter that does not belong to this FusedMoE layer")

    def implementation(self) -> str:
        return f"{super().implementation()}[{self.quant_method.name}: {self.kernel.describe()}]"

    def extra_repr(self) -> str:
        tp = f", tp {self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else ""
        return (f"experts={self.local_num_experts}/{self.global_num_experts} (ep {self.ep_rank}/{self.ep_size}, "
                f"{self.placement}{tp}), top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, activation={self.activation}, bias={self.has_bias}, "
                f"quant={self.quant_method.name}, kernel={self.kernel.describe()}")
