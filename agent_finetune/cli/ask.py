"""`agent-finetune ask NAME "prompt"`: one chat call to an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent_finetune.errors import AskError, ServerResponseError
from agent_finetune.registry.names import model_id
from agent_finetune.server_client import ServerClient, add_server_options

DEFAULT_SERVER = "http://127.0.0.1:8000"
CHAT_ROUTE = "/v1/chat/completions"


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
    ``/v1`` or not; ``api_key`` None follows the API key rule (``server_client``).
    """
    model = model_id(name, version)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    with ServerClient(server, api_key=api_key, timeout=120) as client:
        try:
            if not stream:
                answer = client.post_json(CHAT_ROUTE, body)
                return _content(client, answer, "message")
            parts = []
            for chunk in client.stream_json(CHAT_ROUTE, body):
                delta = _content(client, chunk, "delta")
                if delta:
                    parts.append(delta)
                    if out is not None:
                        out.write(delta)
                        out.flush()
            return "".join(parts)
        except ServerResponseError as e:
            if e.status != 404:
                raise
            served = _served_models(client)
            raise AskError(
                f"{client.root} does not serve {model!r}; it serves: "
                f"{', '.join(served) or 'nothing'}"
            ) from None


def _content(client: ServerClient, answer: dict[str, Any], key: str) -> str:
    """``choices[0][key].content`` of a chat answer (``key``: message, or a chunk's delta);
    "" for a chunk without choices (a stream's usage chunk)."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        raise ServerResponseError(
            f"{client.url(CHAT_ROUTE)} answered without `choices`: not an OpenAI chat answer"
        )
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    part = first.get(key)
    return str(part.get("content") or "") if isinstance(part, dict) else ""


def _served_models(client: ServerClient) -> list[str]:
    try:
        listing = client.get_json("/v1/models").get("data") or []
    except (ServerResponseError, OSError):  # the listing is only a hint in an error message
        return []
    return sorted(str(m.get("id")) for m in listing if isinstance(m, dict))


def add_ask_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ask",
        help="chat with an adapter on a running server",
        description="Send one prompt to NAME (its current version, or --version) and print the "
        "reply, streaming it as it arrives.",
    )
    p.add_argument("name", help="adapter name (the OpenAI model)")
    p.add_argument("prompt")
    add_server_options(p, purpose="the server to ask", fallback=DEFAULT_SERVER)
    p.add_argument("--version", help="pin a version, e.g. v0002 (sent as NAME@v0002)")
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
