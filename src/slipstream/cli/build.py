"""`slipstream build RECIPE.yaml`: progress while it runs, then the candidate table and the report's path."""

from __future__ import annotations

import time
import warnings

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from slipstream.build.recipe import Recipe
from slipstream.build.record import RunRecord
from slipstream.build.search import BuildEvent, BuildResult, run_build
from slipstream.cli.output import console, err_console
from slipstream.passes.base import PassWarning


def run_with_progress(recipe: Recipe, *, quiet: bool) -> BuildResult:
    # Pass warnings (e.g. "ConvInteger is 7× slower") are recorded per candidate and shown with the
    # table, not printed as Python warnings in the middle of the progress bar.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PassWarning)
        return _run(recipe, quiet=quiet)


def _describe(event: BuildEvent) -> str:
    if event.stage == "candidate":
        best = f" · best so far: {event.best}" if event.best else ""
        return f"candidate {event.index + 1}/{event.total} {event.candidate or ''}{best}"
    what = "" if event.candidate in (None, event.stage) else f" {event.candidate}"
    return f"{event.stage} {event.index + 1}/{event.total}{what}" if event.total else f"{event.stage}{what}"


LINE_EVERY_S = 10.0


class _Lines:
    """Build progress as plain lines: every new stage or candidate, and within one (distillation steps, say)
    at most a line per ``every_s`` seconds."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.started, self.last = every_s, time.monotonic(), -every_s
        self.step: tuple[str, int] | None = None

    def __call__(self, event: BuildEvent) -> None:
        now, step = time.monotonic(), (event.stage, event.index)
        if step == self.step and now - self.last < self.every_s:
            return
        self.step, self.last = step, now
        err_console.print(f"[{now - self.started:7.1f} s] {escape(_describe(event))}", highlight=False)


def _run(recipe: Recipe, *, quiet: bool) -> BuildResult:
    if quiet:
        return run_build(recipe)
    if not err_console.is_terminal:  # a log file or CI: a line per step, with the time since the start
        return run_build(recipe, progress=_Lines(LINE_EVERY_S))
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("importing the source", total=None)

        def on_event(event: BuildEvent) -> None:
            best = f" · best so far: {event.best}" if event.best else ""
            if event.stage == "candidate":
                bar.update(
                    task,
                    description=f"candidate {escape(event.candidate or '')}{escape(best)}",
                    completed=event.index,
                    total=event.total,
                )
            else:  # a stage; with steps of its own (sensitivity: one per layer) when it has a total
                description = f"{event.stage} {escape(event.candidate or '')}"
                bar.update(task, description=description, completed=event.index, total=event.total or None)

        return run_build(recipe, progress=on_event)


def render_record(record: RunRecord) -> None:
    sel = record.selection
    decisions = {r.name: r.reason for r in sel.rejections} if sel else {}
    table = Table(title=f"{record.name}: {record.metric} and {record.objective} at batch {record.batch_size}")
    for col in ("candidate", "status", record.metric, "p50 ms", "samples/s", "KiB", "decision"):
        # names fold rather than end in an ellipsis: two cut to "int8-dyna…" could not be told apart
        table.add_column(
            col,
            justify="right" if col in ("p50 ms", "samples/s", "KiB") else "left",
            overflow="fold" if col == "candidate" else "ellipsis",
        )
    for c in (record.baseline, *record.candidates):
        m = c.metrics
        decision = "winner" if sel and sel.winner == c.name else decisions.get(c.name, "")
        if c.status == "failed":
            decision = f"failed: {(c.error or '').splitlines()[0]}"
        style = "bold green" if sel and sel.winner == c.name else ("red" if c.status == "failed" else "")
        table.add_row(
            escape(c.name),
            c.status,
            "-" if m is None else f"{m.quality:.4f}",
            "-" if m is None else f"{m.latency_p50_ms:.3f}",
            "-" if m is None else f"{m.throughput_sps:,.0f}",
            "-" if m is None else f"{m.size_bytes / 1024:,.1f}",
            escape(decision),
            style=style,
        )
    console.print(table)
    for c in record.candidates:
        for text in dict.fromkeys(c.warnings):
            console.print(f"[yellow]{escape(c.name)}:[/] {escape(text)}", highlight=False)
    for line in record.headline:  # the winner line and every side-by-side ratio, as run.json records them
        console.print(escape(line), highlight=False)
    chosen = record.tuning.get("chosen")
    if chosen:
        console.print(f"session settings: {escape(str(chosen))}", highlight=False)
    streams = record.tuning.get("streams")
    if isinstance(streams, dict):  # an OpenVINO winner: whether it serves on one stream per core, measured
        console.print(f"OpenVINO streams: {escape(str(streams['reason']))}", highlight=False)
    console.print(f"build took {record.duration_s:.1f} s", highlight=False)
