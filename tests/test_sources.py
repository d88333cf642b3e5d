"""Track sources: generated signals and audio files at any sample rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pluginlab import Engine, Source
from pluginlab.sources import DATA_DIR

DRUMS = DATA_DIR / "drum_loop.wav"


def peak_frequency(mono: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(mono.astype(np.float64) * np.hanning(mono.size)))
    return float(np.fft.rfftfreq(mono.size, 1 / sr)[np.argmax(spectrum)])


def check_stereo(audio: np.ndarray, samples: int) -> None:
    assert audio.dtype == np.float32
    assert audio.shape == (2, samples)
    assert audio.flags.c_contiguous


@pytest.mark.parametrize(("frequency", "sr"), [(440.0, 44100), (1000.0, 48000), (97.0, 22050)])
def test_sine_frequency_and_level(frequency: float, sr: int):
    audio = Source.sine(frequency, seconds=1.0, level_db=-6.0).render(sr)
    check_stereo(audio, sr)
    assert abs(peak_frequency(audio[0], sr) - frequency) <= 1.0  # 1 Hz bins
    assert np.array_equal(audio[0], audio[1])
    assert np.abs(audio).max() == pytest.approx(10 ** (-6 / 20), rel=1e-3)


def test_noise_is_seeded():
    a = Source.noise(0.5, seed=1).render(44100)
    check_stereo(a, 22050)
    assert np.array_equal(a, Source.noise(0.5, seed=1).render(44100))
    assert not np.array_equal(a, Source.noise(0.5, seed=2).render(44100))
    amp = 10 ** (-12 / 20)
    assert np.abs(a).max() <= amp + 1e-6
    assert abs(float(a.mean())) < 0.01 * amp
    assert np.std(a) == pytest.approx(amp / np.sqrt(3), rel=0.05)  # uniform in [-amp, amp]


def test_impulse():
    audio = Source.impulse(0.25).render(48000)
    check_stereo(audio, 12000)
    assert audio[0, 0] == 1.0 and audio[1, 0] == 1.0
    assert np.count_nonzero(audio) == 2
    assert Source.impulse(0.1, level_db=-6.0).render(44100)[0, 0] == pytest.approx(0.501, rel=1e-3)


def test_sweep_rises():
    sr = 44100
    audio = Source.sweep(100.0, 5000.0, seconds=2.0).render(sr)
    check_stereo(audio, 2 * sr)
    seg = sr // 10
    early = peak_frequency(audio[0, :seg], sr)
    late = peak_frequency(audio[0, -seg:], sr)
    assert 80 < early < 200
    assert 3500 < late < 5500
    quarter = [peak_frequency(audio[0, i * sr // 2:i * sr // 2 + seg], sr) for i in range(4)]
    assert quarter == sorted(quarter)


def test_silence():
    audio = Source.silence(0.5).render(44100)
    check_stereo(audio, 22050)
    assert not audio.any()


def test_file_source_and_resampling():
    source = Source.file("drum_loop.wav")  # bare names resolve in data/
    assert Path(source.path or "") == DRUMS.resolve()
    data, rate = sf.read(str(DRUMS), dtype="float32", always_2d=True)
    native = source.render(rate)
    check_stereo(native, data.shape[0])
    assert np.array_equal(native, data.T)
    at_48k = source.render(48000)
    check_stereo(at_48k, round(data.shape[0] * 48000 / rate))
    assert at_48k.shape[1] / native.shape[1] == pytest.approx(48000 / rate, rel=1e-6)
    assert np.sqrt(np.mean(at_48k**2)) == pytest.approx(np.sqrt(np.mean(native**2)), rel=0.05)
    assert Source.file(DRUMS).render(rate).shape == native.shape  # an absolute path works too
    assert source.describe() == {"kind": "file", "path": str(DRUMS.resolve())}


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        Source.file("nope.wav")
    with pytest.raises(FileNotFoundError):
        Source.file("/definitely/not/here.wav")


def test_mono_file_and_array_become_stereo(tmp_path: Path):
    mono = np.linspace(-0.5, 0.5, 22050, dtype=np.float32)
    sf.write(str(tmp_path / "mono.wav"), mono, 22050, subtype="FLOAT")
    audio = Source.file(tmp_path / "mono.wav").render(44100)
    check_stereo(audio, 44100)
    assert np.array_equal(audio[0], audio[1])
    arr = Source.from_array(mono, 22050)
    assert np.array_equal(arr.render(22050), np.vstack([mono, mono]))
    assert arr.render(44100).shape == (2, 44100)
    assert arr.describe() == {"kind": "array", "sample_rate": 22050}


def test_array_in_soundfiles_layout_is_understood_and_bad_shapes_refused():
    data, rate = sf.read(str(DRUMS), dtype="float32", always_2d=True)  # (samples, channels)
    assert data.shape[1] == 2
    source = Source.from_array(data, rate)
    np.testing.assert_array_equal(source.render(rate), data.T)  # not a 2-sample source
    with pytest.raises(ValueError, match="4 channels"):
        Source.from_array(np.zeros((4, 1000)), rate)
    with pytest.raises(ValueError, match="samples"):
        Source.from_array(np.zeros((2, 0)), rate)
    with pytest.raises(ValueError, match="samples"):
        Source.from_array(np.zeros((2, 3, 4)), rate)


def test_integer_pcm_is_scaled_and_unusable_audio_refused():
    """scipy.io.wavfile gives int16: a -6 dBFS sine must stay -6 dBFS (it came out +84)."""
    rate = 44100
    sine = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    for pcm in ((sine * 32768).astype(np.int16), (sine * 2**31).astype(np.int32),
                (sine * 128 + 128).astype(np.uint8)):
        rendered = Source.from_array(pcm, rate).render(rate)
        assert 20 * np.log10(np.abs(rendered).max()) == pytest.approx(-6.02, abs=0.1), pcm.dtype
    for bad in (np.r_[np.zeros(10), np.nan], np.r_[np.zeros(10), np.inf]):
        with pytest.raises(ValueError, match="NaN or infinite"):
            Source.from_array(bad, rate)
    for bad_rate in (0, -44100, 44100.5, True):
        with pytest.raises(ValueError, match="sample_rate"):
            Source.from_array(np.zeros(100), bad_rate)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        Source.from_array(np.array(["a", "b"]), rate)
    assert Source.from_array(np.zeros(100), np.int64(48000)).array_rate == 48000


def test_file_source_feeds_a_track(engine: Engine):
    track = engine.add_track("drums", Source.file("drum_loop.wav"))
    dry = track.render(1.0)
    data, _ = sf.read(str(DRUMS), dtype="float32", always_2d=True)
    assert np.allclose(dry, data[:44100].T, atol=1e-6)
    assert track.render(1.0, sample_rate=48000).shape == (2, 48000)
    past_end = track.render(5.0)  # the loop is 4 s long: silence afterwards
    assert past_end.shape == (2, 5 * 44100) and not past_end[:, 4 * 44100 + 10:].any()
