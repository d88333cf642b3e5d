"""Error codes and exceptions: the single source of truth for every failure pluginlab reports.

Every exception raised on purpose by pluginlab is a :class:`PluginlabError` carrying an
:class:`ErrorCode` and a ``details`` dict shaped as ``PROTOCOL.md`` (section *Errors*) says.
The WebSocket transport serializes them with :meth:`PluginlabError.to_payload` (the only place
where the wire shape of an error is built); Python callers simply catch them. Each class also
derives from the matching builtin (``KeyError``, ``ValueError`` ...) so ordinary Python code that
catches those keeps working.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

__all__ = [
    "AuthFailed",
    "EngineError",
    "ErrorCode",
    "InternalError",
    "InvalidMessage",
    "InvalidParameter",
    "ParameterUpdateFailed",
    "PluginAddFailed",
    "PluginNotFound",
    "PluginlabError",
    "PresetLoadFailed",
    "RateLimited",
    "TrackNotFound",
    "Unauthorized",
    "UnknownMessageType",
]


class ErrorCode(str, Enum):
    """Wire error codes (``data.code`` of an ERROR message)."""

    AUTH_FAILED = "AUTH_FAILED"
    UNAUTHORIZED = "UNAUTHORIZED"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
    TRACK_NOT_FOUND = "TRACK_NOT_FOUND"
    PLUGIN_NOT_FOUND = "PLUGIN_NOT_FOUND"
    INVALID_PARAMETER = "INVALID_PARAMETER"
    PLUGIN_ADD_FAILED = "PLUGIN_ADD_FAILED"
    PARAMETER_UPDATE_FAILED = "PARAMETER_UPDATE_FAILED"
    PRESET_LOAD_FAILED = "PRESET_LOAD_FAILED"
    RATE_LIMITED = "RATE_LIMITED"
    ENGINE_ERROR = "ENGINE_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class PluginlabError(Exception):
    """Base class: a human message, a code and protocol-shaped details."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message

    def to_payload(self) -> dict[str, Any]:
        """The ``data`` object of an ERROR message: ``{error, code, details}``. Text echoed
        from the request is cut to ``ECHO_LIMIT`` characters (a 900 KB bogus ``type`` does
        not come back as a 900 KB error)."""
        details = self.details
        if details:
            details = {k: _cut(v) for k, v in details.items()}
        return {"error": _cut(self.message), "code": self.code.value, "details": details}


ECHO_LIMIT = 200  # characters of request text echoed in an ERROR


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > ECHO_LIMIT:
        return value[:ECHO_LIMIT] + f"... ({len(value)} characters)"
    return value


class AuthFailed(PluginlabError):
    code = ErrorCode.AUTH_FAILED

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(f"authentication failed: {reason}", {"reason": reason, **extra})


class Unauthorized(PluginlabError, PermissionError):
    code = ErrorCode.UNAUTHORIZED


class InvalidMessage(PluginlabError, ValueError):
    code = ErrorCode.INVALID_MESSAGE

    def __init__(self, reason: str, field: str | None = None) -> None:
        details: dict[str, Any] = {"reason": reason}
        if field is not None:
            details["field"] = field
        text = f"invalid message: {field}: {reason}" if field else f"invalid message: {reason}"
        super().__init__(text, details)


class UnknownMessageType(PluginlabError, ValueError):
    code = ErrorCode.UNKNOWN_MESSAGE_TYPE

    def __init__(self, type_: object) -> None:
        super().__init__(f"unknown message type: {type_!r}", {"type": type_})


class TrackNotFound(PluginlabError, KeyError):
    code = ErrorCode.TRACK_NOT_FOUND

    def __init__(self, track_id: str, known: list[str] | None = None) -> None:
        hint = f" (tracks: {', '.join(known)})" if known else ""
        super().__init__(f"track not found: {track_id!r}{hint}", {"track_id": track_id})


class PluginNotFound(PluginlabError, KeyError):
    code = ErrorCode.PLUGIN_NOT_FOUND

    def __init__(self, plugin_id: str, track_id: str | None = None) -> None:
        where = f" on track {track_id!r}" if track_id else ""
        super().__init__(
            f"plugin not found: {plugin_id!r}{where}",
            {"plugin_id": plugin_id, "track_id": track_id},
        )


class InvalidParameter(PluginlabError, ValueError):
    code = ErrorCode.INVALID_PARAMETER

    def __init__(self, parameter_id: str, value: Any, validation_error: str) -> None:
        super().__init__(
            f"invalid parameter {parameter_id!r}={value!r}: {validation_error}",
            {
                "parameter_id": parameter_id,
                "parameter_value": _json_safe(value),
                "validation_error": validation_error,
            },
        )


class PluginAddFailed(PluginlabError, ValueError):
    code = ErrorCode.PLUGIN_ADD_FAILED

    def __init__(self, name: str, plugin_path: str | None, reason: str) -> None:
        super().__init__(
            f"cannot add plugin {name!r}" + (f" from {plugin_path}" if plugin_path else "")
            + f": {reason}",
            {"name": name, "plugin_path": plugin_path, "reason": reason},
        )


class ParameterUpdateFailed(PluginlabError, RuntimeError):
    code = ErrorCode.PARAMETER_UPDATE_FAILED

    def __init__(self, plugin_id: str, parameter_id: str, reason: str) -> None:
        super().__init__(
            f"engine refused {plugin_id}.{parameter_id}: {reason}",
            {"plugin_id": plugin_id, "parameter_id": parameter_id},
        )


class PresetLoadFailed(PluginlabError, ValueError):
    code = ErrorCode.PRESET_LOAD_FAILED

    def __init__(self, plugin_id: str, preset_error: str) -> None:
        super().__init__(
            f"preset error on {plugin_id!r}: {preset_error}",
            {"plugin_id": plugin_id, "preset_error": preset_error},
        )


class RateLimited(PluginlabError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, limit: str, retry_after: float) -> None:
        super().__init__(
            f"rate limited ({limit}); retry after {retry_after:.3f} s",
            {"retry_after": round(retry_after, 3), "limit": limit},
        )


class EngineError(PluginlabError, RuntimeError):
    code = ErrorCode.ENGINE_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message, {})


class InternalError(PluginlabError, RuntimeError):
    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message, {})


def _json_safe(value: Any) -> Any:
    """Values echoed in details must survive strict JSON (no NaN/Infinity tokens)."""
    if isinstance(value, float) and math.isnan(value) or value in (float("inf"), float("-inf")):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
