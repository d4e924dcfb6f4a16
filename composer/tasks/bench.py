"""task=bench: time the experts computation, against its peers and the floor (DESIGN.md, benchmark protocol).

Per token count T: one random routing (the same inputs for every implementation), then

- composer's experts kernel (``kernel=...``, resolved) eagerly and as CUDA-graph replays;
- the peers, measured in the same run: transformers 5 ``Qwen3MoeExperts`` with ``experts_implementation``
  eager and grouped_mm, composer's ``grouped_mm`` backend, and the torch reference;
- the floor: max(bytes of the expert weights touched / copy bandwidth, FLOPs / bf16 matmul rate), both
  ceilings measured at the start of the run on the same card; percent of floor = floor / time;
- accuracy: relative Frobenius error against a float32 reference.

Times are CUDA-event medians after warm-up (CPU: perf_counter medians, no floor, no graphs). Writes JSON and
markdown into the run directory and prints a rich table.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field

from ..layers.activation import act_and_mul
from ..layers.modular_kernel import ExpertWeights
from ..registry import KERNELS
from . import Task, TaskContext, TaskFailed, TaskParams, register_task

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}


class BenchParams(TaskParams):
    tokens: list[int] = Field(default_factory=lambda: [1, 16, 128, 1024, 4096])
    warmup: int = Field(5, ge=0, description="untimed calls before timing")
    iters: int = Field(50, ge=1, description="timed calls at most (fewer for slow cases, see budget_s)")
    min_iters: int = Field(5, ge=1)
    budget_s: float = Field(0.5, gt=0, description="target seconds of timed calls per case")
    cuda_graph: bool = Field(True, description="also time CUDA-graph replays (CUDA only)")
    peers: bool = Field(True, description="also time transformers' Qwen3MoeExperts and the torch reference")
    accuracy: bool = Field(True, description="relative Frobenius error vs a float32 reference")
    json_file: str = "bench.json"
    markdown_file: str = "bench.md"


# ----------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, min_iters: int = 3,
            budget_s: float = 0.5) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(max(1, warmup)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    n = int(min(iters, max(min_iters, budget_s / est)))
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` on a side stream, then capture one call into a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured here and now."""
    n = 1 << 29  # 1 GiB of bf16 per buffer
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20, min_iters=10, budget_s=1.0)
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ b, device, warmup=3, iters=20, min_iters=10, budget_s=1.0)
    rate = 2 * m ** 3 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": rate}


# ----------------------------------------------------------------------------------------------
# inputs, reference, peers


@dataclass
class Shape:
    name: str
    E: int
    k: int
    H: int
    I: int
    dtype: torch.dtype
    activation: str = "silu"
    has_bias: bool = False


def make_weights(shape: Shape, device: torch.device, gen: torch.Generator) -> ExpertWeights:
    E, H, I, dt = shape.E, shape.H, shape.I, shape.dtype

    def rnd(*size: int, scale: float) -> torch.Tensor:
        t = torch.empty(*size, device=device, dtype=dt)
        # fill in slices so no float32 copy of a whole weight tensor is ever made
        for e in range(size[0]):
            t[e] = (torch.randn(*size[1:], device=device, generator=gen) * scale).to(dt)
        return t

    w13 = rnd(E, 2 * I, H, scale=H ** -0.5)
    w2 = rnd(E, H, I, scale=I ** -0.5)
    b13 = rnd(E, 2 * I, scale=0.1) if shape.has_bias else None
    b2 = rnd(E, H, scale=0.1) if shape.has_bias else None
    return ExpertWeights(w13=w13, w2=w2, w13_bias=b13, w2_bias=b2)


def make_routing(T: int, shape: Shape, device: torch.device, gen: torch.Generator):
    x = torch.randn(T, shape.H, device=device, generator=gen).to(shape.dtype)
    logits = torch.randn(T, shape.E, device=device, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, dim=-1), shape.k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return x, w.float(), ids.to(torch.int32)


def reference_fp32(x, topk_weights, topk_ids, weights: ExpertWeights, activation: str) -> torch.Tensor:
    """The float32 reference, one expert upcast at a time (no float32 copy of all the weights)."""
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    x32 = x.float()
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = x32[tok] @ weights.w13[e].float().t()
        if weights.w13_bias is not None:
            h = h + weights.w13_bias[e].float()
        o = act_and_mul(activation, h) @ weights.w2[e].float().t()
        if weights.w2_bias is not None:
            o = o + weights.w2_bias[e].float()
        out.index_add_(0, tok, o * topk_weights[tok, slot, None])
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = torch.linalg.vector_norm((out.float() - ref).flatten())
    r = torch.linalg.vector_norm(ref.flatten())
    return float(d / r) if float(r) > 0 else float(d)


def transformers_experts(shape: Shape, weights: ExpertWeights, implementation: str) -> tuple[Any, str | None]:
    """transformers' Qwen3MoeExperts sharing composer's weight tensors, or (None, why not)."""
    try:
        import transformers
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except Exception as exc:  # noqa: BLE001 - any import problem means: no peer, say why
        return None, f"transformers not importable ({type(exc).__name__}: {exc})"
    if shape.has_bias:
        return None, "Qwen3MoeExperts has no biases"
    act = {"silu": "silu", "gelu": "gelu"}.get(shape.activation)
    if act is None:
        return None, f"Qwen3MoeExperts has no '{shape.activation}' activation"
    cfg = Qwen3MoeConfig(num_experts=shape.E, num_experts_per_tok=shape.k, hidden_size=shape.H,
                         moe_intermediate_size=shape.I, hidden_act=act)
    try:
        cfg._experts_implementation = implementation
    except Exception as exc:  # noqa: BLE001
        return None, f"cannot set experts_implementation={implementation} ({exc})"
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(weights.w13, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(weights.w2, requires_grad=False)
    if implementation != "eager" and not hasattr(mod, "has_gate"):
        return None, f"transformers {transformers.__version__} has no experts_implementation switch"
    return mod, None


# ----------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Impl:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    graph: bool
    note: str | None = None


def _impls(shape: Shape, weights: ExpertWeights, kernel: str, device: torch.device, peers: bool,
           cuda_graph: bool) -> list[Impl]:
    impls: list[Impl] = []
    experts = KERNELS.get(kernel)()
    act = shape.activation
    impls.append(Impl(f"composer {kernel}", lambda x, w, i: experts.apply(x, w, i, weights, act),
                      graph=cuda_graph and device.type == "cuda" and kernel != "torch"))
    if not peers:
        return impls
    for impl in ("eager", "grouped_mm"):
        mod, why = transformers_experts(shape, weights, impl)
        label = f"transformers {impl}"
        if mod is None:
            impls.append(Impl(label, None, False, why))
            continue
        impls.append(Impl(label, lambda x, w, i, m=mod: m(x, i.long(), w.to(x.dtype)),
                          graph=cuda_graph and device.type == "cuda" and impl != "eager"))
    if kernel != "grouped_mm" and "grouped_mm" in KERNELS:
        gm = KERNELS.get("grouped_mm")
        problems = gm.check(quant="none", dtype=str(shape.dtype).replace("torch.", ""), device=device.type)
        if problems:
            impls.append(Impl("composer grouped_mm", None, False, problems[0]))
        else:
            g = gm()
            impls.append(Impl("composer grouped_mm", lambda x, w, i: g.apply(x, w, i, weights, act),
                              graph=cuda_graph and device.type == "cuda"))
    if kernel != "torch":
        t = KERNELS.get("torch")()
        impls.append(Impl("torch reference", lambda x, w, i: t.apply(x, w, i, weights, act), graph=False,
                          note="reads per-expert counts to the host: no CUDA graph"))
    return impls


def floor_ms(T: int, topk_ids: torch.Tensor, shape: Shape, ceilings: dict[str, float] | None) -> dict[str, Any]:
    valid = topk_ids[topk_ids >= 0]
    touched = int(torch.unique(valid).numel()) if valid.numel() else 0
    pairs = int(valid.numel())
    elt = torch.empty((), dtype=shape.dtype).element_size()
    per_expert = 3 * shape.H * shape.I * elt
    nbytes = touched * per_expert + 2 * T * shape.H * elt
    flops = 6 * pairs * shape.H * shape.I
    d: dict[str, Any] = {"experts_touched": touched, "bytes": nbytes, "flops": flops}
    if ceilings:
        t_mem = nbytes / ceilings["copy_bytes_per_s"] * 1e3
        t_mma = flops / ceilings["bf16_flops_per_s"] * 1e3
        d.update(floor_ms=max(t_mem, t_mma), floor_bound="memory" if t_mem >= t_mma else "compute")
    return d


def run_bench(shape: Shape, tokens: list[int], kernel: str, device: torch.device, params: BenchParams,
              seed: int = 0, console: Any = None) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    cuda = device.type == "cuda"
    meta: dict[str, Any] = {
        "shape": {"name": shape.name, "E": shape.E, "top_k": shape.k, "H": shape.H, "I": shape.I,
                  "dtype": str(shape.dtype).replace("torch.", ""), "activation": shape.activation,
                  "has_bias": shape.has_bias},
        "kernel": kernel,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "timer": "CUDA events, median" if cuda else "perf_counter, median",
    }
    ceilings = measure_ceilings(device) if cuda else None
    meta["ceilings"] = ceilings
    weights = make_weights(shape, device, gen)
    impls = _impls(shape, weights, kernel, device, params.peers, params.cuda_graph)
    meta["notes"] = {i.name: i.note for i in impls if i.note}
    rows: list[dict[str, Any]] = []
    ncases = len(tokens) * sum(1 for i in impls if i.fn is not None)
    with Progress(TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(shape.name, total=ncases)
        for T in tokens:
            x, tw, ids = make_routing(T, shape, device, gen)
            row: dict[str, Any] = {"T": T, **floor_ms(T, ids, shape, ceilings), "impls": {}}
            ref = reference_fp32(x, tw, ids, weights, shape.activation) if params.accuracy else None
            for impl in impls:
                if impl.fn is None:
                    continue
                progress.update(task, description=f"{shape.name} T={T} {impl.name}")
                r: dict[str, Any] = {}
                try:
                    fn = lambda impl=impl: impl.fn(x, tw, ids)  # noqa: E731
                    out = fn()
                    if ref is not None:
                        r["rel_err"] = rel_err(out, ref)
                    del out
                    r["eager_ms"] = time_fn(fn, device, params.warmup, params.iters, params.min_iters, params.budget_s)
                    if impl.graph:
                        try:
                            g, gout = capture_graph(fn)
                            g.replay()
                            if ref is not None:
                                _sync(device)
                                r["graph_rel_err"] = rel_err(gout, ref)
                            r["graph_ms"] = time_fn(g.replay, device, params.warmup, params.iters, params.min_iters,
                                                    params.budget_s)
                            del g, gout
                        except Exception as exc:  # noqa: BLE001 - a peer that cannot capture is a table note
                            r["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            _sync(device)
                except Exception as exc:  # noqa: BLE001
                    r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                row["impls"][impl.name] = r
                progress.advance(task)
                if cuda:
                    torch.cuda.empty_cache()
            best = _best_ms(row["impls"].get(f"composer {kernel}", {}))
            if best is not None and row.get("floor_ms"):
                row["composer_pct_of_floor"] = 100.0 * row["floor_ms"] / best
            rows.append(row)
    return {"meta": meta, "rows": rows}


def _best_ms(r: dict[str, Any]) -> float | None:
    ts = [r[k] for k in ("graph_ms", "eager_ms") if k in r]
    return min(ts) if ts else None


def _versions() -> dict[str, str]:
    v = {"torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = "not installed"
    return v


# ----------------------------------------------------------------------------------------------
# reporting


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms * 1e3:,.1f}" if ms < 10 else f"{ms * 1e3:,.0f}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    kernel = result["meta"]["kernel"]
    main = f"composer {kernel}"
    names: list[str] = []
    for row in result["rows"]:
        for n in row["impls"]:
            if n not in names:
                names.append(n)
    peers = [n for n in names if n != main]
    header = ["T", f"{main} eager µs", f"{main} graph µs", "floor µs", "% of floor", f"{main} err"]
    for p in peers:
        header += [f"{p} µs", f"{p} err"]
    body = []
    for row in result["rows"]:
        m = row["impls"].get(main, {})
        pct = row.get("composer_pct_of_floor")
        line = [str(row["T"]), _fmt_ms(m.get("eager_ms")), _fmt_ms(m.get("graph_ms")) if "graph_ms" in m else (
            "—" if "graph_error" not in m else "failed"),
                _fmt_ms(row.get("floor_ms")), f"{pct:.0f}%" if pct is not None else "—",
                f"{m['rel_err']:.1e}" if "rel_err" in m else m.get("error", "—")]
        for p in peers:
            r = row["impls"].get(p, {})
            if "error" in r:
                line += ["error", "—"]
                continue
            t = _fmt_ms(r.get("eager_ms"))
            if "graph_ms" in r:
                t = f"{t} / {_fmt_ms(r['graph_ms'])} (graph)"
            line += [t, f"{r['rel_err']:.1e}" if "rel_err" in r else "—"]
        body.append(line)
    return header, body


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    s = meta["shape"]
    lines = [f"### {s['name']}: E={s['E']}, top_k={s['top_k']}, H={s['H']}, I={s['I']}, {s['dtype']}, {s['activation']}"
             f"{', bias' if s['has_bias'] else ''}", "",
             f"Card: **{meta['device']}**, {meta['date']}; {meta['timer']}; "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."]
    c = meta.get("ceilings")
    if c:
        lines.append(f"Ceilings measured in this run: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
                     f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s. "
                     "Floor = max(weight bytes touched / copy bandwidth, FLOPs / matmul rate).")
    lines.append("")
    header, body = table_rows(result)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in body]
    notes = {**meta.get("notes", {})}
    for row in result["rows"]:
        for n, r in row["impls"].items():
            if "graph_error" in r:
                notes.setdefault(f"{n} (graph)", r["graph_error"])
            if "error" in r:
                notes.setdefault(n, r["error"])
    if notes:
        lines.append("")
        lines += [f"- {k}: {v}" for k, v in notes.items()]
    lines.append("")
    lines.append("Times in µs; peers show eager / graph replay where a graph could be captured; err = relative "
                 "Frobenius error vs the float32 reference.")
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    s = result["meta"]["shape"]
    t = Table(title=f"{s['name']} (E={s['E']}, k={s['top_k']}, H={s['H']}, I={s['I']}, {s['dtype']}) "
                    f"on {result['meta']['device']}")
    header, body = table_rows(result)
    for h in header:
        t.add_column(h, justify="right")
    for r in body:
        t.add_row(*r)
    console.print(t)
    for k, v in result["meta"].get("notes", {}).items():
        console.print(f"[dim]{k}: {v}[/dim]")


def shape_from_config(cfg: Any) -> Shape:
    m = cfg.model
    return Shape(name=m.name, E=m.num_experts, k=m.top_k, H=m.hidden_size, I=m.intermediate_size,
                 dtype=m.torch_dtype, activation=m.activation, has_bias=m.has_bias)


@register_task("bench")
class Bench(Task):
    Params = BenchParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        p: BenchParams = cfg.task.params
        if cfg.quant.name != "none":
            raise TaskFailed(f"task=bench times unquantized experts for now; got quant={cfg.quant.name}")
        device = torch.device(cfg.device)
        shape = shape_from_config(cfg)
        torch.manual_seed(cfg.seed)
        result = run_bench(shape, list(p.tokens), cfg.kernel.resolved, device, p, seed=cfg.seed, console=ctx.console)
        print_table(result, ctx.console)
        run_dir = Path(ctx.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / p.json_file).write_text(json.dumps(result, indent=2, default=str))
        (run_dir / p.markdown_file).write_text(to_markdown(result))
        ctx.console.print(f"wrote {run_dir / p.json_file} and {run_dir / p.markdown_file}")
        tol = TOLERANCE[str(shape.dtype).replace("torch.", "")]
        main = f"composer {cfg.kernel.resolved}"
        bad = [f"T={r['T']}: {key} {r['impls'][main][key]:.2e} > {tol:.0e}" for r in result["rows"]
               for key in ("rel_err", "graph_rel_err")
               if main in r["impls"] and not math.isnan(r["impls"][main].get(key, 0.0) or 0.0)
               and r["impls"][main].get(key, 0.0) > tol]
        bad += [f"T={r['T']}: {r['impls'][main]['error']}" for r in result["rows"] if "error" in r["impls"].get(main, {})]
        nan = [f"T={r['T']}: {key} is NaN" for r in result["rows"] for key in ("rel_err", "graph_rel_err")
               if main in r["impls"] and math.isnan(r["impls"][main].get(key, 0.0) or 0.0)]
        if bad or nan:
            raise TaskFailed(f"{main} gave wrong results: " + "; ".join(bad + nan), result)
        return result


def _main(argv: list[str] | None = None) -> None:
    """Standalone driver (no Hydra), for scripts/gpu_check.sh:
    ``python -c "from composer.tasks.bench import _main; _main()" --model qwen3_30b_a3b --out DIR``."""
    import argparse

    import yaml
    from rich.console import Console

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="a preset in conf/model/")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--tokens", default=None, help="comma-separated")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=".")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    conf = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{args.model}.yaml"
    m = yaml.safe_load(conf.read_text())
    dtype = getattr(torch, args.dtype or m.get("dtype", "bfloat16"))
    shape = Shape(name=m["name"], E=m["num_experts"], k=m["top_k"], H=m["hidden_size"], I=m["intermediate_size"],
                  dtype=dtype, activation=m.get("activation", "silu"), has_bias=bool(m.get("has_bias", False)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernel = args.kernel or ("triton" if device.type == "cuda" else "torch")
    kw: dict[str, Any] = {"peers": not args.no_peers}
    if args.tokens:
        kw["tokens"] = [int(t) for t in args.tokens.split(",")]
    if args.iters:
        kw["iters"] = args.iters
    p = BenchParams(**kw)
    from .. import registry

    registry.load_plugins()
    console = Console(width=250)
    result = run_bench(shape, list(p.tokens), kernel, device, p, console=console)
    print_table(result, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{shape.name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"bench_{shape.name}.md").write_text(to_markdown(result))

