"""Conflict resolution: on one account the most restrictive action wins, the higher priority
among equals; every loser is reported with why it lost (`Engine._resolve` applies these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from copilink_rules.rules.loader import CompiledRule

from .targets import _Target

DEFAULT_SEVERITY = {
    "flatten": "critical", "lock_account": "critical", "cancel_orders": "warning",
    "pause_copier": "warning", "skip_entry": "warning", "block_order": "warning",
    "reduce_order": "warning", "catch_up": "info", "resume_copier": "info",
}
# How restrictive an action is (SPEC section 3); alerts never conflict.
RANK = {
    "flatten": 50, "lock_account:halted": 40, "lock_account:reducing": 30, "pause_copier": 30,
    "skip_entry": 30, "cancel_orders": 30, "block_order": 30, "reduce_order": 20,
    "catch_up": 10, "resume_copier": 10, "alert": 0,
}
ENTRY_PRECEDENCE = {"flatten": 3, "skip_entry": 2, "catch_up": 1}


@dataclass(slots=True)
class _Proposal:
    rule: CompiledRule
    order: int
    target: _Target
    action: str
    args: dict[str, Any]
    reason: str
    held_for: float
    # how conflicts rank it, first by rank (most restrictive first), then the rule's priority,
    # then the rule's order: all fixed by the rule's file, so worked out once per action
    # (`plan`, `_Step.key`)
    key: tuple[int, int, int]
    severity: str  # the rule's severity for this action, or the action's default
    suppressed: str | None = None
    target_index: int = 0


def _rank(p: _Proposal) -> int:
    return -p.key[0]


def rank_of(action: str, args: dict[str, Any]) -> int:
    """How restrictive `action` with these args is (RANK)."""
    if action == "lock_account":
        return RANK[f"lock_account:{args.get('state', 'halted')}"]
    return RANK.get(action, 0)


@dataclass(frozen=True, slots=True)
class _Step:
    """One action of a rule, with what a proposal of it takes from the rule file alone."""

    action: str
    args: dict[str, Any]  # copied into each proposal (a proposal adds to its own)
    template: Any  # its message template, or None
    key: tuple[int, int, int]  # _Proposal.key
    severity: str  # the decision's severity (an alert's own `severity` arg goes first)


def plan(rule: CompiledRule, order: int) -> tuple[str, tuple[_Step, ...]]:
    """A rule's default reason (when no alert message says more) and its actions' steps."""
    reason = str(rule.description or f"when: {rule.when.source}")
    steps = tuple(
        _Step(action.name, dict(action.args), template,
              (-rank_of(action.name, action.args), -rule.priority, order),
              rule.severity or DEFAULT_SEVERITY.get(action.name, "warning"))
        for action, template in zip(rule.actions, rule.templates, strict=True))
    return reason, steps


def _stronger(p: _Proposal, kept: list[_Proposal],
              entries: dict[str, tuple[str, str]]) -> str | None:
    """Why a more restrictive decision on the same account overrides `p`, if one does."""
    if p.action == "flatten" and p.target.family is not None:
        for other in kept:
            if other.action == "flatten" and other.target.family is None:
                return (f"covered by the flatten of every instrument from rule "
                        f"{other.rule.id}")
    if p.action == "catch_up":
        entry = entries.get(p.target.key)
        if entry is not None and entry[0] == p.target.trade and entry[1] != "catch_up":
            return (f"no catch-up after {entry[1]} in the same leader trade "
                    f"(follower {p.target.account.id if p.target.account else '?'})")
        for other in kept:
            same_family = other.target.family in (None, p.target.family)
            if other.action in ("flatten", "skip_entry") and same_family:
                return f"{other.action} from rule {other.rule.id} is more restrictive"
            if other.action == "lock_account":
                return (f"account is locked ({other.args.get('state')}) by rule "
                        f"{other.rule.id}: no new exposure")
            if other.action == "pause_copier":
                return f"copier paused by rule {other.rule.id}"
    if p.action == "resume_copier":
        for other in kept:
            if other.action == "pause_copier":
                return f"pause_copier from rule {other.rule.id} is more restrictive"
    return None
