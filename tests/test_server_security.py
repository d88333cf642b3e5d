"""Security of the real server: authentication, authorization, session isolation, handshake.

Every client of these tests connects from 127.0.0.1, so tests that make AUTH fail on purpose
raise ``auth_max_failures`` (or test the blocking itself on a server of their own).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
from server_helpers import (
    SECRET,
    clients,
    connect,
    error_of,
    forge_hs256,
    rsa_key_pair,
    run,
    serving,
    settle,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pluginlab.client import Client, ClientError
from pluginlab.config import ServerConfig

MANY = 1000  # auth_max_failures for servers where failing on purpose must not block


def claims(user: str = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + 600, **extra}


async def auth_error(client: Client, token: Any, **data: Any) -> dict[str, Any]:
    payload = {"token": token, **data} if token is not None else dict(data)
    err = await error_of(client.request("AUTH", payload))
    assert err.code == "AUTH_FAILED", err
    assert isinstance(err.details, dict)
    return err.details


@pytest.fixture(scope="module")
def rsa_pem() -> tuple[str, str]:
    return rsa_key_pair()


# -- authentication ------------------------------------------------------------------------

def test_auth_failures_and_their_reasons(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, auth_max_failures=MANY) as server, \
                AsyncExitStack() as stack:
            c = await connect(server, stack=stack)
            assert (await auth_error(c, "not-a-jwt"))["reason"].startswith("invalid token")
            assert (await auth_error(c, None))["reason"] == "missing token"
            assert (await auth_error(c, ""))["reason"] == "missing token"
            expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 3600}, SECRET,
                                 algorithm="HS256")
            assert (await auth_error(c, expired))["reason"] == "token expired"
            assert (await auth_error(c, server.token("alice", lifetime=-600)))["reason"] == \
                "token expired"
            wrong_key = jwt.encode(claims(), "another-secret-another-secret-another-secret",
                                   algorithm="HS256")
            assert (await auth_error(c, wrong_key))["reason"] == "bad signature"
            unsigned = jwt.encode(claims(), None, algorithm="none")
            assert (await auth_error(c, unsigned))["reason"] == "token algorithm not allowed"
            no_exp = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
            assert (await auth_error(c, no_exp))["reason"] == "token lacks claim 'exp'"
            mismatch = await auth_error(c, server.token("alice"), user_id="mallory")
            assert mismatch["reason"] == "user_id does not match token subject"
            # still unauthenticated, still connected
            err = await error_of(c.session_state())
            assert err.code == "UNAUTHORIZED"
            assert (await c.ping())["type"] == "PONG"
            ok = await c.authenticate(server.token("alice"), user_id="alice", session_id="s")
            assert ok["user_id"] == "alice"

    run(scenario())


def test_unauthorized_before_auth(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, AsyncExitStack() as stack:
            c = await connect(server, stack=stack)
            for msg_type, data in (("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}),
                                   ("SESSION_STATE_GET", {}),
                                   ("USER_CURSOR_UPDATE", {"track_id": "t"}),
                                   ("UPDATE_PARAMETER", {"pluginId": "p", "parameterId": "x",
                                                         "value": 1})):
                err = await error_of(c.request(msg_type, data))
                assert err.code == "UNAUTHORIZED"
                assert err.details == {"required_permission": None}
            assert (await c.ping())["type"] == "PONG"

    run(scenario())


def test_too_many_connections_for_one_user(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, AsyncExitStack() as stack:
            five = [await connect(server, "alice", "jam", stack=stack) for _ in range(5)]
            sixth = await connect(server, stack=stack)
            details = await auth_error(sixth, server.token("alice"), session_id="jam")
            assert details["reason"] == "too many connections" and details["limit"] == 5
            # another user is not affected
            assert (await (await connect(server, "bob", "jam", stack=stack)).ping())
            # once one of alice's connections is gone, the sixth may join
            await five[0].close()
            for _ in range(200):
                try:
                    await sixth.authenticate(server.token("alice"), session_id="jam")
                    break
                except ClientError as exc:
                    assert exc.details["reason"] == "too many connections"
                    await asyncio.sleep(0.02)
            assert sixth.user_id == "alice"

    run(scenario())


def test_repeated_failures_block_the_address(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, auth_max_failures=3, auth_block_seconds=600) as server, \
                AsyncExitStack() as stack:
            insider = await connect(server, "alice", "jam", stack=stack)
            attacker = await connect(server, stack=stack)
            for _ in range(3):
                assert (await auth_error(attacker, "forged.token.here"))["reason"] != "blocked"
            details = await auth_error(attacker, "forged.token.here")
            assert details["reason"] == "blocked"
            assert 0 < details["retry_after"] <= 600
            # a valid token from the blocked address, on any connection, is refused too
            details = await auth_error(attacker, server.token("carol"))
            assert details["reason"] == "blocked"
            fresh = await connect(server, stack=stack)
            assert (await auth_error(fresh, server.token("dave")))["reason"] == "blocked"
            # ... and so is a handshake token
            with pytest.raises(ClientError) as refused:
                await Client(server.url, token=server.token("erin")).connect()
            assert refused.value.code == "AUTH_FAILED"
            assert refused.value.details is not None
            assert refused.value.details["reason"] == "blocked"
            assert refused.value.details["http_status"] == 401
            assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 600
            # already authenticated connections are not affected
            assert (await insider.add_plugin("t", "Reverb"))["success"] is True
            assert (await attacker.ping())["type"] == "PONG"

    run(scenario())


def test_a_success_resets_the_failure_count(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, auth_max_failures=3) as server, AsyncExitStack() as stack:
            c = await connect(server, stack=stack)
            for _ in range(5):
                await auth_error(c, "bad.token.x")
                await auth_error(c, "bad.token.y")
                await c.authenticate(server.token("alice"), session_id="s")
            assert c.user_id == "alice"

    run(scenario())


# -- authorization -------------------------------------------------------------------------

def test_sessions_claim(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, auth_max_failures=MANY) as server, \
                AsyncExitStack() as stack:
            token = server.token("alice", sessions=["first", "second"])
            c = await connect(server, stack=stack)
            assert (await c.authenticate(token))["session_id"] == "first"
            assert (await c.authenticate(token, session_id="second"))["session_id"] == "second"
            details = await auth_error(c, token, session_id="third")
            assert details == {"reason": "session not allowed"}
            assert c.session_id == "second"  # the failed AUTH changed nothing
            assert (await c.session_state())["session_id"] == "second"
            # at the handshake: ERROR then close (the token itself is valid)
            async with ws_connect(f"{server.url}?token={token}&session_id=third",
                                  proxy=None) as raw:
                message = json.loads(await raw.recv())
                assert message["type"] == "ERROR"
                assert message["data"]["code"] == "AUTH_FAILED"
                assert message["data"]["details"]["reason"] == "session not allowed"
                with pytest.raises(ConnectionClosed) as info:
                    await raw.recv()
                assert info.value.rcvd is not None and info.value.rcvd.code == 1008

    run(scenario())


def test_permissions_claim_is_enforced_per_message_type(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, AsyncExitStack() as stack:
            owner = await connect(server, "owner", "jam", stack=stack)
            pid = (await owner.add_plugin("t", "Reverb"))["plugin_id"]
            reader = await connect(server, "reader", "jam", stack=stack,
                                   permissions=["plugin:read"])
            base = {"track_id": "t", "plugin_id": pid}
            refused = {
                "PLUGIN_PARAMETER": ({**base, "parameter_id": "wet_dry",
                                      "parameter_value": 0.9}, "plugin:write"),
                "plugin.parameter": ({**base, "parameter_id": "wet_dry",
                                      "parameter_value": 0.9}, "plugin:write"),
                "PLUGIN_PARAMETER_BATCH": ({**base, "parameters": {"wet_dry": 0.9}},
                                           "plugin:write"),
                "PLUGIN_BYPASS": ({**base, "bypass": True}, "plugin:write"),
                "PLUGIN_ADD": ({"track_id": "t", "name": "Reverb"}, "plugin:add"),
                "ADD_PLUGIN": ({"trackId": "t", "pluginName": "Reverb"}, "plugin:add"),
                "UPDATE_PARAMETER": ({"pluginId": pid, "parameterId": "wet_dry", "value": 1},
                                     "plugin:write"),
                "PLUGIN_REMOVE": (base, "plugin:remove"),
            }
            for msg_type, (data, permission) in refused.items():
                err = await error_of(reader.request(msg_type, data))
                assert err.code == "UNAUTHORIZED", msg_type
                assert err.details == {"required_permission": permission}
            for action in ("load", "save", "delete"):
                err = await error_of(reader.preset("t", pid, action, "Large Hall"))
                assert err.details == {"required_permission": "plugin:write"}
            for action in ("", "LOAD", "unknown"):  # "" means load; the others
                err = await error_of(reader.request("PLUGIN_PRESET", {  # fail closed
                    **base, "action": action, "preset_data": {"wet_dry": 0.9}}))
                assert err.details == {"required_permission": "plugin:write"}, action
            allowed = await reader.get_parameters("t", pid)
            assert allowed["parameters"]["wet_dry"] == pytest.approx(0.3)  # nothing changed
            assert (await reader.session_state())["tracks"]["t"][0]["bypass"] is False
            assert "Large Hall" in (await reader.preset("t", pid, "list"))["presets"]
            await reader.cursor(track_id="t")
            assert (await owner.wait_for("USER_CURSOR_UPDATE"))["user_id"] == "reader"
            # a scope string works the same way; plugin:add alone cannot change values
            adder = await connect(server, stack=stack)
            await adder.authenticate(jwt.encode(claims("adder", scope="plugin:add plugin:read"),
                                                SECRET, algorithm="HS256"), session_id="jam")
            assert (await adder.add_plugin("t", "Utility"))["success"] is True
            err = await error_of(adder.set_parameter("t", pid, "wet_dry", 0.1))
            assert err.details == {"required_permission": "plugin:write"}

    run(scenario())


def test_rs256_public_key_and_hs_rs_confusion(tmp_path: Path, rsa_pem: tuple[str, str]) -> None:
    private, public = rsa_pem
    pem_file = tmp_path / "public.pem"
    pem_file.write_text(public)

    async def scenario() -> None:
        for key_option in (str(pem_file), public):  # a path or the PEM text itself
            async with serving(tmp_path / f"srv{len(key_option)}", jwt_secret=None,
                               jwt_public_key=key_option, auth_max_failures=MANY) as server, \
                    AsyncExitStack() as stack:
                c = await connect(server, stack=stack)
                forged = forge_hs256(claims("mallory"), public.encode())
                assert (await auth_error(c, forged))["reason"] == "token algorithm not allowed"
                hs = jwt.encode(claims(), SECRET, algorithm="HS256")
                assert (await auth_error(c, hs))["reason"] == "token algorithm not allowed"
                good = jwt.encode(claims("alice"), private, algorithm="RS256")
                data = await c.authenticate(good, session_id="jam")
                assert data["user_id"] == "alice"
                with pytest.raises(ClientError) as refused:  # forged token at the handshake
                    await Client(server.url, token=forged).connect()
                assert refused.value.code == "AUTH_FAILED"
                assert refused.value.details == {"reason": "token algorithm not allowed",
                                                 "http_status": 401}
                shaken = await Client(server.url, token=good, session_id="jam").connect()
                stack.push_async_callback(shaken.close)
                assert (shaken.user_id, shaken.session_id) == ("alice", "jam")

    run(scenario())


# -- isolation -----------------------------------------------------------------------------

def test_spoofed_user_and_session_in_the_envelope_are_ignored(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b), \
                clients(server, "mallory", session="other") as (m,):
            reply = await a.request("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"},
                                    user_id="mallory", session_id="other")
            assert reply["user_id"] == "alice" and reply["session_id"] == "jam"
            pid = reply["data"]["plugin_id"]
            await a.request("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": pid,
                                                 "parameter_id": "wet_dry",
                                                 "parameter_value": 0.8},
                            user_id="mallory", session_id="other")
            update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                      lambda x: x["data"]["state"] == "updated")
            assert update["user_id"] == "alice" and update["data"]["changed_by"] == "alice"
            assert update["session_id"] == "jam"
            # the data may not smuggle them in either
            await a.cursor(track_id="t", user_id="mallory")
            cursor = await b.wait_for("USER_CURSOR_UPDATE")
            assert cursor["data"]["user_id"] == "alice" and cursor["user_id"] == "alice"
            await settle(a)
            await settle(m)
            assert m.received() == []  # nothing reached the other session
            assert (await m.session_state())["tracks"] == {}
            assert server.store is not None
            assert {e.user_id for e in server.store.events("jam")} == {"alice", "bob"}
            assert [e.action for e in server.store.events("other")] == ["auth"]

    run(scenario())


def test_other_sessions_objects_do_not_exist(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,), \
                clients(server, "eve", session="B") as (e,):
            pid = (await a.add_plugin("secret_track", "Reverb", plugin_id="shared_id"))[
                "plugin_id"]
            base = {"track_id": "secret_track", "plugin_id": pid}
            attempts = [
                e.get_parameters("secret_track", pid),
                e.set_parameter("secret_track", pid, "wet_dry", 1.0),
                e.set_parameters("secret_track", pid, {"wet_dry": 1.0}),
                e.set_bypass("secret_track", pid, True),
                e.preset("secret_track", pid, "load", "Large Hall"),
                e.remove_plugin("secret_track", pid),
            ]
            for attempt in attempts:
                err = await error_of(attempt)
                assert err.code == "TRACK_NOT_FOUND"
                assert err.details == {"track_id": "secret_track"}
            # legacy UPDATE_PARAMETER has no track: the plugin simply does not exist
            err = await error_of(e.request("UPDATE_PARAMETER", {
                "pluginId": pid, "parameterId": "wet_dry", "value": 1.0}))
            assert err.code == "PLUGIN_NOT_FOUND"
            # B may have a track of the same name: the plugin still does not exist there
            await e.add_plugin("secret_track", "Utility")
            err = await error_of(e.get_parameters("secret_track", pid))
            assert err.code == "PLUGIN_NOT_FOUND"
            assert err.details == {"plugin_id": pid, "track_id": "secret_track"}
            # plugin ids are per session: B can use the same id for its own plugin
            mine = await e.add_plugin("secret_track", "Delay", plugin_id="shared_id")
            assert mine["plugin_id"] == "shared_id"
            await e.set_parameter("secret_track", "shared_id", "mix", 0.1)
            await settle(e)
            await settle(a)
            assert a.received() == []  # none of B's broadcasts reached A
            assert e.received() == []  # and none of A's reached B
            got = await a.get_parameters(**base)
            assert got["name"] == "Reverb" and got["parameters"]["wet_dry"] == pytest.approx(0.3)
            assert got["bypass"] is False

    run(scenario())


# -- handshake -----------------------------------------------------------------------------

def test_handshake_token_in_query_or_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            q = await Client(server.url, token=server.token("bob"), session_id="jam").connect()
            h = await Client(server.url, additional_headers={
                "Authorization": f"Bearer {server.token('carol')}",
                "Session-Id": "jam"}).connect()
            fresh = await Client(server.url, token=server.token("dave")).connect()
            try:
                await asyncio.wait_for(_until(lambda: h.handshake is not None), 10)
                for client, user in ((q, "bob"), (h, "carol")):
                    hello = client.handshake
                    assert hello is not None and hello["type"] == "AUTH_SUCCESS"
                    assert hello["id"] == "handshake" and client.received("AUTH_SUCCESS") == []
                    assert (client.user_id, client.session_id) == (user, "jam")
                    assert hello["data"]["user_id"] == user
                    assert hello["data"]["session_id"] == "jam"
                    assert hello["session_id"] == "jam"
                    assert user in hello["data"]["snapshot"]["members"]
                    # no AUTH needed: straight to work
                    done = await client.add_plugin("t", "Reverb")
                    assert done["success"] is True
                assert fresh.session_id is not None
                assert fresh.session_id.startswith("session_")  # generated
                joined = {m["data"]["user_id"] for m in a.received("PRESENCE")}
                assert joined >= {"bob", "carol"} and "dave" not in joined
            finally:
                for client in (q, h, fresh):
                    await client.close()

    run(scenario())


def test_an_auth_naming_no_session_keeps_the_connection_where_it_is(tmp_path: Path) -> None:
    """A front end that adds ?token= but keeps the seed's AUTH-on-open (token and user_id,
    no session) stays in its session: nobody sees it leave, its work goes on."""
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            pid = (await a.add_plugin("t1", "Reverb"))["plugin_id"]
            async with Client(server.url, token=server.token("bob"), session_id="jam") as bob:
                await a.wait_for("PRESENCE", lambda m: m["data"]["event"] == "joined")
                again = await bob.authenticate(server.token("bob"), user_id="bob")
                assert again["session_id"] == "jam"
                assert [p["plugin_id"] for p in again["snapshot"]["tracks"]["t1"]] == [pid]
                assert (await bob.set_parameter("t1", pid, "wet_dry", 0.4))["success"]
                await a.wait_for("PLUGIN_STATE_UPDATE")
                assert a.received("PRESENCE") == []  # no left, no second joined
                # a token limited to other sessions still moves to its first one
                other = await bob.authenticate(server.token("bob", sessions=["solo"]))
                assert other["session_id"] == "solo"
            fresh = await Client(server.url).connect()  # never joined: a new session
            try:
                first = await fresh.authenticate(server.token("dave"))
                assert first["session_id"].startswith("session_")
            finally:
                await fresh.close()

    run(scenario())


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.01)


def test_client_joins_at_the_handshake_or_raises_the_refusal(tmp_path: Path) -> None:
    """Client(token=...) returns joined (ids and snapshot filled, any session name), or
    raises the server's refusal as ClientError."""
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            odd = "jam & co/?#=1"
            async with Client(server.url, token=server.token("bob"), session_id=odd) as bob:
                assert (bob.user_id, bob.session_id) == ("bob", odd)
                assert bob.snapshot is not None and bob.snapshot["members"] == ["bob"]
                assert (await bob.session_state())["session_id"] == odd
                assert bob.received() == []  # the handshake's answer is no broadcast
            token = server.token("carol", sessions=["allowed"])
            with pytest.raises(ClientError) as info:
                await Client(server.url, token=token, session_id="elsewhere").connect()
            assert info.value.code == "AUTH_FAILED"
            assert info.value.message["id"] == "handshake"

    run(scenario())


def test_only_allowed_browser_origins_may_connect(tmp_path: Path) -> None:
    """With allowed_origins set, a page from another origin gets HTTP 403 before its token is
    even looked at (no failure counted); scripts, which send no Origin, still connect."""
    async def scenario() -> None:
        async with serving(tmp_path, allowed_origins="http://studio.local:3000, null",
                           auth_max_failures=1) as server:
            good = server.token("alice")
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(f"{server.url}?token={good}", proxy=None,
                                      origin="http://evil.example"):  # type: ignore[arg-type]
                    pass
            assert info.value.response.status_code == 403
            for origin in ("http://studio.local:3000", "null", None):
                async with ws_connect(f"{server.url}?token={good}", proxy=None,
                                      origin=origin) as ws:  # type: ignore[arg-type]
                    hello = json.loads(await ws.recv())
                    assert hello["type"] == "AUTH_SUCCESS", origin  # and the address is not
                    # blocked although auth_max_failures=1: the 403 counted no failure
        async with serving(tmp_path / "open") as server, ws_connect(  # default: any origin
                server.url, proxy=None, origin="http://anywhere.example") as ws:  # type: ignore[arg-type]
            await ws.send('{"type": "PING", "id": "1"}')
            assert json.loads(await ws.recv())["type"] == "PONG"
        with pytest.raises(ValueError, match="allowed_origins"):
            ServerConfig(allowed_origins=" , ")

    (tmp_path / "open").mkdir()
    run(scenario())


@pytest.mark.vst
def test_clients_load_binaries_only_from_the_servers_plugin_folders(
        tmp_path: Path, vst_path: str) -> None:
    """Loading a shared library runs its code in the server: a client may load what the host
    installed in its plugin folders, not a file it placed elsewhere (copied here to /tmp)."""
    copy = tmp_path / "uploads" / Path(vst_path).name
    copy.parent.mkdir()
    shutil.copy(vst_path, copy)
    sneaky = f"{Path(vst_path).parent}/../../../{copy.relative_to('/')}"

    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            installed = await a.add_plugin("t", "Installed", vst_path)
            assert installed["success"] and installed["resolved_as"] != "builtin"
            for path in (str(copy), sneaky):
                err = await error_of(a.add_plugin("t", "Uploaded", path))
                assert err.code == "PLUGIN_ADD_FAILED" and err.details["plugin_path"] == path
                assert "outside the server's plugin folders" in err.details["reason"]
            assert [p["plugin_id"] for p in (await a.session_state())["tracks"]["t"]] == [
                installed["plugin_id"]]
        (tmp_path / "b").mkdir()
        async with serving(tmp_path / "b", plugin_dirs=str(copy.parent)) as server, \
                clients(server, "alice") as (a,):
            assert (await a.add_plugin("t", "Uploaded", str(copy)))["success"]
            err = await error_of(a.add_plugin("t", "Installed", vst_path))  # not listed now
            assert err.code == "PLUGIN_ADD_FAILED"

    run(scenario())


def test_bad_handshake_token_is_http_401_and_other_paths_404(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, auth_max_failures=MANY) as server:
            for url in (f"{server.url}?token=garbage",
                        f"{server.url}?token={jwt.encode(claims(), 'wrong-key-wrong-key-wrong-key-wrong-key', algorithm='HS256')}",
                        f"{server.url}?token={jwt.encode(claims(), None, algorithm='none')}"):
                with pytest.raises(InvalidStatus) as info:
                    async with ws_connect(url, proxy=None):
                        pass
                assert info.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(server.url, proxy=None, additional_headers={
                        "Authorization": "Bearer nonsense"}):
                    pass
            assert info.value.response.status_code == 401
            base = server.url.rsplit("/", 1)[0]
            for path in ("/", "/other", "/ws/extra", "/WS"):
                with pytest.raises(InvalidStatus) as info:
                    async with ws_connect(base + path, proxy=None):
                        pass
                assert info.value.response.status_code == 404
            async with ws_connect(server.url + "?unrelated=1", proxy=None) as ws:
                await ws.send('{"type": "PING", "id": "1"}')
                assert json.loads(await ws.recv())["type"] == "PONG"

    run(scenario())
