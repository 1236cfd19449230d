"""The registry under faults: kill -9, full disks, read-only filesystems, torn history,
concurrent writers, symlinks, hand edits. Nothing invalid is published, nothing published is
lost or rewritten, and every failure is a RegistryError that says what happened."""

from __future__ import annotations

import errno
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_finetune.errors import RegistryError, ValidationError
from agent_finetune.registry import Registry
from agent_finetune.registry import publish as publish_module
from agent_finetune.registry.eval_records import append_eval, read_evals
from agent_finetune.registry.fsck import fsck
from agent_finetune.registry.history import last_pointer_move, parse_history
from agent_finetune.training.numpy_adapter import write_adapter


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "adapter", layers=1)


def leftovers(reg: Registry) -> list[Path]:
    """Temp files and staging folders anywhere in the registry."""
    return [
        p for p in reg.root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging-")
    ]


def check_invariants(reg: Registry, name: str = "bot") -> None:
    """Every visible version verifies; current (if any) is one of them; no number reused."""
    versions = reg.versions(name)
    for v in versions:
        report = reg.verify(name, v)
        assert report.ok, (v, report.problems)
    cur = reg.current(name)
    assert cur is None or cur in versions
    published = [e["to"] for e in reg.history(name) if e.get("action") == "publish"]
    assert len(published) == len(set(published)), (
        f"a version number was published twice: {published}"
    )


def assert_repairable(reg: Registry) -> int:
    """fsck is clean, or repairs what it finds; afterwards the history has no bad line.

    Returns how many problems it repaired."""
    report = fsck(reg, repair=True)
    assert report.ok, [(str(f.path), f.problem) for f in report.remaining]
    assert fsck(reg).ok, [(str(f.path), f.problem) for f in fsck(reg).findings]
    for name in reg.names():
        assert parse_history(reg.history_text(name))[1] == []
        assert reg.current(name) in (None, last_pointer_move(reg.history(name)))
    return len(report.findings)


# -- reused numbers ----------------------------------------------------------------------------
def test_a_hand_deleted_newest_version_never_gives_its_number_again(
    reg: Registry, adapter: Path
) -> None:
    reg.publish("bot", adapter)
    reg.publish("bot", adapter)
    shutil.rmtree(reg.version_dir("bot", "v0002"))
    assert reg.publish("bot", adapter).version == "v0003"
    # Even with the high-water mark gone too, history still knows v0003 was used.
    shutil.rmtree(reg.version_dir("bot", "v0003"))
    (reg.name_dir("bot") / ".next-version").unlink()
    assert reg.publish("bot", adapter).version == "v0004"


def test_gc_never_frees_a_number(reg: Registry, adapter: Path) -> None:
    for _ in range(3):
        reg.publish("bot", adapter)
    reg.rollback("bot", to="v0001")
    reg.gc("bot", keep=1)  # deletes v0002 and keeps v0003 (newest) and v0001 (current)
    shutil.rmtree(reg.version_dir("bot", "v0003"))
    assert reg.publish("bot", adapter).version == "v0004"


# -- symlinks, size caps, allow-list, check-then-copy --------------------------------------------
@pytest.mark.parametrize(
    "fname", ["tokenizer.json", "adapter_model.safetensors", "adapter_config.json"]
)
def test_publish_refuses_symlinks(reg: Registry, adapter: Path, tmp_path: Path, fname: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes((adapter / fname).read_bytes() if (adapter / fname).exists() else b"root:x")
    (adapter / fname).unlink(missing_ok=True)
    (adapter / fname).symlink_to(secret)
    with pytest.raises(ValidationError, match="symbolic link"):
        reg.publish("bot", adapter)
    assert reg.versions("bot") == [] and not leftovers(reg)


def test_publish_copies_only_allowed_regular_files(reg: Registry, adapter: Path) -> None:
    (adapter / "tokenizer.json").write_text("{}")
    (adapter / "optimizer.pt").write_bytes(b"x" * 100)
    info = reg.publish("bot", adapter)
    assert sorted(p.name for p in info.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "tokenizer.json",
    ]
    os.mkfifo(adapter / "README.md")  # a FIFO would block a naive copy forever
    with pytest.raises(ValidationError, match="not a regular file"):
        reg.publish("bot", adapter)


def test_publish_enforces_a_size_cap(
    reg: Registry, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (adapter / "README.md").write_text("x" * 2000)
    monkeypatch.setattr(publish_module, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ValidationError, match="1,000-byte limit"):
        reg.publish("bot", adapter)
    assert reg.versions("bot") == [] and not leftovers(reg)


def test_what_is_validated_is_what_is_published(
    reg: Registry, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A concurrent writer swaps the source's weights right after validation: the published
    version must still be the validated bytes (the old code validated the source, then copied
    it again)."""
    garbage = write_adapter(tmp_path / "garbage", layers=1, r=2) / "adapter_model.safetensors"
    real = publish_module.validate_adapter

    def validate_then_swap(folder: Any, **kw: Any) -> Any:
        report = real(folder, **kw)
        shutil.copyfile(garbage, adapter / "adapter_model.safetensors")
        return report

    monkeypatch.setattr(publish_module, "validate_adapter", validate_then_swap)
    reg.publish("bot", adapter)
    monkeypatch.undo()
    check_invariants(reg)


# -- names and odd root entries ------------------------------------------------------------------
def test_one_unreadable_name_folder_does_not_hide_the_others(
    reg: Registry, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.publish("bot", adapter)
    reg.publish("locked", adapter)
    real_stat = os.stat

    def stat(path: Any, *a: Any, **kw: Any) -> Any:
        if "/locked" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(os, "stat", stat)
    assert reg.names() == ["bot"]
    assert [i.name for i in reg.entries()] == ["bot"]


def test_a_name_symlinked_out_of_the_root_does_not_break_listing(
    reg: Registry, adapter: Path, tmp_path: Path
) -> None:
    reg.publish("bot", adapter)
    outside = tmp_path / "outside"
    shutil.copytree(reg.name_dir("bot"), outside)
    (reg.root / "evil").symlink_to(outside)
    assert reg.names() == ["bot"]
    assert [i.name for i in reg.entries()] == ["bot"]
    assert any("symlink out of the registry root" in f.problem for f in fsck(reg).findings)


# -- torn history ----------------------------------------------------------------------------------
def test_torn_history_line_then_promote_and_rollback(reg: Registry, adapter: Path) -> None:
    for _ in range(4):
        reg.publish("bot", adapter, make_current=False)
    reg.promote("bot", "v0001")
    reg.promote("bot", "v0002")
    reg.promote("bot", "v0003")
    # The writer of the v0003 move died mid-append: its line is torn (no newline).
    path = reg.name_dir("bot") / "history.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])
    reg.promote("bot", "v0004")
    assert reg.history("bot")[-1]["to"] == "v0004"  # not glued to the torn line
    assert reg.rollback("bot") == "v0003"  # the move the torn line recorded is not lost
    assert reg.rollback("bot") == "v0004"  # one rule: a rollback undoes the last move
    assert reg.rollback("bot", to="v0002") == "v0002"
    assert_repairable(reg)


def test_torn_history_tail_then_publish(reg: Registry, adapter: Path) -> None:
    reg.publish("bot", adapter)
    path = reg.name_dir("bot") / "history.jsonl"
    path.write_bytes(path.read_bytes() + b'{"action": "prom')
    reg.publish("bot", adapter)
    moves = [(e["action"], e["to"]) for e in reg.history("bot")]
    assert moves[-2:] == [("publish", "v0002"), ("promote", "v0002")]


# -- durability order: what each rename makes visible was fsync'd before it -------------------
class SyncLog:
    """Records fsyncs (by path), renames and appends, in the order the OS saw them (fsyncs
    from ``sync_all``'s threads included)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.paths: dict[int, str] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_fsync = os.open, os.fsync
        real_rename, real_replace, real_write = os.rename, os.replace, os.write

        def open_(path: Any, flags: int, *a: Any, **kw: Any) -> int:
            fd = real_open(path, flags, *a, **kw)
            self.paths[fd] = os.fspath(path)
            return fd

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.events.append(("fsync", self.paths[fd], ""))

        def rename(src: Any, dst: Any) -> None:
            real_rename(src, dst)
            self.events.append(("rename", os.fspath(src), os.fspath(dst)))

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            self.events.append(("rename", os.fspath(src), os.fspath(dst)))

        def write(fd: int, data: Any) -> int:
            n = real_write(fd, data)
            if self.paths.get(fd, "").endswith("history.jsonl"):
                self.events.append(("append", self.paths[fd], bytes(data).decode()))
            return n

        for n, f in (("open", open_), ("fsync", fsync), ("rename", rename)):
            monkeypatch.setattr(os, n, f)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "write", write)

    def synced_before(self, i: int) -> set[str]:
        return {p for kind, p, _ in self.events[:i] if kind == "fsync"}

    def index(self, kind: str, pred: Callable[[str, str], bool]) -> int:
        return next(i for i, (k, a, b) in enumerate(self.events) if k == kind and pred(a, b))


def test_publish_makes_every_write_durable_before_the_step_that_depends_on_it(
    reg: Registry, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publish's fsyncs run concurrently now (4 rounds of waiting instead of 11): the same
    writes must still be durable in the same order: the version's files, manifest and folder
    before its rename; the version folder and the pointer's temp file before the pointer's
    rename; the name folder (the pointer's rename) before the history lines; those last."""
    reg.publish("bot", adapter)
    log = SyncLog()
    with monkeypatch.context() as m:
        log.install(m)
        reg.publish("bot", adapter)
    ndir = str(reg.name_dir("bot"))
    placed = log.index("rename", lambda a, b: b == f"{ndir}/versions/v0002")
    staging = log.events[placed][1]
    done = log.synced_before(placed)
    staged = [f"{staging}/{f}" for f in os.listdir(f"{ndir}/versions/v0002")]
    assert set(staged) | {staging} <= done, sorted(set(staged) - done)
    assert "manifest.json" in os.listdir(f"{ndir}/versions/v0002")
    moved = log.index("rename", lambda a, b: b == f"{ndir}/current")
    done = log.synced_before(moved)
    assert {log.events[moved][1], f"{ndir}/versions"} <= done
    appended = log.index("append", lambda a, b: True)
    assert ndir in log.synced_before(appended)
    lines = [b for k, _, b in log.events if k == "append"]
    assert [json.loads(x)["action"] for x in "".join(lines).splitlines()] == ["publish", "promote"]
    assert log.events[-1][:2] == ("fsync", f"{ndir}/history.jsonl")


# -- ENOSPC / EROFS at every write of publish and promote --------------------------------------
class FailAt:
    """Fail the k-th write-like os call (open for writing, write, fsync, replace, rename, mkdir)."""

    def __init__(self, k: int, err: int, *, sticky: bool = False) -> None:
        self.k, self.err, self.sticky, self.calls = k, err, sticky, 0

    def hit(self) -> None:
        self.calls += 1
        if self.calls == self.k or (self.sticky and self.calls > self.k > 0):
            raise OSError(self.err, os.strerror(self.err))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real: dict[str, Callable[..., Any]] = {
            n: getattr(os, n) for n in ("open", "write", "fsync", "replace", "rename", "mkdir")
        }
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def wrap(n: str) -> Callable[..., Any]:
            def call(*a: Any, **kw: Any) -> Any:
                if n != "open" or (a[1] if len(a) > 1 else kw.get("flags", 0)) & writing:
                    self.hit()
                return real[n](*a, **kw)

            return call

        for n in real:
            monkeypatch.setattr(os, n, wrap(n))


def _fail_at(
    k: int, err: int, monkeypatch: pytest.MonkeyPatch, op: Callable[[], object]
) -> str | None:
    """Run ``op`` with the k-th write failing; the RegistryError's message, or None."""
    with monkeypatch.context() as m:
        FailAt(k, err).install(m)
        try:
            op()
        except RegistryError as e:
            return str(e)
    return None


def _count_calls(monkeypatch: pytest.MonkeyPatch, op: Callable[[], object]) -> int:
    counter = FailAt(0, errno.ENOSPC)
    with monkeypatch.context() as m:
        counter.install(m)
        op()
    return counter.calls


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_publish_fails_cleanly_at_every_write(
    tmp_path: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    base = Registry(tmp_path / "base")
    base.publish("bot", adapter)
    shutil.copytree(base.root, tmp_path / "probe")
    n = _count_calls(monkeypatch, lambda: Registry(tmp_path / "probe").publish("bot", adapter))
    assert n >= 10
    failures = 0
    for k in range(1, n + 1):
        root = tmp_path / f"r{k}"
        shutil.copytree(base.root, root)
        reg = Registry(root)
        msg = _fail_at(k, err, monkeypatch, lambda reg=reg: reg.publish("bot", adapter))
        assert not leftovers(reg), (k, leftovers(reg))
        if msg is None:  # e.g. mkdir of a folder that exists: the failure does not matter
            assert reg.current("bot") == "v0002"
            continue
        failures += 1
        assert f"errno {err} {errno.errorcode[err]}" in msg and str(root) in msg, msg
        if "current now points to v0002" in msg:
            assert reg.current("bot") == "v0002"
        else:
            assert reg.current("bot") in ("v0001", "v0002")
        check_invariants(reg)
        assert_repairable(reg)
        before = set(reg.versions("bot"))
        assert reg.publish("bot", adapter).version not in before | {"v0001"}
        check_invariants(reg)
    assert failures >= n - 2


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("op", ["promote", "rollback"])
def test_promote_and_rollback_fail_cleanly_at_every_write(
    tmp_path: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch, err: int, op: str
) -> None:
    base = Registry(tmp_path / "base")
    for _ in range(3):
        base.publish("bot", adapter)

    def run(reg: Registry) -> str:
        return reg.promote("bot", "v0001") if op == "promote" else reg.rollback("bot")

    target = "v0001" if op == "promote" else "v0002"
    probe = tmp_path / "probe"
    shutil.copytree(base.root, probe)
    n = _count_calls(monkeypatch, lambda: run(Registry(probe)))
    assert n >= 5
    failures = 0
    for k in range(1, n + 1):
        root = tmp_path / f"r{k}"
        shutil.copytree(base.root, root)
        reg = Registry(root)
        msg = _fail_at(k, err, monkeypatch, lambda reg=reg: run(reg))
        assert not leftovers(reg)
        if msg is None:
            assert reg.current("bot") == target
            continue
        failures += 1
        assert f"errno {err}" in msg and str(root) in msg, msg
        moved = reg.current("bot") == target
        assert moved == (f"current now points to {target}" in msg), (k, msg)
        assert reg.current("bot") in ("v0003", target)
        # The next move records an interrupted one, so rollback still walks the true path.
        reg.promote("bot", "v0003")
        assert reg.rollback("bot") == (target if moved else "v0002")
        check_invariants(reg)
        assert_repairable(reg)
    assert failures >= n - 2


def test_cli_turns_a_read_only_registry_into_an_error_not_a_traceback(
    tmp_path: Path,
    adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent_finetune.cli import main

    reg = Registry(tmp_path / "r")
    reg.publish("bot", adapter)
    reg.publish("bot", adapter)
    with monkeypatch.context() as m:
        FailAt(1, errno.EROFS, sticky=True).install(m)  # every write fails
        code = main(["promote", "bot", "v0001", "--registry", str(reg.root)])
    err = capsys.readouterr().err
    assert code == 1 and "read-only" in err and "errno 30" in err and "Traceback" not in err


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_append_eval_fails_cleanly_at_every_write(
    tmp_path: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """The evals log is written like history: every failure is a RegistryError naming the
    file and errno (it was a raw OSError), and no record already there is lost."""
    base = Registry(tmp_path / "base")
    base.publish("bot", adapter)
    append_eval(base, "bot", {"version": "v0001", "metrics": {"loglik": -1.0}})
    record = {"version": "v0001", "metrics": {"loglik": -0.5}}
    probe = tmp_path / "probe"
    shutil.copytree(base.root, probe)
    n = _count_calls(monkeypatch, lambda: append_eval(Registry(probe), "bot", record))
    assert n >= 2  # open for append, write, fsync
    for k in range(1, n + 1):
        root = tmp_path / f"r{k}"
        shutil.copytree(base.root, root)
        reg = Registry(root)
        msg = _fail_at(k, err, monkeypatch, lambda reg=reg: append_eval(reg, "bot", record))
        assert msg is not None and f"errno {err}" in msg and "evals.jsonl" in msg, (k, msg)
        assert read_evals(reg, "bot")[0]["metrics"]["loglik"] == -1.0
        append_eval(reg, "bot", record)  # the disk has room again: the next record lands
        assert read_evals(reg, "bot")[-1]["metrics"] == {"loglik": -0.5}


def test_a_torn_eval_line_never_swallows_the_next_record(reg: Registry, adapter: Path) -> None:
    """A writer killed mid-line left no newline: the next record was glued to it and lost."""
    reg.publish("bot", adapter)
    append_eval(reg, "bot", {"version": "v0001", "metrics": {"loglik": -2.0}})
    path = reg.name_dir("bot") / "evals.jsonl"
    path.write_bytes(path.read_bytes() + b'{"version": "v0001", "metr')
    append_eval(reg, "bot", {"version": "v0001", "metrics": {"loglik": -1.0}})
    assert [e["metrics"]["loglik"] for e in read_evals(reg, "bot")] == [-2.0, -1.0]


def test_the_evals_log_is_never_written_through_a_symlink(
    reg: Registry, adapter: Path, tmp_path: Path
) -> None:
    reg.publish("bot", adapter)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me\n")
    (reg.name_dir("bot") / "evals.jsonl").symlink_to(elsewhere)
    with pytest.raises(RegistryError, match=r"evals\.jsonl"):
        append_eval(reg, "bot", {"version": "v0001"})
    assert elsewhere.read_text() == "keep me\n"


# -- kill -9 at random points ---------------------------------------------------------------
def _churn(root: Path, adapter: Path, seed: int) -> None:
    """Publish, promote, roll back and gc at random, forever (until killed)."""
    rng = random.Random(seed)
    reg = Registry(root)
    while True:
        versions = reg.versions("bot")
        op = rng.random()
        try:
            if op < 0.4 or not versions:
                reg.publish("bot", adapter, make_current=rng.random() < 0.7)
            elif op < 0.7:
                reg.promote("bot", rng.choice(versions))
            elif op < 0.95:
                reg.rollback("bot")
            else:
                reg.gc("bot", keep=4)
        except RegistryError:
            pass  # e.g. nothing to roll back to


def _fork(target: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            target()
        finally:
            os._exit(0)
    return pid


@pytest.mark.slow
def test_kill_9_at_random_points_never_breaks_the_registry(reg: Registry, adapter: Path) -> None:
    rng = random.Random(9)
    reg.publish("bot", adapter)
    kills = repaired = 0
    for i in range(110):
        pid = _fork(lambda i=i: _churn(reg.root, adapter, seed=i))  # type: ignore[misc]
        time.sleep(rng.uniform(0.001, 0.15))  # a publish takes ~0.1 s here (fsyncs)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        if i % 20 == 19:
            check_invariants(reg)
            repaired += assert_repairable(reg)
    assert kills >= 100 and repaired > 0  # some kills left debris that fsck repaired
    check_invariants(reg)
    assert_repairable(reg)
    assert len(reg.history("bot")) > 50  # the children did real work between kills


# -- concurrent writers ---------------------------------------------------------------------
def _promote_and_roll_back(root: str, seed: int, n: int) -> int:
    rng = random.Random(seed)
    reg = Registry(root)
    done = 0
    for _ in range(n):
        try:
            if rng.random() < 0.5:
                reg.promote("bot", rng.choice(reg.versions("bot")))
            else:
                reg.rollback("bot")
            done += 1
        except RegistryError:
            pass
    return done


def test_four_processes_promoting_and_rolling_back_at_once(reg: Registry, adapter: Path) -> None:
    for _ in range(4):
        reg.publish("bot", adapter)
    moves_before = [e for e in reg.history("bot") if e["action"] in ("promote", "rollback")]
    with mp.get_context("fork").Pool(4) as pool:
        done = pool.starmap(_promote_and_roll_back, [(str(reg.root), s, 25) for s in range(4)])
    text = reg.history_text("bot")
    entries, bad = parse_history(text)
    assert bad == [] and text.endswith("\n")
    moves = [e for e in entries if e["action"] in ("promote", "rollback")]
    # Every move that changed the pointer is logged (a no-op move writes nothing), so at most
    # one entry per successful call; none lost, or the chain below would break.
    assert sum(done) >= len(moves) - len(moves_before) > 50
    # Serialised by the lock: each move starts where the previous one ended.
    for prev, nxt in itertools.pairwise(moves):
        assert nxt["from"] == prev["to"], (prev, nxt)
    assert reg.current("bot") == moves[-1]["to"]
    check_invariants(reg)
    assert fsck(reg).ok


# -- verify once: promote and rollback trust what publish checked of unchanged files ----------
def test_promote_verifies_once_and_still_refuses_changed_bytes(
    tmp_path: Path, reg: Registry, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promote and rollback hashed and scanned every file publish had just checked (an 81 MB
    adapter: ~140 ms of a 170 ms promote on the H200 host). Unchanged files (inode, size,
    mtime as publish recorded them) are trusted now; any write is caught as before."""
    from agent_finetune.registry import adapter as adapter_module
    from agent_finetune.registry import manifest as manifest_module

    reg.publish("bot", adapter)
    reg.publish("bot", adapter, make_current=False)
    hashed: list[str] = []
    scanned: list[Path] = []
    real_sha, real_scan = manifest_module.sha256_file, adapter_module.count_nonfinite
    monkeypatch.setattr(
        manifest_module, "sha256_file", lambda p: hashed.append(p.name) or real_sha(p)
    )
    monkeypatch.setattr(
        adapter_module, "count_nonfinite", lambda p, h: scanned.append(p) or real_scan(p, h)
    )
    reg.promote("bot", "v0002")
    reg.rollback("bot")
    assert hashed == [] and scanned == []
    assert not fsck(reg).findings  # fsck still reads everything
    weights = reg.version_dir("bot", "v0002") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # a write moves the stamp
    with pytest.raises(ValidationError, match="sha256 does not match"):
        reg.promote("bot", "v0002")
    assert "adapter_model.safetensors" in hashed and reg.current("bot") == "v0001"
    copied = Registry(tmp_path / "copy")
    shutil.copytree(reg.root, copied.root)  # new inodes: hashed again, and fine
    hashed.clear()
    copied.promote("bot", "v0001", reason="again")
    with pytest.raises(ValidationError):
        copied.promote("bot", "v0002")
    assert hashed
