"""task=generate: generate text (or token ids) with a Hugging Face model built by the factory.

With ``model=hf layer=transformers_moe`` the experts run through composer. A tokenizer found in
``model.path`` encodes ``task.prompt`` and decodes the result; without one, ``task.token_ids`` (or a seeded
random prompt of ``task.prompt_tokens`` ids) is the input and ids are printed.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from ..config import ConfigError
from ..errors import Problem
from . import Task, TaskContext, TaskParams, register_task


class GenerateParams(TaskParams):
    prompt: str | None = Field(None, description="text to encode with the tokenizer in model.path")
    token_ids: list[int] | None = Field(None, description="prompt token ids (when there is no tokenizer)")
    prompt_tokens: int = Field(8, ge=1, description="length of the seeded random prompt when neither is given")
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)


def _tokenizer(path: str | None) -> Any:
    """The tokenizer saved in ``path``, or None when the directory has none (nothing is downloaded)."""
    if path is None:
        return None
    from pathlib import Path

    p = Path(path).expanduser()
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


@register_task("generate")
class Generate(Task):
    Params = GenerateParams

    def run(self, cfg: Any, ctx: TaskContext) -> dict[str, Any]:
        from ..factory import build

        p: GenerateParams = cfg.task.params
        if cfg.model.name != "hf":
            raise ConfigError([Problem("task", "generate", "needs a language model: use model=hf (model.path=<dir> or "
                                       "model.arch=<arch>), usually with layer=transformers_moe")])
        if cfg.layer.name == "fused_moe":  # composer's own stack of MoE blocks: no embeddings, no attention, no lm_head
            raise ConfigError([Problem("layer", cfg.layer.name, "task=generate runs a whole Hugging Face model; "
                                       "layer=fused_moe builds composer's stack of MoE blocks only. Use "
                                       "layer=transformers_moe (its experts run through composer)")])
        from ..integrations.transformers_moe import refuse_modes

        refuse_modes(cfg, "generate")  # (compile / cuda_graph: generation here runs eagerly)
        tok = _tokenizer(cfg.model.path)
        if p.prompt is not None and tok is None:
            raise ConfigError([Problem("task.prompt", p.prompt, "there is no tokenizer in model.path "
                                       f"({cfg.model.path or 'model.arch builds a model without one'}); "
                                       "give task.token_ids=[...] instead")])
        if p.prompt is not None and p.token_ids is not None:
            raise ConfigError([Problem("task.token_ids", p.token_ids, "give task.prompt or task.token_ids, not both")])
        model = build(cfg)
        vocab = model.config.vocab_size
        if p.prompt is not None:
            ids = tok(p.prompt, return_tensors="pt").input_ids
            if ids.numel() == 0:
                raise ConfigError([Problem("task.prompt", p.prompt, "encodes to no tokens; give a non-empty prompt")])
            bad = sorted({t for t in ids[0].tolist() if not 0 <= t < vocab})
            if bad:  # (the embedding would fail with an IndexError)
                raise ConfigError([Problem("task.prompt", p.prompt, f"the tokenizer in model.path ({cfg.model.path}) "
                                           f"gives ids {bad[:8]}{' ...' if len(bad) > 8 else ''}, outside the model's "
                                           f"vocab_size {vocab}: it does not match the model; save the model's own "
                                           "tokenizer there, or give task.token_ids=[...]")])
        elif p.token_ids is not None:
            bad = [t for t in p.token_ids if not 0 <= t < vocab]
            if bad or not p.token_ids:
                raise ConfigError([Problem("task.token_ids", p.token_ids,
                                           f"must be a non-empty list of ids in [0, {vocab}); out of range: {bad}")])
            ids = torch.tensor([p.token_ids])
        else:
            from ..integrations.check import prompt_ids

            ids = prompt_ids(cfg, p.prompt_tokens, vocab)
        ids = ids.to(cfg.device)
        kw: dict[str, Any] = dict(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample,
                                  attention_mask=torch.ones_like(ids))
        if p.do_sample:
            kw["temperature"] = p.temperature
            torch.manual_seed(cfg.seed)
        if tok is None or tok.pad_token_id is None:
            kw["pad_token_id"] = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kw)
        seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
        ctx.console.print(f"prompt ids: {ids[0].tolist()}")
        eos = model.config.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        stopped = len(new) < p.max_new_tokens and bool(new) and new[-1] in eos  # (generate stops at end of sequence)
        why = f" (stopped at the end-of-sequence id {new[-1]}; task.max_new_tokens={p.max_new_tokens})" if stopped else ""
        ctx.console.print(f"generated {len(new)} tokens in {seconds:.2f} s{why}: "
                          + (repr(text) if text is not None else str(new)))
        return {"prompt_ids": ids[0].tolist(), "new_token_ids": new, "text": text, "seconds": seconds,
                "tokens_per_second": len(new) / seconds if seconds > 0 else None, "stopped_at_eos": stopped}
