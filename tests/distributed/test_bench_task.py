"""`composer task=bench` dispatches to the expert- and tensor-parallel benches under torchrun (gloo, 2 ranks)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("parallel, key", [(["all2all=all_to_all", "parallel.ep_size=2"], "ep_bench"),
                                            (["parallel.tp_size=2"], "tp_bench")])
def test_bench_task_under_torchrun(tmp_path, parallel, key):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "composer",
           "task=bench", "task.tokens=[3,8]", "task.iters=2", "task.warmup=1", "device=cpu", *parallel,
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "ok" and res["metrics"]["world_size"] == 2
    rows = res["metrics"][key]
    assert [r.get("tokens", r.get("tokens_per_rank")) for r in rows] == [3, 8]
    assert all(r["rel_err_vs_single"] < 1e-2 for r in rows)
    # like the single-rank bench, rank 0 writes the rows as JSON and a markdown table beside results.json
    assert [r.get("tokens", r.get("tokens_per_rank")) for r in json.loads((tmp_path / "run" / "bench.json").read_text())] == [3, 8]
    md = (tmp_path / "run" / "bench.md").read_text()
    assert md.count("\n|") >= 3 and "rel" in md
