"""Synthesize data/drum_loop.wav: a 4-second stereo drum-and-bass loop (120 BPM, 44.1 kHz, 16-bit).

Everything is generated here (no samples, no downloads), so the file is reproducible:
kick (pitch-swept sine), snare (noise + tone), closed hi-hats (high-passed noise), and a
plucked bass line. Run: python scripts/make_test_audio.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 44100
BPM = 120
BARS = 2
OUT = Path(__file__).resolve().parent.parent / "data" / "drum_loop.wav"


def env(n: int, decay: float) -> np.ndarray:
    return np.exp(-np.arange(n) / (decay * SR))


def kick(rng: np.random.Generator) -> np.ndarray:
    n = int(0.35 * SR)
    t = np.arange(n) / SR
    freq = 45 + 90 * np.exp(-t / 0.04)
    return 0.9 * np.sin(2 * np.pi * np.cumsum(freq) / SR) * env(n, 0.12)


def snare(rng: np.random.Generator) -> np.ndarray:
    n = int(0.25 * SR)
    t = np.arange(n) / SR
    noise = rng.uniform(-1, 1, n) * env(n, 0.06)
    tone = np.sin(2 * np.pi * 190 * t) * env(n, 0.05)
    return 0.45 * noise + 0.35 * tone


def hat(rng: np.random.Generator) -> np.ndarray:
    n = int(0.06 * SR)
    noise = rng.uniform(-1, 1, n)
    noise = np.diff(noise, prepend=0.0)  # crude high-pass
    return 0.18 * noise * env(n, 0.015)


def bass(freq: float, seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    t = np.arange(n) / SR
    wave = np.sign(np.sin(2 * np.pi * freq * t)) * 0.5 + np.sin(2 * np.pi * freq * t) * 0.5
    return 0.25 * wave * env(n, 0.18)


def place(track: np.ndarray, sound: np.ndarray, start: int) -> None:
    end = min(len(track), start + len(sound))
    track[start:end] += sound[: end - start]


def main() -> None:
    rng = np.random.default_rng(7)
    beat = int(60 / BPM * SR)
    total = beat * 4 * BARS
    left, right = np.zeros(total), np.zeros(total)
    bass_notes = [55.0, 55.0, 65.41, 73.42, 55.0, 55.0, 82.41, 73.42]
    for b in range(4 * BARS):
        start = b * beat
        for ch in (left, right):
            place(ch, kick(rng), start) if b % 2 == 0 else place(ch, snare(rng), start)
        for eighth in range(2):
            h = hat(rng)
            place(left if eighth == 0 else right, h, start + eighth * beat // 2)
            place(right if eighth == 0 else left, 0.5 * h, start + eighth * beat // 2)
        note = bass(bass_notes[b], 0.45)
        place(left, note, start)
        place(right, note, start)
    stereo = np.stack([left, right], axis=1)
    stereo *= 0.8 / np.max(np.abs(stereo))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sf.write(OUT, stereo, SR, subtype="PCM_16")
    print(f"wrote {OUT} ({total / SR:.1f} s, {OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
