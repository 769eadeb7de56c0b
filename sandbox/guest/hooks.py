"""What makes each thawed instance its own, and the hooks a function registers for its own state.

Every instance thawed from a template starts with the template's memory: whatever the function's
init computed is there, identical, in every instance. For most state that is the point. For
randomness it is a hazard, so after every thaw the guest, before it says RESTORED:

- re-seeds, from the kernel's entropy, `random`'s global generator and every `random.Random`
  seeded from entropy during init (`random.Random()`, `r.seed()`: tracked from the guest's start
  by a wrapper of `Random.seed`; one seeded with a value, `Random(42)`, is left as it is: it
  gives the same numbers in any process, thawed or not), and numpy's legacy global generator
  when numpy is loaded;
- runs the function's after-thaw hooks (Lambda SnapStart's runtime hooks do the same):

      from sandbox.guest.hooks import register_after_thaw, register_before_capture

      @register_before_capture
      def close_connections() -> None: ...   # runs once, in the guest, just before READY

      @register_after_thaw
      def reconnect() -> None: ...           # runs in every instance, before its first request

  A module-level `after_thaw()` in the handler's module is registered too, as `init()` is called.
  A hook that raises fails the thaw: the instance reports the error instead of RESTORED, thawd
  answers that invocation 502 and logs the traceback.

What stays shared, and why: `hash()`'s secret for str and bytes (every dict and set the init built
is laid out by it: changing it would corrupt them; use `secrets` or `os.urandom` for anything
unpredictable), numpy `Generator`s and other libraries' generators made during init (thaw cannot
find them: re-seed them in an after-thaw hook), torch's default generator (seeded with a fixed
value in every process anyway), and anything else the init derived from its pid, time or host:
refresh it in an after-thaw hook.
"""

from __future__ import annotations

import os
import random
import sys
import weakref
from collections.abc import Callable
from typing import Any

Hook = Callable[[], Any]
_before_capture: list[Hook] = []
_after_thaw: list[Hook] = []
_from_entropy: weakref.WeakSet[random.Random] = weakref.WeakSet()
_plain_seed = random.Random.seed


def register_before_capture(hook: Hook) -> Hook:
    """Register `hook` to run once in the guest just before it is captured (a decorator)."""
    _before_capture.append(hook)
    return hook


def register_after_thaw(hook: Hook) -> Hook:
    """Register `hook` to run in every thawed instance before its first request (a decorator)."""
    _after_thaw.append(hook)
    return hook


def _tracking_seed(self: random.Random, a: Any = None, version: int = 2) -> None:
    _plain_seed(self, a, version)
    if a is None:
        _from_entropy.add(self)


def track_random() -> None:
    """From now on, remember every `random.Random` seeded from entropy (call before the init)."""
    random.Random.seed = _tracking_seed  # type: ignore[method-assign]


def register_module_hooks(module: Any) -> None:
    """The handler module's own `after_thaw()`, if it has one."""
    hook = getattr(module, "after_thaw", None)
    if callable(hook) and hook not in _after_thaw:
        _after_thaw.append(hook)


def run_before_capture() -> None:
    for hook in _before_capture:
        hook()


def run_after_thaw() -> None:
    """Give this instance its own randomness, then run the function's hooks (in order)."""
    random.seed(os.urandom(32))
    for generator in list(_from_entropy):
        if not isinstance(generator, random.SystemRandom):
            _plain_seed(generator, os.urandom(32))
    numpy_random = sys.modules.get("numpy.random")  # only if the init loaded it: importing costs
    if numpy_random is not None:
        numpy_random.seed()  # the legacy global RandomState: fresh entropy
    for hook in _after_thaw:
        hook()
