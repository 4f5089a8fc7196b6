"""The news calendar a trader keeps: economic events during which firms require flat books.

YAML::

    events:
      - {time: "2026-03-06T08:30:00-05:00", name: NFP, impact: high, instruments: [all]}
      - {time: "2026-03-18T14:00:00-04:00", name: FOMC, impact: high, instruments: [ES, NQ]}
      - {time: "2026-03-11T10:30:00-04:00", name: Crude inventories, impact: medium,
         instruments: [CL]}

or CSV with the header `time,name,impact,instruments` (instruments separated by spaces or `;`,
`all` for every instrument). Times need a UTC offset. Instruments are roots or families: `NQ`
covers NQ and MNQ.
"""

from __future__ import annotations

import bisect
import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InstrumentError, Problem, SnapshotError
from .instruments import Catalog, default_catalog
from .model import UtcDatetime
from .snapshots import bounded, clip, format_loc, number_too_long, read_input
from .sources import YamlSyntaxError, load_yaml

IMPACT_RANK = {"low": 0, "medium": 1, "high": 2}


class NewsEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    time: UtcDatetime  # kept in UTC; years 2000 to 2100
    name: str = Field(min_length=1)
    impact: Literal["low", "medium", "high"] = "high"
    instruments: tuple[str, ...] = ("all",)


class _CalendarFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[NewsEvent] = Field(default_factory=list)


@dataclass(frozen=True)
class _Event:
    time: datetime
    name: str
    impact: int
    families: frozenset[str] | None  # None: every instrument


class Calendar:
    """Events sorted by time; `active` answers "is a blackout on now?" quickly."""

    def __init__(self, events: Iterable[NewsEvent], catalog: Catalog | None = None) -> None:
        catalog = catalog or default_catalog()
        items = []
        for event in events:
            names = {i.upper() for i in event.instruments}
            families = None if "ALL" in names else frozenset(
                catalog.specs[n].family if n in catalog.specs else n for n in names)
            items.append(_Event(event.time, event.name, IMPACT_RANK[event.impact], families))
        self.events = sorted(items, key=lambda e: e.time)
        self._times = [e.time for e in self.events]

    def active(self, now: datetime, before: float, after: float,
               families: Iterable[str] | None, min_impact: str = "high") -> _Event | None:
        """The event whose window [time - before, time + after] holds `now` and that affects
        any of `families` (None: any instrument), or None."""
        lo = bisect.bisect_left(self._times, now - timedelta(seconds=after))
        hi = bisect.bisect_right(self._times, now + timedelta(seconds=before))
        wanted = IMPACT_RANK[min_impact]
        held = None if families is None else set(families)
        for event in self.events[lo:hi]:
            if event.impact < wanted:
                continue
            if event.families is None or held is None or event.families & held:
                return event
        return None


def load_calendar(path: str | Path, catalog: Catalog | None = None) -> Calendar:
    """Load a YAML or CSV calendar; SnapshotError (file:line: field: message) or
    InstrumentError when it is wrong. At most 64 MiB, from a regular file or a pipe."""
    file = str(path)
    text = read_input(path, file, " the news calendar")
    catalog = catalog or default_catalog()
    if file.endswith(".csv"):
        events = _csv_events(text, file)
    else:
        try:
            data, lines = load_yaml(text)
        except YamlSyntaxError as exc:
            raise SnapshotError([Problem(file, exc.line, str(exc))]) from None
        except ValueError:  # the YAML reader's int(): more digits than Python converts
            raise SnapshotError([number_too_long(text, file)]) from None
        try:
            events = _CalendarFile.model_validate(data or {}).events
        except ValidationError as exc:
            raise SnapshotError(bounded([
                Problem(file, lines.line_of(list(e["loc"])),
                        f"{clip(format_loc(tuple(e['loc'])))}: "
                        f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}")
                for e in exc.errors()])) from None
    _check_instruments(events, file, catalog)
    return Calendar(events, catalog)


CSV_HEADER = ("time", "name", "impact", "instruments")


def _csv_events(text: str, file: str) -> list[NewsEvent]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise SnapshotError([Problem(file, 1, f"not valid CSV: {exc}")]) from None
    if sorted(header) != sorted(CSV_HEADER):
        raise SnapshotError([Problem(file, 1, "the header must be: time,name,impact,"
                                              "instruments")])
    events, problems = [], []
    while True:
        try:
            row = next(reader, None)
        except csv.Error as exc:
            problems.append(Problem(file, reader.line_num, f"not valid CSV: {exc}"))
            break
        if row is None:
            break
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(header):
            problems.append(Problem(file, number, f"expected {len(header)} fields "
                                    f"({','.join(header)}), found {len(row)} (separate "
                                    "instruments with spaces or ;, not commas)"))
            continue
        raw: dict[str, object] = dict(zip(header, row, strict=True))
        raw["instruments"] = tuple(
            i for i in str(raw["instruments"]).replace(";", " ").split() if i) or ("all",)
        try:
            events.append(NewsEvent.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            problems.append(Problem(file, number, f"{clip(format_loc(tuple(first['loc'])))}: "
                                                  f"{first['msg']}"))
    if problems:
        raise SnapshotError(bounded(problems))
    return events


def _check_instruments(events: list[NewsEvent], file: str, catalog: Catalog) -> None:
    families = {s.family for s in catalog.specs.values()}
    for event in events:
        for name in event.instruments:
            upper = name.upper()
            if upper != "ALL" and upper not in catalog.specs and upper not in families:
                raise InstrumentError(f"{file}: event {clip(repr(event.name))} at "
                                      f"{event.time}: unknown instrument {clip(repr(name))} "
                                      "(use roots such as ES, NQ, CL, or all)")
