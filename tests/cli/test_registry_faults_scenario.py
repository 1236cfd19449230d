"""`validate` and `publish` never print a traceback, whatever the input; `fsck` exit codes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_finetune.cli import main
from agent_finetune.training.numpy_adapter import write_adapter


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _header(shape: str, offsets: str = "[0, 64]") -> bytes:
    body = (
        '{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": '
        f'{{"dtype": "F32", "shape": {shape}, "data_offsets": {offsets}}}}}'
    ).encode()
    return struct.pack("<Q", len(body)) + body + bytes(64)


@pytest.mark.parametrize(
    "weights",
    [
        _header("[Infinity, 16]"),  # OverflowError in the old parser
        _header("4"),  # scalar shape: TypeError
        _header("[null, 4]"),  # TypeError
        _header("[4, 4]", "[]"),  # IndexError
        b"\x00" * 3,
    ],
)
@pytest.mark.parametrize("command", ["validate", "publish"])
def test_malformed_weights_exit_1_with_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: bytes, command: str
) -> None:
    a = write_adapter(tmp_path / "a")
    (a / "adapter_model.safetensors").write_bytes(weights)
    argv = ["validate", str(a)] if command == "validate" else ["publish", "bot", str(a)]
    if command == "publish":
        argv += ["--registry", str(tmp_path / "reg")]
    code, out, err = run(capsys, *argv)
    assert code == 1 and "Traceback" not in out + err
    assert "adapter_model.safetensors" in out + err


def test_publish_refuses_a_symlinked_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_adapter(tmp_path / "a")
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0")
    (a / "tokenizer.json").symlink_to(secret)
    code, _, err = run(capsys, "publish", "bot", str(a), "--registry", str(tmp_path / "r"))
    assert code == 1 and "symbolic link" in err


def test_a_broken_base_model_config_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_adapter(tmp_path / "a")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{nope")
    code, out, err = run(capsys, "validate", str(a), "--base-model", str(base))
    assert code == 1 and "config.json" in err and "Traceback" not in out + err


_files = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda shape: _header(json.dumps(shape)), st.lists(st.integers(-3, 20), max_size=3)),
)
_configs = st.one_of(
    st.binary(max_size=80),
    st.dictionaries(
        st.sampled_from(
            ["r", "lora_alpha", "target_modules", "rank_pattern", "bias", "init_lora_weights"]
        ),
        st.one_of(
            st.none(), st.integers(-5, 600), st.text(max_size=4), st.lists(st.text(max_size=3))
        ),
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=_configs, weights=_files)
def test_validate_and_publish_never_raise_on_arbitrary_files(
    tmp_path_factory: pytest.TempPathFactory, config: bytes, weights: bytes
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "adapter_config.json").write_bytes(config)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    assert main(["validate", str(folder)]) in (0, 1)
    assert main(["publish", "bot", str(folder), "--registry", str(folder / "reg")]) in (0, 1)
    shutil.rmtree(folder)


def test_fsck_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "r")
    run(capsys, "publish", "bot", str(write_adapter(tmp_path / "a")), "--registry", reg)
    assert run(capsys, "fsck", "--registry", reg)[:2] == (0, f"{reg}: clean\n")
    (tmp_path / "r" / "bot" / ".staging-x").mkdir()
    code, out, err = run(capsys, "fsck", "--registry", reg)
    assert code == 1 and ".staging-x" in out and "--repair" in err
    code, out, _ = run(capsys, "fsck", "--repair", "--registry", reg, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["findings"][0]["repaired"] == "removed"
    assert run(capsys, "fsck", "--registry", reg)[0] == 0
