"""Command definitions. Each command parses options, calls the API, and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slipstream.cli.output import console, parse_dims, parse_ints, print_json, reporting, status
from slipstream.cli.render import render_bench, render_summary

app = typer.Typer(
    name="slipstream",
    help="Make a trained model a fast, small, verified, monitored production service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _version(value: bool) -> None:
    if value:
        from slipstream import __version__

        console.print(f"slipstream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Make a trained model a fast, small, verified, monitored production service."""


@app.command()
def convert(
    model: Annotated[Path, typer.Argument(help="The source model file (.onnx).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the bundle directory.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the file's stem).")] = None,
    model_version: Annotated[str, typer.Option("--model-version", help="Model version.")] = "1",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at OUTPUT.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a model into a verified bundle."""
    from slipstream.importers import convert as do_convert

    with reporting(as_json=as_json), status(f"Converting {model}…", quiet=as_json):
        bundle = do_convert(model, output, name=name, version=model_version, overwrite=overwrite)
    if as_json:
        print_json(bundle.manifest)
    else:
        console.print(f"[green]✓[/] wrote bundle [bold]{bundle.path}[/] ({bundle.manifest.name})", highlight=False)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory.")],
    top: Annotated[int, typer.Option(min=0, help="How many of the largest weights to list.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Show a bundle's inputs, outputs, operators, weights, lineage and metrics (verifies hashes)."""
    from slipstream.artifact import Bundle
    from slipstream.artifact.summary import summarize

    with reporting(as_json=as_json):
        summary = summarize(Bundle.load(bundle), top=top)
    if as_json:
        print_json(summary)
    else:
        render_summary(summary)


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory.")],
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    target_name: Annotated[str, typer.Option("--target", help="cpu, edge-cpu, cuda, tensorrt or openvino.")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: physical cores).")] = None,
    allow_fallback: Annotated[
        bool, typer.Option(help="Run on the next provider if the target's is missing (recorded).")
    ] = False,
    dim: Annotated[list[str] | None, typer.Option(help="Size of a symbolic dim, NAME=SIZE; repeatable.")] = None,
    max_time: Annotated[float, typer.Option(min=0.01, help="Time budget per batch size, seconds.")] = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency percentiles, throughput, memory and load time at several batch sizes."""
    from slipstream.artifact import Bundle
    from slipstream.evaluate.bench import BenchSettings
    from slipstream.evaluate.bench import bench as do_bench
    from slipstream.runtime import Engine, target

    batches = parse_ints(batch, "--batch")
    dims = parse_dims(dim or [], "--dim")
    with reporting(as_json=as_json):
        b = Bundle.load(bundle)
        tgt = target(target_name, intra_op_threads=threads, allow_fallback=allow_fallback)
        settings = BenchSettings(batch_sizes=batches, dims=dims, max_time_s=max_time)
        with status(f"Benchmarking {b.manifest.name} at batch {', '.join(map(str, batches))}…", quiet=as_json):
            report = do_bench(lambda: Engine(b, tgt), settings)
    if as_json:
        print_json(report)
    else:
        render_bench(report)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path("demo-output"),
) -> None:
    """Run the embedded default job end to end on this machine."""
    from slipstream.demo import run_demo

    with reporting(as_json=False):
        run_demo(workdir)


def main() -> None:
    app()
