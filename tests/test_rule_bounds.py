"""Safety bounds of rule files: a typo never turns a rule off, no expression or YAML document
costs unbounded time or memory, messages say what to fix, and alerts are not spam."""

from __future__ import annotations

import ast
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copilink_rules.engine import Engine
from copilink_rules.errors import (
    CopilinkError,
    EvaluationError,
    ExpressionError,
    ParamError,
    RuleFileError,
)
from copilink_rules.rules import load_policy
from copilink_rules.rules.expressions import (
    MAX_POWER_BITS,
    MAX_TEXT_LENGTH,
    compile_batch,
    compile_expression,
)
from copilink_rules.rules.loader import MAX_MESSAGE_LENGTH
from copilink_rules.sources import MAX_ALIAS_VALUES, YamlSyntaxError, load_yaml

from .conftest import REPO, account, at, pos, snap
from .test_expressions import PARAMS, env

APEX = REPO / "rules" / "firms" / "apex.yaml"


def problems_of(path: Path, overrides: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RuleFileError) as caught:
        load_policy([path], overrides)
    return [str(p).replace(str(path), "FILE") for p in caught.value.problems]


# --- 1. a typo never turns a rule off -------------------------------------------------------

@pytest.mark.parametrize("written", ['"15:75"', '"25:00"', "{type: time, default: '25:00'}"])
def test_an_impossible_time_param_is_a_load_error(write_rules: Callable[..., Path],
                                                  written: str) -> None:
    path = write_rules(f"""
        ruleset: demo
        params:
          flat_by: {written}
        rules:
          - id: late
            when: now_local >= time(params.flat_by)
            then: [flatten]
    """)
    (problem,) = problems_of(path)
    assert problem.startswith('FILE:3: params.flat_by: expected a time of day "HH:MM"')


def test_a_text_param_used_as_a_time_is_a_load_error(write_rules: Callable[..., Path]) -> None:
    path = write_rules("""
        ruleset: demo
        params: {flat_by: soon}
        rules:
          - id: late
            when: now_local >= time(params.flat_by)
            then: [flatten]
    """)
    assert problems_of(path) == [
        "FILE:5: late: when: time() needs a time \"HH:MM\", but params.flat_by is 'soon'"]


def test_an_enum_param_names_its_values_and_the_nearest(write_rules: Callable[..., Path]) -> None:
    text = """
        ruleset: demo
        params:
          trailing: {type: enum, choices: [intraday, eod], default: DEFAULT}
        rules:
          - id: trail
            when: params.trailing == "intraday" and account.flat
            then: [flatten]
    """
    assert problems_of(write_rules(text.replace("DEFAULT", "intrday"))) == [
        "FILE:3: params.trailing: 'intrday' is not one of intraday, eod (did you mean "
        "'intraday'?)"]
    path = write_rules(text.replace("DEFAULT", "eod"))
    assert load_policy([path]).params["trailing"].value == "eod"
    with pytest.raises(ParamError) as caught:
        load_policy([path], {"trailing": "intrday"})
    assert str(caught.value) == ("--set trailing=intrday: 'intrday' is not one of intraday, "
                                 "eod (did you mean 'intraday'?)")
    # a comparison with a value that is not a choice would never be true
    typo = text.replace("DEFAULT", "eod").replace('== "intraday"', '== "intrday"')
    (problem,) = problems_of(write_rules(typo))
    assert "params.trailing is one of intraday, eod: 'intrday' never matches (did you mean " \
           "'intraday'?)" in problem
    assert problem.startswith("FILE:6: trail: when:")


def test_the_firm_files_declare_their_trailing_modes_as_enums(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match=r"'intrday' is not one of intraday, eod \(did you "
                                         r"mean 'intraday'\?\)"):
        load_policy([APEX], {"apex_trailing": "intrday"})
    for firm in ("apex", "topstep", "tradeify"):
        policy = load_policy([REPO / "rules" / "firms" / f"{firm}.yaml"])
        assert policy.params[f"{firm}_trailing"].choices == ("intraday", "eod")
    # a child rule set may set the enum in the short form, and is checked against its choices
    child = tmp_path / "mine.yaml"
    child.write_text("ruleset: mine\nextends: [apex]\nparams: {apex_trailing: eod}\n"
                     "rules: []\n")
    assert load_policy([child], search_path=[APEX.parent]).params["apex_trailing"].value == "eod"
    child.write_text("ruleset: mine\nextends: [apex]\nparams: {apex_trailing: eodd}\nrules: []\n")
    with pytest.raises(RuleFileError, match=r"mine.yaml:3: params.apex_trailing: 'eodd' is not "
                                            r"one of intraday, eod \(did you mean 'eod'\?\)"):
        load_policy([child], search_path=[APEX.parent])


@pytest.mark.parametrize(("until", "message"), [
    ('"25:00"', "lock_account.until: '25:00' is not next_trading_day, next_session, a time of "
                "day HH:MM (00:00 to 23:59) or a duration such as 30m or 4h"),
    ("99999999999h", "lock_account.until: '99999999999h' is longer than 7 days (168h), the "
                     "longest duration allowed"),
])
def test_a_lock_until_an_impossible_time_is_a_load_error(write_rules: Callable[..., Path],
                                                         until: str, message: str) -> None:
    path = write_rules(f"""
        ruleset: demo
        rules:
          - id: halt
            when: account.flat
            then:
              - lock_account: {{until: {until}}}
    """)
    (problem,) = problems_of(path)
    assert problem.startswith("FILE:6: halt: ")
    assert problem.endswith(message)


@pytest.mark.parametrize("field", ["for", "cooldown"])
def test_durations_longer_than_a_week_are_a_load_error(write_rules: Callable[..., Path],
                                                       field: str) -> None:
    path = write_rules(f"""
        ruleset: demo
        params: {{grace: 99999999999h}}
        rules:
          - id: slow
            when: account.flat
            {field}: 169h
            then: [flatten]
    """)
    assert problems_of(path) == [
        "FILE:2: params.grace: '99999999999h' is longer than 7 days (168h), the longest "
        "duration allowed",
        f"FILE:6: slow: {field}: '169h' is longer than 7 days (168h), the longest duration "
        "allowed"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "+inf", "1e999", "-1e999",
                                   "infinity"])
@pytest.mark.parametrize("param", ["apex_buffer", "apex_drawdown_lock", "apex_drawdown_50k"])
def test_set_refuses_numbers_that_are_not_finite(param: str, value: str) -> None:
    with pytest.raises(ParamError) as caught:
        load_policy([APEX], {param: value})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--set {param}={value}: expected ")


def test_set_refuses_a_4300_digit_integer_in_one_clean_line() -> None:
    huge = "9" * 4300
    with pytest.raises(ParamError) as caught:
        load_policy([APEX], {"apex_max_contracts_50k": huge})
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) < 400
    assert "expected an integer of at most 30 characters" in message
    with pytest.raises(ParamError, match=r"is too large \(params are limited to \+-1e15\)"):
        load_policy([APEX], {"apex_max_contracts_50k": "1" + "0" * 20})


@pytest.mark.parametrize(("written", "message"), [
    ("limit: 1e999", "params.limit: expected a finite number, got inf"),
    ("limit: -1e999", "params.limit: expected a finite number, got -inf"),
    ("limit: !!float .nan", "params.limit: expected a finite number, got nan"),
    ("limit: {type: number, default: .nan}", "params.limit: expected a number, got '.nan'"),
    ("limit: {type: number, default: !!float .inf}",
     "params.limit: expected a finite number, got inf"),
    ("limit: {type: int, default: 1e999}", "params.limit: expected a finite number, got inf"),
    ("limit: {type: number, default: 5, max: 1e999}",
     "params.limit: max must be a finite number, got inf"),
    ("limit: " + "9" * 4400, "invalid YAML: a number with 4400 digits is too long (at most 100)"),
    ("limit: 10000000000000000000",
     "params.limit: 10000000000000000000 is too large (params are limited to +-1e15)"),
])
def test_params_written_as_yaml_numbers_must_be_finite_and_bounded(
        write_rules: Callable[..., Path], written: str, message: str) -> None:
    path = write_rules(f"ruleset: demo\nparams:\n  {written}\nrules: []\n")
    assert problems_of(path) == [f"FILE:3: {message}"]


# --- 2. expressions bounded in time and memory ------------------------------------------------

@pytest.mark.parametrize("source", [
    "4000000 ** 4000000 > 1",
    "2 ** 1025 > 1",
    "-(10 ** 400) < 0",
    "2.5 ** 4000 > 1",
    "10 ** 10 ** 10 > 1",
    "(2 ** 600) ** 2 > 1",
    "0.5 ** -2000 > 1",
])
def test_a_power_of_literals_too_large_is_refused_at_load(source: str) -> None:
    with pytest.raises(ExpressionError, match=r"is too large \(a power may give at most "
                                              rf"2 \*\* {MAX_POWER_BITS}"):
        compile_expression(source, "account", PARAMS)


@pytest.mark.parametrize("source", ["2 ** 1024 > 1", "2 ** 10 == 1024", "10 ** -400 == 0",
                                    "1 ** 4000000 == 1", "0.5 ** 4000000 == 0",
                                    "(-1) ** 4000001 == -1"])
def test_powers_within_the_bound_still_work(source: str) -> None:
    assert compile_expression(source, "account", PARAMS).evaluate(env()) is True


@pytest.mark.parametrize("source", [
    "account.contracts ** 4000000 > 1",
    "quote.last ** 1000 > 1",
    "account.contracts ** params.max_contracts ** 10 > 1",
    "(account.contracts + 10 ** 29) ** 40 > 1",
])
def test_a_power_too_large_at_run_time_is_an_evaluation_error(source: str) -> None:
    compiled = compile_expression(source, "pair", PARAMS)
    with pytest.raises(EvaluationError, match="is too large"):
        compiled.evaluate(env())


@pytest.mark.parametrize(("source", "message"), [
    ('"%999999999d" % 1 == ""', "% formatting of text is not allowed"),
    ("account.id % 1 == ''", "% formatting of text is not allowed"),
    ("[[0] * 100000] * 100000 == [[0] * 100000] * 100000", "lists cannot be repeated or joined"),
    ("[1] + [2] == [1, 2]", "lists cannot be repeated or joined"),
    ("1" + "0" * 40 + " > 1", "number literals are limited to 30 digits"),
    ("9" * 1990 + " > 1", "number literals are limited to 30 digits"),
])
def test_expressions_that_would_build_something_huge_are_refused_at_load(
        source: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        compile_expression(source, "pair", PARAMS)


@pytest.mark.parametrize(("source", "message"), [
    ("(account.id if account.connected else 1) % 5 == ''", "% formatting of text"),
    ("([0] if account.connected else 1) * 100000 == []", "lists cannot be repeated"),
    ("([0] if account.connected else 1) + ([1] if account.connected else 2) == []",
     "lists cannot be joined"),
    ("'ab' * 5000 + 'ab' * 5000 + account.id == ''", f"longer than {MAX_TEXT_LENGTH}"),
    ("account.id * 100000 == ''", f"longer than {MAX_TEXT_LENGTH}"),
])
def test_text_and_lists_are_bounded_at_run_time(source: str, message: str) -> None:
    compiled = compile_expression(source, "pair", PARAMS)
    with pytest.raises(EvaluationError, match=message):
        compiled.evaluate(env())


def test_an_alert_message_cannot_format_or_grow_without_bound(
        write_rules: Callable[..., Path]) -> None:
    path = write_rules("""
        ruleset: demo
        rules:
          - id: loud
            when: account.flat
            then:
              - alert: {message: "{'%999999999d' % 1}"}
    """)
    assert problems_of(path) == ["FILE:6: loud: message {'%999999999d' % 1}: % formatting of "
                                 "text is not allowed (at column 1)"]
    engine = Engine(load_policy([write_rules("""
        ruleset: demo
        rules:
          - id: loud
            when: account.flat
            then:
              - alert: {message: "{account.id * 1000} and {account.id * 1000}"}
    """)]))
    (decision,) = engine.evaluate(snap(at(0), account("LEAD", "leader")))
    message = str(decision.args["message"])
    assert len(message) == MAX_MESSAGE_LENGTH
    assert message.endswith("\u2026")
    assert message.startswith("LEADLEAD")


def test_a_thousand_rules_in_one_scope_compile_and_evaluate(
        write_rules: Callable[..., Path]) -> None:
    rules = "".join(f"  - {{id: r{i}, when: account.contracts > {i}, then: [alert]}}\n"
                    for i in range(1000))
    path = write_rules("ruleset: many\nrules:\n" + rules)
    engine = Engine(load_policy([path]))
    decisions = engine.evaluate(snap(at(0), account("LEAD", "leader"),
                                     account("F1", positions=[pos("NQH6", 7)])))
    assert sorted(d.rule for d in decisions) == sorted(f"r{i}" for i in range(7))
    conditions = [compile_expression(f"account.contracts > {i}", "account", PARAMS,
                                     condition=True) for i in range(5000)]
    batch = compile_batch(conditions, "many")
    assert batch(env()) == 0b111  # env() holds 3 contracts


# Pieces of expressions chosen to grow: big literals, powers, text, lists, % and repetition.
_ATOMS = ["4000000", "2", "9", "10 ** 29", "1.5", "9.9e307", "-3", "0", "'ab'", "'%9999d'",
          "account.contracts", "quote.last", "account.id", "[0]", "[0, 'x']", "params.grace",
          "(account.id if account.flat else 7)"]
_OPERATORS = ["**", "*", "+", "%", "//", "-", "/"]
expressions = st.recursive(
    st.sampled_from(_ATOMS),
    lambda inner: st.tuples(inner, st.sampled_from(_OPERATORS), inner).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})")
    | st.tuples(st.sampled_from(["abs", "round", "floor", "sign"]), inner).map(
        lambda t: f"{t[0]}({t[1]})")
    | st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]})"),
    max_leaves=24,
)


@settings(max_examples=500, deadline=timedelta(seconds=5))
@given(expressions)
def test_no_generated_expression_takes_unbounded_time_or_memory(source: str) -> None:
    """Compiling raises only ExpressionError; evaluating builds only small values: text of at
    most MAX_TEXT_LENGTH chars, numbers far below what would cost seconds to compute."""
    try:
        compiled = compile_expression(source, "pair", PARAMS)
    except ExpressionError:
        return
    try:
        value = compiled.evaluate(env())
    except (CopilinkError, ArithmeticError, TypeError, ValueError):
        return  # reported by the engine as an evaluation error for the rule
    if isinstance(value, str):
        assert len(value) <= MAX_TEXT_LENGTH
    if isinstance(value, int):
        assert value.bit_length() <= 1_000_000
    if isinstance(value, list):
        assert len(value) <= 100


def test_the_generator_reaches_evaluation() -> None:
    """Every atom compiles on its own: the test above evaluates, not only rejects."""
    for atom in _ATOMS:
        ast.parse(atom, mode="eval")
        compile_expression(atom, "pair", PARAMS)


# --- 3. YAML alias bombs ----------------------------------------------------------------------

def _laughs(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_rule_file_is_refused_with_its_line(
        write_rules: Callable[..., Path]) -> None:
    path = write_rules("ruleset: demo\nrules: []\nx:\n" + "".join(
        f"  {line}\n" for line in _laughs(9).splitlines()))
    (problem,) = problems_of(path)
    assert problem.startswith("FILE:8: invalid YAML: aliases (*name) expand this document to "
                              f"more than {MAX_ALIAS_VALUES:,} values")
    assert "billion laughs" in problem


@pytest.mark.parametrize("text", [
    _laughs(9),
    # merge keys grow the same way
    "a0: &a0 {x: 1, y: 2}\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8)),
    "a: &a [*a]\n",
    "a: &a {b: *a}\n",
])
def test_load_yaml_refuses_documents_that_expand_without_bound(text: str) -> None:
    with pytest.raises(YamlSyntaxError) as caught:
        load_yaml(text)
    assert caught.value.line is not None
    assert str(caught.value).startswith("invalid YAML: ")


def test_aliases_within_the_bound_still_load() -> None:
    data, _ = load_yaml(_laughs(3) + "b: &b {x: 1}\nc: {<<: *b, y: 2}\n")
    assert len(data["a3"]) == 10
    assert data["c"] == {"x": 1, "y": 2}


def test_a_huge_value_is_echoed_clipped(write_rules: Callable[..., Path]) -> None:
    huge = "x" * 1_000_000
    path = write_rules(f"ruleset: demo\nparams:\n  grace: {{type: duration, default: {huge}}}\n"
                       f"  mode: {{type: enum, choices: [a, b], default: {huge}}}\n"
                       f"  flat_by: {{type: time, default: {huge}}}\nrules:\n"
                       f"  - {{id: r1, when: account.flat, then: [flatten], scope: {huge}}}\n")
    problems = problems_of(path)
    assert len(problems) >= 1
    for problem in problems:
        assert len(problem) < 400, problem[:400]
        assert "\u2026" in problem
    with pytest.raises(ParamError) as caught:
        load_policy([APEX], {"apex_flat_by": huge})
    assert len(str(caught.value)) < 600
    with pytest.raises(YamlSyntaxError) as yaml_error:
        load_yaml(f"{'k' * 500}: 1\n{'k' * 500}: 2\n")
    assert len(str(yaml_error.value)) < 300


# --- 4. messages a non-programmer can act on ------------------------------------------------

@pytest.mark.parametrize(("text", "line", "advice"), [
    ("ruleset: demo\nrules:\n\t- id: r1\n", 3, "a tab is used for indentation: indent with "
                                              "spaces only"),
    ("ruleset: demo\ndescription: 'my rules\nrules: []\n", 2, "a quote (\" or ') opened on this "
                                                             "line is never closed"),
    ("ruleset: demo\nrules:\n  - id: r1\n    when: account.flat\n   then: [flatten]\n", 5,
     "check the indentation"),
    ("ruleset: demo\ndescription: flat: by the deadline\nrules: []\n", 2,
     "put text that contains ': ' in quotes"),
])
def test_a_yaml_syntax_error_says_what_to_check(write_rules: Callable[..., Path], text: str,
                                                line: int, advice: str) -> None:
    path = write_rules("")
    path.write_text(text, encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.startswith(f"FILE:{line}: invalid YAML: ")
    assert advice in problem


@pytest.mark.parametrize(("where", "text", "message"), [
    ("rule", "    priorty: 5\n", "rules[0]: unknown key 'priorty' (did you mean 'priority'?)"),
    ("rule", "    cooldwn: 5s\n", "rules[0]: unknown key 'cooldwn' (did you mean 'cooldown'?)"),
    ("top", "extend: [desync]\n", "unknown key 'extend' (did you mean 'extends'?)"),
    ("top", "params:\n  x: {type: number, defualt: 1}\n",
     "params.x: unknown key 'defualt' (did you mean 'default'?)"),
])
def test_an_unknown_key_suggests_the_nearest_known_one(
        write_rules: Callable[..., Path], where: str, text: str, message: str) -> None:
    rule = "rules:\n  - id: r1\n    when: account.flat\n    then: [flatten]\n"
    body = f"ruleset: demo\n{rule}{text}" if where == "rule" else f"ruleset: demo\n{text}{rule}"
    path = write_rules("")
    path.write_text(body, encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.endswith(message)


# --- 5. alerts are not spam ---------------------------------------------------------------

FLAPPING = """
    ruleset: demo
    rules:
      - id: note
        when: account.contracts > 1
        COOLDOWN
        then:
          - alert: {message: "{account.id} holds {account.contracts}"}
      - id: act
        when: account.contracts > 1
        then: [flatten, alert]
"""


def _flap(engine: Engine) -> list[float]:
    """When `note` alerts while its condition goes true, false, true, false, true."""
    out = []
    for t, qty in ((0, 2), (5, 0), (10, 2), (20, 0), (70, 2)):
        s = snap(at(t), account("LEAD", "leader"), account("F1", positions=[pos("NQH6", qty)]))
        out += [(d.time - at(0)).total_seconds() for d in engine.evaluate(s)
                if d.rule == "note" and d.suppressed is False]
    return out


def test_an_alert_only_rule_cools_down_for_60s_unless_it_says_otherwise(
        write_rules: Callable[..., Path]) -> None:
    quiet = load_policy([write_rules(FLAPPING.replace("COOLDOWN", ""))])
    rules = {r.id: r for r in quiet.rules}
    assert rules["note"].cooldown == 60.0
    assert rules["act"].cooldown == 0.0  # not alert-only: unchanged
    assert _flap(Engine(quiet)) == [0.0, 70.0]  # the episode at 10s is within 60s
    chatty = load_policy([write_rules(FLAPPING.replace("COOLDOWN", "cooldown: 0s"))])
    assert _flap(Engine(chatty)) == [0.0, 10.0, 70.0]


def test_the_default_alert_cooldown_is_documented_in_the_schema() -> None:
    text = (REPO / "schemas" / "ruleset.schema.json").read_text(encoding="utf-8")
    assert "60s for a rule whose only action is alert" in text
    assert "cooldown: 0s" in text
