"""Track sources: generated test signals and audio files, materialized at any sample rate.

A :class:`Source` is a small immutable description (``Source.sine(440)``,
``Source.file("data/drums.wav")``); :meth:`Source.render` turns it into a float32
``(2, samples)`` array for a given sample rate. Signals are generated, not shipped, so tests
and notebooks need no large files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["DATA_DIR", "SignalKind", "Source"]

SignalKind = Literal["sine", "noise", "impulse", "sweep", "silence", "file", "array"]
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Source:
    """What feeds a track. Build with the class methods; ``seconds`` is the source length."""

    kind: SignalKind
    seconds: float = 2.0
    frequency: float = 440.0
    end_frequency: float = 20000.0
    level_db: float = -12.0
    path: str | None = None
    seed: int = 0
    array: Any = field(default=None, compare=False, repr=False)
    array_rate: int = 0

    @classmethod
    def sine(cls, frequency: float = 440.0, seconds: float = 2.0, level_db: float = -12.0) -> Source:
        return cls("sine", seconds=seconds, frequency=frequency, level_db=level_db)

    @classmethod
    def noise(cls, seconds: float = 2.0, level_db: float = -12.0, seed: int = 0) -> Source:
        return cls("noise", seconds=seconds, level_db=level_db, seed=seed)

    @classmethod
    def impulse(cls, seconds: float = 2.0, level_db: float = 0.0) -> Source:
        return cls("impulse", seconds=seconds, level_db=level_db)

    @classmethod
    def sweep(
        cls, start: float = 20.0, end: float = 20000.0, seconds: float = 2.0, level_db: float = -12.0
    ) -> Source:
        return cls("sweep", seconds=seconds, frequency=start, end_frequency=end, level_db=level_db)

    @classmethod
    def silence(cls, seconds: float = 2.0) -> Source:
        return cls("silence", seconds=seconds)

    @classmethod
    def file(cls, path: str | Path) -> Source:
        """An audio file (WAV/FLAC/OGG via soundfile); relative names are looked up in data/."""
        p = Path(path)
        if not p.exists() and (DATA_DIR / p).exists():
            p = DATA_DIR / p
        if not p.exists():
            raise FileNotFoundError(f"audio file not found: {path}")
        return cls("file", path=str(p.resolve()))

    @classmethod
    def from_array(cls, audio: np.ndarray, sample_rate: int) -> Source:
        """In-memory audio: ``(samples,)``, ``(channels, samples)`` or soundfile's
        ``(samples, channels)`` (recognised: 1 or 2 channels and more samples than that).

        Integer PCM (``scipy.io.wavfile``'s int16/int32, uint8) is scaled to -1..1 full scale;
        floats are taken as they are. ValueError (never a silent or exploding render) for more
        than two channels, no samples, NaN or infinite samples, or a sample rate that is not a
        positive whole number."""
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
                or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive whole number, got {sample_rate!r}")
        a = _as_float(np.asarray(audio))
        if a.ndim == 2 and a.shape[1] <= 2 < a.shape[0]:
            a = a.T  # sf.read() gives (samples, channels)
        if a.ndim not in (1, 2) or a.shape[-1] == 0:
            raise ValueError(f"audio must be (samples,) or (channels, samples), got {a.shape}")
        if a.ndim == 2 and a.shape[0] > 2:
            raise ValueError(f"{a.shape[0]} channels: pass the one or two to use "
                             f"(shape {a.shape}, expected (channels, samples))")
        if not np.isfinite(a).all():
            raise ValueError("audio holds NaN or infinite samples (they would poison the "
                             "plugins' state)")
        return cls("array", array=a, array_rate=int(sample_rate))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for snapshots and provenance)."""
        if self.kind == "file":
            return {"kind": "file", "path": self.path}
        if self.kind == "array":
            return {"kind": "array", "sample_rate": self.array_rate}
        return {
            "kind": self.kind,
            "seconds": self.seconds,
            "frequency": self.frequency,
            "level_db": self.level_db,
        }

    def render(self, sample_rate: int) -> np.ndarray:
        """The source as float32 ``(2, samples)`` at ``sample_rate``."""
        if self.kind == "file":
            return _stereo(_load_file(str(self.path), sample_rate))
        if self.kind == "array":
            return _stereo(_resample(_as_2d(self.array), self.array_rate, sample_rate))
        n = max(1, int(round(self.seconds * sample_rate)))
        amp = 10.0 ** (self.level_db / 20.0)
        t = np.arange(n, dtype=np.float64) / sample_rate
        if self.kind == "sine":
            mono = np.sin(2 * np.pi * self.frequency * t)
        elif self.kind == "noise":
            mono = np.random.default_rng(self.seed).uniform(-1.0, 1.0, n)
        elif self.kind == "impulse":
            mono = np.zeros(n)
            mono[0] = 1.0
        elif self.kind == "sweep":
            k = np.log(self.end_frequency / self.frequency) / max(self.seconds, 1e-9)
            mono = np.sin(2 * np.pi * self.frequency * (np.exp(k * t) - 1.0) / k)
        else:
            mono = np.zeros(n)
        return _stereo((amp * mono).astype(np.float32)[np.newaxis, :])


def _as_2d(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float32)
    return a[np.newaxis, :] if a.ndim == 1 else a


def _stereo(audio: np.ndarray) -> np.ndarray:
    a = _as_2d(audio)
    if a.shape[0] == 1:
        a = np.vstack([a, a])
    return np.ascontiguousarray(a[:2], dtype=np.float32)


def _as_float(a: np.ndarray) -> np.ndarray:
    """float32 samples; integer PCM scaled to full scale (int16 32768 -> 1.0, uint8 centred)."""
    if a.dtype.kind == "i":
        return (a.astype(np.float64) / float(2 ** (8 * a.dtype.itemsize - 1))).astype(np.float32)
    if a.dtype.kind == "u":
        half = float(2 ** (8 * a.dtype.itemsize - 1))
        return ((a.astype(np.float64) - half) / half).astype(np.float32)
    if a.dtype.kind == "b" or a.dtype.kind not in "fc":
        raise ValueError(f"audio samples must be numbers, got dtype {a.dtype}")
    if a.dtype.kind == "c":
        raise ValueError("audio samples must be real numbers, got complex")
    return a.astype(np.float32, copy=False)


def _load_file(path: str, sample_rate: int) -> np.ndarray:
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return _resample(data.T, int(rate), sample_rate)


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (good enough for test material; documented)."""
    if rate == target or audio.shape[1] == 0:
        return audio
    n_out = int(round(audio.shape[1] * target / rate))
    x_old = np.arange(audio.shape[1]) / rate
    x_new = np.arange(n_out) / target
    return np.vstack([np.interp(x_new, x_old, ch) for ch in audio]).astype(np.float32)
