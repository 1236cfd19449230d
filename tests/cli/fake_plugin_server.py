"""A real HTTP server that answers like vLLM with the plugin, for the CLI's server commands.

Routes: ``GET /v1/adapters`` and ``/v1/models``; ``POST /v1/chat/completions`` (streamed or
not), ``/tokenize`` and ``/v1/completions`` with ``prompt_logprobs`` (what ``eval --server``
sends). With ``api_key`` set it answers 401 to a request without ``Bearer <key>``, as vLLM's
``--api-key`` does. Every request is recorded (method, path, Authorization header).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakePluginServer:
    models: list[str] = field(default_factory=lambda: ["base", "bot"])
    adapters: dict[str, Any] = field(default_factory=lambda: {"data": []})
    api_key: str | None = None
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def reply(self, model: str) -> str:
        return f"{model} says hello there"

    def logprob(self, model: str) -> float:
        """Each answer token's log-probability: a later version scores higher."""
        return -1.0 / (1 + int(model.rpartition("@v")[2] or 0)) if "@v" in model else -1.0

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if method == "GET" and path == "/v1/adapters":
            return 200, self.adapters
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": m} for m in self.models]}
        if path == "/tokenize":
            return 200, {"tokens": _tokens(body["messages"], body["add_generation_prompt"])}
        model = str(body.get("model"))
        if model.partition("@")[0] not in self.models:
            return 404, {"error": {"message": f"The model `{model}` does not exist."}}
        if path == "/v1/chat/completions":
            message = {"role": "assistant", "content": self.reply(model)}
            return 200, {"id": "chatcmpl-1", "model": model, "choices": [{"message": message}]}
        if path == "/v1/completions":
            ids = body["prompt"]
            rows = [None] + [{str(t): {"logprob": self.logprob(model)}} for t in ids[1:]]
            return 200, {"choices": [{"text": "", "prompt_logprobs": rows}]}
        return 404, {"detail": "Not Found"}


def _tokens(messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """One token per character, each turn led by its role: a prompt's tokens are a prefix of
    the tokens of the prompt plus its answer, as a chat template makes them."""
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    return [ord(c) for c in text + ("<assistant>" if generation_prompt else "")]


@contextmanager
def serving(fake: FakePluginServer) -> Iterator[FakePluginServer]:
    """Run ``fake`` on a free local port for the block; ``fake.url`` is its root URL."""

    class Handler(BaseHTTPRequestHandler):
        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            auth = self.headers.get("Authorization")
            fake.seen.append(Seen(method, self.path, auth))
            if fake.api_key and auth != f"Bearer {fake.api_key}":
                self._send(401, {"error": "Unauthorized"})
            elif body.get("stream"):
                self._stream(body)
            else:
                self._send(*fake.answer(method, self.path, body))

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, body: dict[str, Any]) -> None:
            status, payload = fake.answer("POST", self.path, {**body, "stream": False})
            if status != 200:
                self._send(status, payload)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for word in payload["choices"][0]["message"]["content"].split(" "):
                chunk = {"choices": [{"delta": {"content": word + " "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b'data: {"choices": []}\n\ndata: [DONE]\n\n')

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{http.server_address[1]}"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        http.shutdown()
        http.server_close()
