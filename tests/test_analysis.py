"""events_frame and its helpers on real SQLite stores; plots rendered with the Agg backend."""

from __future__ import annotations

import io
import json
import math
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pluginlab import analysis
from pluginlab.analysis import (
    CATEGORY_COLUMNS,
    EVENT_COLUMNS,
    activity_summary,
    changes_per_second,
    events_frame,
    parameter_history,
    plot_activity,
    plot_comparison,
    plot_parameter_timeline,
    plot_spectrogram,
    plot_waveform,
)
from pluginlab.provenance import EventDraft, ProvenanceStore

T0 = datetime(2026, 11, 25, 20, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, step: timedelta) -> None:
        self.now = T0
        self.step = step

    def __call__(self) -> datetime:
        current = self.now
        self.now += self.step
        return current


def add(plugin: str, track: str, session: str, user: str, **parameters: float) -> EventDraft:
    return EventDraft(user, session, "plugin_add", "plugin", plugin, "create", {
        "track_id": track, "plugin_id": plugin, "name": "Reverb", "plugin_path": None,
        "index": None, "parameters": parameters, "bypass": False})


def param(plugin: str, track: str, name: str, value: float, session: str,
          user: str) -> EventDraft:
    return EventDraft(user, session, "parameter_update", "parameter", f"{plugin}.{name}",
                      "update", {"track_id": track, "plugin_id": plugin, "parameter_id": name,
                                 "value": value, "previous_value": None})


@pytest.fixture()
def store(tmp_path: Path) -> Any:
    """Two sessions, three users; events 250 ms apart starting at T0."""
    with ProvenanceStore(tmp_path / "a.sqlite", clock=Clock(timedelta(milliseconds=250))) as s:
        s.append(EventDraft("alice", "s1", "auth", "user", "alice", "auth", {}))      # 1
        s.append(add("rev", "t1", "s1", "alice", wet_dry=0.3, room_size=0.5))          # 2
        s.append(param("rev", "t1", "wet_dry", 0.4, "s1", "alice"))                     # 3
        s.append(param("rev", "t1", "wet_dry", 0.6, "s1", "bob"))                       # 4
        s.append(param("rev", "t1", "room_size", 0.9, "s1", "bob"))                     # 5
        s.append(EventDraft("bob", "s1", "plugin_bypass", "plugin", "rev", "bypass",
                            {"track_id": "t1", "plugin_id": "rev", "bypass": True}))  # 6
        s.append(EventDraft("alice", "s1", "preset_load", "preset", "rev.hall", "preset_load",
                            {"track_id": "t1", "plugin_id": "rev", "preset_name": "hall",
                             "parameters": {"wet_dry": 0.2, "room_size": 1.0}}))     # 7
        s.append(add("dly", "t2", "s2", "carol", mix=0.5))                              # 8
        s.append_many([param("dly", "t2", "mix", 0.1 * k, "s2", "carol")
                       for k in range(1, 5)])                                           # 9-12
        s.append(param("rev", "t1", "wet_dry", 0.1 + 0.2, "s1", "alice"))               # 13
        yield s


# ---------------------------------------------------------------------------------------------
# events_frame


def test_events_frame_columns_dtypes_and_values(store: ProvenanceStore) -> None:
    frame = events_frame(store)
    events = store.events()
    assert list(frame.columns) == list(EVENT_COLUMNS)
    assert len(frame) == 13
    assert frame["seq"].dtype == np.int64
    assert list(frame["seq"]) == [e.seq for e in events]
    assert list(frame["daid"]) == [e.daid for e in events]
    assert str(frame["timestamp"].dtype) == "datetime64[ms, UTC]"
    assert frame["timestamp"].iloc[0] == pd.Timestamp(T0)
    assert frame["timestamp"].iloc[2] == pd.Timestamp(T0 + timedelta(milliseconds=500))
    for column in CATEGORY_COLUMNS:
        assert isinstance(frame[column].dtype, pd.CategoricalDtype), column
    assert frame["value"].dtype == np.float64
    assert list(frame["details"]) == [e.details for e in events]
    assert all(isinstance(d, dict) for d in frame["details"])
    auth = frame.iloc[0]
    assert auth["action"] == "auth" and auth["entity_type"] == "user"
    assert pd.isna(auth["plugin_id"]) and pd.isna(auth["track_id"]) and math.isnan(auth["value"])
    update = frame.iloc[3]
    assert (update["user_id"], update["plugin_id"], update["track_id"],
            update["parameter_id"], update["value"]) == ("bob", "rev", "t1", "wet_dry", 0.6)
    assert frame["value"].iloc[-1] == 0.1 + 0.2  # exact: 0.30000000000000004, not 0.3
    assert frame["operation"].iloc[5] == "bypass"
    assert sorted(frame["user_id"].cat.categories) == ["alice", "bob", "carol"]


def test_events_frame_from_a_path_equals_from_the_store(store: ProvenanceStore) -> None:
    pd.testing.assert_frame_equal(events_frame(store.path), events_frame(store))


@pytest.mark.parametrize(
    ("filters", "seqs"),
    [
        ({"session_id": "s2"}, [8, 9, 10, 11, 12]),
        ({"user_id": "bob"}, [4, 5, 6]),
        ({"user_id": ["bob", "carol"]}, [4, 5, 6, 8, 9, 10, 11, 12]),
        ({"plugin_id": "rev"}, [2, 3, 4, 5, 6, 7, 13]),
        ({"start": T0 + timedelta(milliseconds=500), "end": "2026-11-25T20:00:01.000Z"},
         [3, 4, 5]),
        ({"session_id": "s1", "user_id": "alice", "plugin_id": "rev"}, [2, 3, 7, 13]),
        ({"session_id": "nobody"}, []),
    ],
)
def test_events_frame_filters(store: ProvenanceStore, filters: dict[str, Any],
                              seqs: list[int]) -> None:
    frame = events_frame(store, **filters)
    assert list(frame["seq"]) == seqs
    assert list(frame.columns) == list(EVENT_COLUMNS)
    if seqs:  # the filtered rows carry their own values, aligned
        by_seq = {e.seq: e for e in store.events()}
        assert list(frame["daid"]) == [by_seq[s].daid for s in seqs]
        assert list(frame["user_id"]) == [by_seq[s].user_id for s in seqs]
        assert list(frame["details"]) == [by_seq[s].details for s in seqs]


def test_events_frame_of_an_empty_log(tmp_path: Path) -> None:
    with ProvenanceStore(tmp_path / "e.sqlite") as store:
        frame = events_frame(store)
    assert frame.empty and list(frame.columns) == list(EVENT_COLUMNS)
    assert str(frame["timestamp"].dtype) == "datetime64[ms, UTC]"
    assert isinstance(frame["user_id"].dtype, pd.CategoricalDtype)


def test_events_frame_survives_hand_written_rows(store: ProvenanceStore) -> None:
    """Rows no store would write (odd action, separator in an id, free-form timestamp, details
    that are not an object) take the slow paths and still come back right. (Details that are
    not JSON at all cannot be stored: the generated columns' json_extract refuses them.)"""
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "INSERT INTO daid_events(id, seq, user_id, action, details, timestamp, session_id, "
            "entity_type, entity_id, operation, parents, prev_hash, chain_hash) "
            "VALUES ('odd\x1fid', 14, 'dave', 'custom_action', '\"just text\"', "
            "'2026-11-25 20:00:09', 's1', NULL, NULL, NULL, '[]', 'x', 'y')"
        )
    conn.close()
    frame = events_frame(store)
    last = frame.iloc[-1]
    assert (last["seq"], last["daid"], last["action"], last["details"]) == (
        14, "odd\x1fid", "custom_action", "just text")
    assert last["timestamp"] == pd.Timestamp("2026-11-25T20:00:09Z")
    assert pd.isna(last["entity_type"])
    assert list(frame["action"].iloc[:2]) == ["auth", "plugin_add"]
    assert frame["details"].iloc[2] == store.events()[2].details


def test_events_frame_is_consistent_while_the_log_grows(tmp_path: Path) -> None:
    with ProvenanceStore(tmp_path / "g.sqlite") as store:
        store.append(add("rev", "t1", "s", "u", wet_dry=0.0))
        stop = threading.Event()

        def writer() -> None:
            k = 0
            while not stop.is_set():
                store.append_many([param("rev", "t1", "wet_dry", (k + i) / 1e4, "s", "u")
                                   for i in range(50)])
                k += 50

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for _ in range(5):
                frame = events_frame(store)
                assert list(frame["seq"]) == list(range(1, len(frame) + 1))
                values = [d.get("value", np.nan) for d in frame["details"]]
                np.testing.assert_array_equal(frame["value"].to_numpy(), values)
                assert (frame["plugin_id"] == "rev").all()
        finally:
            stop.set()
            thread.join()


def test_events_frame_read_in_small_pieces_is_the_same(store: ProvenanceStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Many scan queries and many details arrays (a big log's layout, scaled down) give the
    same frame, filtered or not, odd rows included (no id, no details, details not an object)."""
    with sqlite3.connect(store.path) as conn:
        conn.executemany(
            "INSERT INTO daid_events(id, seq, user_id, action, details, timestamp, session_id, "
            "entity_type, entity_id, operation, parents, prev_hash, chain_hash) "
            "VALUES (?, ?, 'dave', 'custom_action', ?, '2026-11-25T20:00:09.000Z', 's1', "
            "NULL, NULL, NULL, '[]', 'x', 'y')",
            [("list", 14, "[1, 2.5]"), (None, 15, None), (None, 16, "{\"value\": 7}")],
        )
    conn.close()
    cases: list[dict[str, Any]] = [{}, {"session_id": "s1"}, {"user_id": ["dave", "bob"]}]
    expected = [events_frame(store, **filters) for filters in cases]
    tail = expected[0].iloc[-3:]
    assert list(tail["daid"]) == ["list", None, None]
    assert list(tail["details"]) == [[1, 2.5], None, {"value": 7}]
    assert tail["value"].iloc[2] == 7.0 and math.isnan(tail["value"].iloc[0])
    monkeypatch.setattr(analysis, "_CHUNK", 2)  # the last scan: only rows without an id
    monkeypatch.setattr(analysis, "_PIECE_ROWS", 2)
    for filters, frame in zip(cases, expected):
        pd.testing.assert_frame_equal(events_frame(store, **filters), frame)


def test_events_frame_with_rows_deleted_by_hand(store: ProvenanceStore) -> None:
    """Gaps in the rowids (rows deleted outside the store) keep every column aligned."""
    events = store.events()
    with sqlite3.connect(store.path) as conn:
        conn.execute("DELETE FROM daid_events WHERE seq IN (1, 5, 9)")
    conn.close()
    frame = events_frame(store)
    kept = [e for e in events if e.seq not in (1, 5, 9)]
    assert list(frame["seq"]) == [e.seq for e in kept]
    assert list(frame["daid"]) == [e.daid for e in kept]
    assert list(frame["user_id"]) == [e.user_id for e in kept]
    assert list(frame["plugin_id"]) == [e.details["plugin_id"] for e in kept]  # seq 1 had none
    assert list(frame["details"]) == [e.details for e in kept]


# ---------------------------------------------------------------------------------------------
# helpers


def test_parameter_history(store: ProvenanceStore) -> None:
    history = parameter_history(events_frame(store), "rev", "wet_dry")
    assert list(history.columns) == ["timestamp", "seq", "daid", "user_id", "value"]
    assert list(history["seq"]) == [2, 3, 4, 7, 13]  # creation, updates, preset load
    by_seq = {e.seq: e.daid for e in store.events()}
    assert list(history["daid"]) == [by_seq[s] for s in history["seq"]]
    middle = history.iloc[2]  # the exact state after that change, from the log
    then = store.state_at("s1", daid=middle["daid"])
    assert then["t1"][0]["parameters"]["wet_dry"] == middle["value"] == 0.6
    assert list(history["value"]) == [0.3, 0.4, 0.6, 0.2, 0.1 + 0.2]
    assert list(history["user_id"]) == ["alice", "alice", "bob", "alice", "alice"]
    assert parameter_history(events_frame(store), "dly", "nope").empty


def test_one_plugin_id_in_two_sessions_is_two_histories(tmp_path: Path) -> None:
    """Servers number plugins per session (plugin_1 in every session): never one line."""
    with ProvenanceStore(tmp_path / "two.sqlite") as s:
        for session, user, values in (("a", "ann", [0.1, 0.2]), ("b", "ben", [0.9, 0.8])):
            s.append(add("plugin_1", "t", session, user, wet_dry=0.5))
        for k in range(2):
            for session, user, values in (("a", "ann", [0.1, 0.2]), ("b", "ben", [0.9, 0.8])):
                s.append(param("plugin_1", "t", "wet_dry", values[k], session, user))
        frame = events_frame(s)
    with pytest.raises(ValueError, match="sessions 'a', 'b'.*session_id="):
        parameter_history(frame, "plugin_1", "wet_dry")
    only_b = parameter_history(frame, "plugin_1", "wet_dry", session_id="b")
    assert list(only_b["value"]) == [0.5, 0.9, 0.8] and set(only_b["user_id"]) == {"ben"}
    one_session = events_frame(tmp_path / "two.sqlite", session_id="a")
    assert list(parameter_history(one_session, "plugin_1", "wet_dry")["value"]) == [0.5, 0.1, 0.2]
    figure = plot_parameter_timeline(frame, plugin_id="plugin_1")
    lines = {line.get_label(): list(line.get_ydata()) for ax in figure.axes for line in ax.lines}
    assert lines == {"a: wet_dry": [0.5, 0.1, 0.2], "b: wet_dry": [0.5, 0.9, 0.8]}


def test_activity_summary(store: ProvenanceStore) -> None:
    frame = events_frame(store)
    by_user = activity_summary(frame)
    assert list(by_user.index) == ["alice", "carol", "bob"]
    assert list(by_user["events"]) == [5, 5, 3]
    assert by_user.loc["alice", "parameter_update"] == 2
    assert by_user.loc["bob", "plugin_bypass"] == 1
    assert by_user.loc["carol", "first"] == pd.Timestamp(T0 + timedelta(milliseconds=1750))
    by_session = activity_summary(frame, by="session_id")
    assert dict(by_session["events"]) == {"s1": 8, "s2": 5}
    with pytest.raises(ValueError, match="user_id"):
        activity_summary(frame, by="action")


def test_changes_per_second(store: ProvenanceStore) -> None:
    series = changes_per_second(events_frame(store))
    # updates at 0.5, 0.75, 1.0 | 2.0, 2.25, 2.5, 2.75 | 3.0 s after T0
    assert list(series) == [2, 1, 4, 1]
    assert series.index[0] == pd.Timestamp(T0)
    assert series.name == "changes_per_second"
    assert changes_per_second(events_frame(store, user_id="nobody")).empty


# ---------------------------------------------------------------------------------------------
# plots


def rendered(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_parameter_timeline_has_one_panel_per_parameter(store: ProvenanceStore) -> None:
    frame = events_frame(store)
    figure = plot_parameter_timeline(frame)
    assert isinstance(figure, Figure)
    assert all(len(ax.lines) == 1 for ax in figure.axes)
    lines = {ax.lines[0].get_label(): ax for ax in figure.axes}
    assert set(lines) == {"s1: rev.wet_dry", "s1: rev.room_size", "s2: dly.mix"}
    assert {t.get_text() for t in lines["s1: rev.wet_dry"].get_legend().get_texts()} == {
        "s1: rev.wet_dry", "user: alice", "user: bob"}
    colours = [matplotlib.colors.to_hex(ax.lines[0].get_color()) for ax in figure.axes]
    assert len(set(colours)) == 3  # one colour per line
    for label, ax in lines.items():  # each line is its parameter's history
        session, name = label.split(": ")
        history = parameter_history(frame, *name.split("."), session_id=session)
        np.testing.assert_array_equal(ax.lines[0].get_ydata(), history["value"])
    only_rev = plot_parameter_timeline(frame, plugin_id="rev")
    assert [ax.lines[0].get_label() for ax in only_rev.axes] == ["wet_dry", "room_size"]
    one = plot_parameter_timeline(frame, plugin_id="rev", parameters=["wet_dry"]).axes
    assert len(one) == 1
    # the creation value, two changes, the preset load, the last change: what the engine had
    np.testing.assert_allclose(one[0].lines[0].get_ydata(), [0.3, 0.4, 0.6, 0.2, 0.1 + 0.2])
    shapes = {c.get_label(): c.get_paths()[0].vertices.tobytes() for c in one[0].collections}
    assert set(shapes) == {"user: alice", "user: bob"}  # who changed wet_dry, by shape
    assert len(set(shapes.values())) == 2
    assert rendered(figure).startswith(b"\x89PNG")


def filter_and_utility(path: Path, parameters: int = 2) -> ProvenanceStore:
    """A Filter (cutoff in Hz) and a Utility (gain in dB) changed 20 times each; with
    ``parameters`` > 2, that many more parameters of another plugin changed k times each."""
    s = ProvenanceStore(path, clock=Clock(timedelta(milliseconds=50)))
    s.append(EventDraft("alice", "s", "plugin_add", "plugin", "f", "create", {
        "track_id": "t", "plugin_id": "f", "name": "Filter", "plugin_path": None,
        "index": None, "parameters": {"cutoff": 1000.0}, "bypass": False}))
    s.append(EventDraft("alice", "s", "plugin_add", "plugin", "u", "create", {
        "track_id": "t", "plugin_id": "u", "name": "Utility", "plugin_path": None,
        "index": None, "parameters": {"gain": 0.0}, "bypass": False}))
    for k in range(20):
        s.append(param("f", "t", "cutoff", 500.0 + 100 * k, "s", "alice"))
        s.append(param("u", "t", "gain", -0.5 * k, "s", "bob"))
    for k in range(1, parameters - 1):
        s.append_many([param("x", "t", f"p{k:02d}", j, "s", "carol") for j in range(k)])
    return s


def test_parameter_timeline_gives_each_unit_its_own_scale(tmp_path: Path) -> None:
    """A gain in dB next to a cutoff in Hz: each has its panel, labelled with its unit, and
    its y-limits hug its own values (one shared axis made the gain a flat line)."""
    with filter_and_utility(tmp_path / "u.sqlite") as store:
        frame = events_frame(store)
    axes = {ax.get_ylabel(): ax for ax in plot_parameter_timeline(frame).axes}
    assert set(axes) == {"cutoff (Hz)", "gain (dB)"}
    low, high = axes["gain (dB)"].get_ylim()
    assert -11 < low < -9.5 and 0 < high < 1
    low, high = axes["cutoff (Hz)"].get_ylim()
    assert 400 < low < 500 and 2400 < high < 2500


def test_parameter_timeline_shows_the_most_changed_and_says_what_it_left_out(
        tmp_path: Path) -> None:
    with filter_and_utility(tmp_path / "m.sqlite", parameters=12) as store:
        frame = events_frame(store)
    figure = plot_parameter_timeline(frame)
    labels = [ax.lines[0].get_label() for ax in figure.axes]
    assert labels == ["f.cutoff", "u.gain", "x.p10", "x.p09", "x.p08", "x.p07", "x.p06",
                      "x.p05"]  # by number of changes
    title = figure.get_suptitle()
    assert "8 most changed of 12 parameters" in title and "4 not shown" in title
    assert len(plot_parameter_timeline(frame, max_lines=12).axes) == 12
    assert "not shown" not in plot_parameter_timeline(frame, plugin_id="f").get_suptitle()


def test_plot_activity(store: ProvenanceStore) -> None:
    figure = plot_activity(events_frame(store))
    assert isinstance(figure, Figure)
    timeline, bars = figure.axes
    assert len(timeline.lines) == 3  # one per user
    assert len(bars.patches) == 5  # auth, plugin_add, parameter_update, plugin_bypass, preset_load
    assert rendered(figure)
    assert isinstance(plot_activity(events_frame(store, user_id="nobody")), Figure)


def value_at(line: Any, moment: datetime) -> float:
    """The y a steps-post line shows at ``moment``."""
    x = mdates.date2num(line.get_xdata())
    return float(line.get_ydata()[np.searchsorted(x, mdates.date2num(moment), "right") - 1])


def test_activity_is_zero_between_bursts(tmp_path: Path) -> None:
    """Two 10 s bursts three hours apart: in between, every user's line is at 0 (it used to
    join the bursts with a line at ~10 events/s across the idle time)."""
    with ProvenanceStore(tmp_path / "b.sqlite", clock=Clock(timedelta(seconds=0.05))) as s:
        s.append_many([param("rev", "t", "wet_dry", k / 200, "s", "alice") for k in range(200)])
        s.close()
    clock = Clock(timedelta(seconds=0.05))
    clock.now = T0 + timedelta(hours=3)
    with ProvenanceStore(tmp_path / "b.sqlite", clock=clock) as s:
        s.append_many([param("rev", "t", "wet_dry", k / 200, "s", "bob") for k in range(200)])
        frame = events_frame(s)
    timeline = plot_activity(frame).axes[0]
    assert "bins" in timeline.get_title()  # 3 h do not fit 1,000 one-second bins
    for line in timeline.lines:
        for gap in (T0 + timedelta(minutes=5), T0 + timedelta(hours=1.5),
                    T0 + timedelta(hours=3) - timedelta(minutes=1)):
            assert value_at(line, gap) == 0, (line.get_label(), gap)
    peaks = {line.get_label(): max(line.get_ydata()) for line in timeline.lines}
    assert 5 < peaks["alice"] <= 20 and 5 < peaks["bob"] <= 20  # 20 events/s, bin means


def test_activity_never_draws_more_than_its_bin_limit(tmp_path: Path) -> None:
    """Events at 1 s and 2000 s: 2 s bins aligned to even seconds would need 1,001 of them."""
    clock = Clock(timedelta(seconds=1999))
    clock.now = T0.replace(second=1, microsecond=0)
    with ProvenanceStore(tmp_path / "edge.sqlite", clock=clock) as s:
        s.append(param("rev", "t", "wet_dry", 0.1, "s", "alice"))
        s.append(param("rev", "t", "wet_dry", 0.2, "s", "alice"))
        frame = events_frame(s)
    line, = plot_activity(frame).axes[0].lines
    assert len(line.get_xdata()) - 1 <= 1000  # bins (a step line repeats the last edge)


def test_activity_of_one_event_is_visible(store: ProvenanceStore) -> None:
    frame = events_frame(store).iloc[:1]
    timeline = plot_activity(frame).axes[0]
    (line,) = timeline.lines
    assert value_at(line, T0 + timedelta(milliseconds=500)) == 1  # one event in its second
    low, high = (mdates.num2date(x) for x in timeline.get_xlim())
    assert low < T0 < high and high - low < timedelta(seconds=10)
    assert "bins" not in timeline.get_title()


def test_activity_counts_are_on_a_log_scale_and_labelled(store: ProvenanceStore) -> None:
    """One bypass next to many updates stays visible: log scale, bars start below 1, and
    each bar says its count."""
    bars = plot_activity(events_frame(store)).axes[1]
    assert bars.get_yscale() == "log"
    assert bars.get_ylim()[0] < 1
    heights = sorted(int(p.get_height()) for p in bars.patches)
    assert heights == [1, 1, 1, 2, 8]
    labels = sorted(int(t.get_text()) for t in bars.texts)
    assert labels == heights


def tone(seconds: float = 0.5, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([left, 0.25 * np.sin(2 * np.pi * 880 * t)])


def test_plot_waveform_and_spectrogram() -> None:
    audio = tone()
    waveform = plot_waveform(audio, 8000)
    assert isinstance(waveform, Figure) and len(waveform.axes) == 2
    np.testing.assert_allclose(waveform.axes[0].lines[0].get_ydata(), audio[0])
    assert waveform.axes[0].lines[0].get_xdata()[-1] == pytest.approx((audio.shape[1] - 1) / 8000)
    mono = plot_waveform(audio[0], 8000)
    assert len(mono.axes) == 1
    spectrogram = plot_spectrogram(audio, 8000)
    assert isinstance(spectrogram, Figure) and len(spectrogram.axes) == 2
    assert spectrogram.axes[0].images
    assert rendered(spectrogram)
    with pytest.raises(ValueError, match="channels, samples"):
        plot_waveform(np.zeros((2, 2, 2)), 8000)


def test_plot_comparison() -> None:
    dry = tone()
    wet = dry * 0.5
    figure = plot_comparison(dry, wet, 8000)
    assert isinstance(figure, Figure)
    levels, spectra = figure.axes
    assert levels.get_title() == "Levels" and spectra.get_title() == "Spectrum"
    heights = [p.get_height() for p in levels.patches]
    assert len(heights) == 4
    dry_peak, dry_rms, wet_peak, wet_rms = heights
    assert wet_peak == pytest.approx(dry_peak - 20 * np.log10(2), abs=1e-6)
    assert wet_rms == pytest.approx(dry_rms - 20 * np.log10(2), abs=1e-6)
    assert [line.get_label() for line in spectra.lines] == ["dry", "wet"]
    assert rendered(figure)


def test_every_json_detail_survives_the_frame(store: ProvenanceStore) -> None:
    frame = events_frame(store)
    assert json.dumps(list(frame["details"]), sort_keys=True) == json.dumps(
        [e.details for e in store.events()], sort_keys=True)


def test_events_frame_keeps_integers_beyond_64_bits(store: ProvenanceStore) -> None:
    """The fast details parser refuses such integers; the frame falls back and keeps them."""
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "INSERT INTO daid_events(id, seq, user_id, action, details, timestamp, session_id, "
            "entity_type, entity_id, operation, parents, prev_hash, chain_hash) "
            "VALUES ('big', 14, 'dave', 'custom_action', "
            "'{\"n\": 123456789012345678901234567890}', "
            "'2026-11-25 20:00:09', 's1', NULL, NULL, NULL, '[]', 'x', 'y')"
        )
    conn.close()
    frame = events_frame(store)
    assert frame["details"].iloc[-1] == {"n": 123456789012345678901234567890}
    assert frame["details"].iloc[2] == store.events()[2].details


def test_time_bounds_accept_every_timestamp_type(store: ProvenanceStore) -> None:
    """str, datetime, pandas.Timestamp and numpy.datetime64 (what a DataFrame hands back)."""
    frame = events_frame(store)
    middle = frame["timestamp"].iloc[len(frame) // 2]
    expected = events_frame(store, start=middle.isoformat())
    assert len(expected) < len(frame)
    for bound in (middle, middle.to_pydatetime(), middle.to_datetime64(),
                  frame["timestamp"].to_numpy()[len(frame) // 2]):
        pd.testing.assert_frame_equal(events_frame(store, start=bound), expected)
    with pytest.raises(TypeError, match="expected a datetime"):
        events_frame(store, start=12345)  # type: ignore[arg-type]


def test_a_start_between_two_milliseconds_never_returns_an_earlier_event(
        store: ProvenanceStore) -> None:
    """Timestamps have ms resolution: a lower bound rounds up, an upper bound down."""
    at_500ms = T0 + timedelta(milliseconds=500)  # seq 3; seq 4 is at 750 ms
    late = pd.Timestamp(at_500ms) + pd.Timedelta(nanoseconds=1)
    for start in (at_500ms + timedelta(microseconds=500), "2026-11-25T20:00:00.5001Z", late,
                  late.to_datetime64()):
        assert events_frame(store, start=start)["seq"].iloc[0] == 4, start
    exactly = events_frame(store, start=at_500ms, end=T0 + timedelta(milliseconds=750.9))
    assert list(exactly["seq"]) == [3, 4]


def rchar() -> int:
    """Bytes this process has read through system calls (SQLite reads pages with pread)."""
    with open("/proc/self/io") as io_stats:
        return next(int(line.split()[1]) for line in io_stats if line.startswith("rchar:"))


@pytest.fixture(scope="module")
def long_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,001 events, 10 ms apart: a plugin and 20,000 updates by alice and bob."""
    path = tmp_path_factory.mktemp("long") / "long.sqlite"
    with ProvenanceStore(path, clock=Clock(timedelta(milliseconds=10))) as s:
        s.append(add("rev", "t1", "s1", "alice", wet_dry=0.0))
        s.append_many([param("rev", "t1", "wet_dry", k % 100 / 100, "s1", ("alice", "bob")[k % 2])
                       for k in range(20_000)])
    return path


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize(
    ("filters", "rows", "share"),
    [({"start": T0 + timedelta(seconds=100), "end": T0 + timedelta(seconds=100.05)}, 6, 0.02),
     ({"start": T0 + timedelta(days=1)}, 0, 0.02),
     ({"user_id": "nobody"}, 0, 0.006)],
)
def test_a_narrow_filter_reads_a_small_part_of_the_database(
        long_log: Path, filters: dict[str, Any], rows: int, share: float) -> None:
    """The filters' indexes bound what is read: a 50 ms window of a 16 MB log, a start after
    its end, or an absent user read a small share of the file (it was 70% to 300% when the
    time bounds scanned the table, and an index scan of 1.7% for no rows)."""
    size = sum(p.stat().st_size for p in long_log.parent.iterdir())
    before = rchar()
    frame = events_frame(long_log, **filters)
    read = rchar() - before
    assert len(frame) == rows
    assert read < size * share, f"read {read:,} bytes of {size:,}"
