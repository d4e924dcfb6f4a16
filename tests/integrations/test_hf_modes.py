"""Options of the Transformers backend do what they say or are refused: ``compile=true`` compiles the models that
task=check holds to the oracle (and task=run times), ``cuda_graph=true`` is refused, and task=bench takes
composer's bench options (json_file, markdown_file, peers, iters)."""
import json

import pytest
import torch
from rich.console import Console

from composer import load_config  # noqa: E402
from composer.errors import ConfigError  # noqa: E402
from composer.integrations import bench as hf_bench  # noqa: E402
from composer.integrations import check as hf_check  # noqa: E402
from composer.tasks import TaskContext, TaskFailed  # noqa: E402

from ._check import run_check  # noqa: E402


def cfg_for(*extra, device="cpu"):
    return load_config(None, [f"device={device}", "layer=transformers_moe", "model=hf", "model.arch=qwen3_moe", *extra])


def compile_cfg(task, *extra):
    """compile=true needs kernel=triton (the torch kernel syncs): on a GPU, else on a CPU in the interpreter."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg_for("compile=true", "kernel=triton", "model.dtype=float32", f"task={task}", *extra, device=device)


def ctx(tmp_path):
    return TaskContext(run_dir=tmp_path, console=Console(quiet=True))


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile with dynamo's eager backend (inductor takes ~20 s per model on this CPU): the graphs are traced
    as compile=true traces them; each call's module class and options are recorded."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls, real = [], torch.compile

    def spy(model, **kw):
        calls.append((type(model).__name__, kw))
        return real(model, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    return calls


def test_compile_check_holds_the_compiled_model_to_the_oracle(compiled, tmp_path, monkeypatch):
    """compile=true was accepted and ignored. Now the swapped model (fullgraph) and the reference are compiled and
    the compiled run is judged: an error only the compiled graph makes fails the check, naming compile."""
    cfg = compile_cfg("check")

    def wrong_when_compiled(model):  # eager passes; the traced graph scales one layer's experts by 1.01
        layer = model.get_submodule(model.composer_swapped[1])
        layer.register_forward_hook(lambda m, a, out: out * 1.01 if torch.compiler.is_compiling() else out)

    with pytest.raises(TaskFailed) as err:
        run_check(cfg, tmp_path, monkeypatch, wrong_when_compiled)
    assert [name for name, _ in compiled] == ["Qwen3MoeForCausalLM", "Qwen3MoeForCausalLM"]
    assert compiled[0][1] == {"fullgraph": True}  # the swapped model: a graph break is an error
    failures = str(err.value).splitlines()[1:]
    assert failures and all(f.strip().startswith("compile:") for f in failures), failures
    m = err.value.metrics
    assert m["logits_rel_err"] <= 1e-5 and m["compile"]["logits_rel_err"] > 1e-5
    bad = "model.layers.1.mlp.experts"
    assert m["compile"]["layers"][bad]["oracle_rel_err"] > 1e-3 and m["layers"][bad]["oracle_rel_err"] <= 1e-5


def test_compile_run_times_the_compiled_model(compiled, tmp_path):
    cfg = compile_cfg("run", "task.warmup=0", "task.iters=1")
    m = hf_check.run(cfg, ctx(tmp_path), cfg.task.params)
    assert compiled and compiled[0][1] == {"fullgraph": True}
    assert m["mode"] == "compile" and m["mode_time_ms"] > 0 and m["mode_vs_eager_rel_err"] <= 1e-5


@pytest.mark.parametrize("task", ["check", "run", "bench", "generate"])
def test_cuda_graph_is_refused(task, tmp_path):
    """Nothing captures the Hugging Face model in a CUDA graph (validation refuses cuda_graph on a CPU; on a GPU the
    tasks accepted and ignored it)."""
    from composer.tasks.generate import Generate

    cfg = cfg_for(f"task={task}").model_copy(update={"cuda_graph": True})
    run = {"check": hf_check.check, "run": hf_check.run, "bench": hf_bench.task_bench,
           "generate": lambda c, x, p: Generate().run(c, x)}[task]
    with pytest.raises(ConfigError) as err:
        run(cfg, ctx(tmp_path), cfg.task.params)
    (p,) = err.value.problems
    assert p.key == "cuda_graph" and "applies to layer=fused_moe" in p.message


@pytest.mark.parametrize("task", ["bench", "generate"])
def test_compile_is_refused_where_nothing_compiles(task, tmp_path, monkeypatch):
    from composer.tasks.generate import Generate

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = compile_cfg(task)
    run = hf_bench.task_bench if task == "bench" else (lambda c, x, p: Generate().run(c, x))
    with pytest.raises(ConfigError) as err:
        run(cfg, ctx(tmp_path), cfg.task.params)
    (p,) = err.value.problems
    assert p.key == "compile" and f"task={task} runs the Hugging Face model eagerly" in p.message


def test_bench_writes_json_and_markdown_files_and_honours_peers_and_iters(tmp_path, monkeypatch):
    """task.json_file / markdown_file were ignored (always hf_bench.md, no JSON), task.peers=false still timed the
    peers, task.iters was capped at 10."""
    from composer.tasks import timing

    asked = []

    def fake_time_fn(fn, device, warmup, iters, min_iters=3, budget_s=0.5, warmup_s=None, before=None):
        asked.append((warmup, iters, min_iters, budget_s))
        if before is not None:
            before()
        fn()
        return 1.0

    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    cfg = cfg_for("task=bench", "task.tokens=[3,5]", "task.peers=false", "task.iters=37", "task.min_iters=2",
                  "task.budget_s=0.25", "task.warmup=1", "task.json_file=t.json", "task.markdown_file=t.md")
    m = hf_bench.task_bench(cfg, ctx(tmp_path), cfg.task.params)
    assert [(r["implementation"], r["T"]) for r in m["rows"]] == [("composer (torch)", 3), ("composer (torch)", 5)]
    assert all(r["rel_err_vs_eager"] <= 1e-5 and r["same_next_token"] for r in m["rows"])  # (hf eager: untimed)
    assert set(asked) == {(1, 37, 2, 0.25)} and len(asked) == 4  # prefill and decode per T
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == m["rows"]
    assert "| composer (torch) |" in (tmp_path / "t.md").read_text()
    assert not (tmp_path / "hf_bench.md").exists()
    cfg = cfg_for("task=bench", "task.tokens=[3]", "task.peers=false", "task.accuracy=false")
    m = hf_bench.task_bench(cfg, ctx(tmp_path), cfg.task.params)
    assert [r["rel_err_vs_eager"] for r in m["rows"]] == [None]


def test_bench_says_it_times_eagerly_where_cuda_graphs_are_on(tmp_path, monkeypatch):
    """composer's bench times CUDA graphs on CUDA (task.cuda_graph, on by default); this one times the Hugging Face
    model as it runs: the table and the results say so, and the default command still runs."""
    row = {"arch": "qwen3_moe", "E": 8, "top_k": 2, "H": 32, "I": 16, "layers": 1, "T": 3,
           "implementation": "composer (triton)", "prefill_ms": 1.0, "decode_ms": 0.5, "rel_err_vs_eager": 1e-3,
           "same_next_token": True, "dtype": "bfloat16", "tolerance": 1e-2, "ok": True}
    monkeypatch.setattr(hf_bench, "bench_config", lambda *a, **k: [row])
    monkeypatch.setattr(hf_bench.torch.cuda, "get_device_name", lambda *a: "a GPU")
    cfg = cfg_for("task=bench").model_copy(update={"device": "cuda"})
    m = hf_bench.task_bench(cfg, ctx(tmp_path), cfg.task.params)
    assert m["cuda_graph"] == hf_bench.NO_GRAPHS and m["rows"] == [row]
    assert f"CUDA graphs: {hf_bench.NO_GRAPHS}" in (tmp_path / cfg.task.params.markdown_file).read_text()


def test_bench_cli_defaults_to_the_torch_kernel_on_cpu_and_lists_the_archs(tmp_path, monkeypatch, capsys):
    """On a CPU the CLI defaulted to --kernel triton (a traceback), and --arch qwen3 gave a KeyError."""
    seen = {}

    def fake_bench_arch(arch, layers, tokens, kernel, warmup, iters, device, dtype):
        seen.update(arch=arch, kernel=kernel, device=device, tokens=tokens)
        return []

    monkeypatch.setattr(hf_bench, "bench_arch", fake_bench_arch)
    assert hf_bench.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen == {"arch": "qwen3_moe", "kernel": "torch", "device": "cpu", "tokens": [1, 16]}
    with pytest.raises(SystemExit) as exit_:
        hf_bench.main(["--arch", "qwen3"])
    assert exit_.value.code == 2
    assert "invalid choice: 'qwen3' (choose from 'mixtral', 'qwen2_moe', 'qwen3_moe'" in capsys.readouterr().err
