"""The engine's faster comparisons decide exactly as the plain ones: positions (orders) compared
as whole records say what the field-by-field comparison says, and a group's rule subset read
from what it found already is the subset it finds."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from copilink_rules.engine import Engine
from copilink_rules.facts import ORDER_FLOATS, POSITION_FLOATS, same_records
from copilink_rules.model import Order, Position
from copilink_rules.rules import load_policy

from .conftest import REPO, T0, account, at, pos, snap

prices = st.sampled_from([0, 0.0, -0.0, 18000, 18000.0, 18000.25, 1.5])
moments = st.sampled_from([None, T0, T0 + timedelta(seconds=1)])
positions = st.builds(
    lambda i, q, p, o: Position.model_validate(
        {"instrument": i, "qty": q, "avg_price": p, "opened_at": o}),
    st.sampled_from(["NQH6", "MNQH6"]), st.sampled_from([-1, 0, 2]), prices, moments)
orders = st.builds(
    lambda s, lp, sp, st_: Order.model_validate(
        {"id": "o1", "instrument": "NQH6", "side": s, "qty": 1, "type": "stop_limit",
         "limit_price": lp, "stop_price": sp, "status": st_}),
    st.sampled_from(["buy", "sell"]), st.one_of(st.none(), prices),
    st.one_of(st.none(), prices), st.sampled_from(["working", "filled"]))


def same_value(a: Any, b: Any) -> bool:
    """Equal as a rule could tell: the same type and value, a zero of the same sign."""
    if isinstance(a, float) and isinstance(b, float) and a == b == 0:
        return math.copysign(1.0, a) == math.copysign(1.0, b)
    return type(a) is type(b) and a == b


def field_by_field(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        all(same_value(p.__dict__[k], q.__dict__[k]) for k in p.__dict__)
        for p, q in zip(a, b, strict=True))


@settings(max_examples=400, deadline=None)
@given(a=st.lists(positions, max_size=2), b=st.lists(positions, max_size=2))
def test_positions_compared_whole_say_what_field_by_field_says(
        a: list[Position], b: list[Position]) -> None:
    assert same_records(tuple(a), tuple(b), POSITION_FLOATS) == \
        field_by_field(tuple(a), tuple(b))


@settings(max_examples=400, deadline=None)
@given(a=st.lists(orders, max_size=2), b=st.lists(orders, max_size=2))
def test_orders_compared_whole_say_what_field_by_field_says(a: list[Order],
                                                             b: list[Order]) -> None:
    assert same_records(tuple(a), tuple(b), ORDER_FLOATS) == \
        field_by_field(tuple(a), tuple(b))


def test_a_subset_read_from_what_was_found_is_the_subset_found() -> None:
    rules = REPO / "rules"
    policy = load_policy([rules / "desync.yaml", *sorted((rules / "firms").glob("*.yaml"))],
                         search_path=[rules])
    engine = Engine(policy)
    snapshot = snap(at(0), account("LEAD", "leader", firm="apex", positions=[pos("NQH6", 2)]),
                    account("F1", firm="apex", positions=[pos("NQH6", 2)]),
                    account("F2", firm="topstep"))
    engine.evaluate(snapshot)
    engine.evaluate(snap(at(1), *({**a.model_dump(), "id": a.id} for a in snapshot.accounts)))
    checked = 0
    for group in engine._groups["session"]:
        for key, found in group.known_subsets.items():
            source = next(a for a in snapshot.accounts if a.id == key[0])
            assert group.subset(key, source) is found
            checked += 1
    assert checked >= 3
