"""Files a user hands us — an instrument catalog, copilink.yaml, saved engine state — are either
read, or refused with one of our own errors; never a traceback, and never state that crashes
the engine later."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from copilink_rules.config import load_config
from copilink_rules.engine import Engine
from copilink_rules.errors import CopilinkError
from copilink_rules.instruments import default_catalog
from copilink_rules.rules import load_policy

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
