"""Loading rule files into a `Policy`: schema check, `extends`, params, compiled expressions.

Loading is all or nothing: every problem of every file is collected, each as
`file:line: rule-id: message`, and raised together as one RuleFileError.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema
from pydantic import ValidationError

from copilink_rules.errors import ExpressionError, ParamError, Problem, RuleFileError
from copilink_rules.namespace import BOOL, NUM, STR
from copilink_rules.sources import LineMap, YamlSyntaxError, clip, echo, load_yaml

from .expressions import CompiledExpression, compile_expression, compile_template, did_you_mean
from .spec import (
    DEFAULT_ALERT_COOLDOWN,
    PARAM_PATTERN,
    STEP_ARGS,
    ParamSpec,
    Rule,
    RuleSetFile,
    ruleset_json_schema,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_TIME = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
_LOOKS_LIKE_TIME = re.compile(r"^\d{1,2}:\d{1,2}(?::\d{1,2})?$")  # "25:00" is a bad time
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TEMPLATE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
RULE_SUFFIXES = (".yaml", ".yml")
MAX_DURATION = 7 * 86400.0  # no rule waits, cools down or locks for longer than a week
MAX_PARAM_NUMBER = 1e15  # beyond any price, balance or count; a larger param is a typo
MAX_PARAM_DIGITS = 30  # characters of a number written as text (--set)
MAX_MESSAGE_LENGTH = 2000  # a rendered alert message is cut here, with an ellipsis
MAX_PROBLEM_LENGTH = 1000  # one load problem's message


def parse_duration(text: str) -> float:
    """'500ms' -> 0.5, '2s' -> 2.0, '1m' -> 60.0, '1h' -> 3600.0; at most 7 days."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{echo(text)} is not a duration (use 500ms, 2s, 1m or 1h)")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds > MAX_DURATION:
        raise ValueError(f"{echo(text)} is longer than 7 days (168h), the longest duration "
                         "allowed")
    return seconds


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    value: Any  # in expression form: durations in seconds, times as "HH:MM"
    text: str  # as written, for messages
    description: str | None
    ruleset: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None  # an enum's values


@dataclass(frozen=True)
class Action:
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Template:
    """An alert message: literal text with compiled `{expression}` holes."""

    parts: tuple[str | CompiledExpression, ...]
    # the whole message written by one function (compile_template), made on first render
    _whole: Any = field(default=None, compare=False, repr=False)

    def render(self, env: Any) -> str:
        whole = self._whole
        if whole is None:
            whole = self._compile()
        if whole is not False:
            try:
                return clip(whole(env), MAX_MESSAGE_LENGTH)
            except Exception:  # noqa: BLE001, S110 - a hole failed: part by part, below
                pass
        return self._render_parts(env)

    def prepare(self) -> None:
        """Compile the message's function now (a tick otherwise does on its first render)."""
        if self._whole is None:
            self._compile()

    def _compile(self) -> Any:
        try:
            whole: Any = compile_template(self.parts, _show, "message")
        except Exception:  # noqa: BLE001 - cannot happen for checked holes; parts still work
            whole = False
        object.__setattr__(self, "_whole", whole)  # a cache of what `parts` say
        return whole

    def _render_parts(self, env: Any) -> str:
        """The message one part at a time: a hole that fails shows its error in its place."""
        out = []
        length = 0  # of what is in `out`
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                length += len(part)
                continue
            try:
                shown = _show(part.evaluate(env))
            # a hole in a message never breaks the decision it explains
            except Exception as exc:  # noqa: BLE001
                shown = f"<{part.source}: {exc}>"
            out.append(shown)
            length += len(shown)
            if length > MAX_MESSAGE_LENGTH:
                break
        return clip("".join(out), MAX_MESSAGE_LENGTH)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _show(value: Any) -> str:
    kind = type(value)
    if kind is str:  # the most common holes (ids, sides, symbols), first
        return value  # type: ignore[no-any-return]
    if kind is int:  # not a bool
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.10g}"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


@dataclass(frozen=True)
class CompiledRule:
    ruleset: str
    id: str
    description: str | None
    scope: str
    stage: str
    roles: frozenset[str] | None
    firms: frozenset[str] | None
    accounts: frozenset[str] | None
    when: CompiledExpression
    hold: float  # seconds `when` must hold
    cooldown: float
    actions: tuple[Action, ...]
    templates: tuple[Template | None, ...]  # per action, for alerts
    priority: int
    mode: str
    severity: str | None
    timezone: ZoneInfo
    file: str
    line: int | None

    def applies(self, account_id: str, role: str, firm: str | None) -> bool:
        if self.roles is not None and role not in self.roles:
            return False
        if self.firms is not None and (firm or "") not in self.firms:
            return False
        return self.accounts is None or account_id in self.accounts


@dataclass(frozen=True)
class RuleSetInfo:
    name: str
    file: str
    description: str | None
    source: str | None
    as_of: str | None
    timezone: str
    extends: tuple[str, ...]
    firm: str | None = None
    trading_day_start: str = "18:00"


@dataclass(frozen=True)
class TradingDay:
    """When a firm's trading day starts: local time in a timezone (the evening before)."""

    zone: ZoneInfo
    start: str  # "HH:MM"

    def label(self, moment: datetime) -> date:
        """The trading day `moment` belongs to: after the start time, it is tomorrow's."""
        local = moment.astimezone(self.zone)
        hour, minute = (int(x) for x in self.start.split(":"))
        day = local.date()
        return day + timedelta(days=1) if (local.hour, local.minute) >= (hour, minute) else day

    def next_start(self, moment: datetime) -> datetime:
        """The next start of a trading day after `moment` (UTC)."""
        local = moment.astimezone(self.zone)
        at = time.fromisoformat(self.start)
        candidate = datetime.combine(local.date(), at, tzinfo=self.zone)
        if candidate <= local:
            candidate = datetime.combine(local.date() + timedelta(days=1), at,
                                         tzinfo=self.zone)
        return candidate.astimezone(UTC)


DEFAULT_TRADING_DAY = TradingDay(ZoneInfo("America/New_York"), "18:00")


@dataclass
class Policy:
    """Everything loaded from a set of rule files, ready for the engine."""

    rulesets: list[RuleSetInfo]
    rules: list[CompiledRule]
    params: dict[str, Param]
    version: str
    files: list[str] = field(default_factory=list)

    @property
    def param_values(self) -> SimpleNamespace:
        return SimpleNamespace(**{name: p.value for name, p in self.params.items()})

    @property
    def name(self) -> str:
        roots = [r.name for r in self.rulesets if not self._is_parent(r.name)]
        return "+".join(roots) or "(empty)"

    def _is_parent(self, name: str) -> bool:
        return any(name in r.extends for r in self.rulesets)

    def param(self, name: str, default: Any) -> Any:
        found = self.params.get(name)
        return default if found is None else found.value

    def expressions(self) -> Iterator[CompiledExpression]:
        """Each rule's condition and the `{...}` holes of its alert messages, every stage's."""
        for rule in self.rules:
            yield rule.when
            for template in rule.templates:
                if template is not None:
                    yield from (part for part in template.parts if not isinstance(part, str))

    def mentions(self, word: str) -> bool:
        """Does any condition or alert message of the loaded rules use `word`?"""
        return any(word in expression.source for expression in self.expressions())

    def view_fields(self, names: Iterable[str]) -> frozenset[str] | None:
        """The fields of the views `names` (e.g. `account`, `leader_account`: one kind of
        view) that the conditions and alert messages of the loaded rules read, every stage's;
        None when one of them uses such a view whole (it may read any field)."""
        found: set[str] = set()
        for expression in self.expressions():
            for name in names:
                fields = expression.view_fields(name)
                if fields is None:
                    return None
                found |= fields
        return frozenset(found)

    def trading_day(self, firm: str | None) -> TradingDay:
        """The trading day of `firm` (from its rule set), else 18:00 New York (CME)."""
        for info in self.rulesets:
            if firm is not None and info.firm == firm:
                return TradingDay(ZoneInfo(info.timezone), info.trading_day_start)
        return DEFAULT_TRADING_DAY

    @property
    def firms(self) -> dict[str, RuleSetInfo]:
        return {info.firm: info for info in self.rulesets if info.firm}


# --- parsing one file ---------------------------------------------------------------------

@dataclass
class _Parsed:
    file: str
    text: str
    model: RuleSetFile
    lines: LineMap
    rule_index: list[int]  # position in the file of each rule in `model` (bad ones left out)


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(ruleset_json_schema())


def _rule_id(data: Any, path: Sequence[Any]) -> str | None:
    if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
        try:
            rule = data["rules"][path[1]]
            return str(rule["id"]) if isinstance(rule, dict) and "id" in rule else None
        except (IndexError, KeyError, TypeError):
            return None
    return None


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problems(data: Any, file: str, lines: LineMap) -> list[Problem]:
    problems: list[Problem] = []
    for error in sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path)):
        path = list(error.absolute_path)
        message = _schema_message(error, data, path)
        if message is None:
            continue
        if len(repr(error.instance)) > 200:  # a huge value is echoed clipped
            message = message.replace(repr(error.instance), echo(error.instance))
        where = path
        if error.validator == "additionalProperties":
            where = path + _extra_keys(error)[:1]  # point at the misspelt key itself
        problems.append(Problem(file, lines.line_of(where), clip(message, MAX_PROBLEM_LENGTH),
                                _rule_id(data, path)))
    return problems


def _extra_keys(error: jsonschema.ValidationError) -> list[object]:
    """The keys an additionalProperties error is about: the text keys in order, then those
    YAML read as another type (a null key, a number), by how they read."""
    schema: Any = error.schema
    instance: Any = error.instance
    if not isinstance(schema, dict) or not isinstance(instance, dict):
        return []
    return sorted(set(instance) - set(schema.get("properties", {})),
                  key=lambda key: (not isinstance(key, str), str(key)))


def _schema_message(error: jsonschema.ValidationError, data: Any, path: list[Any]) -> str | None:
    where = _dotted(path)
    prefix = f"{where}: " if where else ""
    if error.validator == "additionalProperties":
        extra = _extra_keys(error)
        schema: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
        if not extra:
            return error.message
        return f"{prefix}{_unknown_key(extra[0], list(schema.get('properties', {})))}"
    if error.validator == "required":
        return f"{prefix}{error.message.replace('is a required property', 'is required')}"
    if len(path) == 4 and path[0] == "rules" and path[2] == "then":
        return _step_message(error.instance, where)
    if error.validator == "pattern" and path and path[-1] in ("for", "cooldown"):
        return f"{prefix}{error.instance!r} is not a duration (use 500ms, 2s, 1m or params.NAME)"
    if error.validator == "pattern" and path and path[-1] in ("id", "ruleset"):
        return (f"{prefix}{error.instance!r} is not a valid name (lower-case letters, digits, "
                "- and _)")
    if error.validator in ("anyOf", "oneOf") and error.context:
        # of the alternatives, the ones of the value's own type say what is wrong with it
        own_type = [e for e in error.context if e.validator != "type" or e.path]
        best = jsonschema.exceptions.best_match(own_type or error.context)
        if best.validator == "additionalProperties" and _extra_keys(best):
            known = list(best.schema.get("properties", {})) if isinstance(best.schema, dict) \
                else []
            return f"{prefix}{_unknown_key(_extra_keys(best)[0], known)}"
        return f"{prefix}{best.message}"
    return f"{prefix}{error.message}"


def _unknown_key(key: object, known: list[str]) -> str:
    """"unknown key 'priorty' (did you mean 'priority'?)", or the known keys. A key YAML read
    as another type (`: x` is a null key, `1: x` a number) is named as written there."""
    if not isinstance(key, str):
        key = "null" if key is None else str(key)
    hint = did_you_mean(key, known) if len(key) <= 100 else ""
    return f"unknown key {echo(key)}{hint or ' (known: ' + ', '.join(known) + ')'}"


def _step_message(step: Any, where: str) -> str:
    names = ", ".join(STEP_ARGS)
    if isinstance(step, str):
        return f"{where}: unknown action {step!r} (known: {names})"
    if not isinstance(step, dict) or len(step) != 1:
        return f"{where}: each step is one action, e.g. `- flatten: {{}}` (known: {names})"
    (name, args), = step.items()
    if name not in STEP_ARGS:
        return f"{where}: unknown action {name!r} (known: {names})"
    try:
        STEP_ARGS[name].model_validate(args or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden" and first["loc"]:
            known = list(STEP_ARGS[name].model_fields)
            return f"{where}.{name}: {_unknown_key(str(first['loc'][-1]), known)}"
        if name == "lock_account" and loc == "until":
            return (f"{where}.lock_account.until: {echo(first['input'])} is not "
                    "next_trading_day, next_session, a time of day HH:MM (00:00 to 23:59) or "
                    "a duration such as 30m or 4h")
        return f"{where}.{name}{'.' + loc if loc else ''}: {first['msg']}"
    if isinstance(step, dict) and name == "reduce_order":
        return f"{where}: reduce_order needs max_qty"
    return f"{where}: invalid arguments for {name}"


def parse_rule_file(path: Path) -> tuple[_Parsed | None, list[Problem]]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [Problem(file, None, f"cannot read rule file: {exc.strerror}")]
    except UnicodeDecodeError:
        return None, [Problem(file, None, "not a UTF-8 text file")]
    try:
        data, lines = load_yaml(text)
    except YamlSyntaxError as exc:
        return None, [Problem(file, exc.line, str(exc))]
    if not isinstance(data, dict):
        return None, [Problem(file, 1, "a rule file must be a YAML mapping with `ruleset:` "
                                       "and `rules:`")]
    problems = _schema_problems(data, file, lines)
    # Keep checking the rules that are well-formed, so one pass reports every problem.
    bad_rules = {p.rule for p in problems if p.rule is not None}
    outside_rules = [p for p in problems if p.rule is None]
    raw_rules = data.get("rules")
    rules: list[Any] = raw_rules if isinstance(raw_rules, list) else []
    keep = [i for i, r in enumerate(rules)
            if not (isinstance(r, dict) and r.get("id") in bad_rules)]
    if outside_rules or (problems and not isinstance(raw_rules, list)):
        return None, problems
    data = {**data, "rules": [rules[i] for i in keep]} if "rules" in data else data
    try:
        model = RuleSetFile.model_validate(data)
    except ValidationError as exc:  # the schema should have caught it; report anyway
        return None, problems + [
            Problem(file, lines.line_of(list(e["loc"])), f"{_dotted(list(e['loc']))}: "
                    f"{e['msg']}", _rule_id(data, list(e["loc"])))
            for e in exc.errors()
        ]
    return _Parsed(file, text, model, lines, keep), problems


# --- a set of files ----------------------------------------------------------------------

def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Files as given; folders contribute their *.yaml / *.yml files (not sub-folders)."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in RULE_SUFFIXES)
            if not found:
                problems.append(Problem(str(path), None, "folder holds no .yaml rule files"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(Problem(str(path), None, "no such file or folder"))
    return files, problems


def bundled_rules_dir() -> Path:
    """The shipped rule sets: installed as copilink_rules/bundled_rules, or a checkout's rules/."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "bundled_rules"
    return installed if installed.is_dir() else package.parent / "rules"


def _find_parent(name: str, child: Path, search_path: Sequence[Path]) -> Path | None:
    candidates = [child.parent, child.parent.parent, *search_path, bundled_rules_dir()]
    for folder in candidates:
        for suffix in RULE_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def load_policy(
    paths: Iterable[str | Path],
    overrides: dict[str, str] | None = None,
    search_path: Sequence[str | Path] = (),
) -> Policy:
    """Load rule files (and their `extends` parents) into one Policy, or raise RuleFileError."""
    files, problems = expand_paths(paths)
    search = [Path(p) for p in search_path]
    by_name: dict[str, _Parsed] = {}
    order: list[str] = []  # parents before children
    resolved: dict[Path, str] = {}

    def visit(path: Path, stack: list[str], via: Problem | None) -> str | None:
        path = path.resolve()
        if path in resolved:
            name = resolved[path]
            if name in stack:
                cycle = " -> ".join([*stack[stack.index(name):], name])
                problems.append(Problem(via.file if via else str(path), via.line if via else None,
                                        f"extends cycle: {cycle}"))
                return None
            return name
        parsed, found = parse_rule_file(path)
        problems.extend(found)
        if parsed is None:
            return None
        name = parsed.model.ruleset
        if name in by_name and Path(by_name[name].file).resolve() != path:
            problems.append(Problem(parsed.file, parsed.lines.line_of(["ruleset"]),
                                    f"rule set {name!r} is also defined in {by_name[name].file}"))
            return None
        resolved[path] = name
        by_name[name] = parsed
        for index, parent in enumerate(parsed.model.extends):
            line = parsed.lines.line_of(["extends", index])
            where = Problem(parsed.file, line, "")
            if parent == name:
                problems.append(Problem(parsed.file, line, f"rule set {name!r} extends itself"))
                continue
            parent_path = (by_name[parent].file if parent in by_name
                           else _find_parent(parent, path, search))
            if parent_path is None:
                folders = ", ".join(str(f) for f in [path.parent, path.parent.parent, *search,
                                                     bundled_rules_dir()])
                problems.append(Problem(parsed.file, line, f"extends {parent!r}, but no "
                                        f"{parent}.yaml was found (searched: {folders})"))
                continue
            parent_name = visit(Path(parent_path), [*stack, name], where)
            if parent_name is not None and parent_name != parent:
                problems.append(Problem(parsed.file, line, f"extends {parent!r}, but "
                                        f"{parent_path} defines rule set {parent_name!r}"))
        if name not in order:
            order.append(name)
        return name

    for path in files:
        visit(path, [], None)
    if any(p.rule is None for p in problems):
        # a file, its top level or its `extends` is broken: checking on would only add noise
        raise RuleFileError(_clipped(problems))

    broken: dict[str, str] = {}
    params = _merge_params(order, by_name, problems, broken)
    if overrides:
        _apply_overrides(params, overrides)
    rules = _compile_rules(order, by_name, params, problems, broken)
    if problems:
        raise RuleFileError(_clipped(sorted(problems, key=lambda p: (p.file, p.line or 0))))

    digest = hashlib.sha256()
    for name in order:
        digest.update(name.encode() + b"\0" + by_name[name].text.encode() + b"\0")
    for key in sorted(overrides or {}):
        digest.update(f"{key}={(overrides or {})[key]}\0".encode())
    infos = [
        RuleSetInfo(
            name=n, file=by_name[n].file, description=by_name[n].model.description,
            source=by_name[n].model.source,
            as_of=_iso_date(by_name[n].model.as_of),
            timezone=by_name[n].model.timezone, extends=tuple(by_name[n].model.extends),
            firm=by_name[n].model.firm, trading_day_start=by_name[n].model.trading_day_start,
        )
        for n in order
    ]
    return Policy(infos, rules, params, digest.hexdigest()[:12],
                  files=[by_name[n].file for n in order])


def _clipped(problems: list[Problem]) -> list[Problem]:
    """Each message at most MAX_PROBLEM_LENGTH chars: what echoes a user's text stays short."""
    return [p if len(p.message) <= MAX_PROBLEM_LENGTH else
            Problem(p.file, p.line, clip(p.message, MAX_PROBLEM_LENGTH), p.rule)
            for p in problems]


def _iso_date(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _ancestors(name: str, by_name: dict[str, _Parsed]) -> set[str]:
    seen: set[str] = set()
    todo = list(by_name[name].model.extends)
    while todo:
        parent = todo.pop()
        if parent not in seen and parent in by_name:
            seen.add(parent)
            todo.extend(by_name[parent].model.extends)
    return seen


def _merge_params(
    order: list[str], by_name: dict[str, _Parsed], problems: list[Problem],
    broken: dict[str, str],
) -> dict[str, Param]:
    """The params of every rule set, children overriding parents. A param whose value is
    wrong is reported here and its type kept in `broken` (name -> type), so the rules that
    use it are still checked without a second, misleading "unknown param"."""
    params: dict[str, Param] = {}
    for name in order:
        parsed = by_name[name]
        for key, raw in parsed.model.params.items():
            line = parsed.lines.line_of(["params", key])
            if not re.match(PARAM_PATTERN, key):
                problems.append(Problem(parsed.file, line, f"param name {echo(key)} must be "
                                        "lower-case letters, digits and _"))
                continue
            try:
                param = _make_param(key, raw, name, params.get(key))
            except ValueError as exc:
                problems.append(Problem(parsed.file, line, f"params.{key}: {exc}"))
                broken[key] = raw.type if isinstance(raw, ParamSpec) else _infer_type(raw)
                continue
            previous = params.get(key)
            if previous is not None:
                if previous.type != param.type:
                    problems.append(Problem(parsed.file, line, f"params.{key} is "
                                            f"{_a(param.type)} here but {_a(previous.type)} "
                                            f"in rule set {previous.ruleset!r}"))
                    continue
                overriding = previous.ruleset in _ancestors(name, by_name)
                if not overriding and previous.value != param.value:
                    problems.append(Problem(parsed.file, line, f"params.{key} = {param.text} "
                                            f"conflicts with {previous.text} in rule set "
                                            f"{previous.ruleset!r}; set it with --set {key}=..."))
                    continue
            params[key] = param
    return params


def _infer_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str) and _DURATION.match(value):
        return "duration"
    if isinstance(value, str) and _LOOKS_LIKE_TIME.match(value):
        return "time"  # "15:75" is a time with a typo, not a text: convert_param says so
    return "string"


def _make_param(key: str, raw: Any, ruleset: str, inherited: Param | None = None) -> Param:
    kind: str
    choices: tuple[str, ...] | None = None
    if not isinstance(raw, ParamSpec) and inherited is not None and inherited.type == "enum":
        # `apex_trailing: eod` in a child sets the parent's enum: checked against its choices
        value = convert_param("enum", raw, choices=inherited.choices)
        return Param(key, "enum", value, _text(raw), inherited.description, ruleset,
                     choices=inherited.choices)
    if isinstance(raw, ParamSpec):
        kind, default = raw.type, raw.default
        description, low, high = raw.description, raw.min, raw.max
        for bound, word in ((low, "min"), (high, "max")):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{word} must be a finite number, got {bound!r}")
        if kind == "enum":
            if not raw.choices:
                raise ValueError("an enum param needs `choices:`, the values it may take")
            choices = tuple(raw.choices)
        elif raw.choices is not None:
            raise ValueError(f"choices are for `type: enum`, not {kind}")
    else:
        kind, default, description, low, high = _infer_type(raw), raw, None, None, None
    value = convert_param(kind, default, low, high, choices)
    return Param(key, kind, value, _text(default), description, ruleset, low, high, choices)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def convert_param(kind: str, value: Any, low: float | None = None,
                  high: float | None = None, choices: Sequence[str] | None = None) -> Any:
    """A param value in expression form, or ValueError saying what is wrong.

    Numbers must be finite and within +-MAX_PARAM_NUMBER (`nan`, `inf`, `1e999` and a
    4,300-digit integer are refused), durations at most 7 days, times a real HH:MM, and an
    enum's value one of its choices (the message names the nearest)."""
    result: Any
    if kind == "bool":
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(f"expected true or false, got {echo(value)}")
            return lowered in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {echo(value)}")
        return value
    if kind in ("int", "number"):
        result = _number_param(kind, value)
    elif kind == "duration":
        result = parse_duration(str(value))
    elif kind == "time":
        if not isinstance(value, str) or not _TIME.match(value.strip()):
            raise ValueError(f'expected a time of day "HH:MM" (00:00 to 23:59), got '
                             f"{echo(value)}")
        return value.strip()
    elif kind == "enum":
        allowed = tuple(choices or ())
        if not isinstance(value, str) or value.strip() not in allowed:
            hint = did_you_mean(value.strip(), allowed) if isinstance(value, str) and \
                len(value) <= 100 else ""
            raise ValueError(f"{echo(value)} is not one of {', '.join(allowed)}{hint}")
        return value.strip()
    else:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {echo(value)}")
        return value
    if low is not None and result < low:
        raise ValueError(f"{echo(value)} is below the minimum {low:g}")
    if high is not None and result > high:
        raise ValueError(f"{echo(value)} is above the maximum {high:g}")
    return result


def _number_param(kind: str, value: Any) -> int | float:
    what = "an integer" if kind == "int" else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {what}, got {echo(value)}")
    if isinstance(value, str) and len(value.strip()) > MAX_PARAM_DIGITS:
        raise ValueError(f"expected {what} of at most {MAX_PARAM_DIGITS} characters, got "
                         f"{len(value.strip())} characters")
    if isinstance(value, int) and abs(value) > MAX_PARAM_NUMBER:  # before any float()
        raise ValueError(f"{echo(value)} is too large (params are limited to +-1e15)")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what}, got {echo(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {echo(value)}")
    if abs(number) > MAX_PARAM_NUMBER:
        raise ValueError(f"{echo(value)} is too large (params are limited to +-1e15)")
    if kind == "number":
        return number
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {echo(value)}") from None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {echo(value)}")
    return int(value)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """['a=1', 'b=2s'] -> {'a': '1', 'b': '2s'}; ParamError for an item without '='."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParamError(f"--set {echo(item)}: expected name=value, e.g. --set "
                             "max_contracts=5")
        out[name.strip()] = value.strip()
    return out


def _apply_overrides(params: dict[str, Param], overrides: dict[str, str]) -> None:
    for name, text in overrides.items():
        param = params.get(name)
        given = clip(f"{name}={text}")
        if param is None:
            hint = did_you_mean(name, params) if len(name) <= 100 else ""
            known = ", ".join(sorted(params)) or "(none)"
            raise ParamError(f"--set {given}: unknown param {echo(name)}{hint}; known: {known}")
        try:
            value = convert_param(param.type, text, param.minimum, param.maximum, param.choices)
        except ValueError as exc:
            raise ParamError(f"--set {given}: {exc}") from None
        params[name] = Param(name, param.type, value, text, param.description, param.ruleset,
                             param.minimum, param.maximum, param.choices)


_EXPR_TYPE = {"int": NUM, "number": NUM, "duration": NUM, "bool": BOOL, "string": STR,
              "time": STR, "enum": STR}


def _compile_rules(
    order: list[str], by_name: dict[str, _Parsed], params: dict[str, Param],
    problems: list[Problem], broken: dict[str, str] | None = None,
) -> list[CompiledRule]:
    types = {name: _EXPR_TYPE[kind] for name, kind in (broken or {}).items()}
    types.update({name: _EXPR_TYPE[p.type] for name, p in params.items()})
    compiled: list[CompiledRule] = []
    seen: dict[str, tuple[str, int | None]] = {}
    for name in order:
        parsed = by_name[name]
        try:
            zone = ZoneInfo(parsed.model.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(Problem(parsed.file, parsed.lines.line_of(["timezone"]),
                                    f"unknown timezone {parsed.model.timezone!r} (use an IANA "
                                    "name such as America/New_York or America/Chicago)"))
            continue
        for index, rule in enumerate(parsed.model.rules):
            base: list[str | int] = ["rules", parsed.rule_index[index]]
            line = parsed.lines.line_of(base)
            if rule.id in seen:
                other_file, other_line = seen[rule.id]
                problems.append(Problem(parsed.file, line, f"duplicate rule id (also at "
                                        f"{other_file}:{other_line})", rule.id))
                continue
            seen[rule.id] = (parsed.file, line)
            result = _compile_rule(rule, name, parsed, base, zone, params, types, problems)
            if result is not None:
                compiled.append(result)
    return compiled


def _compile_rule(
    rule: Rule, ruleset: str, parsed: _Parsed, base: list[Any], zone: ZoneInfo,
    params: dict[str, Param], types: dict[str, str], problems: list[Problem],
) -> CompiledRule | None:
    before = len(problems)
    values = {name: param.value for name, param in params.items()}
    choices = {name: param.choices for name, param in params.items() if param.choices}

    def problem(path: list[Any], message: str) -> None:
        problems.append(Problem(parsed.file, parsed.lines.line_of(base + path), message, rule.id))

    when: CompiledExpression | None = None
    try:
        when = compile_expression(rule.when, rule.scope, types, f"rule {rule.id}",
                                  condition=True, values=values, choices=choices)
    except ExpressionError as exc:
        problem(["when"], f"when: {exc}")

    def seconds(field_name: str, text: str) -> float:
        if text.startswith("params."):
            param = params.get(text[7:])
            if param is None or param.type != "duration":
                problem([field_name], f"{field_name}: {text} is not a duration param")
                return 0.0
            return float(param.value)
        try:
            return parse_duration(text)
        except ValueError as exc:
            problem([field_name], f"{field_name}: {exc}")
            return 0.0

    hold = seconds("for", rule.for_)
    cooldown = seconds("cooldown", rule.cooldown)
    actions: list[Action] = []
    templates: list[Template | None] = []
    for index, step in enumerate(rule.then):
        action = _action_of(step)
        template = None
        if action.name == "alert" and action.args.get("message"):
            template = _template(action.args["message"], rule.scope, types,
                                 lambda msg, i=index: problem(["then", i, "alert", "message"],
                                                              msg), choices)
        if action.name == "lock_account":
            until = str(action.args.get("until", ""))
            if _DURATION.match(until):
                try:
                    parse_duration(until)
                except ValueError as exc:
                    problem(["then", index, "lock_account", "until"],
                            f"lock_account.until: {exc}")
        if action.name == "catch_up" and rule.scope != "pair":
            problem(["then", index], "catch_up needs a leader: use it in scope pair")
        if action.name in ("pause_copier", "resume_copier") and rule.scope == "global" and \
                not action.args.get("all_followers"):
            problem(["then", index], f"{action.name} in scope global needs all_followers: true")
        if action.name == "reduce_order":
            ref = action.args.get("max_qty")
            if isinstance(ref, str) and (not ref.startswith("params.") or ref[7:] not in params):
                problem(["then", index], f"reduce_order.max_qty: {ref!r} is not a number or a "
                                         "declared params.NAME")
        actions.append(action)
        templates.append(template)
    if len(problems) > before or when is None:
        return None
    if "cooldown" not in rule.model_fields_set and \
            all(action.name == "alert" for action in actions):
        cooldown = parse_duration(DEFAULT_ALERT_COOLDOWN)  # alerts are not spam
    applies = rule.applies_to
    firms = frozenset(applies.firms) if applies and applies.firms is not None else None
    if parsed.model.firm is not None:  # a firm's rules are for that firm's accounts only
        firms = (firms or frozenset({parsed.model.firm})) & {parsed.model.firm}
    return CompiledRule(
        ruleset=ruleset, id=rule.id, description=rule.description, scope=rule.scope,
        stage=rule.stage,
        roles=frozenset(applies.roles) if applies and applies.roles is not None else None,
        firms=firms,
        accounts=(frozenset(applies.accounts)
                  if applies and applies.accounts is not None else None),
        when=when, hold=hold, cooldown=cooldown, actions=tuple(actions),
        templates=tuple(templates), priority=rule.priority, mode=rule.mode,
        severity=rule.severity, timezone=zone, file=parsed.file,
        line=parsed.lines.line_of(base),
    )


def _action_of(step: Any) -> Action:
    if isinstance(step, str):
        model = STEP_ARGS[step]()
        return Action(step, model.model_dump())
    (name,) = step.model_dump().keys()
    model_args = getattr(step, name)
    if model_args is None:
        model_args = STEP_ARGS[name]()
    return Action(name, model_args.model_dump())


def _template(text: str, scope: str, types: dict[str, str], report: Any,
              choices: dict[str, tuple[str, ...]] | None = None) -> Template | None:
    parts: list[str | CompiledExpression] = []
    position = 0
    ok = True
    for match in _TEMPLATE.finditer(text):
        parts.append(text[position:match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        try:
            parts.append(compile_expression(match[1], scope, types, "message",
                                            choices=choices))
        except ExpressionError as exc:
            report(f"message {{{match[1]}}}: {exc}")
            ok = False
    parts.append(text[position:])
    return Template(tuple(p for p in parts if p != "")) if ok else None
