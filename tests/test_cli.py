"""The command line: outputs, exit codes, and no traceback for bad input."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from copilink_rules import cli as cli_module
from copilink_rules import policytest
from copilink_rules.cli import run
from copilink_rules.rules.spec import ruleset_json_schema_text

from .conftest import REPO

GOLDEN = Path(__file__).parent / "golden"
DESYNC = str(REPO / "rules" / "desync.yaml")
EXAMPLES = REPO / "examples"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    text = text.replace(str(REPO) + "/", "")
    # the rule-set version is a hash of the rule files: it changes with every edit of them
    text = re.sub(r"version [0-9a-f]{12}", "version <hash>", text)
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path} (UPDATE_GOLDEN=1 rewrites it)"


def test_validate_reports_ok_files() -> None:
    code, out, err = cli("validate", DESYNC)
    assert code == 0, err
    assert "rule set desync (9 rules)" in out
    assert out.splitlines()[-1].startswith("valid: 9 rules, 8 params, version ")


def test_validate_reports_every_problem_as_file_line_rule_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((GOLDEN / "bad-rules.yaml").read_text())
    code, _, err = cli("validate", str(bad))
    assert code == 1
    golden("validate-bad-rules.txt", err.replace(str(bad), "bad-rules.yaml"))


def test_replay_table_output_is_stable() -> None:
    code, out, err = cli("replay", "--format", "table", "--rules", DESYNC,
                         str(EXAMPLES / "disconnected-follower.jsonl"))
    assert code == 0, err
    golden("replay-disconnected.txt", out)


def test_replay_jsonl_has_the_documented_fields() -> None:
    code, out, _ = cli("replay", "--format", "jsonl", "--rules", DESYNC,
                       str(EXAMPLES / "opposite-position.jsonl"))
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["rule"], d["action"], d["account"], d["instrument"]) for d in lines] == [
        ("opposite-position", "flatten", "F2", "MNQH6"),
        ("opposite-position", "pause_copier", "F2", "MNQH6"),
        ("opposite-position", "alert", "F2", "MNQH6"),
    ]
    for d in lines:
        assert d["time"] == "2026-03-02T14:30:09.000Z"
        assert d["suppressed"] is False
        assert d["ruleset"] == "desync"
        assert len(d["version"]) == 12


def test_dry_run_says_it_has_no_history() -> None:
    code, out, _ = cli("dry-run", "--format", "table", "--rules", DESYNC, "--state",
                       str(EXAMPLES / "missed-entry.json"))
    assert code == 0
    assert "every true condition is reported as if it had held" in out
    assert "catch_up" in out
    assert "F2 NQH6" in out


def test_set_changes_a_param_from_the_command_line() -> None:
    _, out, _ = cli("dry-run", "--format", "jsonl", "--rules", DESYNC, "--state",
                    str(EXAMPLES / "missed-entry.json"), "--set", "catch_up_max_ticks=0")
    assert [json.loads(line)["action"] for line in out.splitlines()] == ["skip_entry", "alert"]


def test_replay_can_stop_and_continue_from_saved_state(tmp_path: Path) -> None:
    lines = (EXAMPLES / "disconnected-follower.jsonl").read_text().splitlines(keepends=True)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(lines[:50]))
    second.write_text("".join(lines[50:]))
    state = tmp_path / "state.json"
    _, out1, _ = cli("replay", "--format", "jsonl", "--rules", DESYNC, str(first),
                     "--save-state", str(state))
    _, out2, _ = cli("replay", "--format", "jsonl", "--rules", DESYNC, str(second),
                     "--load-state", str(state))
    _, whole, _ = cli("replay", "--format", "jsonl", "--rules", DESYNC,
                      str(EXAMPLES / "disconnected-follower.jsonl"))
    assert out1 + out2 == whole
    assert json.loads(state.read_text())["version"] == 1


def test_check_exit_codes() -> None:
    code, out, _ = cli("check", "--format", "table", "--rules", DESYNC, "--state",
                       str(EXAMPLES / "pre-session-ready.json"))
    assert (code, out.split(":")[0]) == (0, "READY")
    code, out, _ = cli("check", "--format", "table", "--rules", DESYNC, "--state",
                       str(EXAMPLES / "pre-session-not-ready.json"))
    assert code == 1
    golden("check-not-ready.txt", out)


def test_policy_tests_pass_and_a_failing_case_fails(tmp_path: Path) -> None:
    code, out, _ = cli("test", str(REPO / "rules" / "tests"))
    assert code == 0, out
    assert " 0 failed" in out
    failing = tmp_path / "t.yaml"
    failing.write_text(f"""
rules: [{DESYNC}]
cases:
  - name: wrong expectation
    timeline: {EXAMPLES / "stuck-follower.jsonl"}
    expect:
      - {{rule: stuck-follower, action: flatten, at: "2026-03-02T14:30:16Z"}}
""")
    code, out, _ = cli("test", str(failing))
    assert code == 1
    assert "FAIL  wrong expectation" in out
    assert "expected {rule: stuck-follower, action: flatten, at: 2026-03-02T14:30:16Z}" in out


def test_every_kind_of_policy_test_failure_is_reported(tmp_path: Path) -> None:
    failing = tmp_path / "t_test.yaml"
    failing.write_text(f"""
rules: [{DESYNC}]
cases:
  - name: ready expected
    check: true
    ready: true
    snapshot: {EXAMPLES / "pre-session-not-ready.json"}
  - name: not ready expected
    check: true
    ready: false
    snapshot: {EXAMPLES / "pre-session-ready.json"}
  - name: wrong count
    timeline: {EXAMPLES / "stuck-follower.jsonl"}
    expect:
      - {{rule: stuck-follower, action: flatten, count: 2}}
  - name: forbidden happens
    timeline: {EXAMPLES / "stuck-follower.jsonl"}
    forbid:
      - {{rule: stuck-follower, action: flatten}}
  - name: rules that do not load
    set: {{stuck_grace: soon}}
    timeline: {EXAMPLES / "stuck-follower.jsonl"}
    expect:
      - {{rule: stuck-follower}}
""")
    code, out, _ = cli("test", str(tmp_path))
    assert code == 1
    assert "0 passed, 5 failed" in out
    for line in [
        "FAIL  ready expected", "expected READY, but: F1 holds 1 undeclared open position(s)",
        "FAIL  not ready expected", "expected NOT READY, but every check passed",
        "FAIL  wrong count", "expected 2 x {rule: stuck-follower, action: flatten, count: 2}: "
        "got 1 (at 2026-03-02T14:30:",
        "FAIL  forbidden happens", "forbidden {rule: stuck-follower, action: flatten} happened "
        "1 time(s), first at 2026-03-02T14:30:",
        "FAIL  rules that do not load", "error: --set stuck_grace=soon",
    ]:
        assert line in out, line


def test_policy_test_cases_share_loaded_rules_but_not_params_or_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run loads rule files once per set of overrides: cases with the same `set` share them,
    a case's own `set` still gets its own params, a load error fails every case that needs
    it, and no case sees another's state (each has an engine of its own)."""
    loads: list[dict[str, str] | None] = []
    real_load = policytest.load_policy  # type: ignore[attr-defined]

    def counting_load(paths: Any, overrides: dict[str, str] | None = None) -> Any:
        loads.append(overrides)
        return real_load(paths, overrides)

    monkeypatch.setattr(policytest, "load_policy", counting_load)
    timeline = EXAMPLES / "stuck-follower.jsonl"
    flattened = "{rule: stuck-follower, action: flatten, account: F2, count: 1}"
    path = tmp_path / "t_test.yaml"
    path.write_text(f"""
rules: [{DESYNC}]
cases:
  - name: flattened after the grace
    timeline: {timeline}
    expect: [{flattened}]
  - name: a long grace, its own params
    set: {{stuck_grace: 1h}}
    timeline: {timeline}
    forbid: [{{rule: stuck-follower, action: flatten}}]
  - name: flattened again, in a fresh engine
    timeline: {timeline}
    expect: [{flattened}]
  - name: bad override
    set: {{stuck_grace: soon}}
    timeline: {timeline}
    expect: [{flattened}]
  - name: the same bad override
    set: {{stuck_grace: soon}}
    timeline: {timeline}
    expect: [{flattened}]
""")
    results = policytest.run_test_files([path])
    assert [r.passed for r in results] == [True, True, True, False, False]
    assert results[3].failures == results[4].failures
    assert len(results[3].failures) == 1
    assert results[3].failures[0].startswith("error: --set stuck_grace=soon")
    # one load for the defaults, one for the long grace, one (failing) for the bad override
    assert loads == [{}, {"stuck_grace": "1h"}, {"stuck_grace": "soon"}]


def test_malformed_policy_test_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("rules: [x.yaml]\ncases:\n  - name: nothing\n    snapshot: a.json\n")
    code, _, err = cli("test", str(bad))
    assert code == 1
    assert err.strip() == f"{bad}:3: cases[0]: Value error, a case needs `expect`, `forbid` " \
        "or `ready`"


def test_schema_prints_the_committed_schema() -> None:
    code, out, _ = cli("schema")
    assert code == 0
    assert out == ruleset_json_schema_text() == (REPO / "schemas" /
                                                 "ruleset.schema.json").read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["dry-run", "--state", "x.json"],
        ["replay"],
        ["frobnicate"],
        ["dry-run", "--rules", DESYNC, "--state", "x.json", "--set", "novalue"],
        ["dry-run", "--rules", DESYNC, "--state", "x.json", "--set", "nope=1"],
        ["replay", "--rules", DESYNC, "t.jsonl", "--format", "xml"],
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str]) -> None:
    code, _, err = cli(*argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dry-run", "--rules", DESYNC, "--state", "missing.json"],
         "missing.json: cannot read: No such file or directory"),
        (["replay", "--rules", "missing.yaml", "t.jsonl"],
         "missing.yaml: no such file or folder"),
        (["replay", "--rules", DESYNC, str(EXAMPLES / "stuck-follower.json")],
         "a timeline is JSON Lines (.jsonl): one snapshot per line; for one snapshot in a "
         ".json or .yaml file use dry-run --state"),
        (["dry-run", "--rules", DESYNC, "--state", str(EXAMPLES / "clean-session.jsonl")],
         "this is a timeline (JSON Lines); use `replay` for timelines"),
        (["replay", "--rules", DESYNC, str(EXAMPLES / "clean-session.jsonl"), "--load-state",
          DESYNC], "saved state is not JSON"),
    ],
)
def test_bad_input_is_a_clear_message_not_a_traceback(argv: list[str], message: str) -> None:
    code, _, err = cli(*argv)
    assert code == 1
    assert message in err
    assert "Traceback" not in err


def test_installed_command_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "copilink_rules", "replay", "--rules", DESYNC,
         str(EXAMPLES / "stuck-follower.jsonl")],
        capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["action"] for line in result.stdout.splitlines()] == [
        "flatten", "alert"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_replay_shows_progress_on_a_terminal_only(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    timeline = tmp_path / "long.jsonl"
    start = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    timeline.write_text("".join(
        json.dumps({"time": (start + timedelta(seconds=i)).isoformat(),
                    "accounts": [{"id": "LEAD", "role": "leader"}]}) + "\n"
        for i in range(1000)))
    monkeypatch.setattr(cli_module._Progress, "every", 0.0)
    out, err = io.StringIO(), _Terminal()
    assert run(["replay", "--rules", DESYNC, str(timeline)], out, err) == 0
    assert "\rreplaying: 500 snapshots, at 2026-03-02 14:38:19Z" in err.getvalue()
    assert "\rreplaying: 1,000 snapshots, at 2026-03-02 14:46:39Z" in err.getvalue()
    assert err.getvalue().endswith("\r\x1b[K")  # the line is cleared at the end
    assert "replaying" not in out.getvalue()
    code, _, plain_err = cli("replay", "--rules", DESYNC, str(timeline))
    assert (code, plain_err) == (0, "")
