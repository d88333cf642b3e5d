"""Durability across a crash: ``pluginlab serve`` as a subprocess, SIGKILLed right after the
last acknowledgement, restarted on the same database; the session comes back as it was.

An acknowledgement means the change is durably stored (PROTOCOL.md, *Storage*), so nothing
acknowledged may be lost to a SIGKILL.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jwt
from server_helpers import ROOT, SECRET, run

from pluginlab.client import Client

URL_LINE = re.compile(r"pluginlab serving on (ws://\S+)")
TOKEN_LINE = re.compile(r"token for '([^']+)' \(1 h\): (\S+)")


class ServeProcess:
    """``python -m pluginlab.cli serve`` with its output read on a thread."""

    def __init__(self, db: Path, presets: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PLUGINLAB_") and not k.startswith("ENABLE_")
               and k != "ALLOW_ANONYMOUS"}
        env.update({"PLUGINLAB_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT),
                    "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pluginlab.cli", "serve", "--port", "0", "--db", str(db),
             "--presets-dir", str(presets), "--token-user", "printed_user"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = ""
        self.printed_token = ""
        deadline = time.monotonic() + 120
        while not (self.url and self.printed_token):
            line = self._next_line(deadline)
            if match := URL_LINE.search(line):
                self.url = match.group(1)
            if match := TOKEN_LINE.search(line):
                assert match.group(1) == "printed_user"
                self.printed_token = match.group(2)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _next_line(self, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.output)) from None
        if line is None:
            raise AssertionError("server exited:\n" + "".join(self.output))
        return line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return int(self.proc.returncode)


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


def test_sigkill_right_after_the_last_ack_loses_nothing(tmp_path: Path) -> None:
    db, presets = tmp_path / "lab.sqlite", tmp_path / "presets"
    first = ServeProcess(db, presets)
    expected: dict[str, Any] = {}

    async def before_crash() -> None:
        async with Client(first.url, timeout=30) as alice:
            await alice.authenticate(token("alice"), session_id="durable")
            rev = (await alice.add_plugin("vocals", "Reverb", "/path/to/reverb.vst3",
                                          plugin_id="vox_verb"))["plugin_id"]
            delay = (await alice.add_plugin("vocals", "Delay"))["plugin_id"]
            gone = (await alice.add_plugin("drums", "Utility"))["plugin_id"]
            util = (await alice.add_plugin("drums", "Utility"))["plugin_id"]
            await alice.set_parameter("vocals", rev, "wet_dry", 0.71)
            await alice.set_parameters("vocals", delay, {"time": 375, "feedback": 0.45})
            await alice.request("UPDATE_PARAMETER", {"pluginId": delay, "parameterId": "mix",
                                                     "value": 0.33})
            await alice.preset("vocals", rev, "load", "Large Hall")
            await alice.set_parameter("vocals", rev, "wet_dry", 0.66)
            await alice.set_bypass("drums", util, True)
            await alice.remove_plugin("drums", gone)
            await alice.set_parameter("drums", util, "gain", -7.5)
            expected.update(await alice.session_state())
            # the last change: SIGKILL the moment its acknowledgement arrives
            ack = await alice.set_bypass("vocals", delay, True)
            first.kill()
            assert ack["success"] is True and ack["daid"]
            expected["tracks"]["vocals"][1]["bypass"] = True

    run(before_crash(), timeout=120)
    assert expected["tracks"]["vocals"][0]["parameters"]["wet_dry"] == 0.66

    second = ServeProcess(db, presets)
    try:
        async def after_restart() -> None:
            async with Client(second.url, timeout=30) as bob, \
                    Client(second.url, timeout=30) as printed:
                data = await bob.authenticate(token("bob"), session_id="durable")
                snapshot = data["snapshot"]
                assert snapshot["tracks"] == expected["tracks"]
                vocals = snapshot["tracks"]["vocals"]
                assert [p["plugin_id"] for p in vocals] == ["vox_verb", vocals[1]["plugin_id"]]
                assert vocals[0]["plugin_path"] == "/path/to/reverb.vst3"
                assert vocals[1]["parameters"]["time"] == 375
                assert vocals[1]["parameters"]["mix"] == 0.33
                assert vocals[1]["bypass"] is True
                assert snapshot["tracks"]["drums"][0]["bypass"] is True
                assert snapshot["tracks"]["drums"][0]["parameters"]["gain"] == -7.5
                # the restored plugins are live: they can be changed and read back
                await bob.set_parameter("vocals", "vox_verb", "wet_dry", 0.1)
                got = await bob.get_parameters("vocals", "vox_verb")
                assert got["parameters"]["wet_dry"] == 0.1
                # the token printed at start works too
                await printed.authenticate(second.printed_token, session_id="durable")
                assert printed.snapshot is not None
                assert printed.snapshot["members"] == ["bob", "printed_user"]

        run(after_restart(), timeout=120)
    finally:
        code = second.stop()
    assert code == 0, "".join(second.output)
    assert any("shutting down" in line for line in second.output)


def test_ids_assigned_after_a_restart_do_not_collide(tmp_path: Path) -> None:
    """Server-assigned plugin ids continue after restored ones (plugin ids are unique)."""
    db, presets = tmp_path / "lab.sqlite", tmp_path / "presets"
    first = ServeProcess(db, presets)
    ids: list[str] = []

    async def add(url: str, n: int) -> None:
        async with Client(url, timeout=30) as c:
            await c.authenticate(token("alice"), session_id="ids")
            for _ in range(n):
                ids.append((await c.add_plugin("t", "Utility"))["plugin_id"])

    try:
        run(add(first.url, 2), timeout=120)
    finally:
        first.kill()
    second = ServeProcess(db, presets)
    try:
        run(add(second.url, 2), timeout=120)
    finally:
        second.stop()
    assert len(set(ids)) == 4, ids


