"""Loaded by bench_store_ceiling.py's pluginlab server subprocesses (PYTHONPATH), never by
pluginlab itself. With ``PLUGINLAB_BENCH_STORE`` set it replaces the provenance store's append
for parameter changes (other events are recorded for real):

* ``stub``: returns a constant event: a store that costs nothing (the ceiling);
* ``floor``: does only what any store must still do from Python, however it is written (in C,
  say): one call, the canonical JSON of the details (CPython's C encoder), the two SHA-256 of
  PROTOCOL.md over ~360 bytes, one ``write`` to a journal file, one ``Event``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

_MODE = os.environ.get("PLUGINLAB_BENCH_STORE")

if _MODE in ("stub", "floor"):
    from pluginlab import provenance as _prov

    _real = _prov.ProvenanceStore.append_many_async
    _DAID = "daid:v1.0:2026-11-26T10-11-12.123Z:u1:parameter:p1.wet_dry:0123456789abcdef"
    _PAYLOAD = b"x" * 360
    _journal = os.open(os.environ.get("PLUGINLAB_BENCH_JOURNAL", os.devnull),
                       os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    async def _append(self: Any, drafts: Any) -> Any:
        draft = drafts[0]
        if draft.action != "parameter_update":
            return await _real(self, drafts)
        if _MODE == "stub":
            return [_prov.Event(1, _DAID, "", "", "", "", "", "", "", {}, (), "", "")]
        _prov.canonical_json(draft.details)
        digest = hashlib.sha256(_PAYLOAD).hexdigest()[:16]
        chained = hashlib.sha256(_PAYLOAD).hexdigest()
        os.write(_journal, _PAYLOAD)
        return [_prov.Event(1, _DAID, "2026-11-26T10:11:12.123Z", draft.user_id,
                            draft.session_id, draft.action, draft.entity_type, draft.entity_id,
                            draft.operation, draft.details, (), digest, chained)]

    _prov.ProvenanceStore.append_many_async = _append  # type: ignore[method-assign]
