"""The expression compiler: what is accepted, what is rejected at load, what fails at run time."""

from __future__ import annotations

import ast
import contextlib
import re
from datetime import UTC, datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import simpleeval
from hypothesis import given, settings
from hypothesis import strategies as st

from copilink_rules.errors import CopilinkError, EvaluationError, ExpressionError
from copilink_rules.namespace import (
    FIELDS,
    FLAT_FIELDS,
    NAMES,
    AccountsView,
    AccountView,
    Env,
    InstrumentView,
    MissingQuote,
    PairView,
    PositionView,
    QuoteView,
)
from copilink_rules.rules.expressions import LIBRARY, compile_expression

from .conftest import REPO

PARAMS = {"max_contracts": "number", "flat_by": "string", "grace": "number"}


def env(**overrides: object) -> Env:
    now = datetime(2026, 3, 2, 20, 58, tzinfo=UTC)  # 15:58 in New York
    e = Env()
    e.params = SimpleNamespace(max_contracts=10, flat_by="16:59", grace=2.0)
    e.now = now
    local = now.astimezone(ZoneInfo("America/New_York"))
    e.now_local = local.time()
    e.weekday = local.weekday()
    e.account = AccountView(**{
        **dict.fromkeys(FIELDS["account"], 0),
        "id": "F1", "role": "follower", "contracts": 3, "flat": False, "pnl": -120.5,
        "connected": True, "copier": "active"})
    e.leader = PositionView(**{**FLAT_FIELDS, "qty": 2, "side": "long", "flat": False,
                               "avg_price": 18000.0, "opened_at": now})
    e.follower = PositionView(**FLAT_FIELDS)
    e.instrument = InstrumentView(symbol="NQH26", root="NQ", family="NQ", tick_size=0.25,
                                  tick_value=5.0, micro=False)
    e.quote = QuoteView("NQH26", 18000.0, 18000.5, 18001.0)
    e.calendar = None
    e.families = ("NQ",)
    for key, value in overrides.items():
        setattr(e, key, value)
    return e


def run(source: str, scope: str = "pair", **overrides: object) -> object:
    return compile_expression(source, scope, PARAMS).evaluate(env(**overrides))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("account.contracts > params.max_contracts", False),
        ("account.contracts <= params.max_contracts and not account.flat", True),
        ("ticks(quote.last, leader.avg_price) == 4", True),
        ("ticks(leader.avg_price, quote.last) <= 4", True),
        ("abs(account.pnl) > 100 and min(1, 2) == 1 and max(1, 2, 3) == 3", True),
        ("sign(leader.qty) == -sign(-leader.qty) == 1", True),
        ('now_local >= time("15:58") and now_local < time("16:59")', True),
        ("now_local >= time(params.flat_by)", False),
        ('minutes_until("16:59") == 61', True),
        ('minutes_until("15:00") == 23 * 60 + 2', True),
        ("seconds_since(leader.opened_at) == 0", True),
        ('time_between("09:30", "16:00") and not time_between("18:00", "09:30")', True),
        ('account.id in ["F1", "F2"] and account.role == "follower"', True),
        ('"F" in account.id', True),
        ("2 ** 10 == 1024 and 7 // 2 == 3 and 7 % 2 == 1", True),
        ("weekday == 0", True),
        ("now.hour == 20 and now_local.hour == 15", True),
        ('account.copier == "active" if account.connected else False', True),
        ("follower.side == 'flat' and leader.side != follower.side", True),
        ("instrument.tick_value * 4 == 20", True),
    ],
)
def test_expressions_evaluate_over_the_namespace(source: str, expected: object) -> None:
    assert run(source) == expected


@pytest.mark.parametrize(
    ("source", "scope", "message"),
    [
        ("acount.contracts > 1", "account", "unknown name 'acount'"),
        ("account.contract > 1", "account", "account has no field 'contract'"),
        ("params.max_contract > 1", "account", "unknown param 'max_contract'"),
        ("leader.qty != 0", "account", "'leader' is not available in scope account"),
        ("ticks(1, 2) > 0", "account", "ticks() needs an instrument"),
        ("account.id.upper() == 'F1'", "account", "method calls are not allowed"),
        ("foo(1)", "account", "unknown function 'foo'"),
        ("abs(1, 2)", "account", "abs(x) takes 1 argument"),
        ("abs(x=1)", "account", "takes no keyword arguments"),
        ("account.contracts = 3", "account", "use == not ="),
        ("account.contracts >", "account", "not a valid expression"),
        ("", "account", "the expression is empty"),
        ("now_local >= '16:59'", "account", 'wrap times of day with time("HH:MM")'),
        ("account.id > 3", "account", "cannot compare a string with a number"),
        ('time("25:99") > now_local', "account", 'time() needs "HH:MM"'),
        ('minutes_until("25:00") < 5', "account", 'minutes_until("HH:MM"): time() needs'),
        ('time_between("09:30", "4pm")', "account", "got '4pm'"),
        ("account.id is None", "account", "'is' / 'is not' are not allowed"),
        ("~account.contracts", "account", "operator ~ is not allowed"),
        ("account.contracts << 2", "account", "operator LShift is not allowed"),
        ("[x for x in [1]]", "account", "comprehensions are not allowed"),
        ("{'a': 1}", "account", "dict literals are not allowed"),
        ("(y := 1)", "account", "assignment (:=) is not allowed"),
        ("abs", "account", "abs is a function: call it"),
        ("b'x' == b'x'", "account", "literal b'x' is not allowed"),
        ("'x' * 1 == 'x' * 2" + " and 'a'" * 1, "account", None),
        ("'" + "a" * 1001 + "'", "account", "string literals are limited to 1000 chars"),
        ("(" * 60 + "1" + ")" * 60, "account", None),
        ("1 + " * 1500 + "1", "account", None),
    ],
)
def test_bad_expressions_are_rejected_at_load(source: str, scope: str,
                                              message: str | None) -> None:
    if message is None:  # accepted or rejected, but only ever with our error type
        with contextlib.suppress(ExpressionError):
            compile_expression(source, scope, PARAMS)
        return
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source, scope, PARAMS)
    assert message in str(caught.value)


# Known ways out of Python sandboxes, and out of simpleeval in particular: each must be
# rejected when the rule file is loaded, never evaluated.
SANDBOX_ESCAPES = [
    # simpleeval #46-style: str.format walks attributes of its arguments
    '"{0.__class__.__base__.__subclasses__}".format(account)',
    '"{a.__init__.__globals__}".format_map({"a": account})',
    # f-strings evaluate attribute chains inside the braces
    'f"{account.__class__}"',
    # dunder and private attribute walks to object and its subclasses
    "account.__class__.__base__.__subclasses__()",
    "().__class__.__mro__[1].__subclasses__()",
    "params.__dict__",
    "account._hidden",
    "__import__('os').system('true')",
    "__builtins__",
    # simpleeval #138: generator / coroutine frames reach f_globals
    "(x for x in [1]).gi_frame.f_globals",
    "quote.last.__class__.mro()",
    "account.mro",
    # module and builtin access
    "os.system('true')",
    "sys.modules",
    "eval('1')",
    "exec('x = 1')",
    "open('/etc/passwd').read()",
    "getattr(account, '__class__')",
    "type(account)",
    "lambda: 1",
    "[c for c in ().__class__.__bases__[0].__subclasses__()]",
    "now.tzinfo.utcoffset",
    "now.replace(year=1)",
    "params.flat_by.format",
    "instrument.symbol.join(['a'])",
    "time.__globals__",
    "min.__self__",
]


@pytest.mark.parametrize("source", SANDBOX_ESCAPES)
def test_known_sandbox_escapes_are_rejected_at_load(source: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(source, "pair", PARAMS)


def test_compiled_function_has_no_builtins() -> None:
    compiled = compile_expression("account.contracts > 1", "account", PARAMS)
    assert compiled.evaluate.__globals__["__builtins__"] == {}
    assert "account" in compiled.names


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        ("quote.last > 0", {"quote": MissingQuote("NQH26")}, "no quote for NQH26"),
        ("quote.bid > 0", {"quote": QuoteView("NQH26", None, None, 1.0)}, "has no bid price"),
        ("account.contracts / 0 > 1", {}, "division by zero"),
        ("account.contracts ** 10 ** 10 > 1", {}, "3 ** 10000000000 is too large"),
        ("'ab' * 1000000 == ''", {}, "text longer than 10000 chars is not allowed"),
        ("seconds_since(follower.opened_at) > 1", {}, "the time is unknown"),
        ("time(params.max_contracts) > now_local", {}, 'time() needs "HH:MM"'),
    ],
)
def test_run_time_failures_raise_inside_the_expression(source: str, overrides: dict[str, object],
                                                       message: str) -> None:
    compiled = compile_expression(source, "pair", PARAMS)
    with pytest.raises((EvaluationError, ArithmeticError, simpleeval.InvalidExpression)) as caught:
        compiled.evaluate(env(**overrides))
    assert message in f"{type(caught.value).__name__}: {caught.value}"


def test_minutes_until_counts_local_time_across_the_spring_dst_change() -> None:
    # 2026-03-08 01:30 EST; at 02:00 clocks jump to 03:00 EDT. Wall-clock minutes to 03:30 are
    # 120 on the clock face; the function counts on the local clock face, as a trader reads it.
    now = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)
    local = now.astimezone(ZoneInfo("America/New_York"))
    assert local.hour == 1
    e = env(now=now, now_local=local.time())
    assert compile_expression('minutes_until("03:30")', "account", PARAMS).evaluate(e) == 120
    later = datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 03:30 EDT already
    assert later.astimezone(ZoneInfo("America/New_York")).hour == 3


def test_namespace_views_carry_exactly_the_documented_fields() -> None:
    views = {"account": AccountView, "position": PositionView, "pair": PairView,
             "instrument": InstrumentView, "accounts": AccountsView}
    for name, view in views.items():
        public = {n for n in view.__slots__ if not n.startswith("_")}
        if view is PositionView:
            public.add("age")  # a property: worked out from the clock when read
            assert isinstance(PositionView.__dict__["age"], property)
        assert public == set(FIELDS[name]), name
        with pytest.raises(AttributeError):
            view(**dict.fromkeys(FIELDS[name], 0)).not_a_field  # noqa: B018
    assert set(FLAT_FIELDS) == set(FIELDS["position"])
    quote_fields = {n for n in dir(QuoteView) if not n.startswith("_")}
    assert quote_fields == set(FIELDS["quote"])


def test_every_library_function_is_documented_with_a_signature() -> None:
    for name, function in LIBRARY.items():
        assert function.signature.startswith(name + "(")


hostile_alphabet = st.sampled_from(list(
    "abcdefghijklmnopqrstuvwxyz_.()[]{}'\"+-*/%<>=!~^&|@:;,0123456789 \\\n\t#$?`"
)) | st.characters()
hostile_words = st.sampled_from([
    "__class__", "__globals__", "__subclasses__", "mro", "format", "gi_frame", "f_globals",
    "lambda", "yield", "await", "import", "account", "params", "quote", "leader", "time",
    "ticks", "for", "in", "if", "else", "not", "and", "or", "**", "9" * 30, "'x'", "f'{", "}'",
    ":=", "(", ")", "[", "]", ".", ",", " ",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(hostile_words | hostile_alphabet, max_size=40).map("".join),
       st.sampled_from(["account", "pair", "global"]))
def test_hostile_strings_only_ever_raise_our_own_errors(text: str, scope: str) -> None:
    try:
        compiled = compile_expression(text, scope, PARAMS)
    except ExpressionError:
        return
    # evaluation failures are caught by the engine and reported per rule and target
    with contextlib.suppress(CopilinkError, ArithmeticError, TypeError, ValueError,
                             simpleeval.InvalidExpression):
        compiled.evaluate(env())


@pytest.mark.parametrize("hour", [0, 3, 9, 15, 16, 17, 20, 23])
@pytest.mark.parametrize("source", [
    'time_between("09:30", "16:00")', 'time_between("18:00", "09:30")',
    'minutes_until("16:59")', "ticks(quote.last, leader.avg_price)", "sign(account.pnl)",
    "sign(leader.qty - 2)", 'time_between(params.flat_by, "18:00")',
])
def test_calls_specialised_at_load_give_what_the_checked_library_gives(hour: int,
                                                                        source: str) -> None:
    """Literal times and number-typed arguments skip the library's run-time checks; the
    result is the same as calling the library function itself."""
    values = {"max_contracts": 10, "flat_by": "16:59", "grace": 2.0}
    fast = compile_expression(source, "pair", PARAMS, values=values)
    assert "__cl_fn_" not in ast.unparse(fast.tree)  # really specialised
    moment = datetime(2026, 3, 2, hour, 30, tzinfo=ZoneInfo("America/New_York"))
    e = env(now=moment.astimezone(UTC), now_local=moment.time())
    call = ast.parse(source, mode="eval").body
    assert isinstance(call, ast.Call)
    assert isinstance(call.func, ast.Name)
    function = LIBRARY[call.func.id]
    args = [compile_expression(ast.unparse(a), "pair", PARAMS).evaluate(e) for a in call.args]
    expected = function.impl(e, *args) if function.needs_env else function.impl(*args)
    assert fast.evaluate(e) == expected


def test_unchecked_arguments_still_get_the_library_s_checks() -> None:
    with pytest.raises(EvaluationError, match=r"sign\(\) needs a number, got 'F1'"):
        run("sign(account.id) == 1")
    with pytest.raises(EvaluationError, match=r"sign\(\) needs a number, got False"):
        run("sign(account.flat) == 0")
    # tier() and max() are numbers only when what they choose from is
    with pytest.raises(EvaluationError, match=r"sign\(\) needs a number, got True"):
        run("sign(tier(account.size, 25000, True, False)) == 1")
    with pytest.raises(EvaluationError, match=r"ticks\(\) needs a number, got 'F1'"):
        run("ticks(max(account.id, 'A'), 1) > 0")


def test_the_readme_documents_every_name_field_and_function() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("| `params.NAME` |"):readme.index("### How rules fire")]
    words = set(re.findall(r"[a-z_]+", section))
    missing = [f"{kind}.{name}" for kind in ("account", "position", "pair", "instrument",
                                             "quote", "accounts")
               for name in FIELDS[kind] if name not in words]
    missing += [f"{name}()" for name in LIBRARY if f"`{name}(" not in section]
    missing += [name for name in NAMES if name not in words]
    assert missing == []
