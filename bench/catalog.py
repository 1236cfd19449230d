"""What a request asks the registry, at 10,000 names: the code before (a scan per request)
against the catalog the reconcile loop keeps (``server_plugin.catalog``), side by side.

- ``404``: the text for an unknown model (``missing_model_message``), for an unknown name
  (it lists what exists) and for an unknown version of a known name;
- ``/v1/models``: the registry's part of the listing (``annotate_cards``: every version of
  every name), on no loaded adapter;
- ``unknown pins``: 1,000 distinct ``name@vNNNN`` of known names that do not exist (client
  input): before, one manifest stat each (remembered per model for one resync interval);
  now, a lookup in the catalog's version list.

The registry is built by cloning one published name (version files hard-linked), as
``bench/scale.py`` does. Each figure is the median of ``--repeats`` timed calls after one
call, reported apart (the catalog's first call reads each name's ``versions/`` once; the
next pass that sees a folder change invalidates only that name's list).

    PYTHONPATH=$PWD .venv/bin/python bench/catalog.py --names 10000 --json bench/catalog.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry_ops import _tiny_adapter
from scale import clone_names, name_of

from agent_finetune.registry import Registry
from agent_finetune.registry.index import pointers
from agent_finetune.registry.names import PIN_SEPARATOR, is_name, model_id, split_model
from server_plugin.answers import missing_model_message
from server_plugin.catalog import Catalog
from server_plugin.listing import annotate_cards


# -- the code before, kept here as the baseline ----------------------------------------
def scan_404(registry: Registry, model: str) -> str:
    parsed = split_model(model)
    name = parsed[0] if parsed else model.partition(PIN_SEPARATOR)[0]
    if is_name(name) and registry.versions(name):
        versions = registry.versions(name)
        return f"{name} has {', '.join(versions)} (current: {registry.current(name)})"
    names = registry.names()
    return ", ".join(names[:20])


def scan_listing(registry: Registry) -> int:
    return sum(1 for name in registry.names() for v in registry.versions(name) if model_id(name, v))


def scan_unknown_pin(registry: Registry, name: str, version: str) -> bool:
    try:
        (registry.version_dir(name, version) / "manifest.json").stat()
    except OSError:
        return False
    return True


# -- timing ---------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(the first call's seconds, the median of ``repeats`` more)."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def run(n_names: int, repeats: int, work: Path) -> list[dict[str, Any]]:
    registry = Registry(work / "registry")
    if not registry.names():
        registry.publish(name_of(0), _tiny_adapter(work / "adapter"))
    clone_names(registry, name_of(0), 1, n_names)
    old = time.time() - 60  # the catalog trusts folder stamps past the racy window
    for name in registry.names():
        os.utime(registry.name_dir(name) / "versions", (old, old))
    catalog = Catalog(registry)
    catalog.update(pointers(registry))
    base = {"id": "base", "object": "model", "root": "/m", "parent": None}
    known = name_of(n_names // 2)
    pins = [f"{name_of(i % n_names)}@v{9000 + i:04d}" for i in range(1000)]
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "404, unknown name",
            lambda: scan_404(registry, "nobody"),
            lambda: missing_model_message(catalog, "nobody"),
        ),
        (
            "404, unknown version of a name",
            lambda: scan_404(registry, f"{known}@v0099"),
            lambda: missing_model_message(catalog, f"{known}@v0099"),
        ),
        (
            "/v1/models (registry part)",
            lambda: scan_listing(registry),
            lambda: annotate_cards([base], {}, catalog, "base"),
        ),
        (
            "1,000 unknown pins",
            lambda: [scan_unknown_pin(registry, *p.split("@")) for p in pins],
            lambda: [p.split("@")[1] in catalog.versions(p.split("@")[0]) for p in pins],
        ),
    ]
    rows = []
    for what, before, after in cases:
        (_, b), (first, a) = timed(before, repeats), timed(after, repeats)
        rows.append(
            {
                "request": what,
                "names": n_names,
                "scan_ms": b * 1e3,
                "catalog_first_ms": first * 1e3,
                "catalog_ms": a * 1e3,
                "speed_up": b / a if a else float("inf"),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--names", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=None, help="keep the registry here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.names, args.repeats, args.workdir or Path(tmp))
    print(
        f"{'request':34} {'names':>6} {'scan ms':>9} {'catalog 1st ms':>15} "
        f"{'catalog ms':>11} {'speed-up':>9}"
    )
    for r in rows:
        print(
            f"{r['request']:34} {r['names']:>6} {r['scan_ms']:>9.2f} "
            f"{r['catalog_first_ms']:>15.2f} {r['catalog_ms']:>11.3f} {r['speed_up']:>8.0f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
