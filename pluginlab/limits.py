"""Rate limits (sliding one-window logs) and the leading+trailing broadcast throttle."""

from __future__ import annotations

import asyncio
import itertools
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
    sent alone and in a batch); what leaves never overtakes a newer value: whenever values
    leave (a leading or trailing edge, or :meth:`supersede` for a message sent unthrottled),
    the group's older pending values of the same names are dropped, and a pending entry left
    empty fires nothing.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._timers: dict[tuple[Hashable, ...], asyncio.TimerHandle] = {}
        self._pending: dict[tuple[Hashable, ...], _Pending] = {}
        self._clock = itertools.count(1)  # submission order

    def submit(self, key: tuple[Hashable, ...], values: dict[str, Any],
               fire: Callable[[dict[str, Any]], None]) -> None:
        if self.window <= 0:
            fire(dict(values))
            return
        stamp = next(self._clock)
        if key in self._timers:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending({}, {}, fire)
            pending.fire = fire
            for name, value in values.items():
                pending.values[name] = value
                pending.stamps[name] = stamp
            return
        self._drop_older(key, dict.fromkeys(values, stamp))
        fire(dict(values))
        self._open(key)

    def supersede(self, group: Hashable, names: Iterable[str] | None = None) -> None:
        """Values of ``names`` (None: all) in ``group`` are being sent unthrottled now: drop
        the pending ones, which are older."""
        stamp = next(self._clock)
        for key, pending in list(self._pending.items()):
            if key[0] == group:
                self._drop(key, pending, dict.fromkeys(
                    pending.values if names is None else names, stamp))

    def _drop_older(self, sent_key: tuple[Hashable, ...], sent: dict[str, int]) -> None:
        for key, pending in list(self._pending.items()):
            if key[0] == sent_key[0] and key != sent_key:
                self._drop(key, pending, sent)

    def _drop(self, key: tuple[Hashable, ...], pending: _Pending, sent: dict[str, int]) -> None:
        for name, stamp in sent.items():
            if pending.stamps.get(name, stamp) < stamp:
                del pending.values[name], pending.stamps[name]
        if not pending.values:
            del self._pending[key]

    def _open(self, key: tuple[Hashable, ...]) -> None:
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.window, self._window_end, key)

    def _window_end(self, key: tuple[Hashable, ...]) -> None:
        self._timers.pop(key, None)
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._drop_older(key, pending.stamps)
            pending.fire(pending.values)
            self._open(key)

    def flush(self) -> None:
        """Fire every pending trailing edge now, oldest first, and cancel the timers
        (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while self._pending:
            key = min(self._pending, key=lambda k: max(self._pending[k].stamps.values()))
            pending = self._pending.pop(key)
            self._drop_older(key, pending.stamps)
            pending.fire(pending.values)


@dataclass(slots=True)
class _Pending:
    """A key's merged values waiting for the end of its window, with each value's
    submission stamp, and the callback that sends them."""

    values: dict[str, Any]
    stamps: dict[str, int]
    fire: Callable[[dict[str, Any]], None]
