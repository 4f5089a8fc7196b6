"""The contract catalog and the three symbol styles."""

from __future__ import annotations

from pathlib import Path

import pytest

from copilink_rules.errors import InputError, InstrumentError
from copilink_rules.instruments import default_catalog


@pytest.mark.parametrize(
    ("symbol", "canonical", "family", "micro"),
    [
        ("NQH6", "NQH26", "NQ", False),
        ("NQH26", "NQH26", "NQ", False),
        ("NQ 03-26", "NQH26", "NQ", False),
        ("CON.F.US.ENQ.H26", "NQH26", "NQ", False),
        ("MNQZ5", "MNQZ25", "NQ", True),
        ("MNQ 12-25", "MNQZ25", "NQ", True),
        ("CON.F.US.MNQ.Z25", "MNQZ25", "NQ", True),
        ("CON.F.US.EP.M26", "ESM26", "ES", False),
        ("MESU6", "MESU26", "ES", True),
        ("M2KH6", "M2KH26", "RTY", True),
        ("MHGN6", "MHGN26", "HG", True),
        ("QMF7", "QMF27", "CL", False),
        ("CON.F.US.GCE.Q26", "GCQ26", "GC", False),
        ("CON.F.US.MCLE.N26", "MCLN26", "CL", True),
        ("ZNH6", "ZNH26", "ZN", False),
        ("CON.F.US.TYA.H26", "ZNH26", "ZN", False),
        ("nqh6", "NQH26", "NQ", False),
        ("NQ", "NQ", "NQ", False),
        ("MYMZ4", "MYMZ34", "YM", True),  # one-digit years are read within 2025..2034
    ],
)
def test_symbols_of_every_style_parse_to_one_contract(symbol: str, canonical: str, family: str,
                                                      micro: bool) -> None:
    instrument = default_catalog().parse(symbol)
    assert (instrument.symbol, instrument.family, instrument.micro) == (canonical, family, micro)


def test_micro_and_mini_of_one_index_are_one_family_with_their_own_ticks() -> None:
    catalog = default_catalog()
    mini, micro = catalog.parse("NQ 03-26"), catalog.parse("MNQH6")
    assert mini.family == micro.family == "NQ"
    assert (mini.tick_size, mini.tick_value, micro.tick_value) == (0.25, 5.0, 0.5)
    assert micro.size == 0.1


@pytest.mark.parametrize(
    ("family", "tick_size", "tick_value"),
    [("ES", 0.25, 12.5), ("MES", 0.25, 1.25), ("YM", 1.0, 5.0), ("MYM", 1.0, 0.5),
     ("RTY", 0.1, 5.0), ("M2K", 0.1, 0.5), ("CL", 0.01, 10.0), ("MCL", 0.01, 1.0),
     ("GC", 0.1, 10.0), ("MGC", 0.1, 1.0)],
)
def test_catalog_matches_the_published_tick_sizes(family: str, tick_size: float,
                                                  tick_value: float) -> None:
    spec = default_catalog().specs[family]
    assert (spec.tick_size, spec.tick_value) == (tick_size, tick_value)


@pytest.mark.parametrize(
    ("symbol", "message"),
    [
        ("XYZH6", "unknown instrument 'XYZH6'"),
        ("NQ 13-26", "month 13 is not 01..12"),
        ("CON.F.US.FOO.H26", "root 'FOO' is not in the catalog"),
        ("", "non-empty string"),
        ("NQH", "unknown instrument 'NQH'"),
    ],
)
def test_unknown_symbols_are_a_clear_error(symbol: str, message: str) -> None:
    with pytest.raises(InstrumentError) as caught:
        default_catalog().parse(symbol)
    assert message in str(caught.value)
    assert "user catalog" in str(caught.value) or "month" in str(caught.value) or not symbol


def test_a_user_catalog_adds_contracts(tmp_path: Path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text("instruments:\n  - {root: M6E, family: 6E, size: 0.1, tick_size: 0.0001, "
                    "tick_value: 1.25, projectx: [M6E]}\n")
    catalog = default_catalog().extended(user)
    assert catalog.parse("M6EH6").family == "6E"
    assert catalog.parse("NQH6").family == "NQ"
    with pytest.raises(InstrumentError):
        default_catalog().parse("M6EH6")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("instruments:\n  - {root: M6E, tick_size: 0, tick_value: 1}\n",
         "'tick_size' must be a positive number"),
        ("instruments:\n  - {root: M6E, tick_size: 1, tick_value: 1, colour: red}\n",
         "unknown field 'colour'"),
        ("nothing: here\n", "expected a mapping with an 'instruments:' list"),
        ("instruments: [\n", "not valid YAML"),
    ],
)
def test_bad_user_catalogs_are_reported(tmp_path: Path, text: str, message: str) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(text)
    with pytest.raises(InputError, match=message):
        default_catalog().extended(user)
