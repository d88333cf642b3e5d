"""``pluginlab`` command line: ``demo``, ``plugins`` and the subcommands other modules register.

Each concern registers its own subcommands (``register(subparsers)``); this module only
assembles them. Every handler returns a process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["build_parser", "main"]


def _rms_db(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return 20 * np.log10(max(rms, 1e-12))


def cmd_demo(args: argparse.Namespace) -> int:
    """Render data/drum_loop.wav through Filter -> Compressor -> Reverb and write a WAV."""
    from .engine import Engine
    from .sources import Source

    engine = Engine(sample_rate=args.sample_rate)
    track = engine.add_track("drums", Source.file(args.input))
    dry = track.render(args.seconds)
    lowpass = track.add("Filter")
    lowpass.update({"type": "lowpass", "cutoff": 2500.0, "resonance": 1.2})
    comp = track.add("Compressor")
    comp.update({"threshold": -24.0, "ratio": 4.0, "makeup": 6.0})
    reverb = track.add("Reverb")
    reverb.update({"wet_dry": 0.35, "room_size": 0.8})
    wet = track.render(args.seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    engine.write_wav(out, wet)
    print(f"chain: {track}")
    for plugin in track:
        texts = ", ".join(f"{p['id']}={p['text']}" for p in plugin.parameter_info())
        print(f"  {plugin.name:<10} {texts}")
    print(f"dry RMS {_rms_db(dry):6.1f} dBFS   processed RMS {_rms_db(wet):6.1f} dBFS")
    print(f"wrote {out} ({wet.shape[1] / engine.sample_rate:.1f} s, {wet.shape[0]} channels)")
    engine.close()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """List built-in plugins and plugin binaries found on this machine."""
    from . import effects
    from .vst import scan

    print("built-in:")
    for spec in effects.library().values():
        ids = ", ".join(p.id for p in spec.parameters)
        print(f"  {spec.name:<12} {'source' if spec.is_source else 'effect':<7} {ids}")
    found = scan(args.dir or None)
    print(f"binaries ({len(found)}):")
    for plugin in found:
        print(f"  {plugin.name:<24} {plugin.format:<5} {plugin.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pluginlab",
        description="Host audio plugins (DawDreamer), control them together, keep provenance.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="render a drum loop through a plugin chain to a WAV")
    demo.add_argument("--input", default="drum_loop.wav", help="audio file (default: data/)")
    demo.add_argument("--out", default="out/demo.wav")
    demo.add_argument("--seconds", type=float, default=4.0)
    demo.add_argument("--sample-rate", type=int, default=44100)
    demo.set_defaults(func=cmd_demo)
    plugins = sub.add_parser("plugins", help="list built-in plugins and installed VSTs")
    plugins.add_argument("--dir", action="append", help="folder to scan (repeatable)")
    plugins.set_defaults(func=cmd_plugins)
    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """Subcommands owned by other modules."""
    from . import provenance_cli, server_cli

    server_cli.register(sub)
    provenance_cli.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
