"""`model=hf`: which Hugging Face MoE architectures composer knows, and how their configs map onto composer's.

A model comes from a local ``save_pretrained`` directory (``model.path``) or is built, with random weights,
from the transformers config class of ``model.arch`` with tiny default dimensions. ``model.hf_overrides``
are keyword arguments for the Hugging Face config (``+model.hf_overrides.num_hidden_layers=4``) in both cases.
Nothing is fetched from a hub: loading is ``local_files_only``.

The composer model fields (num_experts, top_k, sizes, router, shared experts, activation) are derived
from the Hugging Face config when the config is validated, so `task=show`, the tables and the checks name
the real dimensions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import transformers  # noqa: F401  (model=hf needs it; config validation reports its absence)

from ..errors import did_you_mean

# Tiny dimensions shared by every architecture (random-weight models for tests and quick runs).
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


@dataclass(frozen=True)
class Arch:
    """One supported architecture: its transformers ``model_type``, tiny defaults, and the config mapping."""

    model_type: str
    experts_key: str                 # HF config attribute holding the number of routed experts
    intermediate_key: str            # ... the per-expert intermediate size
    derive: Callable[[Any], dict[str, Any]]  # extra composer fields (router, shared experts, activation, bias)
    tiny: dict[str, Any] = field(default_factory=dict)
    block_router: bool = True        # composer's GateLinear + Router reproduce the HF router exactly
    round_router_weights: bool = False  # the HF router rounds its top-k weights to the logits' dtype
    gate_float32: bool = False       # the HF router computes its logits in float32, whatever its weight's dtype


def _softmax(c: Any, renormalize: bool) -> dict[str, Any]:
    return {"router": {"scoring": "softmax", "renormalize": bool(renormalize)}}


def _mixtral(c: Any) -> dict[str, Any]:
    return _softmax(c, True)


def _qwen_like(c: Any) -> dict[str, Any]:
    return _softmax(c, getattr(c, "norm_topk_prob", False))


def _qwen2(c: Any) -> dict[str, Any]:
    d = _qwen_like(c)
    d.update(num_shared_experts=1, shared_expert_intermediate_size=c.shared_expert_intermediate_size,
             shared_expert_gate=True)
    return d


def _deepseek_v3(c: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"router": {
        "scoring": "sigmoid", "renormalize": bool(c.norm_topk_prob), "num_expert_group": c.n_group,
        "topk_group": c.topk_group, "score_correction_bias": True,
        "routed_scaling_factor": float(c.routed_scaling_factor)}}
    if c.n_shared_experts:
        d.update(num_shared_experts=c.n_shared_experts, shared_expert_intermediate_size=c.moe_intermediate_size)
    return d


def _gpt_oss(c: Any) -> dict[str, Any]:
    # softmax over the top-k logits == softmax over all, top-k, renormalize
    return {"router": {"scoring": "softmax", "renormalize": True}, "activation": "swigluoai", "has_bias": True}


ARCHS: dict[str, Arch] = {
    "mixtral": Arch("mixtral", "num_local_experts", "intermediate_size", _mixtral,
                    dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16)),
    "qwen2_moe": Arch("qwen2_moe", "num_experts", "moe_intermediate_size", _qwen2,
                      dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                           shared_expert_intermediate_size=64, norm_topk_prob=False), round_router_weights=True),
    "qwen3_moe": Arch("qwen3_moe", "num_experts", "moe_intermediate_size", _qwen_like,
                      dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=True, head_dim=16), round_router_weights=True),
    "olmoe": Arch("olmoe", "num_experts", "intermediate_size", _qwen_like,
                  dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
                  round_router_weights=True),
    "deepseek_v3": Arch("deepseek_v3", "n_routed_experts", "moe_intermediate_size", _deepseek_v3,
                        dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                             n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                             routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                             num_key_value_heads=4, rope_scaling=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                        gate_float32=True),
    "gpt_oss": Arch("gpt_oss", "num_local_experts", "intermediate_size", _gpt_oss,
                    dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                         sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                    block_router=False),  # its router adds a bias to the logits
}

# The composer model fields that come from the Hugging Face config.
DERIVED = ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_layers", "activation", "router",
           "num_shared_experts", "shared_expert_intermediate_size", "shared_expert_gate", "has_bias", "rms_norm_eps")
_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


class HFConfigError(Exception):
    """(key, value, message) problems found while reading a Hugging Face config."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k} = {v!r}: {m}" for k, v, m in problems))


def installed_archs() -> list[str]:
    """The supported architectures this transformers installation has."""
    from transformers import CONFIG_MAPPING

    return [a for a in ARCHS if a in CONFIG_MAPPING]


def supported_text() -> str:
    return ", ".join(ARCHS)


def hf_config(path: str | None, arch: str | None, overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config for ``model.path`` or ``model.arch`` (tiny defaults), with ``overrides``.
    Raises HFConfigError naming each problem."""
    overrides = dict(overrides or {})
    if (path is None) == (arch is None):
        raise HFConfigError([("model.path" if path is not None else "model.arch", path or arch,
                              "give exactly one of model.path (a local save_pretrained directory) or model.arch "
                              f"(a tiny random model; one of: {supported_text()})")])
    from transformers import AutoConfig, CONFIG_MAPPING

    if arch is not None:
        if arch not in ARCHS:
            raise HFConfigError([("model.arch", arch, f"unknown architecture; choose one of: {supported_text()}."
                                  + did_you_mean(arch, ARCHS))])
        if arch not in CONFIG_MAPPING:
            import transformers

            raise HFConfigError([("model.arch", arch, f"the installed transformers {transformers.__version__} has no "
                                  f"'{arch}'; this installation has: {', '.join(installed_archs())}")])
        _check_override_keys(CONFIG_MAPPING[arch](), overrides, arch)
        kwargs = {**_TINY_COMMON, **ARCHS[arch].tiny, **overrides}
        if "num_hidden_layers" in overrides and "layer_types" not in overrides and "layer_types" in kwargs:
            n = overrides["num_hidden_layers"]
            kwargs["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(n)]
        try:
            return CONFIG_MAPPING[arch](**kwargs)
        except Exception as exc:  # the config class validates its own fields
            raise HFConfigError([("model.hf_overrides", overrides, f"the {arch} config refused these values: {exc}")]) from None
    p = Path(path).expanduser()
    if p.is_file():
        raise HFConfigError([("model.path", path, f"is a file; give the directory that holds it (model.path={p.parent})")])
    if not p.is_dir():
        raise HFConfigError([("model.path", path, "no such directory; give a local save_pretrained directory "
                              "(nothing is downloaded)")])
    if not (p / "config.json").is_file():
        raise HFConfigError([("model.path", path, "has no config.json; give the directory save_pretrained wrote")])
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except ValueError as exc:
        raise HFConfigError([("model.path", path, f"config.json is not valid JSON: {exc}")]) from None
    if model_type not in ARCHS:
        raise HFConfigError([("model.path", path, f"model_type '{model_type}' is not a supported MoE architecture; "
                              f"supported: {supported_text()}")])
    try:
        loaded = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise HFConfigError([("model.path", path, f"transformers could not read the config: {exc}")]) from None
    _check_override_keys(loaded, overrides, model_type)
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True, **overrides)
    except Exception as exc:
        raise HFConfigError([("model.hf_overrides", overrides, f"the {model_type} config refused these values: "
                              f"{exc}")]) from None


def _check_override_keys(config: Any, overrides: dict[str, Any], arch: str) -> None:
    """A misspelt ``model.hf_overrides`` key would become a new attribute no model reads (transformers configs take
    any keyword): refuse keys the config class does not have, with a did-you-mean."""
    known = set(config.to_dict()) | set(getattr(type(config), "attribute_map", {}))
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise HFConfigError([(f"model.hf_overrides.{k}", overrides[k], f"the {arch} config has no such field."
                              + did_you_mean(k, sorted(known))) for k in unknown])


def derive_fields(c: Any) -> dict[str, Any]:
    """Composer ModelConfig fields for the transformers config ``c`` (of a supported architecture)."""
    arch = ARCHS[c.model_type]
    act = getattr(c, "hidden_act", "silu")
    d: dict[str, Any] = {
        "num_experts": getattr(c, arch.experts_key), "top_k": c.num_experts_per_tok, "hidden_size": c.hidden_size,
        "intermediate_size": getattr(c, arch.intermediate_key), "num_layers": c.num_hidden_layers,
        "activation": _ACTS.get(act, act), "rms_norm_eps": float(getattr(c, "rms_norm_eps", 1e-6)),
    }
    d.update(arch.derive(c))
    return d


def derive_model(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, list[tuple[str, Any, str]]]:
    """Fill the composer model fields of a ``model: {name: hf, ...}`` mapping from its Hugging Face config.

    Returns (the filled mapping, problems); the mapping is None when the Hugging Face config could not be read.
    A size the user set that disagrees with the Hugging Face config is a problem (change the HF config
    through model.hf_overrides instead).
    """
    overrides = raw.get("hf_overrides") or {}
    if not isinstance(overrides, dict):
        return None, [("model.hf_overrides", overrides, "must be a mapping of Hugging Face config keys to values")]
    try:
        c = hf_config(raw.get("path"), raw.get("arch"), overrides)
    except HFConfigError as exc:
        return None, exc.problems
    derived = derive_fields(c)
    arch = ARCHS[c.model_type]
    problems: list[tuple[str, Any, str]] = []

    def where(key: str) -> tuple[str, Any]:  # the override that set a Hugging Face setting, else the model's source
        if key in overrides:
            return f"model.hf_overrides.{key}", overrides[key]
        return ("model.path", raw["path"]) if raw.get("path") else ("model.arch", raw.get("arch"))

    if derived["activation"] not in ("silu", "gelu", "swigluoai"):
        problems.append((*where("hidden_act"), f"hidden_act '{derived['activation']}' has no composer activation (silu, gelu, "
                                 "swigluoai)"))
        del derived["activation"]  # (one problem: model.activation is not the user's to change under model=hf)
    if c.model_type == "gpt_oss":  # (the swap refused these only after building the whole model)
        from ..layers.activation import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT

        for key, want in (("swiglu_limit", SWIGLUOAI_LIMIT), ("swiglu_alpha", SWIGLUOAI_ALPHA)):
            have = getattr(c, key, want)
            if have is not None and float(have) != want:
                problems.append((*where(key), f"{key} {have}: composer's swigluoai uses the published constants "
                                         f"(alpha {SWIGLUOAI_ALPHA}, limit {SWIGLUOAI_LIMIT})"))
    problems += _group_problems(c, where)
    out = {k: v for k, v in raw.items() if k not in ("router",)}
    if isinstance(raw.get("path"), str):  # expanded once: the model, its checkpoint and its tokenizer load from it
        out["path"] = str(Path(raw["path"]).expanduser())
    for k, v in derived.items():
        given = raw.get(k)
        if k == "router":
            given_router = {rk: rv for rk, rv in (raw.get("router") or {}).items() if rv is not None}
            problems += _router_problems(given_router, v, c.model_type)
            out["router"] = {**given_router, **v}
            continue
        if given is not None and given != v:
            hf_key = {"num_experts": arch.experts_key, "intermediate_size": arch.intermediate_key,
                      "top_k": "num_experts_per_tok", "num_layers": "num_hidden_layers"}.get(k, k)
            problems.append((f"model.{k}", given, f"the Hugging Face config gives {v!r}; change the model with "
                             f"+model.hf_overrides.{hf_key}=... instead"))
        out[k] = v
    return out, problems


def _router_problems(given: dict[str, Any], derived: dict[str, Any], arch: str) -> list[tuple[str, Any, str]]:
    """A router key the user set must be what the Hugging Face config routes with. A key the config does not name
    (qwen3_moe has no routed_scaling_factor) is held to composer's default, which is what the model does: kept, it
    would be recorded but change nothing (layer=transformers_moe) or route otherwise than the model (fused_moe)."""
    from ..config import RouterConfig

    want = {**RouterConfig().model_dump(), **derived}
    problems = []
    for key, value in given.items():
        if key in want and want[key] != value:
            says = (f"the Hugging Face config says {want[key]!r}" if key in derived else
                    f"the {arch} router has no such setting (it routes as {key}={want[key]!r} does)")
            problems.append((f"model.router.{key}", value, f"{says}; routing follows the model (remove this key)"))
    return problems


def _group_problems(c: Any, where: Callable[[str], tuple[str, Any]]) -> list[tuple[str, Any, str]]:
    """DeepSeek-V3's router scores each expert group by its two best experts (``topk(2)``): a group of one expert
    makes transformers fail inside the model (``selected index k out of range``)."""
    if c.model_type != "deepseek_v3" or not c.n_group or c.n_routed_experts % c.n_group:
        return []  # (an n_group that does not divide the experts is reported under model.router.num_expert_group)
    per_group = c.n_routed_experts // c.n_group
    if per_group >= 2:
        return []
    return [(*where("n_group"), f"n_group {c.n_group} leaves {per_group} expert per group (n_routed_experts "
             f"{c.n_routed_experts}); the DeepSeek-V3 router scores each group by its two best experts, so a group "
             f"needs at least 2: use n_group <= {c.n_routed_experts // 2}")]
