"""Files a user hands us — an instrument catalog, copilink.yaml, saved engine state — are either
read, or refused with one of our own errors; never a traceback, and never state that crashes
the engine later."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from copilink_rules.cli import run
from copilink_rules.config import load_config
from copilink_rules.engine import Engine
from copilink_rules.errors import CopilinkError, PolicyTestError, SnapshotError
from copilink_rules.instruments import default_catalog
from copilink_rules.model import MAX_AMOUNT, MAX_QTY, Snapshot
from copilink_rules.policytest import run_test_files
from copilink_rules.rules import load_policy
from copilink_rules.snapshots import iter_timeline

from .conftest import REPO, account, at, hostile_file, pos, snap

yaml_pieces = st.sampled_from([
    "instruments:\n", "  - {root: XX, tick_size: 0.25, tick_value: 5}\n", "  - root: YY\n",
    "accounts:\n", "  - {id: F1, role: follower, instrument: MNQH6}\n", "broker: {name: sim}\n",
    "tick: 10ms\n", "- a\n", "{", "}", ": ", "\x01", "&a ", "*a", "? ", "[", "]", "null\n",
])


@settings(max_examples=150, deadline=None)
@given(st.lists(yaml_pieces | st.text(max_size=4), max_size=12).map("".join))
@example("instruments:\n  - {root: XX, tick_size: -1, tick_value: 5}\n")
@example("instruments:\n  - [1, 2]\n")
def test_a_hostile_instrument_catalog_is_read_or_refused(text: str) -> None:
    with hostile_file(text, "catalog.yaml") as path, contextlib.suppress(CopilinkError):
        default_catalog().extended(path)


@settings(max_examples=150, deadline=None)
@given(st.lists(yaml_pieces | st.text(max_size=4), max_size=12).map("".join))
@example("accounts:\n  - {id: F1, role: follower, instrument: 5}\n")
@example("accounts: {id: F1}\n")
def test_a_hostile_config_is_read_or_refused(text: str) -> None:
    with hostile_file(text, "copilink.yaml") as path, contextlib.suppress(CopilinkError):
        load_config(path)


POLICY = load_policy([REPO / "rules" / "firms" / "apex.yaml"])
TIMELINE = [snap(at(t), account("LEAD", "leader", firm="apex", balance=50000.0,
                                positions=[pos("NQH6", 1)]),
                 account("F1", firm="apex", balance=50000.0)) for t in (0, 1, 5)]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
    | st.sampled_from(["", "x", "2026-03-02T14:30:00+00:00", "halted", "F1|LEAD|NQ"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["F1", "LEAD", "x", "day", "since", "fired", "state", "until", "rule",
                         "reason", "size", "peak"]), inner, max_size=4),
    max_leaves=12)


def _saved() -> dict[str, Any]:
    engine = Engine(POLICY)
    for snapshot in TIMELINE:
        engine.evaluate(snapshot)
    data: dict[str, Any] = json.loads(engine.save_state_json())
    return data


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["time", "rules", "last_fired", "entries", "first_seen", "metrics",
                        "locks"]), json_values)
@example("metrics", {"F1": {"day": "2026-03-02", "day_start": "x", "peak": 1.0,
                            "peak_eod": 1.0, "best_day": 0.0, "last_equity": 1.0,
                            "size": 50000.0}})
@example("locks", {"F1": {"state": "halted", "until": "2026-03-02T14:30:00", "rule": "r",
                          "reason": "x"}})
@example("locks", {"F1": {"state": "halted", "until": "9999-12-31T23:30:00-05:00", "rule": "r",
                          "reason": "x"}})
@example("time", "9999-12-31T23:30:00Z")
def test_damaged_engine_state_is_refused_or_harmless(key: str, value: Any) -> None:
    data = _saved()
    data[key] = value
    engine = Engine(POLICY)
    try:
        engine.restore_state(data)
    except CopilinkError:
        return
    later = snap(at(30), account("LEAD", "leader", firm="apex", balance=50000.0),
                 account("F1", firm="apex", balance=50000.0))
    engine.evaluate(later)  # must not raise
    json.dumps(engine.save_state())


# --- numbers: whatever a broker or a file says, a loaded snapshot holds only usable numbers ---

hostile_numbers = st.one_of(
    st.floats(), st.integers(), st.booleans(), st.none(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "9" * 5000, "true", '"1"',
                     '"nan"', "1" + "0" * 400]))


def _token(value: object) -> str:
    if isinstance(value, str):
        return value  # already JSON text (tokens json.dumps would never write)
    if isinstance(value, float) and not math.isfinite(value):
        return {True: "Infinity", False: "-Infinity"}[value > 0] if math.isinf(value) else "NaN"
    return json.dumps(value)


def _numbers(snapshot: Snapshot) -> list[object]:
    out: list[object] = []
    for quote in snapshot.quotes.values():
        out += [quote.bid, quote.ask, quote.last]
    for a in snapshot.accounts:
        out += [a.balance, a.realized_pnl, a.unrealized_pnl, a.size, a.ratio]
        out += [n for p in a.positions for n in (p.qty, p.avg_price)]
        out += [n for o in a.orders for n in (o.qty, o.limit_price, o.stop_price)]
    return [n for n in out if n is not None]


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=dict.fromkeys(
    ("balance", "realized_pnl", "unrealized_pnl", "size", "ratio", "qty", "avg_price",
     "order_qty", "stop_price", "bid", "last"), hostile_numbers)))
def test_hostile_numbers_are_loaded_finite_and_bounded_or_refused(values: dict[str, Any]
                                                                  ) -> None:
    fields = {k: _token(v) for k, v in values.items()}
    account = ", ".join(f'"{k}": {fields[k]}' for k in ("balance", "realized_pnl",
                                                       "unrealized_pnl", "size", "ratio")
                        if k in fields)
    position = f'"qty": {fields.get("qty", "1")}' + (
        f', "avg_price": {fields["avg_price"]}' if "avg_price" in fields else "")
    order = f'"qty": {fields.get("order_qty", "1")}' + (
        f', "stop_price": {fields["stop_price"]}' if "stop_price" in fields else "")
    quote = ", ".join(f'"{k}": {fields[k]}' for k in ("bid", "last") if k in fields)
    line = ('{"time": "2026-03-02T14:31:05Z", "quotes": {"NQH6": {' + quote + '}}, '
            '"accounts": [{"id": "LEAD", "role": "leader", "positions": [{"instrument": "NQH6",'
            f' {position}}}], "orders": [{{"id": "o1", "instrument": "NQH6", "side": "sell", '
            f'{order}}}]' + (", " + account if account else "") + "}]}")
    problems: list[str] = []
    with hostile_file(line + "\n", "t.jsonl") as path:
        try:
            [snapshot] = list(iter_timeline(path))
        except SnapshotError as exc:
            problems = [str(p) for p in exc.problems]
    if problems:
        assert len(problems) <= 12
        assert all(len(p) < 600 for p in problems)
        return
    for number in _numbers(snapshot):
        assert type(number) in (int, float), number
        assert math.isfinite(number)
        assert abs(number) <= (MAX_QTY if type(number) is int else MAX_AMOUNT)


GATE_RULES = str(REPO / "rules" / "firms" / "apex.yaml")


@settings(max_examples=60, deadline=None)
@given(hostile_numbers, hostile_numbers, hostile_numbers)
def test_a_hostile_gate_order_is_answered_or_refused_never_allowed_on_nan(
        qty: object, price: object, leader_price: object) -> None:
    order = (f'{{"account": "F1", "instrument": "NQH6", "side": "buy", "qty": {_token(qty)}, '
             f'"price": {_token(price)}, "leader_price": {_token(leader_price)}}}')
    out, err = io.StringIO(), io.StringIO()
    code = run(["gate", "--rules", GATE_RULES, "--state",
                str(REPO / "examples" / "missed-entry.json"), "--order", order, "--format",
                "jsonl"], out, err)
    assert code in (0, 2)
    if code == 2:
        assert err.getvalue().startswith("error: --order: ")
        assert err.getvalue().count("\n") == 1
        return
    answer = json.loads(out.getvalue())
    assert answer["verdict"] in ("allow", "block", "reduce")
    assert type(json.loads(_token(qty))) is int  # answered: a whole number, not true or 2.0
    for value in (price, leader_price):  # ... and finite prices (or none)
        assert value is None or math.isfinite(float(json.loads(_token(value))))


# --- policy tests: their files and the files they name are bounded like any input ----------

def _policy_test(folder: Path, text: str) -> Path:
    (folder / "rules.yaml").write_text((REPO / "rules" / "desync.yaml").read_text())
    path = folder / "x_test.yaml"
    path.write_text(text)
    return path


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_policy_test_on_dev_zero_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyTestError, match=r"^/dev/zero: not a regular file or a folder$"):
        run_test_files(["/dev/zero"])
    for key in ("snapshot", "timeline", "calendar"):
        path = _policy_test(tmp_path, f"rules: [rules.yaml]\ncases:\n  - name: zero\n"
                            f"    {key}: /dev/zero\n" + ("    snapshot: {time: x}\n" if key ==
                                                         "calendar" else "") +
                            "    forbid: [{action: flatten}]\n")
        [result] = run_test_files([path])
        assert result.failures == ["error: /dev/zero: cannot read" + (
            " the news calendar" if key == "calendar" else "") + ": not a regular file (a "
            "device, a socket or a folder)"], key


@pytest.mark.parametrize(("line", "message"), [
    ("    forbid: [{action: flatten, count: true}]", "cases[0].forbid[0].count: Input should be "
                                                     "a valid integer"),
    ("    restart_after: 1.0\n    forbid: [{action: flatten}]", "cases[0].restart_after: Input "
                                                                "should be a valid integer"),
    ("    expect: [{action: flatten, at: '9999-12-31T23:30:00-05:00'}]",
     "cases[0].expect[0].at: Value error, times must lie in the years 2000 to 2100 (UTC)"),
])
def test_policy_test_numbers_and_times_are_strict(tmp_path: Path, line: str,
                                                  message: str) -> None:
    path = _policy_test(tmp_path, "rules: [rules.yaml]\ncases:\n  - name: n\n"
                        "    snapshot: {time: '2026-03-02T14:31:05Z'}\n" + line + "\n")
    with pytest.raises(PolicyTestError) as caught:
        run_test_files([path])
    assert str(caught.value).startswith(f"{path}:")
    assert message in str(caught.value)


def test_a_policy_test_file_over_64_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big_test.yaml"
    with path.open("wb") as handle:
        handle.truncate(64 * 2**20 + 1)
    with pytest.raises(PolicyTestError, match=r"larger than 64 MiB$"):
        run_test_files([path])
