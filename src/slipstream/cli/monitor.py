"""`slipstream monitor status|report|export|profile`: read a prediction log offline, profile a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from slipstream.cli.output import console, print_json, reporting

if TYPE_CHECKING:
    from slipstream.monitor.report import DbSummary

monitor_app = typer.Typer(
    name="monitor", help="Read a prediction log: a terminal summary or an offline HTML report.", no_args_is_help=True
)

DbOpt = Annotated[
    str,
    typer.Option(
        "--db",
        help="The prediction log the server writes: a SQLite file, or postgresql://user@host/db (password from "
        "PGPASSWORD or PGPASSFILE).",
    ),
]
PositiveOpt = Annotated[float, typer.Option("--positive-label", help="The class counted as 'selected' per group.")]


def _render_status(s: DbSummary) -> None:
    from rich.table import Table

    def num(v: float | None, digits: int = 3) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    overview = Table(title=f"Prediction log {s.path}", show_header=False)
    overview.add_row("models", ", ".join(s.models) or "–")
    overview.add_row("predictions / labeled", f"{s.predictions} / {s.labeled}")
    overview.add_row("realized accuracy", num(s.accuracy))
    overview.add_row("latency p50 / p99 (ms)", f"{num(s.latency_ms.get('p50'), 2)} / {num(s.latency_ms.get('p99'), 2)}")
    overview.add_row(f"out-of-distribution share (> {s.ood_threshold:g})", num(s.ood_share))
    latest = s.latest
    if latest is not None:
        if latest.drift is not None:
            d = latest.drift
            overview.add_row("drift", f"{len(d.drifted_features)} input feature(s) drifted ({d.method}, {d.rows} rows)")
        if latest.quality is not None and latest.quality.estimated_accuracy is not None:
            overview.add_row("estimated accuracy (no labels)", num(latest.quality.estimated_accuracy))
        overview.add_row("log drops", str(latest.store.get("dropped", 0)))
    console.print(overview)
    if s.fairness is not None:
        groups = Table(title="Groups")
        for col in ("group", "rows", "selection rate", "accuracy", "TPR", "FPR"):
            groups.add_column(col)
        for g in s.fairness.groups:
            groups.add_row(g.group, str(g.rows), num(g.selection_rate), num(g.accuracy), num(g.tpr), num(g.fpr))
        console.print(groups)
        gaps = Table(title=f"Gaps ({s.fairness.confidence * 100:g} % simultaneous intervals)")
        for col in ("gap", "value", "interval", "threshold", "verdict"):
            gaps.add_column(col)
        for gap in s.fairness.gaps:
            interval = "–" if gap.low is None else f"{num(gap.low)} to {'∞' if gap.high is None else num(gap.high)}"
            verdict: str = gap.status
            if gap.status == "undecided":
                verdict += f" (need ≈ {gap.needed_rows:,} per group)" if gap.needed_rows else " (not enough rows)"
            sign = "<" if gap.direction == "below" else ">"
            gaps.add_row(
                gap.metric.replace("_", " "),
                num(gap.value),
                interval,
                f"{sign} {gap.threshold:g}",
                verdict,
            )
        console.print(gaps)
        if s.fairness.flagged:
            flagged = [g.reason for g in s.fairness.gaps if g.status == "beyond threshold"]
            console.print(f"[bold red]bias flagged:[/] {'; '.join(flagged)}", highlight=False)
        for gap in s.fairness.gaps:
            if gap.status == "undecided":
                console.print(f"[yellow]undecided:[/] {gap.reason}", highlight=False)
    if latest is not None:
        alerts = [a for a in latest.alerts if a.state in ("firing", "pending")]
        for a in alerts:
            colour = "red" if a.state == "firing" else "yellow"
            console.print(f"[bold {colour}]{a.state}[/] {a.rule}: {a.reason}", highlight=False)
        if not alerts:
            console.print("[green]no alert firing[/]")


@monitor_app.command()
def status(
    db: DbOpt,
    positive_label: PositiveOpt = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Summarize a prediction log in the terminal."""
    from slipstream.monitor.report import summarize

    with reporting(as_json=json_out):
        summary = summarize(db, positive_label=positive_label)
    if json_out:
        print_json(summary)
    else:
        _render_status(summary)


@monitor_app.command()
def report(
    db: DbOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")] = Path("monitor.html"),
    positive_label: PositiveOpt = 1.0,
) -> None:
    """Write an offline HTML report (inline SVG plots, nothing fetched from the network)."""
    from slipstream.monitor.report import render_html, summarize

    with reporting(as_json=False):
        html = render_html(summarize(db, positive_label=positive_label))
    output.write_text(html, encoding="utf-8")
    console.print(f"wrote {output} ({len(html) // 1024} KiB)")


@monitor_app.command()
def export(
    db: DbOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="The JSON-lines file to write.")] = Path(
        "predictions.jsonl"
    ),
) -> None:
    """Write every logged prediction, with its label once it came, as one JSON object per line."""
    from slipstream.monitor.report import export_rows

    with reporting(as_json=False):
        rows = export_rows(db, output)
    console.print(f"wrote {output} ({rows} rows)")


@monitor_app.command()
def profile(
    bundle: Annotated[Path, typer.Argument(help="The bundle to profile (left untouched).")],
    data: Annotated[str, typer.Option(help="Reference data: .npz/.csv/.parquet or file.py:fn (labels optional).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the new, profiled bundle.")],
    task: Annotated[str, typer.Option(help="auto, classification or regression.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at OUTPUT.")] = False,
) -> None:
    """Write a new bundle with profile.json: the reference that drift, OOD and accuracy monitoring use.

    `slipstream build` already writes one into its winner; use this for a bundle made another way.
    Profile on held-out data: statistics from training data make the build-time accuracy look too good.
    """
    import shutil

    from slipstream.artifact import Bundle
    from slipstream.data.datasets import load_dataset
    from slipstream.monitor.penultimate import with_embedding_output
    from slipstream.monitor.profile import ProfileConfig, profile_from_dataset, write_profiled_bundle

    if task not in ("auto", "classification", "regression"):
        raise typer.BadParameter(f"expected auto, classification or regression; got {task!r}", param_hint="--task")
    staged = output.parent / f".{output.name}.embedding"
    with reporting(as_json=False):
        source = Bundle.load(bundle)
        dataset = load_dataset(data, source.manifest.inputs)
        config = ProfileConfig.model_validate({"task": task})
        try:
            # As `slipstream build` packages a winner: a classifier's penultimate layer becomes a monitoring-only
            # output (clients never see it), which the profile samples for the embedding drift test.
            exposed = with_embedding_output(source.path, staged, overwrite=True) if task != "regression" else None
            start = exposed or source.path
            made = write_profiled_bundle(
                start, output, profile_from_dataset(start, dataset, config), overwrite=overwrite
            )
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    extra = " and a monitoring-only embedding output" if exposed else ""
    console.print(f"[green]✓[/] wrote {made} with profile.json ({len(dataset)} reference rows){extra}", highlight=False)
