"""Async Python client for the pluginlab protocol (tests, notebooks, scripts).

::

    async with Client(url) as client:
        await client.authenticate(token, session_id="jam")
        added = await client.add_plugin("track_1", "Reverb")
        await client.set_parameter("track_1", added["plugin_id"], "wet_dry", 0.7)
        update = await client.wait_for("PLUGIN_STATE_UPDATE")

Replies are matched to requests by ``id``; an ERROR reply raises :class:`ClientError`
carrying ``code`` and ``details``. Every other incoming message (broadcasts, presence) is
buffered: :meth:`Client.wait_for` takes the first matching one, :meth:`Client.broadcasts`
iterates over them as they come.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Self
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect

from .messages import HANDSHAKE_ID

__all__ = ["CLIENT_MAX_SIZE", "Client", "ClientError"]

# Largest frame the client accepts (websockets' default is 1 MiB). The server takes frames up
# to 1 MiB from each client, and what it sends on can be larger (an envelope around a relayed
# near-limit cursor, a big session's snapshot): the server's member buffer limit is 16 MiB.
CLIENT_MAX_SIZE = 16 * 2**20

Predicate = Callable[[dict[str, Any]], bool]


def _dumps(body: dict[str, Any]) -> str:
    """A request as compact UTF-8 JSON, as browsers send it (escaping non-ASCII text would
    make it up to 6x longer against the server's frame limit). Text that is not valid Unicode
    (a lone surrogate) is sent escaped, so the server can say what is wrong with it."""
    text = json.dumps(body, allow_nan=False, ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(body, allow_nan=False)
    return text


class ClientError(Exception):
    """An ERROR reply: ``code`` (e.g. PLUGIN_NOT_FOUND), ``details`` and the whole message."""

    def __init__(self, message: dict[str, Any]) -> None:
        data = message.get("data") or {}
        self.code: str = data.get("code", "")
        self.details: dict[str, Any] | None = data.get("details")
        self.message = message
        super().__init__(f"{self.code}: {data.get('error')}")


class Client:
    """One WebSocket connection to a pluginlab server.

    ``token`` (and ``session_id``) authenticate at the handshake: :meth:`connect` then returns
    once the server has joined the session, with ``user_id``, ``session_id`` and ``snapshot``
    filled, or raises ClientError. The server's answer is kept in ``handshake`` (also when
    a token came in an ``Authorization`` header), not among the broadcasts. Frames up to
    :data:`CLIENT_MAX_SIZE` are accepted (``max_size=`` and other ``connect_kwargs`` go to
    ``websockets.connect``).
    """

    def __init__(self, url: str, *, token: str | None = None, session_id: str | None = None,
                 timeout: float = 10.0, **connect_kwargs: Any) -> None:
        self._handshake = bool(token)
        if token:
            query = {"token": token, **({"session_id": session_id} if session_id else {})}
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(query)}"
        self.url = url
        self.timeout = timeout
        self._connect_kwargs = {"proxy": None, "compression": None,
                                "max_size": CLIENT_MAX_SIZE, **connect_kwargs}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._inbox: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._ids = itertools.count(1)
        self.user_id: str | None = None
        self.session_id: str | None = None
        self.snapshot: dict[str, Any] | None = None
        self.handshake: dict[str, Any] | None = None  # the server's answer to a handshake token

    async def connect(self) -> Self:
        """Open the connection. With a ``token`` given to the constructor the server
        authenticates at the handshake: this waits for its AUTH_SUCCESS (raising ClientError
        if the server refuses to join) and fills ``user_id``, ``session_id``, ``snapshot``."""
        self._ws = await connect(self.url, **self._connect_kwargs)
        self._reader = asyncio.create_task(self._read())
        if self._handshake:
            await self._await_handshake()
        return self

    async def _await_handshake(self) -> None:
        async def answered() -> dict[str, Any]:
            while self.handshake is None:
                if self.closed:
                    raise ConnectionError("connection closed during the handshake's join")
                self._arrived.clear()
                await self._arrived.wait()
            return self.handshake

        reply = await asyncio.wait_for(answered(), self.timeout)
        if reply.get("type") == "ERROR":
            raise ClientError(reply)

    async def close(self) -> None:
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
        """Send a frame as is (tests of malformed input)."""
        assert self._ws is not None, "not connected"
        await self._ws.send(frame)

    async def request(self, msg_type: str, data: dict[str, Any] | None = None,
                      **envelope: Any) -> dict[str, Any]:
        """Send one request and return the reply message (raises ClientError on ERROR)."""
        msg_id = envelope.pop("id", None) or f"py_{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        body = {"id": msg_id, "type": msg_type, "data": data or {}, **envelope}
        try:
            await self.send_raw(_dumps(body))
            reply = await asyncio.wait_for(future, self.timeout)
        finally:
            self._pending.pop(msg_id, None)
        if reply.get("type") == "ERROR":
            raise ClientError(reply)
        return reply

    async def call(self, msg_type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`request` returning only the reply's ``data``."""
        return dict((await self.request(msg_type, data)).get("data") or {})

    # -- messages -----------------------------------------------------------------------------
    async def authenticate(self, token: str | None = None, *, user_id: str | None = None,
                           session_id: str | None = None) -> dict[str, Any]:
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
        return await self.call("PLUGIN_ADD", {"track_id": track_id, "name": name,
                                              "plugin_path": plugin_path,
                                              "plugin_id": plugin_id})

    async def remove_plugin(self, track_id: str, plugin_id: str) -> dict[str, Any]:
        return await self.call("PLUGIN_REMOVE", {"track_id": track_id, "plugin_id": plugin_id})

    async def set_parameter(self, track_id: str, plugin_id: str, parameter_id: str,
                            value: Any) -> dict[str, Any]:
        return await self.call("PLUGIN_PARAMETER", {
            "track_id": track_id, "plugin_id": plugin_id, "parameter_id": parameter_id,
            "parameter_value": value})

    async def set_parameters(self, track_id: str, plugin_id: str,
                             values: dict[str, Any]) -> dict[str, Any]:
        return await self.call("PLUGIN_PARAMETER_BATCH", {
            "track_id": track_id, "plugin_id": plugin_id, "parameters": values})

    async def set_bypass(self, track_id: str, plugin_id: str, bypass: bool) -> dict[str, Any]:
        return await self.call("PLUGIN_BYPASS", {"track_id": track_id, "plugin_id": plugin_id,
                                                 "bypass": bypass})

    async def preset(self, track_id: str, plugin_id: str, action: str = "load",
                     preset_name: str | None = None,
                     preset_data: dict[str, Any] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"track_id": track_id, "plugin_id": plugin_id, "action": action}
        if preset_name is not None:
            data["preset_name"] = preset_name
        if preset_data is not None:
            data["preset_data"] = preset_data
        return await self.call("PLUGIN_PRESET", data)

    async def get_parameters(self, track_id: str, plugin_id: str) -> dict[str, Any]:
        return await self.call("PLUGIN_PARAMETERS_GET", {"track_id": track_id,
                                                         "plugin_id": plugin_id})

    async def session_state(self) -> dict[str, Any]:
        return (await self.call("SESSION_STATE_GET"))["snapshot"]

    async def cursor(self, **fields: Any) -> None:
        """USER_CURSOR_UPDATE (no reply)."""
        await self.send_raw(_dumps({"id": f"py_{next(self._ids)}",
                                    "type": "USER_CURSOR_UPDATE", "data": fields}))

    async def ping(self) -> dict[str, Any]:
        return await self.request("PING")

    # -- incoming -----------------------------------------------------------------------------
    async def wait_for(self, msg_type: str, predicate: Predicate | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """The first buffered or future non-reply message of ``msg_type`` matching ``predicate``."""
        async def find() -> dict[str, Any]:
            while True:
                for i, message in enumerate(self._inbox):
                    if message.get("type") == msg_type and (predicate is None or predicate(message)):
                        return self._inbox.pop(i)
                if self.closed:
                    raise ConnectionError("connection closed while waiting for " + msg_type)
                self._arrived.clear()
                await self._arrived.wait()

        return await asyncio.wait_for(find(), timeout or self.timeout)

    def received(self, msg_type: str | None = None) -> list[dict[str, Any]]:
        """Buffered non-reply messages (of ``msg_type``), without consuming them."""
        return [m for m in self._inbox if msg_type is None or m.get("type") == msg_type]

    def drain(self) -> list[dict[str, Any]]:
        """Take and return every buffered message."""
        taken, self._inbox = self._inbox, []
        return taken

    async def broadcasts(self) -> AsyncIterator[dict[str, Any]]:
        """Yield buffered and incoming non-reply messages until the connection closes."""
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
                message = json.loads(frame)
                future = self._pending.get(str(message.get("id")))
                if message.get("id") == HANDSHAKE_ID:  # neither a reply nor a broadcast
                    self.handshake = message
                    if message.get("type") == "AUTH_SUCCESS":
                        self._joined(message.get("data") or {})
                elif future is not None and not future.done():
                    future.set_result(message)
                else:
                    self._inbox.append(message)
                self._arrived.set()
        except Exception:  # noqa: BLE001, S110 - connection closed or broken: waiters see `closed`
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))
            self._arrived.set()
