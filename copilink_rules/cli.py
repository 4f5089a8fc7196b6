"""The `copilink-rules` command line (SPEC section 6).

`run(argv, stdout, stderr) -> int` does the work so tests can call it; `main()` wires it to the
process. No traceback reaches a user for bad input: every error we raise on purpose is one line
per problem (`file:line: rule: message`), and exit codes are:

    validate   0 valid, 1 invalid                 dry-run / replay   0, 1 bad input files
    check      0 ready, 1 not ready or bad input   test               0 all pass, 1 any fails
    any        2 usage error (unknown option, missing argument, malformed --set)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import __version__
from .engine import Engine
from .errors import CopilinkError, ParamError, RuleFileError, StateError
from .instruments import Catalog, default_catalog
from .output import DecisionPrinter
from .policytest import run_test_files
from .rules.loader import Policy, load_policy, parse_overrides
from .rules.spec import ruleset_json_schema_text
from .snapshots import iter_timeline, load_snapshot

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="copilink-rules", description="Policy engine for trade-copier "
                     "follower accounts: prop-firm limits and follower desync as YAML rules.")
    parser.add_argument("--version", action="version", version=f"copilink-rules {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def with_rules(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rules", action="append", required=True, metavar="PATH",
                       help="rule file or folder (repeatable)")
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a param, e.g. --set max_contracts=5 (repeatable)")
        p.add_argument("--rules-path", action="append", default=[], metavar="DIR",
                       help="folder searched for `extends` parents (repeatable)")
        p.add_argument("--instruments", metavar="FILE",
                       help="user instrument catalog (YAML) adding or overriding contracts")

    def with_format(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=("table", "jsonl"), default=None,
                       help="output format (default: table on a terminal, else jsonl)")

    p = sub.add_parser("validate", help="check rule files; print every problem")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--rules-path", action="append", default=[], metavar="DIR")

    p = sub.add_parser("dry-run", help="evaluate one snapshot and print decisions")
    with_rules(p)
    with_format(p)
    p.add_argument("--state", required=True, metavar="FILE", help="snapshot (.json or .yaml)")

    p = sub.add_parser("replay", help="evaluate a recorded timeline (JSON Lines) in order")
    with_rules(p)
    with_format(p)
    p.add_argument("timeline", metavar="TIMELINE")
    p.add_argument("--load-state", metavar="FILE", help="continue from saved engine state")
    p.add_argument("--save-state", metavar="FILE", help="save engine state at the end")

    p = sub.add_parser("check", help="pre-session check: ready or not, and why")
    with_rules(p)
    with_format(p)
    p.add_argument("--state", required=True, metavar="FILE", help="snapshot (.json or .yaml)")

    p = sub.add_parser("test", help="run policy tests (cases with expected decisions)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--instruments", metavar="FILE")

    sub.add_parser("schema", help="print the rule-file JSON Schema")
    return parser


def run(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except _UsageError as exc:
        stderr.write(f"{exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(stdout)
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args, stdout, stderr)
    except ParamError as exc:
        stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except CopilinkError as exc:
        stderr.write(f"{exc}\n")
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


def _catalog(args: argparse.Namespace) -> Catalog:
    path = getattr(args, "instruments", None)
    return default_catalog().extended(path) if path else default_catalog()


def _policy(args: argparse.Namespace, paths: Sequence[str]) -> Policy:
    return load_policy(paths, parse_overrides(args.set), args.rules_path)


def _format(args: argparse.Namespace, stdout: TextIO) -> str:
    if args.format:
        return str(args.format)
    return "table" if stdout.isatty() else "jsonl"


def cmd_validate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        policy = _policy(args, args.paths)
    except RuleFileError as exc:
        for problem in exc.problems:
            stderr.write(f"{problem}\n")
        stderr.write(f"invalid: {len(exc.problems)} problem(s)\n")
        return EXIT_FAIL
    for info in policy.rulesets:
        count = sum(1 for r in policy.rules if r.ruleset == info.name)
        parents = f", extends {', '.join(info.extends)}" if info.extends else ""
        stdout.write(f"ok: {info.file}: rule set {info.name} ({count} rules{parents})\n")
    stdout.write(f"valid: {len(policy.rules)} rules, {len(policy.params)} params, "
                 f"version {policy.version}\n")
    return EXIT_OK


def cmd_dry_run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    snapshot = load_snapshot(args.state, catalog)
    printer = DecisionPrinter(stdout, _format(args, stdout))
    printer.header(f"dry run of {args.state} at {snapshot.time.isoformat()} with rules "
                   f"{policy.name} (version {policy.version}); nothing is sent.\n"
                   "One snapshot has no history: every true condition is reported as if it "
                   "had held for its `for`.")
    printer.write(Engine(policy, catalog).evaluate(snapshot, as_if_held=True))
    printer.summary(_summary(printer, 1))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    engine = Engine(policy, catalog)
    if args.load_state:
        for note in engine.restore_state(_read_json(args.load_state)):
            stderr.write(f"note: {note}\n")
    printer = DecisionPrinter(stdout, _format(args, stdout))
    printer.header(f"replay of {args.timeline} with rules {policy.name} "
                   f"(version {policy.version}); nothing is sent.")
    count = 0
    for snapshot in iter_timeline(args.timeline, catalog):
        count += 1
        printer.write(engine.evaluate(snapshot))
    printer.summary(_summary(printer, count))
    if args.save_state:
        Path(args.save_state).write_text(engine.save_state_json(), encoding="utf-8")
    return EXIT_OK


def cmd_check(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    snapshot = load_snapshot(args.state, catalog)
    decisions = Engine(policy, catalog).evaluate(snapshot, as_if_held=True, stage="pre_session")
    blocking = [d for d in decisions if d.suppressed is False]
    fmt = _format(args, stdout)
    if fmt == "jsonl":
        DecisionPrinter(stdout, fmt).write(decisions)
    else:
        checks = sum(1 for r in policy.rules if r.stage == "pre_session")
        if not blocking:
            stdout.write(f"READY: {len(snapshot.accounts)} accounts passed {checks} "
                         f"pre-session checks ({policy.name}, version {policy.version})\n")
        else:
            stdout.write(f"NOT READY: {len(blocking)} problem(s) in {len(snapshot.accounts)} "
                         "accounts\n")
            for d in blocking:
                stdout.write(f"  [{d.severity}] {d.account or '(all)'}: {d.reason}  "
                             f"({d.rule})\n")
    return EXIT_FAIL if blocking else EXIT_OK


def cmd_test(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    results = run_test_files(args.paths, _catalog(args))
    current = None
    for result in results:
        if result.file != current:
            current = result.file
            stdout.write(f"{current}\n")
        stdout.write(f"  {'PASS' if result.passed else 'FAIL'}  {result.name}\n")
        for failure in result.failures:
            stdout.write(f"        {failure}\n")
    failed = sum(not r.passed for r in results)
    stdout.write(f"{len(results) - failed} passed, {failed} failed\n")
    return EXIT_FAIL if failed else EXIT_OK


def cmd_schema(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    stdout.write(ruleset_json_schema_text())
    return EXIT_OK


def _read_json(path: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise StateError(f"{path}: cannot read saved state: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}:{exc.lineno}: saved state is not JSON: {exc.msg}") from None


def _summary(printer: DecisionPrinter, snapshots: int) -> str:
    return (f"-- {snapshots} snapshot(s), {printer.count} decision(s), {printer.suppressed} "
            f"suppressed, {printer.errors} evaluation error(s)")


_COMMANDS = {
    "validate": cmd_validate,
    "dry-run": cmd_dry_run,
    "replay": cmd_replay,
    "check": cmd_check,
    "test": cmd_test,
    "schema": cmd_schema,
}


def main() -> None:
    sys.exit(run(sys.argv[1:], sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
