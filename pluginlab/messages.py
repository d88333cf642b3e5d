"""Wire messages: strict parsing (incl. legacy format and dotted aliases) and envelopes.

:func:`parse` turns one text frame into a frozen :class:`Request` whose ``type`` is canonical
(UPPER_SNAKE, legacy types kept as they are) and whose ``data`` uses snake_case field names.
Anything that is not valid raises :class:`~pluginlab.errors.InvalidMessage` or
:class:`~pluginlab.errors.UnknownMessageType`, so an invalid message cannot exist past here.
:func:`envelope` builds every server message (one place for ids and timestamps).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from .errors import InvalidMessage, UnknownMessageType
from .jsonfast import reusable

__all__ = [
    "ALIASES",
    "HANDSHAKE_ID",
    "LEGACY_TYPES",
    "MAX_ID",
    "REQUEST_TYPES",
    "Request",
    "decode_strict",
    "dumps",
    "dumps_ascii",
    "envelope",
    "legacy_added",
    "legacy_broadcasts",
    "legacy_updated",
    "now_iso",
    "parse",
]

HANDSHAKE_ID = "handshake"  # the id of AUTH_SUCCESS (or ERROR) for a token given at the handshake

ALIASES = {
    "plugin.add": "PLUGIN_ADD",
    "plugin.remove": "PLUGIN_REMOVE",
    "plugin.parameter": "PLUGIN_PARAMETER",
    "plugin.parameter.batch": "PLUGIN_PARAMETER_BATCH",
    "plugin.parameters.get": "PLUGIN_PARAMETERS_GET",
    "plugin.bypass": "PLUGIN_BYPASS",
    "plugin.preset": "PLUGIN_PRESET",
    "heartbeat": "PING",
}
LEGACY_TYPES = frozenset({"ADD_PLUGIN", "UPDATE_PARAMETER"})
REQUEST_TYPES = frozenset({
    "AUTH", "PLUGIN_ADD", "PLUGIN_REMOVE", "PLUGIN_PARAMETER", "PLUGIN_PARAMETER_BATCH",
    "PLUGIN_BYPASS", "PLUGIN_PRESET", "PLUGIN_PARAMETERS_GET", "SESSION_STATE_GET",
    "USER_CURSOR_UPDATE", "PING",
}) | LEGACY_TYPES

LEGACY_FIELDS = {
    "trackId": "track_id",
    "pluginId": "plugin_id",
    "pluginName": "name",
    "pluginPath": "plugin_path",
    "parameterId": "parameter_id",
    "parameterValue": "parameter_value",
    "bypassed": "bypass",
    "path": "plugin_path",
    "presetName": "preset_name",
    "presetData": "preset_data",
    "userId": "user_id",
    "sessionId": "session_id",
}

_STR = (str,)
MAX_PRESET_NAME = 200  # characters
MAX_ID = 128  # characters of a track, plugin, parameter or session id (and a plugin's name)
MAX_PATH = 4096  # characters of a plugin_path (PATH_MAX)
MAX_CURSOR_POSITION = 1024  # bytes of a cursor's position as JSON (it is relayed to everyone)
# Ids are copied into every reply, broadcast, snapshot, DAID and index: unbounded ones let one
# member make a session's snapshot too big for anyone to join.
_BOUNDED = {"track_id": MAX_ID, "plugin_id": MAX_ID, "parameter_id": MAX_ID,
            "session_id": MAX_ID, "user_id": MAX_ID, "name": MAX_ID,
            "plugin_path": MAX_PATH, "preset_name": MAX_PRESET_NAME}
_MAX_INDEX = 2**31 - 1  # a chain position; larger ints cannot index a list
# type -> {field: (allowed python types, required)}; values are checked, not coerced.
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "AUTH": {"token": ((str, type(None)), False), "user_id": ((str, type(None)), False),
             "session_id": ((str, type(None)), False)},
    "PLUGIN_ADD": {"track_id": (_STR, True), "name": (_STR, True),
                   "plugin_path": ((str, type(None)), False),
                   "plugin_id": ((str, type(None)), False), "index": ((int,), False)},
    "PLUGIN_REMOVE": {"track_id": (_STR, True), "plugin_id": (_STR, True)},
    "PLUGIN_PARAMETER": {"track_id": (_STR, True), "plugin_id": (_STR, True),
                         "parameter_id": (_STR, True)},
    "PLUGIN_PARAMETER_BATCH": {"track_id": (_STR, True), "plugin_id": (_STR, True),
                               "parameters": ((dict, list), True)},
    "PLUGIN_BYPASS": {"track_id": (_STR, True), "plugin_id": (_STR, True),
                      "bypass": ((bool,), True)},
    "PLUGIN_PRESET": {"track_id": (_STR, True), "plugin_id": (_STR, True),
                      "action": (_STR, False), "preset_name": ((str, type(None)), False),
                      "preset_data": ((dict, type(None)), False)},
    "PLUGIN_PARAMETERS_GET": {"track_id": (_STR, True), "plugin_id": (_STR, True)},
    "SESSION_STATE_GET": {},
    "USER_CURSOR_UPDATE": {"track_id": ((str, type(None)), False),
                           "plugin_id": ((str, type(None)), False),
                           "parameter_id": ((str, type(None)), False),
                           "position": ((dict, type(None)), False)},
    "PING": {},
    "ADD_PLUGIN": {"track_id": (_STR, True), "name": (_STR, True),
                   "plugin_path": ((str, type(None)), False),
                   "plugin_id": ((str, type(None)), False), "index": ((int,), False)},
    "UPDATE_PARAMETER": {"plugin_id": (_STR, True), "parameter_id": (_STR, True),
                         "track_id": ((str, type(None)), False)},
}


class Request(NamedTuple):
    """A validated client message. ``id`` is the client's or an assigned ``legacy_...`` one."""

    id: str
    type: str
    data: dict[str, Any]
    raw_type: str
    legacy: bool = False


_this_second: tuple[int, str] = (-1, "")  # (unix second, its "YYYY-MM-DDTHH:MM:SS")


def now_iso() -> str:
    """UTC ISO-8601 with milliseconds and ``Z``, as ``datetime.now(timezone.utc)`` gives it;
    the date-and-seconds part is formatted once per second (every message has a timestamp)."""
    global _this_second
    second, millis = divmod(time.time_ns() // 1_000_000, 1000)
    cached = _this_second
    if cached[0] != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
        cached = _this_second = (second, text.removesuffix("+00:00"))
    return f"{cached[1]}.{millis:03d}Z"


def _legacy_id() -> str:
    return f"legacy_{int(time.time() * 1000)}_{secrets.token_hex(5)}"


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _finite_float(token: str) -> float:
    value = float(token)
    if math.isinf(value):  # e.g. 1e400: valid JSON syntax, but no finite double
        raise ValueError(f"number out of range: {token[:40]}")
    return value


def _bounded_int(token: str) -> int:
    value = int(token)
    if len(token) > 300:  # cheap pre-check; only then test whether it fits a double
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"number out of range: {token[:40]}...") from None
    return value


class _StrictDecoder(json.JSONDecoder):
    """``json.JSONDecoder`` with the strict constant and number hooks above."""

    def __init__(self) -> None:
        super().__init__(parse_constant=_reject_constant, parse_float=_finite_float,
                         parse_int=_bounded_int)


_DECODER = _StrictDecoder()  # json.loads with hooks would build a decoder for every frame
_SCAN = cast(Any, _DECODER).scan_once  # the C scanner, without decode()'s whitespace regexes


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses NaN/Infinity tokens, numbers beyond the range of a double
    (they would become infinite) and lone surrogates (``"\\ud800"``: valid JSON, but no
    Unicode text, so it could be neither stored nor sent on), and reports depth overflow as
    ValueError."""
    value = decode_strict(text)
    if isinstance(text, bytes):  # rare (binary frames): decoded only when it may matter
        text = text.decode("utf-8", "replace") if b"\\u" in text else ""
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):  # the common frame: one substring test
        _check_unicode(value)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(value: Any) -> None:
    """ValueError if a string (or key) anywhere in ``value`` holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"lone surrogate in {item[:40]!r} is not Unicode text") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def decode_strict(text: str | bytes) -> Any:
    """:func:`loads_strict` without the Unicode check (strict JSON syntax and numbers)."""
    try:
        if isinstance(text, str) and not text.startswith("\ufeff"):
            if text[:1] == "{":  # the usual frame: one object, no surrounding whitespace
                try:
                    value, end = _SCAN(text, 0)
                    if end == len(text):
                        return value
                except (StopIteration, ValueError):
                    pass  # decode() below gives the error its usual message
            return _DECODER.decode(text)
        return json.loads(text, cls=_StrictDecoder)  # bytes (encoding detection), BOM error
    except RecursionError:
        raise ValueError("nesting too deep") from None


def parse(frame: str | bytes) -> Request:
    """Validate one frame into a :class:`Request` (see module docstring)."""
    try:
        body = loads_strict(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidMessage("a message must be a JSON object")
    raw_type = body.get("type")
    if not isinstance(raw_type, str) or not raw_type:
        raise InvalidMessage("missing or not a string", "type")
    msg_type = ALIASES.get(raw_type, raw_type)
    if msg_type not in REQUEST_TYPES:
        raise UnknownMessageType(raw_type)
    msg_id = body.get("id")
    if msg_id is not None and not isinstance(msg_id, (str, int)) or isinstance(msg_id, bool):
        raise InvalidMessage("must be a string", "id")
    legacy = msg_type in LEGACY_TYPES
    data = body.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidMessage("must be an object", "data")
    data = _normalize(msg_type, data)
    _check_fields(msg_type, data)
    return Request(
        id=str(msg_id) if msg_id not in (None, "") else _legacy_id(),
        type=msg_type,
        data=data,
        raw_type=raw_type,
        legacy=legacy,
    )


def _normalize(msg_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """camelCase -> snake_case (legacy field map) and the legacy ``value`` field. ``data`` is
    the frame's own freshly parsed dict, so it is returned as it is when nothing needs renaming.
    """
    if data.keys().isdisjoint(LEGACY_FIELDS):
        out = data
    else:
        out = {k: v for k, v in data.items() if k not in LEGACY_FIELDS}
        for old, new in LEGACY_FIELDS.items():
            if old in data and new not in out:
                out[new] = data[old]
    if msg_type == "UPDATE_PARAMETER" and "parameter_value" not in out and "value" in out:
        out["parameter_value"] = out["value"]
    if msg_type == "PLUGIN_BYPASS" and "bypassed" in data and "bypass" not in data:
        out["bypass"] = data["bypassed"]
    return out


def _check_fields(msg_type: str, data: dict[str, Any]) -> None:
    for name, (types, required) in _FIELDS[msg_type].items():
        if name not in data:
            if required:
                raise InvalidMessage("required field missing", name)
            continue
        value = data[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = "/".join(t.__name__ for t in types if t is not type(None))
            raise InvalidMessage(f"expected {expected}, got {type(value).__name__}", name)
        if isinstance(value, str) and len(value) > _BOUNDED.get(name, len(value)):
            raise InvalidMessage(f"longer than {_BOUNDED[name]} characters", name)
        if name == "track_id" and not value and msg_type != "UPDATE_PARAMETER":
            raise InvalidMessage("must not be empty", name)  # (legacy: "" = find by plugin)
        if name == "index" and isinstance(value, int) and not -_MAX_INDEX <= value <= _MAX_INDEX:
            raise InvalidMessage(f"out of range [-{_MAX_INDEX}, {_MAX_INDEX}]", name)
    if msg_type in ("PLUGIN_PARAMETER", "UPDATE_PARAMETER") and "parameter_value" not in data:
        raise InvalidMessage("required field missing", "parameter_value")
    if msg_type == "USER_CURSOR_UPDATE" and data.get("position") is not None \
            and len(dumps(data["position"]).encode()) > MAX_CURSOR_POSITION:
        raise InvalidMessage(f"larger than {MAX_CURSOR_POSITION} bytes as JSON", "position")


def legacy_added(data: dict[str, Any]) -> dict[str, Any]:
    """The old system's PLUGIN_ADDED data for a PLUGIN_ADD reply or broadcast ``data``."""
    return {"success": True, "pluginId": data["plugin_id"], **data,
            "plugin": {"id": data["plugin_id"], "name": data["name"],
                       "trackId": data["track_id"], "parameters": data["parameters"]}}


def legacy_updated(data: dict[str, Any]) -> dict[str, Any]:
    """The old system's PARAMETER_UPDATED data for one parameter change ``data``
    (``plugin_id``, ``parameter_id``, ``parameter_value``, ...)."""
    return {"success": True, "pluginId": data["plugin_id"], "parameterId": data["parameter_id"],
            "value": data["parameter_value"], **data}


def legacy_broadcasts(msg_type: str, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """What an old client understands of a broadcast: PLUGIN_ADDED for an add and one
    PARAMETER_UPDATED per parameter a change, batch or preset load set; nothing for the rest
    (old clients only know these two, and ignore other types)."""
    if msg_type == "PLUGIN_ADD":
        return [("PLUGIN_ADDED", legacy_added(data))]
    if msg_type == "PLUGIN_PARAMETER":
        return [("PARAMETER_UPDATED", legacy_updated(data))]
    if msg_type in ("PLUGIN_PARAMETER_BATCH", "PLUGIN_PRESET") and data.get("parameters"):
        base = {k: v for k, v in data.items() if k != "parameters"}
        return [("PARAMETER_UPDATED", legacy_updated(
                    {**base, "parameter_id": pid, "parameter_value": value}))
                for pid, value in data["parameters"].items()]
    return []


def envelope(
    msg_type: str,
    data: dict[str, Any],
    *,
    msg_id: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    top_level: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A server message. ``msg_id`` None -> a fresh ``bcast_`` id (broadcasts)."""
    message: dict[str, Any] = {
        "id": msg_id if msg_id is not None else f"bcast_{secrets.token_hex(8)}",
        "type": msg_type,
        "data": data,
        "user_id": user_id,
        "session_id": session_id,
        "timestamp": now_iso(),
    }
    if top_level:
        for key, value in top_level.items():
            message.setdefault(key, value)
    return message


_ENCODE = reusable(json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=str,
                                    ensure_ascii=False))
_ENCODE_ASCII = reusable(json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=str))


def dumps(message: dict[str, Any]) -> str:
    """Compact strict JSON (never emits NaN/Infinity). Non-ASCII text stays text (a frame's
    UTF-8 is then about as long as what the client sent, not up to 6x longer as ``\\uXXXX``
    escapes); a lone surrogate stays in the string (see ``server._text_frame``)."""
    return _ENCODE(message)


def dumps_ascii(message: dict[str, Any]) -> str:
    """:func:`dumps` with every non-ASCII character escaped, so a lone surrogate reaches
    :func:`parse` as the escape it refuses."""
    return _ENCODE_ASCII(message)
