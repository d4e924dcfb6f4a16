"""Tensor parallelism of the experts: every rank holds every expert, each with a slice of its
intermediate dimension, and the partial outputs are summed across the ranks (all-reduce).

With ``parallel.tp_size = n`` and tensor-parallel rank ``r``, ``I_r = I / n`` and the rank keeps rows
``[r*I_r, (r+1)*I_r)`` of the gate half **and** the same rows of the up half of ``w13`` (so the activation
``act(gate) * up`` pairs the right rows), and the same columns of ``w2``::

    w13 [E, 2*I_r, H]   = cat(w13_full[:, r*I_r:(r+1)*I_r], w13_full[:, I + r*I_r : I + (r+1)*I_r])
    w2  [E, H, I_r]     = w2_full[:, :, r*I_r:(r+1)*I_r]
    w13_bias [E, 2*I_r] sharded like w13;  w2_bias [E, H]: the full bias on rank 0, zeros on the others
                        (the bias is added once; the kernels add routing_weight * w2_bias per expert, so the
                        zero bias of the other ranks adds exactly nothing)

Shared experts are sharded the same way (``gate_proj``/``up_proj`` rows, ``down_proj`` columns; the
optional sigmoid gate is replicated and applied after the reduction). Each reduces its own output.

Rules (checked at validation, ``check_tp_config``):

* ``parallel.tp_size`` with ``parallel.ep_size > 1`` is refused (one kind of model parallelism per run);
  the world size must equal ``tp_size`` (checked at start-up by ``runtime.init_from_env``).
* ``model.intermediate_size`` (and the shared experts' total intermediate size) must be divisible by
  ``tp_size``; the quant method is asked (``QuantMethod.check_tp``) whether its scales can be sharded at
  that size: per-channel and block scales are narrowed with their weights, group-wise int4 needs whole
  groups per rank; scales whose reduction spans the sharded dimension (per-tensor fp8, the per-row ``w2``
  scales) are computed from the all-reduced maximum, so the TP model quantizes exactly as one rank does.
* ``parallel.sequence_parallel=true`` (needs ``tp_size > 1``): each rank holds its own tokens (its shard of the
  sequence) through the norm, gate, router and residual; the experts (and shared experts) all-gather the tokens
  of the group, compute their slice for all of them and reduce-scatter the partial outputs back to the ranks
  that own the tokens (uneven counts padded; token counts exchanged on the host metadata group).
* Only layers built from ``FusedMoE`` by composer's factory (``layer=fused_moe``) can be sharded.

Seeded init generates each expert's full weights (per (seed, layer, global expert id)) and keeps the
rank's slice, so the TP model equals the single-rank model of the same seed. Checkpoint loading
(``composer.loading``) narrows each tensor with ``safe_open(...).get_slice`` *before* reading, after
checking its full shape: a checkpoint whose intermediate size differs from the config is refused with
both sizes named (``narrow_*`` below).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import WeightLoadError


@dataclass(frozen=True)
class TPShard:
    """How a parameter is sliced from its full tensor: ``dim`` of size ``full`` cut into ``size`` parts,
    this rank keeps part ``rank``. ``halves``: the dim holds two stacked halves (gate, up), each cut."""

    dim: int
    full: int
    rank: int
    size: int
    halves: bool = False

    @property
    def part(self) -> int:
        return self.full // self.size

    def ranges(self) -> list[tuple[int, int]]:
        """[start, end) ranges of the full dim this rank keeps, in the order they are stacked locally."""
        if self.halves:
            half, p = self.full // 2, self.full // 2 // self.size
            return [(h * half + self.rank * p, h * half + (self.rank + 1) * p) for h in (0, 1)]
        return [(self.rank * self.part, (self.rank + 1) * self.part)]

    def narrow(self, full: torch.Tensor, dim_offset: int = 0) -> torch.Tensor:
        """This rank's slice of ``full`` (``dim`` counted after ``dim_offset`` leading dims)."""
        d = self.dim + dim_offset
        return torch.cat([full.narrow(d, s, e - s) for s, e in self.ranges()], dim=d)


def tp_place(cfg: Any, tp_rank: int | None, group: Any) -> tuple[int, int, Any]:
    """(tp_rank, tp_size, group) as given, else the distributed runtime's under tensor parallelism."""
    tp_size = getattr(cfg.parallel, "tp_size", 1)
    if tp_size == 1:
        return 0, 1, None
    if tp_rank is not None:
        if not 0 <= tp_rank < tp_size:  # (a slice of another rank's, or none: silently the wrong weights)
            raise ValueError(f"tp_rank={tp_rank} must be in [0, {tp_size}) (parallel.tp_size = {tp_size})")
        return tp_rank, tp_size, group
    from .runtime import DistributedError, current

    state = current()
    if state is not None and getattr(state, "tp_size", 1) == tp_size:
        return state.tp_rank, tp_size, group if group is not None else state.tp_group
    raise DistributedError(f"parallel.tp_size = {tp_size} but this process has no tensor-parallel runtime: call "
                           "composer.distributed.runtime.init_from_env(cfg) first (the CLI does), or pass "
                           "tp_rank= and tp_group= to build()")


# ------------------------------------------------------------------------------------------------
# Collectives

class _Timer:
    """Optional host-side timing of the all-reduces (``tp_bench`` turns it on)."""

    enabled = False
    sync: Callable[[], None] | None = None
    times: list[float] = []


def all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``t`` over the tensor-parallel group (in place on a contiguous copy; returns the sum)."""
    from .runtime import collective

    if not t.is_contiguous():
        t = t.contiguous()
    if _Timer.enabled:
        import time

        if _Timer.sync is not None:
            _Timer.sync()
        t0 = time.perf_counter()
    with collective("the tensor-parallel all-reduce of the experts' partial outputs"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if _Timer.enabled:
        if _Timer.sync is not None:
            _Timer.sync()
        _Timer.times.append(time.perf_counter() - t0)
    return t


def sp_gather(cols: list[torch.Tensor], group: Any, tp_size: int) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Sequence parallelism: all-gather this rank's token rows (``cols``: ``[T, c_i]`` tensors, any dtypes)
    from every rank of the group, padded to the largest count with zero rows. Returns the gathered columns
    (``[tp_size * tmax, c_i]``) and the context for ``sp_scatter``."""
    from ._common import all_gather_single, gather_counts, pack, unpack
    from .runtime import collective

    T = cols[0].shape[0]
    tmax = max(gather_counts(group, T, tp_size))
    if tmax == 0:
        return cols, (T, 0)
    if tmax > T:
        cols = [torch.cat([c, c.new_zeros(tmax - T, *c.shape[1:])]) for c in cols]
    rows = pack([c.reshape(tmax, -1) for c in cols])
    gathered = torch.empty(tp_size * tmax, rows.shape[1], dtype=rows.dtype, device=rows.device)
    with collective("the sequence-parallel all-gather of the tokens"):
        all_gather_single(gathered, rows, group=group)
    out = unpack(gathered, [(c.dtype, c.reshape(tmax, -1).shape[1]) for c in cols])
    return out, (T, tmax)


def sp_scatter(out: torch.Tensor, ctx: tuple[int, int], group: Any) -> torch.Tensor:
    """Sequence parallelism: sum the partial outputs of all gathered rows over the group and give each rank
    the rows of its own tokens (reduce-scatter)."""
    from ._common import reduce_scatter_single
    from .runtime import collective

    T, tmax = ctx
    if tmax == 0:
        return out
    mine = torch.empty(tmax, *out.shape[1:], dtype=out.dtype, device=out.device)
    with collective("the sequence-parallel reduce-scatter of the partial outputs"):
        reduce_scatter_single(mine, out.contiguous(), group=group)
    return mine[:T]


def amax_reducer(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """For online quantization: the maximum over the TP ranks of a per-rank amax (scales spanning the
    sharded dim then equal the single-rank scales exactly)."""
    from .runtime import collective

    def reduce(amax: torch.Tensor) -> torch.Tensor:
        amax = amax.contiguous().clone()
        with collective("the tensor-parallel all-reduce of quantization scales"):
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        return amax

    return reduce


# ------------------------------------------------------------------------------------------------
# Validation

def check_tp_config(model: Any, parallel: Any, quant: Any, layer: Any) -> list[tuple[str, Any, str]]:
    """(dotted key, value, message) for each problem of a tensor-parallel config."""
    from .. import registry
    from ..layers.fused_moe import FusedMoE

    tp = parallel.tp_size
    out: list[tuple[str, Any, str]] = []
    if parallel.sequence_parallel and tp == 1:
        out.append(("parallel.sequence_parallel", True,
                    "sequence parallelism splits the tokens across the tensor-parallel ranks and needs "
                    "parallel.tp_size > 1; set parallel.tp_size or parallel.sequence_parallel=false"))
    if tp == 1:
        return out
    if parallel.ep_size > 1:
        out.append(("parallel.tp_size", tp,
                    f"tensor parallelism cannot be combined with expert parallelism (parallel.ep_size = "
                    f"{parallel.ep_size}); use parallel.tp_size={tp} parallel.ep_size=1 or "
                    f"parallel.ep_size={parallel.ep_size * tp} parallel.tp_size=1"))
    I = model.intermediate_size
    if I % tp:
        out.append(("parallel.tp_size", tp, f"must divide model.intermediate_size = {I} (each rank keeps "
                    f"intermediate_size / tp_size rows of every expert); choose a divisor of {I}"))
    if model.num_shared_experts:
        S = (model.shared_expert_intermediate_size or I) * model.num_shared_experts
        if S % tp:
            out.append(("parallel.tp_size", tp, f"must divide the shared experts' intermediate size "
                        f"{S} (model.shared_expert_intermediate_size x model.num_shared_experts)"))
    if layer is not None:
        cls = registry.LAYERS.get(layer.name)
        if not issubclass(cls, FusedMoE) or getattr(cls, "build_model", None) is not None:
            out.append(("layer.name", layer.name, f"layer '{layer.name}' cannot be sharded across tensor-parallel "
                        "ranks; use layer=fused_moe with parallel.tp_size > 1"))
    if quant is not None and I % tp == 0:
        method = registry.QUANT_METHODS.get(quant.name)
        check = getattr(method, "check_tp", None)
        if check is None:
            out.append(("quant.name", quant.name, f"quant method '{quant.name}' does not say whether its weights "
                        "can be sharded (no check_tp); use parallel.tp_size=1"))
        else:
            out.extend((f"quant.{k}" if k else "quant.name", v, m) for k, v, m in check(quant.params, model, tp))
    return out


# ------------------------------------------------------------------------------------------------
# Shards of the FusedMoE parameters

def expert_shard(layer: Any, pname: str) -> TPShard | None:
    """The shard of FusedMoE parameter ``pname`` (per expert, i.e. without the expert dim); None when the
    parameter is replicated (``w2_bias``: full on rank 0, zeros elsewhere)."""
    if layer.tp_size == 1:
        return None
    I = layer.full_intermediate_size
    if pname in ("w13", "w13_bias"):
        return TPShard(0, 2 * I, layer.tp_rank, layer.tp_size, halves=True)
    if pname == "w2":
        return TPShard(1, I, layer.tp_rank, layer.tp_size)
    return None


def full_expert_shape(layer: Any, pname: str) -> tuple[int, ...]:
    """The shape of one expert's full (unsharded) parameter."""
    H, I = layer.hidden_size, layer.full_intermediate_size
    return {"w13": (2 * I, H), "w2": (H, I), "w13_bias": (2 * I,), "w2_bias": (H,)}[pname]


def shard_expert(layer: Any, pname: str, full: torch.Tensor) -> torch.Tensor:
    """One expert's full tensor -> this rank's part of it (``w2_bias``: zeros off rank 0)."""
    s = expert_shard(layer, pname)
    if s is not None:
        return s.narrow(full)
    if pname == "w2_bias" and layer.tp_rank != 0:
        return torch.zeros_like(full)
    return full


def _size_error(key: str, got: tuple[int, ...], want: tuple[int, ...], dim: int | None, layer_I: int, tp: int
                ) -> WeightLoadError:
    if dim is not None and len(got) == len(want) and got[dim] != want[dim] and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != dim):
        factor = want[dim] // layer_I  # 2 for the stacked gate/up
        return WeightLoadError(f"{key}: the checkpoint's intermediate size is {got[dim] // factor} but "
                               f"model.intermediate_size = {layer_I}; refusing to slice it for "
                               f"parallel.tp_size={tp} (checkpoint shape {got}, expected {want})")
    return WeightLoadError(f"{key}: checkpoint tensor has shape {got}, expected {want} (full, before the "
                           f"parallel.tp_size={tp} slice)")


def read_per_expert(layer: Any, f: Any, key: str, pname: str, shard: str) -> torch.Tensor | None:
    """Read this rank's slice of a per-expert checkpoint tensor (``gate_proj``/``up_proj``: rows,
    ``down_proj``: columns), after checking its full shape. None for ``w2_bias`` off rank 0 (not read)."""
    sl = f.get_slice(key)
    shape = tuple(sl.get_shape())
    H, I, tp, r = layer.hidden_size, layer.full_intermediate_size, layer.tp_size, layer.tp_rank
    bias = pname.endswith("_bias")
    if shard in ("w1", "w3"):
        want, dim = ((I,), 0) if bias else ((I, H), 0)
    else:
        want, dim = ((H,), None) if bias else ((H, I), 1)
    if shape != want:
        raise _size_error(key, shape, want, dim, I, tp)
    if pname == "w2_bias":
        return sl[:] if r == 0 else None
    p = I // tp
    s, e = r * p, (r + 1) * p
    return sl[s:e] if dim == 0 else sl[:, s:e]


def read_packed(layer: Any, sl: Any, key: str, pname: str, g: int) -> torch.Tensor | None:
    """Read this rank's slice of global expert ``g`` of a packed checkpoint tensor ``[E, ...]``.
    The full shape must have been checked with ``check_packed_shape``. None: ``w2_bias`` off rank 0."""
    if pname == "w2_bias":
        return sl[g:g + 1][0] if layer.tp_rank == 0 else None
    s = expert_shard(layer, pname)
    parts = []
    for a, b in s.ranges():
        parts.append(sl[g:g + 1, a:b][0] if s.dim == 0 else sl[g:g + 1, :, a:b][0])
    return torch.cat(parts, dim=s.dim)


def check_packed_shape(layer: Any, key: str, pname: str, shape: tuple[int, ...]) -> None:
    want = (layer.global_num_experts, *full_expert_shape(layer, pname))
    if shape != want:
        dim = {"w13": 1, "w13_bias": 1, "w2": 2, "w2_bias": None}[pname]
        raise _size_error(key, shape, want, dim, layer.full_intermediate_size, layer.tp_size)


def read_sharded(param: torch.Tensor, f: Any, key: str) -> torch.Tensor:
    """A non-expert parameter with a ``tp_shard`` (shared experts): check the full shape, read the slice."""
    s: TPShard = param.tp_shard  # type: ignore[attr-defined]
    sl = f.get_slice(key)
    shape = tuple(sl.get_shape())
    want = list(param.shape)
    want[s.dim] = s.full
    want = tuple(want)
    if shape != want:
        raise _size_error(key, shape, want, s.dim, s.full, s.size)
    (a, b), = s.ranges()
    return sl[a:b] if s.dim == 0 else sl[:, a:b]


def check_quantized_shape(layer: Any, spec: Any, shape: tuple[int, ...], name: str, method: str) -> None:
    """A pre-quantized checkpoint tensor's shape (``composer.quant.loading``) under tensor parallelism:
    ``spec.shapes`` are this rank's (the layer's intermediate size is its slice); the checkpoint holds the full
    tensor, with ``spec.tp_dim`` ``tp_size`` times larger."""
    tp = layer.tp_size
    if spec.tp_dim is None:
        full_shapes = spec.shapes
    else:
        full_shapes = tuple(tuple(d * tp if i == spec.tp_dim else d for i, d in enumerate(s)) for s in spec.shapes)
    if shape not in full_shapes:
        want = " or ".join(str(s) for s in full_shapes)
        hint = ""
        if spec.tp_dim is not None and any(len(s) == len(shape) and all(a == b for i, (a, b) in enumerate(zip(s, shape))
                                                                        if i != spec.tp_dim) for s in full_shapes):
            expected = full_shapes[0][spec.tp_dim]
            hint = (f"; its intermediate dim is {shape[spec.tp_dim]}, not {expected} (model.intermediate_size = "
                    f"{layer.full_intermediate_size}): refusing to slice it for parallel.tp_size={tp}")
        raise WeightLoadError(f"{name}: checkpoint tensor has shape {shape}, {method} expects {want} (full, all "
                              f"{layer.global_num_experts} experts){hint or '; check model.* sizes and quant.*'}")


def read_quantized(layer: Any, spec: Any, sl: Any, shape: tuple[int, ...], name: str, method: str) -> torch.Tensor:
    """A pre-quantized checkpoint tensor under tensor parallelism, its full shape checked
    (``check_quantized_shape``): only this rank's slice is read (replicated tensors, ``tp_dim=None``, whole)."""
    check_quantized_shape(layer, spec, shape, name, method)
    if spec.tp_dim is None:
        return sl[:]
    s = TPShard(spec.tp_dim, shape[spec.tp_dim], layer.tp_rank, layer.tp_size, halves=spec.tp_halves)
    lead = (slice(None),) * spec.tp_dim
    return torch.cat([sl[lead + (slice(a, b),)] for a, b in s.ranges()], dim=spec.tp_dim)


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    from ..layers.fused_moe import FusedMoE

    return any(isinstance(m, FusedMoE) and getattr(m, "tp_size", 1) > 1 for m in model.modules())
