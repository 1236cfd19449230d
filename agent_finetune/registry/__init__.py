"""The registry: the on-disk contract that training writes and the server reads.

Standard library only (safetensors headers are parsed by hand; numpy is imported by the
NaN/Inf scan alone), so the CLI and the vLLM plugin import it fast. One concept per module:

- ``layout``: the on-disk names of every file and folder;
- ``files``: the crash-safe primitives (atomic write, sealed JSONL append, flock, errors);
- ``store``: the ``Registry``: versions, the ``current`` pointer, history, locks;
- ``publish``: staging a publish (copy in, validate the copy, its manifest);
- ``manifest``: a version's manifest, sizes and sha256, and checking them;
- ``history``: what history entries mean (pointer moves, who wrote them);
- ``adapter``: the PEFT folder format and what vLLM can serve;
- ``names``: the ``name@vNNNN`` grammar and the registry environment variable;
- ``index``: a rebuildable listing cache (``.index.json``) for ``list`` at thousands of names;
- ``fsck``: finding and repairing crash leftovers and damage;
- ``eval_records``: append-only evaluation records per version;
- ``canary_state``: canary state beside ``current`` (version, weight, guards);
- ``rollout``: what the serving fleet shares about a rollout (answer ids, scores, counts);
- ``capture``: captured traffic (settings, per-replica segments, bounds, the feedback join).
"""

from agent_finetune.registry.layout import CURRENT, MANIFEST
from agent_finetune.registry.manifest import verify_checksums, verify_folder
from agent_finetune.registry.names import (
    ENV_REGISTRY,
    check_name,
    check_version,
    model_id,
    split_model,
)
from agent_finetune.registry.store import Registry, VersionInfo

__all__ = [
    "CURRENT",
    "ENV_REGISTRY",
    "MANIFEST",
    "Registry",
    "VersionInfo",
    "check_name",
    "check_version",
    "model_id",
    "split_model",
    "verify_checksums",
    "verify_folder",
]
