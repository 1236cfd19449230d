"""generate_text after training with a prompt_template whose fields came from the rows."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent_finetune.errors import ConfigError
from agent_finetune.training import inference
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.inference import (
    format_prompt,
    generate_text,
    load_model_and_tokenizer,
)
from agent_finetune.training.numpy_adapter import write_adapter

TEMPLATE = "### 领域: {domain}\n### 指令:\n{instruction}\n### 回答:\n{response}"


def model_with(template: str, template_vars: dict[str, str] | None = None) -> Any:
    fmt = {"prompt_template": template, "template_vars": template_vars or {}}
    return SimpleNamespace(agent_finetune_format=fmt, device="cpu")


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    getattr(inference, "_warned", set()).clear()


def test_row_fields_are_filled_from_keyword_arguments() -> None:
    text, chat = format_prompt(model_with(TEMPLATE), None, "如何重置密码？", {"domain": "医疗"})
    assert text == "### 领域: 医疗\n### 指令:\n如何重置密码？\n### 回答:\n" and not chat


def test_a_missing_field_warns_once_and_still_renders() -> None:
    model = model_with(TEMPLATE)
    with pytest.warns(UserWarning, match=r"\{domain\}.*generate_text\(\.\.\., domain=\.\.\.\)"):
        text, _ = format_prompt(model, None, "hi")
    assert text.startswith("### 领域: \n### 指令:\nhi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        format_prompt(model, None, "again")  # warned once already


def test_training_template_vars_still_apply_and_callers_win() -> None:
    model = model_with(TEMPLATE, {"domain": "人工智能"})
    assert "领域: 人工智能" in format_prompt(model, None, "q")[0]
    assert "领域: 法律" in format_prompt(model, None, "q", {"domain": "法律"})[0]


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 0

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, text: str, **_: Any) -> dict[str, Any]:
        import torch

        self.seen.append(text)
        return {"input_ids": torch.tensor([[5, 6]])}

    def decode(self, ids: Any, **_: Any) -> str:
        return " ".join(str(int(i)) for i in ids)


def test_generate_text_takes_fields_as_keywords_and_template_vars() -> None:
    import torch

    model = model_with(TEMPLATE)
    model.generate = lambda **kw: torch.cat([kw["input_ids"], torch.tensor([[7]])], dim=1)
    tok = _Tokenizer()
    assert generate_text(model, tok, "q", max_new_tokens=1, temperature=0, domain="医疗") == "7"
    generate_text(model, tok, "q", temperature=0, template_vars={"domain": "法律"})
    assert "领域: 医疗" in tok.seen[0] and "领域: 法律" in tok.seen[1]


def test_an_adapter_folder_without_its_base_model_is_a_config_error(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a", extra_config={"base_model_name_or_path": None})
    with pytest.raises(ConfigError, match="no base_model_name_or_path"):
        load_model_and_tokenizer(FineTuningConfig(model_name=str(folder)))
