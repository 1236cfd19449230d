"""Load a trained adapter (or a base model) and generate text: the seed guide's helpers."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent_finetune.errors import ConfigError
from agent_finetune.registry.adapter import ADAPTER_CONFIG, read_adapter_config
from agent_finetune.training.backend import resolve_backend
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.data import Example
from agent_finetune.training.prompts import render_template, template_fields
from agent_finetune.training.train import FORMAT_FILE

log = logging.getLogger("agent_finetune")


def load_model_and_tokenizer(config: FineTuningConfig) -> tuple[Any, Any]:
    """(model, tokenizer) for ``config.model_name``: a base model, or an adapter folder
    (base model from its adapter_config.json + the LoRA weights), ready for generation."""
    path = Path(config.model_name)
    is_adapter = (path / ADAPTER_CONFIG).is_file()
    if resolve_backend(config) == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=config.model_name,
            max_seq_length=config.max_seq_length,
            load_in_4bit=config.load_in_4bit,
        )
        FastLanguageModel.for_inference(model)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = _adapter_base(path) if is_adapter else config.model_name
        dtype = "bfloat16" if config.bf16 else "float16" if config.fp16 else "auto"
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        tok_source = config.model_name if (path / "tokenizer_config.json").is_file() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_source)
        if is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config.model_name)
        model.eval()
    fmt_file = path / FORMAT_FILE
    if is_adapter and fmt_file.is_file():
        model.agent_finetune_format = json.loads(fmt_file.read_text(encoding="utf-8"))
    return model, tokenizer


def _adapter_base(folder: Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; set it to the base model's "
            "name or folder, or load the base model and the adapter with PEFT yourself"
        )
    return base


_warned: set[str] = set()


def _template_values(
    template: str, prompt: str, saved: Mapping[str, str], given: Mapping[str, Any]
) -> dict[str, str]:
    """Values for the template's placeholders: the prompt, the caller's, then training's.

    A placeholder nobody gives (a field that came from the training rows) renders empty,
    with one warning per name that says how to pass it.
    """
    values = {**saved, **{k: str(v) for k, v in given.items()}}
    values.update(instruction=prompt, input=values.get("input", ""), response="")
    for name in template_fields(template):
        if name not in values:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"prompt_template uses {{{name}}}, which came from the training rows; "
                    f"it is rendered empty. Pass it: generate_text(..., {name}=...) "
                    "(or template_vars={...})",
                    UserWarning,
                    stacklevel=4,
                )
            values[name] = ""
    return values


def format_prompt(
    model: Any, tokenizer: Any, prompt: str, template_vars: Mapping[str, Any] | None = None
) -> tuple[str, bool]:
    """(prompt as the model saw it in training, whether the chat template rendered it).

    ``template_vars`` fill the training ``prompt_template``'s other ``{field}`` placeholders.
    """
    fmt = getattr(model, "agent_finetune_format", None) or {}
    template = fmt.get("prompt_template")
    if template:
        values = _template_values(
            template, prompt, fmt.get("template_vars") or {}, template_vars or {}
        )
        ex = Example(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}], values
        )
        return render_template(template, ex, {})[0], False
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if fmt.get("system_prompt"):
            messages.insert(0, {"role": "system", "content": fmt["system_prompt"]})
        text: str = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text, True
    return prompt, False


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    template_vars: Mapping[str, Any] | None = None,
    **fields: Any,
) -> str:
    """Generate a reply to ``prompt``; return only the new text. temperature=0 is greedy.

    With a training ``prompt_template``, its other placeholders are filled from ``fields``
    (``domain="医疗"``) or ``template_vars``; a missing one warns once and renders empty.
    """
    import torch

    text, chat = format_prompt(model, tokenizer, prompt, {**(template_vars or {}), **fields})
    # A chat template already holds its special tokens; training tokenized it the same way.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    sampling = temperature > 0
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()
