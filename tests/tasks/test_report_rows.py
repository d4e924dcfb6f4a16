"""task=report on the row shapes the other benches write (expert / tensor parallel, the Transformers backend), on
non-finite errors, on a sweep over the x axis (task.tokens), and on an output folder it cannot write."""
from __future__ import annotations

import csv
import json

import pytest

from composer.errors import ConfigError
from composer.tasks.report import RunRecord, collect, normalize_rows, series_label

from .test_report import run_report, write_run

EP = {"ep_bench": [{"all2all": "naive", "tokens_per_rank": T, "ep_size": 2, "dispatch_ms": 1.0 * T,
                    "compute_ms": 2.0 * T, "combine_ms": 3.0 * T, "ep_total_ms": 6.0 * T, "single_rank_ms": 5.0 * T,
                    "rel_err_vs_single": 1e-3 * T, "ranks": [{"rank": 0}, {"rank": 1}]} for T in (4, 8)]}
TP = {"tp_bench": [{"tokens": T, "tp_size": 2, "compute_ms": 1.0 * T, "allreduce_ms": 0.5 * T, "total_ms": 1.5 * T,
                    "single_rank_ms": 2.0 * T, "rel_err_vs_single": 2e-3, "ranks": []} for T in (16, 1024)]}
HF = {"card": "cpu", "passed": True, "rows": [
    {"arch": "qwen3_moe", "implementation": impl, "T": T, "prefill_ms": 10.0 * T, "decode_ms": 1.0 * T,
     "rel_err_vs_eager": None if impl == "hf eager" else 3e-3, "tolerance": 1e-2, "ok": True}
    for impl in ("hf eager", "composer") for T in (1, 16)]}


def _rows(out) -> list[dict]:
    return list(csv.DictReader((out / "rows.csv").open()))


def test_distributed_and_transformers_bench_rows_give_times_and_errors(tmp_path):
    root = tmp_path / "s"
    write_run(root / "ep", ["parallel.ep_size=2"], EP)
    write_run(root / "tp", ["parallel.tp_size=2"], TP)
    write_run(root / "hf", ["layer=transformers_moe"], HF)
    m, _ = run_report([f"report.dir={root}", f"task.out={tmp_path / 'out'}"])
    assert "time_vs_tokens" not in m["plots_skipped"] and "error" not in m["plots_skipped"]
    rows = _rows(tmp_path / "out")
    by = {(r["run"], r["implementation"], r["mode"], r["tokens"]): r for r in rows}
    total = by[("ep", "ep_size=2 naive", "total", "8")]
    assert float(total["time_ms"]) == 48.0 and float(total["rel_err"]) == pytest.approx(8e-3)
    assert float(by[("ep", "ep_size=2 naive", "dispatch", "4")]["time_ms"]) == 4.0
    assert by[("ep", "ep_size=2 naive", "dispatch", "4")]["rel_err"] == ""  # the error goes with the total
    assert float(by[("ep", "single rank", "total", "8")]["time_ms"]) == 40.0
    assert float(by[("tp", "tp_size=2", "allreduce", "1024")]["time_ms"]) == 512.0
    assert float(by[("tp", "tp_size=2", "total", "16")]["rel_err"]) == pytest.approx(2e-3)
    prefill, decode = by[("hf", "composer", "prefill", "16")], by[("hf", "composer", "decode", "16")]
    assert (float(prefill["time_ms"]), float(decode["time_ms"])) == (160.0, 16.0)
    assert float(prefill["rel_err"]) == pytest.approx(3e-3) and decode["rel_err"] == ""
    assert len(rows) == 2 * 5 + 2 * 4 + 4 * 2  # ep: 4 phases + single rank; tp: 3 + single rank; hf: 2 modes


def test_rows_without_a_time_field_say_so(tmp_path):
    root = tmp_path / "s"
    write_run(root / "0", ["seed=0"], {"rows": [{"T": 4, "implementation": "x", "latency": 3.0}]})
    m, _ = run_report([f"report.dir={root}"])
    why = m["plots_skipped"]["time_vs_tokens"]
    assert why.startswith("the runs have per-token rows, but none with a time field this report reads (time_ms")
    assert "no run has per-token times" not in (root / "report" / "report.md").read_text()


def test_a_token_sweep_is_one_line_and_legends_sort_naturally(tmp_path, monkeypatch):
    """task.tokens is the x axis: in the label it made one unconnected point per run; labels sorted as text put
    top_k=16 before top_k=2."""
    import matplotlib.axes

    root = tmp_path / "s"
    for i, (k, T) in enumerate((k, T) for k in (16, 2) for T in (64, 4, 16)):
        write_run(root / str(i), [f"model.top_k={k}", f"task.tokens={T}"], {"tokens": T, "time_ms": 0.1 * T * k})
    plotted: list[tuple[str, list]] = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, *a, **k: plotted.append((k.get("label"), list(x))) or real(self, x, y, *a, **k))
    m, _ = run_report([f"report.dir={root}", "task.plots=true"])
    assert m["swept_keys"] == ["model.top_k", "task.tokens"]
    assert plotted == [("triton [model.top_k=2]", [4, 16, 64]), ("triton [model.top_k=16]", [4, 16, 64])]


def test_series_label_leaves_out_the_x_axis_key():
    r = RunRecord("0", "ok", overrides={"task.tokens": "16", "seed": "3"})
    assert series_label(r, {"implementation": "torch", "mode": "eager"}, ["task.tokens", "seed"], 1) == "torch [seed=3]"


def test_nan_and_inf_errors_are_read_back_and_shown(tmp_path, monkeypatch):
    """results.json spells NaN "nan": the report reads it as NaN (it read null as "not measured")."""
    from composer import results
    from composer.results import write_results

    monkeypatch.setattr(results, "git_revision", lambda: None)

    run = tmp_path / "s" / "0"
    run.mkdir(parents=True)
    write_results(run, status="ok", task="run", overrides=["model.dtype=float16"], config=None, config_hash=None,
                  metrics={"tokens": 16, "time_ms": 2.0, "output_rel_err": float("nan"),
                           "layers": {"l0": {"experts_rel_err": float("inf")}}})
    rec = collect(tmp_path / "s", show_progress=False)[0]
    assert rec.metrics["layers.l0.experts_rel_err"] == float("inf")
    assert len(rec.rows) == 1 and rec.rows[0]["rel_err"] != rec.rows[0]["rel_err"]  # NaN
    m, _ = run_report([f"report.dir={tmp_path / 's'}"])
    out = tmp_path / "s" / "report"
    assert _rows(out)[0]["rel_err"] == "nan"
    assert next(csv.DictReader((out / "report.csv").open()))["output_rel_err"] == "nan"
    assert m["plots_skipped"]["error"] == "every relative error is NaN or inf (the tables show them)"


def test_normalize_rows_keeps_a_nan_error_and_drops_a_nan_time():
    recs = normalize_rows({"rows": [{"T": 2, "implementation": "x", "time_ms": float("nan"),
                                     "rel_err": float("nan")}]}, {})
    assert recs[0]["time_ms"] is None and recs[0]["rel_err"] != recs[0]["rel_err"]


def test_an_output_folder_that_cannot_be_written_is_a_config_problem(tmp_path, monkeypatch):
    root = tmp_path / "s"
    write_run(root / "0", ["seed=0"], {"tokens": 4, "time_ms": 1.0})
    below_a_file = root / "0" / "results.json" / "rep"
    with pytest.raises(ConfigError, match=r"task.out = '.*results.json/rep': cannot create or write .*Not a "
                                          r"directory.*: give a writable folder"):
        run_report([f"report.dir={root}", f"task.out={below_a_file}"])
    import composer.tasks.report as report

    def full(path, *a, **k):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "write_csv", full)
    with pytest.raises(ConfigError, match=r"task.out = '.*/report': cannot create or write .*report.csv \(No space "
                                          r"left on device\)"):
        run_report([f"report.dir={root}"])
    assert json.loads((root / "0" / "results.json").read_text())["status"] == "ok"  # (nothing lost)
