"""The real WebSocket server (``PluginServer`` on 127.0.0.1, port 0) with real clients.

Sections: the user's migration test suite (literally), every message type with its reply and
broadcast shapes, every error code reachable from outside, limits under a flood, debouncing,
a live fuzz, feature flags, DAID durability and the Python door.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from server_helpers import (
    DOCUMENTED_CODES,
    ISO_MS,
    clients,
    connect,
    error_of,
    make_config,
    raw_exchange,
    run,
    serving,
    settle,
    wait_until,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from pluginlab.client import Client, ClientError
from pluginlab.config import ServerConfig
from pluginlab.provenance import ProvenanceReader
from pluginlab.server import READ_PAUSE, PluginServer

TRACK = "test_track_001"
SESSION = "test_session_001"
USER = "test_user_001"
REVERB_PATH = "/path/to/reverb.vst3"


def data_of(message: dict[str, Any]) -> dict[str, Any]:
    return message["data"]


def check_envelope(message: dict[str, Any]) -> None:
    assert ISO_MS.match(message["timestamp"]), message
    assert set(message) >= {"id", "type", "data", "user_id", "session_id", "timestamp"}


# == 1. the user's migration test suite ===================================================

class OldPluginClient:
    """The seed document's old client: no id, camelCase fields, reads results at top level."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def _send(self, msg_type: str, data: dict[str, Any], reply: str) -> dict[str, Any]:
        await self.client.send_raw(json.dumps({"type": msg_type, "data": data}))
        # others' changes reach an old client in the same shapes, with a bcast_ id
        message = await self.client.wait_for(reply, lambda m: m["id"].startswith("legacy_"))
        check_envelope(message)
        return message  # the old client's "result" is the message itself

    async def add_plugin(self, track_id: str, name: str, path: str) -> dict[str, Any]:
        return await self._send("ADD_PLUGIN", {"trackId": track_id, "pluginName": name,
                                               "pluginPath": path}, "PLUGIN_ADDED")

    async def add_plugin_old_hook(self, track_id: str, name: str, path: str) -> dict[str, Any]:
        return await self._send("ADD_PLUGIN", {"trackId": track_id, "name": name, "path": path},
                                "PLUGIN_ADDED")

    async def update_parameter(self, plugin_id: str, parameter_id: str,
                               value: Any) -> dict[str, Any]:
        return await self._send("UPDATE_PARAMETER", {"pluginId": plugin_id,
                                                     "parameterId": parameter_id,
                                                     "value": value}, "PARAMETER_UPDATED")


class NewPluginClient:
    """The seed document's new client: ids, snake_case, user/session in the envelope."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def add_plugin(self, track_id: str, name: str, path: str, user_id: str,
                         session_id: str) -> dict[str, Any]:
        reply = await self.client.request(
            "PLUGIN_ADD", {"track_id": track_id, "name": name, "plugin_path": path,
                           "plugin_id": ""}, user_id=user_id, session_id=session_id)
        return data_of(reply)

    async def update_parameter(self, track_id: str, plugin_id: str, parameter_id: str,
                               value: Any, user_id: str, session_id: str) -> dict[str, Any]:
        reply = await self.client.request(
            "PLUGIN_PARAMETER", {"track_id": track_id, "plugin_id": plugin_id,
                                 "parameter_id": parameter_id, "parameter_value": value},
            user_id=user_id, session_id=session_id)
        return data_of(reply)


def test_migration_suite_with_authenticated_old_and_new_clients(tmp_path: Path) -> None:
    """The four scenarios of the seed document's ``migration.test.js``. Legacy clients must
    authenticate (anonymous access is off by default), so the old client sends AUTH first and
    then only old-format frames."""

    async def scenario() -> None:
        async with serving(tmp_path) as server, AsyncExitStack() as stack:
            old_ws = await connect(server, "old_user", SESSION, stack=stack)
            new_ws = await connect(server, USER, SESSION, stack=stack)
            old, new = OldPluginClient(old_ws), NewPluginClient(new_ws)

            # test('Plugin addition compatibility')
            old_result = await old.add_plugin(TRACK, "Reverb", REVERB_PATH)
            assert old_result["type"] == "PLUGIN_ADDED"
            assert old_result["success"] is True
            assert isinstance(old_result["pluginId"], str) and old_result["pluginId"]
            assert old_result["plugin"]["id"] == old_result["pluginId"]
            assert old_result["plugin"]["trackId"] == TRACK
            assert old_result["plugin"]["parameters"]["wet_dry"] == pytest.approx(0.3)
            assert old_result["data"]["pluginId"] == old_result["pluginId"]  # also in data
            new_result = await new.add_plugin(TRACK, "Reverb", REVERB_PATH, USER, SESSION)
            assert new_result["success"] is True
            assert new_result["plugin_id"]
            assert isinstance(new_result["parameters"], dict) and "wet_dry" in \
                new_result["parameters"]
            hook_result = await old.add_plugin_old_hook(TRACK, "Reverb", REVERB_PATH)
            assert hook_result["success"] is True and hook_result["pluginId"]

            # test('Parameter update compatibility')
            plugin = await new.add_plugin(TRACK, "Reverb", REVERB_PATH, USER, SESSION)
            old_update = await old.update_parameter(plugin["plugin_id"], "wet_dry", 0.7)
            assert old_update["type"] == "PARAMETER_UPDATED"
            assert old_update["success"] is True
            assert old_update["pluginId"] == plugin["plugin_id"]
            assert old_update["parameterId"] == "wet_dry" and old_update["value"] == 0.7
            new_update = await new.update_parameter(TRACK, plugin["plugin_id"], "wet_dry", 0.8,
                                                    USER, SESSION)
            assert new_update["success"] is True
            assert new_update["track_id"] == TRACK
            assert new_update["parameter_value"] == 0.8

            # test('Error handling improvements')
            with pytest.raises(ClientError) as info:
                await new.update_parameter(TRACK, "non_existent_plugin", "wet_dry", 0.5,
                                           USER, SESSION)
            assert info.value.code == "PLUGIN_NOT_FOUND"
            assert info.value.details["plugin_id"] == "non_existent_plugin"

            # test('Session broadcasting')
            async with AsyncExitStack() as inner:
                client1 = await connect(server, USER, SESSION, stack=inner)
                client2 = await connect(server, "user_002", SESSION, stack=inner)
                c1 = NewPluginClient(client1)
                added = await c1.add_plugin(TRACK, "Reverb", REVERB_PATH, USER, SESSION)
                await c1.update_parameter(TRACK, added["plugin_id"], "wet_dry", 0.7, USER,
                                          SESSION)
                broadcast = await client2.wait_for("PLUGIN_STATE_UPDATE")
                assert broadcast["data"]["plugin_id"] == added["plugin_id"]
                assert broadcast["data"]["changed_by"] == USER
                update = await client2.wait_for(
                    "PLUGIN_STATE_UPDATE", lambda m: m["data"]["state"] == "updated")
                assert update["data"]["parameters"] == {"wet_dry": 0.7}
                assert update["data"]["changed_by"] == USER

    run(scenario())


def test_legacy_client_without_auth_is_refused_by_default(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, AsyncExitStack() as stack:
            old = await connect(server, stack=stack)
            error = await raw_exchange(old, json.dumps({"type": "ADD_PLUGIN", "data": {
                "trackId": TRACK, "pluginName": "Reverb", "pluginPath": REVERB_PATH}}))
            assert error["data"]["code"] == "UNAUTHORIZED"
            assert error["id"].startswith("legacy_")
            assert (await old.ping())["type"] == "PONG"

    run(scenario())


def test_legacy_client_that_never_authenticates_with_allow_anonymous(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, allow_anonymous=True) as server, AsyncExitStack() as stack:
            watcher = await connect(server, USER, "legacy_session", stack=stack)
            old = OldPluginClient(await connect(server, stack=stack))
            added = await old.add_plugin(TRACK, "Reverb", REVERB_PATH)
            assert added["success"] is True and added["pluginId"]
            assert added["user_id"] == "legacy_user"
            assert added["session_id"] == "legacy_session"
            updated = await old.update_parameter(added["pluginId"], "wet_dry", 0.7)
            assert updated["success"] is True and updated["value"] == 0.7
            joined = await watcher.wait_for("PRESENCE")
            assert joined["data"] == {"event": "joined", "user_id": "legacy_user"}
            update = await watcher.wait_for("PLUGIN_STATE_UPDATE",
                                            lambda m: m["data"]["state"] == "updated")
            assert update["data"]["changed_by"] == "legacy_user"
            assert update["data"]["plugin_id"] == added["pluginId"]
            # the new client sees the legacy plugin and can drive it in the new format
            params = await watcher.get_parameters(TRACK, added["pluginId"])
            assert params["parameters"]["wet_dry"] == 0.7

    run(scenario())


def test_old_clients_receive_others_changes_in_the_old_shapes(tmp_path: Path) -> None:
    """An old front end only understands PLUGIN_ADDED and PARAMETER_UPDATED (fields at the top
    level): others' adds, changes, batches and preset loads reach it in those shapes too,
    while clients speaking the new format get new-format broadcasts only."""
    async def scenario() -> None:
        async with serving(tmp_path, allow_anonymous=True) as server, AsyncExitStack() as stack:
            new = await connect(server, USER, "legacy_session", stack=stack)
            adder = OldPluginClient(await connect(server, stack=stack))
            watcher = OldPluginClient(await connect(server, stack=stack))
            first = await watcher.add_plugin("t0", "Utility", "Utility")  # now known as old
            added = await adder.add_plugin(TRACK, "Reverb", REVERB_PATH)
            seen = await watcher.client.wait_for(
                "PLUGIN_ADDED", lambda m: m["pluginId"] == added["pluginId"])
            assert seen["id"].startswith("bcast_") and seen["user_id"] == "legacy_user"
            assert seen["plugin"]["trackId"] == TRACK
            assert seen["plugin"]["parameters"]["wet_dry"] == added["plugin"]["parameters"][
                "wet_dry"]
            await adder.update_parameter(added["pluginId"], "wet_dry", 0.7)
            seen = await watcher.client.wait_for("PARAMETER_UPDATED",
                                                 lambda m: m["id"].startswith("bcast_"))
            assert (seen["pluginId"], seen["parameterId"], seen["value"]) == (
                added["pluginId"], "wet_dry", 0.7)
            await new.set_parameters(TRACK, added["pluginId"], {"room_size": 0.2, "damping": 0.9})
            await new.preset("t0", first["pluginId"], "load", preset_data={"gain": -6.0})
            batch = {(m["parameterId"], m["value"]) for m in [
                await watcher.client.wait_for("PARAMETER_UPDATED", lambda m, p=p: (
                    m["parameterId"] == p and m["user_id"] == USER))
                for p in ("room_size", "damping", "gain")]}
            assert batch == {("room_size", 0.2), ("damping", 0.9), ("gain", -6.0)}
            await new.ping()
            assert not new.received("PLUGIN_ADDED") and not new.received("PARAMETER_UPDATED")
            assert new.received("PLUGIN_ADD") and new.received("PLUGIN_PARAMETER")
            # a client that moves to the new format gets the new shapes only from then on
            await watcher.client.set_parameter(TRACK, added["pluginId"], "wet_dry", 0.1)
            watcher.client.drain()
            await new.set_parameter(TRACK, added["pluginId"], "wet_dry", 0.2)
            await watcher.client.wait_for("PLUGIN_STATE_UPDATE", lambda m: (
                m["data"].get("parameters") or {}).get("wet_dry") == 0.2)
            await watcher.client.ping()
            assert watcher.client.received("PARAMETER_UPDATED") == []
            session = server.studio.sessions["legacy_session"]
            assert session.speaks_legacy
            for old in (adder, watcher):
                await old.client.close()
            await new.wait_for("PRESENCE", lambda m: m["data"]["event"] == "left")
            assert not session.speaks_legacy  # broadcasts stop looking for old clients

    run(scenario())


def test_many_legacy_and_anonymous_clients_are_not_capped_as_one_user(tmp_path: Path) -> None:
    """``legacy_user`` / ``anonymous_user`` are shared placeholders: the 5-connections-per-user
    cap applies to real users only, or a 6th old client could never work."""

    async def scenario() -> None:
        async with serving(tmp_path, allow_anonymous=True) as server, AsyncExitStack() as stack:
            for i in range(7):
                old = OldPluginClient(await connect(server, stack=stack))
                added = await old.add_plugin(f"t{i}", "Utility", "Utility")
                assert added["success"] is True and added["user_id"] == "legacy_user"
                anon = await connect(server, stack=stack)
                data = await anon.authenticate()
                assert data["user_id"] == "anonymous_user"
            # real users are still capped
            five = [await connect(server, "alice", "jam", stack=stack) for _ in range(5)]
            assert len(five) == 5
            sixth = await connect(server, stack=stack)
            err = await error_of(sixth.authenticate(server.token("alice"), session_id="jam"))
            assert err.code == "AUTH_FAILED" and err.details["reason"] == "too many connections"

    run(scenario())


# == 2. message types, replies and broadcasts =============================================

def test_auth_success_and_presence(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, AsyncExitStack() as stack:
            alice = await connect(server, stack=stack)
            reply = await alice.request("AUTH", {"token": server.token("alice"),
                                                 "user_id": "alice", "session_id": "jam"},
                                        id="auth-1")
            check_envelope(reply)
            assert reply["type"] == "AUTH_SUCCESS" and reply["id"] == "auth-1"
            assert reply["user_id"] == "alice" and reply["session_id"] == "jam"
            assert reply["data"] == {"session_id": "jam", "user_id": "alice", "snapshot": {
                "session_id": "jam", "members": ["alice"], "tracks": {}}}
            bob = await connect(server, "bob", "jam", stack=stack)
            assert bob.snapshot == {"session_id": "jam", "members": ["alice", "bob"],
                                    "tracks": {}}
            joined = await alice.wait_for("PRESENCE")
            check_envelope(joined)
            assert joined["data"] == {"event": "joined", "user_id": "bob"}
            assert joined["user_id"] == "bob" and joined["id"].startswith("bcast_")
            await bob.close()
            left = await alice.wait_for("PRESENCE")
            assert left["data"] == {"event": "left", "user_id": "bob"}
            # no session requested: a fresh one is generated
            carol = await connect(server, stack=stack)
            data = await carol.authenticate(server.token("carol"))
            assert data["session_id"].startswith("session_") and data["user_id"] == "carol"

    run(scenario())


def test_plugin_add_reply_and_broadcasts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            reply = await a.request("PLUGIN_ADD", {"track_id": "t1", "name": "Reverb",
                                                   "plugin_path": REVERB_PATH,
                                                   "plugin_id": ""}, id="add-1")
            check_envelope(reply)
            assert reply["type"] == "PLUGIN_ADD" and reply["id"] == "add-1"
            data = reply["data"]
            assert data["success"] is True and data["track_id"] == "t1"
            assert data["name"] == "Reverb" and data["plugin_id"]
            assert data["resolved_as"] == "builtin"
            assert REVERB_PATH in data["warning"]
            assert data["daid"].startswith("daid:v1.0:")
            assert data["bypass"] is False
            info = {p["id"]: p for p in data["parameter_info"]}
            assert set(info) == set(data["parameters"])
            for entry in data["parameter_info"]:
                assert {"id", "name", "min", "max", "default", "value", "unit", "text"} \
                    <= set(entry)
                assert entry["value"] == data["parameters"][entry["id"]]
            assert info["wet_dry"]["min"] == 0 and info["wet_dry"]["max"] == 1
            assert isinstance(info["wet_dry"]["text"], str)

            relay = await b.wait_for("PLUGIN_ADD")
            check_envelope(relay)
            assert relay["id"].startswith("bcast_") and relay["user_id"] == "alice"
            assert relay["data"] == data  # the same data
            added = await b.wait_for("PLUGIN_STATE_UPDATE")
            check_envelope(added)
            assert added["user_id"] == "alice"
            assert added["data"]["state"] == "added" and added["data"]["plugin_id"] == \
                data["plugin_id"]
            assert added["data"]["changed_by"] == "alice" and added["data"]["daid"] == \
                data["daid"]
            assert ISO_MS.match(added["data"]["timestamp"])
            assert added["data"]["parameters"] == data["parameters"]

            # client-chosen id, bare built-in name as path, no path at all
            mine = await a.add_plugin("t1", "Delay", plugin_id="my_delay")
            assert mine["plugin_id"] == "my_delay" and "warning" not in mine
            assert (await a.add_plugin("t2", "utility"))["name"] == "Utility"
            assert (await a.add_plugin("t2", "x", "Reverb"))["name"] == "Reverb"
            snapshot = await b.session_state()
            assert [p["plugin_id"] for p in snapshot["tracks"]["t1"]] == \
                [data["plugin_id"], "my_delay"]
            assert snapshot["tracks"]["t1"][0] == {
                "plugin_id": data["plugin_id"], "name": "Reverb", "plugin_path": REVERB_PATH,
                "bypass": False, "parameters": data["parameters"]}
            await settle(a)
            assert not [m for m in a.received() if m["type"] != "PRESENCE"]

    run(scenario())


def test_strict_paths_refuse_placeholder_paths(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, strict_paths=True) as server, \
                clients(server, "alice") as (a,):
            for path in (REVERB_PATH, "C:\\Plugins\\Reverb.dll"):
                err = await error_of(a.add_plugin("t", "Reverb", path))
                assert err.code == "PLUGIN_ADD_FAILED"
                assert err.details == {"name": "Reverb", "plugin_path": path,
                                       "reason": "plugin file not found"}
            assert (await a.add_plugin("t", "Reverb"))["success"] is True

    run(scenario())


def test_plugin_remove(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            reply = await a.request("PLUGIN_REMOVE", {"track_id": "t", "plugin_id": pid})
            assert reply["type"] == "PLUGIN_REMOVE"
            data = reply["data"]
            assert data["track_id"] == "t" and data["plugin_id"] == pid and data["success"]
            assert data["daid"].startswith("daid:")
            relay = await b.wait_for("PLUGIN_REMOVE")
            assert relay["data"] == data and relay["user_id"] == "alice"
            removed = await b.wait_for("PLUGIN_STATE_UPDATE",
                                       lambda m: m["data"]["state"] == "removed")
            assert removed["data"]["plugin_id"] == pid and removed["data"]["changed_by"] == \
                "alice"
            assert (await b.session_state())["tracks"] == {"t": []}  # the track stays
            err = await error_of(a.remove_plugin("t", pid))
            assert err.code == "PLUGIN_NOT_FOUND"
            assert err.details == {"plugin_id": pid, "track_id": "t"}

    run(scenario())


def test_plugin_parameter(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Utility"))["plugin_id"]
            reply = await a.request("PLUGIN_PARAMETER", {
                "track_id": "t", "plugin_id": pid, "parameter_id": "gain",
                "parameter_value": -12})
            data = reply["data"]
            assert reply["type"] == "PLUGIN_PARAMETER"
            assert data["success"] is True and data["parameter_value"] == -12
            assert data["track_id"] == "t" and data["plugin_id"] == pid
            assert data["parameter_id"] == "gain" and "dB" in data["text"]
            relay = await b.wait_for("PLUGIN_PARAMETER")
            assert relay["user_id"] == "alice"
            assert relay["data"]["parameter_value"] == -12 and relay["data"]["plugin_id"] == pid
            update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                      lambda m: m["data"]["state"] == "updated")
            assert update["data"]["parameters"] == {"gain": -12}
            assert update["data"]["daid"] == data["daid"]
            assert (await b.get_parameters("t", pid))["parameters"]["gain"] == -12

    run(scenario())


def test_parameter_batch_dict_and_list_forms_all_or_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Delay"))["plugin_id"]
            reply = await a.request("PLUGIN_PARAMETER_BATCH", {
                "track_id": "t", "plugin_id": pid,
                "parameters": {"time": 500, "feedback": 0.4}})
            assert reply["type"] == "PLUGIN_PARAMETER_BATCH"
            assert reply["data"]["parameters"] == {"time": 500, "feedback": 0.4}
            assert reply["data"]["success"] is True and reply["data"]["daid"]
            relay = await b.wait_for("PLUGIN_PARAMETER_BATCH")
            assert relay["data"]["parameters"] == {"time": 500, "feedback": 0.4}
            update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                      lambda m: m["data"]["state"] == "updated")
            assert update["data"]["parameters"] == {"time": 500, "feedback": 0.4}

            listed = await a.call("plugin.parameter.batch", {
                "track_id": "t", "plugin_id": pid, "parameters": [
                    {"parameter_id": "time", "parameter_value": 750},
                    {"parameter_id": "mix", "parameter_value": 0.6}]})
            assert listed["parameters"] == {"time": 750, "mix": 0.6}

            before = (await a.get_parameters("t", pid))["parameters"]
            for bad in ({"time": 100, "feedback": 7},  # second value out of range
                        {"time": 100, "nope": 1},  # unknown parameter
                        [{"parameter_id": "time", "parameter_value": 120},
                         {"parameter_id": "mix", "parameter_value": "loud"}]):
                err = await error_of(a.set_parameters("t", pid, bad))  # type: ignore[arg-type]
                assert err.code == "INVALID_PARAMETER"
                assert set(err.details) == {"parameter_id", "parameter_value",
                                            "validation_error"}
            assert (await a.get_parameters("t", pid))["parameters"] == before  # none applied
            twice = [{"parameter_id": "time", "parameter_value": 130},
                     {"parameter_id": "time", "parameter_value": 140}]
            for bad in ({}, [], [{"parameter_id": 5, "parameter_value": 1}], [1, 2], twice):
                err = await error_of(a.set_parameters("t", pid, bad))  # type: ignore[arg-type]
                assert err.code == "INVALID_MESSAGE" and err.details["field"] == "parameters"
            assert "listed twice" in err.details["reason"]
            assert (await a.get_parameters("t", pid))["parameters"] == before

    run(scenario())


def test_a_preset_load_racing_other_changes_leaves_engine_and_log_agreeing(
        tmp_path: Path) -> None:
    """The preset is read off the loop but applied and logged on it with no await between,
    so a change another client makes meanwhile is before both or after both (it used to be
    applied after the preset but logged before it: the log, and so a restart, lost it)."""
    async def scenario() -> None:
        async with serving(tmp_path, rate_limits=False, debounce_window=0.0) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            engine = server.studio.sessions["jam"].engine
            for k in range(12):
                await asyncio.gather(
                    a.request("PLUGIN_PRESET", {"track_id": "t", "plugin_id": pid,
                                                "preset_name": ("Large Hall", "Small Room")[k % 2]}),
                    *[b.set_parameter("t", pid, "wet_dry", round(0.01 + k / 20 + j / 100, 4))
                      for j in range(5)])
                server.store.flush()
                live = engine.plugin(pid).get("wet_dry")
                logged = server.store.session_state("jam")["t"][0]["parameters"]["wet_dry"]
                last = server.store.events("jam")[-1].daid
                replayed = server.store.state_at("jam", daid=last)["t"][0]["parameters"]
                assert live == logged == replayed["wet_dry"], k
            for client in (a, b):  # and what was sent to them says the same
                assert (await client.get_parameters("t", pid))["parameters"]["wet_dry"] == live

    run(scenario())


def test_chain_changes_are_logged_in_the_order_the_engine_made_them(tmp_path: Path) -> None:
    """An add whose processor is being created while another client removes a plugin of the
    same track: the log (hence every client and a restart) must order them as the engine
    did. The owner thread is held by a callable that stands in for a long render."""
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            p = (await a.add_plugin("t1", "Filter"))["plugin_id"]
            await a.add_plugin("t1", "Reverb")
            engine = server.studio.sessions["jam"].engine
            await engine.render_async(0.1)  # a rendered chain: removing must reach DawDreamer
            first, second = threading.Event(), threading.Event()
            held = [engine._owner.submit(first.wait)]  # DawDreamer's thread is busy
            adding = asyncio.create_task(b.add_plugin("t1", "Delay"))
            await asyncio.sleep(0.1)  # the add's processor is queued behind `first`
            held.append(engine._owner.submit(second.wait))  # a render queued after it
            removing = asyncio.create_task(a.remove_plugin("t1", p))
            await asyncio.sleep(0.1)  # the removal reaches DawDreamer only after `second`
            first.set()
            await adding  # created, and recorded
            second.set()
            await removing
            for future in held:
                future.result()
            server.store.flush()
            live = [q.id for q in engine.track("t1").plugins]
            logged = [q["plugin_id"] for q in server.store.session_state("jam")["t1"]]
            replayed = [q["plugin_id"] for q in server.store.state_at("jam")["t1"]]
            assert live == logged == replayed
            assert [q["plugin_id"] for q in (await b.session_state())["tracks"]["t1"]] == live

    run(scenario())


def test_plugin_bypass(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            reply = await a.request("PLUGIN_BYPASS", {"track_id": "t", "plugin_id": pid,
                                                      "bypass": True})
            assert reply["type"] == "PLUGIN_BYPASS"
            assert reply["data"]["bypass"] is True and reply["data"]["success"] is True
            relay = await b.wait_for("PLUGIN_BYPASS")
            assert relay["data"]["bypass"] is True and relay["user_id"] == "alice"
            state = await b.wait_for("PLUGIN_STATE_UPDATE",
                                     lambda m: m["data"]["state"] in ("bypassed", "enabled"))
            assert state["data"]["state"] == "bypassed"
            assert (await b.get_parameters("t", pid))["bypass"] is True
            # the legacy spelling `bypassed` is accepted
            await a.call("plugin.bypass", {"track_id": "t", "plugin_id": pid,
                                           "bypassed": False})
            state = await b.wait_for("PLUGIN_STATE_UPDATE",
                                     lambda m: m["data"]["state"] in ("bypassed", "enabled"))
            assert state["data"]["state"] == "enabled"
            assert (await b.session_state())["tracks"]["t"][0]["bypass"] is False

    run(scenario())


def test_presets_load_save_list_delete(tmp_path: Path) -> None:
    factory = {json.loads(p.read_text())["name"]: json.loads(p.read_text())["parameters"]
               for p in (Path(__file__).resolve().parents[1] / "data/presets/reverb")
               .glob("*.json")}
    assert "Large Hall" in factory

    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b), \
                clients(server, "carol", session="other") as (c,):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            listed = await a.preset("t", pid, "list")
            assert sorted(factory) == sorted(listed["presets"])
            loaded = await a.preset("t", pid, "load", "Large Hall")
            assert loaded["success"] is True and loaded["preset_name"] == "Large Hall"
            for key, value in factory["Large Hall"].items():
                assert loaded["parameters"][key] == pytest.approx(value)
            relay = await b.wait_for("PLUGIN_PRESET")
            assert relay["data"]["parameters"] == loaded["parameters"]
            update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                      lambda m: m["data"]["state"] == "preset_loaded")
            assert update["data"]["parameters"] == loaded["parameters"]
            # default action is load
            again = await a.call("PLUGIN_PRESET", {"track_id": "t", "plugin_id": pid,
                                                   "preset_name": "Small Room"})
            assert again["parameters"]["room_size"] == pytest.approx(
                factory["Small Room"]["room_size"])
            # preset_data: an ad-hoc preset
            adhoc = await a.preset("t", pid, "load", preset_data={"wet_dry": 0.55})
            assert adhoc["parameters"]["wet_dry"] == 0.55
            err = await error_of(a.preset("t", pid, "load", preset_data={"wet_dry": 5}))
            assert err.code == "PRESET_LOAD_FAILED"
            assert err.details["plugin_id"] == pid and "wet_dry" in err.details["preset_error"]

            saved = await a.preset("t", pid, "save", "My Space")
            assert saved["preset_name"] == "My Space" and saved["daid"]
            assert "My Space" in (await a.preset("t", pid, "list"))["presets"]
            # presets are per plugin type and visible from every session
            other_pid = (await c.add_plugin("x", "Reverb"))["plugin_id"]
            assert "My Space" in (await c.preset("x", other_pid, "list"))["presets"]
            mine = await c.preset("x", other_pid, "load", "My Space")
            assert mine["parameters"]["wet_dry"] == pytest.approx(0.55)

            err = await error_of(a.preset("t", pid, "load", "No Such Preset"))
            assert err.code == "PRESET_LOAD_FAILED"
            assert err.details["plugin_id"] == pid and "No Such Preset" in \
                err.details["preset_error"]
            err = await error_of(a.preset("t", pid, "delete", "Large Hall"))
            assert err.code == "PRESET_LOAD_FAILED" and "read-only" in \
                err.details["preset_error"]
            err = await error_of(a.preset("t", pid, "delete", "Never Saved"))
            assert err.code == "PRESET_LOAD_FAILED" and "unknown preset" in \
                err.details["preset_error"]
            err = await error_of(a.preset("t", pid, "dance", "x"))
            assert err.code == "INVALID_MESSAGE" and err.details["field"] == "action"
            err = await error_of(a.preset("t", pid, "save"))
            assert err.code == "INVALID_MESSAGE" and err.details["field"] == "preset_name"

    run(scenario())


def test_preset_delete_is_recorded_and_visible_everywhere(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,), \
                clients(server, "carol", session="other") as (c,):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            other = (await c.add_plugin("x", "Reverb"))["plugin_id"]
            await a.preset("t", pid, "save", "Doomed")
            assert "Doomed" in (await c.preset("x", other, "list"))["presets"]
            deleted = await a.preset("t", pid, "delete", "Doomed")
            assert deleted["success"] is True and deleted["daid"]
            assert "Doomed" not in (await c.preset("x", other, "list"))["presets"]
            err = await error_of(a.preset("t", pid, "delete", "Doomed"))
            assert err.code == "PRESET_LOAD_FAILED"
            assert server.store is not None
            assert [e.action for e in server.store.events("jam")][-1] == "preset_delete"

    run(scenario())


def test_a_preset_deletion_that_cannot_be_recorded_does_not_happen(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, enable_daid_tracking=True) as server, \
                clients(server, "alice") as (a,):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            await a.preset("t", pid, "save", "Keeper")
            original = server.store.append_many_async  # type: ignore[union-attr]

            async def failing(drafts: Any) -> Any:
                raise OSError("disk full")

            server.store.append_many_async = failing  # type: ignore[union-attr]
            try:
                err = await error_of(a.preset("t", pid, "delete", "Keeper"))
                assert err.code == "INTERNAL_ERROR"
            finally:
                server.store.append_many_async = original  # type: ignore[union-attr]
            assert "Keeper" in (await a.preset("t", pid, "list"))["presets"]

    run(scenario())


def test_parameters_get_and_session_state_get(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Delay"))["plugin_id"]
            got = await b.get_parameters("t", pid)
            assert {"track_id", "plugin_id", "parameters", "parameter_info", "bypass",
                    "success"} <= set(got)
            assert got["track_id"] == "t" and got["plugin_id"] == pid and got["success"]
            assert {"time", "feedback", "mix"} <= set(got["parameters"])
            assert [p["id"] for p in got["parameter_info"]] == list(got["parameters"])
            reply = await b.request("SESSION_STATE_GET")
            assert reply["type"] == "SESSION_STATE_GET"
            snapshot = reply["data"]["snapshot"]
            assert snapshot["session_id"] == "jam"
            assert snapshot["members"] == ["alice", "bob"]
            assert snapshot["tracks"]["t"][0]["plugin_id"] == pid
            await settle(a)
            assert a.received() == [m for m in a.received() if m["type"] == "PRESENCE"]

    run(scenario())


def test_cursor_updates_are_relayed_rate_limited_and_never_echoed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            await a.cursor(track_id="t", plugin_id="p", parameter_id="wet_dry",
                           position={"x": 0.5, "y": 1})
            relay = await b.wait_for("USER_CURSOR_UPDATE")
            check_envelope(relay)
            assert relay["data"] == {"track_id": "t", "plugin_id": "p",
                                     "parameter_id": "wet_dry", "position": {"x": 0.5, "y": 1},
                                     "user_id": "alice"}
            assert relay["user_id"] == "alice"
            for i in range(45):
                await a.cursor(position={"i": i})
            await settle(a)
            await settle(b)
            relays = b.received("USER_CURSOR_UPDATE")
            assert 1 <= len(relays) <= 29  # 30 per second including the first one
            assert not a.received("USER_CURSOR_UPDATE")
            assert not a.received("ERROR")  # dropped silently

    run(scenario())


def test_ping_heartbeat_ids_and_aliases(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            pong = await a.request("PING", id="p-1")
            check_envelope(pong)
            assert pong["type"] == "PONG" and pong["id"] == "p-1"
            assert ISO_MS.match(pong["data"]["timestamp"])
            beat = await a.request("heartbeat", id="hb")
            assert beat["type"] == "heartbeat_response" and beat["id"] == "hb"
            pong = await raw_exchange(a, '{"type": "PING"}', "PONG")
            assert pong["id"].startswith("legacy_")
            numeric = await raw_exchange(a, '{"type": "PING", "id": 7}', "PONG")
            assert numeric["id"] == "7"

            added = await a.request("plugin.add", {"track_id": "t", "name": "Reverb"})
            assert added["type"] == "PLUGIN_ADD"
            pid = added["data"]["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid}
            expected = {
                "plugin.parameter": ({**base, "parameter_id": "wet_dry",
                                      "parameter_value": 0.2}, "PLUGIN_PARAMETER"),
                "plugin.parameter.batch": ({**base, "parameters": {"wet_dry": 0.3}},
                                           "PLUGIN_PARAMETER_BATCH"),
                "plugin.parameters.get": (base, "PLUGIN_PARAMETERS_GET"),
                "plugin.bypass": ({**base, "bypass": True}, "PLUGIN_BYPASS"),
                "plugin.preset": ({**base, "action": "list"}, "PLUGIN_PRESET"),
                "plugin.remove": (base, "PLUGIN_REMOVE"),
            }
            for alias, (data, canonical) in expected.items():
                reply = await a.request(alias, data, id=f"alias-{alias}")
                assert reply["type"] == canonical and reply["id"] == f"alias-{alias}"

    run(scenario())


def test_broadcasts_carry_the_changer_and_never_reach_the_changer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob", "carol") as \
                (a, b, c):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            await b.set_parameter("t", pid, "wet_dry", 0.9)
            await c.set_bypass("t", pid, True)
            for client in (a, b, c):
                await settle(client)
            for client, me in ((a, "alice"), (b, "bob"), (c, "carol")):
                for message in client.received():
                    check_envelope(message)
                    assert message["id"].startswith("bcast_")
                    assert message["user_id"] != me  # nothing of my own comes back
                    if message["type"] == "PLUGIN_STATE_UPDATE":
                        assert message["data"]["changed_by"] == message["user_id"]
            by_type = {(m["type"], m["user_id"]) for m in a.received()}
            assert ("PLUGIN_PARAMETER", "bob") in by_type
            assert ("PLUGIN_BYPASS", "carol") in by_type

    run(scenario())


# == 3. errors ============================================================================

def test_error_codes_and_details(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.vst3"
    garbage.write_bytes(b"\x7fELF definitely not a plugin")

    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            pid = (await a.add_plugin("t", "Reverb", plugin_id="rev"))["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid}

            async def still_alive() -> None:
                assert (await a.ping())["type"] == "PONG"

            # INVALID_MESSAGE: not JSON / NaN tokens -> id null; not an object; fields
            for text in ("this is not json", '{"type": "PING", "id": "x", "data": NaN}',
                         ('{"id": "y", "type": "PLUGIN_PARAMETER", "data": {"track_id": "t", '
                          '"plugin_id": "rev", "parameter_id": "wet_dry", '
                          '"parameter_value": Infinity}}')):
                error = await raw_exchange(a, text)
                check_envelope(error)
                assert error["id"] is None and error["data"]["code"] == "INVALID_MESSAGE"
                assert error["data"]["details"]["reason"].startswith("not valid JSON")
                assert isinstance(error["data"]["error"], str)
                await still_alive()
            error = await raw_exchange(a, "[1, 2, 3]")
            assert error["data"]["details"] == {"reason": "a message must be a JSON object"}
            err = await error_of(a.request("PLUGIN_PARAMETER", {**base, "parameter_id": "x"},
                                           id="m-1"))
            assert err.code == "INVALID_MESSAGE" and err.message["id"] == "m-1"
            assert err.details == {"field": "parameter_value",
                                   "reason": "required field missing"}
            err = await error_of(a.request("PLUGIN_ADD", {"track_id": 7, "name": "Reverb"}))
            assert err.details["field"] == "track_id"
            err = await error_of(a.request("PLUGIN_BYPASS", {**base, "bypass": "yes"}))
            assert err.details["field"] == "bypass"
            err = await error_of(a.add_plugin("t", "Reverb", plugin_id="rev"))
            assert err.code == "INVALID_MESSAGE"
            assert err.details == {"field": "plugin_id", "reason": "already exists"}
            await still_alive()

            # UNKNOWN_MESSAGE_TYPE
            err = await error_of(a.request("PLUGIN_EXPLODE", {}))
            assert err.code == "UNKNOWN_MESSAGE_TYPE"
            assert err.details == {"type": "PLUGIN_EXPLODE"}

            # TRACK_NOT_FOUND / PLUGIN_NOT_FOUND
            err = await error_of(a.set_parameter("nowhere", pid, "wet_dry", 0.1))
            assert err.code == "TRACK_NOT_FOUND" and err.details == {"track_id": "nowhere"}
            err = await error_of(a.set_parameter("t", "ghost", "wet_dry", 0.1))
            assert err.code == "PLUGIN_NOT_FOUND"
            assert err.details == {"plugin_id": "ghost", "track_id": "t"}
            await a.add_plugin("t2", "Utility", plugin_id="util")
            err = await error_of(a.get_parameters("t2", "rev"))  # exists, but elsewhere
            assert err.code == "PLUGIN_NOT_FOUND"
            assert err.details == {"plugin_id": "rev", "track_id": "t2"}

            # INVALID_PARAMETER: unknown id, out of range, huge, wrong type
            for parameter_id, value, needle in (
                    ("loudness", 0.5, "unknown parameter"), ("wet_dry", 1.5, "out of range"),
                    ("wet_dry", 1e308, "out of range"), ("wet_dry", -1e308, "out of range"),
                    ("wet_dry", "loud", "expected a number"), ("wet_dry", True, "boolean"),
                    ("wet_dry", None, "expected a number"), ("wet_dry", [0.5], "expected")):
                err = await error_of(a.set_parameter("t", pid, parameter_id, value))
                assert err.code == "INVALID_PARAMETER", (parameter_id, value)
                assert err.details["parameter_id"] == parameter_id
                assert err.details["parameter_value"] == (
                    value if not isinstance(value, list) else repr(value))
                assert needle in err.details["validation_error"]
            # a number beyond double range cannot even be parsed: INVALID_MESSAGE
            error = await raw_exchange(a, json.dumps({"id": "big", "type": "PLUGIN_PARAMETER",
                                                      "data": {**base, "parameter_id": "wet_dry",
                                                               "parameter_value": 1}})
                                       .replace(": 1}", ": 1e999}"))
            assert error["data"]["code"] == "INVALID_MESSAGE"
            assert (await a.get_parameters("t", pid))["parameters"]["wet_dry"] == \
                pytest.approx(0.3)
            await still_alive()

            # PLUGIN_ADD_FAILED: unknown built-in; existing garbage file
            err = await error_of(a.add_plugin("t", "Hyperverb 9000"))
            assert err.code == "PLUGIN_ADD_FAILED"
            assert err.details["name"] == "Hyperverb 9000" and err.details["plugin_path"] is None
            assert "built-ins" in err.details["reason"]
            err = await error_of(a.add_plugin("t", "Reverb", str(garbage)))
            assert err.code == "PLUGIN_ADD_FAILED"
            assert err.details["plugin_path"] == str(garbage) and err.details["reason"]
            err = await error_of(a.add_plugin("t", "Mystery", "/no/such/plugin.vst3"))
            assert err.code == "PLUGIN_ADD_FAILED"
            assert err.details["reason"] == "plugin file not found"
            assert [p["plugin_id"] for p in (await a.session_state())["tracks"]["t"]] == ["rev"]

            # PRESET_LOAD_FAILED
            err = await error_of(a.preset("t", pid, "load", "nope"))
            assert err.code == "PRESET_LOAD_FAILED"
            assert set(err.details) == {"plugin_id", "preset_error"}
            await still_alive()

    run(scenario())


def test_rate_limits(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, messages_per_second=1000, parameter_changes_per_second=3,
                           plugin_ops_per_second=2) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await b.add_plugin("t", "Reverb"))["plugin_id"]  # bob's budget, warms up
            other = (await b.add_plugin("t", "Utility"))["plugin_id"]
            # parameter changes per plugin: a batch of 4 > 3 can never pass
            err = await error_of(a.set_parameters("t", pid, {
                "wet_dry": 0.1, "room_size": 0.1, "damping": 0.1, "pre_delay": 1}))
            assert err.code == "RATE_LIMITED"
            assert err.details["limit"] == "parameter_changes_per_second"
            assert err.details["retry_after"] > 0
            results = []
            for i in range(6):
                try:
                    await a.set_parameter("t", pid, "wet_dry", i / 10)
                    results.append(i / 10)
                except ClientError as exc:
                    assert exc.code == "RATE_LIMITED"
                    assert exc.details["limit"] == "parameter_changes_per_second"
                    results.append(None)
            assert None in results
            applied = [v for v in results if v is not None]
            got = await b.get_parameters("t", pid)
            assert got["parameters"]["wet_dry"] == applied[-1]  # refused ones not applied
            assert got["parameters"]["room_size"] == 0.5  # the refused batch: nothing
            # another plugin has its own budget
            assert (await a.set_parameter("t", other, "gain", -1))["success"] is True

            # plugin add/remove per second
            first = await a.add_plugin("t", "Reverb")
            second = await a.add_plugin("t", "Utility")
            err = await error_of(a.add_plugin("t", "Reverb"))
            assert err.code == "RATE_LIMITED" and err.details["limit"] == \
                "plugin_ops_per_second"
            assert 0 < err.details["retry_after"] <= 1
            err = await error_of(a.remove_plugin("t", first["plugin_id"]))
            assert err.code == "RATE_LIMITED"
            tracks = (await b.session_state())["tracks"]["t"]
            assert [p["plugin_id"] for p in tracks] == [pid, other, first["plugin_id"],
                                                        second["plugin_id"]]
            assert (await a.ping())["type"] == "PONG"

        async with serving(tmp_path / "2", messages_per_second=5) as server, \
                clients(server, "alice") as (a,):
            for i in range(12):
                await a.send_raw(json.dumps({"id": f"r{i}", "type": "PING"}))
            await wait_until(lambda: len(a.received()) >= 12)
            replies = {m["id"]: m for m in a.received()}
            limited = [m for m in replies.values() if m["type"] == "ERROR"]
            assert limited and all(m["data"]["code"] == "RATE_LIMITED" for m in limited)
            assert all(m["data"]["details"]["limit"] == "messages_per_second" and
                       m["data"]["details"]["retry_after"] > 0 for m in limited)
            assert len([m for m in replies.values() if m["type"] == "PONG"]) <= 5

    run(scenario())


def test_frame_too_big_closes_only_that_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, max_frame=4096) as server, \
                clients(server, "alice", "bob") as (a, b):
            async with ws_connect(server.url, proxy=None) as raw:
                await raw.send(json.dumps({"type": "AUTH", "data": {
                    "token": server.token("mallory"), "session_id": "jam"}}))
                assert json.loads(await raw.recv())["type"] == "AUTH_SUCCESS"
                await raw.send(json.dumps({"type": "PING", "data": {"pad": "x" * 5000}}))
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await raw.recv()
                assert info.value.rcvd is not None and info.value.rcvd.code == 1009
            left = await a.wait_for("PRESENCE", lambda m: m["data"]["event"] == "left")
            assert left["data"]["user_id"] == "mallory"
            await a.send_raw(json.dumps({"type": "PING", "data": {"pad": "y" * 3000}}))
            assert (await a.wait_for("PONG"))["type"] == "PONG"
            assert (await b.add_plugin("t", "Reverb"))["success"] is True

    run(scenario())


def test_relayed_text_goes_out_as_utf8(tmp_path: Path) -> None:
    """Non-ASCII text is relayed as UTF-8 (3 bytes for "✓"), not as 6-byte escapes that made
    relays up to 6x longer than what their sender sent."""
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b), \
                ws_connect(server.url, proxy=None) as raw:  # websockets' default limits
            await raw.send(json.dumps({"type": "AUTH", "data": {
                "token": server.token("carol"), "session_id": "jam"}}))
            assert json.loads(await raw.recv())["type"] == "AUTH_SUCCESS"
            label = "\u2713" * 300  # 900 bytes as UTF-8, under the cursor's 1024
            await a.send_raw(json.dumps({"type": "USER_CURSOR_UPDATE", "data": {
                "position": {"label": label}}}, ensure_ascii=False))  # as browsers send
            relay = await b.wait_for("USER_CURSOR_UPDATE")
            assert relay["data"]["position"]["label"] == label
            while True:
                frame = await asyncio.wait_for(raw.recv(), 10)
                if '"USER_CURSOR_UPDATE"' in frame:
                    break
            assert label in frame and "\\u2713" not in frame  # the text itself
            assert json.loads(frame)["data"]["position"]["label"] == label

    run(scenario())


def test_the_python_client_sends_utf8_and_escapes_only_what_is_not_unicode(
        tmp_path: Path) -> None:
    from pluginlab.client import _dumps

    assert _dumps({"label": "\u2713"}) == '{"label": "\u2713"}'  # as browsers send it
    assert _dumps({"bad": "a\ud800"}) == '{"bad": "a\\ud800"}'  # not Unicode: escaped

    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice", "bob") as (a, b):
            await a.cursor(position={"label": "\u2713" * 300})
            relay = await b.wait_for("USER_CURSOR_UPDATE")
            assert relay["data"]["position"]["label"] == "\u2713" * 300
            err = await error_of(a.add_plugin("t\ud800", "Reverb"))
            assert err.code == "INVALID_MESSAGE" and "surrogate" in err.message["data"]["error"]
            assert (await a.request("PING", {}))["type"] == "PONG"

    run(scenario())


def test_plugins_in_memory_are_capped_per_session_and_per_server(tmp_path: Path) -> None:
    """Each plugin costs memory (a built-in ~2.4 MiB): one client adding at the plugin-ops
    limit could fill the RAM. Racing adds are counted one by one."""
    async def scenario() -> None:
        async with serving(tmp_path, max_plugins_per_session=3, max_plugins=5,
                           rate_limits=False) as server, \
                clients(server, "alice") as (a,), \
                clients(server, "bob", session="other") as (b,):
            results = await asyncio.gather(*(a.add_plugin("t", "Utility") for _ in range(5)),
                                           return_exceptions=True)
            added = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, ClientError)]
            assert len(added) == 3 and len(refused) == 2
            assert refused[0].code == "PLUGIN_ADD_FAILED"
            assert "max_plugins_per_session" in refused[0].details["reason"]
            await b.add_plugin("t", "Utility")
            await b.add_plugin("t", "Utility")
            err = await error_of(b.add_plugin("t", "Utility"))  # 5 in the server
            assert "max_plugins" in err.details["reason"]
            await a.remove_plugin("t", added[0]["plugin_id"])  # room again
            assert (await b.add_plugin("t", "Utility"))["success"]

    run(scenario())


def test_ids_and_cursors_are_bounded(tmp_path: Path) -> None:
    """Ids are copied into every reply, broadcast, snapshot and DAID; a cursor goes to
    everyone: long ones are INVALID_MESSAGE, so no member can bloat what others receive."""
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            long = "x" * 129
            for call, field in ((a.add_plugin(long, "Reverb"), "track_id"),
                                (a.add_plugin("t", "Reverb", plugin_id=long), "plugin_id"),
                                (a.add_plugin("t", long), "name"),
                                (a.add_plugin("t", "Reverb", "/" + "p" * 4096), "plugin_path")):
                err = await error_of(call)
                assert (err.code, err.details["field"]) == ("INVALID_MESSAGE", field)
                assert "longer than" in err.details["reason"]
            ok = await a.add_plugin("t" * 128, "Reverb", plugin_id="p" * 128)  # at the limit
            assert ok["success"]
            await a.send_raw(json.dumps({"id": "big", "type": "USER_CURSOR_UPDATE", "data": {
                "position": {"x": "y" * 1100}}}))
            refused = await a.wait_for("ERROR", lambda m: m["id"] == "big")
            assert refused["data"]["details"]["field"] == "position"
            with pytest.raises(ClientError) as info:
                await a.authenticate(server.token("alice"), session_id="s" * 129)
            assert info.value.details["field"] == "session_id"
            assert (await a.ping())["type"] == "PONG"

    run(scenario())


def test_a_lone_surrogate_in_outgoing_text_is_sent_as_its_escape() -> None:
    """Strings from the file system can hold lone surrogates (a file name that is not
    UTF-8); the frame must still be valid UTF-8 and decode to the same JSON."""
    from pluginlab.messages import dumps
    from pluginlab.server import _text_frame

    text = dumps({"preset": "bad\udc80name", "ok": "\u00e9"})
    frame = _text_frame(text)
    payload = frame[2:]
    assert payload == '{"preset":"bad\\udc80name","ok":"\u00e9"}'.encode()
    assert json.loads(payload.decode("utf-8")) == {"preset": "bad\udc80name", "ok": "\u00e9"}


@pytest.mark.parametrize("fsync", [False, True])
def test_stopping_applies_no_frame_it_cannot_answer(tmp_path: Path, fsync: bool) -> None:
    """A client pipelines 3000 changes and the server stops meanwhile: the changes in the log
    are the acknowledged ones (plus at most those in flight), not every buffered frame."""
    async def scenario() -> None:
        server = await PluginServer(make_config(tmp_path, fsync=fsync, rate_limits=False)).start()
        async with ws_connect(server.url, proxy=None) as ws:
            await ws.send(json.dumps({"type": "AUTH", "data": {
                "token": server.token("alice"), "session_id": "jam"}}))
            assert json.loads(await ws.recv())["type"] == "AUTH_SUCCESS"
            await ws.send(json.dumps({"id": "add", "type": "PLUGIN_ADD", "data": {
                "track_id": "t", "name": "Reverb", "plugin_id": "rev"}}))
            assert json.loads(await ws.recv())["data"]["success"] is True
            frames = [json.dumps({"id": f"m{i}", "type": "PLUGIN_PARAMETER", "data": {
                "track_id": "t", "plugin_id": "rev", "parameter_id": "wet_dry",
                "parameter_value": (i % 100) / 100}}) for i in range(3000)]
            halt = asyncio.Event()

            async def pipeline() -> None:  # without waiting for replies: they queue up
                with contextlib.suppress(ConnectionClosed):
                    for frame in frames:
                        if halt.is_set():  # what was sent so far is still buffered there
                            return
                        await ws.send(frame)

            sender = asyncio.create_task(pipeline())
            acked = 0
            with contextlib.suppress(ConnectionClosed):
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("type") == "PLUGIN_PARAMETER":
                        acked += 1
                        if acked == 20:
                            halt.set()
                            stopping = asyncio.create_task(server.stop())
            await stopping
            await sender
        with ProvenanceReader(make_config(tmp_path).db or "") as log:
            recorded = len(log.events("jam", action="parameter_update"))
        assert acked >= 20 and recorded < 3000
        assert recorded == acked  # those in flight were answered before the close

    run(scenario())


@pytest.mark.parametrize(("user", "session"), [("bob", "jam"), ("alice", "other")])
def test_a_reauth_waits_for_the_requests_before_it(tmp_path: Path, user: str,
                                                  session: str) -> None:
    """fsync: alice pipelines 100 changes, then re-AUTHs (as bob, or into another session).
    Her changes are answered and broadcast as hers, in her session, and the others hear
    the last one even though she has left."""
    async def scenario() -> None:
        async with serving(tmp_path, fsync=True, rate_limits=False) as server, \
                clients(server, "owner") as (owner,):
            pid = (await owner.add_plugin("t", "Reverb"))["plugin_id"]
            async with ws_connect(server.url, proxy=None) as raw:
                await raw.send(json.dumps({"type": "AUTH", "data": {
                    "token": server.token("alice"), "session_id": "jam"}}))
                assert json.loads(await raw.recv())["type"] == "AUTH_SUCCESS"
                for n in range(1, 101):
                    await raw.send(json.dumps({"id": f"c{n}", "type": "PLUGIN_PARAMETER",
                                               "data": {"track_id": "t", "plugin_id": pid,
                                                        "parameter_id": "wet_dry",
                                                        "parameter_value": n / 100}}))
                await raw.send(json.dumps({"id": "again", "type": "AUTH", "data": {
                    "token": server.token(user), "session_id": session}}))
                replies: dict[str, Any] = {}
                while "again" not in replies:
                    message = json.loads(await raw.recv())
                    replies[message["id"]] = message
            assert replies["again"]["type"] == "AUTH_SUCCESS"
            assert {(replies[f"c{n}"]["user_id"], replies[f"c{n}"]["session_id"])
                    for n in range(1, 101)} == {("alice", "jam")}
            last = await owner.wait_for("PLUGIN_STATE_UPDATE", lambda m: (
                m["data"].get("parameters") or {}).get("wet_dry") == 1.0)
            assert last["data"]["changed_by"] == "alice" and last["user_id"] == "alice"
            assert {m["data"]["changed_by"] for m in owner.received("PLUGIN_STATE_UPDATE")
                    if m["data"]["state"] == "updated"} <= {"alice"}

    run(scenario())


def test_a_pipelining_client_can_add_a_plugin_and_change_it_at_once(tmp_path: Path) -> None:
    """fsync: the next frame starts while the add waits for its sync; the adder's own frames
    may use the plugin (others still cannot), and the log keeps the connection's order."""
    async def scenario() -> None:
        async with serving(tmp_path, fsync=True, rate_limits=False) as server:
            async with ws_connect(server.url, proxy=None) as raw:
                await raw.send(json.dumps({"type": "AUTH", "data": {
                    "token": server.token("alice"), "session_id": "jam"}}))
                assert json.loads(await raw.recv())["type"] == "AUTH_SUCCESS"
                base = {"track_id": "t", "plugin_id": "mine"}
                frames = [("add", "PLUGIN_ADD", {**base, "name": "Reverb"}),
                          ("set", "PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry",
                                                       "parameter_value": 0.9}),
                          ("off", "PLUGIN_BYPASS", {**base, "bypass": True})]
                for msg_id, msg_type, data in frames:  # without waiting for replies
                    await raw.send(json.dumps({"id": msg_id, "type": msg_type, "data": data}))
                replies = [json.loads(await raw.recv()) for _ in frames]
            assert [(r["id"], r["data"].get("success")) for r in replies] == [
                ("add", True), ("set", True), ("off", True)]
            assert server.store is not None
            actions = [e.action for e in server.store.events("jam") if e.action != "auth"]
            assert actions == ["plugin_add", "parameter_update", "plugin_bypass"]

    run(scenario())


# == 5. flood =============================================================================

def test_flood_from_one_client_does_not_starve_another(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "flooder", "calm") as (a, b):
            pid = (await b.add_plugin("t", "Reverb"))["plugin_id"]

            async def flood() -> None:
                for i in range(500):
                    kind = i % 3
                    if kind == 0:
                        text = json.dumps({"id": f"f{i}", "type": "PING"})
                    elif kind == 1:
                        text = json.dumps({"id": f"f{i}", "type": "PLUGIN_PARAMETER", "data": {
                            "track_id": "t", "plugin_id": pid, "parameter_id": "room_size",
                            "parameter_value": (i % 100) / 100}})
                    else:
                        text = f"garbage {i}"
                    await a.send_raw(text)

            async def calm() -> None:
                await asyncio.sleep(0)
                assert (await b.ping())["type"] == "PONG"
                done = await b.set_parameter("t", pid, "wet_dry", 0.66)
                assert done["success"] is True
                assert (await b.ping())["type"] == "PONG"

            await asyncio.gather(flood(), calm())
            answered = lambda: [m for m in a.received()
                                if m["id"] is None or str(m["id"]).startswith("f")]
            await wait_until(lambda: len(answered()) >= 500, timeout=30)
            errors = [m["data"] for m in answered() if m["type"] == "ERROR"]
            limited = [e for e in errors if e["code"] == "RATE_LIMITED"]
            assert limited, "the flood must hit a limit"
            for error in limited:
                assert error["details"]["retry_after"] > 0
                assert error["details"]["limit"] in ("messages_per_second",
                                                     "parameter_changes_per_second")
            assert {e["code"] for e in errors} <= {"RATE_LIMITED", "INVALID_MESSAGE"}
            got = await b.get_parameters("t", pid)
            assert got["parameters"]["wet_dry"] == 0.66  # the calm client's change applied
            await asyncio.sleep(1.1)  # the flooder's window has passed: it is served again
            assert (await a.ping())["type"] == "PONG"

    run(scenario())


@pytest.mark.parametrize(("tracking", "fsync"), [(True, False), (False, False), (True, True)],
                         ids=["daid_on", "daid_off", "daid_fsync_pipelined"])
def test_frames_sent_without_waiting_are_answered_in_request_order(
        tmp_path: Path, tracking: bool, fsync: bool) -> None:
    """Handled in turn (replies never wait for the store) or pipelined (fsync: they do), with
    replies to a burst of frames sharing writes: one reply per frame, in request order, errors
    and slow requests included; the changes are applied (and recorded) in request order."""
    async def scenario() -> None:
        async with serving(tmp_path, enable_daid_tracking=tracking, rate_limits=False,
                           fsync=fsync) as server, \
                clients(server, "sender", "other") as (a, b):
            assert server.studio.replies_wait is fsync
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            target = {"track_id": "t", "plugin_id": pid}
            frames: list[str] = []
            expected: list[tuple[str, str]] = []  # (id, reply type)
            values: list[float] = []
            reads: list[float] = []  # what each PLUGIN_PARAMETERS_GET must see
            for i in range(240):
                msg_id, kind = f"q{i}", i % 6
                if kind in (0, 3):
                    values.append(round(0.001 * i, 3))
                    body = {"type": "PLUGIN_PARAMETER", "data": {
                        **target, "parameter_id": "wet_dry", "parameter_value": values[-1]}}
                    reply = "PLUGIN_PARAMETER"
                elif kind == 1:
                    body, reply = {"type": "PING"}, "PONG"
                elif kind == 2:  # refused by the engine
                    body = {"type": "PLUGIN_PARAMETER", "data": {
                        **target, "parameter_id": "wet_dry", "parameter_value": 7.5}}
                    reply = "ERROR"
                elif kind == 4:  # runs in a worker thread: the request really waits
                    body, reply = {"type": "PLUGIN_PARAMETERS_GET", "data": target}, \
                        "PLUGIN_PARAMETERS_GET"
                    reads.append(values[-1])
                else:
                    body, reply = {"type": "NOT_A_TYPE"}, "ERROR"
                frames.append(json.dumps({"id": msg_id, **body}))
                expected.append((msg_id, reply))
            for text in frames:
                await a.send_raw(text)

            def replies() -> list[dict[str, Any]]:
                return [m for m in a.received() if str(m.get("id")).startswith("q")]

            await wait_until(lambda: len(replies()) >= len(frames), timeout=30)
            assert [(m["id"], m["type"]) for m in replies()] == expected
            seen = [m["data"]["parameters"]["wet_dry"]
                    for m in replies() if m["type"] == "PLUGIN_PARAMETERS_GET"]
            assert seen == reads  # each read saw every earlier change and no later one
            assert (await b.get_parameters("t", pid))["parameters"]["wet_dry"] == values[-1]
            assert server.store is not None
            recorded = [e.details["value"] for e in server.store.events(
                "jam", action="parameter_update")]
            assert recorded == (values if tracking else [])

    run(scenario())


def test_a_client_whose_frames_are_all_buffered_lets_the_others_run(tmp_path: Path) -> None:
    """When replies do not wait for the store, a connection's frames are handled one after
    another on its own task; when they are all there already, the loop still gets a turn
    every BURST frames."""
    from pluginlab.server import BURST, PluginServer

    class Buffered:
        """A connection whose frames have all arrived: iterating it never waits."""

        def __init__(self, frames: list[str]) -> None:
            self.frames = frames
            self.transport = self  # nothing is ever queued to it (replies go to a list)

        @staticmethod
        def get_write_buffer_size() -> int:
            return 0

        async def __aiter__(self) -> Any:
            for text in self.frames:
                yield text

    async def scenario() -> None:
        server = PluginServer(make_config(tmp_path, enable_daid_tracking=False))
        assert not server.studio.tracking
        replies: list[dict[str, Any]] = []
        conn = server.studio.connect(replies.append)
        frames = [json.dumps({"id": f"p{i}", "type": "PING"}) for i in range(10 * BURST)]
        turns = 0

        async def other_connection() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_connection())
        await asyncio.sleep(0)
        await server._serve_in_turn(Buffered(frames), conn)  # type: ignore[arg-type]
        other.cancel()
        assert [r["id"] for r in replies] == [f"p{i}" for i in range(len(frames))]
        assert turns >= len(frames) // BURST
        await server.stop()

    run(scenario())


# == 6. live fuzz =========================================================================

FUZZ_TYPES = ["AUTH", "PLUGIN_ADD", "PLUGIN_REMOVE", "PLUGIN_PARAMETER",
              "PLUGIN_PARAMETER_BATCH", "PLUGIN_BYPASS", "PLUGIN_PRESET",
              "PLUGIN_PARAMETERS_GET", "SESSION_STATE_GET", "USER_CURSOR_UPDATE", "PING",
              "ADD_PLUGIN", "UPDATE_PARAMETER", "plugin.add", "plugin.parameter", "heartbeat",
              "plugin.preset", "NOPE", "", "ping"]
FUZZ_FIELDS = ["track_id", "plugin_id", "name", "plugin_path", "parameter_id",
               "parameter_value", "parameters", "bypass", "bypassed", "action", "preset_name",
               "preset_data", "token", "session_id", "position", "index", "trackId",
               "pluginId", "pluginName", "pluginPath", "parameterId", "value", "path"]
REPLY_TYPES = {"AUTH_SUCCESS", "PLUGIN_ADD", "PLUGIN_REMOVE", "PLUGIN_PARAMETER",
               "PLUGIN_PARAMETER_BATCH", "PLUGIN_BYPASS", "PLUGIN_PRESET",
               "PLUGIN_PARAMETERS_GET", "SESSION_STATE_GET", "PONG", "heartbeat_response",
               "PLUGIN_ADDED", "PARAMETER_UPDATED"}


def _fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(14 if depth < 3 else 10)
    if choice == 0:
        return rng.choice(["t", "rev", "wet_dry", "Reverb", "Utility", "gain", "load", "list",
                           "save", "delete", "Large Hall", "/path/to/x.vst3", "", " "])
    if choice == 1:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(12)))
    if choice == 2:
        return rng.choice([0, 1, -1, 0.5, 1e308, -1e308, 5e-324, 2 ** 63, 10 ** 30, -(10 ** 20)])
    if choice == 3:
        return rng.uniform(-100, 100)
    if choice == 4:
        return rng.choice([True, False])
    if choice == 5:
        return None
    if choice in (6, 7, 8, 9):
        return rng.choice(["wet_dry", "room_size", "gain", "time", "mix", "rev", "t"])
    if choice in (10, 11):
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FUZZ_FIELDS + ["x", "parameter_id"]): _fuzz_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _fuzz_template(rng: random.Random) -> dict[str, Any]:
    """A well-formed request of a random type, so that mutations reach the handlers."""
    target = {"track_id": rng.choice(["t", "t", "t2"]), "plugin_id": rng.choice(
        ["rev", "rev", "plugin_2", "ghost"])}
    number = rng.choice([0.5, 0.1, 1.5, -1, 1e308, 250, 10 ** 20])
    msg_type, data = rng.choice([
        ("PLUGIN_ADD", {"track_id": rng.choice(["t", "t2"]), "name": rng.choice(
            ["Reverb", "Utility", "Delay", "Bogus"]), "plugin_path": rng.choice(
            [None, "/path/to/reverb.vst3", "Reverb", "/no/such.so"]), "plugin_id": ""}),
        ("PLUGIN_REMOVE", dict(target)),
        ("PLUGIN_PARAMETER", {**target, "parameter_id": rng.choice(["wet_dry", "gain", "x"]),
                              "parameter_value": number}),
        ("plugin.parameter", {**target, "parameter_id": "wet_dry", "parameter_value": number}),
        ("PLUGIN_PARAMETER_BATCH", {**target, "parameters": rng.choice([
            {"wet_dry": number, "room_size": 0.2},
            [{"parameter_id": "damping", "parameter_value": number}]])}),
        ("PLUGIN_BYPASS", {**target, "bypass": rng.choice([True, False])}),
        ("PLUGIN_PRESET", {**target, "action": rng.choice(["load", "save", "list", "delete"]),
                           "preset_name": rng.choice(["Large Hall", "fz", "nope"])}),
        ("PLUGIN_PARAMETERS_GET", dict(target)),
        ("SESSION_STATE_GET", {}),
        ("USER_CURSOR_UPDATE", {**target, "position": {"x": number}}),
        ("PING", {}),
        ("heartbeat", {}),
        ("ADD_PLUGIN", {"trackId": "t", "pluginName": "Utility", "pluginPath": None}),
        ("UPDATE_PARAMETER", {"pluginId": target["plugin_id"], "parameterId": "wet_dry",
                              "value": number}),
        ("AUTH", {"token": rng.choice(["", "x.y.z", None])}),
    ])
    return {"type": msg_type, "data": data}


def _fuzz_frame(rng: random.Random, i: int) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice(["", "{", "nul", "[1,2", '{"type": NaN}', "\u00ff\u0000",
                           '{"type": "PING", "data": ' + "[" * 300 + "]" * 300 + "}",
                           '{"type":"PLUGIN_PARAMETER","data":{"parameter_value":1e400}}',
                           json.dumps(_fuzz_value(rng))])
    if kind <= 6:  # a valid request with 0-2 fields changed or removed
        body = _fuzz_template(rng)
        for _ in range(rng.randrange(3)):
            fields = list(body["data"]) or ["track_id"]
            name = rng.choice(fields + FUZZ_FIELDS)
            if rng.random() < 0.3:
                body["data"].pop(name, None)
            else:
                body["data"][name] = _fuzz_value(rng)
        body["id"] = f"z{i}"
    else:  # random fields
        body = {"type": rng.choice(FUZZ_TYPES)}
        if rng.random() < 0.8:
            body["id"] = rng.choice([f"z{i}", i, None, "", True, 1.5, [i]])
        if rng.random() < 0.9:
            data = {}
            for name in rng.sample(FUZZ_FIELDS, rng.randrange(7)):
                data[name] = _fuzz_value(rng)
            body["data"] = data if rng.random() < 0.95 else _fuzz_value(rng)
    if rng.random() < 0.2:
        body["user_id"], body["session_id"] = "mallory", "elsewhere"
    return json.dumps(body)


def test_live_fuzz_every_frame_gets_a_documented_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        # AUTH frames with bad tokens are part of the fuzz: do not let them block 127.0.0.1
        async with serving(tmp_path, rate_limits=False, auth_max_failures=10**6) as server, \
                clients(server, "fuzzer", "watcher") as (a, w):
            await a.add_plugin("t", "Reverb", plugin_id="rev")
            rng = random.Random(20261125)
            await settle(a)
            a.drain()  # the watcher's PRESENCE
            for i in range(200):
                text = _fuzz_frame(rng, i)
                await a.send_raw(text)
                await a.request("PING", id=f"sync{i}")  # everything before it has arrived
                answers = a.drain()
                assert len(answers) <= 1, (text, answers)
                for answer in answers:
                    check_envelope(answer)
                    if answer["type"] == "ERROR":
                        assert answer["data"]["code"] in DOCUMENTED_CODES, (text, answer)
                        assert isinstance(answer["data"]["error"], str)
                    else:
                        assert answer["type"] in REPLY_TYPES, (text, answer)
                    assert answer["user_id"] == "fuzzer"
                if not answers:  # only cursor updates are silent
                    assert json.loads(text)["type"] == "USER_CURSOR_UPDATE", text
            # still serving, for the fuzzer and for everyone else
            assert (await a.ping())["type"] == "PONG"
            assert (await w.session_state())["session_id"] == "jam"
            async with AsyncExitStack() as stack:
                late = await connect(server, "late", "jam", stack=stack)
                assert (await late.ping())["type"] == "PONG"
            for message in w.drain():
                check_envelope(message)
                assert message["user_id"] in ("fuzzer", "late")  # never "mallory"

    run(scenario(), timeout=90)


# == 7. debounce ==========================================================================

def test_debounce_bursts_but_always_deliver_the_last_value(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, rate_limits=False) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            values = [round((i + 1) / 1000, 3) for i in range(500)]
            for i, value in enumerate(values):
                await a.send_raw(json.dumps({"id": f"d{i}", "type": "PLUGIN_PARAMETER",
                                             "data": {"track_id": "t", "plugin_id": pid,
                                                      "parameter_id": "wet_dry",
                                                      "parameter_value": value}}))
            mine = lambda: [m for m in a.received("PLUGIN_PARAMETER")
                            if m["id"].startswith("d")]
            await wait_until(lambda: len(mine()) >= 500, timeout=30)
            assert [m["data"]["parameter_value"] for m in mine()] == values
            assert all(m["data"]["success"] for m in mine())
            final = values[-1]
            await b.wait_for("PLUGIN_PARAMETER",
                             lambda m: m["data"]["parameter_value"] == final)
            await asyncio.sleep(0.3)  # several windows: nothing more may come
            await settle(b)
            relays = [m["data"]["parameter_value"] for m in b.received("PLUGIN_PARAMETER")]
            updates = [m["data"]["parameters"]["wet_dry"]
                       for m in b.received("PLUGIN_STATE_UPDATE")
                       if m["data"]["state"] == "updated"]
            # (wait_for consumed the final relay; count it back in)
            relays.append(final)
            assert len(relays) < 100 and len(updates) < 100
            assert relays[0] == values[0]  # leading edge
            assert relays[-1] == final and updates[-1] == final  # trailing edge
            assert relays == sorted(relays)  # in order, coalesced
            assert not [m for m in a.received() if m["id"].startswith("bcast_")
                        and m["type"] != "PRESENCE"]
            assert (await b.get_parameters("t", pid))["parameters"]["wet_dry"] == final

    run(scenario())


def test_a_single_change_reaches_others_on_the_leading_edge(tmp_path: Path) -> None:
    """With a 30 s window, only the leading edge can deliver within the test's timeouts."""

    async def scenario() -> None:
        async with serving(tmp_path, debounce_window=30.0) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            await a.set_parameter("t", pid, "wet_dry", 0.42)
            relay = await b.wait_for("PLUGIN_PARAMETER", timeout=10)
            assert relay["data"]["parameter_value"] == 0.42
            update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                      lambda m: m["data"]["state"] == "updated", timeout=10)
            assert update["data"]["parameters"] == {"wet_dry": 0.42}
            # a different parameter has its own window
            await a.set_parameter("t", pid, "room_size", 0.11)
            relay = await b.wait_for("PLUGIN_PARAMETER", timeout=10)
            assert relay["data"]["parameter_id"] == "room_size"

    run(scenario())


# == 8. durability ========================================================================

def test_every_change_has_a_daid_and_is_stored(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server, clients(server, "alice") as (a,):
            replies = [await a.add_plugin("t", "Reverb")]
            pid = replies[0]["plugin_id"]
            replies.append(await a.set_parameter("t", pid, "wet_dry", 0.5))
            replies.append(await a.set_parameters("t", pid, {"room_size": 0.9}))
            replies.append(await a.set_bypass("t", pid, True))
            replies.append(await a.preset("t", pid, "load", "Large Hall"))
            replies.append(await a.preset("t", pid, "save", "Mine"))
            replies.append(await a.remove_plugin("t", pid))
            daids = [r["daid"] for r in replies]
            assert all(isinstance(d, str) and len(d.split(":")) == 7 for d in daids)
            assert len(set(daids)) == len(daids)
            assert server.store is not None
            events = server.store.events("jam")
            stored = {e.daid: e for e in events}
            assert set(daids) <= set(stored)
            assert [e.action for e in events] == [
                "auth", "plugin_add", "parameter_update", "parameter_update", "plugin_bypass",
                "preset_load", "preset_save", "plugin_remove"]
            assert stored[daids[1]].details["value"] == 0.5
            assert stored[daids[1]].user_id == "alice"

    run(scenario())


# == 9. feature flags =====================================================================

def test_flag_new_plugin_system_off_serves_only_the_legacy_types(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, enable_new_plugin_system=False) as server, \
                clients(server, "alice") as (a,):
            err = await error_of(a.add_plugin("t", "Reverb"))
            assert err.code == "UNKNOWN_MESSAGE_TYPE" and err.details == {"type": "PLUGIN_ADD"}
            err = await error_of(a.request("plugin.add", {"track_id": "t", "name": "Reverb"}))
            assert err.code == "UNKNOWN_MESSAGE_TYPE" and err.details == {"type": "plugin.add"}
            err = await error_of(a.session_state())
            assert err.code == "UNKNOWN_MESSAGE_TYPE"
            added = await a.request("ADD_PLUGIN", {"trackId": "t", "pluginName": "Reverb",
                                                   "pluginPath": REVERB_PATH})
            assert added["type"] == "PLUGIN_ADDED" and added["success"] is True
            updated = await a.request("UPDATE_PARAMETER", {"pluginId": added["pluginId"],
                                                           "parameterId": "wet_dry",
                                                           "value": 0.4})
            assert updated["type"] == "PARAMETER_UPDATED" and updated["value"] == 0.4
            assert (await a.ping())["type"] == "PONG"

    run(scenario())


def test_flag_session_broadcasting_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, enable_session_broadcasting=False) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            await a.set_parameter("t", pid, "wet_dry", 0.9)
            await a.set_bypass("t", pid, True)
            await settle(a)
            await settle(b)
            assert b.received() == []
            assert (await b.get_parameters("t", pid))["parameters"]["wet_dry"] == 0.9

    run(scenario())


def test_flag_daid_tracking_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, enable_daid_tracking=False) as server, \
                clients(server, "alice") as (a,):
            added = await a.add_plugin("t", "Reverb")
            assert added["daid"] is None and added["success"] is True
            changed = await a.set_parameter("t", added["plugin_id"], "wet_dry", 0.1)
            assert changed["daid"] is None
            assert server.store is not None
            assert server.store.events() == []

    run(scenario())


def test_flag_parameter_batching_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, enable_parameter_batching=False) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            err = await error_of(a.set_parameters("t", pid, {"wet_dry": 0.2}))
            assert err.code == "UNKNOWN_MESSAGE_TYPE"
            err = await error_of(a.request("plugin.parameter.batch", {
                "track_id": "t", "plugin_id": pid, "parameters": {"wet_dry": 0.2}}))
            assert err.details == {"type": "plugin.parameter.batch"}
            for i in range(5):  # no debouncing either: every change is relayed
                await a.set_parameter("t", pid, "wet_dry", i / 10)
            await settle(a)
            await settle(b)
            assert [m["data"]["parameter_value"] for m in b.received("PLUGIN_PARAMETER")] == \
                [0.0, 0.1, 0.2, 0.3, 0.4]

    run(scenario())


def test_config_from_env_reads_flags_and_options() -> None:
    env = {
        "ENABLE_NEW_PLUGIN_SYSTEM": "false", "ENABLE_SESSION_BROADCASTING": "0",
        "ENABLE_DAID_TRACKING": "no", "ENABLE_PARAMETER_BATCHING": "off",
        "ALLOW_ANONYMOUS": "true", "PLUGINLAB_MESSAGES_PER_SECOND": "7",
        "PLUGINLAB_RATE_LIMITS": "off", "PLUGINLAB_JWT_SECRET": "s3cret",
        "PLUGINLAB_DB": "/tmp/x.sqlite", "PLUGINLAB_DEBOUNCE_WINDOW": "0.2",
        "PLUGINLAB_STRICT_PATHS": "yes", "PLUGINLAB_MAX_FRAME": "4096",
        "PLUGINLAB_PORT": "9999", "PLUGINLAB_AUTH_MAX_FAILURES": "3",
    }
    cfg = ServerConfig.from_env(env)
    assert (cfg.enable_new_plugin_system, cfg.enable_session_broadcasting,
            cfg.enable_daid_tracking, cfg.enable_parameter_batching,
            cfg.allow_anonymous) == (False, False, False, False, True)
    assert cfg.messages_per_second == 7 and cfg.rate_limits is False
    assert cfg.jwt_secret == "s3cret" and cfg.db == "/tmp/x.sqlite"
    assert cfg.debounce_window == 0.2 and cfg.strict_paths is True
    assert cfg.max_frame == 4096 and cfg.port == 9999 and cfg.auth_max_failures == 3
    assert ServerConfig.from_env({}) == ServerConfig()
    assert ServerConfig.from_env(env, port=1234, db=None).port == 1234  # overrides win
    with pytest.raises(ValueError):
        ServerConfig.from_env({"ENABLE_DAID_TRACKING": "maybe"})


# == 10. the Python door ==================================================================

def test_python_door_broadcasts_like_the_wire(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, debounce_window=0.0) as server, \
                clients(server, "alice", "bob") as (a, b):
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            await a.set_parameter("t", pid, "wet_dry", 0.25)
            wire_relay = await b.wait_for("PLUGIN_PARAMETER")
            wire_update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                           lambda m: m["data"]["state"] == "updated")

            studio = server.studio
            widget_inbox: list[dict[str, Any]] = []
            widget = studio.connect(widget_inbox.append)
            await studio.execute(widget, "AUTH", {"token": server.token("alice"),
                                                  "session_id": "jam"})
            reply = await studio.execute(widget, "PLUGIN_PARAMETER", {
                "track_id": "t", "plugin_id": pid, "parameter_id": "wet_dry",
                "parameter_value": 0.25})
            assert reply["success"] is True and reply["parameter_value"] == 0.25
            door_relay = await b.wait_for("PLUGIN_PARAMETER")
            door_update = await b.wait_for("PLUGIN_STATE_UPDATE",
                                           lambda m: m["data"]["state"] == "updated")

            def same(x: dict[str, Any], y: dict[str, Any]) -> None:
                assert x["type"] == y["type"] and x["user_id"] == y["user_id"] == "alice"
                assert x["session_id"] == y["session_id"] == "jam"
                strip = {"daid", "timestamp"}
                assert {k: v for k, v in x["data"].items() if k not in strip} == \
                    {k: v for k, v in y["data"].items() if k not in strip}
                assert set(x) == set(y)

            same(wire_relay, door_relay)
            same(wire_update, door_update)
            assert door_relay["data"]["daid"] == reply["daid"]
            assert widget_inbox == []  # nothing of its own comes back to the door
            await studio.disconnect(widget)

    run(scenario())


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_text_frames_are_the_bytes_websockets_would_send(size: int) -> None:
    """The server writes frames it builds itself; they must equal websockets' own framing
    (unmasked, final, text) at every length boundary of RFC 6455, for non-ASCII text too."""
    from websockets.frames import Frame, Opcode

    from pluginlab.server import _text_frame

    text = ("é" + "x" * size)[:size] if size else ""
    assert _text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


# -- clients that do not read --------------------------------------------------------------

async def _mute_client(server: Any) -> Any:
    """A client that never reads: a tiny socket receive buffer, and websockets stops reading
    its socket after one queued message."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    return await ws_connect(server.url, sock=sock, max_queue=1, proxy=None)


def _queued(server: Any) -> list[int]:
    """Bytes the server has queued to each open connection."""
    return [ws.transport.get_write_buffer_size() for ws in server._server.connections]


def test_a_client_that_sends_without_reading_is_slowed_not_buffered(tmp_path: Path) -> None:
    """Its replies are not queued without bound: once READ_PAUSE bytes wait for it, the
    server reads no more of its frames, so its own sends stall. Others keep working."""
    async def scenario() -> None:
        async with serving(tmp_path, rate_limits=False) as server, \
                clients(server, "alice") as (a,):
            mute = await _mute_client(server)
            frame = json.dumps({"type": "X" * 20_000})  # UNKNOWN_MESSAGE_TYPE, echo cut short
            sent = 0

            async def flood() -> None:
                nonlocal sent
                while True:
                    await mute.send(frame)
                    sent += 1

            task = asyncio.create_task(flood())
            peak, stalled_at = 0, -1
            while stalled_at != sent:  # until the flood makes no progress for 0.3 s
                stalled_at = sent
                for _ in range(3):
                    await asyncio.sleep(0.1)
                    peak = max(peak, *_queued(server))
                assert (await a.ping())["type"] == "PONG"  # others are served meanwhile
            task.cancel()
            assert sent > 1000  # it did flood
            assert READ_PAUSE <= peak < READ_PAUSE + 64 * 1024
            mute.transport.abort()

    run(scenario())


def test_a_member_that_does_not_read_its_broadcasts_is_dropped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, rate_limits=False, debounce_window=0.0,
                           max_send_buffer=256 * 1024) as server, \
                clients(server, "alice", "bob") as (a, b):
            mute = await _mute_client(server)
            await mute.send(json.dumps({"id": "j", "type": "AUTH", "data": {
                "token": server.token("mute"), "session_id": "jam"}}))
            await b.wait_for("PRESENCE", lambda m: m["data"]["user_id"] == "mute")
            pid = (await a.add_plugin("t", "Reverb"))["plugin_id"]
            for i in range(20_000):
                await a.set_parameter("t", pid, "wet_dry", (i % 10) / 10)
                if len(_queued(server)) == 2:  # alice and bob: the mute one was dropped
                    break
            else:
                raise AssertionError("the member that does not read was never dropped")
            left = await b.wait_for("PRESENCE", lambda m: m["data"]["event"] == "left")
            assert left["data"]["user_id"] == "mute"
            assert max(_queued(server)) < 64 * 1024
            await a.set_parameter("t", pid, "wet_dry", 0.25)  # the session goes on
            await b.wait_for("PLUGIN_STATE_UPDATE",
                             lambda m: m["data"]["parameters"] == {"wet_dry": 0.25})

    run(scenario())
