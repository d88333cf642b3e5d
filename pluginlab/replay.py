"""Replay and restore: turn the provenance log back into sound.

* :func:`restore_engine` builds a fresh :class:`~pluginlab.engine.Engine` holding a session's
  plugins exactly as stored (ids, values, bypass, chain order) - what a restarted server does.
* :func:`replay` renders one track of a recorded session with its parameter changes applied as
  automation at the times they happened: "what did it sound like while they were tweaking".

Replay contract: the chain is the one in place just before the first replayed change (rebuilt
from the log with ``state_at``); parameter changes and preset loads of those plugins inside the
window become step automation, placed at ``(event time - start) * sample_rate``. DawDreamer
applies Faust automation once per block, so changes land with ``block_size`` resolution
(default 64 samples, ~1.5 ms). What automation cannot express is not replayed but listed in
``Replay.skipped``, with a warning: bypass toggles, plugins added or removed inside the window,
and changes to such plugins. Sessions do not store track sources, so the caller chooses the
input (default: ``data/drum_loop.wav``).
"""

from __future__ import annotations

import sqlite3
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from .engine import Engine
from .provenance import (
    Event,
    ProvenanceReader,
    ProvenanceStore,
    _open_for_reading,
    parse_timestamp,
    timestamp_bound,
)
from .sources import Source

__all__ = ["MAX_SECONDS", "Change", "Replay", "replay", "restore_engine"]


@dataclass(frozen=True)
class Change:
    """One replayed parameter change: seconds from the replay start."""

    time: float
    plugin_id: str
    parameter_id: str
    value: float
    user_id: str


@dataclass
class Replay:
    """A rendered replay and what went into it."""

    audio: np.ndarray
    sample_rate: int
    start: datetime
    changes: list[Change]
    skipped: list[Event] = field(default_factory=list)
    engine: Engine | None = None

    @property
    def seconds(self) -> float:
        return self.audio.shape[1] / self.sample_rate


def restore_engine(
    store: ProvenanceStore | ProvenanceReader, session_id: str, *,
    at: datetime | str | None = None,
    sample_rate: int = 44100, block_size: int = 512, **engine_kwargs: Any,
) -> Engine:
    """A new engine holding ``session_id``'s plugins: now (projection) or as of ``at`` (log)."""
    state = store.session_state(session_id) if at is None else store.state_at(session_id, at)
    engine = Engine(sample_rate, block_size, **engine_kwargs)
    engine.restore(state)
    return engine


MAX_SECONDS = 600.0  # the longest replay rendered unless ``max_seconds`` says otherwise


def replay(
    store: ProvenanceStore | ProvenanceReader,
    session_id: str,
    track_id: str,
    *,
    source: Source | None = None,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    lead: float = 0.5,
    tail: float = 1.0,
    sample_rate: int = 44100,
    block_size: int = 64,
    max_seconds: float = MAX_SECONDS,
) -> Replay:
    """Render ``track_id`` with the session's recorded parameter changes (and preset loads)
    as automation; events automation cannot express are in ``skipped`` (and warned about).

    ``start`` defaults to ``lead`` seconds before the first recorded change (after ``start``
    when given), ``end`` to the last change; the render lasts ``end - start + tail`` seconds,
    idle time included. Longer than ``max_seconds`` (default :data:`MAX_SECONDS`, 10 minutes;
    ``math.inf``: no limit) is ValueError, raised before the engine or any audio exists:
    pass ``start=`` and ``end=`` for a shorter window. The window is found by index lookups
    and only its events are read; the chain before it comes from ``state_at``.
    """
    with closing(_open_for_reading(store.path)) as conn:
        window = _track_window(conn, session_id, track_id, start, end)
        if window is None:
            raise ValueError(f"no recorded parameter changes on track {track_id!r} "
                             f"of session {session_id!r} in that window")
        first_seq, first_stamp, last_stamp = window
        t0 = parse_timestamp(start) if start is not None else (
            parse_timestamp(first_stamp) - timedelta(seconds=lead))
        t_end = parse_timestamp(end) if end is not None else parse_timestamp(last_stamp)
        seconds = max((t_end - t0).total_seconds(), 0.0) + tail
        _check_length(seconds, max_seconds, t0, t_end)
        end_text = timestamp_bound(t_end, lower=False)
        until = _last_seq_until(conn, end_text)
        before = _daid_before(conn, session_id, first_seq)
    on_track = [e for e in store.events(session_id, since_seq=first_seq, until_seq=until,
                                        end=end_text)
                if e.details.get("track_id") == track_id]
    events = [e for e in on_track if e.action in _VALUE_ACTIONS]
    state = store.state_at(session_id, daid=before) if before is not None else {}
    engine = Engine(sample_rate, block_size)
    engine.add_track(track_id, source or Source.file("drum_loop.wav"))
    engine.restore({track_id: state.get(track_id, [])})
    changes, skipped = _changes(engine, events, t0)
    skipped = sorted(skipped + [e for e in on_track if e.action in _STRUCTURAL_ACTIONS
                                and e.seq > first_seq], key=_seq)
    if skipped:
        kinds = ", ".join(sorted({e.action for e in skipped}))
        warnings.warn(f"replay: {len(skipped)} recorded event(s) are not in the audio ({kinds}):"
                      f" automation cannot express them; see Replay.skipped", stacklevel=2)
    automation = _automation(engine, changes, int(round(seconds * sample_rate)), sample_rate)
    audio = engine.render(seconds, track_id=track_id, automation=automation)
    return Replay(audio, sample_rate, t0, changes, skipped, engine)


def _check_length(seconds: float, max_seconds: float, t0: datetime, t_end: datetime) -> None:
    """ValueError when a render of ``seconds`` exceeds ``max_seconds``, saying how to avoid it."""
    if seconds > max_seconds:
        raise ValueError(
            f"replay would render {seconds:,.1f} s of audio ({t0.isoformat()} .. "
            f"{t_end.isoformat()} plus the tail, idle time included), more than "
            f"max_seconds={max_seconds:g}: pass start= and end= for a shorter window "
            "(e.g. end=start + timedelta(minutes=1)), or a larger max_seconds=")


# Read-only queries on the documented schema (daid_events with idx_daid_events_session
# (session_id, seq) and idx_daid_events_timestamp). They rely on the store's invariant that
# timestamps never decrease with seq (a time bound becomes a seq bound by one index lookup);
# the time condition is applied again, so no event outside the window is taken as inside.


def _track_window(
    conn: sqlite3.Connection, session_id: str, track_id: str,
    start: datetime | str | None, end: datetime | str | None,
) -> tuple[int, str, str] | None:
    """``(seq of the first, timestamp of the first, timestamp of the last)`` value change on
    the track within ``[start, end]``; None if there is none."""
    where = ["session_id = ?", "+track_id = ?",
             "+action IN ('parameter_update', 'preset_load')"]
    args: list[Any] = [session_id, track_id]
    if start is not None:
        low = _first_seq_from(conn, timestamp_bound(start, lower=True))
        where += ["seq >= ?", "+timestamp >= ?"]
        args += [_MAX_SEQ if low is None else low, timestamp_bound(start, lower=True)]
    if end is not None:
        high = _last_seq_until(conn, timestamp_bound(end, lower=False))
        where += ["seq <= ?", "+timestamp <= ?"]
        args += [-1 if high is None else high, timestamp_bound(end, lower=False)]
    sql = f"SELECT seq, timestamp FROM daid_events WHERE {' AND '.join(where)} ORDER BY seq"
    first = conn.execute(f"{sql} LIMIT 1", args).fetchone()
    if first is None:
        return None
    last = conn.execute(f"{sql} DESC LIMIT 1", args).fetchone()
    return int(first[0]), str(first[1]), str(last[1])


_MAX_SEQ = 2**63 - 1


def _first_seq_from(conn: sqlite3.Connection, stamp: str) -> int | None:
    """The first seq whose timestamp is ``stamp`` or later (None: no such event)."""
    row = conn.execute(
        "SELECT MIN(seq) FROM daid_events WHERE timestamp = "
        "(SELECT MIN(timestamp) FROM daid_events WHERE timestamp >= ?)", (stamp,)).fetchone()
    return None if row[0] is None else int(row[0])


def _last_seq_until(conn: sqlite3.Connection, stamp: str) -> int | None:
    """The last seq whose timestamp is ``stamp`` or earlier (None: no such event)."""
    row = conn.execute(
        "SELECT MAX(seq) FROM daid_events WHERE timestamp = "
        "(SELECT MAX(timestamp) FROM daid_events WHERE timestamp <= ?)", (stamp,)).fetchone()
    return None if row[0] is None else int(row[0])


def _daid_before(conn: sqlite3.Connection, session_id: str, seq: int) -> str | None:
    """The DAID of the session's last event before ``seq`` (by sequence, not by clock)."""
    row = conn.execute("SELECT id FROM daid_events WHERE session_id = ? AND seq < ? "
                       "ORDER BY seq DESC LIMIT 1", (session_id, seq)).fetchone()
    return None if row is None else str(row[0])




_VALUE_ACTIONS = ("parameter_update", "preset_load")  # replayed as automation
_STRUCTURAL_ACTIONS = ("plugin_bypass", "plugin_add", "plugin_remove")  # reported as skipped


def _seq(event: Event) -> int:
    return event.seq


def _changes(engine: Engine, events: list[Event], t0: datetime) -> tuple[list[Change], list[Event]]:
    """Automation steps from parameter updates and preset loads (one per parameter set);
    events of plugins not in the replayed chain are skipped."""
    changes, skipped = [], []
    for event in events:
        d = event.details
        plugin = engine.plugins.get(str(d.get("plugin_id")))
        values: dict[str, Any] = ({str(d.get("parameter_id")): d.get("value")}
                  if event.action == "parameter_update" else dict(d.get("parameters") or {}))
        if plugin is None or not set(values) <= set(plugin.parameters):
            skipped.append(event)
            continue
        t = max((parse_timestamp(event.timestamp) - t0).total_seconds(), 0.0)
        changes += [Change(t, plugin.id, pid, float(value), event.user_id)
                    for pid, value in values.items()]
    return changes, skipped


def _automation(engine: Engine, changes: list[Change], n: int, sample_rate: int
                ) -> dict[str, dict[str, np.ndarray]]:
    """Step automation per (plugin, parameter), starting from the restored value."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for change in changes:
        per_plugin = out.setdefault(change.plugin_id, {})
        if change.parameter_id not in per_plugin:
            start_value = engine.plugins[change.plugin_id].get(change.parameter_id)
            per_plugin[change.parameter_id] = np.full(n, start_value, dtype=np.float32)
        index = min(n, int(round(change.time * sample_rate)))
        per_plugin[change.parameter_id][index:] = change.value
    return out
