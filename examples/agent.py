"""An agent built on the OpenAI SDK that picks adapters by role (configs/agent.yaml).

    python examples/agent.py "What are your support hours?"
    python examples/agent.py --watch 60 "What are your support hours?"

Each role names an adapter; the agent sends it as ``model``. The server answers with that
adapter's *current* version, so publishing or rolling back changes the answer without any
change here. A role with ``version: v0002`` is sent as ``model="support-bot@v0002"`` and keeps
that exact version whatever is current.

During a swap or rollback nothing fails: a request admitted before the pointer moved
finishes on the old version, the next one gets the new version. Each response's ``model``
field names the version that answered (``support-bot@v0002``). ``--watch`` shows this: it
asks every half second and prints a line whenever a role's answer changes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent_finetune.cli.agent_config import AgentConfig, RoleConfig
from agent_finetune.errors import ConfigError
from agent_finetune.registry.names import openai_base_url


def answer(client: openai.OpenAI, role: RoleConfig, question: str) -> tuple[str, str]:
    """(reply, the version that produced it, e.g. ``support-bot@v0002``)."""
    messages = [{"role": "system", "content": role.system_prompt}] if role.system_prompt else []
    messages.append({"role": "user", "content": question})
    resp = client.chat.completions.create(
        model=role.model,  # "support-bot" or "support-bot@v0001"
        messages=messages,  # type: ignore[arg-type]
        temperature=role.temperature,
        max_tokens=role.max_tokens,
    )
    return resp.choices[0].message.content or "", resp.model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("question")
    p.add_argument(
        "--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "agent.yaml")
    )
    p.add_argument("--server", help="override the config's server URL")
    p.add_argument("--watch", type=float, default=0, help="keep asking for N seconds")
    a = p.parse_args()
    try:
        config = AgentConfig.from_yaml(a.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    base_url = openai_base_url(a.server or config.server)  # with or without /v1
    client = openai.OpenAI(base_url=base_url, api_key=config.api_key, max_retries=0)

    last: dict[str, str] = {}
    deadline = time.monotonic() + a.watch
    while True:
        for name, role in config.roles.items():
            try:
                text, served_by = answer(client, role, a.question)
            except openai.NotFoundError:
                text, served_by = f"<{role.model} is not served>", "-"
            except openai.APIConnectionError:
                print(
                    f"error: cannot reach {base_url}: is the server running? Start one with "
                    "`agent-finetune serve --model M --registry DIR`, or pass --server URL",
                    file=sys.stderr,
                )
                return 1
            if last.get(name) != text:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {name} ({role.model}, answered by "
                    f"{served_by}): {text}",
                    flush=True,
                )
                last[name] = text
        if time.monotonic() >= deadline:
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
