"""The engine owner thread: the only thread that ever touches DawDreamer.

DawDreamer objects must be created and used on one thread (one engine per thread, and the
FP environment it changes is per thread). Every DawDreamer call in pluginlab is a function
handed to the process-wide :class:`Owner`, which runs submitted work in FIFO order on its
single worker thread. Callers on any thread use :meth:`Owner.call` (blocks until done; runs
inline when already on the owner thread) or :meth:`Owner.run` (awaitable, never blocks the
event loop).

DawDreamer objects must also be *destroyed* on this thread: a plugin binary destroyed on another
thread waits for the owner forever (the process hangs, typically at exit). The worker is
therefore a daemon thread that keeps serving during ``atexit``, where :mod:`pluginlab.engine`
releases the engines' DawDreamer objects on it.

JUCE (inside DawDreamer 0.9.0) makes the first thread that renders its *message thread*; a render
on any other thread then waits for that thread forever. The owner renders a one-block probe as
soon as it starts, so pluginlab owns the message thread; when something else in the process
rendered first, :func:`owner` raises :class:`~pluginlab.errors.EngineError` instead of letting
every later render hang. Code that uses DawDreamer directly next to pluginlab must run it on the
owner too: ``owner().call(fn)``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .errors import EngineError

__all__ = ["Owner", "owner"]

PROBE_TIMEOUT = 30.0  # seconds a one-block probe render may take before the owner is given up
_NOT_MESSAGE_THREAD = (
    "DawDreamer already rendered on another thread of this process, which JUCE made its message "
    "thread: renders on pluginlab's engine thread would wait forever. Create pluginlab engines "
    "before rendering with DawDreamer directly, and run direct DawDreamer code on pluginlab's "
    "thread: pluginlab.owner.owner().call(fn)."
)

T = TypeVar("T")


class Owner:
    """A single worker thread with FIFO ordering of submitted work."""

    def __init__(self, name: str = "pluginlab-engine") -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._queue = queue.SimpleQueue()
        # A daemon: a ThreadPoolExecutor worker is joined before atexit handlers run, which
        # would leave DawDreamer objects to be destroyed on the main thread (a hang).
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        self._thread_id: int | None = self._thread.ident
        self.broken: str | None = None  # why the owner cannot work (its thread is stuck)

    def _work(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller (frames cleared)
                traceback.clear_frames(exc.__traceback__)
                future.set_exception(exc)
            else:
                future.set_result(result)
                del result
            del future, fn, args  # drop references (and DawDreamer objects) here, on the owner

    def on_owner(self) -> bool:
        """True when the caller is running on the owner thread."""
        return threading.get_ident() == self._thread_id

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the owner thread; returns a concurrent future."""
        future: Future[T] = Future()
        if self.broken is not None:
            future.set_exception(EngineError(self.broken))
        else:
            self._queue.put((future, fn, args))
        return future

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
    """The process-wide owner (created, and made JUCE's message thread, on first use).

    Raises EngineError when DawDreamer already rendered on another thread (see module doc).
    """
    global _OWNER
    with _OWNER_LOCK:
        if _OWNER is None:
            _OWNER = Owner()
            probe = _OWNER.submit(_render_probe)
            try:
                probe.result(PROBE_TIMEOUT)
            except TimeoutError:
                _OWNER.broken = _NOT_MESSAGE_THREAD
        if _OWNER.broken is not None:
            raise EngineError(_OWNER.broken)
        return _OWNER


def _render_probe() -> None:
    """Render one block on the owner thread: JUCE's message thread becomes this thread."""
    import dawdreamer as daw
    import numpy as np

    engine = daw.RenderEngine(44100, 64)
    engine.load_graph([(engine.make_playback_processor("probe", np.zeros((2, 64), np.float32)),
                        [])])
    engine.render(64.5 / 44100)
