"""task=report over a directory of real runs made here (a CPU sweep with failing jobs), and over hand-made
result files in the shapes the report must understand (bench rows, flat rows, missing and unreadable runs)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from composer import load_config
from composer.errors import ConfigError
from composer.tasks import TaskContext, TaskFailed
from composer.tasks.report import Report, collect, normalize_rows, swept_keys

from ._png import png_size

SWEPT = ["model.top_k", "task.tolerance"]


def composer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "COMPOSER_PROGRESS")}
    return subprocess.run([sys.executable, "-m", "composer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """4 real runs of the checked-in experiment (its quant sweep narrowed to none): top_k x tolerance.
    top_k=99 is refused by the config check (exit 2), tolerance=1e-30 fails the oracle check (exit 1)."""
    root = tmp_path_factory.mktemp("sweep")
    proc = composer("-m", "+experiment=cpu_smoke", "quant=none", "model.top_k=1,99", "task.tolerance=null,1e-30",
                    f"hydra.sweep.dir={root / 'multirun'}", cwd=root)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # the worst job's exit code
    assert "3 job(s) of the sweep failed" in proc.stderr
    assert len(list((root / "multirun").glob("*/results.json"))) == 4
    (root / "sweep.stdout").write_text(proc.stdout)
    return root


@pytest.fixture(scope="module")
def report(sweep):
    proc = composer("task=report", "report.dir=multirun", cwd=sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep / "multirun" / "report", proc


def test_report_writes_markdown_csv_and_plots(report):
    out, proc = report
    assert sorted(p.name for p in out.iterdir()) == ["error.png", "report.csv", "report.md", "rows.csv",
                                                      "time_vs_tokens.png"]
    for name in ("time_vs_tokens.png", "error.png"):
        assert png_size(out / name) == (800, 500)
    # the rich table and the failure summary are printed
    assert "composer report" in proc.stdout and "3 of 4 runs did not succeed" in proc.stdout


def test_markdown_columns_are_the_swept_keys(report):
    out, _ = report
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[0] == "run" and cols[1:3] == SWEPT and cols[3] == "status", cols
    # constant overrides (+experiment=cpu_smoke, quant=none) are not columns
    assert not {"+experiment", "experiment", "quant"} & set(cols)
    table = [line for line in lines[lines.index(header) + 2:] if line.startswith("|")][:4]
    assert len(table) == 4
    status = [row.strip("|").split("|")[3].strip() for row in table]
    assert status == ["ok", "failed", "failed", "failed"]
    assert "## Failed runs (3)" in md
    failed = md[md.index("## Failed runs"):]
    assert failed.count("model.top_k = 99: must be <= model.num_experts = 8") == 2  # every refused run, in full
    assert failed.count("check failed:") == 1
    assert "`pct_of_floor.png` not drawn: no run has a floor" in md


def test_csv_has_every_run_with_its_error(report):
    out, _ = report
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 4
    assert list(rows[0])[:4] == ["run", *SWEPT, "status"]
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(ok) == 1 and len(failed) == 3
    for r in ok:
        assert r["model.top_k"] == "1" and r["task.tolerance"] == "null" and r["error"] == ""
        assert 0 < float(r["output_rel_err"]) < 1e-2 and float(r["time_ms"]) > 0
        assert r["passed"] == "True" and len(r["config_hash"]) == 16
    refused = [r for r in failed if r["model.top_k"] == "99"]
    assert len(refused) == 2 and all("model.top_k = 99" in r["error"] for r in refused)
    checks = [r for r in failed if r["model.top_k"] == "1"]
    assert len(checks) == 1 and all(r["task.tolerance"] == "1e-30" and "check failed" in r["error"] for r in checks)
    # a failed check keeps its metrics: they are in the CSV
    assert all(float(r["output_rel_err"]) > 1e-30 for r in checks)
    per_token = list(csv.DictReader((out / "rows.csv").open()))
    assert len(per_token) == 2  # the runs that ran (1 ok + 1 failed check), one token count each
    assert {r["implementation"] for r in per_token} == {"torch"} and {r["tokens"] for r in per_token} == {"16"}


def test_report_run_records_itself_and_logs_through_hydra(report):
    _, proc = report
    sweep_dir = report[0].parent.parent
    runs = list((sweep_dir / "outputs").glob("*/*/results.json"))
    assert len(runs) == 1
    doc = json.loads(runs[0].read_text())
    assert doc["status"] == "ok" and doc["task"] == "report"
    m = doc["metrics"]
    assert (m["runs"], m["ok"], m["failed"], m["missing"]) == (4, 1, 3, 0)
    assert m["swept_keys"] == SWEPT
    log = next(runs[0].parent.glob("*.log")).read_text()
    assert "[composer.tasks.report][INFO] - report: 4 runs" in log
    assert "[composer.progress][INFO] - report: reading results" in log


def test_collect_reads_the_real_sweep(sweep):
    records = collect(sweep / "multirun")
    assert [r.path for r in records] == [str(i) for i in range(4)]
    assert swept_keys(records) == SWEPT


# ----------------------------------------------------------------------------------------------
# hand-made results: the shapes other tasks write


def write_run(d: Path, overrides: list[str], metrics: dict, status: str = "ok", error: str | None = None,
              config: dict | None = None) -> None:
    d.mkdir(parents=True)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "results.json").write_text(json.dumps({
        "schema": "composer.results/1", "status": status, "error": error, "task": "bench", "overrides": overrides,
        "metrics": metrics, "config": config or {"kernel": {"name": "triton"}}, "config_hash": "0" * 16,
        "versions": {}, "device_name": "NVIDIA H100", "git_revision": None, "finished_at": "2026-01-01T00:00:00+00:00"}))


def bench_metrics(scale: float) -> dict:
    rows = []
    for T in (1, 16, 128):
        rows.append({"T": T, "floor_ms": 0.01 * T, "bytes": 1, "flops": 1, "impls": {
            "composer triton": {"eager_ms": 0.04 * T * scale, "graph_ms": 0.02 * T * scale, "rel_err": 2e-3},
            "torch reference": {"eager_ms": 1.0 * T, "rel_err": 0.0},
            "transformers grouped_mm": {"error": "RuntimeError: needs sm90"},
        }})
    return {"meta": {"kernel": "triton"}, "rows": rows}


def run_report(cfg_overrides: list[str]):
    cfg = load_config(None, ["device=cpu", "task=report", *cfg_overrides])
    console = Console(record=True, width=200)
    return Report().run(cfg, TaskContext(run_dir=Path("."), console=console)), console.export_text()


def test_bench_rows_give_percent_of_floor_and_all_plots(tmp_path):
    root = tmp_path / "sweep"
    write_run(root / "0", ["task=bench", "model=qwen3_30b_a3b", "quant=none"], bench_metrics(1.0))
    write_run(root / "1", ["task=bench", "model=qwen3_30b_a3b", "quant=int8_w8a16"], bench_metrics(2.0))
    (root / "2" / ".hydra").mkdir(parents=True)  # a job that died before writing results.json
    (root / "2" / ".hydra" / "overrides.yaml").write_text("- task=bench\n- model=qwen3_30b_a3b\n- quant=int4_w4a16\n")
    (root / "2" / "cli.log").write_text("Killed\n")
    m, text = run_report([f"report.dir={root}", f"task.out={tmp_path / 'out'}"])
    out = tmp_path / "out"
    assert (m["runs"], m["ok"], m["missing"]) == (3, 2, 1) and m["swept_keys"] == ["quant"]
    for name in ("time_vs_tokens", "pct_of_floor", "error"):
        w, h = png_size(out / f"{name}.png")
        assert (w, h) == (800, 500)
    rows = list(csv.DictReader((out / "rows.csv").open()))
    # 2 runs x 3 T x (triton eager + graph, torch eager, transformers error) = 24
    assert len(rows) == 24
    r = next(r for r in rows if r["run"] == "1" and r["tokens"] == "16" and r["implementation"] == "composer triton"
             and r["mode"] == "graph")
    assert float(r["time_ms"]) == pytest.approx(0.02 * 16 * 2.0)
    assert float(r["pct_of_floor"]) == pytest.approx(100 * 0.16 / 0.64)
    assert float(r["rel_err"]) == pytest.approx(2e-3)
    errs = [r for r in rows if r["implementation"] == "transformers grouped_mm"]
    assert len(errs) == 6 and all(r["error"] == "RuntimeError: needs sm90" and r["time_ms"] == "" for r in errs)
    md = (out / "report.md").read_text()
    assert "### `2`: missing (quant=int4_w4a16)" in md and "no results.json" in md and "cli.log" in md
    assert "missing" in text and "1 of 3 runs did not succeed" in text


def test_flat_rows_in_microseconds_and_unreadable_results(tmp_path):
    root = tmp_path / "sweep"
    flat = {"rows": [{"tokens": 64, "implementation": "grouped_mm", "time_us": 250.0, "floor_us": 50.0, "rel_err": 1e-3},
                     {"tokens": 64, "implementation": "triton", "time_us": 100.0, "floor_us": 50.0}]}
    write_run(root / "a", ["kernel=triton"], flat)
    (root / "b").mkdir()
    (root / "b" / "results.json").write_text("{ truncated")
    (root / "c").mkdir()
    (root / "c" / "results.json").write_text(json.dumps({"schema": "something.else/3"}))
    (root / "d").mkdir()  # (nested deeper than Python recurses: a RecursionError, not a ValueError)
    (root / "d" / "results.json").write_text("[" * 100000 + "]" * 100000)
    m, _ = run_report([f"task.dir={root}", "task.plots=false"])
    assert (m["runs"], m["ok"], m["unreadable"]) == (4, 1, 3)
    out = root / "report"
    assert not list(out.glob("*.png"))
    rows = {r["implementation"]: r for r in csv.DictReader((out / "rows.csv").open())}
    assert float(rows["grouped_mm"]["time_ms"]) == pytest.approx(0.25)
    assert float(rows["grouped_mm"]["pct_of_floor"]) == pytest.approx(20.0)
    assert float(rows["triton"]["pct_of_floor"]) == pytest.approx(50.0)
    md = (out / "report.md").read_text()
    assert "not valid JSON" in md and "not a composer results file" in md


def test_normalize_rows_of_a_run_without_rows_uses_the_resolved_kernel():
    recs = normalize_rows({"tokens": 16, "time_ms": 2.0, "output_rel_err": 3e-3}, {"kernel": {"name": "auto"}},
                          {"kernel": "torch"})
    assert recs == [{"tokens": 16, "implementation": "torch", "mode": "eager", "time_ms": 2.0, "floor_ms": None,
                     "pct_of_floor": None, "rel_err": 3e-3, "error": None}]


def test_swept_keys_fall_back_to_config_differences(tmp_path):
    root = tmp_path / "s"
    write_run(root / "0", [], {}, config={"kernel": {"name": "triton"}, "model": {"top_k": 2}})
    write_run(root / "1", [], {}, config={"kernel": {"name": "triton"}, "model": {"top_k": 4}})
    assert swept_keys(collect(root)) == ["model.top_k"]
    m, _ = run_report([f"report.dir={root}", "task.plots=false", "task.columns=[kernel.name,model.top_k]"])
    assert m["swept_keys"] == ["kernel.name", "model.top_k"]
    header = next(line for line in (root / "report" / "report.md").read_text().splitlines() if line.startswith("| run"))
    assert header.startswith("| run | kernel.name | model.top_k | status |")


def test_bad_report_inputs_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"report.dir = None: set the directory to aggregate"):
        run_report([])
    with pytest.raises(ConfigError, match=r"report.dir = 'nowhere': no such directory"):
        run_report(["report.dir=nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"report.dir = 'empty': no results.json below empty: give the directory"):
        run_report(["report.dir=empty"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"report.dir = 'a_file': a file, not a directory"):
        run_report(["report.dir=a_file"])
    root = tmp_path / "sweep"
    write_run(root / "0", ["model.top_k=1"], {"time_ms": 1.0})
    with pytest.raises(ConfigError, match=r"task.out = 'a_file': is a file"):
        run_report([f"report.dir={root}", "task.out=a_file"])
    with pytest.raises(ConfigError, match=r"task.columns = 'model.top_kk': no run has this key .* Did you mean "
                                          r"'model.top_k'\?"):
        run_report([f"report.dir={root}", "task.columns=[model.top_kk]"])
    with pytest.raises(ConfigError, match=r"report.dirr = 'x': unknown key; allowed: dir. Did you mean 'dir'\?"):
        load_config(None, ["task=report", "++report.dirr=x"])
    with pytest.raises(ConfigError, match=r"only task=report reads report\.\*"):
        load_config(None, ["task=run", "++report.dir=x"])


def test_series_labels_keep_peers_of_different_runs_apart():
    from composer.tasks.report import RunRecord, series_label

    r = RunRecord("0", "ok", overrides={"kernel": "triton", "quant": "none"})
    assert series_label(r, {"implementation": "composer triton", "mode": "eager"}, ["kernel", "quant"], 1) == \
        "composer triton [quant=none]"
    assert series_label(r, {"implementation": "torch reference", "mode": "graph"}, ["kernel", "quant"], 2) == \
        "torch reference (graph) [kernel=triton, quant=none]"
    assert series_label(r, {"implementation": "triton", "mode": "eager"}, ["kernel"], 1) == "triton"


def test_sweep_logs_each_job_and_ends_with_a_table(sweep):
    out = " ".join((sweep / "sweep.stdout").read_text().split())
    assert f"sweep {sweep / 'multirun'}: 4 jobs in" in out
    assert f"1 ok, 3 not ok; aggregate with: composer task=report report.dir={sweep / 'multirun'}" in out
    assert "sweep: 4 jobs ->" in out
    logs = {d.name: next(d.glob("*.log")).read_text() for d in (sweep / "multirun").iterdir() if d.name.isdigit()}
    assert "[composer.sweep][INFO] - sweep: job 1/4 ok in" in logs["0"]
    assert "[composer.sweep][WARNING] - sweep: job 4/4 failed in" in logs["3"]
    assert "model.top_k = 99: must be <= model.num_experts = 8" in logs["3"]


def test_sweep_size_counts_command_line_and_sweeper_params():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from composer.api import CONF_DIR
    from composer.sweep import sweep_size

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=cpu_smoke"], return_hydra_config=True)
    cfg.hydra.overrides.task = ["+experiment=cpu_smoke", "model.top_k=1,2,4", "seed=range(0,5)"]
    assert sweep_size(cfg) == 3 * 5 * 2  # top_k from the command line beats the experiment's; quant: 2 values
    cfg.hydra.overrides.task = ["model.top_k=1"]
    assert sweep_size(cfg) == 2  # quant: none,int8_w8a16; top_k fixed by the command line


def test_newest_sweep_is_the_one_whose_jobs_ran_last(tmp_path):
    """A report written into an older sweep touched that directory; the hint named it as the newest."""
    import os

    from composer.tasks.report import _newest_sweep

    old, new = tmp_path / "multirun/d/old", tmp_path / "multirun/d/new"
    for i, sweep in enumerate((old, new)):
        (sweep / "0").mkdir(parents=True)
        (sweep / "0/results.json").write_text("{}")
        os.utime(sweep / "0/results.json", (1000 + i, 1000 + i))
    (old / "report").mkdir()  # (the directory's own time is now the latest)
    assert _newest_sweep(tmp_path) == new


def test_a_swept_task_and_an_odd_error_field(tmp_path):
    """A sweep over task= put two `task` columns in report.csv (a CSV reader kept one); a results.json whose error
    is a mapping (hand-edited, or another tool's) crashed the report."""
    import csv

    root = tmp_path / "sweep"
    write_run(root / "0", ["task=run", "model.top_k=1"], {"output_rel_err": 1e-3})
    write_run(root / "1", ["task=check", "model.top_k=1"], {"output_rel_err": 2e-3, "passed": True})
    write_run(root / "2", ["task=check", "model.top_k=2"], {}, status="failed")
    doc = json.loads((root / "2" / "results.json").read_text())
    doc["error"] = {"type": "X", "msg": "boom"}
    (root / "2" / "results.json").write_text(json.dumps(doc))
    m, text = run_report([f"report.dir={root}"])
    assert '{"type": "X", "msg": "boom"}' in text
    with open(root / "report" / "report.csv") as f:
        header = next(csv.reader(f))
    assert header.count("task") == 1 and header.count("output_rel_err") == 1 and len(header) == len(set(header))
    with open(root / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["run", "check", "check"]


def test_a_plot_of_many_series_says_so_instead_of_a_legend(tmp_path, monkeypatch):
    """3000 runs drew a 3000-entry legend over the axes (about 20 visible)."""
    import matplotlib.axes

    root = tmp_path / "sweep"
    flat = {"rows": [{"tokens": 64, "implementation": "triton", "time_us": 100.0}]}
    for i in range(25):
        write_run(root / str(i), [f"seed={i}"], flat)
    titles, legends = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda self, *a, **k: legends.append(1))
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: titles.append(t) or real(self, t))
    m, _ = run_report([f"task.dir={root}"])
    assert m["ok"] == 25 and not legends and "time vs tokens: 25 series, too many to label" in titles[0], titles
