"""Helpers to build snapshots and policies in tests without files where files add nothing."""

from __future__ import annotations

import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.engine import Engine
from copilink_rules.journal import Journal
from copilink_rules.model import Snapshot
from copilink_rules.rules import Policy, load_policy

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)  # Monday 09:30 New York


@pytest.fixture(autouse=True)
def _journals_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every journal a test opens is closed when it ends, even one the test leaves open (many
    tests drop a session's journal without closing it): an open SQLite connection left to the
    garbage collector is a ResourceWarning from Python 3.13, an error under `filterwarnings`.
    The product's own journals are closed where they are opened (cli.py's `finally` blocks,
    and a file refused as a journal in `Journal()` itself: tests/test_live.py)."""
    opened: list[Journal] = []
    real_init = Journal.__init__

    def init(self: Journal, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(Journal, "__init__", init)
    yield
    for journal in opened:
        journal.close()


@contextmanager
def hostile_file(text: str, name: str) -> Iterator[Path]:
    """`text` (any unicode, lone surrogates included) in a temporary file called `name`, for
    hypothesis tests of loaders; the file is removed afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        yield path


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def account(id_: str, role: str = "follower", **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": id_, "role": role}
    if role == "follower":
        data["leader"] = fields.pop("leader", "LEAD")
    data.update(fields)
    return data


def pos(instrument: str, qty: int, avg_price: float = 18000.0, **fields: Any) -> dict[str, Any]:
    return {"instrument": instrument, "qty": qty, "avg_price": avg_price, **fields}


def snap(time: datetime, *accounts: dict[str, Any], quotes: dict[str, Any] | None = None
         ) -> Snapshot:
    return Snapshot.model_validate({
        "time": time.isoformat(),
        "quotes": quotes if quotes is not None else
        {"NQH6": {"bid": 18000.0, "ask": 18000.25, "last": 18000.25}},
        "accounts": list(accounts),
    })


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[..., Path]:
    """Write a rule file from dedented YAML text; returns its path."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def policy_of(write_rules: Callable[..., Path]) -> Callable[..., Policy]:
    def make(text: str, overrides: dict[str, str] | None = None) -> Policy:
        return load_policy([write_rules(text)], overrides)

    return make


@pytest.fixture
def engine_of(policy_of: Callable[..., Policy]) -> Callable[..., Engine]:
    def make(text: str, overrides: dict[str, str] | None = None) -> Engine:
        return Engine(policy_of(text, overrides))

    return make


@pytest.fixture
def desync() -> Engine:
    return Engine(load_policy([REPO / "rules" / "desync.yaml"]))
