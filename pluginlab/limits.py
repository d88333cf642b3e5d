"""Rate limits (sliding one-window logs) and the leading+trailing broadcast throttle."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["SlidingWindow", "Throttle"]


class SlidingWindow:
    """At most ``limit`` units per ``window`` seconds. ``limit <= 0`` means unlimited."""

    def __init__(self, limit: int, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._log: deque[float] = deque()

    def take(self, n: int = 1) -> float | None:
        """Record ``n`` units and return None, or return seconds to wait (nothing recorded)."""
        if self.limit <= 0:
            return None
        now = self._clock()
        while self._log and self._log[0] <= now - self.window:
            self._log.popleft()
        if n > self.limit:
            return self.window
        if len(self._log) + n > self.limit:
            release_index = len(self._log) + n - self.limit - 1
            return max(0.001, self._log[release_index] + self.window - now)
        self._log.extend([now] * n)
        return None


class Throttle:
    """Per-key throttle: the first submission after a quiet window fires at once (leading
    edge); later ones inside the window are merged and the merged result fires when the
    window ends (trailing edge), which reopens the window. ``window <= 0`` fires everything.

    ``submit(key, values, fire)``: ``values`` (a dict) is merged into the pending values of the
    key; ``fire(merged_values)`` is the most recent callback. Must be used on one event loop.

    Keys are tuples whose first item names a group (a plugin); values are keyed by what they
    set (a parameter id). Several keys of a group may carry the same value name (a parameter
    sent alone and in a batch, by several senders). Only the newest value of a name is ever
    pending: a submission drops the group's older pending values of its names (as does
    :meth:`supersede`, for a message sent unthrottled), and a pending entry left empty fires
    nothing. So no older value can reach anyone after a newer one: each key's audience (all
    but its sender) gets the newer value from that value's own broadcast, and its sender
    already has it.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._timers: dict[tuple[Hashable, ...], asyncio.TimerHandle] = {}
        self._pending: dict[tuple[Hashable, ...], _Pending] = {}

    def submit(self, key: tuple[Hashable, ...], values: dict[str, Any],
               fire: Callable[[dict[str, Any]], None]) -> None:
        if self.window <= 0:
            fire(dict(values))
            return
        self._drop(key[0], values, keep=key)
        if key in self._timers:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending({}, fire)
            pending.fire = fire
            pending.values.update(values)
            return
        fire(dict(values))
        self._open(key)

    def supersede(self, group: Hashable, names: Iterable[str] | None = None) -> None:
        """Values of ``names`` (None: all) in ``group`` are being sent unthrottled now: drop
        the pending ones, which are older."""
        self._drop(group, names)

    def _drop(self, group: Hashable, names: Iterable[str] | None,
              keep: tuple[Hashable, ...] | None = None) -> None:
        """Drop pending values of ``names`` (None: all) in ``group``, except under ``keep``."""
        for key, pending in list(self._pending.items()):
            if key[0] != group or key == keep:
                continue
            for name in pending.values.copy() if names is None else names:
                pending.values.pop(name, None)
            if not pending.values:
                del self._pending[key]

    def _open(self, key: tuple[Hashable, ...]) -> None:
        """Start ``key``'s window. Its end runs in a fresh context: the request that opened
        the window may still be waiting for its reply (fsync), and a trailing value must not
        be held behind that reply while newer values go out directly."""
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.window, self._window_end, key,
                                            context=contextvars.Context())

    def _window_end(self, key: tuple[Hashable, ...]) -> None:
        self._timers.pop(key, None)
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.fire(pending.values)
            self._open(key)

    def flush(self) -> None:
        """Fire every pending trailing edge now and cancel the timers (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.fire(entry.values)


@dataclass(slots=True)
class _Pending:
    """A key's merged values waiting for the end of its window, and the callback that sends
    them."""

    values: dict[str, Any]
    fire: Callable[[dict[str, Any]], None]
