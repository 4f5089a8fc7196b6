"""Compiling `when` expressions: parse once, check everything, then run a compiled function.

The language is simpleeval's safe subset of Python expressions, checked more strictly than
simpleeval checks at run time, because here every check happens once, at load:

* names must be in the documented namespace for the rule's scope (namespace.NAMES);
* attribute access only along namespace chains with known fields (`account.contracts`,
  `params.max_contracts`): nothing reaches `__class__`, `format`, `mro`, frames or modules,
  because no object outside the namespace can be named at all;
* calls only of the function library below, by bare name;
* no f-strings, lambdas, comprehensions, subscripts, walrus, `is`, bit operators, no `%`
  formatting of text, no repeating or joining of lists;
* time and memory are bounded by construction: `**` runs through `safe_power`, which refuses a
  result of more than MAX_POWER_BITS bits (at load when both operands are literals); `*` and `+`
  run through `safe_mult` / `safe_add` where an operand may be text, which refuse text longer
  than MAX_TEXT_LENGTH; `%` runs through `safe_mod` where its left side may be text; number
  literals have at most MAX_NUMBER_DIGITS digits. So every value an expression builds is small.

The checked tree is rewritten (names read from one environment object, operators through the
safe functions) and compiled by CPython into a function with no builtins. Run-time failures
(a missing quote, division by zero, a too-large power) raise inside that function; the engine
reports them as evaluation errors for that rule and target.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

from copilink_rules.errors import EvaluationError, ExpressionError
from copilink_rules.namespace import ANY, BOOL, DATETIME, FIELDS, NAMES, NUM, STR, TIME, Env
from copilink_rules.rules.batching import batch_function, fold

MAX_EXPRESSION_LENGTH = 2000
MAX_DEPTH = 40
MAX_STRING_LITERAL = 1000
MAX_LIST_LITERAL = 100
MAX_NUMBER_DIGITS = 30  # a literal like 10**30 is already far beyond any price or balance
MAX_POWER_BITS = 1024  # the range of a float (about 1.8e308): no rule needs a larger power
MAX_TEXT_LENGTH = 10_000  # text an expression may build with * or +
ENV = "__cl_env"


# --- the function library ------------------------------------------------------------------

_NUMBER_TYPES = frozenset({int, float})


def _brief(value: Any) -> str:
    """A number for a message: a huge int is described, not printed."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "\u2026"


def power_bits(base: Any, exponent: Any) -> float:
    """log2 of the magnitude of base ** exponent, estimated without computing it (0 when the
    result is at most 1, or cannot grow: a base of 0 or 1, a NaN)."""
    try:
        magnitude = abs(base)
        if magnitude in (0, 1) or exponent != exponent:  # noqa: PLR0124 - NaN test
            return 0.0
        log = math.log2(magnitude)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if log != log:  # noqa: PLR0124 - a NaN base
        return 0.0
    # a float cannot hold a huge int exponent: its sign is all that matters then
    scaled = float(exponent) if abs(exponent) < 1e300 else math.copysign(1e300, exponent)
    return log * scaled


def safe_power(base: Any, exponent: Any) -> Any:
    """base ** exponent for numbers, refused when the result would need more than
    MAX_POWER_BITS bits: `4000000 ** 4000000` would cost a minute of CPU and 11 MB."""
    for value in (base, exponent):
        if not isinstance(value, int | float):
            raise EvaluationError(f"** needs numbers, got {_brief(value)}")
    if power_bits(base, exponent) > MAX_POWER_BITS:
        raise EvaluationError(f"{_brief(base)} ** {_brief(exponent)} is too large (a power may "
                              f"give at most 2 ** {MAX_POWER_BITS}, about 1.8e308)")
    return base ** exponent


def _sequence_error(what: str) -> EvaluationError:
    return EvaluationError(f"lists cannot be {what} in a rule expression")


def safe_mult(a: Any, b: Any) -> Any:
    """a * b, with text repeated to at most MAX_TEXT_LENGTH chars and lists not repeated."""
    if isinstance(a, str) or isinstance(b, str):
        text, times = (a, b) if isinstance(a, str) else (b, a)
        if isinstance(times, int) and len(text) * times > MAX_TEXT_LENGTH:
            raise EvaluationError(f"text longer than {MAX_TEXT_LENGTH} chars is not allowed")
    elif isinstance(a, list | tuple) or isinstance(b, list | tuple):
        raise _sequence_error("repeated")
    return a * b


def safe_add(a: Any, b: Any) -> Any:
    """a + b, with joined text of at most MAX_TEXT_LENGTH chars and lists not joined."""
    if isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_TEXT_LENGTH:
            raise EvaluationError(f"text longer than {MAX_TEXT_LENGTH} chars is not allowed")
    elif isinstance(a, list | tuple) or isinstance(b, list | tuple):
        raise _sequence_error("joined")
    return a + b


def safe_mod(a: Any, b: Any) -> Any:
    """a % b for numbers; `"%999999999d" % 1` (a 1 GB string) is refused."""
    if isinstance(a, str):
        raise EvaluationError("% formatting of text is not allowed in a rule expression")
    return a % b


def _number(value: Any, what: str) -> float:
    if value.__class__ in _NUMBER_TYPES:  # the common case, in one set lookup
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EvaluationError(f"{what} needs a number, got {value!r}")
    return value


_TIMES: dict[str, time] = {}


def _to_time(value: Any) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str):
        cached = _TIMES.get(value)
        if cached is not None:
            return cached
        try:
            parsed = time.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            if len(_TIMES) < 10_000:  # params and literals: a handful of distinct values
                _TIMES[value] = parsed
            return parsed
    raise EvaluationError(f'time() needs "HH:MM" or "HH:MM:SS", got {value!r}')


def fn_time(value: Any) -> time:
    """time("16:59") -> a time of day, comparable with now_local."""
    return _to_time(value)


def fn_sign(value: Any) -> int:
    """sign(x) -> -1, 0 or 1."""
    number = _number(value, "sign()")
    return (number > 0) - (number < 0)


def fn_ticks(env: Env, a: Any, b: Any) -> float:
    """ticks(price_a, price_b) -> absolute distance in ticks of the pair's instrument."""
    distance = abs(_number(a, "ticks()") - _number(b, "ticks()"))
    return distance / float(env.instrument.tick_size)


def fn_minutes_until(env: Env, value: Any) -> float:
    """minutes_until("16:59") -> minutes from now to the next such local time (0 at it)."""
    return _minutes_until(env, _to_time(value))


def _minutes_until(env: Env, target: time) -> float:
    now = env.now_local  # counted on the local clock face, as a trader reads it
    seconds = (target.hour * 3600 + target.minute * 60 + target.second) - (
        now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6)
    return (seconds if seconds >= 0 else seconds + 86400) / 60.0


def _since(env: Env, value: Any, what: str) -> float:
    if value is None:
        raise EvaluationError(f"{what}: the time is unknown")
    if not isinstance(value, datetime):
        raise EvaluationError(f"{what} needs a time such as leader.opened_at, got {value!r}")
    return (env.now - value).total_seconds()


def fn_seconds_since(env: Env, value: Any) -> float:
    """seconds_since(leader.opened_at) -> seconds from that moment to now."""
    return _since(env, value, "seconds_since()")


def fn_minutes_since(env: Env, value: Any) -> float:
    """minutes_since(t) -> minutes from t to now."""
    return _since(env, value, "minutes_since()") / 60.0


def fn_time_between(env: Env, start: Any, end: Any) -> bool:
    """time_between("09:30", "16:00") -> local time of day in [start, end); wraps midnight."""
    lo, hi, now = _to_time(start), _to_time(end), env.now_local
    return lo <= now < hi if lo <= hi else (now >= lo or now < hi)


def fn_tier(value: Any, pairs: tuple[Any, ...]) -> Any:
    """tier(account.size, 25000, 1500, 50000, 2500, 3000): the result of the first `upto` that
    is >= value, else the last argument. For limits that depend on the account size."""
    if len(pairs) % 2 == 0:
        raise EvaluationError("tier() needs value, then pairs of (upto, result), then a result "
                              "for anything larger")
    value = _number(value, "tier()")
    for index in range(0, len(pairs) - 1, 2):
        if value <= _number(pairs[index], "tier()"):
            return pairs[index + 1]
    return pairs[-1]


def fn_news_blackout(env: Env, before: Any, after: Any, impact: Any = "high") -> bool:
    """news_blackout(before_s, after_s[, "high"]) -> an event of at least that impact, affecting
    an instrument of this account (or pair), is less than `before` seconds away or less than
    `after` seconds past. False when no calendar was loaded (the CLI warns about that)."""
    if impact not in ("low", "medium", "high"):
        raise EvaluationError(f'news_blackout() impact must be "low", "medium" or "high", '
                              f"got {impact!r}")
    calendar = env.calendar
    if calendar is None:
        return False
    event = calendar.active(env.now, _number(before, "news_blackout()"),
                            _number(after, "news_blackout()"), env.families, impact)
    return event is not None


@dataclass(frozen=True)
class LibraryFunction:
    impl: Callable[..., Any]
    needs_env: bool
    arity: tuple[int, int]
    returns: str
    signature: str


LIBRARY: dict[str, LibraryFunction] = {
    "abs": LibraryFunction(abs, False, (1, 1), NUM, "abs(x)"),
    "min": LibraryFunction(min, False, (2, 8), NUM, "min(a, b, ...)"),
    "max": LibraryFunction(max, False, (2, 8), NUM, "max(a, b, ...)"),
    "round": LibraryFunction(round, False, (1, 2), NUM, "round(x[, digits])"),
    "floor": LibraryFunction(math.floor, False, (1, 1), NUM, "floor(x)"),
    "ceil": LibraryFunction(math.ceil, False, (1, 1), NUM, "ceil(x)"),
    "sign": LibraryFunction(fn_sign, False, (1, 1), NUM, "sign(x)"),
    "time": LibraryFunction(fn_time, False, (1, 1), TIME, 'time("HH:MM")'),
    "ticks": LibraryFunction(fn_ticks, True, (2, 2), NUM, "ticks(price_a, price_b)"),
    "minutes_until": LibraryFunction(fn_minutes_until, True, (1, 1), NUM,
                                     'minutes_until("HH:MM")'),
    "seconds_since": LibraryFunction(fn_seconds_since, True, (1, 1), NUM, "seconds_since(t)"),
    "minutes_since": LibraryFunction(fn_minutes_since, True, (1, 1), NUM, "minutes_since(t)"),
    "time_between": LibraryFunction(fn_time_between, True, (2, 2), BOOL,
                                    'time_between("HH:MM", "HH:MM")'),
    "news_blackout": LibraryFunction(fn_news_blackout, True, (2, 3), BOOL,
                                     'news_blackout(before_s, after_s[, "high"])'),
    "tier": LibraryFunction(lambda value, *pairs: fn_tier(value, pairs), False, (4, 15), NUM,
                            "tier(value, upto1, result1, upto2, result2, ..., otherwise)"),
}
ENV_FUNCTIONS_NEED = {"ticks": "instrument"}  # functions that need a name of a certain scope
# functions given the environment that never read its local clock (now_local, weekday)
_CLOCKLESS = frozenset({"ticks", "seconds_since", "minutes_since", "news_blackout"})
# the names under which the compiled code calls the others (CompiledExpression.reads_clock)
_CLOCK_READERS = frozenset({"__cl_minutes_until", *(
    f"__cl_fn_{name}" for name, fn in LIBRARY.items() if fn.needs_env and name not in _CLOCKLESS)})

_SAFE_BINOPS: dict[type[ast.operator], str | None] = {
    ast.Add: "__cl_add", ast.Mult: "__cl_mult", ast.Pow: "__cl_pow", ast.Mod: "__cl_mod",
    ast.Sub: None, ast.Div: None, ast.FloorDiv: None,
}
# operators on literals, computed at load to check a power's size (see _Checker._literal)
_LITERAL_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b, ast.Pow: safe_power,
}
_NOT_LITERAL = object()
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
_FORBIDDEN_NODES: dict[type[ast.AST], str] = {
    ast.JoinedStr: "format strings (f-strings) are not allowed",
    ast.FormattedValue: "format strings (f-strings) are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.Subscript: "indexing and slicing are not allowed",
    ast.NamedExpr: "assignment (:=) is not allowed",
    ast.Dict: "dict literals are not allowed",
    ast.Set: "set literals are not allowed",
    ast.Starred: "* unpacking is not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}

_CONSTANT_NAMES = itertools.count()
_GLOBALS_BASE: dict[str, Any] = {
    "__builtins__": {},
    "__cl_add": safe_add,
    "__cl_mult": safe_mult,
    "__cl_pow": safe_power,
    "__cl_mod": safe_mod,
    "__cl_abs": abs,
    "__cl_sign": lambda number: (number > 0) - (number < 0),
    "__cl_minutes_until": _minutes_until,
    **{f"__cl_fn_{name}": fn.impl for name, fn in LIBRARY.items()},
}


@dataclass(frozen=True)
class CompiledExpression:
    """A checked, compiled expression: call `.evaluate(env)`."""

    source: str
    evaluate: Callable[[Env], Any]
    names: frozenset[str]
    kind: str  # static type of the result: BOOL for every `when`
    tree: ast.expr  # the checked, rewritten tree (for compile_batch)
    constants: dict[str, Any]  # values folded at load, read by `tree`

    def view_fields(self, name: str) -> frozenset[str] | None:
        """The fields of the view `name` (`account`, `leader_account`, ...) this expression
        reads, as `account.equity` reads `equity`; None when it uses the view whole (compares
        it, passes it to a function, shows it in a message): then it may read every field."""
        fields: set[str] = set()
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                if _is_view(child, name):
                    if not (isinstance(node, ast.Attribute) and node.value is child):
                        return None
                    fields.add(node.attr)
        if _is_view(self.tree, name):  # the whole expression is the view
            return None
        return frozenset(fields)

    def reads_clock(self) -> bool:
        """Does it read the local clock (`now_local`, `weekday`), itself or through a library
        function? Each function given the environment counts, unless it is known not to."""
        return any((isinstance(node, ast.Name) and node.id in _CLOCK_READERS) or
                   _is_view(node, "now_local") or _is_view(node, "weekday")
                   for node in ast.walk(self.tree))


def _is_view(node: ast.AST, name: str) -> bool:
    """Is `node` the rewritten tree's read of the environment's `name` (`__cl_env.account`,
    `__cl_env.now_local`)?"""
    return isinstance(node, ast.Attribute) and node.attr == name and \
        isinstance(node.value, ast.Name) and node.value.id == ENV


class _Checker:
    def __init__(self, scope: str, params: dict[str, str],
                 choices: dict[str, tuple[str, ...]] | None = None) -> None:
        self.scope = scope
        self.params = params
        self.choices = choices or {}
        self.literals: dict[int, Any] = {}  # id of a literal-only BinOp -> its value
        self.names: set[str] = set()
        self.numeric: set[int] = set()  # ids of BinOps whose operands are both numbers
        self.types: dict[int, str] = {}  # id of each checked node -> its static type

    def fail(self, node: ast.AST, message: str) -> ExpressionError:
        col = getattr(node, "col_offset", None)
        where = f" (at column {col + 1})" if col is not None else ""
        return ExpressionError(f"{message}{where}")

    # Returns the static type of the node (one of namespace's type names, or ANY).
    def check(self, node: ast.AST, depth: int = 0) -> str:
        kind = self._check(node, depth)
        self.types[id(node)] = kind
        return kind

    def _check(self, node: ast.AST, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"expression is nested deeper than {MAX_DEPTH} levels")
        kind = type(node)
        if kind in _FORBIDDEN_NODES:
            raise self.fail(node, _FORBIDDEN_NODES[kind])
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.Attribute):
            return self._attribute(node)
        if isinstance(node, ast.BoolOp):
            kinds = {self.check(value, depth + 1) for value in node.values}
            return BOOL if kinds == {BOOL} else ANY
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.Not | ast.USub | ast.UAdd):
                raise self.fail(node, "operator ~ is not allowed")
            inner = self.check(node.operand, depth + 1)
            return BOOL if isinstance(node.op, ast.Not) else inner
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _SAFE_BINOPS:
                symbol = type(node.op).__name__
                raise self.fail(node, f"operator {symbol} is not allowed (use + - * / // % **)")
            left = self.check(node.left, depth + 1)
            right = self.check(node.right, depth + 1)
            self._bounded(node, left)
            if left in (NUM, BOOL) and right in (NUM, BOOL):
                self.numeric.add(id(node))  # no string growth possible: plain + and *
                return NUM
            return ANY
        if isinstance(node, ast.Compare):
            return self._compare(node, depth)
        if isinstance(node, ast.IfExp):
            self.check(node.test, depth + 1)
            body = self.check(node.body, depth + 1)
            orelse = self.check(node.orelse, depth + 1)
            return body if body == orelse else ANY
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        if isinstance(node, ast.List | ast.Tuple):
            if len(node.elts) > MAX_LIST_LITERAL:
                raise self.fail(node, f"list literals are limited to {MAX_LIST_LITERAL} items")
            for element in node.elts:
                self.check(element, depth + 1)
            return ANY
        raise self.fail(node, f"{kind.__name__} is not allowed in a rule expression")

    def _bounded(self, node: ast.BinOp, left: str) -> None:
        """Refuse at load what could only build something huge: `%` formatting of text,
        repeating or joining lists, a power of literals whose result is too large."""
        if isinstance(node.op, ast.Mod) and left == STR:
            raise self.fail(node, "% formatting of text is not allowed")
        if isinstance(node.op, ast.Mult | ast.Add) and (
                isinstance(node.left, ast.List | ast.Tuple)
                or isinstance(node.right, ast.List | ast.Tuple)):
            raise self.fail(node, "lists cannot be repeated or joined")
        if isinstance(node.op, ast.Pow):
            try:
                self._literal(node)
            except EvaluationError as exc:
                raise self.fail(node, str(exc)) from None

    def _literal(self, node: ast.AST) -> Any:
        """The value of an arithmetic of number literals (`2 ** 10`), or _NOT_LITERAL. Powers
        are computed by safe_power, so a too-large one raises EvaluationError here, at load."""
        if isinstance(node, ast.Constant):
            return node.value if isinstance(node.value, int | float) else _NOT_LITERAL
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._literal(node.operand)
            if value is _NOT_LITERAL:
                return value
            return -value if isinstance(node.op, ast.USub) else +value
        if not isinstance(node, ast.BinOp) or type(node.op) not in _LITERAL_OPS:
            return _NOT_LITERAL
        if id(node) in self.literals:
            return self.literals[id(node)]
        left, right = self._literal(node.left), self._literal(node.right)
        value = _NOT_LITERAL
        if left is not _NOT_LITERAL and right is not _NOT_LITERAL:
            # 1 / 0 stays _NOT_LITERAL: it is reported when the rule runs, as before
            with contextlib.suppress(ArithmeticError, TypeError, ValueError):
                value = _LITERAL_OPS[type(node.op)](left, right)
        self.literals[id(node)] = value
        return value

    def _constant(self, node: ast.Constant) -> str:
        value = node.value
        if isinstance(value, bool) or value is None:
            return BOOL if isinstance(value, bool) else ANY
        if isinstance(value, int) and abs(value) >= 10 ** MAX_NUMBER_DIGITS:
            raise self.fail(node, f"number literals are limited to {MAX_NUMBER_DIGITS} digits")
        if isinstance(value, int | float):
            return NUM
        if isinstance(value, str):
            if len(value) > MAX_STRING_LITERAL:
                raise self.fail(node, f"string literals are limited to {MAX_STRING_LITERAL} chars")
            return STR
        raise self.fail(node, f"literal {value!r} is not allowed (use numbers, strings, booleans)")

    def _name(self, node: ast.Name) -> str:
        name = node.id
        if name.startswith("_"):
            raise self.fail(node, f"name {name!r} is not allowed (names starting with _ are "
                                  "private)")
        if name in LIBRARY:
            raise self.fail(node, f"{name} is a function: call it, e.g. {LIBRARY[name].signature}")
        entry = NAMES.get(name)
        if entry is None:
            known = ", ".join(n for n, e in NAMES.items() if self.scope in e[1])
            raise self.fail(node, f"unknown name {name!r}; in scope {self.scope} you can use: "
                                  f"{known}")
        kind, scopes, _ = entry
        if self.scope not in scopes:
            raise self.fail(node, f"{name!r} is not available in scope {self.scope} "
                                  f"(only in: {', '.join(scopes)})")
        self.names.add(name)
        return kind

    def _attribute(self, node: ast.Attribute) -> str:
        attr = node.attr
        if attr.startswith("_"):
            raise self.fail(node, f"attribute {attr!r} is not allowed (names starting with _ "
                                  "are private)")
        if not isinstance(node.value, ast.Name | ast.Attribute):
            raise self.fail(node, f"attribute .{attr} is only allowed on namespace names such "
                                  "as account.contracts or params.max_contracts")
        base = self.check(node.value)
        if base == "params":
            if attr not in self.params:
                known = ", ".join(sorted(self.params)) or "(none declared)"
                raise self.fail(node, f"unknown param {attr!r}; declared params: {known}")
            return self.params[attr]
        fields = FIELDS.get(base)
        if fields is None:
            raise self.fail(node, f"a {base} value has no attribute .{attr}")
        if attr not in fields:
            raise self.fail(node, f"{_dotted(node.value)} has no field {attr!r}; known: "
                                  f"{', '.join(fields)}")
        return fields[attr][0]

    def _compare(self, node: ast.Compare, depth: int) -> str:
        left = self.check(node.left, depth + 1)
        before = node.left
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            if not isinstance(op, _COMPARE):
                raise self.fail(node, "'is' / 'is not' are not allowed; use == or !=")
            right = self.check(comparator, depth + 1)
            self._check_choice(node, before, comparator)
            before = comparator
            if isinstance(op, ast.In | ast.NotIn):
                left = right
                continue
            _check_comparable(self, node, left, right)
            left = right
        return BOOL

    def _check_choice(self, node: ast.AST, a: ast.AST, b: ast.AST) -> None:
        """`params.apex_trailing == "intrday"` is never true: an enum param compared with a
        text that is not one of its choices is a load error, not a rule that never fires."""
        for param, other in ((a, b), (b, a)):
            name = _param_name(param)
            if name is None or name not in self.choices:
                continue
            allowed = self.choices[name]
            texts = other.elts if isinstance(other, ast.List | ast.Tuple) else [other]
            for text in texts:
                if isinstance(text, ast.Constant) and isinstance(text.value, str) and \
                        text.value not in allowed:
                    raise self.fail(node, f"params.{name} is one of {', '.join(allowed)}: "
                                          f"{text.value!r} never matches"
                                          f"{did_you_mean(text.value, allowed)}")

    def _call(self, node: ast.Call, depth: int) -> str:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "method calls are not allowed; use the function library: "
                                  f"{', '.join(LIBRARY)}")
        name = node.func.id
        function = LIBRARY.get(name)
        if function is None:
            raise self.fail(node, f"unknown function {name!r}; available: {', '.join(LIBRARY)}")
        if node.keywords:
            raise self.fail(node, f"{name}() takes no keyword arguments")
        low, high = function.arity
        if not low <= len(node.args) <= high:
            raise self.fail(node, f"{function.signature} takes {low}"
                                  f"{'' if low == high else f' to {high}'} argument(s), "
                                  f"got {len(node.args)}")
        needed = ENV_FUNCTIONS_NEED.get(name)
        if needed and self.scope not in NAMES[needed][1]:
            raise self.fail(node, f"{name}() needs an instrument: use it in scope pair")
        kinds = [self.check(arg, depth + 1) for arg in node.args]
        if name in _TIME_ARGUMENTS:
            for arg in node.args:
                if isinstance(arg, ast.Constant):  # a literal time is checked here, at load
                    try:
                        _to_time(arg.value)
                    except EvaluationError as exc:
                        raise self.fail(node, f"{function.signature}: {exc}") from None
        # a result is only known to be a number when what it is made of is
        if name in ("min", "max") and any(k != NUM for k in kinds):
            return ANY
        if name == "tier" and any(k != NUM for k in kinds[2::2] + kinds[-1:]):
            return ANY
        return function.returns


# Functions whose arguments are all times of day: literal ones are parsed once, at load.
_TIME_ARGUMENTS = frozenset({"time", "minutes_until", "time_between"})


_COMPATIBLE = {
    (NUM, NUM), (NUM, BOOL), (BOOL, NUM), (BOOL, BOOL), (STR, STR), (TIME, TIME),
    (DATETIME, DATETIME),
}


def _check_comparable(checker: _Checker, node: ast.AST, left: str, right: str) -> None:
    known = {NUM, STR, BOOL, TIME, DATETIME}
    if left in known and right in known and (left, right) not in _COMPATIBLE:
        hint = ""
        if TIME in (left, right):
            hint = ' (wrap times of day with time("HH:MM"))'
        raise checker.fail(node, f"cannot compare a {left} with a {right}{hint}")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest known word, or ''."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _param_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == "params":
        return node.attr
    return None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


class _Rewriter(ast.NodeTransformer):
    """Turn a checked tree into one that reads names from the env and uses safe operators.

    `**` always goes through safe_power; `+` and `*` only where an operand may be a string.
    """

    def __init__(self, numeric: set[int], params: dict[str, Any] | None,
                 types: dict[int, str] | None = None) -> None:
        self.numeric = numeric
        self.types = types or {}
        self.params = params
        self.constants: dict[str, Any] = {}
        self.folded: dict[int, str] = {}  # id of a Constant folded from a param -> its name

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        # params are fixed for the life of a loaded policy: read them once, here
        if self.params is not None and isinstance(node.value, ast.Name) and \
                node.value.id == "params" and node.attr in self.params:
            constant = ast.copy_location(ast.Constant(value=self.params[node.attr]), node)
            self.folded[id(constant)] = node.attr
            return constant
        return self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(
            ast.Attribute(value=ast.Name(id=ENV, ctx=ast.Load()), attr=node.id, ctx=ast.Load()),
            node,
        )

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        numeric = id(node) in self.numeric
        self.generic_visit(node)
        safe = _SAFE_BINOPS[type(node.op)]
        if safe is None or (numeric and not isinstance(node.op, ast.Pow)):
            return node
        return ast.copy_location(
            ast.Call(func=ast.Name(id=safe, ctx=ast.Load()), args=[node.left, node.right],
                     keywords=[]),
            node,
        )

    def visit_Call(self, node: ast.Call) -> ast.AST:
        assert isinstance(node.func, ast.Name)
        name = node.func.id
        kinds = [self.types.get(id(arg)) for arg in node.args]
        numbers = all(kind == NUM for kind in kinds)
        args = [self.visit(arg) for arg in node.args]
        if name == "tier":
            chain = _tier_chain(args, kinds)
            if chain is not None:
                return ast.copy_location(chain, node)
        if name in _TIME_ARGUMENTS:  # fold literal times (params are literals by now)
            args = [self._time_constant(arg, name) if isinstance(arg, ast.Constant) else arg
                    for arg in args]
            if name == "time" and isinstance(args[0], ast.Name):
                return args[0]  # the folded time itself
        fast = self._fast_call(name, args, numbers)
        if fast is not None:
            return ast.copy_location(fast, node)
        if LIBRARY[name].needs_env:
            args.insert(0, ast.Name(id=ENV, ctx=ast.Load()))
        return ast.copy_location(
            ast.Call(func=ast.Name(id=f"__cl_fn_{name}", ctx=ast.Load()), args=args,
                     keywords=[]),
            node,
        )

    def _fast_call(self, name: str, args: list[ast.expr], numbers: bool) -> ast.expr | None:
        """The same result without the library's run-time argument checks, where the checker
        proved them needless: arguments that are numbers (namespace fields, literals, and
        arithmetic of them) or times folded at load."""
        env = ast.Name(id=ENV, ctx=ast.Load())
        if name == "ticks" and numbers:  # abs(a - b) / instrument.tick_size
            return ast.BinOp(
                left=ast.Call(func=ast.Name(id="__cl_abs", ctx=ast.Load()),
                              args=[ast.BinOp(left=args[0], op=ast.Sub(), right=args[1])],
                              keywords=[]),
                op=ast.Div(),
                right=ast.Attribute(value=ast.Attribute(value=env, attr="instrument",
                                                        ctx=ast.Load()),
                                    attr="tick_size", ctx=ast.Load()))
        if name == "sign" and numbers:
            return ast.Call(func=ast.Name(id="__cl_sign", ctx=ast.Load()), args=args,
                            keywords=[])
        folded = [self.constants.get(a.id) if isinstance(a, ast.Name) else None for a in args]
        if not all(isinstance(t, time) for t in folded):
            return None
        if name == "minutes_until":
            return ast.Call(func=ast.Name(id="__cl_minutes_until", ctx=ast.Load()),
                            args=[env, args[0]], keywords=[])
        if name == "time_between":  # lo <= now < hi, or around midnight
            now = ast.Attribute(value=env, attr="now_local", ctx=ast.Load())
            lo, hi = args
            if folded[0] <= folded[1]:  # type: ignore[operator]
                return ast.Compare(left=lo, ops=[ast.LtE(), ast.Lt()], comparators=[now, hi])
            return ast.BoolOp(op=ast.Or(), values=[
                ast.Compare(left=now, ops=[ast.GtE()], comparators=[lo]),
                ast.Compare(left=now, ops=[ast.Lt()], comparators=[hi])])
        return None

    def _time_constant(self, node: ast.Constant, function: str) -> ast.expr:
        constant = f"__cl_k{next(_CONSTANT_NAMES)}"  # unique across batched conditions
        try:
            self.constants[constant] = _to_time(node.value)
        except EvaluationError:
            # literals were checked by _Checker: this is a param that is not a time, which
            # would make the rule fail on every tick; a load error says so once
            param = self.folded.get(id(node), "?")
            raise ExpressionError(f'{function}() needs a time "HH:MM", but params.{param} is '
                                  f"{_brief(node.value)}") from None
        return ast.copy_location(ast.Name(id=constant, ctx=ast.Load()), node)


_TIER_VALUES = itertools.count()


def _tier_chain(args: list[ast.expr], kinds: list[str | None]) -> ast.expr | None:
    """tier(value, upto1, result1, ..., otherwise) as the chained conditional
    `result1 if (v := value) <= upto1 else result2 if v <= upto2 else ... otherwise`, where
    the checker proved the library's run-time checks needless: `value` is a number and every
    `upto` and result is a constant by now (literals and params folded at load), upto numbers.

    Then the two agree exactly: the library evaluates all its arguments first, but constants
    cannot fail, so only `value` could, and it is evaluated first (and once) here too; every
    comparison is the same `value <= upto`, in the same order. Size tiers of the firm rules
    (`tier(account.size, 50000, params.x_50k, ...)`) are all of this form."""
    value = args[0]
    pairs = [_signed_constant(arg) for arg in args[1:]]
    if kinds[0] != NUM or len(pairs) % 2 == 0 or None in pairs:
        return None
    if isinstance(value, ast.Constant) and value.value.__class__ not in _NUMBER_TYPES:
        return None
    if any(upto.value.__class__ not in _NUMBER_TYPES for upto in pairs[0:-1:2]):  # type: ignore[union-attr]
        return None
    constants: list[ast.Constant] = pairs  # type: ignore[assignment]
    name = f"__cl_tier{next(_TIER_VALUES)}"  # a local of the compiled lambda
    chain: ast.expr = constants[-1]
    for index in range(len(constants) - 3, -1, -2):  # from the last upto back to the first
        test: ast.expr = ast.Name(id=name, ctx=ast.Load())
        if index == 0:
            test = ast.NamedExpr(target=ast.Name(id=name, ctx=ast.Store()), value=value)
        chain = ast.IfExp(test=ast.Compare(left=test, ops=[ast.LtE()],
                                           comparators=[constants[index]]),
                          body=constants[index + 1], orelse=chain)
    return chain


def _signed_constant(node: ast.expr) -> ast.Constant | None:
    """A constant, or a number literal with its sign (`-2500` parses as -(2500)), as one
    constant of the value it evaluates to; None for anything else."""
    if isinstance(node, ast.Constant):
        return node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd) and \
            isinstance(node.operand, ast.Constant) and \
            isinstance(node.operand.value, int | float):  # bool too: -True is -1, as at run time
        number = node.operand.value
        return ast.copy_location(
            ast.Constant(value=-number if isinstance(node.op, ast.USub) else +number), node)
    return None


def parse_expression(source: object) -> ast.expr:
    """Parse with CPython's parser in expression mode; every failure is an ExpressionError."""
    if not isinstance(source, str):
        raise ExpressionError(f"an expression must be a string, got {source!r}")
    # an expression is one line of meaning: YAML `>` and `|` blocks may break it anywhere
    text = " ".join(source.split("\n")).strip()
    if not text:
        raise ExpressionError("the expression is empty")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(f"the expression is longer than {MAX_EXPRESSION_LENGTH} chars")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        detail = exc.msg
        if "=" in text and "==" not in text and "invalid syntax" in detail:
            detail += " (to compare, use == not =)"
        where = f" (at column {exc.offset})" if exc.offset else ""
        raise ExpressionError(f"not a valid expression: {detail}{where}") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise ExpressionError(f"number literals are limited to {MAX_NUMBER_DIGITS} "
                                  "digits") from None
        raise ExpressionError(f"not a valid expression: {type(exc).__name__}") from None
    except (RecursionError, MemoryError) as exc:
        raise ExpressionError(f"not a valid expression: {type(exc).__name__}") from None
    return tree.body


def _lambda(body: ast.expr, label: str, constants: dict[str, Any]) -> Callable[[Env], Any]:
    """Compile a checked, rewritten tree into `lambda __cl_env: body` with no builtins."""
    function = ast.Expression(
        body=ast.Lambda(
            args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=ENV)], kwonlyargs=[],
                               kw_defaults=[], defaults=[]),
            body=body,
        )
    )
    ast.fix_missing_locations(function)
    try:
        code = compile(function, f"<{label}>", "eval")
    except RecursionError:
        raise ExpressionError("the expression is nested too deeply") from None
    # every node was checked by _Checker; the function runs with no builtins
    result: Callable[[Env], Any] = eval(code, {**_GLOBALS_BASE, **constants})  # noqa: S307
    return result


def compile_expression(
    source: object, scope: str, params: dict[str, str], label: str = "rule",
    *, condition: bool = False, values: dict[str, Any] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> CompiledExpression:
    """Check `source` for `scope` against declared `params` (name -> type) and compile it.

    `choices` (param name -> allowed values) makes comparing an enum param with a text that is
    not one of its values a load error.

    With `values` (param name -> value), params are folded into the compiled code as
    constants, and so are `time("HH:MM")` calls on constants.

    With `condition`, the result must be true or false by construction (a comparison, `and` /
    `or` / `not` of conditions, a boolean field or function), so a rule never has to guess
    what a number or a string would mean.
    """
    body = parse_expression(source)
    checker = _Checker(scope, params, choices)
    try:
        kind = checker.check(body)
        rewriter = _Rewriter(checker.numeric, values, checker.types)
        rewritten = rewriter.visit(body)
    except RecursionError:
        raise ExpressionError("the expression is nested too deeply") from None
    if condition and kind != BOOL:
        what = {NUM: "a number", STR: "text", TIME: "a time", DATETIME: "a time"}.get(
            kind, "a value that is not always true or false")
        raise ExpressionError(f"a condition must be true or false, but this gives {what}; "
                              "compare it, e.g. account.contracts > 0")
    assert isinstance(source, str)
    return CompiledExpression(source.strip(), _lambda(rewritten, label, rewriter.constants),
                              frozenset(checker.names), kind, rewritten, rewriter.constants)


def compile_batch(conditions: list[CompiledExpression], label: str,
                  positions: list[int] | None = None) -> Callable[[Env], int]:
    """One function evaluating many conditions for one target: bit i of the result is
    condition i (or, with `positions`, bit positions[i]: a subset of a group's conditions
    answers in the group's bits). An exception in any condition aborts the batch (the engine
    then evaluates them one by one to tell which failed).

    The function is written as one would by hand (batching.py): constant parts folded, a
    condition that folds to false left out, repeated subexpressions that cannot fail computed
    once, environment names read once, and one `if` per condition setting its bit (any number
    of conditions compiles)."""
    bits: list[tuple[int, ast.expr]] = []
    constants: dict[str, Any] = {}
    for condition in conditions:
        if condition.kind != BOOL:
            raise ExpressionError(f"batch conditions must be true/false: {condition.source}")
    try:
        for index, condition in enumerate(conditions):
            constants.update(condition.constants)
            tree = fold(condition.tree)
            if isinstance(tree, ast.Constant) and not tree.value:
                continue  # never true: no bit to set
            bits.append((1 << (positions[index] if positions is not None else index), tree))
        if not bits:
            return lambda env: 0
        module, start = batch_function(bits, ENV, label)
        code = compile(module, f"<{label}>", "exec")
    except RecursionError:
        raise ExpressionError("the expression is nested too deeply") from None
    # every node was checked by _Checker; the function runs with no builtins
    scope = {**_GLOBALS_BASE, **constants, **start}
    exec(code, scope)  # noqa: S102 - defines __cl_batch from checked trees only
    batch: Callable[[Env], int] = scope.pop("__cl_batch")
    return batch


def compile_template(parts: tuple[str | CompiledExpression, ...], show: Callable[[Any], str],
                     label: str) -> Callable[[Env], str]:
    """One function writing a whole message: its literal parts and each hole's value, shown by
    `show`, joined, as a message template renders them one part at a time. Any exception in a
    hole aborts it (the template then renders part by part, to show which hole failed)."""
    constants: dict[str, Any] = {}
    pieces: list[ast.expr] = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(ast.Constant(part))
            continue
        constants.update(part.constants)
        pieces.append(ast.Call(ast.Name("__cl_show", ast.Load()), [part.tree], []))
    body = ast.Call(ast.Attribute(ast.Constant(""), "join", ast.Load()),
                    [ast.Tuple(pieces, ast.Load())], [])
    function = ast.Expression(body=ast.Lambda(
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=ENV)], kwonlyargs=[],
                           kw_defaults=[], defaults=[]),
        body=body))
    ast.fix_missing_locations(function)
    try:
        code = compile(function, f"<{label}>", "eval")
    except RecursionError:
        raise ExpressionError("the message is nested too deeply") from None
    # every hole's tree was checked by _Checker; the function runs with no builtins
    result: Callable[[Env], str] = eval(  # noqa: S307
        code, {**_GLOBALS_BASE, **constants, "__cl_show": show})
    return result


def check_reference(path: str, scope: str, params: dict[str, str]) -> None:
    """Check a `{account.id}`-style template reference the way an expression would be."""
    compile_expression(path, scope, params)
