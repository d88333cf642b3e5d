"""pluginlab.parameters: ids from labels, validation (the one gate for values), display text."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pluginlab.effects import find
from pluginlab.errors import ErrorCode, InvalidParameter
from pluginlab.parameters import ParameterSpec, snake_id, unique_ids


def spec_of(plugin: str, pid: str) -> ParameterSpec:
    effect = find(plugin)
    assert effect is not None
    return next(p for p in effect.parameters if p.id == pid)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Room Size", "room_size"),
        ("HPF Freq", "hpf_freq"),
        ("3 Band", "p_3_band"),
        ("", "param"),
        ("   ", "param"),
        ("!!!", "param"),
        ("Wet/Dry", "wet_dry"),
        ("  Pre-Delay (ms) ", "pre_delay_ms"),
        ("roomSize", "room_size"),
        ("Gain", "gain"),
        ("Q", "q"),
    ],
)
def test_snake_id(label: str, expected: str):
    assert snake_id(label) == expected


def test_unique_ids_suffix_repeats():
    assert unique_ids(["Gain", "Gain", "gain", "Mix", "GAIN"]) == [
        "gain", "gain_2", "gain_3", "mix", "gain_4"]
    assert unique_ids([]) == []
    assert unique_ids(["", ""]) == ["param", "param_2"]


@pytest.mark.parametrize(
    ("plugin", "pid", "value", "text"),
    [
        ("Utility", "gain", -6.0, "-6.0 dB"),
        ("Utility", "gain", 0.0, "0.0 dB"),
        ("Delay", "time", 250.0, "250 ms"),
        ("Filter", "cutoff", 1000.0, "1000 Hz"),
        ("Filter", "type", 1.0, "highpass"),
        ("Filter", "type", 2.0, "bandpass"),
        ("Utility", "invert", 1.0, "on"),
        ("Utility", "invert", 0.0, "off"),
        ("Reverb", "room_size", 0.5, "0.50"),
    ],
)
def test_format(plugin: str, pid: str, value: float, text: str):
    assert spec_of(plugin, pid).format(value) == text


def test_format_kinds_without_metadata():
    assert ParameterSpec("n", "N", 0, 10, 0, step=1, kind="int").format(3.0) == "3"
    assert ParameterSpec("x", "X", 0, 1, 0).format(0.123456) == "0.12"
    assert ParameterSpec("x", "X", 0, 1, 0, step=0.001, unit="s").format(0.5) == "0.500 s"
    choice = ParameterSpec("c", "C", 0, 2, 0, step=1, choices=("a", "b", "c"), kind="choice")
    assert choice.format(7.0) == "7"  # never an IndexError for a stray value


def test_validate_accepts_the_whole_range():
    spec = spec_of("Utility", "gain")
    assert (spec.min, spec.max) == (-60.0, 24.0)
    assert spec.validate(-60) == -60.0
    assert spec.validate(24.0) == 24.0
    assert spec.validate(np.float32(-6.5)) == -6.5
    assert spec.validate(np.int16(3)) == 3.0
    assert isinstance(spec.validate(1), float)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-60.01, "out of range [-60, 24]"),
        (24.5, "out of range [-60, 24]"),
        (1e308, "out of range [-60, 24]"),
        (math.nan, "finite number in [-60, 24]"),
        (math.inf, "finite number in [-60, 24]"),
        (-math.inf, "finite number in [-60, 24]"),
        (True, "got a boolean"),
        (np.bool_(False), "got bool"),
        ("6", "got str"),
        (None, "got NoneType"),
        ({"v": 1}, "got dict"),
    ],
)
def test_validate_refuses(value: object, fragment: str):
    spec = spec_of("Utility", "gain")
    with pytest.raises(InvalidParameter) as info:
        spec.validate(value)
    err = info.value
    assert fragment in err.details["validation_error"]
    assert "[-60, 24]" in err.details["validation_error"]
    assert err.code is ErrorCode.INVALID_PARAMETER
    assert err.details["parameter_id"] == "gain"
    assert isinstance(err, ValueError)


def test_non_finite_values_are_json_safe_in_details():
    with pytest.raises(InvalidParameter) as info:
        spec_of("Utility", "gain").validate(math.nan)
    assert info.value.details["parameter_value"] == "nan"


def test_choice_bool_and_int_kinds():
    kind = spec_of("Filter", "type")
    assert kind.kind == "choice" and kind.choices == ("lowpass", "highpass", "bandpass")
    assert kind.validate("bandpass") == 2.0
    assert kind.validate(1) == 1.0
    for bad, fragment in (("notch", "valid: lowpass, highpass, bandpass"),
                          (1.5, "whole number"), (3, "out of range")):
        with pytest.raises(InvalidParameter, match=fragment):
            kind.validate(bad)
    invert = spec_of("Utility", "invert")
    assert invert.kind == "bool"
    assert (invert.validate(True), invert.validate(False), invert.validate(1)) == (1.0, 0.0, 1.0)
    with pytest.raises(InvalidParameter, match="whole number"):
        invert.validate(0.5)
    with pytest.raises(InvalidParameter, match="got str"):
        invert.validate("on")


def test_info_entry():
    entry = spec_of("Filter", "type").info(1.0)
    assert entry == {
        "id": "type", "name": "Type", "min": 0.0, "max": 2.0, "default": 0.0, "value": 1.0,
        "unit": "", "text": "highpass", "kind": "choice", "step": 1.0,
        "choices": ["lowpass", "highpass", "bandpass"],
    }
    gain = spec_of("Utility", "gain").info(-6.0, text="custom")
    assert gain["text"] == "custom" and gain["unit"] == "dB" and "choices" not in gain


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_validate_never_clamps(value: float):
    spec = spec_of("Reverb", "wet_dry")
    if math.isfinite(value) and 0.0 <= value <= 1.0:
        assert spec.validate(value) == value
    else:
        with pytest.raises(InvalidParameter):
            spec.validate(value)
