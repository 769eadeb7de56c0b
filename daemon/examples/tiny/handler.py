"""A tiny function: its init is the interpreter's start and this module."""

from typing import Any


def handle(event: Any, context: Any) -> dict[str, Any]:
    name = event.query.get("name", "world")
    return {"hello": name, "pid": context.pid}
