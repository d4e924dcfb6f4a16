"""Tensor parallelism of the experts on CPU with gloo and 2 processes.

One spawned 2-rank job (this file run as a script: ``python test_tp.py worker OUT_DIR``) runs every
in-process case: each experts kernel (torch, triton under TRITON_INTERPRET=1, grouped_mm) vs the single-rank
model, shared experts with their gate, biases, each shardable quant method (the quantized weights and scales
must be exactly the single-rank ones, sliced), loading per-expert and packed safetensors checkpoints (each
rank reads only its slice: asserted on bytes and on the slices), the refusal of a checkpoint whose
intermediate size differs, and the bench. The tests below assert each case on both ranks; config
validation runs in-process; ``torchrun ... parallel.tp_size=2 task=check`` runs end to end.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORLD = 2
KERNELS = ("torch", "triton")  # grouped_mm needs CUDA (scripts/tp_gpu_check.sh runs it)
QUANTS = {
    "int8_w8a16": ("quant=int8_w8a16",),
    "int8_w8a8": ("quant=int8_w8a8",),
    "fp8_per_tensor": ("quant=fp8_w8a8", "quant.granularity=per_tensor"),
    "fp8_per_channel": ("quant=fp8_w8a8", "quant.granularity=per_token_channel"),
    "fp8_block": ("quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[8,8]"),
    "int4_group": ("quant=int4_w4a16", "quant.group_size=8"),
    "int4_group_zp": ("quant=int4_w4a16", "quant.group_size=8", "quant.zero_point=true"),
}
PREQUANT = ("int8_w8a16", "fp8_per_tensor", "fp8_block", "int4_group_zp")
CASES = (
    [f"model[{k}]" for k in KERNELS] + ["model[triton-int8_w8a16]"]
    + ["shared_experts_gated", "bias"]
    + [f"quant[{q}]" for q in QUANTS]
    + [f"load[{layout}]" for layout in ("packed", "per_expert")]
    + [f"mismatched_checkpoint[{layout}]" for layout in ("packed", "per_expert")]
    + [f"load_prequantized[{q}]" for q in PREQUANT] + ["mismatched_prequantized"]
    + ["sequence_parallel[uneven]", "sequence_parallel[t0_one_rank]", "sequence_parallel[quant_int8_w8a16]"]
    + ["weight_loader_full_tensor", "bench_cpu", "bench_task_hook"]
)
BASE = ("device=cpu", "kernel=torch", "model.dtype=float32", "parallel.timeout_s=30")
F32_TOL = 1e-5


# =========================================================================================================
# The worker (one rank). Cases keep their collectives in lockstep and assert only after them.

def _worker_cases():  # imported lazily so that pytest's collection does not import torch twice
    import functools

    import torch

    from composer import load_config
    from composer.checking import rel_error
    from composer.distributed.tp import TPShard
    from composer.distributed.tp_check import compare_tp, single_rank_config
    from composer.errors import WeightLoadError
    from composer.factory import build

    cases = {}

    def case(name):
        def deco(fn):
            cases[name] = fn
            return fn
        return deco

    @functools.lru_cache(maxsize=None)
    def tp_cfg(*extra):
        return load_config(None, [*BASE, f"parallel.tp_size={os.environ['WORLD_SIZE']}", *extra])

    def rank():
        return int(os.environ["RANK"])

    def gen(*keys):
        import zlib  # every rank must draw the same tokens: no salted hash()

        return torch.Generator().manual_seed(zlib.crc32(repr(("tp-test", *keys)).encode()))

    def slice_i(full, dim, I, halves=False):
        return TPShard(dim, 2 * I if halves else I, rank(), WORLD, halves=halves).narrow(full)

    def assert_sliced(layer, ref_layer):
        """Every expert parameter of the TP layer is this rank's exact slice of the single-rank one."""
        I = ref_layer.intermediate_size
        assert layer.intermediate_size == I // WORLD and layer.full_intermediate_size == I
        assert tuple(layer.w13.shape[1:2]) == (2 * I // WORLD,), layer.w13.shape
        assert torch.equal(layer.w13, slice_i(ref_layer.w13, 1, I, halves=True)), "w13 is not the slice"
        assert torch.equal(layer.w2, slice_i(ref_layer.w2, 2, I)), "w2 is not the slice"
        if ref_layer.w13_bias is not None:
            assert torch.equal(layer.w13_bias, slice_i(ref_layer.w13_bias, 1, I, halves=True))
            want = ref_layer.w2_bias if rank() == 0 else torch.zeros_like(ref_layer.w2_bias)
            assert torch.equal(layer.w2_bias, want), "w2_bias: full on rank 0, zeros elsewhere"

    def assert_quant_sliced(layer, rl):
        """The quantized weights and every scale are exactly the single-rank ones, sliced. Returns
        {name: bytes this rank holds} of the layer's parameters."""
        held = {}
        for name, p in rl.named_parameters(recurse=False):
            mine = getattr(layer, name)
            if p.dim() == 1 or name == "w2_bias" or (p.dim() == 2 and name.startswith("w13") and p.shape[1] == 2):
                want = p if name != "w2_bias" or rank() == 0 else torch.zeros_like(p)  # per-tensor scales: replicated
            elif name.startswith("w13"):
                rows = p.shape[1]  # stacked gate/up halves along dim 1 (int4 zeros: packed, rows = I)
                want = TPShard(0, rows, rank(), WORLD, halves=True).narrow(p, 1)
            elif p.shape[2] == 1:  # w2 per-channel scale [E, H, 1]: replicated
                want = p
            else:  # w2*: the intermediate dim is the last one (packed int4: I/2, groups: I/g)
                want = TPShard(1, p.shape[2], rank(), WORLD).narrow(p, 1)
            assert mine.dtype == want.dtype and torch.equal(mine, want), name
            held[name] = mine.numel() * mine.element_size()
        assert "w13" in held and "w2" in held and len(held) >= 4, held
        return held

    def model_case(*extra, tol=F32_TOL, T=11):
        cfg = tp_cfg(*extra)
        model, ref = build(cfg), build(single_rank_config(cfg))
        for blk, rblk in zip(model.layers, ref.layers):
            assert_sliced(blk.mlp.experts, rblk.mlp.experts)
        x = torch.randn(T, cfg.model.hidden_size, generator=gen("x", *extra)).to(cfg.model.torch_dtype)
        out, single = model(x), ref(x)
        err = rel_error(out, single)
        assert err <= tol, f"TP vs single-rank output rel. error {err:.3e} > {tol}"
        res = compare_tp(model, x, cfg)
        for name, s in res["layers"].items():
            assert s["tp_vs_single_rel_err"] <= tol, (name, s)
        assert res["output_rel_err"] <= max(tol, 1e-5), res["output_rel_err"]
        assert out.abs().sum() > 0
        return model, ref, {"err": err, "layers": res["layers"]}

    for k in KERNELS:
        @case(f"model[{k}]")
        def _model(k=k):
            extra = (f"kernel={k}", "model.num_layers=1") if k != "torch" else ()
            if k == "triton":
                os.environ["TRITON_INTERPRET"] = "1"
            try:
                return model_case(*extra, T=5 if k == "triton" else 11)[2]
            finally:
                os.environ.pop("TRITON_INTERPRET", None)

    @case("model[triton-int8_w8a16]")
    def _triton_quant():
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton quant GEMMs on the sliced int8 weights and scales
        try:
            model, ref, res = model_case("kernel=triton", "quant=int8_w8a16", "model.num_layers=1", T=3)
        finally:
            os.environ.pop("TRITON_INTERPRET", None)
        assert "triton" in model.layers[0].mlp.experts.kernel.describe(), model.layers[0].mlp.experts.kernel.describe()
        assert_quant_sliced(model.layers[0].mlp.experts, ref.layers[0].mlp.experts)
        return res

    @case("shared_experts_gated")
    def _shared():
        model, ref, res = model_case("model.num_shared_experts=2", "model.shared_expert_intermediate_size=24",
                                     "model.shared_expert_gate=true")
        sh, rsh = model.layers[0].mlp.shared_experts, ref.layers[0].mlp.shared_experts
        assert sh.gate_proj.weight.shape == (24, 96), sh.gate_proj.weight.shape  # 2 x 24 = 48 / 2 ranks
        assert torch.equal(sh.gate_proj.weight, slice_i(rsh.gate_proj.weight, 0, 48))
        assert torch.equal(sh.up_proj.weight, slice_i(rsh.up_proj.weight, 0, 48))
        assert torch.equal(sh.down_proj.weight, slice_i(rsh.down_proj.weight, 1, 48))
        assert torch.equal(sh.gate.weight, rsh.gate.weight)
        return res

    @case("bias")
    def _bias():
        return model_case("model.has_bias=true", "model.num_shared_experts=1")[2]

    for q, args in QUANTS.items():
        @case(f"quant[{q}]")
        def _quant(args=args):
            cfg = tp_cfg(*args, "model.num_layers=1")
            model, ref = build(cfg), build(single_rank_config(cfg))
            layer, rl = model.layers[0].mlp.experts, ref.layers[0].mlp.experts
            I = rl.intermediate_size
            checked = assert_quant_sliced(layer, rl)
            assert_quant_sliced(layer, rl)
            x = torch.randn(9, cfg.model.hidden_size, generator=gen("q", *args))
            res = compare_tp(model, x, cfg)["layers"]["layers.0.mlp.experts"]
            qm = rl.quant_method
            if type(qm).tp_splits_activation_scales(qm.params):
                # per-token activation scales of the intermediate: each rank scales its own slice, so compare with
                # the float64 oracle that quantizes per token and rank (the documented per-layer tolerance)
                assert "tp_vs_single_rel_err" not in res, res
                tol = type(qm).LAYER_TOL["float32"]
                assert res["experts_rel_err"] <= tol, (res, tol)
            else:
                assert res["tp_vs_single_rel_err"] <= F32_TOL, res
                assert res["experts_rel_err"] <= F32_TOL, res
            return {"layer": res, "checked": checked, "I": I}

    def ckpt_dir():
        d = Path(os.environ["TP_TEST_OUT"]) / "ckpt"
        d.mkdir(exist_ok=True)
        return d

    def save_single(cfg, name, layout):
        import torch.distributed as dist

        from composer.loading import save_checkpoint

        ref = build(single_rank_config(cfg))
        path = ckpt_dir() / f"{name}.safetensors"
        if rank() == 0:
            save_checkpoint(ref, path, layout=layout)
        dist.barrier()
        return ref, path

    for layout in ("packed", "per_expert"):
        @case(f"load[{layout}]")
        def _load(layout=layout):
            from composer.loading import load_checkpoint

            cfg = tp_cfg("model.has_bias=true", "model.num_shared_experts=1")
            ref, path = save_single(cfg, f"load-{layout}", layout)
            model = build(cfg, init=False)
            rep = load_checkpoint(model, path)
            m = cfg.model
            E, H, I, L = m.num_experts, m.hidden_size, m.intermediate_size, m.num_layers
            es = 4  # float32
            Ir = I // WORLD
            expert = L * E * (2 * Ir * H + H * Ir + 2 * Ir) * es + (L * E * H * es if rank() == 0 else 0)  # + w2_bias
            shared = L * 3 * Ir * H * es
            other = sum(p.numel() * es for n, p in ref.named_parameters()
                        if ".experts." not in n and ".shared_experts." not in n)
            assert rep.bytes_read == expert + shared + other, (rep.bytes_read, expert, shared, other)
            full = sum(p.numel() * es for p in ref.parameters())
            assert rep.bytes_read < 0.6 * full, (rep.bytes_read, full)
            for blk, rblk in zip(model.layers, ref.layers):
                assert_sliced(blk.mlp.experts, rblk.mlp.experts)
                assert torch.equal(blk.mlp.shared_experts.down_proj.weight,
                                   slice_i(rblk.mlp.shared_experts.down_proj.weight, 1, I))
            x = torch.randn(6, H, generator=gen("load", layout))
            err = rel_error(model(x), ref(x))
            assert err <= F32_TOL, err
            return {"bytes_read": rep.bytes_read, "full_bytes": full, "err": err}

        @case(f"mismatched_checkpoint[{layout}]")
        def _mismatch(layout=layout):
            from composer.loading import load_checkpoint

            small = tp_cfg("model.intermediate_size=64", "model.num_layers=1")
            _, path = save_single(small, f"small-{layout}", layout)
            model = build(tp_cfg("model.num_layers=1"), init=False)  # intermediate_size 80
            try:
                load_checkpoint(model, path)
            except WeightLoadError as exc:
                msg = str(exc)
                assert "intermediate size is 64" in msg and "model.intermediate_size = 80" in msg, msg
                return {"message": msg}
            raise AssertionError("a checkpoint with intermediate_size 64 loaded into a model with 80")

    for q in PREQUANT:
        @case(f"load_prequantized[{q}]")
        def _load_pre(q=q):
            from composer.loading import load_checkpoint

            cfg = tp_cfg(*QUANTS[q], "model.num_layers=1")
            ref, path = save_single(cfg, f"prequant-{q}", "packed")
            model = build(cfg, init=False)
            rep = load_checkpoint(model, path)
            layer, rl = model.layers[0].mlp.experts, ref.layers[0].mlp.experts
            assert layer.quant_state == "ready" and layer.quant_loaded, layer.quant_state
            held = assert_quant_sliced(layer, rl)
            other = sum(p.numel() * p.element_size() for n, p in ref.named_parameters() if ".experts." not in n)
            assert rep.bytes_read == sum(held.values()) + other, (rep.bytes_read, held, other)
            x = torch.randn(7, cfg.model.hidden_size, generator=gen("pre", q))
            res = compare_tp(model, x, cfg)["layers"]["layers.0.mlp.experts"]
            err = res.get("tp_vs_single_rel_err", 0.0)
            assert err <= F32_TOL or type(rl.quant_method).tp_splits_activation_scales(rl.quant_method.params), res
            return {"bytes_read": rep.bytes_read, "layer": res}

    @case("mismatched_prequantized")
    def _mismatch_pre():
        from composer.loading import load_checkpoint

        _, path = save_single(tp_cfg("quant=int8_w8a16", "model.intermediate_size=64", "model.num_layers=1"),
                              "prequant-small", "packed")
        model = build(tp_cfg("quant=int8_w8a16", "model.num_layers=1"), init=False)
        try:
            load_checkpoint(model, path)
        except WeightLoadError as exc:
            msg = str(exc)
            assert "intermediate dim is 128, not 160 (model.intermediate_size = 80)" in msg, msg
            assert "refusing to slice" in msg, msg
            return {"message": msg}
        raise AssertionError("a pre-quantized checkpoint with intermediate_size 64 loaded into a model with 80")

    for name, Ts, extra in (("uneven", (7, 3), ("model.num_shared_experts=1", "model.shared_expert_gate=true",
                                                 "model.has_bias=true")),
                            ("t0_one_rank", (0, 5), ("model.num_shared_experts=1",)),
                            ("quant_int8_w8a16", (4, 9), ("quant=int8_w8a16",))):
        @case(f"sequence_parallel[{name}]")
        def _sp(Ts=Ts, extra=extra):
            import torch.distributed as dist

            from composer.layers.fused_moe import FusedMoE

            cfg = tp_cfg("parallel.sequence_parallel=true", *extra)
            model, ref = build(cfg), build(single_rank_config(cfg))
            assert all(m.sequence_parallel for m in model.modules() if isinstance(m, FusedMoE))
            T = Ts[rank()]
            x = torch.randn(T, cfg.model.hidden_size, generator=gen("sp", rank(), *extra))  # each rank its own tokens
            out, single = model(x), ref(x)
            assert out.shape == (T, cfg.model.hidden_size), out.shape
            err = rel_error(out, single) if T else 0.0
            assert err <= F32_TOL, f"sequence-parallel output vs single-rank on this rank's tokens: {err:.3e}"
            res = compare_tp(model, x, cfg)
            for lname, st in res["layers"].items():
                assert st.get("tp_vs_single_rel_err", 0.0) <= F32_TOL, (lname, st)
            sums = [None] * WORLD
            dist.all_gather_object(sums, float(x.sum()))
            assert sums[0] != sums[1], "the ranks drew the same tokens"
            return {"err": err, "T": T}

    @case("weight_loader_full_tensor")
    def _weight_loader():
        cfg = tp_cfg("model.num_layers=1", "model.has_bias=true")
        model, ref = build(cfg, init=False), build(single_rank_config(cfg))
        layer, rl = model.layers[0].mlp.experts, ref.layers[0].mlp.experts
        I = rl.intermediate_size
        for e in range(cfg.model.num_experts):
            for pname in ("w13", "w2", "w13_bias", "w2_bias"):
                full = getattr(rl, pname)[e]
                if pname.startswith("w13"):
                    assert layer.weight_loader(getattr(layer, pname), full[:I], "w1", e)
                    assert layer.weight_loader(getattr(layer, pname), full[I:], "w3", e)
                else:
                    assert layer.weight_loader(getattr(layer, pname), full, "w2", e)
        assert_sliced(layer, rl)
        try:
            layer.weight_loader(layer.w2, rl.w2[0][:, :64], "w2", 0)
        except WeightLoadError as exc:
            assert "model.intermediate_size = 80" in str(exc) and "(96, 64)" in str(exc), str(exc)
            return {"message": str(exc)}
        raise AssertionError("a w2 of the wrong intermediate size was accepted")

    @case("bench_cpu")
    def _bench():
        from composer.distributed.tp_bench import bench_tp

        r = bench_tp(tp_cfg("model.num_layers=1"), tokens=16, iters=2, warmup=1)
        for k in ("compute_ms", "allreduce_ms", "total_ms", "single_rank_ms"):
            assert r[k] > 0, (k, r[k])
        assert r["allreduce_bytes"] == 16 * 96 * 4, r["allreduce_bytes"]
        assert r["allreduce_busbw_GBps"] > 0
        assert r["rel_err_vs_single"] <= F32_TOL, r["rel_err_vs_single"]
        return r

    @case("bench_task_hook")
    def _bench_task():
        from types import SimpleNamespace

        from rich.console import Console

        from composer.distributed.tp_bench import bench_task

        import os
        import tempfile

        cfg = tp_cfg("task=bench", "task.tokens=[4,8]", "task.iters=2", "task.warmup=1", "model.num_layers=1")
        run_dir = Path(tempfile.mkdtemp())
        m = bench_task(cfg, SimpleNamespace(console=Console(quiet=True), run_dir=run_dir))
        assert [r["tokens"] for r in m["tp_bench"]] == [4, 8], m
        assert (run_dir / "bench.json").exists() == (os.environ["RANK"] == "0")  # (rank 0 writes the rows)
        assert all(r["allreduce_ms"] > 0 and r["rel_err_vs_single"] <= F32_TOL for r in m["tp_bench"]), m
        return {"rows": len(m["tp_bench"])}

    return cases


def worker_main(out_dir: Path) -> int:
    import torch

    torch.set_num_threads(1)
    from composer import load_config
    from composer.distributed import runtime

    os.environ["TP_TEST_OUT"] = str(out_dir)
    r = int(os.environ["RANK"])
    cases = _worker_cases()
    state = runtime.init_from_env(load_config(None, [*BASE, f"parallel.tp_size={WORLD}"]))
    results: dict[str, dict] = {}
    for name in CASES:
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, "data": cases[name]() or {}}
        except Exception as exc:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        results[name]["seconds"] = time.perf_counter() - t0
    (out_dir / f"rank{r}.json").write_text(json.dumps(results, indent=1, default=str))
    runtime.teardown(state)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[2])))


# =========================================================================================================
# The tests.

import pytest  # noqa: E402

from composer.distributed import runtime  # noqa: E402
from composer.errors import ConfigError  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_job")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker", str(out)], cwd=ROOT,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_job_ran_every_case(job):
    for r in range(WORLD):
        assert sorted(job[r]) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_case(job, case):
    for r in range(WORLD):
        res = job[r][case]
        assert res["ok"], f"rank {r}: {res['error']}"


def test_each_rank_read_about_half(job):
    for layout in ("packed", "per_expert"):
        for r in range(WORLD):
            d = job[r][f"load[{layout}]"]["data"]
            assert d["bytes_read"] < 0.6 * d["full_bytes"], d
    # rank 0 also reads the w2 biases (added once); the other rank does not
    assert job[0]["load[packed]"]["data"]["bytes_read"] > job[1]["load[packed]"]["data"]["bytes_read"]


# -- validation in one process ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, text", [
    (("parallel.tp_size=3",), "parallel.tp_size", "must divide model.intermediate_size = 80"),
    (("parallel.tp_size=2", "parallel.ep_size=2", "all2all=naive"), "parallel.tp_size",
     "cannot be combined with expert parallelism"),
    (("parallel.sequence_parallel=true",), "parallel.sequence_parallel", "needs parallel.tp_size > 1"),
    (("parallel.tp_size=2", "model.num_shared_experts=1", "model.shared_expert_intermediate_size=25"),
     "parallel.tp_size", "shared experts' intermediate size 25"),
    (("parallel.tp_size=2", "quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,16]"),
     "quant.block_shape", "must divide model.intermediate_size / parallel.tp_size = 40"),
    (("parallel.tp_size=2", "quant=int4_w4a16", "quant.group_size=16"), "quant.group_size",
     "group_size 16 must divide model.intermediate_size / parallel.tp_size = 40"),
    (("parallel.tp_size=2", "quant=int4_w4a16", "quant.group_size=-1"), "quant.group_size",
     "one group per row spans w2's whole intermediate dim"),
])
def test_validation_errors(compose, overrides, key, text):
    with pytest.raises(ConfigError) as ei:
        compose(*overrides)
    msg = str(ei.value)
    assert key in msg and text in msg, msg


def test_int4_group_size_under_tp_is_one_problem_with_a_size_that_works(compose):
    """The single-rank rule suggested 16 (or -1) beside the TP rule's 8; under TP neither works."""
    with pytest.raises(ConfigError) as ei:
        compose("parallel.tp_size=2", "quant=int4_w4a16", "quant.group_size=32", "kernel=torch")
    assert [p.key for p in ei.value.problems] == ["quant.group_size"] and "pick quant.group_size=8" in str(ei.value)


def test_int4_group_size_hint_under_tp_fits_the_shard(compose):
    """A group that divides each rank's shard (40) but not H (96): the single-rank rule's hint was 16, which does not
    divide 40 either; under TP the hint must divide both H and the shard (8)."""
    with pytest.raises(ConfigError) as ei:
        compose("parallel.tp_size=2", "quant=int4_w4a16", "quant.group_size=20", "kernel=torch")
    msg = str(ei.value)
    assert [p.key for p in ei.value.problems] == ["quant.group_size"], msg
    assert "must divide model.hidden_size = 96" in msg and "pick quant.group_size=8" in msg, msg


def test_sharded_sizes_pass_validation(compose):
    cfg = compose("parallel.tp_size=2", "quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[8,8]")
    assert cfg.parallel.tp_size == 2 and not cfg.parallel.sequence_parallel


def test_unshardable_quant_method_is_refused(compose):
    from composer.quant.base import QuantMethod

    problems = QuantMethod.check_tp(None, None, 2)
    assert problems and "cannot shard" in problems[0][2]


def test_tp_size_must_match_world_size(compose):
    cfg = compose("parallel.tp_size=2")
    with pytest.raises(ConfigError, match=r"torchrun --nproc-per-node 2 -m composer parallel.tp_size=2"):
        runtime.init_from_env(cfg, env={})
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4.*parallel.tp_size=4"):
        runtime.init_from_env(cfg, env={"WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_build_without_runtime_says_what_to_do(compose):
    from composer.factory import build

    with pytest.raises(runtime.DistributedError, match="tp_rank= and tp_group="):
        build(compose("parallel.tp_size=2"))


@pytest.mark.parametrize("extra", [("quant=int8_w8a16",), ("parallel.sequence_parallel=true", "model.num_shared_experts=1")],
                         ids=["all_reduce_int8_w8a16", "sequence_parallel"])
def test_torchrun_check_end_to_end(tmp_path, extra):
    run_dir = tmp_path / "run"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc-per-node", str(WORLD), "--master-port", str(free_port()),
           "-m", "composer", "parallel.tp_size=2", "task=check", *extra, f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("check passed") == 1  # only rank 0 prints
    res = json.loads((run_dir / "results.json").read_text())
    m = res["metrics"]
    assert res["status"] == "ok" and m["world_size"] == 2 and m["tp_size"] == 2
    assert len(m["layers"]) == 2
    for name, s in m["layers"].items():
        assert s["tp_vs_single_rel_err"] <= m["layer_tolerance"], (name, s)
        if extra[0].startswith("quant="):  # also vs the unquantized float64 oracle (the single-rank model's)
            assert s["experts_rel_err"] < s["experts_rel_err_unquantized"] <= m["unquantized_bound"], (name, s)
    assert ("output_rel_err_unquantized" in m) == extra[0].startswith("quant=")
    assert res["config"]["parallel"]["tp_size"] == 2


def test_benches_refuse_the_other_parallelism_before_starting():
    """The all2all bench under tensor parallelism compared a sharded result with a reference sharded the same way
    (error 0); tp_bench under sequence parallelism failed with a traceback after building both models."""
    from composer.distributed import bench, tp_bench
    from composer.errors import ConfigError

    with pytest.raises(ConfigError, match="the all2all bench times expert parallelism"):
        bench.main(["--tokens", "16", "parallel.tp_size=2"])
    with pytest.raises(ConfigError, match="tp_bench times the all-reduce mode"):
        tp_bench.main(["--tokens", "16", "parallel.tp_size=2", "parallel.sequence_parallel=true"])
