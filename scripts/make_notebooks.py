"""Generate the tutorial notebooks in notebooks/ (committed without outputs).

    python scripts/make_notebooks.py            # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if a notebook differs from this script

Each notebook tells one researcher's story and asserts its key results on the kernel side
(nbmake keeps stale widget state for updates made by background tasks, so saved widget state
is never asserted). Conventions shared by all four:

* the first code cell is tagged ``parameters`` and holds small values (durations, counts) so
  tests stay fast; papermill/nbmake-style runners may override them;
* the notebook metadata carries its own execution timeout (``{"execution": {"timeout": 300}}``,
  read by nbmake and by tests/test_notebooks.py);
* the provenance database and the user presets live in a temporary directory that the last
  cell removes, after ``await lab.stop()``: running a notebook leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TIMEOUT = 300

METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                   "name": "python3"},
    "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    "execution": {"timeout": TIMEOUT},
}


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def parameters(text: str) -> nbformat.NotebookNode:
    return code(text, "parameters")


def setup(session: str, prefix: str, extra_imports: str = "") -> nbformat.NotebookNode:
    """The common opening cell: imports, a temp dir, ``lab = await pluginlab.start(...)``."""
    imports = textwrap.dedent(extra_imports).strip()
    return code(
        f'''
%matplotlib inline
import asyncio
import shutil
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import Audio, display

import pluginlab
from pluginlab import Source
{imports}

if "workdir" not in globals() or not workdir.exists():   # kept when this cell is re-run,
    workdir = Path(tempfile.mkdtemp(prefix="{prefix}"))  # so start() returns the same lab
                                                   # (the last cell removes it)
lab = await pluginlab.start(
    "{session}",                                  # the session this notebook joins
    db=str(workdir / "provenance.sqlite"),        # the DAID event log (SQLite)
    presets_dir=str(workdir / "presets"),         # user presets (factory presets are built in)
)
lab
'''
    )


def teardown() -> list[nbformat.NotebookNode]:
    return [
        md("""
        ## Clean up

        `lab.stop()` closes every connection and releases the engine; the temporary folder
        holds the provenance database and presets of this run.
        """),
        code("""
        await lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        assert lab.stopped and not workdir.exists()
        print("stopped", lab)
        """),
    ]


HELPERS = '''
def rms_db(audio):
    """RMS level in dBFS."""
    return float(20 * np.log10(np.sqrt(np.mean(np.square(audio))) + 1e-12))


def power_spectrum(audio, rate):
    """Power spectrum of the mono mix (Hann window: no leakage from the cut at the edges)."""
    mono = np.mean(audio, axis=0)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono)))) ** 2
    return np.fft.rfftfreq(len(mono), 1 / rate), spectrum


def band_db(audio, rate, lo, hi):
    """Energy (dB) of the mono mix between lo and hi Hz."""
    freqs, spectrum = power_spectrum(audio, rate)
    return float(10 * np.log10(spectrum[(freqs >= lo) & (freqs < hi)].sum() + 1e-20))


def centroid_hz(audio, rate):
    """Spectral centroid of the mono mix: where the energy sits, on average."""
    freqs, spectrum = power_spectrum(audio, rate)
    return float((freqs * spectrum).sum() / (spectrum.sum() + 1e-20))
'''


# ---------------------------------------------------------------------------------------------
def quickstart() -> nbformat.NotebookNode:
    cells = [
        md("""
        # pluginlab quickstart: a drum loop through Filter → Compressor → Reverb

        This notebook starts a **lab**: a pluginlab server running inside this kernel, with the
        notebook itself as the first member of a session. Every change below — from code or from
        a slider — goes through the same validated core as a colleague's browser would, and is
        recorded as a DAID provenance event.

        You will: build a chain on a drum loop, get sliders for every parameter, render and
        listen, change a parameter and *measure* the difference, and see what happens with bad
        input.
        """),
        parameters("""
        # parameters
        seconds = 2.0          # length of each render (the loop is 4 s)
        cutoff_after = 400.0   # the darker filter setting we compare against (Hz)
        """),
        setup("quickstart", "pluginlab-quickstart-",
              "from pluginlab import PluginlabError\n"
              "from pluginlab.analysis import plot_comparison, plot_spectrogram, plot_waveform"),
        md("""
        `pluginlab.start` is idempotent: re-running the cell returns the same lab (same port);
        calling it with other arguments stops the old one first. `lab.url` and
        `lab.token("colleague")` are what a colleague needs to join (notebook 02).

        ## Build a chain

        A track is fed by a **source** (an audio file, or a generated sine/noise/sweep) and runs
        through a chain of plugins. Built-in effects are Faust programs, so no binaries are
        needed.
        """),
        code("""
        lab.set_source("drums", Source.file("drum_loop.wav"))   # relative names resolve in data/
        filt = await lab.add_plugin("drums", "Filter")
        comp = await lab.add_plugin("drums", "Compressor")
        reverb = await lab.add_plugin("drums", "Reverb")

        chain = [p.name for p in lab.engine.track("drums").plugins]
        assert chain == ["Filter", "Compressor", "Reverb"], chain
        print(" -> ".join(chain))
        reverb.parameters["wet_dry"]     # every parameter has a range, a step, a unit, a default
        """),
        code("""
        await lab.update(filt, {"type": "lowpass", "cutoff": 12000.0})   # choices accept names
        await lab.update(comp, {"threshold": -24.0, "ratio": 3.0})
        await lab.set(reverb, "wet_dry", 0.35)
        assert filt.get("cutoff") == 12000.0 and reverb.get("wet_dry") == 0.35
        {p.name: p.values for p in lab.engine.track("drums").plugins}
        """),
        md("""
        ## Sliders for the whole track

        `lab.track_panel("drums")` shows one panel per plugin (a slider, dropdown or checkbox
        per parameter, with its unit and the plugin's own display text), a bypass toggle and a
        preset menu per plugin, and a **render & play** button with a waveform and spectrum.
        Moving a slider sends the change through the core, exactly like a remote client.
        """),
        code("""
        panel = lab.track_panel("drums", seconds=seconds)
        panel
        """),
        md("""
        ## Render and listen

        `await lab.render(...)` renders on the engine's own thread; the kernel's loop (and the
        server on it) keeps running meanwhile.
        """),
        code("""
        rate = lab.engine.sample_rate
        bright = await lab.render(seconds, "drums")
        assert bright.shape == (2, int(round(seconds * rate))), bright.shape
        assert np.isfinite(bright).all() and np.abs(bright).max() > 0.01
        display(Audio(bright, rate=rate))
        plot_waveform(bright, rate)
        """),
        code("""
        plot_spectrogram(bright[:1], rate)     # left channel
        """),
        md("""
        ## Change a parameter and measure the difference

        Close the filter down to a few hundred hertz. The slider in the panel above follows
        (the notebook's own changes are shown on its widgets too), and the rendered audio loses
        most of its energy above 2 kHz.
        """),
        code(HELPERS),
        code("""
        applied = await lab.set(filt, "cutoff", cutoff_after)
        dark = await lab.render(seconds, "drums")

        hf_change = band_db(dark, rate, 2000, 20000) - band_db(bright, rate, 2000, 20000)
        print(f"cutoff 12000 -> {applied:.0f} Hz: energy above 2 kHz {hf_change:+.1f} dB, "
              f"spectral centroid {centroid_hz(bright, rate):.0f} -> {centroid_hz(dark, rate):.0f} Hz, "
              f"RMS {rms_db(bright):.1f} -> {rms_db(dark):.1f} dBFS (the kick dominates the level)")
        assert hf_change < -20, hf_change
        assert centroid_hz(dark, rate) < 0.5 * centroid_hz(bright, rate)

        filter_panel = panel.panels[0]
        assert filter_panel.controls["cutoff"].value == cutoff_after   # the slider followed
        display(Audio(dark, rate=rate))
        plot_comparison(bright, dark, rate)     # "dry" = bright filter, "wet" = dark filter
        """),
        md("""
        ## Presets

        Each plugin type has factory presets; your own are saved in `presets_dir` (here a
        temporary folder). Loading a preset is one recorded change, and the sliders follow.
        """),
        code("""
        print("reverb presets:", reverb.presets())
        loaded = await lab.preset(reverb, "load", "Large Hall")
        reverb_panel = panel.panels[2]
        assert all(abs(reverb_panel.controls[pid].value - value) < 0.01
                   for pid, value in loaded["parameters"].items())
        await lab.set(reverb, "wet_dry", 0.5)
        await lab.preset(reverb, "save", "my hall")
        assert "my hall" in reverb.presets()
        loaded["parameters"]
        """),
        md("""
        ## Bad input gives a readable error — and the kernel survives

        Every value is validated, never silently clamped; unknown names list the valid ones.
        The same errors reach a browser as `ERROR` messages with a code.
        """),
        code("""
        wet_before = reverb.get("wet_dry")
        attempts = {
            "unknown plugin": lambda: lab.add_plugin("drums", "Reverbb"),
            "unknown preset": lambda: lab.preset(reverb, "load", "Cathedral"),
            "out of range": lambda: lab.set(reverb, "wet_dry", 7.5),
            "unknown parameter": lambda: lab.set(reverb, "wetness", 0.5),
        }
        caught = {}
        for what, attempt in attempts.items():
            try:
                await attempt()
            except PluginlabError as exc:
                caught[what] = exc.code.value
                print(f"{what:>17}: [{exc.code.value}] {exc}")

        assert caught == {"unknown plugin": "PLUGIN_ADD_FAILED",
                          "unknown preset": "PRESET_LOAD_FAILED",
                          "out of range": "INVALID_PARAMETER",
                          "unknown parameter": "INVALID_PARAMETER"}, caught
        assert reverb.get("wet_dry") == wet_before        # nothing changed
        assert len(lab.engine.track("drums").plugins) == 3
        print("still running:", lab)
        """),
        md("""
        Everything above was recorded. Notebook 03 turns this log into tables, plots, time
        travel and a replay.
        """),
        code("""
        events = lab.store.events(lab.session_id)
        print(len(events), "events, chain", "ok" if lab.store.verify() else "BROKEN")
        for event in events[-3:]:
            print(event.timestamp, event.user_id, event.action, event.details.get("parameter_id", ""))
        assert lab.store.verify().ok
        """),
        *teardown(),
    ]
    return _notebook(cells)


# ---------------------------------------------------------------------------------------------
def collaboration() -> nbformat.NotebookNode:
    cells = [
        md("""
        # Collaboration: a colleague joins the notebook's session

        The lab's server runs inside this kernel. Anyone with its URL and a token — a browser,
        a script, another notebook — joins the same session and sees the same plugins. Here the
        colleague is a `pluginlab.Client` running inside this kernel, so the notebook can check
        both sides.

        What to watch: the colleague's changes move the notebook's sliders; the notebook's
        slider moves reach the colleague; presence and "who is editing what" are shown live;
        nobody receives an echo of their own change.
        """),
        parameters("""
        # parameters
        settle = 0.3      # seconds to let broadcasts arrive (the broadcast throttle window is 50 ms)
        burst = 20        # number of rapid changes in the burst test
        """),
        setup("jam", "pluginlab-collab-", "from pluginlab import Client"),
        code("""
        lab.set_source("drums", Source.file("drum_loop.wav"))
        reverb = await lab.add_plugin("drums", "Reverb", plugin_id="reverb")
        presence = lab.presence_panel()
        panel = lab.panel(reverb)
        display(presence, panel)
        """),
        md("""
        ## A colleague joins

        `lab.token("colleague")` issues a token for this server (JWT). A browser would connect
        to `lab.url` with it; a script uses `pluginlab.Client` (inside a kernel it connects
        without a proxy by default).
        """),
        code("""
        print("server:", lab.url)
        colleague = await Client(lab.url).connect()
        joined = await colleague.authenticate(lab.token("colleague"), session_id=lab.session_id)
        await asyncio.sleep(settle)

        print("colleague sees members:", joined["snapshot"]["members"])
        print("colleague sees plugins:", [p["plugin_id"] for p in joined["snapshot"]["tracks"]["drums"]])
        assert "colleague" in lab.members
        assert "colleague" in presence.widget.value
        presence
        """),
        md("""
        ## The colleague turns a knob → the notebook's slider and engine follow
        """),
        code("""
        await colleague.set_parameter("drums", "reverb", "room_size", 0.85)
        await asyncio.sleep(settle)

        print("slider:", panel.controls["room_size"].value, " engine:", lab.plugin("reverb").get("room_size"))
        assert panel.controls["room_size"].value == 0.85
        assert lab.plugin("reverb").get("room_size") == 0.85
        """),
        md("""
        ## The notebook moves a slider → the colleague receives the update

        Setting `panel.controls[...].value` in code is exactly what dragging the slider does.
        The colleague receives a `PLUGIN_STATE_UPDATE` saying who changed what, with the DAID
        of the recorded event.
        """),
        code("""
        panel.controls["wet_dry"].value = 0.6
        update = await colleague.wait_for(
            "PLUGIN_STATE_UPDATE", lambda m: "wet_dry" in (m["data"].get("parameters") or {}))

        data = update["data"]
        print(data["changed_by"], data["parameters"], data["daid"])
        assert data["changed_by"] == "notebook" and data["parameters"]["wet_dry"] == 0.6
        assert lab.plugin("reverb").get("wet_dry") == 0.6
        """),
        md("""
        ## No echo, no drift

        A value off the slider's step is *shown* rounded, but the engine keeps the exact value
        and nothing is sent back to the colleague (without care, the widget would "answer" with
        its rounded value and overwrite the colleague's change).
        """),
        code("""
        colleague.drain()
        await colleague.set_parameter("drums", "reverb", "damping", 0.333)
        await asyncio.sleep(settle)

        print("slider:", panel.controls["damping"].value, " engine:", lab.plugin("reverb").get("damping"))
        assert panel.controls["damping"].value == 0.33
        assert lab.plugin("reverb").get("damping") == 0.333
        assert colleague.drain() == [], "the colleague got an echo of its own change"
        """),
        md("""
        A burst of changes is throttled per parameter (first at once, the last one always
        delivered), so the slider ends on the colleague's final value.
        """),
        code("""
        values = [round(0.1 + 0.8 * i / (burst - 1), 2) for i in range(burst)]
        for value in values:
            await colleague.set_parameter("drums", "reverb", "room_size", value)
        await asyncio.sleep(settle)
        assert panel.controls["room_size"].value == values[-1]
        assert lab.plugin("reverb").get("room_size") == values[-1]
        print(f"{burst} changes, slider ends at {panel.controls['room_size'].value}")
        """),
        md("""
        ## Presence and cursors

        Clients announce what they are editing with `USER_CURSOR_UPDATE`; the panel marks the
        parameter with "✎ user". The notebook can announce its own cursor too.
        """),
        code("""
        await colleague.cursor(track_id="drums", plugin_id="reverb", parameter_id="pre_delay")
        await asyncio.sleep(settle)
        print(panel.editing["pre_delay"].value)
        assert "✎ colleague" in panel.editing["pre_delay"].value

        await lab.cursor(track_id="drums", plugin_id="reverb", parameter_id="wet_dry")
        seen = await colleague.wait_for("USER_CURSOR_UPDATE")
        assert seen["data"]["user_id"] == "notebook" and seen["data"]["parameter_id"] == "wet_dry"
        panel
        """),
        md("""
        ## Bypass and presets travel too
        """),
        code("""
        await colleague.set_bypass("drums", "reverb", True)
        await asyncio.sleep(settle)
        assert panel.bypass.value is True and lab.plugin("reverb").bypass

        loaded = await colleague.preset("drums", "reverb", "load", "Small Room")
        await asyncio.sleep(settle)
        for pid, value in loaded["parameters"].items():
            assert abs(panel.controls[pid].value - value) < 0.01, pid
        print("colleague loaded 'Small Room':", loaded["parameters"])

        panel.bypass.value = False        # the notebook switches it back on
        back = await colleague.wait_for("PLUGIN_BYPASS")
        assert back["data"]["bypass"] is False
        """),
        md("""
        ## Who did what

        Every accepted change is a DAID event in the provenance log, with its author.
        """),
        code("""
        for event in lab.store.events(lab.session_id, action="parameter_update")[-6:]:
            d = event.details
            print(event.timestamp, f"{event.user_id:>10}", d["parameter_id"], d["previous_value"], "->", d["value"])
        authors = {e.user_id for e in lab.store.events(lab.session_id, action="parameter_update")}
        assert authors == {"notebook", "colleague"}, authors
        """),
        md("""
        ## The colleague leaves
        """),
        code("""
        await colleague.close()
        await asyncio.sleep(settle)
        assert "colleague" not in lab.members
        presence.widget.value
        """),
        *teardown(),
    ]
    return _notebook(cells)


# ---------------------------------------------------------------------------------------------
def provenance_analysis() -> nbformat.NotebookNode:
    cells = [
        md("""
        # Provenance analysis: what happened, when, by whom — and what did it sound like?

        Every change in a lab is a DAID event in a tamper-evident log (SQLite, hash chain).
        This notebook records a short tweaking session by two people, then:

        1. loads the log into a pandas DataFrame and plots the parameter timeline and activity;
        2. verifies the hash chain;
        3. travels in time: the chain's state at any moment, rebuilt from the log alone;
        4. **replays** the session as automation and checks the sound changes where the
           recorded change happened.
        """),
        parameters("""
        # parameters
        steps = 10        # tweaks before and after the decisive change
        interval = 0.05   # seconds between tweaks
        bright_cutoff = 12000.0
        dark_cutoff = 300.0
        """),
        setup("tweaks", "pluginlab-provenance-",
              "from pluginlab import Client\n"
              "from pluginlab.analysis import (activity_summary, events_frame, parameter_history,\n"
              "                                plot_activity, plot_comparison, plot_parameter_timeline,\n"
              "                                plot_spectrogram)\n"
              "from pluginlab.replay import replay, restore_engine"),
        code("""
        lab.set_source("drums", Source.file("drum_loop.wav"))
        reverb = await lab.add_plugin("drums", "Reverb", plugin_id="reverb")
        filt = await lab.add_plugin("drums", "Filter", plugin_id="filter")   # shapes the reverb too
        colleague = await Client(lab.url).connect()
        await colleague.authenticate(lab.token("colleague"), session_id=lab.session_id)
        """),
        md("""
        ## Record a tweaking session

        The notebook opens the filter and nudges the reverb's mix; then makes one decisive
        change (the filter closes down to a few hundred hertz) while the colleague sweeps the
        room size.
        """),
        code("""
        await lab.set(filt, "cutoff", bright_cutoff)
        for i in range(steps):
            await lab.set(reverb, "wet_dry", round(0.2 + 0.04 * i, 2))
            await asyncio.sleep(interval)

        await lab.set(filt, "cutoff", dark_cutoff)          # the decisive change

        for i in range(steps):
            await colleague.set_parameter("drums", "reverb", "room_size", round(0.3 + 0.05 * i, 2))
            await asyncio.sleep(interval)
        await colleague.close()
        print(lab.store.count(), "events recorded")
        """),
        md("""
        ## The log as a DataFrame
        """),
        code("""
        frame = events_frame(lab.store, session_id=lab.session_id)
        updates = frame[frame["action"] == "parameter_update"]
        assert len(updates) == 2 * steps + 2, len(updates)
        frame[["timestamp", "user_id", "action", "plugin_id", "parameter_id", "value"]].tail(8)
        """),
        code("""
        history = parameter_history(frame, "reverb", "wet_dry")
        assert history["value"].iloc[0] == 0.3                       # the value it was created with
        assert history["value"].iloc[-1] == round(0.2 + 0.04 * (steps - 1), 2)
        history.tail()
        """),
        code("""
        plot_parameter_timeline(frame, plugin_id="reverb")
        """),
        code("""
        summary = activity_summary(frame)
        assert summary.loc["notebook", "parameter_update"] == steps + 2
        assert summary.loc["colleague", "parameter_update"] == steps
        summary
        """),
        code("""
        plot_activity(frame)
        """),
        md("""
        ## Is the log intact?

        Each event's hash covers the previous one; editing or deleting a row breaks the chain
        from that row on (`pluginlab daid verify` does the same from the command line).
        """),
        code("""
        result = lab.store.verify()
        print(result)
        assert result.ok and result.checked == lab.store.count()
        """),
        md("""
        ## Time travel

        `state_at(session, t)` rebuilds the chain from the log alone, as it was at time `t`.
        Take the middle of the notebook's wet/dry tweaks: the mix has its middle value, and the
        filter is still open.
        """),
        code("""
        wet = updates[updates["parameter_id"] == "wet_dry"].reset_index(drop=True)
        middle = wet.iloc[len(wet) // 2]
        state = lab.store.state_at(lab.session_id, middle["timestamp"])
        then = {p["plugin_id"]: p["parameters"] for p in state["drums"]}
        print(middle["timestamp"], "wet_dry =", then["reverb"]["wet_dry"], " cutoff =", then["filter"]["cutoff"])
        assert then["reverb"]["wet_dry"] == middle["value"]
        assert then["filter"]["cutoff"] == bright_cutoff
        assert lab.plugin("filter").get("cutoff") == dark_cutoff     # while now it is closed
        """),
        md("""
        `restore_engine` turns such a state into a working engine: hear the chain as it was.
        (Sessions do not store track sources, so give it the input again.)
        """),
        code("""
        past = restore_engine(lab.store, lab.session_id, at=middle["timestamp"])
        past.add_track("drums", Source.file("drum_loop.wav"))
        assert past.plugin("filter").get("cutoff") == bright_cutoff
        then_audio = past.render(1.0, track_id="drums")
        past.close()
        display(Audio(then_audio, rate=44100))
        """),
        md("""
        ## Replay the session

        `replay` renders the track with the recorded parameter changes applied as automation at
        the times they happened (relative to half a second before the first change). The
        decisive filter change should be audible — and measurable — exactly where it happened:
        compare equal stretches before and after it. (The level hardly moves — kick and bass
        dominate the RMS — so the spectrum is the measure: energy above 2 kHz and the centroid.)
        """),
        code(HELPERS),
        code("""
        rep = replay(lab.store, lab.session_id, "drums", source=Source.file("drum_loop.wav"))
        print(f"{rep.seconds:.2f} s rendered, {len(rep.changes)} changes replayed, {len(rep.skipped)} skipped")
        assert len(rep.changes) == 2 * steps + 2 and not rep.skipped

        opened = next(c for c in rep.changes if c.parameter_id == "cutoff" and c.value == bright_cutoff)
        closed = next(c for c in rep.changes if c.parameter_id == "cutoff" and c.value == dark_cutoff)
        a, b = (int(round(t * rep.sample_rate)) for t in (opened.time, closed.time))
        before = rep.audio[:, a:b]                   # filter open
        after = rep.audio[:, b:b + (b - a)]          # filter closed, same length
        hf_change = band_db(after, rep.sample_rate, 2000, 20000) - band_db(before, rep.sample_rate, 2000, 20000)
        print(f"change at {closed.time:.3f} s: energy above 2 kHz {hf_change:+.1f} dB, spectral centroid "
              f"{centroid_hz(before, rep.sample_rate):.0f} -> {centroid_hz(after, rep.sample_rate):.0f} Hz, "
              f"RMS {rms_db(before):.1f} -> {rms_db(after):.1f} dBFS")
        assert hf_change < -20, hf_change
        assert centroid_hz(after, rep.sample_rate) < 0.5 * centroid_hz(before, rep.sample_rate)
        display(Audio(rep.audio, rate=rep.sample_rate))
        """),
        md("""
        In the spectrogram: the half-second lead-in plays the chain as it was before the first
        change (the filter at its initial 1 kHz), then the open filter, then the dark one from
        the dashed line on.
        """),
        code("""
        figure = plot_spectrogram(rep.audio[:1], rep.sample_rate)
        for ax in figure.axes[:1]:
            ax.axvline(closed.time, color="cyan", linestyle="--", linewidth=1)
            ax.set_title("Replay (left channel); dashed: the recorded filter change")
        figure
        """),
        code("""
        plot_comparison(before, after, rep.sample_rate)     # "dry" = before, "wet" = after the change
        """),
        *teardown(),
    ]
    return _notebook(cells)


# ---------------------------------------------------------------------------------------------
def external_plugins() -> nbformat.NotebookNode:
    cells = [
        md("""
        # External plugins: real Linux VSTs next to the built-ins

        pluginlab hosts VST2 (`.so`) and VST3 (`.vst3`) binaries through DawDreamer. Their
        parameters appear with the host's normalized 0..1 values, the plugin's own unit label
        and display text. This notebook scans the usual folders, loads one plugin behind a
        built-in filter, gives it sliders, changes it and compares the sound.

        If no plugin is installed, it says what to install and skips the rest (no failure).
        """),
        parameters("""
        # parameters
        seconds = 2.0
        vst_dirs = None   # folders to scan; None = the usual ones ([] shows the no-plugin path)
        # preferred plugins and the parameter change that makes an audible difference
        preferred = {
            "DragonflyRoomReverb": {"late_level": 0.7, "decay": 0.4},
            "DragonflyPlateReverb": {"wet_level": 0.7},
            "ZamVerb": {"wet_dry": 1.0},
            "ZamTube": {"tube_drive": 1.0},
        }
        """),
        setup("external", "pluginlab-vst-",
              "import dataclasses\n\n"
              "import pandas as pd\n\n"
              "from pluginlab.analysis import plot_comparison\n"
              "from pluginlab.vst import default_dirs, scan"),
        md("""
        ## What is installed?

        `scan()` looks in `/usr/lib/vst`, `/usr/lib/lxvst`, `/usr/lib/vst3`, `~/.vst`, `~/.vst3`,
        and the folders in `VST_PATH` / `VST3_PATH`.
        """),
        code("""
        found = scan(vst_dirs)
        by_name = {p.name: p for p in found if p.format == "vst2"}
        by_name.update({p.name: p for p in found if p.name not in by_name})
        choice = next((by_name[n] for n in preferred if n in by_name), found[0] if found else None)

        if choice is None:
            print("No Linux VST2/VST3 plugin found in:")
            for folder in (default_dirs() if vst_dirs is None else vst_dirs):
                print("   ", folder)
            print()
            print("On Debian/Ubuntu, install some free ones and re-run this notebook:")
            print("    sudo apt-get install dragonfly-reverb-vst zam-plugins")
            print("(or point VST_PATH / VST3_PATH at a folder of plugins).")
            print("Skipping the rest of this notebook; the built-in effects need no binaries.")
        else:
            print(f"{len(found)} plugin binaries found; using {choice.name} ({choice.format}): {choice.path}")
        pd.DataFrame([dataclasses.asdict(p) for p in found], columns=["name", "format", "path"])
        """),
        md("""
        ## Load it behind a built-in filter

        `lab.add_plugin(track, name, path)` loads a binary by path. Built-ins come first here:
        some VSTs change the CPU's floating-point mode when loaded, which pluginlab resets after
        every load, but adding Faust effects first is the conservative order.
        """),
        code("""
        rate = lab.engine.sample_rate
        lab.set_source("drums", Source.file("drum_loop.wav"))
        filt = await lab.add_plugin("drums", "Filter")
        await lab.update(filt, {"type": "highpass", "cutoff": 60.0})
        plain = await lab.render(seconds, "drums")
        if choice is not None:
            vst = await lab.add_plugin("drums", choice.name, choice.path)
            assert vst.kind == "binary", vst
            print(vst)
            print({pid: f"{vst.get(pid):.3f} ({vst.text(pid)})" for pid in list(vst.parameters)[:6]})
        """),
        code("""
        if choice is not None:
            panel = lab.panel(vst)
            display(panel)
        """),
        md("""
        ## Change it and compare

        The change goes through the same core as a slider move or a colleague's message, and is
        recorded. Values are normalized (0..1); the plugin's own text shows what they mean.
        """),
        code(HELPERS),
        code("""
        if choice is not None:
            before = await lab.render(seconds, "drums")
            change = {pid: v for pid, v in preferred.get(choice.name, {}).items()
                      if pid in vst.parameters}
            if not change:                          # any other plugin: move its first parameter
                pid = next(iter(vst.parameters))
                change = {pid: 1.0 if vst.get(pid) < 0.5 else 0.0}
            texts_before = {pid: vst.text(pid) for pid in change}
            await lab.update(vst, change)
            after = await lab.render(seconds, "drums")
            for pid in change:
                print(f"{pid}: {texts_before[pid]} -> {vst.text(pid)}")
                assert panel.controls[pid].value == round(change[pid], 3)   # slider followed
            difference = float(np.max(np.abs(after - before)))
            print(f"RMS {rms_db(before):.1f} -> {rms_db(after):.1f} dBFS, max sample difference {difference:.3f}")
            assert difference > 1e-3, "the parameter change made no audible difference"
            display(Audio(before, rate=rate), Audio(after, rate=rate))
            display(plot_comparison(before, after, rate))
        """),
        md("""
        ## Bypass and presets

        Bypass takes the plugin out of the signal path (the built-in filter alone remains).
        A user preset of a binary keeps its full state next to the values.
        Saving a binary's full state makes some DPF plugins (the Zam ones) try to open their editor
        window; without a display they print assertion failures and shader errors in red below the
        cell. That output comes from the plugin itself and is harmless: the preset is saved and
        loads back exactly (the cell checks it).
        """),
        code("""
        if choice is not None:
            await lab.bypass(vst, True)
            bypassed = await lab.render(seconds, "drums")
            assert np.allclose(bypassed, plain, atol=1e-5), "bypass should leave only the filter"
            await lab.bypass(vst, False)

            saved = dict(vst.values)
            await lab.preset(vst, "save", "notebook take")
            await lab.update(vst, {pid: 0.0 for pid in change})
            await lab.preset(vst, "load", "notebook take")
            assert all(abs(vst.get(pid) - saved[pid]) < 1e-4 for pid in change)
            print("presets for", vst.name, ":", vst.presets())
        """),
        *teardown(),
    ]
    return _notebook(cells)


def _notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells, metadata=METADATA)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"          # stable ids: regenerating gives no spurious diff
    nbformat.validate(nb)
    return nb


NOTEBOOK_BUILDERS = {
    "01_quickstart.ipynb": quickstart,
    "02_collaboration.ipynb": collaboration,
    "03_provenance_analysis.ipynb": provenance_analysis,
    "04_external_plugins.ipynb": external_plugins,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; fail if a notebook differs from what this script makes")
    args = parser.parse_args(argv)
    NOTEBOOKS.mkdir(exist_ok=True)
    stale = []
    for name, build in NOTEBOOK_BUILDERS.items():
        text = nbformat.writes(build(), version=4) + "\n"
        path = NOTEBOOKS / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print("wrote", path.relative_to(ROOT))
    if stale:
        print("out of date (run scripts/make_notebooks.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
