from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent_finetune.errors import PromptTemplateError
from agent_finetune.training.data import Example
from agent_finetune.training.prompts import (
    IGNORE_INDEX,
    check_template,
    render_template,
    tokenize_examples,
)


def ex(instruction: str, response: str, **extra: str) -> Example:
    return Example(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
        {"instruction": instruction, "response": response, "input": "", **extra},
        where="data.json item 1",
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_chat_template_masks_prompt_and_matches_serving_prompt(tokenizer: Any) -> None:
    row = ex("如何重置密码？", "打开设置。")
    data = tokenize_examples(tokenizer, [row], max_seq_length=256)
    ids, labels = data.rows[0]["input_ids"], data.rows[0]["labels"]
    served_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "如何重置密码？"}], add_generation_prompt=True, tokenize=False
    )
    n_prompt = len(tokenizer(served_prompt, add_special_tokens=False)["input_ids"])
    assert ids[:n_prompt] == tokenizer(served_prompt, add_special_tokens=False)["input_ids"]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    answer = tokenizer.decode(ids[n_prompt:], skip_special_tokens=False)
    assert answer.startswith("打开设置。") and tokenizer.eos_token in answer


def test_full_loss_when_responses_only_off(tokenizer: Any) -> None:
    data = tokenize_examples(tokenizer, [ex("q", "a")], max_seq_length=256, responses_only=False)
    assert data.rows[0]["labels"] == data.rows[0]["input_ids"]


def test_template_with_domain_variable(tokenizer: Any) -> None:
    template = "领域: {domain}\n问题: {instruction}\n回答: {response}"
    prompt, response = render_template(template, ex("头疼怎么办？", "多休息。"), {"domain": "医疗"})
    assert prompt == "领域: 医疗\n问题: 头疼怎么办？\n回答: " and response == "多休息。"
    data = tokenize_examples(
        tokenizer,
        [ex("头疼怎么办？", "多休息。")],
        max_seq_length=256,
        prompt_template=template,
        template_vars={"domain": "医疗"},
    )
    row = data.rows[0]
    kept = [
        i for i, lbl in zip(row["input_ids"], row["labels"], strict=True) if lbl != IGNORE_INDEX
    ]
    assert tokenizer.decode(kept).startswith("多休息。")


def test_row_field_wins_over_template_var() -> None:
    prompt, _ = render_template(
        "{domain}: {instruction}{response}", ex("q", "a", domain="法律"), {"domain": "医疗"}
    )
    assert prompt == "法律: q"


def test_unknown_placeholder_fails_before_training() -> None:
    with pytest.raises(PromptTemplateError, match=r"\{domain\}.*template_vars"):
        check_template("{domain} {instruction} {response}", [ex("q", "a")], {})
    with pytest.raises(PromptTemplateError, match="must contain"):
        check_template("{response}", [ex("q", "a")], {})
    with pytest.raises(PromptTemplateError, match="not a plain field"):
        check_template("{instruction[0]} {response}", [ex("q", "a")], {})


def test_truncation_counted_and_prompt_only_rows_dropped(tokenizer: Any) -> None:
    long_answer = ex("q", "word " * 200)
    long_prompt = ex("word " * 200, "a")
    data = tokenize_examples(tokenizer, [long_answer, long_prompt, ex("q", "a")], max_seq_length=32)
    assert data.truncated == 2 and data.dropped == 1 and len(data.rows) == 2
    assert all(len(r["input_ids"]) <= 32 for r in data.rows)
