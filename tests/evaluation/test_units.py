"""``vtrans.evaluation.units``: a unit computed once and read back exactly, whole or absent, under its run's settings."""

from __future__ import annotations

import json
import math
import os

import pytest

from vtrans.errors import ConfigError
from vtrans.evaluation.units import Units, differences


def test_a_unit_is_computed_once_and_read_back_as_it_was_returned(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"scores": [0.1, float("nan"), 1e-38, 3.4028234663852886e38], "indices": [2, 0], "word_ids": (5, 6)}

    units = Units(tmp_path / "units", {"folds": 3})
    first = units.record("seed0-fold0", compute)
    again = Units(tmp_path / "units", {"folds": 3})  # a later process of the same run
    second = again.record("seed0-fold0", compute)
    assert calls == [1]
    assert units.computed == {"seed0-fold0"} and again.computed == set()
    assert json.dumps(first) == json.dumps(second)  # NaN and the float32 extremes included
    assert first["word_ids"] == [5, 6]  # what the computing process gets is the data as it reads back
    assert math.isnan(second["scores"][1])
    assert units.seconds == again.seconds > 0  # the seconds recorded when it was computed
    assert again.finished() == ["seed0-fold0"]


def test_a_run_with_other_settings_is_refused_naming_each_difference(tmp_path):
    Units(tmp_path, {"folds": 3, "eval": {"samples": 4, "passes": 2}, "data": "txt:a"})
    Units(tmp_path, {"folds": 3, "eval": {"samples": 4, "passes": 2}, "data": "txt:a"})  # the same: accepted
    with pytest.raises(ConfigError) as err:
        Units(tmp_path, {"folds": 2, "eval": {"samples": 8, "passes": 2}, "data": "txt:a"})
    message = str(err.value)
    assert "folds (3 there, 2 here); eval.samples (4 there, 8 here):" in message
    assert "passes" not in message and "\n" not in message and "another --out" in message


def test_differences_name_added_and_removed_settings():
    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}) == []
    assert differences({"a": 1}, {"a": 1, "b": None}) == []  # a setting left at None is no setting
    assert differences({"a": 1}, {"b": 2}) == ["a (1 there, None here)", "b (None there, 2 here)"]


def test_a_unit_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    units = Units(tmp_path, {})

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        units.record("base", lambda: {"x": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no unit, no temporary file
    (tmp_path / ".base.json.999.tmp").write_text('{"rec')  # what a kill mid-write leaves behind
    units = Units(tmp_path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert units.record("base", lambda: {"x": 2}) == {"x": 2}


def test_a_damaged_unit_is_one_line_saying_what_to_do(tmp_path):
    units = Units(tmp_path, {})
    (tmp_path / "base.json").write_text('{"record": ')
    with pytest.raises(ConfigError, match="delete it, and the run computes it again"):
        units.record("base", dict)


def test_free_settings_may_differ_and_every_other_one_must_match(tmp_path):
    Units(tmp_path, {"folds": 5, "seeds": [0], "refit": False})
    Units(tmp_path, {"folds": 5, "seeds": [0, 1, 2], "refit": False}, free=("seeds",))
    with pytest.raises(ConfigError, match=r"refit \(False there, True here\)"):
        Units(tmp_path, {"folds": 5, "seeds": [0], "refit": True}, free=("seeds",))
    with pytest.raises(ConfigError, match="seeds"):  # not free unless said so
        Units(tmp_path, {"folds": 5, "seeds": [0, 1], "refit": False})
    with pytest.raises(ConfigError, match="refit"):  # a setting the record lacks is a difference
        Units(tmp_path, {"folds": 5, "seeds": [0]}, free=("seeds",))


def test_each_unit_records_where_it_ran_and_a_resumed_run_gathers_every_stamp(tmp_path):
    first = Units(tmp_path, {"a": 1}, stamp={"threads": 2})
    first.record("one", lambda: {"x": 1})
    assert json.loads((tmp_path / "one.json").read_text())["stamp"] == {"threads": 2}
    later = Units(tmp_path, {"a": 1}, stamp={"threads": 1})  # the stamp is no setting: not refused
    later.record("one", lambda: {"x": 2})
    later.record("two", lambda: {"x": 3})
    later.record("one", lambda: {"x": 4})  # read again: no second entry for the same stamp
    assert later.stamps == [{"threads": 2}, {"threads": 1}]
    unstamped = Units(tmp_path / "old", {"a": 1})  # no stamp given: units without one, none gathered
    unstamped.record("one", lambda: {"x": 1})
    assert "stamp" not in json.loads((tmp_path / "old" / "one.json").read_text()) and unstamped.stamps == []
