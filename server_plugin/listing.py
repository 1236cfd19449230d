"""``/v1/models`` made readable: each card says how names and versions relate.

- an adapter name's card (``support-bot``) carries ``"version": "support-bot@v0002"``,
  the version it answers with now;
- a version's card (``support-bot@v0002``) carries ``"aliases": ["support-bot"]`` when a
  name points at it, and ``"loaded": true``;
- every published version that can be pinned is listed, ``"loaded": false`` until its
  first request loads it.

No vLLM import here: the plugin passes vLLM's cards as dicts and its name -> served-name map;
the registry's versions come from the reconcile loop's catalog (``server_plugin.catalog``),
not from a scan per request.
"""

from __future__ import annotations

import time
from typing import Any

from agent_finetune.registry.names import model_id
from server_plugin.catalog import Catalog

OWNER = "agent_finetune"


def annotate_cards(
    cards: list[dict[str, Any]],
    served_as: dict[str, str],
    catalog: Catalog | None,
    base_id: str | None,
) -> list[dict[str, Any]]:
    """vLLM's cards plus the name/version links, then the registry's unloaded versions.

    ``served_as`` maps each served adapter id to the versioned name it resolves to (a
    version maps to itself).
    """
    aliases: dict[str, list[str]] = {}
    for served, target in served_as.items():
        if served != target:
            aliases.setdefault(target, []).append(served)
    out = []
    for card in cards:
        card = dict(card)
        cid = card.get("id")
        if cid in served_as:
            if served_as[cid] != cid:
                card["version"] = served_as[cid]
            else:
                card["aliases"] = sorted(aliases.get(cid, []))
                card["loaded"] = True
        out.append(card)
    if catalog is None:
        return out
    listed = {c.get("id") for c in out}
    now = int(time.time())
    for name in catalog.names():
        for version in catalog.versions(name):
            vid = model_id(name, version)
            if vid not in listed:
                out.append(
                    {
                        "id": vid,
                        "object": "model",
                        "created": now,
                        "owned_by": OWNER,
                        "root": None,
                        "parent": base_id,
                        "aliases": [],
                        "loaded": False,
                    }
                )
    return out
