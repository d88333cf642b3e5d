"""Benchmark the provenance store and events_frame against plain sqlite3 / pandas baselines.

Run on demand (not a test)::

    python bench/bench_provenance.py            # full: 1,000,000 events (about 3 minutes)
    python bench/bench_provenance.py --quick    # 100,000 events, shorter write runs
    python bench/bench_provenance.py --read-only --keep-db /tmp/db/read.sqlite
        # only the read benchmark, on a database filled once and kept for the next runs

Everything is measured in the same run, on the same machine, with the same schema and pragmas
(WAL, ``synchronous=NORMAL`` unless stated, ``fsync`` rows ``synchronous=FULL``; the store's
``wal_autocheckpoint`` and ``cache_size``), on a realistic mix (24 plugins in 4 sessions, 8
users, 3 parameters each, 1% bypass toggles):

* durable appends/s through :class:`~pluginlab.provenance.ProvenanceStore` with 1, 4 and 16
  writer threads calling ``append`` (each call returns only once its event is committed), and
  with 256 asyncio tasks calling ``append_async`` (how the server records events);
* baselines: raw ``sqlite3`` inserting one row per transaction, and one ``executemany``
  transaction of prepared rows, into the same ``daid_events`` table;
* ``events_frame`` of N events vs ``pandas.read_sql("SELECT * FROM daid_events", conn)``.

Targets: >= 20,000 durable events/s with concurrent writers; events_frame(1M) < 3 s and not
slower than read_sql.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import pluginlab  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import pandas as pd

from pluginlab import provenance as prov
from pluginlab.analysis import events_frame
from pluginlab.provenance import EventDraft, ProvenanceStore

PLUGINS = [(f"session_{s}", f"track_{t}", f"p{s}_{t}_{k}")
           for s in range(4) for t in range(3) for k in range(2)]
PARAMETERS = ("wet_dry", "room_size", "damping")
USERS = [f"user_{i}" for i in range(8)]


def add_draft(session: str, track: str, plugin: str) -> EventDraft:
    return EventDraft(USERS[0], session, "plugin_add", "plugin", plugin, "create", {
        "track_id": track, "plugin_id": plugin, "name": "Reverb", "plugin_path": None,
        "index": None, "parameters": dict.fromkeys(PARAMETERS, 0.5), "bypass": False})


def change_draft(rng: random.Random, user: str | None = None) -> EventDraft:
    session, track, plugin = rng.choice(PLUGINS)
    who = user or rng.choice(USERS)
    if rng.random() < 0.01:
        return EventDraft(who, session, "plugin_bypass", "plugin", plugin, "bypass",
                          {"track_id": track, "plugin_id": plugin, "bypass": rng.random() < 0.5})
    name = rng.choice(PARAMETERS)
    return EventDraft(who, session, "parameter_update", "parameter", f"{plugin}.{name}",
                      "update", {"track_id": track, "plugin_id": plugin, "parameter_id": name,
                                 "value": rng.random(), "previous_value": rng.random()})


def seeded_store(path: Path, *, fsync: bool = False) -> ProvenanceStore:
    store = ProvenanceStore(path, fsync=fsync)
    store.append_many([add_draft(*p) for p in PLUGINS])
    return store


# ---------------------------------------------------------------------------------------------
# writes


@dataclass
class Rate:
    """Acknowledged (durable) events/s, and events/s until they are indexed as well."""

    durable: float
    indexed: float


def store_threads(folder: Path, threads: int, seconds: float, *, fsync: bool = False) -> Rate:
    """Durable appends/s with ``threads`` threads calling append() until the deadline."""
    store = seeded_store(folder / f"threads{threads}{'_fsync' if fsync else ''}.sqlite",
                         fsync=fsync)
    counts = [0] * threads
    drafts = [[change_draft(random.Random(i * 1000 + k), f"user_{i % 8}") for k in range(500)]
              for i in range(threads)]
    start_barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def work(index: int) -> None:
        mine = drafts[index]
        start_barrier.wait()
        n = 0
        while time.perf_counter() < deadline[0]:
            store.append(mine[n % len(mine)])
            n += 1
        counts[index] = n

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start_barrier.wait()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    store.flush()  # sustained rate: until every acknowledged event is in the tables too
    indexed = time.perf_counter() - began
    assert store.verify().ok
    store.close()
    return Rate(sum(counts) / elapsed, sum(counts) / indexed)


def store_asyncio(folder: Path, tasks: int, seconds: float) -> Rate:
    """Durable appends/s with ``tasks`` asyncio tasks awaiting append_async()."""
    store = seeded_store(folder / "asyncio.sqlite")
    rng = random.Random(7)
    drafts = [change_draft(rng) for _ in range(1000)]

    async def run() -> tuple[int, float, float]:
        deadline = time.perf_counter() + seconds
        counts = [0] * tasks

        async def work(index: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                await store.append_async(drafts[(index + n) % len(drafts)])
                n += 1
            counts[index] = n

        began = time.perf_counter()
        await asyncio.gather(*(work(i) for i in range(tasks)))
        elapsed = time.perf_counter() - began
        store.flush()
        return sum(counts), elapsed, time.perf_counter() - began

    total, elapsed, indexed = asyncio.run(run())
    store.close()
    return Rate(total / elapsed, total / indexed)


def raw_rows(n: int) -> list[tuple[Any, ...]]:
    """Rows shaped like the store's (DAID, canonical details, parents, hashes), prepared."""
    rng = random.Random(3)
    rows = []
    prev = prov.GENESIS_HASH
    for seq in range(1, n + 1):
        draft = change_draft(rng)
        details = prov.canonical_json(draft.details)
        stamp = prov.format_timestamp()
        daid = prov.make_daid(draft.user_id, draft.entity_type, draft.entity_id,
                              draft.operation, {"seq": seq})
        parents = prov.canonical_json([daid])
        chained = f"{seq:064x}"
        rows.append((seq, daid, stamp, draft.user_id, draft.session_id, draft.action,
                     draft.entity_type, draft.entity_id, draft.operation, details, parents,
                     prev, chained))
        prev = chained
    return rows


def raw_connection(path: Path, *, fsync: bool = False) -> sqlite3.Connection:
    ProvenanceStore(path).close()  # the same schema: generated columns, indexes
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")  # the store's pragmas, exactly
    conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {prov._WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute("PRAGMA cache_size = -65536")
    return conn


def raw_one_per_transaction(folder: Path, seconds: float, *, fsync: bool = False) -> float:
    conn = raw_connection(folder / f"raw_one{'_fsync' if fsync else ''}.sqlite", fsync=fsync)
    rows = raw_rows(200_000)
    n = 0
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline and n < len(rows):
        conn.execute("BEGIN")
        conn.execute(prov._INSERT_EVENT, rows[n])
        conn.execute("COMMIT")
        n += 1
    elapsed = time.perf_counter() - began
    conn.close()
    return n / elapsed


def raw_executemany(folder: Path, n: int) -> float:
    conn = raw_connection(folder / "raw_many.sqlite")
    rows = raw_rows(n)
    began = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(prov._INSERT_EVENT, rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return n / elapsed


# ---------------------------------------------------------------------------------------------
# reads


def fill(path: Path, total: int) -> float:
    """Write ``total`` events through the store (batches of 10,000); return events/s."""
    rng = random.Random(1)
    with ProvenanceStore(path) as store:
        began = time.perf_counter()
        store.append_many([add_draft(*p) for p in PLUGINS])
        written = len(PLUGINS)
        while written < total:
            batch = [change_draft(rng) for _ in range(min(10_000, total - written))]
            store.append_many(batch)
            written += len(batch)
        store.flush()
        return written / (time.perf_counter() - began)


def best_of(runs: int, action: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(runs):
        began = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - began)
        del result
    return best, None


def read_sql(path: Path) -> pd.DataFrame:
    conn = sqlite3.connect(path)
    try:
        return pd.read_sql("SELECT * FROM daid_events", conn)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k events, 1 s write runs")
    parser.add_argument("--events", type=int, help="events for the read benchmark")
    parser.add_argument("--seconds", type=float, help="duration of each write run")
    parser.add_argument("--read-only", action="store_true", help="skip the write benchmarks")
    parser.add_argument("--keep-db", type=Path, metavar="PATH",
                        help="database of the read benchmark: filled only if missing, then kept")
    args = parser.parse_args()
    total = args.events or (100_000 if args.quick else 1_000_000)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    folder = Path(tempfile.mkdtemp(prefix="bench-provenance-"))
    print(f"# bench_provenance: {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"pandas {pd.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        if not args.read_only:
            _write_benchmarks(folder, seconds)
        _read_benchmark(args.keep_db or folder / "read.sqlite", total)
        print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _write_benchmarks(folder: Path, seconds: float) -> None:
    rows: list[tuple[str, ...]] = []
    print("## durable appends (events/s)", flush=True)
    raw_one = raw_one_per_transaction(folder, seconds)
    rows.append(("raw sqlite3, 1 row per transaction (baseline)", f"{raw_one:,.0f}", "-",
                 "1.00x"))
    raw_many = raw_executemany(folder, 100_000)
    rows.append(("raw sqlite3, executemany, 1 transaction (baseline)", f"{raw_many:,.0f}",
                 "-", f"{raw_many / raw_one:.2f}x"))

    def store_row(label: str, rate: Rate, base: float, tag: str = "") -> None:
        rows.append((label, f"{rate.durable:,.0f}", f"{rate.indexed:,.0f}",
                     f"{rate.durable / base:.2f}x{tag}"))

    for threads in (1, 4, 16):
        store_row(f"ProvenanceStore.append, {threads} thread(s)",
                  store_threads(folder, threads, seconds), raw_one)
    store_row("ProvenanceStore.append_async, 256 asyncio tasks",
              store_asyncio(folder, 256, seconds), raw_one)
    raw_full = raw_one_per_transaction(folder, seconds, fsync=True)
    rows.append(("raw sqlite3, 1 row per transaction, synchronous=FULL", f"{raw_full:,.0f}",
                 "-", "1.00x (FULL)"))
    store_row("ProvenanceStore.append, 16 threads, fsync=True (FULL)",
              store_threads(folder, 16, seconds, fsync=True), raw_full, " (FULL)")
    _table(("writer", "durable events/s", "incl. indexing", "vs raw 1/txn"), rows)
    print("\n'durable': acknowledged (journaled) during the run; 'incl. indexing': the same "
          "events over the run plus the wait until the indexer had them all in the tables.")


def _read_benchmark(path: Path, total: int) -> None:
    """events_frame vs read_sql on ``path``, filled with ``total`` events unless it exists."""
    print(f"\n## reading {path}", flush=True)
    if path.exists():
        fill_row = f"reused {path} (not refilled)"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fill_row = f"fill through ProvenanceStore.append_many ({fill(path, total):,.0f} events/s)"
    conn = sqlite3.connect(path)
    try:
        count = conn.execute("SELECT COUNT(*) FROM daid_events").fetchone()[0]
    finally:
        conn.close()
    frame_time, _ = best_of(3, lambda: events_frame(path))
    sql_time, _ = best_of(2, lambda: read_sql(path))
    _table(
        ("reader", f"seconds ({count:,} events)", "vs read_sql"),
        [
            (fill_row, "-", "-"),
            ("pandas.read_sql('SELECT * FROM daid_events')", f"{sql_time:.2f}", "1.00x"),
            ("analysis.events_frame", f"{frame_time:.2f}", f"{sql_time / frame_time:.2f}x faster"),
        ],
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
