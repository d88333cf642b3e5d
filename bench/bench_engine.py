"""Render overhead of pluginlab's Engine against the same graph built with raw DawDreamer calls.

Run on demand (``make bench`` or ``.venv/bin/python bench/bench_engine.py [--reps 30]``).

Cases, each "set one parameter + render 10 s of stereo noise", repeated N times after a warm-up:

* ``faust chain``: Filter -> Compressor -> Reverb (the built-ins' own .dsp code in both);
* ``dragonfly vst``: DragonflyRoomReverb (row skipped with the reason when not installed).

pluginlab and raw repetitions are interleaved so that machine drift hits both alike. The raw
graph lives on pluginlab's owner thread (DawDreamer objects, VSTs above all, must stay on the
thread that made them) and times itself there, so the raw numbers carry no thread hand-off; the
pluginlab numbers are what a caller on the main thread sees. Also reported: the cost of one
parameter change (``Plugin.set`` vs ``processor.set_parameter``), in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without relying on the editable install
    sys.path.insert(0, str(ROOT))

import dawdreamer as daw

from pluginlab import Engine, Source
from pluginlab.effects import find
from pluginlab.owner import owner

SR = 44100
BLOCK = 512
SECONDS = 10.0
DRAGONFLY = "/usr/lib/lxvst/DragonflyRoomReverb-vst.so"
CHAIN = (("Filter", "cutoff", (500.0, 8000.0)),
         ("Compressor", None, None),
         ("Reverb", None, None))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class RawGraph:
    """The same graph through DawDreamer directly. Every method runs on the owner thread."""

    def __init__(self, audio: np.ndarray, nodes: list[tuple[str, Any]]) -> None:
        self.engine = daw.RenderEngine(SR, BLOCK)
        graph: list[tuple[Any, list[str]]] = []
        play = self.engine.make_playback_processor("src", audio)
        graph.append((play, []))
        last = "src"
        self.procs: list[Any] = []
        for name, payload in nodes:
            if isinstance(payload, str) and payload.endswith(".so"):
                proc = self.engine.make_plugin_processor(name, payload)
            else:
                proc = self.engine.make_faust_processor(name)
                proc.set_dsp_string(payload)
                proc.compile()
            graph.append((proc, [last]))
            self.procs.append(proc)
            last = name
        self.engine.load_graph(graph)

    def step(self, proc_index: int, param_index: int, value: float) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        self.procs[proc_index].set_parameter(param_index, value)
        self.engine.render(SECONDS)
        audio = self.engine.get_audio()
        return time.perf_counter() - start, audio

    def close(self) -> None:
        """Drop the DawDreamer objects (on the owner thread, like everything else here)."""
        self.procs = []
        self.engine = None

    def set_cost(self, proc_index: int, param_index: int, values: np.ndarray) -> float:
        proc = self.procs[proc_index]
        start = time.perf_counter()
        for v in values:
            proc.set_parameter(param_index, float(v))
        return (time.perf_counter() - start) / len(values)


def compare(
    label: str, plugin_set: Callable[[float], Any], plugin_render: Callable[[], np.ndarray],
    raw: RawGraph, proc_index: int, param_index: int, values: np.ndarray, reps: int,
) -> dict[str, Any]:
    own = owner()
    for i in range(3):  # warm-up: graph load, first-render allocations, caches
        plugin_set(float(values[i]))
        plugin_render()
        own.call(raw.step, proc_index, param_index, float(values[i]))
    ours, theirs = [], []
    for i in range(reps):
        value = float(values[i % len(values)])
        start = time.perf_counter()
        plugin_set(value)
        audio = plugin_render()
        ours.append(time.perf_counter() - start)
        took, raw_audio = own.call(raw.step, proc_index, param_index, value)
        theirs.append(took)
        assert audio.shape[1] == np.asarray(raw_audio).shape[1]
    return {"case": label, "ours": ours, "raw": theirs}


def faust_case(reps: int) -> dict[str, Any]:
    noise = Source.noise(SECONDS, level_db=-12.0, seed=1)
    engine = Engine(SR, BLOCK)
    track = engine.add_track("bench", noise)
    plugins = [track.add(name) for name, _, _ in CHAIN]
    filt = plugins[0]
    lo, hi = CHAIN[0][2] or (0.0, 1.0)
    values = np.geomspace(lo, hi, 16)

    def make_raw() -> RawGraph:
        codes = {name: find(name).code for name, _, _ in CHAIN}  # type: ignore[union-attr]
        return RawGraph(noise.render(SR), [(f"raw_{n.lower()}", c) for n, c in codes.items()])

    raw = owner().call(make_raw)
    index = filt.parameters["cutoff"].index
    try:
        row = compare("faust chain (Filter>Comp>Reverb)", lambda v: filt.set("cutoff", v),
                      lambda: track.render(SECONDS), raw, 0, index, values, reps)
        row["set_ours"] = set_cost(lambda v: filt.set("cutoff", v), values)
        row["set_raw"] = owner().call(raw.set_cost, 0, index, np.resize(values, 20000))
        # the same audio from both (Faust is deterministic): proves the graphs are the same
        filt.set("cutoff", float(values[0]))
        ours = track.render(SECONDS)
        _, theirs = owner().call(raw.step, 0, index, float(values[0]))
        row["max_diff"] = float(np.max(np.abs(ours - np.asarray(theirs)[:, : ours.shape[1]])))
    finally:
        engine.close()
        owner().call(raw.close)
    return row


def vst_case(reps: int) -> dict[str, Any] | str:
    if not Path(DRAGONFLY).exists():
        return f"skipped: {DRAGONFLY} not installed (apt-get install dragonfly-reverb-vst)"
    noise = Source.noise(SECONDS, level_db=-12.0, seed=1)
    engine = Engine(SR, BLOCK)
    track = engine.add_track("bench", noise)
    vst = track.add("Dragonfly", DRAGONFLY)
    values = np.linspace(0.05, 0.6, 16)
    raw = owner().call(lambda: RawGraph(noise.render(SR), [("raw_vst", DRAGONFLY)]))
    index = vst.parameters["decay"].index
    try:
        row = compare("dragonfly vst (room reverb)", lambda v: vst.set("decay", v),
                      lambda: track.render(SECONDS), raw, 0, index, values, reps)
        row["set_ours"] = set_cost(lambda v: vst.set("decay", v), values)
        row["set_raw"] = owner().call(raw.set_cost, 0, index, np.resize(values, 20000))
    finally:
        engine.close()
        owner().call(raw.close)
    return row


def set_cost(setter: Callable[[float], Any], values: np.ndarray, calls: int = 20000) -> float:
    vals = [float(v) for v in np.resize(values, calls)]
    start = time.perf_counter()
    for v in vals:
        setter(v)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)

    rows: list[dict[str, Any] | tuple[str, str]] = [faust_case(args.reps)]
    vst = vst_case(args.reps)
    rows.append(vst if isinstance(vst, dict) else ("dragonfly vst (room reverb)", vst))

    print(f"set one parameter + render {SECONDS:g} s stereo @ {SR} Hz, block {BLOCK}, "
          f"{args.reps} reps after 3 warm-ups")
    head = (f"{'case':<34} {'pluginlab med':>13} {'p90':>8} {'raw med':>9} {'p90':>8} "
            f"{'ratio':>6} {'set() us':>9} {'raw set us':>10}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for row in rows:
        if isinstance(row, tuple):
            print(f"{row[0]:<34} {row[1]}")
            continue
        ours_med, raw_med = statistics.median(row["ours"]), statistics.median(row["raw"])
        ratio = ours_med / raw_med
        worst = max(worst, ratio)
        ours_p90, raw_p90 = percentile(row["ours"], 90), percentile(row["raw"], 90)
        print(f"{row['case']:<34} {ours_med * 1e3:>10.1f} ms {ours_p90 * 1e3:>8.1f} "
              f"{raw_med * 1e3:>6.1f} ms {raw_p90 * 1e3:>8.1f} {ratio:>6.3f} "
              f"{row['set_ours'] * 1e6:>9.2f} {row['set_raw'] * 1e6:>10.3f}")
        if "max_diff" in row:
            print(f"{'':<34} (same audio as raw: max |diff| = {row['max_diff']:.2e})")
    verdict = "within" if worst <= 1.05 else "OVER"
    print(f"worst median ratio {worst:.3f}: {verdict} the 5% target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
