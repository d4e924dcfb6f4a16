"""Time tile configs of the quantized experts on one GPU, the way ``task=bench`` times them (T = 1 by default).

For each benchmark shape and T of ``--tokens``: composer bf16 (its shipped config, the speed-up's baseline), the
method's shipped entry for that T, and every variant of ``--variants`` (a JSON list; each item is merged into the
shipped entry: top-level keys replace, ``gemm1`` / ``gemm2`` objects update the shipped GEMM tiles, or replace them
whole with ``"replace": true``, e.g. to time an entry a tuner wrote; ``"entry_of": N`` starts from the method's shipped
entry for T = N instead, e.g. the T = 1 GEMV decode run at larger T; ``"name"`` labels the row). Each time is per
call of the whole experts call, timed as ``task=bench`` times its graphs (composer/tasks/timing.py: up to 20 calls
in one CUDA graph, an L2 flush before each, the flushes' own time subtracted); ``--rounds N`` times every row N
times in turns and reports the median of those. The error is against kernel=torch on the same quantized
weights at T = 1 (the active experts only), and against the shipped entry's output at larger T (kernel=torch would
dequantize every expert). ``--profile`` adds the per-launch device times of bf16 and of every row (torch.profiler, each call
after an L2 flush), to see where a call spends its microseconds. ``--read-floor`` adds how long the call's expert
weights take to read and do nothing else, bf16 and quantized, one read-only launch per GEMM timed the same way
(``stream_probe.read_alone_us``): for a small call this, not the copy rate, is what two launches cannot go below.

Example (repo root, GPU machine)::

    python3 scripts/decode_probe.py --method int4_w4a16 --variants '[{"name": "planes",
        "gemm1": {"int4_read": "planes"}, "gemm2": {"int4_read": "planes"}}]'
    python3 scripts/decode_probe.py --method int4_w4a16 --tokens 1024,4096 --variants '[{"name": "bk128",
        "gemm1": {"BLOCK_K": 128}, "gemm2": {"BLOCK_K": 128}}]'
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from composer.kernels.torch_backend import TorchExperts  # noqa: E402
from composer.kernels.triton_backend import TritonExperts  # noqa: E402
from composer.kernels.triton.configs import get_config, validate_entry  # noqa: E402
from composer.kernels.triton.fused import QUANT_METHODS, fused_experts, fused_experts_quant, quant_config  # noqa: E402
from composer.kernels.triton.tune import QUANT_TUNE_METHODS, QUANT_TUNE_SHAPES  # noqa: E402
from composer.tasks.bench import Shape, make_weights, quantize_weights, rel_err  # noqa: E402
from composer.tasks.timing import CallGraph, L2Flush  # noqa: E402


def merge(base: dict, variant: dict) -> dict:
    out = {k: v for k, v in base.items() if k not in ("source", "_us")}
    update = not variant.get("replace", False)
    for k, v in variant.items():
        if k in ("name", "replace", "entry_of"):
            continue
        out[k] = {**out.get(k, {}), **v} if update and k in ("gemm1", "gemm2") and isinstance(v, dict) else v
    return validate_entry(out, f"variant {variant.get('name', variant)}")


def write_table(out_dir: str, method: str, E: int, I: int, H: int, best: tuple) -> str:
    """The shipped table of ``method`` for this shape with ``best`` as its T = 1 entry, written into out_dir."""
    from composer.kernels.triton.configs import config_file_name, device_capability, device_name, tuned_table

    name = config_file_name(E, I, H, device_name(), method)
    src = tuned_table(E, I, H, device_name(), method, device_capability())  # ours, else a same-capability GPU's
    table = json.loads(Path(src[0]).read_text()) if src else {}
    table["_capability"] = device_capability()
    us, label, cfg = best
    table["1"] = {**{k: v for k, v in cfg.items() if k not in ("source", "_us")}, "_us": round(us, 1)}
    table["_note"] = (table.get("_note", "") + f" T=1: {label} picked by scripts/decode_probe.py on one "
                      f"{torch.cuda.get_device_name()}.").strip()
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    return str(out)


def graph_us(fn, device) -> float:
    return replay_us(graph_of(fn), device)


@functools.lru_cache(maxsize=None)
def l2_flush() -> L2Flush:
    return L2Flush(torch.device("cuda"))


def graph_of(fn) -> CallGraph:
    """``fn`` captured the way task=bench times its graphs (composer/tasks/timing.py)."""
    fn()
    return CallGraph(fn, torch.device("cuda"), 20, l2_flush())


def replay_us(graph: CallGraph, device) -> float:
    return 1e3 * graph.ms(iters=400, min_iters=50, budget_s=0.3, warmup=10)


METHOD_BYTES = {"int4_w4a16": 0.5, "fp8_w8a8": 1.0, "int8_w8a16": 1.0, "int8_w8a8": 1.0}  # bytes per weight (scales left out)


def read_us(fn) -> float:
    """How ``--read-floor`` times a call (a module function, so a CPU test can replace the GPU timer)."""
    return graph_us(fn, torch.device("cuda"))


def read_floor(method: str, ids: torch.Tensor, H: int, I: int, dev) -> str:
    """The line ``--read-floor`` prints: the active experts' w13 and w2 read by one read-only launch each (no
    arithmetic), as bf16 and as ``method`` stores them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stream_probe", Path(__file__).resolve().parent / "stream_probe.py")
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)  # (loaded here: its kernel is jitted or interpreted as the caller runs now)
    n = torch.unique(ids).numel()
    parts = []
    for label, bpe in (("bf16", 2.0), (method, METHOD_BYTES[method])):
        mats = [(n * 2 * I, int(H * bpe)), (n * H, int(I * bpe))]
        us, per = sp.read_alone_us(mats, dev, read_us)
        mb = sum(r * b for r, b in mats) / 1e6
        parts.append(f"{label} {us:.1f} us for {mb:.1f} MB (gemm1 {per[0][0]:.1f}, gemm2 {per[1][0]:.1f})")
    return f"  read alone, the {n} experts' weights, one launch per GEMM: " + "; ".join(parts)


def profile(fn, label: str) -> None:
    """Per-launch device times of ``fn``, each call after an L2 flush as in the timing (the flush is left out)."""
    from torch.profiler import ProfilerActivity, profile as prof

    flush = l2_flush()

    def kernels_of(run):
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(20):
                run()
            torch.cuda.synchronize()
        return sorted((e for e in p.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)

    def flushed():
        torch.cuda.synchronize()
        flush()
        torch.cuda.synchronize()
        fn()

    n_flush = len(kernels_of(flush)) // 20  # the flush's own launches, dropped from each call's group below
    both = kernels_of(flushed)
    group = len(both) // 20
    kernels = [e for c in range(20) for e in both[c * group + n_flush:(c + 1) * group]]
    per_call = len(kernels) // 20  # the launches of one call, in order (both GEMVs are _gemv_kernel)
    rows = [(kernels[i].name, sum(kernels[c * per_call + i].time_range.elapsed_us() for c in range(20)) / 20)
            for i in range(per_call)]
    print(f"  [profile] {label}: " + "; ".join(f"#{i} {k[:40]} {t:.1f} us" for i, (k, t) in enumerate(rows)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="int4_w4a16", choices=QUANT_METHODS,
                    help="a quant method: fp8_w8a8 per_token_channel and int4_w4a16 group 128 as the tuner quantizes "
                    "them, the int8 methods with their defaults")
    ap.add_argument("--shapes", default=",".join(QUANT_TUNE_SHAPES))
    ap.add_argument("--tokens", default="1", help="comma-separated T values (default 1)")
    ap.add_argument("--variants", default="[]", help="JSON list of entries merged into the shipped entry of each T")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a module constant of composer.kernels.triton for an A/B run, e.g. gemm.AMAX_BLOCK_MAX=512")
    ap.add_argument("--write", metavar="DIR", help="write the method's table per shape into DIR with the fastest "
                    "row (shipped or variant) within --max-err of kernel=torch as its T = 1 entry (read it with "
                    "COMPOSER_KERNEL_CONFIGS=DIR)")
    ap.add_argument("--max-err", type=float, default=1e-2)
    ap.add_argument("--rounds", type=int, default=1, help="time bf16 and every row this many times, in turns "
                    "(A B C, A B C, ...), and report the median: a small call (qwen3 T = 1) moves by up to 50%% "
                    "between processes and between two levels within one")
    ap.add_argument("--op", action="store_true", help="also time the shipped config through torch.ops.composer "
                    "(the path task=bench times)")
    ap.add_argument("--read-floor", action="store_true", help="also time reading the active experts' weights "
                    "alone (bf16 and the method's bytes; one read-only launch per GEMM, timed the same way)")
    args = ap.parse_args()
    for item in args.set:
        import importlib

        target, value = item.split("=", 1)
        mod, attr = target.rsplit(".", 1)
        m = importlib.import_module(f"composer.kernels.triton.{mod}")
        if not hasattr(m, attr):
            raise SystemExit(f"--set {item}: composer.kernels.triton.{mod} has no {attr}")
        setattr(m, attr, json.loads(value))
        print(f"# set {target} = {value}")
    variants = json.loads(args.variants)
    params = dict(QUANT_TUNE_METHODS).get(args.method)  # (None: the method's defaults)
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    for name in args.shapes.split(","):
        E, k, H, I = QUANT_TUNE_SHAPES[name]
        shape = Shape(name, E, k, H, I, torch.bfloat16)
        gen = torch.Generator(device=dev).manual_seed(0)
        w = make_weights(shape, dev, gen)
        shape.quant, shape.quant_params = args.method, params
        qw = quantize_weights(shape, w)
        ex = qw.extra or {}
        for T in (int(t) for t in args.tokens.split(",")):
            best = probe(args, name, T, E, k, H, I, w, qw, ex, variants, dev, gen)
            if args.write and best is not None and T == 1:
                print(f"  best: {best[1]} {best[0]:.1f} us -> {write_table(args.write, args.method, E, I, H, best)}")
        del w, qw
        torch.cuda.empty_cache()
    return 0


def probe(args, name, T, E, k, H, I, w, qw, ex, variants, dev, gen):
    """One shape and T: bf16, the shipped entry and the variants; returns the fastest (us, label, cfg) in bounds."""
    x = torch.randn(T, H, device=dev, generator=gen).to(torch.bfloat16)
    tw, ids = torch.topk(torch.randn(T, E, device=dev, generator=gen).softmax(-1), k, dim=-1)
    tw, ids = tw.float(), ids.to(torch.int32)

    def quant_run(cfg):
        return lambda: fused_experts_quant(
            x, tw, ids, qw.w13, qw.w2, None, None, "silu", args.method, qw.w13_scale, qw.w2_scale, qw.a13_scale,
            qw.a2_scale, qw.w13_zero, qw.w2_zero, ex.get("granularity", "per_token_channel"),
            *ex.get("block_shape", (128, 128)), config=cfg)

    bf_cfg = get_config(T, E, I, H, k, torch.bfloat16, dev)
    bf_graph = graph_of(lambda: fused_experts(x, tw, ids, w.w13, w.w2, config=bf_cfg))
    if args.profile:
        profile(lambda: fused_experts(x, tw, ids, w.w13, w.w2, config=bf_cfg), f"{name} T={T} bf16")
    shipped = quant_config(T, E, I, H, k, args.method, torch.bfloat16, dev)
    if T == 1:  # kernel=torch on the active experts only (all of deepseek_v3's 256 dequantized do not fit)
        used, local = torch.unique(ids, return_inverse=True)
        ref = TorchExperts().apply(x, tw, local.to(torch.int32), qw.select(used), "silu").double()
        against = "kernel=torch"
    else:
        ref = quant_run(merge(shipped, {}))().double()
        against = "shipped"
    rows = []  # (label, cfg, err, graph)
    for label, v in [("shipped", shipped)] + [(v.get("name", json.dumps(v)), v) for v in variants]:
        try:
            base = shipped if "entry_of" not in v else quant_config(int(v["entry_of"]), E, I, H, k, args.method,
                                                                     torch.bfloat16, dev)
            cfg = merge(base, {} if label == "shipped" else v)
            fn = quant_run(cfg)
            rows.append((label, cfg, rel_err(fn(), ref), graph_of(fn)))
            if args.profile:
                profile(fn, label)
            if args.op and label == "shipped":
                op = lambda: TritonExperts().apply(x, tw, ids, qw, "silu")  # noqa: E731
                print(f"  {args.method} shipped via torch.ops.composer: {graph_us(op, dev):.1f} us")
                if args.profile:
                    profile(op, "via op")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
            print(f"  {args.method} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
    times: dict[str, list[float]] = {label: [] for label, *_ in rows}
    bf_times = []
    for _ in range(max(1, args.rounds)):
        bf_times.append(replay_us(bf_graph, dev))
        for label, _, _, graph in rows:
            times[label].append(replay_us(graph, dev))

    def median(ts):
        return sorted(ts)[len(ts) // 2]

    def spread(ts):
        return f" (rounds: {', '.join(f'{t:.1f}' for t in ts)})" if len(ts) > 1 else ""

    bf16 = median(bf_times)
    print(f"{name} T={T}: bf16 {bf16:.1f} us{spread(bf_times)} (errors against {against})")
    if args.read_floor:
        print(read_floor(args.method, ids, H, I, dev))
    best = None
    for label, cfg, err, _ in rows:
        us = median(times[label])
        print(f"  {args.method} {label}: {us:.1f} us ({bf16 / us:.2f}x bf16){spread(times[label])}, err {err:.1e}  "
              f"{json.dumps({k: cfg[k] for k in ('pdl', 'gemm1', 'gemm2') if k in cfg})}")
        if err <= args.max_err and (best is None or us < best[0]):
            best = (us, label, cfg)
    return best


if __name__ == "__main__":
    sys.exit(main())
