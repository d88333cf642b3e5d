"""Replay of recorded sessions as automation, and restore into a fresh engine (real store)."""

from __future__ import annotations

import asyncio
import math
import tracemalloc
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pluginlab.lab as lab_module
from pluginlab.engine import Engine
from pluginlab.errors import InvalidParameter
from pluginlab.provenance import EventDraft, ProvenanceStore
from pluginlab.replay import replay, restore_engine
from pluginlab.sources import Source

SECRET = "replay-test-secret-0123456789abcdef"


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


async def _record_tweaks(tmp: Path) -> tuple[lab_module.Lab, str]:
    lab = await lab_module.start(db=str(tmp / "lab.sqlite"), jwt_secret=SECRET,
                                 presets_dir=str(tmp / "presets"))
    gain = await lab.add_plugin("t", "Utility")
    await lab.add_plugin("t", "Filter")
    await asyncio.sleep(0.05)
    await lab.set(gain, "gain", -40.0)
    await asyncio.sleep(0.4)
    await lab.set(gain, "gain", 0.0)
    return lab, gain.id


def test_replay_changes_the_audio_where_the_recorded_change_happened(tmp_path: Path) -> None:
    async def scenario() -> None:
        lab, _ = await _record_tweaks(tmp_path)
        try:
            result = replay(lab.store, "notebook", "t",
                            source=Source.sine(220, 4.0, level_db=-6))
        finally:
            await lab.stop()
        sr = result.sample_rate
        assert [c.value for c in result.changes] == [-40.0, 0.0]
        first, second = (int(c.time * sr) for c in result.changes)
        margin = 256  # automation lands with block-size resolution (64 samples)
        before = rms(result.audio[:, : first - margin])
        during = rms(result.audio[:, first + margin: second - margin])
        after = rms(result.audio[:, second + margin:])
        assert 20 * np.log10(before / during) == pytest.approx(40.0, abs=1.0)
        assert after == pytest.approx(before, rel=0.01)
        assert result.skipped == []

    asyncio.run(scenario())


def test_replay_without_changes_is_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        lab = await lab_module.start(db=str(tmp_path / "lab.sqlite"), jwt_secret=SECRET,
                                     presets_dir=str(tmp_path / "presets"))
        try:
            await lab.add_plugin("t", "Utility")
            with pytest.raises(ValueError, match="no recorded parameter changes"):
                replay(lab.store, "notebook", "t")
        finally:
            await lab.stop()

    asyncio.run(scenario())


def test_restore_into_fresh_engine_renders_identical_audio(tmp_path: Path) -> None:
    async def scenario() -> None:
        lab = await lab_module.start(db=str(tmp_path / "lab.sqlite"), jwt_secret=SECRET,
                                     presets_dir=str(tmp_path / "presets"))
        try:
            source = Source.noise(1.0, level_db=-12, seed=3)
            lab.set_source("t", source)
            flt = await lab.add_plugin("t", "Filter")
            rev = await lab.add_plugin("t", "Reverb")
            dist = await lab.add_plugin("t", "Distortion")
            await lab.update(flt, {"type": "highpass", "cutoff": 800.0})
            await lab.set(rev, "room_size", 0.9)
            await lab.bypass(dist, True)
            live = await lab.render(1.0, "t")
            restored = restore_engine(lab.store, "notebook")
            restored.add_track("t", source)
            again = restored.render(1.0, track_id="t")
            assert restored.snapshot() == lab.engine.snapshot()
            np.testing.assert_array_equal(again, live)
            restored.close()
        finally:
            await lab.stop()

    asyncio.run(scenario())


def test_render_automation_is_validated_and_temporary() -> None:
    engine = Engine()
    track = engine.add_track("t", Source.sine(440, 1.0, level_db=-6))
    gain = track.add("Utility")
    with pytest.raises(InvalidParameter, match="out of range"):
        engine.render(0.5, automation={gain.id: {"gain": np.full(22050, 99.0)}})
    with pytest.raises(InvalidParameter, match="finite"):
        engine.render(0.5, automation={gain.id: {"gain": np.array([0.0, np.nan])}})
    plain = engine.render(0.5)
    ramp = np.linspace(0.0, -60.0, 22050, dtype=np.float32)
    automated = engine.render(0.5, automation={gain.id: {"gain": ramp}})
    assert rms(automated[:, -2048:]) < rms(plain[:, -2048:]) / 100
    np.testing.assert_array_equal(engine.render(0.5), plain)  # automation did not stick

    async def awaited() -> None:  # render_async takes the same automation, validated alike
        again = await engine.render_async(0.5, automation={gain.id: {"gain": ramp}})
        np.testing.assert_array_equal(again, automated)
        with pytest.raises(InvalidParameter, match="out of range"):
            await engine.render_async(0.5, automation={gain.id: {"gain": np.full(22050, 99.0)}})
        with pytest.raises(TypeError):
            await engine.render_async(0.5, automaton={})  # type: ignore[call-arg]

    asyncio.run(awaited())
    engine.close()


def test_replay_plays_preset_loads_and_reports_what_it_cannot_play(tmp_path: Path) -> None:
    """A preset load is automation like any change; a bypass toggle and a removal inside the
    window cannot be: they are in ``skipped``, with a warning, never silently dropped."""
    async def scenario() -> None:
        lab = await lab_module.start(db=str(tmp_path / "lab.sqlite"), jwt_secret=SECRET,
                                     presets_dir=str(tmp_path / "presets"))
        try:
            gain = await lab.add_plugin("t", "Utility")
            flt = await lab.add_plugin("t", "Filter")
            await asyncio.sleep(0.05)
            await lab.set(gain, "gain", -40.0)
            await asyncio.sleep(0.4)
            await lab.request("PLUGIN_PRESET", {"track_id": "t", "plugin_id": gain.id,
                                                "preset_data": {"gain": 0.0}})
            await asyncio.sleep(0.1)
            await lab.bypass(flt, True)
            await lab.remove_plugin(flt)
            await lab.set(gain, "gain", -1.0)
            with pytest.warns(UserWarning, match="plugin_bypass, plugin_remove"):
                result = replay(lab.store, "notebook", "t",
                                source=Source.sine(220, 4.0, level_db=-6))
        finally:
            await lab.stop()
        gains = [c for c in result.changes if c.parameter_id == "gain"]
        assert [c.value for c in gains] == [-40.0, 0.0, -1.0]  # the load sets every parameter
        assert [e.action for e in result.skipped] == ["plugin_bypass", "plugin_remove"]
        sr = result.sample_rate
        first, loaded = (int(c.time * sr) for c in gains[:2])
        during = rms(result.audio[:, first + 256: loaded - 256])
        after = rms(result.audio[:, loaded + 256: loaded + sr // 20])
        assert 20 * np.log10(after / during) == pytest.approx(40.0, abs=1.0)  # preset heard

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# Replays of stores written with an injected clock: long histories, long idle gaps


T0 = datetime(2026, 11, 25, 20, 0, 0, tzinfo=UTC)


class Clock:
    """Hands out the times queued with ``at`` (one per appended event)."""

    def __init__(self) -> None:
        self.times: deque[datetime] = deque()

    def __call__(self) -> datetime:
        return self.times.popleft()


def utility(plugin_id: str, track: str) -> EventDraft:
    return EventDraft("alice", "s", "plugin_add", "plugin", plugin_id, "create", {
        "track_id": track, "plugin_id": plugin_id, "name": "Utility", "plugin_path": None,
        "index": None, "parameters": {"gain": 0.0}, "bypass": False})


def gain(plugin_id: str, track: str, value: float) -> EventDraft:
    return EventDraft("alice", "s", "parameter_update", "parameter", f"{plugin_id}.gain",
                      "update", {"track_id": track, "plugin_id": plugin_id,
                                 "parameter_id": "gain", "value": value,
                                 "previous_value": None})


def recorded(path: Path, events: list[tuple[float, EventDraft]]) -> ProvenanceStore:
    """A store holding ``events``, each at ``T0 + seconds``."""
    clock = Clock()
    store = ProvenanceStore(path, clock=clock)
    clock.times.extend(T0 + timedelta(seconds=s) for s, _ in events)
    store.append_many([draft for _, draft in events])
    return store


def peak_python_memory(call: Callable[[], object]) -> int:
    """Peak bytes allocated through Python (numpy arrays included) while ``call`` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_replay_longer_than_max_seconds_is_refused_before_any_work(tmp_path: Path) -> None:
    """Two changes 11 minutes apart: the default window (first to last change, idle time
    included) would render 661.5 s; the error says so and how to ask for a window, and
    nothing was allocated for it (the audio alone would be 233 MB)."""
    with recorded(tmp_path / "gap.sqlite", [(0, utility("g", "t")), (1, gain("g", "t", -40.0)),
                                            (661, gain("g", "t", 0.0))]) as store:
        def default_window() -> None:
            with pytest.raises(ValueError, match=r"would render 661\.5 s .*start= and end="):
                replay(store, "s", "t", source=Source.sine(220, 1.0))

        assert peak_python_memory(default_window) < 2_000_000
        with pytest.raises(ValueError, match=r"would render 4\.5 s .*max_seconds=3"):
            replay(store, "s", "t", source=Source.sine(220, 1.0), end=T0 + timedelta(seconds=4),
                   max_seconds=3)
        allowed = replay(store, "s", "t", source=Source.sine(220, 1.0), max_seconds=math.inf,
                         sample_rate=8000, block_size=512)
        assert allowed.seconds == pytest.approx(661.5)


def test_a_short_window_late_in_a_long_session_reads_only_the_window(tmp_path: Path) -> None:
    """20,000 changes on another track, then two on the replayed one: a 0.6 s window does not
    hold the session's history in memory (Event objects for all of it took ~20 MB)."""
    history = [(0.0, utility("g", "t")), (0.0, utility("other", "u"))]
    history += [(0.01 * k, gain("other", "u", -(k % 60))) for k in range(20_000)]
    history += [(300.0, gain("g", "t", -40.0)), (300.4, gain("g", "t", 0.0))]
    with recorded(tmp_path / "long.sqlite", history) as store:
        def window() -> Any:
            return replay(store, "s", "t", source=Source.sine(220, 2.0, level_db=-6),
                          start=T0 + timedelta(seconds=299.9), end=T0 + timedelta(seconds=300.5))

        result = window()  # the first render in a process also builds caches; not counted
        peak = peak_python_memory(window)
    assert [(round(c.time, 3), c.value) for c in result.changes] == [(0.1, -40.0), (0.5, 0.0)]
    assert result.seconds == pytest.approx(1.6)
    sr = result.sample_rate
    during = rms(result.audio[:, int(0.15 * sr): int(0.45 * sr)])
    after = rms(result.audio[:, int(0.55 * sr):])
    assert 20 * np.log10(after / during) == pytest.approx(40.0, abs=1.0)
    assert peak < 8_000_000, f"peak {peak:,} bytes"


def test_a_start_between_two_milliseconds_leaves_out_the_change_before_it(
        tmp_path: Path) -> None:
    with recorded(tmp_path / "ms.sqlite", [(0, utility("g", "t")), (1.0, gain("g", "t", -40.0)),
                                           (1.4, gain("g", "t", -6.0))]) as store:
        result = replay(store, "s", "t", source=Source.sine(220, 1.0),
                        start=T0 + timedelta(seconds=1, microseconds=500))
    assert [c.value for c in result.changes] == [-6.0]
