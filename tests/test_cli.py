"""The `composer` command end to end (subprocesses, as a user runs it)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def composer(args, cwd, env_extra=None, timeout=300):
    exe = shutil.which("composer", path=str(Path(sys.executable).parent)) or None
    cmd = [exe] if exe else [sys.executable, "-m", "composer"]
    env = dict(os.environ, COLUMNS="200", **(env_extra or {}))
    env.pop("HYDRA_FULL_ERROR", None) if not env_extra or "HYDRA_FULL_ERROR" not in env_extra else None
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_default_job_runs_and_writes_results(tmp_path):
    proc = composer(["device=cpu", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "composer run: tiny" in proc.stdout and "layer fused_moe" in proc.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["schema"] == "composer.results/1" and res["status"] == "ok" and res["task"] == "run"
    assert res["config"]["model"]["name"] == "tiny" and len(res["config_hash"]) == 16
    assert res["metrics"]["output_rel_err"] < 1e-2 and res["versions"]["torch"]
    assert (tmp_path / "run" / "config.resolved.yaml").exists() and (tmp_path / "run" / ".hydra" / "config.yaml").exists()


def test_check_passes_and_fails_with_exit_codes(tmp_path):
    ok = composer(["task=check", "model=qwen3_30b_a3b", "model.num_layers=1", "model.hidden_size=64",
                   "model.intermediate_size=32", "model.top_k=4", "device=cpu", "hydra.run.dir=ok"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "check passed" in ok.stdout
    bad = composer(["task=check", "task.tolerance=1e-30", "device=cpu", "hydra.run.dir=bad"], tmp_path)
    assert bad.returncode == 1
    assert "check failed" in bad.stderr and "Traceback" not in bad.stderr
    res = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert res["status"] == "failed" and "tolerance" in res["error"] and res["metrics"]["passed"] is False


def test_bad_config_exits_2_without_traceback(tmp_path):
    proc = composer(["model.top_k=9", "model.router.scoring=softmx", "quant.name=fp9", "hydra.run.dir=r"], tmp_path)
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    assert "model.top_k = 9: must be <= model.num_experts = 8" in err
    assert "Did you mean 'softmax'?" in err and "quant.name = 'fp9'" in err
    unknown = composer(["quant=fp9"], tmp_path)
    assert unknown.returncode == 2 and "no such quant config; choose one of" in unknown.stderr
    typo = composer(["model.top_kk=3"], tmp_path)
    assert typo.returncode == 2 and "Did you mean 'top_k'?" in typo.stderr
    twice = composer(["+deploy=cpu_reference", "+deploy=h100_bf16"], tmp_path)  # (Hydra: "Multiple values", exit 1)
    assert twice.returncode == 2 and "one +deploy= per run" in twice.stderr
    sweep = composer(["model.top_k=1,2"], tmp_path)  # (Hydra said "Ambiguous value" and exited 1)
    assert sweep.returncode == 2 and "a sweep (several values, range() or glob()) needs -m" in sweep.stderr
    for multirun in (["--multi"], ["hydra.mode=MULTIRUN"]):  # (Hydra's other ways to sweep still sweep)
        assert composer([*multirun, "model.top_k=1,2", "task=show", "hydra.sweep.dir=s"], tmp_path).returncode == 0
    hf_key = composer(["model.arch=qwen3_moe"], tmp_path)  # (Hydra said "Key 'arch' is not in struct", exit 1)
    assert hf_key.returncode == 2 and "read only with model=hf" in hf_key.stderr
    full = composer(["model.top_k=9", "hydra.run.dir=r2"], tmp_path, {"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 2 and "Traceback" in full.stderr  # the traceback, and still a config problem's code
    late = composer(["quant=fp8_w8a8", "quant.activation_scheme=static", "hydra.run.dir=r3"], tmp_path)  # at build
    assert late.returncode == 2 and "quant.static_input_scale = None" in late.stderr and "Traceback" not in late.stderr
    assert json.loads((tmp_path / "r3" / "results.json").read_text())["status"] == "failed"


BOOM = """from composer.kernels.torch_backend import TorchExperts
from composer.registry import KERNELS


@KERNELS.register("boom")
class Boom(TorchExperts):
    name = "boom"

    def apply(self, *args, **kwargs):
        raise RuntimeError("injected: a kernel bug")
"""


def test_unexpected_error_is_recorded_and_a_sweep_goes_on(tmp_path):
    """A bug (not a ComposerError) shows its traceback and exits 1, and results.json records it; in a sweep the
    other jobs still run and the summary names the failed one."""
    (tmp_path / "boom_kernel.py").write_text(BOOM)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    one = composer(["plugins=[boom_kernel]", "kernel.name=boom", "hydra.run.dir=one"], tmp_path, env)
    assert one.returncode == 1 and "Traceback" in one.stderr and "RuntimeError: injected: a kernel bug" in one.stderr
    res = json.loads((tmp_path / "one" / "results.json").read_text())
    assert res["status"] == "failed" and res["error"] == "RuntimeError: injected: a kernel bug"
    sweep = composer(["-m", "plugins=[boom_kernel]", "kernel.name=boom,torch", "hydra.sweep.dir=sw"], tmp_path, env)
    assert sweep.returncode == 1, sweep.stderr[-3000:]
    assert "1 ok, 1 not ok" in sweep.stdout and "injected: a kernel bug" in sweep.stdout + sweep.stderr
    docs = {json.loads(f.read_text())["status"] for f in (tmp_path / "sw").glob("*/results.json")}
    assert docs == {"ok", "failed"}


def test_help_names_composer_and_its_groups(tmp_path):
    proc = composer(["--help"], tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.startswith("composer: a declarative") and "Exit codes: 0 ok, 1" in proc.stdout
    assert "quant: fp8_w8a8, int4_w4a16, int8_w8a16, int8_w8a8, none" in proc.stdout
    # (deploy= and experiment= without the + are refused: the help says how they are added)
    assert "overlays, added\nwith a +: +deploy=cpu_reference" in proc.stdout and "Powered by Hydra" in proc.stdout


def test_cfg_job_and_info_defaults(tmp_path):
    proc = composer(["--cfg", "job", "model=mixtral_8x7b"], tmp_path)
    assert proc.returncode == 0 and "hidden_size: 4096" in proc.stdout and "intermediate_size: 14336" in proc.stdout
    info = composer(["--info", "defaults"], tmp_path)
    assert info.returncode == 0 and "model/tiny" in info.stdout and "kernel/auto" in info.stdout


def test_multirun_runs_one_job_each_and_records_failures(tmp_path):
    proc = composer(["-m", "model.top_k=1,2,9", "device=cpu", "hydra.sweep.dir=sweep"], tmp_path)
    assert proc.returncode == 2, proc.stderr  # the top_k=9 job failed validation; the others ran
    results = {}
    for f in sorted((tmp_path / "sweep").glob("*/results.json")):
        r = json.loads(f.read_text())
        results[r["overrides"][0]] = r
    assert set(results) == {"model.top_k=1", "model.top_k=2", "model.top_k=9"}
    assert results["model.top_k=1"]["status"] == results["model.top_k=2"]["status"] == "ok"
    assert results["model.top_k=9"]["status"] == "failed" and "must be <= model.num_experts" in results["model.top_k=9"]["error"]


def test_out_of_memory_says_how_big_and_what_to_do(compose):
    from composer.cli import out_of_memory

    cfg = compose("model=mixtral_8x7b")
    msg = out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                                     "you tried to allocate 939524096 bytes"), cfg)
    assert msg.startswith("out of host memory (") and "45.1B expert parameters (84.0 GiB in bfloat16)" in msg
    assert "model.num_layers=1" in msg and "task=show" in msg
    assert out_of_memory(MemoryError(), None).startswith("out of host memory (MemoryError)")
    assert out_of_memory(RuntimeError("injected: a kernel bug"), cfg) is None


def test_under_torchrun_rank_0_alone_reports_a_config_problem(tmp_path):
    """Every rank usually finds the same config problem; rank 0 prints it in full and writes results.json, the others
    print it in one line (torchrun with N ranks printed the whole report N times) and exit 2. A sweep under torchrun
    is refused: its ranks fell out of step after the first job."""
    for rank in ("1", "0"):
        env = {"RANK": rank, "WORLD_SIZE": "2"}
        pre = composer(["quant=fp9"], tmp_path, env)  # found before Hydra runs
        late = composer(["model.top_k=9", f"hydra.run.dir=r{rank}"], tmp_path, env)  # found in the job
        for proc in (pre, late):
            assert proc.returncode == 2
            assert ("invalid composer config" in proc.stderr) == (rank == "0"), (rank, proc.stderr)
            assert ("error (rank 1): config problem:" in proc.stderr) == (rank == "1"), (rank, proc.stderr)
        assert (tmp_path / f"r{rank}" / "results.json").exists() == (rank == "0")
    alone = composer(["model.top_k=9", "hydra.run.dir=alone"], tmp_path, {"RANK": "1"})  # (no job: WORLD_SIZE unset)
    assert alone.returncode == 2 and "model.top_k = 9" in alone.stderr
    sweep = composer(["-m", "model.top_k=1,2"], tmp_path, {"RANK": "0", "WORLD_SIZE": "2"})
    assert sweep.returncode == 2 and "a sweep under torchrun is not supported" in sweep.stderr


def test_full_error_sweep_runs_every_job_and_failed_runs_record_what_ran(tmp_path):
    """HYDRA_FULL_ERROR=1 adds tracebacks; it must not stop a sweep at its first failure. A failed job's results.json
    names the implementation that ran (report rows would otherwise say 'auto' for it)."""
    proc = composer(["-m", "task=check", "task.tolerance=1e-30,0.1", "device=cpu", "hydra.sweep.dir=sweep"], tmp_path,
                    {"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    runs = [json.loads(f.read_text()) for f in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert [r["status"] for r in runs] == ["failed", "ok"]
    assert runs[0]["resolved"]["kernel"] == runs[1]["resolved"]["kernel"] == "torch"


DEPLOY_FILE = """\
schema_version: 1
model: {name: qwen3_30b_a3b, num_layers: 1, hidden_size: 64, intermediate_size: 32, top_k: 4}
kernel: torch
quant: {name: int8_w8a16}
task: check
device: cpu
"""


def test_deploy_file_runs_from_the_command_line(tmp_path):
    """composer --deploy-file F runs the config composer.load_config(F) builds (the same config hash), the command
    line's overrides win (a group chosen again starts from its own defaults, as load_config has it), and a sweep
    over a file runs one job per value."""
    from composer import load_config

    f = tmp_path / "prod.yaml"
    f.write_text(DEPLOY_FILE)
    ok = composer(["--deploy-file", str(f), "hydra.run.dir=r"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "check passed" in ok.stdout and "quant=int8_w8a16" in ok.stdout
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["status"] == "ok" and res["config_hash"] == load_config(f).config_hash()
    over = composer([f"--deploy-file={f}", "quant=none", "model.top_k=2", "hydra.run.dir=r2"], tmp_path)
    assert over.returncode == 0, over.stderr
    res = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert res["config_hash"] == load_config(f, ["quant=none", "model.top_k=2"]).config_hash()
    assert res["config"]["quant"]["name"] == "none" and res["config"]["model"]["top_k"] == 2
    sweep = composer(["-m", "--deploy-file", str(f), "model.top_k=1,2", "hydra.sweep.dir=s"], tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    jobs = (tmp_path / "s").glob("*/results.json")
    assert sorted(json.loads(p.read_text())["config"]["model"]["top_k"] for p in jobs) == [1, 2]


def test_deploy_file_problems_exit_2(tmp_path):
    """A deployment file's problems are reported with the file's name before anything runs; so are a missing file,
    --deploy-file without a file or given twice, and an overlay on top of a file."""
    f = tmp_path / "prod.yaml"
    f.write_text(DEPLOY_FILE.replace("top_k: 4", "top_kk: 4"))
    bad = composer(["--deploy-file", str(f)], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "prod.yaml" in bad.stderr and "Did you mean 'top_k'?" in bad.stderr
    assert not (tmp_path / "outputs").exists()  # (nothing ran)
    f.write_text(DEPLOY_FILE)
    for args, says in ((["--deploy-file", "missing.yaml"], "no such config file"),
                       (["--deploy-file"], "takes a YAML file"),
                       (["--deploy-file", str(f), "--deploy-file", str(f)], "one deployment file per run"),
                       (["--deploy-file", str(f), "+deploy=cpu_reference"], "not to a deployment file")):
        proc = composer(args, tmp_path)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr[-500:])
    gpu = tmp_path / "gpu.yaml"  # a GPU deployment on this CPU machine: refused, unless the command line fixes it
    gpu.write_text(DEPLOY_FILE.replace("device: cpu", "device: cuda"))
    if not __import__("torch").cuda.is_available():
        refused = composer(["--deploy-file", str(gpu), "task=check"], tmp_path)
        assert refused.returncode == 2 and "gpu.yaml" in refused.stderr and "no CUDA device" in refused.stderr
    fixed = composer(["--deploy-file", str(gpu), "device=cpu", "hydra.run.dir=fixed"], tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((tmp_path / "fixed" / "results.json").read_text())["config"]["device"] == "cpu"


@pytest.mark.parametrize("value", ["a${b}c", "it's", "back\\slash", "end\\", "q\\'x", "x,y", "", "\\${lit}", "null",
                                   "3", 1.5, 1e-30, float("inf"), None, True, [1, "a", 2.5], {"a": 1, "b": "x"}])
def test_deploy_file_values_survive_hydra(value):
    """Each YAML value of a deployment file, written as a Hydra override, reads back as itself after OmegaConf
    resolves it: strings stay strings ("3", "null"), and a literal ${...} is not interpolated (load_config does not
    interpolate a file's strings either)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from composer.deploy_file import _value

    o = OverridesParser.create().parse_overrides([f"k={_value(value)}"])[0]
    assert OmegaConf.to_container(OmegaConf.create({"k": o.value()}), resolve=True)["k"] == value


@pytest.mark.parametrize("text, args", [
    # the file's own quant choice named again on the command line keeps the file's keys (as load_config has it)
    ("quant: {name: fp8_w8a8, granularity: block, block_shape: [16, 16]}\nkernel: torch\n", ["quant=fp8_w8a8"]),
    ("quant: {name: fp8_w8a8, granularity: block, block_shape: [16, 16]}\nkernel: torch\n", ["quant=int8_w8a16"]),
    ("model: {name: tiny, num_layers: 1}\n", ["model=tiny"]),
    # a name with no shipped conf file (a custom model given whole), and keys the shipped section lacks
    ("model: {name: custom, num_experts: 4, top_k: 1, hidden_size: 32, intermediate_size: 32}\n", []),
    ("model: {name: hf, arch: qwen3_moe, hf_overrides: {num_hidden_layers: 1, _name_or_path: 'x${y}'}}\n", ["seed=2"]),
    ("custom_ops: [none, +silu_and_mul]\nseed: 5\n", ["--info"]),  # (--info: Hydra prints, nothing runs)
], ids=["same_name", "other_name", "same_preset", "custom_model", "hf_keys", "info"])
def test_deploy_file_config_equals_load_config(tmp_path, text, args):
    """The run's config hash is load_config's for the same file and overrides, in the cases that differed before."""
    from composer import load_config

    f = tmp_path / "d.yaml"
    f.write_text(text + "device: cpu\n")
    proc = composer(["--deploy-file", str(f), "task=show", "hydra.run.dir=r", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-1500:]
    if "--info" in args:
        return
    expected = load_config(f, [a for a in args if "=" in a] + ["task=show"]).config_hash()
    assert json.loads((tmp_path / "r" / "results.json").read_text())["config_hash"] == expected


def test_deploy_file_refuses_what_it_cannot_run_as_written(tmp_path):
    """Hydra settings in a file, a YAML date (not a config value), and a sweep over the file's own group choice and
    others (its keys would hold in one job and not the next): exit 2 with the file's name, nothing runs."""
    cases = [("hydra: {run: {dir: x}}\n", [], "Hydra's settings"),
             ("model: {name: hf, arch: qwen3_moe, hf_overrides: {_name_or_path: 2024-01-01}}\n", [],
              "quote it to make it a string"),
             ("quant: {name: fp8_w8a8, granularity: per_tensor}\n", ["-m", "quant=fp8_w8a8,none"], "a sweep over it")]
    for i, (text, args, says) in enumerate(cases):
        f = tmp_path / f"f{i}.yaml"
        f.write_text(text + "device: cpu\n")
        proc = composer(["--deploy-file", str(f), *args, "task=show"], tmp_path)
        assert proc.returncode == 2 and says in proc.stderr and f"f{i}.yaml" in proc.stderr, proc.stderr[-800:]
        assert "Traceback" not in proc.stderr


def test_errors_keep_bracketed_text(tmp_path):
    """Errors print through rich: a message's [all] or a file named d/[x].yaml must not be read as markup (and
    vanish) in the problems reported before Hydra runs."""
    proc = composer(["task=show", "custom_ops=all"], tmp_path)
    assert proc.returncode == 2 and "must be a list such as [all], [none, +silu_and_mul]" in proc.stderr, proc.stderr
    d = tmp_path / "d"
    d.mkdir()
    (d / "[x].yaml").write_text("model: {top_kk: 1}\n")
    proc = composer(["--deploy-file", str(d / "[x].yaml")], tmp_path)
    assert proc.returncode == 2 and f"in {d / '[x].yaml'}: 1 problem" in proc.stderr, proc.stderr


def test_model_name_of_another_preset_is_refused(tmp_path):
    """model.name only labels the model: model.name=olmoe ran tiny's sizes under olmoe's name; model=olmoe picks it."""
    proc = composer(["task=show", "model.name=olmoe"], tmp_path)
    assert proc.returncode == 2 and "model=olmoe chooses the olmoe preset" in proc.stderr, proc.stderr
    from composer import load_config
    from composer.errors import ConfigError

    with pytest.raises(ConfigError, match="model.name only labels the model"):
        load_config(None, ["model.name=olmoe"])
    assert load_config(None, ["model.name=my_label"]).model.name == "my_label"  # (a label of one's own)
    assert load_config(None, ["model=olmoe", "model.name=olmoe"]).model.num_experts == 64


def test_an_experiment_that_sweeps_needs_m(tmp_path):
    """Without -m Hydra ran one job and ignored the experiment's sweep silently, as a key=a,b override would."""
    proc = composer(["+experiment=cpu_smoke"], tmp_path)
    assert proc.returncode == 2 and "this experiment sweeps quant, model.top_k: add -m" in proc.stderr, proc.stderr


def test_an_override_hydra_cannot_parse_is_a_config_problem(tmp_path):
    """A malformed override exits 2 like every config problem (Hydra's own error exited 1), naming it."""
    proc = composer(["task=show", "model.top_k=[1,2"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "override = 'model.top_k=[1,2': no viable alternative at input '[1,2'" in proc.stderr, proc.stderr


def test_plus_on_a_key_or_group_the_config_has_says_what_to_write(tmp_path):
    """Hydra's "Could not append to config" / "Multiple values for quant" exited 1; it is a config problem (2)."""
    key = composer(["+seed=2", "task=show"], tmp_path)
    assert key.returncode == 2 and "seed is already in the config: '+' adds a key it lacks; set this one with seed=" \
        in key.stderr, key.stderr
    group = composer(["+quant=int8_w8a16", "task=show"], tmp_path)
    assert group.returncode == 2 and "the defaults already choose a quant: pick another with quant=int8_w8a16" \
        in group.stderr, group.stderr
    swept = composer(["-m", "+model.top_k=1,2", "task=show"], tmp_path)
    assert swept.returncode == 2 and "model.top_k is already in the config" in swept.stderr, swept.stderr
    assert composer(["++seed=2", "task=show"], tmp_path).returncode == 0  # (add or set: fine)


def test_m_may_follow_overrides(tmp_path):
    """argparse reads the overrides as one run of positionals: `a=1 -m b=2` failed with "unrecognized arguments"."""
    proc = composer(["task=show", "-m", "model.top_k=1,2", "hydra.sweep.dir=s"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["0", "1"]


def test_runs_started_together_keep_their_own_folders(tmp_path):
    """Hydra's outputs/<date>/<H-M-S>: a second run started in the same second replaced the first's results.json.
    The folder's time is to the microsecond now."""
    import re

    exe = shutil.which("composer", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "composer"]
    procs = [subprocess.Popen(cmd + ["task=show", f"seed={i}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    runs = sorted(tmp_path.glob("outputs/*/*/results.json"))
    assert len(runs) == 2, runs
    assert sorted(json.loads(r.read_text())["config"]["seed"] for r in runs) == [0, 1]
    assert all(re.fullmatch(r"\d\d-\d\d-\d\d-\d{6}", r.parent.name) for r in runs), runs


@pytest.mark.parametrize("args", [["+model.shared_expert_intermediate_size=32"], ["+plugins=[]"],
                                  ["~model.router", "+model.router.scoring=sigmoid"]])
def test_plus_that_hydra_accepts_still_runs(tmp_path, args):
    """Hydra sets a '+' key whose value is null, merges a dict or list into it, adds it after a parent's deletion."""
    proc = composer(["--cfg", "job", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-800:]


def test_a_prefix_of_multirun_may_follow_overrides(tmp_path):
    proc = composer(["task=show", "--multi", "model.top_k=1,2", "hydra.sweep.dir=s"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-800:]


def test_malformed_torchrun_variables_are_a_clear_error(tmp_path):
    """WORLD_SIZE=abc crashed inside the failing job's own error report (a traceback, exit 1)."""
    proc = composer(["task=show"], tmp_path, env_extra={"WORLD_SIZE": "abc"})
    assert proc.returncode == 2 and "WORLD_SIZE='abc' must be an integer" in proc.stderr, proc.stderr[-800:]
    assert "Traceback" not in proc.stderr


def test_a_sweep_with_no_values_is_refused(tmp_path):
    """Hydra launched 0 jobs and exited 0: a silent non-answer."""
    proc = composer(["-m", "model.top_k=range(1,1)"], tmp_path)
    assert proc.returncode == 2 and "model.top_k = 'range(1,1)': this sweep has no values" in proc.stderr, proc.stderr


def test_ctrl_c_is_recorded_as_interrupted(tmp_path):
    """Ctrl-C printed a 20-frame traceback and left no results.json: a report then called the run a crash."""
    import signal
    import time

    exe = shutil.which("composer", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "composer"]
    proc = subprocess.Popen(cmd + ["task=bench", "device=cpu", "kernel=torch", "task.tokens=[4096,4096,4096,4096]",
                                   "task.budget_s=30", "task.iters=1000", "hydra.run.dir=r"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # (a child inherits an ignored SIGINT, and Python then leaves it ignored: an earlier test
                            # in the same pytest process may have set that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "r" / ".hydra").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-1500:]
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["status"] == "interrupted" and doc["task"] == "bench"
    report = composer(["task=report", f"report.dir={tmp_path / 'r'}", "hydra.run.dir=rep"], tmp_path)
    assert "interrupted" in report.stdout + report.stderr, report.stdout[-1500:]


def test_a_group_typo_does_not_hide_the_command_lines_other_problems(tmp_path):
    """kernel=tritn was the only problem reported; the key typo and the bad value beside it came one run later."""
    proc = composer(["kernel=tritn", "model.top_kk=2", "seed=true", "quant=int4_w4a16", "quant.group_size=7"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "4 problems" in err and "kernel = 'tritn'" in err and "Did you mean 'top_k'?" in err
    assert "seed = True: must be int" in err and "quant.group_size = 7" in err
    assert "(checked with kernel=triton, the closest option)" in err
    proc = composer(["quant=int4_w4a17", "quant.group_size=7"], tmp_path)  # (a refused group's own keys: not judged)
    assert proc.returncode == 2 and "1 problem" in proc.stderr and "group_size" not in proc.stderr.split("Did you")[0]
    # the rest is checked with the closest option (qwen3's sizes take int4's group 128; tiny's, the default, would
    # not); a sweep already refused is not expanded again (it crashed)
    for args in (["model=qwen3_30b_a3bx", "quant=int4_w4a16"], ["kernel=tritn", "seed=interval(1,3)"],
                 ["-m", "kernel=tritn", "model.top_k=range(1,1)"], ["kernel=xyzzy", "seed=true"]):
        proc = composer(args, tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert ("2 problems" if any("tritn" in a for a in args) else "1 problem") in proc.stderr, (args, proc.stderr)


def test_a_mapping_for_a_list_key_is_a_config_problem(tmp_path):
    """custom_ops={a:1}: Hydra's 'Cannot merge DictConfig with ListConfig', exit 1."""
    proc = composer(["custom_ops={a:1}", "parallel=[1]", "task=show"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "custom_ops = '{'a': 1}': must be a list (custom_ops=[...]), got a mapping" in proc.stderr
    assert "parallel = '[1]': must be a mapping (parallel={...}), got a list" in proc.stderr
