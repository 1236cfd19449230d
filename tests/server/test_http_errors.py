"""One spelling of each error type: the plugin's 503s were spelled three ways."""

from __future__ import annotations

import json
from pathlib import Path

from server_plugin.http_errors import error_response, error_type

ROOT = Path(__file__).resolve().parents[2]


def test_each_status_has_one_type() -> None:
    assert error_type(503) == "ServiceUnavailableError"
    assert error_type(404) == "NotFoundError" and error_type(400) == "BadRequestError"
    assert error_type(409) == "ConflictError" and error_type(999) == "Error"
    body = json.loads(bytes(error_response(503, "starting", param=None).body))
    assert body == {
        "error": {
            "message": "starting",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    }


def test_no_module_spells_an_error_type_by_hand() -> None:
    for path in (ROOT / "server_plugin").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "http_errors.py":
            assert '"ServiceUnavailable' not in text and '"Unavailable"' not in text, path
