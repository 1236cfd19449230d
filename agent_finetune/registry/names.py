"""The naming grammar: adapter names, versions and the OpenAI ``model`` string ``name@vNNNN``.

One home for these rules, so the registry, the CLI and the server plugin can never disagree.
"""

from __future__ import annotations

import datetime as _dt
import re

from agent_finetune.errors import InvalidNameError

ENV_REGISTRY = "AGENT_FINETUNE_REGISTRY"
"""Environment variable naming the registry folder, read by every command and the plugin."""

# re.ASCII and fullmatch: "\d" would accept non-ASCII digits and "$" a trailing newline.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
VERSION_RE = re.compile(r"v(\d{4,})", re.ASCII)
PIN_SEPARATOR = "@"


def is_name(name: object) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name not in {".", ".."}


def is_version(version: object) -> bool:
    return isinstance(version, str) and bool(VERSION_RE.fullmatch(version))


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise InvalidNameError."""
    if not is_name(name):
        raise InvalidNameError(
            f"invalid adapter name {name!r}: use 1-64 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    """Return ``version`` if it looks like vNNNN (4+ digits), else raise InvalidNameError."""
    if not is_version(version):
        raise InvalidNameError(
            f"invalid version {version!r}: expected 'v' and 4+ digits, e.g. v0001"
        )
    return version


def format_version(n: int) -> str:
    """``3`` -> ``"v0003"``."""
    return f"v{n:04d}"


def version_number(version: str | None) -> int:
    """``"v0003"`` -> ``3``; ``None`` -> ``0`` (before the first version)."""
    return int(check_version(version)[1:]) if version else 0


def model_id(name: str, version: str | None = None) -> str:
    """The OpenAI ``model`` string: ``name`` (adapter or base model) or ``name@vNNNN``."""
    if not version:
        return name
    return f"{check_name(name)}{PIN_SEPARATOR}{check_version(version)}"


def split_model(model: str) -> tuple[str, str] | None:
    """``"name@v0002"`` -> ``("name", "v0002")``; None for anything else."""
    name, sep, version = model.partition(PIN_SEPARATOR)
    if sep and is_name(name) and is_version(version):
        return name, version
    return None


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with milliseconds, as written in history and status."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def server_root(url: str) -> str:
    """A server URL given with or without ``/v1`` -> the server's root (``http://h:8000``).

    The one rule for every ``--server`` and ``server:`` setting: both forms are accepted.
    """
    return url.strip().rstrip("/").removesuffix("/v1").rstrip("/")


def openai_base_url(url: str) -> str:
    """A server URL given with or without ``/v1`` -> the OpenAI base URL (``.../v1``)."""
    return server_root(url) + "/v1"
