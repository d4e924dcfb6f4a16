"""task=bench names the tile config files composer's Triton kernels ran, so a table says whose tiles it measured."""
from __future__ import annotations

import torch

from composer.kernels.triton import configs as cfgs
from composer.tasks.bench import Shape, tile_source, tile_sources_line, to_markdown

MIXTRAL = dict(name="mixtral_8x7b", E=8, k=2, H=4096, I=14336, dtype=torch.bfloat16)


def on_an_h200(monkeypatch):
    monkeypatch.setattr(cfgs, "device_name", lambda d=None: "NVIDIA_H200")
    monkeypatch.setattr(cfgs, "device_capability", lambda d=None: "9.0")


def test_tile_source_names_the_file_and_entry(monkeypatch):
    on_an_h200(monkeypatch)
    cpu = torch.device("cpu")
    assert tile_source(Shape(**MIXTRAL), 1000, cpu) == (
        "E=8,N=14336,K=4096,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json [T=1024]")  # borrowed, nearest T
    int4 = Shape(**MIXTRAL, quant="int4_w4a16", quant_params={"group_size": 128})
    assert tile_source(int4, 1, cpu) == "E=8,N=14336,K=4096,device_name=NVIDIA_H200,dtype=int4_w4a16.json [T=1]"
    assert tile_source(Shape("odd", 3, 2, 48, 40, torch.bfloat16), 1, cpu) == "heuristic"


def test_markdown_lists_each_file_with_the_tokens_it_served(monkeypatch):
    on_an_h200(monkeypatch)
    shape = Shape(**MIXTRAL)
    rows = [{"T": T, "tiles": tile_source(shape, T, torch.device("cpu")), "impls": {}} for T in (1, 16, 4096)]
    result = {"meta": {"shape": {"name": "mixtral_8x7b", "E": 8, "top_k": 2, "H": 4096, "I": 14336,
                                 "dtype": "bfloat16", "activation": "silu", "has_bias": False},
                       "kernel": "triton", "device": "NVIDIA H200", "date": "d", "versions": {}, "timer": "t"},
              "rows": rows}
    line = tile_sources_line(result)
    assert line == ("Tile configs: E=8,N=14336,K=4096,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json: "
                    "T = 1 (entry T=1), T = 16 (entry T=16), T = 4096 (entry T=4096).")
    assert line in to_markdown(result)
    assert tile_sources_line({"rows": [{"T": 1, "impls": {}}]}) is None  # CPU runs: no Triton tiles, no line


class _Smi:
    def __init__(self, stdout, returncode=0):
        self.stdout, self.returncode = stdout, returncode


def fake_smi(monkeypatch, stdout=None, error=None, uuid="abcd-1234"):
    import subprocess
    import types

    def run(*a, **kw):
        if error:
            raise error
        return _Smi(stdout)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(uuid=uuid))


def test_gpu_clocks_reads_the_clock_and_what_caps_it(monkeypatch):
    from composer.tasks.bench import gpu_clocks

    dev = torch.device("cuda")
    fake_smi(monkeypatch, "GPU-abcd-1234, 1710, 1980, 677.86, 0x0000000000000004\n")
    assert gpu_clocks(dev) == {"sm_mhz": 1710, "sm_max_mhz": 1980, "limits": ["power cap"], "power_w": 677.86}
    two = ("GPU-ffff-0000, 1980, 1980, 80.00, 0x0000000000000001\n"
           "GPU-ABCD-1234, 1500, 1980, [N/A], 0x0000000000000060\n")
    fake_smi(monkeypatch, two)  # the device's own line, by uuid; a power reading it cannot give is left out
    assert gpu_clocks(dev) == {"sm_mhz": 1500, "sm_max_mhz": 1980, "limits": ["thermal"]}
    fake_smi(monkeypatch, two, uuid="")  # several GPUs and none matched: no guess
    assert gpu_clocks(dev) is None
    fake_smi(monkeypatch, error=FileNotFoundError("nvidia-smi"))
    assert gpu_clocks(dev) is None
    fake_smi(monkeypatch, "NVIDIA-SMI has failed\n")
    assert gpu_clocks(dev) is None


def test_clocks_line_lists_each_t():
    from composer.tasks.bench import clocks_line

    c = lambda mhz, limits: {"graph_clocks": {"sm_mhz": mhz, "sm_max_mhz": 1980, "limits": limits}}  # noqa: E731
    result = {"rows": [{"T": 1, "impls": {"composer triton": c(1980, [])}},
                       {"T": 4096, "impls": {"composer triton": c(1710, ["power cap"])}},
                       {"T": 16, "impls": {"composer triton": {}}}]}
    assert clocks_line(result, "composer triton") == (
        "SM clock (MHz, of 1980) right after composer triton's graph replays: T = 1 1980, T = 4096 1710 (power cap).")
    assert clocks_line(result, "composer torch") is None


def test_bench_output_file_names_are_checked_before_anything_runs():
    """task.json_file / task.markdown_file are file names in the run folder: a folder in the name failed only after
    the whole benchmark (losing it), and equal names or results.json overwrote a file."""
    import pytest

    from composer import load_config
    from composer.errors import ConfigError

    for override, words in (("task.json_file=sub/b.json", "must be a file name in the run folder"),
                            ("task.json_file=/abs/b.json", "must be a file name in the run folder"),
                            ("task.markdown_file=.", "must be a file name in the run folder"),
                            ("task.json_file=results.json", "results.json is .* one of the run folder's own files"),
                            ("task.json_file=composer.log", "composer.log is .* one of the run folder's own files"),
                            ("task.json_file=.hydra", r"\.hydra is .* one of the run folder's own files"),
                            ("task.json_file=" + "a" * 300, "is 300 bytes long; a file name takes at most 255"),
                            ("task.markdown_file=bench.json", "is task.json_file too")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["task=bench", override])
    assert load_config(None, ["task=bench", "task.json_file=mine.json"]).task.params.json_file == "mine.json"


def test_a_table_that_cannot_be_written_keeps_the_measurements(tmp_path, monkeypatch):
    """An OSError writing bench.json came after the whole benchmark, as a traceback, with results.json empty."""
    import pathlib

    import pytest

    from composer import load_config
    from composer.tasks import TaskContext, TaskFailed
    from composer.tasks.bench import Bench

    cfg = load_config(None, ["device=cpu", "kernel=torch", "model.num_layers=1", "task=bench", "task.tokens=[1]",
                             "task.peers=false", "task.iters=2", "task.warmup=0"])
    real = pathlib.Path.write_text
    monkeypatch.setattr(pathlib.Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError(28, "No space"))
                        if self.name == "bench.json" else real(self, *a, **k))
    from rich.console import Console

    with pytest.raises(TaskFailed, match="could not write the tables .*No space.*in results.json") as err:
        Bench().run(cfg, TaskContext(run_dir=tmp_path, console=Console(quiet=True)))
    assert err.value.metrics["rows"][0]["T"] == 1
