"""`copilink.yaml`: what `copilink-rules run --config` runs. Validated with file:line errors.

```yaml
broker:
  name: sim                   # sim, ninjatrader, tradovate or projectx
  settings: {seed: 7, random_trades: 5, random_faults: 3}   # the adapter's own settings
  speed: 1.0                  # sim only: simulated seconds per real second
copier: builtin               # who copies: builtin (copilink-rules itself, every order through
                              # the rules first), sim (the sim's own) or external (yours: pause
                              # and skip become instructions to you); default: sim on the sim
                              # broker, external on a real one
accounts:                     # the broker's account names, roles, ratios, firms, sizes
  - {id: LEAD, role: leader, firm: apex, size: 50000}
  - {id: F1, role: follower, ratio: 1.0, firm: apex, size: 50000}
  - {id: F2, role: follower, ratio: 1.0, firm: topstep, instrument: MNQH6}
  - {id: F3, role: follower, ratio: 0.5, max_qty: 2, copy_stops: true, enabled: true}
rules: [rules/desync.yaml]    # files or folders, relative to this file
params: {stuck_grace: 2s}     # like --set
journal: copilink.db
tick: 250ms
copy_every: 50ms              # copier: builtin copies this often between two rule ticks
pre_session: "09:25"          # local time of the pre-session check (optional)
timezone: America/New_York
kill_file: copilink.kill      # while this file exists, no automatic order is sent
calendar: news.yaml           # news calendar for news_blackout() (optional)
alerts:
  log_file: copilink-alerts.log
  webhooks:
    - {url: "https://discord.com/api/webhooks/...", style: discord}
    - {url: "https://api.telegram.org/bot<token>/sendMessage", style: telegram, chat_id: "123"}
```
"""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .adapters.base import AccountSpec, adapter_names, settings_model
from .errors import InputError, InstrumentError, Problem, RuleFileError
from .instruments import default_catalog
from .rules.expressions import did_you_mean
from .rules.loader import parse_duration
from .snapshots import format_loc
from .sources import YamlSyntaxError, load_yaml


def _duration_within(value: str, name: str, least: float, least_text: str) -> str:
    """`value` if it is a duration from `least` seconds to 60 s; else the setting's error."""
    if not least <= parse_duration(value) <= 60:
        raise ValueError(f"{name} must be between {least_text} and 60s")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    name: str = "sim"
    settings: dict[str, Any] = Field(default_factory=dict)
    speed: float = Field(default=1.0, gt=0, le=1000)


class AccountConfig(_Strict):
    id: str = Field(min_length=1)
    role: Literal["leader", "follower"]
    leader: str | None = None
    ratio: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False)
    firm: str | None = None
    size: float | None = Field(default=None, gt=0, le=100_000_000, allow_inf_nan=False,
                               description="starting balance: every firm limit depends on it")
    instrument: str | None = None
    # the built-in copier (copier: builtin)
    max_qty: int | None = Field(default=None, ge=1, le=100_000, strict=True,
                                description="never more than this many of its own contracts")
    copy_stops: bool = Field(default=True, description="mirror the leader's stop orders")
    enabled: bool = Field(default=True, description="false: never copied onto")

    def spec(self) -> AccountSpec:
        return AccountSpec(self.id, self.role, self.leader, self.ratio, self.firm, self.size,
                           self.instrument)


class WebhookConfig(_Strict):
    url: str = Field(pattern=r"^https?://")
    style: Literal["discord", "telegram", "json"] = "json"
    chat_id: str | None = None
    min_severity: Literal["info", "warning", "critical"] = "warning"


class AlertsConfig(_Strict):
    log_file: str | None = None
    webhooks: list[WebhookConfig] = Field(default_factory=list)


class RunConfig(_Strict):
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    copier: Literal["sim", "external", "builtin"] | None = None
    accounts: list[AccountConfig] = Field(default_factory=list)
    rules: list[str] = Field(default_factory=lambda: ["rules/desync.yaml"])
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    journal: str = "copilink.db"
    tick: str = "250ms"
    copy_every: str = Field(default="50ms", description="copier: builtin copies what the "
                            "broker pushed this often between two rule ticks")
    pre_session: str | None = Field(default=None, pattern=r"^\d{1,2}:\d{2}$")
    timezone: str = "America/New_York"
    kill_file: str | None = "copilink.kill"
    calendar: str | None = Field(default=None, description="news calendar (YAML or CSV)")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

    @field_validator("pre_session")
    @classmethod
    def _pre_session(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return time.fromisoformat(value.zfill(5)).strftime("%H:%M")  # 9:25 -> 09:25
        except ValueError:
            raise ValueError(f"{value!r} is not a time of day (HH:MM)") from None

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as "
                             "America/New_York)") from None
        return value

    @field_validator("tick")
    @classmethod
    def _tick(cls, value: str) -> str:
        return _duration_within(value, "tick", 0.05, "50ms")

    @field_validator("copy_every")
    @classmethod
    def _copy_every(cls, value: str) -> str:
        return _duration_within(value, "copy_every", 0.02, "20ms")

    @property
    def copy_seconds(self) -> float:
        return parse_duration(self.copy_every)

    @property
    def tick_seconds(self) -> float:
        return parse_duration(self.tick)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The fields of the (nested) model that holds the last part of `loc`."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            break
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def load_config(path: str | Path) -> tuple[RunConfig, Path]:
    """The config and the folder its relative paths are relative to."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{file}: cannot read config: {exc.strerror}") from None
    try:
        data, lines = load_yaml(text)
    except YamlSyntaxError as exc:
        raise RuleFileError([Problem(file, exc.line, str(exc))]) from None
    try:
        config = RunConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = "unknown field" + did_you_mean(str(loc[-1]), _fields_at(RunConfig, loc)) \
                if error["type"] == "extra_forbidden" else \
                error["msg"].removeprefix("Value error, ")
            problems.append(Problem(file, lines.line_of(list(loc)),
                                    f"{format_loc(loc)}: {message}"))
        raise RuleFileError(problems) from None
    problems = []
    name = config.broker.name
    if name not in adapter_names():
        loc = ("broker", "name")
        problems.append(Problem(file, lines.line_of(list(loc)), f"broker.name: no broker "
                                f"adapter {name!r}; known: {', '.join(adapter_names())}"))
    elif name != "sim":  # the sim's settings are its scenario, checked when it is built
        try:
            settings_model(name).model_validate(config.broker.settings)
        except ValidationError as exc:
            for error in exc.errors():
                loc = ("broker", "settings", *error["loc"])
                message = "unknown setting" + did_you_mean(
                    str(loc[-1]), settings_model(name).model_fields) \
                    if error["type"] == "extra_forbidden" else \
                    error["msg"].removeprefix("Value error, ")
                problems.append(Problem(file, lines.line_of(list(loc)),
                                        f"{format_loc(loc)}: {message}"))
    if name not in ("sim", "fake") and config.copier == "sim":
        problems.append(Problem(file, lines.line_of(["copier"]), "copier: 'sim' is the sim "
                                "broker's own copier; with a real broker use copier: builtin "
                                "or external"))
    for index, account in enumerate(config.accounts):
        if account.role != "leader":
            continue
        for key in ("max_qty", "copy_stops", "enabled"):
            if key in account.model_fields_set:
                loc = ("accounts", index, key)
                problems.append(Problem(file, lines.line_of(list(loc)), f"{format_loc(loc)}: "
                                        "a copier setting of followers; the leader is not "
                                        "copied onto"))
    catalog = default_catalog()
    for index, account in enumerate(config.accounts):
        if account.instrument is None:
            continue
        try:
            catalog.parse(account.instrument)
        except InstrumentError as exc:
            loc = ("accounts", index, "instrument")
            problems.append(Problem(file, lines.line_of(list(loc)), f"{format_loc(loc)}: {exc}"))
    if problems:
        raise RuleFileError(problems)
    return config, Path(path).resolve().parent


def sim_settings(config: RunConfig) -> dict[str, Any]:
    """The sim scenario: its own settings, with `accounts` mapped onto leader and followers."""
    settings = dict(config.broker.settings)
    if config.copier == "builtin":  # copilink-rules copies: the sim's own copier stays off
        settings.setdefault("own_copier", False)
    leaders = [a for a in config.accounts if a.role == "leader"]
    if len(leaders) > 1:
        raise InputError("the sim broker runs one leader; the config names "
                         f"{len(leaders)}: {', '.join(a.id for a in leaders)}")
    if leaders:
        settings.setdefault("leader", leaders[0].id)
        settings.setdefault("leader_firm", leaders[0].firm)
    followers = [a for a in config.accounts if a.role == "follower"]
    if followers:
        settings.setdefault("followers", [
            {"id": a.id, "ratio": a.ratio, "firm": a.firm, "instrument": a.instrument,
             **({"size": a.size} if a.size is not None else {})}
            for a in followers])
    return settings
