"""How commands print: rich for people, JSON for scripts, one format for errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console

from slipstream.errors import SlipstreamError

LOG_WIDTH = 140  # columns when writing to a file or a pipe (rich's 80 folds the build table into a tall one)


def _console(*, stderr: bool = False) -> Console:
    """A console at the terminal's width, or LOG_WIDTH for a log (COLUMNS, when set, still wins)."""
    plain = Console(stderr=stderr)
    if plain.is_terminal or os.environ.get("COLUMNS"):
        return plain
    return Console(stderr=stderr, width=LOG_WIDTH)


console = _console()
err_console = _console(stderr=True)


def print_json(value: BaseModel | dict[str, Any]) -> None:
    text = value.model_dump_json(indent=2) if isinstance(value, BaseModel) else json.dumps(value, indent=2)
    sys.stdout.write(text + "\n")


def fail(exc: SlipstreamError, *, as_json: bool) -> NoReturn:
    if as_json:
        print_json({"error": exc.message, "type": type(exc).__name__, "hint": exc.hint})
    else:
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
    raise typer.Exit(code=1)


@contextmanager
def reporting(*, as_json: bool) -> Iterator[None]:
    """Turn slipstream errors into a clear message and exit code 1; anything else is a bug."""
    try:
        yield
    except SlipstreamError as exc:
        fail(exc, as_json=as_json)


@contextmanager
def status(message: str, *, quiet: bool) -> Iterator[None]:
    """A spinner for people; nothing when printing JSON."""
    if quiet:
        yield
        return
    with err_console.status(message):
        yield


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise typer.BadParameter(
            f"expected comma-separated integers like 1,8,32; got {text!r}", param_hint=option
        ) from exc
    if not values:
        raise typer.BadParameter("expected at least one integer", param_hint=option)
    return values


def parse_dims(items: list[str], option: str) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise typer.BadParameter(f"expected NAME=SIZE like seq=32; got {item!r}", param_hint=option)
        dims[name.strip()] = int(value)
    return dims


Renderer = Callable[[Any], None]
