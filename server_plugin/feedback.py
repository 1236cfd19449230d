"""The feedback route: ``POST /v1/adapters/{name}/feedback``, an agent's score for an answer.

Under ``/v1``, so vLLM's ``--api-key`` check applies. It only records; it never routes.
"""

from __future__ import annotations

import json
from typing import Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server_plugin.canary_router import CanaryRouter, parse_feedback
from server_plugin.http_errors import error_response

FEEDBACK_PATH = "/v1/adapters/{name}/feedback"


class PluginState(Protocol):
    """What the route reads from the plugin."""

    @property
    def canary(self) -> CanaryRouter | None: ...

    @property
    def error(self) -> str | None: ...


class FeedbackRoute:
    """The route's handler, bound to the plugin whose canary router counts the scores."""

    def __init__(self, plugin: PluginState) -> None:
        self.plugin = plugin

    async def post(self, name: str, request: Request) -> Response:
        """An agent's score for one response: ``{"id": <response id>, "score": -1..1}``."""
        canary = self.plugin.canary
        if canary is None:
            return error_response(503, self.plugin.error or "agent_finetune plugin is starting")
        try:
            rid, score, model = parse_feedback(json.loads(await request.body()))
        except (ValueError, RecursionError) as e:  # FeedbackError, or the body is not JSON
            return error_response(400, f"feedback for {name}: {e}")
        try:
            return JSONResponse(canary.feedback(name, rid, score, model))
        except KeyError:
            return error_response(
                404,
                f"no answer {rid!r} of {name} is known to this server (feedback is counted "
                "for canaried names; behind a load balancer also send the answer's "
                '"model", e.g. "name@v0002")',
            )
