"""Reading YAML and JSON the way a trader means it, remembering the line of every value.

PyYAML follows YAML 1.1, where `flat_by: 16:59` is the integer 1019 and `no` is False. A rule file
is not the place for such surprises, so our loader resolves only YAML 1.2 core scalars: `true` /
`false`, decimal numbers, `null`; times and dates stay strings. Duplicate keys are an error
(PyYAML would keep the last one silently).

Hostile documents are refused with a located message instead of being expanded: aliases that
would expand to more than MAX_ALIAS_VALUES values ("billion laughs"), an alias inside its own
anchor (an endless structure), integers longer than MAX_INT_DIGITS digits. A syntax error says
what to check (a quote not closed, a tab used for indentation, the indentation); text echoed back
in a message is clipped to MAX_ECHO characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

MAX_ALIAS_VALUES = 100_000  # values that aliases (*name) may add to one document
MAX_INT_DIGITS = 100  # a whole number longer than this is a typo or an attack, never a limit
MAX_ECHO = 200  # characters of the user's text repeated in one message


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """`text`, cut to `limit` characters with an ellipsis: what a message may echo back."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def echo(value: Any, limit: int = MAX_ECHO) -> str:
    """repr(value) for a message, clipped (a 1 MB value is shown as its first 200 chars)."""
    return clip(repr(value), limit)


class _Refused(yaml.MarkedYAMLError):
    """A well-formed document we refuse to expand; its message needs no syntax hint."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars, duplicate-key detection and bounded aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to, aliases included
        self._aliased = 0  # values added by the aliases composed so far

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            node = self.anchors.get(event.anchor)
            if node is not None:
                if not isinstance(node, yaml.ScalarNode) and node.end_mark is None:
                    raise _Refused(None, None, f"the alias *{clip(str(event.anchor), 40)} is "
                                   "inside its own anchor, which makes an endless structure",
                                   event.start_mark)
                self._aliased += _expanded_size(node, self._sizes)
                if self._aliased > MAX_ALIAS_VALUES:
                    raise _Refused(None, None, "aliases (*name) expand this document to more "
                                   f"than {MAX_ALIAS_VALUES:,} values; a document that grows "
                                   "like this (a \"billion laughs\") is refused",
                                   event.start_mark)
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number with {digits} digits is too long (at most "
                f"{MAX_INT_DIGITS})", node.start_mark)
        try:
            return int(super().construct_yaml_int(node))
        except ValueError as exc:  # an explicit `!!int` tag on something else
            raise yaml.constructor.ConstructorError(
                None, None, f"not a whole number: {echo(node.value)} ({clip(str(exc), 80)})",
                node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged keys may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, dict | list):  # `{a: 1}: x` or `? [a, b]`: valid YAML, no key
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a single value, not a mapping or a list",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {echo(key)} (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?[0-9]+$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?[0-9]+[eE][-+]?[0-9]+$",
        "-+0123456789.",
    ),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),  # `<<: *anchor` merges a mapping
):
    _StrictLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias in it is expanded (memoised)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    total = 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            total += _expanded_size(key, sizes) + _expanded_size(value, sizes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            total += _expanded_size(item, sizes)
    sizes[id(node)] = total
    return total


def _syntax_hint(exc: yaml.MarkedYAMLError, text: str) -> tuple[str, int | None]:
    """What a person should check for a YAML syntax error, and the line to look at."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = str(exc.problem or exc.context or "")
    context = str(exc.context or "")
    lines = text.splitlines()
    nearby = lines[max(line - 2, 0):line] if line is not None else []
    if "'\\t'" in problem or any(re.match(r"^ *\t", row) for row in nearby):
        return "a tab is used for indentation: indent with spaces only", line
    if "quoted scalar" in context and "end of stream" in problem:
        start = exc.context_mark.line + 1 if exc.context_mark is not None else line
        return "a quote (\" or ') opened on this line is never closed", start
    if "mapping values are not allowed" in problem:
        return ("check the indentation, and put text that contains ': ' in quotes", line)
    if "expected ',' or ']'" in problem or "expected ',' or '}'" in problem:
        return ("a [ or { is not closed, or an item in it needs quotes", line)
    if "could not find expected ':'" in problem:
        return "a key needs ': ' after it, or a quote is missing", line
    if "<block end>" in problem or "expected key" in problem or "document start" in problem:
        return ("check the indentation: the keys of one mapping, and the items (- ...) of one "
                "list, must start in the same column", line)
    if "undefined alias" in problem:
        return "an alias *name needs an anchor &name earlier in the file", line
    return ("check this line and the one before for a missing quote, a bracket that is not "
            "closed, or a tab used for indentation", line)


class YamlSyntaxError(ValueError):
    """The text is not YAML; `line` is 1-based."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


@dataclass
class LineMap:
    """The 1-based line where each value of a document starts, by path."""

    lines: dict[Path_, int] = field(default_factory=dict)
    default: int | None = None

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line of `path`, or of its nearest parent that exists."""
        key = tuple(path)
        while True:
            if key in self.lines:
                return self.lines[key]
            if not key:
                return self.default
            key = key[:-1]


def load_yaml(text: str) -> tuple[Any, LineMap]:
    """Parse one YAML document; return the data and where each value sits."""
    try:
        loader = _StrictLoader(text)  # rejects control characters already
    except yaml.reader.ReaderError as exc:
        at_line = text.count("\n", 0, exc.position) + 1
        raise YamlSyntaxError(f"invalid YAML: character #x{exc.character:04x} is not allowed "
                              "in a YAML file", at_line) from None
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = clip(str(exc.problem or exc.context or "invalid YAML"))
        if isinstance(exc, yaml.scanner.ScannerError | yaml.parser.ParserError
                      | yaml.composer.ComposerError) and not isinstance(exc, _Refused):
            hint, line = _syntax_hint(exc, text)
            message = f"{message}; {hint}"
        raise YamlSyntaxError(f"invalid YAML: {message}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {clip(str(exc))}", None) from None
    except RecursionError:
        raise YamlSyntaxError("invalid YAML: nested too deeply", None) from None
    finally:
        loader.dispose()
    line_map = LineMap(default=1)
    if node is not None:
        for path, line in _walk(node, ()):
            line_map.lines[path] = line
    return data, line_map


def _walk(node: yaml.Node, path: Path_) -> Iterator[tuple[Path_, int]]:
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            yield (*path, key), key_node.start_mark.line + 1
            # a value on its own lines (a block) points at its first line, scalars at the key
            for sub_path, line in _walk(value_node, (*path, key)):
                if sub_path != (*path, key):
                    yield sub_path, line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk(item, (*path, index))
