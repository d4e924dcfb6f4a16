"""composer's Triton experts kernels on CPU (TRITON_INTERPRET=1, fp32/fp16) vs the float64 oracle, and on GPU."""
from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from composer.kernels.reference import oracle_experts  # noqa: E402
from composer.kernels.triton import configs as cfgs  # noqa: E402
from composer.kernels.triton.fused import fused_experts  # noqa: E402
from composer.kernels.triton_backend import TritonExperts  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


from ._interpreter import interpreter  # noqa: E402,F401

def make_case(T, E, k, H, I, dtype, bias, drop, seed, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=device) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=device) * I ** -0.5).to(dtype)
    b13 = (torch.randn(E, 2 * I, generator=g, device=device) * 0.5).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=g, device=device) * 0.5).to(dtype) if bias else None
    logits = torch.randn(T, E, generator=g, device=device)
    tw, ids = torch.topk(logits.softmax(-1), k, dim=-1)
    ids = ids.to(torch.int32)
    if drop and T:
        ids[torch.rand(T, k, generator=g, device=device) < drop] = -1
    return x, tw.float(), ids, w13, w2, b13, b2


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm()) if float(ref.norm()) > 0 else float(out.double().norm())


def tiny_config(decode, reduce, bn1, bk1, bn2, bk2, tma=False):
    return {"BLOCK_M": 16, "decode": decode, "reduce": reduce,
            "gemm1": {"BLOCK_N": bn1, "BLOCK_K": bk1, "GROUP_M": 2, "num_warps": 4, "num_stages": 2, "tma": tma},
            "gemm2": {"BLOCK_N": bn2, "BLOCK_K": bk2, "GROUP_M": 1, "num_warps": 4, "num_stages": 2, "tma": tma}}


@settings(max_examples=30, deadline=None)
@given(
    T=st.sampled_from([0, 1, 2, 5, 9]), E=st.integers(1, 6), kfrac=st.floats(0, 1),
    H=st.sampled_from([16, 20, 40, 52]), I=st.sampled_from([8, 20, 32]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    act=st.sampled_from(["silu", "gelu", "swigluoai"]), bias=st.booleans(), drop=st.sampled_from([0.0, 0.25]),
    decode=st.booleans(), reduce=st.sampled_from(["atomic", "buffer"]),
    bn1=st.sampled_from([16, 32]), bk1=st.sampled_from([16, 32]), bn2=st.sampled_from([16, 32]),
    bk2=st.sampled_from([16, 32]), tma=st.booleans(), seed=st.integers(0, 2**16),
)
def test_fused_experts_matches_oracle(T, E, kfrac, H, I, dtype, act, bias, drop, decode, reduce, bn1, bk1, bn2, bk2,
                                      tma, seed):
    """tma=True takes the TMA-descriptor weight loads where the weights allow it (16-byte aligned rows)."""
    k = 1 + int(kfrac * (E - 1))
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, dtype, bias, drop, seed)
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=tiny_config(decode, reduce, bn1, bk1, bn2, bk2, tma))
    assert out.shape == x.shape and out.dtype == dtype
    ref = oracle_experts(x, tw, ids, w13, w2, act, b13, b2)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype], f"rel. error {rel(out, ref):.2e}"


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_default_configs_top_k_equals_num_experts(T, dtype):
    """The heuristic configs (decode path at T=1), every expert chosen by every token, H/I off the tile."""
    E = k = 4
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, 40, 24, dtype, True, 0.0, 7)
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu")
    ref = oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)
    assert out.shape == (T, 40)
    if T:
        assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("reduce", ["atomic", "buffer"])
@pytest.mark.parametrize("bm", [32, 64])
def test_sorted_blocks_of_32_and_64_rows_match_torch(bm, reduce):
    """Unquantized expert-sorted GEMMs in 32- and 64-row blocks (the hypothesis test fixes BLOCK_M = 16) vs
    kernel=torch: T = 40, bias, dropped pairs, H = 40 and I = 20 off the 32-deep K and 16-wide N tiles."""
    from composer.kernels.torch_backend import TorchExperts
    from composer.layers.modular_kernel import ExpertWeights

    x, tw, ids, w13, w2, b13, b2 = make_case(40, 5, 2, 40, 20, torch.float32, True, 0.2, seed=bm)
    ref = TorchExperts().apply(x, tw, ids, ExpertWeights(w13, w2, b13, b2), "silu").double()
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu",
                            config={**tiny_config(False, reduce, 16, 32, 16, 32), "BLOCK_M": bm})
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert rel(out, ref) < TOL[torch.float32], f"rel. error {rel(out, ref):.2e}"


def test_all_pairs_dropped_gives_zeros():
    x, tw, ids, w13, w2, _, _ = make_case(3, 4, 2, 16, 16, torch.float32, False, 0.0, 1)
    ids[:] = -1
    for decode in (True, False):
        with interpreter():
            out = fused_experts(x, tw, ids, w13, w2, None, None, "gelu",
                                config=tiny_config(decode, "atomic", 16, 16, 16, 16))
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("T, k, H", [(0, 2, 40), (1, 1, 16), (5, 3, 1030), (4, 6, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_sum_skips_dropped_rows(T, k, H, dtype):
    """moe_sum (reduce="buffer"): the fp32 top-k sum of the per-pair rows, cast once; a dropped pair's row (id -1
    or >= E) is never written by GEMM2, so it holds garbage (NaN here) that must not reach the output. H = 1030
    spans two blocks."""
    from composer.kernels.triton.gemm import moe_sum

    g = torch.Generator().manual_seed(T * 100 + k)
    buf = torch.randn(T * k, H, generator=g).to(dtype)
    ids = torch.randint(0, 8, (T * k,), generator=g, dtype=torch.int32)
    ids[::3] = -1
    ids[1::4] = 8 + ids[1::4] % 3  # out of range for E = 8: skipped like -1
    buf[(ids < 0) | (ids >= 8)] = float("nan")
    with interpreter():
        out = moe_sum(buf, ids, k, 8)
    keep = ((ids >= 0) & (ids < 8)).view(T, k, 1)
    ref = torch.where(keep, buf.view(T, k, H).double(), 0.0).sum(1)
    assert out.shape == (T, H) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (1e-6 if dtype == torch.float32 else 1e-3)  # fp32 sums, one rounding to the dtype


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("reduce", ["atomic", "buffer"])
def test_out_of_range_ids_are_skipped(decode, reduce):
    """An expert id outside [0, E) is skipped like the -1 of another rank's expert, as the reference does: no
    out-of-bounds weight read in the decode path, no unwritten row summed with reduce="buffer"."""
    x, tw, ids, w13, w2, _, _ = make_case(3, 4, 2, 16, 16, torch.float32, False, 0.0, 2)
    ids[0, 1], ids[1, 0], ids[2, 1] = 4, 9, -1
    ref = oracle_experts(x, tw, ids, w13, w2, "silu")
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, None, None, "silu", config=tiny_config(decode, reduce, 16, 16, 16, 16))
    assert torch.isfinite(out).all() and rel(out, ref) < TOL[torch.float32]


def test_int64_ids_outside_the_experts_do_not_wrap():
    """int64 ids are narrowed to int32 for the kernels; one outside [0, E) is marked -1 first, so 2^32 + 1 does not
    wrap to expert 1."""
    x, tw, ids, w13, w2, _, _ = make_case(3, 4, 2, 16, 16, torch.float32, False, 0.0, 3)
    wide = ids.long()
    wide[0, 0], wide[2, 1] = (1 << 32) + 1, -(1 << 32) + 2
    ref = oracle_experts(x, tw, torch.where((wide >= 0) & (wide < 4), wide, -1), w13, w2, "silu")
    with interpreter():
        out = fused_experts(x, tw, wide, w13, w2, None, None, "silu", config=tiny_config(False, "atomic", 16, 16, 16, 16))
    assert rel(out, ref) < TOL[torch.float32]


def _bad(case: str):
    """A call with one mistake of a kind a user makes; every tensor otherwise fits (T=5, H=32, E=4, k=2, I=16)."""
    T, H, E, k, I = 5, 32, 4, 2, 16
    x, w, ids = torch.randn(T, H), torch.rand(T, k), torch.randint(0, E, (T, k), dtype=torch.int32)
    w13, w2, b13, b2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I), None, None
    if case == "wrong H":
        x = torch.randn(T, 20)
    elif case == "routing rows":
        w, ids = w[:3], ids[:3]
    elif case == "weights vs ids":
        w = w[:, :1]
    elif case == "w2 I":
        w2 = torch.randn(E, H, 8)
    elif case == "w2 E":
        w2 = torch.randn(2, H, I)
    elif case == "bias":
        b13 = torch.randn(E, 3 * I)
    elif case == "float64":
        x, w13, w2 = x.double(), w13.double(), w2.double()
    elif case == "float ids":
        ids = ids.float()
    elif case == "3-D x":
        x = x[None]
    return x, w, ids, w13, w2, b13, b2


@pytest.mark.parametrize("case, message", [
    ("wrong H", r"weights do not fit x \(5, 20\): w13 \(4, 32, 32\) \(want \[E, 2I, H\] = \[4, 32, 20\]\)"),
    ("routing rows", r"topk_ids \(3, 2\) and topk_weights \(3, 2\) must both be \[T=5, k\]"),
    ("weights vs ids", r"topk_ids \(5, 2\) and topk_weights \(5, 1\) must both be \[T=5, k\]"),
    ("w2 I", r"w2 \(4, 32, 8\) \(want \[E, H, I\] = \[4, 32, 16\]\)"),
    ("w2 E", r"w2 \(2, 32, 16\) \(want \[E, H, I\] = \[4, 32, 16\]\)"),
    ("bias", r"w13_bias must be \[4, 32\], got \(4, 48\)"),
    ("float64", r"float16, bfloat16 or float32 activations, got torch.float64"),
    ("float ids", r"topk_ids must be an integer tensor"),
    ("3-D x", r"hidden states must be \[T, H\], got shape \(1, 5, 32\)"),
])
def test_bad_inputs_are_refused_before_any_kernel(case, message):
    """The kernels index with these shapes unchecked: a mismatch must be refused up front (it read and wrote out
    of bounds: garbage rows, or a corrupted heap), through the op as through fused_experts."""
    import composer.kernels.ops  # noqa: F401  (registers torch.ops.composer)

    x, w, ids, w13, w2, b13, b2 = _bad(case)
    with interpreter():
        with pytest.raises(ValueError, match=message):
            fused_experts(x, w, ids, w13, w2, b13, b2, "silu")
        with pytest.raises(ValueError, match=message):
            torch.ops.composer.fused_experts(x, w, ids, w13, w2, b13, b2, "silu")


def test_bad_quant_scales_are_refused():
    from composer.kernels.triton.fused import fused_experts_quant

    T, H, E, k, I = 3, 32, 4, 2, 16
    x, w, ids = torch.randn(T, H), torch.rand(T, k), torch.randint(0, E, (T, k), dtype=torch.int32)
    w13, w2 = torch.randint(0, 255, (E, 2 * I, H // 2), dtype=torch.uint8), torch.randint(0, 255, (E, H, I // 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"int4_w4a16: w13_scale must be \[E, 32, K / group\] with an even group "
                                         r"dividing K = 32, got \(4, 32, 5\)"):
        fused_experts_quant(x, w, ids, w13, w2, None, None, "silu", "int4_w4a16", torch.rand(E, 2 * I, 5),
                            torch.rand(E, H, 1))
    with pytest.raises(ValueError, match=r"weights do not fit .* \(2 weights per stored element along K\)"):
        fused_experts_quant(x, w, ids, w13[..., :8], w2, None, None, "silu", "int4_w4a16", torch.rand(E, 2 * I, 2),
                            torch.rand(E, H, 1))
    w8 = torch.randint(-127, 127, (E, 2 * I, H), dtype=torch.int8), torch.randint(-127, 127, (E, H, I), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"int8_w8a16: w2_scale must be \[4, 32, 1\] .* got \(4, 32\)"):
        fused_experts_quant(x, w, ids, *w8, None, None, "silu", "int8_w8a16", torch.rand(E, 2 * I, 1), torch.rand(E, H))


def test_unknown_activation():
    x, tw, ids, w13, w2, _, _ = make_case(2, 2, 1, 16, 16, torch.float32, False, 0.0, 1)
    with pytest.raises(ValueError, match="unknown activation"):
        fused_experts(x, tw, ids, w13, w2, None, None, "relu")


# ---------------------------------------------------------------------------------------------- backend


def test_backend_check_on_cpu():
    with interpreter(False):
        problems = TritonExperts.check(quant="none", dtype="float32", device="cpu")
    assert len(problems) == 1 and "kernel=torch" in problems[0] and "TRITON_INTERPRET=1" in problems[0]
    with interpreter():
        assert TritonExperts.check(quant="none", dtype="float32", device="cpu") == []
        assert TritonExperts.check(quant="none", dtype="float16", device="cpu") == []
        assert any("bfloat16" in p for p in TritonExperts.check(quant="none", dtype="bfloat16", device="cpu"))
    # quantized methods: tests/kernels/test_triton_quant.py (fp8 needs sm89+, and no interpreter)
    problems = TritonExperts.check(quant="nvfp4", dtype="bfloat16", device="cuda")
    assert any("nvfp4" in p for p in problems)


def test_backend_apply_uses_custom_op():
    from composer.layers.modular_kernel import ExpertWeights

    x, tw, ids, w13, w2, b13, b2 = make_case(4, 3, 2, 20, 8, torch.float32, True, 0.2, 3)
    with interpreter():
        out = TritonExperts().apply(x, tw, ids, ExpertWeights(w13, w2, b13, b2), "swigluoai")
    assert rel(out, oracle_experts(x, tw, ids, w13, w2, "swigluoai", b13, b2)) < 1e-5


# ---------------------------------------------------------------------------------------------- configs


def test_shipped_config_files_are_valid():
    files = sorted(cfgs.PACKAGE_DIR.glob("*.json"))
    for f in files:
        name = f.name
        assert name.startswith("E=") and ",device_name=" in name and name.endswith(".json"), name
        table = json.loads(f.read_text())
        assert table, f"{name} is empty"
        for key, entry in table.items():
            if key.startswith("_"):
                continue
            int(key)
            cfgs.validate_entry(entry, name)


def test_config_dir_env_override(tmp_path, monkeypatch):
    name = cfgs.config_file_name(4, 24, 40, cfgs.device_name("cpu"), "float32")
    entry = tiny_config(False, "buffer", 32, 16, 16, 32)
    (tmp_path / name).write_text(json.dumps({"2": entry, "64": {**entry, "BLOCK_M": 32}}))
    monkeypatch.setenv(cfgs.ENV_VAR, str(tmp_path))
    c = cfgs.get_config(3, 4, 24, 40, 2, torch.float32, "cpu")
    assert c["BLOCK_M"] == 16 and c["reduce"] == "buffer" and name in c["source"]
    assert cfgs.get_config(50, 4, 24, 40, 2, torch.float32, "cpu")["BLOCK_M"] == 32  # nearest key
    monkeypatch.delenv(cfgs.ENV_VAR)
    assert cfgs.get_config(3, 4, 24, 40, 2, torch.float32, "cpu")["source"] == "heuristic"


def test_t1_decode_entry_serves_t1_only(tmp_path, monkeypatch):
    """A T = 1 decode entry's tiles were measured for one pair per program: T = 2 takes the nearest other key (not
    the T = 1 GEMV tile run as expert-sorted blocks, as before), or the heuristic when the table has no other key;
    a decode entry a table keys at T > 1 is used there as written."""
    name = cfgs.config_file_name(4, 24, 40, cfgs.device_name("cpu"), "float32")
    gemv = {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic",
            "gemm1": {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "unroll": 2},
            "gemm2": {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "SPLIT_K": 2}}
    sorted_ = tiny_config(False, "buffer", 32, 16, 16, 32)
    monkeypatch.setenv(cfgs.ENV_VAR, str(tmp_path))
    (tmp_path / name).write_text(json.dumps({"1": gemv, "4": {**gemv, "pdl": True}, "64": sorted_}))
    cfgs.clear_cache()
    at = {T: cfgs.get_config(T, 4, 24, 40, 2, torch.float32, "cpu") for T in (1, 2, 3, 30, 40)}
    assert at[1]["decode"] == "gemv" and at[1]["source"].endswith("[T=1]")
    for T in (2, 3):
        assert at[T]["decode"] == "gemv" and at[T].get("pdl") and at[T]["source"].endswith("[T=4]"), at[T]
    assert at[30]["source"].endswith("[T=4]") and at[40]["source"].endswith("[T=64]") and not at[40]["decode"]
    (tmp_path / name).write_text(json.dumps({"1": gemv, "64": sorted_}))
    cfgs.clear_cache()
    c = cfgs.get_config(2, 4, 24, 40, 2, torch.float32, "cpu")
    assert c["source"].endswith("[T=64]") and c["decode"] is False and c["BLOCK_M"] == 16
    (tmp_path / name).write_text(json.dumps({"1": gemv}))
    cfgs.clear_cache()
    assert cfgs.get_config(2, 4, 24, 40, 2, torch.float32, "cpu")["source"] == "heuristic"
    assert cfgs.get_config(1, 4, 24, 40, 2, torch.float32, "cpu")["decode"] == "gemv"
    cfgs.clear_cache()


def test_config_file_of_a_same_capability_gpu_is_borrowed(tmp_path, monkeypatch):
    def write(device, bn1, capability=None):  # gemm1.BLOCK_N tells the files apart
        table = {"1": tiny_config(False, "atomic", bn1, 16, 16, 32)}
        if capability:
            table["_capability"] = capability
        (tmp_path / cfgs.config_file_name(4, 24, 40, device, "float16")).write_text(json.dumps(table))

    write("GPU_A", 16, "9.0")
    write("GPU_B", 32, "8.0")
    write("GPU_OLD", 64)  # tuned before files said their capability: only its own GPU uses it
    monkeypatch.setenv(cfgs.ENV_VAR, str(tmp_path))

    def config(device, capability):
        monkeypatch.setattr(cfgs, "device_name", lambda d=None: device)
        monkeypatch.setattr(cfgs, "device_capability", lambda d=None: capability)
        return cfgs.get_config(1, 4, 24, 40, 2, torch.float16, "cpu")

    c = config("GPU_H", "9.0")
    assert c["gemm1"]["BLOCK_N"] == 16 and "device_name=GPU_A," in c["source"]
    c = config("GPU_C", "8.0")
    assert c["gemm1"]["BLOCK_N"] == 32 and "device_name=GPU_B," in c["source"]
    assert config("GPU_D", "8.9")["source"] == "heuristic"  # no file of that capability
    assert config("GPU_E", None)["source"] == "heuristic"  # off CUDA: no capability, no borrowed file
    write("GPU_TYPO", 8, 9.0)  # a number, not "9.0": refused with the file named, not silently never borrowed
    with pytest.raises(ValueError, match=r"GPU_TYPO.*_capability must be a string \"major.minor\""):
        config("GPU_I", "7.5")  # (no file of 7.5: every file is read)
    (tmp_path / cfgs.config_file_name(4, 24, 40, "GPU_TYPO", "float16")).unlink()
    c = config("GPU_OLD", "9.0")
    assert c["gemm1"]["BLOCK_N"] == 64 and "device_name=GPU_OLD," in c["source"]  # a GPU's own file comes first
    # the shipped tables say they were tuned on sm_90, so an H200 runs the H100's tiles where it has no file of its own
    monkeypatch.delenv(cfgs.ENV_VAR)
    monkeypatch.setattr(cfgs, "device_name", lambda d=None: "NVIDIA_H200")
    monkeypatch.setattr(cfgs, "device_capability", lambda d=None: "9.0")
    for dtype, tuned_on in ((torch.bfloat16, "H100_80GB_HBM3"), ("fp8_w8a8", "H100_80GB_HBM3"), ("int4_w4a16", "H200")):
        c = cfgs.get_config(1, 8, 14336, 4096, 2, dtype, "cpu")
        assert f"device_name=NVIDIA_{tuned_on}," in c["source"], (dtype, c["source"])


@pytest.mark.parametrize("text,words", [
    ("{not json", "cannot be read as JSON"),
    ("[1, 2]", "must be a JSON object of token counts to entries"),
    ('{"four": {}}', "key 'four' must be a token count"),
    ('{"4": 5}', r"\[T=4\] must be an object with BLOCK_M"),
    ('{"4": {"BLOCK_M": 16, "reduc": "buffer", "gemm1": {"BLOCK_N": 16, "BLOCK_K": 16}, '
     '"gemm2": {"BLOCK_N": 16, "BLOCK_K": 16}}}', r"unknown keys \['reduc'\].* Did you mean 'reduce'"),
    ('{"4": {"BLOCK_M": 16, "gemm1": {"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 0, "num_warps": 3}, '
     '"gemm2": {"BLOCK_N": 16, "BLOCK_K": 16, "num_stages": 0}}}',
     r"gemm1.GROUP_M must be an integer >= 1.*gemm1.num_warps must be 1, 2, 4.*gemm2.num_stages must be"),
])
def test_malformed_tile_config_file_is_a_config_error_naming_it(text, words, tmp_path, monkeypatch):
    """Whatever is wrong in a tile-config file, the error is a config problem (exit 2) that names the file and what
    is wrong, not a traceback from deep inside a forward; GROUP_M = 0 had given garbage, a misspelled key nothing."""
    from composer.errors import ConfigError

    name = cfgs.config_file_name(2, 8, 16, cfgs.device_name("cpu"), "float16")
    (tmp_path / name).write_text(text)
    monkeypatch.setenv(cfgs.ENV_VAR, str(tmp_path))
    with pytest.raises(ConfigError, match=rf"(?s)tile config file = '.*{re.escape(name)}'.*{words}"):
        cfgs.get_config(1, 2, 8, 16, 1, torch.float16, "cpu")


def test_bad_config_file_names_the_problem(tmp_path, monkeypatch):
    name = cfgs.config_file_name(2, 8, 16, cfgs.device_name("cpu"), "float16")
    (tmp_path / name).write_text(json.dumps({"1": {"BLOCK_M": 24, "gemm1": {"BLOCK_N": 16, "BLOCK_K": 16}}}))
    monkeypatch.setenv(cfgs.ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        cfgs.get_config(1, 2, 8, 16, 1, torch.float16, "cpu")


def test_swap_key_is_validated():
    """A tile's "swap" (int8_w8a16's transposed product) is a boolean, and only where a tl.dot GEMM runs."""
    g = {"BLOCK_N": 64, "BLOCK_K": 128}
    cfgs.validate_entry({"BLOCK_M": 64, "gemm1": {**g, "swap": True}, "gemm2": {**g, "swap": False}})
    with pytest.raises(ValueError, match="gemm1.swap must be true or false, got 'yes'"):
        cfgs.validate_entry({"BLOCK_M": 64, "gemm1": {**g, "swap": "yes"}, "gemm2": g})
    with pytest.raises(ValueError, match="gemm2.swap .* not to decode \"gemv\" ones"):
        cfgs.validate_entry({"BLOCK_M": 16, "decode": "gemv", "gemm1": g, "gemm2": {**g, "swap": True}})


def test_heuristic_covers_every_size():
    for T in (1, 2, 16, 128, 1024, 4096, 65536):
        for E, k in ((8, 2), (128, 8), (256, 8)):
            c = cfgs.heuristic_config(T, E, 768, 2048, k)
            cfgs.validate_entry(c)
            assert c["decode"] == (T == 1)


# ---------------------------------------------------------------------------------------------- GPU

SHAPES = {  # (E, top_k, H, I)
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "deepseek_v3": (256, 8, 7168, 2048),
}


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_benchmark_shapes(shape, dtype):
    from composer.tasks.bench import reference_fp32
    from composer.layers.modular_kernel import ExpertWeights

    E, k, H, I = SHAPES[shape]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.empty(E, 2 * I, H, device=dev, dtype=dtype)
    w2 = torch.empty(E, H, I, device=dev, dtype=dtype)
    for e in range(E):
        w13[e] = (torch.randn(2 * I, H, device=dev, generator=g) * H ** -0.5).to(dtype)
        w2[e] = (torch.randn(H, I, device=dev, generator=g) * I ** -0.5).to(dtype)
    weights = ExpertWeights(w13, w2)
    with interpreter(False):
        for T in (1, 16, 128, 1024, 4096):
            x = torch.randn(T, H, device=dev, generator=g).to(dtype)
            tw, ids = torch.topk(torch.randn(T, E, device=dev, generator=g).softmax(-1), k, dim=-1)
            ids = ids.to(torch.int32)
            out = fused_experts(x, tw, ids, w13, w2, None, None, "silu")
            ref = reference_fp32(x, tw, ids, weights, "silu")
            err = float((out.float() - ref).norm() / ref.norm())
            assert torch.isfinite(out).all(), f"{shape} T={T}: non-finite output"
            assert err < 1e-2, f"{shape} {dtype} T={T}: rel. error {err:.2e}"
    del w13, w2, weights
    torch.cuda.empty_cache()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_small_all_features(dtype, act, bias):
    """Bias, every activation, -1 ids, shapes off the tile, both reductions, decode path, on the GPU."""
    with interpreter(False):
        for T in (1, 7, 300):
            x, tw, ids, w13, w2, b13, b2 = make_case(T, 12, 4, 200, 72, dtype, bias, 0.2, T, device="cuda")
            ref = oracle_experts(x, tw, ids, w13, w2, act, b13, b2)
            for reduce, tma in (("atomic", False), ("buffer", True)):
                c = dict(cfgs.heuristic_config(T, 12, 72, 200, 4), reduce=reduce)
                c["gemm1"] = dict(c["gemm1"], tma=tma)
                c["gemm2"] = dict(c["gemm2"], tma=tma)
                out = fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=c)
                tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
                assert rel(out, ref) < tol, f"T={T} {reduce}: {rel(out, ref):.2e}"


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_out_of_range_ids_are_skipped(dtype):
    """Expert ids E and E + 1000 next to -1, on the GPU: the tl.dot decode, the GEMV decode and the sorted blocks,
    each with both reductions, match the oracle (which skips them), with no read past the last expert."""
    with interpreter(False):
        for T in (1, 7, 300):
            x, tw, ids, w13, w2, _, _ = make_case(T, 12, 4, 200, 72, dtype, False, 0.2, T, device="cuda")
            ids[0, 1] = 12
            ids[-1, 0] = 1012
            ref = oracle_experts(x, tw, ids, w13, w2, "silu")
            for decode in ((True, "gemv") if T == 1 else (False,)):
                for reduce in ("atomic", "buffer"):
                    c = dict(cfgs.heuristic_config(T, 12, 72, 200, 4), decode=decode, reduce=reduce)
                    if decode == "gemv":
                        c["gemm1"] = {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
                        c["gemm2"] = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": 2}
                    out = fused_experts(x, tw, ids, w13, w2, None, None, "silu", config=cfgs.validate_entry(c))
                    assert torch.isfinite(out).all() and rel(out, ref) < TOL[dtype], (T, decode, reduce)


def test_merged_tables_keep_the_capability_they_were_tuned_on(tmp_path):
    """tune.merge_tables (new tuning results over the shipped files): faster entries replace, slower ones do not, and
    the new file's _capability is kept, so other GPUs of that capability can borrow the merged file."""
    from composer.kernels.triton.tune import merge_tables

    name = cfgs.config_file_name(4, 24, 40, "GPU_A", "bfloat16")
    entry = tiny_config(False, "atomic", 16, 16, 16, 32)
    (tmp_path / "base").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "base" / name).write_text(json.dumps({"_note": "old", "1": {**entry, "_us": 10.0},
                                                      "16": {**entry, "_us": 20.0}}))
    (tmp_path / "new" / name).write_text(json.dumps({"_capability": "9.0", "1": {**entry, "BLOCK_M": 32, "_us": 8.0},
                                                     "16": {**entry, "BLOCK_M": 64, "_us": 25.0}}))
    changes = merge_tables(str(tmp_path / "new"), str(tmp_path / "base"), str(tmp_path / "out"))
    merged = json.loads((tmp_path / "out" / name).read_text())
    assert changes == [f"{name}: T=1 10.0 -> 8.0 us"]
    assert merged["_capability"] == "9.0" and merged["_note"] == "old"
    assert merged["1"]["BLOCK_M"] == 32 and merged["16"]["BLOCK_M"] == 16
    assert cfgs._same_capability_file(4, 24, 40, "bfloat16", "9.0", (tmp_path / "out",))[0].endswith(name)
