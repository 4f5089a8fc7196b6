"""Reading YAML and JSON the way a trader means it, remembering the line of every value.

PyYAML follows YAML 1.1, where `flat_by: 16:59` is the integer 1019 and `no` is False. A rule file
is not the place for such surprises, so our loader resolves only YAML 1.2 core scalars: `true` /
`false`, decimal numbers, `null`; times and dates stay strings. Duplicate keys are an error
(PyYAML would keep the last one silently).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars and duplicate-key detection."""

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
                    f"duplicate key {key!r} (first on line {seen[key] + 1})",
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
        message = exc.problem or exc.context or "invalid YAML"
        raise YamlSyntaxError(f"invalid YAML: {message}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", None) from None
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
