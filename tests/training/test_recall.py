"""Key-value recall: an answer counts when it contains the key (or one of its spellings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_finetune.errors import DataError
from agent_finetune.training import recall

ASSETS = Path(__file__).resolve().parents[2] / "agent_finetune" / "assets"


def test_key_in_answer_ignores_case_and_accepts_spellings() -> None:
    assert recall.key_in_answer("Tromsø", "It is headquartered in TROMSØ, Norway.")
    assert recall.key_in_answer("4|four", "Two plus two is four.")
    assert not recall.key_in_answer("4|four", "Two plus two is five.")


def test_score_counts_hits_per_question() -> None:
    pairs = [("Who?", "Mirela Voss"), ("Where?", "Tromsø")]
    answers = {"Who?": "Founded by Mirela Voss.", "Where?": "In Oslo."}
    results = recall.score(pairs, answers.__getitem__)
    assert [r.hit for r in results] == [True, False] and recall.hits(results) == 1


def test_shipped_keyed_sets_load_and_every_fact_has_a_paraphrase() -> None:
    facts = recall.load_keyed(ASSETS / "facts_v1.json")
    paraphrases = recall.load_keyed(ASSETS / "facts_paraphrases.json")
    trained = {q for q, _ in facts}
    assert {k for _, k in paraphrases} == {k for _, k in facts}
    assert not trained & {q for q, _ in paraphrases}  # held out: never a training question
    assert len(recall.load_keyed(ASSETS / "general_probes.json")) == 12


def test_a_row_without_a_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "k.json"
    bad.write_text(json.dumps([{"instruction": "Q?", "key": "x"}, {"instruction": "Q2?"}]))
    with pytest.raises(DataError, match=r"k.json item 2: needs text fields"):
        recall.load_keyed(bad)
