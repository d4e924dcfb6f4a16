"""The fused-MoE modular kernel: prepare/finalize (token movement) x experts (the math).

As in vLLM's modular kernel, the two halves are independent: any all2all backend composes with any
experts kernel. ``topk_ids`` reaching the experts are *local* expert ids; ``-1`` marks a (token, slot)
pair whose expert lives on another rank, and the experts kernel skips it.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..errors import ComposerError

# What ``Experts.apply`` is called with (ModularKernel checks a kernel's apply takes them, once).
_APPLY_ARGS = ("x", "topk_weights", "topk_ids", "weights", "activation")


@dataclass
class ExpertWeights:
    """What an experts kernel needs from the layer: weights, optional biases, and quantization data.

    Unquantized: ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` in the activation dtype. Quantized methods fill
    the scale fields and name themselves in ``quant``.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    quant: str = "none"
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None
    w13_zero: torch.Tensor | None = None
    w2_zero: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def select(self, experts: torch.Tensor) -> "ExpertWeights":
        """These weights for ``experts`` only (every tensor whose first dim is the expert count indexed, in that
        order): kernel=torch on the experts a routing touches, remapped to ``0..len - 1``, checks a call without
        dequantizing all of them (deepseek_v3's 256 would not fit)."""
        E = self.num_experts
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in picked.items():
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == E:
                picked[name] = v.index_select(0, experts.to(v.device))
        return ExpertWeights(**picked)


@dataclass
class PreparedTokens:
    """Tokens as the experts kernel sees them, plus whatever finalize needs to undo the move."""

    x: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    context: Any = None


class PrepareFinalize(ABC):
    """Moves tokens to the ranks owning their experts (prepare) and back (finalize)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens: ...

    @abstractmethod
    def finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor: ...


class Experts(ABC):
    """An experts kernel backend: computes sum_k w_k * W2_e(act(W13_e x)) for each token.

    Backends declare what they support so that an impossible combination is refused when the
    config is validated, not at the first forward.
    """

    name: ClassVar[str] = ""
    supported_quant: ClassVar[frozenset[str]] = frozenset({"none"})
    supported_dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "float16", "bfloat16"})
    needs_cuda: ClassVar[bool] = False

    @classmethod
    def check(cls, *, quant: str, dtype: str, device: str, name: str | None = None) -> list[str]:
        """Problems with running this backend for a (quant method, dtype, device); empty when fine.

        A backend whose limits depend on the method's parameters may add a ``quant_params`` keyword:
        validation passes the validated ``quant.*`` params to a ``check`` that accepts it. ``name``: the registry
        name the config chose (validation passes it to a ``check`` that accepts it), shown in the messages.
        """
        name = name or cls.name
        problems = []
        if quant not in cls.supported_quant:
            problems.append(
                f"experts kernel '{name}' does not support quant method '{quant}'; "
                f"it supports: {', '.join(sorted(cls.supported_quant))}"
            )
        if dtype not in cls.supported_dtypes:
            problems.append(
                f"experts kernel '{name}' does not support dtype '{dtype}'; "
                f"it supports: {', '.join(sorted(cls.supported_dtypes))}"
            )
        if cls.needs_cuda and device != "cuda":
            problems.append(f"experts kernel '{name}' needs a CUDA device; on {device} use kernel=torch")
        return problems

    def refuse_unsupported(self, weights: ExpertWeights) -> None:
        """For ``apply``: weights of a quant method this backend does not claim are an error, never a wrong answer
        (validation refuses the config earlier; this guards direct calls)."""
        if weights.quant not in self.supported_quant:
            raise ValueError(f"experts kernel '{self.name}' does not support quant method '{weights.quant}'; "
                             f"it supports: {', '.join(sorted(self.supported_quant))}")

    @abstractmethod
    def apply(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        weights: ExpertWeights,
        activation: str,
    ) -> torch.Tensor:
        """``x [T, H]``, ``topk_weights [T, k]`` fp32, ``topk_ids [T, k]`` int32 local ids -> ``[T, H]``."""


class ExpertsKernelError(ComposerError, TypeError):
    """An experts kernel broke its contract (``Experts.apply``): a bug in that kernel, named by its registry name."""


class ModularKernel:
    """prepare -> experts -> finalize."""

    def __init__(self, prepare_finalize: PrepareFinalize, experts: Experts):
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        try:  # (once, here: the forward stays free of it)
            inspect.signature(experts.apply).bind(*_APPLY_ARGS)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ExpertsKernelError(
                f"experts kernel '{experts.name}' ({type(experts).__qualname__}): its apply cannot be called as "
                f"apply({', '.join(_APPLY_ARGS)}) ({exc}); give it Experts.apply's signature, or choose another "
                "kernel (kernel=torch)") from None

    def __call__(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        weights: ExpertWeights,
        activation: str,
    ) -> torch.Tensor:
        prepared = self.prepare_finalize.prepare(x, topk_weights, topk_ids)
        out = self.experts.apply(prepared.x, prepared.topk_weights, prepared.topk_ids, weights, activation)
        self._check_output(out, prepared.x, x.dtype)
        return self.prepare_finalize.finalize(out, prepared)

    def _check_output(self, out: Any, x: torch.Tensor, dtype: torch.dtype) -> None:
        """What the experts kernel returned must be a tensor of its input's shape and device (``x [T, H]``, the
        tokens prepare gave it) in the layer's dtype (``dtype``: an all2all may dispatch in another, fp8 say).
        Metadata only (no host sync), so it traces under torch.compile(fullgraph=True) and adds nothing to a CUDA
        graph."""
        if isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == dtype and out.device == x.device:
            return
        got = (f"a tensor of shape {tuple(out.shape)}, dtype {out.dtype}, on {out.device}"
               if isinstance(out, torch.Tensor) else f"{type(out).__name__}, not a torch.Tensor")
        raise ExpertsKernelError(
            f"experts kernel '{self.experts.name}' ({type(self.experts).__qualname__}): apply returned {got}; expected "
            f"a tensor of its input x's shape {tuple(x.shape)} on {x.device}, in the layer's dtype {dtype}. Fix the "
            "kernel's apply, or choose another kernel (kernel=torch)")

    def describe(self) -> str:
        return f"{self.prepare_finalize.name} x {self.experts.name}"
