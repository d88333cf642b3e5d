"""The core :class:`pluginlab.session.Studio`, driven WITHOUT sockets.

Each client is ``studio.connect(outbox.append)``: whatever the core sends lands in a list.
Frames go in through ``await studio.receive(conn, json_text)`` (the wire path) or
``await studio.execute(conn, type, data)`` (the Python path). That these tests need no
transport at all is the proof that the core is sans-I/O.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pluginlab.auth import AuthConfig, Authenticator
from pluginlab.config import ServerConfig
from pluginlab.errors import PluginlabError, PluginNotFound, Unauthorized
from pluginlab.provenance import ProvenanceStore
from pluginlab.session import Connection, Studio

SECRET = "session-test-secret-" + "0123456789abcdef" * 3
ROOT = Path(__file__).resolve().parents[1]


def run(coro: Any, timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Peer:
    """One client of the core: its connection and everything the core sent it."""

    def __init__(self, studio: Studio, name: str, log: list[tuple[str, dict[str, Any]]]):
        self.studio = studio
        self.name = name
        self.outbox: list[dict[str, Any]] = []
        self._log = log
        self._ids = 0

        def send(message: dict[str, Any]) -> None:
            json.dumps(message, allow_nan=False)  # everything the core sends is strict JSON
            self.outbox.append(message)
            log.append((name, message))

        self.conn: Connection = studio.connect(send)

    async def frame(self, text: str) -> dict[str, Any]:
        """Feed a raw frame; return the one message it caused on this connection."""
        before = len(self.outbox)
        await self.studio.receive(self.conn, text)
        mine = self.outbox[before:]
        assert len(mine) == 1, mine
        return mine[0]

    async def send(self, msg_type: str, data: dict[str, Any] | None = None,
                   **envelope: Any) -> dict[str, Any]:
        self._ids += 1
        body = {"id": f"{self.name}_{self._ids}", "type": msg_type, "data": data or {},
                **envelope}
        reply = await self.frame(json.dumps(body))
        if "id" in body and reply["type"] != "ERROR":
            assert reply["id"] == body["id"]
        return reply

    async def answer(self, msg_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """Like :meth:`send` while others' broadcasts may arrive meanwhile: the reply by id."""
        self._ids += 1
        request_id = f"{self.name}_{self._ids}"
        await self.studio.receive(self.conn, json.dumps(
            {"id": request_id, "type": msg_type, "data": data}))
        replies = [m for m in self.outbox if m["id"] == request_id]
        assert len(replies) == 1, replies
        return replies[0]

    async def ok(self, msg_type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.send(msg_type, data)
        assert reply["type"] != "ERROR", reply
        return reply["data"]

    async def error(self, msg_type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.send(msg_type, data)
        assert reply["type"] == "ERROR", reply
        return reply["data"]

    def received(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.outbox if m["type"] == msg_type]


class Rig:
    def __init__(self, studio: Studio, store: Any) -> None:
        self.studio = studio
        self.store = store
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.auth = studio.auth

    def token(self, user: str, **kwargs: Any) -> str:
        assert self.auth is not None
        return self.auth.issue(user, **kwargs)

    async def two_on_a_reverb(self) -> tuple[Peer, Peer, str, dict[str, Any]]:
        """Alice and Bob in "jam", a Reverb Alice added on track "t": (alice, bob, its id,
        {track_id, plugin_id})."""
        alice, bob = await self.peer("alice"), await self.peer("bob")
        pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
        return alice, bob, pid, {"track_id": "t", "plugin_id": pid}

    async def peer(self, name: str, session: str | None = "jam", **token_kwargs: Any) -> Peer:
        peer = Peer(self.studio, name, self.log)
        if session is not None:
            await peer.ok("AUTH", {"token": self.token(name, **token_kwargs),
                                   "session_id": session})
        return peer


@asynccontextmanager
async def studio_rig(tmp_path: Path, store: Any = "real", **cfg: Any) -> AsyncIterator[Rig]:
    config = ServerConfig(db=None, presets_dir=str(tmp_path / "presets"), jwt_secret=SECRET,
                          **cfg)
    own = store in ("real", "fsync")  # "fsync": every record waits for its sync
    if own:
        store = ProvenanceStore(str(tmp_path / "core.sqlite"), fsync=store == "fsync")
    auth = Authenticator(AuthConfig(secret=SECRET, max_failures=config.auth_max_failures))
    studio = Studio(config, store=store, authenticator=auth)
    try:
        yield Rig(studio, store)
    finally:
        await studio.close()
        if own:
            store.close()


def _imports(module: str) -> set[str]:
    """Modules imported by ``pluginlab.<module>`` (absolute names; relative ones resolved)."""
    tree = ast.parse((ROOT / "pluginlab" / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "pluginlab" + (f".{node.module}" if node.module else "")
                if node.module:
                    found.add(base)
                else:
                    found.update(f"pluginlab.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
    return found


def test_the_core_imports_no_transport() -> None:
    """session.py and every pluginlab module it pulls in (transitively) import neither
    websockets nor ipywidgets. (The package ``__init__`` re-exports the server for
    convenience; that is not the core's dependency.)"""
    seen: set[str] = set()
    todo = ["session"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imports(module):
            top = name.split(".")[0]
            assert top not in ("websockets", "ipywidgets"), f"pluginlab.{module} imports {name}"
            if name.startswith("pluginlab."):
                sub = name.split(".")[1]
                if (ROOT / "pluginlab" / f"{sub}.py").exists():
                    todo.append(sub)
    assert {"session", "messages", "auth", "limits", "engine"} <= seen
    assert "server" not in seen and "client" not in seen


def test_auth_snapshot_presence_and_disconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            reply = alice.outbox[-1]
            assert reply["type"] == "AUTH_SUCCESS"
            assert reply["data"] == {"session_id": "jam", "user_id": "alice",
                                     "snapshot": {"session_id": "jam", "members": ["alice"],
                                                  "tracks": {}}}
            assert reply["user_id"] == "alice" and reply["session_id"] == "jam"
            bob = await rig.peer("bob")
            assert bob.outbox[-1]["data"]["snapshot"]["members"] == ["alice", "bob"]
            joined = alice.received("PRESENCE")
            assert [m["data"] for m in joined] == [{"event": "joined", "user_id": "bob"}]
            assert joined[0]["user_id"] == "bob" and joined[0]["id"].startswith("bcast_")
            assert not bob.received("PRESENCE")  # nobody announces you to yourself
            await rig.studio.disconnect(bob.conn)
            assert alice.received("PRESENCE")[-1]["data"] == {"event": "left", "user_id": "bob"}
            assert rig.studio.sessions["jam"].user_ids() == ["alice"]

    run(scenario())


def test_presence_is_per_user_not_per_connection(tmp_path: Path) -> None:
    """A second tab of a user announces nothing; closing one of two tabs is not "left"."""
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            bob_tab1, bob_tab2 = await rig.peer("bob"), await rig.peer("bob")
            assert [m["data"] for m in alice.received("PRESENCE")] == [
                {"event": "joined", "user_id": "bob"}]
            await rig.studio.disconnect(bob_tab1.conn)
            assert len(alice.received("PRESENCE")) == 1  # bob is still here
            assert rig.studio.sessions["jam"].user_ids() == ["alice", "bob"]
            await rig.studio.disconnect(bob_tab2.conn)
            assert alice.received("PRESENCE")[-1]["data"] == {"event": "left", "user_id": "bob"}
            assert rig.studio.sessions["jam"].user_ids() == ["alice"]

    run(scenario())


def test_authenticating_again_into_the_same_session_announces_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            await bob.ok("AUTH", {"token": rig.token("bob"), "session_id": "jam"})
            assert [m["data"]["event"] for m in alice.received("PRESENCE")] == ["joined"]
            await bob.ok("AUTH", {"token": rig.token("bob"), "session_id": "other"})
            assert [m["data"]["event"] for m in alice.received("PRESENCE")] == ["joined", "left"]

    run(scenario())


def test_a_refused_frame_with_a_usable_id_gets_it_echoed(tmp_path: Path) -> None:
    """A lone surrogate in a field makes the frame INVALID_MESSAGE, but its id is fine: the
    client's request must not wait for a reply that never names it."""
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            reply = await alice.frame('{"id": "q", "type": "PLUGIN_PARAMETER", "data": {'
                                      '"track_id": "t", "plugin_id": "p\\ud800", '
                                      '"parameter_id": "x", "parameter_value": 1}}')
            assert (reply["id"], reply["data"]["code"]) == ("q", "INVALID_MESSAGE")
            reply = await alice.frame('{"id": "q\\ud800", "type": "PING"}')
            assert reply["id"] is None  # an id that is not text cannot be echoed
            # a number beyond a double is refused, but the frame is JSON: its id is echoed
            reply = await alice.frame('{"id": "big", "type": "PLUGIN_PARAMETER", "data": {'
                                      '"track_id": "t", "plugin_id": "p", '
                                      '"parameter_id": "x", "parameter_value": 1e400}}')
            assert (reply["id"], reply["data"]["code"]) == ("big", "INVALID_MESSAGE")
            reply = await alice.frame('{"id": "nan", "type": "PING", "data": {"x": NaN}}')
            assert reply["id"] is None  # NaN is not JSON: nothing in the frame is trusted

    run(scenario())


def test_reply_comes_before_the_broadcasts_it_causes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            await rig.peer("bob")
            rig.log.clear()
            added = await alice.ok("PLUGIN_ADD", {"track_id": "t1", "name": "Reverb"})
            await alice.ok("PLUGIN_PARAMETER", {"track_id": "t1", "plugin_id": added["plugin_id"],
                                                "parameter_id": "wet_dry",
                                                "parameter_value": 0.6})
            order = [(who, m["type"]) for who, m in rig.log]
            assert order == [
                ("alice", "PLUGIN_ADD"), ("bob", "PLUGIN_ADD"), ("bob", "PLUGIN_STATE_UPDATE"),
                ("alice", "PLUGIN_PARAMETER"), ("bob", "PLUGIN_PARAMETER"),
                ("bob", "PLUGIN_STATE_UPDATE"),
            ]

    run(scenario())


def test_a_members_broadcasts_of_one_change_go_out_together(tmp_path: Path) -> None:
    """A transport that can send several messages at once gets each member's broadcasts of a
    change in one call, in order (relay, then state update), and members one after another;
    trailing edges of the debounce too."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, debounce_window=0.05) as rig:
            alice = await rig.peer("alice")
            calls: dict[str, list[list[str]]] = {"bob": [], "cat": []}
            for name in calls:
                peer = await rig.peer(name)
                peer.conn.send_many = lambda ms, n=name: calls[n].append([m["type"] for m in ms])
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t1", "name": "Reverb"}))["plugin_id"]
            for got in calls.values():  # PLUGIN_ADD + its state update, together
                assert got == [["PLUGIN_ADD", "PLUGIN_STATE_UPDATE"]]
                got.clear()
            change = {"track_id": "t1", "plugin_id": pid, "parameter_id": "wet_dry"}
            await alice.ok("PLUGIN_PARAMETER", {**change, "parameter_value": 0.2})  # leading
            await alice.ok("PLUGIN_PARAMETER", {**change, "parameter_value": 0.3})  # held back
            await asyncio.sleep(0.2)  # the trailing edge fires from a timer
            for got in calls.values():
                assert got == [["PLUGIN_PARAMETER", "PLUGIN_STATE_UPDATE"]] * 2
            bob_only = [m for who, m in rig.log if who == "bob"]
            assert not [m for m in bob_only if m["type"] == "PLUGIN_PARAMETER"]  # not sent twice

    run(scenario())


def test_every_request_gets_exactly_one_reply_and_the_sender_no_broadcast(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Utility"}))["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid}
            requests = [
                ("PLUGIN_PARAMETER", {**base, "parameter_id": "gain", "parameter_value": -6}),
                ("PLUGIN_PARAMETER_BATCH", {**base, "parameters": {"gain": -3}}),
                ("PLUGIN_BYPASS", {**base, "bypass": True}),
                ("PLUGIN_PRESET", {**base, "action": "list"}),
                ("PLUGIN_PARAMETERS_GET", base),
                ("SESSION_STATE_GET", {}),
                ("PING", {}),
                ("PLUGIN_PARAMETER", {**base, "parameter_id": "nope", "parameter_value": 1}),
                ("PLUGIN_REMOVE", base),
            ]
            for msg_type, data in requests:
                await alice.send(msg_type, data)  # Peer.frame asserts exactly one message
            mine = [m for m in alice.outbox if m["id"].startswith("bcast_")]
            assert [m["type"] for m in mine] == ["PRESENCE"]  # only bob's arrival
            assert all(m["user_id"] == "alice" for m in bob.outbox
                       if m["type"] != "AUTH_SUCCESS")

    run(scenario())


def test_before_auth_only_auth_and_ping(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            peer = await rig.peer("anon", session=None)
            assert (await peer.send("PING"))["type"] == "PONG"
            err = await peer.error("SESSION_STATE_GET")
            assert err["code"] == "UNAUTHORIZED"
            err = await peer.error("ADD_PLUGIN", {"trackId": "t", "pluginName": "Reverb"})
            assert err["code"] == "UNAUTHORIZED"  # legacy clients too, unless anonymous
            assert rig.studio.sessions == {}

    run(scenario())


def test_legacy_client_joins_legacy_session_when_anonymous_is_allowed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, allow_anonymous=True) as rig:
            old = await rig.peer("old", session=None)
            reply = await old.frame(json.dumps({"type": "ADD_PLUGIN", "data": {
                "trackId": "t", "pluginName": "Reverb", "pluginPath": "/path/to/reverb.vst3"}}))
            assert reply["type"] == "PLUGIN_ADDED" and reply["success"] is True
            assert reply["id"].startswith("legacy_")
            assert reply["user_id"] == "legacy_user" and reply["session_id"] == "legacy_session"
            assert old.conn.user_id == "legacy_user"
            # an AUTH without a token becomes anonymous_user in a fresh anonymous_ session
            anon = await rig.peer("anon", session=None)
            data = await anon.ok("AUTH", {})
            assert data["user_id"] == "anonymous_user"
            assert data["session_id"].startswith("anonymous_")

    run(scenario())


def test_execute_is_the_same_path_as_receive(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            bob = await rig.peer("bob")
            widget = rig.studio.connect(lambda message: None)
            auth = await rig.studio.execute(widget, "AUTH", {"token": rig.token("nb"),
                                                             "session_id": "jam"})
            assert auth["user_id"] == "nb"
            added = await rig.studio.execute(widget, "PLUGIN_ADD",
                                             {"track_id": "t", "name": "Reverb"})
            data = await rig.studio.execute(widget, "PLUGIN_PARAMETER", {
                "track_id": "t", "plugin_id": added["plugin_id"], "parameter_id": "wet_dry",
                "parameter_value": 0.9})
            assert data["parameter_value"] == 0.9 and data["success"] is True
            assert data["daid"].startswith("daid:v1.0:")
            relay = bob.received("PLUGIN_PARAMETER")[-1]
            assert relay["user_id"] == "nb" and relay["data"]["parameter_value"] == 0.9
            update = bob.received("PLUGIN_STATE_UPDATE")[-1]["data"]
            assert update["changed_by"] == "nb" and update["parameters"] == {"wet_dry": 0.9}
            with pytest.raises(PluginNotFound) as info:
                await rig.studio.execute(widget, "PLUGIN_PARAMETER", {
                    "track_id": "t", "plugin_id": "ghost", "parameter_id": "wet_dry",
                    "parameter_value": 0.1})
            assert info.value.details == {"plugin_id": "ghost", "track_id": "t"}
            stranger = rig.studio.connect(lambda message: None)
            with pytest.raises(Unauthorized):
                await rig.studio.execute(stranger, "SESSION_STATE_GET", {})

    run(scenario())


def test_changes_are_recorded_with_daids(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            added = await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Delay"})
            pid = added["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid}
            changed = await alice.ok("PLUGIN_PARAMETER", {**base, "parameter_id": "time",
                                                          "parameter_value": 250})
            batch = await alice.ok("PLUGIN_PARAMETER_BATCH",
                                   {**base, "parameters": {"feedback": 0.5, "mix": 0.25}})
            bypass = await alice.ok("PLUGIN_BYPASS", {**base, "bypass": True})
            removed = await alice.ok("PLUGIN_REMOVE", base)
            events = rig.store.events("jam")
            assert [e.action for e in events] == [
                "auth", "plugin_add", "parameter_update", "parameter_update",
                "parameter_update", "plugin_bypass", "plugin_remove"]
            daids = [e.daid for e in events]
            for reply in (added, changed, batch, bypass, removed):
                assert reply["daid"] in daids
            assert all(e.user_id == "alice" and e.session_id == "jam" for e in events)
            assert len(daids[2].split(":")) == 7

    run(scenario())


class FailingStore:
    """A store whose appends fail: every change must be undone and reported."""

    def __init__(self) -> None:
        self.fail = False

    def session_state(self, session_id: str) -> dict[str, Any]:
        return {}

    def plugin_ids(self, session_id: str) -> set[str]:
        return set()

    async def append_many_async(self, drafts: list[Any]) -> list[Any]:
        if self.fail:
            raise OSError("disk full")

        class Event:
            daid = "daid:v1.0:2026-01-01T00-00-00.000Z:u:plugin:p:0123456789abcdef"

        return [Event() for _ in drafts]


def test_a_change_that_cannot_be_recorded_is_undone(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FailingStore()
        async with studio_rig(tmp_path, store=store) as rig:
            alice, bob, pid, base = await rig.two_on_a_reverb()
            await alice.ok("PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry",
                                                "parameter_value": 0.4})
            seen = len(bob.outbox)
            store.fail = True
            attempts = [
                ("PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry", "parameter_value": 0.9}),
                ("PLUGIN_PARAMETER_BATCH", {**base, "parameters": {"wet_dry": 0.8,
                                                                   "room_size": 0.1}}),
                ("PLUGIN_BYPASS", {**base, "bypass": True}),
                ("PLUGIN_PRESET", {**base, "action": "load", "preset_name": "Large Hall"}),
                ("PLUGIN_ADD", {"track_id": "t", "name": "Delay"}),
                ("PLUGIN_REMOVE", base),
            ]
            for msg_type, data in attempts:
                err = await alice.error(msg_type, data)
                assert err["code"] == "INTERNAL_ERROR" and err["details"] == {}
            assert len(bob.outbox) == seen  # nothing unrecorded was broadcast
            store.fail = False
            state = await alice.ok("PLUGIN_PARAMETERS_GET", base)
            assert state["parameters"]["wet_dry"] == 0.4
            assert state["parameters"]["room_size"] == 0.5
            assert state["bypass"] is False
            tracks = (await alice.ok("SESSION_STATE_GET"))["snapshot"]["tracks"]
            assert [p["plugin_id"] for p in tracks["t"]] == [pid]

    run(scenario())


def test_a_failed_remove_puts_the_plugin_back_at_its_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FailingStore()
        async with studio_rig(tmp_path, store=store) as rig:
            alice = await rig.peer("alice")
            first = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))
            second = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Delay"}))
            base = {"track_id": "t", "plugin_id": first["plugin_id"]}
            await alice.ok("PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry",
                                                "parameter_value": 0.7})
            store.fail = True
            assert (await alice.error("PLUGIN_REMOVE", base))["code"] == "INTERNAL_ERROR"
            store.fail = False
            chain = (await alice.ok("SESSION_STATE_GET"))["snapshot"]["tracks"]["t"]
            assert [p["plugin_id"] for p in chain] == [first["plugin_id"], second["plugin_id"]]
            assert chain[0]["parameters"]["wet_dry"] == 0.7

    run(scenario())


def _failing_when(store: ProvenanceStore, doomed: Any) -> tuple[asyncio.Event, list[Any]]:
    """Make ``store``'s appends whose first draft satisfies ``doomed`` wait for the returned
    gate, then fail as a full disk would; the others are recorded for real (``fsync``: the
    reply waits). The second item lists the drafts waiting at the gate."""
    gate, waiting = asyncio.Event(), []
    append = store.append_many_async

    async def append_or_fail(drafts: list[Any]) -> list[Any]:
        if doomed(drafts[0]):
            waiting.append(drafts[0])
            await gate.wait()
            raise OSError(28, "No space left on device")
        return await append(drafts)

    store.append_many_async = append_or_fail  # type: ignore[method-assign]
    return gate, waiting


@pytest.mark.parametrize("acknowledged_first", [True, False])
def test_undoing_a_failed_change_never_overwrites_a_later_acknowledged_one(
        tmp_path: Path, acknowledged_first: bool) -> None:
    """fsync: Alice's change waits for its record when Bob changes the same parameter and is
    acknowledged; Alice's record then fails. Bob's value must stay (it is in the log)."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            alice, bob, _pid, base = await rig.two_on_a_reverb()
            gate, waiting = _failing_when(rig.store, lambda d: d.user_id == "alice")
            alices = asyncio.ensure_future(alice.answer(
                "PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry", "parameter_value": 0.9}))
            while not waiting:
                await asyncio.sleep(0.005)
            if acknowledged_first:
                await bob.ok("PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry",
                                                  "parameter_value": 0.2})
                gate.set()
                assert (await alices)["data"]["code"] == "INTERNAL_ERROR"
            else:
                bobs = asyncio.ensure_future(bob.ok("PLUGIN_PARAMETER", {
                    **base, "parameter_id": "wet_dry", "parameter_value": 0.2}))
                await asyncio.sleep(0.05)  # Bob's change applied, its record under way
                gate.set()
                assert (await alices)["data"]["code"] == "INTERNAL_ERROR"
                await bobs
            got = await bob.ok("PLUGIN_PARAMETERS_GET", base)
            assert got["parameters"]["wet_dry"] == 0.2
            logged = [e.details["value"] for e in rig.store.events("jam")
                      if e.action == "parameter_update"]
            assert logged == [0.2]

    run(scenario())


def test_removing_a_plugin_twice_at_once_is_plugin_not_found(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False) as rig:
            alice, bob, _pid, base = await rig.two_on_a_reverb()
            replies = await asyncio.gather(alice.answer("PLUGIN_REMOVE", base),
                                           bob.answer("PLUGIN_REMOVE", base))
            outcomes = sorted(r["data"].get("code", "ok") for r in replies)
            assert outcomes == ["PLUGIN_NOT_FOUND", "ok"]

    run(scenario())


@pytest.mark.parametrize("remove_fails_first", [False, True])
def test_a_failed_change_and_a_failed_removal_bring_back_the_value_from_before(
        tmp_path: Path, remove_fails_first: bool) -> None:
    """fsync: Alice's change waits for its record when Bob removes the plugin; both records
    fail. The plugin must come back with the value the log has, whichever fails first."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            alice, bob, _pid, base = await rig.two_on_a_reverb()
            before = (await alice.ok("PLUGIN_PARAMETERS_GET", base))["parameters"]["wet_dry"]
            gates = {"parameter_update": asyncio.Event(), "plugin_remove": asyncio.Event()}
            append = rig.store.append_many_async

            async def failing(drafts: list[Any]) -> list[Any]:
                gate = gates.get(drafts[0].action)
                if gate is None:
                    return await append(drafts)
                await gate.wait()
                raise OSError(28, "No space left on device")

            rig.store.append_many_async = failing  # type: ignore[method-assign]
            change = asyncio.ensure_future(alice.answer(
                "PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry", "parameter_value": 0.9}))
            await asyncio.sleep(0.05)
            removal = asyncio.ensure_future(bob.answer("PLUGIN_REMOVE", base))
            await asyncio.sleep(0.05)
            order = ["plugin_remove", "parameter_update"] if remove_fails_first else \
                ["parameter_update", "plugin_remove"]
            for action, reply in zip(order, ((removal, change) if remove_fails_first
                                             else (change, removal))):
                gates[action].set()
                assert (await reply)["data"]["code"] == "INTERNAL_ERROR"
            rig.store.append_many_async = append  # type: ignore[method-assign]
            got = await bob.ok("PLUGIN_PARAMETERS_GET", base)
            assert got["parameters"]["wet_dry"] == before

    run(scenario())


def test_racing_preset_loads_saves_and_deletes_tell_one_story(tmp_path: Path) -> None:
    """fsync, two clients racing on one preset name: in the log, every load of it follows a
    save of it with no delete in between, and loads what that save recorded."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Delay"}))["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid, "preset_name": "Shared"}
            rng = random.Random(7)

            async def client(peer: Peer) -> None:  # one request after another, like a UI
                for k in range(80):
                    action = rng.choice(["save", "load", "load", "delete"])
                    if action == "save":
                        await peer.answer("PLUGIN_PARAMETER", {
                            "track_id": "t", "plugin_id": pid, "parameter_id": "mix",
                            "parameter_value": k / 100})
                    await peer.answer("PLUGIN_PRESET", {**base, "action": action})

            await asyncio.gather(client(alice), client(bob))
            saved: dict[str, Any] | None = None
            loads = 0
            for event in rig.store.events("jam"):
                details = event.details
                if event.action == "preset_save" and details["preset_name"] == "Shared":
                    saved = details["parameters"]
                elif event.action == "preset_delete":
                    saved = None
                elif event.action == "preset_load" and details["preset_name"] == "Shared":
                    assert saved is not None, f"seq {event.seq}: a load of a deleted preset"
                    assert details["parameters"] == saved, f"seq {event.seq}"
                    loads += 1
            assert loads > 0

    run(scenario())


@pytest.mark.parametrize("recorded", [True, False])
def test_readers_see_only_what_the_log_has(tmp_path: Path, recorded: bool) -> None:
    """fsync: while Alice's change (and bypass) wait for their sync, Bob's reads and a new
    member's snapshot show the values before them: what they see survives a crash, and a
    change undone because its record failed never reaches anyone."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            alice, bob, _pid, base = await rig.two_on_a_reverb()
            before = (await bob.ok("PLUGIN_PARAMETERS_GET", base))["parameters"]["wet_dry"]
            gate = asyncio.Event()
            append = rig.store.append_many_async

            async def slow_sync(drafts: list[Any]) -> list[Any]:
                if drafts[0].user_id != "alice":
                    return await append(drafts)
                await gate.wait()
                if not recorded:
                    raise OSError(28, "No space left on device")
                return await append(drafts)

            rig.store.append_many_async = slow_sync  # type: ignore[method-assign]
            sent = [asyncio.ensure_future(alice.answer(t, {**base, **d})) for t, d in (
                ("PLUGIN_PARAMETER", {"parameter_id": "wet_dry", "parameter_value": 0.9}),
                ("PLUGIN_BYPASS", {"bypass": True}))]
            while len(rig.studio._tentative) < 2:
                await asyncio.sleep(0.005)
            got = await bob.ok("PLUGIN_PARAMETERS_GET", base)
            assert got["parameters"]["wet_dry"] == before and got["bypass"] is False
            info = {e["id"]: e for e in got["parameter_info"]}
            assert info["wet_dry"]["value"] == before
            carol = await rig.peer("carol")
            joined = carol.received("AUTH_SUCCESS")[0]["data"]["snapshot"]["tracks"]["t"][0]
            assert joined["parameters"]["wet_dry"] == before and joined["bypass"] is False
            gate.set()
            await asyncio.gather(*sent)
            got = await bob.ok("PLUGIN_PARAMETERS_GET", base)
            assert (got["parameters"]["wet_dry"], got["bypass"]) == (
                (0.9, True) if recorded else (before, False))

    run(scenario())


def test_a_cancelled_request_leaves_no_tentative_change_behind(tmp_path: Path) -> None:
    """fsync: a request cancelled while its change waits for the sync (e.g. at shutdown) is
    recorded all the same (the store keeps what it was handed); the ledger of unrecorded
    changes must not keep it, or it would hold every later change of that value forever."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            alice = await rig.peer("alice")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid, "parameter_id": "wet_dry"}
            gate = asyncio.Event()
            append = rig.store.append_many_async

            async def slow_sync(drafts: list[Any]) -> list[Any]:
                handed = asyncio.ensure_future(append(drafts))  # handed over at once
                await gate.wait()
                return await handed

            rig.store.append_many_async = slow_sync  # type: ignore[method-assign]
            waiting = asyncio.ensure_future(alice.answer(
                "PLUGIN_PARAMETER", {**base, "parameter_value": 0.9}))
            while len(rig.studio._tentative) == 0:
                await asyncio.sleep(0.005)
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            assert len(rig.studio._tentative) == 0
            gate.set()
            rig.store.append_many_async = append  # type: ignore[method-assign]
            for value in (0.1, 0.2):
                await alice.ok("PLUGIN_PARAMETER", {**base, "parameter_value": value})
            assert len(rig.studio._tentative) == 0
            logged = [e.details["value"] for e in rig.store.events("jam")
                      if e.action == "parameter_update"]
            assert logged == [0.9, 0.1, 0.2]

    run(scenario())


def test_undoing_two_failed_changes_restores_the_value_from_before_both(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            alice, bob, _pid, base = await rig.two_on_a_reverb()
            before = (await alice.ok("PLUGIN_PARAMETERS_GET", base))["parameters"]["wet_dry"]
            gate, waiting = _failing_when(rig.store, lambda d: d.action != "auth")
            sent = [asyncio.ensure_future(peer.answer(msg_type, {**base, **data}))
                    for peer, msg_type, data in (
                        (alice, "PLUGIN_PARAMETER", {"parameter_id": "wet_dry",
                                                     "parameter_value": 0.9}),
                        (bob, "PLUGIN_PARAMETER_BATCH", {"parameters": {"wet_dry": 0.1}}),
                        (alice, "PLUGIN_BYPASS", {"bypass": True}),
                        (bob, "PLUGIN_BYPASS", {"bypass": True}))]
            while len(waiting) < 4:
                await asyncio.sleep(0.005)
            gate.set()
            assert all(r["type"] == "ERROR" for r in await asyncio.gather(*sent))
            got = await bob.ok("PLUGIN_PARAMETERS_GET", base)
            assert got["parameters"]["wet_dry"] == before and got["bypass"] is False
            assert len(rig.studio._tentative) == 0

    run(scenario())


def test_no_store_means_no_daid(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, store=None) as rig:
            alice = await rig.peer("alice")
            added = await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"})
            assert added["daid"] is None and added["success"] is True

    run(scenario())


def test_session_is_restored_from_the_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb",
                                                 "plugin_id": "my_reverb"}))["plugin_id"]
            base = {"track_id": "t", "plugin_id": pid}
            await alice.ok("PLUGIN_PARAMETER", {**base, "parameter_id": "wet_dry",
                                                "parameter_value": 0.77})
            await alice.ok("PLUGIN_BYPASS", {**base, "bypass": True})
            before = (await alice.ok("SESSION_STATE_GET"))["snapshot"]["tracks"]
        async with studio_rig(tmp_path) as rig:  # same database file, a fresh core
            bob = await rig.peer("bob")
            snapshot = bob.outbox[-1]["data"]["snapshot"]
            assert snapshot["tracks"] == before
            assert snapshot["tracks"]["t"][0]["parameters"]["wet_dry"] == 0.77
            assert snapshot["tracks"]["t"][0]["bypass"] is True

    run(scenario())


def test_message_rate_limit_counts_every_frame(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, messages_per_second=5) as rig:
            alice = await rig.peer("alice")  # the AUTH was frame 1
            replies = [await alice.frame(text) for text in
                       ['{"type": "PING", "id": "a"}', "garbage", '{"type": "NOPE"}',
                        '{"type": "PING", "id": "b"}', '{"type": "PING", "id": "c"}']]
            assert [r["type"] for r in replies] == ["PONG", "ERROR", "ERROR", "PONG", "ERROR"]
            limited = replies[-1]
            assert limited["id"] == "c"  # the id is still echoed when it can be read
            assert limited["data"]["code"] == "RATE_LIMITED"
            assert limited["data"]["details"]["limit"] == "messages_per_second"
            assert 0 < limited["data"]["details"]["retry_after"] <= 1

    run(scenario())


def test_rate_limits_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, messages_per_second=1) as rig:
            alice = await rig.peer("alice")
            for _ in range(50):
                assert (await alice.send("PING"))["type"] == "PONG"

    run(scenario())


def test_parameter_broadcasts_are_debounced_in_the_core(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, debounce_window=30.0) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            for i in range(1, 51):
                await alice.ok("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": pid,
                                                    "parameter_id": "wet_dry",
                                                    "parameter_value": i / 100})
            relays = bob.received("PLUGIN_PARAMETER")
            assert [m["data"]["parameter_value"] for m in relays] == [0.01]  # leading edge
            rig.studio.sessions["jam"].throttle.flush()  # = the window ends
            relays = bob.received("PLUGIN_PARAMETER")
            assert [m["data"]["parameter_value"] for m in relays] == [0.01, 0.5]
            updates = [m["data"] for m in bob.received("PLUGIN_STATE_UPDATE")
                       if m["data"]["state"] == "updated"]
            assert [u["parameters"] for u in updates] == [{"wet_dry": 0.01}, {"wet_dry": 0.5}]

    run(scenario())


def _last_seen(peer: Peer, pid: str, parameter: str) -> Any:
    """The value of ``parameter`` a member ends up showing: the last message (its own reply
    or a broadcast) carrying it."""
    seen = None
    for m in peer.outbox:
        data = m.get("data") or {}
        if data.get("plugin_id") != pid:
            continue
        if m["type"] == "PLUGIN_PARAMETER" and data.get("parameter_id") == parameter:
            seen = data["parameter_value"]
        elif parameter in (data.get("parameters") or {}):
            seen = data["parameters"][parameter]
    return seen


def test_a_held_value_never_arrives_after_a_newer_one(tmp_path: Path) -> None:
    """The trailing edge of a debounce window must not overwrite what a preset load or a batch
    sent meanwhile: every member ends on the server's value."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, debounce_window=30.0) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            target = {"track_id": "t", "plugin_id": pid}

            async def single(value: float) -> None:
                await alice.ok("PLUGIN_PARAMETER", {**target, "parameter_id": "wet_dry",
                                                    "parameter_value": value})

            # a held single change, then a preset load (sent at once) with another value
            await single(0.1)
            await single(0.2)  # held until the window ends
            await alice.ok("PLUGIN_PRESET", {**target, "action": "load",
                                             "preset_data": {"wet_dry": 0.9}})
            rig.studio.sessions["jam"].throttle.flush()  # = every window ends
            assert _last_seen(bob, pid, "wet_dry") == 0.9

            # a held single change, then a batch (its own key, sent at once)
            await single(0.3)
            await alice.ok("PLUGIN_PARAMETER_BATCH", {**target, "parameters": {"wet_dry": 0.44}})
            rig.studio.sessions["jam"].throttle.flush()
            assert _last_seen(bob, pid, "wet_dry") == 0.44

            # both held: a batch, then a newer single change of the same parameter
            await alice.ok("PLUGIN_PARAMETER_BATCH", {**target, "parameters": {"wet_dry": 0.5,
                                                                              "room_size": 0.6}})
            await single(0.7)
            rig.studio.sessions["jam"].throttle.flush()
            assert _last_seen(bob, pid, "wet_dry") == 0.7
            assert _last_seen(bob, pid, "room_size") == 0.6  # the batch's other value still goes
            assert rig.studio.sessions["jam"].engine.plugin(pid).get("wet_dry") == 0.7

    run(scenario())


def test_batches_of_two_senders_reach_each_other(tmp_path: Path) -> None:
    """Held batches are merged per sender: a merged batch goes to everyone but its sender, so
    merging two senders' batches would hide one sender's values from the other."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, debounce_window=30.0) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            target = {"track_id": "t", "plugin_id": pid}
            await alice.ok("PLUGIN_PARAMETER_BATCH", {**target, "parameters": {"wet_dry": 0.1}})
            await bob.ok("PLUGIN_PARAMETER_BATCH", {**target, "parameters": {"room_size": 0.8}})
            await alice.ok("PLUGIN_PARAMETER_BATCH", {**target, "parameters": {"wet_dry": 0.2}})
            rig.studio.sessions["jam"].throttle.flush()
            assert _last_seen(alice, pid, "room_size") == 0.8
            assert _last_seen(bob, pid, "wet_dry") == 0.2
            changed_by = {u["data"]["changed_by"]: u["data"]["parameters"]
                          for u in alice.received("PLUGIN_STATE_UPDATE")
                          if u["data"]["state"] == "updated"}
            assert changed_by == {"bob": {"room_size": 0.8}}

    run(scenario())


@pytest.mark.parametrize("kind", ["batch", "single", "mixed"])
def test_every_member_ends_on_the_last_value_when_two_senders_interleave(
        tmp_path: Path, kind: str) -> None:
    """A and B alternate changes of one parameter inside the window: an older held value of
    A's must not reach B after B's own newer change (B would show A's value for good)."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, debounce_window=30.0) as rig:
            alice, bob, carol = (await rig.peer("alice"), await rig.peer("bob"),
                                 await rig.peer("carol"))
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            target = {"track_id": "t", "plugin_id": pid}

            async def change(peer: Peer, value: float, batch: bool) -> None:
                if batch:
                    await peer.ok("PLUGIN_PARAMETER_BATCH", {**target,
                                                             "parameters": {"wet_dry": value}})
                else:
                    await peer.ok("PLUGIN_PARAMETER", {**target, "parameter_id": "wet_dry",
                                                       "parameter_value": value})

            for i, (peer, value) in enumerate([(alice, 0.1), (bob, 0.3), (alice, 0.2),
                                               (bob, 0.5)]):
                await change(peer, value, kind == "batch" or (kind == "mixed" and i % 2 == 0))
            rig.studio.sessions["jam"].throttle.flush()  # = every window ends
            assert rig.studio.sessions["jam"].engine.plugin(pid).get("wet_dry") == 0.5
            assert _last_seen(alice, pid, "wet_dry") == 0.5
            assert _last_seen(carol, pid, "wet_dry") == 0.5
            assert _last_seen(bob, pid, "wet_dry") == 0.5  # his own reply, nothing after it

    run(scenario())


def test_an_empty_track_id_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            for msg_type, data in (("PLUGIN_ADD", {"track_id": "", "name": "Reverb"}),
                                   ("ADD_PLUGIN", {"trackId": "", "pluginName": "Reverb"}),
                                   ("PLUGIN_PARAMETER", {"track_id": "", "plugin_id": "p",
                                                         "parameter_id": "x",
                                                         "parameter_value": 1})):
                err = await alice.error(msg_type, data)
                assert (err["code"], err["details"]["field"]) == ("INVALID_MESSAGE", "track_id")
            assert rig.studio.sessions["jam"].snapshot()["tracks"] == {}
            assert rig.store.events("jam", action="plugin_add") == []

    run(scenario())


def test_a_removed_plugins_id_is_never_assigned_again(tmp_path: Path) -> None:
    """Not in the session, nor after it was released and restored from the log: a late
    message for the old plugin must not change a new one."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, debounce_window=30.0) as rig:
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            first = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Delay"}))["plugin_id"]
            await alice.ok("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": first,
                                                "parameter_id": "mix", "parameter_value": 0.2})
            await alice.ok("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": first,
                                                "parameter_id": "mix", "parameter_value": 0.9})
            await alice.ok("PLUGIN_REMOVE", {"track_id": "t", "plugin_id": first})
            second = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Delay"}))["plugin_id"]
            assert second != first
            rig.studio.sessions["jam"].throttle.flush()  # the old plugin's held 0.9 is dropped
            assert _last_seen(bob, second, "mix") != 0.9
            late = await bob.error("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": first,
                                                       "parameter_id": "mix",
                                                       "parameter_value": 0.5})
            assert late["code"] == "PLUGIN_NOT_FOUND"

            for peer in (alice, bob):
                await rig.studio.disconnect(peer.conn)
            assert "jam" not in rig.studio.sessions
            await asyncio.gather(*rig.studio._releasing)
            carol = await rig.peer("carol")  # the session comes back from the log
            third = (await carol.ok("PLUGIN_ADD", {"track_id": "t", "name": "Delay"}))["plugin_id"]
            assert third not in (first, second)
            created = rig.store.events("jam", action="plugin_add")
            assert [e.details["plugin_id"] for e in created] == [first, second, third]
            assert all(not e.parents for e in created)  # three plugins, three histories

    run(scenario())


def test_changes_made_alone_reach_a_newcomer_through_the_snapshot(tmp_path: Path) -> None:
    """Alone in a session nothing is broadcast (nobody to tell); whoever joins later, even
    inside the debounce window, sees the last value in AUTH_SUCCESS and gets no stale relay."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, rate_limits=False, debounce_window=30.0) as rig:
            alice = await rig.peer("alice")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            for i in range(1, 21):
                await alice.ok("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": pid,
                                                    "parameter_id": "wet_dry",
                                                    "parameter_value": i / 100})
            bob = await rig.peer("bob")
            snapshot = bob.outbox[-1]["data"]["snapshot"]
            assert snapshot["tracks"]["t"][0]["parameters"]["wet_dry"] == 0.2
            rig.studio.sessions["jam"].throttle.flush()  # = every window ends
            assert bob.received("PLUGIN_PARAMETER") == []
            assert bob.received("PLUGIN_STATE_UPDATE") == []
            await alice.ok("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": pid,
                                                "parameter_id": "wet_dry",
                                                "parameter_value": 0.7})
            relays = bob.received("PLUGIN_PARAMETER")  # now there is someone: leading edge
            assert [m["data"]["parameter_value"] for m in relays] == [0.7]

    run(scenario())


def test_engine_errors_are_reported_not_raised(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            err = await alice.error("PLUGIN_ADD", {"track_id": "t", "name": "NoSuchPlugin"})
            assert err["code"] == "PLUGIN_ADD_FAILED"
            assert err["details"]["name"] == "NoSuchPlugin"
            assert "built-ins" in err["details"]["reason"]
            err = await alice.error("PLUGIN_REMOVE", {"track_id": "nowhere", "plugin_id": "p"})
            assert err == {"error": err["error"], "code": "TRACK_NOT_FOUND",
                           "details": {"track_id": "nowhere"}}

    run(scenario())


def test_errors_are_pluginlab_errors_for_python_callers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            conn = rig.studio.connect(lambda message: None)
            await rig.studio.execute(conn, "AUTH", {"token": rig.token("py")})
            assert conn.session_id is not None and conn.session_id.startswith("session_")
            with pytest.raises(PluginlabError) as info:
                await rig.studio.execute(conn, "PLUGIN_ADD", {"track_id": 1, "name": "Reverb"})
            assert info.value.code.value == "INVALID_MESSAGE"

    run(scenario())


def test_an_empty_session_is_released_and_restored_on_rejoin(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            bob = await rig.peer("bob")
            added = await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"})
            pid = added["plugin_id"]
            await alice.ok("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": pid,
                                                "parameter_id": "wet_dry",
                                                "parameter_value": 0.8})
            engine = rig.studio.sessions["jam"].engine
            await rig.studio.disconnect(alice.conn)
            assert "jam" in rig.studio.sessions  # bob is still there
            await rig.studio.disconnect(bob.conn)
            assert "jam" not in rig.studio.sessions  # nobody left: memory released
            await asyncio.gather(*rig.studio._releasing)
            assert engine.plugins == {}  # its DawDreamer processors are gone
            carol = await rig.peer("carol")
            tracks = carol.received("AUTH_SUCCESS")[0]["data"]["snapshot"]["tracks"]
            assert [p["plugin_id"] for p in tracks["t"]] == [pid]
            assert tracks["t"][0]["parameters"]["wet_dry"] == pytest.approx(0.8)

    run(scenario())


def test_a_session_with_a_change_in_flight_is_not_released(tmp_path: Path) -> None:
    """fsync: a change waits for its sync while its sender, alone in the session,
    re-authenticates into it. The session must not be dropped and restored from a log that
    does not have the change yet: the acknowledged value stays in the live engine."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            for attempt in range(20):
                alice = await rig.peer("alice")
                pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"})
                       )["plugin_id"]
                value = 0.5 + attempt / 100
                change = json.dumps({"id": "c", "type": "PLUGIN_PARAMETER", "data": {
                    "track_id": "t", "plugin_id": pid, "parameter_id": "wet_dry",
                    "parameter_value": value}})
                again = json.dumps({"id": "a", "type": "AUTH", "data": {
                    "token": rig.token("alice"), "session_id": "jam"}})
                await asyncio.gather(rig.studio.receive(alice.conn, change),
                                     rig.studio.receive(alice.conn, again))
                replies = {m["id"]: m for m in alice.outbox if m["id"] in ("a", "c")}
                assert replies["c"]["data"]["parameter_value"] == value
                assert replies["a"]["type"] == "AUTH_SUCCESS"
                live = rig.studio.sessions["jam"].engine.plugin(pid).get("wet_dry")
                assert live == pytest.approx(value), attempt
                await rig.studio.disconnect(alice.conn)
                await asyncio.gather(*rig.studio._releasing)

    run(scenario())


def test_the_connection_cap_holds_for_concurrent_joins(tmp_path: Path) -> None:
    """Twelve AUTHs of one user into a session being restored: five get in."""
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"})
            await rig.studio.disconnect(alice.conn)
            await asyncio.gather(*rig.studio._releasing)
            assert "jam" not in rig.studio.sessions  # the next join restores it
            tabs = [Peer(rig.studio, "bob", rig.log) for _ in range(12)]
            replies = await asyncio.gather(*(tab.send("AUTH", {"token": rig.token("bob"),
                                                               "session_id": "jam"})
                                             for tab in tabs))
            joined = [r for r in replies if r["type"] == "AUTH_SUCCESS"]
            refused = [r for r in replies if r["type"] == "ERROR"]
            assert len(joined) == rig.studio.config.connections_per_user == 5
            assert {r["data"]["details"]["reason"] for r in refused} == {"too many connections"}
            assert len(rig.studio.sessions["jam"].members) == 5

    run(scenario())


def test_preset_saves_record_what_the_file_holds_and_deletes_never_eat_a_later_save(
        tmp_path: Path) -> None:
    """Races on presets (fsync makes every record wait): a change landing during a save is
    either in the file and its event or in neither; a delete and a save of one name end with
    the file present exactly when the save's event is the later one."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            store = rig.store
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"})
                   )["plugin_id"]
            target = {"track_id": "t", "plugin_id": pid}
            library = rig.studio.presets
            ids = itertools.count()

            async def request(peer: Peer, msg_type: str, data: dict[str, Any]
                              ) -> dict[str, Any]:
                msg_id = f"r{next(ids)}"
                await rig.studio.receive(peer.conn, json.dumps(
                    {"id": msg_id, "type": msg_type, "data": data}))
                return next(m for m in peer.outbox if m["id"] == msg_id)

            def history(name: str) -> list[Any]:
                return [e for e in store.events("jam")
                        if e.action in ("preset_save", "preset_delete")
                        and e.details.get("preset_name") == name]

            for attempt in range(15):
                name = f"take {attempt}"
                await asyncio.gather(
                    request(alice, "PLUGIN_PRESET", {**target, "action": "save",
                                                     "preset_name": name}),
                    request(bob, "PLUGIN_PARAMETER", {**target, "parameter_id": "wet_dry",
                                                      "parameter_value": attempt / 20}))
                preset = library.get("reverb", name)
                assert preset is not None
                assert history(name)[-1].details["parameters"] == preset.parameters

                replies = await asyncio.gather(
                    request(bob, "PLUGIN_PRESET", {**target, "action": "delete",
                                                   "preset_name": name}),
                    request(alice, "PLUGIN_PRESET", {**target, "action": "save",
                                                     "preset_name": name}))
                assert [r["type"] for r in replies] == ["PLUGIN_PRESET"] * 2
                exists = library.get("reverb", name) is not None
                assert exists == (history(name)[-1].action == "preset_save"), attempt

    run(scenario())


def test_preset_loads_count_against_the_per_plugin_change_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path) as rig:
            alice = await rig.peer("alice")
            pid = (await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Reverb"}))["plugin_id"]
            four = {"wet_dry": 0.5, "room_size": 0.5, "damping": 0.5, "pre_delay": 10.0}
            codes = []
            for _ in range(20):
                reply = await alice.send("PLUGIN_PRESET", {"track_id": "t", "plugin_id": pid,
                                                           "preset_data": four})
                codes.append(reply["data"].get("code") if reply["type"] == "ERROR" else "ok")
            limit = rig.studio.config.parameter_changes_per_second
            assert codes.count("ok") == limit // 4
            assert set(codes[limit // 4:]) == {"RATE_LIMITED"}
            err = await alice.error("PLUGIN_PRESET", {"track_id": "t", "plugin_id": pid,
                                                      "action": "save",
                                                      "preset_name": "n" * 201})
            assert err["details"]["field"] == "preset_name"

    run(scenario())


def test_a_plugin_is_addressable_only_once_its_creation_is_recorded(tmp_path: Path) -> None:
    """While A's PLUGIN_ADD waits for its record (fsync), B cannot change, remove or see the
    plugin already in the engine: nothing may be logged about it before its creation."""
    async def scenario() -> None:
        async with studio_rig(tmp_path, store="fsync", rate_limits=False) as rig:
            store = rig.store
            gate = asyncio.Event()
            append = store.append_many_async

            async def slow_append(drafts: list[Any]) -> list[Any]:
                if drafts[0].action == "plugin_add":
                    await gate.wait()  # the record of the creation takes a while
                return await append(drafts)

            store.append_many_async = slow_append  # type: ignore[method-assign]
            alice, bob = await rig.peer("alice"), await rig.peer("bob")
            adding = asyncio.ensure_future(alice.ok("PLUGIN_ADD", {"track_id": "t",
                                                                   "name": "Reverb"}))
            engine = rig.studio.sessions["jam"].engine
            while "plugin_1" not in engine.plugins:  # in the engine, not yet recorded
                await asyncio.sleep(0.01)
            target = {"track_id": "t", "plugin_id": "plugin_1"}
            for msg_type, data in (("PLUGIN_PARAMETER", {**target, "parameter_id": "wet_dry",
                                                         "parameter_value": 0.9}),
                                   ("PLUGIN_REMOVE", target)):
                assert (await bob.error(msg_type, data))["code"] == "PLUGIN_NOT_FOUND"
            state = await bob.ok("SESSION_STATE_GET")
            assert state["snapshot"]["tracks"].get("t", []) == []
            gate.set()
            assert (await adding)["plugin_id"] == "plugin_1"
            await bob.ok("PLUGIN_PARAMETER", {**target, "parameter_id": "wet_dry",
                                              "parameter_value": 0.9})
            actions = [e.action for e in store.events("jam") if e.action != "auth"]
            assert actions == ["plugin_add", "parameter_update"]

    run(scenario())


def test_without_a_store_an_empty_session_is_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with studio_rig(tmp_path, store=None) as rig:
            alice = await rig.peer("alice")
            await alice.ok("PLUGIN_ADD", {"track_id": "t", "name": "Utility"})
            await rig.studio.disconnect(alice.conn)
            assert "jam" in rig.studio.sessions
            bob = await rig.peer("bob")
            tracks = bob.received("AUTH_SUCCESS")[0]["data"]["snapshot"]["tracks"]
            assert [p["name"] for p in tracks["t"]] == ["Utility"]

    run(scenario())
