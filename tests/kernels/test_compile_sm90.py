"""Every kernel path compiles for an H100 (sm_90) on this CPU machine: the compiler's checks the interpreter lacks
(composer/kernels/triton/cross_compile.py). Each case runs the real wrapper with its launches recorded, then compiles every launch
with its own arguments, constexprs and options: the GEMV decode in each int4 read and with mma, the tl.dot decode,
the align + grouped GEMMs, every quant method, fp32 / fp16 / bf16."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from composer.kernels.triton._jit import lazy_jit  # noqa: E402
from composer.kernels.triton.configs import validate_entry  # noqa: E402
from composer.kernels.triton.cross_compile import compile_sm90, recorded_launches, registers  # noqa: E402
from composer.kernels.triton.fused import fused_experts, fused_experts_quant  # noqa: E402

from ._interpreter import interpreter  # noqa: E402
from .test_triton_experts import make_case  # noqa: E402
from .test_triton_quant import quantize  # noqa: E402


def gemv_cfg(g1: dict | None = None, g2: dict | None = None) -> dict:
    return {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic",
            "gemm1": {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2, **(g1 or {})},
            "gemm2": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2, "SPLIT_K": 2, **(g2 or {})}}


PLANES = {"int4_read": "planes", "unroll": 2}
CASES = [  # name, T, dtype, method, quant params, config (None: the heuristic / tuned tiles), activation, bias
    ("bf16-gemv", 1, torch.bfloat16, None, {}, gemv_cfg(), "silu", True),
    ("bf16-gemv-mma", 1, torch.bfloat16, None, {}, gemv_cfg({"mma": True}, {"mma": True}), "swigluoai", False),
    ("fp32-dot-decode", 1, torch.float32, None, {}, None, "gelu", True),
    ("fp16-grouped", 16, torch.float16, None, {}, None, "silu", True),
    ("bf16-grouped-buffer", 16, torch.bfloat16, None, {}, "buffer", "silu", False),
    ("int4-planes", 1, torch.bfloat16, "int4_w4a16", {"group_size": 128}, gemv_cfg(PLANES, PLANES), "silu", False),
    ("int4-planes-zero-stages", 1, torch.float16, "int4_w4a16", {"group_size": 64, "zero_point": True},
     gemv_cfg({**PLANES, "BLOCK_K": 256, "loop_stages": 3}, PLANES), "silu", False),
    ("int4-subnormal", 1, torch.bfloat16, "int4_w4a16", {"group_size": 128},
     gemv_cfg({**PLANES, "int4_read": "subnormal"}, {"int4_read": "subnormal", "BLOCK_K": 256}), "silu", False),
    ("int4-subnormal-zero", 1, torch.float16, "int4_w4a16", {"group_size": 64, "zero_point": True},
     gemv_cfg({"int4_read": "subnormal", "BLOCK_K": 256}, {"int4_read": "subnormal"}), "silu", False),
    ("int4-subnormal-gemm1-split", 1, torch.bfloat16, "int4_w4a16", {"group_size": 128},
     gemv_cfg({"int4_read": "subnormal", "BLOCK_K": 256, "SPLIT_K": 2}, {"int4_read": "subnormal"}), "swigluoai",
     False),
    ("bf16-gemv-gemm1-split", 1, torch.bfloat16, None, {}, gemv_cfg({"SPLIT_K": 2}), "gelu", True),
    ("int4-words", 1, torch.bfloat16, "int4_w4a16", {"group_size": 128}, gemv_cfg({"int4_read": "words"},
                                                                                 {"int4_read": "bytes"}), "silu", False),
    ("int4-words_4d", 1, torch.bfloat16, "int4_w4a16", {"group_size": 32}, gemv_cfg({"int4_read": "words_4d"}),
     "silu", False),
    ("int4-grouped", 16, torch.bfloat16, "int4_w4a16", {"group_size": 128, "zero_point": True}, None, "silu", False),
    ("int8_w8a16-gemv", 1, torch.bfloat16, "int8_w8a16", {}, gemv_cfg(), "silu", False),
    ("int8_w8a8-gemv-mma", 1, torch.bfloat16, "int8_w8a8", {}, gemv_cfg(None, {"mma": True}), "silu", False),
    ("int8_w8a8-grouped", 16, torch.bfloat16, "int8_w8a8", {}, None, "silu", False),
    ("fp8-pc-gemv", 1, torch.bfloat16, "fp8_w8a8", {"granularity": "per_token_channel"},
     gemv_cfg({"BLOCK_K": 512, "unroll": 2}, {"mma": True}), "silu", False),
    ("fp8-static-decode", 1, torch.bfloat16, "fp8_w8a8", {"granularity": "per_tensor", "activation_scheme": "static"},
     None, "silu", False),
    ("fp8-block-grouped", 16, torch.bfloat16, "fp8_w8a8", {"granularity": "block", "block_shape": (128, 128)}, None,
     "silu", False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_kernels_compile_for_sm90(case):
    name, T, dtype, method, params, cfg, act, bias = case
    x, tw, ids, w13, w2, b13, b2 = make_case(T, 8, 2, 256, 256, dtype, bias, 0.0, seed=1)
    if cfg == "buffer":  # the heuristic's tiles with per-pair rows summed by moe_sum
        from composer.kernels.triton.configs import get_config

        cfg = {**get_config(T, 8, 256, 256, 2, dtype, x.device), "reduce": "buffer"}
    with recorded_launches() as calls:
        if method is None:
            fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=cfg)
        else:
            w = quantize(method, w13, w2, b13, b2, **params)
            ex = w.extra or {}
            fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, act, method, w.w13_scale, w.w2_scale,
                                w.a13_scale, w.a2_scale, w.w13_zero, w.w2_zero,
                                ex.get("granularity", "per_token_channel"), *ex.get("block_shape", (128, 128)),
                                config=cfg)
    names = {kernel.__name__ for kernel, _, _ in calls}
    expected = "_gemv_kernel" if isinstance(cfg, dict) and cfg.get("decode") == "gemv" else "_gemm1_kernel"
    assert expected in names, names  # the path the case is named for ran
    for kernel, args, kwargs in calls:
        compiled = compile_sm90(kernel, args, kwargs)
        assert compiled.asm["cubin"], kernel.__name__


# rows per block, dtype, quant params, tile: 64 rows take INT4_PAIRS (K tile inside a group of 128, and across groups
# of 32), 16 rows INT4_QPAIRS (the 256-deep tile fitted to the group of 128 / 64)
PAIRS_COMPILE_CASES = [
    (64, torch.bfloat16, {"group_size": 128}, {"BLOCK_N": 64, "BLOCK_K": 64, "num_stages": 3}),
    (64, torch.float16, {"group_size": 32, "zero_point": True}, {"BLOCK_N": 64, "BLOCK_K": 64, "num_stages": 3}),
    (16, torch.bfloat16, {"group_size": 128}, {"BLOCK_N": 32, "BLOCK_K": 256, "num_stages": 4}),
    (16, torch.float16, {"group_size": 64, "zero_point": True}, {"BLOCK_N": 32, "BLOCK_K": 256, "num_stages": 4}),
]


@pytest.mark.parametrize("case", PAIRS_COMPILE_CASES, ids=lambda c: f"{c[0]}rows-{str(c[1])[6:]}-g{c[2]['group_size']}")
def test_int4_pairs_compile_for_sm90(case):
    """The expert-sorted int4 blocks of a bf16 / fp16 model take INT4_PAIRS (64+ rows) or INT4_QPAIRS (16-32 rows),
    inline PTX that only the GPU runs (test_gpu_int4_pairs_equal_the_fp32_dequantize and
    test_gpu_int4_qpairs_match_the_dequantized_weights check its values); ptxas accepts it without spills, and at 16
    rows the dot reads the weights from registers (INT4_PAIRS' multi-operand PTX there stored its tile to shared
    memory in st.shared.v4 vectors)."""
    bm, dtype, params, tile = case
    x, tw, ids, w13, w2, _, _ = make_case(40 if bm == 64 else 16, 8, 2, 256, 384, dtype, False, 0.0, seed=3)
    w = quantize("int4_w4a16", w13, w2, **params)
    g = {**tile, "GROUP_M": 1, "num_warps": 4}
    with recorded_launches() as calls:
        fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale, w.w2_scale,
                            None, None, w.w13_zero, w.w2_zero,
                            config={"BLOCK_M": bm, "decode": False, "reduce": "atomic", "gemm1": g, "gemm2": g})
    gemms = [(k, a, kw) for k, a, kw in calls if k.__name__ in ("_gemm1_kernel", "_gemm2_kernel")]
    assert len(gemms) == 2
    op = "fma.rn.bf16x2" if dtype == torch.bfloat16 else "fma.rn.f16x2"
    want = (1 if dtype == torch.bfloat16 else 2) + (2 if bm < 64 else 0)
    for kernel, args, kwargs in gemms:
        assert kwargs["PAIRS"] == want, (kernel.__name__, kwargs["PAIRS"])
        ptx = (compiled := compile_sm90(kernel, args, kwargs)).asm["ptx"]
        assert op in ptx and (bm == 64 or "st.shared.v4" not in ptx), kernel.__name__
        assert registers(compiled)[1] == 0, (kernel.__name__, registers(compiled))


# rows per block, dtype, tile: 16 rows run mma.sync with the weights as the dot's B operand; 64 rows swap the operands
# (SWAP_AB: the weights are wgmma's A, read from registers) unless the tile says "swap": false; 128 rows do not swap
INT8_COMPILE_CASES = [
    (16, torch.bfloat16, {"BLOCK_N": 32, "BLOCK_K": 256, "num_stages": 4}, False),
    (64, torch.float16, {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 3}, True),
    (64, torch.bfloat16, {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 3, "swap": False}, False),
    (128, torch.bfloat16, {"BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 3, "num_warps": 8}, False),
]


@pytest.mark.parametrize("case", INT8_COMPILE_CASES, ids=lambda c: f"{c[0]}rows-{str(c[1])[6:]}-swap{c[3]}")
def test_int8_q_compiles_for_sm90(case):
    """int8_w8a16's expert-sorted blocks take INT8_Q (the integers q from inline PTX, four weights per asm call into
    mma.sync's operand, two per call into a swapped wgmma's register operand), which only the GPU runs
    (test_gpu_int8_q_matches_the_dequantized_weights checks its values); ptxas accepts every form without spills,
    the PTX's packed FMA is there, and the swapped form's wgmma reads its A operand from registers."""
    bm, dtype, tile, swap = case
    x, tw, ids, w13, w2, _, _ = make_case(bm, 8, 2, 256, 384, dtype, False, 0.0, seed=4)
    w = quantize("int8_w8a16", w13, w2)
    g = {"GROUP_M": 1, "num_warps": 4, **tile}
    with recorded_launches() as calls:
        fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int8_w8a16", w.w13_scale, w.w2_scale,
                            config={"BLOCK_M": bm, "decode": False, "reduce": "atomic", "gemm1": g, "gemm2": g})
    gemms = [(k, a, kw) for k, a, kw in calls if k.__name__ in ("_gemm1_kernel", "_gemm2_kernel")]
    assert len(gemms) == 2
    op = "fma.rn.bf16x2" if dtype == torch.bfloat16 else "fma.rn.f16x2"
    for kernel, args, kwargs in gemms:
        assert kwargs["I8Q"] == (1 if dtype == torch.bfloat16 else 2) and kwargs["SWAP"] == swap, kernel.__name__
        ptx = (compiled := compile_sm90(kernel, args, kwargs)).asm["ptx"]
        assert op in ptx and _wgmma_reg_a(ptx) == swap, kernel.__name__
        assert registers(compiled)[1] == 0, (kernel.__name__, registers(compiled))


def _wgmma_reg_a(ptx: str) -> bool:
    """Whether a wgmma in ``ptx`` takes its A operand from registers: a ``{...}`` vector right after the accumulators'
    (a shared-memory A is a 64-bit descriptor there)."""
    import re

    return bool(re.search(r"wgmma\.mma_async[^;]*\}\s*,\s*\{", ptx))


def test_x_vec_compiles_for_sm90():
    """``x_vec`` (the GEMV's 16-byte activation loads) compiles in both GEMMs of the subnormal read."""
    x, tw, ids, w13, w2, _, _ = make_case(1, 8, 2, 256, 256, torch.bfloat16, False, 0.0, seed=1)
    w = quantize("int4_w4a16", w13, w2, group_size=128)
    sub = {"int4_read": "subnormal", "BLOCK_K": 256, "x_vec": True}
    with recorded_launches() as calls:
        fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale, w.w2_scale,
                            config=gemv_cfg({**sub, "unroll": 2}, sub))
    assert len(calls) == 2 and all(kw.get("X_VEC") for _, _, kw in calls), [kw.get("X_VEC") for _, _, kw in calls]
    for kernel, args, kwargs in calls:
        assert compile_sm90(kernel, args, kwargs).asm["cubin"]


def _loop_conversions(ttgir: str) -> int:
    """Layout conversions (``ttg.convert_layout``: a round trip through shared memory or shuffles) before the last
    loop's end in a TTGIR: the GEMV's K loops come last, so these are the ones inside the K loop (or before it)."""
    lines = ttgir.splitlines()
    end = max(i for i, line in enumerate(lines) if "scf.yield" in line)
    return sum("ttg.convert_layout" in line for line in lines[:end])


@pytest.mark.parametrize("bk", [256, 512])
def test_chain_read_compiles_without_layout_conversions_in_its_loop(bk, monkeypatch):
    """The "chain" int4 read compiles for sm_90 in both GEMMs with no layout conversion in its K loop (its reason to
    exist) and 16-byte weight loads, with the scale gather gemv.chain_scales_transposed() picks for the installed
    Triton; the other gather puts a conversion of the accumulator into every K step (what the choice is for)."""
    import re

    from composer.kernels.triton import gemv

    x, tw, ids, w13, w2, _, _ = make_case(1, 8, 2, 1024, 512, torch.bfloat16, False, 0.0, seed=1)
    w = quantize("int4_w4a16", w13, w2, group_size=128, zero_point=True)
    sub = {"int4_read": "chain", "BLOCK_K": bk, "unroll": 2}
    found = {}
    picked = gemv.chain_scales_transposed()
    for trans in (picked, not picked):
        monkeypatch.setattr(gemv, "CHAIN_SCALES_T", trans)
        with recorded_launches() as calls:
            fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale, w.w2_scale,
                                None, None, w.w13_zero, w.w2_zero,
                                config=validate_entry(gemv_cfg({**sub, "BLOCK_N": 32}, sub)))
        assert [(kw["INT4_MODE"], kw["SCALES_T"]) for _, _, kw in calls] == [(5, trans)] * 2
        asm = [compile_sm90(kernel, args, kwargs).asm for kernel, args, kwargs in calls]
        found[trans] = [_loop_conversions(a["ttgir"]) for a in asm]
        for a in asm:  # the words come in 16-byte loads: the only 32-bit scalar loads are the expert id and (GEMM2)
            # the fused epilogue's counter; a word tile loaded narrower adds dozens (49 in a masked-load mutation)
            kinds = re.findall(r"ld\.global((?:\.\w+)*)\s", a["ptx"])
            assert kinds.count(".v4.b32") >= 24 and kinds.count(".b32") <= 2 and ".v2.b32" not in kinds, kinds
    assert found[picked] == [0, 0], found
    assert min(found[not picked]) > 0, found


def test_prefetch_compiles_for_sm90_with_loads_ahead():
    """``prefetch`` compiles for sm_90 in both GEMMs, and each tile's 128-bit loads (weights, x_vec activations)
    appear once more per tile ahead: a prologue of AHEAD tiles before the loop's one, so 1 : 2 : 3 for 0, 1, 2."""
    import re

    x, tw, ids, w13, w2, _, _ = make_case(1, 8, 2, 256, 256, torch.bfloat16, False, 0.0, seed=1)
    w = quantize("int4_w4a16", w13, w2, group_size=128)
    sub = {"int4_read": "subnormal", "BLOCK_K": 128, "x_vec": True}
    counts = []
    for pf in (0, 1, 2):
        with recorded_launches() as calls:
            fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale, w.w2_scale,
                                config=gemv_cfg({**sub, "prefetch": pf}, {**sub, "prefetch": pf}))
        assert [kw.get("AHEAD") for _, _, kw in calls] == [pf, pf]
        ptx = [compile_sm90(kernel, args, kwargs).asm["ptx"] for kernel, args, kwargs in calls]
        counts.append([len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", p)) for p in ptx])
    for g in (0, 1):
        assert counts[0][g] > 0 and [c[g] for c in counts] == [counts[0][g] * n for n in (1, 2, 3)], counts


@lazy_jit
def _retyped_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    v = n * 2
    offs = tl.arange(0, BLOCK)
    if n > 0:
        v = tl.load(x_ptr + offs)  # a scalar name given a tensor inside an if: the interpreter runs it
    tl.store(o_ptr + offs, v + 0.0)


def test_compile_check_catches_what_the_interpreter_runs():
    """The bug class this check exists for: fine under the interpreter, a compile error for the GPU."""
    x = torch.randn(16)
    out = torch.empty(16)
    with interpreter():
        _retyped_kernel[(1,)](x, out, 3, BLOCK=16)
    assert torch.equal(out, x)
    with recorded_launches() as calls:
        _retyped_kernel[(1,)](x, out, 3, BLOCK=16)
    with pytest.raises(triton.CompilationError):
        compile_sm90(*calls[0])


def test_registers_reads_ptxas():
    """registers(): what ptxas says about a compiled launch (registers in range, no spill in a small GEMV)."""
    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 2, 64, 64, torch.bfloat16, False, 0.0, seed=2)
    with recorded_launches() as calls:
        fused_experts(x, tw, ids, w13, w2, config=gemv_cfg())
    regs, spills = registers(compile_sm90(*calls[0]))
    assert 16 <= regs <= 255 and spills == 0


def test_table_registers_script(tmp_path):
    """scripts/table_registers.py on a small table folder: one line per entry and kernel, and the spill count."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    entry = {**gemv_cfg(), "_us": 1.0}
    grouped = {"BLOCK_M": 16, "decode": False, "reduce": "atomic",
               "gemm1": {"BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
               "gemm2": {"BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}}
    name = "E=4,N=64,K=128,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"
    (tmp_path / name).write_text(json.dumps({"_note": "test", "1": entry, "16": grouped}))
    script = Path(__file__).resolve().parents[2] / "scripts" / "table_registers.py"
    out = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"# {name}"
    assert lines[1].startswith("T=1 ") and "gemm1" in lines[1] and "gemm2" in lines[1] and "regs" in lines[1]
    assert lines[2].startswith("T=16 ")
    assert lines[-1] == "# 0 entries spill"


@pytest.mark.parametrize("method", ["int4_w4a16", None])
def test_pdl_decode_compiles_for_sm90(method, monkeypatch):
    """A "pdl" decode: GEMM1 lets its dependent start (griddepcontrol.launch_dependents), GEMM2 is launched with
    launch_pdl, asks L2 for its weight slice and waits for GEMM1 (griddepcontrol.wait) before reading its input."""
    from composer.kernels.triton import fused

    monkeypatch.setattr(fused, "pdl_supported", lambda device: True)  # (this machine has no sm_90 GPU)
    x, tw, ids, w13, w2, _, _ = make_case(1, 8, 2, 256, 256, torch.bfloat16, False, 0.0, seed=1)
    cfg = {**gemv_cfg({"BLOCK_K": 256}, {"BLOCK_K": 128}), "pdl": True}
    with recorded_launches() as calls:
        if method:
            w = quantize(method, w13, w2, group_size=128)
            fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", method, w.w13_scale, w.w2_scale,
                                config=validate_entry(cfg))
        else:
            fused_experts(x, tw, ids, w13, w2, config=validate_entry(cfg))
    assert [kw["PDL"] for _, _, kw in calls] == [1, 2]
    assert "launch_pdl" not in calls[0][2] and calls[1][2]["launch_pdl"] is True
    ptx = [compile_sm90(kernel, args, kwargs).asm["ptx"] for kernel, args, kwargs in calls]
    assert "griddepcontrol.launch_dependents" in ptx[0] and "griddepcontrol.wait" not in ptx[0]
    assert "griddepcontrol.wait" in ptx[1] and "prefetch.global.L2" in ptx[1]
    # the wait comes before the first read of GEMM1's output (the fused epilogue's atomics come later still)
    assert ptx[1].index("griddepcontrol.wait") < ptx[1].index("atom.")
