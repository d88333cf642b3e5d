"""Changes applied ahead of their record, and what undoing a failed one may restore.

When replies wait for the store (``fsync``), a change is applied to the engine at once and
recorded later, so several changes to one value can be waiting together. If one of them cannot
be recorded it is undone, but undoing must never overwrite a later change (which may already
be acknowledged): only the newest waiting change of a value restores anything, and an older
one that fails hands its "previous" on to the next newer one, so that one restores the value
from before both if it fails too.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any


class _Change:
    __slots__ = ("owner", "previous", "recorded")

    def __init__(self, previous: Any, owner: Hashable) -> None:
        self.previous = previous  # the value to restore if this change fails
        self.owner = owner  # who made it (it reads its own writes)
        self.recorded = False


class Tentative:
    """Per key (e.g. a plugin and one of its parameters), the changes applied but not yet
    known to be recorded, oldest first. Sans-I/O; one instance per core."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, list[_Change]] = {}

    def applied(self, key: Hashable, previous: Any, owner: Hashable = None) -> _Change:
        """Note a change of ``key`` just applied over ``previous`` by ``owner``; returns its
        handle."""
        change = _Change(previous, owner)
        self._waiting.setdefault(key, []).append(change)
        return change

    def recorded(self, key: Hashable, change: _Change) -> None:
        """The change is durable: it stays only to stop older failing changes restoring."""
        change.recorded = True
        self._settle(key)

    def failed(self, key: Hashable, change: _Change) -> tuple[bool, Any]:
        """The change could not be recorded: ``(True, value)`` when ``value`` must be put back
        (it was the newest change of ``key``), else ``(False, None)``: a later change stands."""
        waiting = self._waiting[key]
        at = waiting.index(change)
        del waiting[at]
        newest = at == len(waiting)
        if not newest:
            waiting[at].previous = change.previous
        self._settle(key)
        return (True, change.previous) if newest else (False, None)

    def recorded_values(self, reader: Hashable = None) -> list[tuple[Hashable, Any]]:
        """``(key, value)`` for every key with a change waiting, unless the newest is the
        ``reader``'s own (it reads its own writes): the value the log has (the one before the
        oldest waiting change), which is what the reader may be shown."""
        return [(key, waiting[0].previous) for key, waiting in self._waiting.items()
                if waiting[-1].owner != reader or reader is None]

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __len__(self) -> int:
        """How many changes are waiting or kept (0 when everything is settled)."""
        return sum(len(w) for w in self._waiting.values())

    def _settle(self, key: Hashable) -> None:
        """Forget recorded changes that no older waiting change can be undone behind."""
        waiting = self._waiting[key]
        while waiting and waiting[0].recorded:
            del waiting[0]
        if not waiting:
            del self._waiting[key]
