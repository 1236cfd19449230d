"""What the demo trains and asks: the real model (default) or the tiny random one (--tiny).

A scenario names the base model, the config and datasets (package assets), the question
whose answer changes from v1 to v2, and how an answer is judged: the tiny model must repeat
its training answer exactly; the real model's answer must contain the fact's key value.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune.cli.ask import ask
from agent_finetune.cli.output import print_table
from agent_finetune.errors import DemoError, ModelSourceError

REAL_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Scenario:
    tiny: bool
    config: str
    v1: str
    v2: str
    heldout: str
    question: str
    max_tokens: int
    server_dtype: str
    probes: str | None = None
    gate_steps: int | None = None  # optimizer steps of the version the gate must refuse
    gate_epochs: float | None = None

    @property
    def assets(self) -> tuple[str, ...]:
        names = (self.config, self.v1, self.v2, self.heldout, self.probes)
        return tuple(n for n in names if n)

    def matches(self, row: dict[str, Any], answer: str) -> bool:
        """Does ``answer`` give ``row``'s fact?"""
        if self.tiny:
            return answer.strip() == str(row["response"])
        from agent_finetune.training.recall import key_in_answer

        return key_in_answer(str(row["key"]), answer)

    def want(self, dataset: Path) -> dict[str, Any]:
        """The row of ``dataset`` that asks the demo's question."""
        for row in json.loads(dataset.read_text(encoding="utf-8")):
            if row["instruction"] == self.question:
                return dict(row)
        raise DemoError(f"{dataset} has no row for {self.question!r}")

    def shown(self, row: dict[str, Any]) -> str:
        return str(row["response"] if self.tiny else row["key"])


TINY = Scenario(
    tiny=True,
    config="tiny-cpu.yaml",
    v1="support_v1.json",
    v2="support_v2.json",
    heldout="support_heldout.json",
    question="What are your support hours?",
    max_tokens=48,
    server_dtype="bfloat16",
    gate_epochs=5,  # the shuffled version only has to be worse; a short run keeps it short
)
REAL = Scenario(
    tiny=False,
    config="smollm2-135m-cpu.yaml",
    v1="facts_v1.json",
    v2="facts_v2.json",
    heldout="facts_paraphrases.json",
    question="What are Larkspur's support hours?",
    max_tokens=40,
    server_dtype="float32",
    probes="general_probes.json",
    gate_steps=4,
)


def prepare_real_model() -> Path:
    from agent_finetune.training.models import prepare_model

    try:
        return prepare_model(REAL_MODEL).path
    except ModelSourceError as e:
        raise DemoError(
            f"{e}\n(or run the fast demo on a tiny random model: `demo --tiny`)"
        ) from None


def score_served(
    base_url: str, models: dict[str, str], rows: list[dict[str, Any]], max_tokens: int
) -> dict[str, list[str]]:
    """Every model's greedy answer to every row, asked concurrently (the server batches)."""
    jobs = [(label, row) for label in models for row in rows]

    def one(job: tuple[str, dict[str, Any]]) -> str:
        label, row = job
        return ask(models[label], row["instruction"], server=base_url, max_tokens=max_tokens)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, jobs))
    out: dict[str, list[str]] = {label: [] for label in models}
    for (label, _), answer in zip(jobs, answers, strict=True):
        out[label].append(answer.strip())
    return out


def print_recall(
    scenario: Scenario, rows: list[dict[str, Any]], answers: dict[str, list[str]]
) -> dict[str, list[bool]]:
    """A question | key | answer-per-model table (+ right, - wrong); which rows each model
    got right."""
    labels = list(answers)
    table = []
    for i, row in enumerate(rows):
        cells = []
        for label in labels:
            a = answers[label][i].replace("\n", " ")
            a = a if len(a) <= 40 else a[:37] + "..."
            cells.append(("+ " if scenario.matches(row, answers[label][i]) else "- ") + a)
        table.append((row["instruction"], row["key"], *cells))
    print_table(table, ["QUESTION", "KEY", *labels])
    return {
        label: [scenario.matches(r, a) for r, a in zip(rows, answers[label], strict=True)]
        for label in labels
    }
