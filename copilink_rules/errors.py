"""Every error copilink-rules raises on purpose.

    CopilinkError                      base of all of ours; str() is a one-line message
    ├── InputError (ValueError)        a file or value the user gave is wrong
    │   ├── RuleFileError              a rule file failed to load; .problems lists every one
    │   ├── SnapshotError              a snapshot / timeline failed to load; .problems too
    │   ├── PolicyTestError            a policy-test file is malformed
    │   └── ParamError                 a --set override names an unknown param or bad value
    ├── InstrumentError (LookupError)  a symbol is not in the catalog or cannot be parsed
    ├── ExpressionError (ValueError)   an expression was rejected at load (unsafe / unknown name)
    ├── EvaluationError                an expression failed while evaluating one rule on one target
    ├── StateError (ValueError)        saved engine state is unreadable or from a newer version
    └── BrokerError                    a broker (or its adapter) could not do what was asked
        ├── OrderRejected              the broker said no; .reason is its reason
        ├── BrokerUnavailable          network down, timeout, HTTP 5xx: try again when reachable
        ├── RateLimited                over the broker's request budget; .retry_after seconds
        └── AuthFailed                 credentials refused or session ended: stop sending

A `Problem` is one located message: `file:line: rule: message`. Loaders collect all problems of a
file before raising, so a user fixes everything in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One located problem in a user's file."""

    file: str
    line: int | None
    message: str
    rule: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        rule = f" {self.rule}:" if self.rule else ""
        return f"{where}:{rule} {self.message}"


class CopilinkError(Exception):
    """Base of every error raised on purpose by copilink-rules."""


class InputError(CopilinkError, ValueError):
    """Something the user supplied is wrong."""


class _ProblemsError(InputError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RuleFileError(_ProblemsError):
    """A rule file (or its `extends` chain) could not be loaded."""


class SnapshotError(_ProblemsError):
    """A snapshot or timeline could not be loaded."""


class PolicyTestError(_ProblemsError):
    """A policy-test file is malformed."""


class ParamError(InputError):
    """A `--set name=value` override is wrong."""


class InstrumentError(CopilinkError, LookupError):
    """A symbol is unknown to the catalog or not in a supported style."""

    def __str__(self) -> str:
        # LookupError would repr() the message; we want it as written.
        return str(self.args[0]) if self.args else ""


class ExpressionError(CopilinkError, ValueError):
    """An expression was rejected when the rule set was loaded."""


class EvaluationError(CopilinkError):
    """An expression failed at run time for one rule and one target."""


class StateError(CopilinkError, ValueError):
    """Saved engine state cannot be restored."""


class BrokerError(CopilinkError):
    """A broker could not carry out a request. Adapters raise these; the enforcer turns them
    into answers (`adapters.base.answer_from_error`) — no broker error ever escapes a tick."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class OrderRejected(BrokerError):  # noqa: N818 - named for what the broker said
    """The broker refused the request and said why."""


class BrokerUnavailable(BrokerError):  # noqa: N818 - named for what the broker said
    """The broker could not be reached (network, timeout, 5xx): never counted as a refusal."""


class RateLimited(BrokerError):  # noqa: N818 - named for what the broker said
    """Over the broker's request budget: wait `retry_after` seconds before the next request."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthFailed(BrokerError):  # noqa: N818 - named for what the broker said
    """The broker refused the credentials or ended the session: stop sending, alert."""
