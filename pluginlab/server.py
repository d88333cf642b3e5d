"""The WebSocket transport: a thin ``websockets`` server around :class:`~pluginlab.session.Studio`.

``PluginServer`` owns the pieces a server needs (config, provenance store, authenticator,
studio) and runs on the *current* asyncio loop, so in a notebook it lives on the kernel's loop
and keeps serving between cells::

    server = await PluginServer(ServerConfig(port=0, db="lab.sqlite")).start()
    print(server.url, server.token("alice"))
    ...
    await server.stop()

Transport decisions: text frames of strict JSON; path ``config.path`` only (others get HTTP
404 at the handshake); frames over ``max_frame`` close the connection with 1009; a token in the
handshake (``?token=`` or ``Authorization: Bearer``) is verified there (HTTP 401 when bad) and
the connection starts authenticated. permessage-deflate is off: for small JSON frames it costs
more than it saves (measured on this project's 2-core machine: ~2,250 vs ~1,650 sequential
requests/s). Outgoing messages are written without awaiting
(like ``websockets`` ``broadcast``), so one slow client never stalls the others; consecutive
messages to one connection share a write (see :class:`_Outbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import struct
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Generic, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .auth import AuthConfig, Authenticator, generate_secret
from .config import ServerConfig
from .errors import AuthFailed, PluginlabError
from .messages import HANDSHAKE_ID, dumps, envelope
from .session import Connection, Studio

__all__ = ["PluginServer"]

K = TypeVar("K")
V = TypeVar("V")

log = logging.getLogger("pluginlab.server")

PIPELINE_DEPTH = 64  # requests of one connection in flight at once
BURST = 32  # frames of one connection handled in a row before the others get a turn
READ_PAUSE = 1024 * 1024  # bytes of replies queued to a client: read no more of its frames
STOP_GRACE = 10.0  # seconds stop() waits for requests in flight to be answered


def build_authenticator(config: ServerConfig) -> tuple[Authenticator, bool]:
    """The authenticator for ``config``; True when a secret had to be generated.

    A public key is read and checked here (ValueError saying what is wrong): a mistyped
    path or a key that does not suit ``jwt_algorithm`` would otherwise refuse every token
    at AUTH, and block every address after a few tries, while the server looked healthy."""
    public_key = load_public_key(config.jwt_public_key, config.jwt_algorithm) \
        if config.jwt_public_key else None
    given = config.secret()
    generated = not given and not public_key
    secret = given or (None if public_key else generate_secret())
    auth = Authenticator(AuthConfig(
        secret=secret, public_key=public_key, algorithm=config.jwt_algorithm,
        leeway=config.jwt_leeway, max_failures=config.auth_max_failures,
        failure_window=config.auth_failure_window, block_seconds=config.auth_block_seconds,
    ))
    return auth, generated


def load_public_key(value: str, algorithm: str | None = None) -> str:
    """PEM text of a public key given as PEM text or a path to a PEM file (ValueError if it
    is neither, is no public key, or is RSA/EC where ``algorithm`` wants the other)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = value
    if "-----BEGIN" not in value:
        if not os.path.isfile(value):
            what = "is a folder" if os.path.isdir(value) else "no such file"
            raise ValueError(f"jwt_public_key: {value!r} {what} (give a PEM file or PEM text)")
        with open(value, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"jwt_public_key: not a PEM public key ({exc})") from None
    kind = "RS" if isinstance(key, rsa.RSAPublicKey) else \
        "ES" if isinstance(key, ec.EllipticCurvePublicKey) else None
    if kind is None:
        raise ValueError("jwt_public_key: only RSA (RS256) and EC (ES256) keys are supported")
    if algorithm and not algorithm.startswith(kind):
        raise ValueError(f"jwt_public_key is an {'RSA' if kind == 'RS' else 'EC'} key, which "
                         f"cannot verify {algorithm} tokens")
    return text


class PluginServer:
    """WebSocket server for the plugin protocol. Start with ``await server.start()``."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: Any = None,
        authenticator: Authenticator | None = None,
        studio: Studio | None = None,
    ) -> None:
        self.config = config or ServerConfig.from_env()
        self.generated_secret = False
        if authenticator is None:
            authenticator, self.generated_secret = build_authenticator(self.config)
        self.auth = authenticator
        self._own_store = store is None and studio is None and bool(self.config.db)
        if self._own_store:
            from .provenance import ProvenanceStore

            store = ProvenanceStore(self.config.db, fsync=self.config.fsync)
        self.store = store if studio is None else studio.store
        self.studio = studio or Studio(self.config, store=store, authenticator=authenticator)
        self._server: Server | None = None
        self.port: int | None = None
        self._serialize: _Recent[dict[str, Any], str] = _Recent(dumps, keep=4)
        self._origins = self.config.origins()
        self._stopping = False  # set by stop(): frames not yet handled are left unhandled
        self._handling = 0  # requests being handled (stop() lets them finish and answer)
        self._none_handled: asyncio.Event | None = None  # what stop() waits on meanwhile
        self._outbox = _Outbox(self.config.max_send_buffer)

    @property
    def url(self) -> str:
        """``ws://host:port/ws`` once started."""
        host = self.config.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address needs brackets
        return f"ws://{host}:{self.port}{self.config.path}"

    def token(self, user_id: str, **kwargs: Any) -> str:
        """Issue a token this server accepts (see :meth:`Authenticator.issue`)."""
        return self.auth.issue(user_id, **kwargs)

    async def start(self) -> Self:
        """Bind and start serving on the running loop (``port=0`` picks a free port)."""
        if self._server is not None:
            return self
        try:
            self._server = await serve(
                self._handle, self.config.host, self.config.port,
                process_request=self._process_request, max_size=self.config.max_frame,
                compression=None, ping_interval=20, ping_timeout=20,
            )
        except OSError as exc:  # port in use, unknown host: release the store, say where
            await self.stop()
            raise OSError(exc.errno, f"cannot listen on {self.config.host}:{self.config.port}: "
                                     f"{exc.strerror or exc}") from exc
        sock = next(iter(self._server.sockets))
        self.port = int(sock.getsockname()[1])
        return self

    async def stop(self) -> None:
        """Close every connection, flush broadcasts, release engines and the store.

        Frames a client sent that are not being handled yet are dropped, not applied: a change
        is applied only where its reply can still be sent (the client sees close 1001 and no
        reply, so it knows to resend after reconnecting). Requests already being handled finish
        and are answered first (for at most ``STOP_GRACE`` seconds)."""
        self._stopping = True
        if self._handling:  # requests in flight are answered first
            self._none_handled = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_handled.wait(), STOP_GRACE)
        self._outbox.end_run()  # messages already sent go out before the close frames
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.studio.close()
        if self._own_store and self.store is not None:
            await asyncio.to_thread(self.store.close)

    def abandon(self) -> None:
        """Release what needs no event loop, for a server whose loop is closed (a script's
        second ``asyncio.run``): the listening sockets and the store. Connections of that
        loop cannot be closed any more; the garbage collector takes them."""
        if self._server is not None:
            with contextlib.suppress(Exception):  # asyncio's close needs no running loop
                self._server.server.close()
            self._server = None
        if self._own_store and self.store is not None:
            self.store.close()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handshake --------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        parts = urlsplit(request.path)
        if parts.path != self.config.path:
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown path\n")
        origin = request.headers.get("Origin")
        if origin is not None and self._origins is not None and origin not in self._origins:
            log.info("handshake from %s refused: origin %r not allowed", _address(connection),
                     origin)
            return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        query = parse_qs(parts.query)
        token = (query.get("token") or [None])[0]
        session_id = (query.get("session_id") or [None])[0]
        header = request.headers.get("Authorization", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:].strip()
            session_id = session_id or request.headers.get("Session-Id")
        if token:
            address = _address(connection)
            try:
                self.auth.check_blocked(address)
                self.auth.verify(token)
            except AuthFailed as exc:
                details = exc.details or {}
                if details.get("reason") != "blocked":
                    self.auth.record_failure(address)
                response = connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
                if details.get("retry_after") is not None:  # blocked: when to come back
                    response.headers["Retry-After"] = str(math.ceil(details["retry_after"]))
                return response
        connection.pluginlab_handshake = (token, session_id)  # type: ignore[attr-defined]
        return None

    # -- one connection ---------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        """Serve one connection: its frames are applied in order and replied to in order, each
        reply before the broadcasts its request causes.

        Requests are pipelined only when replies wait for the store after being applied
        (``fsync``); otherwise a request waits for nothing once it has been applied (the
        store's journal write does not suspend), so the frames are simply handled one after
        another on this task."""
        serialize, outbox = self._serialize, self._outbox

        def send(message: dict[str, Any]) -> None:
            outbox.send(ws, serialize(message))

        def send_many(messages: list[dict[str, Any]]) -> None:
            outbox.send_many(ws, [serialize(message) for message in messages])

        conn = self.studio.connect(send, _address(ws), send_many=send_many)
        try:
            await self._handshake_join(ws, conn)
            if self.studio.replies_wait:
                await self._serve_pipelined(ws, conn)
            else:
                await self._serve_in_turn(ws, conn)
        except ConnectionClosed:
            pass
        finally:
            await self.studio.disconnect(conn)

    async def _serve_in_turn(self, ws: ServerConnection, conn: Connection) -> None:
        """One request at a time, on this task: no task or futures per frame. Every ``BURST``
        frames the other connections get a turn, so a client whose frames are already buffered
        never stalls them."""
        receive = self.studio.receive
        handled = 0
        async for frame in ws:
            if self._stopping:
                continue  # read and drop, so the close handshake behind them completes
            self._handling += 1
            try:
                await receive(conn, frame)
            except Exception:  # a reply that could not be sent; the connection goes on
                log.exception("failed to answer a frame from %s", conn.id)
            finally:
                self._end_handling()
            handled += 1
            if handled % BURST == 0:
                await asyncio.sleep(0)
            await _read_less(ws)

    async def _serve_pipelined(self, ws: ServerConnection, conn: Connection) -> None:
        """Pipelining: frame N+1 starts once frame N has been applied and handed to the store;
        replies wait for durability and keep request order. At most ``PIPELINE_DEPTH`` requests
        of a connection are in flight."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(PIPELINE_DEPTH)
        tasks: set[asyncio.Task[None]] = set()
        gate: asyncio.Future[None] | None = None
        replied: asyncio.Future[None] | None = None
        try:
            async for frame in ws:
                await _read_less(ws)
                await slots.acquire()
                if self._stopping:
                    slots.release()
                    continue  # read and drop (see _serve_in_turn)
                applied: asyncio.Future[None] = loop.create_future()
                done: asyncio.Future[None] = loop.create_future()
                self._handling += 1  # ended by _one
                task = asyncio.create_task(
                    self._one(conn, frame, gate, applied, replied, done, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                gate, replied = applied, done
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(
        self, conn: Connection, frame: str | bytes, gate: asyncio.Future[None] | None,
        applied: asyncio.Future[None], previous_reply: asyncio.Future[None] | None,
        done: asyncio.Future[None], slots: asyncio.Semaphore,
    ) -> None:
        try:
            if gate is not None:
                await gate
            await self.studio.receive(conn, frame, applied, previous_reply)
        finally:
            for future in (applied, done):
                if not future.done():
                    future.set_result(None)
            slots.release()
            self._end_handling()

    def _end_handling(self) -> None:
        self._handling -= 1
        if not self._handling and self._none_handled is not None:
            self._none_handled.set()

    async def _handshake_join(self, ws: ServerConnection, conn: Connection) -> None:
        token, session_id = getattr(ws, "pluginlab_handshake", (None, None))
        if not token:
            return
        try:
            data = await self.studio.authenticate_handshake(conn, token, session_id)
        except PluginlabError as exc:
            conn.send(envelope("ERROR", exc.to_payload(), msg_id=HANDSHAKE_ID))
            self._outbox.end_run()  # the ERROR goes out before the close frame
            await ws.close(1008, exc.message[:120])
            return
        conn.send(envelope("AUTH_SUCCESS", data, msg_id=HANDSHAKE_ID, user_id=conn.user_id,
                           session_id=conn.session_id))


async def _read_less(ws: ServerConnection) -> None:
    """Back-pressure: while more than ``READ_PAUSE`` bytes of replies wait for a client to
    read them, read none of its frames (TCP then slows its sender). A client that sends
    without reading cannot make the server queue its replies without bound."""
    if ws.transport.get_write_buffer_size() > READ_PAUSE:
        await ws.drain()  # until websockets' low-water mark


class _Outbox:
    """Writes messages to connections without awaiting, one write per run of messages.

    A run is a sequence of consecutive messages to the same connection. Its first message is
    written at once, so a lone reply never waits; the others are held and written together
    (one syscall, one wake-up of the client) when the run ends: when a message for another
    connection comes, or at the latest when the loop has run the callbacks that are ready now
    (the end is queued with ``call_soon``, ahead of any I/O the loop handles next). So writes
    happen exactly in the order of the messages, across connections too, and a client that
    pipelines gets the replies to a burst of its frames in two writes instead of one each.
    :meth:`send_many` writes several messages to one connection at once (a member's
    broadcasts of one change). Call :meth:`end_run` before closing a connection from the
    server side.

    A connection with more than ``max_buffer`` bytes queued (it does not read) is dropped.

    Frames are built once per message text and the same bytes go to every member: a server
    does not mask its frames and compression is off, so they are identical for everyone
    (``websockets.broadcast`` builds them once per connection). Like ``broadcast``, nothing
    is written to a connection that is not open or is sending a fragmented message (this
    server never fragments).
    """

    def __init__(self, max_buffer: int) -> None:
        self.max_buffer = max_buffer  # bytes queued to one connection before it is dropped
        self._ws: ServerConnection | None = None  # the connection of the current run
        self._held: list[str] = []  # its messages after the first
        self._end_scheduled = False
        self._frame: _Recent[str, bytes] = _Recent(_text_frame, keep=8)

    def send(self, ws: ServerConnection, text: str) -> None:
        if ws is self._ws:
            self._held.append(text)
            return
        self._start_run(ws)
        self._write(ws, [text])

    def send_many(self, ws: ServerConnection, texts: list[str]) -> None:
        """Several messages to one connection: written together at once (one write)."""
        if ws is self._ws:
            self._held.extend(texts)
            return
        self._start_run(ws)
        self._write(ws, texts)

    def end_run(self) -> None:
        """Write the held messages of the current run now."""
        ws, held = self._ws, self._held
        self._ws = None
        if held:
            self._held = []
            assert ws is not None
            self._write(ws, held)

    def _start_run(self, ws: ServerConnection) -> None:
        self.end_run()
        self._ws = ws  # later messages to ws join this run
        if not self._end_scheduled:
            self._end_scheduled = True
            asyncio.get_running_loop().call_soon(self._step_over)

    def _step_over(self) -> None:
        self._end_scheduled = False
        self.end_run()

    def _write(self, ws: ServerConnection, texts: list[str]) -> None:
        transport = ws.transport
        if (ws.protocol.state is not State.OPEN or ws.send_in_progress is not None
                or transport.is_closing()):
            return
        try:
            transport.writelines([self._frame(text) for text in texts])
        except Exception:  # like broadcast: a failing connection never breaks the sender
            log.warning("skipped %d message(s) to a failing connection", len(texts),
                        exc_info=True)
            return
        if transport.get_write_buffer_size() > self.max_buffer:
            # a member that does not read its broadcasts: it must not hold the server's memory
            log.warning("dropping %s: %d bytes queued to it (max_send_buffer %d)",
                        ws.remote_address, transport.get_write_buffer_size(), self.max_buffer)
            transport.abort()


class _Recent(Generic[K, V]):
    """``compute(key)`` remembered for the last ``keep`` keys, by identity: a broadcast hands
    the same message object (and so the same text) to every member, in a few interleaved
    runs (a change's relay and state update)."""

    def __init__(self, compute: Callable[[K], V], keep: int) -> None:
        self._compute = compute
        self._keep = keep
        self._recent: list[tuple[K, V]] = []

    def __call__(self, key: K) -> V:
        for known, value in self._recent:
            if known is key:
                return value
        value = self._compute(key)
        self._recent.insert(0, (key, value))
        del self._recent[self._keep:]
        return value


def _text_frame(text: str) -> bytes:
    """The wire bytes of an unmasked, uncompressed, final text frame carrying ``text``
    (RFC 6455 section 5.2; equal to websockets' ``Frame(Opcode.TEXT, ...).serialize(mask=False)``,
    which a test checks, at a tenth of its cost). A lone surrogate (only possible in a JSON
    string: e.g. a file name that is not UTF-8) is sent as its ``\\udcXX`` escape, which is
    what an ASCII-only encoder would have written."""
    try:
        payload = text.encode()
    except UnicodeEncodeError:
        payload = text.encode("utf-8", "backslashreplace")
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _HEADER_16.pack(0x81, 126, n) + payload
    return _HEADER_64.pack(0x81, 127, n) + payload


_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


def _address(ws: ServerConnection) -> str:
    remote = ws.remote_address
    return str(remote[0]) if isinstance(remote, tuple) else str(remote)
