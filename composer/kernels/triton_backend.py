"""``kernel=triton``: the experts computed by composer's fused Triton kernels (composer::fused_experts)."""
from __future__ import annotations

import torch

import triton  # noqa: F401  (absent triton: composer.builtin skips this backend)

from ..layers.modular_kernel import Experts, ExpertWeights
from ..registry import KERNELS
from . import ops  # noqa: F401  (registers composer::fused_experts)
from .triton._jit import interpreting

FP8_METHODS = frozenset({"fp8_w8a8"})
FP8_MIN_CAPABILITY = (8, 9)


def cuda_capability():
    from ..quant.utils import cuda_capability as cap

    return cap()


@KERNELS.register("triton")
class TritonExperts(Experts):
    name = "triton"
    supported_quant = frozenset({"none", "int8_w8a16", "int8_w8a8", "int4_w4a16", "fp8_w8a8"})
    supported_dtypes = frozenset({"float32", "float16", "bfloat16"})
    needs_cuda = False  # the interpreter runs it on CPU; check() says when that is allowed

    @classmethod
    def check(cls, *, quant: str, dtype: str, device: str, quant_params=None) -> list[str]:
        problems = super().check(quant=quant, dtype=dtype, device=device)
        if quant in FP8_METHODS and getattr(quant_params, "granularity", None) == "block":
            bk = quant_params.block_shape[1]
            if bk % 16:  # one K block feeds whole fp8 tl.dot tiles
                problems.append(f"experts kernel 'triton' needs quant.block_shape[1] (the K block) to be a multiple "
                                f"of 16 for fp8 block scales, got {bk}; pick e.g. quant.block_shape=[128,128], "
                                "or kernel=torch")
        if device != "cuda":
            if not interpreting():
                problems.append(
                    f"experts kernel 'triton' needs a CUDA device, got device={device}: use kernel=torch, "
                    "or set TRITON_INTERPRET=1 to run the Triton kernels in the (slow) interpreter"
                )
            elif dtype == "bfloat16":
                problems.append(
                    "experts kernel 'triton' under TRITON_INTERPRET=1 on CPU gives wrong bfloat16 results "
                    "(the interpreter's bf16 loads are unreliable): use model.dtype=float32 or float16, or kernel=torch"
                )
            if quant in FP8_METHODS:
                problems.append(
                    f"experts kernel 'triton' under TRITON_INTERPRET=1 on CPU cannot run quant method '{quant}': the "
                    "interpreter's fp8 conversions and fp8 dots are wrong; use kernel=torch, or run it on a CUDA GPU"
                )
        elif quant in FP8_METHODS:
            cap = cuda_capability()
            if cap is not None and tuple(cap) < FP8_MIN_CAPABILITY:
                problems.append(
                    f"experts kernel 'triton' runs {quant} on fp8 tensor cores, which need compute capability >= 8.9 "
                    f"(sm89: Ada, Hopper or newer); this GPU is sm{cap[0]}{cap[1]}. Pick quant=int8_w8a16, "
                    "int8_w8a8 or int4_w4a16, or kernel=torch"
                )
        return problems

    def apply(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        weights: ExpertWeights,
        activation: str,
    ) -> torch.Tensor:
        self.refuse_unsupported(weights)
        # tracers (torch.compile, export, make_fx, jit.trace, fake / meta tensors) and autograd see the custom op (one
        # opaque node, its fake implementation for shapes, its "no autograd formula" error); a plain eager call runs
        # the same implementation without the op dispatcher (about 45 µs of host time a call on an H200 host, next to
        # 14 µs of kernels at qwen3_30b_a3b T = 1)
        from .triton import fused

        compiling = not _plain_eager(x, topk_weights, weights.w13, weights.w2, weights.w13_bias, weights.w2_bias)
        if weights.quant != "none":
            ex = weights.extra
            bn, bk = ex.get("block_shape", (128, 128))
            op = torch.ops.composer.fused_experts_quant if compiling else fused.fused_experts_quant
            return op(x, topk_weights, topk_ids, weights.w13, weights.w2, weights.w13_bias, weights.w2_bias, activation,
                      weights.quant, weights.w13_scale, weights.w2_scale, weights.a13_scale, weights.a2_scale,
                      weights.w13_zero, weights.w2_zero, ex.get("granularity", "per_token_channel"), int(bn), int(bk))
        op = torch.ops.composer.fused_experts if compiling else fused.fused_experts
        return op(x, topk_weights, topk_ids, weights.w13, weights.w2, weights.w13_bias, weights.w2_bias, activation)


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether this call runs eagerly on real tensors with nothing recording it: no tracer or dispatch mode, plain
    (not fake, meta or subclassed) tensors, and no input that autograd would have to differentiate."""
    from torch.utils import _python_dispatch

    in_mode = getattr(_python_dispatch, "is_in_torch_dispatch_mode", None)  # (fake tensors, make_fx, ...)
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)  # (vmap, grad)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or (in_mode is not None and in_mode())
            or (functorch is not None and functorch())):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not t.is_meta
               and not (grad and t.requires_grad) for t in tensors)
