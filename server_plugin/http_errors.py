"""OpenAI-shaped JSON error answers of the plugin's routes and middleware."""

from __future__ import annotations

from starlette.responses import JSONResponse


def error_response(status: int, message: str, err_type: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": "model", "code": status}},
        status_code=status,
    )
