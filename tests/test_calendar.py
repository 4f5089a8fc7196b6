"""The news calendar: YAML and CSV files, blackout windows, and clear errors for bad files."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from copilink_rules.calendar import load_calendar
from copilink_rules.errors import CopilinkError, InputError, InstrumentError, SnapshotError

from .conftest import REPO, hostile_file

NFP = datetime(2026, 3, 6, 13, 30, tzinfo=UTC)  # 08:30 New York


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_csv_calendars_mean_the_same(tmp_path: Path) -> None:
    yaml_file = write(tmp_path, "news.yaml", """
events:
  - {time: "2026-03-06T08:30:00-05:00", name: NFP, impact: high, instruments: [all]}
  - {time: "2026-03-18T14:00:00-04:00", name: FOMC, instruments: [ES, MNQ]}
  - {time: "2026-03-11T10:30:00-04:00", name: Crude, impact: medium, instruments: [CL]}
""")
    csv_file = write(tmp_path, "news.csv", "time,name,impact,instruments\n"
                     "2026-03-06T08:30:00-05:00,NFP,high,all\n"
                     "\n"
                     "2026-03-18T14:00:00-04:00,FOMC,high,ES;MNQ\n"
                     "2026-03-11T10:30:00-04:00,Crude,medium,CL\n")
    for path in (yaml_file, csv_file):
        calendar = load_calendar(path)
        assert [(e.name, e.time) for e in calendar.events] == [
            ("NFP", NFP), ("Crude", datetime(2026, 3, 11, 14, 30, tzinfo=UTC)),
            ("FOMC", datetime(2026, 3, 18, 18, 0, tzinfo=UTC))]
        fomc = datetime(2026, 3, 18, 18, 0, tzinfo=UTC)
        # MNQ stands for its family: an NQ position is in the FOMC blackout, a CL one is not
        assert calendar.active(fomc, 60, 60, ["NQ"]) is not None
        assert calendar.active(fomc, 60, 60, ["CL"]) is None
        # crude inventories are medium impact: only a rule asking for medium sees them
        crude = datetime(2026, 3, 11, 14, 30, tzinfo=UTC)
        assert calendar.active(crude, 60, 60, ["CL"]) is None
        event = calendar.active(crude, 60, 60, ["CL"], "medium")
        assert event is not None
        assert event.name == "Crude"


@pytest.mark.parametrize(("offset", "active"), [
    (-61, False), (-60, True), (0, True), (60, True), (61, False)])
def test_a_blackout_window_holds_from_before_to_after_inclusive(offset: float,
                                                                active: bool) -> None:
    calendar = load_calendar(REPO / "examples" / "firms" / "news.yaml")
    event = next(e for e in calendar.events if e.families is None and e.impact == 2)
    now = event.time + timedelta(seconds=offset)
    assert (calendar.active(now, 60, 60, ["ES"]) is not None) is active


@pytest.mark.parametrize(("name", "text", "message"), [
    ("news.csv", "when,what\n", "FILE:1: the header must be: time,name,impact,instruments"),
    ("news.csv", "time,name,impact,instruments\n2026-03-06T08:30:00-05:00,NFP,high\n",
     "FILE:2: expected 4 fields (time,name,impact,instruments), found 3 (separate "
     "instruments with spaces or ;, not commas)"),
    ("news.csv", "time,name,impact,instruments\n2026-03-06T08:30:00-05:00,NFP,high,ES,NQ\n",
     "FILE:2: expected 4 fields"),
    ("news.csv", "time,name,impact,instruments\n\n2026-03-06T08:30:00,NFP,high,all\n",
     "FILE:3: time: Input should have timezone info"),
    ("news.csv", "time,name,impact,instruments\n2026-03-06T08:30:00Z,NFP,huge,all\n",
     "FILE:2: impact: Input should be 'low', 'medium' or 'high'"),
    ("news.yaml", "events:\n  - {time: '2026-03-06T08:30:00Z', name: NFP, when: soon}\n",
     "FILE:2: events[0].when: unknown field"),
    ("news.yaml", "events:\n  - {name: NFP}\n", "FILE:2: events[0].time: Field required"),
    ("news.yaml", "events: [\n", "FILE:2: invalid YAML"),
])
def test_a_bad_calendar_is_a_clear_error_naming_file_and_line(
        tmp_path: Path, name: str, text: str, message: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(SnapshotError) as caught:
        load_calendar(path)
    assert str(caught.value).replace(str(path), "FILE").startswith(message)


def test_an_unknown_instrument_or_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "news.yaml",
                 "events:\n  - {time: '2026-03-06T08:30:00Z', name: NFP, instruments: [XYZ]}\n")
    with pytest.raises(InstrumentError, match=r"event 'NFP' .*unknown instrument 'XYZ'"):
        load_calendar(path)
    with pytest.raises(InputError, match="cannot read the news calendar"):
        load_calendar(tmp_path / "nope.yaml")


calendar_pieces = st.sampled_from([
    "time,name,impact,instruments\n", "2026-03-06T08:30:00-05:00,", "NFP,", "high,", "all",
    "ES;NQ", "\n", '"', ",", "events:\n", "  - {time: x, name: y}\n", "- a\n", "{", "\x00",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(calendar_pieces | st.text(max_size=4), max_size=14).map("".join),
       st.sampled_from([".csv", ".yaml"]))
@example("time,name,impact,instruments\n2026-03-06T08:30:00-05:00,NFP,high\n", ".csv")
@example('time,name,impact,instruments\n"unterminated\n', ".csv")
def test_hostile_calendars_only_ever_raise_our_own_errors(text: str, suffix: str) -> None:
    with hostile_file(text, f"news{suffix}") as path, contextlib.suppress(CopilinkError):
        load_calendar(path)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("news.yaml", "events:\n  - {time: '9999-12-31T23:30:00Z', name: NFP}\n",
     "FILE:2: events[0].time: Value error, times must lie in the years 2000 to 2100 (UTC)"),
    ("news.yaml", "events:\n  - {time: '9999-12-31T23:30:00-05:00', name: NFP}\n",
     "FILE:2: events[0].time: Value error, times must lie in the years 2000 to 2100 (UTC)"),
    ("news.csv", "time,name,impact,instruments\n9999-12-31T23:30:00-05:00,NFP,high,all\n",
     "FILE:2: time: Value error, times must lie in the years 2000 to 2100 (UTC)"),
    ("news.yaml", "events:\n  - {time: '2026-03-06T08:30:00Z', name: " + "N" * 5000 + "}\n"
     "  - time: '2026-03-06T08:30:00Z'\n    name: NFP\n    ? " + "x" * 100_000 + "\n    : 1\n",
     "FILE:5: events[1]." + "x" * 190 + "... (100,010 characters): unknown field"),
])
def test_calendar_times_are_in_range_and_echoes_are_bounded(tmp_path: Path, name: str,
                                                            text: str, message: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(SnapshotError) as caught:
        load_calendar(path)
    assert str(caught.value).replace(str(path), "FILE") == message


def test_a_calendar_event_s_time_is_kept_in_utc() -> None:
    calendar = load_calendar(REPO / "examples" / "firms" / "news.yaml")
    assert all(e.time.tzinfo is UTC for e in calendar.events)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_or_a_huge_file_as_a_calendar_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_calendar("/dev/zero")
    assert str(caught.value) == ("/dev/zero: cannot read the news calendar: not a regular "
                                 "file (a device, a socket or a folder)")
    huge = tmp_path / "news.csv"
    with huge.open("wb") as handle:  # sparse
        handle.truncate(64 * 2**20 + 1)
    with pytest.raises(InputError) as caught:
        load_calendar(huge)
    assert str(caught.value) == f"{huge}: cannot read the news calendar: larger than 64 MiB"
