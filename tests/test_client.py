"""``pluginlab.Client`` as a colleague's script uses it, against a real server on 127.0.0.1:0:
replies go to their own calls (never into the broadcast buffer), failures are exceptions that
say what happened, and nothing is left open or growing behind the caller's back."""

from __future__ import annotations

import asyncio
import math
import pickle
import socket
import time
from contextlib import AsyncExitStack
from pathlib import Path

import jwt
import numpy as np
import pytest
from server_helpers import SECRET, clients, connect, error_of, run, serving
from websockets.asyncio.server import ServerConnection, serve

from pluginlab.client import Client, ClientConnectionError, ClientError


def test_a_late_reply_to_an_abandoned_call_is_not_a_broadcast(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            a.timeout = 0.001  # the first Reverb add compiles its DSP: it takes far longer
            with pytest.raises(TimeoutError):
                await a.add_plugin("t", "Reverb")
            a.timeout = 15.0
            cancelled = asyncio.ensure_future(a.add_plugin("t", "Compressor"))
            await asyncio.sleep(0)  # sent, not answered
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            await a.ping()  # replies come in request order: both late replies are in by now
            assert a.received() == []
            names = [p["name"] for p in (await a.session_state())["tracks"]["t"]]
            assert names == ["Reverb", "Compressor"]  # applied all the same

    run(scenario())


def test_many_cursor_updates_do_not_turn_late_replies_into_broadcasts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, rate_limits=False) as server, \
                clients(server, "alice") as (a,):
            a.timeout = 0.001  # the first Reverb add compiles its DSP: its reply comes late
            with pytest.raises(TimeoutError):
                await a.add_plugin("t", "Reverb")
            a.timeout = 15.0
            for i in range(1100):  # sent meanwhile, no reply each: they must not crowd out
                await a.cursor(position={"i": i})  # the abandoned call's id
            await a.ping()
            assert a.received() == []

    run(scenario())


def test_request_ids_in_flight_are_never_shared(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            first = asyncio.ensure_future(a.request("SESSION_STATE_GET", id="same"))
            await asyncio.sleep(0)
            with pytest.raises(ValueError, match="already waiting"):
                await a.request("PING", id="same")
            assert (await first)["type"] == "SESSION_STATE_GET"
            # a caller's id that the client would have chosen next is skipped, not shared
            chosen = asyncio.ensure_future(a.request("SESSION_STATE_GET", id="py_2"))
            await asyncio.sleep(0)
            pong = await a.ping()
            assert pong["type"] == "PONG" and pong["id"] != "py_2"
            assert (await chosen)["type"] == "SESSION_STATE_GET"

    run(scenario())


def test_a_refused_handshake_token_is_a_client_error_with_the_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, SECRET,
                                 algorithm="HS256")
            refused = await error_of(Client(server.url, token=expired).connect())
            assert refused.code == "AUTH_FAILED"
            assert refused.details == {"reason": "token expired", "http_status": 401}
            # a bearer header is a handshake token too: connect() waits for the join
            limited = server.token("carol", sessions=["a"])
            bearer = Client(server.url, additional_headers={
                "Authorization": f"Bearer {limited}", "Session-Id": "a"})
            await bearer.connect()
            try:
                assert (bearer.user_id, bearer.session_id) == ("carol", "a")
            finally:
                await bearer.close()
            wrong = Client(server.url, additional_headers={
                "Authorization": f"Bearer {limited}", "Session-Id": "b"})
            refused = await error_of(wrong.connect())
            assert refused.code == "AUTH_FAILED" and wrong.closed

    run(scenario())


def test_only_a_bearer_header_is_a_handshake_token_and_reconnects_join_afresh(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            basic = Client(server.url, timeout=5, additional_headers={
                "Authorization": "Basic dXNlcjpwdw=="})  # e.g. for a proxy: no join
            await basic.connect()
            try:
                assert basic.handshake is None and basic.user_id is None
                assert (await basic.ping())["type"] == "PONG"
            finally:
                await basic.close()
            client = Client(server.url, token=server.token("alice"), session_id="jam")
            await client.connect()
            first = client.handshake
            await client.close()
            await client.connect()  # waits for this connection's own answer
            try:
                assert client.handshake is not first and client.session_id == "jam"
            finally:
                await client.close()

    run(scenario())


def test_an_unreachable_server_is_a_client_connection_error() -> None:
    async def scenario() -> None:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(ClientConnectionError, match="cannot connect"):
            await Client(f"ws://127.0.0.1:{port}/ws").connect()

    run(scenario())


def test_a_handshake_nobody_answers_leaves_nothing_open() -> None:
    async def scenario() -> None:
        ended = asyncio.Event()

        async def mute(ws: ServerConnection) -> None:  # accepts, never joins anyone
            await ws.wait_closed()
            ended.set()

        async with serve(mute, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            client = Client(f"ws://127.0.0.1:{port}/ws", token="t", timeout=0.3)
            with pytest.raises(TimeoutError):
                await client.connect()
            assert client.closed
            await asyncio.wait_for(ended.wait(), 5)  # the server saw the connection close

    run(scenario())


def test_connect_twice_and_calls_without_a_connection_say_what_is_wrong(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(ClientConnectionError, match="not connected"):
            await Client("ws://127.0.0.1:9/ws").ping()
        async with serving(tmp_path) as server:
            client = await connect(server, "alice")
            with pytest.raises(RuntimeError, match="already connected"):
                await client.connect()
            await client.close()
            await client.connect()  # a closed client may connect again
            assert (await client.ping())["type"] == "PONG"
            await client.close()

    run(scenario())


def test_a_lost_connection_is_one_exception_type_with_the_close_code(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(serving(tmp_path, max_frame=4096))
            a = await connect(server, "alice", stack=stack)
            with pytest.raises(ClientConnectionError) as lost:
                await a.request("PING", {"pad": "x" * 5000})
            assert lost.value.code == 1009  # the frame was over the server's limit
            with pytest.raises(ClientConnectionError) as again:
                await a.ping()
            assert again.value.code == 1009 and isinstance(again.value, ConnectionError)
            b = await connect(server, "bob", stack=stack)
            waiting = asyncio.ensure_future(b.wait_for("PLUGIN_ADD", timeout=30))
            await asyncio.sleep(0.05)
            await server.stop()
            with pytest.raises(ClientConnectionError) as stopped:
                await waiting
            assert stopped.value.code == 1001  # going away

    run(scenario())


def test_session_id_without_a_token_is_the_session_authenticate_joins(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            client = await Client(server.url, session_id="jam").connect()
            try:
                joined = await client.authenticate(server.token("alice"))
                assert joined["session_id"] == "jam" and client.session_id == "jam"
            finally:
                await client.close()

    run(scenario())


def test_unread_broadcasts_are_bounded_and_the_newest_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, rate_limits=False) as server, AsyncExitStack() as stack:
            quiet = await Client(server.url, max_buffered=5).connect()
            stack.push_async_callback(quiet.close)
            await quiet.authenticate(server.token("quiet"), session_id="jam")
            busy = await connect(server, "busy", stack=stack)
            for i in range(20):
                await busy.cursor(position={"i": i})
            await busy.ping()
            await quiet.ping()
            kept = [m["data"]["position"]["i"] for m in quiet.received("USER_CURSOR_UPDATE")]
            assert kept == [15, 16, 17, 18, 19]
            assert quiet.dropped == 16  # busy's PRESENCE joined, then the first 15 cursors

    run(scenario())


def test_wait_for_timeouts_mean_what_they_say(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await a.wait_for("PLUGIN_ADD", timeout=0)  # only what is buffered now
            assert time.monotonic() - started < a.timeout
            await b.add_plugin("t", "Utility")
            await a.wait_for("PLUGIN_ADD", timeout=math.inf)
            await a.ping()  # the state update is in by now
            assert (await a.wait_for("PLUGIN_STATE_UPDATE", timeout=0))["type"] == \
                "PLUGIN_STATE_UPDATE"

    run(scenario())


def test_cursor_errors_are_not_broadcasts(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            await a.cursor(track_id="")
            await a.ping()
            assert a.received() == []

    with caplog.at_level("WARNING", logger="pluginlab.client"):
        run(scenario())
    assert "INVALID_MESSAGE" in caplog.text


def test_values_are_sent_as_numbers_or_refused_before_sending(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            got = await a.set_parameter("t", pid, "wet_dry", np.float32(0.5))
            assert got["parameter_value"] == 0.5
            with pytest.raises(ValueError, match="NaN"):
                await a.set_parameter("t", pid, "wet_dry", float("nan"))
            with pytest.raises(ValueError, match="NaN"):
                await a.set_parameters("t", pid, {"wet_dry": np.float64("inf")})
            assert (await a.get_parameters("t", pid))["parameters"]["wet_dry"] == 0.5

    run(scenario())


def test_client_errors_survive_copying_and_pickling(tmp_path: Path) -> None:
    async def scenario() -> ClientError:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            return await error_of(a.get_parameters("t", "nope"))

    error = run(scenario())
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.details, copy.request_id) == (error.code, error.details,
                                                          error.request_id)
    assert error.code == "TRACK_NOT_FOUND" and error.request_id is not None
