"""A handler's reply, checked before it becomes an HTTP response.

The guest is the function's code: its `response` message is untrusted input. What HTTP cannot
carry is refused with a 502 naming the reason (BadReply), on the API's invoke route and the
gateway's alike:
- the status must be an integer from 200 to 599: a 1xx is an interim answer that can never be a
  request's only one (101 would claim a protocol switch), and anything outside 100-599 is not HTTP;
- a header name must be an RFC 9110 token; a header value must hold no control character but
  HTAB: a CR or LF would end the header early (response splitting), and aiohttp refuses them by
  dropping the connection.
"""

from __future__ import annotations

import re
from typing import Any

from daemon.errors import BadReply, short_repr
from sandbox.guest import protocol

MIN_STATUS, MAX_STATUS = 200, 599
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def checked_reply(function: str, answer: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """The (status, headers, body) of a guest's response message, or BadReply saying what is wrong."""
    status = answer.get("statusCode", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not MIN_STATUS <= status <= MAX_STATUS:
        raise BadReply(
            f"{function} answered with status code {short_repr(status)}: a status code is an integer from "
            f"{MIN_STATUS} to {MAX_STATUS}"
        )
    headers = answer.get("headers") or {}
    if not isinstance(headers, dict):
        raise BadReply(f"{function} answered with headers {short_repr(headers)}: headers are an object of strings")
    for name, value in headers.items():
        if not TOKEN.fullmatch(name):
            raise BadReply(f"{function} answered with an invalid header name {short_repr(name)}: {_TOKEN_RULE}")
        if not isinstance(value, str) or FORBIDDEN_IN_VALUE.search(value):
            raise BadReply(
                f"{function} answered with an invalid value of header {name}: {short_repr(value)} "
                "(a string without CR, LF or other control characters)"
            )
    body = answer.get("body", "")
    try:
        if not isinstance(body, str):
            raise ValueError(f"it is {type(body).__name__}, not a string")
        return status, headers, protocol.unb64(body)
    except ValueError as e:  # binascii.Error is one
        raise BadReply(f"{function} answered with a body that is not base64: {e}") from e


_TOKEN_RULE = "a header name is one or more letters, digits or !#$%&'*+-.^_`|~"
