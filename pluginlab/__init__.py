"""pluginlab: host audio plugins with DawDreamer, control them together, keep provenance.

Quick start::

    from pluginlab import Engine, Source
    engine = Engine()
    track = engine.add_track("drums", Source.file("drum_loop.wav"))
    reverb = track.add("Reverb")
    reverb.wet_dry = 0.4
    audio = track.render(4.0)          # float32 (channels, samples)

In a notebook, ``lab = await pluginlab.start()`` runs the collaborative server on the kernel's
loop and ``lab.panel(plugin)`` shows sliders bound to it (see :mod:`pluginlab.lab`).
"""

from __future__ import annotations

from .client import Client, ClientConnectionError, ClientError
from .config import ServerConfig
from .engine import Engine, Plugin, Track, builtin_names
from .errors import ErrorCode, PluginlabError
from .lab import Lab, RestoredSessionWarning, start
from .parameters import ParameterSpec
from .presets import PresetLibrary
from .server import PluginServer
from .sources import Source
from .vst import scan

__all__ = [
    "Client",
    "ClientConnectionError",
    "ClientError",
    "Engine",
    "ErrorCode",
    "Lab",
    "ParameterSpec",
    "Plugin",
    "PluginServer",
    "PluginlabError",
    "PresetLibrary",
    "RestoredSessionWarning",
    "ServerConfig",
    "Source",
    "Track",
    "builtin_names",
    "scan",
    "start",
]

__version__ = "0.1.0"
