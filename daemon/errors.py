"""Errors the daemon reports, each with the HTTP status and code the API answers with.

The API's error body is `{"error": {"code", "message"}}`; the message carries the cause chain
(`describe`), so "capture failed: ...: the process has 2 threads" reaches the user whole.
"""

from __future__ import annotations

from typing import Any


class ThawError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


class Invalid(ThawError):
    status, code = 400, "invalid"


class NotFound(ThawError):
    status, code = 404, "not_found"


class Conflict(ThawError):
    status, code = 409, "conflict"


class TooLarge(ThawError):
    status, code = 413, "too_large"


class Unavailable(ThawError):
    status, code = 503, "unavailable"


class HandlerFailed(ThawError):
    status, code = 500, "handler_error"


class InstanceCrashed(ThawError):
    status, code = 502, "instance_crashed"


class BadReply(ThawError):
    """The handler's reply cannot be an HTTP response (a status outside 200-599, a header that is
    not a token or whose value holds CR, LF or another control character)."""

    status, code = 502, "bad_reply"


class InvocationTimeout(ThawError):
    status, code = 504, "timeout"


class PoolFull(ThawError):
    status, code = 507, "pool_full"


class DeployFailed(ThawError):
    status, code = 422, "deploy_failed"


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut short: an error names the bad value without quoting megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: BaseException) -> str:
    """The message and its causes, outermost first, without repeating a cause already quoted."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current) or type(current).__name__
        if not any(text in p for p in parts):
            parts.append(text)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return ": ".join(parts)
