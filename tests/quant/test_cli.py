"""`composer task=check quant=<each>` end to end on the CPU (one subprocess, a Hydra sweep of the methods)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from composer.checking import TOLERANCE
from composer.config import validate_config
from composer.quant.checking import output_tolerance

SWEEPS = [
    # (sweep overrides, expected jobs)
    (["quant=int8_w8a16,int8_w8a8,int4_w4a16"], 3),
    (["quant=fp8_w8a8", "quant.granularity=per_tensor,per_token_channel,block"], 3),
]
COMMON = ["task=check", "kernel=torch", "device=cpu", "model.hidden_size=128", "model.intermediate_size=128",
          "model.num_experts=4", "model.num_layers=2", "task.tokens=12"]


def test_check_every_method_end_to_end(tmp_path):
    exe = Path(sys.executable).with_name("composer")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "composer"]  # (a checkout on PYTHONPATH)
    results = []
    for i, (sweep, n) in enumerate(SWEEPS):
        d = tmp_path / f"sweep{i}"
        dtype = "model.dtype=float32" if i == 0 else "model.dtype=bfloat16"
        r = subprocess.run([*cmd, "-m", *COMMON, dtype, *sweep, f"hydra.sweep.dir={d}"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
        files = sorted(d.glob("*/results.json"))
        assert r.returncode == 0 and len(files) == n, r.stdout[-3000:] + r.stderr[-3000:]
        results += [json.loads(f.read_text()) for f in files]
        for res in results[-n:]:  # each job's summary line names the tolerance its check applied
            assert f"check passed (output tolerance {res['metrics']['tolerance']:.3g}, per layer " in r.stdout
    seen = set()
    for res in results:
        m = res["metrics"]
        q = res["config"]["quant"]
        seen.add((q["name"], q.get("granularity")))
        assert res["status"] == "ok" and m["passed"], res
        # both oracles are reported; the dequantized one is far closer than the unquantized one
        assert 0 < m["output_rel_err"] < m["output_rel_err_unquantized"] <= m["unquantized_bound"]
        # the tolerances printed and recorded are the ones applied: the method's output tolerance, the layers'
        assert m["tolerance"] == output_tolerance(validate_config(res["config"])) >= TOLERANCE[res["config"]["model"]["dtype"]]
        for layer in m["layers"].values():
            assert layer["experts_rel_err"] <= m["layer_tolerance"] <= m["tolerance"]
            assert layer["experts_rel_err"] < layer["experts_rel_err_unquantized"] <= m["unquantized_bound"]
    assert seen == {("int8_w8a16", None), ("int8_w8a8", None), ("int4_w4a16", None), ("fp8_w8a8", "per_tensor"),
                    ("fp8_w8a8", "per_token_channel"), ("fp8_w8a8", "block")}
