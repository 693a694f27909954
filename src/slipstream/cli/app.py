"""Command definitions. Each command parses options, calls the API, and prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import typer

from slipstream.cli.analyze import analyze_app
from slipstream.cli.deploy import export_command
from slipstream.cli.monitor import monitor_app
from slipstream.cli.output import console, parse_dims, parse_ints, print_json, reporting, status
from slipstream.cli.render import render_bench, render_parity, render_summary
from slipstream.cli.serve import serve_command
from slipstream.cli.signing import keygen_command, sign_command, verify_command

if TYPE_CHECKING:
    from slipstream.importers.transformers_dir import Task

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
    model: Annotated[
        Path,
        typer.Argument(
            help="The source model (.onnx, .keras, .h5, .tflite, SavedModel dir, .pt, .pt2, .joblib/.pkl, "
            "a transformers save_pretrained dir, "
            "or a PyTorch entry point FILE.py:FACTORY)."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the bundle directory.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the file's stem).")] = None,
    model_version: Annotated[str, typer.Option("--model-version", help="Model version.")] = "1",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at OUTPUT.")] = False,
    framework: Annotated[
        str,
        typer.Option(
            help="auto (from the suffix), onnx, keras, tensorflow (SavedModel dir), tflite, torch or sklearn."
        ),
    ] = "auto",
    signature: Annotated[str, typer.Option(help="The SavedModel signature to convert.")] = "serving_default",
    custom_objects: Annotated[
        str | None, typer.Option(help="Keras custom layers as module:dict (importing the module runs its code).")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="Load sources that run code when loaded (pickled models, Keras Lambda layers).")
    ] = False,
    skip_parity: Annotated[
        bool, typer.Option(help="Write the bundle without the parity proof (recorded in the manifest).")
    ] = False,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(help="PyTorch example input shape, e.g. batch,1,8,8 (names are dynamic axes); per input."),
    ] = None,
    input_dtype: Annotated[
        list[str] | None, typer.Option(help="dtype of the --input-shape inputs (default float32); one or per input.")
    ] = None,
    dynamic_axis: Annotated[
        list[str] | None, typer.Option(help="Another dynamic axis, INPUT:AXIS=NAME or AXIS=NAME; repeatable.")
    ] = None,
    exporter: Annotated[str | None, typer.Option(help="PyTorch exporter: dynamo (default) or torchscript.")] = None,
    opset: Annotated[int | None, typer.Option(min=7, help="ai.onnx opset to export to (default: exporter's).")] = None,
    sample_data: Annotated[
        Path | None,
        typer.Option(
            "--sample-data", "--sample", help="An .npz of real inputs (one array per input) for the parity proof."
        ),
    ] = None,
    output_name: Annotated[list[str] | None, typer.Option(help="PyTorch output names, in order.")] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="For a transformers model directory (save_pretrained): text-classification, feature-extraction "
            "or text-generation (default: from its config.json). Never downloads."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a model into a verified bundle."""
    from typing import cast

    from slipstream.importers import convert as do_convert
    from slipstream.importers.convert import FrameworkChoice

    with reporting(as_json=as_json), status(f"Converting {model}…", quiet=as_json):
        bundle = do_convert(
            model, output, name=name, version=model_version, overwrite=overwrite,
            framework=cast(FrameworkChoice, framework), signature=signature, custom_objects=custom_objects,
            trust_pickle=trust_pickle, skip_parity=skip_parity, input_shapes=input_shape, input_dtypes=input_dtype,
            dynamic_axes=dynamic_axis, exporter=_exporter(exporter), opset=opset, sample=sample_data,
            output_names=output_name, task=_task(task),
        )  # fmt: skip
    if as_json:
        print_json(bundle.manifest)
    else:
        console.print(f"[green]✓[/] wrote bundle [bold]{bundle.path}[/] ({bundle.manifest.name})", highlight=False)
        render_parity(bundle.manifest.parity)


def _task(value: str | None) -> Task | None:
    from slipstream.importers.transformers_dir import TASKS

    if value is None or value in TASKS:
        return value
    raise typer.BadParameter(f"expected one of {', '.join(TASKS)}; got {value!r}", param_hint="--task")


def _exporter(value: str | None) -> Literal["dynamo", "torchscript"] | None:
    if value is None or value in ("dynamo", "torchscript"):
        return cast(Literal["dynamo", "torchscript"] | None, value)
    raise typer.BadParameter(f"expected dynamo or torchscript; got {value!r}", param_hint="--exporter")


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
    compare: Annotated[
        str | None,
        typer.Option(help="Also time the torch source in eager mode on the same inputs (file.py:fn, .pt, .pt2)."),
    ] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow --compare to load a pickled whole-model file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency percentiles, throughput, GFLOP/s, memory and load time at several batch sizes."""
    from slipstream.artifact import Bundle
    from slipstream.evaluate.bench import BenchSettings
    from slipstream.evaluate.bench import bench as do_bench
    from slipstream.runtime import EngineBase, open_engine, target

    batches = parse_ints(batch, "--batch")
    dims = parse_dims(dim or [], "--dim")
    with reporting(as_json=as_json):
        b = Bundle.load(bundle)
        tgt = target(target_name, intra_op_threads=threads, allow_fallback=allow_fallback)
        settings = BenchSettings(batch_sizes=batches, dims=dims, max_time_s=max_time)
        with status(f"Benchmarking {b.manifest.name} at batch {', '.join(map(str, batches))}…", quiet=as_json):
            engines: list[EngineBase] = []  # bench builds it (timing the load); --compare re-uses it

            def build_engine() -> EngineBase:
                engines.append(open_engine(b, tgt))  # the bundle's recorded engine (onnxruntime or OpenVINO)
                return engines[-1]

            report = do_bench(build_engine, settings)
            if compare is not None:  # side by side with the same bundle and threads, torch at its thread count
                from slipstream.evaluate.sidebyside import ALTERNATING
                from slipstream.evaluate.torch_eager import TORCH_EAGER, compare_torch_source

                alternating = open_engine(b, tgt.model_copy(update=ALTERNATING))  # see ALTERNATING's comment
                timed = compare_torch_source(compare, alternating, settings, trust_pickle=trust_pickle)
                report = report.model_copy(update={"source_framework": TORCH_EAGER, "comparisons": timed})
    if as_json:
        print_json(report)
    else:
        render_bench(report)


@app.command()
def optimize(
    bundle: Annotated[Path | None, typer.Argument(help="A bundle directory.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where to write the new bundle.")] = None,
    passes: Annotated[
        list[str] | None,
        typer.Option("--pass", help="NAME[:key=value,...], repeatable, run in order (e.g. quantize.static)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at OUTPUT.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for generated data and random choices.")] = 0,
    data: Annotated[
        Path | None,
        typer.Option(help=".npz of real inputs named like the model's: fidelity and calibration use it."),
    ] = None,
    cache: Annotated[bool, typer.Option(help="Reuse results of identical pass runs.")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="Pass cache directory (default: user cache dir).")] = None,
    list_all: Annotated[bool, typer.Option("--list", help="List the available passes and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run passes (quantize, fp16, int4, binarize, prune, graph optimization) on a bundle."""
    from slipstream.cli.optimize import list_passes, run_optimize

    if list_all:
        list_passes(as_json=as_json)
        return
    if bundle is None or output is None or not passes:
        raise typer.BadParameter("give BUNDLE, -o OUTPUT and at least one --pass NAME (or --list)")
    with reporting(as_json=as_json):
        run_optimize(
            bundle,
            output,
            passes,
            overwrite=overwrite,
            seed=seed,
            data=data,
            cache_dir=cache_dir,
            use_cache=cache,
            as_json=as_json,
        )


@app.command()
def build(
    recipe: Annotated[Path, typer.Argument(help="A build recipe (YAML).")],
    as_json: JsonOpt = False,
) -> None:
    """Try candidate optimizations under an accuracy budget and keep the fastest that fits."""
    from slipstream.build.recipe import load_recipe
    from slipstream.cli.build import render_record, run_with_progress

    with reporting(as_json=as_json):
        result = run_with_progress(load_recipe(recipe), quiet=as_json)
    if as_json:
        print_json(result.record)
    else:
        render_record(result.record)
        console.print(f"winner bundle: {result.winner.path}", highlight=False)
        console.print(
            f"report: {result.output / 'report.html'}  (run record: {result.output / 'run.json'})", highlight=False
        )


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path("demo-output"),
    fast: Annotated[bool, typer.Option(help="A shorter build and less traffic (used by the test suite).")] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of every random choice of the traffic: which digits, their order, the groups.")
    ] = 0,
) -> None:
    """Train, convert, build, serve, attack and watch a digits CNN: the whole flow on this machine."""
    from slipstream.demo import run_demo

    with reporting(as_json=False):
        run_demo(workdir, fast=fast, seed=seed)


app.command("serve")(serve_command)
app.command("export")(export_command)
app.command("sign")(sign_command)
app.command("verify")(verify_command)
app.command("keygen")(keygen_command)
app.add_typer(monitor_app, name="monitor")
app.add_typer(analyze_app, name="analyze")


def main() -> None:
    app()
