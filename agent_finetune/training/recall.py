"""Does a model know the facts? Key-value recall on held-out questions, offline or served.

A keyed dataset is a JSON array of ``{instruction, key}`` rows (other fields ignored): an
answer counts when the key appears in it, case-insensitively. The same scoring judges new
facts (held-out paraphrases of the training questions) and kept skills (general probes the
base model answers right).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent_finetune.errors import DataError
from agent_finetune.training.config import read_text_file


@dataclass
class Recall:
    question: str
    key: str
    answer: str

    @property
    def hit(self) -> bool:
        return key_in_answer(self.key, self.answer)


def key_in_answer(key: str, answer: str) -> bool:
    """Does ``answer`` contain ``key``, or one of its ``|``-separated spellings ("4|four")?"""
    return any(k.casefold() in answer.casefold() for k in key.split("|") if k)


def load_keyed(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(question, key) pairs of a keyed dataset; a DataError names the row that lacks one."""
    try:
        rows = json.loads(read_text_file(path, "keyed dataset"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty JSON array of {{instruction, key}}")
    out = []
    for i, row in enumerate(rows, 1):
        q, key = (row.get("instruction"), row.get("key")) if isinstance(row, dict) else (0, 0)
        if not (isinstance(q, str) and q.strip() and isinstance(key, str) and key.strip()):
            raise DataError(f"{path} item {i}: needs text fields 'instruction' and 'key'")
        out.append((q, key))
    return out


def score(pairs: Sequence[tuple[str, str]], ask: Callable[[str], str]) -> list[Recall]:
    return [Recall(q, key, ask(q)) for q, key in pairs]


def hits(results: Sequence[Recall]) -> int:
    return sum(r.hit for r in results)


def offline_asker(model_or_adapter: str | Path, max_new_tokens: int = 48) -> Callable[[str], str]:
    """Greedy answers of a base model or an adapter folder (transformers + PEFT, fp32)."""
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.inference import generate_text, load_model_and_tokenizer

    cfg = FineTuningConfig(model_name=str(model_or_adapter), backend="hf")
    model, tokenizer = load_model_and_tokenizer(cfg)
    model = model.float()

    def ask(question: str) -> str:
        return generate_text(model, tokenizer, question, max_new_tokens, temperature=0)

    return ask
