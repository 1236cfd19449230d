"""The on-disk names of a registry: one place for every file and folder name.

::

    <root>/<name>/versions/vNNNN/   immutable: adapter files + manifest.json
    <root>/<name>/current           JSON pointer to the live version (atomic replace)
    <root>/<name>/history.jsonl     append-only log of every pointer move and decision
    <root>/<name>/canary            the running canary, beside current (atomic replace)
    <root>/<name>/evals.jsonl       append-only evaluation records
    <root>/<name>/rollout/          what the serving fleet shares (``registry.rollout``)
    <root>/<name>/capture/          captured traffic: settings.json and each server's
                                    segments (``registry.capture``, opt-in)
    <root>/<name>/.next-version     high-water mark: the next version number (under the lock)
    <root>/<name>/.staging-*        publishes in progress (flock'd by their writer)
    <root>/<name>/.quarantine/      versions ``fsck --repair`` moved out (checksums broken)
    <root>/<name>/.lock             serialises writers (version numbers, pointer moves,
                                    history, canary transitions)
    <root>/.agent-finetune-registry marker written by the first write: a root without it (an
                                    unmounted volume, a recreated folder) is not a registry
"""

from __future__ import annotations

MANIFEST = "manifest.json"
CURRENT = "current"
HISTORY = "history.jsonl"
VERSIONS = "versions"
CANARY = "canary"
EVALS = "evals.jsonl"
LOCK = ".lock"
NEXT_VERSION = ".next-version"
STAGING_PREFIX = ".staging-"
QUARANTINE = ".quarantine"
MARKER = ".agent-finetune-registry"
