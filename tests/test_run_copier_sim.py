"""`copilink-rules run --config` with `copier: builtin` on the sim broker, the sim's own copier
off, as a trader runs it: a separate process, the desync and firm rules, the journal and the
sim's state on disk. A session of trades is copied onto three followers — one at half ratio,
one micro, one at a firm with a lower contract limit — while the broker loses, strands and
refuses orders, a follower disconnects and a person clicks on another; the copier and the
desync rules together leave every follower where the leader is. Every check reads the sim's
own record (its saved state) or the journal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from copilink_rules.adapters.sim import SimBroker
from copilink_rules.instruments import default_catalog
from copilink_rules.journal import Journal

from .conftest import REPO

CONFIG = textwrap.dedent("""
    broker:
      name: sim
      settings:
        seed: 5
        trades:
          - {at: 2, side: long, qty: 2, hold: 14}
          - {at: 24, side: short, qty: 6, hold: 14}
          - {at: 46, side: long, qty: 4, hold: 14}
        faults:
          - {kind: missed_entry, account: F1, trade: 0}       # its copy of the entry is lost
          - {kind: reject, account: F1, at: 37, count: 1}     # its exit copy is refused
          - {kind: stuck_order, account: F2, at: 45}          # the entry copy never fills
          - {kind: manual_order, account: F3, at: 50, count: 6, side: sell}  # against the leader
          - {kind: disconnect, account: F1, at: 52, duration: 5}
    copier: builtin
    accounts:
      - {id: LEAD, role: leader, firm: apex, size: 50000}
      - {id: F1, role: follower, firm: apex, size: 50000, ratio: 0.5}
      - {id: F2, role: follower, firm: apex, size: 50000, instrument: MNQH6}
      - {id: F3, role: follower, firm: topstep, size: 50000}
    rules: [{rules}/desync.yaml, {rules}/firms/apex.yaml, {rules}/firms/topstep.yaml]
    params: {{catch_up_max_ticks: 40}}
    journal: journal.db
    kill_file: null
""")


def run_session(folder: Path) -> tuple[subprocess.CompletedProcess[str], SimBroker, Journal]:
    config = folder / "copilink.yaml"
    config.write_text(CONFIG.replace("{rules}", str(REPO / "rules"))
                      .replace("{{", "{").replace("}}", "}"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "copilink_rules", "run", "--config", str(config), "--no-view",
         "--speed", "25", "--duration", "80", "--sim-state", str(folder / "sim.json")],
        capture_output=True, text=True, timeout=120, cwd=folder, check=False)
    return done, SimBroker.load(folder / "sim.json"), Journal(folder / "journal.db")


def orders(broker: SimBroker, account: str) -> list[dict[str, Any]]:
    return [e for e in broker.log if e.get("account") == account and
            e.get("kind") in ("place_market", "flatten") and e["tag"].startswith("CLR-")]


def test_a_session_is_copied_onto_three_followers_and_every_fault_is_fixed(
        tmp_path: Path) -> None:
    done, broker, journal = run_session(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "copier: builtin" in done.stdout
    assert "Traceback" not in done.stderr
    catalog = default_catalog()
    # at the end every follower is where the leader is: flat
    assert {a.id: dict(a.positions) for a in broker.accounts.values()} == \
        {"LEAD": {}, "F1": {}, "F2": {}, "F3": {}}
    assert not [e for e in broker.log if e.get("account") == "LEAD" and
                e["tag"].startswith("CLR-")]  # never an order to the leader
    rows = journal.commands()
    copies = {(r.account, r.args.get("leader_equiv")): r for r in rows
              if r.action == "copy" and "qty" in r.args}
    # the micro follower trades micros only, ten for each NQ of the leader
    f2 = [e for e in orders(broker, "F2") if e.get("status") == "filled"]
    assert {catalog.parse(e["instrument"]).root for e in f2} == {"MNQ"}
    assert copies[("F2", 2.0)].args["qty"] == 20
    assert copies[("F2", -6.0)].args["qty"] == -60
    # the half-ratio follower: 6 short is copied as 3, 4 long as 2
    assert copies[("F1", -6.0)].args["qty"] == -3
    assert copies[("F1", 4.0)].args["qty"] == 2
    # the topstep 50K follower is cut to its limit of 5 when the leader sells 6
    cut = copies[("F3", -6.0)]
    assert cut.args["qty"] == -5
    assert cut.args["reduced_from"] == 6
    assert "topstep allows 5 contracts" in cut.args["reduced_because"]
    # the lost entry copy (F1, trade 0) is caught up by the rules, through the copier
    assert [r.status for r in rows if r.action == "catch_up" and r.account == "F1"] == \
        ["confirmed"]
    # the refused exit copy (F1, trade 1) and the exit it missed while paused after its
    # disconnect (trade 2): flattened by the rules each time
    assert [r.status for r in rows if r.action == "flatten" and r.account == "F1" and
            r.rule == "stuck-follower"] == ["confirmed", "confirmed"]
    assert journal.copying()["F1"][0] == "paused"  # account-unreachable paused it
    # the stranded entry copy on F2 is cancelled, never doubled beside it, and the rules
    # catch F2 up once it is final
    assert [r.status for r in rows if r.account == "F2" and r.action == "copy" and
            r.args.get("leader_equiv") == 4.0] == ["cancelled"]
    assert "confirmed" in [r.status for r in rows if r.action == "catch_up" and
                           r.account == "F2"]
    # the person's order against the leader on F3: flattened and F3's copying paused
    assert [r.status for r in rows if r.action == "flatten" and r.account == "F3" and
            r.rule == "opposite-position"] == ["confirmed"]
    assert journal.copying()["F3"][0] == "paused"
    # every order at the broker is in the journal, under its own tag, sent once
    tags = {r.tag for r in rows}
    sent = [e["tag"] for e in broker.log if e["tag"].startswith("CLR-") and
            e.get("kind") in ("place_market", "place_stop", "flatten")]
    assert len(sent) == len(set(sent))
    assert set(sent) <= tags
