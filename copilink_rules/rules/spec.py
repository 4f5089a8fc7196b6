"""The rule-file format as pydantic models; `schemas/ruleset.schema.json` is generated from them.

Run `copilink-rules schema > schemas/ruleset.schema.json` after changing a model; a test fails
while the committed schema and these models disagree.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
PARAM_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
DURATION_PATTERN = r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h)|params\.[a-z][a-z0-9_]{0,63})$"
TIME_PATTERN = r"([01]?\d|2[0-3]):[0-5]\d"  # a local time of day HH:MM, 00:00 to 23:59
DEFAULT_ALERT_COOLDOWN = "60s"  # the cooldown of a rule whose only action is alert
Severity = Literal["info", "warning", "critical"]
Role = Literal["leader", "follower"]


def _no_default(schema: JsonDict) -> None:
    schema.pop("default", None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    """A param with an explicit type; the short form `name: value` infers the type."""

    type: Literal["int", "number", "bool", "string", "duration", "time", "enum"] = Field(
        description="int / number (finite, within +-1e15), bool, string, duration (500ms, 2s, "
        "5m, 1h; at most 7 days), time (HH:MM), or enum (one of `choices`)")
    default: int | float | bool | str
    description: str | None = None
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = Field(
        default=None, min_length=1,
        description="the values an enum param may take: a typo in the default, in --set or "
        "in a comparison such as params.NAME == \"x\" is a load error")


class AppliesTo(_Strict):
    """Evaluate the rule only for accounts matching every list given."""

    roles: list[Role] | None = None
    firms: list[str] | None = None
    accounts: list[str] | None = None


class NoArgs(_Strict):
    """An action without arguments: write `- flatten: {}` or just `- flatten`."""


class PauseArgs(_Strict):
    all_followers: bool = Field(
        default=False, description="pause (or resume) every follower, not only this one"
    )


class LockArgs(_Strict):
    state: Literal["halted", "reducing"] = "halted"
    until: str = Field(
        default="next_trading_day",
        pattern=rf"^(?:next_trading_day|next_session|{TIME_PATTERN}|\d+(?:\.\d+)?(?:s|m|h))$",
        description="next_trading_day, next_session, a local time HH:MM (00:00 to 23:59), or a "
        "duration of at most 7 days (30m, 4h)",
    )


class AlertArgs(_Strict):
    severity: Severity = "warning"
    message: str | None = Field(
        default=None,
        max_length=500,
        description="text with {account.id}-style references to the rule's namespace",
    )
    incident: bool = Field(default=False, description="record an incident for the prop firm")


class ReduceArgs(_Strict):
    max_qty: int | str = Field(description="largest quantity allowed, a number or params.NAME")


class FlattenStep(_Strict):
    flatten: NoArgs | None


class CancelOrdersStep(_Strict):
    cancel_orders: NoArgs | None


class CatchUpStep(_Strict):
    catch_up: NoArgs | None


class SkipEntryStep(_Strict):
    skip_entry: NoArgs | None


class PauseCopierStep(_Strict):
    pause_copier: PauseArgs | None


class ResumeCopierStep(_Strict):
    resume_copier: PauseArgs | None


class LockAccountStep(_Strict):
    lock_account: LockArgs | None


class BlockOrderStep(_Strict):
    block_order: NoArgs | None


class ReduceOrderStep(_Strict):
    reduce_order: ReduceArgs


class AlertStep(_Strict):
    alert: AlertArgs | None


Step = (
    FlattenStep | CancelOrdersStep | CatchUpStep | SkipEntryStep | PauseCopierStep
    | ResumeCopierStep | LockAccountStep | BlockOrderStep | ReduceOrderStep | AlertStep
)
ActionName = Literal[
    "flatten", "cancel_orders", "catch_up", "skip_entry", "pause_copier", "resume_copier",
    "lock_account", "block_order", "alert",
]
STEP_ARGS: dict[str, type[BaseModel]] = {
    "flatten": NoArgs, "cancel_orders": NoArgs, "catch_up": NoArgs, "skip_entry": NoArgs,
    "pause_copier": PauseArgs, "resume_copier": PauseArgs, "lock_account": LockArgs,
    "block_order": NoArgs, "reduce_order": ReduceArgs, "alert": AlertArgs,
}


class Rule(_Strict):
    id: str = Field(pattern=NAME_PATTERN, description="unique id, lower-case, - or _")
    description: str | None = None
    scope: Literal["account", "pair", "global"] = Field(
        default="account",
        description="account: once per account; pair: once per leader x follower x "
        "instrument family; global: once per snapshot",
    )
    stage: Literal["session", "pre_session"] = Field(
        default="session",
        description="pre_session rules are evaluated by `check` (ready or not), session rules "
        "by dry-run / replay / run",
    )
    applies_to: AppliesTo | None = None
    when: str = Field(min_length=1, description="condition, a safe expression")
    for_: str = Field(
        default="0s",
        alias="for",
        pattern=DURATION_PATTERN,
        description="how long `when` must hold before the rule fires: 500ms, 2s, 1m, or "
        "params.NAME",
    )
    cooldown: str = Field(
        default="0s",
        pattern=DURATION_PATTERN,
        description="after firing, how long before the rule may fire again (in a new "
        f"episode): 0s by default, but {DEFAULT_ALERT_COOLDOWN} for a rule whose only action "
        "is alert, so a flapping condition does not spam; write `cooldown: 0s` to alert on "
        "every episode",
        json_schema_extra=_no_default,  # the default depends on `then`
    )
    then: list[ActionName | Step] = Field(min_length=1)
    priority: int = Field(default=0, description="higher wins among rules proposing one action")
    mode: Literal["enforce", "warn", "dryrun"] = "enforce"
    severity: Severity | None = Field(
        default=None, description="severity of this rule's decisions (default by action)"
    )


class RuleSetFile(_Strict):
    ruleset: str = Field(pattern=NAME_PATTERN, description="unique rule-set name")
    description: str | None = None
    source: str | None = Field(default=None, description="where the numbers come from")
    as_of: date | None = Field(default=None, description="date the numbers were true")
    extends: list[str] = Field(default_factory=list, description="names of parent rule sets")
    firm: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="the prop firm these rules are for: they apply only to accounts whose "
        "`firm` is this, and the firm's trading day below sets their daily metrics")
    timezone: str = Field(default="America/New_York", description="IANA timezone for local time")
    trading_day_start: str = Field(
        default="18:00", pattern=rf"^{TIME_PATTERN}$",
        description="local time a trading day starts (the evening before its date): daily "
        "P&L resets and locks `until: next_trading_day` end here")
    params: dict[str, int | float | bool | str | ParamSpec] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


SCHEMA_ID = "https://copilink-rules.dev/schemas/ruleset.schema.json"


def ruleset_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a rule file, generated from the models above."""
    schema = RuleSetFile.model_json_schema(by_alias=True)
    schema["properties"]["params"]["propertyNames"] = {"pattern": PARAM_PATTERN}
    schema.pop("title", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "copilink-rules rule set",
        **schema,
    }


def ruleset_json_schema_text() -> str:
    return json.dumps(ruleset_json_schema(), indent=2, sort_keys=False) + "\n"
