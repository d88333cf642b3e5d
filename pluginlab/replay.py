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

import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from .engine import Engine
from .provenance import Event, ProvenanceReader, ProvenanceStore, parse_timestamp
from .sources import Source

__all__ = ["Change", "Replay", "replay", "restore_engine"]


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
) -> Replay:
    """Render ``track_id`` with the session's recorded parameter changes (and preset loads)
    as automation; events automation cannot express are in ``skipped`` (and warned about).

    ``start`` defaults to ``lead`` seconds before the first recorded change (after ``start``
    when given), ``end`` to the last change; the render lasts ``end - start + tail`` seconds.
    """
    on_track = [e for e in store.events(session_id, start=start, end=end)
                if e.details.get("track_id") == track_id]
    events = [e for e in on_track if e.action in _VALUE_ACTIONS]
    if not events:
        raise ValueError(f"no recorded parameter changes on track {track_id!r} "
                         f"of session {session_id!r} in that window")
    t0 = parse_timestamp(start) if start is not None else (
        parse_timestamp(events[0].timestamp) - timedelta(seconds=lead))
    t_end = parse_timestamp(end) if end is not None else parse_timestamp(events[-1].timestamp)
    seconds = max((t_end - t0).total_seconds(), 0.0) + tail
    state = _state_before(store, session_id, events[0])
    engine = Engine(sample_rate, block_size)
    engine.add_track(track_id, source or Source.file("drum_loop.wav"))
    engine.restore({track_id: state.get(track_id, [])})
    changes, skipped = _changes(engine, events, t0)
    skipped = sorted(skipped + [e for e in on_track if e.action in _STRUCTURAL_ACTIONS
                                and e.seq > events[0].seq
                                and parse_timestamp(e.timestamp) <= t_end], key=_seq)
    if skipped:
        kinds = ", ".join(sorted({e.action for e in skipped}))
        warnings.warn(f"replay: {len(skipped)} recorded event(s) are not in the audio ({kinds}):"
                      f" automation cannot express them; see Replay.skipped", stacklevel=2)
    automation = _automation(engine, changes, int(round(seconds * sample_rate)), sample_rate)
    audio = engine.render(seconds, track_id=track_id, automation=automation)
    return Replay(audio, sample_rate, t0, changes, skipped, engine)


def _state_before(
    store: ProvenanceStore | ProvenanceReader, session_id: str, first: Event
) -> dict[str, Any]:
    """The session's plugins just before ``first`` (by sequence, not by clock)."""
    earlier = store.events(session_id, until_seq=first.seq - 1)
    return store.state_at(session_id, daid=earlier[-1].daid) if earlier else {}


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
