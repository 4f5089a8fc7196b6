"""An adapter's snapshot data, read by the fast reader (`FastReader.convert`, through
`adapters.base.SnapshotBuilder`), gives exactly what `Snapshot.model_validate` gives for the same
data, or is left to model_validate; and `mark_to_market` builds what model_copy built.

The data is what adapters hand over: plain Python values as decoded JSON gives them, plus what
only Python has (tuples, datetime objects, NaN and infinite floats, a str subclass)."""

from __future__ import annotations

import copy
import enum
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from copilink_rules.adapters.base import SnapshotBuilder, mark_to_market
from copilink_rules.fastread import FastReader
from copilink_rules.instruments import default_catalog
from copilink_rules.model import Snapshot

from .test_fast_reader import canonical, changed, snapshots, valid_line


class _Role(enum.StrEnum):
    FOLLOWER = "follower"


def strict(data: Any) -> Any:
    """model_validate's outcome: the snapshot (canonical), or that it refused the data."""
    try:
        return canonical(Snapshot.model_validate(data))
    except ValidationError:
        return "refused"


def fast(reader: FastReader, data: Any) -> Any:
    snapshot = reader.convert(data)
    return None if snapshot is None else canonical(snapshot)


def pythonic(data: Any, how: int) -> Any:
    """`data` with values only Python has, chosen by the bits of `how`: lists as tuples (1),
    times as datetime objects (2) in another zone (4), the snapshot's dict as a copy (8)."""
    if isinstance(data, dict):
        out = {k: pythonic(v, how) for k, v in data.items()}
        return dict(out) if how & 8 else out
    if isinstance(data, list | tuple):
        items = [pythonic(v, how) for v in data]
        return tuple(items) if how & 1 else items
    if how & 2 and isinstance(data, str) and len(data) >= 20 and data[4:5] == "-":
        try:
            moment = datetime.fromisoformat(data)
        except ValueError:
            return data
        if moment.tzinfo is not None and how & 4:
            moment = moment.astimezone(timezone(timedelta(hours=-5)))
        return moment
    return data


def test_ordinary_adapter_data_is_read_by_the_fast_reader() -> None:
    reader = FastReader(default_catalog())
    for i in range(3):
        data = valid_line(i)
        assert fast(reader, data) == strict(data)
        assert reader.convert(data) is not None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots, st.integers(0, 15))
@example({"time": "2026-03-02T14:31:05Z", "accounts": [
    {"id": "L", "role": "leader"},
    {"id": "F1", "role": "follower", "balance": float("nan")}]}, 0)
@example({"time": "2026-03-02T14:31:05Z", "quotes": {"NQH6": {"bid": float("inf")}}}, 1)
@example({"time": "2026-03-02T14:31:05Z", "accounts": [
    {"id": "L", "role": "leader"}, {"id": "F1", "role": "follower", "qty": 1}]}, 0)
def test_generated_data_reads_as_model_validate_reads_it(data: dict[str, Any],
                                                          how: int) -> None:
    """Whenever the fast reader reads data, model_validate reads it the same (field by
    field: types, zero signs, zones, fields set); the reader follows a valid snapshot, so it
    also reuses objects."""
    data = pythonic(data, how)
    reader = FastReader(default_catalog())
    assert reader.convert(valid_line(0)) is not None
    got = fast(reader, data)
    if got is not None:
        assert got == strict(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["accounts.0.balance", "accounts.1.realized_pnl",
                                           "accounts.1.unrealized_pnl", "quotes.NQH6.bid",
                                           "accounts.0.positions.0.avg_price",
                                           "accounts.1.orders.0.stop_price",
                                           "accounts.1.positions.0.qty", "accounts.1.role",
                                           "accounts.1.updated_at"]),
                          st.sampled_from([0.0, -0.0, 0, 1.5, -2.25, 2, None, float("nan"),
                                           "2026-03-02T14:40:00Z", _Role.FOLLOWER])),
                max_size=3), st.integers(1, 3), st.integers(0, 15))
@example([("accounts.0.balance", -0.0)], 1, 0)
@example([("accounts.1.updated_at", "2026-03-02T14:40:00Z")], 1, 0)
def test_data_that_repeats_with_small_changes_reads_as_model_validate_reads_it(
        changes: list[tuple[str, Any]], repeats: int, how: int) -> None:
    """The reader reuses the last snapshot's objects where nothing changed: a change (the
    sign of a zero, a NaN, a time after the snapshot's) always shows."""
    reader = FastReader(default_catalog())
    for i in range(repeats + 1):
        data = valid_line(i)
        if i == repeats:
            changed(data, changes)
        data = pythonic(data, how)
        got = fast(reader, data)
        if got is not None:
            assert got == strict(data)


def test_values_model_validate_refuses_are_left_to_it() -> None:
    reader = FastReader(default_catalog())
    for change in ({"balance": float("nan")}, {"balance": float("-inf")}, {"balance": True},
                   {"realized_pnl": "12.5"}, {"ratio": 0},
                   {"updated_at": datetime(2026, 3, 2, 14, 30)}):  # naive
        data = valid_line(1)
        data["accounts"][1].update(change)
        assert reader.convert(data) is None, change
        with pytest.raises(ValidationError):
            Snapshot.model_validate(data)


def test_what_the_fast_reader_declines_model_validate_still_reads() -> None:
    """Declining costs only time: a symbol the catalog does not know, a datetime object, data
    newer than the snapshot all go to model_validate, which reads them as before."""
    builder = SnapshotBuilder()
    for change in ({"positions": [{"instrument": "XYZH6", "qty": 1}]}, {"connected": 1},
                   {"updated_at": datetime(2026, 3, 2, 14, 30, tzinfo=UTC)},
                   {"updated_at": "2026-03-02T14:45:00Z"}):
        data = valid_line(1)
        data["accounts"][1].update(change)
        assert builder._reader.convert(data) is None, change
        assert canonical(builder(data)) == canonical(Snapshot.model_validate(data))


def test_an_unchanged_account_is_the_same_object_at_the_next_snapshot() -> None:
    builder = SnapshotBuilder()
    first = builder(valid_line(1))
    second = builder(valid_line(2))
    assert second.accounts[0] is first.accounts[0]
    changed = valid_line(3)
    changed["accounts"][1]["balance"] = 49000.0
    third = builder(changed)
    assert third.accounts[1] is not second.accounts[1]
    assert third.accounts[1].positions is second.accounts[1].positions  # kept where unchanged


def test_mark_to_market_builds_what_model_copy_built() -> None:
    """Open P&L from the quotes, set on each account that reports none, exactly as
    `model_copy(update=...)` set it (values, fields set); an account with its own is left as
    it is, and a snapshot with nothing to mark is the same object."""
    data = valid_line(1)
    data["accounts"][1].pop("unrealized_pnl", None)
    data["accounts"].append({"id": "F2", "role": "follower", "leader": "L",
                             "unrealized_pnl": 12.5,
                             "positions": [{"instrument": "NQH6", "qty": -1,
                                            "avg_price": 17990.0}]})
    snapshot = Snapshot.model_validate(data)
    marked = mark_to_market(snapshot)
    # the expectation written out: bid for a long, ask for a short, NQ $5 a 0.25 tick
    leader_pnl = 1 * (18000.0 - 18000.0) / 0.25 * 5.0
    follower_pnl = 2 * (18000.0 - 18000.25) / 0.25 * 5.0
    assert leader_pnl == 0.0
    assert [a.unrealized_pnl for a in marked.accounts] == [0.0, follower_pnl, 12.5]
    expected = snapshot.model_copy(update={"accounts": (
        snapshot.accounts[0],
        snapshot.accounts[1].model_copy(update={"unrealized_pnl": follower_pnl}),
        snapshot.accounts[2])})
    assert canonical(marked) == canonical(expected)
    assert marked.model_fields_set == expected.model_fields_set
    assert marked.accounts[1].model_fields_set == expected.accounts[1].model_fields_set
    assert marked.accounts[0] is snapshot.accounts[0]
    assert marked.accounts[2] is snapshot.accounts[2]
    flat = Snapshot.model_validate({"time": "2026-03-02T14:31:00Z",
                                    "accounts": [{"id": "L", "role": "leader"}]})
    assert mark_to_market(flat) is flat
    untouched = copy.deepcopy(snapshot)
    assert canonical(snapshot) == canonical(untouched)  # the input is never changed


def test_a_failure_of_the_fast_reader_itself_leaves_the_tick_to_pydantic(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the fast reader must not skip a live tick: the data goes to model_validate,
    and the log says so once."""
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    builder = SnapshotBuilder()
    monkeypatch.setattr(builder._reader, "_snapshot", broken)
    for i in range(3):
        assert canonical(builder(valid_line(i))) == canonical(Snapshot.model_validate(
            valid_line(i)))
    assert caplog.text.count("the fast snapshot reader failed") == 1


class _Symbol(enum.StrEnum):
    NQ = "NQH6"
    F1 = "F1"
    L = "L"


@pytest.mark.parametrize("where", ["account id", "leader", "firm", "position instrument",
                                   "order id", "order instrument", "quote symbol",
                                   "overnight"])
@pytest.mark.parametrize("money_moved", [False, True])
def test_a_str_subclass_in_a_text_field_is_left_to_model_validate(where: str,
                                                                   money_moved: bool) -> None:
    """msgspec keeps a str subclass (an enum member) where pydantic gives a plain str: such
    data is left to model_validate, so every text in a snapshot is a plain str. With the
    account's balance moved too, the reader keeps the rest of the previous account."""
    data = valid_line(1)
    follower = data["accounts"][1]
    if money_moved:
        follower["balance"] = 1234.5
    if where == "account id":
        follower["id"] = _Symbol.F1
    elif where == "leader":
        follower["leader"] = _Symbol.L
    elif where == "firm":
        follower["firm"] = _Symbol.F1
    elif where == "position instrument":
        follower["positions"][0]["instrument"] = _Symbol.NQ
    elif where == "order id":
        follower["orders"][0]["id"] = _Symbol.F1
    elif where == "order instrument":
        follower["orders"][0]["instrument"] = _Symbol.NQ
    elif where == "quote symbol":
        data["quotes"] = {_Symbol.NQ: data["quotes"]["NQH6"]}
    else:
        follower["overnight"] = [_Symbol.NQ]
    def texts(snapshot: Snapshot) -> list[Any]:
        account = snapshot.accounts[1]
        return [account.id, account.leader, account.firm, *snapshot.quotes,
                *account.overnight, *(p.instrument for p in account.positions),
                *(t for o in account.orders for t in (o.id, o.instrument))]

    fresh = FastReader(default_catalog())
    assert fresh.convert(data) is None  # nothing to reuse: it would build a subclass's text
    following = FastReader(default_catalog())
    assert following.convert(valid_line(0)) is not None
    # after a snapshot of equal values, the old (plain) objects may be reused
    for snapshot in (following.convert(data), SnapshotBuilder()(data)):
        if snapshot is not None:
            assert all(type(t) is str for t in texts(snapshot) if t is not None), where
            assert canonical(snapshot) == canonical(Snapshot.model_validate(data))


def test_an_account_id_with_a_lone_surrogate_is_left_to_model_validate() -> None:
    data = valid_line(1)
    data["accounts"][1]["id"] = "F\ud800"
    assert FastReader(default_catalog()).convert(data) is None
    with pytest.raises(ValidationError):
        Snapshot.model_validate(data)
