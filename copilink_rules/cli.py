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
import difflib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from . import __version__
from .adapters import create_adapter
from .adapters.base import Broker, settings_model
from .adapters.sim import SimBroker
from .alerts import Alerts
from .calendar import load_calendar
from .config import RunConfig, load_config, sim_settings
from .copier import FollowerCopy, make_copier
from .enforcer import KillSwitch
from .engine import Engine
from .errors import (
    CopilinkError,
    InputError,
    InstrumentError,
    ParamError,
    RuleFileError,
    StateError,
)
from .gate import Gate, OrderRequest
from .incidents import collect, open_journal
from .incidents import render as render_incidents
from .instruments import Catalog, default_catalog
from .journal import Journal, iso
from .live import DEMO_SCENARIO, alert_printer, build_alerts, make_sim, run_live
from .output import DecisionPrinter
from .policytest import run_test_files
from .rules.loader import Policy, bundled_rules_dir, load_policy, parse_overrides
from .rules.spec import ruleset_json_schema_text
from .session import Session
from .snapshots import iter_timeline_origins, load_snapshot, read_input

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
        p.add_argument("--calendar", metavar="FILE",
                       help="news calendar (YAML or CSV) for news_blackout()")

    def with_format(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=("table", "jsonl"), default=None,
                       help="output format (default: table on a terminal, else jsonl)")

    p = sub.add_parser("validate", help="check rule files; print every problem")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--config", metavar="FILE", help="also check copilink.yaml: its settings, "
                   "its rules, and that every account's firm is known")
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

    p = sub.add_parser("gate", help="pre-trade gate: may the copier send this order?")
    with_rules(p)
    with_format(p)
    p.add_argument("--state", required=True, metavar="FILE", help="snapshot (.json or .yaml)")
    p.add_argument("--order", required=True, metavar="JSON",
                   help='e.g. \'{"account": "F1", "instrument": "NQH6", "side": "buy", '
                   '"qty": 2}\'')
    p.add_argument("--load-state", metavar="FILE", help="engine state with the locks in force "
                   "(replay --save-state)")

    p = sub.add_parser("test", help="run policy tests (cases with expected decisions)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--instruments", metavar="FILE")

    sub.add_parser("schema", help="print the rule-file JSON Schema")

    p = sub.add_parser("run", help="live enforcement with the scheduler")
    p.add_argument("--config", metavar="FILE", help="copilink.yaml (broker, accounts, rules, "
                   "alerts, journal)")
    p.add_argument("--rules", action="append", default=[], metavar="PATH")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--rules-path", action="append", default=[], metavar="DIR")
    p.add_argument("--broker", metavar="NAME", help="sim, ninjatrader, tradovate, projectx")
    p.add_argument("--dry-run", action="store_true", help="decide and journal, send nothing")
    p.add_argument("--journal", metavar="FILE", help="SQLite journal (default: copilink.db)")
    p.add_argument("--duration", type=_positive, metavar="SECONDS",
                   help="stop after this many seconds (simulated seconds on the sim)")
    p.add_argument("--record", metavar="FILE", help="append every snapshot evaluated to FILE "
                   "as a timeline line, to replay the day later with other rules")
    p.add_argument("--speed", type=_speed, metavar="X", help="sim only: simulated seconds per "
                   "real second")
    p.add_argument("--sim-state", metavar="FILE", help="sim only: keep the simulated broker "
                   "in this file, so a restarted run meets the same broker")
    p.add_argument("--copier", choices=("builtin", "sim", "external"),
                   help="who copies (overrides copilink.yaml's copier:)")
    p.add_argument("--no-view", action="store_true", help="plain alert lines, no live table")

    for verb, what in (("resume", "copy onto a paused follower again"),
                       ("pause", "stop copying onto a follower")):
        p = sub.add_parser(verb, help=f"built-in copier: {what}")
        p.add_argument("follower", help="the follower's account name")
        p.add_argument("--config", metavar="FILE", help="copilink.yaml (its journal)")
        p.add_argument("--journal", metavar="FILE", help="the running session's journal")

    p = sub.add_parser("connect", help="connect read-only and print what the broker shows")
    p.add_argument("--config", required=True, metavar="FILE", help="copilink.yaml")
    p.add_argument("--timeout", type=_positive, default=15.0, metavar="SECONDS",
                   help="how long to wait for the broker (default 15)")

    p = sub.add_parser("demo", help="a simulated session in which the three desyncs happen "
                       "and are resolved live")
    p.add_argument("--speed", type=_speed, default=4.0, metavar="X",
                   help="simulated seconds per real second (default 4)")
    p.add_argument("--journal", metavar="FILE", help="where to keep the demo's journal")
    p.add_argument("--no-view", action="store_true", help="plain alert lines, no live table")

    p = sub.add_parser("incidents", help="export the incident journal for a prop firm")
    p.add_argument("--db", required=True, metavar="FILE")
    p.add_argument("--since", metavar="TIME", type=_since,
                   help="a UTC date or time, e.g. 2026-03-02 or 2026-03-02T14:30:00Z")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md")

    p = sub.add_parser("kill", help="engage (or release) the kill switch of a running session")
    p.add_argument("--file", default="copilink.kill", metavar="PATH",
                   help="the session's kill file (default: copilink.kill)")
    p.add_argument("--release", action="store_true", help="remove the kill file")
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
    except LookupError as exc:  # e.g. an unknown broker adapter name
        stderr.write(f"error: {exc.args[0] if exc.args else exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


def _since(text: str) -> str:
    """A date or time (UTC unless it says otherwise), as the journal writes times."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date or time (use 2026-03-02 or "
                                         "2026-03-02T14:30:00Z)") from None
    return iso(moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC))


def _speed(text: str) -> float:
    value = _positive(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: the sim runs at most 1000x")
    return value


def _catalog(args: argparse.Namespace) -> Catalog:
    path = getattr(args, "instruments", None)
    return default_catalog().extended(path) if path else default_catalog()


def _policy(args: argparse.Namespace, paths: Sequence[str]) -> Policy:
    return load_policy(paths, parse_overrides(args.set), args.rules_path)


def _engine(args: argparse.Namespace, policy: Policy, catalog: Catalog,
            stderr: TextIO) -> Engine:
    calendar = load_calendar(args.calendar, catalog) if getattr(args, "calendar", None) \
        else None
    if calendar is None and uses_news(policy):
        stderr.write("warning: these rules use news_blackout() but no --calendar was given: "
                     "no news blackout will ever be in force\n")
    return Engine(policy, catalog, calendar)


def uses_news(policy: Policy) -> bool:
    return policy.mentions("news_blackout(")


def _format(args: argparse.Namespace, stdout: TextIO) -> str:
    if args.format:
        return str(args.format)
    return "table" if stdout.isatty() else "jsonl"


def cmd_validate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    paths = list(args.paths)
    firms: dict[str, str | None] = {}
    if args.config:
        config, base = load_config(args.config)
        paths += [str(base / r) for r in config.rules] if not paths else []
        firms = {a.id: a.firm for a in config.accounts}
    if not paths:
        raise ParamError("validate needs rule files or folders, or --config FILE")
    try:
        policy = _policy(args, paths)
        _check_firms(firms, policy, stderr)
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
    if args.config:
        stdout.write(f"ok: {args.config}: broker {config.broker.name}, "
                     f"{len(config.accounts)} account(s)\n")
    return EXIT_OK


def cmd_dry_run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    snapshot = load_snapshot(args.state, catalog)
    _check_firms({a.id: a.firm for a in snapshot.accounts}, policy, stderr)
    printer = DecisionPrinter(stdout, _format(args, stdout))
    printer.header(f"dry run of {args.state} at {snapshot.time.isoformat()} with rules "
                   f"{policy.name} (version {policy.version}); nothing is sent.\n"
                   "One snapshot has no history: every true condition is reported as if it "
                   "had held for its `for`.")
    printer.write(_engine(args, policy, catalog, stderr).evaluate(snapshot, as_if_held=True))
    printer.summary(_summary(printer, 1))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    engine = _engine(args, policy, catalog, stderr)
    if args.load_state:
        for note in engine.restore_state(_read_json(args.load_state)):
            stderr.write(f"note: {note}\n")
    printer = DecisionPrinter(stdout, _format(args, stdout))
    printer.header(f"replay of {args.timeline} with rules {policy.name} "
                   f"(version {policy.version}); nothing is sent.")
    count = 0
    progress = _Progress(stderr)
    for snapshot, origins in iter_timeline_origins(args.timeline, catalog):
        count += 1
        printer.write(engine.evaluate(snapshot, origins=origins))
        if count % 500 == 0:
            progress.show(f"replaying: {count:,} snapshots, at {snapshot.time:%Y-%m-%d %H:%M:%S}Z")
    progress.done()
    printer.summary(_summary(printer, count))
    if args.save_state:
        write_atomically(args.save_state, engine.save_state_json())
    return EXIT_OK


class _Progress:
    """A one-line progress report on a terminal's stderr, for a long replay (at most one
    update a second; nothing when stderr is not a terminal, so pipes and files stay clean)."""

    every = 1.0  # seconds between updates

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.on = stream.isatty()
        self.shown = False
        self.last = time.monotonic()

    def show(self, text: str) -> None:
        if not self.on or time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def cmd_check(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    snapshot = load_snapshot(args.state, catalog)
    _check_firms({a.id: a.firm for a in snapshot.accounts}, policy, stderr)
    decisions = _engine(args, policy, catalog, stderr).evaluate(snapshot, as_if_held=True,
                                                                stage="pre_session")
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
            troubled = {d.account for d in blocking}
            stdout.write(f"NOT READY: {len(blocking)} problem(s) in {len(troubled)} of "
                         f"{len(snapshot.accounts)} accounts\n")
            for d in blocking:
                who = d.account or "(all)"
                # rule messages often name the account first: say it once
                reason = d.reason.removeprefix(f"{who}: ")
                line = reason if reason.startswith(f"{who} ") else f"{who}: {reason}"
                stdout.write(f"  [{d.severity}] {line}  ({d.rule})\n")
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


def cmd_gate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    catalog = _catalog(args)
    policy = _policy(args, args.rules)
    try:
        order = OrderRequest.model_validate_json(args.order)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "order"
        raise ParamError(f"--order: {where}: {first['msg']}") from None
    try:
        catalog.parse(order.instrument)
    except InstrumentError as exc:
        raise ParamError(f"--order: instrument: {exc}") from None
    snapshot = load_snapshot(args.state, catalog)
    engine = _engine(args, policy, catalog, stderr)
    if args.load_state:
        for note in engine.restore_state(_read_json(args.load_state)):
            stderr.write(f"note: {note}\n")
    engine.evaluate(snapshot, as_if_held=True)  # locks the snapshot itself calls for
    gate = Gate(policy, catalog, engine.calendar)
    gate.update(snapshot, engine.locks)
    answer = gate.check(order)
    if _format(args, stdout) == "jsonl":
        stdout.write(json.dumps(answer.to_json_dict()) + "\n")
    else:
        stdout.write(f"{answer.verdict.upper()} {answer.qty} {order.instrument} for "
                     f"{order.account}\n")
        for reason in answer.reasons:
            stdout.write(f"  - {reason}\n")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    stdout.write(ruleset_json_schema_text())
    return EXIT_OK


def _read_json(path: str) -> object:
    text = read_input(path, path, " saved state")  # bounded; /dev/zero refused
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}:{exc.lineno}: saved state is not JSON: {exc.msg}") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise StateError(f"{path}: saved state is not valid: {str(exc)[:200]}") from None


def _summary(printer: DecisionPrinter, snapshots: int) -> str:
    return (f"-- {snapshots} snapshot(s), {printer.count} decision(s), {printer.suppressed} "
            f"suppressed, {printer.errors} evaluation error(s)")


def _broker(config: RunConfig, args: argparse.Namespace | None = None) -> Broker:
    """The configured broker, built from its settings and the accounts it must watch."""
    if config.broker.name == "sim":
        sim_state = Path(args.sim_state) if args is not None and args.sim_state else None
        return make_sim(sim_settings(config), sim_state)
    if not config.accounts:
        raise InputError(f"broker {config.broker.name}: copilink.yaml names no accounts; list "
                         "the leader and followers under accounts: (id = the broker's account "
                         "name)")
    try:
        return create_adapter(config.broker.name, config.broker.settings,
                              [a.spec() for a in config.accounts])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"broker.settings.{where}: {first['msg']}") from None


def firm_problems(firms: dict[str, str | None], policy: Policy) -> tuple[list[str], list[str]]:
    """(errors, warnings) about accounts' firms: a name no rule set knows is an error (a typo
    must never turn a firm's limits off); a known firm whose rules are not loaded, a warning."""
    loaded = set(policy.firms)
    bundled = {f.stem for f in (bundled_rules_dir() / "firms").glob("*.yaml")}
    known = sorted(loaded | bundled)
    errors, warnings = [], []
    for account, firm in firms.items():
        if not firm or firm in loaded:
            continue
        if firm in bundled:
            warnings.append(f"account {account}: the rules of firm {firm!r} are not loaded, so "
                            f"none of its limits apply; add rules/firms/{firm}.yaml to the rules")
            continue
        # "Apex Trader Funding", "apex-trader-funding": a known name inside the typo counts
        letters = "".join(c for c in firm.lower() if c.isalnum())
        near = sorted((k for k in known if k in letters), key=len, reverse=True) or \
            difflib.get_close_matches(firm.lower(), known, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        errors.append(f"account {account}: unknown firm {firm!r}{hint}; known firms: "
                      f"{', '.join(known)}")
    return errors, warnings


def _check_firms(firms: dict[str, str | None], policy: Policy, stderr: TextIO) -> None:
    errors, warnings = firm_problems(firms, policy)
    for warning in warnings:
        stderr.write(f"warning: {warning}\n")
    if errors:
        raise InputError("\n".join(errors))


def cmd_run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    if args.config:
        config, base = load_config(args.config)
    else:  # no config: a simulated session with trades and faults drawn by seed
        config, base = RunConfig(), Path.cwd()
        config.broker.settings = {"random_trades": 40, "random_faults": 12}
    if args.broker:
        config.broker.name = args.broker
    if args.copier:
        config.copier = args.copier
    settings_model(config.broker.name)  # an unknown adapter name: a usage error, at once
    is_sim = config.broker.name == "sim"
    if config.copier == "sim" and not is_sim:
        raise ParamError("copier 'sim' is the sim broker's own copier; with a real broker use "
                         "builtin or external")
    if not is_sim and (args.sim_state or args.speed):
        raise ParamError("--sim-state and --speed are for the sim broker only")
    rules = [str(base / r) for r in config.rules] if not args.rules else list(args.rules)
    overrides = {k: _param_text(v) for k, v in config.params.items()}
    overrides.update(parse_overrides(args.set))
    journal_path = Path(args.journal) if args.journal else base / config.journal
    policy = load_policy(rules, overrides, args.rules_path)  # bad rules: before connecting
    _check_firms({a.id: a.firm for a in config.accounts}, policy, stderr)
    view = not args.no_view and stdout.isatty()
    alerts = build_alerts(config, base, None if view else alert_printer(stdout))
    journal = Journal(journal_path)
    record = None
    broker: Broker | None = None
    try:
        journal.claim()  # one run per journal
        record = open_output(args.record, append=True) if args.record else None
        broker = _broker(config, args)
        if not is_sim:
            stdout.write(f"connecting to {broker.name}...\n")
        broker.connect()
        copier = make_copier(config.copier or ("sim" if is_sim else "external"), broker,
                             journal, _follower_copies(config, broker))
        kill = KillSwitch(base / config.kill_file if config.kill_file else None)
        calendar = load_calendar(base / config.calendar) if config.calendar else None
        session = Session(broker, journal, alerts, rules, overrides, args.rules_path,
                          dry_run=args.dry_run, kill_switch=kill, calendar=calendar,
                          contracts={a.id: a.instrument for a in config.accounts
                                     if a.instrument}, copier=copier)
        if calendar is None and uses_news(session.policy):
            stderr.write("warning: these rules use news_blackout() but the config names no "
                         "calendar: no news blackout will ever be in force\n")
        if not copier.steerable:
            stdout.write("copier: external — pause and skip-entry are instructions to you "
                         "(alerts say 'ACT NOW'); flattening is sent to the broker\n")
        elif copier.name == "builtin":
            stdout.write("copier: builtin — copilink-rules copies the leader onto the "
                         "followers, every order through the rules first; resume a paused "
                         f"follower with: copilink-rules resume <follower> --journal "
                         f"{journal_path}\n")
        for note in session.start():
            stdout.write(f"note: {note}\n")
        stdout.write(f"running {session.policy.name} (version {session.policy.version}) on "
                     f"broker {broker.name}{' — DRY RUN, nothing is sent' if args.dry_run else ''}"
                     f"; journal {journal_path}; Ctrl-C stops\n")
        runner = run_live(session, broker, tick=config.tick_seconds,
                          speed=args.speed or config.broker.speed,
                          until=args.duration, out=stdout, view=view,
                          pre_session=config.pre_session, timezone=config.timezone,
                          sim_state=Path(args.sim_state) if args.sim_state else None,
                          record=record, copy_every=config.copy_seconds)
        stdout.write(f"stopped after {session.ticks} ticks; {runner.missed} tick(s) skipped "
                     "while the previous one ran\n")
        if session.stopped:
            stderr.write(f"error: {session.stopped}\n")
            return EXIT_FAIL
    finally:
        if broker is not None:
            broker.close()
        if record is not None:
            record.close()
        alerts.close()
        journal.close()
    return EXIT_OK


def _follower_copies(config: RunConfig, broker: Broker) -> list[FollowerCopy]:
    """How each follower is copied onto (copilink.yaml; the sim's own followers without one)."""
    copies = [FollowerCopy(a.id, a.leader, a.ratio, a.instrument, a.max_qty, a.copy_stops,
                           a.enabled) for a in config.accounts if a.role == "follower"]
    if not copies and isinstance(broker, SimBroker):
        copies = [FollowerCopy(a.id, a.leader, a.ratio, a.symbol)
                  for a in broker.accounts.values() if a.role == "follower"]
    return copies


def cmd_copying(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """`resume F3` / `pause F3`: the built-in copier reads it from the journal every tick."""
    if args.journal:
        journal_path = Path(args.journal)
        followers: list[str] | None = None
    elif args.config:
        config, base = load_config(args.config)
        journal_path = base / config.journal
        copier = config.copier or ("sim" if config.broker.name == "sim" else "external")
        if copier != "builtin":
            where = "in your copier" if copier == "external" else "with the sim's copier"
            raise ParamError(f"{args.config}: copier is {copier}: {args.command} works for "
                             f"copier: builtin; {args.command} copying onto {args.follower} "
                             f"{where}")
        followers = [a.id for a in config.accounts if a.role == "follower"]
        disabled = [a.id for a in config.accounts if a.role == "follower" and not a.enabled]
        if args.command == "resume" and args.follower in disabled:
            raise ParamError(f"{args.follower} has enabled: false in {args.config}: it is "
                             "never copied onto; set enabled: true (the running session "
                             "reads it at its next start)")
    else:
        raise ParamError(f"{args.command} needs --config copilink.yaml or --journal FILE")
    if followers is not None and args.follower not in followers:
        near = difflib.get_close_matches(args.follower, followers, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InputError(f"{args.follower!r} is not a follower in {args.config}{hint}; "
                         f"followers: {', '.join(followers) or 'none'}")
    if not journal_path.exists():
        raise InputError(f"{journal_path}: no journal there yet: {args.command} acts on the "
                         "journal of a session started with run")
    journal = Journal(journal_path)
    try:
        if followers is None:  # --journal only: the accounts this journal has met
            known = sorted({c.account for c in journal.commands()} | set(journal.copying()))
            if known and args.follower not in known:
                near = difflib.get_close_matches(args.follower, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise InputError(f"{args.follower!r}: the journal {journal_path} has never "
                                 f"met an account by that name{hint}; it knows: "
                                 f"{', '.join(known)}")
        before = journal.copying().get(args.follower)
        state = "active" if args.command == "resume" else "paused"
        journal.set_copying(args.follower, state, f"{args.command}d by hand "
                            f"(copilink-rules {args.command})", datetime.now(UTC))
    finally:
        journal.close()
    was = f" (it was {before[0]}: {before[1]})" if before else ""
    if state == "active":
        stdout.write(f"copying onto {args.follower} resumes{was}: from the leader's next "
                     "change, at the running session's next tick (or when run starts). What "
                     "it missed meanwhile is for the desync rules.\n")
    else:
        stdout.write(f"copying onto {args.follower} paused{was}; resume with: copilink-rules "
                     f"resume {args.follower} --journal {journal_path}\n")
    return EXIT_OK


def cmd_connect(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Connect read-only and print accounts, positions and data age — or what failed."""
    config, _ = load_config(args.config)
    broker = _broker(config)
    try:
        stdout.write(f"connecting to {broker.name}...\n")
        broker.connect(timeout=args.timeout)
        snapshot = broker.snapshot()
        health = broker.health()
        detail = f" ({health.detail})" if health.detail else ""
        stdout.write(f"{broker.name}: {health.state}{detail}; broker time "
                     f"{iso(snapshot.time)}\n")
        for account in snapshot.accounts:
            age = account.data_age(snapshot.time)
            state = "connected" if account.connected else "NOT CONNECTED"
            held = ", ".join(f"{p.instrument} {p.qty:+d} @ {p.avg_price:g}"
                             for p in account.positions if p.qty) or "flat"
            working = sum(1 for o in account.orders if o.status in ("working", "pending"))
            stdout.write(f"  {account.id:<14} {account.role:<8} {state:<13} data age "
                         f"{age:5.1f}s  balance {account.balance:,.2f}  {held}; "
                         f"{working} working order(s)\n")
        missing = [a.id for a in snapshot.accounts if not a.connected]
        if missing:
            stderr.write(f"error: the broker does not show {', '.join(missing)}: check the "
                         "account names in copilink.yaml (the broker's own names)\n")
            return EXIT_FAIL
        return EXIT_OK
    finally:
        broker.close()


def cmd_demo(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    rules = [str(bundled_rules_dir() / "desync.yaml")]
    journal_path = Path(args.journal) if args.journal else \
        Path(tempfile.mkdtemp(prefix="copilink-demo-")) / "demo.db"
    if journal_path.exists():  # never delete a file the user named: it may be a real journal
        raise StateError(f"{journal_path} exists; the demo writes a new journal: name a file "
                         "that does not exist yet (or leave out --journal)")
    broker = SimBroker(DEMO_SCENARIO)
    view = not args.no_view and stdout.isatty()
    alerts = Alerts(terminal=None if view else alert_printer(stdout))
    journal = Journal(journal_path)
    stdout.write("copilink-rules demo: one leader, four followers, a simulated broker and "
                 f"copier at {args.speed:g}x speed. Watch the engine find and fix the three "
                 "desyncs of the article (missed entry, stuck follower, opposite position) "
                 "and a disconnected follower.\n\n")
    try:
        session = Session(broker, journal, alerts, rules)
        session.start()
        run_live(session, broker, tick=0.25, speed=args.speed, until=broker.end, out=stdout,
                 view=view, title="copilink-rules demo (simulated broker)")
        incidents = collect(journal)
        commands = journal.commands()
    finally:
        alerts.close()
        journal.close()
    stdout.write(f"\nDone: {session.ticks} ticks, {len(commands)} commands, "
                 f"{len(incidents)} incident(s).\n")
    for c in commands:
        stdout.write(f"  {c.time} {c.action:<14} {c.account:<4} {c.instrument or '':<6} "
                     f"{c.status:<10} {c.tag} {c.reason or ''}\n")
    stdout.write("\n" + render_incidents(incidents, "md", str(journal_path)))
    stdout.write(f"\nThe journal is {journal_path}; export it with:\n  copilink-rules "
                 f"incidents --db {journal_path} --format md\n")
    paused = sorted({c.account for c in commands if c.action == "pause_copier"})
    if paused:
        stdout.write(f"\nThe rules paused copying onto {', '.join(paused)}. With copilink-rules "
                     "as your copier (copier: builtin in copilink.yaml), a paused follower "
                     f"resumes with:\n  copilink-rules resume {paused[0]} --config "
                     "copilink.yaml\n")
    return EXIT_OK


def cmd_incidents(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    journal = open_journal(args.db)
    try:
        stdout.write(render_incidents(collect(journal, args.since), args.format, args.db))
    finally:
        journal.close()
    return EXIT_OK


def cmd_kill(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    path = Path(args.file)
    if args.release:
        if path.exists():
            path.unlink()
        stdout.write(f"kill switch released: {path} removed\n")
        return EXIT_OK
    write_atomically(path, "engaged by copilink-rules kill\n")
    stdout.write(f"kill switch engaged: {path} exists, no automatic order will be sent; "
                 f"release with: copilink-rules kill --release --file {path}\n")
    return EXIT_OK


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole or not at all; an unwritable path is an InputError."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def open_output(path: str, *, append: bool = False) -> TextIO:
    """An output file opened for writing; an unwritable path is an InputError."""
    try:
        return open(path, "a" if append else "w", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _param_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_COMMANDS = {
    "validate": cmd_validate,
    "dry-run": cmd_dry_run,
    "replay": cmd_replay,
    "check": cmd_check,
    "test": cmd_test,
    "gate": cmd_gate,
    "schema": cmd_schema,
    "run": cmd_run,
    "connect": cmd_connect,
    "resume": cmd_copying,
    "pause": cmd_copying,
    "demo": cmd_demo,
    "incidents": cmd_incidents,
    "kill": cmd_kill,
}


def main() -> None:
    sys.exit(run(sys.argv[1:], sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
