"""The fast timeline reader (msgspec) reads exactly what the strict one (pydantic) reads.

For any line, `iter_timeline` with the fast path gives the same snapshots (equal, and alike
field by field: float signs, int or float, time zones, the fields a line gave) or the same
problems, word for word, as with the strict path alone; and the fast path itself accepts the
ordinary lines (it is not merely falling back)."""

from __future__ import annotations

import gc
import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from copilink_rules import fastread
from copilink_rules.errors import SnapshotError
from copilink_rules.instruments import default_catalog
from copilink_rules.model import Account, Snapshot
from copilink_rules.snapshots import iter_timeline

from .conftest import REPO

TIMELINES = sorted([*(REPO / "examples").glob("*.jsonl"),
                    *(REPO / "examples" / "firms").glob("*.jsonl")])


def canonical(value: Any) -> Any:
    """`value` with everything that tells two readings apart: types, float signs, time zones,
    each model's fields set."""
    if isinstance(value, BaseModel):
        return (type(value).__name__, sorted(value.model_fields_set),
                [(name, canonical(getattr(value, name))) for name in type(value).model_fields])
    if isinstance(value, tuple):
        return ("tuple", [canonical(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(k, canonical(v)) for k, v in value.items()])
    if isinstance(value, datetime):
        return ("datetime", repr(value), value.tzinfo)
    return (type(value).__name__, repr(value))


def outcome(path: Path, fast: bool) -> tuple[list[Any], str | None]:
    """What iter_timeline gives for `path`: the snapshots (canonical), then its error if any."""
    read: list[Any] = []
    try:
        for snapshot in iter_timeline(path, fast=fast):
            read.append(canonical(snapshot))
    except SnapshotError as exc:
        return read, str(exc)
    return read, None


def both_ways(lines: list[str]) -> tuple[tuple[list[Any], str | None], ...]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return outcome(path, fast=True), outcome(path, fast=False)


# --- the examples ------------------------------------------------------------------------------

def test_there_are_example_timelines() -> None:
    assert len(TIMELINES) >= 10


@pytest.mark.parametrize("path", TIMELINES, ids=lambda p: p.name)
def test_every_example_timeline_reads_the_same_both_ways(path: Path) -> None:
    fast, strict = outcome(path, fast=True), outcome(path, fast=False)
    assert strict[1] is None
    assert fast == strict
    assert [canonical(s) for s in iter_timeline(path)] == strict[0]


@pytest.mark.parametrize("path", TIMELINES, ids=lambda p: p.name)
def test_the_fast_path_itself_reads_every_example_line(path: Path) -> None:
    reader = fastread.FastReader(default_catalog())
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    snapshots = [reader.read(line.strip()) for line in lines]
    assert None not in snapshots
    assert [canonical(s) for s in snapshots] == outcome(path, fast=False)[0]


# --- the mirror structs agree with the models ---------------------------------------------------

MAKERS = [fastread._QUOTE, fastread._POSITION, fastread._ORDER, fastread._ACCOUNT,
          fastread._SNAPSHOT]


@pytest.mark.parametrize("maker", MAKERS, ids=lambda m: m.model.__name__)
def test_each_struct_mirrors_its_model_field_for_field(maker: Any) -> None:
    struct = {"Quote": fastread._Quote, "Position": fastread._Position,
              "Order": fastread._Order, "Account": fastread._Account,
              "Snapshot": fastread._Snapshot}[maker.model.__name__]
    assert struct.__struct_fields__ == tuple(maker.model.model_fields)
    required = {n: "x" for n, f in maker.model.model_fields.items() if f.is_required()}
    assert maker.left_out(struct(**required)) == (True,) * len(maker.optional)
    for i, name in enumerate(maker.optional):  # the left-out test of each field, in order
        expected = tuple(j != i for j in range(len(maker.optional)))
        assert maker.left_out(struct(**required, **{name: 1})) == expected, name


# --- generated lines: valid, nearly valid, and broken --------------------------------------------

TIMES = ["2026-03-02T14:31:05Z", "2026-03-02T09:31:05-05:00", "2026-03-02T14:31:05.250+00:00",
         "2026-03-02T15:31:05+01:00", "2100-12-31T23:59:59-05:00", "2000-01-01T00:00:00Z"]
BAD_TIMES = ["2026-03-02T14:31:05", "2026-03-02 14:31:05Z", "1999-12-31T23:59:59Z",
             "2101-01-01T00:00:00Z", "2026-03-02T14:31:05.123456789Z", "2026-03-02T14:31:05+00",
             "yesterday", "", "2026-03-02T14:31:05z", "20260302T143105Z", 1772461865]
# mostly valid values (so that most generated lines are read), then edge and wrong ones
bad = st.sampled_from([None, True, False, "1", "NaN", [], {}, 10**30, -(10**30), 2**63,
                       float("nan"), float("inf"), float("-inf")])
good_amounts = st.floats(-1e12, 1e12, allow_nan=False) | st.integers(-10**12, 10**12) | \
    st.sampled_from([0.0, -0.0, 0, 1e12, -1e12, 0.1, -0.25, 18000.25, 5e-324, -5e-324])
amounts = st.one_of(good_amounts, good_amounts, good_amounts, good_amounts, st.sampled_from(
    [1e12 + 1, -1e12 - 1, 1000000000000.0001, 1.5e12, -1.5e12, 1e308, -1e308]), st.floats(),
    bad)
quantities = st.one_of(st.integers(-100_000, 100_000), st.integers(-100_000, 100_000),
                       st.integers(-100_000, 100_000), st.sampled_from(
                           [100_001, -100_001, 2.0, True, False, "2", 10**50, 1.5]), bad)
texts = st.sampled_from(["NQH6", "MNQH6", "ESH6", "XYZH6", "", "nq h6", "F1", "L", "\u00e9",
                         "a\u0000b", "\U0001f600", "\ud800"])
good_instruments = st.sampled_from(["NQH6", "MNQH6", "ESH6", "NQ 03-26", "CON.F.US.ENQ.H26",
                                    "nqh6"])
instruments = st.one_of(good_instruments, good_instruments, good_instruments,
                        st.sampled_from(["XYZH6", "", " "]), bad)
times = st.one_of(st.sampled_from(TIMES), st.sampled_from(TIMES), st.sampled_from(BAD_TIMES),
                  bad)
ratios = st.sampled_from([1.0, 0.5, 2, 1000, 1e-300]) | st.sampled_from(
    [0, -1, 1000.5]) | amounts


def maybe(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of `fields` (the first ones always), now and then a stray key."""
    names = list(fields)
    return st.tuples(
        st.lists(st.sampled_from(names), unique=True),
        st.fixed_dictionaries(fields),
        st.sampled_from([None] * 20 + ["extra", "avg_prce", "Qty"]),
    ).map(lambda t: {**{k: v for k, v in t[1].items() if k in t[0]},
                     **({t[2]: 1} if t[2] else {})})


quotes = maybe({"bid": amounts, "ask": amounts, "last": amounts})
positions = st.builds(lambda base, extra: {**base, **extra},
                      st.fixed_dictionaries({"instrument": instruments, "qty": quantities}),
                      maybe({"avg_price": amounts, "opened_at": times | st.none()}))
orders = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"id": texts, "instrument": instruments,
                           "side": st.sampled_from(["buy", "sell", "buy", "sell", "hold"]),
                           "qty": quantities}),
    maybe({"type": st.sampled_from(["market", "limit", "stop", "stop_limit", "iceberg"]),
           "limit_price": amounts | st.none(), "stop_price": amounts | st.none(),
           "status": st.sampled_from(["working", "pending", "filled", "cancelled", "rejected",
                                      "lost"])}))
account_fields = {
    "leader": st.sampled_from(["L", "L", "L", None, "X", ""]),
    "ratio": ratios, "firm": texts | st.none(), "size": amounts | st.none(),
    "connected": st.sampled_from([True, False, True, False, 1, "true", None]),
    "copier": st.sampled_from(["active", "paused", "active", "paused", "off"]),
    "updated_at": times | st.none(),
    "balance": amounts, "realized_pnl": amounts, "unrealized_pnl": amounts,
    "positions": st.lists(positions, max_size=3).map(tuple),
    "orders": st.lists(orders, max_size=2).map(tuple),
    "overnight": st.lists(instruments, max_size=2).map(tuple),
}
accounts = st.builds(lambda base, extra: {**base, **extra},
                     st.fixed_dictionaries({"id": st.sampled_from(["F1", "F2", "F3", "F4", ""]),
                                            "role": st.sampled_from(["follower"] * 8 +
                                                                    ["leader", "folower"])}),
                     maybe(account_fields))
snapshots = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"time": times}),
    maybe({"quotes": st.dictionaries(instruments.filter(lambda x: isinstance(x, str)), quotes,
                                     max_size=3),
           "accounts": st.lists(accounts, max_size=4).map(
               lambda a: ({"id": "L", "role": "leader"}, *a))}))


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))  # NaN and Infinity as their bare tokens


def valid_line(i: int, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "time": f"2026-03-02T14:31:{i:02d}Z",
        "quotes": {"NQH6": {"bid": 18000.0, "ask": 18000.25, "last": 18000.25}},
        "accounts": [
            {"id": "L", "role": "leader", "balance": 50000.0, "realized_pnl": 0.0,
             "positions": [{"instrument": "NQH6", "qty": 1, "avg_price": 18000.0,
                            "opened_at": "2026-03-02T14:30:00Z"}]},
            {"id": "F1", "role": "follower", "leader": "L", "size": 50000, "ratio": 2,
             "updated_at": "2026-03-02T09:30:00-05:00", "balance": 49800.5,
             "positions": [{"instrument": "NQH6", "qty": 2, "avg_price": 18000.25}],
             "orders": [{"id": "o1", "instrument": "NQH6", "side": "sell", "qty": 2,
                         "type": "stop", "stop_price": 17970.0}]}]}
    data.update(changes)
    return data


def changed(data: dict[str, Any], changes: list[tuple[str, Any]]) -> None:
    """Set each value at its dotted path in `data` ("accounts.1.positions.0.qty")."""
    for path, value in changes:
        *parents, last = path.split(".")
        target: Any = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value


def edited(text: str, at: int, what: str, how: str) -> str:
    at %= len(text) + 1
    if how == "insert":
        return text[:at] + what + text[at:]
    if how == "delete":
        return text[:at] + text[at + 1:]
    return text[:at] + what + text[at + 1:]


def test_the_valid_line_is_read_by_the_fast_path() -> None:
    assert fastread.FastReader(default_catalog()).read(dumps(valid_line(1))) is not None
    fast, strict = both_ways([dumps(valid_line(1)), dumps(valid_line(2))])
    assert fast == strict
    assert strict[1] is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots)
def test_a_generated_line_reads_the_same_both_ways(data: dict[str, Any]) -> None:
    line = dumps(data)
    fast, strict = both_ways([dumps(valid_line(0)), line])
    assert fast == strict


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from([*'{}[],:"0-.e9 tnfx\\', "\\u", "1e400", "NaN",
                                               "-0"]),
       st.sampled_from(["insert", "delete", "replace"]))
def test_a_line_with_one_edit_reads_the_same_both_ways(at: int, what: str, how: str) -> None:
    line = edited(dumps(valid_line(1)), at, what, how)
    fast, strict = both_ways([dumps(valid_line(0)), line])
    assert fast == strict


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["accounts.0.balance", "accounts.0.realized_pnl",
                                           "accounts.1.unrealized_pnl", "quotes.NQH6.bid",
                                           "accounts.0.positions.0.avg_price",
                                           "accounts.1.orders.0.stop_price",
                                           "accounts.1.positions.0.qty",
                                           "accounts.1.updated_at"]),
                          st.sampled_from([0.0, -0.0, 0, 1.5, -2.25, 2, None,
                                           "2026-03-02T14:30:30Z"])),
                max_size=3), st.integers(1, 3))
@example([("accounts.0.balance", -0.0)], 1)
@example([("quotes.NQH6.bid", -0.0)], 2)
@example([("accounts.0.positions.0.avg_price", -0.0)], 1)
def test_lines_that_repeat_with_small_changes_read_the_same_both_ways(
        changes: list[tuple[str, Any]], repeats: int) -> None:
    # the fast path reuses the previous line's objects: a change (a sign of zero too) shows
    lines = []
    for i in range(repeats + 1):
        data = valid_line(i)
        if i == repeats:
            changed(data, changes)
        lines.append(dumps(data))
    fast, strict = both_ways(lines)
    assert fast == strict


def test_a_negative_zero_after_a_zero_keeps_its_sign() -> None:
    reader = fastread.FastReader(default_catalog())
    first = reader.read(dumps(valid_line(1)))
    second = reader.read(dumps(valid_line(2)).replace('"realized_pnl":0.0', '"realized_pnl":-0.0'))
    assert first is not None
    assert second is not None
    assert repr(first.accounts[0].realized_pnl) == "0.0"
    assert repr(second.accounts[0].realized_pnl) == "-0.0"


def test_an_unchanged_account_is_the_same_object_on_the_next_line() -> None:
    reader = fastread.FastReader(default_catalog())
    first = reader.read(dumps(valid_line(1)))
    second = reader.read(dumps(valid_line(2)))
    assert first is not None
    assert second is not None
    assert first is not second
    assert first.time != second.time
    assert second.accounts[0] is first.accounts[0]
    assert second.quotes["NQH6"] is first.quotes["NQH6"]


LEADER = {"id": "L", "role": "leader"}


def follower(**fields: Any) -> dict[str, Any]:
    return {"id": "F1", "role": "follower", **fields}


@pytest.mark.parametrize(("change", "message"), [
    ({"accounts": [{**LEADER, "qty": 1}]},
     "accounts[0].qty: unknown field (remove it or check its spelling)"),
    ({"time": "2026-03-02T14:31:05"}, "time: a time needs its UTC offset"),
    ({"time": "2101-01-01T00:00:00Z"}, "time: Value error, times must lie in the years"),
    ({"accounts": [{**LEADER, "positions": [{"instrument": "NQH6", "qty": True}]}]},
     "accounts[0].positions[0].qty: Input should be a valid integer (got True)"),
    ({"accounts": [{**LEADER, "positions": [{"instrument": "NQH6", "qty": 2.0}]}]},
     "accounts[0].positions[0].qty: Input should be a valid integer (got 2.0)"),
    ({"accounts": [{**LEADER, "positions": [{"instrument": "NQH6", "qty": -100_001}]}]},
     "accounts[0].positions[0].qty: Input should be greater than or equal to -100000"),
    ({"accounts": [LEADER, follower(orders=[{"id": "o", "instrument": "NQH6", "side": "buy",
                                             "qty": 0}])]},
     "accounts[1].orders[0].qty: Input should be greater than 0"),
    ({"accounts": [LEADER, {**LEADER, "role": "follower"}]},
     "accounts[1].id: duplicate account id 'L'"),
    ({"accounts": [{**LEADER, "leader": "L"}]},
     "accounts[0]: Value error, a leader account cannot have a 'leader' field"),
    ({"accounts": [LEADER, {**LEADER, "id": "L2"}, follower()]},
     "accounts[2].leader: follower 'F1' must name its leader (2 leader accounts"),
    ({"accounts": [LEADER, follower(leader="BOSS")]},
     "accounts[1].leader: no leader account named 'BOSS'"),
    ({"accounts": [LEADER, follower(updated_at="2026-03-02T14:31:02Z")]},
     "accounts[1].updated_at: is later than the snapshot's time"),
    ({"accounts": [LEADER, follower(overnight=["XYZH6"])]},
     "accounts[1].overnight[0]: unknown instrument 'XYZH6'"),
    ({"quotes": {"XYZH6": {}}}, "quotes.XYZH6: unknown instrument 'XYZH6'"),
    ({"accounts": [LEADER, follower(balance=-1.5e12)]},
     "accounts[1].balance: Input should be greater than or equal to -1000000000000"),
    ({"accounts": [LEADER, follower(balance=1e12 + 1)]},
     "accounts[1].balance: Input should be less than or equal to 1000000000000"),
    ({"accounts": [LEADER, follower(size=0)]},
     "accounts[1].size: Input should be greater than 0"),
    ({"accounts": [LEADER, follower(ratio=0)]},
     "accounts[1].ratio: Input should be greater than 0"),
    ({"accounts": [LEADER, follower(ratio=1000.5)]},
     "accounts[1].ratio: Input should be less than or equal to 1000"),
    ({"accounts": [LEADER, follower(realized_pnl=float("nan"))]},
     "accounts[1].realized_pnl: Input should be a finite number"),
    ({"accounts": [{**LEADER, "id": ""}]},
     "accounts[0].id: String should have at least 1 character"),
])
def test_a_bad_line_is_reported_as_the_strict_path_reports_it(change: dict[str, Any],
                                                            message: str) -> None:
    assert fastread.FastReader(default_catalog()).read(dumps(valid_line(1, **change))) is None
    fast, strict = both_ways([dumps(valid_line(0)), dumps(valid_line(1, **change))])
    assert fast == strict
    assert strict[1] is not None
    assert f":2: {message}" in strict[1]


def test_the_fast_path_declines_what_msgspec_cannot_decide() -> None:
    reader = fastread.FastReader(default_catalog())
    # a Unix timestamp is a time to pydantic's lax datetime, not to the fast path
    line = dumps(valid_line(1, time=1772461865))
    assert reader.read(line) is None
    fast, strict = both_ways([line])
    assert fast == strict


def test_structs_are_not_tracked_by_the_garbage_collector() -> None:
    raw = msgspec.json.decode(dumps(valid_line(1)), type=fastread._Snapshot)
    assert not gc.is_tracked(raw)
    assert raw.accounts is not msgspec.UNSET
    assert not gc.is_tracked(raw.accounts[0])


def test_models_are_built_as_model_construct_builds_them() -> None:
    line = dumps(valid_line(1))
    fast = fastread.FastReader(default_catalog()).read(line)
    strict = Snapshot.model_validate_json(line)
    assert fast == strict
    assert fast is not None
    for mine, theirs in zip(fast.accounts, strict.accounts, strict=True):
        assert type(mine) is Account
        assert mine.__pydantic_extra__ is None
        assert mine.__pydantic_private__ is None
        assert mine.model_fields_set == theirs.model_fields_set
        assert mine.model_dump_json() == theirs.model_dump_json()
        assert mine.model_copy(update={"balance": 1.0}).balance == 1.0
        assert mine.model_fields_set == theirs.model_fields_set  # the copy had its own set


# --- the written-out value functions and the reuse of unchanged parts ---------------------------

@pytest.mark.parametrize("maker", MAKERS, ids=lambda m: m.model.__name__)
def test_each_value_function_gives_the_models_defaults_and_the_lines_values(maker: Any) -> None:
    struct = {"Quote": fastread._Quote, "Position": fastread._Position,
              "Order": fastread._Order, "Account": fastread._Account,
              "Snapshot": fastread._Snapshot}[maker.model.__name__]
    fields = maker.model.model_fields
    required = {n: f"<{n}>" for n, f in fields.items() if f.is_required()}
    defaults = {n: f.get_default(call_default_factory=True)
                for n, f in fields.items() if not f.is_required()}
    values, given = maker.values(struct(**required))
    assert list(values) == list(fields)  # in field order, as pydantic's __dict__
    assert [(type(v), repr(v)) for v in values.values()] == \
        [(type(v), repr(v)) for v in {**required, **defaults}.values()]
    assert given == set(required)
    for name in maker.optional:  # each given field: its value, and in the fields set
        mark = object()
        values, given = maker.values(struct(**required, **{name: mark}))
        assert values == {**required, **defaults, name: mark}, name
        assert given == {*required, name}, name
    for name, default in defaults.items():  # a mutable default is the line's own
        if isinstance(default, dict):
            assert maker.values(struct(**required))[0][name] is not \
                maker.values(struct(**required))[0][name]


def test_an_unchanged_position_of_a_changed_account_is_the_same_object() -> None:
    def line(i: int, balance: float, second: dict[str, Any]) -> str:
        data = valid_line(i)
        data["accounts"][1]["balance"] = balance
        data["accounts"][1]["positions"].append(second)
        return dumps(data)

    reader = fastread.FastReader(default_catalog())
    es = {"instrument": "ESH6", "qty": 1, "avg_price": 5000.0}
    first = reader.read(line(1, 100.0, es))
    second = reader.read(line(2, 200.0, es))  # the account changed, not its positions
    third = reader.read(line(3, 200.0, {**es, "qty": 2}))  # one position changed
    assert first is not None
    assert second is not None
    assert third is not None
    assert second.accounts[1] is not first.accounts[1]
    assert second.accounts[1].positions is first.accounts[1].positions
    assert third.accounts[1].positions[0] is first.accounts[1].positions[0]
    assert third.accounts[1].positions[1].qty == 2


@pytest.mark.parametrize("change", [
    {"balance": 49000.0, "realized_pnl": -12.5, "unrealized_pnl": 3.0},  # given on both lines
    {"updated_at": "2026-03-02T14:30:59Z"},
    {"updated_at": None},  # a time, then none
    {"unrealized_pnl": -0.0},
    {"balance": 0.0, "realized_pnl": -0.0},
])
def test_an_account_whose_money_alone_moved_keeps_its_positions_and_orders(
        change: dict[str, Any]) -> None:
    # the follower's time, balance or P&L move, nothing else: a new account of the new
    # values, the previous one's positions and orders (the same objects), read as strictly
    lines = [dumps(valid_line(1)), dumps(valid_line(2))]
    data = valid_line(3)
    data["accounts"][1].update(change)
    lines.append(dumps(data))
    fast, strict = both_ways(lines)
    assert fast == strict
    reader = fastread.FastReader(default_catalog())
    first, second, third = (reader.read(line) for line in lines)
    assert first is not None
    assert second is not None
    assert third is not None
    assert third.accounts[0] is first.accounts[0]
    moved, before = third.accounts[1], second.accounts[1]
    assert moved is not before
    assert moved.positions is first.accounts[1].positions
    assert moved.orders is first.accounts[1].orders
    assert canonical(moved) == canonical(Snapshot.model_validate_json(lines[2]).accounts[1])
    for name, value in change.items():
        assert repr(getattr(moved, name)) == repr(
            None if value is None else datetime.fromisoformat(value) if name == "updated_at"
            else value)


LEFT_OUT = object()


@pytest.mark.parametrize("lines", [
    # a money field or the time given on one line, left out on the next (the fields set
    # differs) or null
    [{"realized_pnl": 5.0}, {"realized_pnl": LEFT_OUT}],
    [{"balance": LEFT_OUT}, {"balance": 5.0}],
    [{"updated_at": "2026-03-02T14:30:00Z"}, {"updated_at": LEFT_OUT}],
    [{"updated_at": LEFT_OUT}, {"updated_at": "2026-03-02T14:30:00Z"}],
    [{"updated_at": None}, {"updated_at": "2026-03-02T14:30:00Z"}],
    [{"balance": 10.0}, {"balance": 11.0, "connected": False}],  # more than money moved
    [{"balance": 10.0}, {"balance": 11.0, "positions": []}],
    [{"balance": 10.0}, {"balance": 11.0, "ratio": 3}],
])
def test_an_account_whose_money_moved_with_more_reads_the_same_both_ways(
        lines: list[dict[str, Any]]) -> None:
    texts = []
    for i, change in enumerate(lines):
        data = valid_line(i)
        follower = data["accounts"][1]
        for name, value in change.items():
            if value is LEFT_OUT:
                follower.pop(name, None)
            else:
                follower[name] = value
        texts.append(dumps(data))
    fast, strict = both_ways(texts)
    assert fast == strict
    assert strict[1] is None
    reader = fastread.FastReader(default_catalog())
    assert all(reader.read(text) is not None for text in texts)


@pytest.mark.parametrize("path", [("accounts", 1, "positions", 1, "avg_price"),
                                  ("accounts", 1, "orders", 1, "limit_price"),
                                  ("accounts", 1, "balance"), ("quotes", "NQH6", "last")])
@pytest.mark.parametrize("changed", ["nothing", "account", "items"])
def test_a_zero_that_changes_sign_is_read_with_its_sign(path: tuple[Any, ...],
                                                      changed: str) -> None:
    # the zero's sign alone changes, with the rest of its account (or its first position and
    # order) the same or not
    lines = []
    for i, zero in enumerate([0.0, -0.0, -0.0, 0.0]):
        data = valid_line(i)
        account = data["accounts"][1]
        account["positions"].append({"instrument": "ESH6", "qty": 1})
        account["orders"].insert(0, {"id": "o0", "instrument": "ESH6", "side": "buy", "qty": 1})
        account["orders"][1]["limit_price"] = 1.0
        if changed == "account":
            account["realized_pnl"] = float(i)
        elif changed == "items":
            account["positions"][0]["qty"] = 2 + i
            account["orders"][0]["qty"] = 1 + i
        target: Any = data
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = zero
        lines.append(dumps(data))
    fast, strict = both_ways(lines)
    assert fast == strict
    reader = fastread.FastReader(default_catalog())
    snapshots = [reader.read(line) for line in lines]
    assert None not in snapshots
    assert [canonical(s) for s in snapshots] == strict[0]


def test_an_account_read_again_is_checked_against_the_new_time() -> None:
    reader = fastread.FastReader(default_catalog())
    assert reader.read(dumps(valid_line(1))) is not None
    # the same accounts (F1 updated at 14:30:00 UTC), on a line whose time is before that
    assert reader.read(dumps(valid_line(1, time="2026-03-02T14:29:00Z"))) is None
    assert reader.read(dumps(valid_line(2))) is not None


def test_ids_and_leaders_are_checked_again_when_they_change() -> None:
    reader = fastread.FastReader(default_catalog())
    assert reader.read(dumps(valid_line(1))) is not None
    data = valid_line(2)
    data["accounts"][0]["balance"] = 1.0  # both accounts changed; F1's leader gone
    data["accounts"][0]["id"] = "L2"
    assert reader.read(dumps(data)) is None
    data["accounts"][1]["leader"] = "L2"
    assert reader.read(dumps(data)) is not None
    data["accounts"][1]["id"] = "L2"
    data["accounts"][1]["leader"] = None
    data["accounts"][1]["role"] = "follower"
    assert reader.read(dumps(data)) is None  # a duplicate id


def test_a_follower_that_becomes_a_leader_is_checked_again() -> None:
    accounts = [LEADER, {"id": "X", "role": "follower"}, {"id": "F", "role": "follower"}]
    lines = [dumps(valid_line(1, accounts=accounts)), dumps(valid_line(2, accounts=[
        *accounts[:2], {"id": "F", "role": "leader"}]))]  # X's leader: which of two?
    reader = fastread.FastReader(default_catalog())
    assert reader.read(lines[0]) is not None
    assert reader.read(lines[1]) is None
    fast, strict = both_ways(lines)
    assert fast == strict
    assert strict[1] is not None
    assert "must name its leader (2 leader accounts" in strict[1]


# --- an account's positions and orders, read as text -----------------------------------------

def test_positions_and_orders_whose_text_is_the_same_are_not_decoded_again() -> None:
    """A line's positions and orders are compared with the previous line's as text; only a
    changed text is decoded, and then each record equal to the previous one at its place
    (its zeros' signs included) is the previous object."""
    base = valid_line(1)
    # the same positions and orders in other text (their quantities spaced out)
    spaced = dumps(valid_line(2)).replace('"qty":2,', '"qty":  2,')
    assert spaced != dumps(valid_line(2))
    signed = valid_line(3)
    changed(signed, [("accounts.1.positions.0.avg_price", -0.0)])
    unsigned = valid_line(4)
    changed(unsigned, [("accounts.1.positions.0.avg_price", 0.0)])
    lines = [dumps(base), spaced, dumps(signed), dumps(unsigned), dumps(unsigned)]
    fast, strict = both_ways(lines)
    assert fast == strict
    reader = fastread.FastReader(default_catalog())
    read = [snapshot for line in lines if (snapshot := reader.read(line)) is not None]
    assert len(read) == len(lines)  # none declined
    first, second, third, fourth, fifth = (snapshot.accounts[1] for snapshot in read)
    assert second.positions[0] is first.positions[0]
    assert second.orders[0] is first.orders[0]
    assert repr(third.positions[0].avg_price) == "-0.0"
    assert repr(fourth.positions[0].avg_price) == "0.0"
    assert fifth.positions is fourth.positions


@pytest.mark.parametrize(("path", "value"), [
    ("accounts.1.positions.0.qty", "2"),
    ("accounts.1.positions", None),
    ("accounts.1.positions", {"instrument": "NQH6", "qty": 1}),
    ("accounts.1.orders.0.side", "up"),
    ("accounts.1.positions.0.instrument", "NOPE"),
])
def test_positions_or_orders_gone_wrong_on_a_later_line_get_the_strict_message(
        path: str, value: Any) -> None:
    """Positions and orders are decoded after the line (when their text changed): a wrong one
    on any line is read by the strict path, which says what is wrong, as on a first line."""
    bad = valid_line(3)
    changed(bad, [(path, value)])
    lines = [dumps(valid_line(1)), dumps(valid_line(2)), dumps(bad)]
    fast, strict = both_ways(lines)
    assert fast == strict
    assert len(fast[0]) == 2
    assert fast[1] is not None
    assert ":3:" in fast[1]
    assert fastread.FastReader(default_catalog()).read(dumps(bad)) is None
