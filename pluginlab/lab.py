"""pluginlab in a notebook: the server on the kernel's own loop, plus the kernel as a client.

::

    import pluginlab
    lab = await pluginlab.start()                 # idempotent: re-running returns the same lab
    reverb = await lab.add_plugin("drums", "Reverb")
    lab.panel(reverb)                             # sliders bound to every parameter
    print(lab.url, lab.token("colleague"))        # for browsers, scripts, other notebooks
    await lab.stop()

Everything the notebook changes goes through the same core (:class:`~pluginlab.session.Studio`)
as WebSocket clients: validated the same way, recorded as the same DAID events, broadcast to
the same session. The kernel's own connection is exempt from rate limits (it is the trusted
owner of the server) but otherwise an ordinary member of its session.

Threads: JupyterLab 4.6 + ipykernel 7 deliver widget events on a subshell thread. Every entry
point that may be called from a widget callback hands its work to the lab's loop with
:meth:`Lab.submit`, which is safe from any thread; the core and the sockets are only touched
on the loop. No ``nest_asyncio`` loop patching is needed: cells use top-level ``await``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

from .config import ServerConfig
from .engine import Engine, Plugin
from .provenance import JournalBusy
from .server import PluginServer
from .session import Connection, Studio
from .sources import Source

__all__ = ["Lab", "RestoredSessionWarning", "start"]

Listener = Callable[[dict[str, Any]], None]
_CURRENT: Lab | None = None
_SHOWN_LOCALLY = frozenset({"PLUGIN_ADD", "PLUGIN_PARAMETER", "PLUGIN_PARAMETER_BATCH",
                            "PLUGIN_BYPASS", "PLUGIN_PRESET", "PLUGIN_REMOVE"})


async def start(
    session_id: str = "notebook",
    *,
    user_id: str = "notebook",
    port: int = 0,
    db: str | None = "pluginlab.sqlite",
    fresh: bool = False,
    **options: Any,
) -> Lab:
    """Start (or return the already running) notebook lab on the current loop.

    ``options`` are :class:`~pluginlab.config.ServerConfig` fields (``jwt_secret``,
    ``debounce_window``, flags...); environment variables apply as for ``pluginlab serve``.
    Calling it again with the same arguments returns the running lab; with different ones the
    old lab is stopped first, so a port is never leaked.

    The session comes back as the log ``db`` last recorded it (as for a restarted server):
    after a kernel restart, a notebook that adds its plugins again would add them twice. So a
    restored session is announced (a :class:`RestoredSessionWarning` listing its plugins), and
    ``fresh=True`` starts it empty instead (its plugins are removed through the core, so the
    log records that too). A ``db`` that another kernel's lab holds raises RuntimeError
    saying to pass another ``db``.
    """
    global _CURRENT
    key = (session_id, user_id, port, db, fresh, tuple(sorted(options.items())))
    loop = asyncio.get_running_loop()
    if _CURRENT is not None and not _CURRENT.stopped:
        if _CURRENT._key == key and _CURRENT.loop is loop:
            return _CURRENT
        await _CURRENT._stop_from(loop)
    config = ServerConfig.from_env(port=port, db=db, **options)
    try:
        server = await PluginServer(config).start()
    except JournalBusy:
        raise RuntimeError(
            f"{db} is in use by another lab (another notebook's kernel, or `pluginlab serve`): "
            f"pass db='another.sqlite' to pluginlab.start(), or db=None for no log"
        ) from None
    lab = Lab(server, session_id, user_id, key)
    try:
        await lab._join()
        await lab._settle_restored(fresh)
    except BaseException:
        await server.stop()
        raise
    _CURRENT = lab
    return lab


class RestoredSessionWarning(UserWarning):
    """``pluginlab.start()`` brought back plugins its log had for the session."""


class Lab:
    """A running server plus the kernel's own membership of one session."""

    def __init__(self, server: PluginServer, session_id: str, user_id: str,
                 key: tuple[Any, ...] = ()) -> None:
        self.server = server
        self.session_id = session_id
        self.user_id = user_id
        self.loop = asyncio.get_running_loop()
        self.stopped = False
        self._key = key
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self.members: set[str] = set()
        self.restored: dict[str, list[str]] = {}  # track -> plugin names the log brought back
        self.conn: Connection = self.studio.connect(self._deliver, "kernel", limited=False)

    # -- what the notebook sees ---------------------------------------------------------------
    @property
    def studio(self) -> Studio:
        return self.server.studio

    @property
    def store(self) -> Any:
        return self.server.store

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def engine(self) -> Engine:
        """The session's engine (read it freely; change plugins through the lab).

        RuntimeError once the lab is stopped (start a new one with ``pluginlab.start``)."""
        self._check_running()
        return self.studio.sessions[self.session_id].engine

    def _check_running(self) -> None:
        if self.stopped:
            raise RuntimeError("this lab is stopped: start a new one with "
                               "`lab = await pluginlab.start(...)`")

    def token(self, user_id: str, **kwargs: Any) -> str:
        """A token for a colleague/browser; it may join this lab's session."""
        self._check_running()
        return self.server.token(user_id, **kwargs)

    def plugin(self, plugin_id: str) -> Plugin:
        return self.engine.plugin(plugin_id)

    def set_source(self, track_id: str, source: Source) -> None:
        """Feed ``track_id`` from ``source`` (sources are local to the notebook)."""
        self.engine.add_track(track_id, source)

    # -- actions (all through the core) ---------------------------------------------------------
    async def request(self, msg_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """Any protocol request as the kernel's user; returns the reply data.

        Successful changes are also shown to the kernel's own listeners (its widgets), since
        the core never broadcasts a change back to the connection that made it.
        """
        self._check_running()
        reply = await self.studio.execute(self.conn, msg_type, data)
        if msg_type in _SHOWN_LOCALLY and reply.get("success"):
            self._deliver({"type": msg_type, "data": reply, "user_id": self.user_id})
        return reply

    async def add_plugin(self, track_id: str, name: str, plugin_path: str | None = None,
                         plugin_id: str = "") -> Plugin:
        reply = await self.request("PLUGIN_ADD", {"track_id": track_id, "name": name,
                                                  "plugin_path": plugin_path,
                                                  "plugin_id": plugin_id})
        return self.plugin(reply["plugin_id"])

    async def remove_plugin(self, plugin: Plugin | str) -> None:
        p = self._resolve(plugin)
        await self.request("PLUGIN_REMOVE", {"track_id": p.track_id, "plugin_id": p.id})

    async def set(self, plugin: Plugin | str, parameter_id: str, value: Any) -> float:
        p = self._resolve(plugin)
        reply = await self.request("PLUGIN_PARAMETER", {
            "track_id": p.track_id, "plugin_id": p.id, "parameter_id": parameter_id,
            "parameter_value": value})
        return float(reply["parameter_value"])

    async def update(self, plugin: Plugin | str, values: dict[str, Any]) -> dict[str, float]:
        p = self._resolve(plugin)
        reply = await self.request("PLUGIN_PARAMETER_BATCH", {
            "track_id": p.track_id, "plugin_id": p.id, "parameters": values})
        return dict(reply["parameters"])

    async def bypass(self, plugin: Plugin | str, bypass: bool = True) -> None:
        p = self._resolve(plugin)
        await self.request("PLUGIN_BYPASS", {"track_id": p.track_id, "plugin_id": p.id,
                                             "bypass": bypass})

    async def preset(self, plugin: Plugin | str, action: str = "load",
                     preset_name: str | None = None) -> dict[str, Any]:
        p = self._resolve(plugin)
        data: dict[str, Any] = {"track_id": p.track_id, "plugin_id": p.id, "action": action}
        if preset_name is not None:
            data["preset_name"] = preset_name
        return await self.request("PLUGIN_PRESET", data)

    async def cursor(self, **fields: Any) -> None:
        await self.request("USER_CURSOR_UPDATE", fields)

    async def render(self, seconds: float, track_id: str | None = None) -> Any:
        """Render without blocking the kernel's loop (the server keeps serving); the render
        is recorded as a DAID ``render`` event (see :meth:`Studio.render`)."""
        self._check_running()
        return await self.studio.render(self.conn, seconds, track_id)

    # -- widgets --------------------------------------------------------------------------------
    def panel(self, plugin: Plugin | str) -> Any:
        """An ipywidgets panel bound to ``plugin`` (see :mod:`pluginlab.widgets`)."""
        from .widgets import PluginPanel

        self._check_running()
        return PluginPanel(self, self._resolve(plugin))

    def track_panel(self, track_id: str, seconds: float = 4.0) -> Any:
        from .widgets import TrackPanel

        self._check_running()
        return TrackPanel(self, track_id, seconds)

    def presence_panel(self) -> Any:
        from .widgets import PresencePanel

        self._check_running()
        return PresencePanel(self)

    # -- plumbing -------------------------------------------------------------------------------
    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(message)`` (on the loop) for every message the kernel receives.
        Returns the function that removes it."""
        self._check_running()
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any] | asyncio.Task[Any]:
        """Run ``coro`` on the lab's loop from any thread (widget callbacks). RuntimeError
        (and ``coro`` closed) when the lab's loop is gone (a stopped lab of an earlier
        ``asyncio.run``)."""
        if self.loop.is_closed():
            coro.close()
            self._check_running()
            raise RuntimeError("this lab's event loop is closed")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return self.loop.create_task(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def stop(self) -> None:
        """Stop the server (idempotent); widgets stop receiving updates."""
        global _CURRENT
        if self.stopped:
            return
        self.stopped = True
        await self.studio.disconnect(self.conn)
        await self.server.stop()
        if _CURRENT is self:
            _CURRENT = None

    async def _stop_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop this lab from ``loop``, which may not be the lab's own.

        A script calling ``asyncio.run`` twice (or a test that forgot ``stop()``) leaves a lab
        whose loop is closed: its server cannot be awaited any more (that raised "Event loop is
        closed" and made every later ``start()`` fail), so it is forgotten and only its
        listening sockets and provenance store, which need no loop, are closed
        (:meth:`PluginServer.abandon`). A lab on another running loop is stopped on that loop.
        """
        global _CURRENT
        if self.loop is loop:
            await self.stop()
        elif self.loop.is_closed() or not self.loop.is_running():
            self.stopped = True
            if _CURRENT is self:
                _CURRENT = None
            self.server.abandon()
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.stop(), self.loop))

    async def _join(self) -> None:
        reply = await self.request("AUTH", {"token": self.token(self.user_id),
                                            "session_id": self.session_id})
        self.members = set(reply["snapshot"]["members"])
        self.restored = {
            track: [p["name"] for p in plugins]
            for track, plugins in reply["snapshot"]["tracks"].items() if plugins}

    async def _settle_restored(self, fresh: bool) -> None:
        """Empty a restored session (``fresh``), or say what came back."""
        if not self.restored:
            return
        if fresh:
            for plugin in list(self.engine.plugins.values()):
                await self.remove_plugin(plugin)
            self.restored = {}
            return
        listing = "; ".join(f"{track}: {', '.join(names)}" for track, names in self.restored.items())
        warnings.warn(
            f"session {self.session_id!r} was restored from {self.server.config.db}: "
            f"{listing}. Plugins added again are added twice; pass fresh=True to "
            "pluginlab.start() to start the session empty (or another session_id/db)",
            RestoredSessionWarning, stacklevel=3)

    def _deliver(self, message: dict[str, Any]) -> None:
        if message.get("type") == "PRESENCE":
            data = message.get("data") or {}
            user = data.get("user_id")
            if data.get("event") == "joined" and user:
                self.members.add(user)
            elif data.get("event") == "left" and user:
                self.members.discard(user)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(message)

    def _resolve(self, plugin: Plugin | str) -> Plugin:
        return plugin if isinstance(plugin, Plugin) else self.plugin(plugin)

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else self.url
        return f"<pluginlab.Lab {state} session={self.session_id!r} user={self.user_id!r}>"
