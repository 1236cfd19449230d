from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from agent_finetune.errors import InvalidNameError, NotFoundError, RegistryError, ValidationError
from agent_finetune.registry import Registry, check_name
from agent_finetune.training.numpy_adapter import write_adapter


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "adapter")


def test_publish_lays_out_immutable_version_with_manifest(reg: Registry, adapter: Path) -> None:
    info = reg.publish("bot", adapter, metadata={"metrics": {"eval_loss": 0.5}})
    assert info.version == "v0001" and info.current
    vdir = reg.root / "bot" / "versions" / "v0001"
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["lora"] == {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    assert manifest["base_model"] == "tiny-base" and manifest["parent"] is None
    assert manifest["metrics"] == {"eval_loss": 0.5} and manifest["tool_version"]
    files = manifest["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())
    assert reg.current("bot") == "v0001"
    assert not [p for p in (reg.root / "bot").iterdir() if p.name.startswith(".staging")]
    assert reg.verify("bot", "v0001").ok


def test_versions_history_and_parent(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    info = reg.publish("bot", adapter, reason="better data")
    assert info.version == "v0002" and info.manifest["parent"] == "v0001"
    assert reg.versions("bot") == ["v0001", "v0002"] and reg.current("bot") == "v0002"
    moves = [(e["action"], e["from"], e["to"]) for e in reg.history("bot")]
    assert moves == [
        ("publish", None, "v0001"),
        ("promote", None, "v0001"),
        ("publish", None, "v0002"),
        ("promote", "v0001", "v0002"),
    ]
    assert reg.history("bot")[-1]["reason"] == "better data"


def test_publish_without_promote(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    reg.publish("bot", adapter, make_current=False)
    assert reg.current("bot") == "v0001"
    reg.promote("bot", "v0002")
    assert reg.current("bot") == "v0002"


def test_rollback_undoes_the_last_move_and_to(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    with pytest.raises(RegistryError, match="no pointer move to undo"):
        reg.rollback("bot")
    for _ in range(2):
        reg.publish("bot", adapter)
    assert reg.rollback("bot") == "v0002"
    assert reg.rollback("bot") == "v0003"  # a second rollback undoes the first
    assert reg.rollback("bot", to="v0001") == "v0001"
    assert reg.rollback("bot") == "v0003"
    n = len(reg.history("bot"))
    assert reg.rollback("bot", to="v0003") == "v0003"  # already current: no entry
    assert reg.promote("bot", "v0003") == "v0003"
    assert len(reg.history("bot")) == n
    assert reg.current("bot") == "v0003"
    assert reg.history("bot")[-1]["action"] == "rollback"
    with pytest.raises(NotFoundError, match="v0009"):
        reg.rollback("bot", to="v0009")


def test_invalid_version_is_never_made_current(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    reg.publish("bot", adapter)
    w = reg.version_dir("bot", "v0001") / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"XXXX")  # same size, different bytes
    with pytest.raises(ValidationError, match="sha256"):
        reg.rollback("bot")
    assert reg.current("bot") == "v0002"


def test_publish_rejects_invalid_adapter_and_leaves_nothing(reg: Registry, tmp_path: Path) -> None:
    bad = write_adapter(tmp_path / "bad", r=64)
    with pytest.raises(ValidationError, match="max-lora-rank"):
        reg.publish("bot", bad, max_rank=16)
    assert reg.versions("bot") == [] and reg.current("bot") is None


@pytest.mark.parametrize("name", ["", "Bot", "../x", "a/b", ".hidden", "x" * 65, "a b", "é"])
def test_bad_names_rejected(reg: Registry, adapter: Path, name: str) -> None:
    with pytest.raises(InvalidNameError):
        reg.publish(name, adapter)


def test_good_names() -> None:
    for name in ["a", "support-bot", "team_a.v2", "0x", "a" * 64]:
        assert check_name(name) == name


def test_symlink_escape_rejected(reg: Registry, tmp_path: Path) -> None:
    reg.root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (reg.root / "evil").symlink_to(outside)
    with pytest.raises(InvalidNameError, match="escapes"):
        reg.name_dir("evil")


def test_gc_keeps_current_and_newest(reg: Registry, adapter: Path) -> None:
    for _ in range(5):
        reg.publish("bot", adapter)
    reg.rollback("bot", to="v0001")
    assert reg.gc("bot", keep=2, dry_run=True) == ["v0002", "v0003"]
    assert reg.versions("bot") == ["v0001", "v0002", "v0003", "v0004", "v0005"]
    assert reg.gc("bot", keep=2) == ["v0002", "v0003"]
    assert reg.versions("bot") == ["v0001", "v0004", "v0005"]
    assert reg.current("bot") == "v0001"
    with pytest.raises(RegistryError):
        reg.gc("bot", keep=0)


def test_list_and_names_ignore_staging_and_junk(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    reg.publish("other", adapter)
    (reg.root / "bot" / ".staging-123").mkdir()
    (reg.root / "bot" / "versions" / "junk").mkdir()
    (reg.root / "README.txt").write_text("x")
    assert reg.names() == ["bot", "other"]
    assert [(i.name, i.version, i.current) for i in reg.entries()] == [
        ("bot", "v0001", True),
        ("other", "v0001", True),
    ]
    with pytest.raises(NotFoundError):
        reg.entries("nope")


def test_corrupt_current_pointer_reads_as_none(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    (reg.root / "bot" / "current").write_text("{garbage")
    assert reg.current("bot") is None


def _publish_many(root: str, adapter: str, n: int) -> list[str]:
    reg = Registry(root)
    return [reg.publish("bot", adapter).version for _ in range(n)]


def test_concurrent_publishers_never_collide(reg: Registry, adapter: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_publish_many, [(str(reg.root), str(adapter), 5)] * 4)
    versions = [v for r in results for v in r]
    assert len(versions) == 20 and len(set(versions)) == 20
    assert reg.versions("bot") == [f"v{i:04d}" for i in range(1, 21)]
    history = reg.history("bot")
    assert sorted(e["to"] for e in history if e["action"] == "publish") == reg.versions("bot")
    assert len([e for e in history if e["action"] == "promote"]) == 20
    for v in reg.versions("bot"):
        assert reg.verify("bot", v).ok
    assert reg.current("bot") in versions
