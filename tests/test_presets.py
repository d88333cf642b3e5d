"""Presets: factory (read-only, data/presets) and user (tmp folder) presets through the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pluginlab import Engine, PresetLibrary, Source
from pluginlab.effects import library
from pluginlab.errors import ErrorCode, PresetLoadFailed
from pluginlab.presets import FACTORY_DIR, default_user_dir, preset_key

NOISE = Source.noise(0.5, seed=11)


def factory_names(key: str) -> list[str]:
    return sorted((json.loads(p.read_text())["name"] for p in (FACTORY_DIR / key).glob("*.json")),
                  key=str.lower)


@pytest.fixture
def reverb(engine: Engine):
    return engine.add_track("t", NOISE).add("Reverb")


@pytest.mark.parametrize("key", sorted(library()))
def test_factory_presets_listed_for_every_builtin(tmp_path: Path, key: str):
    names = PresetLibrary(user_dir=tmp_path).names(key)
    assert names, f"no factory presets for {key}"
    assert names == factory_names(key)
    assert all(entry["factory"] for entry in PresetLibrary(user_dir=tmp_path).describe(key))


def test_plugin_lists_its_presets(reverb):
    assert reverb.preset_key == "reverb"
    assert reverb.presets() == factory_names("reverb")
    assert "Large Hall" in reverb.presets()


def test_load_factory_preset(engine: Engine, reverb):
    values = reverb.load_preset("Large Hall")
    body = json.loads((FACTORY_DIR / "reverb" / "large_hall.json").read_text())
    assert values == {k: float(v) for k, v in body["parameters"].items()}
    assert reverb.values == values


def test_save_and_load_by_name(engine: Engine, reverb):
    track = engine.track("t")
    reverb.update({"wet_dry": 0.6, "room_size": 0.2, "damping": 0.9, "pre_delay": 0.0})
    saved = reverb.values
    audio = track.render(0.5)
    path = reverb.save_preset("My Room")
    assert path.parent == engine.presets.user_dir / "reverb"
    assert json.loads(path.read_text())["parameters"] == saved
    assert "My Room" in reverb.presets()

    reverb.load_preset("Large Hall")
    assert reverb.values != saved
    assert reverb.load_preset("My Room") == saved
    assert np.array_equal(track.render(0.5), audio)
    assert "My Room" not in PresetLibrary(user_dir=path.parent.parent / "elsewhere").names("reverb")


def test_a_named_preset_sounds_the_same_whatever_was_set_before(engine: Engine):
    """Factory presets name only some parameters; the others go to their defaults, so
    "Minus 6 dB" after "Mono" is not mono (it was: width stayed 0)."""
    stereo = np.random.default_rng(7).uniform(-0.3, 0.3, (2, 44100)).astype(np.float32)
    track = engine.add_track("u", Source.from_array(stereo, 44100))
    utility = track.add("Utility")
    utility.load_preset("Minus 6 dB")
    fresh = track.render(0.5)
    assert not np.array_equal(fresh[0], fresh[1])  # stays stereo
    utility.load_preset("Mono")
    assert np.array_equal(*track.render(0.5))
    values = utility.load_preset("Minus 6 dB")
    assert values["width"] == utility.parameters["width"].default and values["gain"] == -6.0
    assert np.array_equal(track.render(0.5), fresh)


def test_load_from_dict(reverb):
    values = reverb.load_preset({"wet_dry": 0.1, "room_size": 0.95})
    assert values["wet_dry"] == 0.1 and values["room_size"] == 0.95
    assert reverb.damping == 0.5  # untouched ids keep their values


def test_unknown_preset_lists_available(reverb):
    with pytest.raises(PresetLoadFailed) as info:
        reverb.load_preset("Cathedral")
    err = info.value
    assert err.code is ErrorCode.PRESET_LOAD_FAILED
    assert err.details["plugin_id"] == reverb.id
    for name in factory_names("reverb"):
        assert name in err.message
    with pytest.raises(PresetLoadFailed):
        reverb.load_preset(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [{"wet_dry": 0.2, "loudness": 1.0}, {"wet_dry": 0.2, "room_size": 3.0},
     {"wet_dry": float("nan")}, {"pre_delay": True}],
)
def test_bad_preset_changes_nothing(engine: Engine, reverb, bad: dict[str, object]):
    track = engine.track("t")
    reverb.update({"wet_dry": 0.4})
    before, audio = reverb.values, track.render(0.5)
    with pytest.raises(PresetLoadFailed):
        reverb.load_preset(bad)
    # the same data stored as a user preset file
    folder = engine.presets.user_dir / "reverb"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.json").write_text(json.dumps({"name": "Broken", "parameters": {
        k: (str(v) if isinstance(v, float) and math.isnan(v) else v) for k, v in bad.items()}}))
    with pytest.raises(PresetLoadFailed):
        reverb.load_preset("Broken")
    assert reverb.values == before
    assert np.array_equal(track.render(0.5), audio)


def test_delete_user_preset(reverb):
    reverb.save_preset("Scratch")
    reverb.delete_preset("Scratch")
    assert "Scratch" not in reverb.presets()
    with pytest.raises(PresetLoadFailed, match="Scratch"):
        reverb.load_preset("Scratch")
    with pytest.raises(PresetLoadFailed, match="unknown preset"):
        reverb.delete_preset("Scratch")


def test_factory_presets_are_read_only(reverb):
    with pytest.raises(PresetLoadFailed, match="read-only"):
        reverb.delete_preset("Large Hall")
    assert (FACTORY_DIR / "reverb" / "large_hall.json").exists()
    assert "Large Hall" in reverb.presets()


def test_user_preset_shadows_factory(engine: Engine, reverb):
    reverb.update({"wet_dry": 0.05, "room_size": 0.05})
    mine = reverb.values
    reverb.save_preset("Large Hall")
    assert reverb.presets().count("Large Hall") == 1
    entry = next(e for e in engine.presets.describe("reverb") if e["name"] == "Large Hall")
    assert entry["factory"] is False
    reverb.load_preset("Small Room")
    assert reverb.load_preset("Large Hall") == mine
    reverb.delete_preset("Large Hall")  # removes the user copy only
    assert reverb.load_preset("Large Hall")["room_size"] == 0.9


def test_empty_preset_name_is_refused(reverb):
    for name in ("", "   "):
        with pytest.raises(PresetLoadFailed):
            reverb.save_preset(name)


def test_full_state_only_for_binaries(reverb, tmp_path: Path):
    with pytest.raises(PresetLoadFailed, match="binaries"):
        reverb.save_state(tmp_path / "x.bin")


def test_user_presets_per_type_are_capped_and_listings_see_every_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("pluginlab.presets.MAX_USER_PRESETS", 3)
    engine = Engine(presets=PresetLibrary(user_dir=tmp_path))
    try:
        reverb = engine.add_track("t").add("Reverb")
        for k in range(3):
            reverb.save_preset(f"take {k}")
        with pytest.raises(PresetLoadFailed, match="3 user presets for this plugin type"):
            reverb.save_preset("take 3")
        reverb.wet_dry = 0.9
        reverb.save_preset("take 1")  # overwriting one is fine, and seen at once
        assert reverb.load_preset("take 1")["wet_dry"] == 0.9
        reverb.delete_preset("take 0")
        assert "take 0" not in reverb.presets()
        reverb.save_preset("take 3")  # room again
        assert {"take 1", "take 2", "take 3"} <= set(reverb.presets())
    finally:
        engine.close()


def test_damaged_files_are_skipped_with_a_warning(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture):
    lib = PresetLibrary(user_dir=tmp_path)
    (tmp_path / "reverb").mkdir()
    (tmp_path / "reverb" / "junk.json").write_text("{not json")
    (tmp_path / "reverb" / "list.json").write_text(json.dumps({"parameters": [1, 2]}))
    with caplog.at_level("WARNING", logger="pluginlab.presets"):
        assert lib.names("reverb") == factory_names("reverb")
    assert "junk.json skipped" in caplog.text and "list.json skipped" in caplog.text


def test_keys_and_user_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    assert preset_key(" Reverb ", None) == "reverb"
    key = preset_key("Dragonfly", "/usr/lib/lxvst/DragonflyRoomReverb-vst.so")
    assert key.startswith("dragonflyroomreverb_vst_so-") and len(key.split("-")[-1]) == 8
    assert key != preset_key("Dragonfly", "/opt/other/DragonflyRoomReverb-vst.so")
    monkeypatch.setenv("PLUGINLAB_PRESETS", str(tmp_path))
    assert default_user_dir() == tmp_path
    assert PresetLibrary().user_dir == tmp_path


def test_names_with_the_same_slug_keep_their_own_files(engine: Engine, reverb):
    """"Warm Pad" and "warm-pad" slug alike; saving one must not overwrite the other."""
    reverb.update({"wet_dry": 0.1})
    reverb.save_preset("Warm Pad")
    reverb.update({"wet_dry": 0.7})
    reverb.save_preset("warm-pad")
    reverb.update({"wet_dry": 0.4})
    reverb.save_preset("Warm Pad")  # overwrites its own file, not warm-pad's
    assert {"Warm Pad", "warm-pad"} <= set(reverb.presets())
    assert reverb.load_preset("warm-pad")["wet_dry"] == pytest.approx(0.7)
    assert reverb.load_preset("Warm Pad")["wet_dry"] == pytest.approx(0.4)
    reverb.delete_preset("warm-pad")
    assert "warm-pad" not in reverb.presets()
    assert reverb.load_preset("Warm Pad")["wet_dry"] == pytest.approx(0.4)
    assert len(list((engine.presets.user_dir / "reverb").glob("*.json"))) == 1


def test_long_names_are_saved_under_short_distinct_files(engine: Engine, reverb):
    long_a, long_b = "x" * 300, "x" * 299 + "y"  # same 64-character slug
    reverb.update({"wet_dry": 0.2})
    reverb.save_preset(long_a)
    reverb.update({"wet_dry": 0.6})
    reverb.save_preset(long_b)
    assert reverb.load_preset(long_a)["wet_dry"] == pytest.approx(0.2)
    assert reverb.load_preset(long_b)["wet_dry"] == pytest.approx(0.6)
    files = list((engine.presets.user_dir / "reverb").glob("*.json"))
    assert len(files) == 2 and all(len(f.name) < 100 for f in files)
