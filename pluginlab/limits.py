"""Rate limits (sliding one-window logs) and the leading+trailing broadcast throttle."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
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
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._pending: dict[Hashable, tuple[dict[str, Any], Callable[[dict[str, Any]], None]]] = {}

    def submit(self, key: Hashable, values: dict[str, Any],
               fire: Callable[[dict[str, Any]], None]) -> None:
        if self.window <= 0:
            fire(dict(values))
            return
        if key in self._timers:
            merged = dict(self._pending[key][0]) if key in self._pending else {}
            merged.update(values)
            self._pending[key] = (merged, fire)
            return
        fire(dict(values))
        self._open(key)

    def _open(self, key: Hashable) -> None:
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.window, self._window_end, key)

    def _window_end(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        pending = self._pending.pop(key, None)
        if pending is not None:
            values, fire = pending
            fire(values)
            self._open(key)

    def flush(self) -> None:
        """Fire every pending trailing edge now and cancel the timers (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        pending, self._pending = self._pending, {}
        for values, fire in pending.values():
            fire(values)
