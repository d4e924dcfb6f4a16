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
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
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


def _time(fn: Callable[[], Any], warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def _measure(model: torch.nn.Module, ids: torch.Tensor, warmup: int, iters: int) -> dict[str, Any]:
    from transformers import DynamicCache

    cuda = ids.device.type == "cuda"

    def prefill() -> Any:
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out, cache

    out, _ = prefill()
    logits = out.logits[:, -1].float()
    nxt = logits.argmax(-1, keepdim=True)
    prefill_ms = _time(prefill, warmup, iters, cuda)

    # one decode step after a fresh prefill each time (the cache grows by one token per step)
    times = []
    for i in range(warmup + iters):
        _, cache = prefill()
        if cuda:
            torch.cuda.synchronize()
        t = _time(lambda: model(nxt, past_key_values=cache, use_cache=True), 0, 1, cuda)
        if i >= warmup:
            times.append(t)
    return {"prefill_ms": prefill_ms, "decode_ms": statistics.median(times), "logits": logits, "next": nxt}


def bench_arch(arch: str, layers: int, tokens: list[int], kernel: str, warmup: int, iters: int,
               device: str = "cuda", dtype: str = "bfloat16", log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    cfg = real_dims_config(arch, layers, kernel, dtype, device)
    return bench_config(cfg, tokens, warmup, iters, log)


def bench_config(cfg: Any, tokens: list[int], warmup: int, iters: int,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The bench for a validated `layer=transformers_moe model=hf` config (its dimensions, dtype, kernel, device)."""
    from .transformers_moe import load_hf_model, swap_model

    layers, kernel, dtype, device = cfg.model.num_layers, cfg.kernel.resolved, cfg.model.dtype, cfg.device
    model = load_hf_model(cfg, "eager")
    arch = cfg.model.arch or model.config.model_type  # (a model.path run is labelled by its config, not "hf")
    quant = "" if cfg.quant.name == "none" else f", {cfg.quant.name}"
    gen = torch.Generator().manual_seed(0)
    prompts = {T: torch.randint(3, model.config.vocab_size, (1, T), generator=gen).to(device) for T in tokens}
    impls: list[tuple[str, Callable[[], None]]] = [
        ("hf eager", lambda: model.set_experts_implementation("eager")),
        ("hf grouped_mm", lambda: model.set_experts_implementation("grouped_mm")),
        (f"composer ({kernel}{quant})", lambda: swap_model(model, cfg)),  # in place, adopting the same weights
    ]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for name, prepare in impls:
        try:
            prepare()
        except Exception as exc:  # a peer that cannot run here (e.g. grouped_mm on an older card)
            log(f"{arch}: {name} unavailable: {exc}")
            continue
        for T in tokens:
            results[(name, T)] = _measure(model, prompts[T], warmup, iters)
            log(f"{arch} {name:>22} T={T:>5}: prefill {results[(name, T)]['prefill_ms']:.3f} ms, "
                f"decode {results[(name, T)]['decode_ms']:.3f} ms")
    rows = []
    m = cfg.model
    tol = logits_tolerance(cfg)
    for (name, T), r in results.items():
        ref = results.get(("hf eager", T))
        err = None if ref is None else float((r["logits"] - ref["logits"]).norm() / ref["logits"].norm())
        rows.append({"arch": arch, "layers": layers, "E": m.num_experts, "top_k": m.top_k, "H": m.hidden_size,
                     "I": m.intermediate_size, "dtype": dtype, "implementation": name, "T": T,
                     "prefill_ms": r["prefill_ms"], "decode_ms": r["decode_ms"], "rel_err_vs_eager": err,
                     "same_next_token": None if ref is None else bool(torch.equal(r["next"], ref["next"])),
                     "tolerance": tol, "ok": err is None or err <= tol})
    return rows


def task_bench(cfg: Any, ctx: Any, p: Any) -> dict[str, Any]:
    """`task=bench layer=transformers_moe`: the bench at the configured model's dimensions."""
    rows = bench_config(cfg, list(getattr(p, "tokens", [1, 16, 128])), getattr(p, "warmup", 3),
                        min(getattr(p, "iters", 10), 10), log=ctx.console.print)
    card = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"
    ctx.console.print(markdown(rows, card))
    (ctx.run_dir / "hf_bench.md").write_text(markdown(rows, card))
    result = {"card": card, "rows": rows, "passed": all(r["ok"] for r in rows)}
    bad = [f"{r['implementation']} T={r['T']}: logits rel. error {r['rel_err_vs_eager']:.2e} > {r['tolerance']:.3g}"
           for r in rows if not r["ok"]]
    if bad:
        from ..tasks import TaskFailed

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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default="1,16,128,1024,4096")
    ap.add_argument("--kernel", default="triton")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    rows = bench_arch(a.arch, a.layers, tokens, a.kernel, a.warmup, a.iters, a.device, a.dtype)
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
