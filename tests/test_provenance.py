"""DAID identifiers, the SQLite event store, its hash chain, migrations, projection and CLI.

Every store test uses a real SQLite file under ``tmp_path``; tampering tests edit that file
directly with ``sqlite3``. The crash test SIGKILLs a real subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]

from pluginlab import provenance as prov
from pluginlab.journal import journal_path, read_records
from pluginlab.provenance import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    DaidNotFound,
    EventDraft,
    InvalidDaid,
    InvalidEvent,
    ProvenanceReader,
    ProvenanceStore,
    SchemaTooNew,
    StoreClosed,
    apply_event,
    canonical_json,
    chain_hash,
    daid_hash,
    escape_id,
    make_daid,
    migrate_database,
    parse_daid,
    unescape_id,
    verify_database,
)
from pluginlab.provenance_cli import export_events, register

FIXTURES = Path(__file__).resolve().parent / "fixtures"
T0 = datetime(2026, 11, 25, 20, 16, 3, 120000, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# helpers


class Clock:
    """A settable clock: each call returns ``now``; ``step`` advances it after every call."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(0)) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> datetime:
        current = self.now
        self.now += self.step
        return current


def add(plugin: str, track: str = "t1", *, user: str = "alice", session: str = "s1",
        index: int | None = None, **parameters: float) -> EventDraft:
    return EventDraft(user, session, "plugin_add", "plugin", plugin, "create", {
        "track_id": track, "plugin_id": plugin, "name": "Reverb", "plugin_path": None,
        "index": index, "parameters": parameters or {"wet_dry": 0.3, "room_size": 0.5},
        "bypass": False,
    })


def param(plugin: str, name: str, value: float, *, track: str = "t1", user: str = "alice",
          session: str = "s1", previous: float | None = None, **extra: Any) -> EventDraft:
    return EventDraft(user, session, "parameter_update", "parameter", f"{plugin}.{name}",
                      "update", {"track_id": track, "plugin_id": plugin, "parameter_id": name,
                                 "value": value, "previous_value": previous, **extra},
                      plugin_id=plugin)


def bypass(plugin: str, on: bool, *, track: str = "t1", user: str = "alice",
           session: str = "s1") -> EventDraft:
    return EventDraft(user, session, "plugin_bypass", "plugin", plugin, "bypass",
                      {"track_id": track, "plugin_id": plugin, "bypass": on}, plugin_id=plugin)


def preset(plugin: str, name: str, values: dict[str, float], *, track: str = "t1",
           user: str = "alice", session: str = "s1") -> EventDraft:
    return EventDraft(user, session, "preset_load", "preset", f"{plugin}.{name}", "preset_load",
                      {"track_id": track, "plugin_id": plugin, "preset_name": name,
                       "parameters": values}, plugin_id=plugin)


def remove(plugin: str, *, track: str = "t1", user: str = "alice",
           session: str = "s1") -> EventDraft:
    return EventDraft(user, session, "plugin_remove", "plugin", plugin, "delete",
                      {"track_id": track, "plugin_id": plugin})


def move(plugin: str, index: int, *, track: str = "t1", user: str = "alice",
         session: str = "s1") -> EventDraft:
    return EventDraft(user, session, "plugin_move", "plugin", plugin, "move",
                      {"track_id": track, "plugin_id": plugin, "index": index})


def auth(user: str = "alice", session: str = "s1") -> EventDraft:
    return EventDraft(user, session, "auth", "user", user, "auth", {"method": "jwt"})


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "provenance.sqlite"


@pytest.fixture()
def store(db: Path) -> Any:
    with ProvenanceStore(db, clock=Clock(step=timedelta(milliseconds=5))) as s:
        yield s


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_process(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=False, capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def old_database(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / "old_schema.sql").read_text())
    conn.close()
    return path


# ---------------------------------------------------------------------------------------------
# DAID hashes and identifiers


def test_hash_is_deterministic_and_sensitive_to_every_input() -> None:
    parents = ["daid:v1.0:2026-11-25T20-16-03.120Z:bob:plugin:rev:00000000000000bb",
               "daid:v1.0:2026-11-25T20-16-03.120Z:amy:plugin:rev:00000000000000aa"]
    base = daid_hash("rev.wet_dry", "update", {"value": 0.5}, parents)
    assert base == daid_hash("rev.wet_dry", "update", {"value": 0.5}, list(reversed(parents)))
    assert base == daid_hash("rev.wet_dry", "update", {"value": 0.5}, tuple(parents))
    assert len(base) == 16 and all(c in "0123456789abcdef" for c in base)
    assert daid_hash("rev.wet_dry", "update", {"value": 0.6}, parents) != base
    assert daid_hash("rev.wet_dry", "update", {"value": 0.5}, parents[:1]) != base
    assert daid_hash("rev.wet_dry", "delete", {"value": 0.5}, parents) != base
    assert daid_hash("rev.room_size", "update", {"value": 0.5}, parents) != base


def test_pinned_hash_vector() -> None:
    """The hash is exactly PROTOCOL.md's recipe (computed here independently) and pinned."""
    metadata = {"value": 0.75, "user": "zoë", "nested": {"b": [1, 2], "a": None}}
    parents = ["daid:v1.0:2026-11-25T20-16-03.120Z:u:plugin:p:ffffffffffffffff",
               "daid:v1.0:2026-11-25T20-16-03.119Z:u:plugin:p:0000000000000000"]
    recipe = json.dumps(
        {"entity_id": "rev1.wet_dry", "metadata": metadata, "operation": "update",
         "parents": sorted(parents)},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    ).encode("utf-8")
    expected = hashlib.sha256(recipe).hexdigest()[:16]
    assert daid_hash("rev1.wet_dry", "update", metadata, parents) == expected
    assert expected == "b4c71527d32ec0ec"


def test_make_daid_format_and_round_trip_with_colons() -> None:
    daid = make_daid("user:1%", "parameter", "plug:in.wet_dry", "update", {"v": 1},
                     parents=["b", "a"], timestamp=T0)
    assert daid.split(":")[:3] == ["daid", "v1.0", "2026-11-25T20-16-03.120Z"]
    assert len(daid.split(":")) == 7
    assert "user%3A1%25" in daid and "plug%3Ain.wet_dry" in daid
    parts = parse_daid(daid)
    assert parts.agent_id == "user:1%"
    assert parts.entity_id == "plug:in.wet_dry"
    assert parts.entity_type == "parameter"
    assert parts.timestamp == T0
    assert parts.hash16 == daid_hash("plug:in.wet_dry", "update", {"v": 1}, ["a", "b"])
    assert str(parts) == daid


@settings(database=None)
@given(st.text())
def test_escaping_round_trips(text: str) -> None:
    escaped = escape_id(text)
    assert ":" not in escaped
    assert unescape_id(escaped) == text


@settings(max_examples=60, deadline=None, database=None)
@given(agent=st.text(min_size=1), entity=st.text(min_size=1),
       ms=st.integers(min_value=0, max_value=4_102_444_800_000))
def test_make_parse_round_trip(agent: str, entity: str, ms: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    daid = make_daid(agent, "plugin", entity, "create", {}, timestamp=moment)
    assert len(daid.split(":")) == 7
    parts = parse_daid(daid)
    assert (parts.agent_id, parts.entity_id, parts.timestamp) == (agent, entity, moment)


GOOD = "daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcdef"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("DAID:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcdef",
         "must start with 'daid:'"),
        ("urn:v1.0:x", "must start with 'daid:'"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1", "expected 7 ':'-separated parts"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:a:l:ice:plugin:rev1:0123456789abcdef",
         "got 9"),
        ("daid:v2.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcdef",
         "unsupported version 'v2.0'"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z::plugin:rev1:0123456789abcdef", "empty agent id"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin::0123456789abcdef", "empty entity id"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:", "empty hash"),
        ("daid:v1.0:2026-11-25T20:16:03.120Z:alice:plugin:rev1:0123456789abcdef",
         "expected 7"),
        ("daid:v1.0:2026-11-25T20-16-03Z:alice:plugin:rev1:0123456789abcdef", "bad timestamp"),
        ("daid:v1.0:2026-11-25 20-16-03.120Z:alice:plugin:rev1:0123456789abcdef",
         "bad timestamp"),
        ("daid:v1.0:2026-13-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcdef",
         "month must be in 1..12"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:widget:rev1:0123456789abcdef",
         "unknown entity type 'widget'"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcde",
         "hash must be 16 hex characters, got 15"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcdef0",
         "got 17"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789ABCDEF",
         "lower-case hex"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:0123456789abcdeg",
         "lower-case hex"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:al%3Bice:plugin:rev1:0123456789abcdef",
         "bad escape '%3B'"),
        ("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev%:0123456789abcdef", "bad escape"),
    ],
)
def test_parse_daid_says_what_is_wrong(bad: str, message: str) -> None:
    assert parse_daid(GOOD).entity_id == "rev1"
    with pytest.raises(InvalidDaid) as info:
        parse_daid(bad)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.to_payload()["code"] == "INVALID_MESSAGE"


def test_parse_daid_rejects_non_strings() -> None:
    with pytest.raises(InvalidDaid, match="expected a string, got int"):
        parse_daid(42)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, database=None)
@given(details=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       text=st.text(), seq=st.integers(min_value=1, max_value=10**9))
def test_fast_hash_and_chain_inputs_equal_the_canonical_json(
    details: dict[str, Any], text: str, seq: int
) -> None:
    """The store builds hash inputs by string assembly; they must be the canonical JSON bytes."""
    details_json = canonical_json(details)
    metadata = prov._metadata_json(seq, text, "render", details_json)
    assert metadata == canonical_json(
        {"action": "render", "details": details, "seq": seq, "session_id": text}
    )
    assert prov._hash_input(text, "update", metadata, canonical_json([text])) == canonical_json(
        {"entity_id": text, "metadata": json.loads(metadata), "operation": "update",
         "parents": [text]}
    )
    content = prov._chain_content(seq, text, "ts", text, text, "a", "plugin", text, "update",
                                  details_json, "[]")
    assert content == canonical_json({
        "action": "a", "daid": text, "details": details, "entity_id": text,
        "entity_type": "plugin", "operation": "update", "parents": [], "seq": seq,
        "session_id": text, "timestamp": "ts", "user_id": text,
    })


# ---------------------------------------------------------------------------------------------
# Store basics


def test_append_returns_durable_chained_event(store: ProvenanceStore, db: Path) -> None:
    first = store.append(add("rev1"))
    assert first.seq == 1 and first.prev_hash == GENESIS_HASH
    assert first.timestamp == "2026-11-25T20:16:03.120Z"
    assert first.daid.startswith("daid:v1.0:2026-11-25T20-16-03.120Z:alice:plugin:rev1:")
    assert first.chain_hash == chain_hash(GENESIS_HASH, first)
    second = store.append(param("rev1", "wet_dry", 0.7, previous=0.3))
    assert second.seq == 2 and second.prev_hash == first.chain_hash
    store.flush()  # other connections see events once indexed (a few ms later; flush waits)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, id, user_id, action FROM daid_events").fetchall()
    assert rows == [(1, first.daid, "alice", "plugin_add"),
                    (2, second.daid, "alice", "parameter_update")]
    assert store.event(second.daid) == second
    assert store.count() == 2


def test_parents_are_the_entity_history_plus_the_plugin_creation(store: ProvenanceStore) -> None:
    created = store.append(add("rev1"))
    p1 = store.append(param("rev1", "wet_dry", 0.4))
    p2 = store.append(param("rev1", "wet_dry", 0.5))
    other = store.append(param("rev1", "room_size", 0.9))
    toggled = store.append(bypass("rev1", True))
    gone = store.append(remove("rev1"))
    assert created.parents == ()
    assert p1.parents == (created.daid,)
    assert p2.parents == tuple(sorted((p1.daid, created.daid)))
    assert other.parents == (created.daid,)
    assert toggled.parents == (created.daid,)  # previous plugin event IS the creation: deduped
    assert gone.parents == tuple(sorted((toggled.daid, created.daid)))
    readd = store.append(add("rev1"))
    after = store.append(param("rev1", "wet_dry", 0.1))
    assert readd.parents == (gone.daid,)
    assert after.parents == tuple(sorted((p2.daid, readd.daid)))


def test_parent_maps_are_rebuilt_on_reopen(db: Path) -> None:
    with ProvenanceStore(db) as first:
        created = first.append(add("rev1"))
        last = first.append(param("rev1", "wet_dry", 0.4))
    with ProvenanceStore(db) as again:
        nxt = again.append(param("rev1", "wet_dry", 0.5))
        assert nxt.seq == 3 and nxt.prev_hash == last.chain_hash
        assert nxt.parents == tuple(sorted((last.daid, created.daid)))
        assert again.verify().ok


def test_parent_maps_survive_a_lost_heads_table(db: Path) -> None:
    """entity_heads is derived data: emptied by hand, the log rebuilds it on open."""
    with ProvenanceStore(db) as first:
        created = first.append(add("rev1"))
        last = first.append(param("rev1", "wet_dry", 0.4))
    with sqlite3.connect(db) as conn:
        heads = conn.execute("SELECT entity_type, entity_id, daid FROM entity_heads "
                             "ORDER BY entity_type").fetchall()
        assert heads == [("parameter", "rev1.wet_dry", last.daid), ("plugin", "rev1", created.daid)]
        conn.execute("DELETE FROM entity_heads")
    conn.close()
    with ProvenanceStore(db) as again:
        nxt = again.append(param("rev1", "wet_dry", 0.5))
        assert nxt.parents == tuple(sorted((last.daid, created.daid)))


def test_ids_with_colons_are_escaped_in_stored_daids(store: ProvenanceStore) -> None:
    event = store.append(param("fx:1", "gain", 0.5, user="team:alice"))
    parts = parse_daid(event.daid)
    assert (parts.agent_id, parts.entity_id) == ("team:alice", "fx:1.gain")


def test_identical_events_in_one_millisecond_get_distinct_daids(db: Path) -> None:
    with ProvenanceStore(db, clock=Clock()) as store:  # the clock never moves
        events = store.append_many([auth(), auth(), auth()])
        assert len({e.daid for e in events}) == 3
        assert {e.timestamp for e in events} == {"2026-11-25T20:16:03.120Z"}


def test_truncated_hash_collision_moves_the_event_one_millisecond(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class ConstantSha:
        def __init__(self, data: bytes = b"") -> None:
            pass

        def hexdigest(self) -> str:
            return "ab" * 32

    with ProvenanceStore(db, clock=Clock()) as store:
        monkeypatch.setattr(prov.hashlib, "sha256", ConstantSha)
        first, second = store.append_many([auth(), auth()])
    assert first.daid != second.daid
    assert first.timestamp == "2026-11-25T20:16:03.120Z"
    assert second.timestamp == "2026-11-25T20:16:03.121Z"


def test_timestamps_never_go_backwards(db: Path) -> None:
    clock = Clock()
    with ProvenanceStore(db, clock=clock) as store:
        a = store.append(auth())
        clock.now = T0 - timedelta(hours=1)  # NTP stepped the clock back
        b = store.append(auth())
        clock.now = T0 + timedelta(seconds=2)
        c = store.append(auth())
    assert a.timestamp == b.timestamp == "2026-11-25T20:16:03.120Z"
    assert c.timestamp == "2026-11-25T20:16:05.120Z"


@pytest.mark.parametrize(
    ("draft", "field"),
    [
        (EventDraft("u", "s", "plugin_explode", "plugin", "p", "create", {}), "action"),
        (EventDraft("u", "s", "auth", "widget", "p", "auth", {}), "entity_type"),
        (EventDraft("u", "s", "auth", "user", "u", "login", {}), "operation"),
        (EventDraft("", "s", "auth", "user", "u", "auth", {}), "user_id"),
        (EventDraft("u", "s", "auth", "user", "u", "auth", {"x": float("nan")}), "details"),
        (EventDraft("u", "s", "auth", "user", "u", "auth", {"x": object()}), "details"),
        (EventDraft("u", "s", "auth", "user", "u", "auth", ["a"]), "details"),  # type: ignore
        (EventDraft("u", "s", "parameter_update", "parameter", "p.x", "update",
                    {"track_id": "t", "plugin_id": "p", "value": 1.0}), "details.parameter_id"),
        (EventDraft("u", "s", "plugin_add", "plugin", "p", "create", {"plugin_id": "p"}),
         "details.track_id"),
    ],
)
def test_invalid_drafts_are_refused_and_nothing_is_written(
    store: ProvenanceStore, draft: EventDraft, field: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        store.append(draft)
    assert info.value.details == {"field": field, "reason": info.value.details["reason"]}
    assert store.count() == 0


def test_appends_racing_with_close_are_refused_or_kept(db: Path) -> None:
    """Every append that returned an event is stored, even one journaled while close() ran;
    the others get StoreClosed, never another error."""
    store = ProvenanceStore(db)
    store.append(add("rev1"))
    acked: list[Any] = []
    errors: list[BaseException] = []
    go = threading.Event()

    def writer(index: int) -> None:
        go.wait()
        for k in range(10_000):
            try:
                acked.append(store.append(param("rev1", "wet_dry", k / 10_000,
                                                user=f"user{index}")))
            except StoreClosed:
                return
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    go.set()
    time.sleep(0.05)
    store.close()
    for thread in threads:
        thread.join()
    assert not errors
    assert acked
    with ProvenanceStore(db) as again:
        stored = {e.daid for e in again.events()}
        assert {e.daid for e in acked} <= stored
        assert again.verify().ok


def test_closed_store_refuses_appends(db: Path) -> None:
    store = ProvenanceStore(db)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosed):
        store.append(auth())


def test_memory_store_uses_a_private_file_removed_on_close() -> None:
    store = ProvenanceStore(":memory:")
    path = Path(store.path)
    store.append(auth())
    assert store.events()[0].action == "auth"
    store.close()
    assert not path.exists()


def test_events_filters(store: ProvenanceStore) -> None:
    store.append(add("rev1"))
    store.append(param("rev1", "wet_dry", 0.4, user="bob"))
    store.append(add("dly1", session="s2", user="bob"))
    store.append(param("dly1", "mix", 0.2, session="s2", user="carol"))
    assert [e.seq for e in store.events()] == [1, 2, 3, 4]
    assert [e.seq for e in store.events("s2")] == [3, 4]
    assert [e.seq for e in store.events(user_id="bob")] == [2, 3]
    assert [e.seq for e in store.events(action="plugin_add")] == [1, 3]
    assert [e.seq for e in store.events(plugin_id="dly1")] == [3, 4]
    assert [e.seq for e in store.events(entity_id="rev1.wet_dry")] == [2]
    assert [e.seq for e in store.events(since_seq=2, until_seq=3)] == [2, 3]
    assert [e.seq for e in store.events(start="2026-11-25T20:16:03.125Z",
                                        end=T0 + timedelta(milliseconds=10))] == [2, 3]
    assert [e.seq for e in store.events(limit=1)] == [1]
    # bounds between two milliseconds: nothing before start or after end (start rounds up)
    half = timedelta(microseconds=500)
    assert [e.seq for e in store.events(start=T0 + half)] == [2, 3, 4]
    assert [e.seq for e in store.events(end=T0 + timedelta(milliseconds=5) + half)] == [1, 2]
    assert store.sessions() == ["s1", "s2"]
    with pytest.raises(DaidNotFound):
        store.event(make_daid("x", "user", "x", "auth", {}))


# ---------------------------------------------------------------------------------------------
# Group commit, durability, atomicity, asyncio


def test_eight_concurrent_writers_lose_nothing(db: Path) -> None:
    threads_n, per_thread = 8, 150
    results: dict[int, list[Any]] = {}

    with ProvenanceStore(db) as store:
        store.append(add("rev1"))

        def work(index: int) -> None:
            results[index] = [
                store.append(param("rev1", "wet_dry", k / per_thread, user=f"user{index}"))
                for k in range(per_thread)
            ]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seqs = [e.seq for events in results.values() for e in events]
        assert sorted(seqs) == list(range(2, 2 + threads_n * per_thread))  # unique, gap-free
        for events in results.values():  # each writer's events in its own order
            assert [e.seq for e in events] == sorted(e.seq for e in events)
        stored = store.events()
        assert [e.seq for e in stored] == list(range(1, 2 + threads_n * per_thread))
        assert {e.daid for e in stored} >= {e.daid for ev in results.values() for e in ev}
        assert store.verify().ok
        # the parameter's history is one chain: every update's parents include the previous one
        updates = [e for e in stored if e.action == "parameter_update"]
        for before, after in itertools.pairwise(updates):
            assert before.daid in after.parents


CRASH_WRITER = textwrap.dedent(
    """
    import sys, threading
    from pluginlab.provenance import EventDraft, ProvenanceStore

    store = ProvenanceStore(sys.argv[1])
    lock = threading.Lock()

    def work(worker):
        k = 0
        while True:
            event = store.append(EventDraft(
                f"user{worker}", "crash", "parameter_update", "parameter", "rev.wet_dry",
                "update", {"track_id": "t", "plugin_id": "rev", "parameter_id": "wet_dry",
                           "value": worker * 1_000_000 + k}))
            with lock:  # one write per line: lines never interleave
                sys.stdout.write(f"{event.seq} {event.daid} {worker * 1_000_000 + k}\\n")
                sys.stdout.flush()
            k += 1

    for worker in range(4):
        threading.Thread(target=work, args=(worker,), daemon=True).start()
    threading.Event().wait()
    """
)


def test_sigkill_loses_no_acknowledged_event(db: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(db)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=subprocess_env(), cwd=ROOT, text=True,
    )
    acked: list[tuple[int, str, int]] = []
    try:
        assert process.stdout is not None
        while len(acked) < 400:
            line = process.stdout.readline()
            assert line, f"writer died: {process.stderr.read() if process.stderr else ''}"
            seq, daid, value = line.split()
            acked.append((int(seq), daid, int(value)))
        process.send_signal(signal.SIGKILL)
        rest = process.stdout.read()  # lines already written before the kill are acks too
        acked += [(int(s), d, int(v)) for s, d, v in
                  (ln.split() for ln in rest.splitlines(keepends=True) if ln.endswith("\n"))]
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    with ProvenanceStore(db) as store:
        stored = {e.seq: e for e in store.events()}
        assert sorted(stored) == list(range(1, len(stored) + 1))
        for seq, daid, value in acked:
            assert stored[seq].daid == daid
            assert stored[seq].details["value"] == value
        assert store.verify().ok
        assert store.append(auth()).seq == len(stored) + 1  # and the log goes on


JOURNAL_ONLY_WRITER = textwrap.dedent(
    """
    import sys
    from pluginlab import provenance
    from pluginlab.provenance import EventDraft, ProvenanceStore

    provenance.INDEX_LINGER = 3600.0  # the indexer waits: acknowledged events are only journaled
    store = ProvenanceStore(sys.argv[1], max_batch=1_000_000)
    for k in range(50):
        event = store.append(EventDraft(
            "alice", "s1", "parameter_update", "parameter", "rev.wet_dry", "update",
            {"track_id": "t", "plugin_id": "rev", "parameter_id": "wet_dry", "value": k}))
        sys.stdout.write(f"{event.seq} {event.daid}\\n")
    sys.stdout.flush()
    sys.stdin.read()  # killed here
    """
)


def kill_after_journaling(db: Path) -> list[list[str]]:
    """Run JOURNAL_ONLY_WRITER on ``db`` and SIGKILL it; its 50 acknowledgements."""
    process = subprocess.Popen(
        [sys.executable, "-c", JOURNAL_ONLY_WRITER, str(db)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), cwd=ROOT,
        text=True,
    )
    try:
        assert process.stdout is not None
        acked = [process.stdout.readline().split() for _ in range(50)]
        assert all(len(a) == 2 for a in acked), process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=10)
    with sqlite3.connect(db) as conn:  # nothing indexed: the journal alone holds them
        assert conn.execute("SELECT COUNT(*) FROM daid_events").fetchone()[0] == 0
    conn.close()
    assert len(read_records(journal_path(str(db)))) == 50
    return acked


def test_events_only_in_the_journal_are_stored_by_the_next_open(db: Path) -> None:
    acked = kill_after_journaling(db)
    assert prov.unindexed_events(db) == 50
    with ProvenanceStore(db) as store:
        assert prov.unindexed_events(db) == 0  # in use: that store indexes its own
        stored = store.events()
        assert [[str(e.seq), e.daid] for e in stored] == acked
        assert [e.details["value"] for e in stored] == list(range(50))
        assert store.verify().ok
        assert read_records(journal_path(str(db))) == []
        assert store.append(auth()).seq == 51


def test_the_cli_reports_and_stores_events_left_in_the_journal(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acked = kill_after_journaling(db)
    assert run_cli("daid", "verify", str(db)) == 0
    out = capsys.readouterr().out
    assert "50 acknowledged event(s) are only in the journal" in out and "OK: 0 events" in out
    assert run_cli("db", "migrate", str(db)) == 0
    assert "stored 50 acknowledged event(s)" in capsys.readouterr().out
    assert run_cli("daid", "verify", str(db)) == 0
    out = capsys.readouterr().out
    assert "OK: 50 events" in out and "journal" not in out
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM daid_events ORDER BY seq")] == \
            [daid for _seq, daid in acked]
    conn.close()


def test_reads_that_would_miss_journaled_events_say_so(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pluginlab.analysis import events_frame

    kill_after_journaling(db)
    message = "50 acknowledged event(s) are only in the journal"
    with pytest.warns(prov.UnindexedEventsWarning, match=re.escape(message)):
        reader = ProvenanceReader(db)
    assert reader.count() == 0  # what the tables hold: the warning says what is missing
    with pytest.warns(prov.UnindexedEventsWarning, match="pluginlab db migrate"):
        assert len(events_frame(db)) == 0
    out = tmp_path / "events.csv"
    assert run_cli("events", "export", str(db), "--format", "csv", "--out", str(out)) == 0
    assert f"warning: {db}: {message}" in capsys.readouterr().err
    assert run_cli("db", "migrate", str(db)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stored now: nothing to warn about
        assert ProvenanceReader(db).count() == 50
        assert len(events_frame(db)) == 50


def test_serve_says_when_it_stops_with_events_left_in_the_journal(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that could not index (a full disk) exits 1 naming the count and the command,
    instead of exit 0 as if all was stored."""
    from pluginlab.server_cli import _report_unindexed

    assert _report_unindexed(str(db)) == 0
    kill_after_journaling(db)
    assert _report_unindexed(str(db)) == 1
    err = capsys.readouterr().err
    assert "50 acknowledged event(s) could not be indexed" in err
    assert f"pluginlab db migrate {db}" in err
    assert _report_unindexed(None) == 0


def test_a_torn_last_record_was_never_acknowledged_and_is_dropped(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ProvenanceStore(db) as store:
        first = store.append(add("rev1"))
    path = journal_path(str(db))
    monkeypatch.setattr(prov, "INDEX_LINGER", 3600.0)  # the indexer waits for close()
    with ProvenanceStore(db) as store:  # write a second one, then tear its journal line
        second = store.append(param("rev1", "wet_dry", 0.3))
        data = Path(path).read_bytes().rstrip(b"\0")  # the rest of the file is zeros
        assert data.endswith(b"\n") and f'[{second.seq},"{second.daid}"'.encode() in data
    monkeypatch.undo()
    # as if the process died in the middle of writing the line
    Path(path).write_bytes(data[: len(data) // 2] + bytes(1000))
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM daid_events WHERE seq = 2")
        conn.execute("UPDATE chain_head SET seq = 1, chain_hash = ?", (first.chain_hash,))
    conn.close()
    with ProvenanceStore(db) as store:
        assert [e.seq for e in store.events()] == [1]
        assert store.verify().ok
        assert store.append(auth()).seq == 2


def test_one_writer_per_database(db: Path) -> None:
    with ProvenanceStore(db) as store:
        with pytest.raises(prov.JournalBusy, match="open for writing by another"):
            ProvenanceStore(db)
        assert store.append(auth()).seq == 1  # the first one is unaffected
    with ProvenanceStore(db) as again:  # released on close
        assert again.count() == 1


def test_append_many_is_all_or_nothing(store: ProvenanceStore, db: Path) -> None:
    store.append(add("rev1"))
    good = [param("rev1", "wet_dry", 0.1 * k, batch_id="b1") for k in range(5)]
    with pytest.raises(InvalidEvent):  # refused before anything is queued
        store.append_many([*good[:2], EventDraft("u", "s1", "nope", "plugin", "x", "update", {}),
                           *good[2:]])
    assert store.count() == 1
    events = store.append_many(good)
    assert [e.seq for e in events] == [2, 3, 4, 5, 6]
    assert store.session_state("s1")["t1"][0]["parameters"]["wet_dry"] == pytest.approx(0.4)
    assert store.verify().ok
    assert store.append_many([]) == []


READER_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pluginlab.provenance import ProvenanceReader, ProvenanceStore, JournalBusy
    try:
        ProvenanceStore(sys.argv[1])
        busy = False
    except JournalBusy:
        busy = True
    with ProvenanceReader(sys.argv[1]) as reader:
        print(json.dumps({"busy": busy, "count": reader.count(), "ok": reader.verify().ok,
                          "state": reader.session_state("s1")}))
    """
)


def test_a_reader_works_while_a_store_writes_in_another_process(db: Path) -> None:
    with ProvenanceStore(db) as store:
        store.append(add("rev1"))
        store.append(param("rev1", "wet_dry", 0.25))
        store.flush()  # what another process can see is what has been indexed
        result = run_process([sys.executable, "-c", READER_PROCESS, str(db)])
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["busy"] is True  # a second writer is refused ...
        assert seen["count"] == 2 and seen["ok"]  # ... a reader is not
        assert seen["state"]["t1"][0]["parameters"]["wet_dry"] == 0.25
        assert store.append(auth()).seq == 3  # and the writer goes on


def test_a_reader_in_the_writing_process_sees_every_acknowledged_event(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prov, "INDEX_LINGER", 3600.0)  # nothing is indexed unless a read asks
    with ProvenanceStore(db) as store:
        events = [store.append(add("rev1")), store.append(param("rev1", "wet_dry", 0.5))]
        reader = prov.ProvenanceReader(db)
        assert reader.events() == events
        assert reader.event(events[1].daid) == events[1]
        assert reader.state_at("s1") == store.session_state("s1")
        before = db.stat().st_mtime_ns, db.stat().st_size
        assert reader.count() == 2 and reader.sessions() == ["s1"]
        assert (db.stat().st_mtime_ns, db.stat().st_size) == before  # reads change nothing
        with pytest.raises(AttributeError):
            reader.append(auth())  # type: ignore[attr-defined]
    with pytest.raises(FileNotFoundError):
        prov.ProvenanceReader(db.parent / "missing.sqlite")


def refuse_inserts(db: Path, when: str = "") -> None:
    """Make SQLite itself refuse new daid_events rows (all, or those matching ``when``)."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON daid_events {when} "
                     "BEGIN SELECT RAISE(ABORT, 'no'); END")
    conn.close()


def allow_inserts(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER refuse")
    conn.close()


def test_a_database_that_refuses_rows_loses_no_acknowledged_event(db: Path) -> None:
    """Acknowledged = journaled: if SQLite refuses to index them, reads say so (no stale
    answer), the events wait in the journal, and they are stored once it accepts them again."""
    with ProvenanceStore(db) as store:
        store.append(add("rev1"))
        store.flush()
        refuse_inserts(db, "WHEN NEW.user_id = 'mallory'")
        acked = [store.append(param("rev1", "wet_dry", k / 10, user=user))
                 for k, user in enumerate(["amy", "mallory", "bob"])]
        assert [e.seq for e in acked] == [2, 3, 4]
        with pytest.raises(sqlite3.IntegrityError, match="no"):
            store.count()
        with pytest.raises(sqlite3.IntegrityError):
            prov.verify_database(db)  # any in-process read through the module waits too
        assert [r[0] for r in read_records(journal_path(str(db)))] == [2, 3, 4]
        allow_inserts(db)
        deadline = time.monotonic() + 10
        while True:  # the indexer retries on its own
            try:
                store.flush()
                break
            except sqlite3.IntegrityError:
                assert time.monotonic() < deadline, "the indexer never retried"
                time.sleep(0.02)
        assert [(e.seq, e.daid) for e in store.events()][1:] == [(e.seq, e.daid) for e in acked]
        assert store.session_state("s1")["t1"][0]["parameters"]["wet_dry"] == pytest.approx(0.2)
        assert store.verify().ok
        assert read_records(journal_path(str(db))) == []  # indexed, so the journal is emptied


def test_refused_while_closing_means_stored_on_the_next_open(db: Path) -> None:
    store = ProvenanceStore(db)
    store.append(add("rev1"))
    store.flush()
    refuse_inserts(db)
    acked = store.append(param("rev1", "wet_dry", 0.7))
    store.close()  # cannot index it: it stays journaled
    allow_inserts(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM daid_events").fetchone()[0] == 1
    conn.close()
    with ProvenanceStore(db) as again:
        assert again.event(acked.daid) == acked
        assert again.session_state("s1")["t1"][0]["parameters"]["wet_dry"] == 0.7
        assert again.verify().ok


FULL_DISK_WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    from pluginlab.provenance import EventDraft, ProvenanceStore

    def draft(text):
        return EventDraft("alice", "s1", "preset_save", "preset", "p", "preset_save",
                          {"note": text})

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG instead of a kill
    store = ProvenanceStore(sys.argv[1])
    print(store.append(draft("small")).seq, flush=True)
    store.flush()
    resource.setrlimit(resource.RLIMIT_FSIZE, (6_000_000, resource.RLIM_INFINITY))
    try:
        store.append_many([draft("x" * 1_000_000) for _ in range(7)])  # 7 MB: cannot fit
    except OSError as exc:
        print("refused", exc.errno, flush=True)
    print(store.append(draft("after")).seq, flush=True)
    store.close()
    """
)


def test_a_full_disk_refuses_the_whole_group_and_the_log_goes_on(db: Path) -> None:
    """A real write failure (file size limit: EFBIG, as on a full disk)."""
    result = run_process([sys.executable, "-c", FULL_DISK_WRITER, str(db)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["1", f"refused {errno.EFBIG}", "2"]
    with ProvenanceStore(db) as store:
        notes = [e.details["note"] for e in store.events()]
        assert notes == ["small", "after"]  # no part of the refused group, no gap in seq
        assert store.verify().ok


def test_append_async_keeps_the_event_loop_running(store: ProvenanceStore) -> None:
    async def scenario() -> tuple[list[Any], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await store.append_async(add("rev1"))
        events = await asyncio.gather(
            *(store.append_async(param("rev1", "wet_dry", k / 100)) for k in range(100))
        )
        batch = await store.append_many_async([param("rev1", "room_size", 0.1),
                                               param("rev1", "room_size", 0.2)])
        stop.set()
        await task
        return [*events, *batch], ticks

    events, ticks = asyncio.run(scenario())
    assert sorted(e.seq for e in events) == list(range(2, 104))
    assert ticks > 0
    assert store.state_at("s1") == store.session_state("s1")
    assert store.session_state("s1")["t1"][0]["parameters"]["room_size"] == 0.2


def test_fsync_mode_uses_synchronous_full(db: Path) -> None:
    with ProvenanceStore(db, fsync=True) as store:
        assert store._wconn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._wconn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.append(auth()).seq == 1


# ---------------------------------------------------------------------------------------------
# Projection and time travel


def expected_plugin(plugin_id: str, parameters: dict[str, float], *, created: Any,
                    updated: Any, bypass_on: bool = False) -> dict[str, Any]:
    return {
        "plugin_id": plugin_id, "name": "Reverb", "plugin_path": None, "bypass": bypass_on,
        "parameters": parameters, "created_by": "alice", "created_at": created.timestamp,
        "updated_at": updated.timestamp, "daid_id": updated.daid,
    }


def test_projection_session_state_equals_replayed_state(db: Path) -> None:
    clock = Clock(step=timedelta(seconds=1))
    with ProvenanceStore(db, clock=clock) as store:
        a = store.append(add("A"))
        b = store.append(add("B", wet_dry=0.1))
        c = store.append(add("C", track="t2", wet_dry=0.9))
        pa = store.append(param("A", "wet_dry", 0.8, previous=0.3))
        byp = store.append(bypass("B", True))
        pre = store.append(preset("A", "hall", {"wet_dry": 0.5, "room_size": 0.95}))
        mv = store.append(move("B", 0))  # chain on t1: B, A
        store.append(EventDraft("alice", "s1", "preset_save", "preset", "A.mine", "preset_save",
                                {"track_id": "t1", "plugin_id": "A", "preset_name": "mine"}))
        store.append(EventDraft("alice", "s1", "render", "render", "r1", "render",
                                {"duration": 2.0}))
        store.append(remove("C", track="t2"))  # t2 stays, empty
        expected = {
            "t1": [
                expected_plugin("B", {"wet_dry": 0.1}, created=b, updated=mv, bypass_on=True),
                expected_plugin("A", {"wet_dry": 0.5, "room_size": 0.95}, created=a, updated=pre),
            ],
            "t2": [],
        }
        assert store.session_state("s1") == expected
        assert store.state_at("s1") == expected
        assert store.state_at("s1", datetime.now(UTC)) == expected
        assert list(store.session_state("s1")) == ["t1", "t2"]
        assert byp.seq < mv.seq and c.seq < pa.seq
    with ProvenanceStore(db) as reopened:  # the projection survives a restart
        assert reopened.session_state("s1") == expected
        assert reopened.sessions() == ["s1"]


def test_state_at_intermediate_time_and_daid(db: Path) -> None:
    clock = Clock(step=timedelta(seconds=1))
    with ProvenanceStore(db, clock=clock) as store:
        created = store.append(add("A"))                         # 20:16:03.120
        first = store.append(param("A", "wet_dry", 0.6))         # 20:16:04.120
        store.append(param("A", "wet_dry", 0.7))                 # 20:16:05.120
        store.append(remove("A"))                                # 20:16:06.120
        assert store.state_at("s1", T0 - timedelta(seconds=1)) == {}
        at_create = store.state_at("s1", T0)
        assert at_create["t1"][0]["parameters"]["wet_dry"] == 0.3
        middle = store.state_at("s1", "2026-11-25T20:16:04.500Z")
        assert middle["t1"][0]["parameters"]["wet_dry"] == 0.6
        assert middle["t1"][0]["daid_id"] == first.daid
        assert store.state_at("s1", datetime(2026, 11, 25, 20, 16, 5, 120000)) == {  # naive=UTC
            "t1": [expected_plugin("A", {"wet_dry": 0.7, "room_size": 0.5}, created=created,
                                   updated=store.events(action="parameter_update")[-1])]
        }
        assert store.state_at("s1", daid=first.daid) == middle
        assert store.state_at("s1") == {"t1": []}
        with pytest.raises(ValueError, match="either at or daid"):
            store.state_at("s1", T0, daid=first.daid)
        with pytest.raises(DaidNotFound):
            store.state_at("s1", daid=make_daid("x", "user", "x", "auth", {}))
        with pytest.raises(InvalidDaid):
            store.state_at("s1", daid="daid:nope")


def test_sessions_are_isolated_and_moves_can_cross_tracks(store: ProvenanceStore) -> None:
    store.append(add("A"))
    store.append(add("B"))
    store.append(add("A", session="s2", user="bob"))  # same plugin id, other session
    store.append(EventDraft("alice", "s1", "plugin_move", "plugin", "A", "move",
                            {"track_id": "bus", "plugin_id": "A", "index": 0}))
    state = store.session_state("s1")
    assert [p["plugin_id"] for p in state["t1"]] == ["B"]
    assert [p["plugin_id"] for p in state["bus"]] == ["A"]
    assert store.state_at("s1") == state
    assert [p["created_by"] for p in store.session_state("s2")["t1"]] == ["bob"]
    with sqlite3.connect(store.path) as conn:
        positions = conn.execute(
            "SELECT session_id, track_id, plugin_id, position FROM plugin_configurations "
            "ORDER BY session_id, track_id, position").fetchall()
    assert positions == [("s1", "bus", "A", 0), ("s1", "t1", "B", 0), ("s2", "t1", "A", 0)]


def test_apply_event_is_a_pure_replay_step() -> None:
    def event(seq: int, draft: EventDraft) -> prov.Event:
        return prov.Event(seq, f"d{seq}", f"ts{seq}", draft.user_id, draft.session_id,
                          draft.action, draft.entity_type, draft.entity_id, draft.operation,
                          draft.details, (), "", "")

    state: dict[str, list[dict[str, Any]]] = {}
    apply_event(state, event(1, add("A", index=0)))
    apply_event(state, event(2, add("B", index=0)))  # inserted before A
    apply_event(state, event(3, param("ghost", "x", 1.0)))  # unknown plugin: no effect
    apply_event(state, event(4, auth()))
    assert [p["plugin_id"] for p in state["t1"]] == ["B", "A"]
    apply_event(state, event(5, move("B", 99)))  # clamped to the end
    assert [p["plugin_id"] for p in state["t1"]] == ["A", "B"]
    assert state["t1"][1]["updated_at"] == "ts5" and state["t1"][1]["daid_id"] == "d5"


# ---------------------------------------------------------------------------------------------
# Tamper evidence


def tampered(db: Path, *statements: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        for sql in statements:
            conn.execute(sql)
    conn.close()


@pytest.fixture()
def ten_events(db: Path) -> Path:
    with ProvenanceStore(db, clock=Clock(step=timedelta(milliseconds=1))) as store:
        store.append(add("rev1"))
        store.append_many([param("rev1", "wet_dry", k / 10) for k in range(9)])
        assert store.verify() == prov.VerifyResult(True, 10, None, "ok")
    return db


@pytest.mark.parametrize(
    ("statements", "seq", "reason"),
    [
        (["UPDATE daid_events SET details = json_set(details, '$.value', 0.55) WHERE seq = 5"],
         5, "row edited"),
        (["UPDATE daid_events SET user_id = 'mallory' WHERE seq = 3"], 3, "row edited"),
        (["DELETE FROM daid_events WHERE seq = 4"], 4, "seq 4 missing (row deleted)"),
        (["DELETE FROM daid_events WHERE seq IN (4, 5, 6)"], 4, "seq 4..6 missing"),
        (["UPDATE daid_events SET seq = -7 WHERE seq = 7",
          "UPDATE daid_events SET seq = 7 WHERE seq = 8",
          "UPDATE daid_events SET seq = 8 WHERE seq = -7"], 7, "rows reordered"),
        (["DELETE FROM daid_events WHERE seq = 10"], 10, "log truncated"),
        (["UPDATE daid_events SET prev_hash = chain_hash WHERE seq = 6"], 6,
         "prev_hash does not match"),
        (["DELETE FROM daid_events WHERE seq = 10", "DELETE FROM chain_head"], None,
         "chain head row is missing"),
    ],
)
def test_verify_finds_the_first_broken_row(
    ten_events: Path, statements: list[str], seq: int | None, reason: str
) -> None:
    tampered(ten_events, *statements)
    result = verify_database(ten_events)
    assert not result.ok
    assert result.first_bad_seq == seq
    assert reason in result.reason
    assert result.checked == (seq - 1 if seq is not None else 9)


def test_verify_catches_a_rehashed_edit_through_the_daid(ten_events: Path) -> None:
    """An editor who also recomputes the row's chain hash is caught by the DAID hash."""
    conn = sqlite3.connect(ten_events)
    row = conn.execute(f"SELECT {prov._EVENT_COLUMNS} FROM daid_events WHERE seq = 10").fetchone()
    details = json.loads(row[9])
    details["value"] = 0.123
    new_details = canonical_json(details)
    content = prov._chain_content(*row[:9], new_details, row[10])
    new_hash = hashlib.sha256((row[11] + content).encode()).hexdigest()
    with conn:
        conn.execute("UPDATE daid_events SET details = ?, chain_hash = ? WHERE seq = 10",
                     (new_details, new_hash))
        conn.execute("UPDATE chain_head SET chain_hash = ?", (new_hash,))
    conn.close()
    result = verify_database(ten_events)
    assert (result.ok, result.first_bad_seq) == (False, 10)
    assert "DAID hash does not match" in result.reason


def test_verify_through_the_api_and_the_cli(
    ten_events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("daid", "verify", str(ten_events)) == 0
    assert "OK: 10 events" in capsys.readouterr().out
    tampered(ten_events, "UPDATE daid_events SET details = "
                         "json_set(details, '$.value', 9.0) WHERE seq = 2")
    with ProvenanceStore(ten_events) as store:
        result = store.verify()
        assert (result.ok, result.first_bad_seq) == (False, 2)
    assert run_cli("daid", "verify", str(ten_events)) == 1
    assert "BROKEN at seq 2" in capsys.readouterr().out
    assert run_cli("daid", "verify", str(ten_events.parent / "missing.sqlite")) == 2


@pytest.mark.parametrize(("statement", "said"), [
    ("UPDATE plugin_configurations SET parameters = json_set(parameters, '$.wet_dry', 24.0)",
     "parameter wet_dry 24.0 stored, 0.8 in the log"),
    ("UPDATE plugin_configurations SET bypass = 1", "bypass True stored, False in the log"),
    ("DELETE FROM plugin_configurations", "holds [] stored, ['rev1'] in the log"),
    ("INSERT INTO session_tracks (session_id, track_id) VALUES ('s1', 'ghost')",
     "tracks ['t1', 'ghost'] stored, ['t1'] in the log"),
])
def test_verify_compares_what_restores_read_with_the_log(
    ten_events: Path, statement: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stored state is not in the hash chain: an edit of it would change what a restart
    restores (e.g. 27 dB louder) while the chain stays intact."""
    tampered(ten_events, statement)
    result = verify_database(ten_events)
    assert not result.ok and result.checked == 10 and result.first_bad_seq is None
    assert said in result.reason and "session 's1'" in result.reason
    assert run_cli("daid", "verify", str(ten_events)) == 1
    assert said in capsys.readouterr().out


def test_verify_reports_a_damaged_file(ten_events: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A torn index page leaves every row readable through the table, so the chain alone
    would say OK while filtered reads fail: SQLite's own check runs first."""
    with sqlite3.connect(ten_events) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master "
                            "WHERE name = 'idx_daid_events_user_id'").fetchone()[0]
    conn.close()
    with open(ten_events, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xff" * page_size)
    result = verify_database(ten_events)
    assert not result.ok and result.first_bad_seq is None
    assert "damaged" in result.reason
    assert run_cli("daid", "verify", str(ten_events)) == 1
    out = capsys.readouterr().out
    assert out.startswith("BROKEN: the database file is damaged") and "OK:" not in out


def test_verify_cli_as_a_real_process(ten_events: Path) -> None:
    command = [sys.executable, "-m", "pluginlab.provenance_cli", "daid", "verify",
               str(ten_events)]
    ok = run_process(command)
    assert ok.returncode == 0, ok.stderr
    assert "hash chain intact" in ok.stdout
    tampered(ten_events, "DELETE FROM daid_events WHERE seq = 3")
    bad = run_process(command)
    assert bad.returncode == 1
    assert "BROKEN at seq 3" in bad.stdout and "missing" in bad.stdout


# ---------------------------------------------------------------------------------------------
# Migrations


def columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_xinfo({table})")]


def test_migrating_the_old_schema_keeps_every_row(tmp_path: Path) -> None:
    db = old_database(tmp_path / "old.sqlite")
    with sqlite3.connect(db) as conn:
        original = conn.execute(
            "SELECT id, track_id, plugin_name, plugin_path, parameters, position "
            "FROM plugin_configurations ORDER BY id").fetchall()
    assert len(original) == 4
    assert migrate_database(db) == (0, SCHEMA_VERSION)
    for name in ("session_id", "created_by", "created_at", "updated_at", "daid_id",
                 "plugin_id", "name", "bypass"):
        assert name in columns(db, "plugin_configurations")
    for name in ("id", "seq", "user_id", "action", "details", "timestamp", "session_id",
                 "entity_type", "entity_id", "operation", "parents", "prev_hash", "chain_hash"):
        assert name in columns(db, "daid_events")
    with sqlite3.connect(db) as conn:
        after = conn.execute(
            "SELECT id, track_id, plugin_name, plugin_path, parameters, position "
            "FROM plugin_configurations ORDER BY id").fetchall()
        backfill = conn.execute(
            "SELECT id, session_id, created_by, daid_id, plugin_id, name, created_at "
            "FROM plugin_configurations ORDER BY id").fetchall()
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(daid_events)")}
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert after == original  # nothing lost, nothing changed
    for row_id, session, created_by, daid_id, plugin_id, name, created_at in backfill:
        assert (session, created_by, daid_id, plugin_id) == (
            "legacy_session", "migration_script", f"daid_{row_id}", row_id)
        assert name and created_at.endswith("Z")
    assert {"idx_daid_events_user_id", "idx_daid_events_action",
            "idx_daid_events_timestamp"} <= indexes
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    digest = file_digest(db)
    assert migrate_database(db) == (SCHEMA_VERSION, SCHEMA_VERSION)  # a second run: no-op
    assert file_digest(db) == digest
    with ProvenanceStore(db) as store:  # the store opens it and serves the legacy plugins
        legacy = store.session_state("legacy_session")
        assert [p["plugin_id"] for p in legacy["track_1"]] == [
            "plugin_1700000000001", "plugin_1700000000002"]
        assert legacy["track_2"][1]["plugin_id"] == "plugin:with:colons"
        assert legacy["track_1"][0]["parameters"] == {"wet_dry": 0.35, "room_size": 0.8}
        event = store.append(param("plugin_1700000000001", "wet_dry", 0.5, track="track_1",
                                   session="legacy_session", user="bob"))
        assert store.session_state("legacy_session")["track_1"][0]["parameters"]["wet_dry"] == 0.5
        assert store.session_state("legacy_session")["track_1"][0]["daid_id"] == event.daid
        assert store.verify().ok


def test_migration_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = old_database(tmp_path / "old.sqlite")
    assert run_cli("db", "migrate", str(db)) == 0
    assert f"schema version 0 -> {SCHEMA_VERSION}" in capsys.readouterr().out
    assert run_cli("db", "migrate", str(db)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run_cli("db", "migrate", str(tmp_path / "absent.sqlite")) == 2
    assert not (tmp_path / "absent.sqlite").exists()


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    db = old_database(tmp_path / "future.sqlite")
    migrate_database(db)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 'x', 'from the future')",
                     (SCHEMA_VERSION + 1,))
    conn.close()
    digest = file_digest(db)
    with pytest.raises(SchemaTooNew) as info:
        migrate_database(db)
    assert f"schema version {SCHEMA_VERSION + 1} is newer" in str(info.value)
    with pytest.raises(SchemaTooNew):
        ProvenanceStore(db)
    assert run_cli("db", "migrate", str(db)) == 2
    assert run_cli("daid", "verify", str(db)) == 2
    assert "newer" in capsys.readouterr().err
    assert file_digest(db) == digest


def test_migration_keeps_rows_of_a_hand_made_daid_events_table(tmp_path: Path) -> None:
    """The user's SQL may already have created daid_events (its 5 columns) with rows."""
    db = tmp_path / "partial.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE plugin_configurations (id TEXT PRIMARY KEY, track_id TEXT,
                plugin_name TEXT, plugin_path TEXT, parameters TEXT);
            INSERT INTO plugin_configurations VALUES ('a', 't', 'Reverb', NULL, '{}'),
                ('b', 't', 'Delay', NULL, '{"mix": 0.5}');
            CREATE TABLE daid_events (id VARCHAR(255) PRIMARY KEY, user_id VARCHAR(255) NOT NULL,
                action VARCHAR(100) NOT NULL, details JSON, timestamp TIMESTAMP);
            INSERT INTO daid_events VALUES
                ('ev2', 'bob', 'plugin_added', '{"session_id": "jam"}', '2024-01-01 10:00:02'),
                ('ev1', 'amy', 'plugin_added', 'not json', '2024-01-01 10:00:01');
            """
        )
    conn.close()
    assert migrate_database(db) == (0, SCHEMA_VERSION)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT seq, id, user_id, session_id, details FROM daid_events ORDER BY seq"
        ).fetchall()
        positions = conn.execute(
            "SELECT id, position FROM plugin_configurations ORDER BY id").fetchall()
    conn.close()
    assert rows == [
        (1, "ev1", "amy", "legacy_session",
         '{"legacy_details":"not json","legacy_timestamp":"2024-01-01 10:00:01"}'),
        (2, "ev2", "bob", "jam", '{"legacy_timestamp":"2024-01-01 10:00:02","session_id":"jam"}')]
    assert positions == [("a", 0), ("b", 1)]
    assert verify_database(db).ok
    with ProvenanceStore(db) as store:
        assert store.append(auth()).seq == 3
        assert store.verify().ok


def test_an_integer_keyed_plugin_table_gets_text_ids(tmp_path: Path) -> None:
    """The old system's auto-increment ids: pluginlab's own plugins must still be storable."""
    db = tmp_path / "intid.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE plugin_configurations (id INTEGER PRIMARY KEY AUTOINCREMENT,
                track_id TEXT, plugin_name TEXT, plugin_path TEXT, parameters JSON,
                owner TEXT NOT NULL DEFAULT 'lab');
            CREATE INDEX idx_owner ON plugin_configurations(owner);
            INSERT INTO plugin_configurations(track_id, plugin_name, parameters)
                VALUES ('t1', 'Reverb', '{"wet_dry": 0.4}'), ('t1', 'Delay', '{}');
            """
        )
    conn.close()
    assert migrate_database(db) == (0, SCHEMA_VERSION)
    with ProvenanceStore(db) as store:
        store.append(add("p_new", "t9", session="jam"))
        store.flush()  # the indexer writes the new plugin's row: it used to fail here
        assert [p["plugin_id"] for p in store.session_state("jam")["t9"]] == ["p_new"]
        legacy = store.session_state("legacy_session")["t1"]
        assert [(p["plugin_id"], p["parameters"]) for p in legacy] == [
            ("1", {"wet_dry": 0.4}), ("2", {})]
    with ProvenanceStore(db) as store:  # and it opens again
        assert store.count() == 1 and store.verify().ok
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, daid_id, owner, position FROM plugin_configurations "
                            "WHERE session_id = 'legacy_session' ORDER BY rowid").fetchall()
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(plugin_configurations)")}
    conn.close()
    assert rows == [("1", "daid_1", "lab", 0), ("2", "daid_2", "lab", 1)]
    assert "idx_owner" in indexes


def test_migration_reads_the_old_systems_timestamps(tmp_path: Path) -> None:
    """Epoch numbers, SQLite's and JavaScript's formats become pluginlab's ISO form, so time
    filters work on old rows; unreadable ones are kept, last, with their original text."""
    db = tmp_path / "stamps.sqlite"
    rows = [("e_ms", 1740823200000),  # Date.now(): 2025-03-01T10:00:00Z
            ("e_s", 1740816000),  # seconds: 08:00
            ("e_text_ms", "1740826800000"),  # 11:00 (stored as a number: NUMERIC affinity)
            ("e_sqlite", "2025-03-01 12:00:00"),
            ("e_js", "Sat Mar 01 2025 14:00:00 GMT+0100 (Central European Standard Time)"),
            ("e_rfc", "Sat, 01 Mar 2025 09:00:00 +0000"),
            ("e_iso", "2025-03-02T00:00:00.000Z"),
            ("e_bad", "last tuesday"),
            ("e_none", None)]
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE daid_events (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
                     "action TEXT NOT NULL, details JSON, timestamp TIMESTAMP)")
        conn.executemany("INSERT INTO daid_events VALUES (?, 'ann', 'legacy', '{}', ?)", rows)
    conn.close()
    assert run_cli("db", "migrate", str(db)) == 0
    with ProvenanceStore(db) as store:
        events = store.events()
        got = [(e.daid, e.timestamp, e.details.get("legacy_timestamp")) for e in events]
        assert got[:7] == [
            ("e_s", "2025-03-01T08:00:00.000Z", 1740816000),
            ("e_rfc", "2025-03-01T09:00:00.000Z", "Sat, 01 Mar 2025 09:00:00 +0000"),
            ("e_ms", "2025-03-01T10:00:00.000Z", 1740823200000),
            ("e_text_ms", "2025-03-01T11:00:00.000Z", 1740826800000),
            ("e_sqlite", "2025-03-01T12:00:00.000Z", "2025-03-01 12:00:00"),
            ("e_js", "2025-03-01T13:00:00.000Z", rows[4][1]),
            ("e_iso", "2025-03-02T00:00:00.000Z", None),  # already in our form: untouched
        ]
        assert [(e.daid, e.details.get("legacy_timestamp")) for e in events[7:]] == [
            ("e_bad", "last tuesday"), ("e_none", None)]
        assert all(e.timestamp > "2026" for e in events[7:])  # the migration's time
        window = store.events(start="2025-03-01T10:00:00Z", end="2025-03-01T12:30:00Z")
        assert [e.daid for e in window] == ["e_ms", "e_text_ms", "e_sqlite"]
        assert store.append(auth()).seq == len(rows) + 1
        assert store.verify().ok


def test_migration_keeps_extra_columns_of_an_old_event_table(tmp_path: Path) -> None:
    db = tmp_path / "extra.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE daid_events (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
                     "action TEXT NOT NULL, details JSON, timestamp TIMESTAMP, session_id TEXT, "
                     "plugin_id TEXT, ip TEXT, note BLOB)")
        conn.execute("INSERT INTO daid_events VALUES ('daid_1', 'ann', 'parameter_update', "
                      "'{\"value\": 1}', '2025-01-01T00:00:00.000Z', 'jam', 'p7', '10.0.0.1', "
                      "x'00ff')")
        conn.execute("INSERT INTO daid_events VALUES ('daid_2', 'bob', 'parameter_update', "
                      "'{\"plugin_id\": \"own\"}', '2025-01-01T00:00:01.000Z', NULL, 'p8', "
                      "NULL, NULL)")
    conn.close()
    assert migrate_database(db) == (0, SCHEMA_VERSION)
    with ProvenanceStore(db) as store:
        first, second = store.events()
    assert first.session_id == "jam"  # the row's own column, not legacy_session
    assert first.details == {"value": 1, "plugin_id": "p7", "legacy_columns": {
        "session_id": "jam", "plugin_id": "p7", "ip": "10.0.0.1", "note": "00ff"}}
    assert second.session_id == "legacy_session"
    assert second.details == {"plugin_id": "own", "legacy_columns": {"plugin_id": "p8"}}
    with sqlite3.connect(db) as conn:  # analysis columns see the promoted plugin id
        assert conn.execute("SELECT plugin_id FROM daid_events ORDER BY seq").fetchall() == [
            ("p7",), ("own",)]
    conn.close()


def test_opening_a_fresh_file_creates_the_current_schema(db: Path) -> None:
    with ProvenanceStore(db) as store:
        assert store.sessions() == []
    with sqlite3.connect(db) as conn:
        assert prov.schema_version(conn) == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# ---------------------------------------------------------------------------------------------
# Export


def test_export_into_a_pipe_closed_early_ends_quietly(db: Path) -> None:
    """``pluginlab events export db | head``: the reader leaving is not an error."""
    with ProvenanceStore(db) as store:
        store.append(add("rev1"))
        store.append_many([param("rev1", "wet_dry", k / 3000) for k in range(3000)])
    process = subprocess.Popen(
        [sys.executable, "-m", "pluginlab.provenance_cli", "events", "export", str(db),
         "--format", "csv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(), cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith(b"seq,daid,")
    process.stdout.close()  # like head: ~1 MB of CSV is still to come
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""


def test_export_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    db = tmp_path / "x.sqlite"
    with ProvenanceStore(db) as store:
        store.append(add("rev1"))
        store.append_many([param("rev1", "wet_dry", k / 7, user="bob") for k in range(7)])
        store.append(add("d", session="other"))
        events = store.events()
    csv_out, jsonl_out, parquet_out = (tmp_path / f"e.{x}" for x in ("csv", "jsonl", "parquet"))
    assert run_cli("events", "export", str(db), "--format", "csv", "--out", str(csv_out)) == 0
    assert run_cli("events", "export", str(db), "--format", "jsonl", "--out",
                   str(jsonl_out)) == 0
    assert run_cli("events", "export", str(db), "--format", "parquet", "--out",
                   str(parquet_out)) == 0
    frame = pd.read_csv(csv_out)
    assert len(frame) == 9 and list(frame["seq"]) == list(range(1, 10))
    assert list(frame["daid"]) == [e.daid for e in events]
    assert json.loads(frame["details"][3]) == events[3].details
    lines = [json.loads(line) for line in jsonl_out.read_text().splitlines()]
    assert [line["daid"] for line in lines] == [e.daid for e in events]
    assert lines[2]["details"] == events[2].details
    assert lines[2]["parents"] == list(events[2].parents)
    table = pd.read_parquet(parquet_out)
    assert len(table) == 9 and list(table["chain_hash"]) == [e.chain_hash for e in events]
    assert str(table["timestamp"].dtype) == "datetime64[ms, UTC]"
    assert list(table["parents"][2]) == list(events[2].parents)
    assert export_events(db, "jsonl", tmp_path / "s.jsonl", session_id="other") == 1
    capsys.readouterr()
    assert run_cli("events", "export", str(db), "--format", "csv", "--session", "other") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # header + 1 row on stdout
    assert export_events(db, "parquet", tmp_path / "none.parquet", session_id="nobody") == 0
    assert len(pd.read_parquet(tmp_path / "none.parquet")) == 0
