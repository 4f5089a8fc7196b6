"""The built-in copier (copier.py `BuiltinCopier`) in a real session on a real journal, against
the recording fake broker, whose every request is on record: what it copies (ratio, micros,
max_qty, the firm's contract limit), what it refuses to copy (paused, disconnected, kill
switch, dry run), reversals, stops, the rules' pause/skip/catch-up, and restarts."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.adapters.base import AccountSpec, BrokerAnswer
from copilink_rules.adapters.fake import Call, FakeBroker
from copilink_rules.alerts import Alert, Alerts
from copilink_rules.cli import run as cli
from copilink_rules.copier import BuiltinCopier, FollowerCopy
from copilink_rules.enforcer import KillSwitch
from copilink_rules.journal import Journal
from copilink_rules.session import Session

from .conftest import REPO

DESYNC = REPO / "rules" / "desync.yaml"
APEX = REPO / "rules" / "firms" / "apex.yaml"

ACCOUNTS = [AccountSpec("LEAD", "leader", firm="apex", size=50000),
            AccountSpec("F1", "follower", "LEAD", firm="apex", size=50000),
            AccountSpec("F2", "follower", "LEAD", instrument="MNQH6"),
            AccountSpec("F3", "follower", "LEAD", ratio=0.5)]
FOLLOWERS = [FollowerCopy("F1", "LEAD"), FollowerCopy("F2", "LEAD", instrument="MNQH6"),
             FollowerCopy("F3", "LEAD", ratio=0.5)]


class Crash(BaseException):
    """The process dies here (not an Exception: nothing catches it)."""


class Desk:
    """A fake broker, a journal, a session with the built-in copier; `tick()` moves 0.25 s."""

    def __init__(self, folder: Path, followers: list[FollowerCopy] | None = None,
                 rules: list[Path] | None = None, fake: FakeBroker | None = None,
                 **options: Any) -> None:
        self.folder = folder
        self.fake = fake or FakeBroker(ACCOUNTS)
        self.journal = Journal(folder / "journal.db")
        self.alerts: list[Alert] = []
        self.copier = BuiltinCopier(self.fake, self.journal, followers or FOLLOWERS)
        self.session = Session(self.fake, self.journal, Alerts(terminal=self.alerts.append),
                               rules or [DESYNC], rules_path=[REPO / "rules"],
                               copier=self.copier, before_tick=lambda: self.fake.advance(0.25),
                               **options)
        self.notes = self.session.start()
        self.tick()  # the copier's first look: what is open at start is the rules'

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.session.tick()

    def lead(self, qty: int, instrument: str = "NQH6") -> None:
        self.fake.set_position("LEAD", instrument, qty)

    def sent(self, account: str) -> list[Call]:
        """Orders and closes the engine or the copier sent to `account`."""
        return [c for c in self.fake.calls if c.account == account and
                c.method in ("place_order", "close_position") and c.tag.startswith("CLR-")]

    def held(self, account: str) -> dict[str, int]:
        return {s: q for s, (q, _) in self.fake.positions[account].items()}

    def rows(self, action: str = "copy", account: str | None = None) -> list[Any]:
        return [r for r in self.journal.commands() if r.action == action and
                (account is None or r.account == account)]


def market(calls: list[Call]) -> list[tuple[str, str, int]]:
    return [(c.instrument or "", str(c.args["side"]), int(c.args["qty"])) for c in calls
            if c.method == "place_order" and c.args["type"] == "market"]


# --- what it copies ------------------------------------------------------------------------


def test_entry_add_and_exit_are_copied_onto_each_follower_in_its_own_contract(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path)
    desk.lead(2)
    desk.tick()
    assert market(desk.sent("F1")) == [("NQH6", "buy", 2)]
    assert market(desk.sent("F2")) == [("MNQH6", "buy", 20)]  # NQ copied as micros, x10
    assert market(desk.sent("F3")) == [("NQH6", "buy", 1)]  # half ratio
    desk.lead(4)  # the leader adds 2
    desk.tick()
    assert market(desk.sent("F1"))[1:] == [("NQH6", "buy", 2)]
    assert market(desk.sent("F2"))[1:] == [("MNQH6", "buy", 20)]
    assert market(desk.sent("F3"))[1:] == [("NQH6", "buy", 1)]
    assert desk.held("F1") == {"NQH6": 4}
    assert desk.held("F2") == {"MNQH6": 40}
    assert desk.held("F3") == {"NQH6": 2}
    desk.lead(0)
    desk.tick(2)
    for follower in ("F1", "F2", "F3"):
        assert desk.sent(follower)[-1].method == "close_position"
        assert desk.held(follower) == {}
    tags = [c.tag for c in desk.fake.calls if c.tag.startswith("CLR-")]
    assert len(tags) == len(set(tags)) == 9  # one tag per copied order
    assert not desk.sent("LEAD")
    assert all(r.status == "confirmed" for r in desk.rows())
    desk.tick(20)  # in sync: nothing more is sent, no rule fires
    assert len([c for c in desk.fake.calls if c.tag.startswith("CLR-")]) == 9


def test_a_copy_is_cut_to_the_followers_firm_contract_limit(tmp_path: Path) -> None:
    desk = Desk(tmp_path, rules=[APEX])
    desk.lead(12)  # an Apex 50K allows 10 contracts
    desk.tick()
    assert market(desk.sent("F1")) == [("NQH6", "buy", 10)]
    row = desk.rows(account="F1")[0]
    assert row.args["reduced_from"] == 12
    assert "reduced from 12 to 10" in row.args["reduced_because"]


def test_max_qty_caps_the_follower_in_its_own_contracts(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F2", "LEAD", instrument="MNQH6",
                                                  max_qty=15)])
    desk.lead(3)
    desk.tick()
    assert market(desk.sent("F2")) == [("MNQH6", "buy", 15)]
    desk.lead(1)  # target 10 of at most 15: it sells 5
    desk.tick()
    assert market(desk.sent("F2"))[1:] == [("MNQH6", "sell", 5)]


def test_a_reversal_is_a_close_then_an_entry_never_one_order_through_zero(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.lead(2)
    desk.tick()
    desk.lead(-2)
    desk.tick()
    assert [c.method for c in desk.sent("F1")] == ["place_order", "close_position"]
    assert desk.held("F1") == {}
    desk.tick()  # the close shows: now the entry on the other side
    assert market(desk.sent("F1")) == [("NQH6", "buy", 2), ("NQH6", "sell", 2)]
    assert desk.held("F1") == {"NQH6": -2}


def test_a_second_change_waits_for_the_copy_still_working(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.fake.fills = "held"  # accepted, working until released
    desk.lead(1)
    desk.tick()
    desk.lead(3)
    desk.tick(3)
    assert market(desk.sent("F1")) == [("NQH6", "buy", 1)]  # never a second beside it
    desk.fake.fills = "now"
    desk.fake.release()
    desk.tick(2)
    assert market(desk.sent("F1")) == [("NQH6", "buy", 1), ("NQH6", "buy", 2)]
    assert desk.held("F1") == {"NQH6": 3}


def test_a_copy_working_too_long_is_cancelled_and_not_doubled(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.fake.fills = "held"
    desk.lead(1)
    desk.tick(19)  # under the copier's 5 s: it waits
    assert [c.method for c in desk.fake.calls if c.account == "F1"] == ["place_order"]
    desk.fake.fills = "now"
    desk.tick(12)
    # asked about by tag, still working: cancelled first; only once it is final do the
    # rules catch the follower up (through the copier) — one contract, never two
    assert [c.method for c in desk.fake.calls if c.account == "F1"] == \
        ["place_order", "cancel_order", "place_order"]
    assert desk.rows(account="F1")[0].status == "cancelled"
    # (the rule's first catch-up was held back while the copy worked: journaled as blocked)
    assert [r.status for r in desk.rows("catch_up", "F1")] == ["blocked", "confirmed"]
    assert desk.held("F1") == {"NQH6": 1}


# --- what it does not copy -----------------------------------------------------------------


def test_a_paused_follower_gets_nothing_and_resume_copies_from_the_next_change(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    out = io.StringIO()
    assert cli(["pause", "F1", "--journal", str(tmp_path / "journal.db")], out,
               io.StringIO()) == 0
    assert "copying onto F1 paused" in out.getvalue()
    desk.tick()
    desk.lead(1)
    desk.tick(8)
    assert desk.sent("F1") == []
    assert desk.rows(account="F1")[0].status == "not_copied"
    assert "paused" in (desk.rows(account="F1")[0].reason or "")
    snapshot = desk.session.last_snapshot
    assert snapshot is not None
    assert {a.id: a.copier for a in snapshot.accounts}["F1"] == "paused"  # the rules see it
    out = io.StringIO()
    assert cli(["resume", "F1", "--journal", str(tmp_path / "journal.db")], out,
               io.StringIO()) == 0
    assert "resumes" in out.getvalue()
    assert "it was paused" in out.getvalue()
    err = io.StringIO()  # a typo is named, not "resumed"
    assert cli(["resume", "F9", "--journal", str(tmp_path / "journal.db")], io.StringIO(),
               err) != 0
    assert "has never met an account by that name; it knows: F1" in err.getvalue()
    desk.tick(2)
    assert desk.sent("F1") == []  # not a late entry by the copier: that is the rules' call
    desk.lead(2)  # the next change: the follower is brought to the leader's position
    desk.tick()
    assert market(desk.sent("F1")) == [("NQH6", "buy", 2)]


def test_a_pause_by_a_rule_survives_a_restart(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    assert desk.copier.pause("F1", "CLR-x").status == "filled"
    desk.journal.close()
    again = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")], fake=desk.fake)
    assert any("copying paused onto F1" in note for note in again.notes)
    again.lead(1)
    again.tick(2)
    assert again.sent("F1") == []


def test_a_disabled_follower_is_never_copied_onto(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD", enabled=False)])
    desk.lead(1)
    desk.tick(2)
    assert desk.sent("F1") == []
    assert "disabled" in (desk.rows(account="F1")[0].reason or "")


def test_no_copy_to_a_disconnected_follower(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.fake.connected["F1"] = False
    desk.lead(1)
    desk.tick(2)
    assert desk.sent("F1") == []
    assert "disconnected" in (desk.rows(account="F1")[0].reason or "")


def test_the_kill_switch_stops_every_copy(tmp_path: Path) -> None:
    kill = KillSwitch()
    kill.engage("test")
    desk = Desk(tmp_path, kill_switch=kill)
    desk.lead(1)
    desk.tick(2)
    assert [c for c in desk.fake.calls if c.tag.startswith("CLR-")] == []


def test_a_dry_run_journals_the_copies_and_sends_nothing(tmp_path: Path) -> None:
    desk = Desk(tmp_path, dry_run=True)
    desk.lead(1)
    desk.tick(2)
    assert [c for c in desk.fake.calls if c.tag.startswith("CLR-")] == []
    assert {r.account for r in desk.rows() if r.status == "dry_run"} == {"F1", "F2", "F3"}


def test_skip_entry_holds_for_the_rest_of_the_leader_trade(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.fake.connected["F1"] = False  # misses the entry
    desk.lead(1)
    desk.tick()
    desk.fake.connected["F1"] = True
    assert desk.copier.skip_entry("F1", "NQH6", "CLR-skip").ok
    desk.lead(2)  # the leader adds within the skipped trade
    desk.tick(2)
    desk.lead(0)
    desk.tick(2)
    assert desk.sent("F1") == []
    desk.lead(1)  # the next trade is copied
    desk.tick()
    assert market(desk.sent("F1")) == [("NQH6", "buy", 1)]


# --- the rules and the copier together ------------------------------------------------------


def test_a_refused_copy_is_not_retried_and_the_rules_catch_up_through_the_copier(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.fake.script("F1", BrokerAnswer("rejected", "insufficient margin"))
    desk.lead(1)
    desk.tick()
    assert any("refused the copy" in a.message for a in desk.alerts)
    desk.tick(4)
    assert len(market(desk.sent("F1"))) == 1  # the copier does not chase it
    desk.tick(12)  # missed_entry_grace 3 s: the rule decides, the copier sends it
    catch_up = desk.rows("catch_up", "F1")
    assert [r.status for r in catch_up] == ["confirmed"]
    assert market(desk.sent("F1")) == [("NQH6", "buy", 1), ("NQH6", "buy", 1)]
    assert desk.held("F1") == {"NQH6": 1}
    desk.tick(8)
    assert len(market(desk.sent("F1"))) == 2  # in sync: nothing more


def test_a_follower_stuck_after_a_lost_exit_is_flattened_by_the_rules(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.lead(1)
    desk.tick()
    desk.fake.script("F1", BrokerAnswer("unavailable", "timeout"))  # the exit is lost
    desk.lead(0)
    desk.tick(16)  # stuck_grace 2 s, the copier's own order asked about first
    assert desk.held("F1") == {}
    flatten = desk.rows("flatten", "F1")
    assert len(flatten) == 1
    assert flatten[0].status == "confirmed"


def test_an_opposite_follower_is_flattened_and_paused_in_the_copier(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.lead(1)
    desk.tick()
    desk.fake.set_position("F1", "NQH6", -1)  # a person clicked on the follower
    desk.tick(12)
    assert desk.held("F1") == {}
    assert desk.copier.paused.get("F1")
    assert desk.journal.copying()["F1"][0] == "paused"
    desk.lead(2)
    desk.tick(2)
    assert market(desk.sent("F1")) == [("NQH6", "buy", 1)]  # the entry only, then paused


# --- stops ------------------------------------------------------------------------------------


def test_the_leaders_stop_is_mirrored_moved_and_cancelled(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD"),
                                     FollowerCopy("F2", "LEAD", instrument="MNQH6")])
    fake = desk.fake
    desk.lead(2)
    desk.tick()
    fake.place_order("LEAD", "NQH6", "sell", 2, "stop", "L-1", 17980.0)
    desk.tick()
    stops = {c.account: (c.args["qty"], c.args["stop_price"]) for c in fake.calls
             if c.method == "place_order" and c.args["type"] == "stop" and c.account != "LEAD"}
    assert stops == {"F1": (2, 17980.0), "F2": (20, 17980.0)}
    leader_stop = next(o for o in fake.orders.values() if o.tag == "L-1")
    leader_stop.state = "cancelled"  # the leader moves the stop up
    fake.place_order("LEAD", "NQH6", "sell", 2, "stop", "L-2", 17990.0)
    desk.tick(2)
    working = sorted((o.account, o.qty, o.stop_price) for o in fake.orders.values()
                     if o.state == "working" and o.account != "LEAD")
    assert working == [("F1", 2, 17990.0), ("F2", 20, 17990.0)]
    next(o for o in fake.orders.values() if o.tag == "L-2").state = "cancelled"
    desk.tick(2)
    assert not [o for o in fake.orders.values() if o.state == "working" and
                o.account != "LEAD"]
    assert {r.status for r in desk.rows("copy_stop_cancel")} == {"confirmed"}


def test_copy_stops_false_leaves_the_followers_stops_alone(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD", copy_stops=False)])
    desk.lead(1)
    desk.tick()
    desk.fake.place_order("LEAD", "NQH6", "sell", 1, "stop", "L-1", 17980.0)
    desk.tick(3)
    assert not [c for c in desk.fake.calls if c.account == "F1" and c.args.get("type") == "stop"]


# --- restarts ---------------------------------------------------------------------------------


def crash_on(fake: FakeBroker, account: str, *, after: bool) -> Callable[[], None]:
    """The next order to `account` kills the process before or after the broker has it."""
    real = fake.place_order

    def place(*args: Any, **kwargs: Any) -> BrokerAnswer:
        if args[0] != account:
            return real(*args, **kwargs)
        fake.place_order = real  # type: ignore[method-assign]
        if after:
            real(*args, **kwargs)
        raise Crash

    fake.place_order = place  # type: ignore[method-assign]
    return lambda: setattr(fake, "place_order", real)


@pytest.mark.parametrize("after", [True, False], ids=["broker-has-it", "never-sent"])
def test_a_crash_around_a_copy_never_sends_it_twice_nor_loses_it(tmp_path: Path,
                                                                  after: bool) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    crash_on(desk.fake, "F1", after=after)
    desk.lead(2)
    with pytest.raises(Crash):
        desk.tick()
    desk.journal.close()  # the process is gone; a new one starts on the same journal
    again = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")], fake=desk.fake)
    again.tick(4)
    assert again.held("F1") == {"NQH6": 2}
    orders = [c for c in again.fake.calls if c.account == "F1" and c.method == "place_order"]
    assert len(orders) == 1  # at the broker: exactly one, whether or not it had the first
    statuses = [r.status for r in again.rows(account="F1")]
    # the one the broker never had is found out at the restart and sent again
    assert statuses == (["confirmed"] if after else ["lost", "confirmed"])


# --- configuration and the command line -------------------------------------------------------


def write(folder: Path, text: str) -> Path:
    path = folder / "copilink.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_resume_names_the_follower_and_the_journal_it_needs(tmp_path: Path) -> None:
    config = write(tmp_path, "copier: builtin\naccounts:\n  - {id: LEAD, role: leader}\n"
                   "  - {id: F1, role: follower}\n  - {id: F3, role: follower}\n")
    err = io.StringIO()
    assert cli(["resume", "F4", "--config", str(config)], io.StringIO(), err) != 0
    assert "'F4' is not a follower" in err.getvalue()
    assert "F1, F3" in err.getvalue()
    err = io.StringIO()
    assert cli(["resume", "F3", "--config", str(config)], io.StringIO(), err) != 0
    assert "no journal there yet" in err.getvalue()
    external = write(tmp_path, "broker: {name: fake}\ncopier: external\naccounts:\n"
                     "  - {id: LEAD, role: leader}\n  - {id: F1, role: follower}\n")
    err = io.StringIO()
    assert cli(["resume", "F1", "--config", str(external)], io.StringIO(), err) != 0
    assert "works for copier: builtin" in err.getvalue()
    default_sim = write(tmp_path, "accounts:\n  - {id: LEAD, role: leader}\n"
                        "  - {id: F1, role: follower}\n")  # the sim's own copier by default
    err = io.StringIO()
    assert cli(["resume", "F1", "--config", str(default_sim)], io.StringIO(), err) != 0
    assert "copier is sim: resume works for copier: builtin" in err.getvalue()
    disabled = write(tmp_path, "copier: builtin\naccounts:\n  - {id: LEAD, role: leader}\n"
                     "  - {id: F1, role: follower, enabled: false}\n")
    err = io.StringIO()
    assert cli(["resume", "F1", "--config", str(disabled)], io.StringIO(), err) != 0
    assert "F1 has enabled: false" in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_copier_settings_belong_to_followers(tmp_path: Path) -> None:
    config = write(tmp_path, "copier: builtin\naccounts:\n  - {id: LEAD, role: leader}\n"
                   "  - {id: F1, role: follower, max_qty: 0}\n"
                   "  - {id: F2, role: follower, copy_stop: true}\n")
    err = io.StringIO()
    assert cli(["validate", "--config", str(config)], io.StringIO(), err) != 0
    assert err.getvalue().splitlines() == [
        f"{config}:4: accounts[1].max_qty: Input should be greater than or equal to 1",
        f"{config}:5: accounts[2].copy_stop: unknown field (did you mean 'copy_stops'?)"]
    config = write(tmp_path, "copier: builtin\naccounts:\n  - {id: LEAD, role: leader, "
                   "max_qty: 3}\n  - {id: F1, role: follower}\n")
    err = io.StringIO()
    assert cli(["validate", "--config", str(config)], io.StringIO(), err) != 0
    assert f"{config}:3: accounts[0].max_qty: a copier setting of followers" in err.getvalue()


def test_the_live_view_shows_a_paused_follower_and_how_to_resume_it(tmp_path: Path) -> None:
    from rich.console import Console

    from copilink_rules.view import render

    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.copier.pause("F1", "CLR-x")
    desk.tick()
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render(desk.session))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "paused" in text
    assert f"copilink-rules resume <follower> --journal {tmp_path / 'journal.db'}" in text


def test_nothing_is_copied_from_a_leader_whose_data_is_not_current(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.fake.connected["LEAD"] = False  # its data freezes
    desk.lead(1)
    desk.tick(4)
    assert desk.sent("F1") == []
    assert desk.rows() == []  # not even a decision not to copy: it waits for the leader


def test_an_entry_for_a_follower_that_missed_the_start_is_priced_by_the_gate(
        tmp_path: Path) -> None:
    # the rules are slow here, so only the copier acts
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")],
                overrides={"missed_entry_grace": "60s", "disconnect_grace": "60s"})
    desk.fake.connected["F1"] = False
    desk.fake.set_position("LEAD", "NQH6", 1, 17990.0)  # 40 ticks below the market
    desk.tick(2)
    desk.fake.connected["F1"] = True
    desk.tick(2)
    desk.fake.set_position("LEAD", "NQH6", 2, 17990.0)  # the leader adds
    desk.tick()
    assert desk.sent("F1") == []  # 2 contracts now would be a late entry 40 ticks away
    row = desk.rows(account="F1")[-1]
    assert row.status == "blocked"
    assert "late entry" in (row.reason or "")


def test_a_dry_run_reversal_is_journaled_once_not_every_tick(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")], dry_run=True)
    desk.fake.set_position("F1", "NQH6", 2)  # as if copied
    desk.lead(2)
    desk.tick()
    desk.lead(-2)
    desk.tick(6)
    dry = [r for r in desk.rows(account="F1") if r.status == "dry_run"]
    assert [r.args.get("close") for r in dry] == [True]
    assert [c for c in desk.fake.calls if c.tag.startswith("CLR-")] == []


def test_copied_stops_together_never_close_more_than_is_held(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F3", "LEAD", ratio=0.5)])
    fake = desk.fake
    desk.lead(3)
    desk.tick()
    assert desk.held("F3") == {"NQH6": 2}  # 1.5 rounds to 2
    for index in range(3):  # three 1-lot stops of the leader, each "at least 1" on F3
        fake.place_order("LEAD", "NQH6", "sell", 1, "stop", f"L-{index}", 17980.0 - index)
    desk.tick(2)
    stops = [o.qty for o in fake.orders.values() if o.account == "F3" and o.type == "stop"
             and o.state == "working"]
    assert sum(stops) == 2


# --- found by the red-team pass ---------------------------------------------------------------


def test_two_families_copied_in_one_tick_stay_within_the_firms_limit_together(
        tmp_path: Path) -> None:
    fake = FakeBroker([AccountSpec("LEAD", "leader", firm="apex", size=50000),
                       AccountSpec("F1", "follower", "LEAD", firm="apex", size=25000)])
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")], rules=[APEX], fake=fake)
    desk.lead(3, "NQH6")
    desk.lead(3, "ESH6")  # an Apex 25K allows 4 contracts in all
    desk.tick()
    assert sum(abs(q) for q in desk.held("F1").values()) == 4


def test_a_copied_stop_placed_just_before_a_crash_is_not_doubled(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.lead(2)
    desk.tick()
    desk.fake.place_order("LEAD", "NQH6", "sell", 2, "stop", "L-1", 17980.0)
    real = desk.fake.place_order

    def place_then_die(*args: Any, **kwargs: Any) -> BrokerAnswer:
        if args[0] == "F1" and args[4] == "stop":
            real(*args, **kwargs)
            raise Crash
        return real(*args, **kwargs)

    desk.fake.place_order = place_then_die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        desk.tick()
    desk.fake.place_order = real  # type: ignore[method-assign]
    desk.journal.close()
    again = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")], fake=desk.fake)
    again.tick(3)
    working = [o.qty for o in again.fake.orders.values() if o.account == "F1" and
               o.type == "stop" and o.state == "working"]
    assert working == [2]


def test_a_moved_stop_is_not_placed_while_the_old_ones_cancel_goes_unanswered(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    fake = desk.fake
    desk.lead(2)
    desk.tick()
    fake.place_order("LEAD", "NQH6", "sell", 2, "stop", "L-1", 17980.0)
    desk.tick(2)
    next(o for o in fake.orders.values() if o.tag == "L-1").state = "cancelled"
    fake.place_order("LEAD", "NQH6", "sell", 2, "stop", "L-2", 17990.0)
    fake.script("F1", BrokerAnswer("unavailable", "timeout"))  # the cancel of the old stop
    desk.tick()

    def working() -> list[float | None]:
        return [o.stop_price for o in fake.orders.values() if o.account == "F1" and
                o.type == "stop" and o.state == "working"]

    assert working() == [17980.0]  # never two stops against 2 contracts
    desk.tick(2)  # the cancel goes through next time: the stop moves
    assert working() == [17990.0]


def test_an_entry_made_while_the_leaders_data_was_stale_is_priced_as_late(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")],
                overrides={"missed_entry_grace": "60s", "disconnect_grace": "60s"})
    desk.fake.connected["LEAD"] = False
    desk.tick(24)  # 6 s: its data goes stale
    desk.fake.set_position("LEAD", "NQH6", 2, 17990.0)  # it entered 40 ticks from the market
    desk.fake.connected["LEAD"] = True
    desk.tick(2)
    assert desk.sent("F1") == []
    assert "late entry" in (desk.rows(account="F1")[-1].reason or "")


def test_a_catch_up_keeps_to_the_followers_max_qty(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD", max_qty=2)])
    desk.fake.script("F1", BrokerAnswer("rejected", "busy"))  # the copy of 2 is refused
    desk.lead(5)
    desk.tick(16)  # the rules catch up: at most 2
    catch_up = desk.rows("catch_up", "F1")
    assert [r.args["qty"] for r in catch_up] == [2]
    assert catch_up[0].args["reduced_from"] == 5
    assert desk.held("F1") == {"NQH6": 2}


def test_a_reduction_waits_for_fresh_data_rather_than_cross_zero(tmp_path: Path) -> None:
    import datetime as dt

    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")],
                overrides={"stuck_grace": "60s"})
    desk.lead(2)
    desk.tick(2)
    frozen = next(a for a in desk.fake.snapshot().accounts if a.id == "F1")  # long 2
    real = desk.fake.snapshot

    def lagging() -> Any:  # F1's feed lags 3 s: it still shows long 2
        now = real()
        late = frozen.model_copy(update={"updated_at": now.time - dt.timedelta(seconds=3)})
        return now.model_copy(update={"accounts": tuple(
            late if a.id == "F1" else a for a in now.accounts)})

    desk.fake.snapshot = lagging  # type: ignore[method-assign]
    desk.fake.set_position("F1", "NQH6", 0)  # in truth F1 is flat already
    desk.lead(1)
    desk.tick(2)
    assert market(desk.sent("F1")) == [("NQH6", "buy", 2)]  # no "sell 1" into a short
    desk.fake.snapshot = real  # type: ignore[method-assign]
    desk.fake.set_position("F1", "NQH6", 2)
    desk.tick()
    assert market(desk.sent("F1"))[1:] == [("NQH6", "sell", 1)]  # fresh data: it reduces


def test_a_copier_failure_is_one_alert_not_one_a_tick(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])

    def broken(snapshot: Any) -> None:
        raise RuntimeError("boom")

    desk.copier.sync = broken  # type: ignore[method-assign]
    desk.tick(12)
    assert len([a for a in desk.alerts if "copier: RuntimeError: boom" in a.message]) == 1


def test_between_rule_ticks_the_copier_copies_what_the_broker_pushed(tmp_path: Path) -> None:
    import threading
    import time

    from copilink_rules.scheduler import LiveRunner

    fake = FakeBroker(ACCOUNTS[:2])
    fake.live = True  # its clock is the wall clock, as a real broker's
    journal = Journal(tmp_path / "journal.db")
    copier = BuiltinCopier(fake, journal, [FollowerCopy("F1", "LEAD")])
    session = Session(fake, journal, Alerts(), [DESYNC], copier=copier)
    session.start()
    copied = threading.Event()
    runner = LiveRunner(session, tick_seconds=30.0, copy_seconds=0.05, reload_every=0,
                        should_stop=copied.is_set)

    def trade() -> None:
        time.sleep(0.3)  # the copier has had its first look: the leader was flat
        fake.set_position("LEAD", "NQH6", 2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not fake.positions["F1"]:
            time.sleep(0.01)
        copied.set()
        runner.stop()

    thread = threading.Thread(target=trade)
    thread.start()
    runner.run(install_signals=False)
    thread.join()
    assert session.ticks == 0  # no rule tick yet (30 s): the copy came from the copier's job
    assert fake.positions["F1"] == {"NQH6": (2, fake.price)}
    assert [r.status for r in journal.commands() if r.action == "copy"] in (
        ["pending"], ["confirmed"])


def test_copy_every_is_checked_at_load(tmp_path: Path) -> None:
    config = write(tmp_path, "copier: builtin\ncopy_every: 5ms\n")
    err = io.StringIO()
    assert cli(["validate", "--config", str(config)], io.StringIO(), err) != 0
    assert f"{config}:2: copy_every: copy_every must be between 20ms and 60s" in err.getvalue()


def test_an_entry_the_leader_made_while_we_were_down_is_priced_as_late(
        tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")],
                overrides={"missed_entry_grace": "60s"})
    desk.tick(2)
    desk.journal.close()  # copilink-rules stops; meanwhile the leader enters, 40 ticks away
    desk.fake.set_position("LEAD", "NQH6", 2, 17990.0)
    again = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")], fake=desk.fake,
                 overrides={"missed_entry_grace": "60s"})
    again.tick(2)
    assert again.sent("F1") == []
    assert "late entry" in (again.rows(account="F1")[-1].reason or "")


def test_the_copiers_bookkeeping_is_saved_whenever_it_changes(tmp_path: Path) -> None:
    desk = Desk(tmp_path, followers=[FollowerCopy("F1", "LEAD")])
    desk.lead(1)
    desk.tick()
    assert desk.journal.copier_state()["synced"] == {"F1|NQ": 1.0}  # type: ignore[index]
    desk.lead(2)
    desk.tick()
    assert desk.journal.copier_state()["synced"] == {"F1|NQ": 2.0}  # type: ignore[index]
