"""Plugin binaries: finding them on disk and describing their parameters.

:func:`scan` lists Linux VST2 (``.so``) and VST3 (``.vst3``) plugins in the usual folders.
:func:`binary_specs` turns DawDreamer's parameter description of a loaded binary into
pluginlab :class:`~pluginlab.parameters.ParameterSpec` objects: values are the host's
normalized 0..1 values, the unit is the plugin's label, and display text comes from the
plugin itself at run time. Parameters the plugin marks as not automatable (e.g. DPF's
"Buffer Size" / "Sample Rate" read-outs) are left out: setting them is meaningless.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .parameters import ParameterSpec, unique_ids

__all__ = ["PluginFile", "binary_specs", "default_dirs", "is_binary_path", "scan"]

BINARY_SUFFIXES = (".so", ".vst3", ".vst", ".dll", ".component", ".clap", ".dylib")


@dataclass(frozen=True)
class PluginFile:
    """A plugin binary found on disk."""

    name: str
    path: str
    format: str  # "vst2" | "vst3"


def default_dirs() -> list[Path]:
    """Folders searched by :func:`scan`: system and user VST folders plus VST_PATH/VST3_PATH."""
    home = Path.home()
    dirs = [Path("/usr/lib/vst"), Path("/usr/lib/lxvst"), Path("/usr/local/lib/vst"),
            Path("/usr/lib/vst3"), Path("/usr/local/lib/vst3"), home / ".vst", home / ".lxvst",
            home / ".vst3"]
    for var in ("VST_PATH", "LXVST_PATH", "VST3_PATH"):
        dirs += [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p]
    return dirs


def scan(dirs: Iterable[str | os.PathLike[str]] | None = None) -> list[PluginFile]:
    """Plugin binaries in ``dirs`` (default :func:`default_dirs`), sorted by name, no repeats."""
    found: dict[str, PluginFile] = {}
    for folder in (Path(d) for d in (dirs if dirs is not None else default_dirs())):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            fmt = "vst3" if entry.suffix == ".vst3" else "vst2" if entry.suffix == ".so" else None
            if fmt is None:
                continue
            path = str(entry.resolve())
            found.setdefault(path, PluginFile(_display_name(entry), path, fmt))
    return sorted(found.values(), key=lambda p: (p.name.lower(), p.format))


def _display_name(path: Path) -> str:
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return stem.removesuffix("-vst")


def is_binary_path(plugin_path: str | None) -> bool:
    """True when ``plugin_path`` looks like a path to a binary rather than a built-in's name:
    it has a directory separator (``/``, or ``\\`` as in front ends' Windows paths) or a
    plugin file suffix (also other platforms', e.g. ``.dll``: such a path is then reported as
    missing on this machine, never mistaken for a name)."""
    if not plugin_path:
        return False
    return ("/" in plugin_path or "\\" in plugin_path
            or plugin_path.lower().endswith(BINARY_SUFFIXES))


def binary_specs(description: list[dict[str, Any]], values: list[float]) -> list[ParameterSpec]:
    """Specs for a loaded binary; ``values`` are its current normalized values (the defaults)."""
    usable = [(d, v) for d, v in zip(description, values) if d.get("isAutomatable", True)]
    ids = unique_ids(str(d.get("name") or f"param {d['index']}") for d, _ in usable)
    specs = []
    for pid, (d, value) in zip(ids, usable):
        steps = int(d.get("numSteps") or 0)
        discrete = bool(d.get("isDiscrete")) and 1 < steps <= 10_000
        specs.append(
            ParameterSpec(
                id=pid,
                name=str(d.get("name") or pid),
                min=0.0,
                max=1.0,
                default=float(value),
                step=(1.0 / (steps - 1)) if discrete else None,
                unit=str(d.get("label") or "").strip(),
                kind="bool" if d.get("isBoolean") else "float",
                index=int(d["index"]),
            )
        )
    return specs
