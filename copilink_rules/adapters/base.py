"""The broker adapter interface: one Protocol every broker implements, and the registry.

An adapter reads the world (`snapshot`) and carries out commands. Every command carries a `tag`
(`CLR-...`) that the broker stores with the order, so a restarted engine recognises its own
orders and never sends one twice. Answers are results, not exceptions: a broker that refuses
says so in `BrokerAnswer.status` and `reason`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from copilink_rules.model import Snapshot

AnswerStatus = Literal["accepted", "filled", "rejected"]


@dataclass(frozen=True)
class BrokerAnswer:
    """What the broker said about one command."""

    status: AnswerStatus
    reason: str = ""
    order_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "rejected"


@runtime_checkable
class BrokerAdapter(Protocol):
    """A broker (or a simulation of one) the engine reads from and sends commands to."""

    name: str

    def snapshot(self) -> Snapshot:
        """Accounts, positions, working orders, quotes, connection state and data age, now."""

    def flatten(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        """Close the position in `instrument` (every instrument when None) with a market
        order and cancel the working orders there."""

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        """Cancel working orders (in `instrument`, or all)."""

    def place_order(self, account: str, instrument: str, side: Literal["buy", "sell"],
                    qty: int, order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        """Place a market or stop order carrying `tag`."""

    def pause_copier(self, follower: str, tag: str) -> BrokerAnswer:
        """Stop copying the leader onto `follower`."""

    def resume_copier(self, follower: str, tag: str) -> BrokerAnswer:
        """Start copying onto `follower` again."""

    def skip_entry(self, follower: str, instrument: str, tag: str) -> BrokerAnswer:
        """Tell the copier to leave `follower` out of the leader's current trade."""

    def find_tag(self, tag: str) -> BrokerAnswer | None:
        """What became of the command with `tag`, or None if the broker never received it."""

    def contracts(self) -> dict[str, str]:
        """Follower -> the contract the copier trades for it when not the leader's (MNQH6 for
        a follower that copies NQ as micros), as far as the broker or copier knows; a
        catch-up for that follower is placed in that contract."""


AdapterFactory = Callable[[dict[str, Any]], BrokerAdapter]
_REGISTRY: dict[str, AdapterFactory | None] = {
    # known names; None = not available in this release
    "sim": None, "replay": None, "ninjatrader": None, "tradovate": None, "projectx": None,
}


def register(name: str, factory: AdapterFactory) -> None:
    _REGISTRY[name] = factory


def create_adapter(name: str, settings: dict[str, Any]) -> BrokerAdapter:
    """The adapter registered as `name`, built from its settings; LookupError if unknown."""
    if name not in _REGISTRY:
        known = ", ".join(_REGISTRY)
        raise LookupError(f"No broker adapter named {name!r}; known: {known}")
    factory = _REGISTRY[name]
    if factory is None:
        available = ", ".join(n for n, f in _REGISTRY.items() if f is not None)
        raise LookupError(f"The broker adapter {name!r} is not available in this release; "
                          f"available: {available}")
    return factory(settings)


def adapter_names() -> list[str]:
    return list(_REGISTRY)
