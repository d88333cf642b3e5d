"""The parameter model shared by built-in effects and plugin binaries.

A :class:`ParameterSpec` describes one parameter (stable snake_case ``id``, human ``name``,
range, default, step, unit, optional choices) and owns the two rules every door into
pluginlab must share:

* :meth:`ParameterSpec.validate` - the one place where a value is accepted or refused.
  Non-numbers, NaN, infinities and out-of-range values raise
  :class:`~pluginlab.errors.InvalidParameter`; nothing is ever clamped silently.
* :meth:`ParameterSpec.format` - the display text (``"-6.0 dB"``, ``"250 ms"``).

:func:`snake_id` turns any plugin label into a stable id.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from .errors import InvalidParameter

__all__ = ["ParameterKind", "ParameterSpec", "snake_id", "unique_ids"]

ParameterKind = Literal["float", "int", "bool", "choice"]


@dataclass(frozen=True)
class ParameterSpec:
    """Metadata of one parameter. Values are plain floats in the plugin's own units.

    ``index`` is the host's parameter index (DawDreamer's), internal to the engine.
    """

    id: str
    name: str
    min: float
    max: float
    default: float
    step: float | None = None
    unit: str = ""
    choices: tuple[str, ...] | None = None
    kind: ParameterKind = "float"
    index: int = field(default=-1, compare=False)

    def validate(self, value: Any) -> float:
        """Return ``value`` as a float if acceptable, else raise ``InvalidParameter``.

        Accepted: real numbers (int, float, numpy scalars; not bool for non-bool kinds),
        finite, within [min, max]; for choice parameters also a choice's name (any case); for bool
        parameters also True/False.
        """
        if self.kind == "choice" and isinstance(value, str) and self.choices:
            if value in self.choices:
                return float(self.choices.index(value))
            folded = [c.casefold() for c in self.choices]  # "HighPass" is "highpass"
            if value.casefold() in folded:
                return float(folded.index(value.casefold()))
            raise InvalidParameter(
                self.id, value, f"unknown choice; valid: {', '.join(self.choices)}"
            )
        if type(value) is float and self.kind == "float":  # the common case, checked cheaply
            if self.min <= value <= self.max:  # False for NaN
                return value
            if not math.isfinite(value):
                raise InvalidParameter(
                    self.id, value, f"value must be a finite number in {self._range()}"
                )
            raise InvalidParameter(self.id, value, f"out of range {self._range()}")
        if isinstance(value, bool):
            if self.kind != "bool":
                raise InvalidParameter(
                    self.id, value, f"expected a number in {self._range()}, got a boolean"
                )
            return 1.0 if value else 0.0
        if not isinstance(value, numbers.Real):  # int, float, numpy scalars (not np.bool_)
            raise InvalidParameter(
                self.id, value, f"expected a number in {self._range()}, got {type(value).__name__}"
            )
        try:
            number = float(value)
        except OverflowError:
            raise InvalidParameter(self.id, value, "value must be finite") from None
        if not math.isfinite(number):
            raise InvalidParameter(
                self.id, value, f"value must be a finite number in {self._range()}"
            )
        if number < self.min or number > self.max:
            raise InvalidParameter(self.id, value, f"out of range {self._range()}")
        if self.kind in ("int", "choice", "bool") and number != round(number):
            raise InvalidParameter(self.id, value, "expected a whole number")
        return number

    def _range(self) -> str:
        return f"[{_num(self.min)}, {_num(self.max)}]"

    def format(self, value: float) -> str:
        """Human display text for ``value`` (the plugin's own text for binaries is elsewhere)."""
        if self.kind == "bool":
            return "on" if value >= 0.5 else "off"
        if self.kind == "choice" and self.choices:
            i = int(round(value))
            return self.choices[i] if 0 <= i < len(self.choices) else str(i)
        if self.kind == "int":
            text = str(int(round(value)))
        else:
            text = f"{value:.{self._decimals}f}"
        return f"{text} {self.unit}".rstrip() if self.unit else text

    @cached_property
    def _decimals(self) -> int:
        if not self.step or self.step <= 0:
            return 2
        return max(0, min(4, -math.floor(math.log10(self.step) + 1e-9)))

    def info(self, value: float, text: str | None = None) -> dict[str, Any]:
        """The protocol's ``parameter_info`` entry for this parameter at ``value``."""
        entry: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "min": self.min,
            "max": self.max,
            "default": self.default,
            "value": value,
            "unit": self.unit,
            "text": text if text is not None else self.format(value),
            "kind": self.kind,
        }
        if self.step:
            entry["step"] = self.step
        if self.choices:
            entry["choices"] = list(self.choices)
        return entry


def snake_id(label: str) -> str:
    """A stable snake_case id from a plugin's label (``"Room Size"`` -> ``"room_size"``)."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", label.strip())
    text = re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_").lower()
    if not text:
        text = "param"
    if text[0].isdigit():
        text = f"p_{text}"
    return text


def unique_ids(labels: Iterable[str]) -> list[str]:
    """snake ids for ``labels``, with ``_2``, ``_3`` ... appended to repeats."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for label in labels:
        base = snake_id(label)
        count = seen.get(base, 0) + 1
        seen[base] = count
        out.append(base if count == 1 else f"{base}_{count}")
    return out


def _num(x: float) -> str:
    return f"{x:g}"


def describe(specs: Mapping[str, ParameterSpec], values: Mapping[str, float]) -> list[dict[str, Any]]:
    """``parameter_info`` list for ``specs`` at ``values`` (built-in plugins)."""
    return [spec.info(values[pid]) for pid, spec in specs.items()]
