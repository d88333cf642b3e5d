"""An append-only, line-per-record file that makes appends durable before they are indexed.

The provenance store (:mod:`pluginlab.provenance`) writes each group of events here first,
acknowledges them, and copies them into its SQLite tables in the background. A record is one
line of JSON (a list) ending in ``\\n``; the file lives next to the database
(``<db>-daidlog``).

Durability is the same as SQLite's WAL with ``synchronous=NORMAL``: once :meth:`Journal.append`
returns, the bytes are in the kernel's page cache and survive a crash or SIGKILL of the
process; with ``fsync=True`` each append is also ``fdatasync``-ed, so it survives power loss.

Contracts:

* One writer per file: opening takes an exclusive ``flock``; a second :class:`Journal` on the
  same file (from any process) raises :class:`JournalBusy` instead of interleaving.
* An append is all-or-nothing for its readers: if the write fails (disk full, I/O error) the
  file is cut back to its previous length before the error is raised, and a record cut short
  by a crash (no trailing newline, or not a JSON list) is ignored by :func:`read_records`.
* Not thread-safe by itself: the store serialises calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Any

__all__ = ["Journal", "JournalBusy", "journal_path", "read_records"]

SUFFIX = "-daidlog"


class JournalBusy(RuntimeError):
    """Another writer holds the journal (and so the database) open."""


def journal_path(db_path: str) -> str:
    """The journal file that belongs to the database at ``db_path``."""
    return db_path + SUFFIX


class Journal:
    """The open journal of one database (see the module docs)."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalBusy(
                f"{path}: the database is open for writing by another pluginlab store "
                "(in this or another process); close that one first"
            ) from None
        self.size = os.fstat(self._fd).st_size

    def append(self, data: bytes) -> None:
        """Write ``data`` (whole lines) durably, or raise with the file unchanged."""
        before = self.size
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write: disk nearly full, or a signal
                more = os.write(self._fd, data[written:])
                if more <= 0:
                    raise OSError("journal write made no progress")
                written += more
            if self.fsync:
                os.fdatasync(self._fd)
        except BaseException:
            self._cut(before)
            raise
        self.size = before + len(data)

    def truncate(self) -> None:
        """Empty the file (every record in it has been stored elsewhere)."""
        self._cut(0)

    def _cut(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        if self.fsync:
            os.fdatasync(self._fd)
        self.size = size

    def close(self) -> None:
        """Release the lock and the file (idempotent); an empty journal file is removed."""
        if self._fd >= 0:
            if self.size == 0:  # still under our lock: nobody else can be using it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1


def read_records(path: str) -> list[list[Any]]:
    """Every complete record of the journal at ``path`` ([] if there is none), in file order.

    Reading stops at the first line that is cut short or is not a JSON list: nothing after a
    torn write was ever acknowledged.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    records: list[list[Any]] = []
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline: torn or empty
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, list):
            break
        records.append(record)
    return records
