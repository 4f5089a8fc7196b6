"""Loading rule files: schema, extends, params, --set, locations of every problem."""

from __future__ import annotations

import contextlib
import json
import re
import textwrap
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from copilink_rules.errors import ParamError, RuleFileError
from copilink_rules.namespace import MissingQuote
from copilink_rules.rules import load_policy
from copilink_rules.rules.loader import MAX_MESSAGE_LENGTH, parse_duration, parse_overrides
from copilink_rules.rules.spec import RuleSetFile, ruleset_json_schema, ruleset_json_schema_text

from .conftest import REPO
from .test_expressions import env

GOOD = """
    ruleset: demo
    params:
      max_contracts: 10
      grace: 2s
      flat_by: "16:59"
      strict: true
      ratio_cap: 1.5
      note: hello
    rules:
      - id: too-big
        when: account.contracts > params.max_contracts
        for: params.grace
        then: [flatten]
"""


def problems_of(write_rules: Callable[..., Path], text: str) -> list[str]:
    path = write_rules(text)
    with pytest.raises(RuleFileError) as caught:
        load_policy([path])
    return [str(p).replace(str(path), "FILE") for p in caught.value.problems]


def test_a_good_file_loads_with_typed_params(write_rules: Callable[..., Path]) -> None:
    policy = load_policy([write_rules(GOOD)])
    types = {name: p.type for name, p in policy.params.items()}
    assert types == {"max_contracts": "int", "grace": "duration", "flat_by": "time",
                     "strict": "bool", "ratio_cap": "number", "note": "string"}
    assert policy.params["grace"].value == 2.0
    assert policy.rules[0].hold == 2.0
    assert [a.name for a in policy.rules[0].actions] == ["flatten"]
    assert re.fullmatch(r"[0-9a-f]{12}", policy.version)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown field, with its line and rule
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then: [flatten]
             priorty: 5
         """, ["FILE:6: r1: rules[0]: unknown key 'priorty' (did you mean 'priority'?)"]),
        # an unknown key with no near match lists the known ones
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then: [flatten]
             zzz: 5
         """, ["FILE:6: r1: rules[0]: unknown key 'zzz' (known: id, description, scope, "
               "stage, applies_to, when, for, cooldown, then, priority, mode, severity)"]),
        # several problems in one file are all reported
        ("""
         ruleset: demo
         rules:
           - id: r1
             scope: acount
             when: account.flat
             then: [flaten]
           - id: r2
             when: account.flat
             for: 2 seconds
             then: [flatten]
         """, ["FILE:4: r1: rules[0].scope: 'acount' is not one of ['account', 'pair', 'global']",
               "FILE:6: r1: rules[0].then[0]: unknown action 'flaten' (known: flatten, "
               "cancel_orders, catch_up, skip_entry, pause_copier, resume_copier, lock_account, "
               "block_order, reduce_order, alert)",
               "FILE:9: r2: rules[1].for: '2 seconds' is not a duration (use 500ms, 2s, 1m or "
               "params.NAME)"]),
        # an unsafe expression names the rule and the line
        ("""
         ruleset: demo
         rules:
           - id: sneaky
             when: account.__class__ == 1
             then: [flatten]
         """, ["FILE:4: sneaky: when: attribute '__class__' is not allowed (names starting with "
               "_ are private) (at column 1)"]),
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then: [flatten]
           - id: r1
             when: account.flat
             then: [flatten]
         """, ["FILE:6: r1: duplicate rule id (also at FILE:3)"]),
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then:
               - lock_account: {state: frozen}
         """, ["FILE:6: r1: rules[0].then[0].lock_account.state: Input should be 'halted' or "
               "'reducing'"]),
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then:
               - alert: {message: "{account.nope} is flat"}
         """, ["FILE:6: r1: message {account.nope}: account has no field 'nope'; known: id, "
               "role, firm, leader_id, ratio, connected, stale, reachable, data_age, copier, "
               "balance, realized_pnl, unrealized_pnl, pnl, flat, contracts, positions, "
               "working_orders, undeclared_positions, size, equity, day_pnl, peak, peak_eod, "
               "total_profit, best_day, day_share, trading_day, minis, micros, hedged, "
               "hedged_with, lock, locked, firm_accounts, trades_today, losing_streak "
               "(at column 1)"]),
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then: [catch_up]
         """, ["FILE:5: r1: catch_up needs a leader: use it in scope pair"]),
        ("""
         ruleset: demo
         timezone: Mars/Olympus
         rules: []
         """, ["FILE:2: unknown timezone 'Mars/Olympus' (use an IANA name such as "
               "America/New_York or America/Chicago)"]),
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             when: not account.flat
             then: [flatten]
         """, ["FILE:5: invalid YAML: duplicate key 'when' (first on line 4)"]),
        ("""
         ruleset: demo
         params: {{flat_by: 1}: x}
         rules: []
         """, ["FILE:2: invalid YAML: a key must be a single value, not a mapping or a list"]),
        ("""
         ruleset: demo
         rules:
           - id: r1
             when: account.flat
             then: [flatten
         """, ["FILE:6: invalid YAML: expected ',' or ']', but got '<stream end>'; a [ or { is "
               "not closed, or an item in it needs quotes"]),
        ("- just\n- a list\n", ["FILE:1: a rule file must be a YAML mapping with `ruleset:` and "
                                "`rules:`"]),
        ("""
         ruleset: demo
         params: {grace: 2s}
         rules:
           - id: r1
             when: account.flat
             for: params.nope
             then: [flatten]
         """, ["FILE:6: r1: for: params.nope is not a duration param"]),
        ("""
         ruleset: demo
         params:
           limit: {type: int, default: 2.5}
         rules: []
         """, ["FILE:3: params.limit: expected an integer, got 2.5"]),
        # params out of bounds or of the wrong kind, actions that cannot work: all at once
        ("""
         ruleset: demo
         params:
           limit: {type: int, default: 5, min: 1, max: 3}
           flag: {type: bool, default: maybe}
           label: {type: string, default: 5}
         rules:
           - id: r1
             scope: global
             when: accounts.total > 0
             then: [pause_copier]
           - id: r2
             when: account.flat
             then: [{reduce_order: {max_qty: params.nope}}]
         """, ["FILE:3: params.limit: 5 is above the maximum 3",
               "FILE:4: params.flag: expected true or false, got 'maybe'",
               "FILE:5: params.label: expected text, got 5",
               "FILE:10: r1: pause_copier in scope global needs all_followers: true",
               "FILE:13: r2: reduce_order.max_qty: 'params.nope' is not a number or a "
               "declared params.NAME"]),
        ("""
         ruleset: demo
         extends: [demo]
         rules: []
         """, ["FILE:2: rule set 'demo' extends itself"]),
    ],
)
def test_problems_are_reported_with_file_line_and_rule(
    write_rules: Callable[..., Path], text: str, expected: list[str]
) -> None:
    assert problems_of(write_rules, textwrap.dedent(text).lstrip()) == expected


def test_yaml_1_1_surprises_are_not_applied(write_rules: Callable[..., Path]) -> None:
    # In YAML 1.1, 16:59 is the integer 1019 and `no` is False: here they stay strings.
    policy = load_policy([write_rules("""
        ruleset: demo
        params: {flat_by: 16:59, answer: no}
        rules: []
    """)])
    assert policy.params["flat_by"].value == "16:59"
    assert policy.params["answer"].value == "no"


def test_extends_resolves_parents_by_name_and_child_params_override(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(textwrap.dedent("""
        ruleset: base
        params: {max_contracts: 10}
        rules:
          - id: too-big
            when: account.contracts > params.max_contracts
            then: [flatten]
    """))
    firms = tmp_path / "firms"
    firms.mkdir()
    (firms / "firm.yaml").write_text(textwrap.dedent("""
        ruleset: firm
        extends: [base]
        params: {max_contracts: 5}
        rules: []
    """))
    policy = load_policy([firms / "firm.yaml"])
    assert [r.name for r in policy.rulesets] == ["base", "firm"]
    assert policy.params["max_contracts"].value == 5
    assert policy.name == "firm"
    # loading the parent explicitly as well changes nothing
    both = load_policy([tmp_path / "base.yaml", firms / "firm.yaml"])
    assert [r.id for r in both.rules] == ["too-big"]
    assert both.version == policy.version


def test_extends_cycles_and_missing_parents_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("ruleset: a\nextends: [b]\nrules: []\n")
    (tmp_path / "b.yaml").write_text("ruleset: b\nextends: [a]\nrules: []\n")
    (tmp_path / "c.yaml").write_text("ruleset: c\nextends: [nowhere]\nrules: []\n")
    with pytest.raises(RuleFileError, match=r"b.yaml:2: extends cycle: a -> b -> a"):
        load_policy([tmp_path / "a.yaml"])
    with pytest.raises(RuleFileError, match=r"c.yaml:2: extends 'nowhere', but no nowhere.yaml "
                                            r"was found"):
        load_policy([tmp_path / "c.yaml"])


def test_sibling_rule_sets_may_not_disagree_on_a_param(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("ruleset: a\nparams: {limit: 1}\nrules: []\n")
    (tmp_path / "b.yaml").write_text("ruleset: b\nparams: {limit: 2}\nrules: []\n")
    with pytest.raises(RuleFileError, match=r"params.limit = 2 conflicts with 1 in rule set 'a'"):
        load_policy([tmp_path])


def test_set_overrides_params_with_their_type(write_rules: Callable[..., Path]) -> None:
    path = write_rules(GOOD)
    policy = load_policy([path], {"max_contracts": "4", "grace": "500ms", "strict": "no"})
    assert policy.params["max_contracts"].value == 4
    assert policy.rules[0].hold == 0.5
    assert policy.params["strict"].value is False
    assert policy.version != load_policy([path]).version
    with pytest.raises(ParamError, match=r"unknown param 'max_contract' \(did you mean "
                       r"'max_contracts'\?\); known: flat_by, grace"):
        load_policy([path], {"max_contract": "4"})
    with pytest.raises(ParamError, match=r"--set max_contracts=four: expected an integer"):
        load_policy([path], {"max_contracts": "four"})
    with pytest.raises(ParamError, match=r"--set flat_by=25:00: expected a time of day"):
        load_policy([path], {"flat_by": "25:00"})
    with pytest.raises(ParamError, match=r"expected name=value"):
        parse_overrides(["max_contracts"])


def test_param_bounds_apply_to_overrides(write_rules: Callable[..., Path]) -> None:
    path = write_rules("""
        ruleset: demo
        params:
          ticks: {type: number, default: 4, min: 0, max: 40}
        rules: []
    """)
    with pytest.raises(ParamError, match=r"'-1' is below the minimum 0"):
        load_policy([path], {"ticks": "-1"})


@pytest.mark.parametrize(("text", "seconds"),
                         [("500ms", 0.5), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_missing_files_and_empty_folders_are_reported(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError) as caught:
        load_policy([tmp_path / "nope.yaml", tmp_path])
    assert [p.message for p in caught.value.problems] == [
        "no such file or folder", "folder holds no .yaml rule files"]


def test_committed_schema_matches_the_models() -> None:
    committed = (REPO / "schemas" / "ruleset.schema.json").read_text(encoding="utf-8")
    assert committed == ruleset_json_schema_text(), (
        "schemas/ruleset.schema.json is out of date: copilink-rules schema > "
        "schemas/ruleset.schema.json")


def test_schema_and_models_agree_on_every_shipped_and_example_file() -> None:
    validator = jsonschema.Draft202012Validator(ruleset_json_schema())
    jsonschema.Draft202012Validator.check_schema(ruleset_json_schema())
    files = sorted((REPO / "rules").rglob("*.yaml"))
    files = [f for f in files if "tests" not in f.parts]
    assert files
    for file in files:
        data = yaml.safe_load(file.read_text())
        assert not list(validator.iter_errors(json.loads(json.dumps(data, default=str))))
        RuleSetFile.model_validate(data)


@pytest.mark.parametrize(
    "bad",
    [
        {"ruleset": "x", "rules": [{"id": "r", "when": "a", "then": ["flatten"], "extra": 1}]},
        {"ruleset": "x", "rules": [{"id": "r", "when": "a", "then": []}]},
        {"ruleset": "x", "rules": [{"id": "R!", "when": "a", "then": ["flatten"]}]},
        {"ruleset": "x",
         "rules": [{"id": "r", "when": "a", "then": [{"flatten": {}, "alert": {}}]}]},
        {"ruleset": "x", "rules": [{"id": "r", "when": "a", "then": ["flatten"], "mode": "loud"}]},
        {"ruleset": "x", "params": {"a": [1]}},
        {"ruleset": "x", "rules": [{"id": "r", "when": "a", "then": ["flatten"], "for": "2"}]},
        {"rules": []},
        {"ruleset": "x", "rules": [{"id": "r", "when": "a",
                                    "then": [{"lock_account": {"until": "someday"}}]}]},
    ],
)
def test_schema_and_models_reject_the_same_bad_files(bad: dict[str, object]) -> None:
    validator = jsonschema.Draft202012Validator(ruleset_json_schema())
    assert list(validator.iter_errors(bad)), "schema accepted it"
    with pytest.raises(ValueError, match="validation error"):
        RuleSetFile.model_validate(bad)


def test_shipped_desync_rules_validate() -> None:
    policy = load_policy([REPO / "rules" / "desync.yaml"])
    ids = {r.id for r in policy.rules}
    assert {"stuck-follower", "opposite-position", "missed-entry-catch-up", "missed-entry-skip",
            "account-unreachable", "pre-session-not-flat"} <= ids


yaml_pieces = st.sampled_from([
    "ruleset: x\n", "rules:\n", "  - id: r\n", "    when: account.flat\n", "    then: [flatten]\n",
    "params: {a: 1}\n", "extends: [x]\n", "extends: [nowhere]\n", "    for: 2s\n",
    "    scope: pair\n",
    "timezone: Mars/Base\n", "firm: apex\n", "  - {id: r, when: '1 +', then: [x]}\n", "- a\n",
    "{", "}", "[", "]", ":", "\t", "&a ", "*a ", "<<: *a\n", "!!python/object:os.system\n",
    "    when: account.__class__\n", "params: {t: 16:59, b: no}\n", "\x00", "é", "---\n",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(yaml_pieces | st.text(max_size=5), max_size=25).map("".join))
@example("&a :")  # a null key: once a TypeError ("unknown key" took len() of None)
@example("1: x\n")
@example("0ruleset: x\n?")  # a text key and a null key: once a TypeError (sorting the two)
def test_hostile_rule_files_only_ever_raise_our_own_errors(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with contextlib.suppress(RuleFileError, ParamError):
            load_policy([path])


def test_a_rule_set_defined_twice_or_a_param_retyped_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("ruleset: base\nparams: {grace: 1}\nrules: []\n")
    (tmp_path / "child.yaml").write_text(
        "ruleset: child\nextends: [base]\nparams: {grace: 2s}\nrules: []\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "copy.yaml").write_text("ruleset: base\nrules: []\n")
    with pytest.raises(RuleFileError) as caught:
        load_policy([tmp_path / "child.yaml"])
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'child.yaml'}:3: params.grace is a duration here but an int in rule "
        "set 'base'"]
    with pytest.raises(RuleFileError) as caught:
        load_policy([tmp_path / "base.yaml", tmp_path / "other" / "copy.yaml"])
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'other' / 'copy.yaml'}:1: rule set 'base' is also defined in "
        f"{tmp_path / 'base.yaml'}"]


# --- a message is written by one function, as it reads part by part ---------------------------

def test_a_message_written_whole_reads_as_written_part_by_part(
        write_rules: Callable[..., Path]) -> None:
    """Template.render writes a message with one compiled function (compile_template); part by
    part (what it falls back on when a hole fails) must read the same: every kind of value a
    hole shows, escaped braces, holes side by side, a message past the length limit."""
    messages = [
        "{account.id} holds {account.contracts} contracts, P&L {account.pnl / 3}",  # str, int, num
        "{{literal}} {account.flat}{account.connected} at {now} ({now_local})",  # bools, times
        "{account.pnl * 1e300} {account.pnl * 0} {-0.0} {round(account.pnl)}",  # big, zero signs
        "{account.id}{account.id}{'x' * 3000} tail",  # past the limit
        "no holes at all",
    ]
    rules = "".join(f"  - {{id: r{i}, when: account.contracts > 0, then: [{{alert: "
                    f"{{message: {json.dumps(text)}}}}}]}}\n" for i, text in enumerate(messages))
    policy = load_policy([write_rules("ruleset: messages\nrules:\n" + rules)])
    templates = [rule.templates[0] for rule in policy.rules]
    assert len(templates) == len(messages)
    for moment in (None, timedelta(hours=7)):
        e = env() if moment is None else env(now=env().now + moment)
        for template in templates:
            assert template is not None
            written = template.render(e)
            assert callable(template._whole)  # written by the compiled function
            assert written == template._render_parts(e)
    long = templates[3].render(env())
    assert len(long) == MAX_MESSAGE_LENGTH
    assert long.startswith("F1F1xxx")
    assert templates[0].render(env()) == "F1 holds 3 contracts, P&L -40.16666667"
    assert templates[1].render(env()) == \
        "{literal} falsetrue at 2026-03-02T20:58:00+00:00 (15:58:00)"


def test_a_message_whose_hole_fails_shows_the_failure_in_its_place(
        write_rules: Callable[..., Path]) -> None:
    """The compiled message aborts on a failing hole; the message is then written part by
    part, the failure shown where the hole was, the other holes as they are."""
    path = write_rules("""
        ruleset: messages
        rules:
          - id: r
            scope: pair
            when: leader.qty > 0
            then: [{alert: {message: "{account.id} at {quote.last} ({leader.qty})"}}]
    """)
    (rule,) = load_policy([path]).rules
    template = rule.templates[0]
    assert template is not None
    assert template.render(env()) == "F1 at 18001 (2)"
    assert template.render(env(quote=MissingQuote("ESH26"))) == \
        "F1 at <quote.last: no quote for ESH26 in this snapshot> (2)"
