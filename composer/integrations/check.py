"""task=check / task=run for `layer=transformers_moe`: the swapped Hugging Face model against the unmodified one.

check: logits of the swapped model vs the same model with ``experts_implementation="eager"`` (relative
Frobenius error within the dtype's tolerance: fp32 1e-5, bf16 1e-2), each swapped experts layer vs the
HF experts module it replaced on the same captured inputs, and greedy generation of ``GENERATE_TOKENS``
tokens (identical tokens required in float32; the matching prefix is reported for lower precisions).
Below float32 the judged logits error is the one against the reference replaying the swapped model's
routing (both ``layer.replace=experts`` and ``block``; see :func:`_replayed_reference_logits`); the
un-replayed error is reported too.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

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


@torch.no_grad()
def _layer_errors(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each swapped module (experts or block) vs the HF module it replaced, both fed the swapped run's inputs
    (``hf_rel_err``); composer's experts in it (the swapped experts layer, or the swapped block's FusedMoE) also
    vs composer's float64 oracle with their own (dequantized) weights on the same routing (``oracle_rel_err``)."""
    from ..checking import Capture, oracle_layer
    from ..layers.block import SparseMoEBlock
    from ..layers.fused_moe import FusedMoE
    from .transformers_moe import TransformersFusedMoE

    caps: dict[str, tuple[tuple, torch.Tensor]] = {}
    inner: dict[str, Capture] = {}  # a swapped block's experts: their inputs, routing and output
    handles = []
    for name in model.composer_swapped:
        def hook(m: Any, args: tuple, out: Any, name: str = name) -> None:
            caps.setdefault(name, (tuple(a.detach() for a in args), out.detach()))

        layer = model.get_submodule(name)
        handles.append(layer.register_forward_hook(hook))
        if isinstance(layer, SparseMoEBlock) and isinstance(layer.experts, FusedMoE):
            def inner_hook(m: Any, args: tuple, out: Any, name: str = name) -> None:
                if name not in inner:
                    x, top_w, top_ids = (a.detach() for a in args[:3])
                    inner[name] = Capture(x=x, topk_weights=top_w.float(), topk_ids=top_ids.to(torch.int32),
                                          out=out.detach())

            handles.append(layer.experts.register_forward_hook(inner_hook))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    errs: dict[str, dict[str, float]] = {}
    for name, (args, out) in caps.items():
        errs[name] = {"hf_rel_err": rel_error(out, ref.get_submodule(name)(*args))}
        layer = model.get_submodule(name)
        if isinstance(layer, TransformersFusedMoE):
            x, top_ids, top_w = args
            cap = Capture(x=x, topk_weights=top_w.float(), topk_ids=top_ids.to(torch.int32), out=out)
            errs[name]["oracle_rel_err"] = rel_error(out, oracle_layer(layer, cap))
        elif name in inner:
            errs[name]["oracle_rel_err"] = rel_error(inner[name].out, oracle_layer(layer.experts, inner[name]))
    return errs


def _with_routing(args: tuple, kwargs: dict, routing: list[torch.Tensor]) -> tuple[tuple, dict, int]:
    """A transformers 5 experts call ``(hidden_states, top_k_index, top_k_weights)`` (positional or by name) with
    its routing tensors replaced by ``routing`` (same order, cast to the dtypes of the call's own: HF passes int64
    ids and weights in float32 or the model dtype), and how many tokens' expert sets differed."""
    args, kwargs = list(args), dict(kwargs)
    slots = [(args, i) for i in range(1, len(args))] + [(kwargs, k) for k in kwargs if k != "hidden_states"]
    changed = 0
    for (where, key), new in zip(slots, routing):
        own, new = where[key], new.to(where[key].dtype)
        if not own.is_floating_point() and own.shape == new.shape:
            changed += int((own.sort(-1).values != new.sort(-1).values).reshape(own.shape[0], -1).any(-1).sum())
        where[key] = new
    return tuple(args), kwargs, changed


@torch.no_grad()
def _replayed_reference_logits(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor,
                               run_ref: Callable[..., Any] | None = None, run_model: Callable[..., Any] | None = None
                               ) -> tuple[torch.Tensor, int]:
    """The reference's logits with each experts module fed the routing the swapped model used at the same
    place, and how many (layer, token) routings differed. Below float32 the two models' hidden states differ by
    rounding, so a near-tie can send a token to another expert in one of them: a discrete change that says
    nothing about composer's layers. Replaying the swapped run's choice compares like with like.

    One mechanism for both swaps, since both end in the reference's HF experts module, called
    ``experts(hidden_states, top_k_index, top_k_weights)``: ``layer.replace=experts`` records what the HF router
    passed composer's experts layer; ``layer.replace=block`` records composer's router output (weights with
    renormalisation and routed_scaling_factor applied, as the HF routers return them) and feeds it to the
    reference block's ``experts``. The reference keeps its own hidden states, gate and shared experts.
    ``run_ref`` / ``run_model`` run the forwards instead of ``ref`` / ``model`` (e.g. their ``torch.compile``d
    versions: the hooks sit on the original modules, which those call)."""
    from ..layers.block import SparseMoEBlock

    recorded: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in model.composer_swapped:
        swapped = model.get_submodule(name)
        if isinstance(swapped, SparseMoEBlock):
            def rec(m: Any, args: tuple, out: tuple, name: str = name) -> None:
                weights, top_ids = out
                recorded[name] = [top_ids, weights]

            handles.append(swapped.router.register_forward_hook(rec))
        else:
            def rec_call(m: Any, args: tuple, kwargs: dict, name: str = name) -> None:
                recorded[name] = list(args[1:]) + [v for k, v in kwargs.items() if k != "hidden_states"]

            handles.append(swapped.register_forward_pre_hook(rec_call, with_kwargs=True))
    try:
        (model if run_model is None else run_model)(ids)
    finally:
        for h in handles:
            h.remove()
    changed = 0
    handles = []
    for name, routing in recorded.items():
        def replay(m: Any, args: tuple, kwargs: dict, routing: list = routing) -> tuple:
            nonlocal changed
            args, kwargs, n = _with_routing(args, kwargs, routing)
            changed += n
            return args, kwargs

        target = name + ".experts" if isinstance(model.get_submodule(name), SparseMoEBlock) else name
        handles.append(ref.get_submodule(target).register_forward_pre_hook(replay, with_kwargs=True))
    try:
        logits = (ref if run_ref is None else run_ref)(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, changed


def _tolerances(cfg: Any, given: float | None) -> tuple[float, float | None]:
    """(tolerance, documented bound vs the unquantized experts or None for quant=none)."""
    from ..registry import QUANT_METHODS

    tol = given if given is not None else TOLERANCE[cfg.model.dtype]
    method = QUANT_METHODS.get(cfg.quant.name)
    if cfg.quant.name == "none" or not hasattr(method, "tolerances"):
        return tol, None
    return tol, method.tolerances(cfg.quant.params, cfg.model.dtype)[1]


def check(cfg: Any, ctx: TaskContext, p: Any) -> dict[str, Any]:
    from .transformers_moe import reference_and_swapped

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
    ref_tokens, got_tokens = greedy(ref, ids, GENERATE_TOKENS), greedy(model, ids, GENERATE_TOKENS)
    same = (ref_tokens == got_tokens).tolist()
    prefix = same.index(False) if False in same else len(same)

    failures = []
    judged_err = replayed_err if replay else logits_err
    if bound is None and exceeds(judged_err, tol):
        failures.append(f"logits rel. error {judged_err:.3e} > tolerance {tol:.3g}"
                        + (" (reference replaying composer's routing)" if replay else ""))
    for name, e in layer_errs.items():
        if exceeds(e["hf_rel_err"], tol if bound is None else bound):
            failures.append(f"{name}: rel. error vs the Hugging Face module {e['hf_rel_err']:.3e} > "
                            + (f"tolerance {tol:.3g}" if bound is None else f"documented quantization bound {bound:.3g}"))
        if "oracle_rel_err" not in e:  # (every swap records it: a quantized check leans on it)
            failures.append(f"{name}: composer's experts were not compared with the float64 oracle (their "
                            f"inputs were not captured); nothing checks them to kernel rounding")
        elif exceeds(e["oracle_rel_err"], tol):
            failures.append(f"{name}: rel. error vs composer's float64 oracle {e['oracle_rel_err']:.3e} > tolerance {tol:.3g}")
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
    table.add_row(f"greedy {GENERATE_TOKENS} tokens", str(got_tokens.tolist()[:8])[:-1] + ", ...]",
                  str(ref_tokens.tolist()[:8])[:-1] + ", ...]", f"{prefix}/{GENERATE_TOKENS} identical")
    ctx.console.print(table)
    m = {"model_type": ref.config.model_type, "replace": cfg.layer.params.replace, "swapped": list(model.composer_swapped),
         "logits_rel_err": logits_err, "layers": layer_errs,
         **({"logits_rel_err_replayed_routing": replayed_err, "routing_changed": routing_changed} if replay else {}),
         "generate_identical_tokens": prefix, "generate_tokens": GENERATE_TOKENS,
         "reference_tokens": ref_tokens.tolist(), "composer_tokens": got_tokens.tolist(),
         "output_checksum": checksum(got_logits), "tolerance": tol, "quant_bound": bound, "passed": not failures}
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

    model = build(cfg)
    ids = prompt_ids(cfg, p.tokens, model.config.vocab_size)
    times = []
    with torch.no_grad():
        for i in range(p.warmup + p.iters):
            t0 = time.perf_counter()
            logits = model(ids).logits
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= p.warmup:
                times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
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
    return {"tokens": int(ids.shape[1]), "time_ms": ms, "output_checksum": checksum(logits),
            "modules": [s.__dict__ for s in rows]}
