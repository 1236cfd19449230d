"""The one client of a running server, for the CLI and the evaluator: ``ServerClient``.

A server is vLLM's OpenAI server, usually with the agent_finetune plugin. The rules every
command follows, stated here once:

- **URL**: ``--server`` names the server with or without ``/v1``: ``http://h:8000`` and
  ``http://h:8000/v1`` are one server (``registry.names.server_root``). A command's
  ``--server`` defaults to ``$AGENT_FINETUNE_SERVER``.
- **API key**: ``--api-key``, else ``$VLLM_API_KEY`` (what vLLM's server reads for its own
  ``--api-key``), else ``$OPENAI_API_KEY`` (what the OpenAI SDK sends); with none, no
  ``Authorization`` header is sent.
- **The plugin's status**: ``GET /v1/adapters`` answers a JSON object with a ``data`` list;
  anything else means the server runs without the plugin.
- **Errors**: unreachable, timed out or HTTP 5xx is a ``ServerUnavailableError``; HTTP 4xx or
  a body that is not the JSON the route promises is a ``ServerResponseError``; a malformed
  URL is a ``ConfigError``. Each names the URL and the fix; no httpx exception escapes.

httpx is imported when a client is made, so ``agent-finetune --help`` stays fast. Tests pass
an httpx ``transport`` instead of patching.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent_finetune.errors import ConfigError, ServerResponseError, ServerUnavailableError
from agent_finetune.registry.names import server_root

if TYPE_CHECKING:
    import ssl

    import httpx

ENV_SERVER = "AGENT_FINETUNE_SERVER"
"""The server a command talks to when ``--server`` is not given."""
API_KEY_VARIABLES = ("VLLM_API_KEY", "OPENAI_API_KEY")
"""Where the API key comes from when ``--api-key`` is not given, first match wins."""
API_KEY_HELP = "the server's --api-key (default: $VLLM_API_KEY, else $OPENAI_API_KEY)"
ADAPTERS_ROUTE = "/v1/adapters"
DEFAULT_TIMEOUT_S = 30.0
START_HINT = "start one with `agent-finetune serve --model M --registry DIR`"
PLUGIN_HINT = (
    "is the agent_finetune plugin loaded there? start the server with `agent-finetune serve` "
    "(or add agent_finetune to VLLM_PLUGINS)"
)


def resolve_api_key(
    given: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The API key rule: ``given`` (``--api-key``), else $VLLM_API_KEY, else $OPENAI_API_KEY.

    An empty value counts as unset.
    """
    if given:
        return given
    env = os.environ if environ is None else environ
    return next((env[name] for name in API_KEY_VARIABLES if env.get(name)), None)


class _Replicas(argparse.Action):
    """``append`` whose first value replaces the default instead of joining it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, self.dest, None)
        kept = [] if given is None or given is self.default else list(given)
        setattr(namespace, self.dest, [*kept, values])


def add_server_options(
    parser: argparse.ArgumentParser,
    *,
    purpose: str,
    fallback: str | None = None,
    replicas: bool = False,
) -> None:
    """Add ``--server`` (default $AGENT_FINETUNE_SERVER, else ``fallback``) and ``--api-key``.

    ``purpose`` starts the help text. With ``replicas``, ``--server`` repeats (a list; the
    first one given replaces the default) and is required when there is no default.
    """
    default = os.environ.get(ENV_SERVER) or fallback
    where = f"default ${ENV_SERVER}" + (f", else {fallback}" if fallback else "")
    text = f"{purpose}: a URL with or without /v1, e.g. http://127.0.0.1:8000 ({where})"
    if replicas:
        parser.add_argument(
            "--server",
            action=_Replicas,
            default=[default] if default else None,
            required=default is None,
            help=text + "; repeat it for each replica",
        )
    else:
        parser.add_argument("--server", default=default, help=text)
    parser.add_argument("--api-key", default=None, help=API_KEY_HELP)


class ServerClient:
    """JSON over HTTP to one server, the API key on every request, errors that say the fix.

    ``server`` may end in ``/v1`` or not; ``api_key`` None applies the API key rule.
    """

    def __init__(
        self,
        server: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        self.root = server_root(server)
        scheme, sep, host = self.root.partition("://")
        if scheme not in ("http", "https") or not sep or not host:
            raise ConfigError(
                f"--server {server!r}: expected a URL such as http://127.0.0.1:8000 "
                "(with or without /v1)"
            )
        self.base_url = self.root + "/v1"
        self.api_key = resolve_api_key(api_key)
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(
            base_url=self.root,
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=_tls_context(),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def url(self, route: str) -> str:
        """The full URL of ``route`` (``/v1/models``) on this server."""
        return self.root + route

    def get_json(self, route: str, *, hint: str = "") -> dict[str, Any]:
        """GET ``route``; its JSON object. ``hint`` is added to a 404 or non-JSON error."""
        return self._json(route, self._send("GET", route, None), hint)

    def post_json(self, route: str, body: Mapping[str, Any], *, hint: str = "") -> dict[str, Any]:
        """POST ``body`` as JSON to ``route``; the JSON object it answers."""
        return self._json(route, self._send("POST", route, body), hint)

    def adapters(self) -> dict[str, Any]:
        """``GET /v1/adapters``: the plugin's status (``data``: one entry per name; canaries)."""
        data = self.get_json(ADAPTERS_ROUTE, hint=PLUGIN_HINT)
        if not isinstance(data.get("data"), list):
            raise ServerResponseError(
                f"{self.url(ADAPTERS_ROUTE)} answered JSON without a `data` list, not the "
                f"agent_finetune plugin's status: {PLUGIN_HINT}",
                200,
            )
        return data

    def stream_json(self, route: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``body`` with ``stream: true``; yield each server-sent event until ``[DONE]``."""
        import httpx

        try:
            with self._http.stream("POST", route, json={**body, "stream": True}) as r:
                if r.status_code >= 400:
                    r.read()
                    self._json(route, r, "")  # raises the error the status calls for
                for line in r.iter_lines():
                    payload = line.removeprefix("data:").strip()
                    if not line.startswith("data:") or not payload:
                        continue
                    if payload == "[DONE]":
                        return
                    event = self._decode(route, payload, r.status_code, "")
                    if "error" in event:
                        raise ServerResponseError(
                            f"{self.url(route)} failed mid-answer: {_message(event)}"
                        )
                    yield event
        except httpx.HTTPError as e:
            raise self._unavailable(route, e) from None

    def _send(self, method: str, route: str, body: Mapping[str, Any] | None) -> httpx.Response:
        import httpx

        try:
            return self._http.request(method, route, json=body)
        except httpx.HTTPError as e:
            raise self._unavailable(route, e) from None

    def _unavailable(self, route: str, error: Exception) -> ServerUnavailableError:
        import httpx

        url = self.url(route)
        if isinstance(error, httpx.TimeoutException):
            return ServerUnavailableError(
                f"{url}: no answer within {self.timeout:g}s; is the server overloaded or still "
                "starting? Try again once it answers /health"
            )
        reason = str(error) or type(error).__name__
        return ServerUnavailableError(
            f"cannot reach {url}: {reason}; is the server running? {START_HINT}, or point "
            f"--server (or ${ENV_SERVER}) at a running one"
        )

    def _json(self, route: str, r: httpx.Response, hint: str) -> dict[str, Any]:
        """The JSON object of a 2xx answer; the error its status calls for otherwise."""
        url, status = self.url(route), r.status_code
        if status in (401, 403):
            sent = "with the key given" if self.api_key else "no key was sent"
            raise ServerResponseError(
                f"{url} refused the request (HTTP {status}, {sent}): pass the server's key "
                f"with --api-key, or set $VLLM_API_KEY",
                status,
            )
        if status >= 500:
            raise ServerUnavailableError(
                f"{url} answered HTTP {status}: {_message(_body(r))}; the server is failing "
                "or restarting: try again, and read its log if it persists"
            )
        if status >= 400:
            more = f"; {hint}" if hint and status == 404 else ""
            raise ServerResponseError(
                f"{url} answered HTTP {status}: {_message(_body(r))}{more}", status
            )
        return self._decode(route, r.text, status, hint)

    def _decode(self, route: str, text: str, status: int, hint: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            more = f"; {hint}" if hint else ""
            raise ServerResponseError(
                f"{self.url(route)} answered something that is not a JSON object: "
                f"{_snippet(text)!r}{more}",
                status,
            )
        return data


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process: httpx would load the CA bundle again for every client,
    and the demo and ``status`` make one per request."""
    import httpx

    return httpx.create_ssl_context()


def _body(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def _message(body: Any) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, FastAPI's
    ``{"detail"}``, vLLM's ``{"error": "Unauthorized"}``, or the text itself."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for value in (error, body.get("detail"), body.get("message")):
            if value:
                return str(value)
    return _snippet(body if isinstance(body, str) else json.dumps(body))


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
