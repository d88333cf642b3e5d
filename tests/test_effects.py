"""The built-in DSP library (``pluginlab/effects/*.dsp``) and its factory presets.

Everything runs through real DawDreamer on generated signals (sine, noise, impulse). Each
built-in is compiled once per sample rate: :class:`Rig` makes every processor of an engine
*before* its first render, because DawDreamer 0.9.0 can raise a spurious
``FaustProcessor::compile(): ... undefined symbol : process`` when a Faust processor is added to
an engine whose graph has already been rendered.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import dawdreamer as daw
import numpy as np
import pytest

from pluginlab.effects import EffectSpec, find, library
from pluginlab.owner import owner
from pluginlab.parameters import ParameterSpec

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
BLOCK = 512
PRESETS_DIR = ROOT / "data" / "presets"

REQUIRED = (
    "Reverb",
    "Delay",
    "Chorus",
    "Phaser",
    "Filter",
    "EQ",
    "Compressor",
    "Distortion",
    "Utility",
    "Tremolo",
    "Oscillator",
    "Noise",
)
SOURCES = {"Oscillator", "Noise"}
UNITS = {"", "dB", "Hz", "ms", "s", "%"}
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

LIB: dict[str, EffectSpec] = library()
KEYS = sorted(LIB)
EFFECT_KEYS = [k for k in KEYS if not LIB[k].is_source]
PRESET_FILES = sorted(PRESETS_DIR.glob("*/*.json"))


# -- signals and measurements ---------------------------------------------------------------


def noise(n: int, seed: int = 0, amp: float = 0.5) -> np.ndarray:
    """Independent uniform noise on both channels, peak ``amp``."""
    return np.random.default_rng(seed).uniform(-amp, amp, (2, n)).astype(np.float32)


def sine(freq: float, n: int, amp: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(n) / sr
    s = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([s, s])


def impulse(n: int) -> np.ndarray:
    x = np.zeros((2, n), np.float32)
    x[:, 0] = 1.0
    return x


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def gain_db(y: np.ndarray, x: np.ndarray, skip: int = SR // 10) -> float:
    """Level of ``y`` relative to ``x`` in dB, ignoring the first ``skip`` samples."""
    return 20 * np.log10(rms(y[:, skip:]) / rms(x[:, skip:]))


def peak_frequency(mono: np.ndarray, sr: int = SR) -> float:
    """Frequency of the largest FFT bin, refined by parabolic interpolation."""
    spec = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-30)
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + offset) * sr / len(mono)


def band_power(mono: np.ndarray, lo: float, hi: float, sr: int = SR) -> float:
    power = np.abs(np.fft.rfft(mono)) ** 2
    freqs = np.fft.rfftfreq(len(mono), 1 / sr)
    return float(power[(freqs >= lo) & (freqs < hi)].mean())


def random_values(spec: EffectSpec, rng: np.random.Generator) -> dict[str, float]:
    values = {}
    for p in spec.parameters:
        if p.kind in ("choice", "bool", "int"):
            values[p.id] = float(rng.integers(int(p.min), int(p.max) + 1))
        else:
            values[p.id] = float(rng.uniform(p.min, p.max))
    return values


# -- the rig: one engine per sample rate, every built-in compiled once ----------------------


class Rig:
    """A RenderEngine at ``sr`` with one compiled processor per built-in and one input player."""

    def __init__(self, sr: int) -> None:
        self.sr = sr
        self.engine = daw.RenderEngine(sr, BLOCK)
        self.procs: dict[str, Any] = {}
        self.index: dict[str, dict[str, int]] = {}
        for key, spec in LIB.items():
            proc = self.engine.make_faust_processor(f"builtin_{key}")
            proc.set_dsp_string(spec.code)
            proc.compile()
            self.procs[key] = proc
            self.index[key] = {d["label"]: d["index"] for d in proc.get_parameters_description()}
        self.player = self.engine.make_playback_processor("test_input", noise(BLOCK))

    def describe(self, key: str) -> list[dict[str, Any]]:
        return owner().call(lambda: list(self.procs[key].get_parameters_description()))

    def render(
        self, key: str, audio: np.ndarray | None = None, seconds: float = 1.0, **values: float
    ) -> np.ndarray:
        """Render built-in ``key`` with its defaults overridden by ``values``.

        Runs on pluginlab's owner thread: DawDreamer renders only on the first thread that
        ever rendered in the process, and the rest of the suite renders there too.
        """
        return owner().call(lambda: self._render(key, audio, seconds, **values))

    def _render(
        self, key: str, audio: np.ndarray | None, seconds: float, **values: float
    ) -> np.ndarray:
        spec, proc = LIB[key], self.procs[key]
        unknown = set(values) - {p.id for p in spec.parameters}
        assert not unknown, f"{spec.name} has no parameter {unknown}"
        merged = {p.id: p.default for p in spec.parameters} | values
        for pid, value in merged.items():
            proc.set_parameter(self.index[key][pid], float(value))
        if spec.is_source:
            self.engine.load_graph([(proc, [])])
            n = int(seconds * self.sr)
        else:
            assert audio is not None
            audio = np.ascontiguousarray(audio, dtype=np.float32)
            self.player.set_data(audio)
            self.engine.load_graph([(self.player, []), (proc, ["test_input"])])
            n = audio.shape[1]
        self.engine.render(n / self.sr)
        out = np.asarray(self.engine.get_audio())
        assert out.shape == (2, n)
        return out


_RIGS: dict[int, Rig] = {}


def rig_at(sr: int) -> Rig:
    if sr not in _RIGS:
        _RIGS[sr] = owner().call(Rig, sr)
    return _RIGS[sr]


@pytest.fixture(scope="module")
def rig() -> Rig:
    return rig_at(SR)


def ids(keys: list[str]) -> list[str]:
    return [LIB[k].name for k in keys]


# -- the library as a whole -----------------------------------------------------------------


def test_library_has_every_required_builtin():
    assert len(LIB) >= 12
    names = {spec.name for spec in LIB.values()}
    assert set(REQUIRED) <= names
    for name in REQUIRED:
        spec = find(name)
        assert spec is not None and spec.name == name
        assert find(name.upper()) is spec
        assert spec.is_source == (name in SOURCES)
    assert len(EFFECT_KEYS) >= 10 and len(PRESET_FILES) >= 2 * len(LIB)


@pytest.mark.parametrize("key", KEYS, ids=ids(KEYS))
def test_builtin_compiles_with_expected_channels(rig, key):
    proc = rig.procs[key]
    assert proc.get_num_output_channels() == 2
    assert proc.get_num_input_channels() == (0 if LIB[key].is_source else 2)


@pytest.mark.parametrize("key", KEYS, ids=ids(KEYS))
def test_parsed_specs_match_compiled_program(rig, key):
    spec = LIB[key]
    desc = {d["label"]: d for d in rig.describe(key)}
    assert set(desc) == {p.id for p in spec.parameters}
    for p in spec.parameters:
        d = desc[p.id]
        # no UI groups: the path is /<declared name>/<id>
        assert d["name"] == f"/{spec.name}/{p.id}"
        assert d["min"] == pytest.approx(p.min, rel=1e-6, abs=1e-6)
        assert d["max"] == pytest.approx(p.max, rel=1e-6, abs=1e-6)
        assert d["value"] == pytest.approx(p.default, rel=1e-6, abs=1e-6)
        assert d["step"] == pytest.approx(p.step, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("key", KEYS, ids=ids(KEYS))
def test_specs_follow_the_conventions(key):
    spec = LIB[key]
    assert spec.description.strip()
    assert spec.parameters, f"{spec.name} has no parameters"
    pids = [p.id for p in spec.parameters]
    assert len(pids) == len(set(pids))
    for p in spec.parameters:
        assert SNAKE.match(p.id), p.id
        assert p.name.strip()
        assert p.unit in UNITS, (p.id, p.unit)
        assert p.min < p.max and p.min <= p.default <= p.max
        assert p.step is not None and p.step > 0
        assert p.validate(p.default) == p.default
        if p.kind == "choice":
            assert p.choices and len(set(p.choices)) == len(p.choices)
            assert (p.min, p.max, p.step) == (0, len(p.choices) - 1, 1)
            assert p.validate(p.choices[-1]) == len(p.choices) - 1
        if p.kind == "bool":
            assert (p.min, p.max, p.default) == (0, 1, 0)


@pytest.mark.parametrize("key", KEYS, ids=ids(KEYS))
def test_renders_stay_finite_and_bounded(rig, key):
    spec = LIB[key]
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    settings = {
        "min": {p.id: p.min for p in spec.parameters},
        "max": {p.id: p.max for p in spec.parameters},
        "default": {},
    }
    for i in range(5):
        settings[f"random{i}"] = random_values(spec, rng)
    x = None if spec.is_source else noise(SR // 2, seed=1)
    for label, values in settings.items():
        y = rig.render(key, x, seconds=0.5, **values)
        assert np.isfinite(y).all(), label
        assert np.abs(y).max() < 20, (label, float(np.abs(y).max()))
        if label == "default" and spec.is_source:
            assert rms(y) > 1e-3


@pytest.mark.parametrize("sr", [22050, 96000])
def test_every_builtin_is_stable_at_other_sample_rates(sr):
    other = rig_at(sr)
    for key, spec in LIB.items():
        x = None if spec.is_source else noise(sr // 4, seed=2)
        for values in (
            {p.id: p.min for p in spec.parameters},
            {p.id: p.max for p in spec.parameters},
            {},
        ):
            y = other.render(key, x, seconds=0.25, **values)
            assert np.isfinite(y).all() and np.abs(y).max() < 20, (spec.name, values)


# -- factory presets ------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS, ids=ids(KEYS))
def test_every_builtin_has_factory_presets(key):
    assert len(list((PRESETS_DIR / key).glob("*.json"))) >= 2


@pytest.mark.parametrize(
    "path", PRESET_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in PRESET_FILES]
)
def test_factory_preset_is_valid(path):
    body = json.loads(path.read_text())
    assert set(body) == {"name", "plugin", "parameters"}
    assert isinstance(body["name"], str) and body["name"].strip()
    spec = find(body["plugin"])
    assert spec is not None and spec.name == body["plugin"] and spec.key == path.parent.name
    # the file name is the slug pluginlab uses when saving a preset of that name
    assert path.stem == re.sub(r"[^0-9A-Za-z]+", "_", body["name"].strip()).strip("_").lower()
    params = body["parameters"]
    assert isinstance(params, dict) and params
    by_id: dict[str, ParameterSpec] = {p.id: p for p in spec.parameters}
    for pid, value in params.items():
        assert pid in by_id, f"{spec.name} has no parameter {pid!r}"
        assert by_id[pid].validate(value) == value


def _test_signal(n: int) -> np.ndarray:
    """Noise plus low, mid and high sines, so every kind of effect has something to act on."""
    x = noise(n, seed=3, amp=0.2)
    for freq in (100.0, 1000.0, 5000.0):
        x += sine(freq, n, amp=0.1)
    return x


@pytest.mark.parametrize("key", KEYS, ids=ids(KEYS))
def test_factory_presets_are_audible(rig, key):
    spec = LIB[key]
    presets = [json.loads(p.read_text()) for p in sorted((PRESETS_DIR / key).glob("*.json"))]
    x = _test_signal(SR)
    for preset in presets:
        y = rig.render(key, None if spec.is_source else x, **preset["parameters"])
        assert np.isfinite(y).all() and np.abs(y).max() < 20
        if spec.is_source:
            assert rms(y) > 1e-3, preset["name"]
        else:
            change = rms(y - x) / rms(x)
            assert change > 0.02, (preset["name"], change)


# -- acoustic contracts ---------------------------------------------------------------------

NEUTRAL = [
    ("reverb", {"wet_dry": 0.0, "room_size": 0.9}),
    ("delay", {"mix": 0.0, "feedback": 0.9}),
    ("chorus", {"mix": 0.0, "depth": 8.0}),
    ("phaser", {"mix": 0.0, "feedback": 0.9}),
    ("flanger", {"mix": 0.0, "feedback": 0.9}),
    ("distortion", {"mix": 0.0, "drive": 40.0}),
    ("tremolo", {"depth": 0.0}),
    ("compressor", {"ratio": 1.0, "threshold": -60.0, "makeup": 0.0}),
    ("eq", {}),
    ("utility", {}),
]


@pytest.mark.parametrize("key,values", NEUTRAL, ids=[k for k, _ in NEUTRAL])
def test_neutral_settings_pass_the_input_through(rig, key, values):
    """Dry-only mixes, zero depth, ratio 1, flat EQ, unity utility: the input, to the sample."""
    x = noise(SR // 2, seed=4)
    y = rig.render(key, x, **values)
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


def test_reverb_room_size_lengthens_the_tail(rig):
    x = impulse(int(2.5 * SR))
    tails = []
    for size in (0.2, 0.5, 0.9):
        y = rig.render("reverb", x, wet_dry=1.0, room_size=size, pre_delay=0.0)
        tails.append(float(np.sum(np.square(y[:, SR // 2 :], dtype=np.float64))))
    assert tails[0] < tails[1] < tails[2]
    assert tails[2] > 100 * tails[0]


def test_reverb_pre_delay_delays_only_the_wet_signal(rig):
    x = impulse(SR // 2)
    onsets = []
    for pre in (0.0, 50.0):
        y = rig.render("reverb", x, wet_dry=1.0, pre_delay=pre)
        onsets.append(int(np.argmax(np.abs(y[0]) > 1e-6)))
    assert abs(onsets[1] - onsets[0] - round(0.05 * SR)) <= 1
    mixed = rig.render("reverb", x, wet_dry=0.5, pre_delay=50.0)
    assert mixed[0, 0] == pytest.approx(0.5, abs=1e-6)  # dry half, not delayed


@pytest.mark.parametrize("time_ms", [250.0, 123.0])
def test_delay_echo_arrives_at_the_set_time(rig, time_ms):
    y = rig.render("delay", impulse(SR), time=time_ms, feedback=0.0, mix=1.0)
    expected = round(time_ms * SR / 1000)
    for channel in y:
        assert abs(int(np.argmax(np.abs(channel))) - expected) <= 1
        assert np.abs(channel).max() == pytest.approx(1.0, abs=1e-3)
        assert np.abs(channel[: expected - 1]).max() < 1e-6  # mix 1: no dry impulse


@pytest.mark.parametrize("sr", [22050, 96000])
def test_delay_time_is_sample_rate_independent(sr):
    y = rig_at(sr).render("delay", impulse(sr // 2), time=250.0, feedback=0.0, mix=1.0)
    assert abs(int(np.argmax(np.abs(y[0]))) - sr // 4) <= 1


def test_delay_feedback_repeats_decay_geometrically(rig):
    y = rig.render("delay", impulse(SR // 2), time=100.0, feedback=0.5, mix=1.0)
    step = round(0.1 * SR)
    np.testing.assert_allclose(y[0, [step, 2 * step, 3 * step]], [1.0, 0.5, 0.25], atol=1e-3)


def test_filter_lowpass_at_500_hz(rig):
    assert gain_db(rig.render("filter", sine(5000, SR), type=0, cutoff=500.0), sine(5000, SR)) < -20
    assert (
        abs(gain_db(rig.render("filter", sine(100, SR), type=0, cutoff=500.0), sine(100, SR))) < 3
    )


def test_filter_highpass_and_bandpass(rig):
    def level(freq: float, **values: float) -> float:
        x = sine(freq, SR)
        return gain_db(rig.render("filter", x, **values), x)

    assert level(100, type=1, cutoff=2000.0) < -20
    assert abs(level(10000, type=1, cutoff=2000.0)) < 3
    assert abs(level(1000, type=2, cutoff=1000.0, resonance=2.0)) < 1
    assert level(100, type=2, cutoff=1000.0, resonance=2.0) < -12
    assert level(10000, type=2, cutoff=1000.0, resonance=2.0) < -12


def test_utility_gain_is_exact(rig):
    x = noise(SR // 2, seed=5)
    y = rig.render("utility", x, gain=-6.0)
    ratio = y[np.abs(x) > 1e-3] / x[np.abs(x) > 1e-3]
    assert np.abs(ratio / 10 ** (-6 / 20) - 1).max() < 1e-5


def test_utility_defaults_are_sample_exact_identity(rig):
    x = noise(SR // 2, seed=6)
    assert np.array_equal(rig.render("utility", x), x)


def test_utility_balance_width_and_polarity(rig):
    x = noise(SR // 2, seed=7)
    y = rig.render("utility", x, pan=0.5)
    np.testing.assert_allclose(y[0], 0.5 * x[0], rtol=1e-6, atol=0)
    assert np.array_equal(y[1], x[1])  # balance law: only the opposite channel is attenuated
    y = rig.render("utility", x, pan=-1.0)
    assert np.array_equal(y[0], x[0]) and not y[1].any()
    y = rig.render("utility", x, width=0.0)
    np.testing.assert_allclose(y[0], 0.5 * (x[0] + x[1]), atol=1e-7)
    assert np.array_equal(y[0], y[1])
    assert np.array_equal(rig.render("utility", x, invert=1.0), -x)


def test_eq_flat_is_transparent_at_every_frequency(rig):
    for freq in (40.0, 1000.0, 15000.0):
        x = sine(freq, SR // 2)
        assert abs(gain_db(rig.render("eq", x, mid_q=3.0), x)) < 0.01


def test_eq_bands_boost_and_cut(rig):
    def level(freq: float, **values: float) -> float:
        x = sine(freq, SR)
        return gain_db(rig.render("eq", x, **values), x)

    assert level(1000, mid_freq=1000.0, mid_gain=6.0) == pytest.approx(6.0, abs=0.2)
    assert level(1000, mid_freq=1000.0, mid_gain=-9.0) == pytest.approx(-9.0, abs=0.2)
    assert level(30, low_freq=300.0, low_gain=-12.0) == pytest.approx(-12.0, abs=1.0)
    assert level(15000, high_freq=2000.0, high_gain=6.0) == pytest.approx(6.0, abs=0.5)
    assert abs(level(1000, low_freq=50.0, low_gain=12.0, high_freq=15000.0, high_gain=12.0)) < 0.5


def test_compressor_reduces_a_loud_sine(rig):
    x = sine(1000, SR, amp=0.5)  # about -6 dBFS, 24 dB over the threshold
    unity = gain_db(rig.render("compressor", x, threshold=-30.0, ratio=1.0), x, skip=SR // 2)
    squashed = gain_db(rig.render("compressor", x, threshold=-30.0, ratio=8.0), x, skip=SR // 2)
    assert abs(unity) < 0.01
    assert -24 < squashed < -15  # ideal: 24 dB * (1 - 1/8) = 21 dB of gain reduction
    quiet = sine(1000, SR, amp=0.01)  # -40 dBFS: under the threshold, untouched
    assert abs(gain_db(rig.render("compressor", quiet, threshold=-30.0, ratio=8.0), quiet)) < 0.1
    louder = gain_db(rig.render("compressor", quiet, threshold=-30.0, makeup=6.0), quiet)
    assert louder == pytest.approx(6.0, abs=0.05)


def test_distortion_adds_harmonics_with_drive(rig):
    x = sine(441, SR)  # exactly 441 cycles in the buffer: harmonics fall on FFT bins

    def third_harmonic_db(**values: float) -> float:
        spec = np.abs(np.fft.rfft(rig.render("distortion", x, tone=20000.0, **values)[0]))
        return 20 * np.log10(spec[3 * 441] / spec[441])

    assert third_harmonic_db(drive=30.0) > -20
    assert third_harmonic_db(drive=30.0) > third_harmonic_db(drive=0.0) + 15


def test_tremolo_depth_sets_the_modulation(rig):
    x = sine(1000, SR)
    for depth in (1.0, 0.5):
        y = rig.render("tremolo", x, rate=5.0, depth=depth, shape=0)
        envelope = np.abs(y[0]).reshape(-1, 441).max(axis=1)  # 10 ms windows
        assert envelope.max() == pytest.approx(0.5, abs=0.01)
        assert envelope.min() / envelope.max() == pytest.approx(1 - depth, abs=0.05)


@pytest.mark.parametrize("key", ["chorus", "phaser", "flanger"])
def test_modulation_effects_vary_over_time(rig, key):
    """A steady sine comes out with a level that moves as the LFO sweeps (comb/notch beats)."""
    x = sine(1000, 2 * SR)
    y = rig.render(key, x, rate=2.0, mix=0.5)
    windows = np.sqrt(np.mean(np.square(y[0, SR // 10 :].reshape(-1, 441)), axis=1))  # 10 ms
    assert windows.max() > 2 * windows.min()


@pytest.mark.parametrize(
    "waveform,freq", [(0, 440.0), (0, 1234.5), (1, 220.0), (2, 1000.0), (3, 330.0)]
)
def test_oscillator_frequency(rig, waveform, freq):
    y = rig.render("oscillator", seconds=1.0, waveform=waveform, frequency=freq)
    assert peak_frequency(y[0]) == pytest.approx(freq, rel=0.01)
    assert np.array_equal(y[0], y[1])


def test_oscillator_level_is_peak_dbfs(rig):
    for level in (-12.0, -30.0):
        y = rig.render("oscillator", seconds=0.5, waveform=0, frequency=440.0, level=level)
        assert np.abs(y).max() == pytest.approx(10 ** (level / 20), rel=0.01)


@pytest.mark.parametrize("waveform", [0, 1, 2, 3])
@pytest.mark.parametrize("freq", [20.0, 30.0, 1000.0])
def test_every_waveform_peaks_at_its_level_also_at_low_frequencies(rig, waveform, freq):
    """"level in dBFS (peak)": the triangle read 2 dB low at 20 Hz (a leaky integrator)."""
    y = rig.render("oscillator", seconds=1.0, waveform=waveform, frequency=freq, level=-6.0)
    steady = 20 * np.log10(np.abs(y[0, SR // 2:]).max())
    assert steady == pytest.approx(-6.0, abs=0.15)


def test_noise_colors_and_level(rig):
    white = rig.render("noise", seconds=2.0, color=0, level=0.0)
    pink = rig.render("noise", seconds=2.0, color=1, level=0.0)
    quiet = rig.render("noise", seconds=2.0, color=0, level=-20.0)
    assert rms(quiet) / rms(white) == pytest.approx(0.1, rel=1e-3)
    assert abs(np.corrcoef(white)[0, 1]) < 0.05  # independent channels

    def tilt_db(y: np.ndarray) -> float:  # 100-200 Hz octave over the 6.4-12.8 kHz one
        return 10 * np.log10(band_power(y[0], 100, 200) / band_power(y[0], 6400, 12800))

    assert abs(tilt_db(white)) < 2
    assert 14 < tilt_db(pink) < 22  # -3 dB/octave over 6 octaves
    assert np.abs(pink).max() <= 1.0
