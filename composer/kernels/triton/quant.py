"""Activation quantization for the w8a8 GEMMs: rows of a ``[M, K]`` tensor to fp8 (e4m3fn) or int8.

The rounding rules are those of ``composer.quant.utils`` (what ``kernel=torch`` does), in float32:
``scale = max(amax, AMAX_EPS) / QMAX`` per row (``GROUP = K``) or per row and group of ``GROUP`` columns,
or one static scale; ``q = cast(clamp(t / scale, -QMAX, QMAX))`` with a correctly rounded division; fp8
rounds to nearest even (Triton's default fp32 -> fp8e4nv conversion), int8 rounds half to even.

Outputs ``q [M, K]`` and ``scales fp32 [M, K / GROUP]`` (dequantization multipliers, ``t ~ q * scale``).
One program per (row, group); a group longer than ``BLOCK`` is walked twice (amax, then quantize).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, next_pow2

FP8_MAX = 448.0
INT8_MAX = 127.0
AMAX_EPS = 1e-10
_RNE_MAGIC = 12582912.0  # 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 to the nearest integer, ties to even


@lazy_jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm, stride_sm,
                       GROUP: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr, INT8: tl.constexpr,
                       STATIC: tl.constexpr, EPS: tl.constexpr, MAGIC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    k0 = grp * GROUP
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.full((BLOCK,), 0.0, tl.float32)
        for c in range(0, GROUP, BLOCK):
            ok = (c + offs < GROUP) & (k0 + c + offs < K)
            v = tl.load(x_row + k0 + c + offs, mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.reduce(amax, 0, tl.standard._elementwise_max), EPS) / QMAX
    tl.store(s_ptr + row * stride_sm + grp, scale)
    for c in range(0, GROUP, BLOCK):
        ok = (c + offs < GROUP) & (k0 + c + offs < K)
        v = tl.load(x_row + k0 + c + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.minimum(tl.maximum(tl.math.div_rn(v, scale + offs * 0.0), -QMAX), QMAX)
        if INT8:
            r = (r + MAGIC) - MAGIC
        tl.store(q_ptr + row * stride_qm + k0 + c + offs, r.to(q_ptr.dtype.element_ty), mask=ok)


def quant_rows(x: torch.Tensor, qdtype: torch.dtype, group: int | None = None,
               static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(q [M, K] qdtype, scales fp32 [M, K / group])``; ``group=None``: one scale per row.
    ``static_scale`` (a one-element tensor): every row uses it (``scales`` holds it per row)."""
    M, K = x.shape
    g = K if group is None or static_scale is not None else group
    if K % g:
        raise ValueError(f"group {g} must divide K = {K}")
    q = torch.empty(M, K, dtype=qdtype, device=x.device)
    s = torch.empty(M, K // g, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, s
    if x.stride(1) != 1:
        x = x.contiguous()
    int8 = qdtype == torch.int8
    block = min(next_pow2(g), 2048)
    st = static_scale.reshape(1).to(torch.float32) if static_scale is not None else s
    _quant_rows_kernel[(M, K // g)](
        x, q, s, st, K, x.stride(0), q.stride(0), s.stride(0),
        GROUP=g, BLOCK=block, QMAX=INT8_MAX if int8 else FP8_MAX, INT8=int8, STATIC=static_scale is not None,
        EPS=AMAX_EPS, MAGIC=_RNE_MAGIC, num_warps=4 if block >= 512 else 1,
    )
    return q, s
