"""Episodes: which rules of a group apply to an account, and how their conditions are
evaluated together. A rule's episode (its `for` timer, fired once, cooldown) is kept per target
in `state._RuleState` and advanced by `Engine._on_true` / `Engine._evaluate_group`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from copilink_rules.errors import ExpressionError
from copilink_rules.model import Account
from copilink_rules.namespace import Env
from copilink_rules.rules.expressions import CompiledExpression, compile_batch
from copilink_rules.rules.loader import CompiledRule

log = logging.getLogger("copilink_rules.engine")


def account_kind(account: Account) -> tuple[str, str, str | None]:
    """(id, role, firm): what decides which of a group's rules apply to an account (the key of
    a group's rule subsets)."""
    a = account.__dict__  # the fields, without a pydantic model's attribute lookup
    return a["id"], a["role"], a["firm"]


@dataclass(slots=True)
class _Subset:
    """The rules of a group that apply to one kind of account, and how to evaluate them."""

    batch: Callable[[Env], int]  # bit i: the group's rule i
    # the group's rules that apply (bit i: the group's rule i): the bits of the batch to keep
    # (a batch of every rule, for many kinds of accounts, answers for the others too)
    allowed: int
    # some condition the batch evaluates reads the local clock (now_local, weekday): the
    # engine stores it into a target's environment before calling the batch only then
    clock: bool


@dataclass(slots=True)
class _Run:
    """How a group evaluates its targets in a tick: for each target whose account some of its
    rules apply to, (index among the targets, target, its env, its key, the batch and the bits
    of its rule subset, whether that subset reads the local clock), in the targets' order. A
    tick whose targets are the very objects of the last one, each of the same kind (`kinds`:
    each target's (id, role, firm), or None), runs the last tick's again."""

    kinds: list[tuple[str, str, str | None] | None]
    steps: list[tuple[int, Any, Env, str, Callable[[Env], int], int, bool]]


@dataclass
class _Group:
    """Rules of one scope, stage and timezone, evaluated together by one compiled batch."""

    scope: str
    zone: ZoneInfo
    rules: list[tuple[int, CompiledRule]]  # (position among the stage's rules, rule)
    filtered: bool = False
    clock: bool = False  # some condition reads the local clock (now_local, weekday)
    max_subsets: int = 64  # distinct rule subsets compiled (beyond: the batch, masked)
    _batch: Callable[[Env], int] | None = None
    _masks: dict[tuple[str, str, str | None], int] = field(default_factory=dict)
    _subsets: dict[tuple[str, str, str | None], _Subset | None] = field(default_factory=dict)
    _by_mask: dict[int, _Subset] = field(default_factory=dict)

    def allowed(self, account: Account) -> int:
        """Bit i set when rule i applies to this account (applies_to)."""
        key = account_kind(account)
        mask = self._masks.get(key)
        if mask is None:
            mask = sum(1 << i for i, (_, rule) in enumerate(self.rules)
                       if rule.applies(*key))
            self._masks[key] = mask
        return mask

    @property
    def batch(self) -> Callable[[Env], int]:
        """Every rule's condition in one batch, compiled on first use: a group filtered by
        firm or role mostly runs its subsets' batches, and an engine is made often (each
        restart, reload and policy test) and may never run a stage."""
        if self._batch is None:
            self._batch = _compiled([rule.when for _, rule in self.rules],
                                    f"{self.scope} rules")
        return self._batch

    def whole(self) -> _Subset:
        """Every rule of the group (its batch compiled on the first call)."""
        full = (1 << len(self.rules)) - 1
        found = self._by_mask.get(full)
        if found is None:
            found = self._by_mask[full] = _Subset(self._first_whole, full, self.clock)
        return found

    def _first_whole(self, env: Env) -> int:
        """`whole()`'s batch on its first call: compiled, put in its place, then called."""
        return self.compiled_whole()(env)

    def compiled_whole(self) -> Callable[[Env], int]:
        """`whole()`'s batch, compiled now (and put in its place) if it was not yet."""
        whole = self.whole()
        if whole.batch == self._first_whole:
            whole.batch = self.batch
        return whole.batch

    def prepare(self, accounts: Iterable[Account]) -> None:
        """Compile now what evaluating these accounts will need, which a tick otherwise
        compiles when it first meets a kind of account. Decides nothing."""
        if self.filtered:  # each kind of account runs its own subset of the rules
            for account in accounts:
                self.subset(account_kind(account), account)
        else:  # every target runs the whole group
            self.compiled_whole()

    @property
    def known_subsets(self) -> dict[tuple[str, str, str | None], _Subset | None]:
        """What `subset` found so far, by key (the engine's hot loop reads it directly)."""
        return self._subsets

    def subset(self, key: tuple[str, str, str | None], account: Account) -> _Subset | None:
        """The rules that apply to an account of this id, role and firm (None: no rule), as
        a batch of their own: the conditions of rules that do not apply (another firm's) are
        not evaluated at all."""
        try:
            return self._subsets[key]
        except KeyError:
            pass
        allowed = self.allowed(account)
        found = self._by_mask.get(allowed) if allowed else None
        if found is None and allowed:
            chosen = [i for i in range(len(self.rules)) if (allowed >> i) & 1]
            if len(self._by_mask) < self.max_subsets:
                batch = _compiled([self.rules[i][1].when for i in chosen],
                                  f"{self.scope} rules", positions=chosen)
                found = _Subset(batch, allowed, any(self.rules[i][1].when.reads_clock()
                                                    for i in chosen))
            else:  # many kinds of accounts: one batch for all, as if not filtered
                found = _Subset(self.batch, allowed, self.clock)
            self._by_mask[allowed] = found
        if len(self._subsets) < 100_000:
            self._subsets[key] = found
        return found


def _compiled(conditions: list[CompiledExpression], label: str,
              positions: list[int] | None = None) -> Callable[[Env], int]:
    """compile_batch, inside a tick: each condition compiled alone at load, so a batch that
    cannot be compiled (none should) is evaluated one condition at a time, never a crash."""
    try:
        return compile_batch(conditions, label, positions=positions)
    except Exception as exc:  # noqa: BLE001 - a tick goes on; the answers stay exact
        log.warning("could not compile the batch of %d %s (%s: %s); evaluating them one by "
                    "one", len(conditions), label, type(exc).__name__, exc)
        return _unbatched


def _unbatched(env: Env) -> int:
    """A batch that always fails: the engine then evaluates its conditions one by one."""
    raise ExpressionError("no batch: evaluate the conditions one by one")


def _groups(rules: list[CompiledRule], max_subsets: int) -> list[_Group]:
    groups: dict[tuple[str, str], _Group] = {}
    for order, rule in enumerate(rules):
        key = (rule.scope, rule.timezone.key)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(rule.scope, rule.timezone, [],
                                         max_subsets=max_subsets)
        group.rules.append((order, rule))
    for group in groups.values():  # batches are compiled on first use (_Group.batch)
        group.filtered = any(r.roles is not None or r.firms is not None or r.accounts is not None
                             for _, r in group.rules)
        group.clock = any(r.when.reads_clock() for _, r in group.rules)
    return list(groups.values())
