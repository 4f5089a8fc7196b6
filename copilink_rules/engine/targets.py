"""Targets: what each rule is evaluated against — an account, a follower/leader pair in one
instrument family, or the whole snapshot — with the facts (facts.py) and views they read."""

from __future__ import annotations

from dataclasses import dataclass, field

from copilink_rules.facts import Family, OrderFacts, PositionFacts
from copilink_rules.model import Account
from copilink_rules.namespace import AccountView, Env

_Family = Family  # one account's exposure in one instrument family


@dataclass(slots=True)
class _Target:
    key: str
    account: Account | None
    env: Env
    family: str | None = None
    instrument: str | None = None
    trade: str | None = None  # pair targets: the leader's current trade ("" when flat)
    catch_up_qty: int = 0
    stop_price: float | None = None
    quote_symbol: str | None = None  # pair targets: the symbol of `quote` (the instrument's)
    # the account's (id, role, firm) this tick: which of a filtered group's rules apply
    kind: tuple[str, str, str | None] | None = None


@dataclass(slots=True)
class _PairSet:
    """A follower's pair targets, and the facts they were built from."""

    follower: PositionFacts
    leader: PositionFacts
    leader_id: str
    ratio: float
    orders: OrderFacts  # the leader's, which the targets' stop prices were taken from
    targets: list[_Target]
    keys: list[str]  # the targets' keys
    families: list[str]  # each target's family, in the targets' order


@dataclass(slots=True)
class _PairsUndo:
    """What a tick stored into last tick's pair sets, to put back if the tick fails before
    its pair sets are all made: each set's facts (so that the next tick stores into it again)
    and each target's leader trade (which a tick without pair targets reads, `_record`)."""

    sets: list[tuple[_PairSet, PositionFacts, PositionFacts, OrderFacts]] = field(
        default_factory=list)
    trades: list[tuple[_Target, str | None]] = field(default_factory=list)

    def put_back(self) -> None:
        for target, trade in reversed(self.trades):
            target.trade = trade
        for pairs, follower, leader, orders in reversed(self.sets):
            pairs.follower, pairs.leader, pairs.orders = follower, leader, orders


@dataclass(slots=True, eq=False)
class _AccountInfo:
    """One account this tick: the snapshot's record, its view, its facts and its account
    target. Kept from tick to tick while the account is in each snapshot, as its view is, and
    every field set by each tick (the reference path makes one anew every tick)."""

    account: Account
    view: AccountView
    families: dict[str, _Family]
    facts: PositionFacts
    orders: OrderFacts
    kind: tuple[str, str, str | None]  # (id, role, firm): the key of a group's rule subset
    target: _Target | None = None  # its account-scope target, once one was built

    @property
    def why_unreachable(self) -> str:
        view = self.view
        if view.reachable:
            return ""
        if not view.connected:
            return f"account {view.id} is disconnected"
        return f"account {view.id} data is stale ({view.data_age:.1f}s old)"


def _mark_hedges(infos: dict[str, _AccountInfo]) -> None:
    """Flag accounts holding the other side of a family than another account at their firm."""
    # (firm, family, long) -> the accounts holding that side of that family at that firm (a
    # family whose contracts net to nothing counts as short, as Family.side takes it)
    holders: dict[tuple[str, str, bool], list[str]] = {}
    for account_id, info in infos.items():
        firm = info.kind[2]  # (id, role, firm): the firm without a model attribute lookup
        if not firm:
            continue
        for family, held in info.families.items():
            key = (firm, family, held.equiv > 0)
            found = holders.get(key)
            if found is None:
                holders[key] = [account_id]
            else:
                found.append(account_id)
    # each account marked with the other side of the first family it is hedged in, joined once
    # per family (hundreds of accounts at a firm share it); one hedged in several families is
    # then given them all, each id whole (an id may hold a comma)
    first: dict[str, list[str]] = {}  # account -> the other side it was marked with
    more: dict[str, list[list[str]]] = {}  # account -> every other side, when several
    for (firm, family, long), accounts in holders.items():
        others = holders.get((firm, family, not long))
        if others is None:  # one side only at this firm: no hedge
            continue
        joined: str | None = None
        for account in accounts:
            marked = first.get(account)
            if marked is None:
                first[account] = others
                if joined is None:
                    joined = ",".join(sorted(set(others)))
                view = infos[account].view
                view.hedged = True
                view.hedged_with = joined
            else:
                sides = more.get(account)
                if sides is None:
                    more[account] = [marked, others]
                else:
                    sides.append(others)
    for account, sides in more.items():
        infos[account].view.hedged_with = ",".join(sorted(set().union(*sides)))
