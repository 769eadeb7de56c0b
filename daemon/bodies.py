"""Request bodies as the API reads them: one JSON object, or a 400 that says what is wrong."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from daemon.errors import Invalid


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as e:
        raise Invalid(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Invalid("the request body must be a JSON object")
    return data
