"""pluginlab.engine with real DawDreamer: chains, bypass, validation, renders, threads.

Every test renders generated signals through real DawDreamer processors and checks what comes
out (sample-exact where the Faust built-ins are deterministic, FFT/energy measures otherwise).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pluginlab import Engine, PresetLibrary, Source, builtin_names
from pluginlab.errors import (
    ErrorCode,
    InvalidMessage,
    InvalidParameter,
    PluginAddFailed,
    PluginNotFound,
    TrackNotFound,
)
from pluginlab.owner import owner

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
GAIN_6DB = 10 ** (-6 / 20)  # 0.50119


# -- helpers ---------------------------------------------------------------------------------


def energy(audio: np.ndarray) -> float:
    return float(np.sum(np.square(audio, dtype=np.float64)))


def band_energy(audio: np.ndarray, sr: int, lo: float, hi: float) -> float:
    """Energy of channel 0 between ``lo`` and ``hi`` Hz (FFT)."""
    spectrum = np.abs(np.fft.rfft(audio[0].astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(audio.shape[1], 1 / sr)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum())


def echo_index(audio: np.ndarray, start: int = 1) -> int:
    """Index of the loudest sample from ``start`` on (channel 0)."""
    return start + int(np.argmax(np.abs(audio[0, start:])))


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Factory for extra engines (fresh-engine references); all closed after the test."""
    made: list[Engine] = []

    def make(**kwargs: object) -> Engine:
        eng = Engine(presets=PresetLibrary(user_dir=tmp_path / f"presets{len(made)}"), **kwargs)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()


def build(eng: Engine, source: Source, chain: list[tuple[str, dict[str, object]]]) -> None:
    """Track "t" with ``source`` and the chain [(name, values)]."""
    track = eng.add_track("t", source)
    for name, values in chain:
        track.add(name).update(values)


NOISE = Source.noise(1.0, seed=7)


# -- bypass, removal, order ------------------------------------------------------------------


def test_bypass_is_sample_exact_dry_path(engine: Engine, make_engine: Callable[..., Engine]):
    a_vals = {"type": "lowpass", "cutoff": 3000.0}
    b_vals = {"drive": 30.0}
    c_vals = {"wet_dry": 0.5, "room_size": 0.6}
    build(engine, NOISE, [("Filter", a_vals), ("Distortion", b_vals), ("Reverb", c_vals)])
    track = engine.track("t")
    full = track.render(1.0)
    track[1].bypass = True
    assert track[1].bypass is True
    bypassed = track.render(1.0)

    ref = make_engine()
    build(ref, NOISE, [("Filter", a_vals), ("Reverb", c_vals)])
    assert np.array_equal(bypassed, ref.render(1.0))
    assert not np.allclose(full, bypassed, atol=1e-3)  # B really did something
    track[1].bypass = False
    assert np.array_equal(track.render(1.0), full)


def test_single_bypassed_plugin_equals_source(engine: Engine):
    track = engine.add_track("t", NOISE)
    track.add("Distortion").update({"drive": 40.0})
    track[0].bypass = True
    assert np.array_equal(track.render(1.0), NOISE.render(SR))


def test_bypass_requires_a_boolean(engine: Engine):
    plugin = engine.add_track("t").add("Utility")
    with pytest.raises(InvalidMessage):
        plugin.bypass = 1
    assert plugin.bypass is False
    plugin.bypass = np.bool_(True)  # numpy's bool is a boolean (it said "got bool")
    assert plugin.bypass is True


def test_remove_drops_the_processor(engine: Engine, make_engine: Callable[..., Engine]):
    build(engine, NOISE, [("Filter", {"cutoff": 2000.0}), ("Distortion", {"drive": 30.0}),
                          ("Utility", {"gain": -3.0})])
    track = engine.track("t")
    track.render(0.5)
    engine.render(0.5, sample_rate=48000)  # a second backend must lose it too
    dist = track[1]
    uid = dist.recipe.uid
    assert all(b.has(uid) for b in engine._backends.values())
    assert engine.holds(dist)
    track.remove(dist.id)
    assert not engine.holds(dist)
    assert len(engine._backends) == 2
    assert not any(b.has(uid) for b in engine._backends.values())
    assert [p.name for p in track] == ["Filter", "Utility"]
    with pytest.raises(PluginNotFound):
        engine.plugin(dist.id)
    with pytest.raises(PluginNotFound):
        dist.set("drive", 10.0)

    ref = make_engine()
    build(ref, NOISE, [("Filter", {"cutoff": 2000.0}), ("Utility", {"gain": -3.0})])
    assert np.array_equal(track.render(1.0), ref.render(1.0))


def test_move_reorders(engine: Engine, make_engine: Callable[..., Engine]):
    f_vals = {"type": "lowpass", "cutoff": 400.0}
    d_vals = {"drive": 30.0}
    build(engine, NOISE, [("Filter", f_vals), ("Distortion", d_vals)])
    track = engine.track("t")
    filter_first = track.render(1.0)
    track.move(track[1].id, 0)
    assert [p.name for p in track] == ["Distortion", "Filter"]
    dist_first = track.render(1.0)
    assert not np.allclose(filter_first, dist_first, atol=1e-3)

    ref_fd, ref_df = make_engine(), make_engine()
    build(ref_fd, NOISE, [("Filter", f_vals), ("Distortion", d_vals)])
    build(ref_df, NOISE, [("Distortion", d_vals), ("Filter", f_vals)])
    assert np.array_equal(filter_first, ref_fd.render(1.0))
    assert np.array_equal(dist_first, ref_df.render(1.0))
    track.move(track[0].id, 99)  # clamped to the end
    assert [p.name for p in track] == ["Filter", "Distortion"]
    assert np.array_equal(track.render(1.0), filter_first)


# -- what the built-ins do ---------------------------------------------------------------------


def test_lowpass_lowers_energy_above_cutoff(engine: Engine):
    track = engine.add_track("t", NOISE)
    dry = track.render(1.0)
    track.add("Filter").update({"type": "lowpass", "cutoff": 1000.0})
    wet = track.render(1.0)
    assert band_energy(wet, SR, 8000, 20000) < 0.01 * band_energy(dry, SR, 8000, 20000)
    low_ratio = band_energy(wet, SR, 50, 300) / band_energy(dry, SR, 50, 300)
    assert 0.7 < low_ratio < 1.3  # the pass band is kept


def test_utility_minus_6_db_halves_amplitude(engine: Engine):
    track = engine.add_track("t", NOISE)
    dry = track.render(1.0)
    track.add("Utility").gain = -6.0
    wet = track.render(1.0)
    ratio = np.sqrt(energy(wet) / energy(dry))
    assert abs(ratio - 0.501) / 0.501 < 0.005
    assert np.allclose(wet, dry * GAIN_6DB, atol=1e-6)


def test_reverb_lengthens_the_tail(engine: Engine):
    track = engine.add_track("t", Source.impulse(2.0))
    dry_tail = energy(track.render(2.0)[:, SR // 2:])
    reverb = track.add("Reverb")
    reverb.update({"wet_dry": 0.5, "room_size": 0.1})
    small = energy(track.render(2.0)[:, SR // 2:])
    reverb.room_size = 0.9
    large = energy(track.render(2.0)[:, SR // 2:])
    assert dry_tail == 0.0
    assert small > dry_tail
    assert large > 10 * small


@pytest.mark.parametrize("time_ms", [250.0, 40.0])
def test_delay_echo_lands_at_the_set_time(engine: Engine, time_ms: float):
    track = engine.add_track("t", Source.impulse(1.0))
    track.add("Delay").update({"time": time_ms, "feedback": 0.0, "mix": 1.0})
    audio = track.render(1.0)
    expected = round(time_ms * SR / 1000)
    assert abs(echo_index(audio, 0) - expected) <= 1
    assert abs(audio[0, 0]) < 1e-6  # mix 1: no dry impulse


# -- parameters --------------------------------------------------------------------------------


@pytest.fixture
def reverb(engine: Engine):
    return engine.add_track("t", NOISE).add("Reverb")


def test_get_and_set_by_id_and_attribute(engine: Engine, reverb):
    assert reverb.set("room_size", 0.7) == 0.7
    assert reverb.get("room_size") == 0.7
    assert reverb.room_size == 0.7
    reverb.wet_dry = 0.25
    assert reverb.get("wet_dry") == 0.25
    assert engine.set_parameter(reverb.id, "damping", 0.1) == 0.1
    assert reverb.values["damping"] == 0.1
    assert engine.set_parameters(reverb.id, {"pre_delay": 5, "damping": 0.2}) == {
        "pre_delay": 5.0, "damping": 0.2}
    assert reverb.pre_delay == 5.0


def test_numpy_scalars_are_numbers(engine: Engine):
    util = engine.add_track("t").add("Utility")
    assert util.set("gain", np.float32(-6.0)) == -6.0
    util.pan = np.float64(0.5)
    assert util.pan == 0.5
    with pytest.raises(InvalidParameter):
        util.set("gain", np.bool_(True))


def test_parameters_mapping_is_read_only(reverb):
    spec = reverb.parameters["room_size"]
    assert (spec.min, spec.max) == (0.0, 1.0)
    with pytest.raises(TypeError):
        reverb.parameters["room_size"] = spec  # type: ignore[index]
    with pytest.raises(TypeError):
        del reverb.parameters["room_size"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        reverb.parameters = {}
    assert list(reverb.parameters) == ["wet_dry", "room_size", "damping", "pre_delay"]


def test_dir_lists_parameter_ids(reverb):
    names = dir(reverb)
    for pid in ("wet_dry", "room_size", "damping", "pre_delay", "set", "bypass"):
        assert pid in names


def test_unknown_parameter_id(reverb):
    with pytest.raises(InvalidParameter) as info:
        reverb.set("loudness", 0.5)
    err = info.value
    assert err.code is ErrorCode.INVALID_PARAMETER
    assert set(err.details) == {"parameter_id", "parameter_value", "validation_error"}
    assert err.details["parameter_id"] == "loudness"
    assert err.details["parameter_value"] == 0.5
    for pid in reverb.parameters:
        assert pid in err.message
    with pytest.raises(AttributeError, match="room_size"):
        reverb.loudness  # noqa: B018
    with pytest.raises(AttributeError):
        reverb.loudness = 0.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, r"\[0, 1\]"),
        (-0.01, r"\[0, 1\]"),
        (float("nan"), r"finite.*\[0, 1\]"),
        (float("inf"), r"finite.*\[0, 1\]"),
        (float("-inf"), r"finite.*\[0, 1\]"),
        (True, r"boolean"),
        ("loud", r"str"),
        (None, r"NoneType"),
        ([0.5], r"list"),
    ],
)
def test_invalid_values_are_refused(reverb, value: object, expected: str):
    before = reverb.values
    with pytest.raises(InvalidParameter, match=expected) as info:
        reverb.set("wet_dry", value)
    assert info.value.details["parameter_id"] == "wet_dry"
    assert "[0, 1]" in info.value.details["validation_error"]
    assert reverb.values == before


def test_choice_names_are_accepted(engine: Engine):
    filt = engine.add_track("t").add("Filter")
    filt.type = "highpass"
    assert filt.type == 1.0
    filt.type = "BandPass"  # names are matched in any case, like built-in names
    assert filt.type == 2.0
    filt.type = "highpass"
    assert filt.text("type") == "highpass"
    filt.set("type", 2)
    assert filt.text("type") == "bandpass"
    with pytest.raises(InvalidParameter, match="lowpass, highpass, bandpass"):
        filt.type = "notch"
    with pytest.raises(InvalidParameter, match="whole number"):
        filt.type = 0.5
    assert filt.type == 2.0


def test_update_is_all_or_nothing_and_audio_unchanged(engine: Engine):
    track = engine.add_track("t", NOISE)
    filt = track.add("Filter")
    filt.update({"cutoff": 800.0, "resonance": 2.0})
    before_values = filt.values
    before = track.render(0.5)
    for bad in ({"cutoff": 500.0, "resonance": 99.0},
                {"cutoff": 500.0, "nope": 1.0},
                {"type": "highpass", "cutoff": float("nan")}):
        with pytest.raises(InvalidParameter):
            filt.update(bad)
        assert filt.values == before_values
    for attr, bad_value in (("cutoff", 1e9), ("resonance", True), ("cutoff", "x")):
        with pytest.raises(InvalidParameter):
            setattr(filt, attr, bad_value)
    assert filt.values == before_values
    assert np.array_equal(track.render(0.5), before)


# -- names, paths and ids ------------------------------------------------------------------


def test_builtin_names_are_case_insensitive(engine: Engine):
    track = engine.add_track("t")
    for spelling in ("reverb", "REVERB", " Reverb "):
        plugin = track.add(spelling)
        assert plugin.name == "Reverb"
        assert plugin.kind == "builtin" and plugin.resolved_as == "builtin"
        assert plugin.warning is None


def test_unknown_builtin_lists_the_builtins(engine: Engine):
    with pytest.raises(PluginAddFailed) as info:
        engine.add_plugin("t", "Reverbb")
    err = info.value
    assert err.code is ErrorCode.PLUGIN_ADD_FAILED
    assert err.details["name"] == "Reverbb"
    for name in builtin_names():
        assert name in err.message
    assert not engine.plugins


def test_placeholder_path_resolves_to_builtin(engine: Engine):
    track = engine.add_track("t", NOISE)
    plugin = track.add("Reverb", "/path/to/reverb.vst3")
    assert plugin.resolved_as == "builtin"
    assert plugin.kind == "builtin"
    assert plugin.plugin_path == "/path/to/reverb.vst3"
    assert plugin.warning and "/path/to/reverb.vst3" in plugin.warning
    assert "wet_dry" in plugin.parameters
    plugin.wet_dry = 0.5
    assert track.render(0.5).shape == (2, SR // 2)


def test_strict_paths_refuse_placeholders(make_engine: Callable[..., Engine]):
    strict = make_engine(strict_paths=True)
    with pytest.raises(PluginAddFailed) as info:
        strict.add_plugin("t", "Reverb", "/path/to/reverb.vst3")
    assert info.value.details["plugin_path"] == "/path/to/reverb.vst3"
    assert "not found" in info.value.details["reason"]
    assert not strict.plugins
    assert strict.add_plugin("t", "Reverb").resolved_as == "builtin"  # no path: still fine


def test_existing_non_plugin_file_fails_and_engine_survives(engine: Engine, tmp_path: Path):
    fake = tmp_path / "fake.so"
    fake.write_bytes(np.random.default_rng(0).bytes(4096))
    track = engine.add_track("t", NOISE)
    util = track.add("Utility")
    util.gain = -6.0
    before = track.render(0.5)
    with pytest.raises(PluginAddFailed) as info:
        track.add("Reverb", str(fake))  # a built-in name does not rescue an existing bad file
    assert info.value.details["plugin_path"] == str(fake)
    assert f"from {fake}:" in info.value.message  # which file could not be loaded
    assert [p.id for p in track] == [util.id]
    assert np.array_equal(track.render(0.5), before)
    added = track.add("Filter")
    assert added.id not in (None, util.id)
    assert track.render(0.5).shape == (2, SR // 2)


def test_failed_add_leaves_no_processor_behind(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    track = engine.add_track("t", NOISE)
    track.add("Utility")
    track.render(0.25)

    def broken(*_args: object) -> None:
        raise PluginAddFailed("Filter", None, "simulated failure after compile")

    monkeypatch.setattr(engine, "_specs_for", broken)
    with pytest.raises(PluginAddFailed, match="simulated"):
        track.add("Filter")
    monkeypatch.undo()
    live = {p.recipe.uid for p in engine.plugins.values()}
    for backend in engine._backends.values():
        assert set(backend._procs) == live


def test_duplicate_plugin_id(engine: Engine):
    engine.add_plugin("t", "Utility", plugin_id="gain")
    with pytest.raises(InvalidMessage) as info:
        engine.add_plugin("t", "Filter", plugin_id="gain")
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.details == {"field": "plugin_id", "reason": "already exists"}
    assert engine.plugin("gain").name == "Utility"
    assert len(engine.track("t")) == 1


def test_unknown_track(engine: Engine):
    engine.add_track("a")
    for call in (lambda: engine.track("nope"),
                 lambda: engine.render(0.1, track_id="nope"),
                 lambda: engine.plugin("x", track_id="nope"),
                 lambda: engine.remove_track("nope")):
        with pytest.raises(TrackNotFound) as info:
            call()
        assert info.value.code is ErrorCode.TRACK_NOT_FOUND
        assert info.value.details == {"track_id": "nope"}


def test_plugin_on_another_track(engine: Engine):
    plugin = engine.add_track("a").add("Utility")
    engine.add_track("b")
    with pytest.raises(PluginNotFound) as info:
        engine.plugin(plugin.id, track_id="b")
    assert info.value.code is ErrorCode.PLUGIN_NOT_FOUND
    assert info.value.details == {"plugin_id": plugin.id, "track_id": "b"}
    with pytest.raises(PluginNotFound):
        engine.remove_plugin(plugin.id, track_id="b")
    with pytest.raises(PluginNotFound):
        engine.track("b")[plugin.id]
    assert engine.plugin(plugin.id, track_id="a") is plugin


def test_default_track_ids_are_fresh(engine: Engine):
    first, second = engine.add_track(), engine.add_track()
    assert (first.id, second.id) == ("track_1", "track_2")
    engine.remove_track("track_1")
    third = engine.add_track()
    assert third is not second and third.id not in ("track_1", "track_2")
    assert set(engine.tracks) == {"track_2", third.id}


# -- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.5, 0.57, 1 / 3, 1.0])
def test_render_shape(engine: Engine, seconds: float):
    track = engine.add_track("t", NOISE)
    track.add("Utility")
    audio = track.render(seconds)
    assert audio.dtype == np.float32
    assert audio.shape == (2, round(seconds * SR))


def test_render_refuses_bad_durations(engine: Engine):
    engine.add_track("t", NOISE)
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError):
            engine.render(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("block_size", [128, 1024])
def test_other_sample_rate_and_block_size(engine: Engine, block_size: int):
    track = engine.add_track("t", Source.impulse(1.0))
    track.add("Delay").update({"time": 100.0, "feedback": 0.0, "mix": 1.0})
    at_48k = track.render(0.57, sample_rate=48000, block_size=block_size)
    assert at_48k.shape == (2, round(0.57 * 48000))
    assert abs(echo_index(at_48k, 0) - 4800) <= 1
    at_default = track.render(0.57)
    assert at_default.shape == (2, round(0.57 * SR))
    assert abs(echo_index(at_default, 0) - 4410) <= 1
    # a change after the 48 kHz backend exists reaches it too
    track[0].time = 50.0
    assert abs(echo_index(track.render(0.5, sample_rate=48000, block_size=block_size), 0)
               - 2400) <= 1


def test_tracks_mix_to_the_sum(engine: Engine):
    a = engine.add_track("a", NOISE)
    a.add("Filter").cutoff = 2000.0
    b = engine.add_track("b", Source.sine(330.0, seconds=1.0))
    b.add("Delay").update({"time": 120.0, "feedback": 0.3})
    c = engine.add_track("c", Source.sweep(seconds=1.0))
    mixed = engine.render(1.0)
    parts = [t.render(1.0) for t in (a, b, c)]
    assert mixed.shape == (2, SR)
    assert np.allclose(mixed, parts[0] + parts[1] + parts[2], atol=1e-5)
    assert np.allclose(engine.render(1.0), mixed, atol=1e-6)  # back to the mix after solos


def test_render_async_renders_the_values_of_when_it_was_called(engine: Engine):
    track = engine.add_track("t", NOISE)
    utility = track.add("Utility")
    utility.gain = -6.0
    loud = track.render(0.5)

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        first = engine.render_async(0.5)  # taken now, at -6 dB ...
        utility.gain = -20.0
        second = engine.render_async(0.5)  # ... and this one at -20 dB
        return await first, await second

    then, now = asyncio.run(scenario())
    assert np.array_equal(then, loud)
    level = 10 * np.log10(energy(now) / energy(then))
    assert level == pytest.approx(-14.0, abs=0.01)
    with pytest.raises(ValueError, match="seconds"):
        engine.render_async(-1.0)  # refused at the call, not at the await


def test_render_async_keeps_the_loop_running(engine: Engine):
    track = engine.add_track("t", NOISE)
    track.add("Reverb")
    gate = threading.Event()

    async def scenario() -> tuple[np.ndarray, int]:
        # Hold the owner thread until the event loop has demonstrably run other tasks: if
        # render_async blocked the loop, the ticker could never open the gate.
        held = owner().submit(gate.wait, 20.0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 50:
                    gate.set()
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        audio = await engine.render_async(2.0)
        seen = ticks
        task.cancel()
        assert held.result() is True
        return audio, seen

    audio, seen = asyncio.run(scenario())
    assert gate.is_set() and seen >= 50
    assert audio.shape == (2, 2 * SR)
    assert np.array_equal(audio, track.render(2.0))


def test_write_wav_round_trips(engine: Engine, tmp_path: Path):
    track = engine.add_track("t", NOISE)
    track.add("Reverb")
    audio = track.render(0.5)
    path = engine.write_wav(tmp_path / "out" / "take.wav", audio)  # folders are made
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == SR
    assert np.array_equal(data.T, audio)


# -- snapshots and threads ---------------------------------------------------------------------


def test_snapshot_restore(engine: Engine, make_engine: Callable[..., Engine]):
    track = engine.add_track("t", NOISE)
    track.add("Filter").update({"type": "highpass", "cutoff": 300.0})
    track.add("Distortion", plugin_id="fuzz").update({"drive": 20.0})
    track.add("Reverb").update({"wet_dry": 0.4, "room_size": 0.8})
    engine.plugin("fuzz").bypass = True
    other = engine.add_track("u", Source.sine(220.0, seconds=1.0))
    other.add("Tremolo")
    snap = engine.snapshot()

    copy = make_engine()
    copy.add_track("t", NOISE)
    copy.add_track("u", Source.sine(220.0, seconds=1.0))
    restored = copy.restore(snap)
    assert copy.snapshot() == snap
    assert [p.id for p in restored] == [p.id for t in engine.tracks.values() for p in t]
    assert copy.plugin("fuzz").bypass is True
    assert np.array_equal(copy.render(1.0), engine.render(1.0))


def test_concurrent_setters_while_rendering(engine: Engine, make_engine: Callable[..., Engine]):
    track = engine.add_track("t", Source.noise(0.5, seed=3))
    plugins = [track.add(n) for n in ("Filter", "Distortion", "Delay", "Utility")]
    pairs = [(p, pid) for p in plugins for pid, s in p.parameters.items() if s.kind == "float"]
    owned: list[list[tuple[object, str]]] = [pairs[k::4] for k in range(4)]  # one writer each
    last: dict[tuple[str, str], float] = {}
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        rng = random.Random(k)
        mine: dict[tuple[str, str], float] = {}
        try:
            for i in range(2000):
                plugin, pid = owned[k][i % len(owned[k])]
                spec = plugin.parameters[pid]  # type: ignore[attr-defined]
                value = rng.uniform(spec.min, spec.max)
                mine[(plugin.id, pid)] = plugin.set(pid, value)  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        last.update(mine)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    renders = 0
    while renders < 3 or any(th.is_alive() for th in threads):
        audio = track.render(0.25)
        assert audio.shape == (2, SR // 4) and np.isfinite(audio).all()
        renders += 1
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(last) == len(pairs)
    for (plugin_id, pid), value in last.items():
        assert engine.plugin(plugin_id).get(pid) == value

    final = track.render(0.5)
    fresh = make_engine()
    fresh.add_track("t", Source.noise(0.5, seed=3))
    fresh.restore(engine.snapshot())
    assert np.array_equal(final, fresh.render(0.5))


# -- DawDreamer regressions ------------------------------------------------------------------


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the subprocess hung (killed after {timeout} s); stdout: {exc.stdout!r}")


def test_closing_engines_gives_their_memory_back() -> None:
    """A server releases sessions full of plugins; without handing freed heap back to the OS
    its RSS stays near the peak (here 38% of the growth stayed). Measured in a fresh process."""
    done = _run_python("""
        import gc
        from pluginlab import Engine

        def rss():
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024

        warm = Engine()
        warm.add_track("t").add("Reverb")
        warm.close()
        before = rss()
        engines = []
        for _ in range(4):
            engine = Engine()
            track = engine.add_track("t")
            for i in range(10):
                track.add(["Reverb", "Delay", "Compressor", "Filter"][i % 4])
            track.render(0.5)
            engines.append(engine)
        peak = rss()
        for engine in engines:
            engine.close()
        del engines, engine, track
        gc.collect()
        print(before, peak, rss())
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    before, peak, after = map(float, done.stdout.split())
    assert peak - before > 30  # the plugins really took memory (MB)
    assert after - before < 0.1 * (peak - before)


FP_MARKER = "PLUGINLAB-FP-OK"
FP_CASE = """
    import numpy as np
    {setup}
    from pluginlab import Engine, Source
    engine = Engine()
    track = engine.add_track("t", Source.noise(0.5))
    track.add("Dragonfly", {vst!r})
    track.add("Reverb").wet_dry = 0.5
    audio = track.render(0.5)
    assert audio.shape == (2, 22050) and np.isfinite(audio).all()
    print({marker!r}, flush=True)
"""


def _dragonfly(vst_path: str) -> str:
    if "Dragonfly" not in vst_path:
        pytest.skip("the FP-environment crash is specific to Dragonfly (dragonfly-reverb-vst)")
    return vst_path


@pytest.mark.vst
def test_vst_then_reverb_compiles_in_a_subprocess(vst_path: str):
    done = _run_python(FP_CASE.format(setup="", vst=_dragonfly(vst_path), marker=FP_MARKER))
    assert done.returncode == 0, done.stderr[-2000:]
    assert FP_MARKER in done.stdout


def _aborted(done: subprocess.CompletedProcess[str]) -> bool:
    """True when the subprocess died of SIGABRT before printing the marker (skips when
    DawDreamer did not crash at all here: the control then shows nothing)."""
    if done.returncode == 0:
        pytest.skip("DawDreamer did not crash without the FP fix on this machine; "
                    "the control cannot show the regression test would fail")
    return done.returncode == -signal.SIGABRT and FP_MARKER not in done.stdout


@pytest.mark.vst
def test_control_raw_dawdreamer_aborts(vst_path: str):
    code = f"""
        import dawdreamer as daw
        engine = daw.RenderEngine(44100, 512)
        engine.make_plugin_processor("vst", {_dragonfly(vst_path)!r})
        proc = engine.make_faust_processor("reverb")
        proc.set_dsp_string(open({str(ROOT / "pluginlab/effects/reverb.dsp")!r}).read())
        proc.compile()
        print({FP_MARKER!r}, flush=True)
    """
    done = _run_python(code)
    assert _aborted(done), (done.returncode, done.stderr[-2000:])


@pytest.mark.vst
def test_control_pluginlab_without_fp_reset_aborts(vst_path: str):
    setup = "import pluginlab.backend as b; b.restore_fp_environment = lambda: None"
    done = _run_python(FP_CASE.format(setup=setup, vst=_dragonfly(vst_path), marker=FP_MARKER))
    assert _aborted(done), (done.returncode, done.stderr[-2000:])


@pytest.mark.vst
def test_faust_adds_after_vst_render(engine: Engine, vst_path: str):
    track = engine.add_track("t", NOISE)
    vst = track.add("VST", vst_path)
    previous = track.render(0.5)
    assert np.isfinite(previous).all() and energy(previous) > 0
    chain = [("Filter", {"cutoff": 5000.0}), ("Delay", {"time": 30.0, "mix": 0.2}),
             ("Distortion", {"drive": 6.0, "mix": 0.3}), ("Compressor", {"threshold": -30.0}),
             ("Utility", {"gain": -40.0, "width": 0.0})]
    for name, values in chain:
        track.add(name).update(values)
        audio = track.render(0.5)
        assert audio.shape == (2, SR // 2) and np.isfinite(audio).all()
        if name != "Utility":
            previous = audio
    assert [p.name for p in track] == [vst.name] + [n for n, _ in chain]
    # the last built-in's effect: width 0 makes both channels equal, -40 dB makes it quiet
    assert not np.array_equal(previous[0], previous[1])
    assert np.array_equal(audio[0], audio[1])
    assert 10 * np.log10(energy(audio) / energy(previous)) < -30


@pytest.mark.vst
def test_process_with_a_vst_exits_without_close(vst_path: str):
    """A VST destroyed off the owner thread (GC on the main thread, interpreter exit) used to
    hang the process forever; pluginlab hands every DawDreamer object to the owner."""
    code = f"""
        import gc
        from pluginlab import Engine, Source
        dropped = Engine()
        dropped.add_track("t", Source.noise(0.2)).add("VST", {vst_path!r})
        dropped.render(0.2)
        del dropped
        gc.collect()
        print("COLLECTED", flush=True)
        kept = Engine()  # never closed: released at exit
        kept.add_track("t", Source.noise(0.2)).add("VST", {vst_path!r})
        kept.render(0.2)
        print("EXITING", flush=True)
    """
    done = _run_python(code, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["COLLECTED", "EXITING"]


def test_dawdreamer_used_first_on_another_thread_fails_fast():
    """JUCE makes the first thread that renders its message thread; renders elsewhere then wait
    forever. pluginlab says so (EngineError) instead of hanging at the first render."""
    code = """
        import dawdreamer as daw
        import numpy as np
        raw = daw.RenderEngine(44100, 512)
        raw.load_graph([(raw.make_playback_processor("p", np.zeros((2, 512), np.float32)), [])])
        raw.render(0.1)
        import pluginlab.owner
        pluginlab.owner.PROBE_TIMEOUT = 2.0
        from pluginlab import Engine
        from pluginlab.errors import EngineError
        for attempt in range(2):
            try:
                Engine()
            except EngineError as exc:
                print("REFUSED", "message thread" in str(exc), flush=True)
    """
    done = _run_python(code, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["REFUSED", "True", "REFUSED", "True"]


def test_direct_dawdreamer_code_runs_on_the_owner(engine: Engine):
    import dawdreamer as daw

    track = engine.add_track("t", NOISE)
    track.add("Utility").gain = -6.0
    ours = track.render(0.5)

    def raw_render() -> np.ndarray:
        raw = daw.RenderEngine(SR, 512)
        player = raw.make_playback_processor("p", NOISE.render(SR))
        raw.load_graph([(player, [])])
        raw.render(0.5)
        return np.asarray(raw.get_audio()) * np.float32(GAIN_6DB)

    assert np.allclose(owner().call(raw_render), ours, atol=1e-6)


def test_plugin_removed_between_plan_and_render(engine: Engine,
                                                make_engine: Callable[..., Engine]):
    """A render planned before a removal (another thread) renders the chain without it."""
    build(engine, NOISE, [("Filter", {"cutoff": 1500.0}), ("Utility", {"gain": -6.0})])
    track = engine.track("t")
    track.render(0.5)
    plan = engine._render_plan(0.5, None, None, None)  # the plan holds both plugins
    engine.remove_plugin(track[1].id)
    audio = owner().call(engine._render_on_owner, *plan, {})
    ref = make_engine()
    build(ref, NOISE, [("Filter", {"cutoff": 1500.0})])
    assert np.array_equal(audio, ref.render(0.5))
