"""``JSONEncoder.encode`` without its per-call setup.

CPython's ``JSONEncoder.encode`` builds a new C encoder object on every call, which costs
about as much as encoding a small message. The server encodes at least two small objects per
request (the change's canonical details and the reply), so :func:`reusable` builds the C
encoder once. The output is identical to ``encoder.encode`` (checked at import time on a
sample; anything unexpected falls back to ``encoder.encode``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

_SAMPLE: Any = {"b": [1, 2.5, -0.0, 1e300, None, True, "é\"\\\n"], "a": {"z": 10**30, "y": ""}}


def reusable(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """A function equal to ``encoder.encode`` for dicts, lists, strings and numbers.

    A circular or too deeply nested object raises ``ValueError`` (the reused encoder keeps no
    markers, so a cycle shows up as ``RecursionError``; ``encode`` raises ``ValueError`` for
    a cycle and ``RecursionError`` for depth).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.indent is not None:
        return encoder.encode
    try:
        c_encode = make(
            None, encoder.default,
            encode_basestring_ascii if encoder.ensure_ascii else encode_basestring,
            None, encoder.key_separator, encoder.item_separator, encoder.sort_keys,
            encoder.skipkeys, encoder.allow_nan,
        )
        if "".join(c_encode(_SAMPLE, 0)) != encoder.encode(_SAMPLE):
            return encoder.encode
    except Exception:  # noqa: BLE001 - another Python's C encoder: use the plain one
        return encoder.encode
    join = "".join
    plain = encoder.encode

    def encode(obj: Any) -> str:
        if isinstance(obj, str):
            return plain(obj)
        try:
            return join(c_encode(obj, 0))
        except RecursionError:
            raise ValueError("circular reference or nesting too deep") from None

    return encode
