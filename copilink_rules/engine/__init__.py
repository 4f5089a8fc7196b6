"""Pure evaluation: snapshot (+ the engine's own small state) -> decisions.

The engine has no clock: time is the snapshot's `time`. Its state — how long each condition has
held, which episodes already fired, cooldowns, what was done about each leader trade, when each
position was first seen — serialises to versioned JSON (`Engine.save_state` / `restore_state`),
so a restarted session continues where it stopped.

Semantics (SPEC section 3):
* a rule fires when `when` has held continuously for `for`, once per episode; it fires again only
  after `when` was false at least once and `cooldown` has passed;
* conflicts on one account: the most restrictive action wins, the higher priority among equals;
  every suppressed decision is still reported with its reason;
* an order (flatten, cancel, catch-up) is never decided for a disconnected or stale account: it is
  held, reported once, and the rule fires again once the account is reachable;
* an evaluation error is reported once per rule and target (until it changes or clears), and the
  condition's timer is left as it was: never a crash, never a silent false.

The package, part by part: `core` (the Engine and a tick's steps), `targets` (what a rule is
evaluated against), `episodes` (rule groups, `for` timers, firing once), `resolve` (conflicts),
`state` (what is remembered and saved); account facts are `copilink_rules.facts`, locks
`copilink_rules.locks`.
"""

from __future__ import annotations

from copilink_rules.locks import Lock, Locks, lock_until

# distinct rule subsets compiled per group (beyond: the group's batch, masked); read when an
# Engine is made
MAX_SUBSETS = 64

from .core import DEFAULT_STALE_AFTER, Engine, run_timeline  # noqa: E402 - after MAX_SUBSETS
from .resolve import DEFAULT_SEVERITY, ENTRY_PRECEDENCE, RANK  # noqa: E402
from .state import STATE_VERSION  # noqa: E402
from .targets import _mark_hedges  # noqa: E402

__all__ = [
    "DEFAULT_SEVERITY",
    "DEFAULT_STALE_AFTER",
    "ENTRY_PRECEDENCE",
    "MAX_SUBSETS",
    "RANK",
    "STATE_VERSION",
    "Engine",
    "Lock",
    "Locks",
    "_mark_hedges",
    "lock_until",
    "run_timeline",
]
