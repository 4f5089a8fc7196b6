"""Loading snapshots (JSON or YAML) and timelines (JSON Lines), reporting file, line and field.

A timeline is read lazily, one line at a time, so a long session never has to fit in memory and
an error on line 40,000 is reported as line 40,000.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import InstrumentError, Problem, SnapshotError
from .instruments import Catalog, default_catalog
from .model import Snapshot
from .sources import LineMap, YamlSyntaxError, load_yaml


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('accounts', 1, 'positions', 0, 'qty') -> 'accounts[1].positions[0].qty'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _pydantic_problems(
    exc: ValidationError, file: str, line_of: LineMap | int | None
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
        field = format_loc(loc)
        if error["type"] == "extra_forbidden":
            message = f"{field}: unknown field (remove it or check its spelling)"
        elif error["type"] == "missing":
            message = f"{field}: required field is missing"
        else:
            given = error.get("input")
            shown = f" (got {given!r})" if not isinstance(given, dict | list) else ""
            message = f"{field}: {error['msg']}{shown}"
        line = line_of.line_of(loc) if isinstance(line_of, LineMap) else line_of
        problems.append(Problem(file, line, message))
    return problems


def check_snapshot(
    snapshot: Snapshot, file: str, line: LineMap | int | None, catalog: Catalog
) -> list[Problem]:
    """Cross-field checks pydantic cannot do alone: ids, leaders, instrument symbols."""
    problems: list[Problem] = []

    def add(loc: tuple[str | int, ...], message: str) -> None:
        where = line.line_of(loc) if isinstance(line, LineMap) else line
        problems.append(Problem(file, where, f"{format_loc(loc)}: {message}"))

    def symbol(loc: tuple[str | int, ...], text: str) -> None:
        try:
            catalog.parse(text)
        except InstrumentError as exc:
            add(loc, str(exc))

    ids = [a.id for a in snapshot.accounts]
    leaders = [a.id for a in snapshot.accounts if a.role == "leader"]
    for name in snapshot.quotes:
        symbol(("quotes", name), name)
    for i, account in enumerate(snapshot.accounts):
        if ids.index(account.id) != i:
            add(("accounts", i, "id"), f"duplicate account id {account.id!r}")
        if account.role == "follower":
            if account.leader is not None and account.leader not in leaders:
                add(("accounts", i, "leader"), f"no leader account named {account.leader!r}")
            elif account.leader is None and len(leaders) != 1:
                add(
                    ("accounts", i, "leader"),
                    f"follower {account.id!r} must name its leader "
                    f"({len(leaders)} leader accounts in this snapshot)",
                )
        for j, position in enumerate(account.positions):
            symbol(("accounts", i, "positions", j, "instrument"), position.instrument)
        for j, order in enumerate(account.orders):
            symbol(("accounts", i, "orders", j, "instrument"), order.instrument)
        for j, text in enumerate(account.overnight):
            symbol(("accounts", i, "overnight", j), text)
        if account.updated_at is not None and account.updated_at > snapshot.time:
            add(("accounts", i, "updated_at"), "is later than the snapshot's time")
    return problems


def parse_snapshot(
    data: Any, file: str, line: LineMap | int | None, catalog: Catalog
) -> tuple[Snapshot | None, list[Problem]]:
    try:
        snapshot = Snapshot.model_validate(data)
    except ValidationError as exc:
        return None, _pydantic_problems(exc, file, line)
    return snapshot, check_snapshot(snapshot, file, line, catalog)


def load_snapshot(path: str | Path, catalog: Catalog | None = None) -> Snapshot:
    """Load one snapshot (.json, .yaml or .yml); raise SnapshotError listing every problem."""
    catalog = catalog or default_catalog()
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SnapshotError([Problem(file, None, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise SnapshotError([Problem(file, None, "not a UTF-8 text file")]) from None
    if file.endswith(".jsonl"):
        raise SnapshotError(
            [Problem(file, None, "this is a timeline (JSON Lines); use `replay` for timelines")]
        )
    try:
        data, lines = load_yaml(text)  # JSON is read as YAML too, which gives us lines
    except YamlSyntaxError as exc:
        data, lines = _json_fallback(text, file, exc)
    if not isinstance(data, dict):
        raise SnapshotError([Problem(file, 1, "a snapshot must be a JSON/YAML object")])
    snapshot, problems = parse_snapshot(data, file, lines, catalog)
    if problems or snapshot is None:
        raise SnapshotError(problems)
    return snapshot


def _json_fallback(text: str, file: str, yaml_error: YamlSyntaxError) -> tuple[Any, LineMap]:
    try:
        return json.loads(text), LineMap(default=None)
    except json.JSONDecodeError as exc:
        if file.endswith(".json"):
            message = f"invalid JSON: {exc.msg} (column {exc.colno})"
            raise SnapshotError([Problem(file, exc.lineno, message)]) from None
        raise SnapshotError([Problem(file, yaml_error.line, str(yaml_error))]) from None


def iter_timeline(path: str | Path, catalog: Catalog | None = None) -> Iterator[Snapshot]:
    """Yield the snapshots of a JSON Lines timeline; stop at the first bad line with SnapshotError.

    Blank lines and lines starting with `#` are skipped. Times must not go backwards.
    """
    catalog = catalog or default_catalog()
    file = str(path)
    previous = None
    try:
        handle = Path(path).open(encoding="utf-8")  # noqa: SIM115 - closed by the `with` below
    except OSError as exc:
        raise SnapshotError([Problem(file, None, f"cannot read: {exc.strerror}")]) from None
    with handle:
        number = 0
        try:
            for number, raw in enumerate(handle, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    snapshot = _timeline_line(line, file, number, catalog)
                except SnapshotError:
                    if previous is None and (line == "{" or file.endswith(
                            (".json", ".yaml", ".yml"))):  # a snapshot file, most likely
                        raise SnapshotError([Problem(file, number, _NOT_A_TIMELINE)]) from None
                    raise
                if previous is not None and snapshot.time < previous:
                    raise SnapshotError(
                        [Problem(file, number, f"time {snapshot.time.isoformat()} is earlier "
                                 f"than the previous line's {previous.isoformat()}")]
                    )
                previous = snapshot.time
                yield snapshot
        except UnicodeDecodeError:
            raise SnapshotError([Problem(file, number + 1, "not UTF-8 text")]) from None


_NOT_A_TIMELINE = ("a timeline is JSON Lines (.jsonl): one snapshot per line; for one "
                   "snapshot in a .json or .yaml file use dry-run --state")


def _timeline_line(line: str, file: str, number: int, catalog: Catalog) -> Snapshot:
    try:
        snapshot = Snapshot.model_validate_json(line)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            try:
                json.loads(line)
            except json.JSONDecodeError as json_exc:
                message = f"invalid JSON: {json_exc.msg} (column {json_exc.colno})"
                raise SnapshotError([Problem(file, number, message)]) from None
        raise SnapshotError(_pydantic_problems(exc, file, number)) from None
    problems = check_snapshot(snapshot, file, number, catalog)
    if problems:
        raise SnapshotError(problems)
    return snapshot


def load_timeline(path: str | Path, catalog: Catalog | None = None) -> list[Snapshot]:
    return list(iter_timeline(path, catalog))
