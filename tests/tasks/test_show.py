"""task=show builds composer's graph on the meta device: the same slots, implementations, reasons and parameter
counts as the model that runs, with no storage, so a full-size preset shows in seconds."""
import json
import os
import subprocess
import sys

import pytest

from composer.describe import describe
from composer.factory import build, finish_loading


QUANTS = [["quant=none"], ["quant=int4_w4a16", "quant.group_size=16", "quant.zero_point=true"], ["quant=int8_w8a16"],
          ["quant=int8_w8a8"], ["quant=fp8_w8a8"], ["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,16]"],
          ["quant=fp8_w8a8", "quant.granularity=per_tensor", "quant.activation_scheme=static",
           "quant.static_input_scale=0.02"]]
SHARED = ["model=qwen2_moe", "model.num_layers=1", "model.num_experts=8", "model.hidden_size=128",
          "model.intermediate_size=64", "model.shared_expert_intermediate_size=128"]


@pytest.mark.parametrize("model", [[], SHARED], ids=["tiny", "shared_experts"])
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: "-".join(o.split("=")[1] for o in q[:2]))
def test_meta_graph_describes_as_the_built_one(compose, quant, model):
    cfg = compose(*quant, *model)
    real = [s.__dict__ for s in describe(build(cfg), cfg)]
    meta = build(cfg, init=False, device="meta")
    finish_loading(meta)  # the quant methods' processed layout
    assert all(t.is_meta for t in meta.state_dict().values())
    assert [s.__dict__ for s in describe(meta, cfg)] == real


def test_meta_build_has_nothing_to_initialize(compose):
    with pytest.raises(ValueError, match="init=False"):
        build(compose(), device="meta")


def test_show_full_size_deepseek_v3(tmp_path):
    """The --help example: 671B-parameter deepseek_v3 at its published size (1.3 TB of weights if allocated)."""
    proc = subprocess.run([sys.executable, "-m", "composer", "task=show", "model=deepseek_v3", "quant=int4_w4a16",
                           "hydra.run.dir=r"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    slots = json.loads((tmp_path / "r" / "results.json").read_text())["metrics"]["slots"]
    experts = [s for s in slots if s["path"].endswith("mlp.experts")]
    assert len(experts) == 58 and "int4_w4a16" in experts[0]["implementation"]
    # int4 group 128: 256 experts x 3 matrices x 7168 x 2048 nibbles (packed two per byte), plus bf16 scales
    assert experts[0]["params"] == 256 * 3 * 7168 * 2048 // 2 + 256 * 3 * 7168 * 2048 // 128
