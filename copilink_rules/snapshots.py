"""Loading snapshots (JSON or YAML) and timelines (JSON Lines), reporting file, line and field.

A timeline is read lazily, one line at a time, so a long session never has to fit in memory and
an error on line 40,000 is reported as line 40,000.

Inputs are bounded: a file must be a regular file (or a pipe), a single-document file at most
`MAX_FILE_BYTES`, a timeline line at most `MAX_LINE_BYTES`; a value echoed back in a message is
cut to `MAX_ECHO` characters, and at most `MAX_PROBLEMS` problems are listed per file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from .errors import InstrumentError, Problem, SnapshotError
from .fastread import FastReader
from .instruments import Catalog, default_catalog
from .model import Account, Order, Position, Quote, Snapshot
from .rules.expressions import did_you_mean
from .sources import LineMap, YamlSyntaxError, load_yaml

MAX_FILE_BYTES = 64 * 2**20  # a snapshot, a calendar, a policy-test file
MAX_LINE_BYTES = 16 * 2**20  # one line of a timeline (UTF-8)
_READ_BUFFER = 2**20
MAX_ECHO = 200  # characters of a user's value quoted back in a message
MAX_PROBLEMS = 50  # problems listed for one file; the rest are counted

_NON_FINITE = frozenset({"nan", ".nan", "inf", ".inf", "+.inf", "-.inf", "+inf", "-inf",
                         "infinity", "+infinity", "-infinity"})
MAX_INT_DIGITS = 100  # a whole number longer than this is a typo or an attack
_LONG_NUMBER = re.compile(rf"\d{{{MAX_INT_DIGITS + 1},}}")


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """`text`, cut to `limit` characters with a note of how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def bounded(problems: list[Problem]) -> list[Problem]:
    """At most MAX_PROBLEMS problems, each message at most a few hundred characters."""
    kept = [Problem(p.file, p.line, clip(p.message, 2 * MAX_ECHO + 100), p.rule)
            for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        kept.append(Problem(problems[0].file, None,
                            f"... and {len(problems) - MAX_PROBLEMS:,} more problem(s)"))
    return kept


def open_input(path: str | Path, file: str, what: str = "") -> IO[bytes]:
    """Open a user's input file for reading in binary; refuse devices such as /dev/zero.

    A regular file or a pipe (`<(zcat session.jsonl.gz)`) is read; a device, socket or folder
    is refused with SnapshotError, whose message starts "cannot read{what}"."""
    try:
        # a large buffer: a timeline's lines are read one by one, each a few kB long
        handle = Path(path).open("rb", buffering=_READ_BUFFER)  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise SnapshotError([Problem(file, None, f"cannot read{what}: {exc.strerror}")]) \
            from None
    try:
        mode = os.fstat(handle.fileno()).st_mode
    except OSError as exc:
        handle.close()
        raise SnapshotError([Problem(file, None, f"cannot read{what}: {exc.strerror}")]) \
            from None
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        handle.close()
        raise SnapshotError([Problem(file, None, f"cannot read{what}: not a regular file "
                                     "(a device, a socket or a folder)")])
    return handle


def read_input(path: str | Path, file: str, what: str = "",
               limit: int = MAX_FILE_BYTES) -> str:
    """The text of a single-document input file (UTF-8, newlines made `\\n`), at most `limit`
    bytes; SnapshotError with one clear line otherwise, having read at most `limit` + 1 bytes."""
    with open_input(path, file, what) as handle:
        try:  # a regular file says its size: refuse a huge one without reading it
            too_big = os.fstat(handle.fileno()).st_size > limit
            data = b"" if too_big else handle.read(limit + 1)
        except OSError as exc:
            raise SnapshotError([Problem(file, None, f"cannot read{what}: {exc.strerror}")]) \
                from None
    if too_big or len(data) > limit:
        raise SnapshotError([Problem(file, None, f"cannot read{what}: larger than "
                                     f"{limit / 2**20:g} MiB")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SnapshotError([Problem(file, line, "not a UTF-8 text file")]) from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class _LongNumberError(ValueError):
    def __init__(self, digits: str) -> None:
        super().__init__(digits)
        self.digits = digits


def _json_int(digits: str) -> int:
    # json.loads would raise a bare ValueError past Python's 4300-digit limit, and no quantity
    # or amount needs more than a few digits: refuse, naming the line.
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongNumberError(digits)
    return int(digits)


def number_too_long(text: str, file: str, digits: str | None = None) -> Problem:
    """The problem for a whole number of more than MAX_INT_DIGITS digits, on its line."""
    at = text.find(digits) if digits else -1
    found = _LONG_NUMBER.search(text) if at < 0 else None
    if found is not None:
        at, digits = found.start(), found.group()
    line = text.count("\n", 0, at) + 1 if at >= 0 else None
    size = f"{len(digits.lstrip('+-')):,} digits" if digits else "too many digits"
    return Problem(file, line, f"a number with {size} is too long (at most {MAX_INT_DIGITS})")


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('accounts', 1, 'positions', 0, 'qty') -> 'accounts[1].positions[0].qty'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


_MODELS_OF: dict[str, type[BaseModel]] = {"accounts": Account, "positions": Position,
                                          "orders": Order, "quotes": Quote}


def _known_fields(loc: tuple[str | int, ...]) -> list[str]:
    """The fields of the model that holds the last part of `loc`."""
    model: type[BaseModel] = Snapshot
    for part in reversed(loc[:-1]):
        if isinstance(part, str) and part in _MODELS_OF:
            model = _MODELS_OF[part]
            break
    return list(model.model_fields)


def _pydantic_problems(
    exc: ValidationError, file: str, line_of: LineMap | int | None
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
        field = clip(format_loc(loc))
        given = error.get("input")
        if error["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _known_fields(loc)) if loc else ""
            message = f"{field}: unknown field{hint or ' (remove it or check its spelling)'}"
        elif error["type"] == "timezone_aware":
            message = (f"{field}: a time needs its UTC offset: add Z or +00:00 (or your "
                       f"offset, e.g. -05:00) (got {clip(repr(given))})")
        elif error["type"] == "missing":
            message = f"{field}: required field is missing"
        elif error["type"] == "json_invalid":
            message = f"invalid JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
        else:
            shown = f" (got {clip(repr(given))})" if not isinstance(given, dict | list) else ""
            msg = error["msg"]
            if error["type"] == "float_type" and isinstance(given, str) and \
                    given.strip().lower() in _NON_FINITE:
                msg = "Input should be a finite number"
            message = f"{field}: {msg}{shown}"
        line = line_of.line_of(loc) if isinstance(line_of, LineMap) else line_of
        problems.append(Problem(file, line, message))
        if len(problems) > MAX_PROBLEMS:
            break  # bounded() says there were more
    return problems


def check_snapshot(
    snapshot: Snapshot, file: str, line: LineMap | int | None, catalog: Catalog
) -> list[Problem]:
    """Cross-field checks pydantic cannot do alone: ids, leaders, instrument symbols."""
    problems: list[Problem] = []

    def add(loc: tuple[str | int, ...], message: str) -> None:
        where = line.line_of(loc) if isinstance(line, LineMap) else line
        problems.append(Problem(file, where, f"{clip(format_loc(loc))}: {clip(message)}"))

    def symbol(loc: tuple[str | int, ...], text: str) -> None:
        try:
            catalog.parse(text)
        except InstrumentError as exc:
            add(loc, str(exc))

    seen: set[str] = set()
    leaders = {a.id for a in snapshot.accounts if a.role == "leader"}
    leader_count = sum(1 for a in snapshot.accounts if a.role == "leader")
    for name in snapshot.quotes:
        symbol(("quotes", name), name)
    for i, account in enumerate(snapshot.accounts):
        if account.id in seen:
            add(("accounts", i, "id"), f"duplicate account id {account.id!r}")
        seen.add(account.id)
        if account.role == "follower":
            if account.leader is not None and account.leader not in leaders:
                add(("accounts", i, "leader"), f"no leader account named {account.leader!r}")
            elif account.leader is None and leader_count != 1:
                add(
                    ("accounts", i, "leader"),
                    f"follower {account.id!r} must name its leader "
                    f"({leader_count} leader accounts in this snapshot)",
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
        return None, bounded(_pydantic_problems(exc, file, line))
    return snapshot, bounded(check_snapshot(snapshot, file, line, catalog))


def load_snapshot(path: str | Path, catalog: Catalog | None = None) -> Snapshot:
    """Load one snapshot (.json, .yaml or .yml); raise SnapshotError listing every problem."""
    catalog = catalog or default_catalog()
    file = str(path)
    if file.endswith(".jsonl"):
        raise SnapshotError(
            [Problem(file, None, "this is a timeline (JSON Lines); use `replay` for timelines")]
        )
    text = read_input(path, file)
    try:
        data, lines = load_yaml(text)  # JSON is read as YAML too, which gives us lines
    except YamlSyntaxError as exc:
        data, lines = _json_fallback(text, file, exc)
    except ValueError:  # the YAML reader's int(): more digits than Python converts
        raise SnapshotError([number_too_long(text, file)]) from None
    if not isinstance(data, dict):
        raise SnapshotError([Problem(file, 1, "a snapshot must be a JSON/YAML object")])
    snapshot, problems = parse_snapshot(data, file, lines, catalog)
    if problems or snapshot is None:
        raise SnapshotError(problems)
    return snapshot


def _json_fallback(text: str, file: str, yaml_error: YamlSyntaxError) -> tuple[Any, LineMap]:
    try:
        return json.loads(text, parse_int=_json_int), LineMap(default=None)
    except _LongNumberError as exc:
        raise SnapshotError([number_too_long(text, file, exc.digits)]) from None
    except json.JSONDecodeError as exc:
        if file.endswith(".json"):
            message = f"invalid JSON: {exc.msg} (column {exc.colno})"
            raise SnapshotError([Problem(file, exc.lineno, message)]) from None
        raise SnapshotError([Problem(file, yaml_error.line, str(yaml_error))]) from None
    except ValueError:  # more digits than Python converts to an int
        raise SnapshotError([number_too_long(text, file)]) from None
    except RecursionError:
        raise SnapshotError([Problem(file, None, "invalid JSON: nested too deeply")]) from None


def iter_timeline(path: str | Path, catalog: Catalog | None = None, *,
                  fast: bool = True) -> Iterator[Snapshot]:
    """Yield the snapshots of a JSON Lines timeline; stop at the first bad line with SnapshotError.

    Blank lines and lines starting with `#` are skipped. Times must not go backwards. A line
    longer than MAX_LINE_BYTES is refused without reading the rest of it (`_timeline_lines`).

    Each line is read by `fastread.FastReader` (msgspec), which gives the same snapshot as the
    strict path (pydantic, `_timeline_line`) or declines; a declined line is read by the strict
    path, which accepts it or reports its problems. `fast=False` reads every line strictly.
    """
    for snapshot, _ in iter_timeline_origins(path, catalog, fast=fast):
        yield snapshot


Origins = Sequence[Account | None] | None


def iter_timeline_origins(path: str | Path, catalog: Catalog | None = None, *,
                          fast: bool = True) -> Iterator[tuple[Snapshot, Origins]]:
    """`iter_timeline`'s snapshots, each with the origins of its accounts (`FastReader.origins`:
    which are the previous line's account with only their time and money moved; None for a
    line read strictly), for `Engine.evaluate(snapshot, origins=...)`: the engine then does
    not work out again what follows from the rest of such an account."""
    catalog = catalog or default_catalog()
    file = str(path)
    previous = None
    reader = FastReader(catalog) if fast else None
    with open_input(path, file) as handle:
        for number, line in _timeline_lines(handle, file):
            snapshot = origins = None
            if isinstance(line, bytes):  # ASCII: msgspec reads the bytes as they are
                if reader is not None:
                    stripped = line.strip()
                    if not stripped or stripped[0] == 35:  # blank, or a `#` comment
                        continue
                    snapshot = reader.read(stripped)
                    origins = reader.origins
                if snapshot is None:
                    text = line.decode("ascii").strip()  # as the strict path takes it
                    if not text or text.startswith("#"):
                        continue
            else:
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                if reader is not None:
                    snapshot = reader.read(text)
                    origins = reader.origins
            try:
                if snapshot is None:  # declined by the fast path, or no fast path
                    snapshot = _timeline_line(text, file, number, catalog)
            except SnapshotError:
                if previous is None and (text == "{" or file.endswith(
                        (".json", ".yaml", ".yml"))):  # a snapshot file, most likely
                    raise SnapshotError([Problem(file, number, _NOT_A_TIMELINE)]) from None
                raise
            if previous is not None and snapshot.time < previous:
                raise SnapshotError(
                    [Problem(file, number, f"time {snapshot.time.isoformat()} is earlier "
                             f"than the previous line's {previous.isoformat()}")]
                )
            previous = snapshot.time
            yield snapshot, origins


_READ_LIMIT = MAX_LINE_BYTES + 2  # a line of the limit, and its \r\n
_LONE_CR = re.compile(rb"\r(?!\n)")  # a \r that ends a line by itself


def _timeline_lines(handle: IO[bytes], file: str) -> Iterator[tuple[int, bytes | str]]:
    """Each line of a timeline and its number, its line end included: as bytes when it is
    ASCII (msgspec reads them without a str made first), else as text. A line ends at `\n`,
    `\r\n` or a lone `\r`, as Python reads text. SnapshotError for a line longer than
    MAX_LINE_BYTES (read no further than twice that) and for one that is not UTF-8, each
    with its own line number."""
    number = 0
    carry = b""  # the start of a line that goes on past what was read (after a lone \r)
    while True:
        try:
            part = handle.readline(_READ_LIMIT)
        except OSError as exc:
            raise SnapshotError([Problem(file, number + 1, f"cannot read: {exc.strerror}")]) \
                from None
        # up to a \n or the end of the file; else the limit was reached and the line goes on
        ended = part.endswith(b"\n") or len(part) < _READ_LIMIT
        cr = part.find(b"\r")  # most lines: one line, whole (no \r but in their \r\n)
        if not carry and ended and (cr < 0 or (cr == len(part) - 2 and part.endswith(b"\r\n"))):
            if not part:
                return
            number += 1
            yield number, _line(part, file, number)
            continue
        raw = carry + part
        if not raw:
            return
        # a \r at the end of what was read may be the start of a \r\n: kept whole
        body = raw[:-1] if not ended and raw.endswith(b"\r") else raw
        pieces = _LONE_CR.split(body)
        pieces[-1] += raw[len(body):]
        if not ended:
            carry = pieces.pop()  # goes on in what is read next
        else:
            carry = b""
            if len(pieces) > 1 and not pieces[-1]:
                pieces.pop()  # after a lone \r at the end of the file: no line
        for piece in pieces:
            number += 1
            yield number, _line(piece, file, number)
        if len(carry) - carry.endswith(b"\r") > MAX_LINE_BYTES:
            raise _too_long(file, number + 1)


def _line(piece: bytes, file: str, number: int) -> bytes | str:
    """One line read whole (its end, if any, `\n` or `\r\n`, still on it): itself when it is
    ASCII, else its text; SnapshotError when it is too long or not UTF-8."""
    if len(piece) - (2 if piece.endswith(b"\r\n") else piece.endswith(b"\n")) > \
            MAX_LINE_BYTES:
        raise _too_long(file, number)
    if piece.isascii():
        return piece
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        raise SnapshotError([Problem(file, number, "not UTF-8 text")]) from None


def _too_long(file: str, number: int) -> SnapshotError:
    return SnapshotError([Problem(file, number,
                                  f"line longer than {MAX_LINE_BYTES / 2**20:g} MiB")])


_NOT_A_TIMELINE = ("a timeline is JSON Lines (.jsonl): one snapshot per line; for one "
                   "snapshot in a .json or .yaml file use dry-run --state")


def _timeline_line(line: str, file: str, number: int, catalog: Catalog) -> Snapshot:
    try:
        snapshot = Snapshot.model_validate_json(line)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            try:
                json.loads(line, parse_int=_json_int)
            except json.JSONDecodeError as json_exc:
                message = f"invalid JSON: {json_exc.msg} (column {json_exc.colno})"
                raise SnapshotError([Problem(file, number, message)]) from None
            except _LongNumberError as long_exc:
                found = number_too_long(line, file, long_exc.digits)
                raise SnapshotError([Problem(file, number, found.message)]) from None
            except (ValueError, RecursionError):  # too deeply nested, ...
                pass  # pydantic's own message says what
        raise SnapshotError(bounded(_pydantic_problems(exc, file, number))) from None
    problems = check_snapshot(snapshot, file, number, catalog)
    if problems:
        raise SnapshotError(bounded(problems))
    return snapshot


def load_timeline(path: str | Path, catalog: Catalog | None = None) -> list[Snapshot]:
    return list(iter_timeline(path, catalog))
