"""`slipstream analyze sensitivity`: which layers cost the most quality when compressed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer
from rich.markup import escape
from rich.table import Table

from slipstream.cli.output import console, err_console, print_json, reporting

analyze_app = typer.Typer(help="Analyse a bundle before compressing it.", no_args_is_help=True)


@analyze_app.command("sensitivity")
def sensitivity(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory.")],
    data: Annotated[str, typer.Option(help="Evaluation data: .npz/.csv/.parquet or file.py:fn (with labels).")],
    metric: Annotated[str, typer.Option(help="accuracy, top5, f1_macro, mae, rmse, cosine or agreement.")] = "accuracy",
    pass_name: Annotated[
        str, typer.Option("--pass", help="quantize.static, quantize.dynamic or prune.magnitude.")
    ] = "quantize.static",
    option: Annotated[list[str] | None, typer.Option(help="Pass option KEY=VALUE; repeatable.")] = None,
    budget: Annotated[float, typer.Option(help="Quality drop to stay within when suggesting exclusions.")] = 0.01,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Apply a pass to one layer at a time and rank the layers by the quality they cost."""
    from slipstream.artifact import Bundle
    from slipstream.build.sensitivity import SensitivityPass, analyze_sensitivity
    from slipstream.data.datasets import load_dataset
    from slipstream.evaluate.metrics import get_metric
    from slipstream.passes.recipe import parse_pass_ref

    with reporting(as_json=as_json):
        b = Bundle.load(bundle)
        dataset = load_dataset(data, b.manifest.inputs).take(2000)
        _, options = parse_pass_ref(f"{pass_name}:{','.join(option or [])}")
        with err_console.status("analysing layers…") as status:
            report = analyze_sensitivity(
                b,
                dataset,
                get_metric(metric),
                pass_name=cast(SensitivityPass, pass_name),
                options=options,
                progress=lambda i, n, node: status.update(f"layer {i + 1}/{n}: {escape(node)}"),
                data=data,
            )
    suggestion = report.most_sensitive(budget)
    if as_json:
        print_json({**report.model_dump(mode="json"), "suggested_nodes_to_exclude": suggestion})
        return
    table = Table(
        title=f"{report.pass_name} one layer at a time: {report.metric} (baseline {report.baseline_quality:.4f})"
    )
    for col in ("node", "op", report.metric, "drop"):
        table.add_column(col, justify="right" if col in (report.metric, "drop") else "left")
    for row in report.layers:
        table.add_row(escape(row.node), row.op_type, f"{row.quality:.4f}", f"{row.drop:+.4f}")
    console.print(table)
    console.print(
        f"all layers: {report.all_layers_quality:.4f} "
        f"(drop {report.baseline_quality - report.all_layers_quality:+.4f}); "
        f"{report.skipped_unnamed} unnamed layers skipped; {report.duration_s:.1f} s",
        highlight=False,
    )
    if suggestion:
        console.print(
            f"to stay within {budget}: {pass_name}:nodes_to_exclude=[{','.join(suggestion)}]", highlight=False
        )
