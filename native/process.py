"""Per-process knobs Python 3.11 lacks: prctl(2), close_range(2), personality(2)."""

from __future__ import annotations

from native._native import ffi, lib
from native.constants import Prctl
from native.errors import check

_PERSONALITY_QUERY = 0xFFFFFFFF


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    name = Prctl(option).name if option in Prctl._value2member_map_ else str(option)
    return check(int(lib.thaw_prctl(option, a2, a3, a4, a5)), "prctl", f"PR_{name}")


def set_name(name: str) -> None:
    """PR_SET_NAME for the calling thread (the kernel keeps 15 bytes)."""
    buf = ffi.new("char[]", name.encode()[:15])
    prctl(Prctl.SET_NAME, int(ffi.cast("uintptr_t", buf)))


def get_name() -> str:
    buf = ffi.new("char[]", 16)
    prctl(Prctl.GET_NAME, int(ffi.cast("uintptr_t", buf)))
    return bytes(ffi.string(buf)).decode(errors="replace")


def set_no_new_privs() -> None:
    prctl(Prctl.SET_NO_NEW_PRIVS, 1)


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    check(lib.close_range(first, last, flags), "close_range", f"{first}..{last}")


def personality(persona: int | None = None) -> int:
    """Set the execution domain; with None only query it. Returns the previous persona."""
    value = _PERSONALITY_QUERY if persona is None else persona
    return check(int(lib.personality(value)), "personality", f"{value:#x}")
