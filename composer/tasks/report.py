"""task=report: aggregate every ``results.json`` below a directory (a sweep) into a report.

    composer -m task=run model.top_k=1,2 kernel=torch          # a sweep: multirun/<date>/<time>/<job>/
    composer task=report report.dir=multirun/<date>/<time>     # -> multirun/<date>/<time>/report/

Writes into ``task.out`` (default ``<dir>/report``):

- ``report.md``: one table row per run, the swept keys as the key columns (the ``key=value`` overrides whose
  values differ between runs; with one run, all its overrides; with no differing overrides, the config keys
  that differ), then the status and the run's scalar metrics; a per-token table when runs have rows (bench);
  a section listing every failed or unfinished run with its error. Nothing is dropped.
- ``report.csv`` (one line per run, every scalar metric flattened with dotted keys) and ``rows.csv`` (one
  line per run x tokens x implementation x mode, when the runs have per-token data).
- PNG plots: ``time_vs_tokens.png`` (one line per implementation and swept value), ``pct_of_floor.png``,
  ``error.png``; a plot with no data is not drawn and the markdown says why.

Per-token data is read from ``metrics["rows"]`` (a list of dicts). Two shapes are understood: flat rows
(``tokens``/``T``, ``implementation``, ``time_ms``/``time_us``, ``mode``, ``floor_ms``/``floor_us``,
``pct_of_floor``, ``rel_err``, ``error``; the Transformers-backend bench's ``prefill_ms``/``decode_ms`` give a
prefill and a decode record, with ``rel_err_vs_eager`` on the prefill) and task=bench's rows (``T``, ``floor_ms``,
``impls: {name: {eager_ms, graph_ms, rel_err, graph_rel_err, error}}``). The expert- and tensor-parallel benches'
``metrics["ep_bench"]`` / ``metrics["tp_bench"]`` give one record per phase (dispatch, compute, combine or
allreduce, total: ``rel_err_vs_single`` on the total) and a ``single rank`` one. A run without rows but with
scalar ``tokens`` and ``time_ms`` (task=run, task=check) gives one point, its implementation being the resolved
kernel. Errors read back as written, NaN and inf included (results.json spells them "nan", "inf").
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from ..errors import ConfigError, Problem, did_you_mean
from ..progress import track
from ..results import RESULTS_SCHEMA, revive
from . import Task, TaskContext, TaskFailed, TaskParams, register_task

log = logging.getLogger(__name__)

PLOTS = ("time_vs_tokens", "pct_of_floor", "error")


class ReportParams(TaskParams):
    dir: str | None = Field(None, description="directory to scan for results.json (report.dir is its alias)")
    out: str | None = Field(None, description="where to write; None = <dir>/report")
    plots: bool = True
    columns: list[str] | None = Field(None, description="key columns; None = the swept keys")
    title: str | None = None


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class RunRecord:
    path: str                       # the run directory, relative to the scanned directory
    status: str                     # ok | failed | interrupted | missing (no results.json) | unreadable
    task: str | None = None
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)   # flattened scalars
    config: dict[str, Any] = field(default_factory=dict)    # flattened
    rows: list[dict[str, Any]] = field(default_factory=list)  # normalized per-token records
    doc: dict[str, Any] = field(default_factory=dict)


def _natural(path: Path | str) -> list[Any]:
    """multirun/.../2 before .../10 (and a legend's T=4 before T=16)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", str(path)))]


def parse_override(o: str) -> tuple[str, str]:
    key, _, value = o.partition("=")
    return key.lstrip("+~"), value


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; scalars only (lists and None-free containers are left out)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            elif isinstance(v, (str, int, float, bool)) or v is None:
                out[key] = v
    return out


def _num(v: Any) -> float | None:
    """A finite number, else None: what a time, a floor or a token count must be to be plotted."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def _err(v: Any) -> float | None:
    """An error as measured, NaN and inf included (a NaN output is a result to show, not a missing one)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


TOKEN_KEYS = ("tokens", "T", "num_tokens", "tokens_per_rank")
# flat rows: one time, in ms or µs; failing that, a time per mode (the Transformers-backend bench: prefill, decode)
TIME_MS_KEYS, TIME_US_KEYS = ("time_ms", "eager_ms", "median_ms"), ("time_us", "median_us")
MODE_TIMES = ("prefill", "decode")
ERR_KEYS = ("rel_err", "error_rel", "rel_err_vs_eager", "rel_err_vs_single")
# the distributed benches: metrics key -> (implementation label, its phases as (mode, time key), the key of the
# phase that carries the error vs the single-rank run); each row also gives a "single rank" point
PHASED = {
    "ep_bench": (lambda r: f"ep_size={r.get('ep_size')} {r.get('all2all')}",
                 (("dispatch", "dispatch_ms"), ("compute", "compute_ms"), ("combine", "combine_ms"),
                  ("total", "ep_total_ms")), "total"),
    "tp_bench": (lambda r: f"tp_size={r.get('tp_size')}",
                 (("compute", "compute_ms"), ("allreduce", "allreduce_ms"), ("total", "total_ms")), "total"),
}
TIME_FIELDS = (*TIME_MS_KEYS, *TIME_US_KEYS, "eager_ms / graph_ms", *(f"{m}_ms" for m in MODE_TIMES),
               "ep_total_ms", "total_ms", "single_rank_ms")  # (named when rows have none of them)


def _dict_rows(v: Any) -> list[dict[str, Any]] | None:
    return v if isinstance(v, list) and v and all(isinstance(r, dict) for r in v) else None


def normalize_rows(metrics: dict[str, Any], config: dict[str, Any], resolved: dict[str, Any] | None = None
                   ) -> list[dict[str, Any]]:
    """Per-token records ``{tokens, implementation, mode, time_ms, floor_ms, pct_of_floor, rel_err, error}``;
    ``resolved`` is results.json's record of what 'auto' became (``{"kernel": "torch", ...}``)."""
    kernel = config.get("kernel", {}) if isinstance(config.get("kernel"), dict) else {}
    default_impl = (resolved or {}).get("kernel") or kernel.get("resolved") or kernel.get("name") or "composer"
    rows = _dict_rows(metrics.get("rows"))
    if rows:
        return [rec for r in rows for rec in (_bench_row(r) if isinstance(r.get("impls"), dict)
                                              else _flat_row(r, str(default_impl)))]
    for key, spec in PHASED.items():
        if _dict_rows(metrics.get(key)):
            return [rec for r in metrics[key] for rec in _phased_row(r, *spec)]
    tokens, t = _num(metrics.get("tokens")), _num(metrics.get("time_ms"))
    if tokens is not None and t is not None:
        return [_record(tokens, str(default_impl), "eager", t, _num(metrics.get("floor_ms")),
                        _err(_first(metrics, "output_rel_err", "rel_err")), None)]
    return []


def _floor(r: dict[str, Any]) -> float | None:
    floor = _num(r.get("floor_ms"))
    return floor if floor is not None or _num(r.get("floor_us")) is None else _num(r["floor_us"]) / 1e3


def _bench_row(r: dict[str, Any]) -> list[dict[str, Any]]:
    """task=bench: ``{T, floor_ms, impls: {name: {eager_ms, graph_ms, rel_err, graph_rel_err, error}}}``."""
    tokens, floor, out = _num(_first(r, *TOKEN_KEYS)), _floor(r), []
    for name, m in r["impls"].items():
        if not isinstance(m, dict):
            continue
        timed = [(mode, t) for mode in ("eager", "graph") if (t := _num(m.get(f"{mode}_ms"))) is not None]
        if not timed:
            out.append(_record(tokens, name, "eager", None, floor, None, m.get("error") or "not timed"))
        for mode, t in timed:
            err = _err(m.get("graph_rel_err" if mode == "graph" else "rel_err"))
            if mode == "graph" and err is None:
                err = _err(m.get("rel_err"))
            out.append(_record(tokens, name, mode, t, floor, err, m.get("error")))
        if "graph_error" in m and not any(mode == "graph" for mode, _ in timed):
            out.append(_record(tokens, name, "graph", None, floor, None, m["graph_error"]))
    return out


def _flat_row(r: dict[str, Any], default_impl: str) -> list[dict[str, Any]]:
    """A flat row: one time (``time_ms``, ``time_us``, ...) or one per mode (``prefill_ms``, ``decode_ms``: the
    Transformers-backend bench, whose error of the prefill logits goes with the prefill); no time: one untimed
    record."""
    tokens, floor = _num(_first(r, *TOKEN_KEYS)), _floor(r)
    impl = str(_first(r, "implementation", "impl", "name") or default_impl)
    err, error = _err(_first(r, *ERR_KEYS)), r.get("error") if isinstance(r.get("error"), str) else None
    t = _num(_first(r, *TIME_MS_KEYS))
    if t is None and _num(_first(r, *TIME_US_KEYS)) is not None:
        t = _num(_first(r, *TIME_US_KEYS)) / 1e3
    per_mode = [(m, _num(r.get(f"{m}_ms"))) for m in MODE_TIMES if _num(r.get(f"{m}_ms")) is not None]
    if t is not None or not per_mode:
        rec = _record(tokens, impl, str(r.get("mode") or "eager"), t, floor, err, error)
        if _num(r.get("pct_of_floor")) is not None:
            rec["pct_of_floor"] = _num(r["pct_of_floor"])
        return [rec]
    return [_record(tokens, impl, m, tm, floor, err if m == "prefill" else None, error) for m, tm in per_mode]


def _phased_row(r: dict[str, Any], label: Any, phases: tuple[tuple[str, str], ...], err_phase: str
                ) -> list[dict[str, Any]]:
    """A distributed bench row: each phase's time, the error vs the single-rank run on the total, and the
    single-rank time beside it (the speed-up's baseline)."""
    tokens, impl = _num(_first(r, *TOKEN_KEYS)), label(r)
    err = _err(r.get("rel_err_vs_single"))
    out = [_record(tokens, impl, mode, _num(r.get(key)), None, err if mode == err_phase else None, None)
           for mode, key in phases if key in r]
    if "single_rank_ms" in r:
        out.append(_record(tokens, "single rank", err_phase, _num(r["single_rank_ms"]), None, None, None))
    return out


def _record(tokens: float | None, impl: str, mode: str, time_ms: float | None, floor_ms: float | None,
            rel_err: float | None, error: str | None) -> dict[str, Any]:
    pct = 100.0 * floor_ms / time_ms if floor_ms and time_ms else None
    return {"tokens": int(tokens) if tokens is not None and float(tokens).is_integer() else tokens,
            "implementation": impl, "mode": mode, "time_ms": time_ms, "floor_ms": floor_ms, "pct_of_floor": pct,
            "rel_err": rel_err, "error": error}


def _read_overrides(job_dir: Path) -> list[str]:
    f = job_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(f.read_text())
    except yaml.YAMLError:
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def collect(root: Path, show_progress: bool = True) -> list[RunRecord]:
    """Every run below ``root``: each results.json, and each Hydra job directory (``.hydra/``) that has none."""
    records: list[RunRecord] = []
    seen: set[Path] = set()
    files = sorted(root.rglob("results.json"), key=_natural)
    for f in track(files, "report: reading results") if show_progress else files:
        run_dir = f.parent
        seen.add(run_dir.resolve())
        rel = str(run_dir.relative_to(root)) if run_dir != root else "."
        try:
            doc = json.loads(f.read_text())
            if isinstance(doc, dict) and isinstance(doc.get("metrics"), dict):
                doc["metrics"] = revive(doc["metrics"])  # ("nan", "inf": results.json's spelling of those floats)
        except (OSError, ValueError, RecursionError) as exc:  # (RecursionError: nested deeper than Python recurses)
            records.append(RunRecord(rel, "unreadable", error=f"{f}: not valid JSON ({exc})",
                                     overrides=dict(map(parse_override, _read_overrides(run_dir)))))
            continue
        if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("composer.results/"):
            records.append(RunRecord(rel, "unreadable", error=f"{f}: not a composer results file (schema "
                                     f"{doc.get('schema') if isinstance(doc, dict) else None!r}, expected {RESULTS_SCHEMA!r})"))
            continue
        if doc.get("task") == "report":  # a report's own run
            continue
        if doc.get("schema") != RESULTS_SCHEMA:
            log.warning("%s: schema %s, this composer writes %s; reading what it can", f, doc.get("schema"), RESULTS_SCHEMA)
        metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
        config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
        overrides = doc.get("overrides") if isinstance(doc.get("overrides"), list) else _read_overrides(run_dir)
        records.append(RunRecord(
            rel, str(doc.get("status") or "unknown"), task=_text(doc.get("task")), error=_text(doc.get("error")),
            overrides=dict(parse_override(str(o)) for o in overrides), metrics=flatten(metrics),
            config=flatten(config), doc=doc,
            rows=normalize_rows(metrics, config, doc.get("resolved") if isinstance(doc.get("resolved"), dict) else None)))
    for hydra_dir in sorted(root.rglob(".hydra"), key=_natural):
        job = hydra_dir.parent
        if job.resolve() in seen or not (hydra_dir / "overrides.yaml").is_file():
            continue
        ov = _read_overrides(job)
        if any(parse_override(o) == ("task", "report") for o in ov):
            continue
        logs = sorted(p.name for p in job.glob("*.log"))
        records.append(RunRecord(str(job.relative_to(root)) if job != root else ".", "missing",
                                 error="no results.json: the job crashed before composer could write it, or is still "
                                 f"running; see {', '.join(logs) if logs else 'its log'} in that directory",
                                 overrides=dict(map(parse_override, ov))))
    records.sort(key=lambda r: _natural(Path(r.path)))
    return records


def swept_keys(records: list[RunRecord]) -> list[str]:
    """Override keys whose values differ between runs (all overrides when there is one run); failing that,
    the config keys that differ."""
    keys: list[str] = []
    for r in records:
        for k in r.overrides:
            if k not in keys:
                keys.append(k)
    if len(records) <= 1:
        return keys
    swept = [k for k in keys if len({r.overrides.get(k) for r in records}) > 1]
    if swept:
        return swept
    ckeys: list[str] = []
    for r in records:
        for k in r.config:
            if k not in ckeys and k != "task.dir":
                ckeys.append(k)
    with_config = [r for r in records if r.config]
    return [k for k in ckeys if len({repr(r.config.get(k)) for r in with_config}) > 1]


def key_value(r: RunRecord, key: str) -> Any:
    if key in r.overrides:
        return r.overrides[key]
    if key in r.config:
        return r.config[key]
    if key in r.metrics:
        return r.metrics[key]
    return None


# ----------------------------------------------------------------------------------------------
# writing


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e6 else f"{v:.4g}"
    return str(v)


def _md_cell(v: Any) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def _text(v: Any) -> str | None:
    """A results.json field shown as text (a hand-edited or foreign file may hold a number or a mapping there)."""
    return v if v is None or isinstance(v, str) else json.dumps(v, default=str)


def _first_line(s: str | None, n: int = 120) -> str:
    """An error in one line: its lines joined, whitespace collapsed, cut at ``n`` characters."""
    if not s:
        return ""
    text = " ".join(line.strip().lstrip("- ").strip() for line in s.strip().splitlines() if line.strip())
    return text if len(text) <= n else text[: n - 2].rstrip() + " …"


def metric_columns(records: list[RunRecord]) -> list[str]:
    """Top-level scalar metrics (no dots), in first-seen order."""
    cols: list[str] = []
    for r in records:
        for k in r.metrics:
            if "." not in k and k not in cols:
                cols.append(k)
    return cols


def run_table(records: list[RunRecord], keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    mcols = metric_columns(records)
    header = ["run", *keys, "status", *mcols, "error"]
    body = [[r.path, *(key_value(r, k) for k in keys), r.status, *(r.metrics.get(c) for c in mcols),
             _first_line(r.error)] for r in records]
    return header, body


ROW_FIELDS = ("tokens", "implementation", "mode", "time_ms", "floor_ms", "pct_of_floor", "rel_err", "error")


def write_csv(path: Path, header: list[str], body: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for line in body:
            w.writerow(["" if v is None else v for v in line])


X_KEYS = ("task.tokens",)  # the plots' x axis: a sweep over it is one line per series, not one point per value


def series_label(r: RunRecord, row: dict[str, Any], keys: list[str], modes: int) -> str:
    label = row["implementation"] + (f" ({row['mode']})" if modes > 1 else "")
    # a swept kernel is left out of the label when the implementation's name already says it
    rest = [f"{k}={key_value(r, k)}" for k in keys if k not in X_KEYS
            and not (k.split(".")[0] == "kernel" and str(key_value(r, k)) in row["implementation"].split())]
    return label + (f" [{', '.join(rest)}]" if rest else "")


LEGEND_MAX = 20  # series a plot labels; past that the plot says how many and rows.csv names them


def _no_times_why(records: list[RunRecord]) -> str:
    """Why time_vs_tokens has nothing to draw: no rows at all, or rows in a shape this report does not read."""
    rows = [row for r in records if r.status == "ok" for row in r.rows]
    if not rows:
        return "no run has per-token times (metrics rows, or tokens + time_ms)"
    if all(row["tokens"] is None for row in rows):
        return f"the runs have per-token rows, but none with a token count ({', '.join(TOKEN_KEYS)})"
    return (f"the runs have per-token rows, but none with a time field this report reads ({', '.join(TIME_FIELDS)}); "
            "the per-token table lists them")


def draw_plots(out: Path, records: list[RunRecord], keys: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """The PNG plots; returns (written, not drawn -> why)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TaskFailed(f"the report's plots need matplotlib ({exc}); install it with "
                         "pip install matplotlib (composer's 'plots' extra), or run with task.plots=false") from None

    modes = len({row["mode"] for r in records for row in r.rows})
    series: dict[str, list[tuple[RunRecord, dict[str, Any]]]] = {}
    for r in records:
        if r.status != "ok":
            continue
        for row in r.rows:
            if row["tokens"] is not None:
                series.setdefault(series_label(r, row, keys, modes), []).append((r, row))
    specs = {
        "time_vs_tokens": ("time_ms", "time (ms)", "time vs tokens", True, _no_times_why(records)),
        "pct_of_floor": ("pct_of_floor", "% of floor (floor / time)", "percent of the floor", False,
                         "no run has a floor (task=bench measures one on CUDA)"),
        "error": ("rel_err", "relative error", "relative Frobenius error vs reference", True,
                  "every relative error is NaN or inf (the tables show them)"
                  if any(row["rel_err"] is not None for pts in series.values() for _, row in pts)
                  else "no run reports a relative error"),
    }
    written: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name, (field_, ylabel, title, logy, why) in specs.items():
        # (a NaN or inf error has no place on a log axis: the tables show it)
        lines = {label: sorted((row["tokens"], row[field_]) for _, row in pts
                               if row[field_] is not None and math.isfinite(row[field_]))
                 for label, pts in series.items()}
        lines = {k: v for k, v in lines.items() if v}
        if not lines:
            skipped[name] = why
            continue
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for label, pts in sorted(lines.items(), key=lambda item: _natural(item[0])):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        xs = sorted({p[0] for pts in lines.values() for p in pts})
        if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 10:
            ax.set_xscale("log", base=2)
        ys = [p[1] for pts in lines.values() for p in pts]
        if logy and min(ys) > 0 and max(ys) / min(ys) >= 10:
            ax.set_yscale("log")
        if name == "pct_of_floor":
            ax.axhline(100, color="grey", linestyle="--", linewidth=1)
        if name == "error":
            tols = {r.metrics["tolerance"] for r in records
                    if r.status == "ok" and r.rows and _num(r.metrics.get("tolerance")) is not None}
            for tol in tols:
                ax.axhline(tol, color="red", linestyle=":", linewidth=1, label=f"tolerance {fmt(tol)}")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if len(lines) <= LEGEND_MAX:
            ax.set_title(title)
            ax.legend(fontsize="small", loc="best")
        else:  # (a legend of thousands covered the axes and showed about 20 of them)
            ax.set_title(f"{title}: {len(lines)} series, too many to label (rows.csv names them)")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written[name] = path
    return written, skipped


def markdown(title: str, root: Path, records: list[RunRecord], keys: list[str], plots: dict[str, Path],
             skipped: dict[str, str], files: list[str]) -> str:
    counts = {s: sum(r.status == s for r in records) for s in dict.fromkeys(r.status for r in records)}
    lines = [f"# {title}", "",
             f"{len(records)} runs below `{root}`: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
             f"Key columns (swept): {', '.join(f'`{k}`' for k in keys) if keys else '(none: the runs do not differ)'}.",
             ""]
    header, body = run_table(records, keys)
    lines += _md_table(header, body)
    with_rows = [r for r in records if r.rows]
    if with_rows:
        lines += ["", "## Per-token rows", ""]
        lines += _md_table(["run", *keys, "status", *ROW_FIELDS],
                           [[r.path, *(key_value(r, k) for k in keys), r.status, *(row[f] for f in ROW_FIELDS)]
                            for r in with_rows for row in r.rows])
    bad = [r for r in records if r.status != "ok"]
    if bad:
        lines += ["", f"## Failed runs ({len(bad)})", ""]
        for r in bad:
            swept = ", ".join(f"{k}={key_value(r, k)}" for k in keys)
            lines += [f"### `{r.path}`: {r.status}" + (f" ({swept})" if swept else ""), "",
                      "overrides: `" + " ".join(f"{k}={v}" for k, v in r.overrides.items()) + "`", "",
                      "```", (r.error or "(no error recorded)").rstrip(), "```", ""]
    if plots or skipped:
        lines += ["", "## Plots", ""]
        for name, path in plots.items():
            lines += [f"![{name}]({path.name})", ""]
        for name, why in skipped.items():
            lines += [f"- `{name}.png` not drawn: {why}."]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    return "\n".join(lines)


def _md_table(header: list[str], body: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(v) for v in line) + " |" for line in body]
    return out


def user_path(s: str) -> Path:
    """A path as the user meant it: relative to where composer was started, also when Hydra changed the
    working directory (hydra.job.chdir=true); kept relative otherwise so the report shows what was typed."""
    import os

    path = Path(s).expanduser()
    if path.is_absolute():
        return path
    try:
        from hydra.core.hydra_config import HydraConfig

        start = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else None
    except Exception:  # Hydra not configured: a plain Python call
        start = None
    return Path(start) / path if start and Path(start).resolve() != Path(os.getcwd()).resolve() else path


def _newest_sweep(cwd: Path) -> Path | None:
    """The sweep whose jobs ran last (by its results.json files: writing a report into a sweep changes the
    directory's own time, not theirs)."""
    def ran(p: Path) -> float:
        times = [f.stat().st_mtime for f in p.glob("*/results.json")]
        return max(times) if times else p.stat().st_mtime

    sweeps = [p for p in cwd.glob("multirun/*/*") if p.is_dir()]
    return max(sweeps, key=ran) if sweeps else None


def write_report(out: Path, root: Path, records: list[RunRecord], keys: list[str], title: str, plots_on: bool
                 ) -> tuple[list[str], dict[str, str]]:
    """report.csv, rows.csv, the plots and report.md into ``out`` (made if missing); returns (the files written,
    the plots not drawn -> why). Raises OSError where ``out`` cannot be made or written."""
    out.mkdir(parents=True, exist_ok=True)
    # the CSV carries every flattened scalar metric, not only the top-level ones
    all_metrics: list[str] = []
    for r in records:
        all_metrics += [k for k in r.metrics if k not in all_metrics]
    # (a chosen column already in the table, such as a swept `task` or a metric, is not written twice: a CSV
    # reader keeps one of two equal names)
    extra = [("status", lambda r: r.status), ("task", lambda r: r.task),
             *((m, lambda r, m=m: r.metrics.get(m)) for m in all_metrics),
             ("error", lambda r: r.error), ("config_hash", lambda r: r.doc.get("config_hash")),
             ("device_name", lambda r: r.doc.get("device_name")), ("finished_at", lambda r: r.doc.get("finished_at"))]
    extra = [(c, get) for c, get in extra if c not in keys and c != "run"]
    csv_header = ["run", *keys, *(c for c, _ in extra)]
    csv_body = [[r.path, *(key_value(r, k) for k in keys), *(get(r) for _, get in extra)] for r in records]
    write_csv(out / "report.csv", csv_header, csv_body)
    files = ["report.md", "report.csv"]
    if any(r.rows for r in records):
        write_csv(out / "rows.csv", ["run", *keys, "status", *ROW_FIELDS],
                  [[r.path, *(key_value(r, k) for k in keys), r.status, *(row[f] for f in ROW_FIELDS)]
                   for r in records for row in r.rows])
        files.append("rows.csv")
    plots: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    if plots_on:
        plots, skipped = draw_plots(out, records, keys)
        files += [f.name for f in plots.values()]
    (out / "report.md").write_text(markdown(title, root, records, keys, plots, skipped, files))
    return files, skipped


@register_task("report")
class Report(Task):
    Params = ReportParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        p: ReportParams = cfg.task.params
        if not p.dir:
            newest = _newest_sweep(Path.cwd())
            hint = f" (the newest sweep here is {newest})" if newest else ""
            raise ConfigError([Problem("report.dir", None, "set the directory to aggregate, e.g. composer task=report "
                                       f"report.dir=multirun/<date>/<time>{hint}")])
        root = user_path(p.dir)
        if not root.is_dir():
            what = "a file, not a directory" if root.exists() else f"no such directory (looked in {Path.cwd()})"
            raise ConfigError([Problem("report.dir", p.dir, f"{what}; give a sweep directory such as "
                                       "multirun/<date>/<time>")])
        out = user_path(p.out) if p.out else root / "report"
        if out.exists() and not out.is_dir():
            raise ConfigError([Problem("task.out", p.out if p.out else str(out), "is a file; the report writes several files into a "
                                       "directory: give a directory (made if missing)")])
        records = collect(root)
        if not records:
            raise ConfigError([Problem("report.dir", p.dir, f"no results.json below {root}: give the directory of "
                                       "a composer run or sweep (multirun/<date>/<time>, or outputs/<date>/<time>)")])
        keys = list(p.columns) if p.columns is not None else swept_keys(records)
        unknown = [k for k in keys if all(key_value(r, k) is None for r in records)]
        if unknown:
            known = sorted({k for r in records for k in (*r.overrides, *r.config, *r.metrics)})
            raise ConfigError([Problem("task.columns", k, "no run has this key (a config key such as model.top_k, "
                                       "an override, or a metric)" + did_you_mean(k, known)) for k in unknown])
        title = p.title or f"composer report: {root}"
        try:
            files, skipped = write_report(out, root, records, keys, title, p.plots)
        except OSError as exc:  # (a folder below a file, no permission, a full disk: a config problem, no traceback)
            raise ConfigError([Problem("task.out", p.out if p.out else str(out), f"cannot create or write "
                                       f"{exc.filename or out} ({exc.strerror or exc}): give a writable folder "
                                       "(made if missing)")]) from None
        header, body = run_table(records, keys)
        self._print(ctx, title, header, body, records, out, files)
        counts = {s: sum(r.status == s for r in records)
                  for s in ("ok", "failed", "interrupted", "missing", "unreadable")}
        log.info("report: %d runs below %s (%s) -> %s", len(records), root,
                 ", ".join(f"{n} {s}" for s, n in counts.items() if n), out)
        return {"dir": str(root), "out": str(out), "runs": len(records), **counts, "swept_keys": keys,
                "files": [str(out / f) for f in files], "plots_skipped": skipped}

    @staticmethod
    def _print(ctx: TaskContext, title: str, header: list[str], body: list[list[Any]], records: list[RunRecord],
               out: Path, files: list[str]) -> None:
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for h in header:
            t.add_column(escape(h), overflow="fold")
        for line, r in zip(body, records):
            t.add_row(*(escape(fmt(v)) for v in line), style=None if r.status == "ok" else "red")
        ctx.console.print(t)
        bad = [r for r in records if r.status != "ok"]
        if bad:
            ctx.console.print(f"[red]{len(bad)} of {len(records)} runs did not succeed[/red]: "
                              + escape("; ".join(f"{r.path}: {_first_line(r.error, 80)}" for r in bad)), highlight=False)
        ctx.console.print(escape(f"report written to {out}: {', '.join(files)}"), highlight=False)
