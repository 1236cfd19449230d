"""The safetensors header parser: as strict as the safetensors library, and it never crashes."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from agent_finetune.errors import ValidationError
from agent_finetune.registry.adapter import read_safetensors_header, validate_adapter
from agent_finetune.training.numpy_adapter import write_adapter


def raw_file(header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def parse(tmp_path: Path, content: bytes) -> dict[str, Any]:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    return read_safetensors_header(path)  # type: ignore[return-value]


def one(dtype: str = "F32", shape: Any = (2, 2), offsets: Any = (0, 16)) -> dict[str, Any]:
    shape = list(shape) if isinstance(shape, tuple) else shape
    offsets = list(offsets) if isinstance(offsets, tuple) else offsets
    return {"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


GOOD = raw_file(one(), bytes(16))


def test_a_valid_file_parses(tmp_path: Path) -> None:
    tensors = parse(tmp_path, GOOD)
    assert tensors["t"].shape == (2, 2) and tensors["t"].dtype == "F32"


# Each of these crashed the old parser (OverflowError/TypeError/IndexError) or was accepted.
@pytest.mark.parametrize(
    "content, fragment",
    [
        (
            raw_file(
                None,
                bytes(16),
                raw_header=b'{"t":{"dtype":"F32","shape":[Infinity,16],"data_offsets":[0,16]}}',
            ),
            "Infinity is not valid JSON",
        ),
        (raw_file(one(shape=2), bytes(16)), "shape"),  # scalar shape
        (raw_file(one(shape=[None, 2]), bytes(16)), "shape"),  # null dims
        (raw_file(one(shape=[-2, -2]), bytes(16)), "shape"),
        (raw_file(one(shape=[True, 4]), bytes(16)), "shape"),
        (raw_file(one(offsets=[]), bytes(16)), "data_offsets"),  # empty data_offsets
        (raw_file(one(offsets=[-16, 0]), bytes(16)), "data_offsets"),  # negative
        (raw_file(one(offsets=[16, 0]), bytes(16)), "data_offsets"),
        (raw_file(one(dtype="F33"), bytes(16)), "unknown dtype"),
        (raw_file(one(), bytes(20)), "trailing bytes"),
        (raw_file(one(shape=[2, 3]), bytes(16)), "needs 24 bytes"),  # byte count != shape
        (raw_file(one(offsets=[4, 20]), bytes(20)), "gap"),  # not from 0
        (
            raw_file(
                {**one(), "u": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                bytes(16),
            ),
            "overlaps",
        ),
        (raw_file(one(), bytes(8)), "truncated"),
        (raw_file([1, 2]), "not a JSON object"),
        (raw_file(None, raw_header=b'{"t": 1, "t": 2}'), "duplicate"),
        (raw_file({"__metadata__": {"a": 1}}), "__metadata__"),
        (b"\x05\x00", "not a safetensors file"),
        (struct.pack("<Q", 1 << 62) + b"{}", "exceeds"),
        (raw_file(None, raw_header=b"[" * 100_000), "unreadable"),
        (raw_file(None, raw_header=b'{"t": ' + b"1" * 5000 + b"}"), "unreadable"),
        (raw_file(None, raw_header=b"\xff\xfe"), "unreadable"),
    ],
)
def test_malformed_headers_are_validation_errors(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    with pytest.raises(ValidationError, match=fragment):
        parse(tmp_path, content)


def test_bad_header_is_a_problem_in_the_report_not_a_traceback(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a")
    (a / "adapter_model.safetensors").write_bytes(raw_file(one(shape=[-1, 2])))
    report = validate_adapter(a)
    assert not report.ok and "shape" in report.problems[0]


def test_agrees_with_the_safetensors_library_on_real_files(tmp_path: Path) -> None:
    tensors = {
        "a": np.zeros((3, 5), np.float16),
        "b": np.ones((0, 7), np.float32),
        "c": np.arange(6, dtype=np.int64),
    }
    content = st_save(tensors, metadata={"format": "pt"})
    parsed = parse(tmp_path, content)
    assert {k: (v.shape, v.dtype) for k, v in parsed.items()} == {
        "a": ((3, 5), "F16"),
        "b": ((0, 7), "F32"),
        "c": ((6,), "I64"),
    }


def _library_accepts(content: bytes) -> bool:
    try:
        st_load(content)
        return True
    except Exception:  # any refusal of the library counts
        return False


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_validation_errors(content: bytes) -> None:
    from agent_finetune.registry.adapter import parse_safetensors_header

    with contextlib.suppress(ValidationError):
        parse_safetensors_header(content, len(content))


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from(["F32", "F16", "BF16", "I64", "Q8", "", "__metadata__"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid two-tensor file with one field replaced by an arbitrary JSON value."""
    header: dict[str, Any] = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
    }
    target = draw(st.sampled_from(["a", "b"]))
    key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
    header[target][key] = draw(_json_values)
    data = bytes(draw(st.integers(0, 40)))
    return raw_file(None, data, raw_header=json.dumps(header, allow_nan=True).encode())


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_headers())
def test_mutated_headers_raise_only_validation_errors_and_never_accept_what_safetensors_refuses(
    content: bytes,
) -> None:
    from agent_finetune.registry.adapter import parse_safetensors_header

    try:
        parse_safetensors_header(content, len(content))
    except ValidationError:
        return
    assert _library_accepts(content), "accepted a file the safetensors library refuses"
