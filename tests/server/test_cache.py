"""The server's verified copies (``server_plugin.cache``): flock-owned per-process folders,
removed at exit, and copies never deleted while claimed."""

from __future__ import annotations

import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import make_reconciler
from helpers import FAKE_BASE_CONFIG, fake_adapter, write_version

from agent_finetune.errors import CacheInUseError, ValidationError
from agent_finetune.registry import adapter as adapter_module
from agent_finetune.training.numpy_adapter import write_adapter
from server_plugin import served_dtype
from server_plugin.cache import ProcessDir

HOLD = """
import sys
from pathlib import Path
from server_plugin.cache import ProcessDir
d = ProcessDir(Path(sys.argv[1]))
print(d.path, flush=True)
sys.stdin.read()
"""


def test_cleanup_removes_only_folders_whose_lock_is_free(tmp_path: Path) -> None:
    """Finding: liveness by kill(pid, 0) is wrong across PID namespaces (shared volume)."""
    root = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        theirs = Path(child.stdout.readline().strip())
        (theirs / "copy").mkdir()
        # An owner that died: its folder names a pid that is alive here (pid 1), which
        # kill(pid, 0) would take for its owner; nothing holds its lock.
        orphan = root / "proc-1-deadbeef"
        (orphan / "copy").mkdir(parents=True)
        mine = ProcessDir(root)
        assert (theirs / "copy").is_dir()  # its owner holds the lock: kept
        assert not orphan.exists()  # lock free: removed
        assert orphan in mine.removed
    finally:
        child.kill()
        child.wait()
    again = ProcessDir(root)
    assert not theirs.exists()  # killed -9: its lock went with it
    mine.close()
    again.close()


def test_copies_are_removed_at_exit(tmp_path: Path) -> None:
    """Finding: copies were never removed at exit (2,000 adapters left 555 MB)."""
    folder = ProcessDir(tmp_path / "cache")
    (folder.path / "x" / "v0001-abc").mkdir(parents=True)
    folder.close()
    assert not folder.path.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_two_sidecars_never_share_a_folder(tmp_path: Path) -> None:
    """Finding: two sidecars shared one folder and deleted each other's copies."""
    first = ProcessDir(tmp_path / "cache", name="sidecar-abc")
    with pytest.raises(CacheInUseError, match="owned by another running process"):
        ProcessDir(tmp_path / "cache", name="sidecar-abc")
    (first.path / "x").mkdir()
    first.close()  # kept at exit: the server may still re-read the copies
    assert (first.path / "x").is_dir()
    second = ProcessDir(tmp_path / "cache", name="sidecar-abc")
    assert (second.path / "x").is_dir()
    second.close()


def test_a_copy_claimed_again_is_not_deleted_by_a_deletion_decided_before(
    tmp_path: Path,
) -> None:
    """Run 1 of bench/scale.py: a lazy name reloaded while another load made room got its
    copy deleted between ``prepare`` and vLLM's load (vLLM 404, remembered as a refusal)."""
    registry, _, rec = make_reconciler(tmp_path)
    registry.publish("n00", fake_adapter(tmp_path / "a", seed=1))
    cache = rec.cache
    path, _ = cache.prepare(registry, "n00", "v0001")
    cache.release(path)
    chosen = list(cache._released)  # make_room()/collect() in another thread picked it ...
    again, _ = cache.prepare(registry, "n00", "v0001")  # ... while a load claimed it again
    assert again == path
    for p in chosen:
        cache.delete_if_released(p)
    assert path.is_dir()  # still there for vLLM to load


# -- verify once, read once, the served dtype --------------------------------------------------
def _nan_weights(folder: Path) -> None:
    """Put a NaN into the adapter's first float32 value (as a diverged training would)."""
    from agent_finetune.registry.adapter import read_safetensors

    weights = folder / "adapter_model.safetensors"
    header = read_safetensors(weights)
    first = min(header.tensors.values(), key=lambda t: t.start)
    data = bytearray(weights.read_bytes())
    at = header.data_start + first.start
    data[at : at + 4] = struct.pack("<f", float("nan"))
    weights.write_bytes(bytes(data))


def test_a_published_version_is_scanned_once_and_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server repeated publish's NaN/Inf scan and read every file twice (copy, then
    sha256): it now hashes while copying and trusts the scan publish recorded for bytes
    whose sha256 it checked itself."""
    registry, _, rec = make_reconciler(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a"))
    scans: list[Path] = []
    reads: list[str] = []
    real_count, real_open = adapter_module.count_nonfinite, Path.open
    monkeypatch.setattr(
        adapter_module,
        "count_nonfinite",
        lambda path, header: scans.append(path) or real_count(path, header),
    )

    def spy_open(self: Path, *a: Any, **kw: Any) -> Any:
        if self.name == "adapter_model.safetensors" and "registry" in self.parts:
            reads.append(str(self))
        return real_open(self, *a, **kw)

    monkeypatch.setattr(Path, "open", spy_open)
    rec.cache.prepare(registry, "x", "v0001")
    assert scans == [] and len(reads) == 1


def test_a_version_no_publish_scanned_is_scanned_and_nan_weights_are_refused(
    tmp_path: Path,
) -> None:
    """Trusting publish's scan must not let through a version written without one (an
    older or foreign writer) or bytes changed after publish."""
    registry, _, rec = make_reconciler(tmp_path)
    bad = fake_adapter(tmp_path / "bad", seed=3)
    _nan_weights(bad)
    write_version(registry, "raw", bad)  # no checks record: the server scans
    with pytest.raises(ValidationError, match="NaN/Inf"):
        rec.cache.prepare(registry, "raw", "v0001")
    registry.publish("x", fake_adapter(tmp_path / "good", seed=4))  # scanned at publish
    _nan_weights(registry.version_dir("x", "v0001"))  # then changed on disk
    with pytest.raises(ValidationError) as e:
        rec.cache.prepare(registry, "x", "v0001")
    assert "sha256 does not match" in str(e.value) and "NaN/Inf" in str(e.value)


@pytest.mark.parametrize("source", [np.float32, np.float16])
def test_the_copy_is_written_in_the_served_dtype_as_vllm_would_cast_it(
    tmp_path: Path, source: Any
) -> None:
    """vLLM casts every LoRA tensor to its lora_dtype inside the engine loop on each load;
    the copy holds the weights in that dtype already, bit for bit what vLLM computes."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    registry, _, rec = make_reconciler(tmp_path)
    rec.cache.limits = replace(rec.cache.limits, served_dtype="BF16")
    src = write_adapter(
        tmp_path / "a",
        r=8,
        layers=1,
        base_model="fake-base",
        base_config=FAKE_BASE_CONFIG,
        dtype=source,
    )
    registry.publish("x", src)
    path, _ = rec.cache.prepare(registry, "x", "v0001")
    served = load_file(str(path / "adapter_model.safetensors"))
    original = load_file(str(src / "adapter_model.safetensors"))
    assert served.keys() == original.keys()
    for k, v in original.items():
        assert served[k].dtype == torch.bfloat16
        assert torch.equal(served[k], v.to(torch.bfloat16))
    # fp16 is left to vLLM: a narrowing cast could overflow
    assert not served_dtype.needs_cast(path / "adapter_model.safetensors", "F16")
