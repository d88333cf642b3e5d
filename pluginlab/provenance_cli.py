"""Provenance database commands: ``db migrate``, ``daid verify``, ``events export``.

:func:`register` adds the subcommands to an ``argparse`` subparsers object (``pluginlab.cli``
wires it in); each sets ``func`` to a handler ``(args) -> int`` that returns the exit code:

* ``0`` success (``daid verify``: the chain is intact);
* ``1`` ``daid verify`` found a broken chain (the first bad seq and the reason are printed);
* ``2`` the command could not run: no such file, a database newer than this pluginlab
  (``SchemaTooNew``), an old one that needs ``db migrate`` first, bad arguments.

``verify`` and ``export`` open the database read-only and never modify it; ``migrate`` changes
it in place (one transaction per schema version) and refuses to create a new file.
Also runnable as ``python -m pluginlab.provenance_cli daid verify DB``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import IO, Any

from .errors import PluginlabError
from .provenance import (
    SCHEMA_VERSION,
    UnindexedEventsWarning,
    _open_for_reading,
    migrate_database,
    store_unindexed_events,
    unindexed_events,
    verify_chain,
    warn_if_unindexed,
)

__all__ = ["EXPORT_COLUMNS", "EXPORT_FORMATS", "export_events", "main", "register"]

EXPORT_COLUMNS = (
    "seq",
    "daid",
    "timestamp",
    "user_id",
    "session_id",
    "action",
    "entity_type",
    "entity_id",
    "operation",
    "details",
    "parents",
    "prev_hash",
    "chain_hash",
)
EXPORT_FORMATS = ("csv", "parquet", "jsonl")
_SQL_COLUMNS = (
    "seq, id, timestamp, user_id, session_id, action, entity_type, entity_id, operation, "
    "details, parents, prev_hash, chain_hash"
)
_BATCH = 50_000

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db migrate``, ``daid verify`` and ``events export`` to ``subparsers``."""
    db = subparsers.add_parser("db", help="provenance database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate = db_sub.add_parser(
        "migrate", help=f"upgrade a database in place to schema version {SCHEMA_VERSION}"
    )
    migrate.add_argument("db", help="SQLite database file")
    migrate.set_defaults(func=_cmd_migrate)

    daid = subparsers.add_parser("daid", help="DAID provenance log")
    daid_sub = daid.add_subparsers(dest="daid_command", required=True)
    verify = daid_sub.add_parser(
        "verify", help="recompute the hash chain; exit 1 and name the first broken row"
    )
    verify.add_argument("db", help="SQLite database file")
    verify.set_defaults(func=_cmd_verify)

    events = subparsers.add_parser("events", help="DAID events")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    export = events_sub.add_parser("export", help="export events as csv, parquet or jsonl")
    export.add_argument("db", help="SQLite database file")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", help="output file (default: standard output)")
    export.add_argument("--session", help="only this session's events")
    export.set_defaults(func=_cmd_export)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _cmd_migrate(args: argparse.Namespace) -> int:
    try:
        before, after = migrate_database(args.db)
    except (OSError, PluginlabError, sqlite3.DatabaseError) as exc:
        return _fail(str(exc))
    if before == after:
        print(f"{args.db}: already at schema version {after}; nothing to do")
    else:
        print(f"{args.db}: migrated schema version {before} -> {after}")
    try:
        stored = store_unindexed_events(args.db)
    except (OSError, PluginlabError, RuntimeError, sqlite3.DatabaseError) as exc:
        return _fail(str(exc))
    if stored:
        print(f"{args.db}: stored {stored} acknowledged event(s) left in the journal by a "
              "process that stopped before indexing them")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        conn = _open_for_reading(args.db)
    except (OSError, PluginlabError, RuntimeError, sqlite3.DatabaseError) as exc:
        return _fail(str(exc))
    try:
        result = verify_chain(conn)
    except sqlite3.DatabaseError as exc:
        return _fail(str(exc))
    finally:
        conn.close()
    try:
        pending = unindexed_events(args.db)
    except (OSError, PluginlabError, RuntimeError, sqlite3.DatabaseError):
        pending = 0
    if pending:
        print(f"note: {pending} acknowledged event(s) are only in the journal "
              f"({args.db}-daidlog), not yet in the tables checked here; "
              f"`pluginlab db migrate {args.db}` stores them")
    if result.ok:
        print(f"OK: {result.checked} events, hash chain intact")
        return EXIT_OK
    if result.first_bad_seq is None:
        print(f"BROKEN: {result.reason}")
        return EXIT_BROKEN
    print(
        f"BROKEN at seq {result.first_bad_seq}: {result.reason} "
        f"({result.checked} events verified before it)"
    )
    return EXIT_BROKEN


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnindexedEventsWarning)
            count = export_events(args.db, args.format, args.out, session_id=args.session)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_OK
    except (OSError, PluginlabError, RuntimeError, sqlite3.DatabaseError, ValueError) as exc:
        return _fail(str(exc))
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.out:
        print(f"exported {count} events to {args.out}", file=sys.stderr)
    return EXIT_OK


def _batches(
    conn: sqlite3.Connection, session_id: str | None
) -> Iterator[list[tuple[Any, ...]]]:
    sql = f"SELECT {_SQL_COLUMNS} FROM daid_events"
    params: list[Any] = []
    if session_id is not None:
        sql += " WHERE session_id = ?"
        params.append(session_id)
    cursor = conn.execute(sql + " ORDER BY seq", params)
    while rows := cursor.fetchmany(_BATCH):
        yield rows


def export_events(
    db: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    *,
    session_id: str | None = None,
) -> int:
    """Write the events of ``db`` (opened read-only) to ``out`` (None: stdout); return the count.

    Columns: :data:`EXPORT_COLUMNS` in seq order. csv: ``details``/``parents`` as JSON text;
    jsonl: one JSON object per line with ``details`` an object and ``parents`` a list;
    parquet: ``timestamp`` as timestamp[ms, UTC], ``details`` JSON text, ``parents``
    list<string>. Streams in batches, so memory stays bounded for big logs.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(EXPORT_FORMATS)})")
    conn = _open_for_reading(db)
    warn_if_unindexed(db)
    try:
        batches = _batches(conn, session_id)
        if fmt == "parquet":
            return _with_binary_out(out, lambda stream: _write_parquet(batches, stream))
        writer = _write_csv if fmt == "csv" else _write_jsonl
        return _with_text_out(out, lambda stream: writer(batches, stream))
    finally:
        conn.close()


def _with_text_out(out: str | os.PathLike[str] | None, write: Any) -> int:
    if out is None:
        return int(write(sys.stdout))
    with open(out, "w", encoding="utf-8", newline="") as stream:
        return int(write(stream))


def _with_binary_out(out: str | os.PathLike[str] | None, write: Any) -> int:
    if out is None:
        buffer = io.BytesIO()
        count = int(write(buffer))
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
        return count
    with open(out, "wb") as stream:
        return int(write(stream))


def _write_csv(batches: Iterator[list[tuple[Any, ...]]], stream: IO[str]) -> int:
    writer = csv.writer(stream)
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    for rows in batches:
        writer.writerows(rows)
        count += len(rows)
    return count


def _write_jsonl(batches: Iterator[list[tuple[Any, ...]]], stream: IO[str]) -> int:
    count = 0
    for rows in batches:
        lines = []
        for row in rows:
            record = dict(zip(EXPORT_COLUMNS, row))
            record["details"] = _json_or_raw(record["details"])
            record["parents"] = _json_or_raw(record["parents"])
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        stream.write("\n".join(lines) + "\n")
        count += len(rows)
    return count


def _json_or_raw(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def _write_parquet(batches: Iterator[list[tuple[Any, ...]]], stream: IO[bytes]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("seq", pa.int64()),
            ("daid", pa.string()),
            ("timestamp", pa.timestamp("ms", tz="UTC")),
            *[(name, pa.string()) for name in EXPORT_COLUMNS[3:9]],
            ("details", pa.string()),
            ("parents", pa.list_(pa.string())),
            ("prev_hash", pa.string()),
            ("chain_hash", pa.string()),
        ]
    )
    count = 0
    with pq.ParquetWriter(stream, schema) as writer:
        for rows in batches:
            columns = list(zip(*rows))
            arrays = [
                pa.array(columns[0], pa.int64()),
                pa.array(columns[1], pa.string()),
                _timestamps(columns[2]),
                *[pa.array(columns[i], pa.string()) for i in range(3, 9)],
                pa.array(columns[9], pa.string()),
                pa.array([_json_or_raw(p) for p in columns[10]], pa.list_(pa.string())),
                pa.array(columns[11], pa.string()),
                pa.array(columns[12], pa.string()),
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            count += len(rows)
        if count == 0:
            writer.write_table(schema.empty_table())
    return count


def _timestamps(values: Sequence[str | None]) -> Any:
    import pandas as pd
    import pyarrow as pa

    parsed = pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601", utc=True,
                            errors="coerce")
    return pa.array(parsed.dt.as_unit("ms"), pa.timestamp("ms", tz="UTC"))


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (the same commands as ``pluginlab``'s)."""
    parser = argparse.ArgumentParser(prog="python -m pluginlab.provenance_cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
