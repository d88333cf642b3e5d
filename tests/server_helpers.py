"""Shared helpers for the server tests: run a scenario, start a real server, connect clients.

The tests are plain synchronous pytest functions (no pytest-asyncio): each one defines an
``async def scenario()`` and hands it to :func:`run`, which runs it under ``asyncio.run`` with
an overall timeout. :func:`serving` starts a real :class:`PluginServer` on 127.0.0.1 port 0
with a temporary SQLite database and a temporary user-presets folder, so tests never touch
the user's files and never collide on ports.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from pluginlab.client import Client, ClientError
from pluginlab.config import ServerConfig
from pluginlab.server import PluginServer

T = TypeVar("T")

SECRET = "pluginlab-test-secret-0123456789abcdef0123456789"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ROOT = Path(__file__).resolve().parents[1]

DOCUMENTED_CODES = {
    "AUTH_FAILED", "UNAUTHORIZED", "INVALID_MESSAGE", "UNKNOWN_MESSAGE_TYPE",
    "TRACK_NOT_FOUND", "PLUGIN_NOT_FOUND", "INVALID_PARAMETER", "PLUGIN_ADD_FAILED",
    "PARAMETER_UPDATE_FAILED", "PRESET_LOAD_FAILED", "RATE_LIMITED",
}


def run(scenario: Awaitable[T], timeout: float = 60.0) -> T:
    """Run one async scenario to completion (fails if it takes longer than ``timeout``)."""

    async def bounded() -> T:
        return await asyncio.wait_for(scenario, timeout)

    return asyncio.run(bounded())


def make_config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    """A test server config: port 0, temp db and presets, a fixed secret, then ``overrides``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "db": str(tmp_path / "pluginlab.sqlite"),
        "presets_dir": str(tmp_path / "user_presets"),
        "jwt_secret": SECRET,
    }
    values.update(overrides)
    return ServerConfig(**values)


@asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[PluginServer]:
    """A started :class:`PluginServer` (stopped on exit)."""
    server = await PluginServer(make_config(tmp_path, **overrides)).start()
    try:
        yield server
    finally:
        await server.stop()


async def connect(server: PluginServer, user: str | None = None, session: str | None = "jam",
                  *, stack: AsyncExitStack | None = None, **token_kwargs: Any) -> Client:
    """A connected :class:`Client`; authenticated as ``user`` in ``session`` when ``user``."""
    client = await Client(server.url, timeout=15.0).connect()
    if stack is not None:
        stack.push_async_callback(client.close)
    if user is not None:
        await client.authenticate(server.token(user, **token_kwargs), session_id=session)
    return client


@asynccontextmanager
async def clients(server: PluginServer, *users: str, session: str = "jam"
                  ) -> AsyncIterator[list[Client]]:
    """Several authenticated clients in one session (closed on exit)."""
    async with AsyncExitStack() as stack:
        out = [await connect(server, user, session, stack=stack) for user in users]
        yield out


async def error_of(awaitable: Awaitable[Any]) -> ClientError:
    """Await a request that must fail; return its ClientError."""
    try:
        await awaitable
    except ClientError as exc:
        return exc
    raise AssertionError("expected an ERROR reply")


async def raw_exchange(client: Client, frame: str | bytes, msg_type: str = "ERROR",
                       timeout: float = 10.0) -> dict[str, Any]:
    """Send a raw frame and wait for the next unmatched message of ``msg_type``."""
    await client.send_raw(frame)
    return await client.wait_for(msg_type, timeout=timeout)


async def settle(client: Client) -> None:
    """Round-trip a PING so everything the server sent before it has arrived."""
    await client.ping()


async def quiet_for(seconds: float) -> None:
    await asyncio.sleep(seconds)


def frame(msg_type: str, data: dict[str, Any] | None = None, **envelope: Any) -> str:
    body: dict[str, Any] = {"type": msg_type, "data": data or {}}
    body.update(envelope)
    return json.dumps(body)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
                     step: float = 0.01) -> None:
    """Poll ``predicate`` until true (AssertionError after ``timeout`` s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def rsa_key_pair() -> tuple[str, str]:
    """A fresh RSA-2048 key pair as PEM text: (private PKCS8, public SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public
