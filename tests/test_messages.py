"""The wire parser (:func:`pluginlab.messages.parse`) and envelopes, without any server.

``parse`` is the only gate between a client's bytes and the core: whatever it is given, it
returns a valid :class:`Request` or raises ``InvalidMessage`` / ``UnknownMessageType``. The
Hypothesis tests at the end throw random JSON, random field types, huge numbers, deep nesting
and random unicode at it and check exactly that.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pluginlab.errors import ErrorCode, InvalidMessage, UnknownMessageType
from pluginlab.messages import (
    ALIASES,
    LEGACY_TYPES,
    REQUEST_TYPES,
    dumps,
    envelope,
    now_iso,
    parse,
)

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEGACY_ID = re.compile(r"^legacy_\d+_[0-9a-f]+$")
PARAMETER_FRAME = ('{"type": "PLUGIN_PARAMETER", "data": {"track_id": "t", "plugin_id": "p", '
                   '"parameter_id": "x", "parameter_value": VALUE}}')


def msg(msg_type: Any, data: Any = None, **envelope_fields: Any) -> str:
    body: dict[str, Any] = {"type": msg_type}
    if data is not None:
        body["data"] = data
    body.update(envelope_fields)
    return json.dumps(body)


def expect_invalid(frame: str | bytes) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        parse(frame)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    return info.value


# -- the user's legacy formats -------------------------------------------------------------

def test_legacy_add_plugin_camel_case_fields_are_normalized() -> None:
    req = parse(msg("ADD_PLUGIN", {"trackId": "track_123", "pluginName": "Reverb",
                                   "pluginPath": "/path/to/reverb.vst3"}))
    assert req.type == "ADD_PLUGIN" and req.legacy
    assert req.data == {"track_id": "track_123", "name": "Reverb",
                        "plugin_path": "/path/to/reverb.vst3"}
    assert LEGACY_ID.match(req.id)


def test_legacy_add_plugin_name_and_path_variant() -> None:
    req = parse(msg("ADD_PLUGIN", {"trackId": "t", "name": "Reverb", "path": "/x/r.vst3"}))
    assert req.data == {"track_id": "t", "name": "Reverb", "plugin_path": "/x/r.vst3"}


def test_legacy_update_parameter_value_and_parameter_value() -> None:
    req = parse(msg("UPDATE_PARAMETER", {"pluginId": "p1", "parameterId": "wet_dry",
                                         "value": 0.7}))
    assert req.type == "UPDATE_PARAMETER" and req.legacy
    assert req.data["plugin_id"] == "p1" and req.data["parameter_id"] == "wet_dry"
    assert req.data["parameter_value"] == 0.7
    req = parse(msg("UPDATE_PARAMETER", {"pluginId": "p1", "parameterId": "wet_dry",
                                         "parameterValue": 0.2}))
    assert req.data["parameter_value"] == 0.2
    err = expect_invalid(msg("UPDATE_PARAMETER", {"pluginId": "p1", "parameterId": "wet_dry"}))
    assert err.details == {"field": "parameter_value", "reason": "required field missing"}


def test_snake_case_wins_over_camel_case_when_both_are_given() -> None:
    req = parse(msg("PLUGIN_PARAMETER", {"track_id": "a", "trackId": "b", "plugin_id": "p",
                                         "parameter_id": "x", "parameter_value": 1}))
    assert req.data["track_id"] == "a"


def test_bypassed_alias_is_accepted() -> None:
    req = parse(msg("PLUGIN_BYPASS", {"track_id": "t", "plugin_id": "p", "bypassed": True}))
    assert req.data["bypass"] is True


# -- types, aliases, ids -------------------------------------------------------------------

@pytest.mark.parametrize("alias, canonical", sorted(ALIASES.items()))
def test_dotted_aliases_map_to_canonical_types(alias: str, canonical: str) -> None:
    data = {"track_id": "t", "plugin_id": "p", "name": "Reverb", "parameter_id": "x",
            "parameter_value": 0.5, "parameters": {"x": 1}, "bypass": False}
    req = parse(msg(alias, data, id="r1"))
    assert req.type == canonical and req.raw_type == alias and req.id == "r1"


def test_every_request_type_parses_with_minimal_data() -> None:
    minimal = {
        "AUTH": {}, "PING": {}, "SESSION_STATE_GET": {}, "USER_CURSOR_UPDATE": {},
        "PLUGIN_ADD": {"track_id": "t", "name": "Reverb"},
        "PLUGIN_REMOVE": {"track_id": "t", "plugin_id": "p"},
        "PLUGIN_PARAMETER": {"track_id": "t", "plugin_id": "p", "parameter_id": "x",
                             "parameter_value": 1},
        "PLUGIN_PARAMETER_BATCH": {"track_id": "t", "plugin_id": "p", "parameters": []},
        "PLUGIN_BYPASS": {"track_id": "t", "plugin_id": "p", "bypass": True},
        "PLUGIN_PRESET": {"track_id": "t", "plugin_id": "p"},
        "PLUGIN_PARAMETERS_GET": {"track_id": "t", "plugin_id": "p"},
        "ADD_PLUGIN": {"trackId": "t", "pluginName": "Reverb"},
        "UPDATE_PARAMETER": {"pluginId": "p", "parameterId": "x", "value": 1},
    }
    assert set(minimal) == set(REQUEST_TYPES)
    for msg_type, data in minimal.items():
        req = parse(msg(msg_type, data, id="x"))
        assert req.type == msg_type
        assert req.legacy == (msg_type in LEGACY_TYPES)


def test_missing_or_empty_id_gets_a_legacy_id_and_integer_ids_become_strings() -> None:
    assert LEGACY_ID.match(parse(msg("PING")).id)
    assert LEGACY_ID.match(parse(msg("PING", id="")).id)
    assert LEGACY_ID.match(parse(msg("PING", id=None)).id)
    assert parse(msg("PING", id=42)).id == "42"
    a, b = parse(msg("PING")).id, parse(msg("PING")).id
    assert a != b


@pytest.mark.parametrize("bad_id", [True, False, 1.5, [], {}, ["x"]])
def test_ids_of_other_types_are_invalid(bad_id: Any) -> None:
    assert expect_invalid(msg("PING", id=bad_id)).details["field"] == "id"


def test_data_missing_or_null_is_empty_and_other_data_is_invalid() -> None:
    assert parse('{"type": "PING"}').data == {}
    assert parse('{"type": "PING", "data": null}').data == {}
    for bad in ("[]", '"x"', "1", "true"):
        err = expect_invalid('{"type": "PING", "data": ' + bad + "}")
        assert err.details == {"field": "data", "reason": "must be an object"}


def test_client_user_and_session_in_the_envelope_do_not_reach_the_request() -> None:
    req = parse(msg("PING", user_id="mallory", session_id="other"))
    assert not hasattr(req, "user_id") and not hasattr(req, "session_id")


# -- invalid frames ------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    "", "not json", "{", '{"type": "PING"', "[1, 2", "\x00", b"\xff\xfe\xfa",
])
def test_not_json_is_invalid(frame: str | bytes) -> None:
    assert "not valid JSON" in expect_invalid(frame).details["reason"]


@pytest.mark.parametrize("frame", [
    '{"type": "PING"} x', '{"type": "PING"}{"type": "PING"}', '{"type": "PING"},',
    '{"type": "PING", }', '{"type" "PING"}',
])
def test_an_object_followed_or_broken_by_more_text_is_invalid(frame: str) -> None:
    """Objects are scanned without decode()'s wrapper first; whatever that scan leaves over
    must still make the frame invalid, with the same message decode() gives."""
    try:
        json.loads(frame)
    except ValueError as exc:
        expected = str(exc)
    reason = expect_invalid(frame).details["reason"]
    assert reason == f"not valid JSON: {expected}"


@pytest.mark.parametrize("frame", ['  {"type": "PING"}', '{"type": "PING"}\n', '\t{"type":"PING"} '])
def test_whitespace_around_an_object_is_fine(frame: str) -> None:
    assert parse(frame).type == "PING"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_tokens_are_invalid_json(token: str) -> None:
    frame = PARAMETER_FRAME.replace("VALUE", token)
    assert "not valid JSON" in expect_invalid(frame).details["reason"]


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 330])
def test_numbers_beyond_double_range_are_invalid(number: str) -> None:
    frame = PARAMETER_FRAME.replace("VALUE", number)
    assert "out of range" in expect_invalid(frame).details["reason"]


def test_large_but_finite_numbers_parse() -> None:
    frame = ('{"type": "PLUGIN_PARAMETER", "data": {"track_id": "t", "plugin_id": "p", '
             '"parameter_id": "x", "parameter_value": 1e308}}')
    assert parse(frame).data["parameter_value"] == 1e308
    big = "9" * 300
    req = parse(frame.replace("1e308", big))
    assert req.data["parameter_value"] == int(big)


@pytest.mark.parametrize("body", ["[]", "1", '"PING"', "null", "true", "[{\"type\": \"PING\"}]"])
def test_a_message_must_be_an_object(body: str) -> None:
    assert expect_invalid(body).details == {"reason": "a message must be a JSON object"}


@pytest.mark.parametrize("type_value", [None, "", 1, True, [], {}, ["PING"]])
def test_type_must_be_a_non_empty_string(type_value: Any) -> None:
    assert expect_invalid(msg(type_value)).details["field"] == "type"
    assert expect_invalid('{"data": {}}').details["field"] == "type"


@pytest.mark.parametrize("type_value", ["FOO", "ping", "plugin.unknown", "PLUGIN_ADDED",
                                        "AUTH_SUCCESS", "ERROR", "PONG", "\u00e9\U0001f3b5"])
def test_unknown_types(type_value: str) -> None:
    with pytest.raises(UnknownMessageType) as info:
        parse(msg(type_value))
    assert info.value.code is ErrorCode.UNKNOWN_MESSAGE_TYPE
    assert info.value.details == {"type": type_value}


@pytest.mark.parametrize("msg_type, data, field", [
    ("PLUGIN_ADD", {"name": "Reverb"}, "track_id"),
    ("PLUGIN_ADD", {"track_id": "t"}, "name"),
    ("PLUGIN_ADD", {"track_id": 5, "name": "Reverb"}, "track_id"),
    ("PLUGIN_ADD", {"track_id": "t", "name": ["Reverb"]}, "name"),
    ("PLUGIN_ADD", {"track_id": "t", "name": "Reverb", "plugin_path": 3}, "plugin_path"),
    ("PLUGIN_ADD", {"track_id": "t", "name": "Reverb", "plugin_id": 7}, "plugin_id"),
    ("PLUGIN_ADD", {"track_id": "t", "name": "Reverb", "index": "0"}, "index"),
    ("PLUGIN_ADD", {"track_id": "t", "name": "Reverb", "index": True}, "index"),
    ("PLUGIN_ADD", {"track_id": "t", "name": "Reverb", "index": 10 ** 30}, "index"),
    ("PLUGIN_REMOVE", {"track_id": "t"}, "plugin_id"),
    ("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": "p", "parameter_value": 1},
     "parameter_id"),
    ("PLUGIN_PARAMETER", {"track_id": "t", "plugin_id": "p", "parameter_id": "x"},
     "parameter_value"),
    ("PLUGIN_PARAMETER", {"track_id": None, "plugin_id": "p", "parameter_id": "x",
                          "parameter_value": 1}, "track_id"),
    ("PLUGIN_PARAMETER_BATCH", {"track_id": "t", "plugin_id": "p"}, "parameters"),
    ("PLUGIN_PARAMETER_BATCH", {"track_id": "t", "plugin_id": "p", "parameters": "x=1"},
     "parameters"),
    ("PLUGIN_BYPASS", {"track_id": "t", "plugin_id": "p"}, "bypass"),
    ("PLUGIN_BYPASS", {"track_id": "t", "plugin_id": "p", "bypass": "true"}, "bypass"),
    ("PLUGIN_BYPASS", {"track_id": "t", "plugin_id": "p", "bypass": 1}, "bypass"),
    ("PLUGIN_PRESET", {"track_id": "t", "plugin_id": "p", "action": 1}, "action"),
    ("PLUGIN_PRESET", {"track_id": "t", "plugin_id": "p", "preset_data": [1]}, "preset_data"),
    ("PLUGIN_PARAMETERS_GET", {"plugin_id": "p"}, "track_id"),
    ("USER_CURSOR_UPDATE", {"position": [1, 2]}, "position"),
    ("AUTH", {"token": 123}, "token"),
    ("AUTH", {"token": "x", "session_id": 5}, "session_id"),
    ("ADD_PLUGIN", {"trackId": "t"}, "name"),
    ("ADD_PLUGIN", {"pluginName": "Reverb"}, "track_id"),
    ("UPDATE_PARAMETER", {"parameterId": "x", "value": 1}, "plugin_id"),
    ("UPDATE_PARAMETER", {"pluginId": "p", "parameterId": "x", "value": 1, "trackId": [1]},
     "track_id"),
    ("ADD_PLUGIN", {"trackId": "t", "pluginName": "Reverb", "index": "first"}, "index"),
    ("ADD_PLUGIN", {"trackId": "t", "pluginName": "Reverb", "index": {}}, "index"),
    ("ADD_PLUGIN", {"trackId": "t", "pluginName": "Reverb", "pluginId": 3}, "plugin_id"),
])
def test_missing_and_ill_typed_fields(msg_type: str, data: dict[str, Any], field: str) -> None:
    err = expect_invalid(msg(msg_type, data))
    assert err.details["field"] == field
    assert isinstance(err.details["reason"], str) and err.details["reason"]


def test_deep_nesting_is_invalid_not_a_crash() -> None:
    deep = '{"type": "PING", "data": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    assert "nesting" in expect_invalid(deep).details["reason"]
    assert "nesting" in expect_invalid("[" * 200_000).details["reason"]


# -- envelopes -----------------------------------------------------------------------------

def test_envelope_reply_and_broadcast_shapes() -> None:
    reply = envelope("PONG", {"a": 1}, msg_id="r1", user_id="u", session_id="s")
    assert reply["id"] == "r1" and reply["type"] == "PONG" and reply["data"] == {"a": 1}
    assert reply["user_id"] == "u" and reply["session_id"] == "s"
    assert ISO_MS.match(reply["timestamp"])
    bcast = envelope("PLUGIN_STATE_UPDATE", {}, user_id="u", session_id="s")
    assert re.match(r"^bcast_[0-9a-f]{16}$", bcast["id"])
    assert envelope("X", {})["id"] != envelope("X", {})["id"]


def test_envelope_top_level_fields_never_overwrite_the_envelope() -> None:
    message = envelope("PLUGIN_ADDED", {"success": True}, msg_id="r", user_id="u",
                       top_level={"success": True, "pluginId": "p", "id": "evil",
                                  "type": "evil"})
    assert message["id"] == "r" and message["type"] == "PLUGIN_ADDED"
    assert message["success"] is True and message["pluginId"] == "p"


def test_now_iso_is_utc_with_milliseconds() -> None:
    assert ISO_MS.match(now_iso())


def test_dumps_is_compact_and_strict() -> None:
    assert dumps({"a": [1, 2]}) == '{"a":[1,2]}'
    with pytest.raises(ValueError):
        dumps({"a": math.nan})
    with pytest.raises(ValueError):
        dumps({"a": math.inf})


# -- fuzz ----------------------------------------------------------------------------------

FIELD_NAMES = sorted({
    "track_id", "plugin_id", "name", "plugin_path", "parameter_id", "parameter_value",
    "parameters", "bypass", "bypassed", "action", "preset_name", "preset_data", "token",
    "user_id", "session_id", "position", "index", "value", "trackId", "pluginId",
    "pluginName", "pluginPath", "parameterId", "parameterValue", "path", "presetName",
    "presetData", "userId", "sessionId",
})
TYPE_NAMES = sorted(REQUEST_TYPES | set(ALIASES) | {"PONG", "ERROR", "plugin.x", "", "ping"})

huge_numbers = st.sampled_from([1e308, -1e308, 1.7976931348623157e308, 5e-324, 2 ** 63,
                                -(2 ** 63), 10 ** 300, 2 ** 1023, 0, -0.0])
scalars = (st.none() | st.booleans() | st.integers() | huge_numbers
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
field_values = json_values | st.sampled_from(["t", "p", "wet_dry", "Reverb", "load", "list"])


@st.composite
def messages(draw: st.DrawFn) -> str:
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["type"] = draw(st.sampled_from(TYPE_NAMES) | json_values)
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=12) | json_values)
    if draw(st.integers(0, 9)):
        keys = draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=8, unique=True))
        body["data"] = {k: draw(field_values) for k in keys}
    else:
        body["data"] = draw(json_values)
    for extra in draw(st.lists(st.sampled_from(["user_id", "session_id", "timestamp"]),
                               max_size=3, unique=True)):
        body[extra] = draw(json_values)
    return json.dumps(body)


OUTCOMES = {"parsed", "INVALID_MESSAGE", "UNKNOWN_MESSAGE_TYPE"}


def outcome_of(frame: str | bytes) -> str:
    """"parsed" (a valid request: known type, an id, a data dict) or the documented error
    code; anything else (a crash, another exception) fails the test."""
    try:
        req = parse(frame)
    except (InvalidMessage, UnknownMessageType) as exc:
        payload = exc.to_payload()
        json.dumps(payload, allow_nan=False)  # always serializable on the wire
        return str(payload["code"])
    assert req.type in REQUEST_TYPES
    assert isinstance(req.id, str) and req.id
    assert isinstance(req.data, dict)
    return "parsed"


FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(messages())
def test_fuzz_structured_messages(frame: str) -> None:
    assert outcome_of(frame) in OUTCOMES


@FUZZ
@given(json_values)
def test_fuzz_any_json_value(value: Any) -> None:
    assert outcome_of(json.dumps(value)) in OUTCOMES


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_random_unicode_text(text: str) -> None:
    assert outcome_of(text) in OUTCOMES


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    assert outcome_of(data) in OUTCOMES


@FUZZ
@given(st.integers(1, 50_000), st.sampled_from(["[", "{\"a\":", "[{\"b\":["]))
def test_fuzz_deep_nesting(depth: int, opener: str) -> None:
    assert outcome_of('{"type":"PING","data":{"x":' + opener * depth + "}}") in OUTCOMES


@FUZZ
@given(st.sampled_from(sorted(REQUEST_TYPES | set(ALIASES))),
       st.sampled_from(FIELD_NAMES),
       st.sampled_from(["1e400", "-1e999", "1" + "0" * 320, "NaN", "Infinity", "-0",
                        "1e-400", "123456789012345678901234567890", "\"\\ud800\"",
                        "\"\\u0000\"", "[[[[]]]]", "{}", "true", "null"]))
def test_fuzz_raw_number_and_token_literals(msg_type: str, field: str, literal: str) -> None:
    assert outcome_of(
        f'{{"type": {json.dumps(msg_type)}, "data": {{"{field}": {literal}}}}}') in OUTCOMES


def _decode_outcome(decode: Any, text: str) -> tuple[str, Any]:
    try:
        return "ok", decode(text)
    except ValueError as exc:
        return "error", str(exc)
    except RecursionError:
        return "error", "nesting too deep"


@FUZZ
@given(st.one_of(json_values.map(json.dumps), messages(), st.text(max_size=200),
                 st.text(st.characters(categories=["Cs", "Ll"]), max_size=4)  # surrogates
                 .map(lambda t: json.dumps({"x": t, t: [t]})),
                 st.text(alphabet='{}[]":,0123456789.eE+- \ntruefalsnNI', max_size=60)
                 .map(lambda t: "{" + t)).filter(lambda t: not t.startswith("\ufeff")))
def test_the_object_fast_path_agrees_with_the_decoder(text: str) -> None:
    """loads_strict scans a frame that starts with '{' directly; the outcome (value, or the
    error message) must be what the strict decoder itself gives for every text (a leading BOM
    takes another, documented path)."""
    from pluginlab.messages import _DECODER, _check_unicode, loads_strict

    def reference(text: str) -> Any:
        value = _DECODER.decode(text)
        _check_unicode(value)
        return value

    assert _decode_outcome(loads_strict, text) == _decode_outcome(reference, text)


@pytest.mark.parametrize("frame", [
    '{"type": "PING", "data": {"x": "\\ud800"}}',
    '{"type": "PING", "data": {"\\uDFFF": 1}}',
    '{"type": "PING", "data": {"x": ["ok", {"y": "a\\udc00b"}]}}',
    b'{"type": "PING", "data": {"x": "\\ud800"}}',
])
def test_lone_surrogates_are_invalid_messages(frame: str | bytes) -> None:
    """Valid JSON, but not Unicode text: it could be neither stored nor sent on."""
    with pytest.raises(InvalidMessage, match="lone surrogate"):
        parse(frame)


def test_surrogate_pairs_and_other_escapes_are_text() -> None:
    request = parse('{"type": "PING", "data": {"x": "\\ud83c\\udfb9 \\u00e9"}}')
    assert request.data == {"x": "\U0001f3b9 \u00e9"}


def test_error_payloads_cut_echoed_text() -> None:
    """A 900 KB bogus type is not sent back whole (a client could make us queue megabytes)."""
    with pytest.raises(UnknownMessageType) as info:
        parse(json.dumps({"type": "X" * 900_000}))
    payload = info.value.to_payload()
    assert payload["details"]["type"].startswith("X" * 200)
    assert payload["details"]["type"].endswith("... (900000 characters)")
    assert len(payload["error"]) < 300
