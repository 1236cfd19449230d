"""Load a trained adapter (or a base model) and generate text: the seed guide's helpers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent_finetune.registry.adapter import ADAPTER_CONFIG, read_adapter_config
from agent_finetune.training.backend import resolve_backend
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.data import Example
from agent_finetune.training.prompts import render_template
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

        base = (
            read_adapter_config(path)["base_model_name_or_path"]
            if is_adapter
            else config.model_name
        )
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


def format_prompt(model: Any, tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """(prompt as the model saw it in training, whether the chat template rendered it)."""
    fmt = getattr(model, "agent_finetune_format", None) or {}
    template = fmt.get("prompt_template")
    if template:
        ex = Example(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}],
            {"instruction": prompt, "input": "", "response": ""},
        )
        return render_template(template, ex, fmt.get("template_vars") or {})[0], False
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
) -> str:
    """Generate a reply to ``prompt``; return only the new text. temperature=0 is greedy."""
    import torch

    text, chat = format_prompt(model, tokenizer, prompt)
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
