"""Numbers are numbers: NaN and infinities, booleans, whole numbers out of bounds or too long
to read, and times outside 2000-2100 are refused in one line naming file, line and field;
never loaded (a NaN balance compares false with every limit) and never a traceback."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.cli import run
from copilink_rules.errors import SnapshotError
from copilink_rules.model import MAX_QTY, Snapshot, finite_or_none
from copilink_rules.snapshots import iter_timeline, load_snapshot

from .conftest import REPO

TIME = "2026-03-02T14:31:05Z"


def _snapshot(**overrides: Any) -> dict[str, Any]:
    follower: dict[str, Any] = {"id": "F1", "role": "follower", "leader": "LEAD", "firm": "apex",
                                "balance": 49800.0, "size": 50000.0, "ratio": 1.0,
                                "positions": [{"instrument": "NQH6", "qty": 1,
                                               "avg_price": 18000.0}],
                                "orders": [{"id": "o1", "instrument": "NQH6", "side": "sell",
                                            "qty": 1, "type": "stop", "stop_price": 17970.0,
                                            "limit_price": 17960.0}]}
    data: dict[str, Any] = {"time": TIME, "quotes": {"NQH6": {"bid": 18000.0, "ask": 18000.25,
                                                              "last": 18000.25}},
                            "accounts": [{"id": "LEAD", "role": "leader"}, follower]}
    for path, value in overrides.items():
        *parents, last = path.split(".")
        target: Any = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value
    return data


# every number field of a snapshot, as the path in _snapshot() and as the message names it
FIELDS = [
    ("accounts.1.balance", "accounts[1].balance"),
    ("accounts.1.realized_pnl", "accounts[1].realized_pnl"),
    ("accounts.1.unrealized_pnl", "accounts[1].unrealized_pnl"),
    ("accounts.1.size", "accounts[1].size"),
    ("accounts.1.ratio", "accounts[1].ratio"),
    ("accounts.1.positions.0.avg_price", "accounts[1].positions[0].avg_price"),
    ("accounts.1.orders.0.stop_price", "accounts[1].orders[0].stop_price"),
    ("accounts.1.orders.0.limit_price", "accounts[1].orders[0].limit_price"),
    ("quotes.NQH6.bid", "quotes.NQH6.bid"),
    ("quotes.NQH6.ask", "quotes.NQH6.ask"),
    ("quotes.NQH6.last", "quotes.NQH6.last"),
]


def _timeline_problem(tmp_path: Path, line: str) -> str:
    """The one message iter_timeline gives for `line`, as the 2nd line of a timeline."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_snapshot()) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SnapshotError) as caught:
        list(iter_timeline(path))
    assert len(caught.value.problems) == 1
    return str(caught.value).replace(str(path), "FILE")


@pytest.mark.parametrize(("path", "field"), FIELDS)
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused_in_a_timeline(tmp_path: Path, path: str, field: str,
                                                      token: str) -> None:
    marker = 987654.321  # replaced by the bare JSON token Python's json would accept
    line = json.dumps(_snapshot(**{path: marker})).replace(str(marker), token)
    assert _timeline_problem(tmp_path, line).startswith(
        f"FILE:2: {field}: Input should be a finite number")


@pytest.mark.parametrize(("path", "field"), FIELDS)
def test_non_finite_numbers_are_refused_in_a_json_or_yaml_snapshot(tmp_path: Path, path: str,
                                                                   field: str) -> None:
    marker = 987654.321
    text = json.dumps(_snapshot(**{path: marker}), indent=1)
    line = text[:text.index(str(marker))].count("\n") + 1
    for name, token in [("s.json", "NaN"), ("s.json", "-Infinity"), ("s.yaml", ".nan"),
                        ("s.yaml", "-.inf"), ("s.yaml", ".Inf")]:
        file = tmp_path / name
        file.write_text(text.replace(str(marker), token), encoding="utf-8")
        with pytest.raises(SnapshotError) as caught:
            load_snapshot(file)
        assert [str(p).replace(str(file), "FILE") for p in caught.value.problems] == [
            f"FILE:{line}: {field}: Input should be a finite number (got '{token}')"]


def test_a_nan_balance_is_refused_by_dry_run_not_evaluated(tmp_path: Path) -> None:
    # loaded, a NaN balance would pass every drawdown check (NaN < limit is False)
    state = tmp_path / "s.json"
    state.write_text(json.dumps(_snapshot(**{"accounts.1.balance": 1.5})).replace("1.5", "NaN"))
    out, err = io.StringIO(), io.StringIO()
    code = run(["dry-run", "--rules", str(REPO / "rules" / "firms" / "apex.yaml"),
                "--state", str(state)], out, err)
    assert (code, out.getvalue()) == (1, "")
    assert err.getvalue() == (f"{state}:1: accounts[1].balance: Input should be a finite "
                              "number (got 'NaN')\n")


@pytest.mark.parametrize(("path", "field"), [
    ("accounts.1.positions.0.qty", "accounts[1].positions[0].qty"),
    ("accounts.1.orders.0.qty", "accounts[1].orders[0].qty"),
])
@pytest.mark.parametrize(("value", "message"), [
    (True, "Input should be a valid integer (got True)"),
    (2.0, "Input should be a valid integer (got 2.0)"),
    ("2", "Input should be a valid integer (got '2')"),
    (MAX_QTY + 1, "Input should be less than or equal to 100000 (got 100001)"),
    (10**50, "Input should be less than or equal to 100000"),
])
def test_a_quantity_is_a_bounded_whole_number(tmp_path: Path, path: str, field: str,
                                              value: object, message: str) -> None:
    problem = _timeline_problem(tmp_path, json.dumps(_snapshot(**{path: value})))
    assert problem.startswith(f"FILE:2: {field}: {message}")


def test_quantities_up_to_the_bound_load_and_booleans_are_not_money() -> None:
    data = _snapshot(**{"accounts.1.positions.0.qty": -MAX_QTY, "accounts.1.balance": 50000})
    assert Snapshot.model_validate(data).accounts[1].positions[0].qty == -MAX_QTY
    with pytest.raises(ValueError, match="balance"):
        Snapshot.model_validate(_snapshot(**{"accounts.1.balance": True}))
    with pytest.raises(ValueError, match="ratio"):
        Snapshot.model_validate(_snapshot(**{"accounts.1.ratio": 1e9}))
    with pytest.raises(ValueError, match="balance"):
        Snapshot.model_validate(_snapshot(**{"accounts.1.balance": 1e300}))


def test_a_4300_digit_number_is_one_clean_line(tmp_path: Path) -> None:
    digits = "1" * 5000  # past Python's int-string conversion limit (4300 digits)
    text = json.dumps(_snapshot(**{"accounts.1.positions.0.qty": 7}), indent=1)
    line = text[:text.index('"qty": 7')].count("\n") + 1
    text = text.replace('"qty": 7', f'"qty": {digits}')
    for name in ("s.json", "s.yaml"):
        file = tmp_path / name
        file.write_text(text, encoding="utf-8")
        with pytest.raises(SnapshotError) as caught:
            load_snapshot(file)
        [problem] = caught.value.problems
        assert (problem.file, problem.line) == (str(file), line)
        assert "digits" in problem.message
        assert len(str(problem)) < 300
    one_line = json.dumps(_snapshot(**{"accounts.1.positions.0.qty": 7})).replace(
        '"qty": 7', f'"qty": {digits}')
    message = _timeline_problem(tmp_path, one_line)
    assert message.startswith("FILE:2: ")
    assert "digits" in message or "number out of range" in message
    assert len(message) < 300


@pytest.mark.parametrize("text", ["9999-12-31T23:30:00Z", "9999-12-31T23:30:00-05:00",
                                  "0001-01-01T00:00:00+05:00", "1999-12-31T12:00:00Z",
                                  "2000-01-01T00:00:00+05:00", "2101-01-01T00:00:00Z",
                                  "2100-12-31T23:59:59-05:00"])
@pytest.mark.parametrize(("path", "field"), [
    ("time", "time"), ("accounts.1.updated_at", "accounts[1].updated_at"),
    ("accounts.1.positions.0.opened_at", "accounts[1].positions[0].opened_at")])
def test_times_outside_2000_to_2100_are_refused(tmp_path: Path, text: str, path: str,
                                                field: str) -> None:
    problem = _timeline_problem(tmp_path, json.dumps(_snapshot(**{path: text})))
    assert problem.startswith(f"FILE:2: {field}: Value error, times must lie in the years "
                              f"2000 to 2100 (UTC) (got '{text}')")


def test_times_at_the_edges_of_the_range_load() -> None:
    for text in ("2000-01-01T00:00:00Z", "2000-01-01T00:00:00-05:00", "2100-12-31T23:59:59Z",
                 "2100-12-31T23:59:59+05:00"):
        Snapshot.model_validate(_snapshot(time=text, **{"accounts.1.updated_at": text}))


@pytest.mark.parametrize(("value", "expected"), [
    (1.5, 1.5), (0, 0.0), (-3, -3.0), ("18000.25", 18000.25), (float("nan"), None),
    (float("inf"), None), (-math.inf, None), ("NaN", None), ("", None), (None, None),
    (True, None), (10**400, None), ("1e999", None), ([1], None)])
def test_finite_or_none_turns_a_broker_s_missing_number_into_none(value: object,
                                                                 expected: float | None
                                                                 ) -> None:
    assert finite_or_none(value) == expected
