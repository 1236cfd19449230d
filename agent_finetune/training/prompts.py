"""Turn Examples into token ids and labels.

Default: the tokenizer's own chat template, so training sees exactly the prompt that vLLM's
chat endpoint renders at serving time. Alternatively a ``prompt_template`` format string with
``{instruction}``, ``{response}`` and any other ``{field}``. The prompt part is masked (-100)
so the loss covers the response only, unless ``train_on_responses_only`` is off.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent_finetune.errors import PromptTemplateError
from agent_finetune.training.data import Example

IGNORE_INDEX = -100


def template_fields(template: str) -> list[str]:
    """Placeholder names in a format string, e.g. ['instruction', 'domain', 'response']."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise PromptTemplateError(f"prompt_template is not a valid format string: {e}") from None
    for name in names:
        if not name.isidentifier():
            raise PromptTemplateError(
                f"prompt_template placeholder {{{name}}} is not a plain field name; "
                "write literal braces as {{ and }}"
            )
    return names


def check_template(
    template: str, examples: Sequence[Example], template_vars: Mapping[str, str]
) -> None:
    """Fail before training if any row lacks a value for one of the template's placeholders."""
    names = set(template_fields(template))
    if "instruction" not in names:
        raise PromptTemplateError("prompt_template must contain {instruction}")
    for ex in examples:
        missing = names - set(ex.fields) - set(template_vars)
        if missing:
            raise PromptTemplateError(
                f"{ex.where}: prompt_template uses {{{', '.join(sorted(missing))}}} but neither "
                f"the row (fields: {', '.join(sorted(ex.fields))}) nor template_vars provides "
                "it; add it to template_vars in the config"
            )


def render_template(
    template: str, ex: Example, template_vars: Mapping[str, str]
) -> tuple[str, str]:
    """(prompt text, response text) for one row. The response part starts at ``{response}``."""
    values = {**template_vars, **ex.fields}
    head, sep, tail = template.partition("{response}")
    if not sep:  # no {response}: the answer follows the prompt directly
        return template.format(**values), ex.response
    return head.format(**values), ex.response + tail.format(**values)


def render_chat(tokenizer: Any, ex: Example) -> tuple[str, str]:
    """(prompt text, response text) through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptTemplateError(
            "the tokenizer has no chat template; set prompt_template in the config, or use a "
            "chat/instruct model"
        )
    prompt = tokenizer.apply_chat_template(
        ex.prompt_messages, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(ex.messages, tokenize=False)
    if not full.startswith(prompt):
        raise PromptTemplateError(
            f"{ex.where}: the chat template renders the conversation differently with and without "
            "the answer, so the prompt cannot be masked; set prompt_template instead"
        )
    return prompt, full[len(prompt) :]


@dataclass
class TokenizedData:
    """Training rows as ``{input_ids, labels}`` plus what happened on the way."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_seq_length: int,
    prompt_template: str | None = None,
    template_vars: Mapping[str, str] | None = None,
    responses_only: bool = True,
) -> TokenizedData:
    """Tokenize rows; truncate to ``max_seq_length``; count truncated and dropped rows.

    The prompt and the response are tokenized separately, as at serving time, where the
    server tokenizes the rendered prompt and the model generates the rest.
    """
    tv = dict(template_vars or {})
    if prompt_template is not None:
        check_template(prompt_template, examples, tv)
    eos = tokenizer.eos_token or ""
    out = TokenizedData()
    for ex in examples:
        if prompt_template is not None:
            prompt, response = render_template(prompt_template, ex, tv)
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            response_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        else:
            prompt, response = render_chat(tokenizer, ex)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = list(prompt_ids) + list(response_ids)
        labels = (
            [IGNORE_INDEX] * len(prompt_ids) + list(response_ids) if responses_only else list(ids)
        )
        if len(ids) > max_seq_length:
            out.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(lbl == IGNORE_INDEX for lbl in labels):
            out.dropped += 1  # the prompt alone fills max_seq_length: nothing to learn
            continue
        out.tokens += len(ids)
        out.rows.append({"input_ids": ids, "labels": labels})
    return out
