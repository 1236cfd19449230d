"""OpenAI-shaped JSON error answers of the plugin's routes and middleware.

The error ``type`` follows from the status, one spelling each, as vLLM spells its own
(``BadRequestError``, ``NotFoundError``): a client can switch on it.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    503: "ServiceUnavailableError",
}


def error_type(status: int) -> str:
    """The ``type`` of an error answer with this HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    try:
        return HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        return "Error"


def error_response(status: int, message: str, *, param: str | None = "model") -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}`` with ``status``."""
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": error_type(status),
                "param": param,
                "code": status,
            }
        },
        status_code=status,
    )
