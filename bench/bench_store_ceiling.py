"""How fast could pipelined PLUGIN_PARAMETER be with DAID tracking if the store cost less?

Run on demand (not a test)::

    .venv/bin/python bench/bench_store_ceiling.py     # ~40 s

Five servers in their own subprocesses, measured in interleaved rounds in one run (median of
6 rounds of 4,000 pipelined frames each, after a warm-up round), all against the raw
``websockets`` server of bench_server.py:

* ``pluginlab``: as shipped (durable DAID events: journal + SQLite);
* ``floor``: the store reduced to what any implementation must still do from Python, even one
  written in C (see ``store_fakes/sitecustomize.py``): C JSON, two SHA-256, one write, an Event;
* ``stub``: a store that costs nothing;
* ``DAID off``: no recording at all.

The ``floor`` row bounds what rewriting the store (e.g. as a C extension) could reach; the
``stub`` row what any store could. Server CPU per request is the process's user + system time
(all threads) over the burst.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import bench_server as B

FAKES = str(Path(__file__).with_name("store_fakes"))
ROUNDS, FRAMES = 7, 4000


def _server(kind: str, tmp: str, store: str | None = None, daid: bool = True) -> B.ServerProc:
    saved = dict(os.environ)
    if store:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [FAKES, saved.get("PYTHONPATH")]))
        os.environ["PLUGINLAB_BENCH_STORE"] = store
        os.environ["PLUGINLAB_BENCH_JOURNAL"] = os.path.join(tmp, f"journal_{store}")
    try:
        return B.ServerProc(kind, tmp, daid=daid)
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def main() -> None:
    tmp = tempfile.mkdtemp(prefix="pluginlab_ceiling_")
    servers = {"raw websockets": _server("raw", tmp), "pluginlab": _server("pluginlab", tmp),
               "floor": _server("pluginlab", tmp, "floor"),
               "stub": _server("pluginlab", tmp, "stub"),
               "DAID off": _server("pluginlab", tmp, daid=False)}
    try:
        targets = {name: B.Target("raw" if name == "raw websockets" else "pluginlab", s.url)
                   for name, s in servers.items()}
        conns = {}
        for name, target in targets.items():
            conns[name] = await target.client(f"u{len(conns)}", f"s{len(conns)}")
            await target.setup(conns[name])
        sent = dict.fromkeys(targets, 0)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for round_ in range(ROUNDS):
            for name, target in targets.items():
                await asyncio.sleep(0.3)
                cpu0 = servers[name].cpu_seconds()
                rate = await B.pipelined(target, conns[name], FRAMES, sent[name])
                sent[name] += FRAMES
                if round_:  # the first round warms up
                    results[name].append((rate, 1e6 * (servers[name].cpu_seconds() - cpu0)
                                          / FRAMES))
        medians = {name: (B.pct([r for r, _ in v], 50), B.pct([c for _, c in v], 50))
                   for name, v in results.items()}
        raw = medians["raw websockets"][0]
        print(f"pipelined PLUGIN_PARAMETER, {FRAMES} frames x {ROUNDS - 1} rounds "
              f"(medians; CPU per request in steps of {1e6 / os.sysconf('SC_CLK_TCK') / FRAMES:.1f} us)")
        print(f"{'server':16} | {'msgs/s':>9} | {'of raw':>6} | server CPU/request")
        for name, (rate, cpu) in medians.items():
            print(f"{name:16} | {rate:9,.0f} | {100 * rate / raw:5.0f}% | {cpu:5.1f} us")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
