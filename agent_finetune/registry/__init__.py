"""The registry: the on-disk contract that training writes and the server reads.

Standard library only (safetensors headers are parsed by hand; numpy is imported by the
NaN/Inf scan alone), so the CLI and the vLLM plugin import it fast. One concept per module:

- ``store``: the folder layout: versions, the ``current`` pointer, history, locks;
- ``adapter``: the PEFT folder format and what vLLM can serve;
- ``names``: the ``name@vNNNN`` grammar and the registry environment variable;
- ``index``: a rebuildable listing cache (``.index.json``) for ``list`` at thousands of names;
- ``fsck``: finding and repairing crash leftovers and damage;
- ``eval_records``: append-only evaluation records per version;
- ``canary_state``: canary state beside ``current`` (version, weight, guards).
"""

from agent_finetune.registry.names import (
    ENV_REGISTRY,
    check_name,
    check_version,
    model_id,
    split_model,
)
from agent_finetune.registry.store import (
    CURRENT,
    MANIFEST,
    Registry,
    VersionInfo,
    verify_checksums,
    verify_folder,
)

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
