"""The engine owner thread: the only thread that ever touches DawDreamer.

DawDreamer objects must be created and used on one thread (one engine per thread, and the
FP environment it changes is per thread). Every DawDreamer call in pluginlab is a function
handed to the process-wide :class:`Owner`, which runs submitted work in FIFO order on its
single worker thread. Callers on any thread use :meth:`Owner.call` (blocks until done; runs
inline when already on the owner thread) or :meth:`Owner.run` (awaitable, never blocks the
event loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["Owner", "owner"]

T = TypeVar("T")


class Owner:
    """A single worker thread with FIFO ordering of submitted work."""

    def __init__(self, name: str = "pluginlab-engine") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_id: int | None = None
        self._executor.submit(self._remember_thread).result()

    def _remember_thread(self) -> None:
        self._thread_id = threading.get_ident()

    def on_owner(self) -> bool:
        """True when the caller is running on the owner thread."""
        return threading.get_ident() == self._thread_id

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the owner thread; returns a concurrent future."""
        return self._executor.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the owner thread and return its result (re-raises its error)."""
        if self.on_owner():
            return fn(*args)
        return self.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Awaitable :meth:`call`: the event loop keeps running while the owner works."""
        if self.on_owner():
            return fn(*args)
        return await asyncio.wrap_future(self.submit(fn, *args))


_OWNER: Owner | None = None
_OWNER_LOCK = threading.Lock()


def owner() -> Owner:
    """The process-wide owner (created on first use)."""
    global _OWNER
    with _OWNER_LOCK:
        if _OWNER is None:
            _OWNER = Owner()
        return _OWNER
