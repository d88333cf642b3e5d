"""The notebook lab and its widgets, without a browser.

ipywidgets work in plain Python (no frontend: their comm is a dummy), so a test can move a
slider by assigning ``control.value`` exactly as the browser's comm message would, and read
back what the kernel would show. Each test runs one ``async def scenario()`` under
``asyncio.run`` (see :mod:`server_helpers`); the lab's database and user presets live in
``tmp_path``; a real :class:`pluginlab.Client` connects over a real socket.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import html
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_helpers import SECRET, run
from websockets.asyncio.client import connect as ws_connect

import pluginlab
from pluginlab import Client, Lab, Source
from pluginlab.errors import InvalidParameter
from pluginlab.provenance import ProvenanceStore
from pluginlab.widgets import PluginPanel, PresencePanel, TrackPanel

SETTLE = 0.25  # > the broadcast throttle window (50 ms) plus scheduling slack


def lab_options(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "db": str(tmp_path / "lab.sqlite"),
        "presets_dir": str(tmp_path / "presets"),
        "jwt_secret": SECRET,
    }
    options.update(overrides)
    return options


@asynccontextmanager
async def running_lab(tmp_path: Path, session_id: str = "nb", **overrides: Any
                      ) -> AsyncIterator[Lab]:
    lab = await pluginlab.start(session_id, **lab_options(tmp_path, **overrides))
    try:
        lab.set_source("drums", Source.sine(220.0, seconds=1.0))
        yield lab
    finally:
        await lab.stop()


@asynccontextmanager
async def colleague(lab: Lab, user: str = "colleague") -> AsyncIterator[Client]:
    client = await Client(lab.url, timeout=10.0).connect()
    try:
        await client.authenticate(lab.token(user), session_id=lab.session_id)
        yield client
    finally:
        await client.close()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` is true (changes from widgets land on the loop asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def state_updates(client: Client) -> list[dict[str, Any]]:
    return client.received("PLUGIN_STATE_UPDATE")


# -- start / stop -------------------------------------------------------------------------------
def test_start_is_idempotent_and_restart_with_other_args_stops_the_old_lab(tmp_path: Path) -> None:
    async def scenario() -> None:
        from pluginlab import lab as lab_module

        first = await pluginlab.start("nb", **lab_options(tmp_path))
        other: Lab | None = None
        try:
            again = await pluginlab.start("nb", **lab_options(tmp_path))
            assert again is first and again.url == first.url and not first.stopped
            old_url = first.url

            other = await pluginlab.start("nb", **lab_options(tmp_path, debounce_window=0.02))
            assert other is not first and first.stopped and not other.stopped
            assert lab_module._CURRENT is other
            with pytest.raises(OSError):  # the old port no longer accepts connections
                async with ws_connect(old_url, proxy=None, open_timeout=3):
                    pass
            async with colleague(other) as client:  # the new one serves
                assert client.session_id == "nb"
        finally:
            await first.stop()
            if other is not None:
                await other.stop()
                await other.stop()  # idempotent
        assert lab_module._CURRENT is None

    run(scenario())


def test_a_restart_of_the_kernel_says_what_the_log_brought_back(tmp_path: Path) -> None:
    """Run All after a kernel restart: the session comes back from the log. It is announced,
    so adding the plugins again does not silently double the chain; fresh=True empties it."""
    async def scenario() -> None:
        first = await pluginlab.start("nb", **lab_options(tmp_path))
        await first.add_plugin("drums", "Reverb")
        await first.stop()
        with pytest.warns(pluginlab.RestoredSessionWarning, match="drums: Reverb.*fresh=True"):
            again = await pluginlab.start("nb", **lab_options(tmp_path))
        assert again.restored == {"drums": ["Reverb"]}
        assert [p.name for p in again.engine.track("drums").plugins] == ["Reverb"]
        await again.stop()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh = await pluginlab.start("nb", fresh=True, **lab_options(tmp_path))
        try:
            assert fresh.restored == {} and not fresh.engine.plugins
            await fresh.add_plugin("drums", "Reverb")
            assert [p.name for p in fresh.engine.track("drums").plugins] == ["Reverb"]
            fresh.store.flush()
            assert [e.action for e in fresh.store.events("nb", action="plugin_remove")] == [
                "plugin_remove"]  # emptied through the core: the log agrees
        finally:
            await fresh.stop()

    run(scenario())


def test_a_database_held_by_another_lab_says_what_to_do(tmp_path: Path) -> None:
    async def scenario() -> None:
        held = ProvenanceStore(tmp_path / "lab.sqlite")  # another kernel's lab
        try:
            with pytest.raises(RuntimeError, match="in use by another lab.*pass db="):
                await pluginlab.start("nb", **lab_options(tmp_path))
        finally:
            held.close()

    run(scenario())


def test_start_after_a_loop_closed_without_stop(tmp_path: Path) -> None:
    """A script calling asyncio.run twice, or a test that forgot stop(): start() still works."""

    async def first() -> Lab:
        return await pluginlab.start("nb", **lab_options(tmp_path / "one"))

    async def second(old: Lab) -> None:
        lab = await pluginlab.start("nb", **lab_options(tmp_path / "two"))
        try:
            assert lab is not old and old.stopped and not lab.stopped
            with socket.socket() as probe:  # the abandoned lab's port was released
                probe.bind(("127.0.0.1", old.server.port))
            async with colleague(lab) as client:
                assert client.session_id == "nb"
        finally:
            await lab.stop()

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    old = run(first())
    run(second(old))


def test_the_labs_session_receives_a_websocket_clients_changes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            seen: list[dict[str, Any]] = []
            remove = lab.listen(seen.append)
            async with colleague(lab) as client:
                snapshot = client.snapshot
                assert snapshot is not None
                assert {"notebook", "colleague"} <= set(snapshot["members"])
                assert [p["plugin_id"] for p in snapshot["tracks"]["drums"]] == [reverb.id]
                await client.set_parameter("drums", reverb.id, "room_size", 0.8)
                await eventually(lambda: any(m["type"] == "PLUGIN_STATE_UPDATE" for m in seen))
                assert lab.plugin(reverb.id).get("room_size") == 0.8
                added = await client.add_plugin("drums", "Filter")
                assert added["plugin_id"] in lab.engine.plugins
            remove()
            events = lab.store.events("nb", action="parameter_update")
            assert [(e.user_id, e.details["value"]) for e in events] == [("colleague", 0.8)]

    run(scenario())


# -- two-way binding ----------------------------------------------------------------------------
def test_slider_move_reaches_engine_store_and_other_clients(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            async with colleague(lab) as client:
                panel.controls["wet_dry"].value = 0.6  # what a drag in the browser does
                update = await client.wait_for("PLUGIN_STATE_UPDATE")
                assert update["data"]["parameters"] == {"wet_dry": 0.6}
                assert update["data"]["changed_by"] == "notebook"
                assert lab.plugin(reverb.id).get("wet_dry") == 0.6
                event = lab.store.event(update["data"]["daid"])
                assert (event.action, event.user_id, event.details["value"]) == (
                    "parameter_update", "notebook", 0.6)
                assert panel.texts["wet_dry"].value == "<code></code>"  # the readout says it
                panel.controls["pre_delay"].value = 35  # a unit: the text adds it
                await client.wait_for("PLUGIN_STATE_UPDATE",
                                      lambda m: "pre_delay" in m["data"]["parameters"])
                assert panel.texts["pre_delay"].value == "<code>35 ms</code>"
            panel.close()

    run(scenario())


def test_fast_moves_never_make_the_slider_jump_back(tmp_path: Path) -> None:
    """Replies to earlier moves arrive while the user is already further: the sending panel
    is not set back to them (each set-back would be sent to the browser); another panel of the
    same plugin follows every change."""

    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel, other = lab.panel(reverb), lab.panel(reverb)
            history: list[float] = []
            panel.controls["wet_dry"].observe(lambda c: history.append(c["new"]), names="value")
            for value in (0.4, 0.5, 0.6):  # three moves before the loop handles the first
                panel.controls["wet_dry"].value = value
            await eventually(lambda: reverb.get("wet_dry") == 0.6
                             and other.controls["wet_dry"].value == 0.6)
            await asyncio.sleep(SETTLE)
            assert history == [0.4, 0.5, 0.6]
            assert panel.controls["wet_dry"].value == 0.6
            panel.close()
            other.close()

    run(scenario())


def test_client_change_moves_the_slider_without_echo(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            async with colleague(lab) as client:
                # the slider move: exactly one broadcast of each kind reaches the client
                panel.controls["wet_dry"].value = 0.45
                await client.wait_for("PLUGIN_STATE_UPDATE")
                await asyncio.sleep(SETTLE)
                assert len(client.received("PLUGIN_PARAMETER")) == 1
                assert state_updates(client) == []
                client.drain()

                # the client's own change: the slider follows, nothing comes back
                await client.set_parameter("drums", reverb.id, "room_size", 0.9)
                await eventually(lambda: panel.controls["room_size"].value == 0.9)
                await asyncio.sleep(SETTLE)
                assert lab.plugin(reverb.id).get("room_size") == 0.9
                assert client.drain() == []
                events = lab.store.events("nb", action="parameter_update")
                assert [(e.user_id, e.details["parameter_id"]) for e in events] == [
                    ("notebook", "wet_dry"), ("colleague", "room_size")]
            panel.close()

    run(scenario())


def test_a_slider_overtaken_by_a_colleague_ends_on_the_engines_value(tmp_path: Path) -> None:
    """The notebook user moves a slider (on a widget thread) and a colleague's change of the
    same parameter is applied first: the panel shows the colleague's value, then the user's
    move is applied. The slider must end on the engine's value (it stayed on the colleague's,
    since a panel never shows its own echo)."""
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            slider = panel.controls["wet_dry"]
            colleague = lab.studio.connect(lambda message: None, "colleague-host")
            await lab.studio.execute(colleague, "AUTH", {"token": lab.token("colleague"),
                                                         "session_id": "nb"})
            mover = threading.Thread(target=setattr, args=(slider, "value", 0.8))
            mover.start()
            mover.join()  # blocks the loop: the move is queued on it, not applied yet
            await lab.studio.execute(colleague, "PLUGIN_PARAMETER", {
                "track_id": "drums", "plugin_id": reverb.id, "parameter_id": "wet_dry",
                "parameter_value": 0.3})  # runs before the queued move
            await eventually(lambda: reverb.get("wet_dry") == 0.8)
            await eventually(lambda: slider.value == 0.8)
            assert slider.value == reverb.get("wet_dry") == 0.8  # the engine's value, shown
            lab.store.flush()
            last = lab.store.events("nb", action="parameter_update")[-1]
            assert (last.user_id, last.details["value"]) == ("notebook", 0.8)  # applied last
            panel.close()

    run(scenario())


def test_binary_plugin_panel_shows_the_plugins_own_text(tmp_path: Path, vst_path: str) -> None:
    """A VST's labels show its own display text ("2.4 s"), read off the loop, also while a
    render holds the engine's owner thread, for the panel's own moves and a client's."""
    if "Dragonfly" not in vst_path:
        pytest.skip("this check uses Dragonfly parameters: apt-get install dragonfly-reverb-vst")

    def seconds(panel: PluginPanel) -> float | None:
        text = panel.texts["decay"].value.removeprefix("<code>").removesuffix("</code>")
        return float(text[:-2]) if text.endswith(" s") else None

    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            vst = await lab.add_plugin("drums", "Dragonfly", vst_path)
            await lab.update(vst, {"decay": 0.2})
            panel = lab.panel(vst)
            await eventually(lambda: seconds(panel) is not None)
            short = seconds(panel)
            assert panel.texts["decay"].value == f"<code>{html.escape(vst.text('decay'))}</code>"

            lab.set_source("drums", Source.noise(20.0))
            render = asyncio.ensure_future(lab.engine.render_async(20.0))
            panel.controls["decay"].value = 0.8  # while the owner thread renders
            await eventually(lambda: (seconds(panel) or 0) > 2 * short, timeout=30)
            long = seconds(panel)
            async with colleague(lab) as client:
                await client.set_parameter("drums", vst.id, "decay", 0.4)
                await eventually(lambda: short < (seconds(panel) or 0) < long)
            await render
            assert panel.texts["decay"].value == f"<code>{html.escape(vst.text('decay'))}</code>"
            panel.close()

    run(scenario())


def test_value_off_the_sliders_step_is_shown_rounded_and_not_sent_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            async with colleague(lab) as client:
                await client.set_parameter("drums", reverb.id, "damping", 0.456)
                await eventually(lambda: panel.controls["damping"].value == 0.46)
                await asyncio.sleep(SETTLE)
                assert lab.plugin(reverb.id).get("damping") == 0.456  # the exact value stays
                assert client.drain() == []  # no rounded echo overwrote it
                assert len(lab.store.events("nb", action="parameter_update")) == 1
            panel.close()

    run(scenario())


def test_refused_value_raises_shows_an_error_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            with pytest.raises(InvalidParameter, match="out of range"):
                await lab.set(reverb, "wet_dry", 99)
            assert reverb.get("wet_dry") == 0.3

            # through the control: a widget misconfigured to allow 99 is refused by the core,
            # the panel shows why and puts the control back to the engine's value
            slider = panel.controls["wet_dry"]
            slider.max = 100.0
            slider.value = 99.0
            await eventually(lambda: "out of range" in panel.status.value)
            await eventually(lambda: slider.value == 0.3)
            assert reverb.get("wet_dry") == 0.3
            assert lab.store.events("nb", action="parameter_update") == []
            panel.close()

    run(scenario())


def test_slider_moved_from_another_thread_applies_on_the_loop(tmp_path: Path) -> None:
    """JupyterLab 4.6 + ipykernel 7 deliver widget messages on a subshell thread."""

    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            slider = panel.controls["room_size"]
            applied_on: list[threading.Thread] = []
            original = lab.set

            async def spy(*args: Any, **kwargs: Any) -> float:
                applied_on.append(threading.current_thread())
                return await original(*args, **kwargs)

            lab.set = spy  # type: ignore[method-assign]
            async with colleague(lab) as client:
                thread = threading.Thread(target=lambda: setattr(slider, "value", 0.3))
                thread.start()
                await asyncio.to_thread(thread.join)
                update = await client.wait_for("PLUGIN_STATE_UPDATE")
                assert update["data"]["parameters"] == {"room_size": 0.3}
                assert lab.plugin(reverb.id).get("room_size") == 0.3
                assert applied_on == [threading.main_thread()]  # the loop's thread, not the caller's
            panel.close()

    run(scenario())


def test_close_removes_every_observer_and_listener(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            listeners_before = len(lab._listeners)
            panel = lab.panel(reverb)
            assert len(lab._listeners) == listeners_before + 1
            observed = list(panel._observers)
            assert len(observed) == len(panel.controls) + 2  # + bypass + preset dropdown
            panel.close()
            assert len(lab._listeners) == listeners_before and panel._observers == []
            for widget, handler, name in observed:
                assert handler not in widget._trait_notifiers.get(name, {}).get("change", [])
            panel.controls["wet_dry"].value = 0.9
            panel.bypass.value = True
            await asyncio.sleep(SETTLE)
            assert reverb.get("wet_dry") == 0.3 and reverb.bypass is False
            async with colleague(lab) as client:
                await client.set_parameter("drums", reverb.id, "room_size", 0.7)
                await asyncio.sleep(SETTLE)
                assert panel.controls["room_size"].value == 0.5  # closed: no longer follows
            assert lab.store.events("nb", action="parameter_update")[-1].user_id == "colleague"

    run(scenario())


def test_bypass_toggle_and_preset_dropdown(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            async with colleague(lab) as client:
                panel.bypass.value = True
                message = await client.wait_for("PLUGIN_BYPASS")
                assert message["data"]["bypass"] is True and reverb.bypass is True

                await client.set_bypass("drums", reverb.id, False)
                await eventually(lambda: panel.bypass.value is False)
                assert reverb.bypass is False

                assert "Large Hall" in panel.presets.options
                panel.presets.value = "Large Hall"
                preset = await client.wait_for("PLUGIN_PRESET")
                values = preset["data"]["parameters"]
                assert reverb.values == values
                for pid, value in values.items():
                    assert panel.controls[pid].value == pytest.approx(value)

                assert panel.presets.value == ""  # a load is an action: the same preset
                await client.set_parameter("drums", reverb.id, "room_size", 0.99)
                await eventually(lambda: panel.controls["room_size"].value == 0.99)
                panel.presets.value = "Large Hall"  # can be picked again, and reloads
                await eventually(lambda: reverb.get("room_size") == values["room_size"])
                assert "loaded preset 'Large Hall'" in panel.status.value

                panel.preset_name.value = "my room"
                panel.save.click()
                await eventually(lambda: "my room" in panel.presets.options)
                assert "my room" in reverb.presets()
                assert (tmp_path / "presets").is_dir()
                assert "saved preset" in panel.status.value
            panel.close()

    run(scenario())


def test_cursor_update_marks_the_parameter_being_edited(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            async with colleague(lab) as client, colleague(lab, "bob") as bob:
                await client.cursor(plugin_id=reverb.id, parameter_id="pre_delay")
                await bob.cursor(plugin_id=reverb.id, parameter_id="damping")
                await eventually(lambda: "bob" in panel.editing["damping"].value)
                assert "✎ colleague" in panel.editing["pre_delay"].value  # both are shown
                assert panel.editing["wet_dry"].value == ""
                await bob.cursor(plugin_id=reverb.id, parameter_id="pre_delay")
                await eventually(lambda: panel.editing["pre_delay"].value == "<i>✎ bob, colleague</i>")
                assert panel.editing["damping"].value == ""

                panel.controls["wet_dry"].value = 0.6  # the notebook user's own move is
                seen = await client.wait_for(  # announced to the others, once per parameter
                    "USER_CURSOR_UPDATE", lambda m: m["data"].get("user_id") == "notebook")
                assert seen["data"]["parameter_id"] == "wet_dry"
            await eventually(lambda: all(label.value == "" for label in panel.editing.values()))
            panel.close()  # both left: their marks are gone

    run(scenario())


# -- track and presence panels ------------------------------------------------------------------
def test_track_panel_renders_audio_into_its_output(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            await lab.add_plugin("drums", "Filter")
            await lab.add_plugin("drums", "Reverb")
            panel = lab.track_panel("drums", seconds=0.5)
            assert isinstance(panel, TrackPanel) and len(panel.panels) == 2
            assert all(isinstance(p, PluginPanel) for p in panel.panels)
            audio = await panel.render()
            assert audio.shape == (2, 22050) and np.abs(audio).max() > 0.01
            kinds = [set(o["data"]) for o in panel.output.outputs]
            assert len(kinds) == 2
            assert "text/html" in kinds[0] and "<audio" in panel.output.outputs[0]["data"]["text/html"]
            assert "image/png" in kinds[1]

            panel.seconds.value = 0.25  # the button does the same on the loop
            panel.button.click()
            await eventually(lambda: panel.last_audio is not None
                             and panel.last_audio.shape[1] == 11025)

            panel.seconds.value = 0.0  # a refused render says why, next to the button
            panel.button.click()
            await eventually(lambda: "seconds must be a positive" in panel.status.value)
            assert panel.last_audio.shape[1] == 11025  # nothing else changed
            panel.close()

    run(scenario())


def test_a_track_panel_follows_the_chain(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            filt = await lab.add_plugin("drums", "Filter")
            panel = lab.track_panel("drums", seconds=0.25)
            names = lambda: [p.plugin.name for p in panel.panels]
            async with colleague(lab) as client:
                await client.add_plugin("drums", "Reverb")  # a colleague's
                await eventually(lambda: names() == ["Filter", "Reverb"])
                await lab.add_plugin("drums", "Delay")  # the notebook's own
                assert names() == ["Filter", "Reverb", "Delay"]
                await client.remove_plugin("drums", filt.id)
                await eventually(lambda: names() == ["Reverb", "Delay"])
                assert [c for c in panel.widget.children][:2] == [p.widget for p in panel.panels]
                await client.add_plugin("other", "Utility")  # another track: not this panel
                await client.ping()
                assert names() == ["Reverb", "Delay"]
            panel.close()

    run(scenario())


def test_a_track_panel_of_a_stopped_lab_says_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        lab = await pluginlab.start("nb", **lab_options(tmp_path))
        await lab.add_plugin("drums", "Reverb")
        panel = lab.track_panel("drums", seconds=0.25)
        await lab.stop()
        panel.button.click()
        await eventually(lambda: "lab is stopped" in panel.status.value)
        assert panel.last_audio is None and panel.output.outputs == ()  # nothing rendered
        panel.close()

    run(scenario())


def test_renders_are_recorded_with_a_fingerprint_of_the_audio(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            await lab.set(reverb, "wet_dry", 0.7)
            audio = await lab.render(0.5, "drums")
            lab.store.flush()
            event = lab.store.events("nb", action="render")[-1]
            assert (event.entity_type, event.entity_id, event.operation, event.user_id) == (
                "render", "drums", "render", "notebook")
            d = event.details
            assert (d["track_id"], d["seconds"], d["sample_rate"], d["channels"],
                    d["samples"]) == ("drums", 0.5, 44100, 2, 22050)
            samples = np.ascontiguousarray(audio, dtype=np.float32)
            assert d["audio_sha256"] == hashlib.sha256(samples.tobytes()).hexdigest()
            assert d["peak"] == pytest.approx(float(np.abs(audio).max()))
            assert d["rms"] == pytest.approx(float(np.sqrt(np.mean(audio.astype(float) ** 2))))
            # its place in the log pins the state that was rendered
            state = lab.store.state_at("nb", daid=event.daid)
            assert state["drums"][0]["parameters"]["wet_dry"] == 0.7
            await lab.render(0.25)  # the mix: entity "mix", chained after the track's render
            mix = lab.store.events("nb", action="render")[-1]
            assert (mix.entity_id, mix.details["track_id"], mix.details["samples"]) == (
                "mix", None, 11025)
            assert lab.store.verify().ok

    run(scenario())


def test_presence_panel_shows_who_is_in_the_session(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            presence = lab.presence_panel()
            assert isinstance(presence, PresencePanel)
            assert "notebook" in presence.widget.value and "colleague" not in presence.widget.value
            async with colleague(lab):
                await eventually(lambda: "colleague" in presence.widget.value)
                assert lab.members == {"notebook", "colleague"}
            await eventually(lambda: "colleague" not in presence.widget.value)
            presence.close()

    run(scenario())


def test_panel_of_a_removed_plugin_is_disabled_and_refusals_are_shown(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_lab(tmp_path) as lab:
            reverb = await lab.add_plugin("drums", "Reverb")
            panel = lab.panel(reverb)
            async with colleague(lab) as client:
                panel.bypass.value = True  # a refused toggle below must come back to this
                await eventually(lambda: reverb.bypass)
                await client.remove_plugin("drums", reverb.id)
                await eventually(lambda: panel.controls["wet_dry"].disabled)
                assert panel.bypass.disabled and "removed by colleague" in panel.status.value
                panel.bypass.value = False  # e.g. a click that raced the removal
                await eventually(lambda: "not found" in panel.status.value)
                assert panel.bypass.value is True  # put back: the plugin never changed
            panel.close()

    run(scenario())


def test_a_stopped_lab_says_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        lab = await pluginlab.start("nb", **lab_options(tmp_path))
        reverb = await lab.add_plugin("drums", "Reverb")
        panel = lab.panel(reverb)
        await lab.stop()
        with pytest.raises(RuntimeError, match="lab is stopped"):
            lab.engine  # noqa: B018 - the property is what is tested
        with pytest.raises(RuntimeError, match="lab is stopped"):
            await lab.set(reverb, "wet_dry", 0.5)
        for make in (lambda: lab.panel(reverb), lambda: lab.track_panel("drums"),
                     lab.presence_panel, lambda: lab.token("colleague"),
                     lambda: lab.listen(print)):
            with pytest.raises(RuntimeError, match="lab is stopped"):
                make()
        panel.controls["wet_dry"].value = 0.5
        await eventually(lambda: "lab is stopped" in panel.status.value)
        panel.close()

    run(scenario())


def test_a_panel_whose_labs_loop_is_gone_reports_it(tmp_path: Path) -> None:
    """A script's second ``asyncio.run``: the old panel says its lab is stopped, and leaves
    no never-awaited coroutine behind."""
    async def first() -> PluginPanel:
        lab = await pluginlab.start("nb", **lab_options(tmp_path))
        panel = lab.panel(await lab.add_plugin("drums", "Reverb"))
        await lab.stop()
        return panel

    panel = asyncio.run(first())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be one
        panel.controls["wet_dry"].value = 0.5
        panel.bypass.value = True
        gc.collect()
    assert "lab is stopped" in panel.status.value
    panel.close()
