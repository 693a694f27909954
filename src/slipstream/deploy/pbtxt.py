"""Protobuf text format, written from plain Python values: Triton reads ``config.pbtxt`` in this format.

A tiny writer instead of Triton's generated classes keeps ``tritonclient`` (and its protobuf pin) out of
slipstream's runtime; the tests parse every file written with Triton's own ``ModelConfig`` message, so a
misspelled field or a wrong type fails there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Enum:
    """An enum value, written bare (``TYPE_FP32``), not quoted like a string."""

    name: str


Value = str | int | float | bool | Enum | Mapping[str, "Value"] | Sequence["Value"]


def dumps(message: Mapping[str, Value], *, comment: str = "") -> str:
    """``message`` in text format; a sequence becomes a repeated field, a mapping a nested message."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += _fields(message, 0)
    return "\n".join(lines) + "\n"


def _fields(message: Mapping[str, Value], depth: int) -> list[str]:
    lines: list[str] = []
    for key, value in message.items():
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        for item in items:
            lines += _field(key, item, depth)
    return lines


def _field(key: str, value: Value, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, Mapping):
        return [f"{pad}{key} {{", *_fields(value, depth + 1), f"{pad}}}"]
    return [f"{pad}{key}: {_scalar(value)}"]


def _scalar(value: Value) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(
            value, ensure_ascii=False
        )  # a double-quoted string with C-style escapes, as text format takes
    raise TypeError(f"no text-format scalar for {type(value).__name__}")


def parameters(values: Mapping[str, str]) -> list[Value]:
    """A protobuf map<string, string> as text format writes it: one {key, value} entry per item."""
    return [{"key": k, "value": v} for k, v in values.items()]
