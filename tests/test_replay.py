"""Replay of recorded sessions as automation, and restore into a fresh engine (real store)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import pluginlab.lab as lab_module
from pluginlab.engine import Engine
from pluginlab.errors import InvalidParameter
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
