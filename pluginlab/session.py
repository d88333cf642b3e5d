"""The core: sessions, membership, dispatch, broadcasts, limits and provenance.

:class:`Studio` is transport-independent: it imports neither ``websockets`` nor
``ipywidgets``. A door (the WebSocket server, a notebook widget, a test) wraps each client
in a :class:`Connection` whose ``send`` callable delivers one message dict to that client,
then feeds frames to :meth:`Studio.receive` (wire path) or calls :meth:`Studio.execute`
(Python path). Both go through the same dispatch table, validation, DAID recording and
broadcasts. Contracts:

* A request gets exactly one reply (or ERROR) on its own connection, sent before any
  broadcast it causes reaches the others; a client never receives broadcasts of its own
  changes.
* Every accepted change is applied to the session's engine, recorded (durably) in the
  provenance store, and only then acknowledged. If recording fails the change is undone.
* Parameter broadcasts to other clients are throttled per (plugin, parameter): leading edge
  at once, the last value always delivered at the end of the window, and never an older
  value after a newer one (a batch or a preset load sent meanwhile).
* Objects belong to a session; other sessions' objects do not exist for a client.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from .auth import Authenticator, Identity
from .config import ServerConfig
from .engine import Engine, Plugin
from .errors import (
    AuthFailed,
    InternalError,
    InvalidMessage,
    PluginAddFailed,
    PluginlabError,
    PluginNotFound,
    PresetLoadFailed,
    RateLimited,
    Unauthorized,
    UnknownMessageType,
)
from .limits import SlidingWindow, Throttle
from .messages import (
    LEGACY_TYPES,
    MAX_ID,
    Request,
    decode_strict,
    dumps_ascii,
    envelope,
    legacy_added,
    legacy_broadcasts,
    legacy_updated,
    now_iso,
    parse,
)
from .presets import PresetLibrary
from .provenance import EventDraft
from .tentative import Tentative
from .vst import is_binary_path

__all__ = ["Connection", "Session", "Studio"]

log = logging.getLogger("pluginlab.session")

Send = Callable[[dict[str, Any]], None]
SendMany = Callable[[list[dict[str, Any]]], None]
_conn_ids = itertools.count(1)
_BYPASS = ("bypass",)  # the bypass flag's key among a change's previous values (no parameter id)


class _InFlight:
    """The wire request being handled: the broadcasts it causes, held until its reply has been
    sent (``open``), and the transport's ``applied`` future (pipelining), if any."""

    __slots__ = ("applied", "held", "open")

    def __init__(self, applied: asyncio.Future[None] | None) -> None:
        self.open = True
        self.held: list[tuple[Connection, dict[str, Any]]] = []
        self.applied = applied

    def signal_applied(self) -> None:
        """The request's changes are applied and handed to the store: the next may start."""
        if self.applied is not None and not self.applied.done():
            self.applied.set_result(None)


# Per request (per task context). A throttle timer created during a request copies this
# context; by the time it fires the request is closed, so the trailing edge is sent at once.
_in_flight: contextvars.ContextVar[_InFlight | None] = contextvars.ContextVar(
    "pluginlab_in_flight", default=None)


PERMISSION_OF = {
    "PLUGIN_ADD": "plugin:add", "ADD_PLUGIN": "plugin:add", "PLUGIN_REMOVE": "plugin:remove",
    "PLUGIN_PARAMETER": "plugin:write", "UPDATE_PARAMETER": "plugin:write",
    "PLUGIN_PARAMETER_BATCH": "plugin:write", "PLUGIN_BYPASS": "plugin:write",
    "PLUGIN_PARAMETERS_GET": "plugin:read", "SESSION_STATE_GET": "plugin:read",
    "USER_CURSOR_UPDATE": "plugin:read",
}
PRESET_PERMISSION = {"load": "plugin:write", "save": "plugin:write", "delete": "plugin:write",
                     "list": "plugin:read"}
REPLY_TYPE = {"ADD_PLUGIN": "PLUGIN_ADDED", "UPDATE_PARAMETER": "PARAMETER_UPDATED",
              "AUTH": "AUTH_SUCCESS", "PING": "PONG"}  # others reply with their own type


class Connection:
    """One client as the core sees it. ``send`` must not block (the transport queues);
    ``send_many`` (optional) sends several messages at once, in order, e.g. in one write."""

    def __init__(self, send: Send, address: str = "local", config: ServerConfig | None = None,
                 *, limited: bool = True, send_many: SendMany | None = None):
        cfg = config or ServerConfig()
        self.id = f"conn_{next(_conn_ids)}"
        self.send = send
        self.send_many = send_many
        self.address = address
        self.identity: Identity | None = None
        self.session_id: str | None = None
        self.closed = False
        self.legacy = False  # it sent the old format: broadcasts also go out in old shapes
        self.trusted = not limited  # the host's own connection (a notebook lab's kernel)
        on = cfg.rate_limits and limited
        self.messages = SlidingWindow(cfg.messages_per_second if on else 0)
        self.plugin_ops = SlidingWindow(cfg.plugin_ops_per_second if on else 0)
        self.cursors = SlidingWindow(cfg.cursor_updates_per_second if on else 0)
        self._param_limit = cfg.parameter_changes_per_second if on else 0
        self._param_windows: dict[str, SlidingWindow] = {}

    @property
    def user_id(self) -> str | None:
        return self.identity.user_id if self.identity else None

    @property
    def authenticated(self) -> bool:
        return self.identity is not None and self.session_id is not None

    def parameter_window(self, plugin_id: str) -> SlidingWindow:
        window = self._param_windows.get(plugin_id)
        if window is None:
            window = self._param_windows[plugin_id] = SlidingWindow(self._param_limit)
        return window


@dataclass
class Session:
    """A session: its own engine, its members and its broadcast throttle."""

    id: str
    engine: Engine
    throttle: Throttle
    members: dict[str, Connection] = field(default_factory=dict)
    busy: int = 0  # requests of its members being handled (it is not released meanwhile)
    creating: dict[str, str] = field(default_factory=dict)  # plugin ids added but not yet
    # recorded -> the id of the connection adding each
    # Held from a chain change (add/remove) until it is recorded, so the log's order of chain
    # changes is the engine's: an add must not compute its index from a chain whose removal
    # is still waiting (behind a render) to be recorded.
    structure: asyncio.Lock = field(default_factory=asyncio.Lock)
    speaks_legacy: bool = False  # a member spoke the old format (broadcasts then check who)

    def user_ids(self) -> list[str]:
        return sorted({c.user_id for c in self.members.values() if c.user_id})

    def snapshot(self) -> dict[str, Any]:
        """Members and tracks; a plugin whose creation is not recorded yet is not in it."""
        tracks = self.engine.snapshot()
        if self.creating:
            tracks = {tid: [p for p in chain if p["plugin_id"] not in self.creating]
                      for tid, chain in tracks.items()}
        return {"session_id": self.id, "members": self.user_ids(), "tracks": tracks}


Handler = Callable[[Connection, Request], Awaitable[dict[str, Any] | None]]


class Studio:
    """Sessions and the dispatch of every message type. One per server / notebook."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: Any = None,
        authenticator: Authenticator | None = None,
        presets: PresetLibrary | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.store = store
        self.auth = authenticator
        self.presets = presets or PresetLibrary(self.config.presets_dir)
        self.sessions: dict[str, Session] = {}
        self.connections: dict[str, Connection] = {}
        self._session_lock = asyncio.Lock()
        self._preset_lock = asyncio.Lock()  # named preset saves, deletes, loads: one at a time
        self._tentative = Tentative()  # changes applied but not yet recorded (replies_wait)
        self._replies_wait = self.replies_wait  # the config and the store never change
        self._releasing: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, Handler] = {
            "AUTH": self._auth, "PING": self._ping,
            "PLUGIN_ADD": self._plugin_add, "ADD_PLUGIN": self._plugin_add,
            "PLUGIN_REMOVE": self._plugin_remove,
            "PLUGIN_PARAMETER": self._parameter, "UPDATE_PARAMETER": self._parameter,
            "PLUGIN_PARAMETER_BATCH": self._batch, "PLUGIN_BYPASS": self._bypass,
            "PLUGIN_PRESET": self._preset, "PLUGIN_PARAMETERS_GET": self._parameters_get,
            "SESSION_STATE_GET": self._state_get, "USER_CURSOR_UPDATE": self._cursor,
        }

    @property
    def tracking(self) -> bool:
        """True when accepted changes are recorded (DAID tracking on, with a store)."""
        return self.store is not None and self.config.enable_daid_tracking

    @property
    def replies_wait(self) -> bool:
        """True when a reply waits for the store after its request was applied (recording
        with a store whose appends suspend, e.g. ``fsync``): a transport then gains by
        pipelining the next requests meanwhile."""
        return self.tracking and bool(getattr(self.store, "appends_suspend", True))

    # == doors ==============================================================================
    def connect(self, send: Send, address: str = "local", *, limited: bool = True,
                send_many: SendMany | None = None) -> Connection:
        """Register a new client; returns its connection. ``limited=False`` exempts a trusted
        in-process door (the notebook's own widgets) from rate limits; ``send_many`` lets the
        transport write a member's several broadcasts of one change together."""
        conn = Connection(send, address, self.config, limited=limited, send_many=send_many)
        self.connections[conn.id] = conn
        return conn

    async def disconnect(self, conn: Connection) -> None:
        """Forget a client; the others in its session get PRESENCE left."""
        conn.closed = True
        self.connections.pop(conn.id, None)
        self._leave(conn)

    async def receive(self, conn: Connection, frame: str | bytes,
                      applied: asyncio.Future[None] | None = None,
                      reply_after: asyncio.Future[None] | None = None) -> None:
        """Handle one wire frame: rate limit, parse, dispatch, reply (or ERROR).

        Pipelining hooks for a transport (both optional): ``applied`` is resolved once the
        request has been applied and its events handed to the store (before durability), so
        the next frame of the connection may start then without reordering changes; the reply
        (and the broadcasts it causes) waits for ``reply_after``, so replies keep request order.
        """
        request_id: str | None = None
        current = _InFlight(applied)
        token = _in_flight.set(current)
        outgoing: dict[str, Any] | None = None
        try:
            wait = conn.messages.take()
            if wait is not None:
                request_id = _peek_id(frame)
                raise RateLimited("messages_per_second", wait)
            request = parse(frame)
            request_id = request.id
            if request.type == "AUTH" and reply_after is not None:
                # a barrier: the connection's identity changes only once its earlier requests
                # are answered (their replies and broadcasts name who made them, and where)
                await reply_after
            outgoing = await self._dispatch(conn, request)
        except PluginlabError as exc:
            # a frame refused by the parser still gets its id echoed when it has a readable one
            outgoing = self._error(conn, exc, request_id or _peek_id(frame))
        except Exception:
            log.exception("internal error handling a message from %s", conn.id)
            outgoing = self._error(conn, InternalError(), request_id)
        finally:
            _in_flight.reset(token)
            current.signal_applied()
        if reply_after is not None:
            await reply_after
        if outgoing is not None:
            self._send(conn, outgoing)
        current.open = False
        self._send_held(current)

    async def execute(self, conn: Connection, msg_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """Python door: run one request and return its reply data (raises PluginlabError).

        Same validation, recording and broadcasts as the wire path; the reply is returned
        instead of being sent.
        """
        frame = dumps_ascii({"id": f"py_{uuid.uuid4().hex[:12]}", "type": msg_type,
                             "data": data})
        request = parse(frame)
        reply = await self._dispatch(conn, request)
        return reply["data"] if reply else {}

    async def render(self, conn: Connection, seconds: float, track_id: str | None = None
                     ) -> np.ndarray:
        """Render ``conn``'s session (one track, or the mix) without blocking the loop, and
        record it as a ``render`` event (PROTOCOL.md: renders are logged) whose details say
        what was rendered and fingerprint the audio: ``track_id`` (None = the mix),
        ``seconds``, ``sample_rate``, ``channels``, ``samples``, ``peak``, ``rms`` and
        ``audio_sha256`` (of the float32 samples). Its place in the log pins the state that
        was rendered (``state_at(session, daid=...)``)."""
        session = self._session_of(conn)
        audio = await session.engine.render_async(seconds, track_id=track_id)
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        details = {
            "track_id": track_id, "seconds": float(seconds),
            "sample_rate": session.engine.sample_rate, "channels": int(samples.shape[0]),
            "samples": int(samples.shape[-1]),
            "peak": float(np.max(np.abs(samples))) if samples.size else 0.0,
            "rms": float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
            if samples.size else 0.0,
            "audio_sha256": hashlib.sha256(samples.tobytes()).hexdigest(),
        }
        await self._record(conn, [self._draft(conn, "render", "render", track_id or "mix",
                                              "render", details)])
        return audio

    async def authenticate_handshake(
        self, conn: Connection, token: str | None, session_id: str | None
    ) -> dict[str, Any]:
        """Authenticate at the WebSocket handshake; raises AuthFailed. Returns AUTH_SUCCESS."""
        return await self._join(conn, token, None, session_id, request_id=None)

    async def close(self) -> None:
        """Flush pending broadcasts and release every session's engine."""
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        for session in self.sessions.values():
            session.throttle.flush()
        for session in list(self.sessions.values()):
            await asyncio.to_thread(session.engine.close)
        self.sessions.clear()

    # == dispatch ===========================================================================
    async def _dispatch(self, conn: Connection, request: Request) -> dict[str, Any] | None:
        msg_type = request.type
        cfg = self.config
        if not cfg.enable_new_plugin_system and msg_type not in LEGACY_TYPES | {"AUTH", "PING"}:
            raise UnknownMessageType(request.raw_type)
        if msg_type == "PLUGIN_PARAMETER_BATCH" and not cfg.enable_parameter_batching:
            raise UnknownMessageType(request.raw_type)
        was_legacy = conn.legacy
        if msg_type not in ("AUTH", "PING"):  # the format it last spoke: an old client gets
            conn.legacy = request.legacy  # broadcasts in the old shapes too
        if msg_type not in ("AUTH", "PING") and not conn.authenticated:
            if request.legacy and cfg.allow_anonymous:
                await self._join(conn, None, None, "legacy_session", request.id,
                                 anonymous_user="legacy_user")
            else:
                raise Unauthorized("authentication required: send AUTH first",
                                   {"required_permission": None})
        permission = PERMISSION_OF.get(msg_type)
        if msg_type == "PLUGIN_PRESET":
            permission = PRESET_PERMISSION.get(_preset_action(request), "plugin:write")
        if permission and conn.identity and not conn.identity.allows(permission):
            raise Unauthorized(f"token lacks permission {permission}",
                               {"required_permission": permission})
        session = self.sessions.get(conn.session_id) if conn.session_id else None
        if session is not None and conn.legacy != was_legacy:
            session.speaks_legacy = any(m.legacy for m in session.members.values())
        if session is None:
            data = await self._handlers[msg_type](conn, request)
        else:
            session.busy += 1
            try:
                data = await self._handlers[msg_type](conn, request)
            finally:
                session.busy -= 1
                self._release_if_idle(session)
        if data is None:
            return None
        reply_type = REPLY_TYPE.get(msg_type, msg_type)
        if request.raw_type == "heartbeat":
            reply_type = "heartbeat_response"
        top = data if request.legacy else None
        return envelope(reply_type, data, msg_id=request.id, user_id=conn.user_id,
                        session_id=conn.session_id, top_level=top)

    # == auth & membership ==================================================================
    async def _auth(self, conn: Connection, request: Request) -> dict[str, Any]:
        d = request.data
        return await self._join(conn, d.get("token"), d.get("user_id"), d.get("session_id"),
                                request.id)

    async def _join(
        self, conn: Connection, token: str | None, claimed_user: str | None,
        session_id: str | None, request_id: str | None, anonymous_user: str | None = None,
    ) -> dict[str, Any]:
        identity = self._verify(conn, token, claimed_user, anonymous_user)
        if session_id is None:
            if conn.session_id is not None and identity.may_join(conn.session_id):
                session_id = conn.session_id  # a re-AUTH naming no session stays where it is
            elif identity.sessions:
                session_id = identity.sessions[0]
            elif anonymous_user or (not token and self.config.allow_anonymous):
                session_id = f"anonymous_{uuid.uuid4().hex}"
            else:
                session_id = f"session_{uuid.uuid4().hex[:12]}"
        if not isinstance(session_id, str) or not session_id:
            raise InvalidMessage("must be a non-empty string", "session_id")
        if len(session_id) > MAX_ID:  # also one given at the handshake
            raise InvalidMessage(f"longer than {MAX_ID} characters", "session_id")
        if not identity.may_join(session_id):
            self._fail(conn, AuthFailed("session not allowed"))
        # legacy_user / anonymous_user are shared placeholders, not one person: the
        # per-user connection cap would let only 5 old clients in, so it does not apply
        shared = anonymous_user is not None or (token in (None, "")
                                                and self.config.allow_anonymous)
        self._check_connection_cap(conn, identity, shared)
        current = self.sessions.get(conn.session_id or "")
        rejoin = (conn.session_id == session_id and conn.user_id == identity.user_id
                  and current is not None and conn.id in current.members)
        if not rejoin:  # the same user again in the same session: nobody left or came
            self._leave(conn)
        session = await self._session(session_id)
        self._check_connection_cap(conn, identity, shared)  # again: others joined meanwhile
        if self.auth is not None:
            self.auth.record_success(conn.address)
        conn.identity, conn.session_id = identity, session_id
        session.members[conn.id] = conn
        session.speaks_legacy |= conn.legacy
        if not rejoin and not self._present_elsewhere(session, conn):  # per user, not per tab
            self._broadcast(session, conn, "PRESENCE", {"event": "joined",
                                                        "user_id": conn.user_id})
        await self._record(conn, [self._draft(conn, "auth", "user", identity.user_id, "auth",
                                              {"session_id": session_id,
                                               "address": conn.address})])
        return {"session_id": session_id, "user_id": identity.user_id,
                "snapshot": self._snapshot(session, conn)}

    def _check_connection_cap(self, conn: Connection, identity: Identity, shared: bool) -> None:
        """AuthFailed when the user already has ``connections_per_user`` authenticated
        connections (``shared`` placeholder users are exempt)."""
        others = sum(1 for c in self.connections.values()
                     if c is not conn and c.authenticated and c.user_id == identity.user_id)
        if not shared and others >= self.config.connections_per_user > 0:
            raise AuthFailed("too many connections", limit=self.config.connections_per_user)

    def _verify(self, conn: Connection, token: Any, claimed: Any, anonymous: str | None
                ) -> Identity:
        if self.auth is not None:
            self.auth.check_blocked(conn.address)
        if anonymous:
            return Identity(anonymous)
        if token in (None, "") and self.config.allow_anonymous:
            return Identity("anonymous_user")
        if self.auth is None:
            raise AuthFailed("no authentication configured")
        try:
            return self.auth.verify(token, claimed)
        except AuthFailed as exc:
            self._fail(conn, exc)
            raise

    def _fail(self, conn: Connection, exc: AuthFailed) -> None:
        log.info("AUTH refused from %s: %s", conn.address, (exc.details or {}).get("reason"))
        if self.auth is not None:
            self.auth.record_failure(conn.address)
        raise exc

    async def _session(self, session_id: str) -> Session:
        async with self._session_lock:
            session = self.sessions.get(session_id)
            if session is None:
                engine = Engine(presets=self.presets, strict_paths=self.config.strict_paths)
                if self.store is not None:
                    state = self.store.session_state(session_id)
                    if state:
                        await asyncio.to_thread(engine.restore, state)
                    engine.retire_ids(self.store.plugin_ids(session_id))
                session = Session(session_id, engine, Throttle(self._window()))
                self.sessions[session_id] = session
            return session

    def _window(self) -> float:
        return self.config.debounce_window if self.config.enable_parameter_batching else 0.0

    def _leave(self, conn: Connection) -> None:
        session = self.sessions.get(conn.session_id or "")
        if session is not None and session.members.pop(conn.id, None) is not None:
            if conn.legacy:  # the last old client gone: broadcasts stop looking for them
                session.speaks_legacy = any(m.legacy for m in session.members.values())
            if not self._present_elsewhere(session, conn):
                self._broadcast(session, conn, "PRESENCE", {"event": "left",
                                                            "user_id": conn.user_id})
            self._release_if_idle(session)

    @staticmethod
    def _present_elsewhere(session: Session, conn: Connection) -> bool:
        """True when ``conn``'s user has another connection in ``session``."""
        return any(member.user_id == conn.user_id
                   for member in session.members.values() if member is not conn)

    def _restorable(self) -> bool:
        """Sessions can be dropped from memory when the database restores them on rejoin."""
        return self.tracking

    def _release_if_idle(self, session: Session) -> None:
        """Forget a session nobody is in and no request is using, when the database can
        restore it, and free its engine (in the background); the next AUTH into it restores
        its plugins. A request in flight (e.g. waiting for fsync) keeps it, so its change is
        in the live engine that a rejoin finds, not lost from it."""
        if (session.members or session.busy or not self._restorable()
                or self.sessions.get(session.id) is not session):
            return
        self.sessions.pop(session.id, None)
        session.throttle.flush()
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(session.engine.close))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _session_of(self, conn: Connection) -> Session:
        return self.sessions[conn.session_id or ""]

    # == plugin messages ====================================================================
    async def _plugin_add(self, conn: Connection, request: Request) -> dict[str, Any]:
        self._limit(conn.plugin_ops, "plugin_ops_per_second")
        d = request.data
        if not conn.trusted:
            self._check_plugin_folder(d["name"], d.get("plugin_path"))
        session = self._session_of(conn)
        engine = session.engine
        held: list[str] = []

        def hold(plugin_id: str) -> None:  # in the engine's thread, before others can see it
            held.append(plugin_id)
            session.creating[plugin_id] = conn.id

        try:
            async with session.structure:
                if not conn.trusted:  # under the lock: racing adds are counted one by one
                    self._check_plugin_count(d["name"], d.get("plugin_path"), session)
                plugin = await asyncio.to_thread(
                    engine.add_plugin, d["track_id"], d["name"], d.get("plugin_path"),
                    plugin_id=d.get("plugin_id") or None, index=d.get("index"), reserved=hold,
                )
                index = list(engine.track(plugin.track_id).plugins).index(plugin)
                details = {"track_id": plugin.track_id, "plugin_id": plugin.id,
                           "name": plugin.name, "plugin_path": plugin.plugin_path,
                           "index": index, "parameters": plugin.values, "bypass": False}
                try:
                    daid = await self._record(conn, [self._draft(
                        conn, "plugin_add", "plugin", plugin.id, "create", details)])
                except Exception:
                    await asyncio.to_thread(engine.remove_plugin, plugin.id)
                    raise
            info = await asyncio.to_thread(plugin.parameter_info)
        finally:
            for plugin_id in held:  # recorded (or gone): addressable now
                session.creating.pop(plugin_id, None)
        data = {"track_id": plugin.track_id, "name": plugin.name,
                "plugin_path": plugin.plugin_path, "plugin_id": plugin.id, "index": index,
                "parameters": plugin.values, "parameter_info": info, "bypass": False,
                "success": True, "daid": daid, "resolved_as": plugin.resolved_as}
        if plugin.warning:
            data["warning"] = plugin.warning
        self._broadcast(session, conn, "PLUGIN_ADD", data)
        self._state_update(session, conn, plugin, "added", daid, plugin.values)
        if request.legacy:
            return legacy_added(data)
        return data

    def _check_plugin_count(self, name: str, plugin_path: str | None, session: Session) -> None:
        """PluginAddFailed at ``max_plugins_per_session`` plugins in the session, or
        ``max_plugins`` in the server's memory (0 = no limit)."""
        cfg = self.config
        here = len(session.engine.plugins) + len(session.creating)
        if cfg.max_plugins_per_session and here >= cfg.max_plugins_per_session:
            raise PluginAddFailed(name, plugin_path, (
                f"this session has {here} plugins, the server's limit "
                "(max_plugins_per_session); remove one first"))
        total = sum(len(s.engine.plugins) + len(s.creating) for s in self.sessions.values())
        if cfg.max_plugins and total >= cfg.max_plugins:
            raise PluginAddFailed(name, plugin_path, (
                f"the server holds {total} plugins, its limit (max_plugins)"))

    def _check_plugin_folder(self, name: str, plugin_path: str | None) -> None:
        """PluginAddFailed when a client asks to load a binary from outside the server's
        plugin folders: loading a shared library runs its code in the server, so remote
        clients may only load what the host installed (``plugin_dirs``). A path that does
        not exist loads nothing and is left to the placeholder rule."""
        if not is_binary_path(plugin_path) or not os.path.exists(str(plugin_path)):
            return
        folders = self.config.plugin_folders()
        if folders is None:
            return
        given = str(plugin_path)
        candidates = {Path(os.path.abspath(given)), Path(os.path.realpath(given))}  # no ".."
        if not any(c.is_relative_to(f) for c in candidates for f in folders):
            raise PluginAddFailed(name, plugin_path, (
                "outside the server's plugin folders: "
                f"{os.pathsep.join(map(str, folders)) or '(none)'} (see --plugin-dirs)"))

    async def _plugin_remove(self, conn: Connection, request: Request) -> dict[str, Any]:
        self._limit(conn.plugin_ops, "plugin_ops_per_second")
        session = self._session_of(conn)
        plugin = self._plugin(session, request, conn)
        async with session.structure:
            plugin = self._plugin(session, request, conn)  # again: a remove may have run meanwhile
            index = list(session.engine.track(plugin.track_id).plugins).index(plugin)
            await asyncio.to_thread(session.engine.remove_plugin, plugin.id, plugin.track_id)
            try:
                daid = await self._record(conn, [self._draft(
                    conn, "plugin_remove", "plugin", plugin.id, "delete",
                    {"track_id": plugin.track_id, "plugin_id": plugin.id})])
            except Exception:  # put it back as it was when removed, at its place in the chain
                await asyncio.to_thread(self._put_back_plugin, session, plugin, index)
                raise
        data = {"track_id": plugin.track_id, "plugin_id": plugin.id, "success": True,
                "daid": daid}
        session.throttle.supersede(plugin.id)
        self._broadcast(session, conn, "PLUGIN_REMOVE", data)
        self._state_update(session, conn, plugin, "removed", daid, None)
        return data

    @staticmethod
    def _put_back_plugin(session: Session, plugin: Plugin, index: int) -> None:
        """Undo a removal: the plugin again, with its values and bypass, at ``index``."""
        restored, = session.engine.restore({plugin.track_id: [plugin.state()]})
        session.engine.move_plugin(restored.id, index)

    async def _parameter(self, conn: Connection, request: Request) -> dict[str, Any]:
        d = request.data
        session = self._session_of(conn)
        plugin = self._plugin(session, request, conn)
        self._limit(conn.parameter_window(plugin.id), "parameter_changes_per_second")
        pid, value = d["parameter_id"], d["parameter_value"]
        previous = plugin.current(pid)
        applied = plugin.set(pid, value)
        drafts = ([self._param_draft(conn, plugin, pid, applied, previous, None)]
                  if self.tracking else [])  # events are built only to be recorded
        daid = await self._record(conn, drafts, plugin, {pid: previous})
        data = {"track_id": plugin.track_id, "plugin_id": plugin.id, "parameter_id": pid,
                "parameter_value": applied, "text": plugin.spec(pid).format(applied)
                if plugin.kind == "builtin" else None, "success": True, "daid": daid}
        self._relay(session, conn, plugin, (plugin.id, pid), {pid: applied}, daid, "PLUGIN_PARAMETER")
        if request.legacy:
            return legacy_updated(data)
        return data

    async def _batch(self, conn: Connection, request: Request) -> dict[str, Any]:
        session = self._session_of(conn)
        plugin = self._plugin(session, request, conn)
        values = _batch_values(request.data["parameters"])
        self._limit(conn.parameter_window(plugin.id), "parameter_changes_per_second", len(values))
        previous = {pid: plugin.get(pid) for pid in values if pid in plugin.parameters}
        applied = plugin.update(values)
        batch_id = f"batch_{uuid.uuid4().hex[:12]}"
        drafts = [self._param_draft(conn, plugin, pid, v, previous.get(pid), batch_id)
                  for pid, v in applied.items()] if self.tracking else []
        daid = await self._record(conn, drafts, plugin, previous)
        data = {"track_id": plugin.track_id, "plugin_id": plugin.id, "parameters": applied,
                "success": True, "daid": daid, "batch_id": batch_id}
        self._relay(session, conn, plugin, (plugin.id, "*batch*", conn.id), applied, daid,
                    "PLUGIN_PARAMETER_BATCH")
        return data

    async def _bypass(self, conn: Connection, request: Request) -> dict[str, Any]:
        session = self._session_of(conn)
        plugin = self._plugin(session, request, conn)
        bypass = request.data["bypass"]
        before = plugin.bypass
        session.engine.set_bypass(plugin.id, bypass)
        daid = await self._record(conn, [self._draft(
            conn, "plugin_bypass", "plugin", plugin.id, "bypass",
            {"track_id": plugin.track_id, "plugin_id": plugin.id, "bypass": bypass})],
            plugin, {_BYPASS: before}, _revert_bypass)
        data = {"track_id": plugin.track_id, "plugin_id": plugin.id, "bypass": bypass,
                "success": True, "daid": daid}
        self._broadcast(session, conn, "PLUGIN_BYPASS", data)
        self._state_update(session, conn, plugin, "bypassed" if bypass else "enabled", daid, None)
        return data

    async def _preset(self, conn: Connection, request: Request) -> dict[str, Any]:
        d = request.data
        session = self._session_of(conn)
        plugin = self._plugin(session, request, conn)
        action = _preset_action(request)
        name = d.get("preset_name")
        base = {"track_id": plugin.track_id, "plugin_id": plugin.id, "action": action,
                "success": True}
        if action == "list":  # reads the folder: off the loop
            listing = await asyncio.to_thread(self.presets.describe, plugin.preset_key)
            return {**base, "presets": [p["name"] for p in listing], "preset_info": listing}
        if action == "save":
            if not name:
                raise InvalidMessage("required for save", "preset_name")
            async with self._preset_lock:  # the file and its event stay one story
                await asyncio.to_thread(plugin.save_preset, name)
                saved = self.presets.get(plugin.preset_key, name)  # what the file holds
                daid = await self._record(conn, [self._draft(
                    conn, "preset_save", "preset", f"{plugin.preset_key}/{name}", "preset_save",
                    {"track_id": plugin.track_id, "plugin_id": plugin.id, "preset_name": name,
                     "parameters": saved.parameters if saved else plugin.values})])
            return {**base, "preset_name": name, "daid": daid}
        if action == "delete":
            if not name:
                raise InvalidMessage("required for delete", "preset_name")
            async with self._preset_lock:  # no save of this name lands in between
                # check, record, then delete: a deletion that cannot be recorded never happens
                existing = self.presets.get(plugin.preset_key, name)
                if existing is None:
                    raise PresetLoadFailed(plugin.id, f"unknown preset {name!r}")
                if existing.factory:
                    raise PresetLoadFailed(plugin.id, f"factory preset {name!r} is read-only")
                daid = await self._record(conn, [self._draft(
                    conn, "preset_delete", "preset", f"{plugin.preset_key}/{name}", "delete",
                    {"track_id": plugin.track_id, "plugin_id": plugin.id, "preset_name": name})])
                plugin.delete_preset(name)
            return {**base, "preset_name": name, "daid": daid}
        if action != "load":
            raise InvalidMessage("expected load, save, list or delete", "action")
        source = d.get("preset_data") if d.get("preset_data") is not None else name
        if source is None:
            raise InvalidMessage("preset_name or preset_data required", "preset_name")
        changes = len(source) if isinstance(source, dict) else len(plugin.parameters)
        self._limit(conn.parameter_window(plugin.id), "parameter_changes_per_second", changes)
        # a named preset is read, applied and recorded with saves and deletes held off, so
        # the log never has a load of a preset it says was deleted (or of another version)
        async with self._preset_lock if isinstance(source, str) else nullcontext():
            resolved = await asyncio.to_thread(session.engine.preset_values, plugin, source)
            # applied and handed to the log with no await in between, so a change another
            # client makes meanwhile lands either before both or after both (engine and log
            # agree)
            before = plugin.values
            plugin.update(resolved)
            values = plugin.values
            daid = await self._record(conn, [self._draft(
                conn, "preset_load", "plugin", plugin.id, "preset_load",
                {"track_id": plugin.track_id, "plugin_id": plugin.id,
                 "preset_name": name if isinstance(source, str) else None,
                 "parameters": values})], plugin, before)
        data = {**base, "preset_name": name, "parameters": values, "daid": daid}
        session.throttle.supersede(plugin.id, values)
        self._broadcast(session, conn, "PLUGIN_PRESET", data)
        self._state_update(session, conn, plugin, "preset_loaded", daid, values)
        return data

    async def _parameters_get(self, conn: Connection, request: Request) -> dict[str, Any]:
        plugin = self._plugin(self._session_of(conn), request, conn)
        info = await asyncio.to_thread(plugin.parameter_info)
        state = self._as_recorded(conn, {"plugin_id": plugin.id, "parameters": plugin.values,
                                         "bypass": plugin.bypass})
        for entry in info:  # the values shown are the log's (see _as_recorded)
            value = state["parameters"].get(entry["id"], entry["value"])
            if value != entry["value"]:
                entry["value"] = value
                if plugin.kind == "builtin":
                    entry["text"] = plugin.spec(entry["id"]).format(value)
        return {"track_id": plugin.track_id, "plugin_id": plugin.id, "name": plugin.name,
                "parameters": state["parameters"], "parameter_info": info,
                "bypass": state["bypass"], "success": True}

    async def _state_get(self, conn: Connection, request: Request) -> dict[str, Any]:
        return {"snapshot": self._snapshot(self._session_of(conn), conn)}

    async def _cursor(self, conn: Connection, request: Request) -> None:
        if conn.cursors.take() is None:
            data = {k: v for k, v in request.data.items()
                    if k in ("track_id", "plugin_id", "parameter_id", "position")}
            data["user_id"] = conn.user_id
            self._broadcast(self._session_of(conn), conn, "USER_CURSOR_UPDATE", data)

    async def _ping(self, conn: Connection, request: Request) -> dict[str, Any]:
        return {"timestamp": now_iso()}

    # == helpers ============================================================================
    def _plugin(self, session: Session, request: Request, conn: Connection) -> Plugin:
        """The plugin a request names; one still being added (its creation not recorded yet)
        does not exist for other connections: nothing may be logged about it before its
        birth. Its adder's own later requests may use it (a pipelining client adds, then
        sets): they reach the log after the creation, in the connection's order."""
        d = request.data
        track_id = d.get("track_id")
        adder = session.creating.get(d["plugin_id"])
        if adder is not None and adder != conn.id:
            raise PluginNotFound(d["plugin_id"], track_id)
        if request.type == "UPDATE_PARAMETER" and not track_id:
            return session.engine.plugin(d["plugin_id"])
        return session.engine.plugin(d["plugin_id"], track_id)

    @staticmethod
    def _limit(window: SlidingWindow, name: str, n: int = 1) -> None:
        wait = window.take(n)
        if wait is not None:
            raise RateLimited(name, wait)

    def _draft(self, conn: Connection, action: str, entity_type: str, entity_id: str,
               operation: str, details: dict[str, Any]) -> EventDraft:
        return EventDraft(conn.user_id or "unknown", conn.session_id or "", action, entity_type,
                          entity_id, operation, details, details.get("plugin_id"))

    def _param_draft(self, conn: Connection, plugin: Plugin, pid: str, value: float,
                     previous: float | None, batch_id: str | None) -> EventDraft:
        details: dict[str, Any] = {"track_id": plugin.track_id, "plugin_id": plugin.id,
                                   "parameter_id": pid, "value": value,
                                   "previous_value": previous}
        if batch_id:
            details["batch_id"] = batch_id
        return self._draft(conn, "parameter_update", "parameter", f"{plugin.id}.{pid}",
                           "update", details)

    async def _record(self, conn: Connection, drafts: list[EventDraft],
                      plugin: Plugin | None = None, previous: dict[Any, Any] | None = None,
                      put_back: Callable[[Plugin, dict[Any, Any]], None] | None = None
                      ) -> str | None:
        """Append events durably; returns the last DAID (None when tracking is off).

        The change was applied first; ``previous`` maps what it changed on ``plugin`` (parameter
        ids) to the values before. If the events cannot be recorded the change is undone with
        ``put_back(plugin, values)`` (default: :meth:`Plugin.revert` of the values), given only
        the values no later change has overwritten meanwhile (see :mod:`pluginlab.tentative`),
        and InternalError is raised.
        """
        if not self.tracking or not drafts:
            return None
        undoable = plugin is not None and bool(previous)
        waiting = self._waiting_changes(conn, plugin, previous) if (
            undoable and self._replies_wait) else []
        try:
            pending = self.store.append_many_async(drafts)
            # The store enqueues synchronously when the coroutine starts, before the loop can
            # run the next pipelined request, so signalling here keeps the log in order.
            current = _in_flight.get()
            if current is not None:
                current.signal_applied()
            events = await pending
        except Exception as exc:  # the client's request was fine; our log refused it
            if undoable:
                assert plugin is not None and previous is not None
                restore = self._undo_waiting(waiting) if waiting else previous
                restore = {k: v for k, v in restore.items() if v is not None}
                undo = put_back or _revert_values
                for target in self._undo_targets(conn, plugin) if restore else ():
                    undo(target, restore)
            log.exception("provenance store refused %d event(s)", len(drafts))
            raise InternalError("the change could not be recorded; it was not applied") from exc
        except BaseException:  # cancelled: events handed to the store are recorded all the same
            self._settled(waiting)
            raise
        if waiting:
            self._settled(waiting)
        return str(events[-1].daid)

    def _snapshot(self, session: Session, reader: Connection) -> dict[str, Any]:
        """The session's snapshot with the values the log has (see :meth:`_as_recorded`)."""
        snapshot = session.snapshot()
        if self._tentative:
            for chain in snapshot["tracks"].values():
                for plugin in chain:
                    self._as_recorded(reader, plugin)
        return snapshot

    def _as_recorded(self, reader: Connection, plugin: dict[str, Any]) -> dict[str, Any]:
        """``plugin`` (a state dict) with each value still waiting for its record replaced by
        the one before it, unless the newest waiting change is the reader's own (it reads its
        own writes): others are shown only what the log has, so what they see survives a
        crash, and an undone change never reaches them (only when replies wait for the store;
        otherwise nothing waits)."""
        if not self._tentative:
            return plugin
        session_id = reader.session_id
        for waiting, value in self._tentative.recorded_values(reader.id):
            sid, plugin_id, key = cast(tuple[Any, Any, Any], waiting)
            if sid != session_id or plugin_id != plugin["plugin_id"] or value is None:
                continue
            if key == _BYPASS:
                plugin["bypass"] = value
            elif key in plugin["parameters"]:
                plugin["parameters"][key] = value
        return plugin

    def _undo_targets(self, conn: Connection, plugin: Plugin) -> list[Plugin]:
        """The plugin objects an undo applies to: ``plugin`` (also when removed meanwhile: a
        removal undone later brings it back with its values) and the one put back in its place
        if its removal was undone first (the same id, name and path)."""
        session = self.sessions.get(conn.session_id or "")
        current = session.engine.plugins.get(plugin.id) if session is not None else None
        if current is None or current is plugin or (current.name, current.plugin_path) != (
                plugin.name, plugin.plugin_path):
            return [plugin]
        return [plugin, current]

    def _settled(self, waiting: list[tuple[Any, Any]]) -> None:
        for key, change in waiting:
            self._tentative.recorded(key, change)

    def _waiting_changes(self, conn: Connection, plugin: Plugin | None,
                         previous: dict[Any, Any] | None) -> list[tuple[Any, Any]]:
        """When replies wait for the store, other changes can land before this one is
        recorded: note it in the ledger of tentative changes. (Otherwise nothing can come in
        between and undoing simply restores ``previous``: the caller does not call this.)"""
        if plugin is None or not previous:
            return []
        keys = [(conn.session_id, plugin.id, k) for k in previous]
        return [(key, self._tentative.applied(key, previous[key[2]], conn.id)) for key in keys]

    def _undo_waiting(self, waiting: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """The values to put back for failed changes that no later change overwrote."""
        restore = {}
        for key, change in waiting:
            newest, value = self._tentative.failed(key, change)
            if newest:
                restore[key[2]] = value
        return restore

    def _send(self, conn: Connection, message: dict[str, Any]) -> None:
        if not conn.closed:
            conn.send(message)

    def _error(self, conn: Connection, exc: PluginlabError, request_id: str | None
               ) -> dict[str, Any]:
        message = envelope("ERROR", exc.to_payload(), msg_id=request_id or "",
                           user_id=conn.user_id, session_id=conn.session_id)
        message["id"] = request_id  # null when the frame could not be parsed
        return message

    def _broadcast(self, session: Session, sender: Connection, msg_type: str,
                   data: dict[str, Any], user_id: str | None = None) -> None:
        """Send to every member but ``sender`` (when session broadcasting is on)."""
        if not self.config.enable_session_broadcasting:
            return
        others = [member for member in session.members.values() if member is not sender]
        if not others:
            return
        message = envelope(msg_type, data, user_id=user_id or sender.user_id,
                           session_id=session.id)
        old_shapes = self._legacy_broadcasts(others, msg_type, data, user_id or sender.user_id,
                                             session.id) if session.speaks_legacy else []
        current = _in_flight.get()
        if current is not None and current.open:
            current.held.extend((member, message) for member in others)  # after the reply
            current.held.extend(old_shapes)
        else:
            for member in others:
                self._send(member, message)
            for member, each in old_shapes:
                self._send(member, each)

    @staticmethod
    def _legacy_broadcasts(members: list[Connection], msg_type: str, data: dict[str, Any],
                           user_id: str | None, session_id: str
                           ) -> list[tuple[Connection, dict[str, Any]]]:
        """The broadcast again in the old shapes (fields at the top level too), for the
        members that spoke the old format; they follow the new-format message."""
        old_clients = [member for member in members if member.legacy]
        if not old_clients:
            return []
        translated = [envelope(t, d, user_id=user_id, session_id=session_id, top_level=d)
                      for t, d in legacy_broadcasts(msg_type, data)]
        return [(member, each) for member in old_clients for each in translated]

    def _state_update(self, session: Session, sender: Connection, plugin: Plugin, state: str,
                      daid: str | None, parameters: dict[str, float] | None,
                      user_id: str | None = None) -> None:
        """PLUGIN_STATE_UPDATE to the others; ``changed_by`` is ``user_id`` (default: the
        sender's user now)."""
        changed_by = user_id or sender.user_id
        data: dict[str, Any] = {"track_id": plugin.track_id, "plugin_id": plugin.id,
                                "state": state, "changed_by": changed_by,
                                "timestamp": now_iso(), "daid": daid}
        if parameters is not None:
            data["parameters"] = parameters
        self._broadcast(session, sender, "PLUGIN_STATE_UPDATE", data, changed_by)

    def _relay(self, session: Session, sender: Connection, plugin: Plugin, key: tuple[str, ...],
               values: dict[str, float], daid: str | None, msg_type: str) -> None:
        """Throttled parameter broadcast: the typed relay plus a PLUGIN_STATE_UPDATE. Alone in
        the session there is nobody to tell (who joins later gets the values in the snapshot).

        ``key`` starts with the plugin id (the throttle's group: no older value of a parameter
        leaves after a newer one). A batch key also names its sender: a merged batch goes to
        everyone but its sender, so batches of different senders are never merged."""
        members = session.members
        if not self.config.enable_session_broadcasting or len(members) - (
                sender.id in members) < 1:  # nobody else (the sender may have left already)
            return

        who = sender.user_id  # the connection may be someone else when the window ends

        def fire(merged: dict[str, Any]) -> None:
            if not session.engine.holds(plugin):  # removed meanwhile
                return
            if msg_type == "PLUGIN_PARAMETER":
                (pid, value), = merged.items()
                relay = {"track_id": plugin.track_id, "plugin_id": plugin.id,
                         "parameter_id": pid, "parameter_value": value, "success": True,
                         "daid": daid}
            else:
                relay = {"track_id": plugin.track_id, "plugin_id": plugin.id,
                         "parameters": merged, "success": True, "daid": daid}
            with self._held_together():
                self._broadcast(session, sender, msg_type, relay, who)
                self._state_update(session, sender, plugin, "updated", daid, merged, who)

        session.throttle.submit(key, values, fire)

    @contextmanager
    def _held_together(self) -> Iterator[None]:
        """Broadcasts made inside are sent member by member when it ends; inside an open wire
        request they are already held (until its reply), so nothing changes there."""
        current = _in_flight.get()
        if current is not None and current.open:
            yield
            return
        group = _InFlight(None)
        token = _in_flight.set(group)
        try:
            yield
        finally:
            _in_flight.reset(token)
            group.open = False
            self._send_held(group)

    def _send_held(self, current: _InFlight) -> None:
        """Send held broadcasts member by member (each member's in the order they were made),
        so a transport can put one member's frames into one write."""
        if not current.held:
            return
        by_member: dict[Connection, list[dict[str, Any]]] = {}
        for member, message in current.held:
            by_member.setdefault(member, []).append(message)
        for member, messages in by_member.items():
            if len(messages) > 1 and member.send_many is not None:
                if not member.closed:
                    member.send_many(messages)
                continue
            for message in messages:
                self._send(member, message)


def _revert_values(plugin: Plugin, values: dict[Any, Any]) -> None:
    plugin.revert(values)


def _revert_bypass(plugin: Plugin, values: dict[Any, Any]) -> None:
    plugin.revert({}, bypass=values[_BYPASS])


def _batch_values(raw: Any) -> dict[str, Any]:
    """``{id: value}`` or ``[{parameter_id, parameter_value}]`` -> dict (InvalidMessage if bad,
    also for a list naming one parameter twice)."""
    if isinstance(raw, dict):
        if not raw:
            raise InvalidMessage("must not be empty", "parameters")
        return dict(raw)
    values: dict[str, Any] = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("parameter_id"), str) \
                or "parameter_value" not in item:
            raise InvalidMessage("items need parameter_id (string) and parameter_value",
                                 "parameters")
        if item["parameter_id"] in values:  # which value was meant? refuse, never guess
            raise InvalidMessage(f"parameter_id {item['parameter_id']!r} is listed twice",
                                 "parameters")
        values[item["parameter_id"]] = item["parameter_value"]
    if not values:
        raise InvalidMessage("must not be empty", "parameters")
    return values


def _preset_action(request: Request) -> Any:
    """PLUGIN_PRESET's action (missing, null or "" = load): one reading for the permission
    check and the handler, so they can never disagree."""
    return request.data.get("action") or "load"


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _peek_id(frame: str | bytes) -> str | None:
    """Best-effort request id of a frame we refuse: also of JSON that parse() refused for
    its content (e.g. a lone surrogate elsewhere), when the id itself is usable text."""
    try:
        try:
            body = decode_strict(frame)
        except ValueError as exc:  # JSON with a number beyond a double (1e400) has an id;
            if "out of range" not in str(exc):  # NaN and the like, or garbage: none
                raise
            body = json.loads(frame, parse_constant=_not_json)
        value = body.get("id") if isinstance(body, dict) else None
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            return None
        text = str(value)  # as parse() would have it
        text.encode("utf-8")  # an id with a lone surrogate cannot be echoed
        return text
    except Exception:  # noqa: BLE001 - only a best-effort id for the ERROR reply
        return None
