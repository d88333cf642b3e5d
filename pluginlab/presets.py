"""Preset storage: named parameter snapshots per plugin type, factory and user.

Presets are keyed by plugin *type*: the built-in's lower-case name (``"reverb"``) or, for a
binary, its file name plus a short hash of its full path. Factory presets live in
``data/presets/<key>/*.json`` and are read-only; user presets live in a writable folder
(``PLUGINLAB_PRESETS`` or ``~/.local/share/pluginlab/presets``) with the same layout. A user
preset with the same name as a factory one shadows it. A binary's full state (DawDreamer
``save_state``) is kept beside its JSON as ``<slug>.state``.

This module only stores and finds; validation of the values is the engine's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import DATA_DIR

__all__ = ["FACTORY_DIR", "MAX_USER_PRESETS", "Preset", "PresetLibrary", "default_user_dir", "preset_key"]
_log = logging.getLogger("pluginlab.presets")
MAX_USER_PRESETS = 256  # per plugin type
# folder -> (its files, factory, presets)
_cache: dict[Path, tuple[frozenset[tuple[str, int, int, int]], bool, tuple[Preset, ...]]] = {}
_cache_lock = threading.Lock()
_warned: set[tuple[Path, float]] = set()


def _skipped(path: Path, why: str) -> None:
    """Warn once per version of a damaged preset file (listings read the folder often)."""
    try:
        key = (path, path.stat().st_mtime)
    except OSError:
        key = (path, 0.0)
    if key not in _warned:
        _warned.add(key)
        _log.warning("preset file %s skipped: %s", path, why)

FACTORY_DIR = DATA_DIR / "presets"


def default_user_dir() -> Path:
    env = os.environ.get("PLUGINLAB_PRESETS")
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "pluginlab" / "presets"


def preset_key(name: str, plugin_path: str | None) -> str:
    """The folder name presets of this plugin type live under."""
    if not plugin_path:
        return name.strip().lower()
    digest = hashlib.sha256(str(Path(plugin_path).resolve()).encode()).hexdigest()[:8]
    return f"{_slug(Path(plugin_path).name)}-{digest}"


def _slug(text: str) -> str:
    """A file-name-safe form of ``text``, at most 64 characters (long names that share it
    are told apart by the collision rule of :meth:`PresetLibrary._user_path`)."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", text.strip()).strip("_").lower()[:64].strip("_")
    return slug or "preset"


@dataclass(frozen=True)
class Preset:
    """A stored preset: values by parameter id, and for binaries an optional state file."""

    name: str
    parameters: dict[str, Any]
    factory: bool
    state_path: Path | None = None
    path: Path | None = None  # its JSON file


class PresetLibrary:
    """Find, save and delete presets. Thread-safe for the engine's use (file-level writes)."""

    def __init__(self, user_dir: str | Path | None = None, factory_dir: str | Path | None = None):
        self.user_dir = Path(user_dir) if user_dir else default_user_dir()
        self.factory_dir = Path(factory_dir) if factory_dir else FACTORY_DIR

    def names(self, key: str) -> list[str]:
        """Preset names for this plugin type, factory and user, sorted, without duplicates."""
        found = {p.name for p in self._all(key)}
        return sorted(found, key=str.lower)

    def describe(self, key: str) -> list[dict[str, Any]]:
        """``[{name, factory}]`` for listing replies (a user preset shadows a factory one)."""
        by_name = {p.name: p for p in self._all(key)}
        return [{"name": n, "factory": by_name[n].factory} for n in sorted(by_name, key=str.lower)]

    def get(self, key: str, name: str) -> Preset | None:
        """The preset called ``name`` (user first, then factory), or None."""
        for preset in reversed(self._all(key)):
            if preset.name == name:
                return preset
        return None

    def save(
        self, key: str, name: str, plugin: str, parameters: dict[str, float], state: bytes | None
    ) -> Path:
        """Write a user preset (overwrites a user preset of that name). Returns its JSON path.

        ValueError for an empty name, or a new name when the plugin type already has
        :data:`MAX_USER_PRESETS` user presets (they are shared by every session of a server,
        and every listing reads them)."""
        if not name or not name.strip():
            raise ValueError("preset name must not be empty")
        folder = self.user_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        existing = self._read(folder, False)
        if len(existing) >= MAX_USER_PRESETS and all(p.name != name for p in existing):
            raise ValueError(f"{len(existing)} user presets for this plugin type, the limit "
                             f"({MAX_USER_PRESETS}); delete one first")
        path = self._user_path(key, name)
        body = {"name": name, "plugin": plugin, "parameters": parameters}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
        os.replace(tmp, path)
        state_path = path.with_suffix(".state")
        if state is not None:
            state_path.write_bytes(state)
        elif state_path.exists():
            state_path.unlink()
        return path

    def delete(self, key: str, name: str) -> None:
        """Delete a user preset. Raises KeyError if unknown, PermissionError for factory ones."""
        preset = self.get(key, name)
        if preset is None:
            raise KeyError(name)
        if preset.factory:
            raise PermissionError(f"factory preset {name!r} is read-only")
        assert preset.path is not None  # read from a file
        preset.path.unlink()
        preset.path.with_suffix(".state").unlink(missing_ok=True)

    def _user_path(self, key: str, name: str) -> Path:
        """The JSON file of the user preset ``name``: its existing file, else the slug of the
        name, else (the slug belongs to another name: "Warm Pad" vs "warm-pad") the slug
        plus a hash of the exact name. Different names never share a file."""
        for preset in self._read(self.user_dir / key, False):
            if preset.name == name and preset.path is not None:
                return preset.path
        path = self.user_dir / key / f"{_slug(name)}.json"
        if path.exists():
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            path = path.with_name(f"{_slug(name)}-{digest}.json")
        return path

    def _all(self, key: str) -> list[Preset]:
        """Factory presets, then user presets (later entries shadow earlier ones)."""
        return self._read(self.factory_dir / key, True) + self._read(self.user_dir / key, False)

    @staticmethod
    def _read(folder: Path, factory: bool) -> list[Preset]:
        """The presets in ``folder``, remembered while its files are the same ones (name,
        inode, size, mtime: a save writes a new file and renames it over the old one, so
        even a rewrite within one clock tick shows): listings are frequent, and reading and
        parsing every file each time cost ~70 ms at 2000 presets."""
        try:
            with os.scandir(folder) as entries:
                stamp = frozenset(
                    (e.name, st.st_ino, st.st_size, st.st_mtime_ns)
                    for e in entries if e.name.endswith((".json", ".state"))
                    for st in (e.stat(),))
        except OSError:
            return []
        with _cache_lock:
            cached = _cache.get(folder)
            if cached is not None and cached[0] == stamp and cached[1] == factory:
                return list(cached[2])
        presets = PresetLibrary._scan(folder, factory)
        with _cache_lock:
            if len(_cache) > 256:
                _cache.clear()
            _cache[folder] = (stamp, factory, tuple(presets))
        return presets

    @staticmethod
    def _scan(folder: Path, factory: bool) -> list[Preset]:
        if not folder.is_dir():
            return []
        presets = []
        for path in sorted(folder.glob("*.json")):
            try:
                body = json.loads(path.read_text())
            except (OSError, ValueError) as exc:  # a damaged file is skipped, never fatal
                _skipped(path, str(exc))
                continue
            params = body.get("parameters", {}) if isinstance(body, dict) else None
            if not isinstance(params, dict):
                _skipped(path, "no 'parameters' object")
                continue
            name = str(body.get("name") or path.stem)
            state = path.with_suffix(".state")
            presets.append(
                Preset(name, params, factory, state if state.exists() else None, path))
        return presets
