"""The pre-trade gate: allow / block / reduce, and why."""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.calendar import Calendar, NewsEvent
from copilink_rules.cli import run
from copilink_rules.engine import Engine
from copilink_rules.gate import Gate, OrderRequest
from copilink_rules.rules import load_policy

from .conftest import REPO, account, pos, snap

FIRMS = REPO / "rules" / "firms"
MORNING = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # 10:00 New York


def gate_for(*accounts: dict[str, Any], at: datetime = MORNING, rules: Path = FIRMS /
             "apex.yaml", calendar: Calendar | None = None, evaluate: bool = False) -> Gate:
    policy = load_policy([rules])
    snapshot = snap(at, *accounts)
    gate = Gate(policy, calendar=calendar)
    locks: dict[str, Any] = {}
    if evaluate:
        engine = Engine(policy, calendar=calendar)
        engine.evaluate(snapshot, as_if_held=True)
        locks = engine.locks
    gate.update(snapshot, locks)
    return gate


def order(**fields: Any) -> OrderRequest:
    base: dict[str, Any] = {"account": "F1", "instrument": "NQH6", "side": "buy", "qty": 1}
    return OrderRequest(**{**base, **fields})


LEAD = account("LEAD", "leader", firm="apex", size=50000, balance=50000)


def test_an_ordinary_order_is_allowed() -> None:
    gate = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000))
    answer = gate.check(order(qty=2))
    assert (answer.verdict, answer.qty, answer.reasons) == ("allow", 2, ())


def test_exposure_past_max_contracts_is_reduced_then_blocked() -> None:
    gate = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000,
                                  positions=[pos("NQH6", 8)]))
    reduced = gate.check(order(qty=5))
    assert (reduced.verdict, reduced.qty) == ("reduce", 2)
    assert "apex allows 10 contracts, 8 held" in reduced.reasons[0]
    # micros count as a tenth: 20 micros fit in the 2 contracts left, 21 do not
    assert gate.check(order(instrument="MNQH6", qty=20)).verdict == "allow"
    assert gate.check(order(instrument="MNQH6", qty=21)).qty == 20
    full = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000,
                                  positions=[pos("NQH6", 10)]))
    assert full.check(order(qty=1)).verdict == "block"
    # reducing is always fine
    assert full.check(order(side="sell", qty=3)).verdict == "allow"


def test_orders_that_create_a_hedge_or_an_opposite_position_are_blocked() -> None:
    gate = gate_for(account("LEAD", "leader", firm="apex", positions=[pos("NQH6", 1)]),
                    account("F1", firm="apex", size=50000, balance=50000),
                    account("F2", firm="topstep", positions=[pos("ESH6", -1, 5000.0)]))
    opposite = gate.check(order(side="sell", qty=1))
    assert opposite.verdict == "block"
    assert opposite.reasons == ("would leave F1 short NQ against its leader LEAD",)
    # closing with micros what was opened with a mini only reduces exposure
    assert gate.check(order(account="LEAD", instrument="MNQH6", side="sell", qty=10)
                      ).verdict == "allow"
    # micro against mini at the same firm is a hedge too
    hedge = gate_for(account("LEAD", "leader", firm="apex"),
                     account("F1", firm="apex", positions=[pos("ESH6", 1, 5000.0)]),
                     account("F2", firm="apex"))
    blocked = hedge.check(order(account="F2", instrument="MESH6", side="sell", qty=1))
    assert blocked.reasons == ("would hedge F2 against F1 in ES at apex",)
    # an account at another firm is not a hedge
    other_firm = gate_for(account("LEAD", "leader", firm="apex"),
                          account("F1", firm="topstep", positions=[pos("ESH6", 1, 5000.0)]),
                          account("F2", firm="apex", size=50000, balance=50000))
    assert other_firm.check(order(account="F2", instrument="ESH6", side="sell")).verdict == \
        "allow"


def test_locked_accounts_only_reduce() -> None:
    # 47,000 on a 50K Apex account is past the drawdown buffer: the engine halts it
    gate = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=47000,
                                  positions=[pos("NQH6", 2)]), evaluate=True)
    assert gate.check(order(qty=1)).reasons == ("F1 is halted: only orders that reduce "
                                                "exposure pass",)
    assert gate.check(order(side="sell", qty=2)).verdict == "allow"
    assert gate.check(order(side="sell", qty=3)).verdict == "block"  # flips: adds exposure


def test_after_the_flat_by_time_no_new_exposure() -> None:
    late = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)  # 17:00 New York
    gate = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000), at=late)
    answer = gate.check(order())
    assert answer.reasons == ("after the apex flat-by time 16:59:00: no new exposure",)
    evening = datetime(2026, 3, 2, 23, 1, tzinfo=UTC)  # 18:01: the next session is open
    assert gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000),
                    at=evening).check(order()).verdict == "allow"


def test_news_blackouts_block_new_exposure_in_affected_instruments() -> None:
    calendar = Calendar([NewsEvent(time=datetime(2026, 3, 6, 13, 30, tzinfo=UTC), name="NFP",
                                   instruments=("ES",))])
    near = datetime(2026, 3, 6, 13, 29, 30, tzinfo=UTC)
    follower = account("F1", firm="takeprofit", size=50000, balance=50000)
    gate = gate_for(account("LEAD", "leader", firm="takeprofit"), follower, at=near,
                    rules=FIRMS / "takeprofit.yaml", calendar=calendar)
    assert gate.check(order(instrument="ESH6")).reasons == ("news blackout for ES: NFP",)
    assert gate.check(order(instrument="NQH6")).verdict == "allow"


@pytest.mark.parametrize(("price", "verdict"), [(18001.0, "allow"), (18001.25, "block")])
def test_a_late_entry_beyond_the_slippage_threshold_is_blocked(price: float,
                                                              verdict: str) -> None:
    gate = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000))
    answer = gate.check(order(leader_price=18000.0, price=price))
    assert answer.verdict == verdict
    if verdict == "block":
        assert answer.reasons == ("late entry: 18001.25 is 5 ticks from the leader's 18000 "
                                  "(at most 4)",)


def test_unknown_accounts_are_blocked() -> None:
    gate = gate_for(LEAD)
    assert gate.check(order(account="NOPE")).reasons == ("unknown account 'NOPE'",)


def test_the_gate_command_answers_in_table_and_jsonl(tmp_path: Path) -> None:
    state = str(REPO / "examples" / "missed-entry.json")
    rules = str(FIRMS / "apex.yaml")

    def gate_cli(*extra: str, order: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run(["gate", "--rules", rules, "--state", state, "--order", order, *extra],
                   out, err)
        return code, out.getvalue(), err.getvalue()

    buy = '{"account": "F1", "instrument": "NQH6", "side": "buy", "qty": 30}'
    assert gate_cli("--format", "table", order=buy) == (
        0, "REDUCE 8 NQH6 for F1\n  - reduced from 30 to 8: apex allows 10 contracts, 2 "
           "held\n", "")
    code, out, _ = gate_cli("--format", "jsonl",
                            order='{"account": "F2", "instrument": "MNQH6", "side": "sell", '
                                  '"qty": 1}')
    assert code == 0
    answer = json.loads(out)
    assert (answer["verdict"], answer["qty"]) == ("block", 0)
    assert answer["reasons"] == ["would leave F2 short NQ against its leader LEAD"]
    for order, message in [
        ("{}", "error: --order: account: Field required"),
        ("x", "error: --order: order: Invalid JSON"),
        ('{"account": "F1", "instrument": "NQH6", "side": "long", "qty": 1}',
         "error: --order: side: Input should be 'buy' or 'sell'"),
        ('{"account": "F1", "instrument": "XYZ", "side": "buy", "qty": 1}',
         "error: --order: instrument: unknown instrument 'XYZ'"),
    ]:
        code, out, err = gate_cli(order=order)
        assert (code, out) == (2, "")
        assert err.startswith(message)


def _gate_cli(order: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(["gate", "--rules", str(FIRMS / "apex.yaml"), "--state",
                str(REPO / "examples" / "missed-entry.json"), "--order", order, "--format",
                "jsonl"], out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("extra", "message"), [
    ('"qty": true', "error: --order: qty: Input should be a valid integer"),
    ('"qty": 2.0', "error: --order: qty: Input should be a valid integer"),
    ('"qty": "2"', "error: --order: qty: Input should be a valid integer"),
    ('"qty": 1, "leader_price": NaN', "error: --order: leader_price: Input should be a finite "
                                      "number"),
    ('"qty": 1, "leader_price": Infinity', "error: --order: leader_price: Input should be a "
                                           "finite number"),
    ('"qty": 1, "price": -Infinity', "error: --order: price: Input should be a finite number"),
    ('"qty": 1, "price": 1e300', "error: --order: price: Input should be less than or equal"),
])
def test_an_order_with_a_bool_quantity_or_a_non_finite_price_is_refused(extra: str,
                                                                        message: str) -> None:
    # a NaN leader price made the late-entry check false, and the gate said ALLOW
    code, out, err = _gate_cli('{"account": "F1", "instrument": "NQH6", "side": "buy", ' +
                               extra + "}")
    assert (code, out) == (2, "")
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_an_order_for_more_than_the_bound_is_blocked_never_an_overflow() -> None:
    gate = gate_for(LEAD, account("F1", firm="apex", size=50000, balance=50000,
                                  positions=[pos("NQH6", 2)]))
    for qty in (100_001, 10**400):  # a float cannot hold 10**400: no arithmetic before this
        answer = gate.check(order(side="sell", qty=qty))
        assert (answer.verdict, answer.qty) == ("block", 0)
        assert answer.reasons == ("an order for more than 100,000 contracts is never sent",)
    code, out, _ = _gate_cli('{"account": "F1", "instrument": "NQH6", "side": "sell", "qty": '
                             + "9" * 400 + "}")
    assert code == 0
    assert json.loads(out)["verdict"] == "block"
    with pytest.raises(ValueError, match="finite"):
        order(leader_price=math.nan)
    with pytest.raises(ValueError, match="valid integer"):
        order(qty=True)
