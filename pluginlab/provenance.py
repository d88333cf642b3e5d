"""DAID provenance: identifiers, a tamper-evident SQLite event log, migrations and projections.

Everything pluginlab changes is recorded as one :class:`Event` in ``daid_events``. The current
plugin state of every session (``plugin_configurations`` + ``session_tracks``) is a projection
of that log by :func:`apply_event`, written in the same transaction as the events, and
rebuildable from the log alone (:meth:`ProvenanceStore.state_at`).

**DAID identifiers** (``PROTOCOL.md``, *DAID provenance*)::

    daid:v1.0:<timestamp>:<agent_id>:<entity_type>:<entity_id>:<hash16>

* ``timestamp``: UTC with milliseconds and ``-`` for ``:`` (``2026-11-25T20-16-03.120Z``).
* ``agent_id`` (the user) and ``entity_id`` are *escaped* so the identifier always splits into
  exactly 7 parts on ``:``: ``%`` becomes ``%25`` and ``:`` becomes ``%3A`` (percent-encoding
  of exactly these two characters, upper-case hex; nothing else is touched).
  :func:`escape_id` / :func:`unescape_id` are exact inverses; the parser refuses any other
  ``%`` sequence.
* ``hash16``: first 16 hex of SHA-256 over the canonical JSON (:func:`canonical_json`) of
  ``{"entity_id", "metadata", "operation", "parents": sorted(parents)}`` (:func:`daid_hash`).
  The store's metadata is ``{"action", "details", "seq", "session_id"}``.

**Uniqueness.** ``daid_events.id`` (the DAID) is the primary key, so two events must never get
the same DAID. The store makes that impossible rather than unlikely: (1) the event's ``seq``
(unique, gap-free) is part of the hashed metadata, so no two events share hash inputs;
(2) timestamps never go backwards (a clock that steps back is clamped to the last stored
timestamp); (3) the writer remembers every DAID issued in the current millisecond and, on a
(2^-64) truncated-hash collision, moves the event 1 ms forward.

**Chain.** Each row stores ``prev_hash`` (the previous row's ``chain_hash``; 64 zeros for seq 1)
and ``chain_hash = sha256(prev_hash + canonical JSON of the row's content)``, the content being
``{action, daid, details, entity_id, entity_type, operation, parents, seq, session_id,
timestamp, user_id}``. A one-row ``chain_head`` table holds the last seq and hash, so a
truncated tail is detected too. :func:`verify_chain` names the first broken row and why.

**Writes: journal first, index second.** An append is sequenced (seq, DAID, chain hash) under
one lock and written as one line per event to the journal next to the database
(:mod:`pluginlab.journal`, ``<db>-daidlog``): one ``write`` per group of appends; once it
returns the events are durable (a crash or SIGKILL keeps them: the same guarantee as SQLite
WAL with ``synchronous=NORMAL``; ``fsync=True`` adds one ``fdatasync`` per group, surviving
power loss). An indexer thread then copies them into the tables in big transactions (a few
ms later) and empties the journal whenever it has caught up; the next open stores anything a
crashed process journaled but did not index. Reads through the store (and through
:mod:`pluginlab.analysis` or the CLI in the same process) wait for the indexer, so they see
every acknowledged event. Measured on this machine: a one-event append costs ~35 us instead
of ~125 us for a SQLite commit with the tables' eight indexes (bench/bench_provenance.py).
Drafts are validated in the caller's thread, so a bad draft never reaches the journal; a
failed journal write leaves the file and the sequence as they were and fails the whole group.
If SQLite refuses to index journaled events, they stay journaled and are retried, and reads
raise that error instead of answering without them. Readers use their own connections.

**Schema versions** (``schema_version`` table, :data:`SCHEMA_VERSION`), applied in order, each
in one transaction: 1 = the user's migration (``session_id``/``created_by``/``created_at``/
``updated_at``/``daid_id`` on ``plugin_configurations``, backfilled ``legacy_session`` /
``migration_script`` / ``'daid_' || id``; ``daid_events`` created); 2 = pluginlab's log (``seq``,
chain columns, parents, generated ``plugin_id``/``track_id``/``parameter_id``/``value``
columns, plugin columns, ``session_tracks``, ``chain_head``). A database newer than this code
raises :class:`SchemaTooNew` and is not modified. Plugins imported by the migration predate
the log: :meth:`~ProvenanceStore.session_state` has them, ``state_at`` (log only) does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, NamedTuple, Self, cast

from .errors import ErrorCode, PluginlabError
from .journal import Journal, JournalBusy, journal_in_use, journal_path, read_records
from .jsonfast import reusable

__all__ = [
    "ACTIONS",
    "DAID_PREFIX",
    "DAID_VERSION",
    "ENTITY_TYPES",
    "GENESIS_HASH",
    "LEGACY_SESSION",
    "OPERATIONS",
    "SCHEMA_VERSION",
    "DaidNotFound",
    "DaidParts",
    "Event",
    "EventDraft",
    "InvalidDaid",
    "InvalidEvent",
    "JournalBusy",
    "ProvenanceReader",
    "ProvenanceStore",
    "SchemaTooNew",
    "StoreClosed",
    "UnindexedEventsWarning",
    "VerifyResult",
    "apply_event",
    "canonical_json",
    "chain_hash",
    "daid_hash",
    "escape_id",
    "flush_open_store",
    "format_timestamp",
    "make_daid",
    "migrate",
    "migrate_database",
    "parse_daid",
    "parse_timestamp",
    "schema_version",
    "store_unindexed_events",
    "unescape_id",
    "unindexed_events",
    "verify_chain",
    "verify_database",
    "warn_if_unindexed",
]

DAID_PREFIX = "daid"
DAID_VERSION = "v1.0"
ENTITY_TYPES = frozenset({"session", "track", "plugin", "parameter", "preset", "render", "user"})
OPERATIONS = frozenset(
    {"create", "update", "delete", "bypass", "preset_load", "preset_save", "render", "auth", "move"}
)
ACTIONS = frozenset(
    {
        "plugin_add",
        "plugin_remove",
        "plugin_move",
        "parameter_update",
        "plugin_bypass",
        "preset_load",
        "preset_save",
        "preset_delete",
        "auth",
        "render",
        "session_create",
    }
)
SCHEMA_VERSION = 2
GENESIS_HASH = "0" * 64
LEGACY_SESSION = "legacy_session"

_UTC = UTC
_log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_MS = timedelta(milliseconds=1)


# ---------------------------------------------------------------------------------------------
# Errors


class InvalidDaid(PluginlabError, ValueError):
    """A string that is not a valid v1.0 DAID; the message says exactly what is wrong."""

    code = ErrorCode.INVALID_MESSAGE

    def __init__(self, reason: str, value: object = None) -> None:
        super().__init__(f"invalid DAID: {reason}", {"field": "daid", "reason": reason})
        self.reason = reason
        self.value = value


class InvalidEvent(PluginlabError, ValueError):
    """An :class:`EventDraft` the store refuses (unknown action, non-JSON details ...)."""

    code = ErrorCode.INVALID_MESSAGE

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(
            f"invalid event: {field_name}: {reason}", {"field": field_name, "reason": reason}
        )


class DaidNotFound(PluginlabError, KeyError):
    """A well-formed DAID that is not in the log."""

    code = ErrorCode.INVALID_MESSAGE

    def __init__(self, daid: str) -> None:
        super().__init__(f"DAID not found: {daid}", {"field": "daid", "reason": "not found"})


class SchemaTooNew(PluginlabError, RuntimeError):
    """The database was written by a newer pluginlab; it is left untouched."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            f"{path}: schema version {found} is newer than this pluginlab supports "
            f"({supported}); upgrade pluginlab (the database was not modified)",
            {"found": found, "supported": supported},
        )
        self.found = found
        self.supported = supported


class StoreClosed(PluginlabError, RuntimeError):
    """An append on a closed :class:`ProvenanceStore`."""

    def __init__(self) -> None:
        super().__init__("provenance store is closed", {})


# ---------------------------------------------------------------------------------------------
# Canonical JSON, escaping, timestamps

_canonical_encode = reusable(json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
))


def canonical_json(obj: Any) -> str:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

    NaN and infinities are refused (``ValueError``): they are not JSON.
    """
    return _canonical_encode(obj)


def _jstr(value: str | None) -> str:
    """Canonical JSON of a string (or ``null``), without the generic encoder's overhead."""
    return "null" if value is None else encode_basestring(value)


def escape_id(value: str) -> str:
    """Escape an agent/entity id for a DAID: ``%`` -> ``%25``, ``:`` -> ``%3A`` (reversible)."""
    return value.replace("%", "%25").replace(":", "%3A")


_ESCAPE_SEQ = re.compile(r"%(25|3A)")
_BAD_ESCAPE = re.compile(r"%(?!25|3A)")


def unescape_id(value: str) -> str:
    """Inverse of :func:`escape_id`; raises :class:`InvalidDaid` on any other ``%`` sequence."""
    bad = _BAD_ESCAPE.search(value)
    if bad:
        raise InvalidDaid(
            f"bad escape {value[bad.start():bad.start() + 3]!r} in {value!r} "
            "(only %25 for '%' and %3A for ':' are allowed)",
            value,
        )
    return _ESCAPE_SEQ.sub(lambda m: "%" if m.group(1) == "25" else ":", value)


def _to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return (moment - _EPOCH) // _MS


_sec_cache: tuple[int, str] = (-1, "")


def _iso_ms(ms: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` for epoch milliseconds."""
    global _sec_cache
    sec, milli = divmod(ms, 1000)
    cached_sec, prefix = _sec_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _sec_cache = (sec, prefix)
    return f"{prefix}.{milli:03d}Z"


def format_timestamp(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds and ``Z`` (``2026-11-25T20:16:03.120Z``); default now."""
    return _iso_ms(_to_ms(moment if moment is not None else datetime.now(_UTC)))


def timestamp_bound(moment: datetime | str, *, lower: bool) -> str:
    """An inclusive time bound as the log's millisecond text, so comparing texts is exact: a
    lower bound rounds up and an upper bound down, so no event before ``start`` or after
    ``end`` passes. Exact to the nanosecond for pandas Timestamps and numpy datetime64, to the
    microsecond for datetimes and ISO text (naive = UTC)."""
    ns = _epoch_ns(moment)
    return _iso_ms(-(-ns // 1_000_000) if lower else ns // 1_000_000)


def _epoch_ns(moment: datetime | str) -> int:
    if type(moment).__name__ == "datetime64":  # numpy, without importing it here
        return int(cast(Any, moment).astype("datetime64[ns]").astype("int64"))
    nanos = getattr(moment, "value", None)  # a pandas Timestamp: ns since the epoch, UTC
    if isinstance(moment, datetime) and isinstance(nanos, int):
        return nanos
    return (parse_timestamp(moment) - _EPOCH) // timedelta(microseconds=1) * 1000


def parse_timestamp(value: datetime | str) -> datetime:
    """An aware UTC datetime from a datetime (naive = UTC; pandas Timestamps are datetimes),
    a ``numpy.datetime64`` (UTC) or an ISO-8601 string."""
    if type(value).__name__ == "datetime64":  # numpy, without importing it here
        value = cast(Any, value).astype("datetime64[us]").item()
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from exc
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime or an ISO-8601 string, got {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    return value.astimezone(_UTC)


def _iso_to_ms(text: str) -> int:
    return _to_ms(parse_timestamp(text))


# ---------------------------------------------------------------------------------------------
# DAID identifiers


@dataclass(frozen=True)
class DaidParts:
    """A parsed DAID; ``agent_id`` and ``entity_id`` are unescaped, ``timestamp`` is UTC."""

    version: str
    timestamp: datetime
    agent_id: str
    entity_type: str
    entity_id: str
    hash16: str

    def __str__(self) -> str:
        return _daid_string(
            _iso_ms(_to_ms(self.timestamp)), self.agent_id, self.entity_type, self.entity_id,
            self.hash16, self.version,
        )


def _daid_string(
    iso: str, agent_id: str, entity_type: str, entity_id: str, hash16: str,
    version: str = DAID_VERSION,
) -> str:
    return (
        f"{DAID_PREFIX}:{version}:{iso.replace(':', '-')}:{escape_id(agent_id)}:"
        f"{entity_type}:{escape_id(entity_id)}:{hash16}"
    )


def _hash_input(entity_id: str, operation: str, metadata_json: str, parents_json: str) -> str:
    # Same bytes as canonical_json({...}): keys entity_id < metadata < operation < parents.
    return (
        f'{{"entity_id":{_jstr(entity_id)},"metadata":{metadata_json},'
        f'"operation":{_jstr(operation)},"parents":{parents_json}}}'
    )


def daid_hash(
    entity_id: str, operation: str, metadata: Mapping[str, Any], parents: Iterable[str] = ()
) -> str:
    """First 16 hex of SHA-256 over the canonical JSON of the DAID's inputs (parents sorted)."""
    text = _hash_input(
        entity_id, operation, canonical_json(metadata), canonical_json(sorted(parents))
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_daid(
    agent_id: str,
    entity_type: str,
    entity_id: str,
    operation: str,
    metadata: Mapping[str, Any],
    parents: Iterable[str] = (),
    timestamp: datetime | None = None,
) -> str:
    """Build a v1.0 DAID. ``timestamp`` defaults to now (naive = UTC); ids are escaped."""
    if not agent_id:
        raise InvalidDaid("empty agent id")
    if not entity_id:
        raise InvalidDaid("empty entity id")
    if entity_type not in ENTITY_TYPES:
        raise InvalidDaid(f"unknown entity type {entity_type!r} (one of {_names(ENTITY_TYPES)})")
    if operation not in OPERATIONS:
        raise InvalidDaid(f"unknown operation {operation!r} (one of {_names(OPERATIONS)})")
    hash16 = daid_hash(entity_id, operation, metadata, parents)
    return _daid_string(format_timestamp(timestamp), agent_id, entity_type, entity_id, hash16)


_DAID_TS = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2})-(\d{2})-(\d{2})\.(\d{3})Z$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_PART_NAMES = ("prefix", "version", "timestamp", "agent id", "entity type", "entity id", "hash")


def parse_daid(value: str) -> DaidParts:
    """Parse and validate a DAID; raise :class:`InvalidDaid` naming the first problem found.

    Checks, in order: type, prefix ``daid``, exactly 7 parts, version ``v1.0``, no empty part,
    timestamp ``YYYY-MM-DDTHH-MM-SS.mmmZ`` (a real date), known entity type, hash = 16 lower-case
    hex characters, escapes in the ids.
    """
    if not isinstance(value, str):
        raise InvalidDaid(f"expected a string, got {type(value).__name__}", value)
    parts = value.split(":")
    if parts[0] != DAID_PREFIX:
        raise InvalidDaid(f"must start with 'daid:', got {parts[0][:20]!r}", value)
    if len(parts) != 7:
        raise InvalidDaid(
            f"expected 7 ':'-separated parts "
            "(daid:version:timestamp:agent:entity_type:entity_id:hash), "
            f"got {len(parts)} (unescaped ':' in an id?)",
            value,
        )
    _, version, stamp, agent, entity_type, entity, hash16 = parts
    if version != DAID_VERSION:
        raise InvalidDaid(f"unsupported version {version!r} (expected {DAID_VERSION!r})", value)
    for name, part in zip(_PART_NAMES, parts):
        if not part:
            raise InvalidDaid(f"empty {name} part", value)
    match = _DAID_TS.match(stamp)
    if not match:
        raise InvalidDaid(
            f"bad timestamp {stamp!r}: expected YYYY-MM-DDTHH-MM-SS.mmmZ (UTC, milliseconds)",
            value,
        )
    year, month, day, hour, minute, second, milli = (int(g) for g in match.groups())
    try:
        moment = datetime(year, month, day, hour, minute, second, milli * 1000, tzinfo=_UTC)
    except ValueError as exc:
        raise InvalidDaid(f"bad timestamp {stamp!r}: {exc}", value) from None
    if entity_type not in ENTITY_TYPES:
        raise InvalidDaid(
            f"unknown entity type {entity_type!r} (one of {_names(ENTITY_TYPES)})", value
        )
    if len(hash16) != 16:
        raise InvalidDaid(f"hash must be 16 hex characters, got {len(hash16)}", value)
    if not _HEX16.match(hash16):
        raise InvalidDaid(f"hash must be lower-case hex [0-9a-f], got {hash16!r}", value)
    return DaidParts(version, moment, unescape_id(agent), entity_type, unescape_id(entity), hash16)


def _names(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


# ---------------------------------------------------------------------------------------------
# Events


class EventDraft(NamedTuple):
    """What a caller records. ``details`` must be JSON (no NaN); see the module docs for shapes.

    ``plugin_id`` names the plugin whose creation DAID becomes a parent; when None the store
    uses ``details["plugin_id"]`` if present. Immutable (a named tuple: cheap to build, one is
    made per recorded change).
    """

    user_id: str
    session_id: str
    action: str
    entity_type: str
    entity_id: str
    operation: str
    details: dict[str, Any]
    plugin_id: str | None = None


class Event(NamedTuple):
    """A stored event (``timestamp``: ISO-8601 UTC with ms and ``Z``). Immutable (a named
    tuple, like :class:`EventDraft`)."""

    seq: int
    daid: str
    timestamp: str
    user_id: str
    session_id: str
    action: str
    entity_type: str
    entity_id: str
    operation: str
    details: dict[str, Any]
    parents: tuple[str, ...]
    prev_hash: str
    chain_hash: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict (``parents`` as a list)."""
        return {
            "seq": self.seq,
            "daid": self.daid,
            "timestamp": self.timestamp,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "action": self.action,
            "entity_type": self.entity_type,
            "entity_id": self.entity_id,
            "operation": self.operation,
            "details": self.details,
            "parents": list(self.parents),
            "prev_hash": self.prev_hash,
            "chain_hash": self.chain_hash,
        }


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a chain verification; truthy when ``ok``."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = "ok"

    def __bool__(self) -> bool:
        return self.ok


def _chain_content(
    seq: int, daid: str, timestamp: str | None, user_id: str, session_id: str | None,
    action: str, entity_type: str | None, entity_id: str | None, operation: str | None,
    details_json: str | None, parents_json: str | None,
) -> str:
    # Same bytes as canonical_json of the content dict (keys in sorted order).
    return (
        f'{{"action":{_jstr(action)},"daid":{_jstr(daid)},"details":{details_json or "null"},'
        f'"entity_id":{_jstr(entity_id)},"entity_type":{_jstr(entity_type)},'
        f'"operation":{_jstr(operation)},"parents":{parents_json or "null"},"seq":{seq},'
        f'"session_id":{_jstr(session_id)},"timestamp":{_jstr(timestamp)},'
        f'"user_id":{_jstr(user_id)}}}'
    )


def chain_hash(prev_hash: str, event: Event) -> str:
    """``sha256(prev_hash + canonical JSON of the event's content)`` as 64 hex characters."""
    content = _chain_content(
        event.seq, event.daid, event.timestamp, event.user_id, event.session_id, event.action,
        event.entity_type, event.entity_id, event.operation, canonical_json(event.details),
        canonical_json(list(event.parents)),
    )
    return hashlib.sha256((prev_hash + content).encode("utf-8")).hexdigest()


def _metadata_json(seq: int, session_id: str, action: str, details_json: str) -> str:
    # canonical_json({"action", "details", "seq", "session_id"}) - the DAID's hashed metadata.
    return (
        f'{{"action":{_jstr(action)},"details":{details_json},"seq":{seq},'
        f'"session_id":{_jstr(session_id)}}}'
    )


# ---------------------------------------------------------------------------------------------
# Projection

State = dict[str, list[dict[str, Any]]]


def apply_event(state: State, event: Event) -> None:
    """Apply one event to a session state ``{track_id: [plugin dict, in chain order]}``.

    Deterministic and free of I/O: the store uses it to keep ``plugin_configurations`` current
    and :meth:`ProvenanceStore.state_at` uses it to replay the log. Plugin dicts are
    ``{plugin_id, name, plugin_path, bypass, parameters, created_by, created_at, updated_at,
    daid_id}`` (``daid_id`` = DAID of the last event that changed the plugin). Tracks stay (empty)
    after their last plugin is removed. Events naming a plugin the state does not have (e.g. one
    imported by a migration, which predates the log) leave the state unchanged; actions without
    a state effect (preset_save, preset_delete, auth, render, session_create) are ignored.
    """
    handler = _HANDLERS.get(event.action)
    if handler is not None:
        handler(state, event, event.details)


def _find(state: State, plugin_id: Any, track_hint: Any = None) -> tuple[list[dict], int] | None:
    """(the track's plugin list, index) of ``plugin_id``; the hinted track is searched first."""
    hinted = state.get(track_hint) if isinstance(track_hint, str) else None
    if hinted is not None:
        for index, plugin in enumerate(hinted):
            if plugin["plugin_id"] == plugin_id:
                return hinted, index
    for plugins in state.values():
        if plugins is not hinted:
            for index, plugin in enumerate(plugins):
                if plugin["plugin_id"] == plugin_id:
                    return plugins, index
    return None


def _insert_at(plugins: list[dict[str, Any]], plugin: dict[str, Any], index: Any) -> None:
    if isinstance(index, int) and not isinstance(index, bool):
        plugins.insert(max(0, min(index, len(plugins))), plugin)
    else:
        plugins.append(plugin)


def _touch(plugin: dict[str, Any], event: Event) -> None:
    plugin["updated_at"] = event.timestamp
    plugin["daid_id"] = event.daid


def _on_add(state: State, event: Event, d: dict[str, Any]) -> None:
    plugin_id = d.get("plugin_id")
    old = _find(state, plugin_id)
    if old is not None:  # re-adding an id replaces the old plugin
        del old[0][old[1]]
    parameters = d.get("parameters")
    plugin = {
        "plugin_id": plugin_id,
        "name": d.get("name"),
        "plugin_path": d.get("plugin_path"),
        "bypass": bool(d.get("bypass", False)),
        "parameters": dict(parameters) if isinstance(parameters, dict) else {},
        "created_by": event.user_id,
        "created_at": event.timestamp,
        "updated_at": event.timestamp,
        "daid_id": event.daid,
    }
    _insert_at(state.setdefault(cast(str, d.get("track_id")), []), plugin, d.get("index"))


def _on_remove(state: State, event: Event, d: dict[str, Any]) -> None:
    found = _find(state, d.get("plugin_id"), d.get("track_id"))
    if found is not None:
        del found[0][found[1]]


def _on_move(state: State, event: Event, d: dict[str, Any]) -> None:
    found = _find(state, d.get("plugin_id"), d.get("track_id"))
    if found is None:
        return
    plugin = found[0].pop(found[1])
    _touch(plugin, event)
    _insert_at(state.setdefault(cast(str, d.get("track_id")), []), plugin, d.get("index"))


def _on_parameter(state: State, event: Event, d: dict[str, Any]) -> None:
    found = _find(state, d.get("plugin_id"), d.get("track_id"))
    if found is not None:
        plugin = found[0][found[1]]
        plugin["parameters"][d.get("parameter_id")] = d.get("value")
        _touch(plugin, event)


def _on_bypass(state: State, event: Event, d: dict[str, Any]) -> None:
    found = _find(state, d.get("plugin_id"), d.get("track_id"))
    if found is not None:
        plugin = found[0][found[1]]
        plugin["bypass"] = bool(d.get("bypass"))
        _touch(plugin, event)


def _on_preset_load(state: State, event: Event, d: dict[str, Any]) -> None:
    found = _find(state, d.get("plugin_id"), d.get("track_id"))
    if found is not None:
        plugin = found[0][found[1]]
        parameters = d.get("parameters")
        if isinstance(parameters, dict):
            plugin["parameters"].update(parameters)
        _touch(plugin, event)


_HANDLERS: dict[str, Callable[[State, Event, dict[str, Any]], None]] = {
    "plugin_add": _on_add,
    "plugin_remove": _on_remove,
    "plugin_move": _on_move,
    "parameter_update": _on_parameter,
    "plugin_bypass": _on_bypass,
    "preset_load": _on_preset_load,
}
_STRUCTURAL = frozenset({"plugin_add", "plugin_remove", "plugin_move"})
_REPLAYED = ", ".join(f"'{action}'" for action in sorted(_HANDLERS))
_ALL_ACTIONS = ", ".join(f"'{action}'" for action in sorted(ACTIONS))


# ---------------------------------------------------------------------------------------------
# Schema and migrations

_NOW_SQL = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_EVENT_COLUMNS = (
    "seq, id, timestamp, user_id, session_id, action, entity_type, entity_id, operation, "
    "details, parents, prev_hash, chain_hash"
)
_CREATE_EVENTS_V2 = """
CREATE TABLE daid_events (
    id TEXT PRIMARY KEY,                 -- the DAID
    seq INTEGER NOT NULL UNIQUE,         -- 1, 2, 3 ... gap-free, chain order
    user_id TEXT NOT NULL,
    action TEXT NOT NULL,
    details JSON,                        -- canonical JSON object
    timestamp TEXT,                      -- ISO-8601 UTC, ms, 'Z'; never decreases with seq
    session_id TEXT,
    entity_type TEXT,
    entity_id TEXT,
    operation TEXT,
    parents JSON,                        -- canonical JSON array of DAIDs, sorted
    prev_hash TEXT NOT NULL,
    chain_hash TEXT NOT NULL,
    -- derived by SQLite from details (analysis reads these, they are not part of the chain)
    plugin_id TEXT GENERATED ALWAYS AS (json_extract(details, '$.plugin_id')) STORED,
    track_id TEXT GENERATED ALWAYS AS (json_extract(details, '$.track_id')) STORED,
    parameter_id TEXT GENERATED ALWAYS AS (json_extract(details, '$.parameter_id')) STORED,
    value REAL GENERATED ALWAYS AS (
        CASE WHEN json_type(details, '$.value') IN ('integer', 'real')
             THEN json_extract(details, '$.value') END) STORED
)
"""
# ``action`` and ``plugin_id`` lead composite indexes: they serve lookups on their first column
# like single-column ones, and let analysis read every categorical column of the log from a
# covering index (GROUP BY without a sort, no table access) at the same write cost.
# Write cost is mostly pages: an index whose new entries land at many places (one per entity)
# dirties many pages per commit. So there is no per-entity index; (session_id, seq) gets its
# entries at the end of each session's range, serves session queries in seq order, and the
# parent maps are rebuilt on open by one grouped scan.
_EVENT_INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_daid_events_user_id ON daid_events(user_id)",
    (
        "CREATE INDEX IF NOT EXISTS idx_daid_events_action "
        "ON daid_events(action, entity_type, operation)"
    ),
    "CREATE INDEX IF NOT EXISTS idx_daid_events_timestamp ON daid_events(timestamp)",
    "CREATE INDEX IF NOT EXISTS idx_daid_events_session ON daid_events(session_id, seq)",
    (
        "CREATE INDEX IF NOT EXISTS idx_daid_events_plugin "
        "ON daid_events(plugin_id, parameter_id, track_id)"
    ),
)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version (0 = no ``schema_version`` table: fresh or pre-pluginlab)."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if not found:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_xinfo({table})")]


def _table_exists(conn: sqlite3.Connection, table: str) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?"
    return conn.execute(sql, (table,)).fetchone() is not None


def _add_columns(conn: sqlite3.Connection, table: str, columns: Sequence[tuple[str, str]]) -> None:
    existing = set(_columns(conn, table))
    for name, decl in columns:
        if name not in existing:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _migration_1(conn: sqlite3.Connection) -> None:
    """The user's migration (``seed`` guide, *Database Migration*), ported to SQLite."""
    conn.execute(
        """CREATE TABLE IF NOT EXISTS plugin_configurations (
            id TEXT PRIMARY KEY,
            track_id TEXT,
            plugin_name TEXT,
            plugin_path TEXT,
            parameters JSON
        )"""
    )
    # SQLite cannot ADD COLUMN with a non-constant default: backfill the timestamps below.
    _add_columns(
        conn,
        "plugin_configurations",
        [
            ("session_id", "VARCHAR(255)"),
            ("created_by", "VARCHAR(255)"),
            ("created_at", "TIMESTAMP"),
            ("updated_at", "TIMESTAMP"),
            ("daid_id", "VARCHAR(255)"),
        ],
    )
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS daid_events (
            id VARCHAR(255) PRIMARY KEY,
            user_id VARCHAR(255) NOT NULL,
            action VARCHAR(100) NOT NULL,
            details JSON,
            timestamp TIMESTAMP DEFAULT ({_NOW_SQL})
        )"""
    )
    conn.execute(
        "UPDATE plugin_configurations SET session_id = ?, created_by = 'migration_script', "
        "daid_id = 'daid_' || id WHERE session_id IS NULL",
        (LEGACY_SESSION,),
    )
    conn.execute(
        f"UPDATE plugin_configurations SET created_at = {_NOW_SQL} WHERE created_at IS NULL"
    )
    conn.execute(
        "UPDATE plugin_configurations SET updated_at = created_at WHERE updated_at IS NULL"
    )


def _migration_2(conn: sqlite3.Connection) -> None:
    """pluginlab's log: chained ``daid_events``, plugin columns, tracks, chain head."""
    _text_plugin_ids(conn)
    cols = set(_columns(conn, "plugin_configurations"))
    _add_columns(
        conn,
        "plugin_configurations",
        [
            ("plugin_id", "TEXT"),
            ("name", "TEXT"),
            ("position", "INTEGER"),
            ("bypass", "INTEGER NOT NULL DEFAULT 0"),
            ("plugin_name", "TEXT"),
            ("parameters", "JSON"),
            ("plugin_path", "TEXT"),
            ("track_id", "TEXT"),
        ],
    )
    conn.execute("UPDATE plugin_configurations SET plugin_id = id WHERE plugin_id IS NULL")
    conn.execute("UPDATE plugin_configurations SET name = plugin_name WHERE name IS NULL")
    conn.execute("UPDATE plugin_configurations SET parameters = '{}' WHERE parameters IS NULL")
    if "position" not in cols:  # old chains were ordered by insertion
        conn.execute(
            """UPDATE plugin_configurations SET position = (
                SELECT COUNT(*) FROM plugin_configurations AS o
                WHERE o.session_id IS plugin_configurations.session_id
                  AND o.track_id IS plugin_configurations.track_id
                  AND o.rowid < plugin_configurations.rowid)"""
        )
    conn.execute("UPDATE plugin_configurations SET position = 0 WHERE position IS NULL")
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS idx_plugin_configurations_plugin "
        "ON plugin_configurations(session_id, plugin_id)"
    )
    conn.execute(
        """CREATE TABLE IF NOT EXISTS session_tracks (
            session_id TEXT NOT NULL,
            track_id TEXT NOT NULL,
            created_at TEXT,
            PRIMARY KEY (session_id, track_id)
        )"""
    )
    conn.execute(
        f"""INSERT OR IGNORE INTO session_tracks(session_id, track_id, created_at)
            SELECT session_id, track_id, {_NOW_SQL} FROM plugin_configurations
            WHERE track_id IS NOT NULL GROUP BY session_id, track_id ORDER BY MIN(rowid)"""
    )
    _rebuild_events(conn)
    conn.execute(_CREATE_HEADS)
    _rebuild_heads(conn)
    conn.execute(
        """CREATE TABLE IF NOT EXISTS chain_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            chain_hash TEXT NOT NULL
        )"""
    )
    last = conn.execute("SELECT seq, chain_hash FROM daid_events ORDER BY seq DESC LIMIT 1")
    head = last.fetchone() or (0, GENESIS_HASH)
    conn.execute("INSERT OR REPLACE INTO chain_head(id, seq, chain_hash) VALUES (1, ?, ?)", head)


_CREATE_HEADS = """CREATE TABLE IF NOT EXISTS entity_heads (
    session_id TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    daid TEXT NOT NULL,          -- the entity's latest event: the next one's parent
    PRIMARY KEY (session_id, entity_type, entity_id)
) WITHOUT ROWID"""


def _ensure_derived(conn: sqlite3.Connection) -> None:
    """Create any missing index or derived table of the current schema (idempotent).

    Only derived structures: what they hold is rebuilt from the log (``entity_heads`` on
    open by :meth:`ProvenanceStore._load_state`). No-op on a database made by this code.
    """
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    wanted = [sql for sql in _EVENT_INDEXES if sql.split()[5] not in have]
    if "entity_heads" in have and not wanted:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE_HEADS)
        for sql in wanted:
            conn.execute(sql)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _rebuild_heads(conn: sqlite3.Connection) -> None:
    """Recompute ``entity_heads`` (latest DAID per session/entity) from the log: one scan."""
    conn.execute("DELETE FROM entity_heads")
    conn.execute(
        """INSERT INTO entity_heads(session_id, entity_type, entity_id, daid)
           SELECT session_id, entity_type, entity_id, id FROM daid_events WHERE seq IN (
               SELECT MAX(seq) FROM daid_events NOT INDEXED
               WHERE entity_type IS NOT NULL AND entity_id IS NOT NULL
               GROUP BY session_id, entity_type, entity_id)"""
    )


def _text_plugin_ids(conn: sqlite3.Connection) -> None:
    """Give ``plugin_configurations`` a TEXT ``id`` if the old system's was an integer key.

    An ``id INTEGER PRIMARY KEY`` (an auto-increment id) cannot hold pluginlab's text ids, so
    the table is rebuilt with every column, row (ids become their text: ``1`` -> ``'1'``),
    insertion order, index and trigger kept.
    """
    cols = conn.execute("PRAGMA table_info(plugin_configurations)").fetchall()
    keyed = [c for c in cols if c[5]]
    if len(keyed) != 1 or keyed[0][1] != "id" or "INT" not in (keyed[0][2] or "").upper():
        return
    defs = []
    for _cid, name, decl, notnull, default, _pk in cols:
        if name == "id":
            defs.append('"id" TEXT PRIMARY KEY')
            continue
        defs.append(f'"{name}" {decl or ""}' + (" NOT NULL" if notnull else "")
                    + (f" DEFAULT {default}" if default is not None else ""))
    extras = [sql for (sql,) in conn.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'plugin_configurations' "
        "AND type IN ('index', 'trigger') AND sql IS NOT NULL")]
    names = ", ".join(f'"{c[1]}"' for c in cols)
    values = ", ".join("CAST(id AS TEXT)" if c[1] == "id" else f'"{c[1]}"' for c in cols)
    conn.execute(f"CREATE TABLE _plugin_configurations_text ({', '.join(defs)})")
    conn.execute(f"INSERT INTO _plugin_configurations_text({names}) "
                 f"SELECT {values} FROM plugin_configurations ORDER BY rowid")
    conn.execute("DROP TABLE plugin_configurations")
    conn.execute("ALTER TABLE _plugin_configurations_text RENAME TO plugin_configurations")
    for sql in extras:
        conn.execute(sql)


_JS_DATE = re.compile(r"^\w{3} (\w{3} \d{1,2} \d{4} \d{2}:\d{2}:\d{2}) GMT([+-]\d{4})")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def legacy_timestamp_ms(value: Any) -> int | None:
    """Epoch milliseconds of an old system's timestamp, or None if it cannot be read.

    Reads ISO-8601 (also SQLite's ``YYYY-MM-DD HH:MM:SS``; no zone = UTC), epoch numbers
    (``Date.now()`` milliseconds from 1e11 up, else seconds, also as text), RFC 2822 and
    JavaScript's ``Date.toString()`` (``Sat Mar 01 2025 10:00:00 GMT+0100``).
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    try:
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                return None
            ms = int(value) if abs(value) >= 1e11 else int(round(value * 1000))
            datetime.fromtimestamp(ms / 1000, _UTC)  # in datetime's range?
            return ms
        if not isinstance(value, str):
            return None
        text = value.strip()
        with contextlib.suppress(ValueError):
            return _iso_to_ms(text)
        js = _JS_DATE.match(text)  # before RFC 2822, whose parser would drop the offset
        if js:
            moment = datetime.strptime(f"{js.group(1)} {js.group(2)}", "%b %d %Y %H:%M:%S %z")
            return _to_ms(moment)
        with contextlib.suppress(TypeError, ValueError, IndexError):
            return _to_ms(email.utils.parsedate_to_datetime(text))
    except (OverflowError, OSError, ValueError):
        pass
    return None


# Columns of an old daid_events beyond the user's five whose values analysis reads from
# details: copied there when details lacks them (all extra columns are kept, see below).
_PROMOTED_COLUMNS = ("plugin_id", "track_id", "parameter_id", "value")


def _legacy_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """The old ``daid_events`` rows as ``(ms, rowid, id, user_id, action, details, session)``
    in chain order: by time (rows whose timestamp cannot be read last), then insertion.

    ``details`` is a dict: the old JSON object (anything else under ``legacy_details``), plus
    ``legacy_timestamp`` when the stored timestamp was not already in pluginlab's form and
    ``legacy_columns`` with the values of any columns beyond the user's five (nothing is
    dropped). ``session`` is the row's own ``session_id`` column, else ``details.session_id``,
    else ``legacy_session``.
    """
    base = ("id", "user_id", "action", "details", "timestamp")
    extra = [c for c in _columns(conn, "daid_events") if c not in base]
    picked = ", ".join(f'"{c}"' for c in (*base, *extra))
    rows = []
    for rowid, daid, user_id, action, details, stamp, *more in conn.execute(
            f"SELECT rowid, {picked} FROM daid_events"):
        obj = _loads_or(details, {"legacy_details": details})
        if not isinstance(obj, dict):
            obj = {"legacy_details": obj}
        ms = legacy_timestamp_ms(stamp)
        if stamp is not None and (ms is None or _iso_ms(ms) != stamp):
            obj["legacy_timestamp"] = stamp
        kept = {name: value.hex() if isinstance(value, bytes) else value
                for name, value in zip(extra, more) if value is not None}
        if kept:
            obj["legacy_columns"] = kept
            for name in _PROMOTED_COLUMNS:
                if name in kept and name not in obj:
                    obj[name] = kept[name]
        session = kept.get("session_id")
        if not (isinstance(session, str) and session):
            session = obj.get("session_id")
        session = session if isinstance(session, str) and session else LEGACY_SESSION
        rows.append((ms, rowid, daid, user_id, action, obj, session))
    rows.sort(key=lambda r: (r[0] is None, r[0] or 0, r[1]))
    return rows


def _rebuild_events(conn: sqlite3.Connection) -> None:
    """Rebuild ``daid_events`` in the v2 shape; pre-existing rows get seq + chain, none lost.

    Rows written by the user's own tooling (no entity columns) are kept with their id, no
    entity/operation and no parents (:func:`_legacy_rows` says what becomes of their session,
    timestamp and extra columns). Timestamps become pluginlab's ISO form, so time filters
    compare like with like; one that cannot be read becomes the latest of the migration's
    time and the previous row's (the original stays in ``details.legacy_timestamp``).
    """
    old = _legacy_rows(conn)
    conn.execute("DROP TABLE daid_events")
    conn.execute(_CREATE_EVENTS_V2)
    prev = GENESIS_HASH
    migrated_ms = _to_ms(datetime.now(_UTC))
    last_ms = 0
    for seq, (ms, _rowid, daid, user_id, action, details_obj, session) in enumerate(
            old, start=1):
        last_ms = max(last_ms, ms if ms is not None else migrated_ms)
        stamp = _iso_ms(last_ms)
        details_json = canonical_json(details_obj)
        parents_json = "[]"
        content = _chain_content(
            seq, str(daid), stamp, str(user_id), session, str(action), None, None, None,
            details_json, parents_json,
        )
        digest = hashlib.sha256((prev + content).encode("utf-8")).hexdigest()
        conn.execute(
            f"INSERT INTO daid_events({_EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (seq, str(daid), stamp, str(user_id), session, str(action), None, None, None,
             details_json, parents_json, prev, digest),
        )
        prev = digest
    for sql in _EVENT_INDEXES:
        conn.execute(sql)


_MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite3.Connection], None]], ...] = (
    (1, "user migration: session/created/updated/daid columns, daid_events", _migration_1),
    (2, "pluginlab DAID log: seq, hash chain, parents, plugin columns, tracks", _migration_2),
)
assert _MIGRATIONS[-1][0] == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection, *, path: str = "database") -> tuple[int, int]:
    """Bring ``conn``'s database to :data:`SCHEMA_VERSION`; return ``(before, after)``.

    Each pending version runs in its own ``BEGIN IMMEDIATE`` transaction (all or nothing) and
    is recorded in ``schema_version``. Already current: nothing is written. Newer than this
    code: :class:`SchemaTooNew`, nothing is written. ``conn`` must be in autocommit mode
    (``isolation_level=None``).
    """
    before = schema_version(conn)
    if before > SCHEMA_VERSION:
        raise SchemaTooNew(path, before, SCHEMA_VERSION)
    current = before
    for version, description, step in _MIGRATIONS:
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(conn)  # another process may have migrated meanwhile
            if version > current:
                conn.execute(
                    """CREATE TABLE IF NOT EXISTS schema_version (
                        version INTEGER PRIMARY KEY,
                        applied_at TEXT NOT NULL,
                        description TEXT NOT NULL
                    )"""
                )
                step(conn)
                conn.execute(
                    f"INSERT INTO schema_version(version, applied_at, description) "
                    f"VALUES (?, {_NOW_SQL}, ?)",
                    (version, description),
                )
                current = version
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return before, current


def _connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def migrate_database(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Migrate the SQLite file at ``path`` in place; return ``(before, after)`` versions.

    Raises ``FileNotFoundError`` when there is no such file (no database is created by accident)
    and :class:`SchemaTooNew` for a database newer than this code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such database: {path}")
    conn = _connect(path)
    try:
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(path, version, SCHEMA_VERSION)
        if version < SCHEMA_VERSION:
            conn.execute("PRAGMA journal_mode = WAL")
        return migrate(conn, path=path)
    finally:
        conn.close()


def unindexed_events(path: str | os.PathLike[str]) -> int:
    """How many acknowledged events of the database at ``path`` are only in its journal (a
    store was killed before indexing them; the next store to open the database stores them).

    Read-only; 0 when there is no journal, or while a store has the database open (it
    indexes its own events within milliseconds).
    """
    journal = journal_path(os.fspath(path))
    if journal_in_use(journal):
        return 0
    records = read_records(journal)
    if not records:
        return 0
    conn = _open_for_reading(path)
    try:
        row = conn.execute("SELECT seq FROM chain_head WHERE id = 1").fetchone()
    finally:
        conn.close()
    head = row[0] if row else 0
    return sum(1 for r in records if isinstance(r[0], int) and r[0] > head)


class UnindexedEventsWarning(UserWarning):
    """Reading a database whose journal holds acknowledged events that a stopped process
    never indexed: the answer leaves them out until ``pluginlab db migrate`` stores them."""


def warn_if_unindexed(path: str | os.PathLike[str], stacklevel: int = 3) -> int:
    """Warn (:class:`UnindexedEventsWarning`) when reads of ``path`` would miss acknowledged
    events that are only in its journal; returns their number (0: nothing missing)."""
    try:
        pending = unindexed_events(path)
    except (OSError, PluginlabError, RuntimeError, sqlite3.DatabaseError):
        return 0  # the read itself reports what is wrong with the file
    if pending:
        warnings.warn(
            f"{os.fspath(path)}: {pending} acknowledged event(s) are only in the journal (a "
            "process stopped before indexing them) and are missing from what is read here; "
            f"`pluginlab db migrate {os.fspath(path)}` stores them",
            UnindexedEventsWarning, stacklevel=stacklevel,
        )
    return pending


def store_unindexed_events(path: str | os.PathLike[str]) -> int:
    """Store the events a killed process left only in the journal; returns how many.

    Does nothing (returns 0) while another store has the database open: that store indexes
    them itself.
    """
    pending = unindexed_events(path)
    if pending:
        try:
            ProvenanceStore(path).close()  # opening stores them
        except JournalBusy:
            return 0
    return pending


# ---------------------------------------------------------------------------------------------
# Verification

_VERIFY_SQL = f"SELECT {_EVENT_COLUMNS} FROM daid_events ORDER BY seq"


def verify_chain(conn: sqlite3.Connection) -> VerifyResult:
    """Recompute the hash chain of a v2 database and name the first broken row.

    Reasons: a missing seq (row deleted or renumbered), a row whose ``prev_hash`` points at
    another row (rows reordered), a row whose content no longer matches its ``chain_hash``
    (row edited), a DAID that no longer matches its row (hash, timestamp, agent or entity),
    or a tail shorter than the recorded chain head (log truncated). A file SQLite itself
    finds damaged (``PRAGMA quick_check``: a torn or overwritten page) fails first, with no
    row named: its rows cannot all be read back as stored.
    """
    damage = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
    if damage != ["ok"]:
        return VerifyResult(False, 0, None,
                            "the database file is damaged (SQLite quick_check: "
                            f"{'; '.join(' '.join(d.split()) for d in damage)})")
    expected = 1
    prev = GENESIS_HASH
    cache: dict[str | None, str] = {None: "null"}
    sha256 = hashlib.sha256

    def jstr(value: str | None) -> str:
        text = cache.get(value)
        if text is None:
            if len(cache) > 65536:
                cache.clear()
                cache[None] = "null"
            text = cache[value] = _jstr(value)
        return text

    for row in conn.execute(_VERIFY_SQL):
        (seq, daid, stamp, user_id, session_id, action, entity_type, entity_id, operation,
         details_json, parents_json, prev_hash, stored) = row
        if seq != expected:
            gap = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
            return VerifyResult(False, expected - 1, expected, f"seq {gap} missing (row deleted)")
        if prev_hash != prev:
            return VerifyResult(False, expected - 1, seq, _link_reason(conn, seq, prev_hash))
        content = (
            f'{prev}{{"action":{jstr(action)},"daid":{encode_basestring(daid)},'
            f'"details":{details_json or "null"},"entity_id":{jstr(entity_id)},'
            f'"entity_type":{jstr(entity_type)},"operation":{jstr(operation)},'
            f'"parents":{parents_json or "null"},"seq":{seq},"session_id":{jstr(session_id)},'
            f'"timestamp":{jstr(stamp)},"user_id":{jstr(user_id)}}}'
        )
        if sha256(content.encode("utf-8")).hexdigest() != stored:
            return VerifyResult(
                False, expected - 1, seq,
                f"seq {seq}: content does not match its chain hash (row edited)",
            )
        if entity_type is not None:  # rows the store wrote (not migrated legacy rows)
            hash_input = (
                f'{{"entity_id":{jstr(entity_id)},"metadata":{{"action":{jstr(action)},'
                f'"details":{details_json},"seq":{seq},"session_id":{jstr(session_id)}}},'
                f'"operation":{jstr(operation)},"parents":{parents_json}}}'
            )
            digest = sha256(hash_input.encode("utf-8")).hexdigest()[:16]
            if daid != _daid_string(str(stamp), user_id, entity_type, entity_id, digest):
                return VerifyResult(False, expected - 1, seq, _daid_reason(seq, daid, digest))
        prev = stored
        expected += 1
    checked = expected - 1
    head = None
    if _table_exists(conn, "chain_head"):
        head = conn.execute("SELECT seq, chain_hash FROM chain_head WHERE id = 1").fetchone()
        if head is None:  # every store writes it, an empty one too: deleted with the tail?
            return VerifyResult(False, checked, None,
                                "the chain head row is missing (log truncated or edited)")
    if head is not None and head[0] > checked:
        gap = f"{checked + 1}" if head[0] == checked + 1 else f"{checked + 1}..{head[0]}"
        return VerifyResult(False, checked, checked + 1, f"seq {gap} missing (log truncated)")
    if head is not None and (head[0] != checked or head[1] != prev):
        return VerifyResult(
            False, checked, checked,
            f"chain head (seq {head[0]}) does not match the last row (seq {checked})",
        )
    differs = _stored_state_mismatch(conn)
    if differs is not None:
        return VerifyResult(False, checked, None, differs)
    return VerifyResult(True, checked, None, "ok")


def _stored_state_mismatch(conn: sqlite3.Connection) -> str | None:
    """What restores read (``plugin_configurations``, ``session_tracks``) against the state
    rebuilt from the log, session by session, in one read snapshot: the first difference in
    words, or None. The stored state is not in the hash chain, so an edit of it would
    otherwise change what a restart restores without any check noticing. Sessions holding
    migrated legacy rows are skipped: their state began before the log."""
    own = not conn.in_transaction  # one snapshot: an indexer committing meanwhile is not seen
    if own:
        conn.execute("BEGIN")
    try:
        rebuilt: dict[str, State] = {}
        loads = json.loads
        for seq, event_id, stamp, user_id, session, action, details in conn.execute(
            "SELECT seq, id, timestamp, user_id, session_id, action, details FROM daid_events "
            f"WHERE action IN ({_REPLAYED}) ORDER BY seq"
        ):
            apply_event(rebuilt.setdefault(session, {}), Event(
                seq, event_id, stamp, user_id, session, action, "", "", "", loads(details),
                (), "", ""))
        legacy = {row[0] for row in conn.execute(
            "SELECT session_id FROM daid_events WHERE entity_type IS NULL UNION "
            "SELECT session_id FROM plugin_configurations WHERE daid_id NOT LIKE 'daid:%'")}
        stored_sessions = {row[0] for row in conn.execute(
            "SELECT session_id FROM session_tracks UNION "
            "SELECT session_id FROM plugin_configurations")}
        for session in sorted((set(rebuilt) | stored_sessions) - legacy, key=str):
            differs = _state_difference(_read_session_state(conn, session),
                                        rebuilt.get(session, {}))
            if differs is not None:
                return (f"session {session!r}: the stored state (what a restart restores) "
                        f"differs from the log: {differs} "
                        "(plugin_configurations or session_tracks edited?)")
        return None
    finally:
        if own:
            conn.execute("ROLLBACK")


def _state_difference(stored: State, logged: State) -> str | None:
    """The first difference between two session states, in words (None: equal)."""
    if list(stored) != list(logged):
        return f"tracks {list(stored)} stored, {list(logged)} in the log"
    for track_id, chain in stored.items():
        ids = [p["plugin_id"] for p in chain]
        logged_ids = [p["plugin_id"] for p in logged[track_id]]
        if ids != logged_ids:
            return f"track {track_id!r} holds {ids} stored, {logged_ids} in the log"
        for plugin, expected in zip(chain, logged[track_id]):
            for key in ("name", "plugin_path", "bypass"):
                if plugin[key] != expected[key]:
                    return (f"plugin {plugin['plugin_id']!r}: {key} {plugin[key]!r} stored, "
                            f"{expected[key]!r} in the log")
            values, logged_values = plugin["parameters"], expected["parameters"]
            for pid in sorted(set(values) | set(logged_values)):
                if values.get(pid) != logged_values.get(pid):
                    return (f"plugin {plugin['plugin_id']!r}: parameter {pid} "
                            f"{values.get(pid)!r} stored, {logged_values.get(pid)!r} in the log")
    return None


def _daid_reason(seq: int, daid: str, digest: str) -> str:
    try:
        parts = parse_daid(daid)
    except InvalidDaid as exc:
        return f"seq {seq}: {exc.message}"
    if parts.hash16 != digest:
        return f"seq {seq}: DAID hash does not match the event's content (row edited)"
    return f"seq {seq}: DAID does not match the row's timestamp, user or entity (row edited)"


def _link_reason(conn: sqlite3.Connection, seq: int, prev_hash: str) -> str:
    other = conn.execute(
        "SELECT seq FROM daid_events WHERE chain_hash = ? AND seq != ? LIMIT 1", (prev_hash, seq)
    ).fetchone()
    if other is not None:
        return (
            f"seq {seq}: follows seq {other[0]} in the chain, not seq {seq - 1} (rows reordered)"
        )
    return (
        f"seq {seq}: prev_hash does not match seq {seq - 1}'s chain hash "
        f"(seq {seq - 1} rewritten or prev_hash edited)"
    )


def _open_for_reading(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Read-only connection to a current-version database (errors otherwise).

    If a store of this process has the database open, its acknowledged events are indexed
    first, so the connection sees them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such database: {path}")
    flush_open_store(path)
    conn = _connect(path, readonly=True)
    try:
        version = schema_version(conn)
    except BaseException:
        conn.close()
        raise
    if version > SCHEMA_VERSION:
        conn.close()
        raise SchemaTooNew(path, version, SCHEMA_VERSION)
    if version < SCHEMA_VERSION:
        conn.close()
        raise RuntimeError(
            f"{path}: schema version {version} is older than {SCHEMA_VERSION}; "
            "run `pluginlab db migrate` first"
        )
    return conn


def verify_database(path: str | os.PathLike[str]) -> VerifyResult:
    """:func:`verify_chain` on the file at ``path``, opened read-only (never modified)."""
    conn = _open_for_reading(path)
    try:
        return verify_chain(conn)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Store


def _loads_or(text: Any, default: Any) -> Any:
    if not isinstance(text, (str, bytes)):
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _row_to_event(row: Sequence[Any]) -> Event:
    (seq, daid, stamp, user_id, session_id, action, entity_type, entity_id, operation,
     details, parents, prev_hash, stored) = row
    return Event(
        seq, daid, stamp, user_id, session_id, action, entity_type, entity_id, operation,
        _loads_or(details, {}), tuple(_loads_or(parents, [])), prev_hash, stored,
    )


_Journaled = tuple[Event, str, str]  # an event with its details and parents JSON


@dataclass(slots=True)
class _Prepared:
    draft: EventDraft
    details: dict[str, Any]
    details_json: str
    plugin_id: str | None


class _Request:
    """One append call: its prepared drafts and how to wake the caller.

    Synchronous callers block on a pre-acquired lock that the group's leader (or the fsync
    writer thread) releases (cheaper than a ``concurrent.futures.Future``). Asyncio callers
    (fsync mode only) carry their loop and future; the writer wakes each loop once per group,
    not once per request (a cross-thread wake-up is a socket write).
    """

    __slots__ = ("done", "error", "events", "future", "items", "lock", "loop")

    def __init__(
        self,
        items: list[_Prepared],
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[list[Event]] | None = None,
    ) -> None:
        self.items = items
        self.done = False
        self.events: list[Event] | None = None
        self.error: BaseException | None = None
        self.loop = loop
        self.future = future
        self.lock: Any = None
        if loop is None:
            self.lock = threading.Lock()
            self.lock.acquire()

    def wait(self) -> list[Event]:
        self.lock.acquire()
        if self.error is not None:
            raise self.error
        assert self.events is not None
        return self.events


def _finish(batch: Sequence[_Request]) -> None:
    """Wake every caller of a processed batch (``events``/``error`` already set)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
    for request in batch:
        if request.done:
            continue
        request.done = True
        if request.loop is None:
            request.lock.release()
        else:
            by_loop.setdefault(request.loop, []).append(request)
    for loop, requests in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, requests)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def _settle(requests: list[_Request]) -> None:
    for request in requests:
        future = request.future
        if future is None or future.done():
            continue
        if request.error is not None:
            future.set_exception(request.error)
        else:
            future.set_result(request.events or [])


_STOP = object()
_WAL_AUTOCHECKPOINT_PAGES = 10_000
_INSERT_EVENT = (
    f"INSERT INTO daid_events({_EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_PLUGIN_VALUES = (
    "track_id, position, name, plugin_name, plugin_path, parameters, bypass, created_by, "
    "created_at, updated_at, daid_id"
)
_INSERT_PLUGIN = (
    f"INSERT INTO plugin_configurations(id, session_id, plugin_id, {_PLUGIN_VALUES}) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# Only the columns that can change: an UPDATE that leaves the indexed keys alone does not
# dirty their index pages (fewer pages per commit).
_UPDATE_PLUGIN = (
    "UPDATE plugin_configurations SET "
    + ", ".join(f"{c.strip()} = ?" for c in _PLUGIN_VALUES.split(","))
    + " WHERE id = ?"
)


@dataclass
class _Changes:
    """What one indexing transaction must write besides the events."""

    dirty: dict[tuple[str, str], None] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    inserted: set[str] = field(default_factory=set)
    tracks: list[tuple[str, str, str]] = field(default_factory=list)
    heads: dict[tuple[str, str, str], str] = field(default_factory=dict)


_PLUGIN_COLUMNS = (
    "track_id, plugin_id, name, plugin_path, bypass, parameters, created_by, created_at, "
    "updated_at, daid_id, id"
)


def _plugin_from_row(row: Sequence[Any]) -> dict[str, Any]:
    _, plugin_id, name, path, bypass, parameters, created_by, created_at, updated_at, daid_id = (
        row[:10]
    )
    params = _loads_or(parameters, {})
    return {
        "plugin_id": plugin_id,
        "name": name,
        "plugin_path": path,
        "bypass": bool(bypass),
        "parameters": params if isinstance(params, dict) else {},
        "created_by": created_by,
        "created_at": created_at,
        "updated_at": updated_at,
        "daid_id": daid_id,
    }


def _read_session_state(conn: sqlite3.Connection, session_id: str) -> State:
    state: State = {}
    for (track_id,) in conn.execute(
        "SELECT track_id FROM session_tracks WHERE session_id = ? ORDER BY rowid", (session_id,)
    ):
        state[track_id] = []
    for row in conn.execute(
        f"SELECT {_PLUGIN_COLUMNS} FROM plugin_configurations WHERE session_id = ? "
        "ORDER BY position, rowid",
        (session_id,),
    ):
        state.setdefault(row[0], []).append(_plugin_from_row(row))
    return state


class _EventReads:
    """The read API of a DAID database, shared by :class:`ProvenanceStore` (which writes it)
    and :class:`ProvenanceReader` (read-only). Subclasses provide ``_reader()``."""

    path: str

    def _reader(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def events(
        self,
        session_id: str | None = None,
        *,
        user_id: str | None = None,
        action: str | None = None,
        entity_type: str | None = None,
        entity_id: str | None = None,
        plugin_id: str | None = None,
        since_seq: int | None = None,
        until_seq: int | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Stored events in seq order, filtered by every argument given (AND).

        ``since_seq``/``until_seq`` and ``start``/``end`` are inclusive bounds.
        """
        where: list[str] = []
        args: list[Any] = []
        for column, wanted in (
            ("session_id", session_id), ("user_id", user_id), ("action", action),
            ("entity_type", entity_type), ("entity_id", entity_id), ("plugin_id", plugin_id),
        ):
            if wanted is not None:
                where.append(f"{column} = ?")
                args.append(wanted)
        for clause, bound in (("seq >= ?", since_seq), ("seq <= ?", until_seq)):
            if bound is not None:
                where.append(clause)
                args.append(bound)
        for clause, moment in (("timestamp >= ?", start), ("timestamp <= ?", end)):
            if moment is not None:
                where.append(clause)
                args.append(timestamp_bound(moment, lower=clause.startswith("timestamp >")))
        sql = f"SELECT {_EVENT_COLUMNS} FROM daid_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._reader() as conn:
            return [_row_to_event(row) for row in conn.execute(sql, args)]

    def event(self, daid: str) -> Event:
        """The event with this DAID (:class:`DaidNotFound` if absent)."""
        parse_daid(daid)
        with self._reader() as conn:
            row = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM daid_events WHERE id = ?", (daid,)
            ).fetchone()
        if row is None:
            raise DaidNotFound(daid)
        return _row_to_event(row)

    def count(self) -> int:
        """Number of stored events."""
        with self._reader() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM daid_events").fetchone()[0])

    def sessions(self) -> list[str]:
        """Every session id known to the log or the projection, sorted."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT session_id FROM session_tracks UNION "
                "SELECT DISTINCT session_id FROM daid_events WHERE session_id IS NOT NULL "
                "UNION SELECT DISTINCT session_id FROM plugin_configurations "
                "WHERE session_id IS NOT NULL"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def session_state(self, session_id: str) -> State:
        """Current ``{track_id: [plugin dict in chain order]}``, read from the projection tables.

        This is what restores a session after a restart; empty tracks are included.
        """
        with self._reader() as conn:
            return _read_session_state(conn, session_id)

    def state_at(
        self,
        session_id: str,
        at: datetime | str | None = None,
        *,
        daid: str | None = None,
    ) -> State:
        """The session's state rebuilt from the event log alone.

        ``at``: include events with ``timestamp <= at`` (ms resolution; naive = UTC);
        ``daid``: include events up to and including that event (of any session);
        neither: the whole log (equals :meth:`session_state` for sessions that did not
        exist before the log, i.e. other than migrated legacy rows).
        """
        if at is not None and daid is not None:
            raise ValueError("give either at or daid, not both")
        where, args = ["session_id = ?"], [session_id]
        with self._reader() as conn:
            if daid is not None:
                parse_daid(daid)
                row = conn.execute("SELECT seq FROM daid_events WHERE id = ?", (daid,)).fetchone()
                if row is None:
                    raise DaidNotFound(daid)
                where.append("seq <= ?")
                args.append(row[0])
            elif at is not None:
                where.append("timestamp <= ?")
                args.append(timestamp_bound(at, lower=False))
            # Only what apply_event reads; parents and hashes are not needed to replay.
            cursor = conn.execute(
                "SELECT seq, id, timestamp, user_id, action, details FROM daid_events "
                f"WHERE {' AND '.join(where)} AND action IN ({_REPLAYED}) ORDER BY seq",
                args,
            )
            state: State = {}
            loads = json.loads
            for seq, event_id, stamp, user_id, action, details in cursor:
                apply_event(state, Event(seq, event_id, stamp, user_id, session_id, action, "",
                                         "", "", loads(details), (), "", ""))
        return state

    def verify(self) -> VerifyResult:
        """Recompute the whole hash chain (see :func:`verify_chain`)."""
        with self._reader() as conn:
            return verify_chain(conn)


class ProvenanceReader(_EventReads):
    """Read-only access to a DAID database, also while a :class:`ProvenanceStore` (in this or
    another process) writes it; only one store may open a database at a time.

    Same read methods as the store (``events``, ``event``, ``count``, ``sessions``,
    ``session_state``, ``state_at``, ``verify``). It sees what the writing store has indexed:
    everything it acknowledged when that store is in this process, otherwise up to a few ms
    less. Each read opens a short-lived read-only connection; nothing is ever modified.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _open_for_reading(self.path).close()  # exists and has a schema this code reads
        warn_if_unindexed(self.path)

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn = _open_for_reading(self.path)
        try:
            yield conn
        finally:
            conn.close()

    def close(self) -> None:
        """Nothing to release (kept for symmetry with the store)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


INDEX_LINGER = 0.005  # seconds without appends after which the indexer writes what it has
INDEX_MAX_DELAY = 0.25  # ... but it never waits longer than this after the first one
_INDEX_SLICE = 32  # events projected between two inserts (see ProvenanceStore._index)
_OPEN_STORES: dict[str, ProvenanceStore] = {}  # realpath -> the store writing it here
_OPEN_LOCK = threading.Lock()
_MISSING = object()


def flush_open_store(path: str | os.PathLike[str]) -> None:
    """If a store of this process writes the database at ``path``, wait for its indexer."""
    with _OPEN_LOCK:
        store = _OPEN_STORES.get(os.path.realpath(path))
    if store is not None and not store._closed:
        store.flush()


class _Undo:
    """Restores a store's sequencer state when a group could not be journaled."""

    __slots__ = ("_daids", "_entries", "_scalars", "_store")

    def __init__(self, store: ProvenanceStore) -> None:
        self._store = store
        self._scalars = (store._seq, store._head, store._last_ms, store._ms_daids)
        self._entries: list[tuple[dict[Any, str], Any, Any]] = []
        self._daids: list[tuple[set[str], str]] = []

    def add_daid(self, daids: set[str], daid: str) -> None:
        daids.add(daid)
        self._daids.append((daids, daid))

    def set(self, mapping: dict[Any, str], key: Any, value: str) -> None:
        self._entries.append((mapping, key, mapping.get(key, _MISSING)))
        mapping[key] = value

    def rollback(self) -> None:
        store = self._store
        store._seq, store._head, store._last_ms, store._ms_daids = self._scalars
        for daids, daid in self._daids:
            daids.discard(daid)
        for mapping, key, old in reversed(self._entries):
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old


class ProvenanceStore(_EventReads):
    """The DAID event log and plugin-state projection in one SQLite file.

    ``path`` None or ``":memory:"`` uses a private temporary file, deleted by :meth:`close`
    (SQLite's ``:memory:`` cannot be shared with reader connections). Opening migrates the
    database (:func:`migrate`) and stores any event that a crashed process had journaled but
    not yet indexed. One store per database file at a time: a second one (in any process)
    raises :class:`~pluginlab.journal.JournalBusy`; :class:`ProvenanceReader` reads meanwhile.

    Appends are thread-safe and **durable when they return**: each group of events is written
    to the journal (:mod:`pluginlab.journal`) first, then copied into the SQLite tables by an
    indexer thread, in big transactions, a few milliseconds later. Every read of this store
    (and every read through :mod:`pluginlab.analysis` or the CLI in this process) waits for
    the indexer first, so it sees every acknowledged event; another process sees them once
    indexed (``INDEX_LINGER`` plus one commit later). ``clock`` returns the current time (tests
    inject one); timestamps never go backwards.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        fsync: bool = False,
        clock: Callable[[], datetime] | None = None,
        max_batch: int = 10_000,
        max_backlog: int = 100_000,
    ) -> None:
        self._tmpdir: str | None = None
        if path is None or os.fspath(path) == ":memory:":
            self._tmpdir = tempfile.mkdtemp(prefix="pluginlab-provenance-")
            path = os.path.join(self._tmpdir, "provenance.sqlite")
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.fsync = fsync
        self._now_ms: Callable[[], int] = (
            (lambda: time.time_ns() // 1_000_000) if clock is None else (lambda: _to_ms(clock()))
        )
        self._parts: dict[tuple[str, ...], tuple[str, ...]] = {}  # see _encode_parts
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._closed = False
        self._close_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # fsync mode: grouped appends
        self._group_lock = threading.Lock()  # synchronous appends: see _lead_or_follow
        self._group: list[_Request] = []
        self._leading = False
        # sequencer state (under _seq_lock), (re)loaded from the tables by _load_state
        self._seq_lock = threading.Lock()
        self._journal_closed = False
        self._seq: int = 0
        self._head: str = GENESIS_HASH
        self._last_ms: int = 0
        self._ms_daids: set[str] = set()
        self._stamp_ms, self._stamp, self._dashed = -1, "", ""  # see _next_event
        self._last_daid: dict[tuple[str, str, str], str] = {}
        self._plugin_created: dict[tuple[str, str], str] = {}
        # indexer state: _indexed* under _index_cond; projection maps used by that thread only
        self._index_lock = threading.Lock()  # taken directly where nobody waits or notifies
        self._index_cond = threading.Condition(self._index_lock)
        self._backlog: list[_Journaled] = []  # journaled, not yet indexed
        self._indexed_seq = 0
        self._index_error: BaseException | None = None
        self._waiting_readers = 0
        self._states: dict[str, State] = {}
        self._row_ids: dict[tuple[str, str], str] = {}
        self._wconn = self._open_writer()
        try:
            self._journal = Journal(journal_path(self.path), fsync=fsync)
        except BaseException:
            self._wconn.close()
            raise
        try:
            self._load_state()
            self._recover()
        except BaseException:
            self._journal.close()
            self._wconn.close()
            raise
        self._indexer = threading.Thread(
            target=self._run_indexer, name="pluginlab-provenance-indexer", daemon=True
        )
        self._indexer.start()
        self._writer: threading.Thread | None = None
        if fsync:  # one fdatasync per group of concurrent appends
            self._writer = threading.Thread(
                target=self._run_writer, name="pluginlab-provenance-writer", daemon=True
            )
            self._writer.start()
        with _OPEN_LOCK:
            _OPEN_STORES[os.path.realpath(self.path)] = self

    # -- lifecycle ---------------------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        try:
            version = schema_version(conn)  # before anything writes to the file
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(self.path, version, SCHEMA_VERSION)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
            # Checkpoint every ~40 MB of WAL rather than SQLite's 4 MB: each checkpoint copies
            # (and syncs) every page touched since the last one, so rarer is cheaper (+15%
            # appends/s measured); the WAL is folded back into the database on close.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the indexes' hot pages
            migrate(conn, path=self.path)
            _ensure_derived(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Finish queued appends, index everything, close every connection. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
        with self._index_cond:
            self._index_cond.notify_all()
        self._indexer.join()
        with _OPEN_LOCK:
            if _OPEN_STORES.get(os.path.realpath(self.path)) is self:
                del _OPEN_STORES[os.path.realpath(self.path)]
        with self._seq_lock:  # appends already past the open check finish first; an event
            self._journal_closed = True  # journaled after the indexer stopped stays in the
            self._journal.close()  # file and is stored by the next open
        self._wconn.close()
        with self._readers_lock:
            for conn in self._all_readers:
                conn.close()
            self._readers.clear()
            self._all_readers.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------------------

    def append(self, draft: EventDraft) -> Event:
        """Record one event; returns it once it is durable (journaled).

        Raises :class:`InvalidEvent` (nothing written) for a bad draft, :class:`StoreClosed`
        after :meth:`close`, or the I/O error that made the journal write fail (nothing
        written either).
        """
        return self.append_many([draft])[0]

    def append_many(self, drafts: Sequence[EventDraft]) -> list[Event]:
        """Record several events as one group: all are stored, or none (and it raises)."""
        if not drafts:
            return []
        request = _Request([_prepare(d) for d in drafts])
        if self._writer is None:  # no fsync: writing the journal costs about a microsecond
            self._check_open()
            self._lead_or_follow(request)
        else:
            self._enqueue(request)
        return request.wait()

    def _lead_or_follow(self, request: _Request) -> None:
        """Group concurrent synchronous appends without a thread hand-off: the first caller
        to arrive journals everything queued meanwhile (its own and the followers') and wakes
        them; the followers just wait. Threads no longer queue on the sequencer lock."""
        with self._group_lock:
            self._group.append(request)
            if self._leading:
                return  # a leader is running and will take it
            self._leading = True
        try:
            while True:
                with self._group_lock:
                    batch, self._group = self._group, []
                    if not batch:
                        self._leading = False
                        return
                self._write_batch(batch)
        except BaseException as exc:  # e.g. KeyboardInterrupt: nobody may be left waiting
            with self._group_lock:
                left, self._group, self._leading = self._group, [], False
            for waiting in left:
                waiting.error = exc
            _finish(left)
            raise

    async def append_async(self, draft: EventDraft) -> Event:
        """:meth:`append` for asyncio (see :meth:`append_many_async`)."""
        return (await self.append_many_async([draft]))[0]

    async def append_many_async(self, drafts: Sequence[EventDraft]) -> list[Event]:
        """:meth:`append_many` for asyncio.

        The drafts are handed over synchronously, when the coroutine starts (so calls made in
        order are stored in that order). Without ``fsync`` they are journaled right there, on
        the loop, without suspending (one ``write`` of about a microsecond: cheaper than any
        hand-off). With ``fsync`` the writer thread groups concurrent appends under one
        ``fdatasync`` and the loop keeps running meanwhile; cancelling the awaiting task then
        does not withdraw the events once they were handed over.
        """
        if not drafts:
            return []
        items = [_prepare(d) for d in drafts]
        if self._writer is None:
            self._check_open()
            return self._journal_groups([items])[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Event]] = loop.create_future()
        self._enqueue(_Request(items, loop, future))
        return await future

    @property
    def appends_suspend(self) -> bool:
        """True when :meth:`append_many_async` suspends its caller until the write is done
        (``fsync``: a thread syncs). Otherwise it returns without suspending, so a transport
        gains nothing by pipelining requests around it."""
        return self._writer is not None

    def plugin_ids(self, session_id: str) -> set[str]:
        """Every plugin id ever created in ``session_id``, removed ones included (from memory:
        appended events count at once)."""
        with self._seq_lock:
            return {pid for sid, pid in self._plugin_created if sid == session_id}

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every event appended so far is in the SQLite tables.

        Raises the indexer's error if it cannot store them (they stay journaled and are
        retried, also on the next open), or TimeoutError.
        """
        with self._seq_lock:
            target = self._seq
        with self._index_cond:
            if not self._wait_on_indexer(lambda: self._indexed_seq >= target, timeout):
                raise TimeoutError(f"events up to seq {target} not indexed in {timeout} s")
            if self._indexed_seq < target:
                raise self._index_error or StoreClosed()

    def _wait_on_indexer(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Hold ``_index_cond``: wake the indexer now (someone waits: no lingering) and wait
        until ``done()``, an indexing error, or the indexer's end; False on timeout."""
        self._waiting_readers += 1
        self._index_cond.notify_all()
        try:
            return self._index_cond.wait_for(
                lambda: done() or self._index_error is not None or not self._indexer.is_alive(),
                timeout,
            )
        finally:
            self._waiting_readers -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed()

    def _enqueue(self, request: _Request) -> None:
        with self._close_lock:  # never enqueue behind the writer's stop marker
            self._check_open()
            self._queue.put(request)

    def _run_writer(self) -> None:
        """fsync mode: take everything queued, journal it with one fdatasync, repeat."""
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            count = len(item.items)
            while count < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                count += len(item.items)
            self._write_batch(batch)

    def _journal_groups(self, groups: list[list[_Prepared]]) -> list[list[Event]]:
        """Sequence, chain and journal groups of prepared drafts with one write; their events.

        All-or-nothing: if the journal write fails, the sequencer state is rolled back and
        the error raised; nothing of any group is stored.
        """
        if len(self._backlog) >= self._max_backlog:  # a racy peek; checked again under lock
            self._wait_for_backlog()
        with self._seq_lock:
            if self._journal_closed:  # close() finished while this append was on its way
                raise StoreClosed()
            undo = _Undo(self)
            try:
                lines: list[str] = []
                journaled: list[_Journaled] = []
                results = [
                    [self._next_event(p, lines, journaled, undo) for p in items]
                    for items in groups
                ]
                self._journal.append("".join(lines).encode("utf-8"))
            except BaseException:
                undo.rollback()
                raise
            with self._index_lock:  # = _index_cond's lock, without the Python-level wrapper
                idle = not self._backlog  # else the indexer is already lingering on it
                self._backlog += journaled
                if idle or len(self._backlog) >= self._max_batch:
                    self._index_cond.notify()
        return results

    def _write_batch(self, batch: list[_Request]) -> None:
        """Journal a group of queued requests (one write), then wake their callers.

        Never raises: every request of a failed group gets the error.
        """
        try:
            results = self._journal_groups([request.items for request in batch])
        except BaseException as exc:  # the callers get it, not the writer thread
            _log.exception("provenance store: could not journal %d request(s)", len(batch))
            for request in batch:
                request.error = exc
            _finish(batch)
            if not isinstance(exc, Exception):
                raise
            return
        for request, events in zip(batch, results):
            request.events = events
        _finish(batch)

    def _wait_for_backlog(self) -> None:
        """Back-pressure: block while the indexer is ``max_backlog`` events behind."""
        with self._index_cond:
            if len(self._backlog) >= self._max_backlog:
                self._wait_on_indexer(lambda: len(self._backlog) < self._max_backlog // 2)

    def _next_event(
        self, item: _Prepared, lines: list[str], journaled: list[_Journaled], undo: _Undo
    ) -> Event:
        """Sequence one prepared draft (caller holds ``_seq_lock``): its DAID, chain hash and
        journal line. The hot path of every recorded change, hence written out flat."""
        draft = item.draft
        seq = self._seq + 1
        ident = draft[:6]  # (user_id, session_id, action, entity_type, entity_id, operation)
        user_id, session, action, entity_type, entity_id, operation = ident
        parts = self._parts.get(ident)
        if parts is None:
            parts = self._encode_parts(ident)
        j_user, j_session, j_action, j_type, j_entity, j_operation, daid_middle = parts
        key = (session, entity_type, entity_id)
        creates_plugin = entity_type == "plugin" and operation == "create"
        previous = self._last_daid.get(key)
        created = None
        if item.plugin_id is not None and not creates_plugin:
            created = self._plugin_created.get((session, item.plugin_id))
        if previous is None:
            parents: tuple[str, ...] = () if created is None else (created,)
        elif created is None or created == previous:
            parents = (previous,)
        else:
            parents = (previous, created) if previous < created else (created, previous)
        parents_json = "[" + ",".join(map(encode_basestring, parents)) + "]"
        details_json = item.details_json
        digest = hashlib.sha256((
            f'{{"entity_id":{j_entity},"metadata":{{"action":{j_action},'
            f'"details":{details_json},"seq":{seq},"session_id":{j_session}}},'
            f'"operation":{j_operation},"parents":{parents_json}}}'
        ).encode()).hexdigest()[:16]
        ms = self._now_ms()
        if ms != self._last_ms:
            if ms < self._last_ms:
                ms = self._last_ms  # the clock stepped back: timestamps never do
            else:
                self._ms_daids = set()
                self._last_ms = ms
        while True:
            if ms != self._stamp_ms:  # formatted once per millisecond
                self._stamp_ms, self._stamp = ms, _iso_ms(ms)
                self._dashed = self._stamp.replace(":", "-")
            daid = f"daid:{DAID_VERSION}:{self._dashed}:{daid_middle}:{digest}"
            if daid not in self._ms_daids:
                break
            ms = self._last_ms = ms + 1  # astronomically rare: a 64-bit collision in 1 ms
            self._ms_daids = set()
        stamp = self._stamp
        undo.add_daid(self._ms_daids, daid)
        daid_json = encode_basestring(daid)
        prev = self._head
        chained = hashlib.sha256((
            f'{prev}{{"action":{j_action},"daid":{daid_json},"details":{details_json},'
            f'"entity_id":{j_entity},"entity_type":{j_type},"operation":{j_operation},'
            f'"parents":{parents_json},"seq":{seq},"session_id":{j_session},'
            f'"timestamp":"{stamp}","user_id":{j_user}}}'
        ).encode()).hexdigest()
        lines.append(
            f'[{seq},{daid_json},"{stamp}",{j_user},{j_session},{j_action},{j_type},'
            f'{j_entity},{j_operation},{encode_basestring(details_json)},'
            f'{encode_basestring(parents_json)},"{prev}","{chained}"]\n'
        )
        event = Event(seq, daid, stamp, user_id, session, action, entity_type, entity_id,
                      operation, item.details, parents, prev, chained)
        journaled.append((event, details_json, parents_json))
        self._seq = seq
        self._head = chained
        undo.set(self._last_daid, key, daid)
        if creates_plugin and item.plugin_id:
            undo.set(self._plugin_created, (session, item.plugin_id), daid)
        return event

    def _encode_parts(self, ident: tuple[str, str, str, str, str, str]) -> tuple[str, ...]:
        """JSON of each id and the DAID's ``agent:type:entity`` middle, cached per identity."""
        user_id, _session, _action, entity_type, entity_id, _operation = ident
        if len(self._parts) > 4096:
            self._parts.clear()
        parts = self._parts[ident] = (
            *map(encode_basestring, ident),
            f"{escape_id(user_id)}:{entity_type}:{escape_id(entity_id)}",
        )
        return parts

    # -- indexer thread ----------------------------------------------------------------------

    def _run_indexer(self) -> None:
        """Copy journaled events into the tables: one transaction per round, then truncate the
        journal whenever everything journaled is indexed. A failed round is retried (the
        events stay journaled); waiting readers get the error meanwhile."""
        delay = INDEX_LINGER
        while True:
            with self._index_cond:
                self._index_cond.wait_for(lambda: bool(self._backlog) or self._closed)
                if not self._backlog:
                    return  # closed, everything indexed
                self._linger(delay)
                work = self._backlog[: self._max_batch]
            try:
                self._index(work)
            except Exception as exc:  # noqa: BLE001 - retried; readers are told
                _log.exception("provenance store: indexing %d event(s) failed", len(work))
                with self._index_cond:
                    self._index_error = exc
                    self._index_cond.notify_all()
                    self._index_cond.wait_for(lambda: self._closed, min(delay * 20, 1.0))
                    if self._closed:
                        return  # the events stay journaled; the next open stores them
                delay = min(delay * 2, 0.05)
                continue
            delay = INDEX_LINGER
            with self._seq_lock, self._index_cond:
                del self._backlog[: len(work)]
                self._indexed_seq = work[-1][0].seq
                self._index_error = None
                if self._indexed_seq == self._seq:
                    self._journal.truncate()
                self._index_cond.notify_all()

    def _linger(self, delay: float) -> None:
        """Wait (holding ``_index_cond``) while events keep arriving: index once appends pause
        for ``delay`` or ``INDEX_MAX_DELAY`` has passed, so a burst of requests is not slowed
        by indexing in the middle of it. A waiting reader, a full batch or close() ends it."""
        began = time.monotonic()
        while not self._closed and not self._waiting_readers \
                and len(self._backlog) < self._max_batch:
            seen = len(self._backlog)
            left = INDEX_MAX_DELAY - (time.monotonic() - began)
            if left <= 0:
                return
            self._index_cond.wait(min(delay, left))
            if len(self._backlog) == seen:
                return  # quiet

    def _index(self, work: Sequence[_Journaled]) -> None:
        """Write journaled events and their projection in one transaction (indexer only).

        Events are projected and inserted in small slices, so the pure-Python stretches that
        hold the GIL stay short (each insert releases it) and the loop thread is not delayed.
        """
        conn = self._wconn
        first, last = work[0][0], work[-1][0]
        try:
            changes = _Changes()
            conn.execute("BEGIN IMMEDIATE")
            moved = conn.execute(
                "UPDATE chain_head SET seq = ?, chain_hash = ? "
                "WHERE id = 1 AND seq = ? AND chain_hash = ?",
                (last.seq, last.chain_hash, first.seq - 1, first.prev_hash),
            ).rowcount
            if moved != 1:
                raise RuntimeError(
                    f"{self.path}: the chain head moved under the store (another program wrote "
                    f"daid_events); events {first.seq}..{last.seq} stay in the journal"
                )
            for start in range(0, len(work), _INDEX_SLICE):
                piece = work[start:start + _INDEX_SLICE]
                rows = []
                for event, details_json, parents_json in piece:
                    changes.heads[(event.session_id, event.entity_type, event.entity_id)] = (
                        event.daid)
                    if event.action in _HANDLERS:
                        self._project(event, changes)
                    rows.append((*event[:9], details_json, parents_json, *event[11:]))
                conn.executemany(_INSERT_EVENT, rows)
            self._write_projection(conn, changes)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._load_projection()  # the tables still hold the state before this round
            raise

    def _recover(self) -> None:
        """Index what a previous process journaled but did not index, then empty the journal.

        Records already in the tables (seq <= chain head) are skipped; the rest must continue
        the chain exactly, or opening fails with the journal left untouched.
        """
        records = read_records(self._journal.path)
        work: list[_Journaled] = []
        for record in records:
            if len(record) != 13 or not isinstance(record[0], int):
                raise RuntimeError(f"{self._journal.path}: malformed record {record[:2]!r}")
            row = tuple(record)
            if row[0] <= self._seq:
                continue
            event = _row_to_event(row)
            if event.seq != self._seq + 1 or event.prev_hash != self._head \
                    or chain_hash(event.prev_hash, event) != event.chain_hash:
                raise RuntimeError(
                    f"{self._journal.path}: record seq {event.seq} does not continue the chain "
                    f"at seq {self._seq}; the journal was left as it is"
                )
            self._seq, self._head = event.seq, event.chain_hash
            work.append((event, row[9], row[10]))
        for start in range(0, len(work), self._max_batch):
            self._index(work[start:start + self._max_batch])
        if work:
            _log.warning("provenance store: stored %d journaled event(s) of an earlier run",
                         len(work))
            self._load_state()
        self._indexed_seq = self._seq
        self._journal.truncate()

    def _project(self, event: Event, changes: _Changes) -> None:
        """Apply ``event`` to the in-memory state and note which rows must be written."""
        session = event.session_id
        state = self._states.setdefault(session, {})
        details = event.details
        plugin_id = cast(str, details.get("plugin_id"))  # validated by _prepare
        key = (session, plugin_id)
        if event.action not in _STRUCTURAL:
            apply_event(state, event)
            if key in self._row_ids:
                changes.dirty[key] = None
            return
        track_id = cast(str, details.get("track_id"))
        before = _find(state, plugin_id, track_id)
        touched = {track_id}
        if before is not None:
            touched.add(next(t for t, p in state.items() if p is before[0]))
        known = set(state)
        apply_event(state, event)
        changes.tracks.extend(
            (session, track_id, event.timestamp) for track_id in state if track_id not in known
        )
        if event.action == "plugin_add" or _find(state, plugin_id) is None:
            old_row = self._row_ids.pop(key, None)
            if old_row is not None:
                changes.deletes.append(old_row)
                changes.inserted.discard(old_row)
            if event.action == "plugin_add":
                self._row_ids[key] = event.daid
                changes.inserted.add(event.daid)
        for name in touched:
            for plugin in state.get(name, ()):  # positions may have shifted
                changes.dirty[(session, plugin["plugin_id"])] = None

    def _write_projection(self, conn: sqlite3.Connection, changes: _Changes) -> None:
        """Write the batch's net effect on ``plugin_configurations`` / ``session_tracks``."""
        if changes.deletes:
            conn.executemany(
                "DELETE FROM plugin_configurations WHERE id = ?", [(d,) for d in changes.deletes]
            )
        if changes.heads:
            conn.executemany(
                "INSERT INTO entity_heads(session_id, entity_type, entity_id, daid) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET daid = excluded.daid",
                [(*key, daid) for key, daid in changes.heads.items()],
            )
        if changes.tracks:
            conn.executemany(
                "INSERT OR IGNORE INTO session_tracks(session_id, track_id, created_at) "
                "VALUES (?, ?, ?)",
                changes.tracks,
            )
        inserts, updates = [], []
        for session, plugin_id in changes.dirty:
            row_id = self._row_ids.get((session, plugin_id))
            state = self._states.get(session, {})
            found = _find(state, plugin_id)
            if found is None or row_id is None:
                continue
            plugins, position = found
            plugin = plugins[position]
            track_id = next(t for t, p in state.items() if p is plugins)
            values = (
                track_id, position, plugin["name"], plugin["name"], plugin["plugin_path"],
                canonical_json(plugin["parameters"]), int(plugin["bypass"]),
                plugin["created_by"], plugin["created_at"], plugin["updated_at"],
                plugin["daid_id"],
            )
            if row_id in changes.inserted:
                inserts.append((row_id, session, plugin_id, *values))
            else:
                updates.append((*values, row_id))
        if inserts:
            conn.executemany(_INSERT_PLUGIN, inserts)
        if updates:
            conn.executemany(_UPDATE_PLUGIN, updates)

    def _load_state(self) -> None:
        """(Re)build the sequencer's and the indexer's in-memory maps from the tables."""
        conn = self._wconn
        head = conn.execute("SELECT seq, chain_hash FROM chain_head WHERE id = 1").fetchone()
        self._seq, self._head = head if head is not None else (0, GENESIS_HASH)
        last = conn.execute(
            "SELECT timestamp FROM daid_events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        self._last_ms = _iso_to_ms(last[0]) if last and last[0] else 0
        self._ms_daids = set()
        if last and last[0]:
            self._ms_daids.update(
                r[0] for r in conn.execute(
                    "SELECT id FROM daid_events WHERE timestamp = ?", (last[0],)
                )
            )
        self._last_daid = {
            (s, t, e): d
            for s, t, e, d in conn.execute(
                "SELECT session_id, entity_type, entity_id, daid FROM entity_heads"
            )
        }
        if self._seq and not self._last_daid and conn.execute(
            "SELECT 1 FROM daid_events WHERE entity_type IS NOT NULL LIMIT 1"
        ).fetchone():  # the derived table was emptied by hand: the log rebuilds it
            conn.execute("BEGIN IMMEDIATE")
            _rebuild_heads(conn)
            conn.execute("COMMIT")
            self._load_state()
            return
        self._plugin_created = {  # every action listed: the (action, ...) index answers it
            (s, p): d
            for s, p, d in conn.execute(
                "SELECT session_id, COALESCE(plugin_id, entity_id), id FROM daid_events "
                f"WHERE action IN ({_ALL_ACTIONS}) AND entity_type = 'plugin' "
                "AND operation = 'create' ORDER BY seq"
            )
        }
        self._load_projection()

    def _load_projection(self) -> None:
        """(Re)build the indexer's projection maps from the tables."""
        conn = self._wconn
        self._states = {}
        self._row_ids = {}
        for session, track in conn.execute(
            "SELECT session_id, track_id FROM session_tracks ORDER BY rowid"
        ):
            self._states.setdefault(session, {})[track] = []
        for row in conn.execute(
            f"SELECT {_PLUGIN_COLUMNS}, session_id FROM plugin_configurations "
            "ORDER BY position, rowid"
        ):
            session = row[11]
            plugin = _plugin_from_row(row)
            self._states.setdefault(session, {}).setdefault(row[0], []).append(plugin)
            self._row_ids[(session, plugin["plugin_id"])] = row[10]

    # -- reads (see _EventReads) ---------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StoreClosed()
        self.flush()  # read your own (acknowledged) writes
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
            with self._readers_lock:
                self._all_readers.append(conn)
        try:
            yield conn
        finally:
            with self._readers_lock:
                if not self._closed:
                    self._readers.append(conn)


_PLUGIN_KEYS = ("track_id", "plugin_id")
_REQUIRED_DETAILS: dict[str, tuple[str, ...]] = {
    "plugin_add": _PLUGIN_KEYS,
    "plugin_remove": _PLUGIN_KEYS,
    "plugin_move": _PLUGIN_KEYS,
    "parameter_update": (*_PLUGIN_KEYS, "parameter_id"),
    "plugin_bypass": _PLUGIN_KEYS,
    "preset_load": _PLUGIN_KEYS,
}


_KINDS_SEEN: set[tuple[str, str, str]] = set()  # (action, entity_type, operation) validated


def _prepare(draft: EventDraft) -> _Prepared:
    """Validate a draft in the caller's thread; serialize its details once."""
    if not isinstance(draft, EventDraft):
        raise InvalidEvent("draft", f"expected an EventDraft, got {type(draft).__name__}")
    user_id, session_id, action, entity_type, entity_id, operation, details, plugin_id = draft
    if not (user_id and session_id and entity_id and type(user_id) is str
            and type(session_id) is str and type(entity_id) is str):
        for name in ("user_id", "session_id", "entity_id"):
            value = getattr(draft, name)
            if not isinstance(value, str) or not value:
                raise InvalidEvent(name, "must be a non-empty string")
    if (action, entity_type, operation) not in _KINDS_SEEN:
        if action not in ACTIONS:
            raise InvalidEvent("action", f"unknown action {action!r} (one of {_names(ACTIONS)})")
        if entity_type not in ENTITY_TYPES:
            raise InvalidEvent(
                "entity_type",
                f"unknown entity type {entity_type!r} (one of {_names(ENTITY_TYPES)})",
            )
        if operation not in OPERATIONS:
            raise InvalidEvent(
                "operation", f"unknown operation {operation!r} (one of {_names(OPERATIONS)})"
            )
        _KINDS_SEEN.add((action, entity_type, operation))  # valid: one lookup next time
    if not isinstance(details, Mapping):
        raise InvalidEvent("details", f"must be a dict, got {type(details).__name__}")
    try:
        details_json = canonical_json(details)
        if not details_json.isascii():
            details_json.encode("utf-8")  # lone surrogates cannot be stored
    except (TypeError, ValueError) as exc:
        raise InvalidEvent("details", f"not strict JSON: {exc}") from None
    details = dict(details)  # a shallow private copy; the stored form is details_json
    for key in _REQUIRED_DETAILS.get(action, ()):
        value = details.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidEvent(f"details.{key}", f"{action} needs a non-empty string")
    if plugin_id is None:
        found = details.get("plugin_id")
        if isinstance(found, str):
            plugin_id = found
    elif not isinstance(plugin_id, str):
        raise InvalidEvent("plugin_id", "must be a string or None")
    return _Prepared(draft, details, details_json, plugin_id)
