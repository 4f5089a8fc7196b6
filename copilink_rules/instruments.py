"""The contract catalog and symbol parsing for NinjaTrader, CME/Tradovate and ProjectX styles.

`MNQH6`, `MNQ 03-26` and `CON.F.US.MNQ.H26` are one contract; `MNQ` and `NQ` are one *family*
(one underlying), which is what hedging and exposure are counted over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, InstrumentError

MONTH_CODES = "FGHJKMNQUVXZ"  # January .. December

_NINJA = re.compile(r"^([A-Z0-9]{1,5}) (\d{2})-(\d{2})$")
# NinjaTrader also writes the display-month form in outgoing file names: `NQ JUN26`, `MNQ SEP26`
MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_NINJA_MONTH = re.compile(r"^([A-Z0-9]{1,5}) (" + "|".join(MONTH_NAMES) + r")(\d{2})$")
_PROJECTX = re.compile(r"^CON\.F\.US\.([A-Z0-9]{1,6})\.([FGHJKMNQUVXZ])(\d{2})$")
_CME = re.compile(r"^([A-Z0-9]{1,5}?)([FGHJKMNQUVXZ])(\d{1,2})$")
_ROOT = re.compile(r"^[A-Z][A-Z0-9]{0,4}$")


@dataclass(frozen=True, slots=True)
class ContractSpec:
    """One catalog row: a root symbol and its economics."""

    root: str
    name: str
    family: str
    size: float
    tick_size: float
    tick_value: float
    sector: str = "other"
    projectx: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Instrument:
    """A parsed contract. `symbol` is canonical (`NQH26`, or the bare root for no expiry).

    The spec's numbers are copied onto the instrument: the engine reads them every tick.
    """

    symbol: str
    spec: ContractSpec
    month: int | None = None
    year: int | None = None
    root: str = field(init=False)
    family: str = field(init=False)
    size: float = field(init=False)
    tick_size: float = field(init=False)
    tick_value: float = field(init=False)
    micro: bool = field(init=False)  # a fifth of the full size or smaller (MNQ, MES, SIL...)

    def __post_init__(self) -> None:
        spec = self.spec
        for name in ("root", "family", "size", "tick_size", "tick_value"):
            object.__setattr__(self, name, getattr(spec, name))
        object.__setattr__(self, "micro", spec.size <= 0.2)


def year_from_digits(digits: str) -> int:
    """Two digits are 20YY. One digit (CME style `H6`) is read within 2025..2034."""
    value = int(digits)
    if len(digits) == 2:
        return 2000 + value
    year = 2020 + value
    return year if year >= 2025 else year + 10


@dataclass
class Catalog:
    """Contract specs by root, plus ProjectX aliases; parses symbols of every supported style."""

    specs: dict[str, ContractSpec]
    _aliases: dict[str, str] = field(default_factory=dict)
    _parsed: dict[str, Instrument] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in self.specs.values():
            for alias in spec.projectx:
                self._aliases[alias] = spec.root

    @classmethod
    def from_rows(cls, rows: Any, source: str) -> Catalog:
        specs: dict[str, ContractSpec] = {}
        if not isinstance(rows, dict) or not isinstance(rows.get("instruments"), list):
            raise InputError(f"{source}: expected a mapping with an 'instruments:' list")
        for index, row in enumerate(rows["instruments"]):
            spec = _spec_from_row(row, f"{source}: instruments[{index}]")
            specs[spec.root] = spec
        return cls(specs)

    def extended(self, path: str | Path) -> Catalog:
        """This catalog plus (or overridden by) the user's entries in `path`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            rows = yaml.safe_load(text)
        except OSError as exc:
            raise InputError(f"{path}: cannot read instrument catalog: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML: {exc}") from None
        user = Catalog.from_rows(rows, str(path))
        return Catalog({**self.specs, **user.specs})

    def parse(self, symbol: str) -> Instrument:
        """Parse `NQH6`, `NQH26`, `NQ 03-26`, `NQ MAR26`, `CON.F.US.ENQ.H26` or a bare root."""
        cached = self._parsed.get(symbol)
        if cached is not None:
            return cached
        instrument = self._parse(symbol)
        self._parsed[symbol] = instrument
        return instrument

    def _parse(self, symbol: str) -> Instrument:
        if not isinstance(symbol, str) or not symbol.strip():
            raise InstrumentError(f"instrument symbol must be a non-empty string, got {symbol!r}")
        text = symbol.strip().upper()
        if match := _PROJECTX.match(text):
            root = self._aliases.get(match[1], match[1])
            return self._make(symbol, root, MONTH_CODES.index(match[2]) + 1, 2000 + int(match[3]))
        if match := _NINJA.match(text):
            month = int(match[2])
            if not 1 <= month <= 12:
                raise InstrumentError(f"instrument {symbol!r}: month {match[2]} is not 01..12")
            return self._make(symbol, match[1], month, 2000 + int(match[3]))
        if match := _NINJA_MONTH.match(text):
            return self._make(symbol, match[1], MONTH_NAMES.index(match[2]) + 1,
                              2000 + int(match[3]))
        if text in self.specs:
            return Instrument(text, self.specs[text])
        if (match := _CME.match(text)) and match[1] in self.specs:
            month = MONTH_CODES.index(match[2]) + 1
            return self._make(symbol, match[1], month, year_from_digits(match[3]))
        raise self._unknown(symbol, text)

    def _make(self, symbol: str, root: str, month: int, year: int) -> Instrument:
        spec = self.specs.get(root)
        if spec is None:
            raise self._unknown(symbol, root)
        canonical = f"{spec.root}{MONTH_CODES[month - 1]}{year % 100:02d}"
        return Instrument(canonical, spec, month, year)

    def _unknown(self, symbol: str, root: str) -> InstrumentError:
        return InstrumentError(
            f"unknown instrument {symbol!r}: root {root!r} is not in the catalog; "
            "use NQH6, NQ 03-26 or CON.F.US.ENQ.H26 style, or add the contract to a user "
            "catalog (--instruments FILE)"
        )


def ninjatrader_name(instrument: Instrument) -> str:
    """NinjaTrader's instrument name: `NQ 03-26` (the root alone for no expiry)."""
    if instrument.month is None or instrument.year is None:
        return instrument.root
    return f"{instrument.root} {instrument.month:02d}-{instrument.year % 100:02d}"


def cme_name(instrument: Instrument) -> str:
    """The CME / Tradovate contract name: `NQH6` (one year digit, as Tradovate writes it)."""
    if instrument.month is None or instrument.year is None:
        return instrument.root
    return f"{instrument.root}{MONTH_CODES[instrument.month - 1]}{instrument.year % 10}"


def projectx_id(instrument: Instrument) -> str:
    """The ProjectX contract id: `CON.F.US.ENQ.H26` (ProjectX's own root where it differs)."""
    root = instrument.spec.projectx[0] if instrument.spec.projectx else instrument.root
    if instrument.month is None or instrument.year is None:
        return f"CON.F.US.{root}"
    return f"CON.F.US.{root}.{MONTH_CODES[instrument.month - 1]}{instrument.year % 100:02d}"


def _spec_from_row(row: Any, where: str) -> ContractSpec:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a mapping, got {row!r}")
    known = {"root", "name", "family", "size", "tick_size", "tick_value", "sector", "projectx"}
    extra = sorted(set(row) - known)
    if extra:
        raise InputError(f"{where}: unknown field {extra[0]!r}; known: {', '.join(sorted(known))}")
    root = str(row.get("root", "")).upper()
    if not _ROOT.match(root):
        raise InputError(f"{where}: 'root' must be 1-5 letters/digits, got {row.get('root')!r}")
    numbers: dict[str, float] = {}
    for key in ("size", "tick_size", "tick_value"):
        value = row.get(key, 1.0 if key == "size" else None)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise InputError(f"{where} ({root}): {key!r} must be a positive number, got {value!r}")
        numbers[key] = float(value)
    aliases = row.get("projectx", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise InputError(f"{where} ({root}): 'projectx' must be a list of root symbols")
    return ContractSpec(
        root=root,
        name=str(row.get("name", root)),
        family=str(row.get("family", root)).upper(),
        size=numbers["size"],
        tick_size=numbers["tick_size"],
        tick_value=numbers["tick_value"],
        sector=str(row.get("sector", "other")),
        projectx=tuple(a.upper() for a in aliases),
    )


@cache
def default_catalog() -> Catalog:
    """The catalog shipped in the package (copilink_rules/data/instruments.yaml)."""
    text = resources.files("copilink_rules").joinpath("data/instruments.yaml").read_text("utf-8")
    return Catalog.from_rows(yaml.safe_load(text), "copilink_rules/data/instruments.yaml")
