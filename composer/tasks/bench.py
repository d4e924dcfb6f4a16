"""task=bench: time the experts computation, against its peers and the floor (README.md, `composer task=bench`).

Per token count T: one random routing (the same inputs for every implementation), then

- composer's experts kernel (``kernel=...``, resolved) eagerly and as CUDA-graph replays;
- the peers, measured in the same run: transformers 5 ``Qwen3MoeExperts`` with ``experts_implementation``
  eager and grouped_mm, composer's ``grouped_mm`` backend, and the torch reference;
- the floor: max(bytes of the expert weights touched / copy bandwidth, FLOPs / bf16 matmul rate), both
  ceilings measured at the start of the run on the same card; percent of floor = floor / time;
- accuracy: relative Frobenius error against a float32 reference.

With a quant method (``quant=...``) the weights are quantized online from the same model-dtype weights, and the
rows are composer on the quantized weights, composer on the model-dtype weights (the speed-up's baseline) and,
for fp8 per_token_channel, ``torch._scaled_grouped_mm`` (fp8 row-wise) where torch has it. The floor counts the
quantized bytes (values, scales, zero points) and, for w8a8, the fp8 (``torch._scaled_mm``) or int8
(``torch._int_mm``) matmul rate measured in the same run; the reference is the dequantized-weights oracle.

Times are CUDA-event medians after warm-up; a graph time is per call inside one CUDA graph of up to ``graph_calls``
calls, and with ``l2_cold`` every timed call follows an L2 flush (timing.py says why). CPU: perf_counter medians,
no floor, no graphs. Writes JSON and markdown into the run directory and prints a rich table.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
from pydantic import Field, ValidationInfo, field_validator

from ..layers.activation import act_and_mul
from ..layers.modular_kernel import ExpertWeights
from ..registry import KERNELS, LAYERS
from . import Task, TaskContext, TaskFailed, TaskParams, register_task
from .timing import CallGraph, L2Flush, capture_graph, sync, time_fn

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}


class BenchParams(TaskParams):
    tokens: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 16, 128, 1024, 4096], min_length=1,
                                                      description="the T values timed (at least one)")
    warmup: int = Field(5, ge=0, description="untimed calls before timing")
    iters: int = Field(50, ge=1, description="timed calls at most (fewer for slow cases, see budget_s)")
    min_iters: int = Field(5, ge=1, description="timed calls at least, however slow (capped at iters: task.iters=2 "
                           "times 2 calls)")
    budget_s: float = Field(0.5, gt=0, description="target seconds of timed calls per case")
    cuda_graph: bool = Field(True, description="also time CUDA graphs (CUDA only)")
    graph_calls: int = Field(20, ge=1, description="calls captured in one timed CUDA graph, at most (as many as "
                             "make 1 ms); the graph time is per call, without the host's launch of the replay")
    l2_cold: bool = Field(True, description="before every timed call read a buffer twice the L2's size (the flush "
                          "time is not counted), so a call never finds weights the previous call left in L2, as in "
                          "a model whose other layers run in between (CUDA only)")
    peers: bool = Field(True, description="also time transformers' Qwen3MoeExperts and the torch reference")
    accuracy: bool = Field(True, description="relative Frobenius error vs a float32 reference")
    json_file: str = Field("bench.json", description="the JSON table's file name, written in the run folder")
    markdown_file: str = Field("bench.md", description="the markdown table's file name, written in the run folder")

    @field_validator("json_file", "markdown_file")
    @classmethod
    def _a_file_name(cls, v: str, info: ValidationInfo) -> str:
        """Checked before anything is measured: a path the run folder cannot take (sub/x.json, /abs/x.json, '.')
        failed only after the whole benchmark, and composer's own files would be overwritten."""
        if not v or v in (".", "..") or "/" in v or "\\" in v:
            raise ValueError(f"must be a file name in the run folder, such as bench.json (no folders), got {v!r}")
        if v in ("results.json", "config.resolved.yaml", "multirun.yaml") or v.endswith(".log") or v.startswith("."):
            raise ValueError(f"{v} is (or could be) one of the run folder's own files (results.json, Hydra's .hydra/ "
                             "and <job>.log); choose another name, such as bench.json")
        if len(v.encode()) > 255:
            raise ValueError(f"is {len(v.encode())} bytes long; a file name takes at most 255")
        if info.field_name == "markdown_file" and v == info.data.get("json_file"):
            raise ValueError("is task.json_file too: the markdown would overwrite the JSON; give them different names")
        return v


# ----------------------------------------------------------------------------------------------
# timing


# clocks_throttle_reasons bits (nvidia-smi -q -d PERFORMANCE) that slow a sustained run down
_THROTTLE = {0x4: "power cap", 0x8: "hardware slowdown", 0x20: "thermal", 0x40: "thermal", 0x80: "power brake"}


def gpu_clocks(device: torch.device) -> dict[str, Any] | None:
    """The SM clock and what holds it down, read right after a timed loop (``nvidia-smi``). A back-to-back graph
    replay at T = 4096 runs into the power cap (700 W on an H100 / H200: 1980 -> about 1700 MHz) where eager calls,
    with the GPU idle between launches, do not; a table is only readable with that next to it. None where
    nvidia-smi is missing or its GPUs cannot be matched to ``device``."""
    import subprocess

    try:
        fields = "uuid,clocks.sm,clocks.max.sm,power.draw,clocks_throttle_reasons.active"
        q = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in q.stdout.splitlines() if line.count(",") == 4]
    if q.returncode != 0 or not rows:
        return None
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "")).lower()
    mine = [r for r in rows if uuid and uuid in r[0].lower()] or (rows if len(rows) == 1 else [])
    if not mine:
        return None
    _, sm, sm_max, power, reasons = mine[0]
    try:
        bits = int(reasons, 16)
        out = {"sm_mhz": int(float(sm)), "sm_max_mhz": int(float(sm_max)),
               "limits": sorted({name for bit, name in _THROTTLE.items() if bits & bit})}
    except ValueError:
        return None
    try:
        out["power_w"] = float(power)
    except ValueError:
        pass
    return out


def clocks_line(result: dict[str, Any], impl: str) -> str | None:
    """One line: the SM clock after each T's graph replays of ``impl``, and what capped it."""
    clocks = [(row["T"], c) for row in result["rows"] if (c := row["impls"].get(impl, {}).get("graph_clocks"))]
    if not clocks:
        return None
    parts = [f"T = {T} {c['sm_mhz']}" + (f" ({', '.join(c['limits'])})" if c["limits"] else "") for T, c in clocks]
    return f"SM clock (MHz, of {clocks[0][1]['sm_max_mhz']}) right after {impl}'s graph replays: {', '.join(parts)}."


def run_notes(result: dict[str, Any]) -> list[str]:
    """The lines under a bench table: the tile config files composer's Triton rows ran, and the SM clock."""
    lines = (tile_sources_line(result), clocks_line(result, f"composer {result['meta']['kernel']}"))
    return [line for line in lines if line]


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
    out = {"copy_bytes_per_s": bw, "bf16_flops_per_s": rate}
    # fp8 (torch._scaled_mm, e4m3 x e4m3 -> bf16) and int8 (torch._int_mm) tensor-core rates, where the card and
    # torch have them: the compute floor of the w8a8 methods
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)
        ms = time_fn(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                     device, warmup=3, iters=20, min_iters=10, budget_s=1.0)
        out["fp8_flops_per_s"] = 2 * m ** 3 / (ms * 1e-3)
        del a8, b8
    except Exception:  # noqa: BLE001 - no fp8 on this card / torch
        pass
    try:
        ai = torch.randint(-127, 128, (m, m), device=device, dtype=torch.int8)
        bi = torch.randint(-127, 128, (m, m), device=device, dtype=torch.int8)
        ms = time_fn(lambda: torch._int_mm(ai, bi), device, warmup=3, iters=20, min_iters=10, budget_s=1.0)
        out["int8_ops_per_s"] = 2 * m ** 3 / (ms * 1e-3)
        del ai, bi
    except Exception:  # noqa: BLE001
        pass
    del a, b
    torch.cuda.empty_cache()
    return out


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
    quant: str = "none"
    quant_params: Any = None  # the method's Params (composer.quant); None: its defaults


# which tensor-core rate bounds each method's FLOPs (w*a16 multiply in the model dtype)
QUANT_RATE = {"fp8_w8a8": "fp8_flops_per_s", "int8_w8a8": "int8_ops_per_s"}


def _quant_method(shape: Shape):
    from ..registry import QUANT_METHODS

    cls = QUANT_METHODS.get(shape.quant)
    params = shape.quant_params if shape.quant_params is not None else cls.Params()
    if isinstance(params, dict):
        params = cls.Params(**params)
    return cls(params)


def quantize_weights(shape: Shape, weights: ExpertWeights, chunk: int = 8) -> ExpertWeights:
    """The method's online quantization of model-dtype weights (as process_weights_after_loading does),
    a few experts at a time so no float32 copy of all the weights is made."""
    from types import SimpleNamespace

    method = _quant_method(shape)
    E = weights.w13.shape[0]
    parts: dict[str, list[torch.Tensor]] = {}
    for e0 in range(0, E, chunk):
        n = min(chunk, E - e0)
        layer = SimpleNamespace(global_num_experts=n, hidden_size=shape.H, intermediate_size=shape.I,
                                quant_dtype=shape.dtype)
        for k, t in method.quantize_weights(layer, weights.w13[e0:e0 + n], weights.w2[e0:e0 + n]).items():
            parts.setdefault(k, []).append(t)
    layer = SimpleNamespace(global_num_experts=E, hidden_size=shape.H, intermediate_size=shape.I,
                            quant_dtype=shape.dtype, w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)
    for k, ts in parts.items():
        setattr(layer, k, torch.cat(ts) if ts[0].dim() else ts[0])
    return method.expert_weights(layer)


def _expert_slice(w: ExpertWeights, e: int) -> ExpertWeights:
    E = w.w13.shape[0]

    def sl(t):
        return t[e:e + 1] if t is not None and t.dim() >= 1 and t.shape[0] == E else t

    return ExpertWeights(w13=sl(w.w13), w2=sl(w.w2), w13_bias=sl(w.w13_bias), w2_bias=sl(w.w2_bias), quant=w.quant,
                         w13_scale=sl(w.w13_scale), w2_scale=sl(w.w2_scale), a13_scale=w.a13_scale,
                         a2_scale=w.a2_scale, w13_zero=sl(w.w13_zero), w2_zero=sl(w.w2_zero), extra=w.extra)


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
    """The float32 reference, one expert upcast at a time (no float32 copy of all the weights). Quantized
    weights: the dequantized-weights oracle (each expert dequantized; w8a8 quantize each GEMM input, held in
    the model dtype, as the kernels do)."""
    from ..registry import QUANT_METHODS

    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    x32 = x.float()
    method = QUANT_METHODS.get(weights.quant) if weights.quant != "none" else None
    aq = getattr(method, "activation_quantizer", lambda w: None)(weights) if method is not None else None
    qa = (lambda t, st: aq(t.to(x.dtype), st).float()) if aq is not None else (lambda t, st: t)  # noqa: E731
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        ew = _expert_slice(weights, e) if method is not None else None
        deq = method.dequantize(ew, torch.float32) if method is not None else None
        w13 = deq.w13[0] if deq is not None else weights.w13[e].float()
        w2 = deq.w2[0] if deq is not None else weights.w2[e].float()
        h = qa(x32[tok], "a13") @ w13.t()
        if weights.w13_bias is not None:
            h = h + weights.w13_bias[e].float()
        o = qa(act_and_mul(activation, h), "a2") @ w2.t()
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


def _quant_rows_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t32 = t.float()
    scale = t32.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448.0
    return (t32 / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale.reshape(-1)


def scaled_grouped_mm_experts(shape: Shape, weights: ExpertWeights, activation: str
                              ) -> tuple[Callable | None, str | None]:
    """The fp8 row-wise peer: ``torch._scaled_grouped_mm`` on the same per-channel fp8 weights, with the
    routing done in torch as a user would (stable sort by expert, each expert's rows padded to 16, per-row fp8
    activation scales, index_add over top-k); no host synchronization, so it captures into a CUDA graph."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return None, f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if weights.quant != "fp8_w8a8" or weights.extra.get("granularity") != "per_token_channel":
        return None, "fp8 row-wise peer: runs with quant=fp8_w8a8 quant.granularity=per_token_channel"
    if shape.has_bias:
        return None, "no biases in the fp8 row-wise peer"
    E, I = shape.E, shape.I
    w13t, w2t = weights.w13.transpose(1, 2), weights.w2.transpose(1, 2)  # [E, K, N] column-major
    s13 = weights.w13_scale.reshape(E, -1).float().contiguous()
    s2 = weights.w2_scale.reshape(E, -1).float().contiguous()

    def fn(x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        P = T * k
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        padded = (counts + 15) // 16 * 16
        ends = torch.cumsum(padded, 0)
        e_sorted = flat[order]
        pos = (ends - padded)[e_sorted] + torch.arange(P, device=x.device) - (torch.cumsum(counts, 0) - counts)[e_sorted]
        tok = order // k
        rows = P + 15 * min(E, P)
        xa = x.new_zeros(rows, shape.H)
        xa[pos] = x[tok]
        offs = ends.to(torch.int32)
        qa, sa = _quant_rows_fp8(xa)
        h = torch._scaled_grouped_mm(qa, w13t, sa, s13, offs=offs, out_dtype=x.dtype)
        a = act_and_mul(activation, h)
        q2, sa2 = _quant_rows_fp8(a)
        o = torch._scaled_grouped_mm(q2, w2t, sa2, s2, offs=offs, out_dtype=x.dtype)
        out = torch.zeros(T, shape.H, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, o[pos].float() * tw.reshape(-1)[order, None])
        return out.to(x.dtype)

    return fn, None


# ----------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Impl:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    graph: bool
    note: str | None = None


def _impls(shape: Shape, weights: ExpertWeights, kernel: str, device: torch.device, peers: bool,
           cuda_graph: bool, qweights: ExpertWeights | None = None) -> list[Impl]:
    impls: list[Impl] = []
    experts = KERNELS.get(kernel)()
    act = shape.activation
    graphs = cuda_graph and device.type == "cuda"
    if qweights is not None:
        # quantized: composer on the quantized weights, then the same kernel on the model-dtype weights they came
        # from (the speed-up's baseline), the fp8 row-wise grouped GEMM of torch; the unquantized peers are in
        # the quant=none table
        impls.append(Impl(f"composer {kernel}", lambda x, w, i: experts.apply(x, w, i, qweights, act),
                          graph=graphs and kernel != "torch"))
        if not peers:
            return impls
        dt = str(shape.dtype).replace("torch.", "")
        impls.append(Impl(f"composer {kernel} {dt}", lambda x, w, i: experts.apply(x, w, i, weights, act),
                          graph=graphs and kernel != "torch"))
        fn, why = scaled_grouped_mm_experts(shape, qweights, act)
        impls.append(Impl("torch._scaled_grouped_mm fp8 rowwise", (lambda x, w, i: fn(x, w, i)) if fn else None,
                          graph=graphs, note=why))
        return impls
    impls.append(Impl(f"composer {kernel}", lambda x, w, i: experts.apply(x, w, i, weights, act),
                      graph=graphs and kernel != "torch"))
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


def expert_bytes(weights: ExpertWeights) -> float:
    """Bytes of one expert's weights as the kernel reads them: quantized values, scales and zero points."""
    ts = (weights.w13, weights.w2, weights.w13_scale, weights.w2_scale, weights.w13_zero, weights.w2_zero,
          weights.w13_bias, weights.w2_bias)
    E = weights.w13.shape[0]
    return sum(t.numel() * t.element_size() for t in ts if t is not None and t.dim() and t.shape[0] == E) / E


def floor_ms(T: int, topk_ids: torch.Tensor, shape: Shape, ceilings: dict[str, float] | None,
             per_expert: float | None = None) -> dict[str, Any]:
    valid = topk_ids[topk_ids >= 0]
    touched = int(torch.unique(valid).numel()) if valid.numel() else 0
    pairs = int(valid.numel())
    elt = torch.empty((), dtype=shape.dtype).element_size()
    if per_expert is None:
        per_expert = 3 * shape.H * shape.I * elt
    nbytes = int(touched * per_expert) + 2 * T * shape.H * elt
    flops = 6 * pairs * shape.H * shape.I
    d: dict[str, Any] = {"experts_touched": touched, "bytes": nbytes, "flops": flops}
    if ceilings:
        rate_key = QUANT_RATE.get(shape.quant, "bf16_flops_per_s")
        if rate_key not in ceilings:
            rate_key = "bf16_flops_per_s"
        d["floor_rate"] = rate_key
        t_mem = nbytes / ceilings["copy_bytes_per_s"] * 1e3
        t_mma = flops / ceilings[rate_key] * 1e3
        d.update(floor_ms=max(t_mem, t_mma), floor_bound="memory" if t_mem >= t_mma else "compute")
    return d


def tile_source(shape: Shape, T: int, device: torch.device) -> str:
    """Which tile config composer's Triton kernels run at T: the file's name and entry, or "heuristic" (a GPU with
    no file of its own name borrows one tuned on a GPU of the same compute capability; this says whose)."""
    from ..kernels.triton.configs import get_config
    from ..kernels.triton.fused import quant_config

    if shape.quant != "none":
        cfg = quant_config(T, shape.E, shape.I, shape.H, shape.k, shape.quant, shape.dtype, device)
    else:
        cfg = get_config(T, shape.E, shape.I, shape.H, shape.k, shape.dtype, device)
    return Path(cfg["source"]).name


def tile_sources_line(result: dict[str, Any]) -> str | None:
    """One line naming the tile config files of the run, each with the T it served."""
    by_file: dict[str, list[str]] = {}
    for row in result["rows"]:
        if row.get("tiles"):
            f, _, entry = row["tiles"].partition(" [")
            by_file.setdefault(f, []).append(f"T = {row['T']}" + (f" (entry {entry.rstrip(']')})" if entry else ""))
    if not by_file:
        return None
    return "Tile configs: " + "; ".join(f"{f}: {', '.join(ts)}" for f, ts in by_file.items()) + "."


def run_bench(shape: Shape, tokens: list[int], kernel: str, device: torch.device, params: BenchParams,
              seed: int = 0, console: Any = None) -> dict[str, Any]:
    from ..progress import progress

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
        "timer": timer_text(params, cuda),
    }
    ceilings = measure_ceilings(device) if cuda else None
    meta["ceilings"] = ceilings
    weights = make_weights(shape, device, gen)
    qweights = quantize_weights(shape, weights) if shape.quant != "none" else None
    if qweights is not None:
        meta["quant"] = {"method": shape.quant, "params": _quant_method(shape).params.model_dump(mode="json")}
    per_expert = expert_bytes(qweights) if qweights is not None else None
    impls = _impls(shape, weights, kernel, device, params.peers, params.cuda_graph, qweights)
    flush = L2Flush(device) if cuda and params.l2_cold else None
    if flush is not None:
        meta["l2_flush_bytes"] = flush.nbytes
    meta["notes"] = {i.name: i.note for i in impls if i.note}
    rows: list[dict[str, Any]] = []
    ncases = len(tokens) * sum(1 for i in impls if i.fn is not None)
    # (composer.progress: COMPOSER_PROGRESS=0 turns the bar off, and each case is logged)
    with progress(f"bench {shape.name}", total=ncases, console=console) as bar:
        for T in tokens:
            x, tw, ids = make_routing(T, shape, device, gen)
            row: dict[str, Any] = {"T": T, **floor_ms(T, ids, shape, ceilings, per_expert), "impls": {}}
            if cuda and kernel == "triton":
                row["tiles"] = tile_source(shape, T, device)
            ref = reference_fp32(x, tw, ids, qweights if qweights is not None else weights,
                                 shape.activation) if params.accuracy else None
            for impl in impls:
                if impl.fn is None:
                    continue
                bar.update(f"T={T} {impl.name}")
                r: dict[str, Any] = {}
                try:
                    fn = lambda impl=impl: impl.fn(x, tw, ids)  # noqa: E731
                    out = fn()
                    if ref is not None:
                        r["rel_err"] = rel_err(out, ref)
                    del out
                    r["eager_ms"] = time_fn(fn, device, params.warmup, params.iters, params.min_iters, params.budget_s,
                                            before=flush)
                    if impl.graph:
                        try:
                            g, gout = capture_graph(fn)
                            g.replay()
                            if ref is not None:
                                sync(device)
                                r["graph_rel_err"] = rel_err(gout, ref)
                            del g, gout
                            timed = CallGraph(fn, device, params.graph_calls, flush)
                            r["graph_calls"] = timed.calls
                            r["graph_ms"] = timed.ms(params.iters, params.min_iters, params.budget_s, params.warmup)
                            del timed
                            clocks = gpu_clocks(device) if impl.name == f"composer {kernel}" else None
                            if clocks:
                                r["graph_clocks"] = clocks
                        except Exception as exc:  # noqa: BLE001 - a peer that cannot capture is a table note
                            r["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            sync(device)
                except Exception as exc:  # noqa: BLE001
                    r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                row["impls"][impl.name] = r
                bar.advance()
                if cuda:
                    torch.cuda.empty_cache()
            best = _best_ms(row["impls"].get(f"composer {kernel}", {}))
            if best is not None and row.get("floor_ms"):
                row["composer_pct_of_floor"] = 100.0 * row["floor_ms"] / best
            rows.append(row)
    return {"meta": meta, "rows": rows}


def timer_text(params: BenchParams, cuda: bool) -> str:
    """How the run's times were taken, for the table's header line."""
    if not cuda:
        return "perf_counter, median"
    text = "CUDA events, median"
    if params.cuda_graph:
        text += f"; graph: per call in a graph of up to {params.graph_calls} calls"
    if params.l2_cold:
        text += "; L2 flushed before every call (not timed)"
    return text


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
            mine, theirs = _best_ms(m), _best_ms(r)
            if mine and theirs:
                t = f"{t}, composer {theirs / mine:.2f}x"
            line += [t, f"{r['rel_err']:.1e}" if "rel_err" in r else "—"]
        body.append(line)
    return header, body


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    s = meta["shape"]
    q = meta.get("quant")
    qs = ""
    if q:
        qs = f", quant={q['method']} " + " ".join(f"{k}={v}" for k, v in q["params"].items() if v is not None)
    lines = [f"### {s['name']}: E={s['E']}, top_k={s['top_k']}, H={s['H']}, I={s['I']}, {s['dtype']}, {s['activation']}"
             f"{', bias' if s['has_bias'] else ''}{qs}", "",
             f"Card: **{meta['device']}**, {meta['date']}; {meta['timer']}; "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."]
    c = meta.get("ceilings")
    if c:
        lines.append(f"Ceilings measured in this run: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
                     f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
                     + (f", fp8 matmul (torch._scaled_mm) {c['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s"
                        if "fp8_flops_per_s" in c else "")
                     + (f", int8 matmul (torch._int_mm) {c['int8_ops_per_s'] / 1e12:.0f} TOP/s" if "int8_ops_per_s" in c
                        else "")
                     + ". Floor = max(weight bytes touched / copy bandwidth, FLOPs / matmul rate)"
                     + (f"; quantized: the bytes of the quantized weights with their scales, the "
                        f"{result['rows'][0].get('floor_rate', 'bf16_flops_per_s').split('_')[0]} rate."
                        if q and result["rows"] else "."))
    lines.append("")
    header, body = table_rows(result)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in body]
    for line in run_notes(result):
        lines += ["", line]
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
    lines.append("Times in µs; peers show eager / graph replay where a graph could be captured, and composer's "
                 "speed-up (best of eager and graph on both sides); err = relative Frobenius error vs the float32 "
                 "reference" + (" of the dequantized weights (w8a8: activations quantized as the kernels do)" if q
                                else "") + ".")
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
    for line in run_notes(result):
        console.print(f"[dim]{line}[/dim]")
    for k, v in result["meta"].get("notes", {}).items():
        console.print(f"[dim]{k}: {v}[/dim]")


def shape_from_config(cfg: Any) -> Shape:
    m = cfg.model
    return Shape(name=m.name, E=m.num_experts, k=m.top_k, H=m.hidden_size, I=m.intermediate_size,
                 dtype=m.torch_dtype, activation=m.activation, has_bias=m.has_bias, quant=cfg.quant.name,
                 quant_params=cfg.quant.params if cfg.quant.name != "none" else None)


def tolerance(shape: Shape) -> float:
    """bf16 accuracy bar; w8a8 methods add the measured activation-quantization spread (composer.quant)."""
    dt = str(shape.dtype).replace("torch.", "")
    tol = TOLERANCE[dt]
    if shape.quant != "none":
        from ..registry import QUANT_METHODS

        tol = max(tol, QUANT_METHODS.get(shape.quant).OUTPUT_TOL.get(dt, 0.0))
    return tol


@register_task("bench")
class Bench(Task):
    Params = BenchParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        own = getattr(LAYERS.get(cfg.layer.name), "layer_task", lambda task: None)("bench")
        if own is not None:  # a layer that brings its own model benches it (the Transformers backend)
            return own(cfg, ctx, cfg.task.params)
        if cfg.parallel.ep_size > 1:  # dispatch / compute / combine across ranks
            from ..distributed.bench import bench_task as ep_bench

            return ep_bench(cfg, ctx)
        if cfg.parallel.tp_size > 1:  # compute / all-reduce across ranks
            from ..distributed.tp_bench import bench_task as tp_bench

            return tp_bench(cfg, ctx)
        p: BenchParams = cfg.task.params
        device = torch.device(cfg.device)
        shape = shape_from_config(cfg)
        torch.manual_seed(cfg.seed)
        result = run_bench(shape, list(p.tokens), cfg.kernel.resolved, device, p, seed=cfg.seed, console=ctx.console)
        print_table(result, ctx.console)
        run_dir = Path(ctx.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            (run_dir / p.json_file).write_text(json.dumps(result, indent=2, default=str))
            (run_dir / p.markdown_file).write_text(to_markdown(result))
        except OSError as exc:  # (the measurements still go into results.json)
            raise TaskFailed(f"could not write the tables ({exc}); the measurements are in results.json", result) \
                from None
        ctx.console.print(f"wrote {run_dir / p.json_file} and {run_dir / p.markdown_file}")
        tol = tolerance(shape)
        main = f"composer {cfg.kernel.resolved}"
        bad = [f"T={r['T']}: {key} {r['impls'][main][key]:.2e} > {tol:.3g}" for r in result["rows"]
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
    ap.add_argument("--quant", default="none", help="a quant method (composer.quant)")
    ap.add_argument("--quant-params", default="{}", help="its params as JSON, e.g. '{\"granularity\": \"block\"}'")
    ap.add_argument("--graph-calls", type=int, default=None, help="bench.graph_calls")
    ap.add_argument("--warm-l2", action="store_true", help="bench.l2_cold=false")
    args = ap.parse_args(argv)
    conf = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{args.model}.yaml"
    m = yaml.safe_load(conf.read_text())
    dtype = getattr(torch, args.dtype or m.get("dtype", "bfloat16"))
    shape = Shape(name=m["name"], E=m["num_experts"], k=m["top_k"], H=m["hidden_size"], I=m["intermediate_size"],
                  dtype=dtype, activation=m.get("activation", "silu"), has_bias=bool(m.get("has_bias", False)),
                  quant=args.quant, quant_params=json.loads(args.quant_params) if args.quant != "none" else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernel = args.kernel or ("triton" if device.type == "cuda" else "torch")
    kw: dict[str, Any] = {"peers": not args.no_peers}
    if args.tokens:
        kw["tokens"] = [int(t) for t in args.tokens.split(",")]
    if args.iters:
        kw["iters"] = args.iters
    if args.graph_calls:
        kw["graph_calls"] = args.graph_calls
    if args.warm_l2:
        kw["l2_cold"] = False
    p = BenchParams(**kw)
    from .. import registry

    registry.load_plugins()
    console = Console(width=250)
    result = run_bench(shape, list(p.tokens), kernel, device, p, console=console)
    print_table(result, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = shape.name if shape.quant == "none" else f"{shape.name}_{shape.quant}"
    (out / f"bench_{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"bench_{tag}.md").write_text(to_markdown(result))

