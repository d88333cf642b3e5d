"""The engine: tracks, plugin chains, validated parameters, presets and renders.

``Engine`` is pluginlab's model of what is playing, and the only public way to change it.
It holds tracks (a :class:`~pluginlab.sources.Source` plus an ordered chain of plugins) and
their plugins (built-in Faust effects or plugin binaries). Contracts:

* **Validation in one place.** Every value goes through ``ParameterSpec.validate``; unknown
  ids list the valid ones; nothing is clamped silently. Batches are all-or-nothing.
* **Thread safety.** The model is guarded by one short-held lock; DawDreamer is only touched
  on the owner thread (:mod:`pluginlab.owner`). Setting a parameter only updates the model, so
  it never waits for a render; values are pushed to DawDreamer at the start of each render,
  which therefore sees every change made before ``render`` was called.
* **Removal is real, bypass is real.** Removing a plugin removes its processor; a bypassed
  plugin is left out of the graph, so the output equals the chain without it.
* **Placeholder paths.** A ``plugin_path`` that does not exist, with a built-in ``name``,
  resolves to the built-in and says so (``resolved_as="builtin"``, ``warning``), unless the
  engine was created with ``strict_paths=True``. An existing path that cannot be loaded is
  always ``PluginAddFailed``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import math
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from . import effects
from .backend import Backend, Recipe, TrackGraph
from .errors import (
    InvalidMessage,
    InvalidParameter,
    PluginAddFailed,
    PluginNotFound,
    PresetLoadFailed,
    TrackNotFound,
)
from .owner import Owner, owner
from .parameters import ParameterSpec
from .presets import PresetLibrary, preset_key
from .sources import Source
from .vst import binary_specs, is_binary_path

__all__ = ["Engine", "Plugin", "Track", "builtin_names"]

_PLUGIN_ATTRS = frozenset({"bypass"})


def builtin_names() -> list[str]:
    """Names of the built-in plugins (effects and sources)."""
    return [spec.name for spec in effects.library().values()]


class Plugin:
    """A plugin on a track. Parameters read and write like attributes (``rev.room_size = 0.7``).

    Created by :meth:`Engine.add_plugin` / :meth:`Track.add`; do not instantiate directly.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        plugin_id: str,
        track_id: str,
        name: str,
        plugin_path: str | None,
        recipe: Recipe,
        specs: list[ParameterSpec],
        resolved_as: str,
        warning: str | None,
    ) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_specs", {s.id: s for s in specs})
        object.__setattr__(self, "_values", {s.id: s.default for s in specs})
        object.__setattr__(self, "_bypass", False)
        object.__setattr__(self, "id", plugin_id)
        object.__setattr__(self, "track_id", track_id)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "plugin_path", plugin_path)
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "resolved_as", resolved_as)
        object.__setattr__(self, "warning", warning)

    # -- identity ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"builtin"`` (Faust) or ``"binary"`` (VST2/VST3)."""
        return "builtin" if self.recipe.kind == "faust" else "binary"

    @property
    def preset_key(self) -> str:
        return preset_key(self.name, self.plugin_path if self.kind == "binary" else None)

    # -- parameters -------------------------------------------------------------------------
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        """Read-only mapping of parameter id -> spec, in the plugin's order."""
        return MappingProxyType(self._specs)

    @property
    def values(self) -> dict[str, float]:
        """A copy of the current values by parameter id."""
        with self._engine._lock:
            return dict(self._values)

    def spec(self, parameter_id: str, value: Any = None) -> ParameterSpec:
        """The spec of ``parameter_id``; unknown ids raise InvalidParameter listing valid ones."""
        spec = self._specs.get(parameter_id) if isinstance(parameter_id, str) else None
        if spec is None:
            valid = ", ".join(self._specs) or "(none)"
            raise InvalidParameter(
                str(parameter_id), value, f"unknown parameter; valid ids: {valid}"
            )
        return spec

    def get(self, parameter_id: str) -> float:
        self.spec(parameter_id)
        with self._engine._lock:
            return self._values[parameter_id]

    def current(self, parameter_id: str) -> float | None:
        """The current value of ``parameter_id``; None (no error) for an unknown id."""
        with self._engine._lock:
            return self._values.get(parameter_id)

    def set(self, parameter_id: str, value: Any) -> float:
        """Validate and apply one value; returns the applied value."""
        checked = self.spec(parameter_id, value).validate(value)
        self._engine._store(self, {parameter_id: checked})
        return checked

    def update(self, values: Mapping[str, Any]) -> dict[str, float]:
        """Validate every value, then apply all of them (all-or-nothing)."""
        return self._engine._apply(self, values)

    def revert(self, values: Mapping[str, float], bypass: bool | None = None) -> None:
        """Put back earlier values (and bypass) to undo a change that could not be recorded:
        no validation (they were current before), and also on a plugin removed meanwhile, so
        that a removal undone later brings the plugin back with them."""
        with self._engine._lock:
            self._values.update((k, v) for k, v in values.items() if k in self._values)
            if bypass is not None:
                object.__setattr__(self, "_bypass", bypass)

    def text(self, parameter_id: str) -> str:
        """Display text of the current value (the plugin's own text for binaries).

        For a binary this waits for the engine's owner thread (behind any render in progress);
        on an event loop use :meth:`texts_async`.
        """
        return self._engine._texts(self, [parameter_id])[parameter_id]

    async def texts_async(self, parameter_ids: Sequence[str] | None = None) -> dict[str, str]:
        """Display texts of ``parameter_ids`` (default: all) by id, like :meth:`text`, without
        blocking the event loop while the owner thread is busy (e.g. rendering)."""
        ids = list(self._specs) if parameter_ids is None else list(parameter_ids)
        return await self._engine._texts_async(self, ids)

    def parameter_info(self) -> list[dict[str, Any]]:
        """The protocol's ``parameter_info`` list (id, name, min, max, default, value, unit, text)."""
        values = self.values
        texts = self._engine._texts(self, list(self._specs))
        return [s.info(values[pid], texts[pid]) for pid, s in self._specs.items()]

    @property
    def bypass(self) -> bool:
        return bool(self._bypass)

    @bypass.setter
    def bypass(self, value: bool) -> None:
        self._engine.set_bypass(self.id, value)

    def state(self) -> dict[str, Any]:
        """Snapshot entry: ``{plugin_id, name, plugin_path, bypass, parameters}``."""
        with self._engine._lock:
            return {
                "plugin_id": self.id,
                "name": self.name,
                "plugin_path": self.plugin_path,
                "bypass": self._bypass,
                "parameters": dict(self._values),
            }

    # -- presets ----------------------------------------------------------------------------
    def presets(self) -> list[str]:
        """Names of the presets available for this plugin type (factory and user)."""
        return self._engine.presets.names(self.preset_key)

    def save_preset(self, name: str) -> Path:
        """Save the current values (and a binary's full state) as a user preset."""
        return self._engine._save_preset(self, name)

    def load_preset(self, preset: str | Mapping[str, Any]) -> dict[str, float]:
        """Load a named preset or a ``{id: value}`` dict; bad presets change nothing."""
        return self._engine._load_preset(self, preset)

    def delete_preset(self, name: str) -> None:
        """Delete a user preset (factory presets are read-only)."""
        try:
            self._engine.presets.delete(self.preset_key, name)
        except KeyError:
            raise PresetLoadFailed(self.id, f"unknown preset {name!r}") from None
        except PermissionError as exc:
            raise PresetLoadFailed(self.id, str(exc)) from None

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write a binary's full plugin state to ``path`` (DawDreamer ``save_state``)."""
        Path(path).write_bytes(self._engine._save_state(self))

    def load_state(self, path: str | os.PathLike[str]) -> dict[str, float]:
        """Restore a binary's full state from ``path``; returns the values after loading."""
        return self._engine._load_state(self, Path(path).read_bytes())

    # -- pythonic access --------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        specs = object.__getattribute__(self, "_specs")
        if name in specs:
            return self.get(name)
        raise AttributeError(
            f"{type(self).__name__} {self.name!r} has no parameter or attribute {name!r}; "
            f"parameters: {', '.join(specs)}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLUGIN_ATTRS:
            self._engine.set_bypass(self.id, value)
        elif name in self._specs:
            self.set(name, value)
        else:
            raise AttributeError(
                f"cannot set {name!r} on {self.name!r}; parameters: {', '.join(self._specs)}"
            )

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._specs))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:g}" for k, v in list(self.values.items())[:6])
        more = ", ..." if len(self._specs) > 6 else ""
        return f"<Plugin {self.name} id={self.id!r} track={self.track_id!r} {shown}{more}>"


class Track:
    """A source and an ordered chain of plugins. Created by :meth:`Engine.add_track`."""

    def __init__(self, engine: Engine, track_id: str, source: Source | None) -> None:
        self._engine = engine
        self.id = track_id
        self._source = source
        self._chain: list[Plugin] = []
        self._audio_cache: dict[int, np.ndarray] = {}

    @property
    def source(self) -> Source | None:
        return self._source

    @source.setter
    def source(self, source: Source | None) -> None:
        with self._engine._lock:
            self._source = source
            self._audio_cache = {}

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        """The chain, in signal order."""
        with self._engine._lock:
            return tuple(self._chain)

    def add(self, name: str, plugin_path: str | None = None, **kwargs: Any) -> Plugin:
        """Append (or insert at ``index=``) a plugin; see :meth:`Engine.add_plugin`."""
        return self._engine.add_plugin(self.id, name, plugin_path, **kwargs)

    def remove(self, plugin_id: str) -> None:
        self._engine.remove_plugin(plugin_id, track_id=self.id)

    def move(self, plugin_id: str, index: int) -> None:
        self._engine.move_plugin(plugin_id, index)

    def render(self, seconds: float, **kwargs: Any) -> np.ndarray:
        """Render only this track; see :meth:`Engine.render`."""
        return self._engine.render(seconds, track_id=self.id, **kwargs)

    def source_audio(self, sample_rate: int) -> np.ndarray | None:
        """The source at ``sample_rate`` (cached per rate)."""
        if self._source is None:
            return None
        if sample_rate not in self._audio_cache:
            self._audio_cache[sample_rate] = self._source.render(sample_rate)
        return self._audio_cache[sample_rate]

    def __getitem__(self, key: int | str) -> Plugin:
        chain = self.plugins
        if isinstance(key, int):
            return chain[key]
        for plugin in chain:
            if plugin.id == key:
                return plugin
        raise PluginNotFound(str(key), self.id)

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.plugins)

    def __len__(self) -> int:
        return len(self._chain)

    def __repr__(self) -> str:
        chain = " -> ".join(p.name for p in self.plugins) or "(empty)"
        return f"<Track {self.id!r}: {chain}>"


class Engine:
    """Tracks and plugins, rendered offline through DawDreamer. Safe to use from any thread."""

    def __init__(
        self,
        sample_rate: int = 44100,
        block_size: int = 512,
        *,
        presets: PresetLibrary | None = None,
        strict_paths: bool = False,
    ) -> None:
        self.sample_rate = int(sample_rate)
        self.block_size = int(block_size)
        self.presets = presets or PresetLibrary()
        self.strict_paths = strict_paths
        self._lock = threading.RLock()
        self._tracks: dict[str, Track] = {}
        self._plugins: dict[str, Plugin] = {}
        self._reserved: set[str] = set()
        self._retired: set[str] = set()  # ids of removed plugins: never assigned again
        self._backends: dict[tuple[int, int], Backend] = {}
        self._ids = itertools.count(1)
        self._owner = owner()
        # DawDreamer objects must be destroyed on the owner thread (a plugin binary destroyed
        # elsewhere hangs the process): an engine that is collected, or still alive at exit,
        # hands its backends to the owner.
        weakref.finalize(self, _release_backends, self._owner, self._backends).atexit = False
        _LIVE.add(self)

    # -- tracks -----------------------------------------------------------------------------
    @property
    def tracks(self) -> Mapping[str, Track]:
        with self._lock:
            return MappingProxyType(dict(self._tracks))

    def add_track(self, track_id: str | None = None, source: Source | None = None) -> Track:
        """Create a track (or return the existing one, updating its source when given)."""
        with self._lock:
            tid = track_id
            if not tid:  # a fresh id: "track_<n>" may exist after removals
                n = len(self._tracks) + 1
                while f"track_{n}" in self._tracks:
                    n += 1
                tid = f"track_{n}"
            track = self._tracks.get(tid)
            if track is None:
                track = self._tracks[tid] = Track(self, tid, source)
            elif source is not None:
                track.source = source
            return track

    def track(self, track_id: str) -> Track:
        with self._lock:
            track = self._tracks.get(track_id)
            if track is None:
                raise TrackNotFound(track_id, list(self._tracks))
            return track

    def remove_track(self, track_id: str) -> None:
        """Remove a track and all its plugins."""
        track = self.track(track_id)
        for plugin in track.plugins:
            self.remove_plugin(plugin.id)
        with self._lock:
            self._tracks.pop(track_id, None)
        for backend in self._backends_snapshot():
            self._owner.call(backend.drop_source, track_id)

    # -- plugins ----------------------------------------------------------------------------
    def plugin(self, plugin_id: str, track_id: str | None = None) -> Plugin:
        """The plugin ``plugin_id`` (on ``track_id`` when given, which must then exist)."""
        with self._lock:
            if track_id is not None:
                self.track(track_id)
            plugin = self._plugins.get(plugin_id)
            if plugin is None or (track_id is not None and plugin.track_id != track_id):
                raise PluginNotFound(plugin_id, track_id)
            return plugin

    @property
    def plugins(self) -> Mapping[str, Plugin]:
        with self._lock:
            return MappingProxyType(dict(self._plugins))

    def holds(self, plugin: Plugin) -> bool:
        """True while ``plugin`` is in this engine (False once removed), without copying
        :attr:`plugins`."""
        with self._lock:
            return self._plugins.get(plugin.id) is plugin

    def add_plugin(
        self,
        track_id: str,
        name: str,
        plugin_path: str | None = None,
        *,
        plugin_id: str | None = None,
        index: int | None = None,
        reserved: Callable[[str], None] | None = None,
    ) -> Plugin:
        """Create a plugin on ``track_id`` (the track is created if needed).

        ``name``: a built-in's name (case-insensitive) or a label for a binary.
        ``plugin_path``: None / a bare name for built-ins, or a path to a VST2/VST3 binary.
        ``plugin_id``: None or "" lets the engine assign one; a taken id -> InvalidMessage.
        ``track_id``: a non-empty string (InvalidMessage otherwise).
        ``reserved``: called with the plugin's id (in the calling thread) once it is reserved,
        before the plugin becomes visible.
        """
        if not isinstance(track_id, str) or not track_id:
            raise InvalidMessage("must be a non-empty string", "track_id")
        if not isinstance(name, str) or not name.strip():
            raise PluginAddFailed(str(name), plugin_path, "name must be a non-empty string")
        recipe, effect, path, resolved, warning = self._resolve(name, plugin_path)
        label = effect.name if effect is not None else name
        pid = self._reserve_id(plugin_id)
        if reserved is not None:
            reserved(pid)
        try:
            info = self._owner.call(self._create_on_owner, recipe)
            specs = self._specs_for(effect, info)
        except PluginAddFailed:
            self._release_id(pid)
            self._owner.call(self._discard_on_owner, recipe.uid)
            raise
        except Exception as exc:  # DawDreamer says RuntimeError("Unable to load plugin.") etc.
            self._release_id(pid)
            self._owner.call(self._discard_on_owner, recipe.uid)
            raise PluginAddFailed(name, plugin_path, str(exc) or type(exc).__name__) from exc
        plugin = Plugin(
            self, plugin_id=pid, track_id=track_id, name=label, plugin_path=path,
            recipe=recipe, specs=specs, resolved_as=resolved, warning=warning,
        )
        with self._lock:
            chain = self.add_track(track_id)._chain
            chain.insert(len(chain) if index is None else max(0, index), plugin)
            self._plugins[pid] = plugin
            self._reserved.discard(pid)
        return plugin

    def remove_plugin(self, plugin_id: str, track_id: str | None = None) -> Plugin:
        """Remove a plugin and its DawDreamer processor."""
        with self._lock:
            plugin = self.plugin(plugin_id, track_id)
            self._tracks[plugin.track_id]._chain.remove(plugin)
            del self._plugins[plugin_id]
            self._retired.add(plugin_id)
        for backend in self._backends_snapshot():
            self._owner.call(backend.remove, plugin.recipe.uid)
        return plugin

    def move_plugin(self, plugin_id: str, index: int) -> None:
        """Move a plugin to position ``index`` in its chain (clamped to the chain)."""
        with self._lock:
            plugin = self.plugin(plugin_id)
            chain = self._tracks[plugin.track_id]._chain
            chain.remove(plugin)
            chain.insert(max(0, min(index, len(chain))), plugin)

    def set_parameter(self, plugin_id: str, parameter_id: str, value: Any) -> float:
        return self.plugin(plugin_id).set(parameter_id, value)

    def set_parameters(self, plugin_id: str, values: Mapping[str, Any]) -> dict[str, float]:
        return self.plugin(plugin_id).update(values)

    def set_bypass(self, plugin_id: str, bypass: bool) -> None:
        """Bypass on or off: a bool (numpy's included); anything else is InvalidMessage."""
        if isinstance(bypass, np.bool_):
            bypass = bool(bypass)
        if not isinstance(bypass, bool):
            raise InvalidMessage(f"expected a boolean, got {type(bypass).__name__}", "bypass")
        with self._lock:
            object.__setattr__(self.plugin(plugin_id), "_bypass", bypass)

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """``{track_id: [plugin state, in chain order]}`` (the protocol's snapshot ``tracks``)."""
        with self._lock:
            return {tid: [p.state() for p in t._chain] for tid, t in self._tracks.items()}

    def restore(self, tracks: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Plugin]:
        """Re-create plugins from a snapshot (same ids, values, bypass). Returns them."""
        created = []
        for track_id, chain in tracks.items():
            self.add_track(track_id)
            for state in chain:
                plugin = self.add_plugin(
                    track_id, state["name"], state.get("plugin_path"),
                    plugin_id=state["plugin_id"],
                )
                known = {k: v for k, v in (state.get("parameters") or {}).items()
                         if k in plugin.parameters}
                plugin.update(known)
                self.set_bypass(plugin.id, bool(state.get("bypass", False)))
                created.append(plugin)
        return created

    # -- rendering --------------------------------------------------------------------------
    def render(
        self,
        seconds: float,
        *,
        track_id: str | None = None,
        sample_rate: int | None = None,
        block_size: int | None = None,
        automation: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> np.ndarray:
        """Render one track (or all tracks mixed) for ``seconds``: float32 (channels, samples).

        ``automation``: ``{plugin_id: {parameter_id: values per sample}}`` for this render only
        (values are validated against the parameter's range; afterwards the plugin holds its
        model value again).
        """
        plan = self._render_plan(seconds, track_id, sample_rate, block_size)
        autos = self._automation_plan(automation or {})
        return self._owner.call(self._render_on_owner, *plan, autos)

    def render_async(
        self,
        seconds: float,
        *,
        track_id: str | None = None,
        sample_rate: int | None = None,
        block_size: int | None = None,
        automation: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> Coroutine[Any, Any, np.ndarray]:
        """:meth:`render` (same arguments) as an awaitable: the event loop keeps running
        meanwhile. The chain and values are taken when it is CALLED, like :meth:`render`'s
        (``r = engine.render_async(2.0); plugin.gain = -20; await r`` renders the old gain),
        and bad arguments raise right there."""
        plan = self._render_plan(seconds, track_id, sample_rate, block_size)
        autos = self._automation_plan(automation or {})
        return self._owner.run(self._render_on_owner, *plan, autos)

    def write_wav(self, path: str | os.PathLike[str], audio: np.ndarray,
                  sample_rate: int | None = None) -> Path:
        """Write ``audio`` (channels, samples) as a 32-bit float WAV (missing folders of
        ``path`` are created)."""
        import soundfile as sf

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.asarray(audio).T, sample_rate or self.sample_rate,
                 subtype="FLOAT")
        return Path(path)

    def close(self) -> None:
        """Remove every plugin and drop the DawDreamer engines (on the owner thread), then
        hand the freed memory back to the operating system (see :func:`return_freed_memory`)."""
        for plugin in list(self.plugins.values()):
            self.remove_plugin(plugin.id)
        self._owner.call(self._backends.clear)
        return_freed_memory()

    # -- internals --------------------------------------------------------------------------
    def _resolve(
        self, name: str, plugin_path: str | None
    ) -> tuple[Recipe, effects.EffectSpec | None, str | None, str, str | None]:
        """-> (recipe, built-in spec or None, stored path, resolved_as, warning)."""
        if plugin_path is not None and not isinstance(plugin_path, str):
            raise PluginAddFailed(name, str(plugin_path), "plugin_path must be a string")
        uid = f"plg{next(self._ids)}"
        if is_binary_path(plugin_path):
            assert plugin_path is not None
            if os.path.exists(plugin_path):
                return Recipe(uid, "vst", path=plugin_path), None, plugin_path, "binary", None
            spec = effects.find(name)
            if spec is None or self.strict_paths:
                raise PluginAddFailed(name, plugin_path, "plugin file not found")
            warning = (f"plugin_path {plugin_path!r} does not exist on this machine; "
                       f"using pluginlab's built-in {spec.name!r} instead")
            return Recipe(uid, "faust", code=spec.code), spec, plugin_path, "builtin", warning
        spec = effects.find(name) or (effects.find(plugin_path) if plugin_path else None)
        if spec is None:
            raise PluginAddFailed(
                name, plugin_path, f"no built-in named {name!r}; built-ins: "
                + ", ".join(builtin_names()),
            )
        return Recipe(uid, "faust", code=spec.code), spec, None, "builtin", None

    def retire_ids(self, plugin_ids: Iterable[str]) -> None:
        """Never assign these ids to new plugins (ids of plugins that existed before, e.g. in
        a session restored from its log): a late message for an old plugin must not reach a
        new one. A caller may still choose such an id explicitly."""
        with self._lock:
            self._retired.update(plugin_ids)

    def _reserve_id(self, plugin_id: str | None) -> str:
        if plugin_id is not None and not isinstance(plugin_id, str):
            raise InvalidMessage("must be a string", "plugin_id")
        with self._lock:
            if plugin_id:
                if plugin_id in self._plugins or plugin_id in self._reserved:
                    raise InvalidMessage("already exists", "plugin_id")
                pid = plugin_id
            else:
                taken = (self._plugins, self._reserved, self._retired)
                n = len(self._plugins) + len(self._reserved) + 1
                while any(f"plugin_{n}" in ids for ids in taken):
                    n += 1
                pid = f"plugin_{n}"
            self._reserved.add(pid)
            return pid

    def _release_id(self, pid: str) -> None:
        with self._lock:
            self._reserved.discard(pid)

    def _backend(self, sample_rate: int, block_size: int) -> Backend:
        """The backend for a rate/block size; owner thread only. New ones get every plugin."""
        key = (sample_rate, block_size)
        backend = self._backends.get(key)
        if backend is None:
            backend = Backend(sample_rate, block_size)
            default = self._backends.get((self.sample_rate, self.block_size))
            for plugin in list(self._plugins.values()):
                backend.create(plugin.recipe)
                if plugin.kind == "binary" and default is not None:
                    backend.load_state(plugin.recipe.uid, default.save_state(plugin.recipe.uid))
            with self._lock:
                self._backends[key] = backend
        return backend

    def _backends_snapshot(self) -> list[Backend]:
        with self._lock:
            return list(self._backends.values())

    def _create_on_owner(self, recipe: Recipe) -> tuple[Any, list[float]]:
        default = (self.sample_rate, self.block_size)
        keys = [default] + [k for k in self._backends if k != default]
        for key in keys:
            backend = self._backend(*key)
            try:
                backend.create(recipe)
            except RuntimeError:
                if not backend.rendered:
                    raise
                self._rebuild(key, extra=recipe)
        backend = self._backend(*default)
        info = backend.create(recipe)
        values = [backend.read(recipe.uid, int(d["index"])) for d in info.description]
        return info, values

    def _discard_on_owner(self, uid: str) -> None:
        """Remove a processor whose plugin could not be added from every backend holding it."""
        for backend in self._backends_snapshot():
            if backend.has(uid):
                backend.remove(uid)

    def _rebuild(self, key: tuple[int, int], extra: Recipe | None = None) -> Backend:
        """Replace a backend by a fresh one holding the same processors (owner thread).

        DawDreamer 0.9.0 sometimes fails to compile a Faust processor added to an engine that
        has already rendered ("undefined symbol : process"); a fresh engine never showed it.
        Binaries keep their full state across the rebuild.
        """
        old = self._backends[key]
        fresh = Backend(*key)
        with self._lock:
            plugins = list(self._plugins.values())
        for plugin in plugins:
            fresh.create(plugin.recipe)
            if plugin.kind == "binary" and old.has(plugin.recipe.uid):
                fresh.load_state(plugin.recipe.uid, old.save_state(plugin.recipe.uid))
        with self._lock:
            self._backends[key] = fresh
        if extra is not None:
            fresh.create(extra)
        return fresh

    def _specs_for(
        self, spec: effects.EffectSpec | None, created: tuple[Any, list[float]]
    ) -> list[ParameterSpec]:
        info, values = created
        if spec is None:
            return binary_specs(info.description, values)
        out = []
        for p in spec.parameters:
            if p.id not in info.index_of:
                raise PluginAddFailed(spec.name, None, f"parameter {p.id!r} not in compiled DSP")
            out.append(_with_index(p, info.index_of[p.id]))
        return out

    def _apply(self, plugin: Plugin, values: Mapping[str, Any]) -> dict[str, float]:
        if not isinstance(values, Mapping):
            raise InvalidMessage("expected a mapping of parameter id -> value", "parameters")
        checked = {pid: plugin.spec(pid, v).validate(v) for pid, v in values.items()}
        self._store(plugin, checked)
        return checked

    def _store(self, plugin: Plugin, checked: dict[str, float]) -> None:
        """Make validated values current (PluginNotFound if the plugin was removed)."""
        with self._lock:
            if self._plugins.get(plugin.id) is not plugin:
                raise PluginNotFound(plugin.id, plugin.track_id)
            plugin._values.update(checked)

    def _texts(self, plugin: Plugin, ids: list[str]) -> dict[str, str]:
        read = self._text_reader(plugin, ids)
        return read() if plugin.kind == "builtin" else self._owner.call(read)

    async def _texts_async(self, plugin: Plugin, ids: list[str]) -> dict[str, str]:
        read = self._text_reader(plugin, ids)
        return read() if plugin.kind == "builtin" else await self._owner.run(read)

    def _text_reader(self, plugin: Plugin, ids: list[str]) -> Callable[[], dict[str, str]]:
        """A function giving the display texts of the current values of ``ids``: formatted
        from the spec for a built-in, the plugin's own text for a binary (which must then run
        on the owner thread). Unknown ids raise InvalidParameter here, in the caller."""
        specs = [plugin.spec(pid) for pid in ids]
        values = plugin.values
        if plugin.kind == "builtin":
            return lambda: {s.id: s.format(values[s.id]) for s in specs}

        def read() -> dict[str, str]:
            backend = self._backend(self.sample_rate, self.block_size)
            backend.push(plugin.recipe.uid, {s.index: values[s.id] for s in plugin._specs.values()})
            texts = {}
            for s in specs:
                text = backend.text(plugin.recipe.uid, s.index)
                texts[s.id] = f"{text} {s.unit}".strip() if s.unit and s.unit not in text else text
            return texts

        return read

    def _render_plan(
        self, seconds: float, track_id: str | None, sample_rate: int | None, block_size: int | None
    ) -> tuple[list[TrackGraph], dict[str, dict[int, float]], float, int, int]:
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
        sr = int(sample_rate or self.sample_rate)
        bs = int(block_size or self.block_size)
        with self._lock:
            tracks = [self.track(track_id)] if track_id is not None else list(self._tracks.values())
            graphs, values = [], {}
            for track in tracks:
                active = [p for p in track._chain if not p._bypass]
                graphs.append(TrackGraph(
                    track.id, track.source, track.source_audio(sr),
                    tuple(p.recipe.uid for p in active),
                ))
                for p in active:
                    values[p.recipe.uid] = {p._specs[k].index: v for k, v in p._values.items()}
        return graphs, values, float(seconds), sr, bs

    def _automation_plan(
        self, automation: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, dict[int, np.ndarray]]:
        """Validate automation against the specs; -> {uid: {index: float32 array}}."""
        plan: dict[str, dict[int, np.ndarray]] = {}
        for plugin_id, per_param in automation.items():
            plugin = self.plugin(plugin_id)
            for pid, data in per_param.items():
                spec = plugin.spec(pid)
                arr = np.asarray(data, dtype=np.float32)
                if arr.ndim != 1 or arr.size == 0:
                    raise InvalidParameter(pid, "array", "automation must be a non-empty 1-D array")
                if not np.isfinite(arr).all():
                    raise InvalidParameter(pid, "array", "automation values must be finite")
                spec.validate(float(arr.min()))
                spec.validate(float(arr.max()))
                plan.setdefault(plugin.recipe.uid, {})[spec.index] = arr
        return plan

    def _render_on_owner(
        self, graphs: list[TrackGraph], values: dict[str, dict[int, float]],
        seconds: float, sr: int, bs: int, automation: dict[str, dict[int, np.ndarray]],
    ) -> np.ndarray:
        backend = self._backend(sr, bs)
        try:
            return self._render_with(backend, graphs, values, seconds, automation)
        except RuntimeError:  # the same DawDreamer 0.9.0 flake can surface at render time
            backend = self._rebuild((sr, bs))
            return self._render_with(backend, graphs, values, seconds, automation)

    @staticmethod
    def _render_with(
        backend: Backend, graphs: list[TrackGraph], values: dict[str, dict[int, float]],
        seconds: float, automation: dict[str, dict[int, np.ndarray]],
    ) -> np.ndarray:
        for uid, vals in values.items():
            if backend.has(uid):
                backend.push(uid, vals)
        for uid, per_index in automation.items():
            for index, data in per_index.items():
                backend.set_automation(uid, index, data)
        # A plugin removed between planning and rendering is left out (not its whole track).
        live = [replace(g, plugins=tuple(u for u in g.plugins if backend.has(u)))
                for g in graphs]
        try:
            return backend.render(live, seconds)
        finally:
            for uid, per_index in automation.items():
                for index in per_index:
                    backend.clear_automation(uid, index, values.get(uid, {}).get(index, 0.0))

    def _save_preset(self, plugin: Plugin, name: str) -> Path:
        if not isinstance(name, str) or not name.strip():
            raise PresetLoadFailed(plugin.id, "preset_name must be a non-empty string")
        state = self._save_state(plugin) if plugin.kind == "binary" else None
        try:
            return self.presets.save(plugin.preset_key, name, plugin.name, plugin.values, state)
        except ValueError as exc:  # e.g. the per-type preset limit
            raise PresetLoadFailed(plugin.id, str(exc)) from None

    def _load_preset(self, plugin: Plugin, preset: str | Mapping[str, Any]) -> dict[str, float]:
        plugin.update(self.preset_values(plugin, preset))
        return plugin.values

    def preset_values(self, plugin: Plugin, preset: str | Mapping[str, Any]) -> dict[str, float]:
        """The validated values a preset (a name or ``{id: value}``) sets, without making them
        current: the caller applies them (``plugin.update``) when it suits it, e.g. on the
        event loop right before recording, so no other change can land in between. A binary's
        preset with a state file is loaded into its processor here (on the owner thread) and
        the values are what the plugin reports back. PresetLoadFailed if it is unknown or bad.

        A named preset is a whole sound: parameters it does not name go to their defaults, so
        it sounds the same whatever was set before. A ``{id: value}`` mapping changes only the
        parameters it names."""
        state: bytes | None = None
        if isinstance(preset, Mapping):
            params = dict(preset)
        elif isinstance(preset, str):
            found = self.presets.get(plugin.preset_key, preset)
            if found is None:
                names = ", ".join(self.presets.names(plugin.preset_key)) or "(none)"
                raise PresetLoadFailed(plugin.id, f"unknown preset {preset!r}; available: {names}")
            params = found.parameters
            if found.state_path is not None and plugin.kind == "binary":
                state = found.state_path.read_bytes()
        else:
            raise PresetLoadFailed(plugin.id, "preset must be a name or a mapping of id -> value")
        try:
            checked = {pid: plugin.spec(pid, v).validate(v) for pid, v in params.items()}
        except InvalidParameter as exc:
            raise PresetLoadFailed(plugin.id, exc.message) from None
        if state is not None:
            return self._state_values(plugin, state)
        if isinstance(preset, str):
            return {pid: spec.default for pid, spec in plugin.parameters.items()} | checked
        return checked

    def _save_state(self, plugin: Plugin) -> bytes:
        if plugin.kind != "binary":
            raise PresetLoadFailed(plugin.id, "full state is only available for plugin binaries")
        values = plugin.values

        def save() -> bytes:
            backend = self._backend(self.sample_rate, self.block_size)
            backend.push(plugin.recipe.uid, {s.index: values[s.id] for s in plugin._specs.values()})
            return backend.save_state(plugin.recipe.uid)

        return self._owner.call(save)

    def _load_state(self, plugin: Plugin, state: bytes) -> dict[str, float]:
        values = self._state_values(plugin, state)
        with self._lock:
            plugin._values.update(values)
        return plugin.values

    def _state_values(self, plugin: Plugin, state: bytes) -> dict[str, float]:
        """Load ``state`` into the binary's processors; the values it reports (not made
        current in the model)."""
        if plugin.kind != "binary":
            raise PresetLoadFailed(plugin.id, "full state is only available for plugin binaries")

        def load() -> dict[str, float]:
            read: dict[str, float] = {}
            for backend in self._backends_snapshot():
                backend.load_state(plugin.recipe.uid, state)
                read = {s.id: backend.read(plugin.recipe.uid, s.index)
                        for s in plugin._specs.values()}
            return read

        try:
            return self._owner.call(load)
        except Exception as exc:
            raise PresetLoadFailed(plugin.id, f"cannot load plugin state: {exc}") from exc


_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


def return_freed_memory() -> bool:
    """Ask glibc to give free heap pages back to the OS (``malloc_trim(0)``); False where
    that does not exist. Without it a server's RSS stays at its peak after sessions full of
    plugins are released (measured: 4 sessions x 10 built-ins, 78 MB freed, 48 MB returned
    without, all of it with)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_backends(owner_: Owner, backends: dict[tuple[int, int], Backend]) -> None:
    """Destroy ``backends`` on the owner thread (never blocks: may run inside the GC)."""
    if backends:
        if owner_.on_owner():
            backends.clear()
        else:
            owner_.submit(backends.clear)


@atexit.register
def _release_all_at_exit() -> None:
    """Before the interpreter tears down, destroy every live engine's DawDreamer objects on the
    owner thread (finalization on the main thread would hang with a plugin binary loaded)."""
    for engine in list(_LIVE):
        with contextlib.suppress(Exception):
            engine._owner.call(engine._backends.clear)


def _with_index(spec: ParameterSpec, index: int) -> ParameterSpec:
    from dataclasses import replace

    return replace(spec, index=index)
