"""Bench of the Transformers backend (GPU): a Hugging Face MoE model at real per-layer dimensions with few
layers, prefill of T tokens and one decode step, for

- ``hf eager``      : the unmodified model, ``experts_implementation="eager"``
- ``hf grouped_mm`` : the unmodified model, ``experts_implementation="grouped_mm"``
- ``composer``      : the same model with its experts swapped for TransformersFusedMoE (kernel as configured)

all sharing one set of weights (composer adopts the packed tensors; the HF implementations are switched with
``set_experts_implementation``), in one run on one card. Beside the times: the logits of the last prefill
position, relative Frobenius error vs ``hf eager`` (must be within the dtype's tolerance, bf16 1e-2, or a quant
method's documented bound against the unquantized experts), and whether the greedy next tokens agree.

    python -m composer.integrations.bench --arch qwen3_moe --layers 2 --tokens 1,16,128,1024,4096 --out DIR

(kernel triton on CUDA; on a CPU kernel torch and T = 1,16 by default.)

``task=bench layer=transformers_moe`` runs it at the configured model's dimensions and takes composer's bench
options: ``task.tokens``, ``warmup``, ``iters`` (at most: fewer for a slow case, as ``budget_s`` and ``min_iters``
say), ``l2_cold`` (CUDA), ``peers=false`` (composer alone; hf eager still gives the reference logits, untimed),
``accuracy``, ``json_file`` and ``markdown_file``. ``task.cuda_graph`` (on by default) captures nothing here: the
whole model and its cache are timed eagerly, and the table and results say so.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch


def logits_tolerance(cfg: Any) -> float:
    """What composer's logits are held to against ``hf eager``: the dtype's tolerance, or for a quant method (whose
    experts are not the eager ones' weights) its documented bound against the unquantized experts, as task=check
    holds each swapped module."""
    from .check import _tolerances

    tol, bound = _tolerances(cfg, None)
    return tol if bound is None else max(tol, bound)


def real_dims_config(arch: str, layers: int, kernel: str, dtype: str = "bfloat16", device: str = "cuda",
                     vocab_size: int = 32000, seed: int = 0) -> Any:
    """A validated composer config for ``arch`` at its published per-layer dimensions (the transformers config
    class defaults) with ``layers`` decoder layers, every one of them sparse."""
    from transformers import CONFIG_MAPPING

    from ..api import _compose
    from ..config import validate_config
    from .hf_config import _TINY_COMMON, ARCHS

    defaults = CONFIG_MAPPING[arch]()
    keys = {**_TINY_COMMON, **ARCHS[arch].tiny}
    overrides = {k: getattr(defaults, k) for k in keys if hasattr(defaults, k) and k != "layer_types"}
    overrides.update(num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=8192)
    if arch == "gpt_oss":
        overrides["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
    if arch == "deepseek_v3":
        overrides["first_k_dense_replace"] = 0
    if arch in ("qwen2_moe", "qwen3_moe"):
        overrides["mlp_only_layers"] = []
    raw = _compose("config", [f"layer=transformers_moe", "model=hf", f"model.arch={arch}", f"model.dtype={dtype}",
                              f"kernel={kernel}", f"device={device}", f"seed={seed}"])
    raw["model"]["hf_overrides"] = overrides
    return validate_config(raw)


@dataclass(frozen=True)
class Timing:
    """How each case is timed: ``warmup`` untimed calls, then ``iters`` timed calls, or fewer for a slow case (as
    many as fill ``budget_s``, at least ``min_iters``; the defaults time exactly ``iters``); ``l2_cold``: an L2
    flush before every timed call (CUDA)."""

    warmup: int = 3
    iters: int = 10
    min_iters: int | None = None
    budget_s: float = math.inf
    l2_cold: bool = False


def _time(fn: Callable[[], Any], device: torch.device, t: Timing, before: Callable[[], Any] | None = None) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU), ``before()`` ahead of every timed call, untimed."""
    from ..tasks.timing import time_fn

    return time_fn(fn, device, t.warmup, t.iters, t.iters if t.min_iters is None else t.min_iters, t.budget_s,
                   before=before)


@torch.no_grad()
def _measure(model: torch.nn.Module, ids: torch.Tensor, t: Timing, timed: bool = True) -> dict[str, Any]:
    """Prefill of ``ids`` (the logits of the last position) and one decode step after a fresh prefill each time;
    with ``timed`` False the logits only."""
    from transformers import DynamicCache

    from ..tasks.timing import L2Flush

    def prefill() -> Any:
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out, cache

    out, _ = prefill()
    logits = out.logits[:, -1].float()
    nxt = logits.argmax(-1, keepdim=True)
    if not timed:
        return {"logits": logits, "next": nxt}
    flush = L2Flush(ids.device) if t.l2_cold and ids.device.type == "cuda" else (lambda: None)
    prefill_ms = _time(prefill, ids.device, t, before=flush)

    state: dict[str, Any] = {}

    def fresh() -> None:  # the cache grows by one token per step: each timed step follows its own prefill
        state["cache"] = prefill()[1]
        flush()

    fresh()
    decode_ms = _time(lambda: model(nxt, past_key_values=state["cache"], use_cache=True), ids.device, t, before=fresh)
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "logits": logits, "next": nxt}


def bench_arch(arch: str, layers: int, tokens: list[int], kernel: str, warmup: int, iters: int,
               device: str = "cuda", dtype: str = "bfloat16", log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    cfg = real_dims_config(arch, layers, kernel, dtype, device)
    return bench_config(cfg, tokens, Timing(warmup, iters), log)


def bench_config(cfg: Any, tokens: list[int], timing: Timing, log: Callable[[str], None] = print, peers: bool = True,
                 accuracy: bool = True) -> list[dict[str, Any]]:
    """The bench for a validated `layer=transformers_moe model=hf` config (its dimensions, dtype, kernel, device).
    ``peers``: also time hf eager and hf grouped_mm (without them hf eager still gives the reference logits,
    untimed); ``accuracy``: hold composer's logits to hf eager's."""
    from .transformers_moe import load_hf_model, swap_model

    layers, kernel, dtype, device = cfg.model.num_layers, cfg.kernel.resolved, cfg.model.dtype, cfg.device
    model = load_hf_model(cfg, "eager")
    arch = cfg.model.arch or model.config.model_type  # (a model.path run is labelled by its config, not "hf")
    quant = "" if cfg.quant.name == "none" else f", {cfg.quant.name}"
    gen = torch.Generator().manual_seed(0)
    prompts = {T: torch.randint(3, model.config.vocab_size, (1, T), generator=gen).to(device) for T in tokens}
    main = f"composer ({kernel}{quant})"
    impls: list[tuple[str, Callable[[], Any], bool]] = [  # (name, prepare, timed)
        ("hf eager", lambda: model.set_experts_implementation("eager"), peers),
        ("hf grouped_mm", lambda: model.set_experts_implementation("grouped_mm"), peers),
        (main, lambda: swap_model(model, cfg), True),  # in place, adopting the same weights
    ]
    impls = [(n, f, timed) for n, f, timed in impls if timed or (n == "hf eager" and accuracy)]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for name, prepare, timed in impls:
        try:
            prepare()
        except Exception as exc:  # a peer that cannot run here (e.g. grouped_mm on an older card)
            if name == main or not timed:
                raise
            log(f"{arch}: {name} unavailable: {exc}")
            continue
        for T in tokens:
            results[(name, T)] = r = _measure(model, prompts[T], timing, timed)
            if timed:
                results[(name, T)]["timed"] = True
                log(f"{arch} {name:>22} T={T:>5}: prefill {r['prefill_ms']:.3f} ms, decode {r['decode_ms']:.3f} ms")
    return _rows(cfg, arch, results, accuracy)


def _rows(cfg: Any, arch: str, results: dict[tuple[str, int], dict[str, Any]], accuracy: bool) -> list[dict[str, Any]]:
    """One row per timed (implementation, T), its logits held to hf eager's (``accuracy``)."""
    m = cfg.model
    tol = logits_tolerance(cfg)
    rows = []
    for (name, T), r in results.items():
        if not r.get("timed"):
            continue
        ref = results.get(("hf eager", T)) if accuracy else None
        err = None if ref is None else float((r["logits"] - ref["logits"]).norm() / ref["logits"].norm())
        rows.append({"arch": arch, "layers": m.num_layers, "E": m.num_experts, "top_k": m.top_k, "H": m.hidden_size,
                     "I": m.intermediate_size, "dtype": m.dtype, "implementation": name, "T": T,
                     "prefill_ms": r["prefill_ms"], "decode_ms": r["decode_ms"], "rel_err_vs_eager": err,
                     "same_next_token": None if ref is None else bool(torch.equal(r["next"], ref["next"])),
                     "tolerance": tol, "ok": err is None or err <= tol})
    return rows


def _refuse_options(cfg: Any, p: Any) -> None:
    """Bench options a whole Hugging Face model cannot honour: refused before anything is loaded."""
    from .transformers_moe import refuse_modes

    refuse_modes(cfg, "bench")


# task.cuda_graph (on by default for composer's own bench) has no graph to capture here: said in the table and in
# the results rather than refused, so the default command runs
NO_GRAPHS = ("eager only: layer=transformers_moe times the Hugging Face model's prefill and decode as they run "
             "(the model and its cache are not captured in CUDA graphs)")


def task_bench(cfg: Any, ctx: Any, p: Any) -> dict[str, Any]:
    """`task=bench layer=transformers_moe`: the bench at the configured model's dimensions; writes task.json_file
    and task.markdown_file in the run folder, as composer's own task=bench does."""
    from ..tasks import TaskFailed

    _refuse_options(cfg, p)
    timing = Timing(p.warmup, p.iters, p.min_iters, p.budget_s, p.l2_cold and cfg.device == "cuda")
    rows = bench_config(cfg, list(p.tokens), timing, log=ctx.console.print, peers=p.peers, accuracy=p.accuracy)
    card = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"
    graphs = p.cuda_graph and cfg.device == "cuda"
    table = markdown(rows, card) + (f"\nCUDA graphs: {NO_GRAPHS}.\n" if graphs else "")
    ctx.console.print(table)
    result = {"card": card, "timing": asdict(timing), "peers": p.peers, "accuracy": p.accuracy, "rows": rows,
              "passed": all(r["ok"] for r in rows), **({"cuda_graph": NO_GRAPHS} if graphs else {})}
    run_dir = Path(ctx.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / p.json_file).write_text(json.dumps(result, indent=2, default=str))
        (run_dir / p.markdown_file).write_text(table)
    except OSError as exc:  # (the measurements still go into results.json)
        raise TaskFailed(f"could not write the tables ({exc}); the measurements are in results.json", result) from None
    ctx.console.print(f"wrote {run_dir / p.json_file} and {run_dir / p.markdown_file}")
    bad = [f"{r['implementation']} T={r['T']}: logits rel. error {r['rel_err_vs_eager']:.2e} > {r['tolerance']:.3g}"
           for r in rows if not r["ok"]]
    if bad:
        raise TaskFailed("wrong logits against hf eager: " + "; ".join(bad), result)
    return result


def markdown(rows: list[dict[str, Any]], card: str) -> str:
    dtype, tol = (rows[0]["dtype"], rows[0]["tolerance"]) if rows else ("-", float("nan"))
    timer = "CUDA events" if card != "cpu" else "host timer"
    out = [f"Card: {card}. Prefill of T tokens (logits of the last position only) and one decode step; "
           f"median ms ({timer}). rel. err: {dtype} logits vs hf eager (relative Frobenius, <= {tol:.3g}).", "",
           "| arch (E, k, H, I, layers) | T | implementation | prefill ms | decode ms | rel. err vs eager | same next token |",
           "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        err = "-" if r["rel_err_vs_eager"] is None else f"{r['rel_err_vs_eager']:.1e}"
        out.append(f"| {r['arch']} ({r['E']}, {r['top_k']}, {r['H']}, {r['I']}, {r['layers']}) | {r['T']} | "
                   f"{r['implementation']} | {r['prefill_ms']:.3f} | {r['decode_ms']:.3f} | {err} | {r['same_next_token']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ..errors import ComposerError
    from .hf_config import ARCHS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen3_moe", choices=list(ARCHS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default=None, help="comma-separated T (default: 1,16,128,1024,4096 on CUDA, else "
                    "1,16: a CPU takes seconds per call at real dimensions)")
    ap.add_argument("--kernel", default=None, help="composer's experts kernel (default: triton on CUDA, else torch)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    given = a.tokens or ("1,16,128,1024,4096" if a.device == "cuda" else "1,16")
    try:
        tokens = [int(t) for t in given.split(",")]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        ap.error(f"--tokens {given!r}: give comma-separated token counts of at least 1, such as 1,16,128")
    kernel = a.kernel or ("triton" if a.device == "cuda" else "torch")
    try:
        rows = bench_arch(a.arch, a.layers, tokens, kernel, a.warmup, a.iters, a.device, a.dtype)
    except ComposerError as exc:  # a config problem (kernel, dtype, device): its message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hf_bench_{a.arch}.json").write_text(json.dumps({"card": card, "rows": rows}, indent=1))
    (out / f"hf_bench_{a.arch}.md").write_text(markdown(rows, card))
    print(markdown(rows, card))
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAIL {r['arch']} {r['implementation']} T={r['T']}: rel. error {r['rel_err_vs_eager']:.2e} > {r['tolerance']:.3g}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
