"""Redaction of captured text, before anything is written.

Built-in patterns replace e-mail addresses (``[email]``), payment card numbers (13-19 digits,
spaces or dashes allowed, Luhn-valid: ``[card]``) and phone numbers (``[phone]``: an
international ``+`` number, or grouped digits such as ``555-123-4567``, ``(020) 7946 0958``).
A user hook (``capture.redact: "module:function"``, a ``str -> str`` callable) runs after
them. If the hook cannot be imported or raises, the record is dropped, never written raw.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Redactor = Callable[[str], str]

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}"
    r")(?!\w)"
)


def luhn_ok(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum of card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[card]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()


def builtin(text: str) -> str:
    """``text`` with e-mail addresses, card numbers and phone numbers replaced."""
    if "@" in text:
        text = EMAIL.sub("[email]", text)
    if not any(ch.isdigit() for ch in text):
        return text
    text = CARD.sub(_card, text)
    return PHONE.sub("[phone]", text)


def load_hook(spec: str) -> Redactor:
    """The callable named ``module:function``; ImportError/AttributeError/TypeError say why."""
    module, _, attr = spec.partition(":")
    func = getattr(importlib.import_module(module), attr)
    if not callable(func):
        raise TypeError(f"{spec} is not callable")
    return func  # type: ignore[no-any-return]


def redactor(hook: Redactor | None) -> Redactor:
    """The built-in patterns, then ``hook`` (its result must be a string)."""

    def redact(text: str) -> str:
        out = builtin(text)
        if hook is not None:
            out = hook(out)
            if not isinstance(out, str):
                raise TypeError(f"the redact hook returned {type(out).__name__}, not str")
        return out

    return redact
