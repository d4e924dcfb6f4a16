"""The config schema: the only place that knows it.

``validate_config(raw)`` checks a whole config once, before anything is built, and raises one
``ConfigError`` listing every problem with its dotted key, the value given, what is allowed, and the
closest valid name for a typo. Implementations are chosen by registry name, never by import path.
Sections that name an implementation (layer, quant, all2all, kernel, task) carry that
implementation's own parameters, validated by the ``Params`` model the implementation registers.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from . import registry
from .errors import ConfigError, Problem, did_you_mean
from .params import Params

SCHEMA_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Section(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # (inf / nan: never a setting)


class NoParams(Section):
    """For implementations that take no parameters beyond their name."""


_F32 = torch.finfo(torch.float32)


def _float32_positive(v: float) -> float:
    """A factor the model applies in float32: one that rounds to 0 there (NaN for a zero-token row) or to inf (every
    output NaN) would run, exit 0 and compute garbage. (Subnormal float32 values are kept: they stay positive.)"""
    became = float(torch.tensor(v, dtype=torch.float32)) if v > 0 else v
    if not 0 < became <= _F32.max:
        raise ValueError(f"must be positive and representable in float32 (at most {_F32.max!r})"
                         + (f": it is used in float32, where {v:g} becomes {became:g}" if v > 0 else ""))
    return v


Float32Positive = Annotated[float, AfterValidator(_float32_positive)]
SEED_RANGE = (-2**63, 2**64)  # what torch's manual_seed takes; [lo, hi)


class RouterConfig(Section):
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = Field(None, ge=1)
    topk_group: int | None = Field(None, ge=1)
    score_correction_bias: bool = False
    routed_scaling_factor: Float32Positive = 1.0


class ModelConfig(Section):
    name: str = "custom"
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_layers: int = Field(1, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    activation: Literal["silu", "gelu", "swigluoai"] = "silu"
    router: RouterConfig = RouterConfig()
    num_shared_experts: int = Field(0, ge=0)
    shared_expert_intermediate_size: int | None = Field(None, ge=1)
    shared_expert_gate: bool = False
    has_bias: bool = False
    rms_norm_eps: Float32Positive = 1e-6
    # model=hf (composer.integrations.hf_config): a Hugging Face model from a local directory or a config
    # class; the sizes above are then derived from its config.
    path: str | None = None
    arch: str | None = None
    hf_overrides: dict[str, Any] = {}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class ReportSection(Section):
    """``report.dir=...``: the command-line alias of ``task.dir`` for task=report (conf/task/report.yaml)."""

    dir: str | None = None


class ParallelConfig(Section):
    ep_size: int = Field(1, ge=1)
    placement: Literal["linear", "round_robin"] = "linear"
    timeout_s: float = Field(120.0, gt=0, description="seconds a collective may wait for the other ranks before the job fails")
    tp_size: int = Field(1, ge=1, description="ranks each expert's intermediate dim is sharded over (tensor parallelism)")
    sequence_parallel: bool = Field(False, description="tensor parallelism with each rank holding its own tokens (all-gather + reduce-scatter)")


class Named(BaseModel):
    """A section that chooses an implementation by registry name, plus that implementation's params."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    params: Any = None  # the implementation's validated Params model

    def __getattr__(self, item: str) -> Any:  # cfg.quant.granularity reads the params
        params = self.__dict__.get("params")
        if params is not None and item in type(params).model_fields:
            return getattr(params, item)
        raise AttributeError(item)

    def as_dict(self) -> dict[str, Any]:
        d = {"name": self.name}
        if self.params is not None:
            d.update(self.params.model_dump())
        return d


class KernelChoice(Named):
    resolved: str = ""  # 'auto' resolves to a concrete backend for the device
    auto_selected: bool = False


class ComposerConfig(BaseModel):
    """A validated config. Build it with ``validate_config``; sections are frozen."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    schema_version: int = SCHEMA_VERSION
    model: ModelConfig
    layer: Named
    quant: Named
    all2all: Named
    kernel: KernelChoice
    task: Named
    parallel: ParallelConfig = ParallelConfig()
    custom_ops: list[str] = ["all"]
    plugins: list[str] = []
    seed: int = 0
    device: str = "cpu"  # resolved: 'cpu' or 'cuda'
    compile: bool = False
    cuda_graph: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model.model_dump(),
            "layer": self.layer.as_dict(),
            "quant": self.quant.as_dict(),
            "all2all": self.all2all.as_dict(),
            "kernel": self.kernel.as_dict(),
            "task": self.task.as_dict(),
            "parallel": self.parallel.model_dump(),
            "custom_ops": list(self.custom_ops),
            "plugins": list(self.plugins),
            "seed": self.seed,
            "device": self.device,
            "compile": self.compile,
            "cuda_graph": self.cuda_graph,
        }

    def resolved(self) -> dict[str, Any]:
        """What 'auto' became on this machine (recorded in results.json beside the config)."""
        return {"device": self.device, "kernel": self.kernel.resolved, "kernel_auto_selected": self.kernel.auto_selected}

    def config_hash(self) -> str:
        """Stable across runs and ranks: sha256 of the canonical JSON of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Sections that pick an implementation, and the registry each name lives in.
NAMED_SECTIONS: dict[str, registry.Registry] = {
    "layer": registry.LAYERS,
    "quant": registry.QUANT_METHODS,
    "all2all": registry.ALL2ALL,
    "kernel": registry.KERNELS,
    "task": registry.TASKS,
}
TOP_LEVEL = (
    "schema_version", "model", "layer", "quant", "all2all", "kernel", "task", "parallel",
    "custom_ops", "plugins", "seed", "device", "compile", "cuda_graph", "report",
)


def _pydantic_problems(prefix: str, err: ValidationError, raw: Any) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"]
        value = e.get("input")
        if e["type"] == "value_error":  # a validator's own message, without pydantic's "Value error, " prefix
            msg = str(e.get("ctx", {}).get("error", msg))
        if e["type"] == "extra_forbidden":
            parent = raw
            for p in e["loc"][:-1]:
                parent = parent.get(p, {}) if isinstance(parent, dict) else {}
            cls_fields = _fields_at(err.title, e["loc"][:-1])
            msg = "unknown key" + (f"; allowed: {', '.join(cls_fields)}." if cls_fields else ".")
            msg += did_you_mean(e["loc"][-1], cls_fields)
        elif e["type"] == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            msg = f"{msg}.{did_you_mean(value, [c.strip().strip(chr(39)) for c in expected.replace(' or ', ',').split(',')])}"
        elif e["type"] == "missing":
            value = "(missing)"
            msg = "required key is missing"
        out.append(Problem(loc, value, msg))
    return out


_MODELS_BY_TITLE: dict[str, type[BaseModel]] = {}


def _fields_at(title: str, loc: tuple) -> list[str]:
    cls = _MODELS_BY_TITLE.get(title)
    for p in loc:
        if cls is None:
            return []
        f = cls.model_fields.get(str(p))
        ann = getattr(f, "annotation", None) if f else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(cls.model_fields) if cls is not None else []


def _validate_section(prefix: str, cls: type[BaseModel], raw: Any, problems: list[Problem]) -> Any:
    _MODELS_BY_TITLE[cls.__name__] = cls
    if not isinstance(raw, dict):
        problems.append(Problem(prefix, raw, f"must be a mapping of {cls.__name__} keys"))
        return None
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        problems.extend(_pydantic_problems(prefix, err, raw))
        return None


def _validate_named(section: str, raw: Any, problems: list[Problem]) -> Named | None:
    reg = NAMED_SECTIONS[section]
    if isinstance(raw, str):  # `quant: none` in a hand-written file
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        problems.append(Problem(section, raw, f"must be a mapping with a 'name' (one of: {', '.join(_choices(section))})"))
        return None
    name = raw["name"]
    choices = _choices(section)
    if name not in choices:
        internal = reg.internal(name)
        why = (f"not a {reg.kind} to choose: {internal}. Choices: {', '.join(choices)}" if internal else
               f"unknown {reg.kind}; choose one of: {', '.join(choices)}.{did_you_mean(name, choices)}")
        problems.append(Problem(f"{section}.name" if section != "task" else "task", name, why))
        return None
    params_cls = _params_cls(section, name)
    rest = {k: v for k, v in raw.items() if k != "name"}
    fields = list(params_cls.model_fields) if params_cls is not None else []
    unknown = [k for k in rest if k not in fields]
    for k in unknown:  # a key of another implementation (quant.group_size under int8) says whose it is
        owners = [o for o in _owners(k, (section,)) if o != f"{section}={name}"]
        allowed = f"allowed: {', '.join(fields)}" if fields else f"{section} {name!r} takes no keys"
        hint = (f"; {k} is a key of {', '.join(owners)}." if owners
                else "." + did_you_mean(k, fields))
        problems.append(Problem(f"{section}.{k}", rest[k], f"unknown key; {allowed}{hint}"))
    rest = {k: v for k, v in rest.items() if k in fields}
    params = _validate_section(section, params_cls, rest, problems) if params_cls is not None else None
    if unknown or (params_cls is not None and params is None):
        return None
    cls = KernelChoice if section == "kernel" else Named
    return cls(name=name, params=params)


def _owners(key: str, sections: Any) -> list[str]:
    """``section=name`` of every implementation in ``sections`` whose params take ``key``."""
    return [f"{section}={n}" for section in sections for n in NAMED_SECTIONS[section].names()
            if key in _params_cls(section, n).model_fields]


def _choices(section: str) -> list[str]:
    names = NAMED_SECTIONS[section].names()
    return ["auto", *names] if section == "kernel" else names


def _params_cls(section: str, name: str) -> type[BaseModel]:
    if section == "kernel" and name == "auto":
        return NoParams
    obj = NAMED_SECTIONS[section].get(name)
    return getattr(obj, "Params", NoParams)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return registry.default_platform()
    return requested


def resolve_kernel(name: str, device: str) -> tuple[str, bool]:
    """'auto' is triton on CUDA (when registered), torch elsewhere."""
    if name != "auto":
        return name, False
    if device == "cuda" and "triton" in registry.KERNELS:
        return "triton", True
    return "torch", True


def validate_config(raw: dict[str, Any], source: str | None = None) -> ComposerConfig:
    """Validate a plain dict (a composed Hydra config without its ``hydra`` key). Raises ConfigError."""
    problems: list[Problem] = []
    raw = dict(raw)
    raw.pop("hydra", None)

    plugins = raw.get("plugins", []) or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        problems.append(Problem("plugins", plugins, "must be a list of importable plugin module names"))
        plugins = []
    try:
        registry.load_plugins(plugins)
    except registry.RegistryError as exc:
        problems.append(Problem("plugins", plugins, str(exc)))

    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(Problem(key, raw[key], f"unknown top-level key; allowed: {', '.join(TOP_LEVEL)}."
                                    f"{_leaf_hint(key, raw, exact=True) or did_you_mean(key, TOP_LEVEL) or _leaf_hint(key, raw)}"))

    version = raw.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        problems.append(Problem("schema_version", version,
                                f"this composer reads schema version {SCHEMA_VERSION}; update the file or composer"))

    raw_model = raw.get("model", {})
    router = None
    hf_unreadable = False
    if isinstance(raw_model, dict) and raw_model.get("name") != "hf":  # (else silently ignored: the preset ran)
        for key in ("path", "arch", "hf_overrides"):
            if raw_model.get(key) not in (None, {}):
                problems.append(Problem(f"model.{key}", raw_model[key], f"describes a Hugging Face model and is read "
                                        f"only with model=hf (this is model={raw_model.get('name', 'custom')}); add "
                                        "model=hf or drop it"))
    if isinstance(raw_model, dict) and raw_model.get("name") == "hf":  # sizes come from the Hugging Face config
        raw_model, hf_unreadable = _derive_hf_model(raw_model, problems)
    if isinstance(raw_model, dict):  # the router validates on its own so one bad key hides no other problem
        raw_model = dict(raw_model)
        router = _validate_section("model.router", RouterConfig, raw_model.pop("router", {}) or {}, problems)
    model = _validate_section("model", ModelConfig, raw_model, problems) if not hf_unreadable else None
    parallel = _validate_section("parallel", ParallelConfig, raw.get("parallel", {}) or {}, problems)
    if "report" in raw:  # read through task.dir's interpolation; only task=report has it
        _validate_section("report", ReportSection, raw["report"] or {}, problems)
        task_raw = raw.get("task")
        task_name = task_raw.get("name") if isinstance(task_raw, dict) else task_raw
        if task_name != "report":
            problems.append(Problem("report", raw["report"], f"only task=report reads report.* (this run is task={task_name}); "
                                    "add task=report or drop the report keys"))
    named = {s: _validate_named(s, raw.get(s, {"name": "auto"} if s == "kernel" else None), problems) for s in NAMED_SECTIONS}

    scalars = {}
    for key, typ, default in (("seed", int, 0), ("compile", bool, False), ("cuda_graph", bool, False)):
        v = raw.get(key, default)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            problems.append(Problem(key, v, f"must be {typ.__name__}"))
        elif key == "seed" and not SEED_RANGE[0] <= v < SEED_RANGE[1]:  # (torch: "Overflow when unpacking long long")
            problems.append(Problem(key, v, "must be -2**63 <= seed < 2**64 (what torch's random generators "
                                    "take)"))
        scalars[key] = v
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        problems.append(Problem("device", device, "choose one of: auto, cpu, cuda." + did_you_mean(device, ["auto", "cpu", "cuda"])))
        device = "cpu"
    elif device == "cuda" and not torch.cuda.is_available() and not _meta_preview(raw):
        problems.append(Problem("device", device, "no CUDA device is visible here; use device=auto or device=cpu "
                                "(task=show previews a CUDA config of composer's own stack on any machine)"))
    device = resolve_device(device) if device != "cuda" else "cuda"

    custom_ops = raw.get("custom_ops", ["all"])
    if not isinstance(custom_ops, list):
        problems.append(Problem("custom_ops", custom_ops, "must be a list such as [all], [none, +silu_and_mul]"))
        custom_ops = ["all"]
    else:
        problems.extend(Problem("custom_ops", custom_ops, m) for m in registry.check_custom_ops(custom_ops))

    if model is not None:
        problems.extend(_check_model(model, router))
        if router is not None:
            model = model.model_copy(update={"router": router})
    if model is not None and parallel is not None and named["all2all"] is not None:
        problems.extend(_check_parallel(model, parallel, named["all2all"]))
    if model is not None and parallel is not None and (parallel.tp_size > 1 or parallel.sequence_parallel):
        from .distributed.tp import check_tp_config  # tensor parallelism's rules (composer/distributed/tp.py)

        problems.extend(Problem(k, v, msg) for k, v, msg in check_tp_config(model, parallel, named["quant"], named["layer"]))

    kernel = named["kernel"]
    if kernel is not None:
        resolved, auto = resolve_kernel(kernel.name, device)
        kernel = KernelChoice(name=kernel.name, params=kernel.params, resolved=resolved, auto_selected=auto)
        if model is not None and named["quant"] is not None:
            backend = registry.KERNELS.get(resolved)
            takes = inspect.signature(backend.check).parameters
            extra = {"quant_params": named["quant"].params} if "quant_params" in takes else {}
            if "name" in takes:  # the messages name the kernel as the config does (a subclass inherits its parent's)
                extra["name"] = resolved
            for msg in backend.check(quant=named["quant"].name, dtype=model.dtype, device=device, **extra):
                problems.append(Problem("kernel", kernel.name if not auto else f"auto -> {resolved}", msg))
    if kernel is not None and kernel.resolved == "torch":
        for key in ("compile", "cuda_graph"):
            if scalars[key] is True:
                where = ("use kernel=triton or kernel=grouped_mm" if device == "cuda" else
                         "use kernel=triton, which runs on a CPU under TRITON_INTERPRET=1 (slowly; fp32 or fp16)"
                         if key == "compile" else "CUDA graphs need a GPU")
                problems.append(Problem(key, True, "the torch reference kernel syncs with the host and cannot be "
                                        f"compiled with fullgraph or captured; {where}"))
    if scalars["cuda_graph"] is True and device != "cuda":
        problems.append(Problem("cuda_graph", True, f"CUDA graphs need device=cuda (this run is on {device})"))
    if named["quant"] is not None and model is not None:
        method = registry.QUANT_METHODS.get(named["quant"].name)
        check = getattr(method, "check_config", None)
        if check is not None:
            tp_keys = {p.key for p in problems} if parallel is not None and parallel.tp_size > 1 else set()
            problems.extend(Problem(f"quant.{k}" if k else "quant", v, m) for k, v, m in check(named["quant"].params, model, device)
                            if (f"quant.{k}" if k else "quant") not in tp_keys)  # (under TP its rule, which knows
            # the sharded sizes, says what to pick)
    if named["layer"] is not None:
        refused = layer_class_problem(named["layer"].name)
        if refused:
            problems.append(Problem("layer.name", named["layer"].name, refused))
    if named["layer"] is not None and model is not None:
        layer_cls = registry.LAYERS.get(named["layer"].name)
        check = getattr(layer_cls, "check_config", None)
        if check is not None:
            problems.extend(Problem(f"layer.{k}" if k else "layer", v, m) for k, v, m in check(named["layer"].params, model))

    if problems:
        raise ConfigError(problems, source)
    return ComposerConfig(
        schema_version=version, model=model, parallel=parallel, kernel=kernel,
        layer=named["layer"], quant=named["quant"], all2all=named["all2all"], task=named["task"],
        custom_ops=custom_ops, plugins=plugins, device=device, **scalars,
    )


def layer_class_problem(name: str) -> str | None:
    """Why the layer registered as ``name`` cannot be built, or None. composer builds its own graph of FusedMoE layers
    (the class chosen fills each experts slot), unless the layer brings its own model (a ``build_model`` classmethod,
    as layer=transformers_moe does): any other class would be silently replaced by the in-tree FusedMoE."""
    from .layers.fused_moe import FusedMoE

    cls = registry.LAYERS.get(name)
    if getattr(cls, "build_model", None) is not None or (isinstance(cls, type) and issubclass(cls, FusedMoE)):
        return None
    return (f"layer '{name}' ({registry._qualname(cls)}) must subclass composer's FusedMoE (composer.layers.fused_moe), or bring its own "
            "model with a build_model classmethod as layer=transformers_moe does: composer builds its graph from FusedMoE "
            f"layers and cannot build this one. Register it as @PluggableLayer.register(\"{name}\") on "
            f"`class {getattr(cls, '__name__', 'MyLayer')}(FusedMoE)` (it takes FusedMoE's constructor arguments), "
            "or choose layer=fused_moe")


def _leaf_hint(key: str, raw: dict[str, Any], exact: bool = False) -> str:
    """' Did you mean 'task.tolerance'?' for a top-level key that is a key of a section (top_k, tolerance), with the
    sections' chosen implementations (task=check's keys, quant=int4's); '' when none is close."""
    leaves = [f"model.{f}" for f in ModelConfig.model_fields] + [f"model.router.{f}" for f in RouterConfig.model_fields]
    leaves += [f"parallel.{f}" for f in ParallelConfig.model_fields]
    for section in NAMED_SECTIONS:
        name = raw.get(section)
        name = name.get("name") if isinstance(name, dict) else name
        if isinstance(name, str) and name in _choices(section):
            leaves += [f"{section}.{f}" for f in _params_cls(section, name).model_fields]
    same = [leaf for leaf in leaves if leaf.rsplit(".", 1)[1] == key]
    if same:
        return f" Did you mean '{same[0]}'?"
    owners = _owners(key, NAMED_SECTIONS)
    if owners:  # (a key of an implementation not chosen: tolerance under the default task=run)
        return f" {key} is a key of {', '.join(owners)}."
    close = "" if exact else did_you_mean(key, [leaf.rsplit(".", 1)[1] for leaf in leaves])
    if close:
        near = close.split("'")[1]
        return f" Did you mean '{next(leaf for leaf in leaves if leaf.rsplit('.', 1)[1] == near)}'?"
    return ""


def _choice(raw: dict[str, Any], section: str) -> Any:
    """The implementation a raw config's section names (``task: report`` or ``task: {name: report}``)."""
    value = raw.get(section)
    return value.get("name") if isinstance(value, dict) else value


def _meta_preview(raw: dict[str, Any]) -> bool:
    """task=show of composer's own stack builds on the meta device, so it previews a CUDA config on any machine
    (layer=transformers_moe loads a real Hugging Face model, on the config's device)."""
    return _choice(raw, "task") == "show" and _choice(raw, "layer") != "transformers_moe"


def _derive_hf_model(raw_model: dict[str, Any], problems: list[Problem]) -> tuple[dict[str, Any], bool]:
    """model=hf: fill the model fields from the Hugging Face config; (mapping, True) when it cannot be read."""
    try:
        from .integrations.hf_config import derive_model
    except ModuleNotFoundError as exc:
        problems.append(Problem("model.name", "hf", f"needs transformers ({exc}); pip install 'moe-composer[hf]'"))
        return raw_model, True
    derived, found = derive_model(raw_model)
    problems.extend(Problem(k, v, m) for k, v, m in found)
    return (derived, False) if derived is not None else (raw_model, True)


def _check_model(m: ModelConfig, r: RouterConfig | None) -> list[Problem]:
    p: list[Problem] = []
    if m.top_k > m.num_experts:
        p.append(Problem("model.top_k", m.top_k, f"must be <= model.num_experts = {m.num_experts}"))
    if r is None:
        r = RouterConfig()
    if (r.num_expert_group is None) != (r.topk_group is None):
        p.append(Problem("model.router.topk_group" if r.topk_group is None else "model.router.num_expert_group",
                         None, "grouped top-k needs both model.router.num_expert_group and model.router.topk_group"))
    elif r.num_expert_group is not None:
        if m.num_experts % r.num_expert_group:
            p.append(Problem("model.router.num_expert_group", r.num_expert_group,
                             f"must divide model.num_experts = {m.num_experts}"))
        elif r.topk_group > r.num_expert_group:
            p.append(Problem("model.router.topk_group", r.topk_group,
                             f"must be <= model.router.num_expert_group = {r.num_expert_group}"))
        else:
            reachable = r.topk_group * (m.num_experts // r.num_expert_group)
            if m.top_k > reachable:
                p.append(Problem("model.top_k", m.top_k,
                                 f"only {reachable} experts are reachable through {r.topk_group} of "
                                 f"{r.num_expert_group} groups; raise model.router.topk_group or lower model.top_k"))
    if m.shared_expert_gate and m.num_shared_experts == 0:
        p.append(Problem("model.shared_expert_gate", True, "needs model.num_shared_experts >= 1"))
    if m.shared_expert_intermediate_size is not None and m.num_shared_experts == 0:
        p.append(Problem("model.shared_expert_intermediate_size", m.shared_expert_intermediate_size,
                         "needs model.num_shared_experts >= 1"))
    return p


def _check_parallel(m: ModelConfig, par: ParallelConfig, all2all: Named) -> list[Problem]:
    p: list[Problem] = []
    if m.num_experts % par.ep_size:
        p.append(Problem("parallel.ep_size", par.ep_size, f"must divide model.num_experts = {m.num_experts}"))
    if par.ep_size > 1 and all2all.name == "none":
        p.append(Problem("all2all.name", "none",
                         f"parallel.ep_size = {par.ep_size} needs an all2all backend; choose one of: "
                         f"{', '.join(n for n in registry.ALL2ALL.names() if n != 'none')}"))
    return p


def to_plain(cfg: Any) -> dict[str, Any]:
    """A Hydra DictConfig (or a dict) as a plain dict, interpolations resolved; one that cannot be resolved
    (``model.top_k=${nope}``) is a ConfigError naming its key, not omegaconf's traceback."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "(config)"
        said = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
        value = _at(OmegaConf.to_container(cfg, resolve=False), key)
        raise ConfigError([Problem(key, value, f"interpolation cannot be resolved: {said}; refer to a key the config "
                                   "has (${model.num_experts}), or write \\${ for a literal ${")]) from None


def _at(tree: Any, key: str) -> Any:
    """The value at omegaconf's dotted ``key`` (``a.b[1]``) of a plain tree, unresolved (None if absent)."""
    import re

    for part in re.findall(r"[^.\[\]]+", key):
        try:
            tree = tree[int(part)] if isinstance(tree, list) else tree[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return tree
