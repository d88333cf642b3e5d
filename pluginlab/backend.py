"""DawDreamer adapter: processors, graphs and renders for one sample rate / block size.

Everything here runs on the owner thread (:mod:`pluginlab.owner`); nothing here knows about
tracks' ids, sessions or validation. The engine describes what it wants as plain data
(:class:`Recipe` per plugin, :class:`TrackGraph` per track) and a :class:`Backend` makes
DawDreamer do it:

* processors are created from recipes (Faust source, or a plugin binary path plus saved state);
* after every plugin binary load the thread's floating-point environment is reset to the
  default (``fesetenv(FE_DFL_ENV)``): some Linux VSTs (Dragonfly) switch on flush-to-zero,
  which makes the Faust compiler abort the whole process on the next compile;
* parameter values are pushed just before a render, only those that changed;
* the graph is (re)loaded only when its topology changed;
* mono plugins in a stereo chain get small Faust adapters (downmix in, duplicate out);
  sidechain inputs get the signal itself (see :func:`_input_adapter`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Backend", "ProcessorInfo", "Recipe", "TrackGraph", "restore_fp_environment"]


def restore_fp_environment() -> None:
    """Reset this thread's FP environment (rounding, exceptions, FTZ/DAZ) to the C default."""
    _fesetenv(ctypes.c_void_p(-1 & 0xFFFFFFFFFFFFFFFF))  # FE_DFL_ENV == (const fenv_t *) -1


def _load_fesetenv() -> Any:
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    fn = lib.fesetenv
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_fesetenv = _load_fesetenv()


@dataclass(frozen=True)
class Recipe:
    """How to build one plugin's processor. ``uid`` is its unique processor name."""

    uid: str
    kind: str  # "faust" | "vst"
    code: str | None = None
    path: str | None = None


@dataclass
class ProcessorInfo:
    """What a created processor exposes: indices by label/name, channel counts, raw description."""

    inputs: int
    outputs: int
    description: list[dict[str, Any]]
    index_of: dict[str, int] = field(default_factory=dict)
    path_of: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackGraph:
    """One track's signal path: an optional source and the active (non-bypassed) plugins."""

    track_id: str
    source_token: object | None  # identity of the source; a change rebuilds the playback node
    source_audio: np.ndarray | None = field(default=None, compare=False)
    plugins: tuple[str, ...] = ()


class Backend:
    """One DawDreamer RenderEngine and its processors. Owner thread only."""

    def __init__(self, sample_rate: int, block_size: int) -> None:
        import dawdreamer as daw

        self.sample_rate = sample_rate
        self.block_size = block_size
        self._engine = daw.RenderEngine(sample_rate, block_size)
        self._procs: dict[str, Any] = {}
        self._info: dict[str, ProcessorInfo] = {}
        self._pushed: dict[str, dict[int, float]] = {}
        self._adapters: dict[str, Any] = {}
        self._sources: dict[str, tuple[object, Any]] = {}
        self._mixer: Any = None
        self._graph_key: tuple[Any, ...] | None = None
        self.rendered = False  # DawDreamer 0.9 sometimes cannot add Faust processors after this

    # -- processors -------------------------------------------------------------------------
    def create(self, recipe: Recipe) -> ProcessorInfo:
        """Create the processor for ``recipe``; raises RuntimeError/ValueError if impossible."""
        if recipe.uid in self._procs:
            return self._info[recipe.uid]
        if recipe.kind == "faust":
            proc = self._engine.make_faust_processor(recipe.uid)
            proc.set_dsp_string(recipe.code or "")
            proc.compile()
            desc = list(proc.get_parameters_description())
            index_of = {d["label"]: int(d["index"]) for d in desc}
            path_of = {int(d["index"]): str(d["name"]) for d in desc}
        else:
            try:
                proc = self._engine.make_plugin_processor(recipe.uid, str(recipe.path))
            finally:
                restore_fp_environment()
            desc = list(proc.get_parameters_description())
            index_of = {str(d["index"]): int(d["index"]) for d in desc}
            path_of = {}
        info = ProcessorInfo(
            inputs=int(proc.get_num_input_channels()),
            outputs=int(proc.get_num_output_channels()),
            description=desc,
            index_of=index_of,
            path_of=path_of,
        )
        self._procs[recipe.uid] = proc
        self._info[recipe.uid] = info
        self._pushed[recipe.uid] = {}
        self._graph_key = None
        return info

    def remove(self, uid: str) -> None:
        """Remove a plugin's processor (and adapters): DawDreamer renders every processor it has."""
        for name in (uid, f"{uid}__down", f"{uid}__up"):
            if name in self._procs or name in self._adapters:
                self._engine.remove_processor(name)
        self._procs.pop(uid, None)
        self._info.pop(uid, None)
        self._pushed.pop(uid, None)
        self._adapters.pop(f"{uid}__down", None)
        self._adapters.pop(f"{uid}__up", None)
        self._graph_key = None

    def has(self, uid: str) -> bool:
        return uid in self._procs

    # -- parameters -------------------------------------------------------------------------
    def push(self, uid: str, values: dict[int, float]) -> None:
        """Set the given parameter indices, skipping values already set."""
        proc = self._procs[uid]
        pushed = self._pushed[uid]
        for index, value in values.items():
            if pushed.get(index) != value:
                proc.set_parameter(index, float(value))
                pushed[index] = value

    def read(self, uid: str, index: int) -> float:
        return float(self._procs[uid].get_parameter(index))

    def text(self, uid: str, index: int) -> str:
        """The plugin binary's own display text for a parameter at its current value."""
        return str(self._procs[uid].get_parameter_text(index)).strip()

    def save_state(self, uid: str) -> bytes:
        """A plugin binary's full state (DawDreamer ``save_state``) as bytes."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "state.bin")
            self._procs[uid].save_state(path)
            with open(path, "rb") as fh:
                return fh.read()

    def load_state(self, uid: str, state: bytes) -> None:
        """Restore a plugin binary's state; pushed-value cache is invalidated."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "state.bin")
            with open(path, "wb") as fh:
                fh.write(state)
            self._procs[uid].load_state(path)
        restore_fp_environment()
        self._pushed[uid] = {}

    def set_automation(self, uid: str, index: int, data: np.ndarray) -> None:
        """Audio-rate automation of one parameter (Faust: by path, binaries: by index).

        DawDreamer applies Faust automation once per block (block-size resolution).
        """
        key = self._info[uid].path_of.get(index, index)
        self._procs[uid].set_automation(key, np.ascontiguousarray(data, dtype=np.float32))
        self._pushed[uid].pop(index, None)

    def clear_automation(self, uid: str, index: int, value: float) -> None:
        """Replace automation by a constant (a one-sample automation holds its value)."""
        self.set_automation(uid, index, np.array([value], np.float32))
        self._pushed[uid][index] = value

    # -- rendering --------------------------------------------------------------------------
    def render(self, tracks: list[TrackGraph], seconds: float) -> np.ndarray:
        """Render ``tracks`` (mixed when several) for ``seconds``; returns (channels, samples)."""
        n = int(round(seconds * self.sample_rate))
        live = [t for t in tracks if t.source_token is not None or t.plugins]
        if not live or n <= 0:
            return np.zeros((2, max(n, 0)), dtype=np.float32)
        key = tuple((t.track_id, id(t.source_token), t.plugins) for t in live)
        if key != self._graph_key:
            self._engine.load_graph(self._build_graph(live))
            self._graph_key = key
        self.rendered = True
        # DawDreamer renders int(seconds * rate) samples: 0.57 s at 44.1 kHz would be one short.
        self._engine.render((n + 0.5) / self.sample_rate)
        audio = np.asarray(self._engine.get_audio(), dtype=np.float32)
        if audio.shape[0] == 1:
            audio = np.vstack([audio, audio])
        return audio[:, :n]

    def _build_graph(self, tracks: list[TrackGraph]) -> list[tuple[Any, list[str]]]:
        graph: list[tuple[Any, list[str]]] = []
        ends: list[str] = []
        for track in tracks:
            last: str | None = None
            if track.source_token is not None:
                src = self._source_node(track)
                graph.append((src, []))
                last = src.get_name()
            for uid in track.plugins:
                last = self._append_plugin(graph, uid, last)
            if last is not None:
                ends.append(last)
        if len(ends) > 1:
            graph.append((self._mix_node(len(ends)), ends))
        return graph

    def _append_plugin(self, graph: list[tuple[Any, list[str]]], uid: str, last: str | None) -> str:
        info = self._info[uid]
        inputs = [last] if last else []
        feed = _input_adapter(info.inputs, info.outputs)
        if feed is not None and last:
            adapter = self._adapter(f"{uid}__in", feed)
            graph.append((adapter, inputs))
            inputs = [adapter.get_name()]
        graph.append((self._procs[uid], inputs if info.inputs > 0 else []))
        name = uid
        if info.outputs == 1:
            up = self._adapter(f"{uid}__up", "process = _ <: _,_;")
            graph.append((up, [uid]))
            name = up.get_name()
        return name

    def _adapter(self, name: str, code: str) -> Any:
        if name not in self._adapters:
            proc = self._engine.make_faust_processor(name)
            proc.set_dsp_string(code)
            proc.compile()
            self._adapters[name] = proc
        return self._adapters[name]

    def _source_node(self, track: TrackGraph) -> Any:
        name = f"src__{track.track_id}"
        cached = self._sources.get(name)
        if cached is not None and cached[0] is track.source_token:
            return cached[1]
        audio = np.ascontiguousarray(track.source_audio, dtype=np.float32)
        if cached is not None:
            cached[1].set_data(audio)
            node = cached[1]
        else:
            node = self._engine.make_playback_processor(name, audio)
        self._sources[name] = (track.source_token, node)
        return node

    def drop_source(self, track_id: str) -> None:
        name = f"src__{track_id}"
        if self._sources.pop(name, None) is not None:
            self._engine.remove_processor(name)
            self._graph_key = None

    def _mix_node(self, count: int) -> Any:
        if self._mixer is not None and len(self._mixer.gain_levels) != count:
            self._engine.remove_processor("mix__")
            self._mixer = None
        if self._mixer is None:
            self._mixer = self._engine.make_add_processor("mix__", [1.0] * count)
        return self._mixer


def _input_adapter(inputs: int, outputs: int) -> str | None:
    """Faust code that feeds the stereo chain into a plugin's ``inputs`` (None: wire as is).

    A mono plugin (one input or one output) gets the downmix ``0.5 * (L + R)``. Inputs beyond
    the main one(s) are sidechain (key) inputs and get the signal itself, downmixed (self-keyed,
    as the plugin behaves without an external key): a 2-in/1-out VST2 compressor used to get L
    as its input and R as its key, so the right channel never reached the output.
    """
    if inputs <= 0 or (inputs == 2 and outputs != 1):
        return None
    mono = "_,_ :> *(0.5)"
    if outputs == 1 or inputs == 1:
        return f"process = {mono};" if inputs == 1 else \
            f"process = {mono} <: {','.join(['_'] * inputs)};"
    return f"process = _,_ <: _,_,{','.join([f'({mono})'] * (inputs - 2))};"
