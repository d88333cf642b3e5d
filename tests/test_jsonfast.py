"""jsonfast.reusable: the same text as JSONEncoder.encode, the same refusals."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pluginlab.jsonfast import reusable

CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                             allow_nan=False)
WIRE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=str)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_same_text_as_encode(value: Any) -> None:
    for encoder in (CANONICAL, WIRE):
        assert reusable(encoder)(value) == encoder.encode(value)


@pytest.mark.parametrize("value", [
    {"b": 1, "a": [1.5, -0.0, 1e300, 10**40]},
    "a lone string with \"quotes\" and é",
    "\ud800",  # a lone surrogate is encoded (escaped or kept) exactly as encode does
    3.25,
    [],
])
def test_edge_values(value: Any) -> None:
    for encoder in (CANONICAL, WIRE):
        assert reusable(encoder)(value) == encoder.encode(value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [math.nan]}])
def test_non_finite_numbers_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        reusable(CANONICAL)(bad)


def test_circular_structures_raise_value_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError):
        reusable(CANONICAL)(loop)
    encode = reusable(CANONICAL)
    assert encode({"still": "works"}) == '{"still":"works"}'  # nothing left half-done


def test_default_hook_is_used_for_unknown_types() -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing"

    assert reusable(WIRE)({"t": Thing()}) == '{"t":"thing"}'
    with pytest.raises(TypeError):
        reusable(CANONICAL)({"t": Thing()})  # no default: refused like encode refuses it


def test_indented_encoders_are_left_alone() -> None:
    pretty = json.JSONEncoder(indent=2)
    assert reusable(pretty) == pretty.encode
