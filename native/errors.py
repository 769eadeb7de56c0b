"""How a failing C call becomes a Python exception (psutil's convention).

`OSError(errno, "<what we were doing>: <strerror> (originated from <syscall>)")`: the errno keeps
`except FileNotFoundError` and friends working, the message says which syscall failed and why we
called it.
"""

from __future__ import annotations

import os
from typing import NoReturn

from native._native import ffi


def raise_oserror(syscall: str, context: str = "", err: int | None = None) -> NoReturn:
    """Raise for the errno the last C call left (or `err`)."""
    code = ffi.errno if err is None else err
    what = f"{context}: " if context else ""
    raise OSError(code, f"{what}{os.strerror(code)} (originated from {syscall})")


def check(ret: int, syscall: str, context: str = "") -> int:
    """Return `ret` unless it is the C failure value -1."""
    if ret == -1:
        raise_oserror(syscall, context)
    return ret
