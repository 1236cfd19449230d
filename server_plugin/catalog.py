"""The registry's names and versions as the reconcile loop last saw them.

What a request asks about the registry (does this pinned version exist? which versions does
this name have, for a 404 or ``/v1/models``?) is answered from here, never by scanning the
registry root per request: at 10,000 names a scan costs hundreds of milliseconds, and an
unknown model is client input. Each pass replaces the names and the stamp of each name's
``versions/`` folder (``registry.index.pointers``); a name's version list is read once per
stamp, on first use, so the filesystem watcher (which wakes a pass) invalidates it. A stamp
younger than ``RACY_NS`` is not trusted (two publishes in one mtime tick). Only registry
names are ever keys here: the memory is bounded by the registry, not by requests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from agent_finetune.errors import RegistryError
from agent_finetune.registry import Registry
from agent_finetune.registry.index import RACY_NS, Pointer
from agent_finetune.registry.layout import VERSIONS


class Catalog:
    """Names, current versions and version lists, as of the last pass."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._pointers: dict[str, Pointer] = {}
        self._names: list[str] = []
        self._versions: dict[str, tuple[tuple[int, int] | None, list[str]]] = {}

    def update(self, found: Mapping[str, Pointer]) -> None:
        """What a pass read (name -> pointer); version lists whose folder changed go."""
        versions = {  # list(): request threads may add entries meanwhile
            n: cached
            for n, cached in list(self._versions.items())
            if n in found and found[n].versions_stamp == cached[0]
        }
        # Replaced whole: request threads read these meanwhile.
        self._pointers, self._names, self._versions = dict(found), sorted(found), versions

    def names(self) -> list[str]:
        return self._names

    def knows(self, name: str) -> bool:
        return name in self._pointers

    def current(self, name: str) -> str | None:
        pointer = self._pointers.get(name)
        return pointer.version if pointer is not None else None

    def versions(self, name: str) -> list[str]:
        """``name``'s published versions, oldest first ([] for a name the pass did not see).
        Blocking file IO on a miss: async callers run it in a thread."""
        pointer = self._pointers.get(name)
        if pointer is None:
            return []
        stamp = pointer.versions_stamp
        cached = self._versions.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            found = self.registry.versions(name)
        except (RegistryError, OSError):
            return []
        if stamp is not None and time.time_ns() - stamp[1] > RACY_NS:
            self._versions[name] = (stamp, found)
        return found

    def has_version(self, name: str, version: str) -> bool:
        """Whether ``name@version`` is published: from the list as of the last pass, or,
        when it is not in it, after one ``stat`` of the name's ``versions/`` folder shows a
        publish since (a pinned request right after a publish, before the pass that the
        publish wakes: it got vLLM's 404). Blocking file IO; never a scan of the root."""
        if version in self.versions(name):
            return True
        pointer = self._pointers.get(name)
        if pointer is None:
            return False
        try:
            st = os.stat(self.registry.name_dir(name) / VERSIONS)
            if (st.st_ino, st.st_mtime_ns) == pointer.versions_stamp:
                return False
            return version in self.registry.versions(name)
        except (RegistryError, OSError):
            return False
