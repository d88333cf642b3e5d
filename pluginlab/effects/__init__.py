"""pluginlab's built-in DSP library: Faust programs shipped as ``*.dsp`` files in this folder.

Convention every ``.dsp`` file follows (checked by ``tests/test_effects.py``):

* ``declare name "Reverb";`` gives the built-in's name (looked up case-insensitively);
  ``declare description "...";`` a one-line description.
* Effects are stereo in / stereo out; sources (oscillators, noise) have no inputs.
* Every control's label is its stable snake_case parameter id followed by metadata:
  ``hslider("room_size[name:Room Size][unit:%]", default, min, max, step)`` with numeric
  literal arguments. ``[choices:lowpass|highpass|bandpass]`` on an ``nentry`` makes a choice
  parameter (values 0..n-1), ``[type:int]`` a whole-number one, ``checkbox("id[name:..]")``
  a boolean.

DawDreamer drops Faust metadata (units, names), so pluginlab reads it from the source here;
ranges are parsed from the same literals and a test checks them against the compiled program.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..parameters import ParameterKind, ParameterSpec

__all__ = ["EFFECTS_DIR", "EffectSpec", "find", "library"]

EFFECTS_DIR = Path(__file__).resolve().parent

_DECLARE = re.compile(r'declare\s+(\w+)\s+"([^"]*)"\s*;')
_SLIDER = re.compile(
    r'\b(hslider|vslider|nentry)\s*\(\s*"([^"]*)"\s*,'
    r"\s*([-+.\deE]+)\s*,\s*([-+.\deE]+)\s*,\s*([-+.\deE]+)\s*,\s*([-+.\deE]+)\s*\)"
)
_CHECKBOX = re.compile(r'\bcheckbox\s*\(\s*"([^"]*)"\s*\)')
_META = re.compile(r"\[(\w+):([^\]]*)\]")


@dataclass(frozen=True)
class EffectSpec:
    """One built-in: its name, Faust source and parameters in declaration order."""

    name: str
    description: str
    code: str
    path: Path
    parameters: tuple[ParameterSpec, ...]
    is_source: bool

    @property
    def key(self) -> str:
        return self.name.lower()


def _split_label(label: str) -> tuple[str, dict[str, str]]:
    meta = {k: v.strip() for k, v in _META.findall(label)}
    return _META.sub("", label).strip(), meta


def _control(kind_word: str, label: str, numbers: tuple[str, ...]) -> ParameterSpec:
    pid, meta = _split_label(label)
    if kind_word == "checkbox":
        default, lo, hi, step = 0.0, 0.0, 1.0, 1.0
    else:
        default, lo, hi, step = (float(n) for n in numbers)
    choices = tuple(c.strip() for c in meta["choices"].split("|")) if "choices" in meta else None
    kind: ParameterKind
    if kind_word == "checkbox":
        kind = "bool"
    elif choices:
        kind = "choice"
    elif meta.get("type") == "int":
        kind = "int"
    else:
        kind = "float"
    return ParameterSpec(
        id=pid,
        name=meta.get("name", pid.replace("_", " ").title()),
        min=lo,
        max=hi,
        default=default,
        step=step,
        unit=meta.get("unit", ""),
        choices=choices,
        kind=kind,
    )


def parse_dsp(path: Path) -> EffectSpec:
    """Read one ``.dsp`` file of the library into an :class:`EffectSpec`."""
    code = path.read_text()
    declared = dict(_DECLARE.findall(code))
    found: list[tuple[int, ParameterSpec]] = []
    for m in _SLIDER.finditer(code):
        found.append((m.start(), _control(m.group(1), m.group(2), m.groups()[2:])))
    for m in _CHECKBOX.finditer(code):
        found.append((m.start(), _control("checkbox", m.group(1), ())))
    params = tuple(spec for _, spec in sorted(found, key=lambda item: item[0]))
    is_source = declared.get("kind", "effect") == "source"
    return EffectSpec(
        name=declared.get("name", path.stem.title()),
        description=declared.get("description", ""),
        code=code,
        path=path,
        parameters=params,
        is_source=is_source,
    )


@lru_cache(maxsize=1)
def library() -> dict[str, EffectSpec]:
    """All built-ins keyed by lower-case name, in file-name order."""
    specs = (parse_dsp(p) for p in sorted(EFFECTS_DIR.glob("*.dsp")))
    return {spec.key: spec for spec in specs}


def find(name: str) -> EffectSpec | None:
    """The built-in called ``name`` (case-insensitive), or None."""
    return library().get(name.strip().lower())
