"""Staging a publish: copy an adapter folder in, validate the copy, write its manifest.

Regular files only (never through a symlink, never a FIFO, each under a size cap) are
copied into a staging folder beside ``versions/``; the STAGED copy is validated and
checksummed, so what was checked is what gets published. Each file's sha256 is computed from
the bytes as they are written (one read of the source), and the manifest records what was
checked (``manifest.checks_record``), so a server that verifies the sha256 of the bytes it
loads need not scan them again. ``Registry.publish`` then numbers it and renames it into
place under the name's lock; the staged files are fsync'd there, all at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_finetune._version import __version__
from agent_finetune.errors import RegistryError, ValidationError
from agent_finetune.registry.adapter import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    read_adapter_config,
    validate_adapter,
)
from agent_finetune.registry.files import (
    O_CLOEXEC,
    O_NOFOLLOW,
    io_errors,
    locked,
    os_error,
    write_all,
)
from agent_finetune.registry.layout import STAGING_PREFIX
from agent_finetune.registry.manifest import MANIFEST_FORMAT, checks_record
from agent_finetune.registry.names import utc_now

# Files copied from an adapter folder besides the two PEFT files: tokenizer files make a
# version self-contained for `load_model_and_tokenizer`; vLLM ignores them. Anything else in
# the folder (checkpoints, optimizer state) is not copied.
EXTRA_FILES = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "agent_finetune_format.json",
)
# Per-file size caps for publish: a 7B r=256 all-linear adapter in fp32 is ~2.6 GB.
MAX_WEIGHTS_BYTES = 16 << 30
MAX_FILE_BYTES = 64 << 20


@contextlib.contextmanager
def staging_folder(ndir: Path) -> Iterator[Path]:
    """A new ``.staging-*`` folder in ``ndir``, flock'd while the block runs (``fsck``
    removes only staging folders nobody holds), removed afterwards unless renamed away."""
    staging = ndir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    with io_errors("create", staging):
        staging.mkdir()
    try:
        with locked(staging, create=False) as fd:
            if os.fstat(fd).st_nlink == 0:  # `fsck --repair` took it before our flock
                raise RegistryError(f"{staging} was removed by a concurrent fsck; publish again")
            yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def copy_regular_file(src: Path, dest: Path, cap: int, *, sync: bool = True) -> dict[str, Any]:
    """Copy ``src`` (a regular file, never a symlink, at most ``cap`` bytes) to new ``dest``;
    return its manifest entry (sha256 and size of the bytes written). ``sync=False``: not
    fsync'd here (the caller syncs ``dest`` before publishing it)."""
    try:
        fd = os.open(src, os.O_RDONLY | O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValidationError(
                f"{src} is a symbolic link; publish copies regular files only "
                "(replace the link with the file itself, e.g. cp -L)",
                [f"{src.name}: symbolic link"],
            ) from None
        raise os_error(e, "read", src) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(
                f"{src} is not a regular file; publish copies regular files only",
                [f"{src.name}: not a regular file"],
            )
        too_big = ValidationError(
            f"{src} is larger than the {cap:,}-byte limit for {src.name}; is it the right file?",
            [f"{src.name}: over {cap} bytes"],
        )
        if st.st_size > cap:
            raise too_big
        with io_errors("write", dest):
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC)
            try:
                copied = 0
                digest = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    copied += len(chunk)
                    if copied > cap:  # it grew while we copied
                        raise too_big
                    digest.update(chunk)
                    write_all(out, chunk)
                if sync:
                    os.fsync(out)
            finally:
                os.close(out)
    except OSError as e:
        raise os_error(e, "read", src) from e
    finally:
        os.close(fd)
    return {"sha256": digest.hexdigest(), "size": copied}


def copy_in(src: Path, staging: Path) -> dict[str, dict[str, Any]]:
    """Copy the PEFT files and the allowed extras, not yet fsync'd; return the manifest's
    ``files`` (name -> sha256 and size of the bytes written)."""
    copied: dict[str, dict[str, Any]] = {}
    for fname in ADAPTER_FILES + EXTRA_FILES:
        if fname not in ADAPTER_FILES and not os.path.lexists(src / fname):
            continue
        if fname in ADAPTER_FILES and not os.path.lexists(src / fname):
            raise ValidationError(
                f"{src / fname}: missing; is {src} a PEFT adapter folder?",
                [f"{fname}: missing"],
            )
        cap = MAX_WEIGHTS_BYTES if fname == ADAPTER_WEIGHTS else MAX_FILE_BYTES
        copied[fname] = copy_regular_file(src / fname, staging / fname, cap, sync=False)
    return copied


def stage(
    name: str,
    src: Path,
    staging: Path,
    *,
    metadata: dict[str, Any] | None,
    max_rank: int | None,
    base_config: dict[str, Any] | None,
) -> dict[str, Any]:
    """Copy ``src`` into ``staging``, validate the copy, return its manifest (no version
    or parent yet: those are assigned under the lock). ValidationError names every problem.
    The staged files are not fsync'd yet: ``Registry.publish`` syncs them with the manifest."""
    files = copy_in(src, staging)
    report = validate_adapter(staging, max_rank=max_rank, base_config=base_config)
    if not report.ok:
        problems = [p.replace(str(staging), str(src)) for p in report.problems]
        raise ValidationError(
            f"{src} cannot be published as {name!r}:\n  - " + "\n  - ".join(problems),
            problems,
        )
    adapter_cfg = read_adapter_config(staging)
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "created_at": utc_now(),
        "tool_version": __version__,
        "base_model": adapter_cfg.get("base_model_name_or_path"),
        "lora": {
            "r": adapter_cfg.get("r"),
            "alpha": adapter_cfg.get("lora_alpha"),
            "target_modules": report.target_modules,
        },
        "source": str(src.absolute()),
        "files": files,
        "checks": checks_record(scanned=True),
        **(metadata or {}),
    }
