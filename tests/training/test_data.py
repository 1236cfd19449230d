from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_finetune.errors import DataError
from agent_finetune.training.data import load_dataset_file


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("bom", [False, True])
def test_json_array_chinese(tmp_path: Path, bom: bool) -> None:
    rows = [{"instruction": "你好", "response": "您好！"}, {"instruction": "b", "response": "c"}]
    ds = load_dataset_file(write(tmp_path / "d.json", json.dumps(rows, ensure_ascii=False), bom))
    assert ds.format == "instruction" and len(ds) == 2
    assert ds.examples[0].messages == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "您好！"},
    ]


def test_json_single_object(tmp_path: Path) -> None:
    ds = load_dataset_file(write(tmp_path / "d.json", '{"prompt": "p", "completion": "c"}'))
    assert ds.format == "prompt" and ds.examples[0].response == "c"


def test_jsonl_formats(tmp_path: Path) -> None:
    text = '{"input": "i", "output": "o"}\n\n{"input": "j", "output": "p"}\n'
    ds = load_dataset_file(write(tmp_path / "d.jsonl", text))
    assert ds.format == "io" and [e.response for e in ds.examples] == ["o", "p"]


def test_alpaca_joins_instruction_and_input(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate", "input": "hello", "output": "你好"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    ds = load_dataset_file(write(tmp_path / "d.json", json.dumps(rows)))
    assert ds.format == "alpaca"
    assert ds.examples[0].messages[0]["content"] == "Translate\n\nhello"
    assert ds.examples[1].messages[0]["content"] == "Say hi"


def test_chat_messages(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    ds = load_dataset_file(write(tmp_path / "d.jsonl", json.dumps(row)))
    assert ds.format == "chat" and ds.examples[0].prompt_messages[-1]["content"] == "u"


def test_csv_with_field_map_and_bom(tmp_path: Path) -> None:
    text = 'question,answer\n"How, really?",Like this\n你好,您好\n'
    ds = load_dataset_file(
        write(tmp_path / "d.csv", text, bom=True),
        field_map={"question": "instruction", "answer": "response"},
    )
    assert ds.format == "instruction"
    assert ds.examples[0].fields["instruction"] == "How, really?"
    assert ds.examples[1].response == "您好"


def test_system_prompt_prepended(tmp_path: Path) -> None:
    ds = load_dataset_file(
        write(tmp_path / "d.json", '[{"instruction":"a","response":"b"}]'), system_prompt="be brief"
    )
    assert ds.examples[0].messages[0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        (
            "d.jsonl",
            '{"instruction":"a","response":"b"}\n{"instruction": "a"\n',
            ":2: invalid JSON",
        ),
        (
            "d.jsonl",
            '{"instruction":"a","response":"b"}\n{"instruction":"x"}\n',
            ":2: missing field 'response'",
        ),
        (
            "d.jsonl",
            '{"instruction":"a","response":"b"}\n{"instruction":"x","response":"  "}\n',
            ":2: field 'response' is empty",
        ),
        (
            "d.json",
            '[{"instruction":"a","response":"b"}, "just text"]',
            "item 2: expected an object",
        ),
        (
            "d.json",
            '[{"instruction":"a","response":"b"}, {"instruction":"a","response":[1]}]',
            "item 2: field 'response' must be text",
        ),
        ("d.csv", "instruction,response\na,b\nc,d,e\n", ":3: row has 3 columns"),
        ("d.json", "[]", "empty"),
        ("d.jsonl", "\n\n", "empty"),
        ("d.json", '[{"question":"a","answer":"b"}]', "cannot tell the format"),
        ("d.txt", "hello", "unsupported file type"),
        ("d.jsonl", '{"messages":[{"role":"user","content":"u"}]}', "last message must be"),
        ("d.jsonl", '{"messages":[{"role":"bot","content":"u"}]}', "messages[0]"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as e:
        load_dataset_file(path)
    assert str(path) in str(e.value)
    assert fragment in str(e.value)


def test_not_utf8_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "d.json"
    bad.write_bytes('[{"instruction":"é"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset_file(bad)
    with pytest.raises(DataError, match="not found"):
        load_dataset_file(tmp_path / "nope.json")


def test_split_is_seeded_and_may_be_empty(tmp_path: Path) -> None:
    rows = [{"instruction": str(i), "response": "r"} for i in range(20)]
    ds = load_dataset_file(write(tmp_path / "d.json", json.dumps(rows)))
    a = ds.split(0.25, seed=1)
    b = ds.split(0.25, seed=1)
    c = ds.split(0.25, seed=2)
    assert [e.fields for e in a[1]] == [e.fields for e in b[1]]
    assert [e.fields for e in a[1]] != [e.fields for e in c[1]]
    assert len(a[0]) == 15 and len(a[1]) == 5
    train, test = ds.split(0.01, seed=1)
    assert len(train) == 20 and test == []
    with pytest.raises(DataError):
        ds.split(1.0, seed=1)


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    a = load_dataset_file(write(tmp_path / "a.json", '[{"instruction":"a","response":"b"}]'))
    b = load_dataset_file(write(tmp_path / "b.json", '[{"instruction":"a","response":"c"}]'))
    assert a.fingerprint != b.fingerprint
