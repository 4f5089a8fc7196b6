"""Policy tests (`copilink-rules test`): cases of snapshots or timelines and the decisions they
must produce (`expect`) and must not produce (`forbid`), like `opa test`.

A test file::

    rules: [../desync.yaml]          # relative to the test file
    set: {stuck_grace: 2s}           # optional param overrides
    cases:
      - name: stuck follower is flattened after the grace
        timeline: ../../examples/stuck-follower.jsonl   # or an inline list of snapshots
        expect:
          - {rule: stuck-follower, action: flatten, account: F1, at: "2026-03-02T14:31:09Z",
             count: 1}
        forbid:
          - {action: catch_up}

A matcher's fields must all match a decision: rule, action, account, instrument, severity,
`suppressed` (false by default; true = suppressed for any reason; text = part of the reason),
`reason` (part of the reason), `args` (a subset of the action's arguments), `at` (exact
time), `after` / `before` (inclusive). `count` (in
`expect`) is the exact number of matching decisions, default at least one.
A case with `snapshot:` is a dry run; `check: true` runs the pre-session check and `ready:`
says whether the accounts should pass it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .calendar import load_calendar
from .engine import Engine
from .errors import CopilinkError, PolicyTestError, Problem, SnapshotError
from .instruments import Catalog, default_catalog
from .model import Decision, Snapshot, UtcDatetime
from .rules.loader import load_policy
from .snapshots import (
    bounded,
    clip,
    format_loc,
    iter_timeline,
    load_snapshot,
    number_too_long,
    parse_snapshot,
    read_input,
)
from .sources import LineMap, YamlSyntaxError, load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Matcher(_Strict):
    rule: str | None = None
    action: str | None = None
    account: str | None = None
    instrument: str | None = None
    severity: str | None = None
    suppressed: bool | str = False
    reason: str | None = None
    at: UtcDatetime | None = None
    after: UtcDatetime | None = None
    before: UtcDatetime | None = None
    args: dict[str, Any] | None = None
    count: int | None = Field(default=None, ge=0, le=1_000_000, strict=True)

    def matches(self, decision: Decision) -> bool:
        for name in ("rule", "action", "account", "instrument", "severity"):
            wanted = getattr(self, name)
            if wanted is not None and getattr(decision, name) != wanted:
                return False
        if self.suppressed is False and decision.suppressed is not False:
            return False
        if self.suppressed is True and decision.suppressed is False:
            return False
        if isinstance(self.suppressed, str) and (
            decision.suppressed is False or self.suppressed not in decision.suppressed
        ):
            return False
        if self.reason is not None and self.reason not in decision.reason:
            return False
        if self.args is not None and any(
            decision.args.get(key) != value for key, value in self.args.items()
        ):
            return False
        if self.at is not None and decision.time != self.at:
            return False
        if self.after is not None and decision.time < self.after:
            return False
        return self.before is None or decision.time <= self.before

    def describe(self) -> str:
        fields = self.model_dump(exclude_none=True, exclude_defaults=True, mode="json")
        return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


class Case(_Strict):
    name: str = Field(min_length=1)
    snapshot: str | dict[str, Any] | None = None
    timeline: str | list[dict[str, Any]] | None = None
    check: bool = False
    ready: bool | None = None
    calendar: str | None = None
    restart_after: int | None = Field(
        default=None, ge=1, le=10_000_000, strict=True, description="save the engine's state "
        "after this many snapshots and continue in a fresh engine restored from it, as a "
        "restarted session would")
    set: dict[str, str | int | float | bool] = Field(default_factory=dict)
    expect: list[Matcher] = Field(default_factory=list)
    forbid: list[Matcher] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_input(self) -> Case:
        if (self.snapshot is None) == (self.timeline is None):
            raise ValueError("give exactly one of `snapshot` or `timeline`")
        if self.ready is not None and not self.check:
            raise ValueError("`ready` needs `check: true`")
        if not (self.expect or self.forbid or self.ready is not None):
            raise ValueError("a case needs `expect`, `forbid` or `ready`")
        return self


class TestFile(_Strict):
    rules: list[str] = Field(min_length=1)
    calendar: str | None = None
    set: dict[str, str | int | float | bool] = Field(default_factory=dict)
    cases: list[Case] = Field(min_length=1)


@dataclass
class CaseResult:
    file: str
    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _load_file(path: Path) -> tuple[TestFile, LineMap]:
    file = str(path)
    try:
        text = read_input(path, file)
    except SnapshotError as exc:
        raise PolicyTestError(exc.problems) from None
    try:
        data, lines = load_yaml(text)
    except YamlSyntaxError as exc:
        raise PolicyTestError([Problem(file, exc.line, str(exc))]) from None
    except ValueError:  # the YAML reader's int(): more digits than Python converts
        raise PolicyTestError([number_too_long(text, file)]) from None
    try:
        return TestFile.model_validate(data), lines
    except ValidationError as exc:
        raise PolicyTestError(bounded([
            Problem(file, lines.line_of(list(e["loc"])),
                    f"{clip(format_loc(tuple(e['loc'])))}: {e['msg']}")
            for e in exc.errors()
        ])) from None


def _snapshots(case: Case, index: int, base: Path, lines: LineMap,
               catalog: Catalog) -> Iterable[Snapshot]:
    file = str(base)
    folder = base.parent
    if isinstance(case.snapshot, str):
        return [load_snapshot(folder / case.snapshot, catalog)]
    if isinstance(case.timeline, str):
        return iter_timeline(folder / case.timeline, catalog)
    items = [case.snapshot] if case.snapshot is not None else list(case.timeline or [])
    key = "snapshot" if case.snapshot is not None else "timeline"
    out: list[Snapshot] = []
    problems: list[Problem] = []
    for number, item in enumerate(items):
        loc: list[str | int] = ["cases", index, key]
        if key == "timeline":
            loc.append(number)
        snapshot, found = parse_snapshot(item, file, None, catalog)
        problems.extend(Problem(file, lines.line_of(loc), f"{format_loc(tuple(loc))}: "
                                f"{p.message}") for p in found)
        if snapshot is not None:
            if out and snapshot.time < out[-1].time:
                problems.append(Problem(file, lines.line_of(loc), f"{format_loc(tuple(loc))}: "
                                        "time goes backwards"))
            out.append(snapshot)
    if problems:
        raise PolicyTestError(bounded(problems))
    return out


def run_case(engine: Engine, case: Case, snapshots: Iterable[Snapshot]) -> tuple[
        list[Decision], list[str]]:
    decisions: list[Decision] = []
    failures: list[str] = []
    single = case.snapshot is not None
    stage = "pre_session" if case.check else "session"
    for number, snapshot in enumerate(snapshots, start=1):
        decisions.extend(engine.evaluate(snapshot, as_if_held=single or case.check, stage=stage))
        if case.restart_after == number:
            saved = json.loads(json.dumps(engine.save_state()))
            engine = Engine(engine.policy, engine.catalog, engine.calendar)
            engine.restore_state(saved)
    if case.ready is not None:
        blocking = [d for d in decisions if d.suppressed is False]
        if case.ready and blocking:
            failures.append("expected READY, but: " + "; ".join(d.reason for d in blocking))
        if not case.ready and not blocking:
            failures.append("expected NOT READY, but every check passed")
    for matcher in case.expect:
        found = [d for d in decisions if matcher.matches(d)]
        if matcher.count is None and not found:
            failures.append(f"expected {matcher.describe()}: no decision matched")
        elif matcher.count is not None and len(found) != matcher.count:
            failures.append(f"expected {matcher.count} x {matcher.describe()}: got {len(found)}"
                            + (f" (at {', '.join(_time(d.time) for d in found)})" if found
                               else ""))
    for matcher in case.forbid:
        found = [d for d in decisions if matcher.matches(d)]
        if found:
            first = found[0]
            failures.append(f"forbidden {matcher.describe()} happened {len(found)} time(s), "
                            f"first at {_time(first.time)}: {first.rule} {first.action} "
                            f"{first.account}: {first.reason}")
    if failures and decisions:
        failures.append("decisions were:\n" + "\n".join(
            f"      {_time(d.time)} {d.rule} {d.action} {d.account} {d.instrument or ''}"
            f"{' [suppressed: ' + d.suppressed + ']' if d.suppressed else ''}"
            for d in decisions[:30]))
    return decisions, failures


def _loaded(cache: dict[Any, Any], key: Any, load: Callable[[], Any]) -> Any:
    """What `load` gives for `key`, loaded once per run: its error too, raised again for each
    case that needs it."""
    if key not in cache:
        try:
            cache[key] = load()
        except CopilinkError as exc:
            cache[key] = exc
    found = cache[key]
    if isinstance(found, CopilinkError):
        raise found
    return found


def _time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_test_files(paths: Iterable[str | Path],
                   catalog: Catalog | None = None) -> list[CaseResult]:
    """Run every case of every test file; raise PolicyTestError for malformed files."""
    catalog = catalog or default_catalog()
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():  # in folders, test files end in _test.yaml (like opa's _test.rego)
            files.extend(sorted(p for p in path.rglob("*")
                                if p.name.endswith(("_test.yaml", "_test.yml"))))
        elif path.is_file():
            files.append(path)
        elif path.exists():  # /dev/zero, a socket, ...
            raise PolicyTestError([Problem(str(path), None, "not a regular file or a folder")])
        else:
            raise PolicyTestError([Problem(str(path), None, "no such file or folder")])
    if not files:
        raise PolicyTestError([Problem(", ".join(map(str, paths)), None,
                                       "no policy-test files (*_test.yaml) found")])
    results: list[CaseResult] = []
    # the cases of a run share what they load: rule files with the same overrides (most cases
    # of a file), calendars; each case still gets an engine of its own (nothing is shared
    # between cases but what the files say). A file that fails to load fails each case.
    policies: dict[tuple[tuple[Path, ...], tuple[tuple[str, str], ...]], Any] = {}
    calendars: dict[Path, Any] = {}
    for path in files:
        spec, lines = _load_file(path)
        rules = [path.parent / r for r in spec.rules]
        for index, case in enumerate(spec.cases):
            result = CaseResult(str(path), case.name)
            results.append(result)
            overrides = {k: _text(v) for k, v in {**spec.set, **case.set}.items()}
            try:
                # keyed by the paths as written, so an error names the file as it did
                policy = _loaded(policies, (tuple(rules), tuple(sorted(overrides.items()))),
                                 partial(load_policy, rules, overrides))
                calendar_file = case.calendar or spec.calendar
                calendar = None
                if calendar_file:
                    calendar_path = path.parent / calendar_file
                    calendar = _loaded(calendars, calendar_path,
                                       partial(load_calendar, calendar_path, catalog))
                engine = Engine(policy, catalog, calendar)
                _, result.failures = run_case(
                    engine, case, _snapshots(case, index, path, lines, catalog))
            except CopilinkError as exc:
                result.failures.append(f"error: {exc}")
    return results

