"""`slipstream optimize`: run a fixed recipe of passes, with progress, a summary, or JSON."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pydantic import JsonValue
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from slipstream.cli.output import console, err_console, print_json


def _kb(n: object) -> str:
    return f"{n / 1024:,.1f} KiB" if isinstance(n, int | float) else "?"


def _fidelity(metrics: dict[str, JsonValue]) -> str:
    fid = metrics.get("fidelity")
    if not isinstance(fid, dict) or not isinstance(fid.get("outputs"), dict):
        return "-"
    outputs = fid["outputs"]
    if not isinstance(outputs, dict):
        return "-"
    cosines = [c for o in outputs.values() if isinstance(o, dict) and isinstance(c := o.get("cosine"), float)]
    return f"{min(cosines):.4f}" if cosines else "-"


def list_passes(*, as_json: bool) -> None:
    from slipstream.passes.catalogue import CATALOGUE

    if as_json:
        print_json(
            {
                "passes": [
                    {"name": s.step_name, "takes": s.input_kind, "gives": s.output_kind, "summary": s.summary}
                    for s in CATALOGUE.values()
                ]
            }
        )
        return
    table = Table("pass", "model", "what it does")
    for spec in CATALOGUE.values():
        table.add_row(spec.step_name, f"{spec.input_kind} → {spec.output_kind}", spec.summary)
    console.print(table)


def run_optimize(
    bundle: Path,
    output: Path,
    passes: list[str],
    *,
    overwrite: bool,
    seed: int,
    data: Path | None,
    cache_dir: Path | None,
    use_cache: bool,
    as_json: bool,
) -> None:
    from slipstream.artifact import Bundle
    from slipstream.passes import PassCache, PassWarning, ProgressEvent, optimize

    cache: PassCache | bool = PassCache(cache_dir) if (use_cache and cache_dir) else use_cache
    source = Bundle.load(bundle)
    runs: list[Any] = []
    with (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err_console,
            disable=as_json,
            transient=True,
        ) as bar,
        warnings.catch_warnings(),
    ):
        # Each pass's warnings are printed below with its summary, not as Python warnings.
        warnings.simplefilter("ignore", PassWarning)
        task = bar.add_task("planning", total=len(passes))

        def progress(event: ProgressEvent) -> None:
            if event.run is None:
                bar.update(task, description=f"{event.step} ({event.index + 1}/{event.total})")
            else:
                runs.append(event.run)
                bar.advance(task)

        result = optimize(
            source, passes, output, overwrite=overwrite, cache=cache, seed=seed, data=data, progress=progress
        )
    names = [r.step.split("@")[0] for r in runs]
    if as_json:
        print_json(
            {
                "bundle": str(result.path),
                "steps": [
                    {
                        "step": r.step,
                        "duration_s": r.duration_s,
                        "cache_hit": r.cache_hit,
                        "warnings": list(r.warnings),
                    }
                    for r in runs
                ],
                "manifest": result.manifest.model_dump(mode="json"),
            }
        )
        return
    table = Table("pass", "time", "size", "fidelity (min cosine)", "cache")
    for name, r in zip(names, runs, strict=True):
        metrics = r.bundle.manifest.metrics.get(name, {})
        m = metrics if isinstance(metrics, dict) else {}
        table.add_row(
            r.step,
            f"{r.duration_s:.2f} s",
            f"{_kb(m.get('size_bytes_in'))} → {_kb(m.get('size_bytes_out'))}",
            _fidelity(m),
            "hit" if r.cache_hit else "miss",
        )
    console.print(table)
    for r in runs:
        for text in r.warnings:
            err_console.print(f"[bold yellow]warning:[/] {r.step}: {text}", highlight=False)
    console.print(f"[green]✓[/] wrote bundle [bold]{result.path}[/]", highlight=False)
