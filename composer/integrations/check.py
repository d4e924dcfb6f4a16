"""task=check / task=run for `layer=transformers_moe`: the swapped Hugging Face model against the unmodified one.

check: logits of the swapped model vs the same model with ``experts_implementation="eager"`` (relative
Frobenius error within the dtype's tolerance: fp32 1e-5, bf16 1e-2), each swapped experts layer vs the
HF experts module it replaced on the same captured inputs, and greedy generation of ``GENERATE_TOKENS``
tokens (identical tokens required in float32; the matching prefix is reported for lower precisions).
Below float32 the judged logits error is the one against the reference replaying the swapped model's
routing (both ``layer.replace=experts`` and ``block``; see :func:`_replayed_reference_logits`); the
un-replayed error is reported too. With ``compile=true`` the swapped model also runs under
``torch.compile(fullgraph=True)`` against the compiled reference, judged the same way (:func:`_compiled`);
``cuda_graph=true`` is refused.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from rich.table import Table

from ..checking import TOLERANCE, exceeds, rel_error
from ..tasks import TaskContext, TaskFailed
from ..tasks.common import checksum

GENERATE_TOKENS = 32


def prompt_ids(cfg: Any, tokens: int, vocab_size: int) -> torch.Tensor:
    """Seeded random token ids ``[1, tokens]`` (avoiding the first few ids, often special tokens)."""
    from ..factory import _generator

    gen = _generator(cfg.seed, "hf-prompt", tokens)
    low = min(3, vocab_size - 1)
    return torch.randint(low, vocab_size, (1, max(tokens, 1)), generator=gen).to(cfg.device)


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding of exactly ``n`` new tokens (EOS suppressed), with the KV cache."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:]


@dataclass
class _Recorded:
    """What each swapped module got and gave in one forward (tensors only, so the hooks that fill it trace into a
    ``torch.compile``d graph without a break): ``calls`` its inputs and output, ``inner`` a swapped block's experts'
    (x, weights, ids) and output, ``routing`` the routing it used, as the HF experts call takes it."""

    calls: dict[str, tuple[tuple, torch.Tensor]] = field(default_factory=dict)
    inner: dict[str, tuple[tuple, torch.Tensor]] = field(default_factory=dict)
    routing: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@contextmanager
def _recording(model: torch.nn.Module) -> Iterator[_Recorded]:
    """Hooks on every swapped module while the block runs: ``layer.replace=experts`` records what the HF router passed
    composer's experts layer; ``layer.replace=block`` composer's router output (weights with renormalisation and
    routed_scaling_factor applied, as the HF routers return them) and its experts' inputs."""
    from ..layers.block import SparseMoEBlock
    from ..layers.fused_moe import FusedMoE

    rec, handles = _Recorded(), []
    for name in model.composer_swapped:
        layer = model.get_submodule(name)

        def call(m: Any, args: tuple, out: Any, name: str = name) -> None:
            rec.calls[name] = (tuple(a.detach() for a in args), out.detach())

        handles.append(layer.register_forward_hook(call))
        if isinstance(layer, SparseMoEBlock):
            def routed(m: Any, args: tuple, out: tuple, name: str = name) -> None:
                rec.routing[name] = [out[1], out[0]]  # (weights, ids) -> the HF call's order (ids, weights)

            handles.append(layer.router.register_forward_hook(routed))
            if isinstance(layer.experts, FusedMoE):
                def inner(m: Any, args: tuple, out: Any, name: str = name) -> None:
                    rec.inner[name] = (tuple(a.detach() for a in args[:3]), out.detach())

                handles.append(layer.experts.register_forward_hook(inner))
        else:
            def routed_call(m: Any, args: tuple, kwargs: dict, name: str = name) -> None:
                rec.routing[name] = list(args[1:]) + [v for k, v in kwargs.items() if k != "hidden_states"]

            handles.append(layer.register_forward_pre_hook(routed_call, with_kwargs=True))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _layer_errors(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each swapped module (experts or block) vs the HF module it replaced, both fed the swapped run's inputs
    (``hf_rel_err``); composer's experts in it (the swapped experts layer, or the swapped block's FusedMoE) also
    vs composer's float64 oracle with their own (dequantized) weights on the same routing (``oracle_rel_err``)."""
    with _recording(model) as rec:
        model(ids)
    return _errors_of(ref, model, rec)


@torch.no_grad()
def _errors_of(ref: torch.nn.Module, model: torch.nn.Module, rec: _Recorded) -> dict[str, dict[str, float]]:
    """:func:`_layer_errors` of a recorded forward (eager or compiled)."""
    from ..checking import Capture, oracle_layer
    from .transformers_moe import TransformersFusedMoE

    def capture(x: torch.Tensor, w: torch.Tensor, top_ids: torch.Tensor, out: torch.Tensor) -> Capture:
        return Capture(x=x, topk_weights=w.float(), topk_ids=top_ids.to(torch.int32), out=out)

    errs: dict[str, dict[str, float]] = {}
    for name, (args, out) in rec.calls.items():
        errs[name] = {"hf_rel_err": rel_error(out, ref.get_submodule(name)(*args))}
        layer = model.get_submodule(name)
        if isinstance(layer, TransformersFusedMoE):
            x, top_ids, top_w = args
            errs[name]["oracle_rel_err"] = rel_error(out, oracle_layer(layer, capture(x, top_w, top_ids, out)))
        elif name in rec.inner:
            (x, top_w, top_ids), inner_out = rec.inner[name]
            errs[name]["oracle_rel_err"] = rel_error(inner_out, oracle_layer(layer.experts,
                                                                             capture(x, top_w, top_ids, inner_out)))
    return errs


def _replace_routing(args: tuple, kwargs: dict, routing: list[torch.Tensor]) -> tuple[tuple, dict, list]:
    """A transformers 5 experts call ``(hidden_states, top_k_index, top_k_weights)`` (positional or by name) with
    its routing tensors replaced by ``routing`` (same order, cast to the dtypes of the call's own: HF passes int64
    ids and weights in float32 or the model dtype), and the call's own (own ids, new ids) pairs."""
    args, kwargs = list(args), dict(kwargs)
    slots = [(args, i) for i in range(1, len(args))] + [(kwargs, k) for k in kwargs if k != "hidden_states"]
    pairs = []
    for (where, key), new in zip(slots, routing):
        own, new = where[key], new.to(where[key].dtype)
        if not own.is_floating_point() and own.shape == new.shape:
            pairs.append((own, new))
        where[key] = new
    return tuple(args), kwargs, pairs


def _changed(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """How many tokens' expert *sets* differ between each (own ids, new ids) pair."""
    return sum(int((own.sort(-1).values != new.sort(-1).values).reshape(own.shape[0], -1).any(-1).sum())
               for own, new in pairs)


def _with_routing(args: tuple, kwargs: dict, routing: list[torch.Tensor]) -> tuple[tuple, dict, int]:
    """:func:`_replace_routing`, and how many tokens' expert sets differed."""
    args, kwargs, pairs = _replace_routing(args, kwargs, routing)
    return args, kwargs, _changed(pairs)


@torch.no_grad()
def _replayed_reference_logits(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor,
                               run_ref: Callable[..., Any] | None = None, run_model: Callable[..., Any] | None = None
                               ) -> tuple[torch.Tensor, int]:
    """The reference's logits with each experts module fed the routing the swapped model used at the same
    place, and how many (layer, token) routings differed. Below float32 the two models' hidden states differ by
    rounding, so a near-tie can send a token to another expert in one of them: a discrete change that says
    nothing about composer's layers. Replaying the swapped run's choice compares like with like.

    One mechanism for both swaps, since both end in the reference's HF experts module, called
    ``experts(hidden_states, top_k_index, top_k_weights)`` (:func:`_recording` says what is recorded); the
    reference keeps its own hidden states, gate and shared experts. ``run_ref`` / ``run_model`` run the forwards
    instead of ``ref`` / ``model`` (e.g. their ``torch.compile``d versions: the hooks sit on the original
    modules, which those call)."""
    with _recording(model) as rec:
        (model if run_model is None else run_model)(ids)
    return _replay(ref, model, rec, ids, run_ref)


@torch.no_grad()
def _replay(ref: torch.nn.Module, model: torch.nn.Module, rec: _Recorded, ids: torch.Tensor,
            run_ref: Callable[..., Any] | None = None) -> tuple[torch.Tensor, int]:
    """The reference's logits replaying ``rec``'s routing, and how many (layer, token) routings differed (counted
    after the forward: the hooks may run inside a compiled graph)."""
    from ..layers.block import SparseMoEBlock

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, routing in rec.routing.items():
        def replay(m: Any, args: tuple, kwargs: dict, routing: list = routing) -> tuple:
            args, kwargs, own = _replace_routing(args, kwargs, routing)
            pairs.extend(own)
            return args, kwargs

        target = name + ".experts" if isinstance(model.get_submodule(name), SparseMoEBlock) else name
        handles.append(ref.get_submodule(target).register_forward_pre_hook(replay, with_kwargs=True))
    try:
        logits = (ref if run_ref is None else run_ref)(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, _changed(pairs)


@torch.no_grad()
def _compiled(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor, replay: bool,
              eager_logits: torch.Tensor) -> dict[str, Any]:
    """compile=true: one forward of the swapped model under ``torch.compile(fullgraph=True)`` (as composer's own
    check compiles its stack: a graph break is an error, not a silent fallback to eager), against the reference
    compiled too, so that its norms and attention fuse as the swapped model's do (without fullgraph: the HF eager
    experts loop over the experts hit, data-dependent). The recording hooks are in place before the first call
    (compiled once, with them); below float32 the compiled reference replays the compiled run's routing. Each
    swapped module is then held, on the inputs the compiled run gave it, to the HF module and to composer's
    float64 oracle."""
    run_model, run_ref = torch.compile(model, fullgraph=True), torch.compile(ref)
    with _recording(model) as rec:
        got = run_model(ids).logits
    if replay:
        want, changed = _replay(ref, model, rec, ids, run_ref)
    else:
        want, changed = run_ref(ids).logits, None
    return {"logits_rel_err": rel_error(got, want), "routing_changed": changed, "layers": _errors_of(ref, model, rec),
            "vs_eager_rel_err": rel_error(got, eager_logits), "output_checksum": checksum(got)}


def _tolerances(cfg: Any, given: float | None) -> tuple[float, float | None]:
    """(tolerance, documented bound vs the unquantized experts or None for quant=none)."""
    from ..registry import QUANT_METHODS

    tol = given if given is not None else TOLERANCE[cfg.model.dtype]
    method = QUANT_METHODS.get(cfg.quant.name)
    if cfg.quant.name == "none" or not hasattr(method, "tolerances"):
        return tol, None
    return tol, method.tolerances(cfg.quant.params, cfg.model.dtype)[1]


def _layer_failures(layer_errs: dict[str, dict[str, float]], tol: float, bound: float | None,
                    mode: str = "") -> list[str]:
    """Each swapped module within ``tol`` of the HF module (``bound`` when quantized) and of composer's oracle."""
    failures = []
    for name, e in layer_errs.items():
        if exceeds(e["hf_rel_err"], tol if bound is None else bound):
            failures.append(f"{mode}{name}: rel. error vs the Hugging Face module {e['hf_rel_err']:.3e} > "
                            + (f"tolerance {tol:.3g}" if bound is None else f"documented quantization bound {bound:.3g}"))
        if "oracle_rel_err" not in e:  # (every swap records it: a quantized check leans on it)
            failures.append(f"{mode}{name}: composer's experts were not compared with the float64 oracle (their "
                            f"inputs were not captured); nothing checks them to kernel rounding")
        elif exceeds(e["oracle_rel_err"], tol):
            failures.append(f"{mode}{name}: rel. error vs composer's float64 oracle {e['oracle_rel_err']:.3e} > "
                            f"tolerance {tol:.3g}")
    return failures


def _compiled_rows(table: Table, c: dict[str, Any], replay: bool) -> None:
    what = "compiled reference" + (" replaying composer's routing" if replay else "")
    changed = f" ({c['routing_changed']} (layer, token) routings differed)" if replay else ""
    table.add_row(f"compile: logits vs {what}", c["output_checksum"], "", f"{c['logits_rel_err']:.2e}{changed}")
    table.add_row("compile: logits vs composer eager", "", "", f"{c['vs_eager_rel_err']:.2e}")
    for name, e in c["layers"].items():
        table.add_row(f"compile: {name}", "vs float64 oracle " + (f"{e['oracle_rel_err']:.2e}" if "oracle_rel_err" in e
                                                                  else "-"), "vs HF module", f"{e['hf_rel_err']:.2e}")


def check(cfg: Any, ctx: TaskContext, p: Any) -> dict[str, Any]:
    from .transformers_moe import reference_and_swapped, refuse_modes

    refuse_modes(cfg, "check", compile_ok=True)
    # quant=none: everything within the dtype's tolerance. Quantized: each layer within the dtype's tolerance
    # of composer's float64 oracle (its dequantized weights) and within the method's documented bound of the
    # unquantized HF experts; logits and generation are reported only.
    tol, bound = _tolerances(cfg, getattr(p, "tolerance", None))
    ref, model = reference_and_swapped(cfg)
    ids = prompt_ids(cfg, p.tokens, ref.config.vocab_size)
    with torch.no_grad():
        ref_logits = ref(ids).logits
        got_logits = model(ids).logits
    logits_err = rel_error(got_logits, ref_logits)
    # Below float32 the logits are held to the reference replaying the swapped model's routing (experts or block).
    replay = cfg.model.dtype != "float32"
    if replay:
        replayed_logits, routing_changed = _replayed_reference_logits(ref, model, ids)
        replayed_err = rel_error(got_logits, replayed_logits)
    layer_errs = _layer_errors(ref, model, ids)
    compiled = _compiled(ref, model, ids, replay, got_logits) if cfg.compile else None
    ref_tokens, got_tokens = greedy(ref, ids, GENERATE_TOKENS), greedy(model, ids, GENERATE_TOKENS)
    same = (ref_tokens == got_tokens).tolist()
    prefix = same.index(False) if False in same else len(same)

    failures = []
    judged_err = replayed_err if replay else logits_err
    if bound is None and exceeds(judged_err, tol):
        failures.append(f"logits rel. error {judged_err:.3e} > tolerance {tol:.3g}"
                        + (" (reference replaying composer's routing)" if replay else ""))
    failures += _layer_failures(layer_errs, tol, bound)
    if compiled is not None:
        if bound is None and exceeds(compiled["logits_rel_err"], tol):
            failures.append(f"compile: logits rel. error {compiled['logits_rel_err']:.3e} > tolerance {tol:.3g} "
                            "(vs the compiled reference" + (" replaying composer's routing)" if replay else ")"))
        failures += _layer_failures(compiled["layers"], tol, bound, "compile: ")
    if bound is None and cfg.model.dtype == "float32" and prefix != GENERATE_TOKENS:
        failures.append(f"greedy generation differs from token {prefix} on: "
                        f"reference {ref_tokens.tolist()} vs composer {got_tokens.tolist()}")

    table = Table(title=f"composer check: {cfg.model.name} {ref.config.model_type} ({type(ref).__name__}) vs "
                        "experts_implementation=eager", title_justify="left")
    for col in ("what", "composer", "reference", "rel. error / match"):
        table.add_column(col)
    impl = next((m.implementation() for m in model.modules() if getattr(m, "hf_class", "")), "")
    table.add_row("swapped", f"{len(model.composer_swapped)} x {cfg.layer.params.replace}", "", impl)
    table.add_row(f"logits [1, {ids.shape[1]}, {ref.config.vocab_size}]", checksum(got_logits), checksum(ref_logits),
                  f"{logits_err:.2e}")
    if replay:
        table.add_row("logits, reference replaying composer's routing", checksum(got_logits), checksum(replayed_logits),
                      f"{replayed_err:.2e} ({routing_changed} (layer, token) routings differed)")
    for name, e in layer_errs.items():
        table.add_row(name, "vs float64 oracle " + (f"{e['oracle_rel_err']:.2e}" if "oracle_rel_err" in e else "-"),
                      "vs HF module", f"{e['hf_rel_err']:.2e}")
    if compiled is not None:
        _compiled_rows(table, compiled, replay)
    table.add_row(f"greedy {GENERATE_TOKENS} tokens", str(got_tokens.tolist()[:8])[:-1] + ", ...]",
                  str(ref_tokens.tolist()[:8])[:-1] + ", ...]", f"{prefix}/{GENERATE_TOKENS} identical")
    ctx.console.print(table)
    m = {"model_type": ref.config.model_type, "replace": cfg.layer.params.replace, "swapped": list(model.composer_swapped),
         "logits_rel_err": logits_err, "layers": layer_errs,
         **({"logits_rel_err_replayed_routing": replayed_err, "routing_changed": routing_changed} if replay else {}),
         "generate_identical_tokens": prefix, "generate_tokens": GENERATE_TOKENS,
         "reference_tokens": ref_tokens.tolist(), "composer_tokens": got_tokens.tolist(),
         "output_checksum": checksum(got_logits), "tolerance": tol, "quant_bound": bound,
         **({"compile": compiled} if compiled is not None else {}), "passed": not failures}
    if failures:
        raise TaskFailed("check failed:\n  " + "\n  ".join(failures), m)
    if bound is None:
        ctx.console.print(f"[green]check passed[/green] (tolerance {tol:.3g}, {prefix}/{GENERATE_TOKENS} tokens identical)")
    else:  # quantized: what was judged, and that the logits and generation were reported only
        ctx.console.print(f"[green]check passed[/green] (composer's experts within {tol:.3g} of its float64 oracle, "
                          f"each swapped module within the documented bound {bound:.3g} of the Hugging Face one; "
                          f"logits and generation reported only: {prefix}/{GENERATE_TOKENS} tokens identical)")
    return m


def run(cfg: Any, ctx: TaskContext, p: Any) -> dict[str, Any]:
    """task=run: forward a seeded prompt of ``task.tokens`` tokens through the swapped model; time it."""
    from ..describe import describe
    from ..factory import build
    from .transformers_moe import refuse_modes

    refuse_modes(cfg, "run", compile_ok=True)
    model = build(cfg)
    ids = prompt_ids(cfg, p.tokens, model.config.vocab_size)
    logits, ms = _timed(model, ids, p.warmup, p.iters)
    mode: dict[str, Any] = {}
    if cfg.compile:  # (one more warm-up call: the first compiles)
        c_logits, c_ms = _timed(torch.compile(model, fullgraph=True), ids, p.warmup + 1, p.iters)
        mode = {"mode": "compile", "mode_time_ms": c_ms, "mode_vs_eager_rel_err": rel_error(c_logits, logits),
                "mode_output_checksum": checksum(c_logits)}
    table = Table(title=f"composer run: {model.config.model_type} ({type(model).__name__})", title_justify="left")
    for col in ("module", "registry name", "implementation", "params"):
        table.add_column(col)
    rows = [s for s in describe(model, cfg) if s.registry_name.startswith("layer")]
    for s in rows:
        table.add_row(s.path, s.registry_name, s.implementation, f"{s.params:,}")
    table.add_row("[b]model[/b]", "", f"logits {checksum(logits)}", f"{sum(q.numel() for q in model.parameters()):,}")
    ctx.console.print(table)
    ctx.console.print(f"tokens={ids.shape[1]} dtype={cfg.model.dtype} device={cfg.device} kernel={cfg.kernel.resolved} "
                      f"quant={cfg.quant.name}: forward {ms:.3f} ms (median of {p.iters})")
    if mode:
        ctx.console.print(f"compile: forward {mode['mode_time_ms']:.3f} ms (median of {p.iters}); logits rel. error vs "
                          f"eager {mode['mode_vs_eager_rel_err']:.2e}")
    return {"tokens": int(ids.shape[1]), "time_ms": ms, "output_checksum": checksum(logits),
            "modules": [s.__dict__ for s in rows], **mode}


@torch.no_grad()
def _timed(fn: Callable[..., Any], ids: torch.Tensor, warmup: int, iters: int) -> tuple[torch.Tensor, float]:
    """The logits of ``fn(ids)`` and the median milliseconds of ``iters`` calls after ``warmup``."""
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        logits = fn(ids).logits
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return logits, statistics.median(times) * 1e3
