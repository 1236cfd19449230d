"""`agent-finetune ask NAME "prompt"`: one chat call to an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from agent_finetune.errors import AskError
from agent_finetune.registry.names import model_id, openai_base_url

DEFAULT_SERVER = "http://127.0.0.1:8000"


def ask(
    name: str,
    prompt: str,
    *,
    server: str = DEFAULT_SERVER,
    version: str | None = None,
    api_key: str | None = None,
    system: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    stream: bool = False,
    out: Any = None,
) -> str:
    """Send one chat message; return the reply (and print it as it streams to ``out``).

    Always the chat endpoint: it renders the prompt with the model's chat template, as
    training did (``/v1/completions`` would send the raw text). ``server`` may end in
    ``/v1`` or not.
    """
    import openai

    server = openai_base_url(server)
    client = openai.OpenAI(base_url=server, api_key=api_key or "EMPTY", max_retries=0, timeout=120)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    model = model_id(name, version)
    try:
        if not stream:
            resp = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=temperature
            )
            return resp.choices[0].message.content or ""
        parts = []
        for chunk in client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=True,
        ):
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                parts.append(delta)
                if out is not None:
                    out.write(delta)
                    out.flush()
        return "".join(parts)
    except openai.APIConnectionError:
        raise AskError(
            f"cannot reach {server}: is the server running? Start one with "
            "`agent-finetune serve --model M --registry DIR` or pass --server URL"
        ) from None
    except openai.NotFoundError:
        served = _served_models(client)
        raise AskError(
            f"{server} does not serve {model!r}; it serves: {', '.join(served) or 'nothing'}"
        ) from None
    except openai.AuthenticationError:
        raise AskError(
            f"{server} refused the API key; pass --api-key or set OPENAI_API_KEY"
        ) from None
    except openai.APIStatusError as e:
        raise AskError(f"{server} answered HTTP {e.status_code}: {e.message}") from None


def _served_models(client: Any) -> list[str]:
    try:
        return sorted(m.id for m in client.models.list().data)
    except Exception:  # the listing is only a hint in an error message
        return []


def add_ask_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ask",
        help="chat with an adapter on a running server",
        description="Send one prompt to NAME (its current version, or --version) and print the "
        "reply, streaming it as it arrives.",
    )
    p.add_argument("name", help="adapter name (the OpenAI model)")
    p.add_argument("prompt")
    p.add_argument(
        "--server",
        default=os.environ.get("AGENT_FINETUNE_SERVER", DEFAULT_SERVER),
        help=f"server URL, with or without /v1 (default $AGENT_FINETUNE_SERVER or "
        f"{DEFAULT_SERVER})",
    )
    p.add_argument("--version", help="pin a version, e.g. v0002 (sent as NAME@v0002)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="the server's --api-key (default $OPENAI_API_KEY)",
    )
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-stream", dest="stream", action="store_false", help="wait for the whole reply"
    )
    p.set_defaults(func=run_ask)


def run_ask(args: argparse.Namespace) -> int:
    reply = ask(
        args.name,
        args.prompt,
        server=args.server,
        version=args.version,
        api_key=args.api_key,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=args.stream,
        out=sys.stdout,
    )
    if args.stream:
        print()
    else:
        print(reply)
    return 0
