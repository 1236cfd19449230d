"""The replay guard: learn new facts without forgetting what the base model knew.

Before training, the base model answers a fixed set of general prompts greedily; those
(prompt, own answer) pairs join the training rows (``replay.ratio`` of them per training row).
Fitting its own answers costs the model nothing where it already agrees with itself, and pulls
the adapter back wherever the new facts start to change unrelated answers (self-distillation).
Answers are cached per base model, prompt format and length, so later versions reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from agent_finetune.errors import ConfigError
from agent_finetune.training.config import FineTuningConfig, read_text_file
from agent_finetune.training.data import Example
from agent_finetune.training.prompts import render_chat, render_template

log = logging.getLogger("agent_finetune")
PROMPTS_ASSET = "replay_prompts.json"


def cache_dir() -> Path:
    """$AGENT_FINETUNE_CACHE/replay, else $XDG_CACHE_HOME/agent-finetune/replay."""
    root = os.environ.get("AGENT_FINETUNE_CACHE")
    if root:
        return Path(root).expanduser() / "replay"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "agent-finetune" / "replay"


def load_prompts(path: str | None) -> list[str]:
    """The packaged general prompts, or a JSON array of strings from ``path``."""
    if path is None:
        from importlib.resources import files

        text = (files("agent_finetune") / "assets" / PROMPTS_ASSET).read_text(encoding="utf-8")
        where = PROMPTS_ASSET
    else:
        text, where = read_text_file(path, "replay prompts file"), path
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"replay.prompts {where}: invalid JSON: {e.msg} (line {e.lineno})"
        ) from None
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise ConfigError(f"replay.prompts {where}: expected a non-empty JSON array of strings")
    return prompts


def prompt_text(config: FineTuningConfig, tokenizer: Any, template: str | None, q: str) -> str:
    """The prompt exactly as training renders it for a row asking ``q``."""
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]
    if config.system_prompt:
        messages.insert(0, {"role": "system", "content": config.system_prompt})
    ex = Example(messages, {"instruction": q, "input": "", "response": "x"}, "replay")
    if template is not None:
        return render_template(template, ex, config.template_vars)[0]
    return render_chat(tokenizer, ex)[0]


def model_fingerprint(model_name: str) -> str:
    """A local folder: its path and its weight files' sizes and times; else the name."""
    path = Path(model_name).expanduser()
    if not path.is_dir():
        return model_name
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return f"{path.resolve()}|{'|'.join(stats)}"


def replay_examples(
    config: FineTuningConfig, model: Any, tokenizer: Any, template: str | None, n_train: int
) -> list[Example]:
    """``round(ratio * n_train)`` rows of (general prompt, the base model's own answer)."""
    want = round(config.replay.ratio * n_train)
    if want <= 0:
        return []
    prompts = load_prompts(config.replay.prompts)
    # Every prompt is answered (once per base model: cached), then the finished answers are
    # used in order, repeated when there are fewer than ``want``.
    texts = {q: prompt_text(config, tokenizer, template, q) for q in prompts}
    key = hashlib.sha256(
        json.dumps(
            [model_fingerprint(config.model_name), config.replay.max_new_tokens], sort_keys=True
        ).encode()
    ).hexdigest()[:24]
    path = cache_dir() / f"{key}.json"
    cached = _read_cache(path)
    missing = [t for t in texts.values() if t not in cached]
    if missing:
        log.info("replay guard: the base model answers %d general prompts", len(missing))
        cached.update(_generate(model, tokenizer, missing, config.replay.max_new_tokens, template))
        _write_cache(path, cached)
    # An answer cut off by max_new_tokens would teach the model to stop mid-sentence.
    pairs = [(q, a) for q, t in texts.items() if (a := cached[t]) is not None]
    if not pairs:
        log.warning("replay guard: no base answer finished within max_new_tokens; none used")
        return []
    rows = [pairs[i % len(pairs)] for i in range(want)]
    log.info("replay guard: %d rows of the base model's own answers join training", len(rows))
    return [_example(config, q, a) for q, a in rows]


def _example(config: FineTuningConfig, q: str, a: str) -> Example:
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if config.system_prompt:
        messages.insert(0, {"role": "system", "content": config.system_prompt})
    return Example(messages, {"instruction": q, "input": "", "response": a}, "replay")


def _generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, template: str | None
) -> dict[str, str | None]:
    """Greedy answers of the base model (LoRA disabled), all prompts in one left-padded batch
    (on a CPU, 64 batched steps cost little more than 64 single ones); None for an answer cut
    off by the limit."""
    import contextlib

    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    encoded = [tokenizer(t, add_special_tokens=template is not None)["input_ids"] for t in prompts]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in encoded])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded])
    disable = getattr(model, "disable_adapter", None)
    was_training = model.training
    model.eval()
    with disable() if disable else contextlib.nullcontext(), torch.no_grad():
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, width:].tolist()
    model.train(was_training)
    out: dict[str, str | None] = {}
    for text, tokens in zip(prompts, gen, strict=True):
        finished = eos in tokens
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        out[text] = answer if finished and answer else None
    return out


def _read_cache(path: Path) -> dict[str, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, str | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # a concurrent run reads the old or the new file, never half
