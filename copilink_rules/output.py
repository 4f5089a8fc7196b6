"""Printing decisions: `jsonl` for tools, `table` for people."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

from .model import Decision

_MARK = {"critical": "!!", "warning": "! ", "info": "  ", "error": "E "}


def jsonl_line(decision: Decision) -> str:
    return json.dumps(decision.to_json_dict(), separators=(",", ":"), default=str)


def table_line(decision: Decision) -> str:
    moment = decision.time.strftime("%Y-%m-%d %H:%M:%S.") + \
        f"{decision.time.microsecond // 1000:03d}Z"
    mark = _MARK.get(decision.severity, "  ")
    target = decision.account or "(all)"
    if decision.instrument:
        target += f" {decision.instrument}"
    action = decision.action
    if action == "lock_account":  # the lock is the news: show its kind and its end
        action = f"lock {decision.args.get('state', 'halted')}"
    line = f"{moment} {mark} {action:<14} {target:<16} {decision.rule:<24} {decision.reason}"
    if "until_time" in decision.args:
        line += f" [locked until {decision.args['until_time']}]"
    if decision.suppressed:
        line += f"\n{'':>28}   -> suppressed: {decision.suppressed}"
    return line


class DecisionPrinter:
    """Writes decisions as they come, in one format, and counts them for a summary."""

    def __init__(self, out: TextIO, fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self.count = 0
        self.suppressed = 0
        self.errors = 0

    def header(self, text: str) -> None:
        if self.fmt == "table":
            self.out.write(text + "\n")

    def write(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            self.count += 1
            self.suppressed += decision.suppressed is not False
            self.errors += decision.action == "error"
            line = jsonl_line(decision) if self.fmt == "jsonl" else table_line(decision)
            self.out.write(line + "\n")

    def summary(self, text: str) -> None:
        if self.fmt == "table":
            self.out.write(text + "\n")
