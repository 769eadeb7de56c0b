"""JSON bodies as the API reads and writes them. A request body is one JSON object, or a 400 that
says what is wrong; a response body is standard JSON (never NaN or Infinity, which Python's json
writes unless told not to and most parsers refuse).

Every JSON body of thawd's API (and of its gateway) is parsed here. No body the API takes nests
deeper than a few levels, so MAX_DEPTH refuses a deeply nested one before anything walks it
(Python's parser itself fails with RecursionError at about a thousand levels).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from daemon.errors import Invalid

MAX_DEPTH = 32
_NESTED = f"the request body nests arrays or objects more than {MAX_DEPTH} levels deep"


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)  # bytes: UTF-8 (or -16, -32) as RFC 8259 says
    except RecursionError:
        raise Invalid(_NESTED) from None
    except ValueError as e:
        raise Invalid(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Invalid("the request body must be a JSON object")
    if depth(data) > MAX_DEPTH:
        raise Invalid(_NESTED)
    return data


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """web.json_response, standard JSON only: a NaN or infinity raises ValueError (a 500 naming it)."""
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, allow_nan=False)


def _refuse_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are not JSON (Python's parser takes them unless told not to)."""
    raise ValueError(f"{name} is not a JSON value")


def depth(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:  # deeper is refused anyway: no need to walk it all
            stack.extend((child, level + 1) for child in children)
    return deepest
