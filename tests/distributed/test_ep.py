"""Expert parallelism on CPU with gloo and 2 processes.

One spawned 2-rank job runs every in-process case (tests/distributed/_worker.py: every backend x
placement vs the single-rank model, uneven counts, T = 0, empty ranks, bf16, a quant method, config and
placement mismatches, EP weight loading, the bench); each test below asserts one case on both ranks.
The CLI is tested end to end with torchrun: a passing ``task=check``, a rank that raises, a rank that
hangs (stopped by parallel.timeout_s).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from composer.distributed import runtime
from composer.errors import ConfigError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENV_BIN = Path(sys.executable).parent
WORLD = 2
BACKENDS = ("naive", "allgather_reducescatter", "all_to_all")
PLACEMENTS = ("linear", "round_robin")
CASES = (
    [f"{kind}[{b}-{p}]" for b in BACKENDS for p in PLACEMENTS for kind in ("model", "uneven", "empty_rank", "t0_one_rank")]
    + [f"{kind}[{b}]" for b in BACKENDS for kind in ("t0_all_ranks", "bf16", "quant_int8_w8a16")]
    + ["mismatched_config", "same_config_passes", "placement_mismatch_detected",
       "load_local_experts[packed]", "load_local_experts[per_expert]", "bench_cpu"]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_job")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE / "_worker.py"), "all", str(out)], cwd=ROOT,
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


def test_empty_rank_really_received_nothing(job):
    for b in BACKENDS:
        assert job[1][f"empty_rank[{b}-linear]"]["data"]["pairs_received"] == [0]
        assert job[0][f"empty_rank[{b}-linear]"]["data"]["pairs_received"][0] > 0


def test_mismatch_message_is_readable(job):
    msg = job[0]["mismatched_config"]["data"]["message"]
    assert "launch every rank with the same config" in msg and "seed: 0 vs 7" in msg


# -- start-up validation in one process -------------------------------------------------------------------

def test_ep_size_needs_torchrun(compose):
    cfg = compose("all2all=all_to_all", "parallel.ep_size=2")
    with pytest.raises(ConfigError, match=r"torchrun --nproc-per-node 2"):
        runtime.init_from_env(cfg, env={})


def test_ep_size_must_match_world_size(compose):
    cfg = compose("all2all=naive", "parallel.ep_size=2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4.*parallel.ep_size=4"):
        runtime.init_from_env(cfg, env={"WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_single_rank_job_is_none(compose):
    assert runtime.Job.start(compose(), env={}) is None


def test_build_without_runtime_says_what_to_do(compose):
    from composer.factory import build

    with pytest.raises(runtime.DistributedError, match="init_from_env"):
        build(compose("all2all=allgather_reducescatter", "parallel.ep_size=2"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_on_one_rank_is_a_passthrough(compose, backend):
    import torch

    from composer.factory import build

    cfg = compose(f"all2all={backend}", "model.dtype=float32", "kernel=torch")
    ref = build(compose("model.dtype=float32", "kernel=torch"))
    x = torch.randn(7, cfg.model.hidden_size)
    assert torch.equal(build(cfg)(x), ref(x))


def test_timeout_key_is_validated(compose):
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        compose("parallel.timeout_s=0")


# -- the CLI under torchrun ------------------------------------------------------------------------------

def torchrun(args: list[str], run_dir: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [str(VENV_BIN / "torchrun"), "--nproc-per-node", str(WORLD), "--master-port", str(free_port()),
           *args, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t0


def test_torchrun_check_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    r, _ = torchrun(["-m", "composer", "all2all=all_to_all", "parallel.ep_size=2", "task=check",
                     "parallel.placement=round_robin", "quant=int4_w4a16", "quant.group_size=16"], run_dir, 120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "check passed" in r.stdout
    assert r.stdout.count("check passed") == 1  # only rank 0 prints
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "ok" and res["metrics"]["world_size"] == 2
    m = res["metrics"]
    for name, s in m["layers"].items():
        assert s["ep_vs_single_rel_err"] <= m["layer_tolerance"], (name, s)
        # quantized: each layer also vs the unquantized float64 oracle (the single-rank model's, quant=none)
        assert s["experts_rel_err"] < s["experts_rel_err_unquantized"] <= m["unquantized_bound"], (name, s)
    assert m["output_rel_err"] < m["output_rel_err_unquantized"] <= m["unquantized_bound"]
    assert "vs the unquantized float64 oracle" in r.stdout
    assert res["config"]["parallel"]["ep_size"] == 2


def test_rank_that_raises_stops_the_job(tmp_path):
    run_dir = tmp_path / "run"
    r, elapsed = torchrun(["--no-python", str(VENV_BIN / "composer"), "plugins=[ep_faulty_plugin]",
                           "all2all.name=faulty", "+all2all.mode=raise", "parallel.ep_size=2",
                           "parallel.timeout_s=300"], run_dir, 120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "RuntimeError: injected fault on rank 1" in out, out[-3000:]
    assert elapsed < 90, f"took {elapsed:.0f} s: the others waited instead of stopping"


def test_rank_that_hangs_times_out(tmp_path):
    run_dir = tmp_path / "run"
    r, elapsed = torchrun(["-m", "composer", "plugins=[ep_faulty_plugin]", "all2all.name=faulty",
                           "+all2all.mode=hang", "parallel.ep_size=2", "parallel.timeout_s=4"], run_dir, 120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "error (rank 0)" in out and "parallel.timeout_s=4 s late" in out, out[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "another rank has probably failed" in res["error"]
    assert elapsed < 90, f"took {elapsed:.0f} s"
