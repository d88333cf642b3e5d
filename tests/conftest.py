"""Shared fixtures: a throw-away ``engine`` and an installed VST path (``vst_path``).

``vst_path`` skips the test with the install hint when no Linux VST is found; under
``CI=true`` (where ``.ci/run`` installs the packages) it fails instead, so a broken CI image
cannot turn the VST tests into silent skips.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import the working tree's package even when the editable install resolves `pluginlab` as a
# namespace package (the case when `.venv` was created before pluginlab/__init__.py existed).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pluginlab import Engine, PresetLibrary
from pluginlab.owner import owner
from pluginlab.vst import scan


def pytest_configure(config: pytest.Config) -> None:
    """Start pluginlab's engine owner before any test touches DawDreamer: DawDreamer renders
    only on the first thread that ever rendered in a process (see README, Decisions)."""
    owner()


PREFERRED_VST = "/usr/lib/lxvst/DragonflyRoomReverb-vst.so"
INSTALL_HINT = "no Linux VST installed: apt-get install dragonfly-reverb-vst zam-plugins"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def find_vst() -> str | None:
    """An installed VST2 (Dragonfly Room Reverb preferred), else any scanned plugin, else None."""
    if os.path.exists(PREFERRED_VST):
        return PREFERRED_VST
    found = scan()
    for plugin in found:
        if plugin.format == "vst2":
            return plugin.path
    return found[0].path if found else None


def require_vst() -> str:
    """:func:`find_vst` or skip (fail under ``CI=true``) with the install hint."""
    path = find_vst()
    if path is None:
        if in_ci():
            pytest.fail(INSTALL_HINT + " (CI=true: VST tests must not skip)")
        pytest.skip(INSTALL_HINT)
    return path


@pytest.fixture
def vst_path() -> str:
    return require_vst()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh Engine whose user presets live in ``tmp_path``; closed after the test."""
    eng = Engine(presets=PresetLibrary(user_dir=tmp_path / "presets"))
    try:
        yield eng
    finally:
        eng.close()
