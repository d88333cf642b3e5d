"""Async Python client for the pluginlab protocol (tests, notebooks, scripts).

::

    async with Client(url) as client:
        await client.authenticate(token, session_id="jam")
        added = await client.add_plugin("track_1", "Reverb")
        await client.set_parameter("track_1", added["plugin_id"], "wet_dry", 0.7)
        # changes made by others (a client never receives broadcasts of its own):
        update = await client.wait_for("PLUGIN_STATE_UPDATE",
                                       lambda m: m["data"]["changed_by"] != client.user_id)

Replies are matched to requests by ``id``; an ERROR reply raises :class:`ClientError`
carrying ``code`` and ``details``; a connection that closes or cannot be used raises
:class:`ClientConnectionError` (with the close code and reason). Every other incoming message
(broadcasts, presence) is buffered, at most ``max_buffered`` of them (the oldest are dropped
beyond, counted in ``dropped``): :meth:`Client.wait_for` takes the first matching one,
:meth:`Client.broadcasts` iterates over them as they come. Each buffered message is taken
once, by whichever of them asks first. A reply that arrives after its call was cancelled or
timed out is dropped, not buffered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, Self
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .messages import HANDSHAKE_ID

__all__ = ["CLIENT_MAX_SIZE", "Client", "ClientConnectionError", "ClientError"]

log = logging.getLogger(__name__)

# Largest frame the client accepts (websockets' default is 1 MiB). The server takes frames up
# to 1 MiB from each client, and what it sends on can be larger (an envelope around a relayed
# near-limit cursor, a big session's snapshot): the server's member buffer limit is 16 MiB.
CLIENT_MAX_SIZE = 16 * 2**20

Predicate = Callable[[dict[str, Any]], bool]
_UNANSWERED_KEPT = 1024  # ids of abandoned calls remembered
_CURSOR_ID = "py_cursor_"  # ids of cursor updates (no reply; an ERROR for one is logged)


def _dumps(body: dict[str, Any]) -> str:
    """A request as compact UTF-8 JSON, as browsers send it (escaping non-ASCII text would
    make it up to 6x longer against the server's frame limit). Text that is not valid Unicode
    (a lone surrogate) is sent escaped, so the server can say what is wrong with it. numpy
    scalars and arrays are sent as numbers and lists; NaN and infinities cannot be sent (JSON
    has no such numbers) and raise ValueError saying so."""
    try:
        text = json.dumps(body, allow_nan=False, ensure_ascii=False, default=_plain)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        raise ValueError("NaN and infinite values cannot be sent (JSON has no such numbers; "
                         "the server refuses non-finite values with INVALID_PARAMETER)"
                         ) from None
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(body, allow_nan=False, default=_plain)
    return text


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (``json.dumps``'s ``default``)."""
    convert = getattr(value, "tolist", None)
    if convert is None:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    plain = convert()
    if isinstance(plain, float) and not math.isfinite(plain):
        raise ValueError("Out of range float values are not JSON compliant")
    return plain


class ClientError(Exception):
    """An ERROR reply: ``code`` (e.g. PLUGIN_NOT_FOUND), ``details`` and the whole message;
    ``request_id`` is the request's id and ``retry_after`` the seconds to wait after
    RATE_LIMITED (else None). A refused handshake token is AUTH_FAILED with the server's reason
    in ``details["reason"]`` and the HTTP status in ``details["http_status"]``."""

    def __init__(self, message: dict[str, Any]) -> None:
        data = message.get("data") or {}
        self.code: str = data.get("code", "")
        self.details: dict[str, Any] | None = data.get("details")
        self.message = message
        self.request_id: str | None = message.get("id")
        retry = (self.details or {}).get("retry_after")
        self.retry_after: float | None = retry if isinstance(retry, (int, float)) else None
        super().__init__(f"{self.code}: {data.get('error')}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class ClientConnectionError(ConnectionError):
    """The connection is not open (never opened, closed, or lost): ``code`` and ``reason``
    are the WebSocket close code and reason when one was received (e.g. 1009 for a request
    larger than the server's frame limit), else None and ""."""

    def __init__(self, what: str, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        said = f" (close code {code}{': ' + reason if reason else ''})" if code else ""
        super().__init__(what + said)


class Client:
    """One WebSocket connection to a pluginlab server.

    ``token`` (and ``session_id``) authenticate at the handshake: :meth:`connect` then returns
    once the server has joined the session, with ``user_id``, ``session_id`` and ``snapshot``
    filled, or raises ClientError (AUTH_FAILED also when the server refuses the token before
    the WebSocket opens). A token in an ``Authorization: Bearer`` header (in
    ``additional_headers``) is waited for the same way. The server's answer is kept in
    ``handshake``, not among the broadcasts. Without a token, ``session_id`` is the session
    :meth:`authenticate` joins by default. ``timeout`` (seconds) bounds every call and
    :meth:`wait_for`. Frames up to :data:`CLIENT_MAX_SIZE` are accepted (``max_size=`` and
    other ``connect_kwargs`` go to ``websockets.connect``). At most ``max_buffered``
    broadcasts are kept unread (None: no limit).
    """

    def __init__(self, url: str, *, token: str | None = None, session_id: str | None = None,
                 timeout: float = 10.0, max_buffered: int | None = 10_000,
                 **connect_kwargs: Any) -> None:
        headers = connect_kwargs.get("additional_headers") or {}
        items = headers.items() if hasattr(headers, "items") else headers
        bearer = any(str(k).lower() == "authorization"
                     and str(v).lower().startswith("bearer ") and str(v)[7:].strip()
                     for k, v in items)
        self._handshake = bool(token) or bearer
        if token:
            query = {"token": token, **({"session_id": session_id} if session_id else {})}
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(query)}"
        self.url = url
        self.timeout = timeout
        self.max_buffered = max_buffered
        self.dropped = 0  # broadcasts dropped because max_buffered were unread
        self._default_session = None if token else session_id  # (a handshake joined it)
        self._connect_kwargs = {"proxy": None, "compression": None, "close_timeout": timeout,
                                "max_size": CLIENT_MAX_SIZE, **connect_kwargs}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._unanswered: dict[str, None] = {}  # ids whose reply nobody waits for (ordered)
        self._inbox: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._ids = itertools.count(1)
        self.user_id: str | None = None
        self.session_id: str | None = None
        self.snapshot: dict[str, Any] | None = None
        self.handshake: dict[str, Any] | None = None  # the server's answer to a handshake token

    async def connect(self) -> Self:
        """Open the connection (RuntimeError if this client is already connected). With a
        handshake token the server authenticates at once: this waits for its answer (raising
        ClientError if it refuses) and fills ``user_id``, ``session_id``, ``snapshot``; a
        failed handshake leaves nothing open."""
        if self._ws is not None and not self.closed:
            raise RuntimeError("already connected; close() first")
        self.handshake = self.user_id = self.session_id = self.snapshot = None  # a new join
        try:
            self._ws = await connect(self.url, **self._connect_kwargs)
        except InvalidStatus as exc:
            raise _refusal(exc) from exc
        except (OSError, InvalidHandshake) as exc:  # refused, unreachable, not a WebSocket
            raise ClientConnectionError(f"cannot connect to {self.url}: {exc}") from exc
        self._reader = asyncio.create_task(self._read())
        if self._handshake:
            try:
                await self._await_handshake()
            except BaseException:
                await self.close()
                raise
        return self

    async def _await_handshake(self) -> None:
        async def answered() -> dict[str, Any]:
            while self.handshake is None:
                if self.closed:
                    raise self._lost("connection closed during the handshake's join")
                self._arrived.clear()
                await self._arrived.wait()
            return self.handshake

        reply = await asyncio.wait_for(answered(), self.timeout)
        if reply.get("type") == "ERROR":
            raise ClientError(reply)

    async def close(self) -> None:
        """Close the connection (again: nothing happens) and wait for its reader to end."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._ws is None or self._reader is None or self._reader.done()

    # -- raw ----------------------------------------------------------------------------------
    async def send_raw(self, frame: str | bytes) -> None:
        """Send a frame as is (tests of malformed input); ClientConnectionError if the
        connection is not open."""
        if self._ws is None:
            raise ClientConnectionError("not connected: call connect() first")
        try:
            await self._ws.send(frame)
        except ConnectionClosed:
            raise self._lost("connection closed") from None

    async def request(self, msg_type: str, data: dict[str, Any] | None = None,
                      **envelope: Any) -> dict[str, Any]:
        """Send one request and return the reply message (raises ClientError on ERROR,
        ClientConnectionError if the connection closes first, TimeoutError after
        ``timeout``). An ``id`` given in ``envelope`` must not be in flight (ValueError)."""
        msg_id = envelope.pop("id", None) or self._next_id()
        if msg_id in self._pending:
            raise ValueError(f"a request with id {msg_id!r} is already waiting for its reply")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        body = {"id": msg_id, "type": msg_type, "data": data or {}, **envelope}
        sent = False
        try:
            await self.send_raw(_dumps(body))
            sent = True
            reply = await asyncio.wait_for(future, self.timeout)
        finally:
            self._pending.pop(msg_id, None)
            if not future.done() or future.cancelled():  # cancelled or timed out: its
                if sent:  # reply, if one comes, is nobody's broadcast
                    self._expect_no_caller(msg_id)
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved here if the send failed first
        if reply.get("type") == "ERROR":
            raise ClientError(reply)
        return reply

    async def call(self, msg_type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`request` returning only the reply's ``data``."""
        return dict((await self.request(msg_type, data)).get("data") or {})

    def _next_id(self) -> str:
        msg_id = f"py_{next(self._ids)}"
        while msg_id in self._pending:  # a caller chose this id for a request in flight
            msg_id = f"py_{next(self._ids)}"
        return msg_id

    # -- messages -----------------------------------------------------------------------------
    async def authenticate(self, token: str | None = None, *, user_id: str | None = None,
                           session_id: str | None = None) -> dict[str, Any]:
        """AUTH: join ``session_id`` (default: the constructor's); returns AUTH_SUCCESS data
        ``{session_id, user_id, snapshot}`` and fills the attributes of the same names."""
        session_id = session_id if session_id is not None else self._default_session
        data = {k: v for k, v in {"token": token, "user_id": user_id,
                                  "session_id": session_id}.items() if v is not None}
        reply = await self.call("AUTH", data)
        self._joined(reply)
        return reply

    def _joined(self, data: dict[str, Any]) -> None:
        self.user_id, self.session_id = data.get("user_id"), data.get("session_id")
        self.snapshot = data.get("snapshot")

    async def add_plugin(self, track_id: str, name: str, plugin_path: str | None = None,
                         plugin_id: str = "") -> dict[str, Any]:
        """PLUGIN_ADD; returns ``{plugin_id, parameters, parameter_info, daid, ...}``."""
        return await self.call("PLUGIN_ADD", {"track_id": track_id, "name": name,
                                              "plugin_path": plugin_path,
                                              "plugin_id": plugin_id})

    async def remove_plugin(self, track_id: str, plugin_id: str) -> dict[str, Any]:
        """PLUGIN_REMOVE; returns ``{track_id, plugin_id, success, daid}``."""
        return await self.call("PLUGIN_REMOVE", {"track_id": track_id, "plugin_id": plugin_id})

    async def set_parameter(self, track_id: str, plugin_id: str, parameter_id: str,
                            value: Any) -> dict[str, Any]:
        """PLUGIN_PARAMETER; returns the echo with the applied ``parameter_value``."""
        return await self.call("PLUGIN_PARAMETER", {
            "track_id": track_id, "plugin_id": plugin_id, "parameter_id": parameter_id,
            "parameter_value": value})

    async def set_parameters(self, track_id: str, plugin_id: str,
                             values: dict[str, Any]) -> dict[str, Any]:
        """PLUGIN_PARAMETER_BATCH (all or nothing); returns the applied ``parameters``."""
        return await self.call("PLUGIN_PARAMETER_BATCH", {
            "track_id": track_id, "plugin_id": plugin_id, "parameters": values})

    async def set_bypass(self, track_id: str, plugin_id: str, bypass: bool) -> dict[str, Any]:
        """PLUGIN_BYPASS; returns the echo with ``bypass``."""
        return await self.call("PLUGIN_BYPASS", {"track_id": track_id, "plugin_id": plugin_id,
                                                 "bypass": bypass})

    async def preset(self, track_id: str, plugin_id: str, action: str = "load",
                     preset_name: str | None = None,
                     preset_data: dict[str, Any] | None = None) -> dict[str, Any]:
        """PLUGIN_PRESET ``load`` / ``save`` / ``list`` / ``delete``; load returns the
        ``parameters`` after loading, list returns ``presets`` (names) and ``preset_info``."""
        data: dict[str, Any] = {"track_id": track_id, "plugin_id": plugin_id, "action": action}
        if preset_name is not None:
            data["preset_name"] = preset_name
        if preset_data is not None:
            data["preset_data"] = preset_data
        return await self.call("PLUGIN_PRESET", data)

    async def get_parameters(self, track_id: str, plugin_id: str) -> dict[str, Any]:
        """PLUGIN_PARAMETERS_GET: ``{parameters, parameter_info, bypass, name, ...}``."""
        return await self.call("PLUGIN_PARAMETERS_GET", {"track_id": track_id,
                                                         "plugin_id": plugin_id})

    async def session_state(self) -> dict[str, Any]:
        """SESSION_STATE_GET: the snapshot ``{session_id, members, tracks}``."""
        return (await self.call("SESSION_STATE_GET"))["snapshot"]

    async def cursor(self, **fields: Any) -> None:
        """USER_CURSOR_UPDATE (``track_id``, ``plugin_id``, ``parameter_id``, ``position``).
        It has no reply, so this does not wait; an ERROR the server sends back for it (e.g.
        a position over 1 KiB) is logged as a warning, not buffered as a broadcast."""
        await self.send_raw(_dumps({"id": f"{_CURSOR_ID}{next(self._ids)}",
                                    "type": "USER_CURSOR_UPDATE", "data": fields}))

    async def ping(self) -> dict[str, Any]:
        """PING; returns the whole PONG message (its ``data`` has the server's timestamp)."""
        return await self.request("PING")

    # -- incoming -----------------------------------------------------------------------------
    async def wait_for(self, msg_type: str, predicate: Predicate | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """Take the first buffered or future broadcast of ``msg_type`` matching ``predicate``.

        ``timeout`` in seconds (None: the client's ``timeout``; 0: only what is buffered now;
        ``math.inf``: no limit); TimeoutError when none comes in time,
        ClientConnectionError when the connection closes first."""
        found = self._take(msg_type, predicate)
        if found is not None:
            return found

        async def find() -> dict[str, Any]:
            while True:
                message = self._take(msg_type, predicate)
                if message is not None:
                    return message
                if self.closed:
                    raise self._lost("connection closed while waiting for " + msg_type)
                self._arrived.clear()
                await self._arrived.wait()

        limit = self.timeout if timeout is None else timeout
        if limit <= 0:
            raise TimeoutError(f"no {msg_type} buffered")
        return await asyncio.wait_for(find(), None if math.isinf(limit) else limit)

    def _take(self, msg_type: str, predicate: Predicate | None) -> dict[str, Any] | None:
        for i, message in enumerate(self._inbox):
            if message.get("type") == msg_type and (predicate is None or predicate(message)):
                return self._inbox.pop(i)
        return None

    def received(self, msg_type: str | None = None) -> list[dict[str, Any]]:
        """Buffered non-reply messages (of ``msg_type``), without consuming them."""
        return [m for m in self._inbox if msg_type is None or m.get("type") == msg_type]

    def drain(self) -> list[dict[str, Any]]:
        """Take and return every buffered message."""
        taken, self._inbox = self._inbox, []
        return taken

    async def broadcasts(self) -> AsyncIterator[dict[str, Any]]:
        """Yield buffered and incoming non-reply messages until the connection closes.
        Consumers share one buffer: each message goes to one of them (or to a wait_for)."""
        while True:
            while self._inbox:
                yield self._inbox.pop(0)
            if self.closed:
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                self._deliver(json.loads(frame))
                self._arrived.set()
        except Exception:  # noqa: BLE001, S110 - connection closed or broken: waiters see `closed`
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(self._lost("connection closed"))
            self._arrived.set()

    def _deliver(self, message: dict[str, Any]) -> None:
        """Route one incoming message: the handshake's answer, a reply, or a broadcast."""
        msg_id = str(message.get("id"))
        future = self._pending.get(msg_id)
        if message.get("id") == HANDSHAKE_ID:  # neither a reply nor a broadcast
            self.handshake = message
            if message.get("type") == "AUTH_SUCCESS":
                self._joined(message.get("data") or {})
        elif future is not None and not future.done():
            future.set_result(message)
        elif msg_id.startswith(_CURSOR_ID) or msg_id in self._unanswered:
            self._unanswered.pop(msg_id, None)
            if message.get("type") == "ERROR":
                log.warning("request %s was refused: %s", msg_id, ClientError(message))
        else:
            self._inbox.append(message)
            if self.max_buffered is not None and len(self._inbox) > self.max_buffered:
                if not self.dropped:
                    log.warning("more than %d broadcasts unread: dropping the oldest "
                                "(see Client.dropped)", self.max_buffered)
                del self._inbox[0]
                self.dropped += 1

    def _expect_no_caller(self, msg_id: str) -> None:
        """A reply to ``msg_id`` (if any comes) is nobody's: drop it (log an ERROR). Only the
        last ``_UNANSWERED_KEPT`` such ids are remembered."""
        self._unanswered[msg_id] = None
        if len(self._unanswered) > _UNANSWERED_KEPT:
            del self._unanswered[next(iter(self._unanswered))]

    def _lost(self, what: str) -> ClientConnectionError:
        """ClientConnectionError for ``what``, with the close code and reason if known."""
        ws = self._ws
        code = ws.close_code if ws is not None else None
        reason = (ws.close_reason or "") if ws is not None else ""
        return ClientConnectionError(what, code, reason)


def _refusal(exc: InvalidStatus) -> Exception:
    """A handshake the server refused: 401/403 as ClientError AUTH_FAILED with its reason."""
    status = exc.response.status_code
    reason = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
    if status not in (401, 403):
        return ClientConnectionError(f"the server refused the WebSocket: HTTP {status} {reason}")
    details: dict[str, Any] = {"reason": reason.removeprefix("authentication failed: "),
                               "http_status": status}
    retry = exc.response.headers.get("Retry-After")
    if retry is not None and retry.isdigit():
        details["retry_after"] = int(retry)
    return ClientError({"id": HANDSHAKE_ID, "type": "ERROR",
                        "data": {"code": "AUTH_FAILED", "error": reason, "details": details}})
