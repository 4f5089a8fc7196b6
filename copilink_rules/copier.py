"""The copier ports (SPEC section 2, "copier"): who copies the leader onto the followers.

    sim       the sim broker's own copier (adapters/sim.py `SimCopier`): pause, resume and
              skip-entry really happen
    external  a copier we cannot steer (Replikanto, CrossTrade, Tradesyncer...): pause, resume
              and skip-entry become instructions to the trader — "pause copying onto F3 in your
              copier now" — and the journal records that a person must act. Flattening still
              happens: it goes to the broker, not to the copier.
"""

from __future__ import annotations

from typing import Any

from .adapters.base import BrokerAnswer, CopierPort
from .adapters.sim import SimBroker, SimCopier

COPIER_NAMES = ("sim", "external")


class ExternalCopier:
    """A copier only the trader can steer: every request is an instruction to a person."""

    name = "external"
    steerable = False

    def pause(self, follower: str, tag: str) -> BrokerAnswer:
        return BrokerAnswer("manual", f"pause copying onto {follower} in your copier now: "
                            "copilink-rules cannot reach your copier")

    def resume(self, follower: str, tag: str) -> BrokerAnswer:
        return BrokerAnswer("manual", f"copying onto {follower} may resume: switch it back on "
                            "in your copier when you are ready")

    def skip_entry(self, follower: str, instrument: str, tag: str) -> BrokerAnswer:
        return BrokerAnswer("manual", f"keep {follower} out of the leader's current "
                            f"{instrument} trade: do not let your copier enter it late")


def make_copier(name: str, broker: Any) -> CopierPort:
    """The copier called `name` for `broker` (`sim` needs the sim broker)."""
    if name == "external":
        return ExternalCopier()
    if name == "sim":
        if not isinstance(broker, SimBroker):
            raise LookupError("copier 'sim' is the sim broker's own copier; with a real "
                              "broker use copier: external")
        return SimCopier(broker)
    raise LookupError(f"No copier named {name!r}; known: {', '.join(COPIER_NAMES)}")
